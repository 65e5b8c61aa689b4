/** @file
  Fuzz driver for the mailbox dispatcher (host only).

  Two helper contexts, a source and a target, each with its own mailbox and
  guest window, all surrounded by PROT_NONE guard pages: a read or write one
  byte outside the memory the dispatcher was configured with faults. Built
  with ASan/UBSan. Each iteration is one of:

  - a hostile command: random command code and arguments (including boundary
    and wrapping values) on random data-area contents;
  - a stream round trip: the source exports random pages, the stream is
    mutated (bit flips, dropped, duplicated, swapped or truncated records,
    foreign headers) and the target imports it.

  After every command the driver checks the invariants: the status is one
  the ABI defines; the data area changed only inside the output span of an
  export command; the target's guest window changed only on IMPORT_BATCH;
  a mutated stream never completes; an untouched stream always does and
  reproduces the source pages exactly.

  Usage: FuzzDispatch SEED ITERATIONS

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#undef NULL

#include <Base.h>
#include <Library/MigrationHelperCoreLib.h>

#define PAGE           4096ULL
#define WINDOW_PAGES   64ULL
#define MAILBOX_SIZE   (OVMF_MH_MAILBOX_HEADER_SIZE + 512ULL * 1024)
#define RECORD_MAX     (40ULL + PAGE + 16ULL)
#define END_RECORD     96ULL
#define STREAM_HEADER  88ULL

typedef struct {
  OVMF_MH_HELPER_CONTEXT    Context;
  UINT8                     *Mailbox;
  UINT8                     *Window;
  UINT32                    Seq;
} FUZZ_HELPER;

STATIC UINT64  mRng;

STATIC
UINT64
Next (
  VOID
  )
{
  mRng ^= mRng << 13;
  mRng ^= mRng >> 7;
  mRng ^= mRng << 17;
  return mRng;
}

STATIC
UINT64
Below (
  UINT64  Bound
  )
{
  return (Bound == 0) ? 0 : Next () % Bound;
}

STATIC
VOID
Fail (
  CONST CHAR8  *What,
  UINT64       Detail
  )
{
  fprintf (stderr, "FUZZ INVARIANT BROKEN: %s (0x%llx)\n", What, (unsigned long long)Detail);
  abort ();
}

/**
  Map Size bytes with a PROT_NONE guard page on each side.
**/
STATIC
UINT8 *
GuardedMap (
  UINT64  Size
  )
{
  UINT8  *Base;

  Base = mmap (NULL, Size + 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (Base == MAP_FAILED) {
    Fail ("mmap", Size);
  }

  mprotect (Base, PAGE, PROT_NONE);
  mprotect (Base + PAGE + Size, PAGE, PROT_NONE);
  return Base + PAGE;
}

STATIC
VOID
CreateHelper (
  FUZZ_HELPER  *Helper,
  CONST UINT8  *Key
  )
{
  OVMF_MH_SECRET  *Secret;
  UINT8           *SecretPage;

  memset (Helper, 0, sizeof (*Helper));
  Helper->Mailbox                 = GuardedMap (MAILBOX_SIZE);
  Helper->Window                  = GuardedMap (WINDOW_PAGES * PAGE);
  Helper->Context.Header          = (volatile OVMF_MH_MAILBOX_HEADER *)Helper->Mailbox;
  Helper->Context.Data            = Helper->Mailbox + OVMF_MH_MAILBOX_HEADER_SIZE;
  Helper->Context.DataSize        = MAILBOX_SIZE - OVMF_MH_MAILBOX_HEADER_SIZE;
  Helper->Context.GuestWindow     = Helper->Window;
  Helper->Context.GuestWindowSize = WINDOW_PAGES * PAGE;
  Helper->Context.Private         = GuardedMap (OVMF_MH_CORE_PRIVATE_SIZE);
  Helper->Context.PrivateSize     = OVMF_MH_CORE_PRIVATE_SIZE;
  if (!MigrationHelperInitialize (&Helper->Context)) {
    Fail ("initialize", 0);
  }

  SecretPage = GuardedMap (PAGE);
  Secret     = (OVMF_MH_SECRET *)SecretPage;
  Secret->Signature = OVMF_MH_SECRET_SIGNATURE;
  Secret->Version   = 1;
  Secret->KeySize   = OVMF_MH_KEY_SIZE;
  memcpy (Secret->Key, Key, OVMF_MH_KEY_SIZE);
  if (!MigrationHelperLoadSecret (&Helper->Context, SecretPage, PAGE)) {
    Fail ("load secret", 0);
  }

  for (UINT64 Index = 0; Index < PAGE; Index++) {
    if (SecretPage[Index] != 0) {
      Fail ("secret page not wiped", Index);
    }
  }

  MigrationHelperPublishReady (&Helper->Context);
}

STATIC
BOOLEAN
KnownStatus (
  UINT32  Status
  )
{
  return (BOOLEAN)(Status <= OVMF_MH_STATUS_NO_ENTROPY ||
                   (Status >= OVMF_MH_STATUS_BAD_RECORD && Status <= OVMF_MH_STATUS_SESSION_FAILED));
}

/**
  Post a command, serve it, check the generic invariants, return the status.
**/
STATIC
UINT32
Call (
  FUZZ_HELPER  *Helper,
  UINT32       Command,
  UINT64       *Arg,
  UINT64       *Result,
  BOOLEAN      CheckData
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;
  static UINT8                     DataBefore[MAILBOX_SIZE];
  static UINT8                     WindowBefore[WINDOW_PAGES * PAGE];
  UINT64                           Index;
  UINT64                           OutStart;
  UINT64                           OutEnd;

  Header = Helper->Context.Header;
  memcpy (DataBefore, (VOID *)Helper->Context.Data, Helper->Context.DataSize);
  memcpy (WindowBefore, Helper->Window, sizeof (WindowBefore));
  Header->Command = Command;
  for (Index = 0; Index < OVMF_MH_ARG_COUNT; Index++) {
    Header->Arg[Index] = Arg[Index];
  }

  Header->CommandSeq = ++Helper->Seq;
  if (!MigrationHelperServeOne (&Helper->Context) || (Header->ResponseSeq != Helper->Seq)) {
    Fail ("command not served", Command);
  }

  Helper->Context.ShutdownRequested = FALSE;
  if (!KnownStatus (Header->Status)) {
    Fail ("unknown status", Header->Status);
  }

  for (Index = 0; Index < OVMF_MH_RESULT_COUNT; Index++) {
    Result[Index] = Header->Result[Index];
  }

  //
  // Export commands may write only [out offset, out offset + capacity).
  //
  OutStart = 1;
  OutEnd   = 0;
  if ((Command == OVMF_MH_CMD_EXPORT_BEGIN) || (Command == OVMF_MH_CMD_EXPORT_END)) {
    OutStart = Arg[0];
    OutEnd   = Arg[0] + Arg[1];
  } else if (Command == OVMF_MH_CMD_EXPORT_BATCH) {
    OutStart = Arg[2];
    OutEnd   = Arg[2] + Arg[3];
  } else if (Command == OVMF_MH_CMD_CHECK_PAGES) {
    OutStart = Arg[2];
    OutEnd   = Arg[2] + Arg[1];
  }

  if (CheckData) {
    for (Index = 0; Index < Helper->Context.DataSize; Index++) {
      if ((DataBefore[Index] != Helper->Context.Data[Index]) && !((Index >= OutStart) && (Index < OutEnd))) {
        Fail ("data area written outside the output span", Index);
      }
    }
  }

  if ((Command != OVMF_MH_CMD_IMPORT_BATCH) && (memcmp (WindowBefore, Helper->Window, sizeof (WindowBefore)) != 0)) {
    Fail ("guest window written by a command other than IMPORT_BATCH", Command);
  }

  return Header->Status;
}

STATIC
UINT64
HostileValue (
  UINT64  DataSize
  )
{
  switch (Below (8)) {
    case 0:  return 0;
    case 1:  return DataSize;
    case 2:  return DataSize - Below (64);
    case 3:  return ~0ULL - Below (8);
    case 4:  return 1ULL << Below (64);
    case 5:  return Below (DataSize);
    case 6:  return Below (1024);
    default: return Next ();
  }
}

STATIC
VOID
HostileCommand (
  FUZZ_HELPER  *Helper
  )
{
  UINT64  Arg[OVMF_MH_ARG_COUNT];
  UINT64  Result[OVMF_MH_RESULT_COUNT];
  UINT64  Index;
  UINT32  Command;

  for (Index = Below (64); Index > 0; Index--) {
    ((UINT8 *)Helper->Context.Data)[Below (Helper->Context.DataSize)] = (UINT8)Next ();
  }

  for (Index = 0; Index < OVMF_MH_ARG_COUNT; Index++) {
    Arg[Index] = HostileValue (Helper->Context.DataSize);
  }

  Command = (Below (16) == 0) ? (UINT32)Next () : (UINT32)Below (12);
  if (Command == OVMF_MH_CMD_SHUTDOWN) {
    //
    // SHUTDOWN ends a helper's life (keys wiped, VM powered off); the driver
    // keeps both helpers alive, and checks SHUTDOWN's key wipe separately.
    //
    Command = OVMF_MH_CMD_QUERY;
  }
  Call (Helper, Command, Arg, Result, TRUE);
}

/**
  Export Count random pages from Source; the stream lands in Stream.
**/
STATIC
UINT64
ExportStream (
  FUZZ_HELPER  *Source,
  UINT64       Count,
  UINT8        *Stream,
  UINT64       *Pages
  )
{
  UINT64  Arg[OVMF_MH_ARG_COUNT] = { 0 };
  UINT64  Result[OVMF_MH_RESULT_COUNT];
  UINT64  Size;
  UINT64  Index;
  UINT64  *List;
  UINT64  Out;
  UINT64  Touched;
  UINT32  Status;
  BOOLEAN Tracked;

  Call (Source, OVMF_MH_CMD_RESET, Arg, Result, TRUE);
  Tracked = (BOOLEAN)Below (2);
  Arg[0]  = 0;
  Arg[1]  = STREAM_HEADER;
  Arg[2]  = Tracked ? OVMF_MH_EXPORT_TRACK_PAGES : 0;
  Status  = Call (Source, OVMF_MH_CMD_EXPORT_BEGIN, Arg, Result, TRUE);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    Fail ("export begin", Status);
  }

  memcpy (Stream, (VOID *)Source->Context.Data, STREAM_HEADER);
  Size = STREAM_HEADER;
  List = (UINT64 *)Source->Context.Data;
  for (Index = 0; Index < Count; Index++) {
    Pages[Index] = Below (WINDOW_PAGES) * PAGE;
    List[Index]  = Pages[Index];
  }

  Out    = 64 * 1024;
  Arg[0] = 0;
  Arg[1] = Count;
  Arg[2] = Out;
  Arg[3] = Count * RECORD_MAX;
  Status = Call (Source, OVMF_MH_CMD_EXPORT_BATCH, Arg, Result, TRUE);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    Fail ("export batch", Status);
  }

  memcpy (Stream + Size, (VOID *)(Source->Context.Data + Out), Result[0]);
  Size += Result[0];

  //
  // CHECK_PAGES: pages just sent are unchanged; touching one changes it.
  // An untracked export refuses the check.
  //
  Arg[0] = 0;
  Arg[1] = Count;
  Arg[2] = Out;
  Status = Call (Source, OVMF_MH_CMD_CHECK_PAGES, Arg, Result, TRUE);
  if (!Tracked) {
    if (Status != OVMF_MH_STATUS_BAD_STATE) {
      Fail ("CHECK_PAGES answered for an untracked export", Status);
    }
  } else {
    if ((Status != OVMF_MH_STATUS_SUCCESS) || (Result[0] != 0)) {
      Fail ("CHECK_PAGES reports a page that did not change", Result[0]);
    }

    Touched                  = Pages[0] + Below (PAGE);
    Source->Window[Touched] ^= 0x40;
    List[0]                  = Pages[0];
    Arg[1]                   = 1;
    Status                   = Call (Source, OVMF_MH_CMD_CHECK_PAGES, Arg, Result, TRUE);
    if ((Status != OVMF_MH_STATUS_SUCCESS) || (Result[0] != 1) || (Source->Context.Data[Out] != 1)) {
      Fail ("CHECK_PAGES misses a changed page", Result[0]);
    }

    Source->Window[Touched] ^= 0x40;
  }

  Arg[0] = 0;
  Arg[1] = END_RECORD;
  Status = Call (Source, OVMF_MH_CMD_EXPORT_END, Arg, Result, TRUE);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    Fail ("export end", Status);
  }

  memcpy (Stream + Size, (VOID *)Source->Context.Data, END_RECORD);
  return Size + END_RECORD;
}

/**
  Mutate a stream in place; return its new size. Mutated tells whether the
  stream is now different from the original.
**/
STATIC
UINT64
Mutate (
  UINT8    *Stream,
  UINT64   Size,
  UINT64   Records,
  BOOLEAN  *Mutated
  )
{
  UINT64  Kind;
  UINT64  A;
  UINT64  B;
  UINT8   Temp[RECORD_MAX];
  UINT64  Offset;

  *Mutated = TRUE;
  Kind     = Below (6);
  if ((Kind == 0) || (Records < 2)) {
    Stream[Below (Size)] ^= (UINT8)(1u << Below (8));
    return Size;
  }

  A = Below (Records);
  B = Below (Records);
  {
    UINT64  Starts[64];
    UINT64  Lengths[64];
    UINT64  Index;

    Offset = STREAM_HEADER;
    for (Index = 0; Index < Records; Index++) {
      UINT32  Payload;

      memcpy (&Payload, Stream + Offset + 4, sizeof (Payload));
      Starts[Index]  = Offset;
      Lengths[Index] = 40 + Payload + 16;
      Offset        += Lengths[Index];
    }

    switch (Kind) {
      case 1:   // drop record A
        memmove (Stream + Starts[A], Stream + Starts[A] + Lengths[A], Size - Starts[A] - Lengths[A]);
        return Size - Lengths[A];
      case 2:   // duplicate record A
        memmove (Stream + Starts[A] + Lengths[A], Stream + Starts[A], Size - Starts[A]);
        return Size + Lengths[A];
      case 3:   // swap A and B when both have the same length
        if ((A == B) || (Lengths[A] != Lengths[B])) {
          *Mutated = FALSE;
          return Size;
        }

        memcpy (Temp, Stream + Starts[A], Lengths[A]);
        memcpy (Stream + Starts[A], Stream + Starts[B], Lengths[A]);
        memcpy (Stream + Starts[B], Temp, Lengths[A]);
        return Size;
      case 4:   // truncate: drop the end record
        return Size - END_RECORD;
      default:  // move a record to another page
        Stream[Starts[A] + 16 + 1] ^= 0x10;
        return Size;
    }
  }
}

STATIC
VOID
RoundTrip (
  FUZZ_HELPER  *Source,
  FUZZ_HELPER  *Target,
  BOOLEAN      Tamper
  )
{
  static UINT8  Stream[STREAM_HEADER + 64 * RECORD_MAX + END_RECORD + RECORD_MAX];
  UINT64        Pages[64];
  UINT64        Count;
  UINT64        Size;
  UINT64        Arg[OVMF_MH_ARG_COUNT] = { 0 };
  UINT64        Result[OVMF_MH_RESULT_COUNT];
  UINT64        Index;
  UINT32        Status;
  BOOLEAN       Mutated;
  UINT64        BatchSize;

  for (Index = Below (8); Index > 0; Index--) {
    UINT64  Page = Below (WINDOW_PAGES);

    if (Below (3) == 0) {
      memset (Source->Window + Page * PAGE, 0, PAGE);
    } else {
      Source->Window[Page * PAGE + Below (PAGE)] = (UINT8)Next ();
    }
  }

  Count   = 1 + Below (32);
  Size    = ExportStream (Source, Count, Stream, Pages);
  Mutated = FALSE;
  if (Tamper) {
    Size = Mutate (Stream, Size, Count, &Mutated);
  }

  Call (Target, OVMF_MH_CMD_RESET, Arg, Result, TRUE);
  memcpy ((VOID *)Target->Context.Data, Stream, Size);
  Arg[0] = 0;
  Arg[1] = STREAM_HEADER;
  Status = Call (Target, OVMF_MH_CMD_IMPORT_BEGIN, Arg, Result, TRUE);
  if (Status == OVMF_MH_STATUS_SUCCESS) {
    BatchSize = (Size >= STREAM_HEADER + END_RECORD) ? Size - STREAM_HEADER - END_RECORD : 0;
    Arg[0]    = STREAM_HEADER;
    Arg[1]    = BatchSize;
    Status    = Call (Target, OVMF_MH_CMD_IMPORT_BATCH, Arg, Result, TRUE);
    if (Status == OVMF_MH_STATUS_SUCCESS) {
      Arg[0] = STREAM_HEADER + BatchSize;
      Arg[1] = Size - Arg[0];
      Status = Call (Target, OVMF_MH_CMD_IMPORT_END, Arg, Result, TRUE);
    }
  }

  if (Mutated && (Status == OVMF_MH_STATUS_SUCCESS)) {
    Fail ("a tampered stream completed", Size);
  }

  if (!Mutated) {
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      Fail ("an intact stream failed", Status);
    }

    for (Index = 0; Index < Count; Index++) {
      if (memcmp (Target->Window + Pages[Index], Source->Window + Pages[Index], PAGE) != 0) {
        Fail ("imported page differs", Pages[Index]);
      }
    }
  }
}

int
main (
  int   Argc,
  char  **Argv
  )
{
  FUZZ_HELPER  Source;
  FUZZ_HELPER  Target;
  UINT8        Key[OVMF_MH_KEY_SIZE];
  UINT64       Iterations;
  UINT64       Iteration;
  UINT64       Index;

  if (Argc != 3) {
    fprintf (stderr, "usage: %s SEED ITERATIONS\n", Argv[0]);
    return 2;
  }

  mRng       = strtoull (Argv[1], NULL, 0) * 2654435761ULL + 1;
  Iterations = strtoull (Argv[2], NULL, 0);
  for (Index = 0; Index < sizeof (Key); Index++) {
    Key[Index] = (UINT8)Next ();
  }

  CreateHelper (&Source, Key);
  CreateHelper (&Target, Key);
  for (Index = 0; Index < WINDOW_PAGES * PAGE; Index++) {
    Source.Window[Index] = (UINT8)Next ();
  }

  for (Iteration = 0; Iteration < Iterations; Iteration++) {
    switch (Below (4)) {
      case 0:
        HostileCommand (&Source);
        break;
      case 1:
        HostileCommand (&Target);
        break;
      case 2:
        RoundTrip (&Source, &Target, FALSE);
        break;
      default:
        RoundTrip (&Source, &Target, TRUE);
        break;
    }
  }

  MigrationHelperWipeKeys (&Source.Context);
  MigrationHelperWipeKeys (&Target.Context);
  printf ("fuzz: %llu iterations, seed %s: no invariant broken\n", (unsigned long long)Iterations, Argv[1]);
  return 0;
}
