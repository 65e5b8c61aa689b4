/** @file
  Logging to QEMU's debug console. DebugLib compiles to nothing in RELEASE
  builds, but a refused request must be explained in every build, so the
  helper writes to the debugcon port itself.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Library/IoLib.h>
#include <Library/PrintLib.h>

#include "SecMigrationHelperInternal.h"

///
/// QEMU's isa-debugcon answers reads of its port with this value.
///
#define SEC_MH_DEBUGCON_MAGIC  0xE9

#define SEC_MH_LOG_LINE_SIZE  256

/**
  Write a formatted line to QEMU's debug console, in every build target.

  @param[in] Format  PrintLib format string.
  @param[in] ...     Arguments.
**/
VOID
EFIAPI
InternalHelperLog (
  IN CONST CHAR8  *Format,
  ...
  )
{
  CHAR8    Line[SEC_MH_LOG_LINE_SIZE];
  VA_LIST  Marker;
  UINTN    Length;
  UINT16   Port;

  Port = FixedPcdGet16 (PcdDebugIoPort);
  if (IoRead8 (Port) != SEC_MH_DEBUGCON_MAGIC) {
    return;
  }

  VA_START (Marker, Format);
  Length = AsciiVSPrint (Line, sizeof (Line), Format, Marker);
  VA_END (Marker);

  IoWriteFifo8 (Port, Length, Line);
}
