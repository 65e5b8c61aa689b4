/** @file
  The SEC helper's own access to QEMU's fw_cfg, over the I/O ports.

  SEC needs four things from fw_cfg: whether the device is there, where a
  named file is, selecting an item and reading bytes from it. Doing them here
  keeps the helper independent of QemuFwCfgSecLib, whose dependencies change
  between EDK2 releases (TpmMeasurementLib, the TDX work area), and of the
  library class mapping a platform chooses for SEC. Only the traditional I/O
  interface is used: SEC reads a few hundred bytes, DMA would gain nothing.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <IndustryStandard/QemuFwCfg.h>
#include <Library/IoLib.h>

#include "SecMigrationHelperInternal.h"

///
/// "QEMU" as read byte by byte from the signature item.
///
#define SEC_MH_FW_CFG_SIGNATURE  SIGNATURE_32 ('Q', 'E', 'M', 'U')

/**
  Select a fw_cfg item; the next reads start at its first byte.

  @param[in] Item  Item selector.
**/
VOID
InternalFwCfgSelect (
  IN UINT16  Item
  )
{
  IoWrite16 (FW_CFG_IO_SELECTOR, Item);
}

/**
  Read bytes from the selected fw_cfg item.

  @param[in]  Size    Number of bytes.
  @param[out] Buffer  Receives Size bytes.
**/
VOID
InternalFwCfgRead (
  IN  UINTN  Size,
  OUT VOID   *Buffer
  )
{
  IoReadFifo8 (FW_CFG_IO_DATA, Size, Buffer);
}

/**
  Read a big-endian 32-bit value from the selected fw_cfg item.

  @return The value in host byte order.
**/
STATIC
UINT32
InternalFwCfgReadBe32 (
  VOID
  )
{
  UINT32  Value;

  InternalFwCfgRead (sizeof (Value), &Value);
  return SwapBytes32 (Value);
}

/**
  Tell whether QEMU's fw_cfg device answers on the I/O ports.

  @retval TRUE   The signature item reads "QEMU".
  @retval FALSE  No fw_cfg device.
**/
BOOLEAN
InternalFwCfgIsPresent (
  VOID
  )
{
  UINT32  Signature;

  InternalFwCfgSelect (QemuFwCfgItemSignature);
  InternalFwCfgRead (sizeof (Signature), &Signature);
  return (BOOLEAN)(Signature == SEC_MH_FW_CFG_SIGNATURE);
}

/**
  Find a named file in the fw_cfg file directory.

  @param[in]  Name  NUL-terminated ASCII name, shorter than QEMU_FW_CFG_FNAME_SIZE.
  @param[out] Item  Receives the file's item selector.
  @param[out] Size  Receives the file's size in bytes.

  @retval RETURN_SUCCESS            The file exists.
  @retval RETURN_NOT_FOUND          No such file (or no fw_cfg device).
  @retval RETURN_INVALID_PARAMETER  Name is too long to be a fw_cfg file name.
**/
RETURN_STATUS
InternalFwCfgFindFile (
  IN  CONST CHAR8  *Name,
  OUT UINT16       *Item,
  OUT UINTN        *Size
  )
{
  UINT32  Count;
  UINT32  Index;
  UINT32  FileSize;
  UINT16  FileSelect;
  UINT16  Reserved;
  CHAR8   FileName[QEMU_FW_CFG_FNAME_SIZE];

  if (AsciiStrnLenS (Name, QEMU_FW_CFG_FNAME_SIZE) >= QEMU_FW_CFG_FNAME_SIZE) {
    return RETURN_INVALID_PARAMETER;
  }

  if (!InternalFwCfgIsPresent ()) {
    return RETURN_NOT_FOUND;
  }

  //
  // The directory is a big-endian count followed by that many entries:
  // size (BE32), select (BE16), reserved (16 bits), name (56 bytes, NUL-padded).
  //
  InternalFwCfgSelect (QemuFwCfgItemFileDir);
  Count = InternalFwCfgReadBe32 ();
  for (Index = 0; Index < Count; Index++) {
    FileSize = InternalFwCfgReadBe32 ();
    InternalFwCfgRead (sizeof (FileSelect), &FileSelect);
    InternalFwCfgRead (sizeof (Reserved), &Reserved);
    InternalFwCfgRead (sizeof (FileName), FileName);
    FileName[QEMU_FW_CFG_FNAME_SIZE - 1] = '\0';
    if (AsciiStrCmp (Name, FileName) == 0) {
      *Item = SwapBytes16 (FileSelect);
      *Size = FileSize;
      return RETURN_SUCCESS;
    }
  }

  return RETURN_NOT_FOUND;
}
