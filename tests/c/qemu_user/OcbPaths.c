/** @file
  A stand-alone program that runs AES-OCB3 through every path the core
  offers, for tests that run it natively and under QEMU's user-mode TCG
  (qemu-x86_64 -cpu max), whose AES helpers are those of the helper VM.

  Input (stdin), one case per line, hex fields separated by spaces:
    key nonce ad plaintext      ("-" for an empty field)
  Output, first:
    cpu aesni=<0|1> vaes_cpuid=<0|1> vaes_usable=<0|1> vaes_raw=<0|1>
  then per case and per path (portable, aesni, vaes):
    <path> <key path> <ciphertext> <tag> <decrypt ok 0|1> <decrypted equal 0|1>
  vaes_raw is this program's own check of VAESENC/VAESDEC on both lanes
  against AESENC/AESDEC, independent of the core's self-test.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <cpuid.h>
#include <immintrin.h>

//
// EDK2's Base.h defines NULL again.
//
#undef NULL
#include "PageCrypto.h"

#define MAX_FIELD  (1 << 20)

static UINT8  mFields[4][MAX_FIELD];
static UINT8  mCipher[MAX_FIELD];
static UINT8  mPlain[MAX_FIELD];
static char   mLine[8 * MAX_FIELD + 64];

static int
ParseHex (
  const char  *Text,
  UINT8       *Out,
  size_t      *Size
  )
{
  size_t  Length;
  size_t  Index;

  *Size = 0;
  if (strcmp (Text, "-") == 0) {
    return 1;
  }

  Length = strlen (Text);
  if ((Length % 2 != 0) || (Length / 2 > MAX_FIELD)) {
    return 0;
  }

  for (Index = 0; Index < Length / 2; Index++) {
    unsigned int  Byte;

    if (sscanf (Text + 2 * Index, "%2x", &Byte) != 1) {
      return 0;
    }

    Out[Index] = (UINT8)Byte;
  }

  *Size = Length / 2;
  return 1;
}

static void
PrintHex (
  const UINT8  *Data,
  size_t       Size
  )
{
  size_t  Index;

  if (Size == 0) {
    fputs ("-", stdout);
  }

  for (Index = 0; Index < Size; Index++) {
    printf ("%02x", Data[Index]);
  }
}

__attribute__ ((target ("aes,vaes,avx2"), noinline))
static int
RawVaesAgrees (
  void
  )
{
  UINT8    Data[64];
  UINT8    Wide[32];
  UINT8    Narrow[32];
  int      Index;
  int      Op;
  __m256i  Result;
  __m128i  Lane[2];

  for (Index = 0; Index < 64; Index++) {
    Data[Index] = (UINT8)(Index * 29 + 7);
  }

  for (Op = 0; Op < 2; Op++) {
    __m256i  State = _mm256_loadu_si256 ((const __m256i *)Data);
    __m256i  Round = _mm256_loadu_si256 ((const __m256i *)(Data + 32));

    Result = (Op == 0) ? _mm256_aesenc_epi128 (State, Round) : _mm256_aesdec_epi128 (State, Round);
    for (Index = 0; Index < 2; Index++) {
      __m128i  S = _mm_loadu_si128 ((const __m128i *)(Data + 16 * Index));
      __m128i  K = _mm_loadu_si128 ((const __m128i *)(Data + 32 + 16 * Index));

      Lane[Index] = (Op == 0) ? _mm_aesenc_si128 (S, K) : _mm_aesdec_si128 (S, K);
    }

    _mm256_storeu_si256 ((__m256i *)Wide, Result);
    _mm_storeu_si128 ((__m128i *)Narrow, Lane[0]);
    _mm_storeu_si128 ((__m128i *)(Narrow + 16), Lane[1]);
    if (memcmp (Wide, Narrow, 32) != 0) {
      return 0;
    }
  }

  return 1;
}

int
main (
  void
  )
{
  static const UINT32  Allow[3]  = { 0, OVMF_MH_OCB_ALLOW_AESNI, OVMF_MH_OCB_ALLOW_AESNI | OVMF_MH_OCB_ALLOW_VAES };
  static const char    *Names[3] = { "portable", "aesni", "vaes" };
  static OVMF_MH_OCB_KEY  Key;
  unsigned int         Eax;
  unsigned int         Ebx;
  unsigned int         Ecx;
  unsigned int         Edx;
  int                  CpuidVaes;
  int                  Path;
  size_t               Sizes[4];
  char                 *Token[4];
  UINT8                Tag[16];
  int                  Ok;

  __cpuid_count (7, 0, Eax, Ebx, Ecx, Edx);
  CpuidVaes = ((Ebx & (1u << 5)) != 0) && ((Ecx & (1u << 9)) != 0);
  printf (
    "cpu aesni=%d vaes_cpuid=%d vaes_usable=%d vaes_raw=%d\n",
    MigrationHelperCpuHasAesNi () ? 1 : 0,
    CpuidVaes,
    MigrationHelperCpuHasVaes () ? 1 : 0,
    CpuidVaes ? RawVaesAgrees () : 0
    );

  while (fgets (mLine, sizeof (mLine), stdin) != NULL) {
    int  Field;

    Token[0] = strtok (mLine, " \n");
    for (Field = 1; Field < 4; Field++) {
      Token[Field] = strtok (NULL, " \n");
    }

    if ((Token[3] == NULL) || !ParseHex (Token[0], mFields[0], &Sizes[0]) ||
        !ParseHex (Token[1], mFields[1], &Sizes[1]) || !ParseHex (Token[2], mFields[2], &Sizes[2]) ||
        !ParseHex (Token[3], mFields[3], &Sizes[3]) || (Sizes[1] != 12))
    {
      fprintf (stderr, "bad input line\n");
      return 2;
    }

    for (Path = 0; Path < 3; Path++) {
      if (!MigrationHelperOcbInitPaths (&Key, mFields[0], Sizes[0], Allow[Path])) {
        fprintf (stderr, "key refused\n");
        return 2;
      }

      if (!MigrationHelperOcbEncrypt (&Key, mFields[1], mFields[2], Sizes[2], mFields[3], Sizes[3], mCipher, Tag)) {
        fprintf (stderr, "encrypt refused\n");
        return 2;
      }

      memset (mPlain, 0xA5, Sizes[3]);
      Ok = MigrationHelperOcbDecrypt (&Key, mFields[1], mFields[2], Sizes[2], mCipher, Sizes[3], Tag, mPlain) ? 1 : 0;
      printf ("%s %d ", Names[Path], (int)Key.Aes.Path | (Key.UseVaes ? 0x100 : 0));
      PrintHex (mCipher, Sizes[3]);
      putchar (' ');
      PrintHex (Tag, sizeof (Tag));
      printf (" %d %d\n", Ok, memcmp (mPlain, mFields[3], Sizes[3]) == 0);
      MigrationHelperOcbWipe (&Key);
    }
  }

  return 0;
}
