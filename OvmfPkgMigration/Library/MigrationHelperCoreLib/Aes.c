/** @file
  Portable AES-128/AES-256 (FIPS-197): key schedule, block encryption and
  decryption, and the dispatch between the portable and the AES-NI path.

  The portable block functions use one 1 KiB round table per direction
  (the other three are rotations of it). The tables are computed by the
  preprocessor from the S-boxes, so only the S-boxes are written out here.
  Table look-ups depend on secret data: this path is not constant time
  against cache-timing observers. The key schedule does not use tables with
  secret indices (it scans the whole S-box), so the AES-NI path, which
  shares it, has no secret-dependent memory access.

  Round key words hold the FIPS-197 round key bytes in little-endian order,
  so the AES-NI path reads the same arrays as bytes.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "PageCrypto.h"

//
// S-box and inverse S-box (FIPS-197 figures 7 and 14), as lists the
// table macros below are applied to.
//
#define MH_AES_SBOX_LIST(F) \
  F (0x63), F (0x7C), F (0x77), F (0x7B), F (0xF2), F (0x6B), F (0x6F), F (0xC5), \
  F (0x30), F (0x01), F (0x67), F (0x2B), F (0xFE), F (0xD7), F (0xAB), F (0x76), \
  F (0xCA), F (0x82), F (0xC9), F (0x7D), F (0xFA), F (0x59), F (0x47), F (0xF0), \
  F (0xAD), F (0xD4), F (0xA2), F (0xAF), F (0x9C), F (0xA4), F (0x72), F (0xC0), \
  F (0xB7), F (0xFD), F (0x93), F (0x26), F (0x36), F (0x3F), F (0xF7), F (0xCC), \
  F (0x34), F (0xA5), F (0xE5), F (0xF1), F (0x71), F (0xD8), F (0x31), F (0x15), \
  F (0x04), F (0xC7), F (0x23), F (0xC3), F (0x18), F (0x96), F (0x05), F (0x9A), \
  F (0x07), F (0x12), F (0x80), F (0xE2), F (0xEB), F (0x27), F (0xB2), F (0x75), \
  F (0x09), F (0x83), F (0x2C), F (0x1A), F (0x1B), F (0x6E), F (0x5A), F (0xA0), \
  F (0x52), F (0x3B), F (0xD6), F (0xB3), F (0x29), F (0xE3), F (0x2F), F (0x84), \
  F (0x53), F (0xD1), F (0x00), F (0xED), F (0x20), F (0xFC), F (0xB1), F (0x5B), \
  F (0x6A), F (0xCB), F (0xBE), F (0x39), F (0x4A), F (0x4C), F (0x58), F (0xCF), \
  F (0xD0), F (0xEF), F (0xAA), F (0xFB), F (0x43), F (0x4D), F (0x33), F (0x85), \
  F (0x45), F (0xF9), F (0x02), F (0x7F), F (0x50), F (0x3C), F (0x9F), F (0xA8), \
  F (0x51), F (0xA3), F (0x40), F (0x8F), F (0x92), F (0x9D), F (0x38), F (0xF5), \
  F (0xBC), F (0xB6), F (0xDA), F (0x21), F (0x10), F (0xFF), F (0xF3), F (0xD2), \
  F (0xCD), F (0x0C), F (0x13), F (0xEC), F (0x5F), F (0x97), F (0x44), F (0x17), \
  F (0xC4), F (0xA7), F (0x7E), F (0x3D), F (0x64), F (0x5D), F (0x19), F (0x73), \
  F (0x60), F (0x81), F (0x4F), F (0xDC), F (0x22), F (0x2A), F (0x90), F (0x88), \
  F (0x46), F (0xEE), F (0xB8), F (0x14), F (0xDE), F (0x5E), F (0x0B), F (0xDB), \
  F (0xE0), F (0x32), F (0x3A), F (0x0A), F (0x49), F (0x06), F (0x24), F (0x5C), \
  F (0xC2), F (0xD3), F (0xAC), F (0x62), F (0x91), F (0x95), F (0xE4), F (0x79), \
  F (0xE7), F (0xC8), F (0x37), F (0x6D), F (0x8D), F (0xD5), F (0x4E), F (0xA9), \
  F (0x6C), F (0x56), F (0xF4), F (0xEA), F (0x65), F (0x7A), F (0xAE), F (0x08), \
  F (0xBA), F (0x78), F (0x25), F (0x2E), F (0x1C), F (0xA6), F (0xB4), F (0xC6), \
  F (0xE8), F (0xDD), F (0x74), F (0x1F), F (0x4B), F (0xBD), F (0x8B), F (0x8A), \
  F (0x70), F (0x3E), F (0xB5), F (0x66), F (0x48), F (0x03), F (0xF6), F (0x0E), \
  F (0x61), F (0x35), F (0x57), F (0xB9), F (0x86), F (0xC1), F (0x1D), F (0x9E), \
  F (0xE1), F (0xF8), F (0x98), F (0x11), F (0x69), F (0xD9), F (0x8E), F (0x94), \
  F (0x9B), F (0x1E), F (0x87), F (0xE9), F (0xCE), F (0x55), F (0x28), F (0xDF), \
  F (0x8C), F (0xA1), F (0x89), F (0x0D), F (0xBF), F (0xE6), F (0x42), F (0x68), \
  F (0x41), F (0x99), F (0x2D), F (0x0F), F (0xB0), F (0x54), F (0xBB), F (0x16)
#define MH_AES_INV_SBOX_LIST(F) \
  F (0x52), F (0x09), F (0x6A), F (0xD5), F (0x30), F (0x36), F (0xA5), F (0x38), \
  F (0xBF), F (0x40), F (0xA3), F (0x9E), F (0x81), F (0xF3), F (0xD7), F (0xFB), \
  F (0x7C), F (0xE3), F (0x39), F (0x82), F (0x9B), F (0x2F), F (0xFF), F (0x87), \
  F (0x34), F (0x8E), F (0x43), F (0x44), F (0xC4), F (0xDE), F (0xE9), F (0xCB), \
  F (0x54), F (0x7B), F (0x94), F (0x32), F (0xA6), F (0xC2), F (0x23), F (0x3D), \
  F (0xEE), F (0x4C), F (0x95), F (0x0B), F (0x42), F (0xFA), F (0xC3), F (0x4E), \
  F (0x08), F (0x2E), F (0xA1), F (0x66), F (0x28), F (0xD9), F (0x24), F (0xB2), \
  F (0x76), F (0x5B), F (0xA2), F (0x49), F (0x6D), F (0x8B), F (0xD1), F (0x25), \
  F (0x72), F (0xF8), F (0xF6), F (0x64), F (0x86), F (0x68), F (0x98), F (0x16), \
  F (0xD4), F (0xA4), F (0x5C), F (0xCC), F (0x5D), F (0x65), F (0xB6), F (0x92), \
  F (0x6C), F (0x70), F (0x48), F (0x50), F (0xFD), F (0xED), F (0xB9), F (0xDA), \
  F (0x5E), F (0x15), F (0x46), F (0x57), F (0xA7), F (0x8D), F (0x9D), F (0x84), \
  F (0x90), F (0xD8), F (0xAB), F (0x00), F (0x8C), F (0xBC), F (0xD3), F (0x0A), \
  F (0xF7), F (0xE4), F (0x58), F (0x05), F (0xB8), F (0xB3), F (0x45), F (0x06), \
  F (0xD0), F (0x2C), F (0x1E), F (0x8F), F (0xCA), F (0x3F), F (0x0F), F (0x02), \
  F (0xC1), F (0xAF), F (0xBD), F (0x03), F (0x01), F (0x13), F (0x8A), F (0x6B), \
  F (0x3A), F (0x91), F (0x11), F (0x41), F (0x4F), F (0x67), F (0xDC), F (0xEA), \
  F (0x97), F (0xF2), F (0xCF), F (0xCE), F (0xF0), F (0xB4), F (0xE6), F (0x73), \
  F (0x96), F (0xAC), F (0x74), F (0x22), F (0xE7), F (0xAD), F (0x35), F (0x85), \
  F (0xE2), F (0xF9), F (0x37), F (0xE8), F (0x1C), F (0x75), F (0xDF), F (0x6E), \
  F (0x47), F (0xF1), F (0x1A), F (0x71), F (0x1D), F (0x29), F (0xC5), F (0x89), \
  F (0x6F), F (0xB7), F (0x62), F (0x0E), F (0xAA), F (0x18), F (0xBE), F (0x1B), \
  F (0xFC), F (0x56), F (0x3E), F (0x4B), F (0xC6), F (0xD2), F (0x79), F (0x20), \
  F (0x9A), F (0xDB), F (0xC0), F (0xFE), F (0x78), F (0xCD), F (0x5A), F (0xF4), \
  F (0x1F), F (0xDD), F (0xA8), F (0x33), F (0x88), F (0x07), F (0xC7), F (0x31), \
  F (0xB1), F (0x12), F (0x10), F (0x59), F (0x27), F (0x80), F (0xEC), F (0x5F), \
  F (0x60), F (0x51), F (0x7F), F (0xA9), F (0x19), F (0xB5), F (0x4A), F (0x0D), \
  F (0x2D), F (0xE5), F (0x7A), F (0x9F), F (0x93), F (0xC9), F (0x9C), F (0xEF), \
  F (0xA0), F (0xE0), F (0x3B), F (0x4D), F (0xAE), F (0x2A), F (0xF5), F (0xB0), \
  F (0xC8), F (0xEB), F (0xBB), F (0x3C), F (0x83), F (0x53), F (0x99), F (0x61), \
  F (0x17), F (0x2B), F (0x04), F (0x7E), F (0xBA), F (0x77), F (0xD6), F (0x26), \
  F (0xE1), F (0x69), F (0x14), F (0x63), F (0x55), F (0x21), F (0x0C), F (0x7D)

//
// GF(2^8) arithmetic on integer constants, for the preprocessor-built tables.
//
#define MH_XT(X)     ((((X) << 1) ^ ((((X) >> 7) & 1) * 0x1B)) & 0xFF)
#define MH_MUL3(X)   (MH_XT (X) ^ (X))
#define MH_MUL4(X)   MH_XT (MH_XT (X))
#define MH_MUL8(X)   MH_XT (MH_XT (MH_XT (X)))
#define MH_MUL9(X)   (MH_MUL8 (X) ^ (X))
#define MH_MUL11(X)  (MH_MUL8 (X) ^ MH_XT (X) ^ (X))
#define MH_MUL13(X)  (MH_MUL8 (X) ^ MH_MUL4 (X) ^ (X))
#define MH_MUL14(X)  (MH_MUL8 (X) ^ MH_MUL4 (X) ^ MH_XT (X))

//
// Column contribution of an S-box output in row 0: (2s, s, s, 3s) for
// MixColumns, (14s, 9s, 13s, 11s) for InvMixColumns, little-endian.
//
#define MH_TE(S)  \
  ((UINT32)MH_XT (S) | ((UINT32)(S) << 8) | ((UINT32)(S) << 16) | ((UINT32)MH_MUL3 (S) << 24))
#define MH_TD(S)                                                 \
  ((UINT32)MH_MUL14 (S) | ((UINT32)MH_MUL9 (S) << 8) |          \
   ((UINT32)MH_MUL13 (S) << 16) | ((UINT32)MH_MUL11 (S) << 24))
#define MH_BYTE(S)  (S)

STATIC CONST UINT32  mMhAesTe[256] = {
  MH_AES_SBOX_LIST (MH_TE)
};

STATIC CONST UINT32  mMhAesTd[256] = {
  MH_AES_INV_SBOX_LIST (MH_TD)
};

STATIC CONST UINT8  mMhAesSbox[256] = {
  MH_AES_SBOX_LIST (MH_BYTE)
};

STATIC CONST UINT8  mMhAesInvSbox[256] = {
  MH_AES_INV_SBOX_LIST (MH_BYTE)
};

#define MH_ROTL8(X)   (((X) << 8) | ((X) >> 24))
#define MH_ROTL16(X)  (((X) << 16) | ((X) >> 16))
#define MH_ROTL24(X)  (((X) << 24) | ((X) >> 8))

/**
  Read a little-endian 32-bit word from any address.

  @param[in] Bytes  Four bytes.

  @return The word.
**/
STATIC
UINT32
InternalMhLoadLe32 (
  IN CONST UINT8  *Bytes
  )
{
  return (UINT32)Bytes[0] | ((UINT32)Bytes[1] << 8) |
         ((UINT32)Bytes[2] << 16) | ((UINT32)Bytes[3] << 24);
}

/**
  Write a little-endian 32-bit word to any address.

  @param[out] Bytes  Receives four bytes.
  @param[in]  Value  The word.
**/
STATIC
VOID
InternalMhStoreLe32 (
  OUT UINT8   *Bytes,
  IN  UINT32  Value
  )
{
  Bytes[0] = (UINT8)Value;
  Bytes[1] = (UINT8)(Value >> 8);
  Bytes[2] = (UINT8)(Value >> 16);
  Bytes[3] = (UINT8)(Value >> 24);
}

/**
  SubWord of the key schedule, constant time: one pass over the S-box that
  reads every entry once and picks, for each of the four bytes at once, the
  entry whose index equals that byte (SWAR byte compare, no branches), so
  neither the address pattern nor the timing depends on the key.

  @param[in] Word  Four bytes, little-endian.

  @return The S-box applied to each byte.
**/
STATIC
UINT32
InternalMhSubWord (
  IN UINT32  Word
  )
{
  UINT32  Entry;
  UINT32  Difference;
  UINT32  NonZero;
  UINT32  Match;
  UINT32  Result;

  Result = 0;
  for (Entry = 0; Entry < 256; Entry++) {
    //
    // A byte of Difference is zero exactly where Word's byte equals Entry.
    // NonZero has 0x80 in every byte of Difference that is not zero (the
    // 7-bit sum cannot carry into the next byte); Match is then 0xFF in the
    // matching bytes and 0x00 elsewhere.
    //
    Difference = Word ^ (Entry * 0x01010101U);
    NonZero    = (((Difference & 0x7F7F7F7FU) + 0x7F7F7F7FU) | Difference) & 0x80808080U;
    Match      = ((NonZero >> 7) ^ 0x01010101U) * 0xFFU;
    Result    |= ((UINT32)mMhAesSbox[Entry] * 0x01010101U) & Match;
  }

  return Result;
}

/**
  Multiply by x in GF(2^8), constant time.

  @param[in] Value  A byte value.

  @return Value * x.
**/
STATIC
UINT32
InternalMhXtime (
  IN UINT32  Value
  )
{
  return ((Value << 1) ^ (0x1BU & (0U - ((Value >> 7) & 1U)))) & 0xFF;
}

/**
  InvMixColumns of one column, arithmetically (no tables).

  @param[in] Word  The column, row 0 in the low byte.

  @return The transformed column.
**/
STATIC
UINT32
InternalMhInvMixColumn (
  IN UINT32  Word
  )
{
  UINT32  In[4];
  UINT32  Mul9[4];
  UINT32  Mul11[4];
  UINT32  Mul13[4];
  UINT32  Mul14[4];
  UINT32  Index;
  UINT32  X2;
  UINT32  X4;
  UINT32  X8;

  for (Index = 0; Index < 4; Index++) {
    In[Index]    = (Word >> (8 * Index)) & 0xFF;
    X2           = InternalMhXtime (In[Index]);
    X4           = InternalMhXtime (X2);
    X8           = InternalMhXtime (X4);
    Mul9[Index]  = X8 ^ In[Index];
    Mul11[Index] = X8 ^ X2 ^ In[Index];
    Mul13[Index] = X8 ^ X4 ^ In[Index];
    Mul14[Index] = X8 ^ X4 ^ X2;
  }

  return (Mul14[0] ^ Mul11[1] ^ Mul13[2] ^ Mul9[3]) |
         ((Mul9[0] ^ Mul14[1] ^ Mul11[2] ^ Mul13[3]) << 8) |
         ((Mul13[0] ^ Mul9[1] ^ Mul14[2] ^ Mul11[3]) << 16) |
         ((Mul11[0] ^ Mul13[1] ^ Mul9[2] ^ Mul14[3]) << 24);
}

/**
  Tell whether a key structure looks initialised: a known path and a round
  count that keeps every round key index inside the arrays.

  @param[in] Key  The key.

  @retval TRUE   Usable.
  @retval FALSE  NULL, wiped or corrupted.
**/
BOOLEAN
InternalMhAesKeyIsValid (
  IN CONST OVMF_MH_AES_KEY  *Key
  )
{
  if (Key == NULL) {
    return FALSE;
  }

  if ((Key->Rounds != 10) && (Key->Rounds != 14)) {
    return FALSE;
  }

  return (BOOLEAN)((Key->Path == OVMF_MH_CRYPTO_PATH_PORTABLE) ||
                   ((Key->Path == OVMF_MH_CRYPTO_PATH_AESNI) && InternalMhAesNiBuilt ()));
}

/**
  Overwrite a buffer with zeros using volatile stores, then fence, so the
  compiler cannot drop the stores.

  @param[out] Buffer  The buffer; may be NULL when Size is 0.
  @param[in]  Size    Its size in bytes.
**/
VOID
EFIAPI
MigrationHelperSecureZero (
  OUT VOID   *Buffer,
  IN  UINTN  Size
  )
{
  volatile UINT8   *Bytes;
  volatile UINT64  *Words;
  UINTN            Index;

  if (Buffer == NULL) {
    return;
  }

  //
  // Whole 64-bit words while the buffer is 8-byte aligned (key schedules,
  // hash contexts), then the remaining bytes one by one.
  //
  Bytes = (volatile UINT8 *)Buffer;
  Index = 0;
  if (((UINTN)Buffer & (sizeof (UINT64) - 1)) == 0) {
    Words = (volatile UINT64 *)Buffer;
    for ( ; Size - Index >= sizeof (UINT64); Index += sizeof (UINT64)) {
      Words[Index / sizeof (UINT64)] = 0;
    }
  }

  for ( ; Index < Size; Index++) {
    Bytes[Index] = 0;
  }

  MemoryFence ();
}

/**
  Expand an AES key and choose the implementation.

  @param[out] Key         Receives the expanded key.
  @param[in]  KeyBytes    The raw key.
  @param[in]  KeySize     16 (AES-128) or 32 (AES-256).
  @param[in]  AllowAesNi  FALSE forces the portable path; TRUE uses AES-NI
                          when the CPU has it.

  @retval TRUE   Key is ready.
  @retval FALSE  A pointer is NULL or KeySize is not supported; Key (when
                 not NULL) is zeroed and unusable.
**/
BOOLEAN
EFIAPI
MigrationHelperAesInit (
  OUT OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8      *KeyBytes,
  IN  UINTN            KeySize,
  IN  BOOLEAN          AllowAesNi
  )
{
  UINT32  *Enc;
  UINT32  *Dec;
  UINTN   WordsInKey;
  UINTN   TotalWords;
  UINTN   Index;
  UINTN   Round;
  UINTN   Column;
  UINT32  Temp;
  UINT32  Rcon;

  if (Key == NULL) {
    return FALSE;
  }

  MigrationHelperSecureZero (Key, sizeof (*Key));
  if ((KeyBytes == NULL) ||
      ((KeySize != OVMF_MH_AES128_KEY_SIZE) && (KeySize != OVMF_MH_AES256_KEY_SIZE)))
  {
    return FALSE;
  }

  WordsInKey  = KeySize / 4;
  Key->Rounds = (UINT32)(WordsInKey + 6);
  TotalWords  = 4 * ((UINTN)Key->Rounds + 1);
  Enc         = Key->EncRoundKeys;
  Dec         = Key->DecRoundKeys;

  for (Index = 0; Index < WordsInKey; Index++) {
    Enc[Index] = InternalMhLoadLe32 (KeyBytes + 4 * Index);
  }

  Rcon = 1;
  for (Index = WordsInKey; Index < TotalWords; Index++) {
    Temp = Enc[Index - 1];
    if ((Index % WordsInKey) == 0) {
      //
      // RotWord moves byte 1 to byte 0: a right rotation of the LE word.
      //
      Temp = InternalMhSubWord ((Temp >> 8) | (Temp << 24)) ^ Rcon;
      Rcon = InternalMhXtime (Rcon);
    } else if ((WordsInKey > 6) && ((Index % WordsInKey) == 4)) {
      Temp = InternalMhSubWord (Temp);
    }

    Enc[Index] = Enc[Index - WordsInKey] ^ Temp;
  }

  //
  // Equivalent inverse cipher: reversed order, InvMixColumns on the inner
  // round keys (the layout AESDEC/AESDECLAST use).
  //
  for (Column = 0; Column < 4; Column++) {
    Dec[Column]                   = Enc[4 * Key->Rounds + Column];
    Dec[4 * Key->Rounds + Column] = Enc[Column];
  }

  for (Round = 1; Round < Key->Rounds; Round++) {
    for (Column = 0; Column < 4; Column++) {
      Dec[4 * Round + Column] = InternalMhInvMixColumn (Enc[4 * (Key->Rounds - Round) + Column]);
    }
  }

  if (AllowAesNi && InternalMhAesNiBuilt () && MigrationHelperCpuHasAesNi ()) {
    Key->Path = OVMF_MH_CRYPTO_PATH_AESNI;
  } else {
    Key->Path = OVMF_MH_CRYPTO_PATH_PORTABLE;
  }

  return TRUE;
}

/**
  Portable AES block encryption with the round keys of Key.

  @param[in]  Key  An expanded key (Path is not looked at).
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
VOID
InternalMhAesEncryptBlockPortable (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  CONST UINT32  *RoundKey;
  UINT32        S0;
  UINT32        S1;
  UINT32        S2;
  UINT32        S3;
  UINT32        T0;
  UINT32        T1;
  UINT32        T2;
  UINT32        T3;
  UINT32        Round;

  RoundKey = Key->EncRoundKeys;
  S0       = InternalMhLoadLe32 (In) ^ RoundKey[0];
  S1       = InternalMhLoadLe32 (In + 4) ^ RoundKey[1];
  S2       = InternalMhLoadLe32 (In + 8) ^ RoundKey[2];
  S3       = InternalMhLoadLe32 (In + 12) ^ RoundKey[3];

  //
  // Column c of the output takes row r from column c + r (ShiftRows).
  //
  for (Round = 1; Round < Key->Rounds; Round++) {
    RoundKey += 4;
    T0        = mMhAesTe[S0 & 0xFF] ^ MH_ROTL8 (mMhAesTe[(S1 >> 8) & 0xFF]) ^
                MH_ROTL16 (mMhAesTe[(S2 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTe[S3 >> 24]) ^ RoundKey[0];
    T1 = mMhAesTe[S1 & 0xFF] ^ MH_ROTL8 (mMhAesTe[(S2 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTe[(S3 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTe[S0 >> 24]) ^ RoundKey[1];
    T2 = mMhAesTe[S2 & 0xFF] ^ MH_ROTL8 (mMhAesTe[(S3 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTe[(S0 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTe[S1 >> 24]) ^ RoundKey[2];
    T3 = mMhAesTe[S3 & 0xFF] ^ MH_ROTL8 (mMhAesTe[(S0 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTe[(S1 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTe[S2 >> 24]) ^ RoundKey[3];
    S0 = T0;
    S1 = T1;
    S2 = T2;
    S3 = T3;
  }

  RoundKey += 4;
  T0        = ((UINT32)mMhAesSbox[S0 & 0xFF] | ((UINT32)mMhAesSbox[(S1 >> 8) & 0xFF] << 8) |
               ((UINT32)mMhAesSbox[(S2 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesSbox[S3 >> 24] << 24)) ^ RoundKey[0];
  T1 = ((UINT32)mMhAesSbox[S1 & 0xFF] | ((UINT32)mMhAesSbox[(S2 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesSbox[(S3 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesSbox[S0 >> 24] << 24)) ^ RoundKey[1];
  T2 = ((UINT32)mMhAesSbox[S2 & 0xFF] | ((UINT32)mMhAesSbox[(S3 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesSbox[(S0 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesSbox[S1 >> 24] << 24)) ^ RoundKey[2];
  T3 = ((UINT32)mMhAesSbox[S3 & 0xFF] | ((UINT32)mMhAesSbox[(S0 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesSbox[(S1 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesSbox[S2 >> 24] << 24)) ^ RoundKey[3];

  InternalMhStoreLe32 (Out, T0);
  InternalMhStoreLe32 (Out + 4, T1);
  InternalMhStoreLe32 (Out + 8, T2);
  InternalMhStoreLe32 (Out + 12, T3);
}

/**
  Portable AES block decryption with the round keys of Key.

  @param[in]  Key  An expanded key (Path is not looked at).
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
VOID
InternalMhAesDecryptBlockPortable (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  CONST UINT32  *RoundKey;
  UINT32        S0;
  UINT32        S1;
  UINT32        S2;
  UINT32        S3;
  UINT32        T0;
  UINT32        T1;
  UINT32        T2;
  UINT32        T3;
  UINT32        Round;

  RoundKey = Key->DecRoundKeys;
  S0       = InternalMhLoadLe32 (In) ^ RoundKey[0];
  S1       = InternalMhLoadLe32 (In + 4) ^ RoundKey[1];
  S2       = InternalMhLoadLe32 (In + 8) ^ RoundKey[2];
  S3       = InternalMhLoadLe32 (In + 12) ^ RoundKey[3];

  //
  // Column c of the output takes row r from column c - r (InvShiftRows).
  //
  for (Round = 1; Round < Key->Rounds; Round++) {
    RoundKey += 4;
    T0        = mMhAesTd[S0 & 0xFF] ^ MH_ROTL8 (mMhAesTd[(S3 >> 8) & 0xFF]) ^
                MH_ROTL16 (mMhAesTd[(S2 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTd[S1 >> 24]) ^ RoundKey[0];
    T1 = mMhAesTd[S1 & 0xFF] ^ MH_ROTL8 (mMhAesTd[(S0 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTd[(S3 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTd[S2 >> 24]) ^ RoundKey[1];
    T2 = mMhAesTd[S2 & 0xFF] ^ MH_ROTL8 (mMhAesTd[(S1 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTd[(S0 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTd[S3 >> 24]) ^ RoundKey[2];
    T3 = mMhAesTd[S3 & 0xFF] ^ MH_ROTL8 (mMhAesTd[(S2 >> 8) & 0xFF]) ^
         MH_ROTL16 (mMhAesTd[(S1 >> 16) & 0xFF]) ^ MH_ROTL24 (mMhAesTd[S0 >> 24]) ^ RoundKey[3];
    S0 = T0;
    S1 = T1;
    S2 = T2;
    S3 = T3;
  }

  RoundKey += 4;
  T0        = ((UINT32)mMhAesInvSbox[S0 & 0xFF] | ((UINT32)mMhAesInvSbox[(S3 >> 8) & 0xFF] << 8) |
               ((UINT32)mMhAesInvSbox[(S2 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesInvSbox[S1 >> 24] << 24)) ^ RoundKey[0];
  T1 = ((UINT32)mMhAesInvSbox[S1 & 0xFF] | ((UINT32)mMhAesInvSbox[(S0 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesInvSbox[(S3 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesInvSbox[S2 >> 24] << 24)) ^ RoundKey[1];
  T2 = ((UINT32)mMhAesInvSbox[S2 & 0xFF] | ((UINT32)mMhAesInvSbox[(S1 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesInvSbox[(S0 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesInvSbox[S3 >> 24] << 24)) ^ RoundKey[2];
  T3 = ((UINT32)mMhAesInvSbox[S3 & 0xFF] | ((UINT32)mMhAesInvSbox[(S2 >> 8) & 0xFF] << 8) |
        ((UINT32)mMhAesInvSbox[(S1 >> 16) & 0xFF] << 16) | ((UINT32)mMhAesInvSbox[S0 >> 24] << 24)) ^ RoundKey[3];

  InternalMhStoreLe32 (Out, T0);
  InternalMhStoreLe32 (Out + 4, T1);
  InternalMhStoreLe32 (Out + 8, T2);
  InternalMhStoreLe32 (Out + 12, T3);
}

/**
  Encrypt one 16-byte block. In and Out may be the same buffer.

  @param[in]  Key  An initialised AES key.
  @param[in]  In   Plaintext block.
  @param[out] Out  Ciphertext block.

  @retval TRUE   Out holds the ciphertext.
  @retval FALSE  Key is not initialised; Out is zeroed.
**/
BOOLEAN
EFIAPI
MigrationHelperAesEncryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  if (Out == NULL) {
    return FALSE;
  }

  if ((In == NULL) || !InternalMhAesKeyIsValid (Key)) {
    ZeroMem (Out, OVMF_MH_AES_BLOCK_SIZE);
    return FALSE;
  }

  if (Key->Path == OVMF_MH_CRYPTO_PATH_AESNI) {
    InternalMhAesNiEncryptBlock (Key, In, Out);
  } else {
    InternalMhAesEncryptBlockPortable (Key, In, Out);
  }

  return TRUE;
}

/**
  Decrypt one 16-byte block. In and Out may be the same buffer.

  @param[in]  Key  An initialised AES key.
  @param[in]  In   Ciphertext block.
  @param[out] Out  Plaintext block.

  @retval TRUE   Out holds the plaintext.
  @retval FALSE  Key is not initialised; Out is zeroed.
**/
BOOLEAN
EFIAPI
MigrationHelperAesDecryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  )
{
  if (Out == NULL) {
    return FALSE;
  }

  if ((In == NULL) || !InternalMhAesKeyIsValid (Key)) {
    ZeroMem (Out, OVMF_MH_AES_BLOCK_SIZE);
    return FALSE;
  }

  if (Key->Path == OVMF_MH_CRYPTO_PATH_AESNI) {
    InternalMhAesNiDecryptBlock (Key, In, Out);
  } else {
    InternalMhAesDecryptBlockPortable (Key, In, Out);
  }

  return TRUE;
}

/**
  Wipe an AES key with volatile stores followed by a memory fence.

  @param[in,out] Key  The key; may be NULL.
**/
VOID
EFIAPI
MigrationHelperAesWipe (
  IN OUT OVMF_MH_AES_KEY  *Key
  )
{
  if (Key != NULL) {
    MigrationHelperSecureZero (Key, sizeof (*Key));
  }
}
