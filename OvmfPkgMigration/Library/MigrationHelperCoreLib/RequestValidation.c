/** @file
  Validation of the fw_cfg request. Everything in the request comes from the
  untrusted host: every field is checked before the helper touches memory it
  names, and all arithmetic is checked for overflow.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

/**
  Tell whether [Base, Base + Size) lies inside one RAM range and below the
  address limit of the helper's identity map.

  @param[in] Base           First byte.
  @param[in] Size           Length; zero never qualifies.
  @param[in] RamRanges      RAM ranges.
  @param[in] RamRangeCount  Number of ranges.

  @retval TRUE   The whole span is RAM.
  @retval FALSE  It is not, it is empty, or it wraps around.
**/
STATIC
BOOLEAN
InternalSpanIsRam (
  IN UINT64                      Base,
  IN UINT64                      Size,
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
  if (End > OVMF_MH_ADDRESS_LIMIT) {
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
  Check a fw_cfg request blob against the ABI and the helper VM's memory.

  @param[in]  Blob           The blob as read from fw_cfg.
  @param[in]  BlobSize       Its size in bytes, as fw_cfg reported it.
  @param[in]  RamRanges      RAM ranges of the helper VM.
  @param[in]  RamRangeCount  Number of entries in RamRanges.
  @param[out] Request        Receives a copy of the blob when its size is right.
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
  *MailboxUsable = FALSE;

  if ((Blob == NULL) || (BlobSize != sizeof (OVMF_MH_REQUEST))) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  CopyMem (Request, Blob, sizeof (OVMF_MH_REQUEST));

  if (Request->Signature != OVMF_MH_REQUEST_SIGNATURE) {
    return OVMF_MH_STATUS_REQUEST_SIGNATURE;
  }

  if (Request->Version != OVMF_MH_REQUEST_VERSION) {
    return OVMF_MH_STATUS_REQUEST_VERSION;
  }

  if (Request->Size != sizeof (OVMF_MH_REQUEST)) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  if ((Request->Flags != 0) || (Request->Reserved != 0)) {
    return OVMF_MH_STATUS_REQUEST_FLAGS;
  }

  //
  // The helper's own memory (launch-secret page, private RAM) must exist
  // before anything else can be trusted to land where the helper expects.
  //
  if (!InternalSpanIsRam (
         OVMF_MH_SECRET_PAGE_BASE,
         OVMF_MH_MAILBOX_MIN_BASE - OVMF_MH_SECRET_PAGE_BASE,
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

  if (!InternalSpanIsRam (Request->MailboxBase, Request->MailboxSize, RamRanges, RamRangeCount)) {
    return OVMF_MH_STATUS_MAILBOX_NOT_RAM;
  }

  *MailboxUsable = TRUE;

  if ((Request->GuestWindowBase == 0) && (Request->GuestWindowSize == 0)) {
    return OVMF_MH_STATUS_SUCCESS;
  }

  if (((Request->GuestWindowBase & (OVMF_MH_PAGE_SIZE - 1)) != 0) ||
      ((Request->GuestWindowSize & (OVMF_MH_PAGE_SIZE - 1)) != 0) ||
      (Request->GuestWindowSize == 0))
  {
    return OVMF_MH_STATUS_WINDOW_ALIGNMENT;
  }

  if (!InternalSpanIsRam (Request->GuestWindowBase, Request->GuestWindowSize, RamRanges, RamRangeCount)) {
    return OVMF_MH_STATUS_WINDOW_NOT_RAM;
  }

  //
  // Both spans are now known not to wrap, so the overlap test is exact.
  //
  if ((Request->GuestWindowBase < OVMF_MH_MAILBOX_MIN_BASE) ||
      InternalSpansOverlap (
        Request->GuestWindowBase,
        Request->GuestWindowSize,
        Request->MailboxBase,
        Request->MailboxSize
        ))
  {
    return OVMF_MH_STATUS_WINDOW_OVERLAP;
  }

  return OVMF_MH_STATUS_SUCCESS;
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
    case OVMF_MH_STATUS_UNEXPECTED:            return "UNEXPECTED";
    default:                                   return "UNKNOWN";
  }
}
