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
  Header->Capabilities = OVMF_MH_CAPABILITIES;
  for (Index = 0; Index < sizeof (Header->BuildId); Index++) {
    Header->BuildId[Index] = BuildId[Index];
  }

  MemoryFence ();
  Header->Signature = OVMF_MH_MAILBOX_SIGNATURE;
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
  Header->DataOffset      = OVMF_MH_MAILBOX_HEADER_SIZE;
  Header->DataSize        = Context->DataSize;
  Header->GuestWindowSize = Context->GuestWindowSize;

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
  switch (Command) {
    case OVMF_MH_CMD_NOP:
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_QUERY:
      Result[0] = ((UINT64)OVMF_MH_ABI_MAJOR << 16) | OVMF_MH_ABI_MINOR;
      Result[1] = OVMF_MH_CAPABILITIES;
      Result[2] = Context->GuestWindowSize;
      Result[3] = Context->DataSize;
      return OVMF_MH_STATUS_SUCCESS;

    case OVMF_MH_CMD_SHUTDOWN:
      Context->ShutdownRequested = TRUE;
      return OVMF_MH_STATUS_SUCCESS;

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

  Header->Status = Status;
  if (Context->ShutdownRequested) {
    Header->State = OVMF_MH_STATE_SHUTDOWN;
  }

  MemoryFence ();
  Header->ResponseSeq = Seq;
  Context->LastSeq    = Seq;
  return TRUE;
}
