/** @file
  Host implementations of the EDK2 BaseLib/BaseMemoryLib functions used by
  MigrationHelperCoreLib: CopyMem, SetMem, ZeroMem, CompareMem,
  MemoryFence, CpuPause, AsmCpuid, AsmCpuidEx, AsmXGetBv.

  They keep the EDK2 prototypes (EFIAPI is ms_abi in the host build, as in
  the firmware), so the core sources compile unchanged. Only this file may
  hold host-only mutable state (the CPUID override for tests).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Base.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>

#include "HostShim.h"

STATIC UINT32   mHostShimCpuid1EcxClear = 0;
STATIC UINT32   mHostShimCpuid7EcxClear = 0;
STATIC UINT32   mHostShimCpuidCache[2][4];
STATIC BOOLEAN  mHostShimCpuidCached[2];

void
host_shim_set_cpuid1_ecx_clear (
  UINT32  EcxClearMask
  )
{
  mHostShimCpuid1EcxClear = EcxClearMask;
}

void
host_shim_set_cpuid7_ecx_clear (
  UINT32  EcxClearMask
  )
{
  mHostShimCpuid7EcxClear = EcxClearMask;
}

VOID *
EFIAPI
CopyMem (
  OUT VOID       *DestinationBuffer,
  IN CONST VOID  *SourceBuffer,
  IN UINTN       Length
  )
{
  //
  // memmove semantics, like BaseMemoryLib.
  //
  return __builtin_memmove (DestinationBuffer, SourceBuffer, Length);
}

VOID *
EFIAPI
SetMem (
  OUT VOID  *Buffer,
  IN UINTN  Length,
  IN UINT8  Value
  )
{
  return __builtin_memset (Buffer, Value, Length);
}

VOID *
EFIAPI
ZeroMem (
  OUT VOID  *Buffer,
  IN UINTN  Length
  )
{
  return __builtin_memset (Buffer, 0, Length);
}

INTN
EFIAPI
CompareMem (
  IN CONST VOID  *DestinationBuffer,
  IN CONST VOID  *SourceBuffer,
  IN UINTN       Length
  )
{
  CONST UINT8  *Left;
  CONST UINT8  *Right;
  UINTN        Index;

  Left  = (CONST UINT8 *)DestinationBuffer;
  Right = (CONST UINT8 *)SourceBuffer;
  for (Index = 0; Index < Length; Index++) {
    if (Left[Index] != Right[Index]) {
      return (INTN)Left[Index] - (INTN)Right[Index];
    }
  }

  return 0;
}

VOID
EFIAPI
MemoryFence (
  VOID
  )
{
  __atomic_thread_fence (__ATOMIC_SEQ_CST);
}

VOID
EFIAPI
CpuPause (
  VOID
  )
{
  __asm__ __volatile__ ("pause" ::: "memory");
}

UINT32
EFIAPI
AsmCpuidEx (
  IN      UINT32  Index,
  IN      UINT32  SubIndex,
  OUT     UINT32  *RegisterEax   OPTIONAL,
  OUT     UINT32  *RegisterEbx   OPTIONAL,
  OUT     UINT32  *RegisterEcx   OPTIONAL,
  OUT     UINT32  *RegisterEdx   OPTIONAL
  )
{
  UINT32  Eax;
  UINT32  Ebx;
  UINT32  Ecx;
  UINT32  Edx;

  //
  // Leaves 0 and 1 are asked for on every export session; under a
  // hypervisor each CPUID is a VM exit, so they are read once.
  //
  if ((Index <= 1) && (SubIndex == 0) && mHostShimCpuidCached[Index]) {
    Eax = mHostShimCpuidCache[Index][0];
    Ebx = mHostShimCpuidCache[Index][1];
    Ecx = mHostShimCpuidCache[Index][2];
    Edx = mHostShimCpuidCache[Index][3];
  } else {
    __asm__ __volatile__ (
      "cpuid"
      : "=a" (Eax), "=b" (Ebx), "=c" (Ecx), "=d" (Edx)
      : "a" (Index), "c" (SubIndex)
      );
    if ((Index <= 1) && (SubIndex == 0)) {
      mHostShimCpuidCache[Index][0] = Eax;
      mHostShimCpuidCache[Index][1] = Ebx;
      mHostShimCpuidCache[Index][2] = Ecx;
      mHostShimCpuidCache[Index][3] = Edx;
      mHostShimCpuidCached[Index]   = TRUE;
    }
  }

  if (Index == 1) {
    Ecx &= ~mHostShimCpuid1EcxClear;
  }

  if ((Index == 7) && (SubIndex == 0)) {
    Ecx &= ~mHostShimCpuid7EcxClear;
  }

  if (RegisterEax != NULL) {
    *RegisterEax = Eax;
  }

  if (RegisterEbx != NULL) {
    *RegisterEbx = Ebx;
  }

  if (RegisterEcx != NULL) {
    *RegisterEcx = Ecx;
  }

  if (RegisterEdx != NULL) {
    *RegisterEdx = Edx;
  }

  return Index;
}

UINT32
EFIAPI
AsmCpuid (
  IN      UINT32  Index,
  OUT     UINT32  *RegisterEax   OPTIONAL,
  OUT     UINT32  *RegisterEbx   OPTIONAL,
  OUT     UINT32  *RegisterEcx   OPTIONAL,
  OUT     UINT32  *RegisterEdx   OPTIONAL
  )
{
  return AsmCpuidEx (Index, 0, RegisterEax, RegisterEbx, RegisterEcx, RegisterEdx);
}

UINT64
EFIAPI
AsmXGetBv (
  IN UINT32  Index
  )
{
  UINT32  Eax;
  UINT32  Edx;

  __asm__ __volatile__ ("xgetbv" : "=a" (Eax), "=d" (Edx) : "c" (Index));
  return ((UINT64)Edx << 32) | Eax;
}
