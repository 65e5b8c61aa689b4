/** @file
  SEC-phase detector and main loop of the migration helper.

  The constructor runs inside SEC's ProcessLibraryConstructorList(), before
  SEC loads its IDT and before PEI. Without the fw_cfg request it returns at
  once and OVMF boots as it always does. With the request, SEC never returns
  from here: the request is validated, the mailbox published and served, and
  the helper VM ends by powering off or halting.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Library/MemEncryptSevLib.h>

#include "SecMigrationHelperInternal.h"

///
/// Found by tools (ovmf-mh inspect) in the SEC image; read through a volatile
/// pointer at run time so that the linker keeps it.
///
STATIC CONST OVMF_MH_IMAGE_INFO  mImageInfo = {
  OVMF_MH_IMAGE_INFO_SIGNATURE_LOW,
  OVMF_MH_IMAGE_INFO_SIGNATURE_HIGH,
  sizeof (OVMF_MH_IMAGE_INFO),
  OVMF_MH_ABI_MAJOR,
  OVMF_MH_ABI_MINOR,
  OVMF_MH_BASE_CAPABILITIES | OVMF_MH_CAP_HALT_WAKE,
  (UINT64)(UINTN)FixedPcdGetPtr (PcdMigrationHelperBuildId),
  OVMF_MH_REQUEST_FW_CFG_NAME,
  OVMF_MH_SECRET_PAGE_BASE,
  OVMF_MH_MAILBOX_MIN_BASE
};

/**
  Copy the build id out of the image info record.

  @param[out] BuildId  Receives 16 bytes.
**/
STATIC
VOID
InternalReadBuildId (
  OUT UINT8  *BuildId
  )
{
  CONST volatile OVMF_MH_IMAGE_INFO  *Info;
  CONST UINT8                        *Source;
  UINTN                              Index;

  Info   = &mImageInfo;
  Source = (CONST UINT8 *)(UINTN)Info->BuildIdAddress;
  for (Index = 0; Index < 16; Index++) {
    BuildId[Index] = Source[Index];
  }
}

/**
  Serve the mailbox until the host asks for shutdown, then power off.

  @param[in,out] Private  Helper-private state with a published context.
  @param[in]     Idle     How the helper waits for commands.
**/
STATIC
VOID
InternalServeForever (
  IN OUT SEC_MH_PRIVATE  *Private,
  IN CONST SEC_MH_IDLE   *Idle
  )
{
  InternalHelperServeUntilShutdown (&Private->Context, Idle);
  InternalHelperLog ("ovmf-mh: shutdown requested through the mailbox; powering off\n");
  InternalHelperPowerOff ();
  InternalHelperLog ("ovmf-mh: power-off had no effect on this machine type; halting\n");
  InternalHelperHalt ();
}

/**
  Log a refused request and halt; publish the halt first when the mailbox
  passed validation. Never returns.

  @param[in] Status         Why.
  @param[in] Request        The request as read (zero-padded).
  @param[in] MailboxUsable  Whether the mailbox may be written.
  @param[in] BuildId        The helper build id.
  @param[in] Detail         One more clause for the log line.
**/
STATIC
VOID
InternalRefuse (
  IN UINT32                 Status,
  IN CONST OVMF_MH_REQUEST  *Request,
  IN BOOLEAN                MailboxUsable,
  IN CONST UINT8            *BuildId,
  IN CONST CHAR8            *Detail
  )
{
  InternalHelperLog (
    "ovmf-mh: request rejected: %a (0x%x)%a; request version %u, mailbox 0x%lx+0x%lx, work area 0x%lx+0x%lx, "
    "%u window ranges, first 0x%lx+0x%lx; halting\n",
    MigrationHelperStatusName (Status),
    Status,
    Detail,
    (UINT32)Request->Version,
    Request->MailboxBase,
    Request->MailboxSize,
    Request->WorkAreaBase,
    Request->WorkAreaSize,
    Request->WindowRangeCount,
    Request->WindowBase[0],
    Request->WindowSize[0]
    );
  if (MailboxUsable) {
    MigrationHelperPublishHalt (
      (volatile OVMF_MH_MAILBOX_HEADER *)(UINTN)Request->MailboxBase,
      BuildId,
      OVMF_MH_STATE_HALTED,
      Status,
      0
      );
  }

  InternalHelperHalt ();
}

/**
  Build the helper's own page tables in its private RAM and load them: the
  firmware memory, the work area and the mailbox identity mapped, the guest
  window as one virtual span. Refuses (and halts) when the layout cannot be
  mapped within the budget.

  @param[in]  Request        A validated request.
  @param[in]  Paging         What the CPU offers.
  @param[in]  BuildId        The helper build id.
  @param[out] WindowVirtual  Receives the virtual address of guest offset 0.
**/
STATIC
VOID
InternalLoadPageTables (
  IN  CONST OVMF_MH_REQUEST  *Request,
  IN  CONST OVMF_MH_PAGING   *Paging,
  IN  CONST UINT8            *BuildId,
  OUT UINT64                 *WindowVirtual
  )
{
  OVMF_MH_MAPPING  Mappings[OVMF_MH_MAX_MAPPINGS];
  UINTN            MappingCount;
  UINTN            TablePages;
  UINT64           Cr3;
  UINT32           Status;

  MigrationHelperHelperMappings (Request, Mappings, &MappingCount, WindowVirtual);
  Status = MigrationHelperBuildPageTables (
             Paging,
             Mappings,
             MappingCount,
             (VOID *)(UINTN)SEC_MH_PAGE_TABLES_BASE,
             SEC_MH_PAGE_TABLES_BASE,
             SEC_MH_PAGE_TABLES_SIZE,
             &Cr3,
             &TablePages
             );
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    InternalRefuse (Status, Request, TRUE, BuildId, " (the helper's page tables)");
  }

  //
  // From here on the guest window is reachable only through its own
  // mapping, and nothing outside the helper's memory, the work area, the
  // mailbox and the window is mapped at all.
  //
  AsmWriteCr3 ((UINTN)Cr3);
  InternalHelperLog (
    "ovmf-mh: own page tables loaded: %u tables (budget %u), %u mappings, 1 GiB pages %a, "
    "physical address bits %u, C-bit mask 0x%lx; guest window at virtual 0x%lx\n",
    (UINT32)TablePages,
    (UINT32)OVMF_MH_PAGE_TABLE_BUDGET,
    (UINT32)MappingCount,
    Paging->Allow1GPages ? "used" : "not offered",
    (UINT32)Paging->PhysicalAddressBits,
    Paging->EncryptionMask,
    *WindowVirtual
    );
}

/**
  Validate the request and run the helper. Never returns.

  @param[in] Item  fw_cfg item of the request file.
  @param[in] Size  Size of the request file.
**/
STATIC
VOID
InternalHelperRun (
  IN UINT16  Item,
  IN UINTN   Size
  )
{
  OVMF_MH_MEMORY_RANGE  Ranges[SEC_MH_MAX_RAM_RANGES];
  UINTN                 RangeCount;
  OVMF_MH_REQUEST       Blob;
  OVMF_MH_REQUEST       Request;
  OVMF_MH_PAGING        Paging;
  BOOLEAN               MailboxUsable;
  BOOLEAN               SevActive;
  UINT32                Status;
  UINT8                 BuildId[16];
  SEC_MH_PRIVATE        *Private;
  BOOLEAN               KeyLoaded;
  UINT32                Ebx7;
  UINT32                Ecx7;
  UINT64                WindowVirtual;
  SEC_MH_IDLE           Idle;
  BOOLEAN               PmUsable;
  BOOLEAN               TickUsable;
  CONST CHAR8           *Detail;

  InternalReadBuildId (BuildId);
  InternalHelperLog (
    "ovmf-mh: fw_cfg %a present (%u bytes): SEC diverts into the migration helper, ABI %u.%u\n",
    OVMF_MH_REQUEST_FW_CFG_NAME,
    (UINT32)Size,
    OVMF_MH_ABI_MAJOR,
    OVMF_MH_ABI_MINOR
    );

  if (RETURN_ERROR (InternalHelperReadRamRanges (Ranges, &RangeCount))) {
    InternalHelperLog (
      "ovmf-mh: request rejected: %a (fw_cfg etc/e820 missing or malformed); halting\n",
      MigrationHelperStatusName (OVMF_MH_STATUS_NO_FW_CFG_MEMORY_MAP)
      );
    InternalHelperHalt ();
  }

  //
  // A blob longer than a request is never read: the size check alone
  // rejects it. A shorter one is read so that its version can be named.
  //
  ZeroMem (&Blob, sizeof (Blob));
  if (Size <= sizeof (Blob)) {
    InternalFwCfgSelect (Item);
    InternalFwCfgRead (Size, &Blob);
  }

  Status = MigrationHelperValidateRequest (&Blob, Size, Ranges, RangeCount, &Request, &MailboxUsable);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    if (Size > sizeof (Blob)) {
      ZeroMem (&Request, sizeof (Request));
    }

    InternalRefuse (
      Status,
      &Request,
      MailboxUsable,
      BuildId,
      (Status == OVMF_MH_STATUS_REQUEST_VERSION) ? " (this helper serves request version 2 only)" : ""
      );
  }

  SevActive = MemEncryptSevIsEnabled ();
  InternalHelperReadPaging (SevActive, &Paging);

  //
  // Under SEV the builder maps the shared area with the C-bit clear and the
  // helper's memory and the guest window with it set (Paging carries the
  // mask). The rest of an SEV helper is not there yet (SEV-ES #VC handling
  // of port I/O and CPUID, SNP validation of the work area), and none of it
  // can be exercised on a machine without SEV, so the helper refuses rather
  // than talk through memory it cannot vouch for.
  //
  if (SevActive) {
    InternalHelperLog (
      "ovmf-mh: request rejected: %a (0x%x): SEV is active (C-bit mask 0x%lx) and this helper does not run "
      "under SEV yet; halting\n",
      MigrationHelperStatusName (OVMF_MH_STATUS_SEV_UNSUPPORTED),
      OVMF_MH_STATUS_SEV_UNSUPPORTED,
      Paging.EncryptionMask
      );
    InternalHelperHalt ();
  }

  Private = (SEC_MH_PRIVATE *)(UINTN)OVMF_MH_PRIVATE_BASE;
  ZeroMem (Private, sizeof (*Private));
  Private->Context.Header   = (volatile OVMF_MH_MAILBOX_HEADER *)(UINTN)Request.MailboxBase;
  Private->Context.Data     = (volatile UINT8 *)(UINTN)(Request.MailboxBase + OVMF_MH_MAILBOX_HEADER_SIZE);
  Private->Context.DataSize = Request.MailboxSize - OVMF_MH_MAILBOX_HEADER_SIZE;
  CopyMem (Private->Context.BuildId, BuildId, sizeof (BuildId));
  Private->Context.Private     = (VOID *)(UINTN)Request.WorkAreaBase;
  Private->Context.PrivateSize = (UINTN)Request.WorkAreaSize;
  Private->Context.NoVectorCrypto = (BOOLEAN)((Request.Flags & OVMF_MH_REQUEST_NO_VECTOR_CRYPTO) != 0);

  //
  // SSE must be on before the core probes for AES-NI; the exception
  // handlers are in place before the helper switches page tables.
  //
  InternalHelperInitializeCpu (Private);
  InternalLoadPageTables (&Request, &Paging, BuildId, &WindowVirtual);

  PmUsable = (BOOLEAN)!RETURN_ERROR (InternalHelperEnablePm ());
  TickUsable = InternalHelperTickInitialize ();
  Status     = InternalHelperReadIdlePolicy (PmUsable, TickUsable, &Idle, &Detail);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    InternalRefuse (Status, &Request, MailboxUsable, BuildId, Detail);
  }

  Private->Context.GuestWindow     = (volatile UINT8 *)(UINTN)WindowVirtual;
  Private->Context.GuestWindowSize = MigrationHelperWindowSize (&Request);
  Private->Magic                   = SEC_MH_PRIVATE_MAGIC;

  if (!MigrationHelperInitialize (&Private->Context)) {
    InternalHelperLog ("ovmf-mh: work area too small for the guest window; halting\n");
    MigrationHelperPublishHalt (Private->Context.Header, BuildId, OVMF_MH_STATE_HALTED, OVMF_MH_STATUS_UNEXPECTED, 0);
    InternalHelperHalt ();
  }

  KeyLoaded = MigrationHelperLoadSecret (
                &Private->Context,
                (volatile UINT8 *)(UINTN)OVMF_MH_SECRET_PAGE_BASE,
                OVMF_MH_PAGE_SIZE
                );
  InternalHelperLog (
    "ovmf-mh: transport key %a; launch-secret page wiped\n",
    KeyLoaded ? "loaded" : "absent (export and import refuse with NO_KEY)"
    );
  if (Idle.Halt) {
    Private->Context.PlatformCapabilities = OVMF_MH_CAP_HALT_WAKE;
  }

  Private->Context.Header->Idle        = OVMF_MH_IDLE_BUSY;
  Private->Context.Header->HaltCount   = 0;
  Private->Context.Header->WindowWakes = 0;
  Private->Context.Header->TickWakes   = 0;
  InternalHelperLog (
    "ovmf-mh: idle: %a%a, %u PM timer ticks of polling after each command%a\n",
    Idle.Halt ? "halts until an NMI (HALT_WAKE)" :
    (PmUsable ? "never halts (idle policy NEVER_HALT)" : "never halts (no ACPI PM timer on this chipset)"),
    Idle.Tick ? ", after a tick window" :
    (!Idle.Halt ? "" : (TickUsable ? ", no tick window (idle policy NO_TICK)" : ", no tick window (no PIC or PIT)")),
    Idle.SpinTicks,
    (Idle.StretchTicks != 0) ? "; TEST KNOB: halt window stretched" : ""
    );
  MigrationHelperPublishReady (&Private->Context);
  Ebx7 = 0;
  Ecx7 = 0;
  AsmCpuidEx (7, 0, NULL, &Ebx7, &Ecx7, NULL);
  InternalHelperLog (
    "ovmf-mh: page crypto on %a%a\n",
    ((Private->Context.Header->Capabilities & OVMF_MH_CAP_VAES) != 0) ? "VAES + AVX2" :
    (((Private->Context.Header->Capabilities & OVMF_MH_CAP_AES_NI) != 0) ? "AES-NI" : "portable C"),
    Private->Context.NoVectorCrypto ? " (the request forbids the VAES path)" :
    (((Private->Context.Header->Capabilities & OVMF_MH_CAP_VAES) != 0) ? "" :
     ((((Ebx7 & BIT5) != 0) && ((Ecx7 & BIT9) != 0)) ?
      " (CPUID offers VAES and AVX2, but VAES failed the self-test against AES-NI)" :
      " (CPUID offers no VAES with AVX2)"))
    );

  InternalHelperLog (
    "ovmf-mh: READY: mailbox 0x%lx+0x%lx, work area 0x%lx+0x%lx, guest window 0x%lx bytes in %u ranges, "
    "build %02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x\n",
    Request.MailboxBase,
    Request.MailboxSize,
    Request.WorkAreaBase,
    Request.WorkAreaSize,
    Private->Context.GuestWindowSize,
    Request.WindowRangeCount,
    BuildId[0], BuildId[1], BuildId[2], BuildId[3], BuildId[4], BuildId[5], BuildId[6], BuildId[7],
    BuildId[8], BuildId[9], BuildId[10], BuildId[11], BuildId[12], BuildId[13], BuildId[14], BuildId[15]
    );

  InternalServeForever (Private, &Idle);
}

/**
  Constructor of the NULL library: detect helper mode.

  @retval RETURN_SUCCESS  No helper request: SEC continues to PEI as usual.
                          With a request, this function does not return.
**/
RETURN_STATUS
EFIAPI
SecMigrationHelperLibConstructor (
  VOID
  )
{
  UINT16  Item;
  UINTN   Size;

  if (RETURN_ERROR (InternalFwCfgFindFile (OVMF_MH_REQUEST_FW_CFG_NAME, &Item, &Size))) {
    return RETURN_SUCCESS;
  }

  InternalHelperRun (Item, Size);
  return RETURN_SUCCESS;
}
