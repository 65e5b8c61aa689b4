/** @file
  VAES path: the OCB3 bulk loop over whole blocks with two AES blocks per
  VAES instruction (256-bit registers) and AVX2 for the offsets and the
  checksum, eight blocks per iteration. Everything else (nonce, associated
  data, partial block, tag, and the blocks before the first multiple of
  eight and after the last) stays on the AES-NI code.

  Under QEMU TCG each VAES instruction is one C helper call that runs the
  AES round on both 128-bit lanes, so the AES work per block is the same as
  with AES-NI; what shrinks is the number of guest instructions around it
  (offsets, whitening, checksum, loads and stores), which TCG translates
  one by one. docs/testing.md ("Page crypto under TCG") has the profile.

  The firmware rules of AesNi.c hold here too: the code runs in place from
  flash at an address that need not be 32-byte aligned, with SSE disabled
  in the compiler flags:
  - every function that touches a vector type carries MH_VAES_TARGET, and
    no vector crosses a non-inlined call;
  - no vector constants from .rodata; every load is unaligned;
  - the entry point realigns the stack, so spills are aligned;
  - the entry points end with VZEROUPPER (the firmware's compiler flags do
    not add it), which also clears the upper halves of the registers.
  It runs only when MigrationHelperCpuHasVaes () says the CPU has VAES and
  AVX2 and the platform enabled the AVX register state (XCR0).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

#if defined (__GNUC__) && defined (MDE_CPU_X64)
#define MH_VAES_BUILT  1
#else
#define MH_VAES_BUILT  0
#endif

#define MH_CPUID_1_ECX_AESNI     BIT25
#define MH_CPUID_1_ECX_OSXSAVE   BIT27
#define MH_CPUID_1_ECX_AVX       BIT28
#define MH_CPUID_7_EBX_AVX2      BIT5
#define MH_CPUID_7_ECX_VAES      BIT9
#define MH_XCR0_SSE_AVX_STATE    (BIT1 | BIT2)

BOOLEAN
InternalMhVaesSelfTest (
  VOID
  );

/**
  Tell whether the VAES path can run: CPUID reports AES-NI, AVX, AVX2 and
  VAES, the OS (here: the helper's SEC code) set CR4.OSXSAVE, XCR0
  enables the SSE and AVX register state, and the 256-bit AES instructions
  give, on both lanes, what AES-NI gives on each block (InternalMhVaesSelfTest:
  QEMU 7.2's TCG advertises VAES but computes the upper lane of VAESENC and
  VAESDEC wrongly).

  @retval TRUE   The VAES path can be used.
  @retval FALSE  It cannot (or this build has no VAES path).
**/
BOOLEAN
EFIAPI
MigrationHelperCpuHasVaes (
  VOID
  )
{
 #if MH_VAES_BUILT
  UINT32  MaxLeaf;
  UINT32  Ecx;
  UINT32  Ebx7;
  UINT32  Ecx7;

  MaxLeaf = 0;
  AsmCpuid (0, &MaxLeaf, NULL, NULL, NULL);
  if (MaxLeaf < 7) {
    return FALSE;
  }

  Ecx = 0;
  AsmCpuid (1, NULL, NULL, &Ecx, NULL);
  if ((Ecx & (MH_CPUID_1_ECX_AESNI | MH_CPUID_1_ECX_OSXSAVE | MH_CPUID_1_ECX_AVX)) !=
      (MH_CPUID_1_ECX_AESNI | MH_CPUID_1_ECX_OSXSAVE | MH_CPUID_1_ECX_AVX))
  {
    return FALSE;
  }

  Ebx7 = 0;
  Ecx7 = 0;
  AsmCpuidEx (7, 0, NULL, &Ebx7, &Ecx7, NULL);
  if (((Ebx7 & MH_CPUID_7_EBX_AVX2) == 0) || ((Ecx7 & MH_CPUID_7_ECX_VAES) == 0)) {
    return FALSE;
  }

  //
  // XGETBV is only defined once CR4.OSXSAVE is set, which CPUID.1:ECX
  // bit 27 reflected above.
  //
  if ((AsmXGetBv (0) & MH_XCR0_SSE_AVX_STATE) != MH_XCR0_SSE_AVX_STATE) {
    return FALSE;
  }

  return InternalMhVaesSelfTest ();
 #else
  return FALSE;
 #endif
}

#if MH_VAES_BUILT

#include <immintrin.h>

#define MH_VAES_TARGET  __attribute__ ((target ("aes,vaes,avx2")))
#define MH_VAES_ENTRY   __attribute__ ((target ("aes,vaes,avx2"), force_align_arg_pointer, noinline))

#define MH_LOAD128(Pointer)       _mm_loadu_si128 ((CONST __m128i *)(CONST VOID *)(Pointer))
#define MH_LOAD256(Pointer)       _mm256_loadu_si256 ((CONST __m256i *)(CONST VOID *)(Pointer))
#define MH_STORE256(Pointer, V)   _mm256_storeu_si256 ((__m256i *)(VOID *)(Pointer), (V))
#define MH_BCAST(Pointer)         _mm256_broadcastsi128_si256 (MH_LOAD128 (Pointer))
#define MH_PAIR(Low, High)        _mm256_inserti128_si256 (_mm256_castsi128_si256 (Low), (High), 1)
#define MH_XOR256(A, B)           _mm256_xor_si256 ((A), (B))

/**
  Tell whether this build contains the VAES path at all.

  @retval TRUE   AesVaes.c was compiled with its vector code.
**/
BOOLEAN
InternalMhVaesBuilt (
  VOID
  )
{
  return TRUE;
}

/**
  Check the 256-bit AES instructions against AES-NI on the same data: one
  VAESENC, VAESENCLAST, VAESDEC and VAESDECLAST on two different blocks
  with two different round keys, compared lane by lane with AESENC,
  AESENCLAST, AESDEC and AESDECLAST. The data is computed, not loaded from
  a constant (SEC runs from flash; no .rodata vectors).

  @retval TRUE   Every lane of every instruction agrees with AES-NI.
  @retval FALSE  The CPU (or its emulator) computes VAES differently.
**/
MH_VAES_ENTRY
BOOLEAN
InternalMhVaesSelfTest (
  VOID
  )
{
  UINT8    Data[64];
  UINT8    Wide[32];
  UINT8    Narrow[32];
  UINTN    Index;
  UINTN    Op;
  UINT32   Difference;
  __m256i  State;
  __m256i  RoundKey;
  __m256i  Result;
  __m128i  Low;
  __m128i  High;

  for (Index = 0; Index < sizeof (Data); Index++) {
    Data[Index] = (UINT8)(Index * 0x3B + 0x65);
  }

  State      = MH_LOAD256 (Data);
  RoundKey   = MH_LOAD256 (Data + 32);
  Difference = 0;
  for (Op = 0; Op < 4; Op++) {
    switch (Op) {
      case 0:
        Result = _mm256_aesenc_epi128 (State, RoundKey);
        Low    = _mm_aesenc_si128 (MH_LOAD128 (Data), MH_LOAD128 (Data + 32));
        High   = _mm_aesenc_si128 (MH_LOAD128 (Data + 16), MH_LOAD128 (Data + 48));
        break;
      case 1:
        Result = _mm256_aesenclast_epi128 (State, RoundKey);
        Low    = _mm_aesenclast_si128 (MH_LOAD128 (Data), MH_LOAD128 (Data + 32));
        High   = _mm_aesenclast_si128 (MH_LOAD128 (Data + 16), MH_LOAD128 (Data + 48));
        break;
      case 2:
        Result = _mm256_aesdec_epi128 (State, RoundKey);
        Low    = _mm_aesdec_si128 (MH_LOAD128 (Data), MH_LOAD128 (Data + 32));
        High   = _mm_aesdec_si128 (MH_LOAD128 (Data + 16), MH_LOAD128 (Data + 48));
        break;
      default:
        Result = _mm256_aesdeclast_epi128 (State, RoundKey);
        Low    = _mm_aesdeclast_si128 (MH_LOAD128 (Data), MH_LOAD128 (Data + 32));
        High   = _mm_aesdeclast_si128 (MH_LOAD128 (Data + 16), MH_LOAD128 (Data + 48));
        break;
    }

    MH_STORE256 (Wide, Result);
    _mm_storeu_si128 ((__m128i *)(VOID *)Narrow, Low);
    _mm_storeu_si128 ((__m128i *)(VOID *)(Narrow + 16), High);
    for (Index = 0; Index < sizeof (Wide); Index++) {
      Difference |= (UINT32)(Wide[Index] ^ Narrow[Index]);
    }
  }

  _mm256_zeroupper ();
  return (BOOLEAN)(Difference == 0);
}

/**
  The eight-block VAES loop, for BlockCount a multiple of 8 and BlockIndex
  a multiple of 8. See InternalMhVaesOcbBlocks for the contract.

  The running offset is kept with round key 0 folded in (both lanes hold
  Offset ^ K0), so the whitening of a pair of blocks is one XOR; the
  output offset is folded into the last round key (AESENCLAST (x, k ^ o)
  is AESENCLAST (x, k) ^ o, and the same holds for AESDECLAST).

  @param[in]     Key         The OCB key.
  @param[in]     Decrypt     FALSE to encrypt, TRUE to decrypt.
  @param[in]     BlockIndex  Blocks of the message already done (multiple of 8).
  @param[in]     In          BlockCount * 16 bytes.
  @param[out]    Out         BlockCount * 16 bytes; may equal In.
  @param[in]     BlockCount  Multiple of 8.
  @param[in,out] Offset      Running offset.
  @param[in,out] Checksum    Running checksum.
**/
MH_VAES_ENTRY
STATIC
VOID
InternalMhVaesOcbEights (
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
  CONST UINT8  *RoundKeys;
  UINT32       Rounds;
  UINT32       Round;
  __m128i      L0;
  __m128i      L1;
  __m128i      L2;
  __m128i      Folded;
  __m256i      First;
  __m256i      FirstLast;
  __m256i      L2Pair;
  __m256i      P0;
  __m256i      P1;
  __m256i      P2;
  __m256i      Off;
  __m256i      Sum;
  __m256i      Next;
  __m256i      Y0;
  __m256i      Y1;
  __m256i      Y2;
  __m256i      Y3;
  __m256i      B0;
  __m256i      B1;
  __m256i      B2;
  __m256i      B3;
  __m256i      RoundKey;

  RoundKeys = Decrypt ? (CONST UINT8 *)Key->Aes.DecRoundKeys : (CONST UINT8 *)Key->Aes.EncRoundKeys;
  Rounds    = Key->Aes.Rounds;
  First     = MH_BCAST (RoundKeys);
  FirstLast = MH_XOR256 (First, MH_BCAST (RoundKeys + 16 * Rounds));

  //
  // With Off the offset of block BlockIndex, blocks BlockIndex+1..+8 have
  // the offsets (ntz 0,1,0,2,0,1,0,k with k = ntz (BlockIndex + 8) >= 3):
  //   Off^L0, Off^L0^L1 | Off^L1, Off^L1^L2 | Off^L0^L1^L2, Off^L0^L2 |
  //   Off^L2, Off^L2^Lk.
  // P0..P2 are the first three pairs without Off; the fourth depends on k.
  //
  L0     = MH_LOAD128 (Key->L[0]);
  L1     = MH_LOAD128 (Key->L[1]);
  L2     = MH_LOAD128 (Key->L[2]);
  P0     = MH_PAIR (L0, _mm_xor_si128 (L0, L1));
  P1     = MH_PAIR (L1, _mm_xor_si128 (L1, L2));
  P2     = MH_PAIR (_mm_xor_si128 (_mm_xor_si128 (L0, L1), L2), _mm_xor_si128 (L0, L2));
  L2Pair = _mm256_broadcastsi128_si256 (L2);
  Off    = MH_XOR256 (MH_BCAST (Offset), First);
  Sum    = _mm256_setzero_si256 ();

  while (BlockCount >= 8) {
    //
    // Y0..Y3 hold Offset ^ K0 for blocks 1..8 of this group.
    //
    Y0   = MH_XOR256 (Off, P0);
    Y1   = MH_XOR256 (Off, P1);
    Y2   = MH_XOR256 (Off, P2);
    Y3   = MH_XOR256 (Off, L2Pair);
    Next = MH_XOR256 (Y3, MH_BCAST (Key->L[__builtin_ctzll (BlockIndex + 8)]));
    Y3   = _mm256_blend_epi32 (Y3, Next, 0xF0);

    B0 = MH_LOAD256 (In);
    B1 = MH_LOAD256 (In + 32);
    B2 = MH_LOAD256 (In + 64);
    B3 = MH_LOAD256 (In + 96);
    if (!Decrypt) {
      Sum = MH_XOR256 (Sum, MH_XOR256 (MH_XOR256 (B0, B1), MH_XOR256 (B2, B3)));
    }

    B0 = MH_XOR256 (B0, Y0);
    B1 = MH_XOR256 (B1, Y1);
    B2 = MH_XOR256 (B2, Y2);
    B3 = MH_XOR256 (B3, Y3);

    if (Decrypt) {
      for (Round = 1; Round < Rounds; Round++) {
        RoundKey = MH_BCAST (RoundKeys + 16 * Round);
        B0       = _mm256_aesdec_epi128 (B0, RoundKey);
        B1       = _mm256_aesdec_epi128 (B1, RoundKey);
        B2       = _mm256_aesdec_epi128 (B2, RoundKey);
        B3       = _mm256_aesdec_epi128 (B3, RoundKey);
      }

      B0  = _mm256_aesdeclast_epi128 (B0, MH_XOR256 (Y0, FirstLast));
      B1  = _mm256_aesdeclast_epi128 (B1, MH_XOR256 (Y1, FirstLast));
      B2  = _mm256_aesdeclast_epi128 (B2, MH_XOR256 (Y2, FirstLast));
      B3  = _mm256_aesdeclast_epi128 (B3, MH_XOR256 (Y3, FirstLast));
      Sum = MH_XOR256 (Sum, MH_XOR256 (MH_XOR256 (B0, B1), MH_XOR256 (B2, B3)));
    } else {
      for (Round = 1; Round < Rounds; Round++) {
        RoundKey = MH_BCAST (RoundKeys + 16 * Round);
        B0       = _mm256_aesenc_epi128 (B0, RoundKey);
        B1       = _mm256_aesenc_epi128 (B1, RoundKey);
        B2       = _mm256_aesenc_epi128 (B2, RoundKey);
        B3       = _mm256_aesenc_epi128 (B3, RoundKey);
      }

      B0 = _mm256_aesenclast_epi128 (B0, MH_XOR256 (Y0, FirstLast));
      B1 = _mm256_aesenclast_epi128 (B1, MH_XOR256 (Y1, FirstLast));
      B2 = _mm256_aesenclast_epi128 (B2, MH_XOR256 (Y2, FirstLast));
      B3 = _mm256_aesenclast_epi128 (B3, MH_XOR256 (Y3, FirstLast));
    }

    MH_STORE256 (Out, B0);
    MH_STORE256 (Out + 32, B1);
    MH_STORE256 (Out + 64, B2);
    MH_STORE256 (Out + 96, B3);

    //
    // Both lanes of Next hold the offset of the group's last block (^ K0).
    //
    Off         = Next;
    BlockIndex += 8;
    In         += 128;
    Out        += 128;
    BlockCount -= 8;
  }

  Folded = _mm_xor_si128 (_mm256_castsi256_si128 (Off), _mm256_castsi256_si128 (First));
  _mm_storeu_si128 ((__m128i *)(VOID *)Offset, Folded);
  Folded = _mm_xor_si128 (_mm256_castsi256_si128 (Sum), _mm256_extracti128_si256 (Sum, 1));
  Folded = _mm_xor_si128 (Folded, MH_LOAD128 (Checksum));
  _mm_storeu_si128 ((__m128i *)(VOID *)Checksum, Folded);

  //
  // Clear the upper halves (key-dependent offsets) before returning to
  // code that uses only the lower 128 bits.
  //
  _mm256_zeroupper ();
}

/**
  OCB bulk processing of whole blocks with VAES: the same contract as
  InternalMhAesNiOcbBlocks. Blocks up to the first multiple of eight and
  the last BlockCount mod 8 go through the AES-NI code.

  @param[in]     Key         An OCB key whose Aes.Path is AESNI and whose
                             UseVaes is set.
  @param[in]     Decrypt     FALSE to encrypt, TRUE to decrypt.
  @param[in]     BlockIndex  Number of blocks of the message already done.
  @param[in]     In          BlockCount * 16 bytes.
  @param[out]    Out         BlockCount * 16 bytes; may equal In.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      The running offset (16 bytes).
  @param[in,out] Checksum    The running checksum (16 bytes).
**/
VOID
InternalMhVaesOcbBlocks (
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
  UINTN  Count;

  Count = (UINTN)((8 - (BlockIndex & 7)) & 7);
  if (Count > BlockCount) {
    Count = BlockCount;
  }

  if (Count > 0) {
    InternalMhAesNiOcbBlocks (Key, Decrypt, BlockIndex, In, Out, Count, Offset, Checksum);
    BlockIndex += Count;
    In         += Count * OVMF_MH_AES_BLOCK_SIZE;
    Out        += Count * OVMF_MH_AES_BLOCK_SIZE;
    BlockCount -= Count;
  }

  Count = BlockCount & ~(UINTN)7;
  if (Count > 0) {
    InternalMhVaesOcbEights (Key, Decrypt, BlockIndex, In, Out, Count, Offset, Checksum);
    BlockIndex += Count;
    In         += Count * OVMF_MH_AES_BLOCK_SIZE;
    Out        += Count * OVMF_MH_AES_BLOCK_SIZE;
    BlockCount -= Count;
  }

  if (BlockCount > 0) {
    InternalMhAesNiOcbBlocks (Key, Decrypt, BlockIndex, In, Out, BlockCount, Offset, Checksum);
  }
}

#else

/**
  No VAES path in this build.

  @retval FALSE  Always.
**/
BOOLEAN
InternalMhVaesSelfTest (
  VOID
  )
{
  return FALSE;
}

/**
  Tell whether this build contains the VAES path at all.

  @retval FALSE  No VAES path in this build.
**/
BOOLEAN
InternalMhVaesBuilt (
  VOID
  )
{
  return FALSE;
}

/**
  Stand-in; never called (no key gets UseVaes in this build). Falls back to
  the AES-NI dispatch.

  @param[in]     Key         The OCB key.
  @param[in]     Decrypt     FALSE to encrypt, TRUE to decrypt.
  @param[in]     BlockIndex  Blocks already done.
  @param[in]     In          Input.
  @param[out]    Out         Output.
  @param[in]     BlockCount  Number of blocks.
  @param[in,out] Offset      Running offset.
  @param[in,out] Checksum    Running checksum.
**/
VOID
InternalMhVaesOcbBlocks (
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
  InternalMhAesNiOcbBlocks (Key, Decrypt, BlockIndex, In, Out, BlockCount, Offset, Checksum);
}

#endif
