/** @file
  Host stand-in for BaseLib's AsmRdRand64, so the core's salt comes from the
  same instruction on the host as in the firmware. Host only.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Base.h>

/**
  Read a 64-bit random number with RDRAND.

  @param[out] Rand  Receives the number.

  @retval TRUE   Rand is valid.
  @retval FALSE  RDRAND reported no entropy this time.
**/
BOOLEAN
EFIAPI
AsmRdRand64 (
  OUT UINT64  *Rand
  )
{
  UINT64  Value;
  UINT8   Ok;

  __asm__ __volatile__ ("rdrand %0; setc %1" : "=r" (Value), "=qm" (Ok));
  *Rand = Value;
  return (BOOLEAN)(Ok != 0);
}
