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
/// What the core serves in every helper, whatever the platform adds (the
/// SEC helper: HALT_WAKE). Named once: the mailbox header publishes it and
/// the SEC module's image info, which `ovmf-mh inspect` reads, declares it.
///
#define OVMF_MH_BASE_CAPABILITIES \
  (OVMF_MH_CAP_QUERY | OVMF_MH_CAP_SHUTDOWN | OVMF_MH_CAP_EXPORT | OVMF_MH_CAP_IMPORT | OVMF_MH_CAP_CHECK_PAGES | \
   OVMF_MH_CAP_BINDING | OVMF_MH_CAP_ZERO_RANGES | OVMF_MH_CAP_COMMIT_PROOF)

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
/// Private memory the host-built harnesses lend the core: enough for the
/// session state and the page tracking of a window of up to 3 GiB. The
/// firmware lends it the request's work area instead, sized by
/// MigrationHelperWorkAreaSize().
///
#define OVMF_MH_CORE_PRIVATE_SIZE  0x00700000

///
/// Where the guest window appears in the helper's own page tables: guest
/// offset X is at virtual address OVMF_MH_WINDOW_VIRTUAL_BASE + (the first
/// window range's base modulo 1 GiB) + X, one contiguous span whatever the
/// physical ranges behind it. It lies above any identity-mapped address the
/// helper uses (those are all below 4 GiB).
///
#define OVMF_MH_WINDOW_VIRTUAL_BASE  0x0000010000000000ULL
///
/// Identity-mapped firmware memory besides the mailbox and the work area:
/// the helper's own RAM from here to OVMF_MH_MAILBOX_MIN_BASE (SEC's page
/// tables, temporary RAM and stack, the launch-secret page, the
/// helper-private RAM) and OVMF_MH_ADDRESS_LIMIT .. 4 GiB (the flash SEC
/// runs from, with its GDT and exception stubs).
///
#define OVMF_MH_FIRMWARE_RAM_BASE    0x00800000ULL
///
/// Entries of the mapping list MigrationHelperHelperMappings() produces.
///
#define OVMF_MH_MAX_MAPPINGS         (4 + OVMF_MH_MAX_WINDOW_RANGES)

///
/// Mapping attribute: the memory is private to the helper (its own RAM,
/// the guest window). When the paging configuration has an encryption mask
/// (SEV's C-bit), private mappings carry it; shared ones (the mailbox) never.
///
#define OVMF_MH_MAP_PRIVATE  0x1
#define OVMF_MH_MAP_KNOWN    0x1

///
/// One span to map: VirtualBase..VirtualBase+Size-1 to PhysicalBase..
///
typedef struct {
  UINT64    VirtualBase;
  UINT64    PhysicalBase;
  UINT64    Size;
  UINT32    Attributes;     ///< OVMF_MH_MAP_* bits
} OVMF_MH_MAPPING;

///
/// What the CPU offers for the helper's page tables.
///
typedef struct {
  UINT64     EncryptionMask;       ///< SEV C-bit (1 << CPUID 0x8000001F EBX[5:0]); 0 without SEV
  UINT8      PhysicalAddressBits;  ///< MAXPHYADDR, CPUID 0x80000008 EAX[7:0] (already reduced under SEV)
  BOOLEAN    Allow1GPages;         ///< CPUID 0x80000001 EDX[26]
} OVMF_MH_PAGING;

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
  VOID                               *Private;         ///< MigrationHelperWorkAreaSize (GuestWindowSize) bytes or more, helper-only
  UINTN                              PrivateSize;
  UINT64                             PlatformCapabilities; ///< OVMF_MH_CAP_* the platform adds (HALT_WAKE); 0 on the host
  BOOLEAN                            NoVectorCrypto;   ///< Request flag OVMF_MH_REQUEST_NO_VECTOR_CRYPTO: never use the VAES path
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
  Bytes of private memory the core needs for a guest window: the session
  state and one page-tracking entry per window page (the work area's
  minimum size, docs/fw-cfg-request.md).

  @param[in] GuestWindowSize  Bytes of the guest window.

  @return The size, or 0 when the window is larger than OVMF_MH_MAX_WINDOW_SIZE.
**/
UINT64
EFIAPI
MigrationHelperWorkAreaSize (
  IN UINT64  GuestWindowSize
  );

/**
  Total size of a validated request's guest window.

  @param[in] Request  A request MigrationHelperValidateRequest() accepted.

  @return The sum of its window ranges' sizes.
**/
UINT64
EFIAPI
MigrationHelperWindowSize (
  IN CONST OVMF_MH_REQUEST  *Request
  );

/**
  The helper's address space for a validated request: the firmware memory
  and the work area (private) and the mailbox (shared), identity mapped,
  then the guest window ranges, private, one after the other from the
  window's virtual base. Sorted by virtual address, none overlapping.

  @param[in]  Request        A request MigrationHelperValidateRequest() accepted.
  @param[out] Mappings       Receives up to OVMF_MH_MAX_MAPPINGS entries.
  @param[out] MappingCount   Receives the number of entries.
  @param[out] WindowVirtual  Receives the virtual address of guest offset 0.
**/
VOID
EFIAPI
MigrationHelperHelperMappings (
  IN  CONST OVMF_MH_REQUEST  *Request,
  OUT OVMF_MH_MAPPING        *Mappings,
  OUT UINTN                  *MappingCount,
  OUT UINT64                 *WindowVirtual
  );

/**
  Count the 4 KiB tables MigrationHelperBuildPageTables() needs for a list
  of mappings, without writing anything.

  @param[in]  Paging        What the CPU offers.
  @param[in]  Mappings      Spans to map, sorted by virtual address, disjoint.
  @param[in]  MappingCount  Number of entries.
  @param[in]  Limit         Stop counting once more than this many are needed
                            (bounds the time a hostile layout costs).
  @param[out] TablePages    Receives the number of tables (the PML4 included),
                            or a number above Limit when more are needed.

  @retval OVMF_MH_STATUS_SUCCESS              Counted.
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED  A span is misaligned, empty,
                                              wraps, overlaps or precedes the
                                              previous one, leaves the lower
                                              canonical half, lies beyond
                                              PhysicalAddressBits or reaches
                                              the C-bit, or Paging is invalid.
**/
UINT32
EFIAPI
MigrationHelperPageTablePages (
  IN  CONST OVMF_MH_PAGING   *Paging,
  IN  CONST OVMF_MH_MAPPING  *Mappings,
  IN  UINTN                  MappingCount,
  IN  UINTN                  Limit,
  OUT UINTN                  *TablePages
  );

/**
  Build 4-level page tables for a list of mappings, with the largest pages
  (1 GiB where Paging allows it, 2 MiB, 4 KiB) whose alignment both the
  virtual and the physical address allow. Private mappings, and every
  table entry that points to a table (the tables are helper-private),
  carry Paging->EncryptionMask; shared mappings never do.

  @param[in]  Paging          What the CPU offers.
  @param[in]  Mappings        Spans to map, sorted by virtual address, disjoint.
  @param[in]  MappingCount    Number of entries.
  @param[out] Tables          Writable buffer for the tables, 4 KiB aligned.
  @param[in]  TablesPhysical  Physical address of Tables (what entries name).
  @param[in]  TablesSize      Bytes of the buffer.
  @param[out] Cr3             Receives the value to load into CR3.
  @param[out] TablePages      Receives the number of tables written.

  @retval OVMF_MH_STATUS_SUCCESS                The tables are built.
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED    As MigrationHelperPageTablePages(),
                                                or a misaligned buffer.
  @retval OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE  The buffer cannot hold the
                                                tables; nothing was written.
**/
UINT32
EFIAPI
MigrationHelperBuildPageTables (
  IN  CONST OVMF_MH_PAGING   *Paging,
  IN  CONST OVMF_MH_MAPPING  *Mappings,
  IN  UINTN                  MappingCount,
  OUT VOID                   *Tables,
  IN  UINT64                 TablesPhysical,
  IN  UINTN                  TablesSize,
  OUT UINT64                 *Cr3,
  OUT UINTN                  *TablePages
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
