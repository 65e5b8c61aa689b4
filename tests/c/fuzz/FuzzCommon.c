/** @file
  Shared fuzzing support (host only): guarded helper contexts, a
  deterministic RDRAND stand-in and the invariant checks of FuzzCall().
  See FuzzCommon.h.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined (__has_feature)
  #if __has_feature (address_sanitizer)
#define FUZZ_POISON  1
  #endif
#endif
#if !defined (FUZZ_POISON) && defined (__SANITIZE_ADDRESS__)
#define FUZZ_POISON  1
#endif
#ifdef FUZZ_POISON
  #include <sanitizer/asan_interface.h>
#endif

#include "FuzzCommon.h"

//
// The checker's bulk comparison runs without sanitizer checks (its buffers
// are the checker's own or mapped and unpoisoned), so that it vectorizes.
//
#define FUZZ_NO_SANITIZE  __attribute__ ((no_sanitize ("address", "undefined")))

#define CHAIN_LABEL_TEXT  OVMF_MH_CHAIN_LABEL
#define KDF_INFO_TEXT     OVMF_MH_KDF_INFO

STATIC UINT64  mFuzzRandom;
STATIC UINT64  mFuzzRandomLeft = MAX_UINT64;
STATIC UINT8   mFuzzZeroPage[FUZZ_PAGE];
STATIC INT32   mFuzzTrace = -1;   ///< FUZZ_TRACE set: print every command and its status

VOID
FuzzFail (
  IN CONST CHAR8  *What,
  IN UINT64       Detail
  )
{
  fprintf (stderr, "FUZZ INVARIANT BROKEN: %s (0x%llx)\n", What, (unsigned long long)Detail);
  abort ();
}

UINT8 *
FuzzGuardedMap (
  IN UINT64  Size
  )
{
  UINT64  Rounded;
  UINT8   *Base;

  Rounded = (Size + FUZZ_PAGE - 1) & ~(FUZZ_PAGE - 1);
  Base    = mmap (NULL, Rounded + 2 * FUZZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (Base == MAP_FAILED) {
    FuzzFail ("mmap", Size);
  }

  if ((mprotect (Base, FUZZ_PAGE, PROT_NONE) != 0) ||
      (mprotect (Base + FUZZ_PAGE + Rounded, FUZZ_PAGE, PROT_NONE) != 0))
  {
    FuzzFail ("mprotect", Size);
  }

  return Base + FUZZ_PAGE + (Rounded - Size);
}

VOID
FuzzSeedRandom (
  IN UINT64  Seed,
  IN UINT64  FailAfter
  )
{
  mFuzzRandom     = Seed * 0x9E3779B97F4A7C15ULL + 1;
  mFuzzRandomLeft = FailAfter;
}

/**
  Deterministic stand-in for BaseLib's AsmRdRand64, so that a fuzz input
  replays exactly (the salt of an export depends on it) and so that an input
  can make RDRAND fail (FuzzSeedRandom).

  @param[out] Rand  Receives the number.

  @retval TRUE   Rand is valid.
  @retval FALSE  The seeded number of draws is used up.
**/
BOOLEAN
EFIAPI
AsmRdRand64 (
  OUT UINT64  *Rand
  )
{
  if (mFuzzRandomLeft == 0) {
    *Rand = 0;
    return FALSE;
  }

  if (mFuzzRandomLeft != MAX_UINT64) {
    mFuzzRandomLeft--;
  }

  mFuzzRandom ^= mFuzzRandom << 13;
  mFuzzRandom ^= mFuzzRandom >> 7;
  mFuzzRandom ^= mFuzzRandom << 17;
  *Rand        = mFuzzRandom;
  return TRUE;
}

/**
  Write the fixed key as a launch secret and let the helper take it.

  @param[in,out] Helper  The helper.
**/
STATIC
VOID
InternalLoadKey (
  IN OUT FUZZ_HELPER  *Helper
  )
{
  OVMF_MH_SECRET  *Secret;
  UINT64          Index;

  memset (Helper->SecretPage, 0, FUZZ_PAGE);
  Secret            = (OVMF_MH_SECRET *)Helper->SecretPage;
  Secret->Signature = OVMF_MH_SECRET_SIGNATURE;
  Secret->Version   = OVMF_MH_SECRET_VERSION;
  Secret->KeySize   = OVMF_MH_KEY_SIZE;
  for (Index = 0; Index < OVMF_MH_KEY_SIZE; Index++) {
    Secret->Key[Index] = FUZZ_KEY_BYTE (Index);
  }

  if (!MigrationHelperLoadSecret (&Helper->Context, Helper->SecretPage, FUZZ_PAGE)) {
    FuzzFail ("load secret", 0);
  }

  if (memcmp (Helper->SecretPage, mFuzzZeroPage, FUZZ_PAGE) != 0) {
    FuzzFail ("secret page not wiped", 0);
  }
}

VOID
FuzzCreateHelper (
  OUT FUZZ_HELPER  *Helper,
  IN  UINT64       DataSize,
  IN  UINT64       WindowPages
  )
{
  memset (Helper, 0, sizeof (*Helper));
  Helper->Mailbox                 = FuzzGuardedMap (OVMF_MH_MAILBOX_HEADER_SIZE + DataSize);
  Helper->WindowSize              = WindowPages * FUZZ_PAGE;
  Helper->Window                  = FuzzGuardedMap (Helper->WindowSize);
  Helper->SecretPage              = FuzzGuardedMap (FUZZ_PAGE);
  Helper->Context.Header          = (volatile OVMF_MH_MAILBOX_HEADER *)Helper->Mailbox;
  Helper->Context.Data            = Helper->Mailbox + OVMF_MH_MAILBOX_HEADER_SIZE;
  Helper->Context.DataSize        = DataSize;
  Helper->Context.GuestWindow     = Helper->Window;
  Helper->Context.GuestWindowSize = Helper->WindowSize;
  Helper->Context.Private         = FuzzGuardedMap (OVMF_MH_CORE_PRIVATE_SIZE);
  Helper->Context.PrivateSize     = OVMF_MH_CORE_PRIVATE_SIZE;
  Helper->DataBefore              = FuzzGuardedMap (DataSize);
  Helper->WindowExpected          = FuzzGuardedMap (Helper->WindowSize);
  Helper->DataStale               = TRUE;
  Helper->WindowStale             = TRUE;

  if (!MigrationHelperInitialize (&Helper->Context)) {
    FuzzFail ("initialize", 0);
  }

  InternalLoadKey (Helper);
  MigrationHelperPublishReady (&Helper->Context);
}

VOID
FuzzResetHelper (
  IN OUT FUZZ_HELPER  *Helper,
  IN     CONST UINT8  *Pattern,
  IN     BOOLEAN      LoadKey
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;
  OVMF_MH_SESSION                  *Session;

  //
  // Only what an input can have changed is redone: the key after SHUTDOWN
  // or a key-less input, the header after SHUTDOWN. The session always
  // goes back to IDLE through RESET, as the host would do it.
  //
  Session = InternalSession (&Helper->Context);
  if (LoadKey && !Session->KeyLoaded) {
    InternalLoadKey (Helper);
  } else if (!LoadKey && Session->KeyLoaded) {
    MigrationHelperWipeKeys (&Helper->Context);
  }

  Header = Helper->Context.Header;
  if (Helper->ShutDown || (Header->State != OVMF_MH_STATE_READY) ||
      (((Header->Capabilities & OVMF_MH_CAP_KEY_LOADED) != 0) != Session->KeyLoaded))
  {
    MigrationHelperPublishReady (&Helper->Context);
    Helper->Seq = 0;
  }

  Header->Command    = OVMF_MH_CMD_RESET;
  Header->CommandSeq = ++Helper->Seq;
  if (!MigrationHelperServeOne (&Helper->Context) || (Header->Status != OVMF_MH_STATUS_SUCCESS)) {
    FuzzFail ("reset between inputs", Header->Status);
  }

  Helper->ShadowOpen  = FALSE;
  Helper->ShutDown    = FALSE;
  Helper->DataStale   = TRUE;
  Helper->WindowStale = TRUE;
  memset ((VOID *)Helper->Context.Data, 0, Helper->Context.DataSize);
  if (Pattern != NULL) {
    memcpy (Helper->Window, Pattern, Helper->WindowSize);
  } else {
    memset (Helper->Window, 0, Helper->WindowSize);
  }
}

/**
  Take the observable session state.

  @param[in]  Helper  The helper.
  @param[out] View    The snapshot.
**/
STATIC
VOID
InternalView (
  IN  FUZZ_HELPER        *Helper,
  OUT FUZZ_SESSION_VIEW  *View
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (&Helper->Context);
  memset (View, 0, sizeof (*View));
  View->State        = Session->State;
  View->KeyLoaded    = Session->KeyLoaded;
  View->KeyReady     = Session->KeyReady;
  View->TrackPages   = Session->TrackPages;
  View->NextSequence = Session->NextSequence;
  View->RecordCount  = Session->RecordCount;
  memcpy (View->SessionId, Session->SessionId, sizeof (View->SessionId));
  memcpy (View->Chain, Session->Chain, sizeof (View->Chain));
  memcpy (View->TransportKey, Session->TransportKey, sizeof (View->TransportKey));
}

/**
  Tell whether a status is a refusal: the command was turned down by its
  parameter, state or key checks and must have changed nothing.

  @param[in] Command  Command code.
  @param[in] Status   Its status.

  @retval TRUE  A refusal.
**/
STATIC
BOOLEAN
InternalRefused (
  IN UINT32  Command,
  IN UINT32  Status
  )
{
  //
  // EXPORT_VERIFY_COMMIT only reads: whatever it refuses, the export stays
  // as it was (ABI 4.1).
  //
  if ((Command == OVMF_MH_CMD_EXPORT_VERIFY_COMMIT) && (Status != OVMF_MH_STATUS_SUCCESS)) {
    return TRUE;
  }

  switch (Status) {
    case OVMF_MH_STATUS_UNSUPPORTED:
    case OVMF_MH_STATUS_INVALID_PARAMETER:
    case OVMF_MH_STATUS_BAD_STATE:
    case OVMF_MH_STATUS_NO_KEY:
    case OVMF_MH_STATUS_OUT_OF_BOUNDS:
    case OVMF_MH_STATUS_BUFFER_TOO_SMALL:
    case OVMF_MH_STATUS_NO_ENTROPY:
    case OVMF_MH_STATUS_SESSION_FAILED:
    case OVMF_MH_STATUS_NOT_ZERO:
      return TRUE;
    case OVMF_MH_STATUS_BAD_PAGE:
    case OVMF_MH_STATUS_BATCH_TOO_LARGE:
    case OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD:
      //
      // In IMPORT_BATCH these also name a bad record: the session fails.
      //
      return (BOOLEAN)(Command != OVMF_MH_CMD_IMPORT_BATCH);
    default:
      return FALSE;
  }
}

STATIC
BOOLEAN
InternalKnownStatus (
  IN UINT32  Status
  )
{
  return (BOOLEAN)(Status <= OVMF_MH_STATUS_NO_ENTROPY ||
                   (Status >= OVMF_MH_STATUS_BAD_RECORD && Status <= OVMF_MH_STATUS_BAD_COMMIT_PROOF));
}

STATIC
VOID
InternalNonce (
  IN  UINT64  Sequence,
  OUT UINT8   *Nonce
  )
{
  memset (Nonce, 0, OVMF_MH_NONCE_SIZE);
  memcpy (Nonce + 4, &Sequence, sizeof (Sequence));
}

/**
  The checker's own session: derive the key from the fixed transport key and
  the salt of the header the helper accepted, and verify that header.

  @param[in,out] Helper  The helper.
  @param[in]     Header  The stream header as it was in the data area.
**/
STATIC
VOID
InternalShadowOpen (
  IN OUT FUZZ_HELPER                  *Helper,
  IN     CONST OVMF_MH_STREAM_HEADER  *Header
  )
{
  UINT8                   Key[OVMF_MH_KEY_SIZE];
  UINT8                   Okm[OVMF_MH_KEY_SIZE + OVMF_MH_SESSION_ID_SIZE];
  UINT8                   Info[sizeof (KDF_INFO_TEXT) - 1 + OVMF_MH_STREAM_BINDING_SIZE];
  UINT8                   Nonce[OVMF_MH_NONCE_SIZE];
  OVMF_MH_SHA256_CONTEXT  Chain;
  UINT64                  Index;

  for (Index = 0; Index < OVMF_MH_KEY_SIZE; Index++) {
    Key[Index] = FUZZ_KEY_BYTE (Index);
  }

  memcpy (Info, KDF_INFO_TEXT, sizeof (KDF_INFO_TEXT) - 1);
  memcpy (Info + sizeof (KDF_INFO_TEXT) - 1, (CONST UINT8 *)Header + OVMF_MH_STREAM_BINDING_OFFSET, OVMF_MH_STREAM_BINDING_SIZE);
  if (!MigrationHelperHkdfSha256 (
         Header->Salt,
         OVMF_MH_SALT_SIZE,
         Key,
         sizeof (Key),
         Info,
         sizeof (Info),
         Okm,
         sizeof (Okm)
         ) ||
      !MigrationHelperOcbInit (&Helper->ShadowKey, Okm, OVMF_MH_KEY_SIZE, TRUE))
  {
    FuzzFail ("checker key schedule", 0);
  }

  memcpy (Helper->ShadowSessionId, Okm + OVMF_MH_KEY_SIZE, OVMF_MH_SESSION_ID_SIZE);
  InternalNonce (0, Nonce);
  if ((Header->Magic != OVMF_MH_STREAM_MAGIC) || (Header->Version != OVMF_MH_STREAM_VERSION) ||
      (Header->HeaderSize != sizeof (*Header)) || ((Header->Flags & ~(UINT32)OVMF_MH_STREAM_FLAGS_KNOWN) != 0) ||
      (memcmp (Header->SessionId, Helper->ShadowSessionId, OVMF_MH_SESSION_ID_SIZE) != 0) ||
      !MigrationHelperOcbDecrypt (
         &Helper->ShadowKey,
         Nonce,
         (CONST UINT8 *)Header,
         OFFSET_OF (OVMF_MH_STREAM_HEADER, Tag),
         NULL,
         0,
         Header->Tag,
         NULL
         ))
  {
    FuzzFail ("IMPORT_BEGIN accepted a header that does not verify", 0);
  }

  MigrationHelperSha256Init (&Chain);
  MigrationHelperSha256Update (&Chain, (CONST UINT8 *)CHAIN_LABEL_TEXT, sizeof (CHAIN_LABEL_TEXT) - 1);
  MigrationHelperSha256Update (&Chain, Helper->ShadowSessionId, OVMF_MH_SESSION_ID_SIZE);
  MigrationHelperSha256Final (&Chain, Helper->ShadowChain);
  Helper->ShadowNext       = 1;
  Helper->ShadowShardIndex = Header->ShardIndex;
  Helper->ShadowShardCount = Header->ShardCount;
  Helper->ShadowOpen       = TRUE;
}

/**
  Replay, with the checker's key, the records the helper says it applied,
  and build the window they must have produced.

  @param[in,out] Helper   The helper.
  @param[in]     Batch    The batch as it was in the data area.
  @param[in]     Size     Its size.
  @param[in]     Applied  Records the helper reports applied.

  @return Bytes those records span.
**/
STATIC
UINT64
InternalShadowApply (
  IN OUT FUZZ_HELPER  *Helper,
  IN     CONST UINT8  *Batch,
  IN     UINT64       Size,
  IN     UINT64       Applied
  )
{
  STATIC UINT8            Plain[OVMF_MH_PAGE_SIZE];
  OVMF_MH_RECORD_HEADER   Record;
  OVMF_MH_SHA256_CONTEXT  Chain;
  UINT8                   Nonce[OVMF_MH_NONCE_SIZE];
  UINT64                  Position;
  UINT64                  RecordSize;
  UINT64                  Index;
  UINT64                  Pages;
  UINT64                  First;

  Position = 0;
  for (Index = 0; Index < Applied; Index++) {
    if (!Helper->ShadowOpen) {
      FuzzFail ("records applied outside a verified import session", Applied);
    }

    if (Size - Position < sizeof (Record)) {
      FuzzFail ("more records applied than the batch holds", Applied);
    }

    memcpy (&Record, Batch + Position, sizeof (Record));
    if (!(((Record.Type == OVMF_MH_RECORD_PAGE) && (Record.PayloadSize == OVMF_MH_PAGE_SIZE)) ||
          ((Record.Type == OVMF_MH_RECORD_ZERO) && (Record.PayloadSize == 0)) ||
          ((Record.Type == OVMF_MH_RECORD_ZERO_RANGE) && (Record.PayloadSize == sizeof (OVMF_MH_ZERO_RANGE_PAYLOAD)))))
    {
      FuzzFail ("a malformed record was applied", Index);
    }

    RecordSize = sizeof (Record) + Record.PayloadSize + OVMF_MH_TAG_SIZE;
    if ((Size - Position < RecordSize) ||
        (memcmp (Record.SessionId, Helper->ShadowSessionId, OVMF_MH_SESSION_ID_SIZE) != 0) ||
        (Record.Sequence != Helper->ShadowNext) ||
        ((Record.GuestOffset & (OVMF_MH_PAGE_SIZE - 1)) != 0) ||
        (Record.GuestOffset >= Helper->WindowSize))
    {
      FuzzFail ("a record out of sequence, session or window was applied", Record.Sequence);
    }

    InternalNonce (Record.Sequence, Nonce);
    if (!MigrationHelperOcbDecrypt (
           &Helper->ShadowKey,
           Nonce,
           (CONST UINT8 *)&Record,
           sizeof (Record),
           Batch + Position + sizeof (Record),
           Record.PayloadSize,
           Batch + Position + sizeof (Record) + Record.PayloadSize,
           Plain
           ))
    {
      FuzzFail ("a record that does not authenticate was applied", Record.Sequence);
    }

    if (Record.Type == OVMF_MH_RECORD_PAGE) {
      memcpy (Helper->WindowExpected + Record.GuestOffset, Plain, OVMF_MH_PAGE_SIZE);
    } else if (Record.Type == OVMF_MH_RECORD_ZERO_RANGE) {
      //
      // The checker's own reading of the range rules (docs/stream-format.md,
      // "Zero ranges"): 1 page or more, inside the window, inside one shard
      // block of the header's shard.
      //
      memcpy (&Pages, Plain, sizeof (Pages));
      First = Record.GuestOffset / OVMF_MH_PAGE_SIZE;
      if ((Pages == 0) || (Pages > (Helper->WindowSize - Record.GuestOffset) / OVMF_MH_PAGE_SIZE) ||
          ((First % OVMF_MH_SHARD_BLOCK_PAGES) + Pages > OVMF_MH_SHARD_BLOCK_PAGES) ||
          (Helper->ShadowShardCount == 0) ||
          ((First / OVMF_MH_SHARD_BLOCK_PAGES) % Helper->ShadowShardCount != Helper->ShadowShardIndex))
      {
        FuzzFail ("a zero range outside the window or the shard was applied", Record.Sequence);
      }

      memset (Helper->WindowExpected + Record.GuestOffset, 0, (size_t)(Pages * OVMF_MH_PAGE_SIZE));
    } else {
      memset (Helper->WindowExpected + Record.GuestOffset, 0, OVMF_MH_PAGE_SIZE);
    }

    MigrationHelperSha256Init (&Chain);
    MigrationHelperSha256Update (&Chain, Helper->ShadowChain, OVMF_MH_DIGEST_SIZE);
    MigrationHelperSha256Update (&Chain, Batch + Position + sizeof (Record) + Record.PayloadSize, OVMF_MH_TAG_SIZE);
    MigrationHelperSha256Final (&Chain, Helper->ShadowChain);
    Helper->ShadowNext++;
    Position += RecordSize;
  }

  return Position;
}

/**
  Tell whether a span lies inside the data area (the checker's own test).
**/
STATIC
BOOLEAN
InternalInData (
  IN FUZZ_HELPER  *Helper,
  IN UINT64       Offset,
  IN UINT64       Size
  )
{
  return (BOOLEAN)((Offset <= Helper->Context.DataSize) && (Size <= Helper->Context.DataSize - Offset));
}

/**
  IMPORT_END succeeded: the checker must be able to verify the end record,
  and the shared pages it seals must be those the host reported (Arg2, Arg3).

  @param[in] Helper       The helper.
  @param[in] End          The end record as it was in the data area.
  @param[in] Size         Its size.
  @param[in] Count        Record count the helper reported.
  @param[in] SharedAt     Offset of the host's shared-page digest (Arg2).
  @param[in] SharedCount  The host's shared-page count (Arg3).
**/
STATIC
VOID
InternalShadowEnd (
  IN FUZZ_HELPER  *Helper,
  IN CONST UINT8  *End,
  IN UINT64       Size,
  IN UINT64       Count,
  IN UINT64       SharedAt,
  IN UINT64       SharedCount
  )
{
  OVMF_MH_RECORD_HEADER   Record;
  OVMF_MH_END_PAYLOAD     Payload;
  UINT8                   Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                   Shared[OVMF_MH_DIGEST_SIZE];
  OVMF_MH_SHA256_CONTEXT  Hash;

  if (!Helper->ShadowOpen || (Size != FUZZ_END_RECORD)) {
    FuzzFail ("an import completed without a verified session or end record", Size);
  }

  memcpy (&Record, End, sizeof (Record));
  InternalNonce (Helper->ShadowNext, Nonce);
  if ((Record.Type != OVMF_MH_RECORD_END) || (Record.PayloadSize != sizeof (Payload)) ||
      (Record.Sequence != Helper->ShadowNext) ||
      (memcmp (Record.SessionId, Helper->ShadowSessionId, OVMF_MH_SESSION_ID_SIZE) != 0) ||
      !MigrationHelperOcbDecrypt (
         &Helper->ShadowKey,
         Nonce,
         End,
         sizeof (Record),
         End + sizeof (Record),
         sizeof (Payload),
         End + sizeof (Record) + sizeof (Payload),
         (UINT8 *)&Payload
         ) ||
      (Payload.RecordCount != Helper->ShadowNext - 1) || (Count != Payload.RecordCount) ||
      (memcmp (Payload.ChainDigest, Helper->ShadowChain, OVMF_MH_DIGEST_SIZE) != 0))
  {
    FuzzFail ("IMPORT_END accepted an end record that does not prove the stream", Count);
  }

  if (SharedCount == 0) {
    MigrationHelperSha256Init (&Hash);
    MigrationHelperSha256Update (&Hash, (CONST UINT8 *)OVMF_MH_SHARED_LABEL, sizeof (OVMF_MH_SHARED_LABEL) - 1);
    MigrationHelperSha256Final (&Hash, Shared);
  } else if (!InternalInData (Helper, SharedAt, OVMF_MH_DIGEST_SIZE)) {
    FuzzFail ("IMPORT_END read a shared-page digest outside the data area", SharedAt);
  } else {
    memcpy (Shared, Helper->DataBefore + SharedAt, OVMF_MH_DIGEST_SIZE);
  }

  if ((Payload.SharedPageCount != SharedCount) ||
      (memcmp (Payload.SharedDigest, Shared, OVMF_MH_DIGEST_SIZE) != 0))
  {
    FuzzFail ("IMPORT_END accepted shared pages the source helper did not seal", SharedCount);
  }
}

/**
  Compare two buffers: a branch-free word loop, not instrumented, so that
  the checker's comparisons of the data area and the window (the bulk of
  its work) cost a pass over the bytes and nothing more. Callers compare
  memory that is mapped and not poisoned.

  @param[in] Left   Bytes.
  @param[in] Right  Bytes.
  @param[in] Size   Length of both.

  @retval TRUE   Equal.
**/
STATIC
FUZZ_NO_SANITIZE
BOOLEAN
InternalSame (
  IN CONST UINT8  *Left,
  IN CONST UINT8  *Right,
  IN UINT64       Size
  )
{
  UINT64  Difference;
  UINT64  LeftWord;
  UINT64  RightWord;
  UINT64  Index;

  Difference = 0;
  for (Index = 0; Index + sizeof (UINT64) <= Size; Index += sizeof (UINT64)) {
    __builtin_memcpy (&LeftWord, Left + Index, sizeof (LeftWord));
    __builtin_memcpy (&RightWord, Right + Index, sizeof (RightWord));
    Difference |= LeftWord ^ RightWord;
  }

  for ( ; Index < Size; Index++) {
    Difference |= (UINT64)(Left[Index] ^ Right[Index]);
  }

  return (BOOLEAN)(Difference == 0);
}

/**
  Make a region inaccessible (AddressSanitizer poison) while a command that
  has no business with it runs, or accessible again.

  @param[in] Buffer  The region.
  @param[in] Size    Its size.
  @param[in] Poison  TRUE: poison; FALSE: unpoison.

  @retval TRUE   The region is poisoned (only with AddressSanitizer).
**/
STATIC
BOOLEAN
InternalPoison (
  IN CONST VOID  *Buffer,
  IN UINT64      Size,
  IN BOOLEAN     Poison
  )
{
 #ifdef FUZZ_POISON
  if (Poison) {
    __asan_poison_memory_region (Buffer, (size_t)Size);
  } else {
    __asan_unpoison_memory_region (Buffer, (size_t)Size);
  }

  return Poison;
 #else
  return FALSE;
 #endif
}

VOID
FuzzHostWroteData (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT64       Offset,
  IN     UINT64       Length
  )
{
  UINT64       DataSize;
  UINT64       Start;
  UINT64       First;
  CONST UINT8  *Data;

  DataSize = Helper->Context.DataSize;
  Data     = (CONST UINT8 *)Helper->Context.Data;
  if (Length >= DataSize) {
    memcpy (Helper->DataBefore, Data, DataSize);
    return;
  }

  Start = Offset % DataSize;
  First = (Length < DataSize - Start) ? Length : DataSize - Start;
  memcpy (Helper->DataBefore + Start, Data + Start, First);
  memcpy (Helper->DataBefore, Data, Length - First);
}

VOID
FuzzHostWroteWindowByte (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT64       Offset
  )
{
  Helper->WindowExpected[Offset] = Helper->Window[Offset];
}

/**
  Tell whether a command reads or writes the data area (has a span of it
  among its arguments).

  @param[in] Command  Command code.

  @retval TRUE  It may access the data area.
**/
STATIC
BOOLEAN
InternalUsesData (
  IN UINT32  Command
  )
{
  switch (Command) {
    case OVMF_MH_CMD_EXPORT_BEGIN:
    case OVMF_MH_CMD_EXPORT_BATCH:
    case OVMF_MH_CMD_EXPORT_END:
    case OVMF_MH_CMD_IMPORT_BEGIN:
    case OVMF_MH_CMD_IMPORT_BATCH:
    case OVMF_MH_CMD_IMPORT_END:
    case OVMF_MH_CMD_CHECK_PAGES:
    case OVMF_MH_CMD_EXPORT_ZERO_RANGES:
    case OVMF_MH_CMD_IMPORT_CHALLENGE:
    case OVMF_MH_CMD_IMPORT_RECEIPT:
    case OVMF_MH_CMD_IMPORT_COMMIT:
    case OVMF_MH_CMD_IMPORT_COMMIT_PROOF:
    case OVMF_MH_CMD_EXPORT_VERIFY_COMMIT:
      return TRUE;
    default:
      return FALSE;
  }
}

/**
  Tell whether a command reads or writes the guest window.

  @param[in] Command  Command code.

  @retval TRUE  It may access the window.
**/
STATIC
BOOLEAN
InternalUsesWindow (
  IN UINT32  Command
  )
{
  return (BOOLEAN)((Command == OVMF_MH_CMD_EXPORT_BATCH) || (Command == OVMF_MH_CMD_CHECK_PAGES) ||
                   (Command == OVMF_MH_CMD_EXPORT_ZERO_RANGES) || (Command == OVMF_MH_CMD_IMPORT_BATCH));
}

/**
  No page-hash key outlives its export session: outside EXPORTING the
  session holds none.

  @param[in] Helper  The helper.
  @param[in] Ended   The command ended an export session (or shut the
                     helper down): also look at the key's bytes.
**/
STATIC
VOID
InternalCheckPageHashKey (
  IN FUZZ_HELPER  *Helper,
  IN BOOLEAN      Ended
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (&Helper->Context);
  if (Session->State == OVMF_MH_SESSION_EXPORTING) {
    return;
  }

  if (Session->PageHashKeyReady ||
      (Ended && ((Session->ZeroPageHash != 0) ||
                 !InternalSame ((CONST UINT8 *)Session->PageHashKey, mFuzzZeroPage, sizeof (Session->PageHashKey)))))
  {
    FuzzFail ("a page-hash key outlived its export session", Session->State);
  }
}

UINT32
FuzzCall (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT32       Command,
  IN     CONST UINT64 *Arg,
  OUT    UINT64       *Result
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;
  OVMF_MH_SESSION                  *Session;
  FUZZ_SESSION_VIEW                Before;
  FUZZ_SESSION_VIEW                After;
  UINT64                           Index;
  UINT64                           OutStart;
  UINT64                           OutEnd;
  UINT64                           DataSize;
  UINT32                           Status;
  CONST UINT8                      *Data;
  BOOLEAN                          DataPoisoned;
  BOOLEAN                          WindowPoisoned;
  BOOLEAN                          Refused;

  Header   = Helper->Context.Header;
  Session  = InternalSession (&Helper->Context);
  DataSize = Helper->Context.DataSize;
  Data     = (CONST UINT8 *)Helper->Context.Data;
  InternalView (Helper, &Before);
  //
  // DataBefore and WindowExpected hold the data area and the window as they
  // were after the last command (the checks below prove them equal then, and
  // the output span is copied over; the harness reports its own writes with
  // FuzzHostWrote*); they are taken afresh only when the harness wrote
  // without saying where, or does not report its writes at all.
  //
  if (!Helper->HostMarksWrites || Helper->DataStale) {
    memcpy (Helper->DataBefore, Data, DataSize);
  }

  if (!Helper->HostMarksWrites || Helper->WindowStale) {
    memcpy (Helper->WindowExpected, Helper->Window, Helper->WindowSize);
  }

  Header->Command = Command;
  for (Index = 0; Index < OVMF_MH_ARG_COUNT; Index++) {
    Header->Arg[Index] = Arg[Index];
  }

  Header->CommandSeq = ++Helper->Seq;
  //
  // A region the command has no business with is poisoned while it runs:
  // any read or write of it is an AddressSanitizer crash, which proves it
  // unchanged without comparing it afterwards.
  //
  DataPoisoned   = InternalPoison (Data, DataSize, (BOOLEAN)!InternalUsesData (Command));
  WindowPoisoned = InternalPoison (Helper->Window, Helper->WindowSize, (BOOLEAN)!InternalUsesWindow (Command));
  if (!MigrationHelperServeOne (&Helper->Context) || (Header->ResponseSeq != Helper->Seq)) {
    FuzzFail ("command not served", Command);
  }

  InternalPoison (Data, DataSize, FALSE);
  InternalPoison (Helper->Window, Helper->WindowSize, FALSE);

  Status = Header->Status;
  for (Index = 0; Index < OVMF_MH_RESULT_COUNT; Index++) {
    Result[Index] = Header->Result[Index];
  }

  if (mFuzzTrace < 0) {
    mFuzzTrace = (getenv ("FUZZ_TRACE") != NULL) ? 1 : 0;
  }

  if (mFuzzTrace == 1) {
    fprintf (
      stderr,
      "helper %p: command %u (0x%llx 0x%llx 0x%llx 0x%llx) -> status 0x%x results 0x%llx 0x%llx, session %u\n",
      (VOID *)Helper,
      Command,
      (unsigned long long)Arg[0],
      (unsigned long long)Arg[1],
      (unsigned long long)Arg[2],
      (unsigned long long)Arg[3],
      Status,
      (unsigned long long)Result[0],
      (unsigned long long)Result[1],
      Session->State
      );
  }

  InternalView (Helper, &After);
  if (!InternalKnownStatus (Status)) {
    FuzzFail ("unknown status", Status);
  }

  if (Header->SessionState != Session->State) {
    FuzzFail ("published session state differs from the session's", Header->SessionState);
  }

  //
  // A refused command changes nothing at all.
  //
  Refused = InternalRefused (Command, Status);
  if (Refused) {
    if (memcmp (&Before, &After, sizeof (Before)) != 0) {
      FuzzFail ("a refused command changed the session", Command);
    }

    if (!DataPoisoned && !InternalSame (Helper->DataBefore, Data, DataSize)) {
      FuzzFail ("a refused command wrote the data area", Command);
    }
  }

  if ((Command != OVMF_MH_CMD_EXPORT_VERIFY_COMMIT) &&
      (((Status >= OVMF_MH_STATUS_BAD_RECORD) && (Status <= OVMF_MH_STATUS_BAD_RECEIPT)) ||
       (Status == OVMF_MH_STATUS_SHARED_PAGES_MISMATCH) ||
       ((Status == OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD) && (Command == OVMF_MH_CMD_IMPORT_BATCH))) &&
      (Session->State != OVMF_MH_SESSION_FAILED))
  {
    FuzzFail ("a stream failure left the session usable", Status);
  }

  //
  // Export commands and CHECK_PAGES may write only [out offset, out offset
  // + capacity); everything else writes nothing into the data area.
  //
  OutStart = 0;
  OutEnd   = 0;
  if ((Command == OVMF_MH_CMD_EXPORT_BEGIN) || (Command == OVMF_MH_CMD_EXPORT_END)) {
    OutStart = Arg[0];
    OutEnd   = Arg[0] + Arg[1];
  } else if ((Command == OVMF_MH_CMD_EXPORT_BATCH) || (Command == OVMF_MH_CMD_EXPORT_ZERO_RANGES)) {
    OutStart = Arg[2];
    OutEnd   = Arg[2] + Arg[3];
  } else if (Command == OVMF_MH_CMD_CHECK_PAGES) {
    OutStart = Arg[2];
    OutEnd   = Arg[2] + Arg[1];
  } else if ((Command == OVMF_MH_CMD_IMPORT_CHALLENGE) || (Command == OVMF_MH_CMD_IMPORT_RECEIPT) ||
             (Command == OVMF_MH_CMD_IMPORT_COMMIT_PROOF))
  {
    OutStart = Arg[0];
    OutEnd   = Arg[0] + Arg[1];
  }

  if (OutEnd < OutStart) {
    OutEnd = MAX_UINT64;
  }

  if (OutStart > DataSize) {
    OutStart = DataSize;
  }

  if (OutEnd > DataSize) {
    OutEnd = DataSize;
  }

  //
  // (A refused command was compared whole above; a poisoned data area
  // cannot have been written.)
  //
  if (!DataPoisoned && !Refused &&
      (!InternalSame (Helper->DataBefore, Data, OutStart) ||
       !InternalSame (Helper->DataBefore + OutEnd, Data + OutEnd, DataSize - OutEnd)))
  {
    FuzzFail ("data area written outside the output span", Command);
  }

  //
  // The guest window: only IMPORT_BATCH writes it, and only what the
  // checker can authenticate itself.
  //
  if (Command == OVMF_MH_CMD_IMPORT_BATCH) {
    if ((Result[0] != 0) && !InternalInData (Helper, Arg[0], Arg[1])) {
      FuzzFail ("records applied from outside the data area", Arg[0]);
    }

    Index = InternalShadowApply (Helper, Helper->DataBefore + (Result[0] != 0 ? Arg[0] : 0), Arg[1], Result[0]);
    if ((Status == OVMF_MH_STATUS_SUCCESS) && (Index != Arg[1])) {
      FuzzFail ("IMPORT_BATCH succeeded without applying every byte", Index);
    }

    if (!InternalSame (Helper->WindowExpected, Helper->Window, Helper->WindowSize)) {
      FuzzFail ("guest window holds a byte no authenticated record carried", Result[0]);
    }
  } else if (!WindowPoisoned && !InternalSame (Helper->WindowExpected, Helper->Window, Helper->WindowSize)) {
    FuzzFail ("guest window written by a command other than IMPORT_BATCH", Command);
  }

  if ((Command == OVMF_MH_CMD_IMPORT_BATCH) && (Status == OVMF_MH_STATUS_SUCCESS) && !Helper->ShadowOpen) {
    FuzzFail ("IMPORT_BATCH succeeded outside a verified import session", Arg[1]);
  }

  if ((Command == OVMF_MH_CMD_IMPORT_BEGIN) && (Status == OVMF_MH_STATUS_SUCCESS)) {
    if ((Arg[1] != FUZZ_STREAM_HEADER) || !InternalInData (Helper, Arg[0], Arg[1])) {
      FuzzFail ("IMPORT_BEGIN accepted a header span that is not one header", Arg[1]);
    }

    InternalShadowOpen (Helper, (CONST OVMF_MH_STREAM_HEADER *)(Helper->DataBefore + Arg[0]));
    if ((((CONST OVMF_MH_STREAM_HEADER *)(Helper->DataBefore + Arg[0]))->GuestSize != Helper->WindowSize) ||
        (((CONST OVMF_MH_STREAM_HEADER *)(Helper->DataBefore + Arg[0]))->ShardIndex != Arg[2]) ||
        (((CONST OVMF_MH_STREAM_HEADER *)(Helper->DataBefore + Arg[0]))->ShardCount != Arg[3]))
    {
      FuzzFail ("IMPORT_BEGIN accepted a header for another guest size or shard", Arg[2]);
    }
  }

  if ((Command == OVMF_MH_CMD_IMPORT_END) && (Status == OVMF_MH_STATUS_SUCCESS)) {
    if (!InternalInData (Helper, Arg[0], Arg[1])) {
      FuzzFail ("IMPORT_END read outside the data area", Arg[0]);
    }

    InternalShadowEnd (Helper, Helper->DataBefore + Arg[0], Arg[1], Result[0], Arg[2], Arg[3]);
  }

  if (Session->State != OVMF_MH_SESSION_IMPORTING) {
    Helper->ShadowOpen = FALSE;
  }

  if (Command == OVMF_MH_CMD_SHUTDOWN) {
    if (memcmp (Session->TransportKey, mFuzzZeroPage, OVMF_MH_KEY_SIZE) != 0) {
      FuzzFail ("SHUTDOWN left the transport key in memory", 0);
    }

    if (Session->KeyLoaded || Session->KeyReady || !Helper->Context.ShutdownRequested ||
        (Header->State != OVMF_MH_STATE_SHUTDOWN))
    {
      FuzzFail ("SHUTDOWN left key material or did not shut down", Status);
    }

    Helper->ShutDown = TRUE;
  }

  InternalCheckPageHashKey (
    Helper,
    (BOOLEAN)((Command == OVMF_MH_CMD_SHUTDOWN) || (Before.State == OVMF_MH_SESSION_EXPORTING))
    );

  //
  // Everything outside the output span was proven unchanged, the window
  // equal to WindowExpected: the copies hold the state after this command.
  //
  memcpy (Helper->DataBefore + OutStart, Data + OutStart, OutEnd - OutStart);
  Helper->DataStale                 = FALSE;
  Helper->WindowStale               = FALSE;
  Helper->Context.ShutdownRequested = FALSE;
  return Status;
}
