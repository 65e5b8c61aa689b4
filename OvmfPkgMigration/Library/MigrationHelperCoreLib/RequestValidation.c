/** @file
  Validation of the fw_cfg request. Everything in the request comes from the
  untrusted host: every field is checked before the helper touches memory it
  names, and all arithmetic is checked for overflow.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

/**
  Tell whether [Base, Base + Size) lies inside one RAM range and ends at or
  below a limit.

  @param[in] Base           First byte.
  @param[in] Size           Length; zero never qualifies.
  @param[in] Limit          The span must end at or below this address.
  @param[in] RamRanges      RAM ranges.
  @param[in] RamRangeCount  Number of ranges.

  @retval TRUE   The whole span is RAM.
  @retval FALSE  It is not, it is empty, it passes Limit or it wraps around.
**/
STATIC
BOOLEAN
InternalSpanIsRam (
  IN UINT64                      Base,
  IN UINT64                      Size,
  IN UINT64                      Limit,
  IN CONST OVMF_MH_MEMORY_RANGE  *RamRanges,
  IN UINTN                       RamRangeCount
  )
{
  UINTN   Index;
  UINT64  End;
  UINT64  RangeEnd;

  if ((Size == 0) || (Base > MAX_UINT64 - Size)) {
    return FALSE;
  }

  End = Base + Size;
  if (End > Limit) {
    return FALSE;
  }

  for (Index = 0; Index < RamRangeCount; Index++) {
    if (RamRanges[Index].Base > MAX_UINT64 - RamRanges[Index].Size) {
      continue;
    }

    RangeEnd = RamRanges[Index].Base + RamRanges[Index].Size;
    if ((Base >= RamRanges[Index].Base) && (End <= RangeEnd)) {
      return TRUE;
    }
  }

  return FALSE;
}

/**
  Tell whether two non-wrapping spans share a byte.

  @param[in] BaseA  First span's start.
  @param[in] SizeA  First span's length.
  @param[in] BaseB  Second span's start.
  @param[in] SizeB  Second span's length.

  @retval TRUE   They overlap.
  @retval FALSE  They do not.
**/
STATIC
BOOLEAN
InternalSpansOverlap (
  IN UINT64  BaseA,
  IN UINT64  SizeA,
  IN UINT64  BaseB,
  IN UINT64  SizeB
  )
{
  return (BOOLEAN)((BaseA < BaseB + SizeB) && (BaseB < BaseA + SizeA));
}

/**
  Tell whether a span is page aligned and not empty.

  @param[in] Base  First byte.
  @param[in] Size  Length.

  @retval TRUE   Both are multiples of the page size and Size is not 0.
  @retval FALSE  Otherwise.
**/
STATIC
BOOLEAN
InternalSpanIsAligned (
  IN UINT64  Base,
  IN UINT64  Size
  )
{
  return (BOOLEAN)((((Base | Size) & (OVMF_MH_PAGE_SIZE - 1)) == 0) && (Size != 0));
}

/**
  Check the window ranges of a request whose mailbox and work area passed.

  @param[in] Request        The request.
  @param[in] RamRanges      RAM ranges of the helper VM.
  @param[in] RamRangeCount  Number of entries in RamRanges.

  @retval OVMF_MH_STATUS_SUCCESS  Every range is valid.
  @return Another OVMF_MH_STATUS_* value naming the first check that failed.
**/
STATIC
UINT32
InternalValidateWindow (
  IN CONST OVMF_MH_REQUEST       *Request,
  IN CONST OVMF_MH_MEMORY_RANGE  *RamRanges,
  IN UINTN                       RamRangeCount
  )
{
  UINTN   Index;
  UINTN   Earlier;
  UINT64  Base;
  UINT64  Size;
  UINT64  Total;

  Total = 0;
  for (Index = 0; Index < Request->WindowRangeCount; Index++) {
    Base = Request->WindowBase[Index];
    Size = Request->WindowSize[Index];
    if (!InternalSpanIsAligned (Base, Size)) {
      return OVMF_MH_STATUS_WINDOW_ALIGNMENT;
    }

    if (!InternalSpanIsRam (Base, Size, MAX_UINT64, RamRanges, RamRangeCount)) {
      return OVMF_MH_STATUS_WINDOW_NOT_RAM;
    }

    //
    // Every span compared here is known not to wrap, so the tests are exact.
    //
    if ((Base < OVMF_MH_MAILBOX_MIN_BASE) ||
        InternalSpansOverlap (Base, Size, Request->MailboxBase, Request->MailboxSize) ||
        InternalSpansOverlap (Base, Size, Request->WorkAreaBase, Request->WorkAreaSize) ||
        InternalSpansOverlap (Base, Size, OVMF_MH_ADDRESS_LIMIT, BASE_4GB - OVMF_MH_ADDRESS_LIMIT))
    {
      return OVMF_MH_STATUS_WINDOW_OVERLAP;
    }

    for (Earlier = 0; Earlier < Index; Earlier++) {
      if (InternalSpansOverlap (Base, Size, Request->WindowBase[Earlier], Request->WindowSize[Earlier])) {
        return OVMF_MH_STATUS_WINDOW_OVERLAP;
      }
    }

    if (Size > OVMF_MH_MAX_WINDOW_SIZE - Total) {
      return OVMF_MH_STATUS_WINDOW_TOO_LARGE;
    }

    Total += Size;
  }

  if (Request->WorkAreaSize < MigrationHelperWorkAreaSize (Total)) {
    return OVMF_MH_STATUS_WORK_AREA_TOO_SMALL;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Check a fw_cfg request blob against the ABI and the helper VM's memory.

  @param[in]  Blob           The blob as read from fw_cfg.
  @param[in]  BlobSize       Its size in bytes, as fw_cfg reported it.
  @param[in]  RamRanges      RAM ranges of the helper VM.
  @param[in]  RamRangeCount  Number of entries in RamRanges.
  @param[out] Request        Receives a copy of the blob (zero-padded) when
                             the blob is no larger than the request.
  @param[out] MailboxUsable  TRUE when the mailbox fields passed validation.

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
  )
{
  UINTN  Index;

  *MailboxUsable = FALSE;

  //
  // Signature and version are read from any blob that holds them, so that
  // a request of another version is named as such (a version 1 request is
  // 48 bytes long).
  //
  if ((Blob == NULL) || (BlobSize < OFFSET_OF (OVMF_MH_REQUEST, Size)) || (BlobSize > sizeof (OVMF_MH_REQUEST))) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  ZeroMem (Request, sizeof (OVMF_MH_REQUEST));
  CopyMem (Request, Blob, BlobSize);

  if (Request->Signature != OVMF_MH_REQUEST_SIGNATURE) {
    return OVMF_MH_STATUS_REQUEST_SIGNATURE;
  }

  if (Request->Version != OVMF_MH_REQUEST_VERSION) {
    return OVMF_MH_STATUS_REQUEST_VERSION;
  }

  if ((BlobSize != sizeof (OVMF_MH_REQUEST)) || (Request->Size != sizeof (OVMF_MH_REQUEST))) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  if ((Request->Flags & ~(UINT32)OVMF_MH_REQUEST_FLAGS_KNOWN) != 0) {
    return OVMF_MH_STATUS_REQUEST_FLAGS;
  }

  if (Request->WindowRangeCount > OVMF_MH_MAX_WINDOW_RANGES) {
    return OVMF_MH_STATUS_WINDOW_RANGES;
  }

  for (Index = Request->WindowRangeCount; Index < OVMF_MH_MAX_WINDOW_RANGES; Index++) {
    if ((Request->WindowBase[Index] != 0) || (Request->WindowSize[Index] != 0)) {
      return OVMF_MH_STATUS_WINDOW_RANGES;
    }
  }

  //
  // The helper's own memory (launch-secret page, private RAM) must exist
  // before anything else can be trusted to land where the helper expects.
  //
  if (!InternalSpanIsRam (
         OVMF_MH_SECRET_PAGE_BASE,
         OVMF_MH_MAILBOX_MIN_BASE - OVMF_MH_SECRET_PAGE_BASE,
         OVMF_MH_ADDRESS_LIMIT,
         RamRanges,
         RamRangeCount
         ))
  {
    return OVMF_MH_STATUS_HELPER_RAM;
  }

  if (((Request->MailboxBase & (OVMF_MH_PAGE_SIZE - 1)) != 0) ||
      ((Request->MailboxSize & (OVMF_MH_PAGE_SIZE - 1)) != 0))
  {
    return OVMF_MH_STATUS_MAILBOX_ALIGNMENT;
  }

  if ((Request->MailboxSize < OVMF_MH_MAILBOX_MIN_SIZE) ||
      (Request->MailboxSize > OVMF_MH_MAILBOX_MAX_SIZE))
  {
    return OVMF_MH_STATUS_MAILBOX_SIZE;
  }

  if (Request->MailboxBase < OVMF_MH_MAILBOX_MIN_BASE) {
    return OVMF_MH_STATUS_MAILBOX_RESERVED;
  }

  if (!InternalSpanIsRam (Request->MailboxBase, Request->MailboxSize, OVMF_MH_ADDRESS_LIMIT, RamRanges, RamRangeCount)) {
    return OVMF_MH_STATUS_MAILBOX_NOT_RAM;
  }

  *MailboxUsable = TRUE;

  //
  // The mailbox is known not to wrap; a work area that is aligned and not
  // empty may still wrap, which the overlap test below tolerates (it then
  // fails the RAM test next).
  //
  if (!InternalSpanIsAligned (Request->WorkAreaBase, Request->WorkAreaSize) ||
      (Request->WorkAreaBase < OVMF_MH_MAILBOX_MIN_BASE) ||
      ((Request->WorkAreaBase <= MAX_UINT64 - Request->WorkAreaSize) &&
       InternalSpansOverlap (Request->WorkAreaBase, Request->WorkAreaSize, Request->MailboxBase, Request->MailboxSize)))
  {
    return OVMF_MH_STATUS_WORK_AREA_INVALID;
  }

  if (!InternalSpanIsRam (Request->WorkAreaBase, Request->WorkAreaSize, OVMF_MH_ADDRESS_LIMIT, RamRanges, RamRangeCount)) {
    return OVMF_MH_STATUS_WORK_AREA_NOT_RAM;
  }

  return InternalValidateWindow (Request, RamRanges, RamRangeCount);
}

/**
  Bytes of private memory the core needs for a guest window.

  @param[in] GuestWindowSize  Bytes of the guest window.

  @return The size, or 0 when the window is larger than OVMF_MH_MAX_WINDOW_SIZE.
**/
UINT64
EFIAPI
MigrationHelperWorkAreaSize (
  IN UINT64  GuestWindowSize
  )
{
  if (GuestWindowSize > OVMF_MH_MAX_WINDOW_SIZE) {
    return 0;
  }

  return OVMF_MH_WORK_AREA_BASE_SIZE + (GuestWindowSize / OVMF_MH_PAGE_SIZE) * OVMF_MH_WORK_AREA_PAGE_BYTES;
}

/**
  Total size of a validated request's guest window.

  @param[in] Request  A request MigrationHelperValidateRequest() accepted.

  @return The sum of its window ranges' sizes.
**/
UINT64
EFIAPI
MigrationHelperWindowSize (
  IN CONST OVMF_MH_REQUEST  *Request
  )
{
  UINTN   Index;
  UINT64  Total;

  Total = 0;
  for (Index = 0; (Index < Request->WindowRangeCount) && (Index < OVMF_MH_MAX_WINDOW_RANGES); Index++) {
    Total += Request->WindowSize[Index];
  }

  return Total;
}

/**
  Return a short ASCII name for a status code.

  @param[in] Status  An OVMF_MH_STATUS_* value.

  @return A NUL-terminated name; "UNKNOWN" for values the ABI does not define.
**/
CONST CHAR8 *
EFIAPI
MigrationHelperStatusName (
  IN UINT32  Status
  )
{
  switch (Status) {
    case OVMF_MH_STATUS_SUCCESS:               return "SUCCESS";
    case OVMF_MH_STATUS_UNSUPPORTED:           return "UNSUPPORTED";
    case OVMF_MH_STATUS_INVALID_PARAMETER:     return "INVALID_PARAMETER";
    case OVMF_MH_STATUS_BAD_STATE:             return "BAD_STATE";
    case OVMF_MH_STATUS_REQUEST_SIZE:          return "REQUEST_SIZE";
    case OVMF_MH_STATUS_REQUEST_SIGNATURE:     return "REQUEST_SIGNATURE";
    case OVMF_MH_STATUS_REQUEST_VERSION:       return "REQUEST_VERSION";
    case OVMF_MH_STATUS_REQUEST_FLAGS:         return "REQUEST_FLAGS";
    case OVMF_MH_STATUS_MAILBOX_ALIGNMENT:     return "MAILBOX_ALIGNMENT";
    case OVMF_MH_STATUS_MAILBOX_SIZE:          return "MAILBOX_SIZE";
    case OVMF_MH_STATUS_MAILBOX_RESERVED:      return "MAILBOX_RESERVED";
    case OVMF_MH_STATUS_MAILBOX_NOT_RAM:       return "MAILBOX_NOT_RAM";
    case OVMF_MH_STATUS_WINDOW_ALIGNMENT:      return "WINDOW_ALIGNMENT";
    case OVMF_MH_STATUS_WINDOW_OVERLAP:        return "WINDOW_OVERLAP";
    case OVMF_MH_STATUS_WINDOW_NOT_RAM:        return "WINDOW_NOT_RAM";
    case OVMF_MH_STATUS_NO_FW_CFG_MEMORY_MAP:  return "NO_FW_CFG_MEMORY_MAP";
    case OVMF_MH_STATUS_HELPER_RAM:            return "HELPER_RAM";
    case OVMF_MH_STATUS_SEV_UNSUPPORTED:       return "SEV_UNSUPPORTED";
    case OVMF_MH_STATUS_WINDOW_RANGES:         return "WINDOW_RANGES";
    case OVMF_MH_STATUS_WORK_AREA_INVALID:     return "WORK_AREA_INVALID";
    case OVMF_MH_STATUS_WORK_AREA_NOT_RAM:     return "WORK_AREA_NOT_RAM";
    case OVMF_MH_STATUS_WINDOW_TOO_LARGE:      return "WINDOW_TOO_LARGE";
    case OVMF_MH_STATUS_WORK_AREA_TOO_SMALL:   return "WORK_AREA_TOO_SMALL";
    case OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE: return "PAGE_TABLES_TOO_LARGE";
    case OVMF_MH_STATUS_MAPPING_UNSUPPORTED:   return "MAPPING_UNSUPPORTED";
    case OVMF_MH_STATUS_UNEXPECTED:            return "UNEXPECTED";
    default:                                   return "UNKNOWN";
  }
}
