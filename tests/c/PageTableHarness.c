/** @file
  Plain (System V ABI) entry points into the page-table builder and the
  request's address-space layout, for Python ctypes. Host only: never part
  of the firmware. tests/test_page_tables.py walks what these build with
  an independent walker (tests/page_walker.py).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

#define MH_EXPORT  __attribute__ ((visibility ("default")))

/**
  Count the tables a mapping list needs.

  @param[in]  Mappings             MappingCount OVMF_MH_MAPPING entries.
  @param[in]  MappingCount         Number of entries.
  @param[in]  EncryptionMask       C-bit mask or 0.
  @param[in]  PhysicalAddressBits  MAXPHYADDR.
  @param[in]  Allow1GPages         Non-zero when 1 GiB pages may be used.
  @param[out] TablePages           Receives the count.

  @return An OVMF_MH_STATUS_* value.
**/
MH_EXPORT UINT32
mh_page_table_pages (
  CONST OVMF_MH_MAPPING  *Mappings,
  UINTN                  MappingCount,
  UINT64                 EncryptionMask,
  UINT32                 PhysicalAddressBits,
  int                    Allow1GPages,
  UINTN                  *TablePages
  )
{
  OVMF_MH_PAGING  Paging;

  Paging.EncryptionMask      = EncryptionMask;
  Paging.PhysicalAddressBits = (UINT8)PhysicalAddressBits;
  Paging.Allow1GPages        = (BOOLEAN)(Allow1GPages != 0);
  return MigrationHelperPageTablePages (&Paging, Mappings, MappingCount, MAX_UINTN, TablePages);
}

/**
  Build tables for a mapping list into a caller buffer.

  @return An OVMF_MH_STATUS_* value.
**/
MH_EXPORT UINT32
mh_build_page_tables (
  CONST OVMF_MH_MAPPING  *Mappings,
  UINTN                  MappingCount,
  UINT64                 EncryptionMask,
  UINT32                 PhysicalAddressBits,
  int                    Allow1GPages,
  VOID                   *Tables,
  UINT64                 TablesPhysical,
  UINTN                  TablesSize,
  UINT64                 *Cr3,
  UINTN                  *TablePages
  )
{
  OVMF_MH_PAGING  Paging;

  Paging.EncryptionMask      = EncryptionMask;
  Paging.PhysicalAddressBits = (UINT8)PhysicalAddressBits;
  Paging.Allow1GPages        = (BOOLEAN)(Allow1GPages != 0);
  return MigrationHelperBuildPageTables (
           &Paging,
           Mappings,
           MappingCount,
           Tables,
           TablesPhysical,
           TablesSize,
           Cr3,
           TablePages
           );
}

/**
  The helper's mapping list for a validated request.

  @param[in]  Request        An accepted OVMF_MH_REQUEST.
  @param[out] Mappings       Room for OVMF_MH_MAX_MAPPINGS entries.
  @param[out] WindowVirtual  Receives the window's virtual base.

  @return The number of entries.
**/
MH_EXPORT UINTN
mh_helper_mappings (
  CONST OVMF_MH_REQUEST  *Request,
  OVMF_MH_MAPPING        *Mappings,
  UINT64                 *WindowVirtual
  )
{
  UINTN  Count;

  MigrationHelperHelperMappings (Request, Mappings, &Count, WindowVirtual);
  return Count;
}

/**
  Validate a request blob against RAM ranges.

  @return An OVMF_MH_STATUS_* value; *Usable receives MailboxUsable.
**/
MH_EXPORT UINT32
mh_validate_request (
  CONST VOID                  *Blob,
  UINTN                       BlobSize,
  CONST OVMF_MH_MEMORY_RANGE  *Ranges,
  UINTN                       RangeCount,
  OVMF_MH_REQUEST             *Request,
  int                         *Usable
  )
{
  BOOLEAN  MailboxUsable;
  UINT32   Status;

  Status  = MigrationHelperValidateRequest (Blob, BlobSize, Ranges, RangeCount, Request, &MailboxUsable);
  *Usable = MailboxUsable ? 1 : 0;
  return Status;
}

/**
  The work area a window needs.
**/
MH_EXPORT UINT64
mh_work_area_size (
  UINT64  WindowSize
  )
{
  return MigrationHelperWorkAreaSize (WindowSize);
}

/**
  Layout facts the Python side checks against the C compiler's view.
**/
MH_EXPORT UINTN
mh_mapping_struct_size (
  void
  )
{
  return sizeof (OVMF_MH_MAPPING);
}

MH_EXPORT UINT64
mh_window_virtual_base (
  void
  )
{
  return OVMF_MH_WINDOW_VIRTUAL_BASE;
}
