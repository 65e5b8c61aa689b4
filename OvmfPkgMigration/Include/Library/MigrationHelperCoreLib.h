/** @file
  Portable core of the migration helper: validation of the fw_cfg request and
  the mailbox dispatcher. Uses Base types only, so the same sources build into
  the SEC firmware and into a host library for tests, fuzzing and benchmarks.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef MIGRATION_HELPER_CORE_LIB_H_
#define MIGRATION_HELPER_CORE_LIB_H_

#include <MigrationHelper/HelperAbi.h>

///
/// One range of RAM of the helper VM, as the platform reports it.
///
typedef struct {
  UINT64    Base;
  UINT64    Size;
} OVMF_MH_MEMORY_RANGE;

///
/// Session state and buffers; defined privately by the core, which lays it
/// out in the private memory the platform lends it.
///
typedef struct OVMF_MH_SESSION OVMF_MH_SESSION;

///
/// Private memory the core needs for its session state and batch buffers.
///
#define OVMF_MH_CORE_PRIVATE_SIZE  0x00700000

///
/// Everything the dispatcher needs. The platform fills the pointers and
/// calls MigrationHelperInitialize(); the core owns the rest. Lives in
/// helper-private memory, never in the shared area.
///
typedef struct {
  volatile OVMF_MH_MAILBOX_HEADER    *Header;          ///< Shared, hostile
  volatile UINT8                     *Data;            ///< Shared data area
  UINT64                             DataSize;
  volatile UINT8                     *GuestWindow;     ///< Guest RAM as the helper sees it
  UINT64                             GuestWindowSize;
  UINT8                              BuildId[16];
  UINT32                             LastSeq;          ///< CommandSeq of the last command served
  BOOLEAN                            ShutdownRequested;
  VOID                               *Private;         ///< OVMF_MH_CORE_PRIVATE_SIZE bytes, helper-only
  UINTN                              PrivateSize;
} OVMF_MH_HELPER_CONTEXT;

/**
  Check a fw_cfg request blob against the ABI and the helper VM's memory.

  @param[in]  Blob           The blob as read from fw_cfg.
  @param[in]  BlobSize       Its size in bytes, as fw_cfg reported it.
  @param[in]  RamRanges      RAM ranges of the helper VM.
  @param[in]  RamRangeCount  Number of entries in RamRanges.
  @param[out] Request        Receives a copy of the blob when its size is right.
  @param[out] MailboxUsable  TRUE when the mailbox fields passed validation, so
                             that a failure can be reported in the mailbox.

  @retval OVMF_MH_STATUS_SUCCESS  The request is valid.
  @return Another OVMF_MH_STATUS_* value naming the first check that failed.
**/
UINT32
EFIAPI
MigrationHelperValidateRequest (
  IN  CONST VOID                  *Blob,
  IN  UINTN                       BlobSize,
  IN  CONST OVMF_MH_MEMORY_RANGE  *RamRanges,
  IN  UINTN                       RamRangeCount,
  OUT OVMF_MH_REQUEST             *Request,
  OUT BOOLEAN                     *MailboxUsable
  );

/**
  Return a short ASCII name for a status code.

  @param[in] Status  An OVMF_MH_STATUS_* value.

  @return A NUL-terminated name; "UNKNOWN" for values the ABI does not define.
**/
CONST CHAR8 *
EFIAPI
MigrationHelperStatusName (
  IN UINT32  Status
  );

/**
  Lay out the session state in Context->Private and pick the crypto path.
  Call once, after SSE is enabled, before MigrationHelperPublishReady().

  @param[in,out] Context  Context whose Private and PrivateSize are set.

  @retval TRUE   Ready to serve.
  @retval FALSE  Private is NULL or smaller than OVMF_MH_CORE_PRIVATE_SIZE.
**/
BOOLEAN
EFIAPI
MigrationHelperInitialize (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  );

/**
  Take the transport key from the launch-secret page (OVMF_MH_SECRET) and
  wipe the whole page, whether or not it held a valid secret.

  @param[in,out] Context     An initialized context.
  @param[in,out] SecretPage  The launch-secret page.
  @param[in]     PageSize    Bytes to wipe (normally OVMF_MH_PAGE_SIZE).

  @retval TRUE   A valid key was loaded.
  @retval FALSE  The page held no valid secret; the helper has no key.
**/
BOOLEAN
EFIAPI
MigrationHelperLoadSecret (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN OUT volatile UINT8          *SecretPage,
  IN     UINTN                   PageSize
  );

/**
  Wipe every key the helper holds (transport and session keys).

  @param[in,out] Context  An initialized context.
**/
VOID
EFIAPI
MigrationHelperWipeKeys (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  );

/**
  Prepare the context and publish the header with State READY.

  @param[in,out] Context  Context whose Header, Data, DataSize, GuestWindow,
                          GuestWindowSize and BuildId the caller has set.
**/
VOID
EFIAPI
MigrationHelperPublishReady (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context
  );

/**
  Publish a halted header: the helper refused its request or failed.

  @param[in] Header      The mailbox header.
  @param[in] BuildId     The helper build id (16 bytes).
  @param[in] State       OVMF_MH_STATE_HALTED or OVMF_MH_STATE_FAULT.
  @param[in] Reason      Status code or exception vector.
  @param[in] Address     Faulting RIP, or 0.
**/
VOID
EFIAPI
MigrationHelperPublishHalt (
  IN volatile OVMF_MH_MAILBOX_HEADER  *Header,
  IN CONST UINT8                      *BuildId,
  IN UINT32                           State,
  IN UINT32                           Reason,
  IN UINT64                           Address
  );

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
  );

#endif
