/** @file
  ctypes entry points that drive the portable dispatcher exactly as the SEC
  helper does: the same context, the same MigrationHelperServeOne() on a
  mailbox the test owns. Host only.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

//
// libc first: EDK2's X64 ProcessorBind.h makes later declarations hidden.
//
void  *malloc (unsigned long Size);
void  *calloc (unsigned long Count, unsigned long Size);
void  free (void *Pointer);

#include <Base.h>
#include <Library/MigrationHelperCoreLib.h>

#define MH_EXPORT  __attribute__ ((visibility ("default")))

/**
  Create a helper context over a mailbox and a guest window, as a firmware
  helper would with the given fw_cfg request flags.

  @param[in] Mailbox       Mailbox area (header + data area).
  @param[in] MailboxSize   Its size.
  @param[in] Window        Guest window, or NULL.
  @param[in] WindowSize    Its size.
  @param[in] Secret        Launch-secret page (read, then wiped), or NULL.
  @param[in] SecretSize    Its size.
  @param[in] RequestFlags  OVMF_MH_REQUEST_* flags (NO_VECTOR_CRYPTO).

  @return The context, or NULL when memory ran out.
**/
MH_EXPORT
void *
mh_create_with_flags (
  UINT8   *Mailbox,
  UINT64  MailboxSize,
  UINT8   *Window,
  UINT64  WindowSize,
  UINT8   *Secret,
  UINT64  SecretSize,
  UINT32  RequestFlags
  )
{
  OVMF_MH_HELPER_CONTEXT  *Context;

  Context = calloc (1, sizeof (*Context));
  if (Context == NULL) {
    return NULL;
  }

  //
  // The work area a firmware helper would get for this window.
  //
  Context->PrivateSize = (UINTN)MigrationHelperWorkAreaSize (WindowSize);
  Context->Private     = (Context->PrivateSize == 0) ? NULL : malloc (Context->PrivateSize);
  if (Context->Private == NULL) {
    free (Context);
    return NULL;
  }

  Context->Header          = (volatile OVMF_MH_MAILBOX_HEADER *)Mailbox;
  Context->Data            = Mailbox + OVMF_MH_MAILBOX_HEADER_SIZE;
  Context->DataSize        = MailboxSize - OVMF_MH_MAILBOX_HEADER_SIZE;
  Context->GuestWindow     = Window;
  Context->GuestWindowSize = WindowSize;
  Context->NoVectorCrypto  = (BOOLEAN)((RequestFlags & OVMF_MH_REQUEST_NO_VECTOR_CRYPTO) != 0);
  if (!MigrationHelperInitialize (Context)) {
    free (Context->Private);
    free (Context);
    return NULL;
  }

  if (Secret != NULL) {
    MigrationHelperLoadSecret (Context, Secret, (UINTN)SecretSize);
  }

  MigrationHelperPublishReady (Context);
  return Context;
}

/**
  Create a helper context over a mailbox and a guest window, with no
  request flags.

  @param[in] Mailbox      Mailbox area (header + data area).
  @param[in] MailboxSize  Its size.
  @param[in] Window       Guest window, or NULL.
  @param[in] WindowSize   Its size.
  @param[in] Secret       Launch-secret page (read, then wiped), or NULL.
  @param[in] SecretSize   Its size.

  @return The context, or NULL when memory ran out.
**/
MH_EXPORT
void *
mh_create (
  UINT8   *Mailbox,
  UINT64  MailboxSize,
  UINT8   *Window,
  UINT64  WindowSize,
  UINT8   *Secret,
  UINT64  SecretSize
  )
{
  return mh_create_with_flags (Mailbox, MailboxSize, Window, WindowSize, Secret, SecretSize, 0);
}

/**
  Serve the posted command, if any.

  @param[in] Context  From mh_create.

  @return 1 when a command was served, 0 otherwise.
**/
MH_EXPORT
int
mh_serve (
  void  *Context
  )
{
  return MigrationHelperServeOne ((OVMF_MH_HELPER_CONTEXT *)Context) ? 1 : 0;
}

/**
  Wipe keys and free a context.

  @param[in] Context  From mh_create.
**/
MH_EXPORT
void
mh_destroy (
  void  *Context
  )
{
  OVMF_MH_HELPER_CONTEXT  *Helper;

  Helper = (OVMF_MH_HELPER_CONTEXT *)Context;
  if (Helper == NULL) {
    return;
  }

  MigrationHelperWipeKeys (Helper);
  free (Helper->Private);
  free (Helper);
}
