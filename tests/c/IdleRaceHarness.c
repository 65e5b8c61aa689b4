/** @file
  Host-built test of the lost wake-up race (tests/test_idle_wake.py): the
  firmware's idle protocol (X64/IdleHalt.nasm) with a POSIX thread standing
  for the helper's vCPU, pause(2) for HLT and SIGUSR1 for the host's NMI.

  The helper thread runs the real dispatcher (mh_serve, DispatchHarness.c)
  and, whenever nothing is pending, the idle sequence below: publish the idle
  word, fence, re-check CommandSeq, then "halt". The signal handler does what
  the NMI handler does: when the signal interrupted the window (from the
  function's entry up to and including the instruction that halts), it moves
  the return address past the halt, so a wake that arrives before the halt is
  not slept through. The host side (the calling thread) posts commands and
  wakes the helper whenever it reads the idle word set, optionally without a
  fence (like the Python host) and with the rate-limited re-wake.

  Mailbox offsets are passed in by the caller (derived from HelperAbi.h by
  helper/abi.py); this file includes only libc headers.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#define _GNU_SOURCE

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>

#define MH_EXPORT  __attribute__ ((visibility ("default")))

#define IDLE_RACE_HOST_FENCE  0x1   ///< Host fences between posting and reading the idle word
#define IDLE_RACE_REWAKE      0x2   ///< Host wakes again while the helper stays idle without answering
#define IDLE_RACE_NO_FIXUP    0x4   ///< Negative control: the handler does not move the return address
#define IDLE_RACE_IN_WINDOW   0x8   ///< Post only once the helper is past its re-check (Idle 2, stretched)

#define IDLE_RESULT_WOKEN   0
#define IDLE_RESULT_WINDOW  1
#define IDLE_RESULT_POSTED  2

int
mh_serve (
  void  *Context
  );

//
// The idle sequence of X64/IdleHalt.nasm in the host's (System V) calling
// convention: rdi = idle word, rsi = CommandSeq, edx = last sequence served,
// rcx = stretch (PAUSE loops between the re-check and the halt). The halt is
// pause(2): it returns only after a signal handler ran.
//
uint32_t
HostIdleHalt (
  volatile uint32_t  *IdleWord,
  volatile uint32_t  *CommandSeq,
  uint32_t           LastSeq,
  uint64_t           Stretch
  );

extern const char  HostIdleWindowStart[];
extern const char  HostIdleWindowHalt[];
extern const char  HostIdleWindowResume[];

__asm__ (
  "  .text\n"
  "  .globl HostIdleHalt\n"
  "  .type HostIdleHalt, @function\n"
  "HostIdleHalt:\n"
  "HostIdleWindowStart:\n"
  "  movl $1, (%rdi)\n"
  "  mfence\n"
  "  movl (%rsi), %eax\n"
  "  cmpl %edx, %eax\n"
  "  jne 3f\n"
  "  testq %rcx, %rcx\n"
  "  jz HostIdleWindowHalt\n"
  "  movl $2, (%rdi)\n"
  "1:\n"
  "  pause\n"
  "  decq %rcx\n"
  "  jnz 1b\n"
  "HostIdleWindowHalt:\n"
  "  movl $34, %eax\n"            // SYS_pause
  "  syscall\n"
  "  movl $0, %eax\n"
  "  jmp 4f\n"
  "HostIdleWindowResume:\n"
  "  movl $1, %eax\n"
  "  jmp 4f\n"
  "3:\n"
  "  movl $2, %eax\n"
  "4:\n"
  "  movl $0, (%rdi)\n"
  "  ret\n"
  "  .size HostIdleHalt, .-HostIdleHalt\n"
  );

typedef struct {
  void               *Context;
  volatile uint32_t  *CommandSeq;
  volatile uint32_t  *Idle;
  volatile uint32_t  *ResponseSeq;
  volatile int       Stop;
  uint64_t           Stretch;
  uint64_t           Results[3];
} IDLE_RACE_HELPER;

static volatile int  mNoFixup;

/**
  The "NMI handler": skip the halt when the signal interrupted the window.

  @param[in] Signal   SIGUSR1.
  @param[in] Info     Unused.
  @param[in] Context  The interrupted context (ucontext_t).
**/
static
void
IdleRaceOnSignal (
  int        Signal,
  siginfo_t  *Info,
  void       *Context
  )
{
  ucontext_t  *Interrupted;
  uintptr_t   Rip;

  (void)Signal;
  (void)Info;
  Interrupted = (ucontext_t *)Context;
  Rip         = (uintptr_t)Interrupted->uc_mcontext.gregs[REG_RIP];
  //
  // HostIdleWindowHalt is a 5-byte mov, then the 2-byte syscall: a signal
  // taken at the syscall (+5) or before is inside the window; one taken
  // during the syscall shows the address after it (+7): the halt ended.
  //
  if (!mNoFixup && (Rip >= (uintptr_t)HostIdleWindowStart) && (Rip <= (uintptr_t)HostIdleWindowHalt + 5)) {
    Interrupted->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)HostIdleWindowResume;
  }
}

/**
  The helper thread: serve, and go idle whenever nothing is pending.

  @param[in] Argument  IDLE_RACE_HELPER.

  @return NULL.
**/
static
void *
IdleRaceHelper (
  void  *Argument
  )
{
  IDLE_RACE_HELPER  *Helper;
  uint32_t          Last;

  Helper = (IDLE_RACE_HELPER *)Argument;
  Last   = *Helper->ResponseSeq;
  while (!Helper->Stop) {
    if (mh_serve (Helper->Context)) {
      Last = *Helper->ResponseSeq;
      continue;
    }

    Helper->Results[HostIdleHalt (Helper->Idle, Helper->CommandSeq, Last, Helper->Stretch)]++;
  }

  return NULL;
}

/**
  Nanoseconds of CLOCK_MONOTONIC.

  @return The time.
**/
static
uint64_t
IdleRaceNow (
  void
  )
{
  struct timespec  Now;

  clock_gettime (CLOCK_MONOTONIC, &Now);
  return (uint64_t)Now.tv_sec * 1000000000ull + (uint64_t)Now.tv_nsec;
}

/**
  Post Commands NOP commands to a helper thread that goes idle between them
  and count what happened.

  @param[in]  Context         From mh_create.
  @param[in]  Mailbox         The mailbox (header first).
  @param[in]  CommandSeqOff   Offset of CommandSeq.
  @param[in]  CommandOff      Offset of Command.
  @param[in]  ResponseSeqOff  Offset of ResponseSeq.
  @param[in]  IdleOff         Offset of Idle.
  @param[in]  Commands        How many commands to post.
  @param[in]  Flags           IDLE_RACE_* bits.
  @param[in]  Stretch         PAUSE loops between the helper's re-check and its halt.
  @param[in]  TimeoutNs       How long one command may wait for its response.
  @param[out] Stats           [0] answered, [1] lost (timed out), [2] wakes sent,
                              [3] halts woken, [4] window fix-ups, [5] posted at re-check.

  @return 0, or -1 when the thread or the handler could not be set up.
**/
MH_EXPORT
int
mh_idle_race (
  void      *Context,
  uint8_t   *Mailbox,
  uint32_t  CommandSeqOff,
  uint32_t  CommandOff,
  uint32_t  ResponseSeqOff,
  uint32_t  IdleOff,
  uint32_t  Commands,
  uint32_t  Flags,
  uint64_t  Stretch,
  uint64_t  TimeoutNs,
  uint64_t  *Stats
  )
{
  IDLE_RACE_HELPER  Helper;
  struct sigaction  Action;
  struct sigaction  Previous;
  pthread_t         Thread;
  uint32_t          Seq;
  uint32_t          Index;
  uint64_t          Start;
  uint64_t          LastWake;
  uint64_t          Now;

  memset (Stats, 0, 6 * sizeof (uint64_t));
  memset (&Helper, 0, sizeof (Helper));
  Helper.Context     = Context;
  Helper.CommandSeq  = (volatile uint32_t *)(Mailbox + CommandSeqOff);
  Helper.ResponseSeq = (volatile uint32_t *)(Mailbox + ResponseSeqOff);
  Helper.Idle        = (volatile uint32_t *)(Mailbox + IdleOff);
  Helper.Stretch     = Stretch;
  mNoFixup           = (Flags & IDLE_RACE_NO_FIXUP) != 0;

  memset (&Action, 0, sizeof (Action));
  Action.sa_sigaction = IdleRaceOnSignal;
  Action.sa_flags     = SA_SIGINFO;
  sigemptyset (&Action.sa_mask);
  if (sigaction (SIGUSR1, &Action, &Previous) != 0) {
    return -1;
  }

  if (pthread_create (&Thread, NULL, IdleRaceHelper, &Helper) != 0) {
    sigaction (SIGUSR1, &Previous, NULL);
    return -1;
  }

  Seq = *Helper.CommandSeq;
  for (Index = 0; Index < Commands; Index++) {
    if ((Flags & IDLE_RACE_IN_WINDOW) != 0) {
      while (*Helper.Idle != 2) {
        __asm__ __volatile__ ("pause");
      }
    }

    *(volatile uint32_t *)(Mailbox + CommandOff) = 0;    // NOP
    Seq++;
    *Helper.CommandSeq = Seq;
    if ((Flags & IDLE_RACE_HOST_FENCE) != 0) {
      __asm__ __volatile__ ("mfence" ::: "memory");
    } else {
      __asm__ __volatile__ ("" ::: "memory");
    }

    Start    = IdleRaceNow ();
    LastWake = 0;
    if (*Helper.Idle != 0) {
      pthread_kill (Thread, SIGUSR1);
      Stats[2]++;
      LastWake = Start;
    }

    while (*Helper.ResponseSeq != Seq) {
      Now = IdleRaceNow ();
      if (Now - Start > TimeoutNs) {
        break;
      }

      if (((Flags & IDLE_RACE_REWAKE) != 0) && (*Helper.Idle != 0) && (Now - LastWake > 100000)) {
        pthread_kill (Thread, SIGUSR1);
        Stats[2]++;
        LastWake = Now;
      }

      __asm__ __volatile__ ("pause");
    }

    if (*Helper.ResponseSeq == Seq) {
      Stats[0]++;
    } else {
      //
      // Lost: the helper sleeps with the command pending. Wake it until it
      // answers (a signal during pause(2) always ends it).
      //
      Stats[1]++;
      while (*Helper.ResponseSeq != Seq) {
        pthread_kill (Thread, SIGUSR1);
        __asm__ __volatile__ ("pause");
      }
    }
  }

  Helper.Stop = 1;
  __asm__ __volatile__ ("mfence" ::: "memory");

  //
  // The helper may be between its stop check and the halt: keep waking it
  // until it has left.
  //
  for ( ; ;) {
    struct timespec  Pause = { 0, 100000 };

    if (pthread_tryjoin_np (Thread, NULL) == 0) {
      break;
    }

    pthread_kill (Thread, SIGUSR1);
    nanosleep (&Pause, NULL);
  }

  sigaction (SIGUSR1, &Previous, NULL);
  Stats[3] = Helper.Results[IDLE_RESULT_WOKEN];
  Stats[4] = Helper.Results[IDLE_RESULT_WINDOW];
  Stats[5] = Helper.Results[IDLE_RESULT_POSTED];
  return 0;
}
