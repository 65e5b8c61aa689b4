/** @file
  AES-OCB3 (RFC 7253) with a 96-bit nonce and a 128-bit tag, on top of the
  AES dispatch: whole blocks go to the VAES loop, the AES-NI 8-way loop or
  to the portable loop below, everything else (nonce, associated data, partial block, tag)
  is shared and uses single-block AES through the same dispatch.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

/**
  Number of trailing zero bits of a non-zero value.

  @param[in] Value  Non-zero.

  @return ntz(Value); 64 for zero.
**/
UINTN
InternalMhNtz64 (
  IN UINT64  Value
  )
{
  UINTN  Count;

  if (Value == 0) {
    return 64;
  }

  Count = 0;
  while ((Value & 1) == 0) {
    Value >>= 1;
    Count++;
  }

  return Count;
}

/**
  Out = A ^ B on 16 bytes. Any of the buffers may be the same.

  @param[out] Out  16 bytes.
  @param[in]  A    16 bytes.
  @param[in]  B    16 bytes.
**/
STATIC
VOID
InternalMhXor16 (
  OUT UINT8        *Out,
  IN  CONST UINT8  *A,
  IN  CONST UINT8  *B
  )
{
  UINTN  Index;

  for (Index = 0; Index < OVMF_MH_AES_BLOCK_SIZE; Index++) {
    Out[Index] = (UINT8)(A[Index] ^ B[Index]);
  }
}

/**
  double() of RFC 7253: shift left by one bit, reduce by x^128 + x^7 + x^2
  + x + 1, in constant time.

  @param[out] Out  16 bytes; may equal In.
  @param[in]  In   16 bytes.
**/
STATIC
VOID
InternalMhOcbDouble (
  OUT UINT8        *Out,
  IN  CONST UINT8  *In
  )
{
  UINT8  Carry;
  UINTN  Index;

  Carry = (UINT8)(In[0] >> 7);
  for (Index = 0; Index < OVMF_MH_AES_BLOCK_SIZE - 1; Index++) {
    Out[Index] = (UINT8)((In[Index] << 1) | (In[Index + 1] >> 7));
  }

  Out[OVMF_MH_AES_BLOCK_SIZE - 1] = (UINT8)((In[OVMF_MH_AES_BLOCK_SIZE - 1] << 1) ^ (0x87 & (0 - Carry)));
}

/**
  Single-block encryption through the dispatch. The key was validated.

  @param[in]  Key  The AES key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
STATIC
VOID
InternalMhOcbEncipher (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  if (Key->Path == OVMF_MH_CRYPTO_PATH_AESNI) {
    InternalMhAesNiEncryptBlock (Key, In, Out);
  } else {
    InternalMhAesEncryptBlockPortable (Key, In, Out);
  }
}

/**
  Prepare an AES-OCB3 key.

  @param[out] Key         Receives the key.
  @param[in]  KeyBytes    The raw key.
  @param[in]  KeySize     32 (AES-256, the helper's transport key) or 16.
  @param[in]  AllowAesNi  FALSE forces the portable path.

  @retval TRUE   Key is ready.
  @retval FALSE  A pointer is NULL or KeySize is not supported; Key (when
                 not NULL) is zeroed and unusable.
**/
BOOLEAN
EFIAPI
MigrationHelperOcbInit (
  OUT OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8      *KeyBytes,
  IN  UINTN            KeySize,
  IN  BOOLEAN          AllowAesNi
  )
{
  return MigrationHelperOcbInitPaths (Key, KeyBytes, KeySize, AllowAesNi ? OVMF_MH_OCB_ALLOW_AESNI : 0);
}

/**
  Prepare an AES-OCB3 key, choosing among the paths Allow permits the
  fastest one the CPU has: VAES, AES-NI, or the portable code.

  @param[out] Key       Receives the key.
  @param[in]  KeyBytes  The raw key.
  @param[in]  KeySize   32 (AES-256, the helper's transport key) or 16.
  @param[in]  Allow     OVMF_MH_OCB_ALLOW_* bits; 0 forces the portable path.

  @retval TRUE   Key is ready.
  @retval FALSE  A pointer is NULL or KeySize is not supported; Key (when
                 not NULL) is zeroed and unusable.
**/
BOOLEAN
EFIAPI
MigrationHelperOcbInitPaths (
  OUT OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8      *KeyBytes,
  IN  UINTN            KeySize,
  IN  UINT32           Allow
  )
{
  UINTN  Index;

  if (Key == NULL) {
    return FALSE;
  }

  MigrationHelperSecureZero (Key, sizeof (*Key));
  if (!MigrationHelperAesInit (&Key->Aes, KeyBytes, KeySize, (BOOLEAN)((Allow & OVMF_MH_OCB_ALLOW_AESNI) != 0))) {
    return FALSE;
  }

  Key->UseVaes = (BOOLEAN)((Key->Aes.Path == OVMF_MH_CRYPTO_PATH_AESNI) &&
                           ((Allow & OVMF_MH_OCB_ALLOW_VAES) != 0) &&
                           InternalMhVaesBuilt () && MigrationHelperCpuHasVaes ());

  //
  // L_* = E(K, zeros(128)); LStar is already zero.
  //
  InternalMhOcbEncipher (&Key->Aes, Key->LStar, Key->LStar);
  InternalMhOcbDouble (Key->LDollar, Key->LStar);
  InternalMhOcbDouble (Key->L[0], Key->LDollar);
  for (Index = 1; Index < OVMF_MH_OCB_L_COUNT; Index++) {
    InternalMhOcbDouble (Key->L[Index], Key->L[Index - 1]);
  }

  return TRUE;
}

/**
  Wipe an OCB key with volatile stores followed by a memory fence.

  @param[in,out] Key  The key; may be NULL.
**/
VOID
EFIAPI
MigrationHelperOcbWipe (
  IN OUT OVMF_MH_OCB_KEY  *Key
  )
{
  if (Key != NULL) {
    MigrationHelperSecureZero (Key, sizeof (*Key));
  }
}

/**
  Offset_0 from the nonce (RFC 7253 section 4.2, TAGLEN 128, 96-bit nonce).

  @param[in]  Key     The OCB key.
  @param[in]  Nonce   12 bytes.
  @param[out] Offset  Receives 16 bytes.
**/
STATIC
VOID
InternalMhOcbInitialOffset (
  IN  CONST OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8            *Nonce,
  OUT UINT8                  *Offset
  )
{
  UINT8  Block[OVMF_MH_AES_BLOCK_SIZE];
  UINT8  Stretch[OVMF_MH_AES_BLOCK_SIZE + 8];
  UINTN  Bottom;
  UINTN  ByteShift;
  UINTN  BitShift;
  UINTN  Index;

  //
  // Nonce = num2str(TAGLEN mod 128, 7) || zeros(120 - 96) || 1 || N.
  // TAGLEN mod 128 is 0, so the first three bytes are zero.
  //
  Block[0] = 0;
  Block[1] = 0;
  Block[2] = 0;
  Block[3] = 1;
  CopyMem (&Block[4], Nonce, OVMF_MH_OCB_NONCE_SIZE);

  Bottom                              = Block[OVMF_MH_AES_BLOCK_SIZE - 1] & 0x3F;
  Block[OVMF_MH_AES_BLOCK_SIZE - 1] &= 0xC0;

  //
  // Ktop = E(K, Nonce[1..122] || zeros(6));
  // Stretch = Ktop || (Ktop[1..64] xor Ktop[9..72]).
  //
  InternalMhOcbEncipher (&Key->Aes, Block, Stretch);
  for (Index = 0; Index < 8; Index++) {
    Stretch[OVMF_MH_AES_BLOCK_SIZE + Index] = (UINT8)(Stretch[Index] ^ Stretch[Index + 1]);
  }

  //
  // Offset_0 = Stretch[1+bottom..128+bottom]. The nonce is public, so
  // branching on Bottom is fine.
  //
  ByteShift = Bottom / 8;
  BitShift  = Bottom % 8;
  for (Index = 0; Index < OVMF_MH_AES_BLOCK_SIZE; Index++) {
    if (BitShift == 0) {
      Offset[Index] = Stretch[Index + ByteShift];
    } else {
      Offset[Index] = (UINT8)((Stretch[Index + ByteShift] << BitShift) |
                              (Stretch[Index + ByteShift + 1] >> (8 - BitShift)));
    }
  }

  MigrationHelperSecureZero (Stretch, sizeof (Stretch));
}

/**
  HASH(K, A) of RFC 7253 section 4.1.

  @param[in]  Key     The OCB key.
  @param[in]  Ad      Associated data.
  @param[in]  AdSize  Its size in bytes.
  @param[out] Sum     Receives 16 bytes.
**/
STATIC
VOID
InternalMhOcbHash (
  IN  CONST OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8            *Ad,
  IN  UINTN                  AdSize,
  OUT UINT8                  *Sum
  )
{
  UINT8   Offset[OVMF_MH_AES_BLOCK_SIZE];
  UINT8   Block[OVMF_MH_AES_BLOCK_SIZE];
  UINT64  BlockIndex;
  UINTN   Rest;

  ZeroMem (Sum, OVMF_MH_AES_BLOCK_SIZE);
  ZeroMem (Offset, sizeof (Offset));

  BlockIndex = 0;
  while (AdSize >= OVMF_MH_AES_BLOCK_SIZE) {
    BlockIndex++;
    InternalMhXor16 (Offset, Offset, Key->L[InternalMhNtz64 (BlockIndex)]);
    InternalMhXor16 (Block, Ad, Offset);
    InternalMhOcbEncipher (&Key->Aes, Block, Block);
    InternalMhXor16 (Sum, Sum, Block);
    Ad     += OVMF_MH_AES_BLOCK_SIZE;
    AdSize -= OVMF_MH_AES_BLOCK_SIZE;
  }

  Rest = AdSize;
  if (Rest > 0) {
    //
    // CipherInput = (A_* || 1 || zeros(127 - bitlen(A_*))) xor Offset_*.
    //
    InternalMhXor16 (Offset, Offset, Key->LStar);
    ZeroMem (Block, sizeof (Block));
    CopyMem (Block, Ad, Rest);
    Block[Rest] = 0x80;
    InternalMhXor16 (Block, Block, Offset);
    InternalMhOcbEncipher (&Key->Aes, Block, Block);
    InternalMhXor16 (Sum, Sum, Block);
  }

  MigrationHelperSecureZero (Offset, sizeof (Offset));
  MigrationHelperSecureZero (Block, sizeof (Block));
}

/**
  OCB processing of whole blocks with the portable AES; the same contract
  as InternalMhAesNiOcbBlocks.

  @param[in]     Key         The OCB key.
  @param[in]     Decrypt     FALSE to encrypt, TRUE to decrypt.
  @param[in]     BlockIndex  Blocks of the message already done.
  @param[in]     In          BlockCount * 16 bytes.
  @param[out]    Out         BlockCount * 16 bytes; may equal In.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      Running offset.
  @param[in,out] Checksum    Running checksum.
**/
STATIC
VOID
InternalMhOcbBlocksPortable (
  IN     CONST OVMF_MH_OCB_KEY  *Key,
  IN     BOOLEAN                Decrypt,
  IN     UINT64                 BlockIndex,
  IN     CONST UINT8            *In,
  OUT    UINT8                  *Out,
  IN     UINTN                  BlockCount,
  IN OUT UINT8                  *Offset,
  IN OUT UINT8                  *Checksum
  )
{
  UINT8  Block[OVMF_MH_AES_BLOCK_SIZE];

  while (BlockCount > 0) {
    BlockIndex++;
    InternalMhXor16 (Offset, Offset, Key->L[InternalMhNtz64 (BlockIndex)]);
    InternalMhXor16 (Block, In, Offset);
    if (Decrypt) {
      InternalMhAesDecryptBlockPortable (&Key->Aes, Block, Block);
      InternalMhXor16 (Out, Block, Offset);
      InternalMhXor16 (Checksum, Checksum, Out);
    } else {
      //
      // Read the plaintext into the checksum before Out (maybe == In) is
      // overwritten.
      //
      InternalMhXor16 (Checksum, Checksum, In);
      InternalMhAesEncryptBlockPortable (&Key->Aes, Block, Block);
      InternalMhXor16 (Out, Block, Offset);
    }

    In  += OVMF_MH_AES_BLOCK_SIZE;
    Out += OVMF_MH_AES_BLOCK_SIZE;
    BlockCount--;
  }

  MigrationHelperSecureZero (Block, sizeof (Block));
}

/**
  Tell whether a buffer of Size bytes at Buffer is acceptable: NULL only
  when empty, and not wrapping around the address space.

  @param[in] Buffer  The buffer.
  @param[in] Size    Its size.

  @retval TRUE   Acceptable.
  @retval FALSE  Not acceptable.
**/
STATIC
BOOLEAN
InternalMhBufferOk (
  IN CONST VOID  *Buffer,
  IN UINTN       Size
  )
{
  if (Size == 0) {
    return TRUE;
  }

  if (Buffer == NULL) {
    return FALSE;
  }

  return (BOOLEAN)((UINTN)Buffer <= MAX_UINTN - Size);
}

/**
  Tell whether In and Out are usable together: identical, or disjoint.

  @param[in] In    Input buffer (already checked with InternalMhBufferOk).
  @param[in] Out   Output buffer (already checked with InternalMhBufferOk).
  @param[in] Size  Size of both.

  @retval TRUE   Identical or disjoint.
  @retval FALSE  They partially overlap.
**/
STATIC
BOOLEAN
InternalMhInOutOk (
  IN CONST VOID  *In,
  IN CONST VOID  *Out,
  IN UINTN       Size
  )
{
  UINTN  InStart;
  UINTN  OutStart;

  if ((Size == 0) || (In == Out)) {
    return TRUE;
  }

  InStart  = (UINTN)In;
  OutStart = (UINTN)Out;
  return (BOOLEAN)((InStart + Size <= OutStart) || (OutStart + Size <= InStart));
}

/**
  The common part of encryption and decryption, after validation.

  @param[in]  Key      A valid OCB key.
  @param[in]  Decrypt  FALSE to encrypt, TRUE to decrypt.
  @param[in]  Nonce    12 bytes.
  @param[in]  Ad       Associated data.
  @param[in]  AdSize   Its size.
  @param[in]  In       Input text.
  @param[in]  Size     Its size.
  @param[out] Out      Output text; may equal In.
  @param[out] FullTag  Receives the computed 16-byte tag.
**/
STATIC
VOID
InternalMhOcbCrypt (
  IN  CONST OVMF_MH_OCB_KEY  *Key,
  IN  BOOLEAN                Decrypt,
  IN  CONST UINT8            *Nonce,
  IN  CONST UINT8            *Ad,
  IN  UINTN                  AdSize,
  IN  CONST UINT8            *In,
  IN  UINTN                  Size,
  OUT UINT8                  *Out,
  OUT UINT8                  *FullTag
  )
{
  UINT8  Offset[OVMF_MH_AES_BLOCK_SIZE];
  UINT8  Checksum[OVMF_MH_AES_BLOCK_SIZE];
  UINT8  Pad[OVMF_MH_AES_BLOCK_SIZE];
  UINT8  Sum[OVMF_MH_AES_BLOCK_SIZE];
  UINTN  BlockCount;
  UINTN  Rest;
  UINTN  Index;
  UINT8  Byte;

  InternalMhOcbInitialOffset (Key, Nonce, Offset);
  ZeroMem (Checksum, sizeof (Checksum));

  BlockCount = Size / OVMF_MH_AES_BLOCK_SIZE;
  Rest       = Size % OVMF_MH_AES_BLOCK_SIZE;
  if (BlockCount > 0) {
    if (Key->UseVaes && (Key->Aes.Path == OVMF_MH_CRYPTO_PATH_AESNI)) {
      InternalMhVaesOcbBlocks (Key, Decrypt, 0, In, Out, BlockCount, Offset, Checksum);
    } else if (Key->Aes.Path == OVMF_MH_CRYPTO_PATH_AESNI) {
      InternalMhAesNiOcbBlocks (Key, Decrypt, 0, In, Out, BlockCount, Offset, Checksum);
    } else {
      InternalMhOcbBlocksPortable (Key, Decrypt, 0, In, Out, BlockCount, Offset, Checksum);
    }

    In  += BlockCount * OVMF_MH_AES_BLOCK_SIZE;
    Out += BlockCount * OVMF_MH_AES_BLOCK_SIZE;
  }

  if (Rest > 0) {
    //
    // Offset_* = Offset_m xor L_*; Pad = E(K, Offset_*);
    // C_* = P_* xor Pad[1..bitlen(P_*)];
    // Checksum_* = Checksum_m xor (P_* || 1 || zeros(127 - bitlen(P_*))).
    //
    InternalMhXor16 (Offset, Offset, Key->LStar);
    InternalMhOcbEncipher (&Key->Aes, Offset, Pad);
    for (Index = 0; Index < Rest; Index++) {
      if (Decrypt) {
        Byte       = (UINT8)(In[Index] ^ Pad[Index]);
        Out[Index] = Byte;
      } else {
        Byte       = In[Index];
        Out[Index] = (UINT8)(Byte ^ Pad[Index]);
      }

      Checksum[Index] ^= Byte;
    }

    Checksum[Rest] ^= 0x80;
  }

  //
  // Tag = E(K, Checksum xor Offset xor L_$) xor HASH(K, A).
  //
  InternalMhXor16 (FullTag, Checksum, Offset);
  InternalMhXor16 (FullTag, FullTag, Key->LDollar);
  InternalMhOcbEncipher (&Key->Aes, FullTag, FullTag);
  InternalMhOcbHash (Key, Ad, AdSize, Sum);
  InternalMhXor16 (FullTag, FullTag, Sum);

  MigrationHelperSecureZero (Offset, sizeof (Offset));
  MigrationHelperSecureZero (Checksum, sizeof (Checksum));
  MigrationHelperSecureZero (Pad, sizeof (Pad));
  MigrationHelperSecureZero (Sum, sizeof (Sum));
}

/**
  Encrypt and authenticate with AES-OCB3, 96-bit nonce, 128-bit tag.

  Cipher may equal Plain (in place); other overlaps are refused.

  @param[in]  Key     An initialised OCB key.
  @param[in]  Nonce   12 bytes, never reused with the same key.
  @param[in]  Ad      Associated data; may be NULL when AdSize is 0.
  @param[in]  AdSize  Size of Ad in bytes.
  @param[in]  Plain   Plaintext; may be NULL when Size is 0.
  @param[in]  Size    Size of Plain and Cipher in bytes.
  @param[out] Cipher  Receives Size bytes of ciphertext.
  @param[out] Tag     Receives the 16-byte tag.

  @retval TRUE   Cipher and Tag are written.
  @retval FALSE  Bad arguments or uninitialised key. Tag is zeroed, and so is
                 Cipher when it is a valid buffer that does not partially
                 overlap Plain.
**/
BOOLEAN
EFIAPI
MigrationHelperOcbEncrypt (
  IN  CONST OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8            *Nonce,
  IN  CONST UINT8            *Ad      OPTIONAL,
  IN  UINTN                  AdSize,
  IN  CONST UINT8            *Plain   OPTIONAL,
  IN  UINTN                  Size,
  OUT UINT8                  *Cipher  OPTIONAL,
  OUT UINT8                  *Tag
  )
{
  BOOLEAN  CipherOk;

  CipherOk = InternalMhBufferOk (Cipher, Size);
  if ((Key == NULL) || !InternalMhAesKeyIsValid (&Key->Aes) || (Nonce == NULL) ||
      (Tag == NULL) || !InternalMhBufferOk (Ad, AdSize) ||
      !InternalMhBufferOk (Plain, Size) || !CipherOk ||
      !InternalMhInOutOk (Plain, Cipher, Size))
  {
    if (Tag != NULL) {
      ZeroMem (Tag, OVMF_MH_OCB_TAG_SIZE);
    }

    if (CipherOk && (Size > 0) &&
        (!InternalMhBufferOk (Plain, Size) || InternalMhInOutOk (Plain, Cipher, Size)))
    {
      ZeroMem (Cipher, Size);
    }

    return FALSE;
  }

  InternalMhOcbCrypt (Key, FALSE, Nonce, Ad, AdSize, Plain, Size, Cipher, Tag);
  return TRUE;
}

/**
  Decrypt and verify with AES-OCB3, 96-bit nonce, 128-bit tag.

  The plaintext is written to Plain before the tag is checked, so Plain must
  be helper-private memory; copy it out only after TRUE. On failure Plain is
  zeroed. The tag comparison takes the same time wherever the tags differ.
  Plain may equal Cipher (in place); other overlaps are refused.

  @param[in]  Key     An initialised OCB key.
  @param[in]  Nonce   12 bytes.
  @param[in]  Ad      Associated data; may be NULL when AdSize is 0.
  @param[in]  AdSize  Size of Ad in bytes.
  @param[in]  Cipher  Ciphertext; may be NULL when Size is 0.
  @param[in]  Size    Size of Cipher and Plain in bytes.
  @param[in]  Tag     The 16-byte tag to check.
  @param[out] Plain   Receives Size bytes of plaintext.

  @retval TRUE   The tag verified; Plain holds the plaintext.
  @retval FALSE  The tag did not verify, or bad arguments, or uninitialised
                 key; Plain (when valid) is zeroed.
**/
BOOLEAN
EFIAPI
MigrationHelperOcbDecrypt (
  IN  CONST OVMF_MH_OCB_KEY  *Key,
  IN  CONST UINT8            *Nonce,
  IN  CONST UINT8            *Ad      OPTIONAL,
  IN  UINTN                  AdSize,
  IN  CONST UINT8            *Cipher  OPTIONAL,
  IN  UINTN                  Size,
  IN  CONST UINT8            *Tag,
  OUT UINT8                  *Plain   OPTIONAL
  )
{
  UINT8    Computed[OVMF_MH_OCB_TAG_SIZE];
  UINT32   Difference;
  UINTN    Index;
  BOOLEAN  PlainOk;

  PlainOk = InternalMhBufferOk (Plain, Size);
  if ((Key == NULL) || !InternalMhAesKeyIsValid (&Key->Aes) || (Nonce == NULL) ||
      (Tag == NULL) || !InternalMhBufferOk (Ad, AdSize) ||
      !InternalMhBufferOk (Cipher, Size) || !PlainOk ||
      !InternalMhInOutOk (Cipher, Plain, Size))
  {
    if (PlainOk && (Size > 0) &&
        (!InternalMhBufferOk (Cipher, Size) || InternalMhInOutOk (Cipher, Plain, Size)))
    {
      ZeroMem (Plain, Size);
    }

    return FALSE;
  }

  InternalMhOcbCrypt (Key, TRUE, Nonce, Ad, AdSize, Cipher, Size, Plain, Computed);

  Difference = 0;
  for (Index = 0; Index < OVMF_MH_OCB_TAG_SIZE; Index++) {
    Difference |= (UINT32)(Computed[Index] ^ Tag[Index]);
  }

  MigrationHelperSecureZero (Computed, sizeof (Computed));

  //
  // (Difference - 1) >> 31 is 1 exactly when Difference is 0 (it is < 256).
  //
  if (((Difference - 1) >> 31) == 0) {
    if (Size > 0) {
      ZeroMem (Plain, Size);
      MemoryFence ();
    }

    return FALSE;
  }

  return TRUE;
}
