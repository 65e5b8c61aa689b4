/** @file
  The mailbox dispatcher: publishes the header and serves one command at a
  time. The host writes Command and Arg[] and then CommandSeq; the helper
  snapshots them, writes Status and Result[] and then ResponseSeq. The
  header lives in host-controlled memory, so every value is read once into
  private memory before it is used.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

/**
  Clear the header and fill in the fields that identify this helper. The
  caller sets State last.

  @param[in] Header   The mailbox header.
  @param[in] BuildId  16-byte build id.
**/
STATIC
VOID
InternalWriteIdentity (
  IN volatile OVMF_MH_MAILBOX_HEADER  *Header,
  IN CONST UINT8                      *BuildId
  )
{
  UINTN  Index;

  //
  // ZeroMem on volatile memory would let the compiler assume too much; the
  // header is small and written once.
  //
  for (Index = 0; Index < sizeof (OVMF_MH_MAILBOX_HEADER); Index++) {
    ((volatile UINT8 *)Header)[Index] = 0;
  }

  Header->AbiMajor     = OVMF_MH_ABI_MAJOR;
  Header->AbiMinor     = OVMF_MH_ABI_MINOR;
  Header->HeaderSize   = OVMF_MH_MAILBOX_HEADER_SIZE;
  Header->Capabilities = OVMF_MH_BASE_CAPABILITIES;
  for (Index = 0; Index < sizeof (Header->BuildId); Index++) {
    Header->BuildId[Index] = BuildId[Index];
  }

  MemoryFence ();
  Header->Signature = OVMF_MH_MAILBOX_SIGNATURE;
}

/**
  Capabilities of this helper as configured.

  @param[in] Context  An initialized context.

  @return OVMF_MH_CAP_* bits.
**/
STATIC
UINT64
InternalCapabilities (
  IN OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  OVMF_MH_SESSION  *Session;
  UINT64           Capabilities;

  Session      = InternalSession (Context);
  Capabilities = OVMF_MH_BASE_CAPABILITIES | Context->PlatformCapabilities;
  if (Session->AllowAesNi) {
    Capabilities |= OVMF_MH_CAP_AES_NI;
  }

  if (Session->AllowVaes) {
    Capabilities |= OVMF_MH_CAP_VAES;
  }

  if (Session->KeyLoaded) {
    Capabilities |= OVMF_MH_CAP_KEY_LOADED;
  }

  return Capabilities;
}

/**
  Lay out the session state and the page tracking table in Context->Private
  and pick the crypto path.

  @param[in,out] Context  Context whose Private, PrivateSize and
                          GuestWindowSize are set.

  @retval TRUE   Ready to serve.
  @retval FALSE  Private is NULL or smaller than
                 MigrationHelperWorkAreaSize (Context->GuestWindowSize).
**/
BOOLEAN
EFIAPI
MigrationHelperInitialize (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  OVMF_MH_SESSION  *Session;
  UINT64           Required;

  Required = MigrationHelperWorkAreaSize (Context->GuestWindowSize);
  if ((Context->Private == NULL) || (Required == 0) || (Context->PrivateSize < Required)) {
    return FALSE;
  }

  Session = InternalSession (Context);
  ZeroMem (Session, sizeof (*Session));
  Session->PageHash         = (UINT64 *)((UINT8 *)Context->Private + OVMF_MH_WORK_AREA_BASE_SIZE);
  Session->TrackedPageCount = Context->GuestWindowSize / OVMF_MH_PAGE_SIZE;
  Session->State            = OVMF_MH_SESSION_IDLE;
  Session->AllowAesNi = MigrationHelperCpuHasAesNi ();
  Session->AllowVaes  = (BOOLEAN)(Session->AllowAesNi && !Context->NoVectorCrypto && MigrationHelperCpuHasVaes ());
  return TRUE;
}

/**
  Take the transport key from the launch-secret page and wipe the page.

  @param[in,out] Context     An initialized context.
  @param[in,out] SecretPage  The launch-secret page.
  @param[in]     PageSize    Bytes to wipe.

  @retval TRUE   A valid key was loaded.
  @retval FALSE  The page held no valid secret.
**/
BOOLEAN
EFIAPI
MigrationHelperLoadSecret (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN OUT volatile UINT8          *SecretPage,
  IN     UINTN                   PageSize
  )
{
  OVMF_MH_SESSION  *Session;
  OVMF_MH_SECRET   Secret;
  BOOLEAN          Valid;
  UINTN            Index;

  Session = InternalSession (Context);
  Valid   = FALSE;
  if (PageSize >= sizeof (Secret)) {
    for (Index = 0; Index < sizeof (Secret); Index++) {
      ((UINT8 *)&Secret)[Index] = SecretPage[Index];
    }

    Valid = (BOOLEAN)((Secret.Signature == OVMF_MH_SECRET_SIGNATURE) &&
                      (Secret.Version == OVMF_MH_SECRET_VERSION) &&
                      (Secret.KeySize == OVMF_MH_KEY_SIZE));
    if (Valid) {
      CopyMem (Session->TransportKey, Secret.Key, OVMF_MH_KEY_SIZE);
    }

    MigrationHelperSecureZero (&Secret, sizeof (Secret));
  }

  for (Index = 0; Index < PageSize; Index++) {
    SecretPage[Index] = 0;
  }

  MemoryFence ();
  Session->KeyLoaded = Valid;
  return Valid;
}

/**
  Wipe every key the helper holds.

  @param[in,out] Context  An initialized context.
**/
VOID
EFIAPI
MigrationHelperWipeKeys (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (Context);
  InternalEndSession (Session);
  MigrationHelperSecureZero (Session->TransportKey, OVMF_MH_KEY_SIZE);
  Session->KeyLoaded = FALSE;
  InternalMhWipeVectorRegisters ();
}

/**
  Prepare the context and publish the header with State READY.

  @param[in,out] Context  Context whose Header, Data, DataSize, GuestWindow,
                          GuestWindowSize and BuildId the caller has set.
**/
VOID
EFIAPI
MigrationHelperPublishReady (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;

  Header = Context->Header;
  InternalWriteIdentity (Header, Context->BuildId);
  Header->Capabilities    = InternalCapabilities (Context);
  Header->DataOffset      = OVMF_MH_MAILBOX_HEADER_SIZE;
  Header->DataSize        = Context->DataSize;
  Header->GuestWindowSize = Context->GuestWindowSize;
  Header->MaxBatchPages   = OVMF_MH_MAX_BATCH_PAGES;
  Header->SessionState    = InternalSession (Context)->State;

  Context->LastSeq           = 0;
  Context->ShutdownRequested = FALSE;

  MemoryFence ();
  Header->State = OVMF_MH_STATE_READY;
}

/**
  Publish a halted header: the helper refused its request or failed.

  @param[in] Header   The mailbox header.
  @param[in] BuildId  The helper build id (16 bytes).
  @param[in] State    OVMF_MH_STATE_HALTED or OVMF_MH_STATE_FAULT.
  @param[in] Reason   Status code or exception vector.
  @param[in] Address  Faulting RIP, or 0.
**/
VOID
EFIAPI
MigrationHelperPublishHalt (
  IN volatile OVMF_MH_MAILBOX_HEADER  *Header,
  IN CONST UINT8                      *BuildId,
  IN UINT32                           State,
  IN UINT32                           Reason,
  IN UINT64                           Address
  )
{
  if (Header->Signature != OVMF_MH_MAILBOX_SIGNATURE) {
    InternalWriteIdentity (Header, BuildId);
  }

  Header->HaltReason   = Reason;
  Header->FaultAddress = Address;
  MemoryFence ();
  Header->State = State;
}

/**
  Execute one command.

  @param[in,out] Context  The helper context.
  @param[in]     Command  OVMF_MH_CMD_* value, as snapshotted.
  @param[in]     Arg      Snapshotted arguments.
  @param[out]    Result   Results to publish; zeroed by the caller.

  @return OVMF_MH_STATUS_* value for the response.
**/
STATIC
UINT32
InternalDispatch (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     UINT32                  Command,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  )
{
  OVMF_MH_SESSION  *Session;

  Session = InternalSession (Context);
  if ((Session->State == OVMF_MH_SESSION_FAILED) &&
      (Command != OVMF_MH_CMD_NOP) && (Command != OVMF_MH_CMD_QUERY) &&
      (Command != OVMF_MH_CMD_RESET) && (Command != OVMF_MH_CMD_SHUTDOWN))
  {
    return OVMF_MH_STATUS_SESSION_FAILED;
  }

  switch (Command) {
    case OVMF_MH_CMD_NOP:
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_QUERY:
      Result[0] = ((UINT64)OVMF_MH_ABI_MAJOR << 16) | OVMF_MH_ABI_MINOR;
      Result[1] = InternalCapabilities (Context);
      Result[2] = Context->GuestWindowSize;
      Result[3] = Context->DataSize;
      Result[4] = Session->State;
      Result[5] = OVMF_MH_MAX_BATCH_PAGES;
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_SHUTDOWN:
      MigrationHelperWipeKeys (Context);
      Context->ShutdownRequested = TRUE;
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_RESET:
      InternalEndSession (Session);
      Session->State        = OVMF_MH_SESSION_IDLE;
      Session->ChallengeSet = FALSE;
      Session->ImportDone   = FALSE;
      Session->ExportDone   = FALSE;
      Session->Committed    = FALSE;
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_EXPORT_BEGIN:
      return InternalExportBegin (Context, Arg, Result);

    case OVMF_MH_CMD_EXPORT_BATCH:
      return InternalExportBatch (Context, Arg, Result);

    case OVMF_MH_CMD_EXPORT_END:
      return InternalExportEnd (Context, Arg, Result);

    case OVMF_MH_CMD_IMPORT_BEGIN:
      return InternalImportBegin (Context, Arg, Result);

    case OVMF_MH_CMD_IMPORT_BATCH:
      return InternalImportBatch (Context, Arg, Result);

    case OVMF_MH_CMD_IMPORT_END:
      return InternalImportEnd (Context, Arg, Result);

    case OVMF_MH_CMD_CHECK_PAGES:
      return InternalCheckPages (Context, Arg, Result);
    case OVMF_MH_CMD_IMPORT_CHALLENGE:
      return InternalImportChallenge (Context, Arg, Result);
    case OVMF_MH_CMD_IMPORT_RECEIPT:
      return InternalImportReceipt (Context, Arg, Result);
    case OVMF_MH_CMD_IMPORT_COMMIT:
      return InternalImportCommit (Context, Arg, Result);
    case OVMF_MH_CMD_EXPORT_ZERO_RANGES:
      return InternalExportZeroRanges (Context, Arg, Result);
    case OVMF_MH_CMD_IMPORT_COMMIT_PROOF:
      return InternalImportCommitProof (Context, Arg, Result);
    case OVMF_MH_CMD_EXPORT_VERIFY_COMMIT:
      return InternalExportVerifyCommit (Context, Arg, Result);

    default:
      return OVMF_MH_STATUS_UNSUPPORTED;
  }
}

/**
  Serve the posted command, if any.

  @param[in,out] Context  The helper context.

  @retval TRUE   A command was served and its response published.
  @retval FALSE  No new command was posted.
**/
BOOLEAN
EFIAPI
MigrationHelperServeOne (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  )
{
  volatile OVMF_MH_MAILBOX_HEADER  *Header;
  UINT32                           Seq;
  UINT32                           Command;
  UINT64                           Arg[OVMF_MH_ARG_COUNT];
  UINT64                           Result[OVMF_MH_RESULT_COUNT];
  UINT32                           Status;
  UINTN                            Index;

  Header = Context->Header;
  Seq    = Header->CommandSeq;
  if (Seq == Context->LastSeq) {
    return FALSE;
  }

  //
  // x86 keeps loads in order; the fence keeps the compiler from hoisting the
  // snapshot above the CommandSeq read.
  //
  MemoryFence ();
  Command = Header->Command;
  for (Index = 0; Index < OVMF_MH_ARG_COUNT; Index++) {
    Arg[Index] = Header->Arg[Index];
  }

  for (Index = 0; Index < OVMF_MH_RESULT_COUNT; Index++) {
    Result[Index] = 0;
  }

  Status = InternalDispatch (Context, Command, Arg, Result);

  if (Status == OVMF_MH_STATUS_SUCCESS) {
    Header->CommandsServed = Header->CommandsServed + 1;
  } else {
    Header->CommandsFailed = Header->CommandsFailed + 1;
  }

  for (Index = 0; Index < OVMF_MH_RESULT_COUNT; Index++) {
    Header->Result[Index] = Result[Index];
  }

  Header->Status       = Status;
  Header->SessionState = InternalSession (Context)->State;
  if (Context->ShutdownRequested) {
    Header->State = OVMF_MH_STATE_SHUTDOWN;
  }

  //
  // Nothing the command computed stays in a register the host can read
  // while the helper waits for the next one.
  //
  InternalMhWipeVectorRegisters ();
  MemoryFence ();
  Header->ResponseSeq = Seq;
  Context->LastSeq    = Seq;
  return TRUE;
}
