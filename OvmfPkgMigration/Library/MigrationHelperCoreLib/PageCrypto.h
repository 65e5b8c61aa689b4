/** @file
  Page crypto of the migration helper: AES (128/256) with an AES-NI path and a
  portable path, AES-OCB3 (RFC 7253) with a 96-bit nonce and a 128-bit tag,
  SHA-256, HMAC-SHA256 and HKDF-SHA256 (RFC 5869).

  Rules that hold for everything declared here, because the code also runs in
  the SEC phase from flash:
  - no writable globals: the AES path chosen at init time is recorded in the
    key structure, never in a static variable;
  - no libc, no floating point, no 128-bit integers; memory helpers come from
    BaseMemoryLib;
  - SIMD only inside AesNi.c, in functions that carry a target attribute and
    only load data with unaligned loads.

  The AES-NI path and the portable path produce identical bytes.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef MIGRATION_HELPER_PAGE_CRYPTO_H_
#define MIGRATION_HELPER_PAGE_CRYPTO_H_

#include <Base.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>

#define OVMF_MH_AES_BLOCK_SIZE   16
#define OVMF_MH_AES_MAX_ROUNDS   14
#define OVMF_MH_AES128_KEY_SIZE  16
#define OVMF_MH_AES256_KEY_SIZE  32

#define OVMF_MH_OCB_KEY_SIZE    OVMF_MH_AES256_KEY_SIZE
#define OVMF_MH_OCB_NONCE_SIZE  12
#define OVMF_MH_OCB_TAG_SIZE    16

///
/// Number of precomputed L_i values. Block indices of a message are below
/// 2^60 (UINTN byte counts), so ntz(i) never reaches this bound.
///
#define OVMF_MH_OCB_L_COUNT  64

#define OVMF_MH_SHA256_DIGEST_SIZE  32
#define OVMF_MH_SHA256_BLOCK_SIZE   64

///
/// Largest output of HKDF-SHA256: 255 * HashLen.
///
#define OVMF_MH_HKDF_SHA256_MAX_OUTPUT  (255 * OVMF_MH_SHA256_DIGEST_SIZE)

///
/// Values of OVMF_MH_AES_KEY.Path. Zero means "not initialised or wiped":
/// every function refuses such a key.
///
#define OVMF_MH_CRYPTO_PATH_NONE      0
#define OVMF_MH_CRYPTO_PATH_PORTABLE  1
#define OVMF_MH_CRYPTO_PATH_AESNI     2

///
/// An expanded AES key. The round keys are stored as 32-bit words whose
/// little-endian byte order is the FIPS-197 byte order of the round key, so
/// on x86 the AES-NI path loads them directly (unaligned loads).
///
typedef struct {
  ///
  /// Encryption round keys 0..Rounds.
  ///
  UINT32    EncRoundKeys[4 * (OVMF_MH_AES_MAX_ROUNDS + 1)];
  ///
  /// Round keys of the equivalent inverse cipher, in the order used:
  /// Enc[Rounds], InvMixColumns (Enc[Rounds-1]) ... InvMixColumns (Enc[1]),
  /// Enc[0]. This is the layout AESDEC expects.
  ///
  UINT32    DecRoundKeys[4 * (OVMF_MH_AES_MAX_ROUNDS + 1)];
  UINT32    Rounds;      ///< 10 or 14
  UINT32    Path;        ///< OVMF_MH_CRYPTO_PATH_*
} OVMF_MH_AES_KEY;

///
/// An AES-OCB3 key: the AES key plus the key-dependent OCB values.
///
typedef struct {
  OVMF_MH_AES_KEY    Aes;
  UINT8              LStar[OVMF_MH_AES_BLOCK_SIZE];                     ///< L_* = E(K, 0^128)
  UINT8              LDollar[OVMF_MH_AES_BLOCK_SIZE];                   ///< L_$ = double(L_*)
  UINT8              L[OVMF_MH_OCB_L_COUNT][OVMF_MH_AES_BLOCK_SIZE];    ///< L_i = double^(i+1)(L_$)
  BOOLEAN            UseVaes;                                           ///< Whole blocks take the VAES loop (Aes.Path is AESNI)
} OVMF_MH_OCB_KEY;

///
/// Paths MigrationHelperOcbInitPaths may choose (bits). Without AESNI the
/// key uses the portable code; VAES needs AESNI as well.
///
#define OVMF_MH_OCB_ALLOW_AESNI  BIT0
#define OVMF_MH_OCB_ALLOW_VAES   BIT1

///
/// Streaming SHA-256 state.
///
typedef struct {
  UINT32    State[8];
  UINT64    TotalSize;                          ///< Bytes hashed so far
  UINT8     Buffer[OVMF_MH_SHA256_BLOCK_SIZE];
  UINTN     BufferSize;                         ///< Bytes waiting in Buffer
} OVMF_MH_SHA256_CONTEXT;

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
  );

/**
  Tell whether the CPU can run the VAES path: AES-NI, AVX, AVX2 and VAES in
  CPUID, CR4.OSXSAVE set and the AVX register state enabled in XCR0 (the
  helper's SEC code sets both when the CPU has AVX).

  @retval TRUE   The VAES path can be used.
  @retval FALSE  It cannot, or this build has no VAES path.
**/
BOOLEAN
EFIAPI
MigrationHelperCpuHasVaes (
  VOID
  );

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
  );

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
  );

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
  );

/**
  Wipe an AES key with volatile stores followed by a memory fence.

  @param[in,out] Key  The key; may be NULL.
**/
VOID
EFIAPI
MigrationHelperAesWipe (
  IN OUT OVMF_MH_AES_KEY  *Key
  );

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
  );

/**
  Prepare an AES-OCB3 key, choosing among the paths Allow permits the
  fastest one the CPU has: VAES (whole blocks two per instruction), AES-NI,
  or the portable code. Every path gives the same bytes.

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
  );

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
  );

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
  );

/**
  Wipe an OCB key with volatile stores followed by a memory fence.

  @param[in,out] Key  The key; may be NULL.
**/
VOID
EFIAPI
MigrationHelperOcbWipe (
  IN OUT OVMF_MH_OCB_KEY  *Key
  );

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
  );

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
  );

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
  );

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
  );

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
  );

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
  );

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
  );

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
  );

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
  );

//
// Library-internal interface between Aes.c, AesNi.c and Ocb.c.
//

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
  );

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
  );

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
  );

/**
  Tell whether this build contains the AES-NI path at all.

  @retval TRUE   AesNi.c was compiled with its SIMD code.
  @retval FALSE  Only the portable path exists.
**/
BOOLEAN
InternalMhAesNiBuilt (
  VOID
  );

/**
  AES-NI block encryption. Only call when Key->Path is AESNI.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
VOID
InternalMhAesNiEncryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  );

/**
  AES-NI block decryption. Only call when Key->Path is AESNI.

  @param[in]  Key  An expanded key.
  @param[in]  In   16 bytes.
  @param[out] Out  16 bytes; may equal In.
**/
VOID
InternalMhAesNiDecryptBlock (
  IN  CONST OVMF_MH_AES_KEY  *Key,
  IN  CONST UINT8            *In,
  OUT UINT8                  *Out
  );

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
  );

/**
  Tell whether this build contains the VAES path at all.

  @retval TRUE   AesVaes.c was compiled with its vector code.
  @retval FALSE  No VAES path in this build.
**/
BOOLEAN
InternalMhVaesBuilt (
  VOID
  );

/**
  OCB bulk processing of whole blocks with VAES and AVX2, eight blocks per
  iteration; the same contract as InternalMhAesNiOcbBlocks.

  @param[in]     Key         An OCB key whose UseVaes is set.
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
  );

/**
  Number of trailing zero bits of a non-zero value.

  @param[in] Value  Non-zero.

  @return ntz(Value); 64 for zero.
**/
UINTN
InternalMhNtz64 (
  IN UINT64  Value
  );

#endif
