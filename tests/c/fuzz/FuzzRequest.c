/** @file
  libFuzzer harness: fw_cfg request validation (MigrationHelperValidateRequest)
  against an e820 table.

  Input: byte 0 chooses the blob size (below 0xF0: 48 bytes, the right size,
  and byte 1 nudges the four address fields; otherwise byte 1 is the size),
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
  below 4 GiB and lies inside one RAM range.
**/
STATIC
BOOLEAN
ModelIsRam (
  IN UINT64                      Base,
  IN UINT64                      Size,
  IN CONST OVMF_MH_MEMORY_RANGE  *Ranges,
  IN UINTN                       Count
  )
{
  UINTN  Index;

  if ((Size == 0) || (Base + Size < Base) || (Base + Size > OVMF_MH_ADDRESS_LIMIT)) {
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
  UINT64           MailboxEnd;
  UINT64           WindowEnd;

  *Usable = FALSE;
  if (BlobSize != 48) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  memcpy (&R, Blob, sizeof (R));
  if (R.Signature != 0x52484d4f) {
    return OVMF_MH_STATUS_REQUEST_SIGNATURE;
  }

  if (R.Version != 1) {
    return OVMF_MH_STATUS_REQUEST_VERSION;
  }

  if (R.Size != 48) {
    return OVMF_MH_STATUS_REQUEST_SIZE;
  }

  if ((R.Flags != 0) || (R.Reserved != 0)) {
    return OVMF_MH_STATUS_REQUEST_FLAGS;
  }

  if (!ModelIsRam (0xF00000, 0x1800000 - 0xF00000, Ranges, Count)) {
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

  if (!ModelIsRam (R.MailboxBase, R.MailboxSize, Ranges, Count)) {
    return OVMF_MH_STATUS_MAILBOX_NOT_RAM;
  }

  *Usable = TRUE;
  if ((R.GuestWindowBase == 0) && (R.GuestWindowSize == 0)) {
    return OVMF_MH_STATUS_SUCCESS;
  }

  if ((R.GuestWindowBase % 4096 != 0) || (R.GuestWindowSize % 4096 != 0) || (R.GuestWindowSize == 0)) {
    return OVMF_MH_STATUS_WINDOW_ALIGNMENT;
  }

  if (!ModelIsRam (R.GuestWindowBase, R.GuestWindowSize, Ranges, Count)) {
    return OVMF_MH_STATUS_WINDOW_NOT_RAM;
  }

  MailboxEnd = R.MailboxBase + R.MailboxSize;
  WindowEnd  = R.GuestWindowBase + R.GuestWindowSize;
  if ((R.GuestWindowBase < 0x1800000) || ((R.GuestWindowBase < MailboxEnd) && (R.MailboxBase < WindowEnd))) {
    return OVMF_MH_STATUS_WINDOW_OVERLAP;
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
    // Two bits per address field (MailboxBase, MailboxSize, GuestWindowBase,
    // GuestWindowSize): keep, minus a page, plus a page, minus one. Bounds
    // are where off-by-one bugs live; this puts every field one mutation
    // away from both sides of every boundary a seed sits on.
    //
    for (Index = 0; Index < 4; Index++) {
      STATIC CONST UINT64  Nudge[4] = { 0, 0 - FUZZ_PAGE, FUZZ_PAGE, MAX_UINT64 };
      UINT64               Field;

      memcpy (&Field, Blob + OFFSET_OF (OVMF_MH_REQUEST, MailboxBase) + Index * 8, sizeof (Field));
      Field += Nudge[(Data[1] >> (2 * Index)) & 3];
      memcpy (Blob + OFFSET_OF (OVMF_MH_REQUEST, MailboxBase) + Index * 8, &Field, sizeof (Field));
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

  return 0;
}
