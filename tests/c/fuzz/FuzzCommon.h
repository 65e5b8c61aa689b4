/** @file
  Shared fuzzing support (host only): helper contexts whose guest window,
  shared area and private memory are separate mappings between PROT_NONE
  guard pages, a deterministic RDRAND stand-in, and FuzzCall(), which serves
  one command and checks every invariant the docs promise.

  Used by the random scenario driver (FuzzDispatch.c) and by the libFuzzer
  harnesses (FuzzMailbox.c, FuzzStream.c, FuzzRequest.c).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef FUZZ_COMMON_H_
#define FUZZ_COMMON_H_

//
// System headers come first in the harnesses; EDK2 defines NULL its own way.
//
#undef NULL
#include <Base.h>
#include <Library/MigrationHelperCoreLib.h>

#include "MigrationHelperCoreInternal.h"

#define FUZZ_PAGE           4096ULL
#define FUZZ_RECORD_MAX     (40ULL + FUZZ_PAGE + 16ULL)
#define FUZZ_END_RECORD     136ULL
#define FUZZ_STREAM_HEADER  160ULL

///
/// The fixed transport key of every fuzz helper: bytes 0x00, 0x01 ... 0x1f.
/// host_shim/fuzz_corpus.py seals the seed streams with the same key.
///
#define FUZZ_KEY_BYTE(Index)  ((UINT8)(Index))

///
/// What the invariant checks compare before and after a command: the
/// session's observable state (a refused command must not change it).
///
typedef struct {
  UINT32     State;
  BOOLEAN    KeyLoaded;
  BOOLEAN    KeyReady;
  BOOLEAN    TrackPages;
  UINT64     NextSequence;
  UINT64     RecordCount;
  UINT8      SessionId[OVMF_MH_SESSION_ID_SIZE];
  UINT8      Chain[OVMF_MH_DIGEST_SIZE];
  UINT8      TransportKey[OVMF_MH_KEY_SIZE];
} FUZZ_SESSION_VIEW;

///
/// One helper under test, plus the checker's own model of its import session
/// (derived from the fixed key, independent of the helper's private state).
///
typedef struct {
  OVMF_MH_HELPER_CONTEXT    Context;
  UINT8                     *Mailbox;
  UINT8                     *Window;
  UINT64                    WindowSize;
  UINT8                     *SecretPage;
  UINT32                    Seq;
  BOOLEAN                   ShutDown;         ///< SHUTDOWN served; the VM would be off
  UINT8                     *DataBefore;      ///< The data area before the command being checked
  UINT8                     *WindowExpected;  ///< The window before the command, then as it must be after
  BOOLEAN                   HostMarksWrites;  ///< The harness reports every write (FuzzHostWrote*, or the Stale flags)
  BOOLEAN                   DataStale;        ///< The data area was written since the last command, where unknown
  BOOLEAN                   WindowStale;      ///< The window was written since the last command, where unknown
  BOOLEAN                   ShadowOpen;       ///< Checker holds the import session key
  OVMF_MH_OCB_KEY           ShadowKey;
  UINT8                     ShadowSessionId[OVMF_MH_SESSION_ID_SIZE];
  UINT8                     ShadowChain[OVMF_MH_DIGEST_SIZE];
  UINT64                    ShadowNext;
  UINT32                    ShadowShardIndex; ///< The verified header's shard: where ZERO_RANGE records may point
  UINT32                    ShadowShardCount;
} FUZZ_HELPER;

/**
  Report a broken invariant and abort (libFuzzer records the input).

  @param[in] What    What broke.
  @param[in] Detail  A number that helps locate it.
**/
VOID
FuzzFail (
  IN CONST CHAR8  *What,
  IN UINT64       Detail
  );

/**
  Map Size bytes (rounded up to pages) with a PROT_NONE guard page on each
  side; the returned pointer is placed so that the usable bytes END at the
  upper guard page, so any overrun faults at once.

  @param[in] Size  Bytes.

  @return The usable bytes.
**/
UINT8 *
FuzzGuardedMap (
  IN UINT64  Size
  );

/**
  Seed the deterministic RDRAND stand-in; FailAfter draws succeed, then every
  draw fails (MAX_UINT64: never fails).

  @param[in] Seed       Seed.
  @param[in] FailAfter  Number of successful draws.
**/
VOID
FuzzSeedRandom (
  IN UINT64  Seed,
  IN UINT64  FailAfter
  );

/**
  Create a helper with its own guarded mailbox, window and private memory,
  load the fixed key and publish READY.

  @param[out] Helper       The helper.
  @param[in]  DataSize     Bytes of the data area.
  @param[in]  WindowPages  Pages of the guest window.
**/
VOID
FuzzCreateHelper (
  OUT FUZZ_HELPER  *Helper,
  IN  UINT64       DataSize,
  IN  UINT64       WindowPages
  );

/**
  Bring a helper back to the state it had after FuzzCreateHelper (key
  loaded again, session IDLE, data area zero, window = Pattern when given),
  so that each fuzz input starts from the same state.

  @param[in,out] Helper   The helper.
  @param[in]     Pattern  WindowSize bytes, or NULL to zero the window.
  @param[in]     LoadKey  FALSE leaves the helper without a transport key.
**/
VOID
FuzzResetHelper (
  IN OUT FUZZ_HELPER  *Helper,
  IN     CONST UINT8  *Pattern,
  IN     BOOLEAN      LoadKey
  );

/**
  The harness wrote Length bytes of the data area at Offset (wrapping at
  its end) since the last command: the checker's copy takes them over. A
  write the harness does not report makes the next command's check fail.

  @param[in,out] Helper  The helper.
  @param[in]     Offset  Offset into the data area.
  @param[in]     Length  Bytes written.
**/
VOID
FuzzHostWroteData (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT64       Offset,
  IN     UINT64       Length
  );

/**
  The harness wrote one byte of the guest window at Offset since the last
  command: the checker's copy takes it over.

  @param[in,out] Helper  The helper.
  @param[in]     Offset  Offset into the window.
**/
VOID
FuzzHostWroteWindowByte (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT64       Offset
  );

/**
  Post a command, serve it and check the invariants:

  - the status is one the ABI defines, the published session state is the
    session's, and a stream failure leaves the session FAILED;
  - a refused command (parameter, state or key checks) changes nothing:
    session, data area and guest window are as before;
  - the data area changes only inside the output span of an export command
    or CHECK_PAGES;
  - the guest window changes only on IMPORT_BATCH, and then only to the
    plaintext of records that authenticate under the checker's own copy of
    the session key, in sequence (no unauthenticated byte in the window);
  - an import completes only when the checker verified the end record;
  - SHUTDOWN leaves no key behind, and no page-hash key outlives the
    export session that derived it.

  With AddressSanitizer, a region the command has no business with (the
  data area for commands without arguments in it, the window for commands
  other than EXPORT_BATCH, CHECK_PAGES and IMPORT_BATCH) is poisoned while
  the command runs, so that any access to it is a crash; that replaces the
  comparison of that region after the command.

  @param[in,out] Helper   The helper.
  @param[in]     Command  Command code.
  @param[in]     Arg      OVMF_MH_ARG_COUNT arguments.
  @param[out]    Result   OVMF_MH_RESULT_COUNT results.

  @return The status the helper published.
**/
UINT32
FuzzCall (
  IN OUT FUZZ_HELPER  *Helper,
  IN     UINT32       Command,
  IN     CONST UINT64 *Arg,
  OUT    UINT64       *Result
  );

#endif
