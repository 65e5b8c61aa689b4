/** @file
  Private declarations of MigrationHelperCoreLib.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef MIGRATION_HELPER_CORE_INTERNAL_H_
#define MIGRATION_HELPER_CORE_INTERNAL_H_

#include <Base.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>
#include <Library/MigrationHelperCoreLib.h>

#include "PageCrypto.h"

///
/// Largest record (PAGE) and the end record, in bytes.
///
#define OVMF_MH_MAX_RECORD_SIZE \
  (sizeof (OVMF_MH_RECORD_HEADER) + OVMF_MH_PAGE_SIZE + OVMF_MH_TAG_SIZE)
#define OVMF_MH_END_RECORD_SIZE \
  (sizeof (OVMF_MH_RECORD_HEADER) + sizeof (OVMF_MH_END_PAYLOAD) + OVMF_MH_TAG_SIZE)

#define OVMF_MH_ZERO_RANGE_RECORD_SIZE \
  (sizeof (OVMF_MH_RECORD_HEADER) + sizeof (OVMF_MH_ZERO_RANGE_PAYLOAD) + OVMF_MH_TAG_SIZE)

///
/// Session state and buffers, in helper-private memory.
///
struct OVMF_MH_SESSION {
  UINT32                   State;                        ///< OVMF_MH_SESSION_*
  BOOLEAN                  KeyLoaded;                    ///< TransportKey is valid
  BOOLEAN                  KeyReady;                     ///< Key is a live session key
  BOOLEAN                  AllowAesNi;
  BOOLEAN                  AllowVaes;                    ///< CPU passed MigrationHelperCpuHasVaes, request did not forbid it
  UINT8                    TransportKey[OVMF_MH_KEY_SIZE];
  OVMF_MH_OCB_KEY          Key;
  UINT8                    SessionId[OVMF_MH_SESSION_ID_SIZE];
  UINT8                    Chain[OVMF_MH_DIGEST_SIZE];
  UINT64                   NextSequence;
  UINT64                   RecordCount;
  OVMF_MH_STREAM_HEADER    StreamHeader;
  UINT64                   PageList[OVMF_MH_MAX_BATCH_PAGES];
  UINT8                    Scratch[OVMF_MH_END_RECORD_SIZE]; ///< Tags, the end record

  UINT8                    PageBuffer[OVMF_MH_PAGE_SIZE];
  UINT32                   PageHashKey[OVMF_MH_PAGE_HASH_KEY_SIZE / sizeof (UINT32)];
  BOOLEAN                  TrackPages;                   ///< EXPORT_BEGIN asked for OVMF_MH_EXPORT_TRACK_PAGES
  BOOLEAN                  PageHashKeyReady;             ///< PageHashKey and ZeroPageHash derived for this session
  UINT64                   ZeroPageHash;                 ///< Hash of an all-zero page
  UINT64                   *PageHash;                    ///< One per window page, after the session in the work area; 0: not sent
  UINT64                   TrackedPageCount;             ///< Entries of PageHash: every page of the guest window
  BOOLEAN                  ChallengeSet;                 ///< IMPORT_CHALLENGE issued Challenge, not yet used
  BOOLEAN                  ImportDone;                   ///< COMPLETE after an import: IMPORT_RECEIPT/COMMIT allowed
  BOOLEAN                  ExportDone;                   ///< COMPLETE after an export: EXPORT_VERIFY_COMMIT allowed
  BOOLEAN                  Committed;                    ///< IMPORT_COMMIT passed: IMPORT_COMMIT_PROOF allowed
  UINT8                    ReceiptsDigest[OVMF_MH_DIGEST_SIZE]; ///< Of the receipts IMPORT_COMMIT accepted
  UINT8                    Challenge[OVMF_MH_CHALLENGE_SIZE];
  UINT8                    Input[sizeof (OVMF_MH_COMMIT_PROOF) + OVMF_MH_MAX_SHARDS * sizeof (OVMF_MH_RECEIPT)]; ///< Private copy of a binding, commit or commit-proof input
};

/**
  Zero the vector registers (AesNi.c): the page crypto leaves key-derived
  values and plaintext in them, and the host sees a halted helper's
  registers.
**/
VOID
InternalMhWipeVectorRegisters (
  VOID
  );

OVMF_MH_SESSION *
InternalSession (
  IN OVMF_MH_HELPER_CONTEXT  *Context
  );

VOID
InternalEndSession (
  IN OUT OVMF_MH_SESSION  *Session
  );

UINT32
InternalExportBegin (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalExportBatch (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalExportEnd (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportBegin (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportBatch (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalCheckPages (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalExportZeroRanges (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportEnd (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportChallenge (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportReceipt (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportCommit (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalImportCommitProof (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

UINT32
InternalExportVerifyCommit (
  IN OUT OVMF_MH_HELPER_CONTEXT  *Context,
  IN     CONST UINT64            *Arg,
  OUT    UINT64                  *Result
  );

#endif
