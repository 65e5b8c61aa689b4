/** @file
  Private declarations of SecMigrationHelperLib.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef SEC_MIGRATION_HELPER_INTERNAL_H_
#define SEC_MIGRATION_HELPER_INTERNAL_H_

#include <Base.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>
#include <Library/MigrationHelperCoreLib.h>

#define SEC_MH_EXCEPTION_VECTORS  32
#define SEC_MH_MAX_RAM_RANGES     32

///
/// Helper-private state at OVMF_MH_PRIVATE_BASE. SEC runs from flash and has
/// no writable globals, so the exception handler finds the mailbox here.
///
typedef struct {
  IA32_IDT_GATE_DESCRIPTOR    Idt[SEC_MH_EXCEPTION_VECTORS];
  UINT64                      Magic;           ///< SEC_MH_PRIVATE_MAGIC once Context is valid
  OVMF_MH_HELPER_CONTEXT      Context;
} SEC_MH_PRIVATE;

#define SEC_MH_PRIVATE_MAGIC  0x5441564952504d4fULL   // "OMPRIVAT"

///
/// The helper's page tables follow SEC_MH_PRIVATE, up to the end of the
/// private RAM. The core's session state and page tracking live in the
/// work area the request names.
///
#define SEC_MH_PAGE_TABLES_BASE  (OVMF_MH_PRIVATE_BASE + 0x10000)
#define SEC_MH_PAGE_TABLES_SIZE  (OVMF_MH_PAGE_TABLE_BUDGET * OVMF_MH_PAGE_SIZE)

STATIC_ASSERT (sizeof (SEC_MH_PRIVATE) <= 0x10000, "private state fits before the page tables");
STATIC_ASSERT (
  0x10000 + SEC_MH_PAGE_TABLES_SIZE <= OVMF_MH_PRIVATE_SIZE,
  "page-table budget fits the helper's private RAM"
  );

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
  );

/**
  Tell whether QEMU's fw_cfg device answers on the I/O ports.

  @retval TRUE   The signature item reads "QEMU".
  @retval FALSE  No fw_cfg device.
**/
BOOLEAN
InternalFwCfgIsPresent (
  VOID
  );

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
  );

/**
  Select a fw_cfg item; the next reads start at its first byte.

  @param[in] Item  Item selector.
**/
VOID
InternalFwCfgSelect (
  IN UINT16  Item
  );

/**
  Read bytes from the selected fw_cfg item.

  @param[in]  Size    Number of bytes.
  @param[out] Buffer  Receives Size bytes.
**/
VOID
InternalFwCfgRead (
  IN  UINTN  Size,
  OUT VOID   *Buffer
  );

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
  );

/**
  Install the helper's exception handlers and enable SSE. SEC has neither
  an IDT nor SSE enabled when library constructors run.

  @param[in,out] Private  Helper-private state holding the IDT.
**/
VOID
InternalHelperInitializeCpu (
  IN OUT SEC_MH_PRIVATE  *Private
  );

/**
  Read what the CPU offers for the helper's page tables: 1 GiB pages
  (CPUID 0x80000001 EDX[26]), the physical address width (CPUID
  0x80000008 EAX[7:0]) and, when SEV is active, the C-bit position
  (CPUID 0x8000001F EBX[5:0]).

  @param[in]  SevActive  Whether SEV memory encryption is active.
  @param[out] Paging     Receives the configuration.
**/
VOID
InternalHelperReadPaging (
  IN  BOOLEAN         SevActive,
  OUT OVMF_MH_PAGING  *Paging
  );

/**
  Power the helper VM off through the chipset's ACPI PM block.

  @retval RETURN_UNSUPPORTED  The chipset is neither Q35 nor i440FX, or the
                              power-off request had no effect.
**/
RETURN_STATUS
InternalHelperPowerOff (
  VOID
  );

/**
  Give the chipset's ACPI PM block its I/O base and enable it.

  @retval RETURN_SUCCESS      The PM block answers.
  @retval RETURN_UNSUPPORTED  The chipset is neither Q35 nor i440FX.
**/
RETURN_STATUS
InternalHelperEnablePm (
  VOID
  );

/**
  Read the ACPI PM timer (3.579545 MHz; compare only the low 24 bits).

  @return The timer's count.
**/
UINT32
InternalHelperPmTimer (
  VOID
  );

///
/// ACPI PM timer frequency and the bits every chipset implements.
///
#define SEC_MH_PM_TIMER_HZ    3579545
#define SEC_MH_PM_TIMER_MASK  0x00FFFFFF

///
/// Mailbox polls of the idle loop between two reads of the PM timer (each an
/// I/O exit that takes QEMU's global lock); the spin then ends at most that
/// many polls late.
///
#define SEC_MH_IDLE_POLLS_PER_TICK_READ  64

///
/// How the helper waits for commands (HelperIdle.c).
///
typedef struct {
  BOOLEAN    Halt;           ///< Halt when idle (FALSE: spin forever, the NEVER_HALT knob)
  UINT32     SpinTicks;      ///< PM timer ticks of polling after the last command
  UINT64     StretchTicks;   ///< Test knob: PM timer ticks between the re-check and HLT; 0 normally
} SEC_MH_IDLE;

/**
  Read the optional idle policy (fw_cfg OVMF_MH_IDLE_POLICY_FW_CFG_NAME) and
  turn it into PM timer ticks; without the file, the defaults.

  @param[in]  PmUsable  Whether the PM timer answers (InternalHelperEnablePm).
  @param[out] Idle      Receives the policy.
  @param[out] Detail    Receives a clause for the log line on failure.

  @retval OVMF_MH_STATUS_SUCCESS      Idle is set.
  @retval OVMF_MH_STATUS_IDLE_POLICY  The file is malformed.
**/
UINT32
InternalHelperReadIdlePolicy (
  IN  BOOLEAN      PmUsable,
  OUT SEC_MH_IDLE  *Idle,
  OUT CONST CHAR8  **Detail
  );

/**
  Serve the mailbox until the host asks for shutdown: spin for
  Idle->SpinTicks after each command, then halt until an NMI.

  @param[in,out] Context  A published helper context.
  @param[in]     Idle     The idle policy.
**/
VOID
InternalHelperServeUntilShutdown (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN CONST SEC_MH_IDLE           *Idle
  );

///
/// Results of InternalHelperIdleHalt.
///
#define SEC_MH_IDLE_WOKEN   0   ///< Halted; an NMI ended the halt
#define SEC_MH_IDLE_WINDOW  1   ///< An NMI landed before the HLT; the handler skipped it
#define SEC_MH_IDLE_POSTED  2   ///< The re-check found a command; no halt

/**
  Publish the idle word, re-check CommandSeq and halt until an NMI
  (X64/IdleHalt.nasm). Clears the idle word before it returns.

  @param[in] IdleWord      The mailbox header's Idle.
  @param[in] CommandSeq    The mailbox header's CommandSeq.
  @param[in] LastSeq       The last sequence number served.
  @param[in] StretchTicks  0; a test knob may stretch the window.

  @return SEC_MH_IDLE_WOKEN, SEC_MH_IDLE_WINDOW or SEC_MH_IDLE_POSTED.
**/
UINT32
EFIAPI
InternalHelperIdleHalt (
  IN volatile UINT32  *IdleWord,
  IN volatile UINT32  *CommandSeq,
  IN UINT32           LastSeq,
  IN UINT64           StretchTicks
  );

/**
  NMI handler (X64/IdleHalt.nasm), reached from the vector 2 stub.
**/
VOID
EFIAPI
InternalHelperNmiHandler (
  VOID
  );

/**
  Stop this CPU for good.
**/
VOID
InternalHelperHalt (
  VOID
  );

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
  );

///
/// First of SEC_MH_EXCEPTION_VECTORS stubs, each 16 bytes long (nasm).
///
VOID
EFIAPI
InternalHelperExceptionStubs (
  VOID
  );

#define SEC_MH_EXCEPTION_STUB_SIZE  16

#endif
