/** @file
  Fuzz driver for the mailbox dispatcher (host only).

  Two helper contexts, a source and a target, each with its own mailbox,
  guest window and private memory, all surrounded by PROT_NONE guard pages
  (FuzzCommon.c, shared with the libFuzzer harnesses): a read or write one
  byte outside the memory the dispatcher was configured with faults. Built
  with ASan/UBSan. Each iteration is one of:

  - a hostile command: random command code and arguments (including boundary
    and wrapping values) on random data-area contents;
  - a stream round trip: the source exports random pages, unbound or bound
    to the target's challenge, sealing a random account of shared pages,
    the stream is mutated (bit flips, dropped, duplicated, swapped or
    truncated records, foreign headers) or the target host's account of
    the shared pages differs, and the target imports it; an intact import then gives its receipt, which
    IMPORT_COMMIT must accept as it is and refuse with any byte flipped; a
    commit then gives its commit proof, which the source's
    EXPORT_VERIFY_COMMIT must accept with the receipt as they are and
    refuse with any byte of either flipped (ABI 4.1).

  After every command FuzzCall() checks the invariants (FuzzCommon.h); on top
  of them this driver checks that a mutated stream never completes and that
  an untouched stream always does and reproduces the source pages exactly.

  Usage: FuzzDispatch SEED ITERATIONS

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "FuzzCommon.h"

#define PAGE           FUZZ_PAGE
#define WINDOW_PAGES   64ULL
#define DATA_SIZE      (512ULL * 1024)
#define RECORD_MAX     FUZZ_RECORD_MAX
#define END_RECORD     FUZZ_END_RECORD
#define STREAM_HEADER  FUZZ_STREAM_HEADER
#define RECEIPT_AT     (DATA_SIZE - PAGE)
#define SHARED_AT      (DATA_SIZE - 2 * PAGE)   ///< The host's shared-page digest (EXPORT_END, IMPORT_END)
#define PROOF_AT       (RECEIPT_AT + 256)       ///< The commit proof, then the receipt it covers
#define PROOF_INPUT    (sizeof (OVMF_MH_COMMIT_PROOF) + sizeof (OVMF_MH_RECEIPT))

STATIC UINT64  mRng;
STATIC UINT64  mSharedCount;                    ///< Shared pages the last export sealed
STATIC UINT8   mSharedDigest[OVMF_MH_DIGEST_SIZE]; ///< Their digest (any 32 bytes: the helper only seals it)

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

  Command = (Below (16) == 0) ? (UINT32)Next () : (UINT32)Below (OVMF_MH_CMD_EXPORT_VERIFY_COMMIT + 1);
  if (Command == OVMF_MH_CMD_SHUTDOWN) {
    //
    // SHUTDOWN ends a helper's life (keys wiped, VM powered off); the driver
    // keeps both helpers alive, and checks SHUTDOWN's key wipe separately.
    //
    Command = OVMF_MH_CMD_QUERY;
  }
  FuzzCall (Helper, Command, Arg, Result);
}

/**
  Export Count random pages from Source; the stream lands in Stream. The
  binding input (a migration id, or with OVMF_MH_EXPORT_BOUND in Flags the
  target's nonce) is at data offset 0.
**/
STATIC
UINT64
ExportStream (
  FUZZ_HELPER  *Source,
  UINT64       Count,
  UINT8        *Stream,
  UINT64       *Pages,
  UINT64       Flags
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

  FuzzCall (Source, OVMF_MH_CMD_RESET, Arg, Result);
  Tracked = (BOOLEAN)Below (2);
  Arg[0]  = 0;
  Arg[1]  = STREAM_HEADER;
  Arg[2]  = (Tracked ? OVMF_MH_EXPORT_TRACK_PAGES : 0) | Flags;
  Arg[3]  = 0;                  // unbound: the migration id is whatever the data area holds
  Arg[4]  = 0;
  Arg[5]  = 1;
  Status  = FuzzCall (Source, OVMF_MH_CMD_EXPORT_BEGIN, Arg, Result);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    FuzzFail ("export begin", Status);
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
  Status = FuzzCall (Source, OVMF_MH_CMD_EXPORT_BATCH, Arg, Result);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    FuzzFail ("export batch", Status);
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
  Status = FuzzCall (Source, OVMF_MH_CMD_CHECK_PAGES, Arg, Result);
  if (!Tracked) {
    if (Status != OVMF_MH_STATUS_BAD_STATE) {
      FuzzFail ("CHECK_PAGES answered for an untracked export", Status);
    }
  } else {
    if ((Status != OVMF_MH_STATUS_SUCCESS) || (Result[0] != 0)) {
      FuzzFail ("CHECK_PAGES reports a page that did not change", Result[0]);
    }

    Touched                  = Pages[0] + Below (PAGE);
    Source->Window[Touched] ^= 0x40;
    List[0]                  = Pages[0];
    Arg[1]                   = 1;
    Status                   = FuzzCall (Source, OVMF_MH_CMD_CHECK_PAGES, Arg, Result);
    if ((Status != OVMF_MH_STATUS_SUCCESS) || (Result[0] != 1) || (Source->Context.Data[Out] != 1)) {
      FuzzFail ("CHECK_PAGES misses a changed page", Result[0]);
    }

    Source->Window[Touched] ^= 0x40;
  }

  //
  // The source host's account of the shard's shared pages: none, or a few
  // with a digest the helper seals as it is.
  //
  mSharedCount = Below (3);
  for (Index = 0; Index < OVMF_MH_DIGEST_SIZE; Index++) {
    mSharedDigest[Index] = (UINT8)Next ();
  }

  memcpy ((UINT8 *)Source->Context.Data + SHARED_AT, mSharedDigest, OVMF_MH_DIGEST_SIZE);
  Arg[0] = 0;
  Arg[1] = END_RECORD;
  Arg[2] = SHARED_AT;
  Arg[3] = mSharedCount;
  Status = FuzzCall (Source, OVMF_MH_CMD_EXPORT_END, Arg, Result);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    FuzzFail ("export end", Status);
  }

  memcpy (Stream + Size, (VOID *)Source->Context.Data, END_RECORD);
  return Size + END_RECORD;
}

/**
  After a commit: target helper 0's proof, with the receipt it covers, goes
  to the source that exported the stream; as it is it must verify, with any
  byte flipped it must not, and a refusal must leave the export verifiable.
**/
STATIC
VOID
VerifyCommitProof (
  FUZZ_HELPER  *Source,
  FUZZ_HELPER  *Target
  )
{
  UINT64   Arg[OVMF_MH_ARG_COUNT] = { 0 };
  UINT64   Result[OVMF_MH_RESULT_COUNT];
  UINT8    *Input;
  UINT32   Status;
  BOOLEAN  Mutated;

  Arg[0] = PROOF_AT;
  Arg[1] = sizeof (OVMF_MH_COMMIT_PROOF);
  Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_COMMIT_PROOF, Arg, Result);
  if ((Status != OVMF_MH_STATUS_SUCCESS) || (Result[0] != sizeof (OVMF_MH_COMMIT_PROOF))) {
    FuzzFail ("no commit proof after a commit", Status);
  }

  Input = (UINT8 *)Source->Context.Data + PROOF_AT;
  memcpy (Input, (UINT8 *)Target->Context.Data + PROOF_AT, sizeof (OVMF_MH_COMMIT_PROOF));
  memcpy (Input + sizeof (OVMF_MH_COMMIT_PROOF), (UINT8 *)Target->Context.Data + RECEIPT_AT, sizeof (OVMF_MH_RECEIPT));
  Mutated = (BOOLEAN)Below (2);
  if (Mutated) {
    Input[Below (PROOF_INPUT)] ^= (UINT8)(1 << Below (8));
  }

  Arg[1] = PROOF_INPUT;
  Status = FuzzCall (Source, OVMF_MH_CMD_EXPORT_VERIFY_COMMIT, Arg, Result);
  if (Mutated == (Status == OVMF_MH_STATUS_SUCCESS)) {
    FuzzFail (Mutated ? "a forged commit proof verified" : "a genuine commit proof was refused", Status);
  }

  if (Mutated) {
    memcpy (Input, (UINT8 *)Target->Context.Data + PROOF_AT, sizeof (OVMF_MH_COMMIT_PROOF));
    memcpy (Input + sizeof (OVMF_MH_COMMIT_PROOF), (UINT8 *)Target->Context.Data + RECEIPT_AT, sizeof (OVMF_MH_RECEIPT));
    Status = FuzzCall (Source, OVMF_MH_CMD_EXPORT_VERIFY_COMMIT, Arg, Result);
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      FuzzFail ("a refused commit proof changed the export", Status);
    }
  }
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
  BOOLEAN       Bound;
  UINT64        BatchSize;

  for (Index = Below (8); Index > 0; Index--) {
    UINT64  Page = Below (WINDOW_PAGES);

    if (Below (3) == 0) {
      memset (Source->Window + Page * PAGE, 0, PAGE);
    } else {
      Source->Window[Page * PAGE + Below (PAGE)] = (UINT8)Next ();
    }
  }

  FuzzCall (Target, OVMF_MH_CMD_RESET, Arg, Result);
  Bound = (BOOLEAN)Below (2);
  if (Bound) {
    Arg[0] = 0;
    Arg[1] = OVMF_MH_CHALLENGE_SIZE;
    Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_CHALLENGE, Arg, Result);
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      FuzzFail ("import challenge", Status);
    }

    memcpy ((VOID *)Source->Context.Data, (CONST VOID *)Target->Context.Data, OVMF_MH_CHALLENGE_SIZE);
  }

  Count   = 1 + Below (32);
  Size    = ExportStream (Source, Count, Stream, Pages, Bound ? OVMF_MH_EXPORT_BOUND : 0);
  Mutated = FALSE;
  if (Tamper) {
    Size = Mutate (Stream, Size, Count, &Mutated);
  }

  memcpy ((VOID *)Target->Context.Data, Stream, Size);
  Arg[0] = 0;
  Arg[1] = STREAM_HEADER;
  Arg[2] = 0;
  Arg[3] = 1;
  Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_BEGIN, Arg, Result);
  if (Status == OVMF_MH_STATUS_SUCCESS) {
    BatchSize = (Size >= STREAM_HEADER + END_RECORD) ? Size - STREAM_HEADER - END_RECORD : 0;
    Arg[0]    = STREAM_HEADER;
    Arg[1]    = BatchSize;
    Status    = FuzzCall (Target, OVMF_MH_CMD_IMPORT_BATCH, Arg, Result);
    if (Status == OVMF_MH_STATUS_SUCCESS) {
      //
      // The target host's account of the shared pages: what the source
      // sealed, or, tampering, one page more or a digest byte changed.
      //
      memcpy ((UINT8 *)Target->Context.Data + SHARED_AT, mSharedDigest, OVMF_MH_DIGEST_SIZE);
      Arg[0] = STREAM_HEADER + BatchSize;
      Arg[1] = Size - Arg[0];
      Arg[2] = SHARED_AT;
      Arg[3] = mSharedCount;
      if (Tamper && (Below (4) == 0)) {
        if ((mSharedCount == 0) || (Below (2) == 0)) {
          Arg[3] = mSharedCount + 1;
        } else {
          ((UINT8 *)Target->Context.Data)[SHARED_AT + Below (OVMF_MH_DIGEST_SIZE)] ^= (UINT8)(1 << Below (8));
        }

        Mutated = TRUE;
      }

      Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_END, Arg, Result);
    }
  }

  if (Mutated && (Status == OVMF_MH_STATUS_SUCCESS)) {
    FuzzFail ("a tampered stream completed", Size);
  }

  if (!Mutated) {
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      FuzzFail ("an intact stream failed", Status);
    }

    for (Index = 0; Index < Count; Index++) {
      if (memcmp (Target->Window + Pages[Index], Source->Window + Pages[Index], PAGE) != 0) {
        FuzzFail ("imported page differs", Pages[Index]);
      }
    }

    Arg[0] = RECEIPT_AT;
    Arg[1] = sizeof (OVMF_MH_RECEIPT);
    Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_RECEIPT, Arg, Result);
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      FuzzFail ("receipt of an intact import", Status);
    }

    Mutated = (BOOLEAN)Below (2);
    if (Mutated) {
      ((UINT8 *)Target->Context.Data)[RECEIPT_AT + Below (sizeof (OVMF_MH_RECEIPT))] ^= (UINT8)(1 << Below (8));
    }

    Status = FuzzCall (Target, OVMF_MH_CMD_IMPORT_COMMIT, Arg, Result);
    if (Mutated == (Status == OVMF_MH_STATUS_SUCCESS)) {
      FuzzFail (Mutated ? "a forged receipt committed" : "an intact import did not commit", Status);
    }

    if (!Mutated) {
      VerifyCommitProof (Source, Target);
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
  UINT64       Iterations;
  UINT64       Iteration;
  UINT64       Index;

  if (Argc != 3) {
    fprintf (stderr, "usage: %s SEED ITERATIONS\n", Argv[0]);
    return 2;
  }

  mRng       = strtoull (Argv[1], NULL, 0) * 2654435761ULL + 1;
  Iterations = strtoull (Argv[2], NULL, 0);
  FuzzSeedRandom (mRng, MAX_UINT64);
  FuzzCreateHelper (&Source, DATA_SIZE, WINDOW_PAGES);
  FuzzCreateHelper (&Target, DATA_SIZE, WINDOW_PAGES);
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
