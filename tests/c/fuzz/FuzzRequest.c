/** @file
  libFuzzer harness: fw_cfg request validation (MigrationHelperValidateRequest)
  against an e820 table.

  Input: byte 0 chooses the blob size (below 0xF0: 176 bytes, the right
  size, and byte 1 nudges four address fields; otherwise byte 1 is the
  size, so that short blobs, version 1 requests among them, are tried),
  then the blob, then e820 entries of 20
  bytes (base, length, type) as QEMU's etc/e820 file holds them. The RAM
  ranges are taken from the table as the SEC platform code does
  (HelperPlatform.c: type 1 entries, whole entries, at most 32); that step
  is mirrored here because it reads fw_cfg directly.

  The blob, the range array and both outputs sit against PROT_NONE guard
  pages, so a read past the blob's reported size or past the last range
  faults. The invariant: the status equals the one an independent model of
  docs/fw-cfg-request.md ("Validation", checked in order) gives, and
  MailboxUsable is TRUE exactly when the mailbox checks passed; a SUCCESS
  therefore names only memory the rules allow.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "FuzzCommon.h"

#define MAX_RAM_RANGES  32
#define E820_ENTRY      20
#define E820_RAM        1

STATIC UINT8                 *mBlobPages;
STATIC OVMF_MH_MEMORY_RANGE  *mRangePages;
STATIC OVMF_MH_REQUEST       *mRequest;
STATIC BOOLEAN               *mUsable;

/**
  The model: [Base, Base + Size) is non-empty, does not wrap, ends at or
  below Limit and lies inside one RAM range.
**/
STATIC
BOOLEAN
ModelIsRam (
  IN UINT64                      Base,
  IN UINT64                      Size,
  IN UINT64                      Limit,
  IN CONST OVMF_MH_MEMORY_RANGE  *Ranges,
  IN UINTN                       Count
  )
{
  UINTN  Index;

  if ((Size == 0) || (Base + Size < Base) || (Base + Size > Limit)) {
    return FALSE;
  }

  for (Index = 0; Index < Count; Index++) {
    if ((Ranges[Index].Base + Ranges[Index].Size >= Ranges[Index].Base) &&
        (Base >= Ranges[Index].Base) && (Base + Size <= Ranges[Index].Base + Ranges[Index].Size))
    {
      return TRUE;
    }
  }

  return FALSE;
}

/**
  The model: two spans (neither wraps) share a byte.
**/
STATIC
BOOLEAN
ModelOverlap (
  IN UINT64  BaseA,
  IN UINT64  SizeA,
  IN UINT64  BaseB,
  IN UINT64  SizeB
  )
{
  return (BaseA < BaseB + SizeB) && (BaseB < BaseA + SizeA);
}

/**
  The model of the documented checks, in the documented order.
**/
STATIC
UINT32
ModelStatus (
  IN  CONST UINT8                 *Blob,
  IN  UINTN                       BlobSize,
  IN  CONST OVMF_MH_MEMORY_RANGE  *Ranges,
  IN  UINTN                       Count,
  OUT BOOLEAN                     *Usable
  )
{
  OVMF_MH_REQUEST  R;
  UINTN            Index;
  UINTN            Earlier;
  UINT64           Total;
  UINT64           Base;
  UINT64           Size;

  *Usable = FALSE;
  if ((BlobSize < 6) || (BlobSize > 176)) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  memset (&R, 0, sizeof (R));
  memcpy (&R, Blob, BlobSize);
  if (R.Signature != 0x52484d4f) {
    return OVMF_MH_STATUS_REQUEST_SIGNATURE;
  }

  if (R.Version != 2) {
    return OVMF_MH_STATUS_REQUEST_VERSION;
  }

  if ((BlobSize != 176) || (R.Size != 176)) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  if ((R.Flags & ~(UINT32)OVMF_MH_REQUEST_NO_VECTOR_CRYPTO) != 0) {
    return OVMF_MH_STATUS_REQUEST_FLAGS;
  }

  if (R.WindowRangeCount > 8) {
    return OVMF_MH_STATUS_WINDOW_RANGES;
  }

  for (Index = R.WindowRangeCount; Index < 8; Index++) {
    if ((R.WindowBase[Index] | R.WindowSize[Index]) != 0) {
      return OVMF_MH_STATUS_WINDOW_RANGES;
    }
  }

  if (!ModelIsRam (0xF00000, 0x1800000 - 0xF00000, 0xFF000000, Ranges, Count)) {
    return OVMF_MH_STATUS_HELPER_RAM;
  }

  if ((R.MailboxBase % 4096 != 0) || (R.MailboxSize % 4096 != 0)) {
    return OVMF_MH_STATUS_MAILBOX_ALIGNMENT;
  }

  if ((R.MailboxSize < 8 * 1024) || (R.MailboxSize > 64 * 1024 * 1024)) {
    return OVMF_MH_STATUS_MAILBOX_SIZE;
  }

  if (R.MailboxBase < 0x1800000) {
    return OVMF_MH_STATUS_MAILBOX_RESERVED;
  }

  if (!ModelIsRam (R.MailboxBase, R.MailboxSize, 0xFF000000, Ranges, Count)) {
    return OVMF_MH_STATUS_MAILBOX_NOT_RAM;
  }

  *Usable = TRUE;
  if ((R.WorkAreaBase % 4096 != 0) || (R.WorkAreaSize % 4096 != 0) || (R.WorkAreaSize == 0) ||
      (R.WorkAreaBase < 0x1800000) ||
      ((R.WorkAreaBase + R.WorkAreaSize >= R.WorkAreaBase) &&
       ModelOverlap (R.WorkAreaBase, R.WorkAreaSize, R.MailboxBase, R.MailboxSize)))
  {
    return OVMF_MH_STATUS_WORK_AREA_INVALID;
  }

  if (!ModelIsRam (R.WorkAreaBase, R.WorkAreaSize, 0xFF000000, Ranges, Count)) {
    return OVMF_MH_STATUS_WORK_AREA_NOT_RAM;
  }

  Total = 0;
  for (Index = 0; Index < R.WindowRangeCount; Index++) {
    Base = R.WindowBase[Index];
    Size = R.WindowSize[Index];
    if ((Base % 4096 != 0) || (Size % 4096 != 0) || (Size == 0)) {
      return OVMF_MH_STATUS_WINDOW_ALIGNMENT;
    }

    if (!ModelIsRam (Base, Size, MAX_UINT64, Ranges, Count)) {
      return OVMF_MH_STATUS_WINDOW_NOT_RAM;
    }

    if ((Base < 0x1800000) || ModelOverlap (Base, Size, R.MailboxBase, R.MailboxSize) ||
        ModelOverlap (Base, Size, R.WorkAreaBase, R.WorkAreaSize) || ModelOverlap (Base, Size, 0xFF000000, 0x1000000))
    {
      return OVMF_MH_STATUS_WINDOW_OVERLAP;
    }

    for (Earlier = 0; Earlier < Index; Earlier++) {
      if (ModelOverlap (Base, Size, R.WindowBase[Earlier], R.WindowSize[Earlier])) {
        return OVMF_MH_STATUS_WINDOW_OVERLAP;
      }
    }

    Total += Size;
    if (Total > 256ULL << 30) {
      return OVMF_MH_STATUS_WINDOW_TOO_LARGE;
    }
  }

  if (R.WorkAreaSize < 0x100000 + Total / 4096 * 8) {
    return OVMF_MH_STATUS_WORK_AREA_TOO_SMALL;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

int
LLVMFuzzerTestOneInput (
  const uint8_t  *Data,
  size_t         Size
  )
{
  UINTN                 BlobSize;
  UINTN                 Header;
  UINTN                 Entries;
  UINTN                 Count;
  UINTN                 Index;
  UINT64                Base;
  UINT64                Length;
  UINT32                Type;
  UINT32                Status;
  UINT32                Expected;
  BOOLEAN               ExpectedUsable;
  UINT8                 *Blob;
  OVMF_MH_MEMORY_RANGE  *Ranges;
  STATIC OVMF_MH_MEMORY_RANGE  Collected[MAX_RAM_RANGES];

  if (mBlobPages == NULL) {
    mBlobPages  = FuzzGuardedMap (256);
    mRangePages = (OVMF_MH_MEMORY_RANGE *)FuzzGuardedMap (MAX_RAM_RANGES * sizeof (OVMF_MH_MEMORY_RANGE));
    mRequest    = (OVMF_MH_REQUEST *)FuzzGuardedMap (sizeof (OVMF_MH_REQUEST));
    mUsable     = (BOOLEAN *)FuzzGuardedMap (sizeof (BOOLEAN));
  }

  if (Size < 2) {
    return 0;
  }

  BlobSize = (Data[0] < 0xF0) ? sizeof (OVMF_MH_REQUEST) : Data[1];
  Header   = 2;
  if (Size < Header + BlobSize) {
    return 0;
  }

  //
  // The blob ends at a guard page: the validator may read BlobSize bytes.
  //
  Blob = mBlobPages + 256 - BlobSize;
  memcpy (Blob, Data + Header, BlobSize);
  if (Data[0] < 0xF0) {
    //
    // Two bits per address field (MailboxBase, WorkAreaSize, WindowBase[0],
    // WindowSize[0]): keep, minus a page, plus a page, minus one. Bounds
    // are where off-by-one bugs live; this puts every field one mutation
    // away from both sides of every boundary a seed sits on.
    //
    for (Index = 0; Index < 4; Index++) {
      STATIC CONST UINT64  Nudge[4]  = { 0, 0 - FUZZ_PAGE, FUZZ_PAGE, MAX_UINT64 };
      STATIC CONST UINTN   Offset[4] = {
        OFFSET_OF (OVMF_MH_REQUEST, MailboxBase),
        OFFSET_OF (OVMF_MH_REQUEST, WorkAreaSize),
        OFFSET_OF (OVMF_MH_REQUEST, WindowBase),
        OFFSET_OF (OVMF_MH_REQUEST, WindowSize)
      };
      UINT64               Field;

      memcpy (&Field, Blob + Offset[Index], sizeof (Field));
      Field += Nudge[(Data[1] >> (2 * Index)) & 3];
      memcpy (Blob + Offset[Index], &Field, sizeof (Field));
    }
  }

  //
  // etc/e820 as the SEC platform code reads it.
  //
  Entries = (Size - Header - BlobSize) / E820_ENTRY;
  if ((Entries == 0) || (Entries > MAX_RAM_RANGES) || ((Size - Header - BlobSize) % E820_ENTRY != 0)) {
    return 0;   // NO_FW_CFG_MEMORY_MAP: the helper halts before validating
  }

  Count = 0;
  for (Index = 0; Index < Entries; Index++) {
    memcpy (&Base, Data + Header + BlobSize + Index * E820_ENTRY, 8);
    memcpy (&Length, Data + Header + BlobSize + Index * E820_ENTRY + 8, 8);
    memcpy (&Type, Data + Header + BlobSize + Index * E820_ENTRY + 16, 4);
    if (Type == E820_RAM) {
      Collected[Count].Base = Base;
      Collected[Count].Size = Length;
      Count++;
    }
  }

  if (Count == 0) {
    return 0;
  }

  //
  // The ranges end at a guard page: reading range Count faults.
  //
  Ranges = mRangePages + (MAX_RAM_RANGES - Count);
  memcpy (Ranges, Collected, Count * sizeof (*Ranges));

  Status   = MigrationHelperValidateRequest (Blob, BlobSize, Ranges, Count, mRequest, mUsable);
  Expected = ModelStatus (Blob, BlobSize, Ranges, Count, &ExpectedUsable);
  if (Status != Expected) {
    FuzzFail ("request status differs from the documented checks", ((UINT64)Status << 32) | Expected);
  }

  if (*mUsable != ExpectedUsable) {
    FuzzFail ("MailboxUsable differs from the documented checks", *mUsable);
  }

  if ((Status == OVMF_MH_STATUS_SUCCESS) && (memcmp (mRequest, Blob, sizeof (*mRequest)) != 0)) {
    FuzzFail ("accepted request differs from the blob", 0);
  }

  //
  // An accepted request's address space is one the page-table builder
  // maps (sorted, disjoint, the window contiguous from its virtual base)
  // unless a window range lies beyond the widest physical address a CPU
  // has (e820 may claim RAM anywhere): then the builder refuses it.
  //
  if (Status == OVMF_MH_STATUS_SUCCESS) {
    OVMF_MH_MAPPING  Mappings[OVMF_MH_MAX_MAPPINGS];
    OVMF_MH_PAGING   Paging = { 0, 52, TRUE };
    UINTN            MappingCount;
    UINTN            Tables;
    UINT64           Window;
    UINT32           MapStatus;
    BOOLEAN          Reachable;

    Reachable = TRUE;
    for (Index = 0; Index < mRequest->WindowRangeCount; Index++) {
      if (mRequest->WindowBase[Index] + mRequest->WindowSize[Index] > (1ULL << 52)) {
        Reachable = FALSE;
      }
    }

    MigrationHelperHelperMappings (mRequest, Mappings, &MappingCount, &Window);
    MapStatus = MigrationHelperPageTablePages (&Paging, Mappings, MappingCount, OVMF_MH_PAGE_TABLE_BUDGET, &Tables);
    if (MapStatus != (Reachable ? OVMF_MH_STATUS_SUCCESS : OVMF_MH_STATUS_MAPPING_UNSUPPORTED)) {
      FuzzFail ("an accepted request's address space is mapped other than documented", MapStatus);
    }

    if ((Mappings[MappingCount - 1].VirtualBase + Mappings[MappingCount - 1].Size !=
         Window + MigrationHelperWindowSize (mRequest)) && (mRequest->WindowRangeCount > 0))
    {
      FuzzFail ("the window is not one span from its virtual base", Window);
    }
  }

  return 0;
}
