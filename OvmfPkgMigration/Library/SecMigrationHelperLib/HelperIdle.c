/** @file
  The helper's idle loop: poll the mailbox for a short while after each
  command (back-to-back batches never pay a wake-up), then halt with
  interrupts off until the host's NMI (docs/mailbox.md, "Idle and wake").

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "SecMigrationHelperInternal.h"

/**
  Microseconds to PM timer ticks.

  @param[in] Microseconds  At most OVMF_MH_IDLE_MAX_STRETCH_US.

  @return The ticks, rounded up.
**/
STATIC
UINT64
InternalMicrosecondsToTicks (
  IN UINT32  Microseconds
  )
{
  return DivU64x32 (MultU64x32 (Microseconds, SEC_MH_PM_TIMER_HZ) + 999999, 1000000);
}

/**
  Read the optional idle policy (fw_cfg OVMF_MH_IDLE_POLICY_FW_CFG_NAME) and
  turn it into PM timer ticks; without the file, the defaults.

  @param[in]  PmUsable  Whether the PM timer answers (InternalHelperEnablePm).
  @param[out] Idle      Receives the policy.
  @param[out] Detail    Receives a clause for the log line on failure.

  @retval OVMF_MH_STATUS_SUCCESS      Idle is set.
  @retval OVMF_MH_STATUS_IDLE_POLICY  The file is malformed.
**/
UINT32
InternalHelperReadIdlePolicy (
  IN  BOOLEAN      PmUsable,
  OUT SEC_MH_IDLE  *Idle,
  OUT CONST CHAR8  **Detail
  )
{
  OVMF_MH_IDLE_POLICY  Policy;
  UINT16               Item;
  UINTN                Size;

  *Detail             = "";
  Policy.Signature    = OVMF_MH_IDLE_POLICY_SIGNATURE;
  Policy.Flags        = 0;
  Policy.SpinMicroseconds          = OVMF_MH_IDLE_DEFAULT_SPIN_US;
  Policy.WindowStretchMicroseconds = 0;

  if (!RETURN_ERROR (InternalFwCfgFindFile (OVMF_MH_IDLE_POLICY_FW_CFG_NAME, &Item, &Size))) {
    if (Size != sizeof (Policy)) {
      *Detail = " (idle policy: size is not 16 bytes)";
      return OVMF_MH_STATUS_IDLE_POLICY;
    }

    InternalFwCfgSelect (Item);
    InternalFwCfgRead (sizeof (Policy), &Policy);
    if (Policy.Signature != OVMF_MH_IDLE_POLICY_SIGNATURE) {
      *Detail = " (idle policy: bad signature)";
      return OVMF_MH_STATUS_IDLE_POLICY;
    }

    if ((Policy.Flags & ~(UINT32)OVMF_MH_IDLE_POLICY_NEVER_HALT) != 0) {
      *Detail = " (idle policy: unknown flags)";
      return OVMF_MH_STATUS_IDLE_POLICY;
    }

    if ((Policy.SpinMicroseconds > OVMF_MH_IDLE_MAX_SPIN_US) ||
        (Policy.WindowStretchMicroseconds > OVMF_MH_IDLE_MAX_STRETCH_US))
    {
      *Detail = " (idle policy: spin or stretch beyond its maximum)";
      return OVMF_MH_STATUS_IDLE_POLICY;
    }
  }

  //
  // Without the PM timer the helper cannot time its spin: it spins for good
  // and does not claim HALT_WAKE (the caller logs it).
  //
  Idle->Halt         = (BOOLEAN)(PmUsable && ((Policy.Flags & OVMF_MH_IDLE_POLICY_NEVER_HALT) == 0));
  Idle->SpinTicks    = (UINT32)InternalMicrosecondsToTicks (Policy.SpinMicroseconds);
  Idle->StretchTicks = InternalMicrosecondsToTicks (Policy.WindowStretchMicroseconds);
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Serve the mailbox until the host asks for shutdown: spin for
  Idle->SpinTicks after each command, then halt until an NMI.

  Reading the PM timer is an I/O exit that takes QEMU's global lock, which
  QEMU's main thread holds while it finishes the host's inject-nmi: a woken
  helper serves before it reads the timer, and a spinning one reads it only
  every SEC_MH_IDLE_POLLS_PER_TICK_READ polls.

  @param[in,out] Context  A published helper context.
  @param[in]     Idle     The idle policy.
**/
VOID
InternalHelperServeUntilShutdown (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN CONST SEC_MH_IDLE           *Idle
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;
  UINT32                           SpinStart;
  UINT32                           Polls;
  UINT32                           Result;

  Header    = Context->Header;
  SpinStart = Idle->Halt ? InternalHelperPmTimer () : 0;
  Polls     = 0;
  for ( ; ;) {
    if (MigrationHelperServeOne (Context)) {
      if (Context->ShutdownRequested) {
        return;
      }

      if (Idle->Halt) {
        SpinStart = InternalHelperPmTimer ();
      }

      Polls = 0;
      continue;
    }

    Polls++;
    if (!Idle->Halt ||
        ((Polls % SEC_MH_IDLE_POLLS_PER_TICK_READ) != 0) ||
        (((InternalHelperPmTimer () - SpinStart) & SEC_MH_PM_TIMER_MASK) < Idle->SpinTicks))
    {
      CpuPause ();
      continue;
    }

    Result = InternalHelperIdleHalt (&Header->Idle, &Header->CommandSeq, Context->LastSeq, Idle->StretchTicks);
    if (Result == SEC_MH_IDLE_WOKEN) {
      Header->HaltCount = Header->HaltCount + 1;
    } else if (Result == SEC_MH_IDLE_WINDOW) {
      Header->WindowWakes = Header->WindowWakes + 1;
    }

    //
    // Woken (by the host, or spuriously): serve the command that woke it
    // first, then poll for a while again before the next halt, like after
    // a command.
    //
    if (MigrationHelperServeOne (Context) && Context->ShutdownRequested) {
      return;
    }

    SpinStart = InternalHelperPmTimer ();
    Polls     = 0;
  }
}
