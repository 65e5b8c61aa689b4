/** @file
  Plain (System V ABI) entry points into the page crypto, for Python ctypes.
  Host only: never part of the firmware. Each function expands the key it
  is given, does its work and wipes the key again.

  Return conventions: 1 (or the OVMF_MH_CRYPTO_PATH_* used) for success,
  0 for failure.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"
#include "HostShim.h"

#define MH_EXPORT  __attribute__ ((visibility ("default")))

MH_EXPORT int
mh_cpu_has_aesni (
  void
  )
{
  return MigrationHelperCpuHasAesNi () ? 1 : 0;
}

MH_EXPORT void
mh_set_cpuid1_ecx_clear (
  UINT32  EcxClearMask
  )
{
  host_shim_set_cpuid1_ecx_clear (EcxClearMask);
}

MH_EXPORT int
mh_cpu_has_vaes (
  void
  )
{
  return MigrationHelperCpuHasVaes () ? 1 : 0;
}

MH_EXPORT void
mh_set_cpuid7_ecx_clear (
  UINT32  EcxClearMask
  )
{
  host_shim_set_cpuid7_ecx_clear (EcxClearMask);
}

MH_EXPORT UINTN
mh_ocb_key_struct_size (
  void
  )
{
  return sizeof (OVMF_MH_OCB_KEY);
}

/**
  Expand a key into a caller-provided OVMF_MH_OCB_KEY buffer.

  @return The path chosen, 0 on failure.
**/
MH_EXPORT int
mh_ocb_init (
  void         *KeyStruct,
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  int          AllowAesNi
  )
{
  OVMF_MH_OCB_KEY  *Key;

  Key = (OVMF_MH_OCB_KEY *)KeyStruct;
  if (!MigrationHelperOcbInit (Key, KeyBytes, KeySize, (BOOLEAN)(AllowAesNi != 0))) {
    return 0;
  }

  return (int)Key->Aes.Path;
}

/**
  Expand a key with MigrationHelperOcbInitPaths.

  @return The AES path chosen, plus 0x100 when whole blocks take the VAES
          loop; 0 on failure.
**/
MH_EXPORT int
mh_ocb_init_paths (
  void         *KeyStruct,
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  UINT32       Allow
  )
{
  OVMF_MH_OCB_KEY  *Key;

  Key = (OVMF_MH_OCB_KEY *)KeyStruct;
  if (!MigrationHelperOcbInitPaths (Key, KeyBytes, KeySize, Allow)) {
    return 0;
  }

  return (int)Key->Aes.Path | (Key->UseVaes ? 0x100 : 0);
}

MH_EXPORT void
mh_ocb_wipe (
  void  *KeyStruct
  )
{
  MigrationHelperOcbWipe ((OVMF_MH_OCB_KEY *)KeyStruct);
}

MH_EXPORT int
mh_ocb_encrypt_with (
  CONST void   *KeyStruct,
  CONST UINT8  *Nonce,
  CONST UINT8  *Ad,
  UINTN        AdSize,
  CONST UINT8  *Plain,
  UINTN        Size,
  UINT8        *Cipher,
  UINT8        *Tag
  )
{
  return MigrationHelperOcbEncrypt (
           (CONST OVMF_MH_OCB_KEY *)KeyStruct,
           Nonce,
           Ad,
           AdSize,
           Plain,
           Size,
           Cipher,
           Tag
           ) ? 1 : 0;
}

MH_EXPORT int
mh_ocb_decrypt_with (
  CONST void   *KeyStruct,
  CONST UINT8  *Nonce,
  CONST UINT8  *Ad,
  UINTN        AdSize,
  CONST UINT8  *Cipher,
  UINTN        Size,
  CONST UINT8  *Tag,
  UINT8        *Plain
  )
{
  return MigrationHelperOcbDecrypt (
           (CONST OVMF_MH_OCB_KEY *)KeyStruct,
           Nonce,
           Ad,
           AdSize,
           Cipher,
           Size,
           Tag,
           Plain
           ) ? 1 : 0;
}

/**
  One-shot OCB encryption.

  @return The path used (1 portable, 2 AES-NI), 0 on failure.
**/
MH_EXPORT int
mh_ocb_encrypt (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  CONST UINT8  *Nonce,
  CONST UINT8  *Ad,
  UINTN        AdSize,
  CONST UINT8  *Plain,
  UINTN        Size,
  UINT8        *Cipher,
  UINT8        *Tag,
  int          ForcePortable
  )
{
  OVMF_MH_OCB_KEY  Key;
  int              Result;

  //
  // Encrypt even when init failed: a failed init leaves a zeroed key, which
  // MigrationHelperOcbEncrypt must refuse (zeroing Cipher and Tag).
  //
  Result = mh_ocb_init (&Key, KeyBytes, KeySize, ForcePortable == 0);
  if (!MigrationHelperOcbEncrypt (&Key, Nonce, Ad, AdSize, Plain, Size, Cipher, Tag)) {
    Result = 0;
  }

  MigrationHelperOcbWipe (&Key);
  return Result;
}

/**
  One-shot OCB decryption.

  @return 1 when the tag verified, 0 otherwise.
**/
MH_EXPORT int
mh_ocb_decrypt (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  CONST UINT8  *Nonce,
  CONST UINT8  *Ad,
  UINTN        AdSize,
  CONST UINT8  *Cipher,
  UINTN        Size,
  CONST UINT8  *Tag,
  UINT8        *Plain,
  int          ForcePortable
  )
{
  OVMF_MH_OCB_KEY  Key;
  int              Result;

  //
  // Decrypt even when init failed: the zeroed key must be refused.
  //
  mh_ocb_init (&Key, KeyBytes, KeySize, ForcePortable == 0);
  Result = MigrationHelperOcbDecrypt (&Key, Nonce, Ad, AdSize, Cipher, Size, Tag, Plain) ? 1 : 0;

  MigrationHelperOcbWipe (&Key);
  return Result;
}

/**
  Encrypt Count pages of PageSize bytes each under one key, page i with
  nonce Nonces[12*i..], associated data Ads[AdSize*i..], into Out and
  Tags[16*i..]. For benchmarks and batch tests.

  @return The path used, 0 on failure.
**/
MH_EXPORT int
mh_ocb_encrypt_pages (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  CONST UINT8  *Nonces,
  CONST UINT8  *Ads,
  UINTN        AdSize,
  CONST UINT8  *Pages,
  UINTN        PageSize,
  UINTN        Count,
  UINT8        *Out,
  UINT8        *Tags,
  int          ForcePortable
  )
{
  OVMF_MH_OCB_KEY  Key;
  int              Result;
  UINTN            Index;

  Result = mh_ocb_init (&Key, KeyBytes, KeySize, ForcePortable == 0);
  for (Index = 0; (Result != 0) && (Index < Count); Index++) {
    if (!MigrationHelperOcbEncrypt (
           &Key,
           Nonces + OVMF_MH_OCB_NONCE_SIZE * Index,
           Ads + AdSize * Index,
           AdSize,
           Pages + PageSize * Index,
           PageSize,
           Out + PageSize * Index,
           Tags + OVMF_MH_OCB_TAG_SIZE * Index
           ))
    {
      Result = 0;
    }
  }

  MigrationHelperOcbWipe (&Key);
  return Result;
}

/**
  Seal (Decrypt == 0) or open Count pages with the paths Allow permits
  (OVMF_MH_OCB_ALLOW_* bits), one call per page as the helper makes them:
  for benchmarks of one path against another. Opening checks the tags in
  Tags.

  @return The path bits of the key (mh_ocb_init_paths) when every page
          succeeded, 0 otherwise.
**/
MH_EXPORT int
mh_ocb_pages_paths (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  UINT32       Allow,
  int          Decrypt,
  CONST UINT8  *Nonces,
  CONST UINT8  *Ads,
  UINTN        AdSize,
  CONST UINT8  *In,
  UINTN        PageSize,
  UINTN        Count,
  UINT8        *Out,
  UINT8        *Tags
  )
{
  OVMF_MH_OCB_KEY  Key;
  int              Result;
  UINTN            Index;
  BOOLEAN          Ok;

  Result = mh_ocb_init_paths (&Key, KeyBytes, KeySize, Allow);
  for (Index = 0; (Result != 0) && (Index < Count); Index++) {
    if (Decrypt) {
      Ok = MigrationHelperOcbDecrypt (
             &Key,
             Nonces + OVMF_MH_OCB_NONCE_SIZE * Index,
             Ads + AdSize * Index,
             AdSize,
             In + PageSize * Index,
             PageSize,
             Tags + OVMF_MH_OCB_TAG_SIZE * Index,
             Out + PageSize * Index
             );
    } else {
      Ok = MigrationHelperOcbEncrypt (
             &Key,
             Nonces + OVMF_MH_OCB_NONCE_SIZE * Index,
             Ads + AdSize * Index,
             AdSize,
             In + PageSize * Index,
             PageSize,
             Out + PageSize * Index,
             Tags + OVMF_MH_OCB_TAG_SIZE * Index
             );
    }

    if (!Ok) {
      Result = 0;
    }
  }

  MigrationHelperOcbWipe (&Key);
  return Result;
}

/**
  Decrypt Count pages laid out as mh_ocb_encrypt_pages writes them.

  @return The number of pages whose tag verified.
**/
MH_EXPORT UINTN
mh_ocb_decrypt_pages (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  CONST UINT8  *Nonces,
  CONST UINT8  *Ads,
  UINTN        AdSize,
  CONST UINT8  *Cipher,
  UINTN        PageSize,
  UINTN        Count,
  CONST UINT8  *Tags,
  UINT8        *Out,
  int          ForcePortable
  )
{
  OVMF_MH_OCB_KEY  Key;
  UINTN            Verified;
  UINTN            Index;

  Verified = 0;
  if (mh_ocb_init (&Key, KeyBytes, KeySize, ForcePortable == 0) != 0) {
    for (Index = 0; Index < Count; Index++) {
      if (MigrationHelperOcbDecrypt (
            &Key,
            Nonces + OVMF_MH_OCB_NONCE_SIZE * Index,
            Ads + AdSize * Index,
            AdSize,
            Cipher + PageSize * Index,
            PageSize,
            Tags + OVMF_MH_OCB_TAG_SIZE * Index,
            Out + PageSize * Index
            ))
      {
        Verified++;
      }
    }
  }

  MigrationHelperOcbWipe (&Key);
  return Verified;
}

/**
  One AES block, either direction.

  @return The path used, 0 on failure.
**/
MH_EXPORT int
mh_aes_block (
  CONST UINT8  *KeyBytes,
  UINTN        KeySize,
  CONST UINT8  *In,
  UINT8        *Out,
  int          Decrypt,
  int          ForcePortable
  )
{
  OVMF_MH_AES_KEY  Key;
  int              Result;
  BOOLEAN          Ok;

  Result = 0;
  if (MigrationHelperAesInit (&Key, KeyBytes, KeySize, (BOOLEAN)(ForcePortable == 0))) {
    if (Decrypt != 0) {
      Ok = MigrationHelperAesDecryptBlock (&Key, In, Out);
    } else {
      Ok = MigrationHelperAesEncryptBlock (&Key, In, Out);
    }

    Result = Ok ? (int)Key.Path : 0;
  }

  MigrationHelperAesWipe (&Key);
  return Result;
}

MH_EXPORT int
mh_sha256 (
  CONST UINT8  *Data,
  UINTN        Size,
  UINT8        *Digest
  )
{
  return MigrationHelperSha256 (Data, Size, Digest) ? 1 : 0;
}

/**
  SHA-256 fed in pieces of Chunk bytes (the last one shorter), to test the
  streaming interface.
**/
MH_EXPORT int
mh_sha256_chunked (
  CONST UINT8  *Data,
  UINTN        Size,
  UINTN        Chunk,
  UINT8        *Digest
  )
{
  OVMF_MH_SHA256_CONTEXT  Context;
  UINTN                   Done;
  UINTN                   Piece;

  if ((Chunk == 0) || !MigrationHelperSha256Init (&Context)) {
    return 0;
  }

  for (Done = 0; Done < Size; Done += Piece) {
    Piece = Size - Done;
    if (Piece > Chunk) {
      Piece = Chunk;
    }

    if (!MigrationHelperSha256Update (&Context, Data + Done, Piece)) {
      return 0;
    }
  }

  return MigrationHelperSha256Final (&Context, Digest) ? 1 : 0;
}

MH_EXPORT int
mh_hmac_sha256 (
  CONST UINT8  *Key,
  UINTN        KeySize,
  CONST UINT8  *Data,
  UINTN        Size,
  UINT8        *Mac
  )
{
  return MigrationHelperHmacSha256 (Key, KeySize, Data, Size, Mac) ? 1 : 0;
}

MH_EXPORT int
mh_hkdf_sha256 (
  CONST UINT8  *Salt,
  UINTN        SaltSize,
  CONST UINT8  *Ikm,
  UINTN        IkmSize,
  CONST UINT8  *Info,
  UINTN        InfoSize,
  UINT8        *Out,
  UINTN        OutSize
  )
{
  return MigrationHelperHkdfSha256 (Salt, SaltSize, Ikm, IkmSize, Info, InfoSize, Out, OutSize) ? 1 : 0;
}

MH_EXPORT int
mh_hkdf_sha256_extract (
  CONST UINT8  *Salt,
  UINTN        SaltSize,
  CONST UINT8  *Ikm,
  UINTN        IkmSize,
  UINT8        *Prk
  )
{
  return MigrationHelperHkdfSha256Extract (Salt, SaltSize, Ikm, IkmSize, Prk) ? 1 : 0;
}

MH_EXPORT int
mh_hkdf_sha256_expand (
  CONST UINT8  *Prk,
  UINTN        PrkSize,
  CONST UINT8  *Info,
  UINTN        InfoSize,
  UINT8        *Out,
  UINTN        OutSize
  )
{
  return MigrationHelperHkdfSha256Expand (Prk, PrkSize, Info, InfoSize, Out, OutSize) ? 1 : 0;
}
