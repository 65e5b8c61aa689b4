/** @file
  Platform services of the SEC helper: the memory map from fw_cfg, CPU set-up
  (exception handlers, SSE) and power-off through the chipset.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <IndustryStandard/E820.h>
#include <IndustryStandard/I440FxPiix4.h>
#include <IndustryStandard/Pci22.h>
#include <IndustryStandard/Q35MchIch9.h>
#include <Library/CpuLib.h>
#include <Library/IoLib.h>
#include <Library/PciLib.h>

#include "SecMigrationHelperInternal.h"

///
/// I/O base the helper gives the ACPI PM block; the value OVMF's PEI uses.
///
#define SEC_MH_PM_BASE          0x600    ///< also in X64/IdleHalt.nasm (PM_TIMER_PORT)
#define SEC_MH_PM1_CNT_OFFSET   4
#define SEC_MH_PM_TMR_OFFSET    8
#define SEC_MH_PM1_SLP_TYP_MASK (BIT12 | BIT11 | BIT10)
#define SEC_MH_PM1_SLP_EN       BIT13

#define SEC_MH_CPUID_EXTENDED_MAX   0x80000000
#define SEC_MH_CPUID_EXTENDED_INFO  0x80000001
#define SEC_MH_CPUID_ADDRESS_SIZES  0x80000008
#define SEC_MH_CPUID_SEV            0x8000001F
#define SEC_MH_CPUID_PAGE_1GB       BIT26
#define SEC_MH_DEFAULT_PHYS_BITS    36

#define SEC_MH_CR0_MP          BIT1
#define SEC_MH_CR0_EM          BIT2
#define SEC_MH_CR4_OSFXSR      BIT9
#define SEC_MH_CR4_OSXMMEXCPT  BIT10
#define SEC_MH_CR4_OSXSAVE     BIT18

#define SEC_MH_CPUID_1_ECX_XSAVE  BIT26
#define SEC_MH_CPUID_1_ECX_AVX    BIT28
#define SEC_MH_XCR0_X87_SSE_AVX   (BIT0 | BIT1 | BIT2)

/**
  Read the helper VM's RAM ranges from fw_cfg "etc/e820".

  @param[out] Ranges      Receives up to SEC_MH_MAX_RAM_RANGES ranges.
  @param[out] RangeCount  Receives the number of RAM ranges.

  @retval RETURN_SUCCESS    The map was read.
  @retval RETURN_NOT_FOUND  fw_cfg has no usable memory map.
**/
RETURN_STATUS
InternalHelperReadRamRanges (
  OUT OVMF_MH_MEMORY_RANGE  *Ranges,
  OUT UINTN                 *RangeCount
  )
{
  UINT16            Item;
  UINTN             Size;
  UINTN             Index;
  EFI_E820_ENTRY64  Entry;

  *RangeCount = 0;
  if (RETURN_ERROR (InternalFwCfgFindFile ("etc/e820", &Item, &Size)) ||
      (Size == 0) ||
      (Size % sizeof (Entry) != 0) ||
      (Size / sizeof (Entry) > SEC_MH_MAX_RAM_RANGES))
  {
    return RETURN_NOT_FOUND;
  }

  InternalFwCfgSelect (Item);
  for (Index = 0; Index < Size / sizeof (Entry); Index++) {
    InternalFwCfgRead (sizeof (Entry), &Entry);
    if (Entry.Type == EfiAcpiAddressRangeMemory) {
      Ranges[*RangeCount].Base = Entry.BaseAddr;
      Ranges[*RangeCount].Size = Entry.Length;
      (*RangeCount)++;
    }
  }

  return (*RangeCount == 0) ? RETURN_NOT_FOUND : RETURN_SUCCESS;
}

/**
  Fill one IDT entry as a 64-bit interrupt gate (interrupts stay off in
  the handler).

  @param[out] Gate          The IDT entry.
  @param[in]  Handler       The handler's address.
  @param[in]  CodeSelector  The code segment the handler runs in.
**/
STATIC
VOID
InternalHelperSetInterruptGate (
  OUT IA32_IDT_GATE_DESCRIPTOR  *Gate,
  IN  UINT64                    Handler,
  IN  UINT16                    CodeSelector
  )
{
  Gate->Uint128.Uint64   = 0;
  Gate->Uint128.Uint64_1 = 0;
  Gate->Bits.OffsetLow   = (UINT16)Handler;
  Gate->Bits.Selector    = CodeSelector;
  Gate->Bits.GateType    = IA32_IDT_GATE_TYPE_INTERRUPT_32;
  Gate->Bits.OffsetHigh  = (UINT16)(Handler >> 16);
  Gate->Bits.OffsetUpper = (UINT32)(Handler >> 32);
}

/**
  Install the helper's exception handlers and the PIC's interrupt handlers
  (vectors SEC_MH_TICK_VECTOR_BASE on; interrupts stay off) and enable SSE, and the AVX
  register state when the CPU has XSAVE and AVX (CR4.OSXSAVE, then XCR0 bits
  x87, SSE and AVX), which the VAES page-crypto path needs. SEC has neither
  an IDT nor SSE enabled when library constructors run. Whether the VAES
  path is then used is the core's choice (MigrationHelperCpuHasVaes).

  @param[in,out] Private  Helper-private state holding the IDT.
**/
VOID
InternalHelperInitializeCpu (
  IN OUT SEC_MH_PRIVATE  *Private
  )
{
  IA32_DESCRIPTOR  Idtr;
  UINTN            Vector;
  UINT64           Handler;
  UINT16           CodeSelector;
  UINT32           Ecx;

  CodeSelector = AsmReadCs ();
  for (Vector = 0; Vector < SEC_MH_EXCEPTION_VECTORS; Vector++) {
    Handler = (UINT64)(UINTN)InternalHelperExceptionStubs + Vector * SEC_MH_EXCEPTION_STUB_SIZE;
    InternalHelperSetInterruptGate (&Private->Idt[Vector], Handler, CodeSelector);
  }

  //
  // The PIC's vectors (the tick window's IRQ0; the others stay masked).
  //
  for (Vector = SEC_MH_TICK_VECTOR_BASE; Vector < SEC_MH_IDT_VECTORS; Vector++) {
    Handler = (Vector < SEC_MH_TICK_VECTOR_BASE + 8) ?
              (UINT64)(UINTN)InternalHelperPicMasterInterrupt :
              (UINT64)(UINTN)InternalHelperPicSlaveInterrupt;
    InternalHelperSetInterruptGate (&Private->Idt[Vector], Handler, CodeSelector);
  }

  Idtr.Base  = (UINTN)Private->Idt;
  Idtr.Limit = (UINT16)(sizeof (Private->Idt) - 1);
  AsmWriteIdtr (&Idtr);

  AsmWriteCr0 ((AsmReadCr0 () & ~(UINTN)SEC_MH_CR0_EM) | SEC_MH_CR0_MP);
  AsmWriteCr4 (AsmReadCr4 () | SEC_MH_CR4_OSFXSR | SEC_MH_CR4_OSXMMEXCPT);

  Ecx = 0;
  AsmCpuid (1, NULL, NULL, &Ecx, NULL);
  if ((Ecx & (SEC_MH_CPUID_1_ECX_XSAVE | SEC_MH_CPUID_1_ECX_AVX)) == (SEC_MH_CPUID_1_ECX_XSAVE | SEC_MH_CPUID_1_ECX_AVX)) {
    AsmWriteCr4 (AsmReadCr4 () | SEC_MH_CR4_OSXSAVE);
    AsmXSetBv (0, AsmXGetBv (0) | SEC_MH_XCR0_X87_SSE_AVX);
  }
}

/**
  Read what the CPU offers for the helper's page tables.

  @param[in]  SevActive  Whether SEV memory encryption is active.
  @param[out] Paging     Receives the configuration.
**/
VOID
InternalHelperReadPaging (
  IN  BOOLEAN         SevActive,
  OUT OVMF_MH_PAGING  *Paging
  )
{
  UINT32  MaxExtended;
  UINT32  Eax;
  UINT32  Ebx;
  UINT32  Edx;

  Paging->EncryptionMask      = 0;
  Paging->PhysicalAddressBits = SEC_MH_DEFAULT_PHYS_BITS;
  Paging->Allow1GPages        = FALSE;

  AsmCpuid (SEC_MH_CPUID_EXTENDED_MAX, &MaxExtended, NULL, NULL, NULL);
  if (MaxExtended >= SEC_MH_CPUID_EXTENDED_INFO) {
    AsmCpuid (SEC_MH_CPUID_EXTENDED_INFO, NULL, NULL, NULL, &Edx);
    Paging->Allow1GPages = (BOOLEAN)((Edx & SEC_MH_CPUID_PAGE_1GB) != 0);
  }

  if (MaxExtended >= SEC_MH_CPUID_ADDRESS_SIZES) {
    AsmCpuid (SEC_MH_CPUID_ADDRESS_SIZES, &Eax, NULL, NULL, NULL);
    Paging->PhysicalAddressBits = (UINT8)(Eax & 0xFF);
  }

  //
  // The one place the C-bit is chosen: SEV's memory-encryption bit, which
  // the builder puts on private mappings and never on the shared area.
  //
  if (SevActive && (MaxExtended >= SEC_MH_CPUID_SEV)) {
    AsmCpuid (SEC_MH_CPUID_SEV, NULL, &Ebx, NULL, NULL);
    Paging->EncryptionMask = LShiftU64 (1, Ebx & 0x3F);
  }
}

/**
  Give the chipset's ACPI PM block its I/O base (SEC_MH_PM_BASE) and enable
  it: the power-off register and the PM timer the idle loop reads.

  @retval RETURN_SUCCESS      The PM block answers at SEC_MH_PM_BASE.
  @retval RETURN_UNSUPPORTED  The chipset is neither Q35 nor i440FX.
**/
RETURN_STATUS
InternalHelperEnablePm (
  VOID
  )
{
  UINT16  HostBridgeDeviceId;
  UINTN   PmBaseRegister;
  UINT32  PmBaseMask;
  UINTN   EnableRegister;
  UINT8   EnableBit;

  HostBridgeDeviceId = PciRead16 (PCI_LIB_ADDRESS (0, 0, 0, PCI_DEVICE_ID_OFFSET));
  switch (HostBridgeDeviceId) {
    case INTEL_Q35_MCH_DEVICE_ID:
      PmBaseRegister = POWER_MGMT_REGISTER_Q35 (ICH9_PMBASE);
      PmBaseMask     = ICH9_PMBASE_MASK;
      EnableRegister = POWER_MGMT_REGISTER_Q35 (ICH9_ACPI_CNTL);
      EnableBit      = ICH9_ACPI_CNTL_ACPI_EN;
      break;
    case INTEL_82441_DEVICE_ID:
      PmBaseRegister = POWER_MGMT_REGISTER_PIIX4 (PIIX4_PMBA);
      PmBaseMask     = PIIX4_PMBA_MASK;
      EnableRegister = POWER_MGMT_REGISTER_PIIX4 (PIIX4_PMREGMISC);
      EnableBit      = PIIX4_PMREGMISC_PMIOSE;
      break;
    default:
      return RETURN_UNSUPPORTED;
  }

  PciAndThenOr32 (PmBaseRegister, ~PmBaseMask, SEC_MH_PM_BASE);
  PciOr8 (EnableRegister, EnableBit);
  return RETURN_SUCCESS;
}

/**
  Read the ACPI PM timer (3.579545 MHz; compare only the low 24 bits).

  @return The timer's count.
**/
UINT32
InternalHelperPmTimer (
  VOID
  )
{
  return IoRead32 (SEC_MH_PM_BASE + SEC_MH_PM_TMR_OFFSET);
}

/**
  Power the helper VM off through the chipset's ACPI PM block.

  @retval RETURN_UNSUPPORTED  The chipset is neither Q35 nor i440FX, or the
                              power-off request had no effect.
**/
RETURN_STATUS
InternalHelperPowerOff (
  VOID
  )
{
  UINT16  Control;
  UINTN   Spin;

  if (RETURN_ERROR (InternalHelperEnablePm ())) {
    return RETURN_UNSUPPORTED;
  }

  //
  // SLP_TYP 0 with SLP_EN is soft-off on QEMU's PM1 control register.
  //
  Control = IoRead16 (SEC_MH_PM_BASE + SEC_MH_PM1_CNT_OFFSET);
  Control = (UINT16)((Control & ~SEC_MH_PM1_SLP_TYP_MASK) | SEC_MH_PM1_SLP_EN);
  IoWrite16 (SEC_MH_PM_BASE + SEC_MH_PM1_CNT_OFFSET, Control);

  for (Spin = 0; Spin < 100000000; Spin++) {
    CpuPause ();
  }

  return RETURN_UNSUPPORTED;
}

/**
  Stop this CPU for good.
**/
VOID
InternalHelperHalt (
  VOID
  )
{
  DisableInterrupts ();
  for ( ; ;) {
    CpuSleep ();
  }
}

/**
  Called by the exception stubs; never returns.

  @param[in] Vector     Exception vector.
  @param[in] ErrorCode  Error code, or 0 where the CPU pushes none.
  @param[in] Rip        Faulting instruction pointer.
**/
VOID
EFIAPI
InternalHelperFault (
  IN UINT64  Vector,
  IN UINT64  ErrorCode,
  IN UINT64  Rip
  )
{
  SEC_MH_PRIVATE  *Private;

  Private = (SEC_MH_PRIVATE *)(UINTN)OVMF_MH_PRIVATE_BASE;
  InternalHelperLog (
    "ovmf-mh: FAULT: exception %lu, error code 0x%lx, RIP 0x%lx; halting\n",
    Vector,
    ErrorCode,
    Rip
    );
  if (Private->Magic == SEC_MH_PRIVATE_MAGIC) {
    //
    // A helper that failed keeps no key: its private copy, the session keys
    // and the launch-secret page (if the fault came before it was read) are
    // wiped before the host can see the FAULT state. The magic is set only
    // after the request was validated, so both areas are helper RAM. It is
    // cleared first: a fault while wiping halts at once instead of looping.
    //
    Private->Magic = 0;
    MigrationHelperWipeKeys (&Private->Context);
    ZeroMem ((VOID *)(UINTN)OVMF_MH_SECRET_PAGE_BASE, OVMF_MH_PAGE_SIZE);
    MigrationHelperPublishHalt (
      Private->Context.Header,
      Private->Context.BuildId,
      OVMF_MH_STATE_FAULT,
      (UINT32)Vector,
      Rip
      );
  }

  InternalHelperHalt ();
}
