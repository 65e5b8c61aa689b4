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
  OVMF_MH_CAP_QUERY | OVMF_MH_CAP_SHUTDOWN | OVMF_MH_CAP_EXPORT | OVMF_MH_CAP_IMPORT | OVMF_MH_CAP_CHECK_PAGES |
  OVMF_MH_CAP_BINDING,
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
**/
STATIC
VOID
InternalServeForever (
  IN OUT SEC_MH_PRIVATE  *Private
  )
{
  for ( ; ;) {
    if (!MigrationHelperServeOne (&Private->Context)) {
      CpuPause ();
      continue;
    }

    if (Private->Context.ShutdownRequested) {
      InternalHelperLog ("ovmf-mh: shutdown requested through the mailbox; powering off\n");
      InternalHelperPowerOff ();
      InternalHelperLog ("ovmf-mh: power-off had no effect on this machine type; halting\n");
      InternalHelperHalt ();
    }
  }
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
  IN UINTN                 Size
  )
{
  OVMF_MH_MEMORY_RANGE  Ranges[SEC_MH_MAX_RAM_RANGES];
  UINTN                 RangeCount;
  OVMF_MH_REQUEST       Blob;
  OVMF_MH_REQUEST       Request;
  BOOLEAN               MailboxUsable;
  UINT32                Status;
  UINT8                 BuildId[16];
  SEC_MH_PRIVATE        *Private;
  BOOLEAN               KeyLoaded;

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
  // A blob of the wrong size is never read: the size check alone rejects it.
  //
  if (Size == sizeof (Blob)) {
    InternalFwCfgSelect (Item);
    InternalFwCfgRead (sizeof (Blob), &Blob);
  }

  Status = MigrationHelperValidateRequest (&Blob, Size, Ranges, RangeCount, &Request, &MailboxUsable);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    InternalHelperLog (
      "ovmf-mh: request rejected: %a (0x%x); mailbox 0x%lx+0x%lx, guest window 0x%lx+0x%lx; halting\n",
      MigrationHelperStatusName (Status),
      Status,
      Size == sizeof (Blob) ? Request.MailboxBase : 0,
      Size == sizeof (Blob) ? Request.MailboxSize : 0,
      Size == sizeof (Blob) ? Request.GuestWindowBase : 0,
      Size == sizeof (Blob) ? Request.GuestWindowSize : 0
      );
    if (MailboxUsable) {
      MigrationHelperPublishHalt (
        (volatile OVMF_MH_MAILBOX_HEADER *)(UINTN)Request.MailboxBase,
        BuildId,
        OVMF_MH_STATE_HALTED,
        Status,
        0
        );
    }

    InternalHelperHalt ();
  }

  //
  // Under SEV the shared area would have to be mapped with the C-bit clear
  // and the guest window with it set. This helper runs on SEC's identity map
  // and does neither yet, so it refuses rather than talk through memory the
  // host cannot read (or, worse, expose private pages). The one place the
  // C-bit logic belongs is here, guarded by this detection.
  //
  if (MemEncryptSevIsEnabled ()) {
    InternalHelperLog (
      "ovmf-mh: request rejected: %a (0x%x): SEV is active and this helper does not map the shared area "
      "with the C-bit clear yet; halting\n",
      MigrationHelperStatusName (OVMF_MH_STATUS_SEV_UNSUPPORTED),
      OVMF_MH_STATUS_SEV_UNSUPPORTED
      );
    InternalHelperHalt ();
  }

  Private = (SEC_MH_PRIVATE *)(UINTN)OVMF_MH_PRIVATE_BASE;
  ZeroMem (Private, sizeof (*Private));
  Private->Context.Header          = (volatile OVMF_MH_MAILBOX_HEADER *)(UINTN)Request.MailboxBase;
  Private->Context.Data            = (volatile UINT8 *)(UINTN)(Request.MailboxBase + OVMF_MH_MAILBOX_HEADER_SIZE);
  Private->Context.DataSize        = Request.MailboxSize - OVMF_MH_MAILBOX_HEADER_SIZE;
  Private->Context.GuestWindow     = (volatile UINT8 *)(UINTN)Request.GuestWindowBase;
  Private->Context.GuestWindowSize = Request.GuestWindowSize;
  CopyMem (Private->Context.BuildId, BuildId, sizeof (BuildId));
  Private->Context.Private     = (VOID *)(UINTN)SEC_MH_CORE_PRIVATE_BASE;
  Private->Context.PrivateSize = OVMF_MH_CORE_PRIVATE_SIZE;
  Private->Magic               = SEC_MH_PRIVATE_MAGIC;

  //
  // SSE must be on before the core probes for AES-NI.
  //
  InternalHelperInitializeCpu (Private);
  if (!MigrationHelperInitialize (&Private->Context)) {
    InternalHelperLog ("ovmf-mh: helper private memory too small; halting\n");
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
  MigrationHelperPublishReady (&Private->Context);

  InternalHelperLog (
    "ovmf-mh: READY: mailbox 0x%lx+0x%lx, guest window 0x%lx+0x%lx, build %02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x\n",
    Request.MailboxBase,
    Request.MailboxSize,
    Request.GuestWindowBase,
    Request.GuestWindowSize,
    BuildId[0], BuildId[1], BuildId[2], BuildId[3], BuildId[4], BuildId[5], BuildId[6], BuildId[7],
    BuildId[8], BuildId[9], BuildId[10], BuildId[11], BuildId[12], BuildId[13], BuildId[14], BuildId[15]
    );

  InternalServeForever (Private);
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
