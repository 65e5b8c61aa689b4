/** @file
  HMAC-SHA256 (RFC 2104) and HKDF-SHA256 (RFC 5869).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

///
/// Streaming HMAC-SHA256 state: the inner hash in progress and the outer
/// hash with its key block already absorbed.
///
typedef struct {
  OVMF_MH_SHA256_CONTEXT    Inner;
  OVMF_MH_SHA256_CONTEXT    Outer;
} MH_HMAC_SHA256_CONTEXT;

/**
  Start an HMAC-SHA256 computation.

  @param[out] Context  The context.
  @param[in]  Key      The key; non-NULL when KeySize is not 0.
  @param[in]  KeySize  Its size in bytes.
**/
STATIC
VOID
InternalMhHmacInit (
  OUT MH_HMAC_SHA256_CONTEXT  *Context,
  IN  CONST UINT8             *Key,
  IN  UINTN                   KeySize
  )
{
  UINT8  KeyBlock[OVMF_MH_SHA256_BLOCK_SIZE];
  UINT8  Pad[OVMF_MH_SHA256_BLOCK_SIZE];
  UINTN  Index;

  ZeroMem (KeyBlock, sizeof (KeyBlock));
  if (KeySize > OVMF_MH_SHA256_BLOCK_SIZE) {
    MigrationHelperSha256 (Key, KeySize, KeyBlock);
  } else if (KeySize > 0) {
    CopyMem (KeyBlock, Key, KeySize);
  }

  for (Index = 0; Index < OVMF_MH_SHA256_BLOCK_SIZE; Index++) {
    Pad[Index] = (UINT8)(KeyBlock[Index] ^ 0x36);
  }

  MigrationHelperSha256Init (&Context->Inner);
  MigrationHelperSha256Update (&Context->Inner, Pad, sizeof (Pad));

  for (Index = 0; Index < OVMF_MH_SHA256_BLOCK_SIZE; Index++) {
    Pad[Index] = (UINT8)(KeyBlock[Index] ^ 0x5C);
  }

  MigrationHelperSha256Init (&Context->Outer);
  MigrationHelperSha256Update (&Context->Outer, Pad, sizeof (Pad));

  MigrationHelperSecureZero (KeyBlock, sizeof (KeyBlock));
  MigrationHelperSecureZero (Pad, sizeof (Pad));
}

/**
  Finish an HMAC-SHA256 computation and wipe the context.

  @param[in,out] Context  The context.
  @param[out]    Mac      Receives 32 bytes.
**/
STATIC
VOID
InternalMhHmacFinal (
  IN OUT MH_HMAC_SHA256_CONTEXT  *Context,
  OUT    UINT8                   *Mac
  )
{
  UINT8  InnerDigest[OVMF_MH_SHA256_DIGEST_SIZE];

  MigrationHelperSha256Final (&Context->Inner, InnerDigest);
  MigrationHelperSha256Update (&Context->Outer, InnerDigest, sizeof (InnerDigest));
  MigrationHelperSha256Final (&Context->Outer, Mac);
  MigrationHelperSecureZero (InnerDigest, sizeof (InnerDigest));
}

/**
  HMAC-SHA256 (RFC 2104).

  @param[in]  Key       The key; may be NULL when KeySize is 0.
  @param[in]  KeySize   Its size in bytes (any size).
  @param[in]  Data      The message; may be NULL when DataSize is 0.
  @param[in]  DataSize  Its size in bytes.
  @param[out] Mac       Receives the 32-byte MAC.

  @retval TRUE   Mac is written.
  @retval FALSE  Mac is NULL, or a buffer is NULL with a non-zero size.
**/
BOOLEAN
EFIAPI
MigrationHelperHmacSha256 (
  IN  CONST UINT8  *Key   OPTIONAL,
  IN  UINTN        KeySize,
  IN  CONST UINT8  *Data  OPTIONAL,
  IN  UINTN        DataSize,
  OUT UINT8        *Mac
  )
{
  MH_HMAC_SHA256_CONTEXT  Context;

  if ((Mac == NULL) || ((Key == NULL) && (KeySize != 0)) ||
      ((Data == NULL) && (DataSize != 0)))
  {
    return FALSE;
  }

  InternalMhHmacInit (&Context, Key, KeySize);
  MigrationHelperSha256Update (&Context.Inner, Data, DataSize);
  InternalMhHmacFinal (&Context, Mac);
  return TRUE;
}

/**
  HKDF-Extract with SHA-256 (RFC 5869 section 2.2).

  @param[in]  Salt      The salt; empty means HashLen zero bytes, which
                        gives the same result.
  @param[in]  SaltSize  Its size in bytes.
  @param[in]  Ikm       Input keying material; may be NULL when IkmSize is 0.
  @param[in]  IkmSize   Its size in bytes.
  @param[out] Prk       Receives the 32-byte pseudorandom key.

  @retval TRUE   Prk is written.
  @retval FALSE  Prk is NULL, or a buffer is NULL with a non-zero size.
**/
BOOLEAN
EFIAPI
MigrationHelperHkdfSha256Extract (
  IN  CONST UINT8  *Salt  OPTIONAL,
  IN  UINTN        SaltSize,
  IN  CONST UINT8  *Ikm   OPTIONAL,
  IN  UINTN        IkmSize,
  OUT UINT8        *Prk
  )
{
  //
  // An HMAC key shorter than the block is zero-padded, so an empty salt
  // and HashLen zero bytes give the same PRK.
  //
  return MigrationHelperHmacSha256 (Salt, SaltSize, Ikm, IkmSize, Prk);
}

/**
  HKDF-Expand with SHA-256 (RFC 5869 section 2.3).

  @param[in]  Prk       The pseudorandom key.
  @param[in]  PrkSize   Its size in bytes (the RFC asks for at least 32; any
                        non-zero size is accepted, as HMAC accepts any key).
  @param[in]  Info      Context information; may be NULL when InfoSize is 0.
  @param[in]  InfoSize  Its size in bytes.
  @param[out] Out       Receives OutSize bytes; may be NULL when OutSize is 0.
  @param[in]  OutSize   At most OVMF_MH_HKDF_SHA256_MAX_OUTPUT.

  @retval TRUE   Out is written.
  @retval FALSE  OutSize is too large or a required pointer is NULL; Out
                 is left untouched.
**/
BOOLEAN
EFIAPI
MigrationHelperHkdfSha256Expand (
  IN  CONST UINT8  *Prk,
  IN  UINTN        PrkSize,
  IN  CONST UINT8  *Info  OPTIONAL,
  IN  UINTN        InfoSize,
  OUT UINT8        *Out   OPTIONAL,
  IN  UINTN        OutSize
  )
{
  MH_HMAC_SHA256_CONTEXT  Keyed;
  MH_HMAC_SHA256_CONTEXT  Context;
  UINT8                   Block[OVMF_MH_SHA256_DIGEST_SIZE];
  UINT8                   Counter;
  UINTN                   Done;
  UINTN                   Chunk;

  if ((Prk == NULL) || (PrkSize == 0) || ((Info == NULL) && (InfoSize != 0)) ||
      ((Out == NULL) && (OutSize != 0)) || (OutSize > OVMF_MH_HKDF_SHA256_MAX_OUTPUT))
  {
    return FALSE;
  }

  //
  // T(0) = empty; T(i) = HMAC(PRK, T(i-1) || info || i); OKM = T(1) || ...
  // The keyed HMAC state is computed once and copied for every T(i).
  //
  InternalMhHmacInit (&Keyed, Prk, PrkSize);
  Done    = 0;
  Counter = 0;
  while (Done < OutSize) {
    Counter++;
    CopyMem (&Context, &Keyed, sizeof (Context));
    if (Counter > 1) {
      MigrationHelperSha256Update (&Context.Inner, Block, sizeof (Block));
    }

    MigrationHelperSha256Update (&Context.Inner, Info, InfoSize);
    MigrationHelperSha256Update (&Context.Inner, &Counter, 1);
    InternalMhHmacFinal (&Context, Block);

    Chunk = OutSize - Done;
    if (Chunk > sizeof (Block)) {
      Chunk = sizeof (Block);
    }

    CopyMem (Out + Done, Block, Chunk);
    Done += Chunk;
  }

  MigrationHelperSecureZero (&Keyed, sizeof (Keyed));
  MigrationHelperSecureZero (&Context, sizeof (Context));
  MigrationHelperSecureZero (Block, sizeof (Block));
  return TRUE;
}

/**
  HKDF-SHA256: Extract then Expand (RFC 5869).

  @param[in]  Salt      The salt; empty means HashLen zero bytes.
  @param[in]  SaltSize  Its size in bytes.
  @param[in]  Ikm       Input keying material; may be NULL when IkmSize is 0.
  @param[in]  IkmSize   Its size in bytes.
  @param[in]  Info      Context information; may be NULL when InfoSize is 0.
  @param[in]  InfoSize  Its size in bytes.
  @param[out] Out       Receives OutSize bytes; may be NULL when OutSize is 0.
  @param[in]  OutSize   At most OVMF_MH_HKDF_SHA256_MAX_OUTPUT.

  @retval TRUE   Out is written.
  @retval FALSE  OutSize is too large or a buffer is NULL with a non-zero
                 size; Out is left untouched.
**/
BOOLEAN
EFIAPI
MigrationHelperHkdfSha256 (
  IN  CONST UINT8  *Salt  OPTIONAL,
  IN  UINTN        SaltSize,
  IN  CONST UINT8  *Ikm   OPTIONAL,
  IN  UINTN        IkmSize,
  IN  CONST UINT8  *Info  OPTIONAL,
  IN  UINTN        InfoSize,
  OUT UINT8        *Out   OPTIONAL,
  IN  UINTN        OutSize
  )
{
  UINT8    Prk[OVMF_MH_SHA256_DIGEST_SIZE];
  BOOLEAN  Result;

  if (((Salt == NULL) && (SaltSize != 0)) || ((Ikm == NULL) && (IkmSize != 0)) ||
      ((Info == NULL) && (InfoSize != 0)) || ((Out == NULL) && (OutSize != 0)) ||
      (OutSize > OVMF_MH_HKDF_SHA256_MAX_OUTPUT))
  {
    return FALSE;
  }

  if (!MigrationHelperHkdfSha256Extract (Salt, SaltSize, Ikm, IkmSize, Prk)) {
    return FALSE;
  }

  Result = MigrationHelperHkdfSha256Expand (Prk, sizeof (Prk), Info, InfoSize, Out, OutSize);
  MigrationHelperSecureZero (Prk, sizeof (Prk));
  return Result;
}
