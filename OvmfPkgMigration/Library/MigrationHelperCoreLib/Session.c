/** @file
  Export and import sessions: the page stream of docs/stream-format.md.

  Everything the host controls (the data area, the guest window contents,
  the command arguments) is hostile. Offsets and sizes are checked before
  use, input is copied into private memory before it is verified, and a
  page reaches guest memory only after its record authenticated.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

#define SESSION_INFO       OVMF_MH_KDF_INFO
#define SESSION_INFO_SIZE  (sizeof (SESSION_INFO) - 1)
#define CHAIN_LABEL        OVMF_MH_CHAIN_LABEL
#define CHAIN_LABEL_SIZE   (sizeof (CHAIN_LABEL) - 1)
#define OKM_SIZE           (OVMF_MH_KEY_SIZE + OVMF_MH_SESSION_ID_SIZE)
#define RECEIPT_INFO       OVMF_MH_RECEIPT_INFO
#define RECEIPT_INFO_SIZE  (sizeof (RECEIPT_INFO) - 1)
#define RECEIPT_MAC_SIZE   OFFSET_OF (OVMF_MH_RECEIPT, Mac)
#define SHARED_LABEL       OVMF_MH_SHARED_LABEL
#define SHARED_LABEL_SIZE  (sizeof (SHARED_LABEL) - 1)
#define PROOF_INFO         OVMF_MH_COMMIT_PROOF_INFO
#define PROOF_INFO_SIZE    (sizeof (PROOF_INFO) - 1)
#define PROOF_MAC_SIZE     OFFSET_OF (OVMF_MH_COMMIT_PROOF, Mac)
#define RECEIPTS_LABEL       OVMF_MH_COMMIT_RECEIPTS_LABEL
#define RECEIPTS_LABEL_SIZE  (sizeof (RECEIPTS_LABEL) - 1)
#define RDRAND_RETRIES     32
#define CPUID_RDRAND       BIT30

STATIC_ASSERT (sizeof (OVMF_MH_SESSION) <= OVMF_MH_WORK_AREA_BASE_SIZE, "session fits before the page tracking table");
STATIC_ASSERT (OVMF_MH_MAX_SHARDS * OVMF_MH_CHALLENGE_SIZE <= OVMF_MH_MAX_SHARDS * sizeof (OVMF_MH_RECEIPT), "nonces fit the input copy");

/**
  Return the session state carved out of the platform's private memory.

  @param[in] Context  An initialized context.

  @return The session.
**/
OVMF_MH_SESSION *
InternalSession (
  IN OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  return (OVMF_MH_SESSION *)Context->Private;
}

/**
  Check that [Offset, Offset + Size) lies inside the data area.

  @param[in] Context  The helper context.
  @param[in] Offset   Offset into the data area.
  @param[in] Size     Length.

  @retval TRUE   Inside (and not wrapping).
  @retval FALSE  Outside.
**/
STATIC
BOOLEAN
InternalDataSpanOk (
  IN OVMF_MH_HELPER_CONTEXT  *Context,
  IN UINT64                  Offset,
  IN UINT64                  Size
  )
{
  return (BOOLEAN)((Offset <= Context->DataSize) && (Size <= Context->DataSize - Offset));
}

/**
  Check that a guest page offset is aligned and inside the window.

  @param[in] Context      The helper context.
  @param[in] GuestOffset  Byte offset of the page in guest RAM.

  @retval TRUE   Valid.
  @retval FALSE  Misaligned or outside.
**/
STATIC
BOOLEAN
InternalGuestPageOk (
  IN OVMF_MH_HELPER_CONTEXT  *Context,
  IN UINT64                  GuestOffset
  )
{
  return (BOOLEAN)(((GuestOffset & (OVMF_MH_PAGE_SIZE - 1)) == 0) &&
                   (Context->GuestWindowSize >= OVMF_MH_PAGE_SIZE) &&
                   (GuestOffset <= Context->GuestWindowSize - OVMF_MH_PAGE_SIZE));
}

/**
  Build the 12-byte nonce of a sequence number.

  @param[in]  Sequence  Record sequence number.
  @param[out] Nonce     Receives OVMF_MH_NONCE_SIZE bytes.
**/
STATIC
VOID
InternalNonce (
  IN  UINT64  Sequence,
  OUT UINT8   *Nonce
  )
{
  UINTN  Index;

  Nonce[0] = 0;
  Nonce[1] = 0;
  Nonce[2] = 0;
  Nonce[3] = 0;
  for (Index = 0; Index < 8; Index++) {
    Nonce[4 + Index] = (UINT8)(Sequence >> (Index * 8));
  }
}

/**
  Fill a buffer from RDRAND.

  @param[out] Buffer  Receives random bytes.
  @param[in]  Size    A multiple of 8.

  @retval TRUE   Filled.
  @retval FALSE  The CPU has no RDRAND or it kept failing.
**/
STATIC
BOOLEAN
InternalRandom (
  OUT UINT8  *Buffer,
  IN  UINTN  Size
  )
{
  UINT32  Ecx;
  UINT64  Value;
  UINTN   Offset;
  UINTN   Try;

  AsmCpuid (1, NULL, NULL, &Ecx, NULL);
  if ((Ecx & CPUID_RDRAND) == 0) {
    return FALSE;
  }

  for (Offset = 0; Offset < Size; Offset += sizeof (Value)) {
    for (Try = 0; Try < RDRAND_RETRIES; Try++) {
      if (AsmRdRand64 (&Value)) {
        break;
      }
    }

    if (Try == RDRAND_RETRIES) {
      return FALSE;
    }

    CopyMem (Buffer + Offset, &Value, sizeof (Value));
  }

  Value = 0;
  return TRUE;
}

/**
  Compare two buffers in time that does not depend on where they differ.

  @param[in] Left   Bytes.
  @param[in] Right  Bytes.
  @param[in] Size   Length of both.

  @retval TRUE   Equal.
  @retval FALSE  Different.
**/
STATIC
BOOLEAN
InternalEqual (
  IN CONST UINT8  *Left,
  IN CONST UINT8  *Right,
  IN UINTN        Size
  )
{
  UINT8  Difference;
  UINTN  Index;

  Difference = 0;
  for (Index = 0; Index < Size; Index++) {
    Difference |= (UINT8)(Left[Index] ^ Right[Index]);
  }

  return (BOOLEAN)(Difference == 0);
}

/**
  Derive the session key and session id from the transport key, the salt and
  the binding fields of a stream header (Flags through TargetNonce), and
  reset the chain and sequence.

  @param[in,out] Session  The session.
  @param[in]     Header   The stream header (private copy) with Salt and the
                          binding fields filled in.

  @retval TRUE   Derived.
  @retval FALSE  Derivation failed (cannot happen with valid sizes).
**/
STATIC
BOOLEAN
InternalStartSession (
  IN OUT OVMF_MH_SESSION              *Session,
  IN     CONST OVMF_MH_STREAM_HEADER  *Header
  )
{
  UINT8                   Okm[OKM_SIZE];
  UINT8                   Info[SESSION_INFO_SIZE + OVMF_MH_STREAM_BINDING_SIZE];
  OVMF_MH_SHA256_CONTEXT  Chain;
  BOOLEAN                 Ok;

  CopyMem (Info, SESSION_INFO, SESSION_INFO_SIZE);
  CopyMem (Info + SESSION_INFO_SIZE, (CONST UINT8 *)Header + OVMF_MH_STREAM_BINDING_OFFSET, OVMF_MH_STREAM_BINDING_SIZE);
  Ok = MigrationHelperHkdfSha256 (
         Header->Salt,
         OVMF_MH_SALT_SIZE,
         Session->TransportKey,
         OVMF_MH_KEY_SIZE,
         Info,
         sizeof (Info),
         Okm,
         sizeof (Okm)
         );
  Ok = (BOOLEAN)(
                 Ok && MigrationHelperOcbInitPaths (
                         &Session->Key,
                         Okm,
                         OVMF_MH_KEY_SIZE,
                         (Session->AllowAesNi ? OVMF_MH_OCB_ALLOW_AESNI : 0) | (Session->AllowVaes ? OVMF_MH_OCB_ALLOW_VAES : 0)
                         )
                 );
  CopyMem (Session->SessionId, Okm + OVMF_MH_KEY_SIZE, OVMF_MH_SESSION_ID_SIZE);
  MigrationHelperSecureZero (Okm, sizeof (Okm));

  MigrationHelperSha256Init (&Chain);
  MigrationHelperSha256Update (&Chain, (CONST UINT8 *)CHAIN_LABEL, CHAIN_LABEL_SIZE);
  MigrationHelperSha256Update (&Chain, Session->SessionId, OVMF_MH_SESSION_ID_SIZE);
  MigrationHelperSha256Final (&Chain, Session->Chain);

  Session->NextSequence = 1;
  Session->RecordCount  = 0;
  Session->KeyReady     = Ok;
  return Ok;
}

/**
  Extend the chain digest with a record tag.

  @param[in,out] Session  The session.
  @param[in]     Tag      OVMF_MH_TAG_SIZE bytes.
**/
STATIC
VOID
InternalChain (
  IN OUT OVMF_MH_SESSION  *Session,
  IN     CONST UINT8      *Tag
  )
{
  OVMF_MH_SHA256_CONTEXT  Chain;

  MigrationHelperSha256Init (&Chain);
  MigrationHelperSha256Update (&Chain, Session->Chain, OVMF_MH_DIGEST_SIZE);
  MigrationHelperSha256Update (&Chain, Tag, OVMF_MH_TAG_SIZE);
  MigrationHelperSha256Final (&Chain, Session->Chain);
}

/**
  Forget the session's keys: the session key and, when a tracked export
  derived it, the page-hash key (with the hash of the zero page, which is a
  value of it). CHECK_PAGES needs an exporting session, so nothing uses
  either after the session ends.

  @param[in,out] Session  The session.
**/
VOID
InternalEndSession (
  IN OUT OVMF_MH_SESSION  *Session
  )
{
  MigrationHelperOcbWipe (&Session->Key);
  Session->KeyReady = FALSE;
  if (Session->PageHashKeyReady) {
    MigrationHelperSecureZero (Session->PageHashKey, sizeof (Session->PageHashKey));
    MigrationHelperSecureZero (&Session->ZeroPageHash, sizeof (Session->ZeroPageHash));
    Session->PageHashKeyReady = FALSE;
  }
}

/**
  Tell whether a buffer is all zero.

  @param[in] Buffer  Bytes.
  @param[in] Size    Multiple of 8.

  @retval TRUE   All zero.
**/
STATIC
BOOLEAN
InternalIsZero (
  IN CONST UINT8  *Buffer,
  IN UINTN        Size
  )
{
  CONST UINT64  *Words;
  UINTN         Index;

  //
  // Eight words per test: under TCG every branch ends a translation block.
  //
  Words = (CONST UINT64 *)Buffer;
  for (Index = 0; Index < Size / sizeof (UINT64); Index += 8) {
    if ((Words[Index] | Words[Index + 1] | Words[Index + 2] | Words[Index + 3] |
         Words[Index + 4] | Words[Index + 5] | Words[Index + 6] | Words[Index + 7]) != 0)
    {
      return FALSE;
    }
  }

  return TRUE;
}

/**
  Keyed NH hash of a page (the universal hash family of UMAC): the sum over
  pairs of 32-bit words of (a + k) * (b + k') as 64-bit products. With a
  secret key, two different pages collide with probability about 2^-32.
  The stored value has its low bit set so that 0 can mean "not sent".

  @param[in] Key   OVMF_MH_PAGE_HASH_KEY_SIZE / 4 words.
  @param[in] Page  OVMF_MH_PAGE_SIZE bytes.

  @return The hash, never 0.
**/
STATIC
UINT64
InternalPageHash (
  IN CONST UINT32  *Key,
  IN CONST UINT8   *Page
  )
{
  CONST UINT64  *Words;
  CONST UINT64  *Keys;
  UINT64        Word;
  UINT64        KeyPair;
  UINT64        Sum;
  UINTN         Index;

  //
  // One 64-bit load covers a pair of 32-bit words (little endian: the low
  // half is the even word); under TCG fewer loads is most of the cost.
  //
  Words = (CONST UINT64 *)Page;
  Keys  = (CONST UINT64 *)Key;
  Sum   = 0;
  for (Index = 0; Index < OVMF_MH_PAGE_SIZE / sizeof (UINT64); Index += 2) {
    Word    = Words[Index];
    KeyPair = Keys[Index];
    Sum    += (UINT64)(UINT32)((UINT32)Word + (UINT32)KeyPair) *
              (UINT64)(UINT32)((UINT32)(Word >> 32) + (UINT32)(KeyPair >> 32));
    Word    = Words[Index + 1];
    KeyPair = Keys[Index + 1];
    Sum    += (UINT64)(UINT32)((UINT32)Word + (UINT32)KeyPair) *
              (UINT64)(UINT32)((UINT32)(Word >> 32) + (UINT32)(KeyPair >> 32));
  }

  return Sum | 1;
}

/**
  Fill a record header.

  @param[in]  Session      The session.
  @param[in]  Type         OVMF_MH_RECORD_*.
  @param[in]  PayloadSize  Payload bytes.
  @param[in]  GuestOffset  Page offset or 0.
  @param[out] Record       The header.
**/
STATIC
VOID
InternalRecordHeader (
  IN  OVMF_MH_SESSION        *Session,
  IN  UINT32                 Type,
  IN  UINT32                 PayloadSize,
  IN  UINT64                 GuestOffset,
  OUT OVMF_MH_RECORD_HEADER  *Record
  )
{
  Record->Type        = Type;
  Record->PayloadSize = PayloadSize;
  Record->Sequence    = Session->NextSequence;
  Record->GuestOffset = GuestOffset;
  CopyMem (Record->SessionId, Session->SessionId, OVMF_MH_SESSION_ID_SIZE);
}

/**
  The checks EXPORT_BEGIN and IMPORT_BEGIN share: a session may start, the
  helper has a key, the argument span is inside the data area.

  @param[in] Context  The helper context.
  @param[in] Arg      Offset and size of the span.

  @return OVMF_MH_STATUS_SUCCESS or the failure status.
**/
STATIC
UINT32
InternalCheckSessionStart (
  IN OVMF_MH_HELPER_CONTEXT  *Context,
  IN CONST UINT64            *Arg
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (Context);
  if ((Session->State != OVMF_MH_SESSION_IDLE) && (Session->State != OVMF_MH_SESSION_COMPLETE)) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!Session->KeyLoaded) {
    return OVMF_MH_STATUS_NO_KEY;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  EXPORT_BEGIN: bind the stream to a migration and a shard, draw a salt,
  derive the session, write the stream header.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Out offset, capacity, flags (OVMF_MH_EXPORT_*),
                          binding input offset (BOUND: ShardCount target
                          nonces; else a migration id), shard index, shard
                          count.
  @param[out]    Result   Bytes written.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalExportBegin (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_STREAM_HEADER  *Header;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT32                 Status;
  UINT64                 ShardIndex;
  UINT64                 ShardCount;
  UINT64                 BindingSize;
  BOOLEAN                Bound;
  OVMF_MH_STREAM_HEADER  Fresh;

  Session = InternalSession (Context);
  Status  = InternalCheckSessionStart (Context, Arg);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  if ((Arg[2] & ~(UINT64)OVMF_MH_EXPORT_FLAGS_KNOWN) != 0) {
    return OVMF_MH_STATUS_INVALID_PARAMETER;
  }

  ShardIndex = Arg[4];
  ShardCount = Arg[5];
  if ((ShardCount == 0) || (ShardCount > OVMF_MH_MAX_SHARDS) || (ShardIndex >= ShardCount)) {
    return OVMF_MH_STATUS_INVALID_PARAMETER;
  }

  Bound       = (BOOLEAN)((Arg[2] & OVMF_MH_EXPORT_BOUND) != 0);
  BindingSize = Bound ? ShardCount * OVMF_MH_CHALLENGE_SIZE : OVMF_MH_MIGRATION_ID_SIZE;
  if (!InternalDataSpanOk (Context, Arg[3], BindingSize)) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] < sizeof (OVMF_MH_STREAM_HEADER)) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  //
  // The binding input is read once into private memory. Bound: the helper
  // computes the migration id from the targets' nonces itself, so a header
  // that names a migration id also names every target nonce behind it.
  //
  //
  // The header is built in a local copy: until the salt is drawn, the
  // session (and a completed import's header) stays as it was.
  //
  Header = &Fresh;
  ZeroMem (Header, sizeof (*Header));
  CopyMem (Session->Input, (VOID *)(Context->Data + Arg[3]), (UINTN)BindingSize);
  if (Bound) {
    MigrationHelperSha256 (Session->Input, (UINTN)BindingSize, Header->MigrationId);
    CopyMem (Header->TargetNonce, Session->Input + ShardIndex * OVMF_MH_CHALLENGE_SIZE, OVMF_MH_CHALLENGE_SIZE);
    Header->Flags = OVMF_MH_STREAM_BOUND;
  } else {
    CopyMem (Header->MigrationId, Session->Input, OVMF_MH_MIGRATION_ID_SIZE);
  }

  Header->ShardIndex = (UINT32)ShardIndex;
  Header->ShardCount = (UINT32)ShardCount;
  if (!InternalRandom (Header->Salt, OVMF_MH_SALT_SIZE)) {
    return OVMF_MH_STATUS_NO_ENTROPY;
  }

  Session->ChallengeSet = FALSE;
  Session->ImportDone   = FALSE;
  Session->ExportDone   = FALSE;
  Session->Committed    = FALSE;
  Header                = &Session->StreamHeader;
  CopyMem (Header, &Fresh, sizeof (Fresh));
  if (!InternalStartSession (Session, Header)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  //
  // The page-hash key and table serve CHECK_PAGES only: an untracked export
  // derives no key (128 HMAC blocks) and clears no table. Of the table, only
  // the entries of pages inside the guest window can ever be set or read.
  // The key itself is derived when the first tracked EXPORT_BATCH needs it
  // (InternalPageHashKeyReady), from this salt and the same transport key.
  //
  Session->TrackPages       = (BOOLEAN)((Arg[2] & OVMF_MH_EXPORT_TRACK_PAGES) != 0);
  Session->PageHashKeyReady = FALSE;
  if (Session->TrackPages) {
    ZeroMem (Session->PageHash, (UINTN)Session->TrackedPageCount * sizeof (Session->PageHash[0]));
  }

  Header->Magic      = OVMF_MH_STREAM_MAGIC;
  Header->Version    = OVMF_MH_STREAM_VERSION;
  Header->HeaderSize = sizeof (OVMF_MH_STREAM_HEADER);
  CopyMem (Header->SessionId, Session->SessionId, OVMF_MH_SESSION_ID_SIZE);
  Header->GuestSize = Context->GuestWindowSize;
  InternalNonce (0, Nonce);
  MigrationHelperOcbEncrypt (
    &Session->Key,
    Nonce,
    (CONST UINT8 *)Header,
    OFFSET_OF (OVMF_MH_STREAM_HEADER, Tag),
    NULL,
    0,
    NULL,
    Header->Tag
    );

  CopyMem ((VOID *)(Context->Data + Arg[0]), Header, sizeof (*Header));
  Session->State = OVMF_MH_SESSION_EXPORTING;
  Result[0]      = sizeof (*Header);
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Derive the page-hash key of a tracked export and the hash of an all-zero
  page, once per session: HKDF from the stream header's salt and the
  transport key (neither changes during a session). A session that never
  hashes a page never derives the key.

  @param[in,out] Session  An exporting session with TrackPages set.

  @retval TRUE   PageHashKey and ZeroPageHash are ready.
  @retval FALSE  Derivation failed (cannot happen with valid sizes).
**/
STATIC
BOOLEAN
InternalPageHashKeyReady (
  IN OUT OVMF_MH_SESSION  *Session
  )
{
  if (Session->PageHashKeyReady) {
    return TRUE;
  }

  if (!MigrationHelperHkdfSha256 (
         Session->StreamHeader.Salt,
         OVMF_MH_SALT_SIZE,
         Session->TransportKey,
         OVMF_MH_KEY_SIZE,
         (CONST UINT8 *)OVMF_MH_PAGE_HASH_INFO,
         sizeof (OVMF_MH_PAGE_HASH_INFO) - 1,
         (UINT8 *)Session->PageHashKey,
         sizeof (Session->PageHashKey)
         ))
  {
    return FALSE;
  }

  ZeroMem (Session->PageBuffer, OVMF_MH_PAGE_SIZE);
  Session->ZeroPageHash     = InternalPageHash (Session->PageHashKey, Session->PageBuffer);
  Session->PageHashKeyReady = TRUE;
  return TRUE;
}

/**
  EXPORT_BATCH: one record per listed guest page, in list order.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      List offset, count, out offset, capacity.
  @param[out]    Result   Bytes written, records, zero pages.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalExportBatch (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  UINT64                 Count;
  UINT64                 Index;
  UINT64                 Written;
  UINT64                 ZeroPages;
  UINT8                  *Out;
  OVMF_MH_RECORD_HEADER  Record;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                  *Tag;
  BOOLEAN                IsZero;

  Session = InternalSession (Context);
  if (Session->State != OVMF_MH_SESSION_EXPORTING) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  Count = Arg[1];
  if (Count > OVMF_MH_MAX_BATCH_PAGES) {
    return OVMF_MH_STATUS_BATCH_TOO_LARGE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Count * sizeof (UINT64)) ||
      !InternalDataSpanOk (Context, Arg[2], Arg[3]))
  {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  //
  // Snapshot the list once; every entry is checked before any output.
  //
  CopyMem (Session->PageList, (VOID *)(Context->Data + Arg[0]), (UINTN)Count * sizeof (UINT64));
  for (Index = 0; Index < Count; Index++) {
    if (!InternalGuestPageOk (Context, Session->PageList[Index])) {
      return OVMF_MH_STATUS_BAD_PAGE;
    }
  }

  if (Arg[3] < Count * OVMF_MH_MAX_RECORD_SIZE) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  if (Session->TrackPages && (Count > 0) && !InternalPageHashKeyReady (Session)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  Out       = (UINT8 *)(Context->Data + Arg[2]);
  Written   = 0;
  ZeroPages = 0;
  Tag       = Session->Scratch;
  for (Index = 0; Index < Count; Index++) {
    //
    // One private snapshot per page: the zero check and the encryption see
    // the same bytes, and the tag that feeds the chain never leaves private
    // memory before it is chained.
    //
    CopyMem (Session->PageBuffer, (VOID *)(Context->GuestWindow + Session->PageList[Index]), OVMF_MH_PAGE_SIZE);
    IsZero = InternalIsZero (Session->PageBuffer, OVMF_MH_PAGE_SIZE);
    if (Session->TrackPages && (Session->PageList[Index] / OVMF_MH_PAGE_SIZE < Session->TrackedPageCount)) {
      //
      // All zero pages share one hash, computed with the key.
      //
      Session->PageHash[Session->PageList[Index] / OVMF_MH_PAGE_SIZE] =
        IsZero ? Session->ZeroPageHash : InternalPageHash (Session->PageHashKey, Session->PageBuffer);
    }

    InternalNonce (Session->NextSequence, Nonce);
    if (IsZero) {
      InternalRecordHeader (Session, OVMF_MH_RECORD_ZERO, 0, Session->PageList[Index], &Record);
      MigrationHelperOcbEncrypt (&Session->Key, Nonce, (CONST UINT8 *)&Record, sizeof (Record), NULL, 0, NULL, Tag);
      ZeroPages++;
    } else {
      InternalRecordHeader (Session, OVMF_MH_RECORD_PAGE, OVMF_MH_PAGE_SIZE, Session->PageList[Index], &Record);
      MigrationHelperOcbEncrypt (
        &Session->Key,
        Nonce,
        (CONST UINT8 *)&Record,
        sizeof (Record),
        Session->PageBuffer,
        OVMF_MH_PAGE_SIZE,
        Out + Written + sizeof (Record),
        Tag
        );
    }

    CopyMem (Out + Written, &Record, sizeof (Record));
    CopyMem (Out + Written + sizeof (Record) + Record.PayloadSize, Tag, OVMF_MH_TAG_SIZE);
    InternalChain (Session, Tag);
    Written += sizeof (Record) + Record.PayloadSize + OVMF_MH_TAG_SIZE;
    Session->NextSequence++;
    Session->RecordCount++;
  }

  MigrationHelperSecureZero (Session->PageBuffer, OVMF_MH_PAGE_SIZE);
  Result[0] = Written;
  Result[1] = Count;
  Result[2] = ZeroPages;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Read the host's account of a shard's shared pages: a page count and, when
  it is not zero, the digest at an offset of the data area (copied once into
  private memory). With no pages the digest is that of no pages, the
  SHA-256 of OVMF_MH_SHARED_LABEL, and nothing is read.

  @param[in]  Context  The helper context.
  @param[in]  Offset   Offset of the OVMF_MH_DIGEST_SIZE-byte digest in the data area.
  @param[in]  Count    Shared pages the digest covers.
  @param[out] Digest   Receives OVMF_MH_DIGEST_SIZE bytes.

  @retval OVMF_MH_STATUS_SUCCESS        Digest filled in.
  @retval OVMF_MH_STATUS_OUT_OF_BOUNDS  Count is not zero and the digest lies outside the data area.
**/
STATIC
UINT32
InternalSharedPages (
  IN  OVMF_MH_HELPER_CONTEXT  *Context,
  IN  UINT64                  Offset,
  IN  UINT64                  Count,
  OUT UINT8                   *Digest
  )
{
  OVMF_MH_SHA256_CONTEXT  Hash;

  if (Count == 0) {
    MigrationHelperSha256Init (&Hash);
    MigrationHelperSha256Update (&Hash, (CONST UINT8 *)SHARED_LABEL, SHARED_LABEL_SIZE);
    MigrationHelperSha256Final (&Hash, Digest);
    return OVMF_MH_STATUS_SUCCESS;
  }

  if (!InternalDataSpanOk (Context, Offset, OVMF_MH_DIGEST_SIZE)) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  CopyMem (Digest, (VOID *)(Context->Data + Offset), OVMF_MH_DIGEST_SIZE);
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  EXPORT_END: write the end record, which seals the record count, the chain
  digest and the host's account of the shard's shared pages, and close the
  session.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Out offset, capacity, shared digest offset, shared page count.
  @param[out]    Result   Bytes written, record count.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalExportEnd (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_RECORD_HEADER  Record;
  OVMF_MH_END_PAYLOAD    Payload;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                  *Out;
  UINT32                 Status;

  Session = InternalSession (Context);
  if (Session->State != OVMF_MH_SESSION_EXPORTING) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] < OVMF_MH_END_RECORD_SIZE) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  Status = InternalSharedPages (Context, Arg[2], Arg[3], Payload.SharedDigest);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  Payload.SharedPageCount = Arg[3];
  Payload.RecordCount     = Session->RecordCount;
  CopyMem (Payload.ChainDigest, Session->Chain, OVMF_MH_DIGEST_SIZE);
  InternalRecordHeader (Session, OVMF_MH_RECORD_END, sizeof (Payload), 0, &Record);
  InternalNonce (Session->NextSequence, Nonce);
  Out = (UINT8 *)(Context->Data + Arg[0]);
  MigrationHelperOcbEncrypt (
    &Session->Key,
    Nonce,
    (CONST UINT8 *)&Record,
    sizeof (Record),
    (CONST UINT8 *)&Payload,
    sizeof (Payload),
    Session->Scratch,
    Session->Scratch + sizeof (Payload)
    );
  CopyMem (Out, &Record, sizeof (Record));
  CopyMem (Out + sizeof (Record), Session->Scratch, sizeof (Payload) + OVMF_MH_TAG_SIZE);

  InternalEndSession (Session);
  Session->State      = OVMF_MH_SESSION_COMPLETE;
  Session->ExportDone = TRUE;
  Result[0]           = OVMF_MH_END_RECORD_SIZE;
  Result[1]      = Payload.RecordCount;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  CHECK_PAGES: tell, per listed page, whether its content differs from what
  this export session last sent for it (or was never sent by it).

  @param[in,out] Context  The helper context.
  @param[in]     Arg      List offset, count, out offset (one byte per page).
  @param[out]    Result   Number of pages reported as changed.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalCheckPages (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION  *Session;
  UINT64           Count;
  UINT64           Index;
  UINT64           Number;
  UINT8            Changed;
  volatile UINT8   *Out;
  CONST UINT8      *Page;

  Session = InternalSession (Context);
  //
  // An untracked export has nothing to compare against.
  //
  if ((Session->State != OVMF_MH_SESSION_EXPORTING) || !Session->TrackPages) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  Count = Arg[1];
  if (Count > OVMF_MH_MAX_BATCH_PAGES) {
    return OVMF_MH_STATUS_BATCH_TOO_LARGE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Count * sizeof (UINT64)) ||
      !InternalDataSpanOk (Context, Arg[2], Count))
  {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  CopyMem (Session->PageList, (VOID *)(Context->Data + Arg[0]), (UINTN)Count * sizeof (UINT64));
  for (Index = 0; Index < Count; Index++) {
    if (!InternalGuestPageOk (Context, Session->PageList[Index])) {
      return OVMF_MH_STATUS_BAD_PAGE;
    }
  }

  //
  // The guest is normally stopped when this runs (live migration's last
  // pass), so the pages are read in place rather than copied: a host that
  // changes a page during the check only gets a wrong answer about a page it
  // changed itself.
  //
  Out = Context->Data + Arg[2];
  for (Index = 0; Index < Count; Index++) {
    Number  = Session->PageList[Index] / OVMF_MH_PAGE_SIZE;
    Page    = (CONST UINT8 *)(Context->GuestWindow + Session->PageList[Index]);
    Changed = 1;
    if ((Number < Session->TrackedPageCount) && (Session->PageHash[Number] != 0)) {
      if (Session->PageHash[Number] == Session->ZeroPageHash) {
        //
        // Sent as zero: still zero is all there is to check (and cheaper).
        //
        Changed = (UINT8)!InternalIsZero (Page, OVMF_MH_PAGE_SIZE);
      } else {
        Changed = (UINT8)(Session->PageHash[Number] != InternalPageHash (Session->PageHashKey, Page));
      }
    }

    Out[Index] = Changed;
    Result[0] += Changed;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

//
// ---------------------------------------------------------------------------
// Zero ranges (ABI 2.1): one authenticated record for a run of pages the
// host says are empty, which the source helper checks before sealing and
// the target helper checks again before writing.
// ---------------------------------------------------------------------------
//

/**
  Check where a zero range lies: inside the guest window, and inside one
  shard block that belongs to the given shard.

  @param[in] Context      The helper context.
  @param[in] GuestOffset  First byte of the range.
  @param[in] PageCount    Pages in the range, at least 1.
  @param[in] Header       The session's stream header (shard index, count).

  @retval OVMF_MH_STATUS_SUCCESS              The range may be zeroed by this shard.
  @retval OVMF_MH_STATUS_BAD_PAGE             Misaligned, or not inside the window.
  @retval OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD  Crosses a shard block, or the block is another shard's.
**/
STATIC
UINT32
InternalZeroRangePlace (
  IN OVMF_MH_HELPER_CONTEXT       *Context,
  IN UINT64                       GuestOffset,
  IN UINT64                       PageCount,
  IN CONST OVMF_MH_STREAM_HEADER  *Header
  )
{
  UINT64  First;

  if (((GuestOffset & (OVMF_MH_PAGE_SIZE - 1)) != 0) || (GuestOffset >= Context->GuestWindowSize) ||
      (PageCount > (Context->GuestWindowSize - GuestOffset) / OVMF_MH_PAGE_SIZE))
  {
    return OVMF_MH_STATUS_BAD_PAGE;
  }

  First = GuestOffset / OVMF_MH_PAGE_SIZE;
  if ((PageCount > OVMF_MH_SHARD_BLOCK_PAGES) ||
      ((First % OVMF_MH_SHARD_BLOCK_PAGES) + PageCount > OVMF_MH_SHARD_BLOCK_PAGES) ||
      (Header->ShardCount == 0) ||
      ((First / OVMF_MH_SHARD_BLOCK_PAGES) % Header->ShardCount != Header->ShardIndex))
  {
    return OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  EXPORT_ZERO_RANGES: the host names runs of pages it believes empty; the
  helper checks every byte of every run and, only if all are zero, seals
  one ZERO_RANGE record per run. Any refusal writes nothing and leaves the
  session as it was.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Range-list offset, range count, out offset, capacity.
  @param[out]    Result   Bytes written, records, pages covered; on NOT_ZERO,
                          Result[0] is the guest offset of the first page
                          found not zero.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalExportZeroRanges (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION             *Session;
  OVMF_MH_ZERO_RANGE_ENTRY    *Ranges;
  OVMF_MH_ZERO_RANGE_PAYLOAD  Payload;
  OVMF_MH_RECORD_HEADER       Record;
  UINT8                       Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                       *Out;
  UINT8                       *Tag;
  UINT64                      Count;
  UINT64                      Index;
  UINT64                      Page;
  UINT64                      Number;
  UINT64                      Written;
  UINT64                      Pages;
  UINT64                      Offset;
  UINT32                      Status;

  Session = InternalSession (Context);
  if (Session->State != OVMF_MH_SESSION_EXPORTING) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  Count = Arg[1];
  if (Count > OVMF_MH_MAX_ZERO_RANGES) {
    return OVMF_MH_STATUS_BATCH_TOO_LARGE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Count * sizeof (OVMF_MH_ZERO_RANGE_ENTRY)) ||
      !InternalDataSpanOk (Context, Arg[2], Arg[3]))
  {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  //
  // The list is read once into private memory (the page-list buffer holds
  // OVMF_MH_MAX_ZERO_RANGES entries); every entry is checked before any
  // guest page is read.
  //
  Ranges = (OVMF_MH_ZERO_RANGE_ENTRY *)Session->PageList;
  CopyMem (Ranges, (VOID *)(Context->Data + Arg[0]), (UINTN)Count * sizeof (OVMF_MH_ZERO_RANGE_ENTRY));
  for (Index = 0; Index < Count; Index++) {
    if (Ranges[Index].PageCount == 0) {
      return OVMF_MH_STATUS_INVALID_PARAMETER;
    }

    Status = InternalZeroRangePlace (
               Context,
               Ranges[Index].GuestOffset,
               Ranges[Index].PageCount,
               &Session->StreamHeader
               );
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      return Status;
    }
  }

  if (Arg[3] < Count * OVMF_MH_ZERO_RANGE_RECORD_SIZE) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  if (Session->TrackPages && (Count > 0) && !InternalPageHashKeyReady (Session)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  //
  // The host's claim is checked in full before anything is sealed: a range
  // with one non-zero byte refuses the whole call. The pages are read in
  // place, once, a page at a time; a page the host changes after its check
  // is a page that changed after it was sent, which CHECK_PAGES reports.
  //
  for (Index = 0; Index < Count; Index++) {
    for (Page = 0; Page < Ranges[Index].PageCount; Page++) {
      Offset = Ranges[Index].GuestOffset + Page * OVMF_MH_PAGE_SIZE;
      if (!InternalIsZero ((CONST UINT8 *)(Context->GuestWindow + Offset), OVMF_MH_PAGE_SIZE)) {
        Result[0] = Offset;
        return OVMF_MH_STATUS_NOT_ZERO;
      }
    }
  }

  Out     = (UINT8 *)(Context->Data + Arg[2]);
  Tag     = Session->Scratch;
  Written = 0;
  Pages   = 0;
  for (Index = 0; Index < Count; Index++) {
    Payload.PageCount = Ranges[Index].PageCount;
    InternalRecordHeader (Session, OVMF_MH_RECORD_ZERO_RANGE, sizeof (Payload), Ranges[Index].GuestOffset, &Record);
    InternalNonce (Session->NextSequence, Nonce);
    MigrationHelperOcbEncrypt (
      &Session->Key,
      Nonce,
      (CONST UINT8 *)&Record,
      sizeof (Record),
      (CONST UINT8 *)&Payload,
      sizeof (Payload),
      Out + Written + sizeof (Record),
      Tag
      );
    CopyMem (Out + Written, &Record, sizeof (Record));
    CopyMem (Out + Written + sizeof (Record) + sizeof (Payload), Tag, OVMF_MH_TAG_SIZE);
    InternalChain (Session, Tag);
    if (Session->TrackPages) {
      Number = Ranges[Index].GuestOffset / OVMF_MH_PAGE_SIZE;
      for (Page = 0; (Page < Ranges[Index].PageCount) && (Number + Page < Session->TrackedPageCount); Page++) {
        Session->PageHash[Number + Page] = Session->ZeroPageHash;
      }
    }

    Written += OVMF_MH_ZERO_RANGE_RECORD_SIZE;
    Pages   += Ranges[Index].PageCount;
    Session->NextSequence++;
    Session->RecordCount++;
  }

  Result[0] = Written;
  Result[1] = Count;
  Result[2] = Pages;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Apply an authenticated ZERO_RANGE record: check its range against the
  window and this stream's shard, then make every page of it zero, writing
  only pages that are not zero already (a sparse target RAM file stays
  sparse where it is zero).

  @param[in]     Context  The helper context.
  @param[in]     Record   The record header (private copy, authenticated).
  @param[in]     Plain    The decrypted payload (private).
  @param[in,out] Pages    Incremented by the pages the range covers.

  @retval OVMF_MH_STATUS_SUCCESS              Applied.
  @retval OVMF_MH_STATUS_BAD_RECORD           PageCount is 0.
  @retval OVMF_MH_STATUS_BAD_PAGE             The range leaves the window.
  @retval OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD  The range is not inside one block of this shard.
**/
STATIC
UINT32
InternalApplyZeroRange (
  IN     OVMF_MH_HELPER_CONTEXT       *Context,
  IN     CONST OVMF_MH_RECORD_HEADER  *Record,
  IN     CONST UINT8                  *Plain,
  IN OUT UINT64                       *Pages
  )
{
  OVMF_MH_ZERO_RANGE_PAYLOAD  Payload;
  UINT64                      Page;
  UINT8                       *Target;
  UINT32                      Status;

  CopyMem (&Payload, Plain, sizeof (Payload));
  if (Payload.PageCount == 0) {
    return OVMF_MH_STATUS_BAD_RECORD;
  }

  Status = InternalZeroRangePlace (
             Context,
             Record->GuestOffset,
             Payload.PageCount,
             &InternalSession (Context)->StreamHeader
             );
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  for (Page = 0; Page < Payload.PageCount; Page++) {
    Target = (UINT8 *)(Context->GuestWindow + Record->GuestOffset + Page * OVMF_MH_PAGE_SIZE);
    if (!InternalIsZero (Target, OVMF_MH_PAGE_SIZE)) {
      ZeroMem (Target, OVMF_MH_PAGE_SIZE);
    }
  }

  *Pages += Payload.PageCount;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  IMPORT_BEGIN: verify a stream header, check that it is meant for this
  helper (guest size, shard, challenge nonce) and open an import session.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      In offset, size, the shard index and the shard
                          count the host announces for this helper.
  @param[out]    Result   Guest size named by the header.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportBegin (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_STREAM_HEADER  *Header;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT32                 Status;
  BOOLEAN                Challenged;

  Session = InternalSession (Context);
  Status  = InternalCheckSessionStart (Context, Arg);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  //
  // A challenge is good for one IMPORT_BEGIN, whatever its outcome.
  //
  Challenged            = Session->ChallengeSet;
  Session->ChallengeSet = FALSE;
  Session->ImportDone   = FALSE;
  Session->ExportDone   = FALSE;
  Session->Committed    = FALSE;
  Session->State        = OVMF_MH_SESSION_FAILED;
  if (Arg[1] != sizeof (OVMF_MH_STREAM_HEADER)) {
    return OVMF_MH_STATUS_BAD_HEADER;
  }

  Header = &Session->StreamHeader;
  CopyMem (Header, (VOID *)(Context->Data + Arg[0]), sizeof (*Header));
  if ((Header->Magic != OVMF_MH_STREAM_MAGIC) ||
      (Header->Version != OVMF_MH_STREAM_VERSION) ||
      (Header->HeaderSize != sizeof (OVMF_MH_STREAM_HEADER)) ||
      ((Header->Flags & ~(UINT32)OVMF_MH_STREAM_FLAGS_KNOWN) != 0))
  {
    return OVMF_MH_STATUS_BAD_HEADER;
  }

  if (!InternalStartSession (Session, Header)) {
    return OVMF_MH_STATUS_BAD_HEADER;
  }

  InternalNonce (0, Nonce);
  if ((CompareMem (Header->SessionId, Session->SessionId, OVMF_MH_SESSION_ID_SIZE) != 0) ||
      !MigrationHelperOcbDecrypt (
         &Session->Key,
         Nonce,
         (CONST UINT8 *)Header,
         OFFSET_OF (OVMF_MH_STREAM_HEADER, Tag),
         NULL,
         0,
         Header->Tag,
         NULL
         ))
  {
    InternalEndSession (Session);
    return OVMF_MH_STATUS_BAD_HEADER;
  }

  //
  // The header is authentic; now whether it is meant for this helper, in
  // this session: its guest size, its shard, its target nonce.
  //
  Result[0] = Header->GuestSize;
  Status    = OVMF_MH_STATUS_SUCCESS;
  if (Header->GuestSize != Context->GuestWindowSize) {
    Status = OVMF_MH_STATUS_GUEST_SIZE_MISMATCH;
  } else if ((Header->ShardCount == 0) || (Header->ShardCount > OVMF_MH_MAX_SHARDS) ||
             (Header->ShardIndex >= Header->ShardCount) ||
             (Header->ShardIndex != Arg[2]) || (Header->ShardCount != Arg[3]))
  {
    Status = OVMF_MH_STATUS_WRONG_SHARD;
  } else if (Challenged && ((Header->Flags & OVMF_MH_STREAM_BOUND) == 0)) {
    Status = OVMF_MH_STATUS_UNBOUND_STREAM;
  } else if (((Header->Flags & OVMF_MH_STREAM_BOUND) != 0) &&
             (!Challenged || (CompareMem (Header->TargetNonce, Session->Challenge, OVMF_MH_CHALLENGE_SIZE) != 0)))
  {
    Status = OVMF_MH_STATUS_NONCE_MISMATCH;
  }

  if (Status != OVMF_MH_STATUS_SUCCESS) {
    InternalEndSession (Session);
    return Status;
  }

  Session->State = OVMF_MH_SESSION_IMPORTING;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Check a record header against the session, before its tag.

  @param[in] Context  The helper context.
  @param[in] Record   The record header (private copy).

  @return OVMF_MH_STATUS_SUCCESS or the failure status.
**/
STATIC
UINT32
InternalCheckRecordHeader (
  IN OVMF_MH_HELPER_CONTEXT       *Context,
  IN CONST OVMF_MH_RECORD_HEADER  *Record
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (Context);
  if (CompareMem (Record->SessionId, Session->SessionId, OVMF_MH_SESSION_ID_SIZE) != 0) {
    return OVMF_MH_STATUS_WRONG_SESSION;
  }

  if (Record->Sequence < Session->NextSequence) {
    return OVMF_MH_STATUS_SEQUENCE_REPLAY;
  }

  if (Record->Sequence > Session->NextSequence) {
    return OVMF_MH_STATUS_SEQUENCE_GAP;
  }

  if ((Record->Type != OVMF_MH_RECORD_END) && !InternalGuestPageOk (Context, Record->GuestOffset)) {
    return OVMF_MH_STATUS_BAD_PAGE;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  IMPORT_BATCH: verify records one by one and write their pages.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      In offset, size.
  @param[out]    Result   Records applied, pages written, failing sequence,
                          ZERO_RANGE records applied, pages they covered.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportBatch (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  UINT64                 Size;
  UINT64                 Position;
  UINT64                 Records;
  UINT64                 RecordSize;
  OVMF_MH_RECORD_HEADER  Record;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                  *Batch;
  UINT8                  *Tag;
  UINT32                 Status;

  Session = InternalSession (Context);
  if (Session->State != OVMF_MH_SESSION_IMPORTING) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  Size = Arg[1];
  if (!InternalDataSpanOk (Context, Arg[0], Size)) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Size > OVMF_MH_MAX_BATCH_PAGES * (UINT64)OVMF_MH_MAX_RECORD_SIZE) {
    return OVMF_MH_STATUS_BATCH_TOO_LARGE;
  }

  //
  // The batch stays in the shared area, which the host may change at any
  // time, so every byte that decides anything is read exactly once: the
  // record header and the tag are copied into private memory before they
  // are checked, and OCB decryption reads each ciphertext block once and
  // authenticates the plaintext it produced. Whatever the host does during
  // the call, a page reaches the guest only if what was read authenticates.
  //
  Batch = (UINT8 *)(Context->Data + Arg[0]);
  Tag   = Session->Scratch;
  Position = 0;
  Records  = 0;
  Status   = OVMF_MH_STATUS_SUCCESS;
  while (Position < Size) {
    Result[2] = Session->NextSequence;
    if ((Size - Position < sizeof (Record)) || (Records == OVMF_MH_MAX_BATCH_PAGES)) {
      Status = (Records == OVMF_MH_MAX_BATCH_PAGES) ? OVMF_MH_STATUS_BATCH_TOO_LARGE : OVMF_MH_STATUS_BAD_RECORD;
      break;
    }

    CopyMem (&Record, Batch + Position, sizeof (Record));
    Result[2] = Record.Sequence;
    if (!(((Record.Type == OVMF_MH_RECORD_PAGE) && (Record.PayloadSize == OVMF_MH_PAGE_SIZE)) ||
          ((Record.Type == OVMF_MH_RECORD_ZERO) && (Record.PayloadSize == 0)) ||
          ((Record.Type == OVMF_MH_RECORD_ZERO_RANGE) && (Record.PayloadSize == sizeof (OVMF_MH_ZERO_RANGE_PAYLOAD)))))
    {
      Status = OVMF_MH_STATUS_BAD_RECORD;
      break;
    }

    RecordSize = sizeof (Record) + (UINT64)Record.PayloadSize + OVMF_MH_TAG_SIZE;
    if (Size - Position < RecordSize) {
      Status = OVMF_MH_STATUS_BAD_RECORD;
      break;
    }

    Status = InternalCheckRecordHeader (Context, &Record);
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      break;
    }

    InternalNonce (Record.Sequence, Nonce);
    CopyMem (Tag, Batch + Position + sizeof (Record) + Record.PayloadSize, OVMF_MH_TAG_SIZE);
    if (!MigrationHelperOcbDecrypt (
           &Session->Key,
           Nonce,
           (CONST UINT8 *)&Record,
           sizeof (Record),
           Batch + Position + sizeof (Record),
           Record.PayloadSize,
           Tag,
           Session->PageBuffer
           ))
    {
      Status = OVMF_MH_STATUS_AUTH_FAILED;
      break;
    }

    if (Record.Type == OVMF_MH_RECORD_PAGE) {
      CopyMem ((VOID *)(Context->GuestWindow + Record.GuestOffset), Session->PageBuffer, OVMF_MH_PAGE_SIZE);
      Result[1]++;
    } else if (Record.Type == OVMF_MH_RECORD_ZERO_RANGE) {
      Status = InternalApplyZeroRange (Context, &Record, Session->PageBuffer, &Result[4]);
      if (Status != OVMF_MH_STATUS_SUCCESS) {
        break;
      }

      Result[3]++;
    } else if (!InternalIsZero ((CONST UINT8 *)(Context->GuestWindow + Record.GuestOffset), OVMF_MH_PAGE_SIZE)) {
      //
      // A page that is already zero is left alone, as for ZERO_RANGE: on a
      // fresh target most are, and writing zeros would make the host
      // allocate and dirty a page of a sparse RAM file for nothing.
      //
      ZeroMem ((VOID *)(Context->GuestWindow + Record.GuestOffset), OVMF_MH_PAGE_SIZE);
    }

    InternalChain (Session, Tag);
    Session->NextSequence++;
    Session->RecordCount++;
    Records++;
    Position += RecordSize;
  }

  //
  // The batch copy holds only ciphertext; the page buffer held plaintext.
  //
  MigrationHelperSecureZero (Session->PageBuffer, OVMF_MH_PAGE_SIZE);
  Result[0] = Records;
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    InternalEndSession (Session);
    Session->State = OVMF_MH_SESSION_FAILED;
    return Status;
  }

  Result[2] = 0;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  IMPORT_END: verify the end record: count and chain digest, then the shared
  pages the target host says it received for this shard (count and digest,
  Arg2 and Arg3) against those the source helper sealed.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      In offset, size, shared digest offset, shared page count.
  @param[out]    Result   Record count.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportEnd (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_RECORD_HEADER  Record;
  OVMF_MH_END_PAYLOAD    Payload;
  UINT8                  Nonce[OVMF_MH_NONCE_SIZE];
  UINT8                  SharedDigest[OVMF_MH_DIGEST_SIZE];
  UINT8                  *Copy;
  UINT32                 Status;

  Session = InternalSession (Context);
  if (Session->State != OVMF_MH_SESSION_IMPORTING) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  Status = InternalSharedPages (Context, Arg[2], Arg[3], SharedDigest);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  Status = OVMF_MH_STATUS_SUCCESS;
  Copy   = Session->Scratch;
  if (Arg[1] == 0) {
    Status = OVMF_MH_STATUS_TRUNCATED;
  } else if (Arg[1] != OVMF_MH_END_RECORD_SIZE) {
    Status = OVMF_MH_STATUS_BAD_RECORD;
  } else {
    CopyMem (Copy, (VOID *)(Context->Data + Arg[0]), OVMF_MH_END_RECORD_SIZE);
    CopyMem (&Record, Copy, sizeof (Record));
    if ((Record.Type != OVMF_MH_RECORD_END) || (Record.PayloadSize != sizeof (Payload))) {
      Status = OVMF_MH_STATUS_BAD_RECORD;
    } else {
      Status = InternalCheckRecordHeader (Context, &Record);
    }

    if (Status == OVMF_MH_STATUS_SUCCESS) {
      InternalNonce (Record.Sequence, Nonce);
      if (!MigrationHelperOcbDecrypt (
             &Session->Key,
             Nonce,
             Copy,
             sizeof (Record),
             Copy + sizeof (Record),
             sizeof (Payload),
             Copy + sizeof (Record) + sizeof (Payload),
             (UINT8 *)&Payload
             ))
      {
        Status = OVMF_MH_STATUS_AUTH_FAILED;
      } else if ((Payload.RecordCount != Session->RecordCount) ||
                 (CompareMem (Payload.ChainDigest, Session->Chain, OVMF_MH_DIGEST_SIZE) != 0))
      {
        Status = OVMF_MH_STATUS_TRUNCATED;
      } else if ((Payload.SharedPageCount != Arg[3]) ||
                 !InternalEqual (Payload.SharedDigest, SharedDigest, OVMF_MH_DIGEST_SIZE))
      {
        Status = OVMF_MH_STATUS_SHARED_PAGES_MISMATCH;
      }
    }
  }

  InternalEndSession (Session);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    Session->State = OVMF_MH_SESSION_FAILED;
    return Status;
  }

  Session->State      = OVMF_MH_SESSION_COMPLETE;
  Session->ImportDone = TRUE;
  Result[0]           = Session->RecordCount;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  MAC a receipt: HMAC-SHA256 under the receipt key, which HKDF derives from
  the transport key with the receipt's migration id as salt.

  @param[in]  Session  The session (holds the transport key).
  @param[in]  Receipt  The receipt; its bytes before Mac are authenticated.
  @param[out] Mac      Receives OVMF_MH_DIGEST_SIZE bytes.

  @retval TRUE   Mac written.
  @retval FALSE  Derivation failed (cannot happen with valid sizes).
**/
STATIC
BOOLEAN
InternalReceiptMac (
  IN  OVMF_MH_SESSION        *Session,
  IN  CONST OVMF_MH_RECEIPT  *Receipt,
  OUT UINT8                  *Mac
  )
{
  UINT8    Key[OVMF_MH_KEY_SIZE];
  BOOLEAN  Ok;

  Ok = MigrationHelperHkdfSha256 (
         Receipt->MigrationId,
         OVMF_MH_MIGRATION_ID_SIZE,
         Session->TransportKey,
         OVMF_MH_KEY_SIZE,
         (CONST UINT8 *)RECEIPT_INFO,
         RECEIPT_INFO_SIZE,
         Key,
         sizeof (Key)
         );
  Ok = (BOOLEAN)(Ok && MigrationHelperHmacSha256 (Key, sizeof (Key), (CONST UINT8 *)Receipt, RECEIPT_MAC_SIZE, Mac));
  MigrationHelperSecureZero (Key, sizeof (Key));
  return Ok;
}

/**
  IMPORT_CHALLENGE: draw a fresh nonce that the next IMPORT_BEGIN demands in
  a bound stream header.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Out offset, capacity.
  @param[out]    Result   Bytes written (OVMF_MH_CHALLENGE_SIZE).

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportChallenge (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION  *Session;
  UINT32           Status;

  Session = InternalSession (Context);
  Status  = InternalCheckSessionStart (Context, Arg);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  if (Arg[1] < OVMF_MH_CHALLENGE_SIZE) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  if (!InternalRandom (Session->Challenge, OVMF_MH_CHALLENGE_SIZE)) {
    Session->ChallengeSet = FALSE;
    return OVMF_MH_STATUS_NO_ENTROPY;
  }

  Session->ChallengeSet = TRUE;
  Session->ImportDone   = FALSE;
  Session->ExportDone   = FALSE;
  Session->Committed    = FALSE;
  CopyMem ((VOID *)(Context->Data + Arg[0]), Session->Challenge, OVMF_MH_CHALLENGE_SIZE);
  Result[0] = OVMF_MH_CHALLENGE_SIZE;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Fill in and MAC this helper's receipt of its completed import.

  @param[in]  Session  A session whose import completed.
  @param[out] Receipt  The receipt.

  @retval TRUE   Written.
  @retval FALSE  Key derivation failed (cannot happen with valid sizes).
**/
STATIC
BOOLEAN
InternalMakeReceipt (
  IN  OVMF_MH_SESSION  *Session,
  OUT OVMF_MH_RECEIPT  *Receipt
  )
{
  ZeroMem (Receipt, sizeof (*Receipt));
  CopyMem (Receipt->MigrationId, Session->StreamHeader.MigrationId, OVMF_MH_MIGRATION_ID_SIZE);
  Receipt->ShardIndex  = Session->StreamHeader.ShardIndex;
  Receipt->ShardCount  = Session->StreamHeader.ShardCount;
  Receipt->Flags       = Session->StreamHeader.Flags;
  Receipt->RecordCount = Session->RecordCount;
  CopyMem (Receipt->ChainDigest, Session->Chain, OVMF_MH_DIGEST_SIZE);
  return InternalReceiptMac (Session, Receipt, Receipt->Mac);
}

/**
  IMPORT_RECEIPT: write the receipt of the import this session completed.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Out offset, capacity.
  @param[out]    Result   Bytes written (sizeof (OVMF_MH_RECEIPT)).

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportReceipt (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION  *Session;
  OVMF_MH_RECEIPT  Receipt;

  Session = InternalSession (Context);
  if ((Session->State != OVMF_MH_SESSION_COMPLETE) || !Session->ImportDone) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] < sizeof (OVMF_MH_RECEIPT)) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  if (!InternalMakeReceipt (Session, &Receipt)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  CopyMem ((VOID *)(Context->Data + Arg[0]), &Receipt, sizeof (Receipt));
  Result[0] = sizeof (Receipt);
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Check a private copy of ShardCount receipts, receipt i for shard i: index
  and count, migration id, flags and reserved field, MAC, and for this
  session's own shard that the receipt is exactly Own.

  @param[in] Session   The session (holds the transport key and the header).
  @param[in] Receipts  ShardCount receipts in private memory.
  @param[in] Own       The receipt of this session's own shard.

  @retval OVMF_MH_STATUS_SUCCESS          Every receipt checked.
  @retval OVMF_MH_STATUS_WRONG_SHARD      A receipt at the wrong index or of another count.
  @retval OVMF_MH_STATUS_WRONG_MIGRATION  A receipt of another migration or binding.
  @retval OVMF_MH_STATUS_BAD_RECEIPT      A MAC fails, or the own shard's receipt differs from Own.
**/
STATIC
UINT32
InternalCheckReceipts (
  IN OVMF_MH_SESSION        *Session,
  IN CONST UINT8            *Receipts,
  IN CONST OVMF_MH_RECEIPT  *Own
  )
{
  OVMF_MH_STREAM_HEADER  *Header;
  OVMF_MH_RECEIPT        Receipt;
  UINT8                  Mac[OVMF_MH_DIGEST_SIZE];
  UINT32                 Index;
  UINT32                 Status;

  Header = &Session->StreamHeader;
  Status = OVMF_MH_STATUS_SUCCESS;
  for (Index = 0; (Index < Header->ShardCount) && (Status == OVMF_MH_STATUS_SUCCESS); Index++) {
    CopyMem (&Receipt, Receipts + Index * sizeof (OVMF_MH_RECEIPT), sizeof (Receipt));
    if ((Receipt.ShardIndex != Index) || (Receipt.ShardCount != Header->ShardCount)) {
      Status = OVMF_MH_STATUS_WRONG_SHARD;
    } else if ((CompareMem (Receipt.MigrationId, Header->MigrationId, OVMF_MH_MIGRATION_ID_SIZE) != 0) ||
               (Receipt.Flags != Header->Flags) || (Receipt.Reserved != 0))
    {
      Status = OVMF_MH_STATUS_WRONG_MIGRATION;
    } else if (!InternalReceiptMac (Session, &Receipt, Mac) ||
               !InternalEqual (Mac, Receipt.Mac, OVMF_MH_DIGEST_SIZE) ||
               ((Index == Header->ShardIndex) && !InternalEqual ((CONST UINT8 *)&Receipt, (CONST UINT8 *)Own, sizeof (*Own))))
    {
      Status = OVMF_MH_STATUS_BAD_RECEIPT;
    }
  }

  MigrationHelperSecureZero (Mac, sizeof (Mac));
  return Status;
}

/**
  The digest a commit proof carries of the receipts a commit accepted:
  SHA-256 (OVMF_MH_COMMIT_RECEIPTS_LABEL || the receipts, in shard order).

  @param[in]  Receipts  Count receipts.
  @param[in]  Count     Number of receipts.
  @param[out] Digest    Receives OVMF_MH_DIGEST_SIZE bytes.
**/
STATIC
VOID
InternalReceiptsDigest (
  IN  CONST UINT8  *Receipts,
  IN  UINT32       Count,
  OUT UINT8        *Digest
  )
{
  OVMF_MH_SHA256_CONTEXT  Hash;

  MigrationHelperSha256Init (&Hash);
  MigrationHelperSha256Update (&Hash, (CONST UINT8 *)RECEIPTS_LABEL, RECEIPTS_LABEL_SIZE);
  MigrationHelperSha256Update (&Hash, Receipts, (UINTN)Count * sizeof (OVMF_MH_RECEIPT));
  MigrationHelperSha256Final (&Hash, Digest);
}

/**
  MAC a commit proof: HMAC-SHA256 under the commit key, which HKDF derives
  from the transport key with the proof's migration id as salt and its own
  label, so that neither a receipt's MAC nor a stream key can stand for it.

  @param[in]  Session  The session (holds the transport key).
  @param[in]  Proof    The proof; its bytes before Mac are authenticated.
  @param[out] Mac      Receives OVMF_MH_DIGEST_SIZE bytes.

  @retval TRUE   Mac written.
  @retval FALSE  Derivation failed (cannot happen with valid sizes).
**/
STATIC
BOOLEAN
InternalCommitProofMac (
  IN  OVMF_MH_SESSION             *Session,
  IN  CONST OVMF_MH_COMMIT_PROOF  *Proof,
  OUT UINT8                       *Mac
  )
{
  UINT8    Key[OVMF_MH_KEY_SIZE];
  BOOLEAN  Ok;

  Ok = MigrationHelperHkdfSha256 (
         Proof->MigrationId,
         OVMF_MH_MIGRATION_ID_SIZE,
         Session->TransportKey,
         OVMF_MH_KEY_SIZE,
         (CONST UINT8 *)PROOF_INFO,
         PROOF_INFO_SIZE,
         Key,
         sizeof (Key)
         );
  Ok = (BOOLEAN)(Ok && MigrationHelperHmacSha256 (Key, sizeof (Key), (CONST UINT8 *)Proof, PROOF_MAC_SIZE, Mac));
  MigrationHelperSecureZero (Key, sizeof (Key));
  return Ok;
}

/**
  IMPORT_COMMIT: check that every shard of this helper's migration was
  imported completely, exactly once, by a helper holding the transport key:
  one valid receipt per shard index 0..ShardCount-1, in order, all for this
  session's migration id, shard count and binding, this helper's own among
  them unchanged. A failure fails the session; success remembers the
  receipts' digest for IMPORT_COMMIT_PROOF.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      In offset, size (ShardCount receipts).
  @param[out]    Result   Shards committed.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportCommit (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_STREAM_HEADER  *Header;
  OVMF_MH_RECEIPT        Own;
  UINT32                 Status;

  Session = InternalSession (Context);
  Header  = &Session->StreamHeader;
  if ((Session->State != OVMF_MH_SESSION_COMPLETE) || !Session->ImportDone) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] != (UINT64)Header->ShardCount * sizeof (OVMF_MH_RECEIPT)) {
    return OVMF_MH_STATUS_INVALID_PARAMETER;
  }

  if (!InternalMakeReceipt (Session, &Own)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  CopyMem (Session->Input, (VOID *)(Context->Data + Arg[0]), (UINTN)Arg[1]);
  Status = InternalCheckReceipts (Session, Session->Input, &Own);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    Session->ImportDone = FALSE;
    Session->Committed  = FALSE;
    Session->State      = OVMF_MH_SESSION_FAILED;
    return Status;
  }

  InternalReceiptsDigest (Session->Input, Header->ShardCount, Session->ReceiptsDigest);
  Session->Committed = TRUE;
  Result[0]          = Header->ShardCount;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  IMPORT_COMMIT_PROOF: write the commit proof of the IMPORT_COMMIT this
  session passed, for the source helpers to check before their host commits.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      Out offset, capacity.
  @param[out]    Result   Bytes written (sizeof (OVMF_MH_COMMIT_PROOF)).

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalImportCommitProof (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION       *Session;
  OVMF_MH_COMMIT_PROOF  Proof;

  Session = InternalSession (Context);
  if ((Session->State != OVMF_MH_SESSION_COMPLETE) || !Session->ImportDone || !Session->Committed) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] < sizeof (OVMF_MH_COMMIT_PROOF)) {
    return OVMF_MH_STATUS_BUFFER_TOO_SMALL;
  }

  ZeroMem (&Proof, sizeof (Proof));
  CopyMem (Proof.MigrationId, Session->StreamHeader.MigrationId, OVMF_MH_MIGRATION_ID_SIZE);
  Proof.ShardCount = Session->StreamHeader.ShardCount;
  Proof.Flags      = Session->StreamHeader.Flags;
  Proof.Outcome    = OVMF_MH_COMMIT_OUTCOME_COMMITTED;
  CopyMem (Proof.ReceiptsDigest, Session->ReceiptsDigest, OVMF_MH_DIGEST_SIZE);
  if (!InternalCommitProofMac (Session, &Proof, Proof.Mac)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  CopyMem ((VOID *)(Context->Data + Arg[0]), &Proof, sizeof (Proof));
  Result[0] = sizeof (Proof);
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  EXPORT_VERIFY_COMMIT: check that the target helpers committed the stream
  this session exported: a commit proof for this stream's migration id,
  shard count and flags, MACed under the commit key, whose receipt digest
  covers the ShardCount receipts that follow it; every receipt valid for
  its shard, and this shard's receipt exactly the one a target helper gives
  after importing this export to its end record. A refusal changes nothing.

  @param[in,out] Context  The helper context.
  @param[in]     Arg      In offset, size (the proof, then ShardCount receipts).
  @param[out]    Result   Shards the proof covers.

  @return OVMF_MH_STATUS_* value.
**/
UINT32
InternalExportVerifyCommit (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION        *Session;
  OVMF_MH_STREAM_HEADER  *Header;
  OVMF_MH_COMMIT_PROOF   Proof;
  OVMF_MH_RECEIPT        Own;
  UINT8                  Expected[OVMF_MH_DIGEST_SIZE];
  UINT8                  *Receipts;
  UINT32                 Status;

  Session = InternalSession (Context);
  Header  = &Session->StreamHeader;
  if ((Session->State != OVMF_MH_SESSION_COMPLETE) || !Session->ExportDone) {
    return OVMF_MH_STATUS_BAD_STATE;
  }

  if (!InternalDataSpanOk (Context, Arg[0], Arg[1])) {
    return OVMF_MH_STATUS_OUT_OF_BOUNDS;
  }

  if (Arg[1] != sizeof (OVMF_MH_COMMIT_PROOF) + (UINT64)Header->ShardCount * sizeof (OVMF_MH_RECEIPT)) {
    return OVMF_MH_STATUS_INVALID_PARAMETER;
  }

  //
  // One copy of the whole input: the proof, then the receipts it names.
  //
  CopyMem (Session->Input, (VOID *)(Context->Data + Arg[0]), (UINTN)Arg[1]);
  CopyMem (&Proof, Session->Input, sizeof (Proof));
  Receipts = Session->Input + sizeof (Proof);
  if ((CompareMem (Proof.MigrationId, Header->MigrationId, OVMF_MH_MIGRATION_ID_SIZE) != 0) ||
      (Proof.ShardCount != Header->ShardCount) || (Proof.Flags != Header->Flags) || (Proof.Reserved != 0))
  {
    return OVMF_MH_STATUS_WRONG_MIGRATION;
  }

  if (!InternalCommitProofMac (Session, &Proof, Expected)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  Status = OVMF_MH_STATUS_SUCCESS;
  if (!InternalEqual (Expected, Proof.Mac, OVMF_MH_DIGEST_SIZE) || (Proof.Outcome != OVMF_MH_COMMIT_OUTCOME_COMMITTED)) {
    Status = OVMF_MH_STATUS_BAD_COMMIT_PROOF;
  } else {
    InternalReceiptsDigest (Receipts, Header->ShardCount, Expected);
    if (!InternalEqual (Expected, Proof.ReceiptsDigest, OVMF_MH_DIGEST_SIZE)) {
      Status = OVMF_MH_STATUS_BAD_COMMIT_PROOF;
    }
  }

  MigrationHelperSecureZero (Expected, sizeof (Expected));
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  //
  // The receipt a target helper gives after importing this export to its
  // end record has the export session's own fields: the header's binding,
  // the record count and the chain digest D(N).
  //
  if (!InternalMakeReceipt (Session, &Own)) {
    return OVMF_MH_STATUS_UNEXPECTED;
  }

  Status = InternalCheckReceipts (Session, Receipts, &Own);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  Result[0] = Header->ShardCount;
  return OVMF_MH_STATUS_SUCCESS;
}
