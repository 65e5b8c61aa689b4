/** @file
  Host stand-ins for the few EDK2 library functions the core library uses,
  so the firmware sources build into a host shared library for tests,
  fuzzing and benchmarks. Host only: never part of the firmware.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef HOST_SHIM_H_
#define HOST_SHIM_H_

#include <Base.h>

/**
  Clear bits of CPUID leaf 1 ECX as AsmCpuid reports them, to simulate a CPU
  without a feature (for example BIT25, AES-NI). Not thread safe.

  @param[in] EcxClearMask  Bits to clear; 0 restores the real CPUID.
**/
void
host_shim_set_cpuid1_ecx_clear (
  UINT32  EcxClearMask
  );

/**
  Clear bits of CPUID leaf 7 subleaf 0 ECX as AsmCpuidEx reports them (for
  example BIT9, VAES). Not thread safe.

  @param[in] EcxClearMask  Bits to clear; 0 restores the real CPUID.
**/
void
host_shim_set_cpuid7_ecx_clear (
  UINT32  EcxClearMask
  );

#endif
