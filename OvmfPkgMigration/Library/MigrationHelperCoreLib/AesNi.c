/** @file
  AES-NI path: CPU feature detection, single-block AES and the OCB3 bulk
  loop with eight blocks interleaved.

  Firmware rules for this file (the code runs in place from flash, at an
  address that need not be 16-byte aligned, with SSE disabled by default in
  the compiler flags):
  - every function that touches __m128i carries MH_AESNI_TARGET, and no
    __m128i crosses a non-inlined call;
  - no vector constants: nothing is materialised from .rodata, every load
    of data is _mm_loadu_si128 (a legacy-SSE memory operand would need 16-byte
    alignment, an unaligned load is never folded into one);
  - the non-inlined entry points realign the stack on entry, so stack
    spills of __m128i are aligned whatever the caller's stack alignment.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

#if defined (__GNUC__) && (defined (MDE_CPU_X64) || defined (MDE_CPU_IA32))
#define MH_AESNI_BUILT  1
#else
#define MH_AESNI_BUILT  0
#endif

/**
  Tell whether the CPU has AES-NI (CPUID.01H:ECX.AESNI[bit 25]) and SSE2.

  The caller must run with SSE enabled (CR4.OSFXSR set), as OVMF's SEC does
  after InitializeFloatingPointUnits().

  @retval TRUE   The AES-NI path can be used.
  @retval FALSE  Only the portable path can be used.
**/
BOOLEAN
EFIAPI
MigrationHelperCpuHasAesNi (
  VOID
  )
{
 #if defined (MDE_CPU_X64) || defined (MDE_CPU_IA32)
  UINT32  MaxLeaf;
  UINT32  Ecx;
  UINT32  Edx;

  MaxLeaf = 0;
  AsmCpuid (0, &MaxLeaf, NULL, NULL, NULL);
  if (MaxLeaf < 1) {
    return FALSE;
  }

  Ecx = 0;
  Edx = 0;
  AsmCpuid (1, NULL, NULL, &Ecx, &Edx);
  return (BOOLEAN)(((Ecx & BIT25) != 0) && ((Edx & BIT26) != 0));
 #else
  return FALSE;
 #endif
}

#if MH_AESNI_BUILT && defined (MDE_CPU_X64)
//
// The firmware's C code is built without SSE: naming the vector registers
// needs the SSE target for this one function; noinline keeps the wipe
// where it is called.
//
#define MH_WIPE_TARGET  __attribute__ ((target ("sse2"), noinline))
#else
#define MH_WIPE_TARGET
#endif

/**
  Zero the sixteen vector registers, whole (YMM) when the AVX register
  state is enabled, else their XMM part.

  The page crypto leaves round keys, OCB offsets and plaintext in them, and
  a halted helper's registers are what the host sees at the exit (on SEV
  without ES, the register state is not encrypted). Called before a
  response is published and when keys are wiped.

  This function is not EFIAPI on purpose: under the Microsoft calling
  convention XMM6-XMM15 are callee-saved, so the compiler would save them
  before the wipe and restore them after it.
**/
VOID
MH_WIPE_TARGET
InternalMhWipeVectorRegisters (
  VOID
  )
{
 #if MH_AESNI_BUILT && defined (MDE_CPU_X64)
  UINT32  Ecx;

  Ecx = 0;
  AsmCpuid (1, NULL, NULL, &Ecx, NULL);
  //
  // XGETBV is only defined once CR4.OSXSAVE is set (CPUID.1:ECX bit 27).
  //
  if (((Ecx & BIT27) != 0) && ((AsmXGetBv (0) & (BIT1 | BIT2)) == (BIT1 | BIT2))) {
    __asm__ __volatile__ (
      "vzeroall"
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
      "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory"
      );
  } else {
    __asm__ __volatile__ (
      "pxor %%xmm0, %%xmm0\n\t"
      "pxor %%xmm1, %%xmm1\n\t"
      "pxor %%xmm2, %%xmm2\n\t"
      "pxor %%xmm3, %%xmm3\n\t"
      "pxor %%xmm4, %%xmm4\n\t"
      "pxor %%xmm5, %%xmm5\n\t"
      "pxor %%xmm6, %%xmm6\n\t"
      "pxor %%xmm7, %%xmm7\n\t"
      "pxor %%xmm8, %%xmm8\n\t"
      "pxor %%xmm9, %%xmm9\n\t"
      "pxor %%xmm10, %%xmm10\n\t"
      "pxor %%xmm11, %%xmm11\n\t"
      "pxor %%xmm12, %%xmm12\n\t"
      "pxor %%xmm13, %%xmm13\n\t"
      "pxor %%xmm14, %%xmm14\n\t"
      "pxor %%xmm15, %%xmm15"
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
      "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory"
      );
  }

 #endif
}

#if MH_AESNI_BUILT

#include <wmmintrin.h>

#define MH_AESNI_TARGET  __attribute__ ((target ("aes,sse2")))
#define MH_AESNI_ENTRY   __attribute__ ((target ("aes,sse2"), force_align_arg_pointer, noinline))
#define MH_AESNI_INLINE  static __inline__ __attribute__ ((always_inline, target ("aes,sse2")))

#define MH_LOAD(Pointer)          _mm_loadu_si128 ((CONST __m128i *)(CONST VOID *)(Pointer))
#define MH_STORE(Pointer, Value)  _mm_storeu_si128 ((__m128i *)(VOID *)(Pointer), (Value))
#define MH_XOR(A, B)              _mm_xor_si128 ((A), (B))

/**
  Tell whether this build contains the AES-NI path at all.

  @retval TRUE   AesNi.c was compiled with its SIMD code.
**/
BOOLEAN
InternalMhAesNiBuilt (
  VOID
  )
{
  return TRUE;
}

/**
  Encrypt one block held in a register.

  @param[in] RoundKeys  Rounds + 1 round keys, 16 bytes each.
  @param[in] Rounds     10 or 14.
  @param[in] Block      The block.

  @return The encrypted block.
**/
MH_AESNI_INLINE
__m128i
InternalMhAesNiEncrypt1 (
  IN CONST UINT8  *RoundKeys,
  IN UINT32       Rounds,
  IN __m128i      Block
  )
{
  UINT32  Round;

  Block = MH_XOR (Block, MH_LOAD (RoundKeys));
  for (Round = 1; Round < Rounds; Round++) {
    Block = _mm_aesenc_si128 (Block, MH_LOAD (RoundKeys + 16 * Round));
  }

  return _mm_aesenclast_si128 (Block, MH_LOAD (RoundKeys + 16 * Rounds));
}

/**
  Decrypt one block held in a register.

  @param[in] RoundKeys  Rounds + 1 round keys of the equivalent inverse
                        cipher, 16 bytes each.
  @param[in] Rounds     10 or 14.
  @param[in] Block      The block.

  @return The decrypted block.
**/
MH_AESNI_INLINE
__m128i
InternalMhAesNiDecrypt1 (
  IN CONST UINT8  *RoundKeys,
  IN UINT32       Rounds,
  IN __m128i      Block
  )
{
  UINT32  Round;

  Block = MH_XOR (Block, MH_LOAD (RoundKeys));
  for (Round = 1; Round < Rounds; Round++) {
    Block = _mm_aesdec_si128 (Block, MH_LOAD (RoundKeys + 16 * Round));
  }

  return _mm_aesdeclast_si128 (Block, MH_LOAD (RoundKeys + 16 * Rounds));
}

/**
  AES-NI block encryption. Only call when Key->Path is AESNI.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
MH_AESNI_ENTRY
VOID
InternalMhAesNiEncryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  MH_STORE (
    Out,
    InternalMhAesNiEncrypt1 ((CONST UINT8 *)Key->EncRoundKeys, Key->Rounds, MH_LOAD (In))
    );
}

/**
  AES-NI block decryption. Only call when Key->Path is AESNI.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
MH_AESNI_ENTRY
VOID
InternalMhAesNiDecryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  MH_STORE (
    Out,
    InternalMhAesNiDecrypt1 ((CONST UINT8 *)Key->DecRoundKeys, Key->Rounds, MH_LOAD (In))
    );
}

/**
  OCB encryption of whole blocks, eight at a time once the block index is
  a multiple of eight. See InternalMhAesNiOcbBlocks.

  @param[in]     Key         The OCB key.
  @param[in]     BlockIndex  Blocks of the message already done.
  @param[in]     In          Plaintext.
  @param[out]    Out         Ciphertext; may equal In.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      Running offset.
  @param[in,out] Checksum    Running checksum.
**/
MH_AESNI_TARGET
STATIC
VOID
InternalMhAesNiOcbEncryptBlocks (
  IN     CONST OVMF_MH_OCB_KEY  *Key,
  IN     UINT64                 BlockIndex,
  IN     CONST UINT8            *In,
  OUT    UINT8                  *Out,
  IN     UINTN                  BlockCount,
  IN OUT UINT8                  *Offset,
  IN OUT UINT8                  *Checksum
  )
{
  CONST UINT8  *RoundKeys;
  UINT32       Rounds;
  UINT32       Round;
  __m128i      Off;
  __m128i      Sum;
  __m128i      L0;
  __m128i      L1;
  __m128i      L2;
  __m128i      First;
  __m128i      Last;
  __m128i      RoundKey;
  __m128i      O0;
  __m128i      O1;
  __m128i      O2;
  __m128i      O3;
  __m128i      O4;
  __m128i      O5;
  __m128i      O6;
  __m128i      O7;
  __m128i      B0;
  __m128i      B1;
  __m128i      B2;
  __m128i      B3;
  __m128i      B4;
  __m128i      B5;
  __m128i      B6;
  __m128i      B7;

  RoundKeys = (CONST UINT8 *)Key->Aes.EncRoundKeys;
  Rounds    = Key->Aes.Rounds;
  First     = MH_LOAD (RoundKeys);
  Last      = MH_LOAD (RoundKeys + 16 * Rounds);
  Off       = MH_LOAD (Offset);
  Sum       = MH_LOAD (Checksum);

  while ((BlockCount > 0) && ((BlockIndex & 7) != 0)) {
    BlockIndex++;
    Off = MH_XOR (Off, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex)]));
    B0  = MH_LOAD (In);
    Sum = MH_XOR (Sum, B0);
    B0  = InternalMhAesNiEncrypt1 (RoundKeys, Rounds, MH_XOR (B0, Off));
    MH_STORE (Out, MH_XOR (B0, Off));
    In  += 16;
    Out += 16;
    BlockCount--;
  }

  L0 = MH_LOAD (Key->L[0]);
  L1 = MH_LOAD (Key->L[1]);
  L2 = MH_LOAD (Key->L[2]);
  while (BlockCount >= 8) {
    //
    // Blocks BlockIndex+1 .. BlockIndex+8 with BlockIndex a multiple of 8:
    // ntz is 0,1,0,2,0,1,0 for the first seven, ntz(BlockIndex+8) >= 3.
    //
    O0 = MH_XOR (Off, L0);
    O1 = MH_XOR (O0, L1);
    O2 = MH_XOR (O1, L0);
    O3 = MH_XOR (O2, L2);
    O4 = MH_XOR (O3, L0);
    O5 = MH_XOR (O4, L1);
    O6 = MH_XOR (O5, L0);
    O7 = MH_XOR (O6, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex + 8)]));

    B0  = MH_LOAD (In);
    B1  = MH_LOAD (In + 16);
    B2  = MH_LOAD (In + 32);
    B3  = MH_LOAD (In + 48);
    B4  = MH_LOAD (In + 64);
    B5  = MH_LOAD (In + 80);
    B6  = MH_LOAD (In + 96);
    B7  = MH_LOAD (In + 112);
    Sum = MH_XOR (
            Sum,
            MH_XOR (
              MH_XOR (MH_XOR (B0, B1), MH_XOR (B2, B3)),
              MH_XOR (MH_XOR (B4, B5), MH_XOR (B6, B7))
              )
            );

    //
    // Whitening: block ^ offset ^ round key 0.
    //
    B0 = MH_XOR (B0, MH_XOR (O0, First));
    B1 = MH_XOR (B1, MH_XOR (O1, First));
    B2 = MH_XOR (B2, MH_XOR (O2, First));
    B3 = MH_XOR (B3, MH_XOR (O3, First));
    B4 = MH_XOR (B4, MH_XOR (O4, First));
    B5 = MH_XOR (B5, MH_XOR (O5, First));
    B6 = MH_XOR (B6, MH_XOR (O6, First));
    B7 = MH_XOR (B7, MH_XOR (O7, First));

    for (Round = 1; Round < Rounds; Round++) {
      RoundKey = MH_LOAD (RoundKeys + 16 * Round);
      B0       = _mm_aesenc_si128 (B0, RoundKey);
      B1       = _mm_aesenc_si128 (B1, RoundKey);
      B2       = _mm_aesenc_si128 (B2, RoundKey);
      B3       = _mm_aesenc_si128 (B3, RoundKey);
      B4       = _mm_aesenc_si128 (B4, RoundKey);
      B5       = _mm_aesenc_si128 (B5, RoundKey);
      B6       = _mm_aesenc_si128 (B6, RoundKey);
      B7       = _mm_aesenc_si128 (B7, RoundKey);
    }

    //
    // The output offset is folded into the last round key:
    // AESENCLAST (x, k ^ o) == AESENCLAST (x, k) ^ o.
    //
    MH_STORE (Out, _mm_aesenclast_si128 (B0, MH_XOR (Last, O0)));
    MH_STORE (Out + 16, _mm_aesenclast_si128 (B1, MH_XOR (Last, O1)));
    MH_STORE (Out + 32, _mm_aesenclast_si128 (B2, MH_XOR (Last, O2)));
    MH_STORE (Out + 48, _mm_aesenclast_si128 (B3, MH_XOR (Last, O3)));
    MH_STORE (Out + 64, _mm_aesenclast_si128 (B4, MH_XOR (Last, O4)));
    MH_STORE (Out + 80, _mm_aesenclast_si128 (B5, MH_XOR (Last, O5)));
    MH_STORE (Out + 96, _mm_aesenclast_si128 (B6, MH_XOR (Last, O6)));
    MH_STORE (Out + 112, _mm_aesenclast_si128 (B7, MH_XOR (Last, O7)));

    Off         = O7;
    BlockIndex += 8;
    In         += 128;
    Out        += 128;
    BlockCount -= 8;
  }

  while (BlockCount > 0) {
    BlockIndex++;
    Off = MH_XOR (Off, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex)]));
    B0  = MH_LOAD (In);
    Sum = MH_XOR (Sum, B0);
    B0  = InternalMhAesNiEncrypt1 (RoundKeys, Rounds, MH_XOR (B0, Off));
    MH_STORE (Out, MH_XOR (B0, Off));
    In  += 16;
    Out += 16;
    BlockCount--;
  }

  MH_STORE (Offset, Off);
  MH_STORE (Checksum, Sum);
}

/**
  OCB decryption of whole blocks, eight at a time once the block index is
  a multiple of eight. See InternalMhAesNiOcbBlocks.

  @param[in]     Key         The OCB key.
  @param[in]     BlockIndex  Blocks of the message already done.
  @param[in]     In          Ciphertext.
  @param[out]    Out         Plaintext; may equal In.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      Running offset.
  @param[in,out] Checksum    Running checksum.
**/
MH_AESNI_TARGET
STATIC
VOID
InternalMhAesNiOcbDecryptBlocks (
  IN     CONST OVMF_MH_OCB_KEY  *Key,
  IN     UINT64                 BlockIndex,
  IN     CONST UINT8            *In,
  OUT    UINT8                  *Out,
  IN     UINTN                  BlockCount,
  IN OUT UINT8                  *Offset,
  IN OUT UINT8                  *Checksum
  )
{
  CONST UINT8  *RoundKeys;
  UINT32       Rounds;
  UINT32       Round;
  __m128i      Off;
  __m128i      Sum;
  __m128i      L0;
  __m128i      L1;
  __m128i      L2;
  __m128i      First;
  __m128i      Last;
  __m128i      RoundKey;
  __m128i      O0;
  __m128i      O1;
  __m128i      O2;
  __m128i      O3;
  __m128i      O4;
  __m128i      O5;
  __m128i      O6;
  __m128i      O7;
  __m128i      B0;
  __m128i      B1;
  __m128i      B2;
  __m128i      B3;
  __m128i      B4;
  __m128i      B5;
  __m128i      B6;
  __m128i      B7;

  RoundKeys = (CONST UINT8 *)Key->Aes.DecRoundKeys;
  Rounds    = Key->Aes.Rounds;
  First     = MH_LOAD (RoundKeys);
  Last      = MH_LOAD (RoundKeys + 16 * Rounds);
  Off       = MH_LOAD (Offset);
  Sum       = MH_LOAD (Checksum);

  while ((BlockCount > 0) && ((BlockIndex & 7) != 0)) {
    BlockIndex++;
    Off = MH_XOR (Off, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex)]));
    B0  = InternalMhAesNiDecrypt1 (RoundKeys, Rounds, MH_XOR (MH_LOAD (In), Off));
    B0  = MH_XOR (B0, Off);
    Sum = MH_XOR (Sum, B0);
    MH_STORE (Out, B0);
    In  += 16;
    Out += 16;
    BlockCount--;
  }

  L0 = MH_LOAD (Key->L[0]);
  L1 = MH_LOAD (Key->L[1]);
  L2 = MH_LOAD (Key->L[2]);
  while (BlockCount >= 8) {
    O0 = MH_XOR (Off, L0);
    O1 = MH_XOR (O0, L1);
    O2 = MH_XOR (O1, L0);
    O3 = MH_XOR (O2, L2);
    O4 = MH_XOR (O3, L0);
    O5 = MH_XOR (O4, L1);
    O6 = MH_XOR (O5, L0);
    O7 = MH_XOR (O6, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex + 8)]));

    B0 = MH_XOR (MH_LOAD (In), MH_XOR (O0, First));
    B1 = MH_XOR (MH_LOAD (In + 16), MH_XOR (O1, First));
    B2 = MH_XOR (MH_LOAD (In + 32), MH_XOR (O2, First));
    B3 = MH_XOR (MH_LOAD (In + 48), MH_XOR (O3, First));
    B4 = MH_XOR (MH_LOAD (In + 64), MH_XOR (O4, First));
    B5 = MH_XOR (MH_LOAD (In + 80), MH_XOR (O5, First));
    B6 = MH_XOR (MH_LOAD (In + 96), MH_XOR (O6, First));
    B7 = MH_XOR (MH_LOAD (In + 112), MH_XOR (O7, First));

    for (Round = 1; Round < Rounds; Round++) {
      RoundKey = MH_LOAD (RoundKeys + 16 * Round);
      B0       = _mm_aesdec_si128 (B0, RoundKey);
      B1       = _mm_aesdec_si128 (B1, RoundKey);
      B2       = _mm_aesdec_si128 (B2, RoundKey);
      B3       = _mm_aesdec_si128 (B3, RoundKey);
      B4       = _mm_aesdec_si128 (B4, RoundKey);
      B5       = _mm_aesdec_si128 (B5, RoundKey);
      B6       = _mm_aesdec_si128 (B6, RoundKey);
      B7       = _mm_aesdec_si128 (B7, RoundKey);
    }

    B0 = _mm_aesdeclast_si128 (B0, MH_XOR (Last, O0));
    B1 = _mm_aesdeclast_si128 (B1, MH_XOR (Last, O1));
    B2 = _mm_aesdeclast_si128 (B2, MH_XOR (Last, O2));
    B3 = _mm_aesdeclast_si128 (B3, MH_XOR (Last, O3));
    B4 = _mm_aesdeclast_si128 (B4, MH_XOR (Last, O4));
    B5 = _mm_aesdeclast_si128 (B5, MH_XOR (Last, O5));
    B6 = _mm_aesdeclast_si128 (B6, MH_XOR (Last, O6));
    B7 = _mm_aesdeclast_si128 (B7, MH_XOR (Last, O7));

    MH_STORE (Out, B0);
    MH_STORE (Out + 16, B1);
    MH_STORE (Out + 32, B2);
    MH_STORE (Out + 48, B3);
    MH_STORE (Out + 64, B4);
    MH_STORE (Out + 80, B5);
    MH_STORE (Out + 96, B6);
    MH_STORE (Out + 112, B7);
    Sum = MH_XOR (
            Sum,
            MH_XOR (
              MH_XOR (MH_XOR (B0, B1), MH_XOR (B2, B3)),
              MH_XOR (MH_XOR (B4, B5), MH_XOR (B6, B7))
              )
            );

    Off         = O7;
    BlockIndex += 8;
    In         += 128;
    Out        += 128;
    BlockCount -= 8;
  }

  while (BlockCount > 0) {
    BlockIndex++;
    Off = MH_XOR (Off, MH_LOAD (Key->L[__builtin_ctzll (BlockIndex)]));
    B0  = InternalMhAesNiDecrypt1 (RoundKeys, Rounds, MH_XOR (MH_LOAD (In), Off));
    B0  = MH_XOR (B0, Off);
    Sum = MH_XOR (Sum, B0);
    MH_STORE (Out, B0);
    In  += 16;
    Out += 16;
    BlockCount--;
  }

  MH_STORE (Offset, Off);
  MH_STORE (Checksum, Sum);
}

/**
  OCB bulk processing of whole blocks with AES-NI, 8 blocks interleaved.

  For each block i = BlockIndex + 1 .. BlockIndex + BlockCount:
    Offset ^= L[ntz(i)];
    encrypt: Out = Offset ^ E(In ^ Offset), Checksum ^= In
    decrypt: Out = Offset ^ D(In ^ Offset), Checksum ^= Out

  @param[in]     Key         An OCB key whose Aes.Path is AESNI.
  @param[in]     Decrypt     FALSE to encrypt, TRUE to decrypt.
  @param[in]     BlockIndex  Number of blocks of the message already done.
  @param[in]     In          BlockCount * 16 bytes.
  @param[out]    Out         BlockCount * 16 bytes; may equal In.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      The running offset (16 bytes).
  @param[in,out] Checksum    The running checksum (16 bytes).
**/
MH_AESNI_ENTRY
VOID
InternalMhAesNiOcbBlocks (
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
  if (Decrypt) {
    InternalMhAesNiOcbDecryptBlocks (Key, BlockIndex, In, Out, BlockCount, Offset, Checksum);
  } else {
    InternalMhAesNiOcbEncryptBlocks (Key, BlockIndex, In, Out, BlockCount, Offset, Checksum);
  }
}

#else

//
// No AES-NI path in this build: the stubs below are never reached, because
// InternalMhAesNiBuilt() returns FALSE and no key gets the AESNI path.
//

/**
  Tell whether this build contains the AES-NI path at all.

  @retval FALSE  Only the portable path exists.
**/
BOOLEAN
InternalMhAesNiBuilt (
  VOID
  )
{
  return FALSE;
}

/**
  Stand-in; falls back to the portable code.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes.
**/
VOID
InternalMhAesNiEncryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  InternalMhAesEncryptBlockPortable (Key, In, Out);
}

/**
  Stand-in; falls back to the portable code.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes.
**/
VOID
InternalMhAesNiDecryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  InternalMhAesDecryptBlockPortable (Key, In, Out);
}

/**
  Stand-in; never called (no key gets the AESNI path in this build).

  @param[in]     Key         Unused.
  @param[in]     Decrypt     Unused.
  @param[in]     BlockIndex  Unused.
  @param[in]     In          Unused.
  @param[out]    Out         Zeroed.
  @param[in]     BlockCount  Number of blocks of Out.
  @param[in,out] Offset      Unused.
  @param[in,out] Checksum    Unused.
**/
VOID
InternalMhAesNiOcbBlocks (
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
  ZeroMem (Out, BlockCount * OVMF_MH_AES_BLOCK_SIZE);
}

#endif
