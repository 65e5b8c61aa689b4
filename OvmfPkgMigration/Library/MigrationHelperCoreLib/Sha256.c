/** @file
  SHA-256 (FIPS 180-4), portable C, streaming.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

//
// First 32 bits of the fractional parts of the cube roots of the first 64
// primes (FIPS 180-4 section 4.2.2).
//
STATIC CONST UINT32  mMhSha256K[64] = {
  0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5,
  0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
  0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3,
  0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
  0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC,
  0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
  0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7,
  0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
  0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13,
  0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
  0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3,
  0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
  0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5,
  0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
  0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208,
  0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
};

//
// First 32 bits of the fractional parts of the square roots of the first 8
// primes (FIPS 180-4 section 5.3.3).
//
STATIC CONST UINT32  mMhSha256Initial[8] = {
  0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
  0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19
};

#define MH_ROTR32(X, N)  (((X) >> (N)) | ((X) << (32 - (N))))

/**
  Read a big-endian 32-bit word from any address.

  @param[in] Bytes  Four bytes.

  @return The word.
**/
STATIC
UINT32
InternalMhLoadBe32 (
  IN CONST UINT8  *Bytes
  )
{
  return ((UINT32)Bytes[0] << 24) | ((UINT32)Bytes[1] << 16) |
         ((UINT32)Bytes[2] << 8) | (UINT32)Bytes[3];
}

/**
  Write a big-endian 32-bit word to any address.

  @param[out] Bytes  Receives four bytes.
  @param[in]  Value  The word.
**/
STATIC
VOID
InternalMhStoreBe32 (
  OUT UINT8   *Bytes,
  IN  UINT32  Value
  )
{
  Bytes[0] = (UINT8)(Value >> 24);
  Bytes[1] = (UINT8)(Value >> 16);
  Bytes[2] = (UINT8)(Value >> 8);
  Bytes[3] = (UINT8)Value;
}

/**
  The SHA-256 compression function on one 64-byte block.

  @param[in,out] State  The eight chaining words.
  @param[in]     Block  64 bytes.
**/
STATIC
VOID
InternalMhSha256Compress (
  IN OUT UINT32       *State,
  IN     CONST UINT8  *Block
  )
{
  UINT32  W[64];
  UINT32  A;
  UINT32  B;
  UINT32  C;
  UINT32  D;
  UINT32  E;
  UINT32  F;
  UINT32  G;
  UINT32  H;
  UINT32  T1;
  UINT32  T2;
  UINTN   Index;

  for (Index = 0; Index < 16; Index++) {
    W[Index] = InternalMhLoadBe32 (Block + 4 * Index);
  }

  for (Index = 16; Index < 64; Index++) {
    W[Index] = (MH_ROTR32 (W[Index - 2], 17) ^ MH_ROTR32 (W[Index - 2], 19) ^ (W[Index - 2] >> 10)) +
               W[Index - 7] +
               (MH_ROTR32 (W[Index - 15], 7) ^ MH_ROTR32 (W[Index - 15], 18) ^ (W[Index - 15] >> 3)) +
               W[Index - 16];
  }

  A = State[0];
  B = State[1];
  C = State[2];
  D = State[3];
  E = State[4];
  F = State[5];
  G = State[6];
  H = State[7];

  for (Index = 0; Index < 64; Index++) {
    T1 = H + (MH_ROTR32 (E, 6) ^ MH_ROTR32 (E, 11) ^ MH_ROTR32 (E, 25)) +
         ((E & F) ^ (~E & G)) + mMhSha256K[Index] + W[Index];
    T2 = (MH_ROTR32 (A, 2) ^ MH_ROTR32 (A, 13) ^ MH_ROTR32 (A, 22)) +
         ((A & B) ^ (A & C) ^ (B & C));
    H = G;
    G = F;
    F = E;
    E = D + T1;
    D = C;
    C = B;
    B = A;
    A = T1 + T2;
  }

  State[0] += A;
  State[1] += B;
  State[2] += C;
  State[3] += D;
  State[4] += E;
  State[5] += F;
  State[6] += G;
  State[7] += H;
}

/**
  Start a SHA-256 computation.

  @param[out] Context  The context to initialise.

  @retval TRUE   Context is ready.
  @retval FALSE  Context is NULL.
**/
BOOLEAN
EFIAPI
MigrationHelperSha256Init (
  OUT OVMF_MH_SHA256_CONTEXT  *Context
  )
{
  if (Context == NULL) {
    return FALSE;
  }

  ZeroMem (Context, sizeof (*Context));
  CopyMem (Context->State, mMhSha256Initial, sizeof (Context->State));
  return TRUE;
}

/**
  Hash more data.

  @param[in,out] Context  A context from MigrationHelperSha256Init.
  @param[in]     Data     The data; may be NULL when Size is 0.
  @param[in]     Size     Its size in bytes.

  @retval TRUE   The data was absorbed.
  @retval FALSE  Context is NULL, or Data is NULL with a non-zero Size;
                 nothing was absorbed.
**/
BOOLEAN
EFIAPI
MigrationHelperSha256Update (
  IN OUT OVMF_MH_SHA256_CONTEXT  *Context,
  IN     CONST VOID              *Data  OPTIONAL,
  IN     UINTN                   Size
  )
{
  CONST UINT8  *Bytes;
  UINTN        Fill;

  if ((Context == NULL) || ((Data == NULL) && (Size != 0)) ||
      (Context->BufferSize >= OVMF_MH_SHA256_BLOCK_SIZE))
  {
    return FALSE;
  }

  Bytes               = (CONST UINT8 *)Data;
  Context->TotalSize += Size;

  if (Context->BufferSize > 0) {
    Fill = OVMF_MH_SHA256_BLOCK_SIZE - Context->BufferSize;
    if (Fill > Size) {
      Fill = Size;
    }

    CopyMem (Context->Buffer + Context->BufferSize, Bytes, Fill);
    Context->BufferSize += Fill;
    Bytes               += Fill;
    Size                -= Fill;
    if (Context->BufferSize < OVMF_MH_SHA256_BLOCK_SIZE) {
      return TRUE;
    }

    InternalMhSha256Compress (Context->State, Context->Buffer);
    Context->BufferSize = 0;
  }

  while (Size >= OVMF_MH_SHA256_BLOCK_SIZE) {
    InternalMhSha256Compress (Context->State, Bytes);
    Bytes += OVMF_MH_SHA256_BLOCK_SIZE;
    Size  -= OVMF_MH_SHA256_BLOCK_SIZE;
  }

  if (Size > 0) {
    CopyMem (Context->Buffer, Bytes, Size);
    Context->BufferSize = Size;
  }

  return TRUE;
}

/**
  Finish a SHA-256 computation and wipe the context.

  @param[in,out] Context  The context; it must be re-initialised before reuse.
  @param[out]    Digest   Receives the 32-byte digest.

  @retval TRUE   Digest is written.
  @retval FALSE  A pointer is NULL.
**/
BOOLEAN
EFIAPI
MigrationHelperSha256Final (
  IN OUT OVMF_MH_SHA256_CONTEXT  *Context,
  OUT    UINT8                   *Digest
  )
{
  UINT64  BitLength;
  UINTN   Used;
  UINTN   Index;

  if ((Context == NULL) || (Digest == NULL) ||
      (Context->BufferSize >= OVMF_MH_SHA256_BLOCK_SIZE))
  {
    return FALSE;
  }

  BitLength = Context->TotalSize << 3;
  Used      = Context->BufferSize;

  Context->Buffer[Used++] = 0x80;
  if (Used > OVMF_MH_SHA256_BLOCK_SIZE - 8) {
    ZeroMem (Context->Buffer + Used, OVMF_MH_SHA256_BLOCK_SIZE - Used);
    InternalMhSha256Compress (Context->State, Context->Buffer);
    Used = 0;
  }

  ZeroMem (Context->Buffer + Used, OVMF_MH_SHA256_BLOCK_SIZE - 8 - Used);
  InternalMhStoreBe32 (Context->Buffer + 56, (UINT32)(BitLength >> 32));
  InternalMhStoreBe32 (Context->Buffer + 60, (UINT32)BitLength);
  InternalMhSha256Compress (Context->State, Context->Buffer);

  for (Index = 0; Index < 8; Index++) {
    InternalMhStoreBe32 (Digest + 4 * Index, Context->State[Index]);
  }

  MigrationHelperSecureZero (Context, sizeof (*Context));
  return TRUE;
}

/**
  One-shot SHA-256.

  @param[in]  Data    The data; may be NULL when Size is 0.
  @param[in]  Size    Its size in bytes.
  @param[out] Digest  Receives the 32-byte digest.

  @retval TRUE   Digest is written.
  @retval FALSE  Digest is NULL, or Data is NULL with a non-zero Size.
**/
BOOLEAN
EFIAPI
MigrationHelperSha256 (
  IN  CONST VOID  *Data  OPTIONAL,
  IN  UINTN       Size,
  OUT UINT8       *Digest
  )
{
  OVMF_MH_SHA256_CONTEXT  Context;

  if ((Digest == NULL) || ((Data == NULL) && (Size != 0))) {
    return FALSE;
  }

  MigrationHelperSha256Init (&Context);
  MigrationHelperSha256Update (&Context, Data, Size);
  return MigrationHelperSha256Final (&Context, Digest);
}
