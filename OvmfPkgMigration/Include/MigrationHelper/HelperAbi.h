/** @file
  The one definition of every structure the migration helper shares with the
  host: the fw_cfg request blob, the mailbox header in the shared area and the
  image info record that tools find in the firmware image.

  The host side (Python, helper/abi.py) parses this file; keep to the subset
  it understands: "#define NAME <integer>" constants and typedef'd packed
  structs whose fields are UINT8/UINT16/UINT32/UINT64 scalars or
  one-dimensional arrays of them. All multi-byte fields are little endian.

  docs/fw-cfg-request.md and docs/mailbox.md describe every field.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef OVMF_MH_HELPER_ABI_H_
#define OVMF_MH_HELPER_ABI_H_

//
// ABI version. The major number changes when a field moves or changes
// meaning; the minor number when commands or capabilities are added.
//
#define OVMF_MH_ABI_MAJOR  4
#define OVMF_MH_ABI_MINOR  2   ///< 4.2: tick window before the deep halt (idle policy NO_TICK); 4.1: idle word, helpers halt when idle (HALT_WAKE); commit proof (IMPORT_COMMIT_PROOF, EXPORT_VERIFY_COMMIT); 4.0: shared pages sealed in the END record (stream version 3); 3.0: request version 2, own page tables

#define OVMF_MH_PAGE_SIZE  0x1000

//
// ---------------------------------------------------------------------------
// fw_cfg request: QEMU file "opt/ovmf-mh/request" (-fw_cfg name=...,file=...)
// ---------------------------------------------------------------------------
//
#define OVMF_MH_REQUEST_SIGNATURE  0x52484d4f          // "OMHR"
#define OVMF_MH_REQUEST_VERSION    2
#define OVMF_MH_REQUEST_FW_CFG_NAME  "opt/ovmf-mh/request"
//
// Request Flags. NO_VECTOR_CRYPTO: never use the VAES page-crypto path,
// even where the CPU offers it (benchmarks run both paths side by side).
//
#define OVMF_MH_REQUEST_NO_VECTOR_CRYPTO  0x1
#define OVMF_MH_REQUEST_FLAGS_KNOWN       0x1

//
// Memory the helper itself uses, in guest-physical addresses of the helper
// VM. The host may place the mailbox, the work area and the guest window
// only at or above OVMF_MH_MAILBOX_MIN_BASE; everything below is firmware
// territory: SEC's page tables, temporary RAM and stack (0x800000..0x81FFFF,
// from the OVMF flash layout), the launch-secret page and the helper's
// private RAM (its IDT and context, then its own page tables).
//
#define OVMF_MH_SECRET_PAGE_BASE     0x00F00000
#define OVMF_MH_PRIVATE_BASE         0x01000000
#define OVMF_MH_PRIVATE_SIZE         0x00800000
#define OVMF_MH_MAILBOX_MIN_BASE     0x01800000
#define OVMF_MH_MAILBOX_MIN_SIZE     0x00002000
#define OVMF_MH_MAILBOX_MAX_SIZE     0x04000000
//
// The mailbox and the work area are reached through the reset vector's
// identity map before the helper loads its own page tables, so they lie
// below this limit; from it to 4 GiB is the firmware's (the flash SEC runs
// from), which nothing the request names may overlap. Guest window ranges
// may lie anywhere else in RAM, below or above 4 GiB.
//
#define OVMF_MH_ADDRESS_LIMIT        0xFF000000
//
// Guest window (request version 2): up to this many ranges of helper-VM
// RAM, in guest-offset order (range 0 holds guest offsets 0 .. Size[0]-1,
// range 1 the next ones, ...), at most OVMF_MH_MAX_WINDOW_SIZE bytes in all.
//
#define OVMF_MH_MAX_WINDOW_RANGES    8
#define OVMF_MH_MAX_WINDOW_SIZE      0x4000000000
//
// Work area: helper-private RAM the host lends for session state and page
// tracking. It must hold at least
//   OVMF_MH_WORK_AREA_BASE_SIZE + OVMF_MH_WORK_AREA_PAGE_BYTES * (window bytes / 4096)
// bytes: every page of the window is tracked for CHECK_PAGES.
//
#define OVMF_MH_WORK_AREA_BASE_SIZE  0x00100000
#define OVMF_MH_WORK_AREA_PAGE_BYTES 8
//
// The helper's page tables live in its private RAM after its context, at
// most this many 4 KiB tables; a layout that needs more is refused
// (PAGE_TABLES_TOO_LARGE).
//
#define OVMF_MH_PAGE_TABLE_BUDGET    0x7F0

#pragma pack(1)

typedef struct {
  UINT32    Signature;        ///< OVMF_MH_REQUEST_SIGNATURE
  UINT16    Version;          ///< OVMF_MH_REQUEST_VERSION
  UINT16    Size;             ///< sizeof (OVMF_MH_REQUEST); the blob is exactly this long
  UINT32    Flags;            ///< OVMF_MH_REQUEST_* flags; other bits must be zero
  UINT32    WindowRangeCount; ///< Used entries of WindowBase/WindowSize, 0..OVMF_MH_MAX_WINDOW_RANGES
  UINT64    MailboxBase;      ///< GPA of the shared area, page aligned
  UINT64    MailboxSize;      ///< Bytes, page aligned, MIN_SIZE..MAX_SIZE
  UINT64    WorkAreaBase;     ///< GPA of the helper's work area, page aligned, below 4 GiB
  UINT64    WorkAreaSize;     ///< Bytes, page aligned, see OVMF_MH_WORK_AREA_BASE_SIZE
  UINT64    WindowBase[OVMF_MH_MAX_WINDOW_RANGES]; ///< GPA of each window range; unused entries zero
  UINT64    WindowSize[OVMF_MH_MAX_WINDOW_RANGES]; ///< Bytes of each range, page aligned; unused entries zero
} OVMF_MH_REQUEST;

#pragma pack()

//
// ---------------------------------------------------------------------------
// Mailbox header: the first 4 KiB of the shared area
// ---------------------------------------------------------------------------
//
#define OVMF_MH_MAILBOX_SIGNATURE    0x424d484d464d564f  // "OVMFMHMB"
#define OVMF_MH_MAILBOX_HEADER_SIZE  0x1000
#define OVMF_MH_ARG_COUNT            6
#define OVMF_MH_RESULT_COUNT         6

//
// Helper states (OVMF_MH_MAILBOX_HEADER.State).
//
#define OVMF_MH_STATE_NONE      0     ///< Nothing published yet
#define OVMF_MH_STATE_READY     1     ///< Serving commands
#define OVMF_MH_STATE_SHUTDOWN  2     ///< Orderly shutdown in progress; QEMU exits next
#define OVMF_MH_STATE_HALTED    3     ///< Refused the request or failed; HaltReason says why
#define OVMF_MH_STATE_FAULT     4     ///< CPU exception; HaltReason is the vector

//
// Session states (OVMF_MH_MAILBOX_HEADER.SessionState).
//
#define OVMF_MH_SESSION_IDLE       0
#define OVMF_MH_SESSION_EXPORTING  1
#define OVMF_MH_SESSION_IMPORTING  2
#define OVMF_MH_SESSION_COMPLETE   3   ///< Export ended, or import verified to the end
#define OVMF_MH_SESSION_FAILED     4   ///< Import failed; only RESET leaves this state

#define OVMF_MH_MAX_BATCH_PAGES    512
//
// CHECK_PAGES remembers a keyed hash of each page an export session sent,
// for every page of the guest window (ABI 3.0; the hashes live in the work
// area the request lends the helper).
//

//
// EXPORT_BEGIN Arg2 flags. TRACK_PAGES (ABI 1.3): remember what each page
// looked like when sealed, for CHECK_PAGES; only live migration asks, so a
// plain export does without the per-page bookkeeping. BOUND (ABI 2.0): the
// binding input at Arg3 is the targets' challenge nonces (ShardCount of
// them, OVMF_MH_CHALLENGE_SIZE bytes each, in shard order), and the
// stream is bound to target ShardIndex's nonce and to the migration id the
// helper computes from them; without it the binding input is a migration id
// of OVMF_MH_MIGRATION_ID_SIZE bytes the host chose (an unbound stream).
// Other bits must be 0.
//
#define OVMF_MH_EXPORT_TRACK_PAGES  0x1
#define OVMF_MH_EXPORT_BOUND        0x2
#define OVMF_MH_EXPORT_FLAGS_KNOWN  0x3
//
// Shards of one migration: one stream per helper, at most this many.
//
#define OVMF_MH_MAX_SHARDS          64

//
// Commands (OVMF_MH_MAILBOX_HEADER.Command).
//
#define OVMF_MH_CMD_NOP         0     ///< Round trip only
#define OVMF_MH_CMD_QUERY       1     ///< Results: counters, see docs/mailbox.md
#define OVMF_MH_CMD_SHUTDOWN    2     ///< Acknowledge, then power the helper VM off
#define OVMF_MH_CMD_RESET       3     ///< Abandon the session (keeps the transport key)
#define OVMF_MH_CMD_EXPORT_BEGIN  4   ///< Arg0 out offset, Arg1 capacity, Arg2 flags -> stream header
#define OVMF_MH_CMD_EXPORT_BATCH  5   ///< Arg0 list offset, Arg1 count, Arg2 out offset, Arg3 capacity
#define OVMF_MH_CMD_EXPORT_END    6   ///< Arg0 out offset, Arg1 capacity, Arg2 shared digest offset, Arg3 shared page count -> end record
#define OVMF_MH_CMD_IMPORT_BEGIN  7   ///< Arg0 in offset, Arg1 size: stream header
#define OVMF_MH_CMD_IMPORT_BATCH  8   ///< Arg0 in offset, Arg1 size: records
#define OVMF_MH_CMD_IMPORT_END    9   ///< Arg0 in offset, Arg1 size: end record; Arg2 shared digest offset, Arg3 shared page count
#define OVMF_MH_CMD_CHECK_PAGES   10  ///< Arg0 list offset, Arg1 count, Arg2 out offset: changed since sent? (tracked exports)
#define OVMF_MH_CMD_IMPORT_CHALLENGE 11 ///< Arg0 out offset, Arg1 capacity -> a fresh nonce the next import must be bound to
#define OVMF_MH_CMD_IMPORT_RECEIPT   12 ///< Arg0 out offset, Arg1 capacity -> OVMF_MH_RECEIPT of the completed import
#define OVMF_MH_CMD_IMPORT_COMMIT    13 ///< Arg0 in offset, Arg1 size: ShardCount receipts, one per shard, in shard order
#define OVMF_MH_CMD_EXPORT_ZERO_RANGES 14 ///< Arg0 range-list offset, Arg1 range count, Arg2 out offset, Arg3 capacity (ABI 2.1)
#define OVMF_MH_CMD_IMPORT_COMMIT_PROOF  15 ///< Arg0 out offset, Arg1 capacity -> OVMF_MH_COMMIT_PROOF of the commit this session passed (ABI 4.1)
#define OVMF_MH_CMD_EXPORT_VERIFY_COMMIT 16 ///< Arg0 in offset, Arg1 size: OVMF_MH_COMMIT_PROOF, then ShardCount receipts in shard order (ABI 4.1)

//
// Capability bits (OVMF_MH_MAILBOX_HEADER.Capabilities and image info).
//
#define OVMF_MH_CAP_QUERY       0x0000000000000001
#define OVMF_MH_CAP_SHUTDOWN    0x0000000000000002
#define OVMF_MH_CAP_EXPORT      0x0000000000000004
#define OVMF_MH_CAP_IMPORT      0x0000000000000008
#define OVMF_MH_CAP_AES_NI      0x0000000000000010  ///< Page crypto runs on AES-NI
#define OVMF_MH_CAP_KEY_LOADED  0x0000000000000020  ///< A transport key was injected
#define OVMF_MH_CAP_CHECK_PAGES 0x0000000000000040  ///< CHECK_PAGES (ABI 1.2)
#define OVMF_MH_CAP_BINDING     0x0000000000000080  ///< IMPORT_CHALLENGE, IMPORT_RECEIPT, IMPORT_COMMIT, bound streams (ABI 2.0)
#define OVMF_MH_CAP_ZERO_RANGES 0x0000000000000100  ///< EXPORT_ZERO_RANGES, ZERO_RANGE records imported (ABI 2.1)
#define OVMF_MH_CAP_HALT_WAKE   0x0000000000000200  ///< Halts when idle, publishes Idle; woken by an NMI (ABI 4.1)
#define OVMF_MH_CAP_VAES        0x0000000000000400  ///< Page crypto runs whole blocks on VAES + AVX2 (passed its self-test)
#define OVMF_MH_CAP_COMMIT_PROOF 0x0000000000000800 ///< IMPORT_COMMIT_PROOF, EXPORT_VERIFY_COMMIT (ABI 4.1)

//
// Idle word (OVMF_MH_MAILBOX_HEADER.Idle, ABI 4.1; docs/mailbox.md). A helper
// with HALT_WAKE sets it before its last look at CommandSeq and halts; a
// host that posts a command and then reads it non-zero wakes the helper (a
// firmware helper with an NMI, the reference helper with SIGUSR1), and keeps
// waking it while it stays idle without answering.
//
#define OVMF_MH_IDLE_BUSY       0     ///< Serving, or polling CommandSeq
#define OVMF_MH_IDLE_HALTING    1     ///< About to halt or halted: post, then wake
#define OVMF_MH_IDLE_STRETCHED  2     ///< Test knob only: inside a stretched halt window, past the re-check

//
// Status codes: command results (Status) and halt reasons (HaltReason).
//
#define OVMF_MH_STATUS_SUCCESS                0
#define OVMF_MH_STATUS_UNSUPPORTED            1
#define OVMF_MH_STATUS_INVALID_PARAMETER      2
#define OVMF_MH_STATUS_BAD_STATE              3   ///< Command not valid in this session state
#define OVMF_MH_STATUS_NO_KEY                 4   ///< No transport key was injected
#define OVMF_MH_STATUS_OUT_OF_BOUNDS          5   ///< Offset/size outside the data area
#define OVMF_MH_STATUS_BAD_PAGE               6   ///< Page outside the guest window or misaligned
#define OVMF_MH_STATUS_BATCH_TOO_LARGE        7   ///< More pages than MaxBatchPages
#define OVMF_MH_STATUS_BUFFER_TOO_SMALL       8   ///< Output capacity too small
#define OVMF_MH_STATUS_NO_ENTROPY             9   ///< RDRAND failed
//
// Stream verification failures (import). The session is failed afterwards.
//
#define OVMF_MH_STATUS_BAD_RECORD             0x20 ///< Malformed record (type, length, framing)
#define OVMF_MH_STATUS_AUTH_FAILED            0x21 ///< Tag mismatch: flipped bit, moved page, forgery
#define OVMF_MH_STATUS_WRONG_SESSION          0x22 ///< Record or header of another session
#define OVMF_MH_STATUS_SEQUENCE_GAP           0x23 ///< A record is missing (dropped or reordered)
#define OVMF_MH_STATUS_SEQUENCE_REPLAY        0x24 ///< A record was seen already (duplicated, replayed)
#define OVMF_MH_STATUS_TRUNCATED              0x25 ///< End record count/digest disagree with what arrived
#define OVMF_MH_STATUS_BAD_HEADER             0x26 ///< Stream header malformed or unauthentic
#define OVMF_MH_STATUS_SESSION_FAILED         0x27 ///< An earlier failure ended this session
//
// Migration binding failures (ABI 2.0). The session is failed afterwards.
//
#define OVMF_MH_STATUS_GUEST_SIZE_MISMATCH    0x28 ///< Header GuestSize is not this helper's guest window size
#define OVMF_MH_STATUS_WRONG_SHARD            0x29 ///< Shard index or count not what the host announced / the commit needs
#define OVMF_MH_STATUS_NONCE_MISMATCH         0x2A ///< Stream bound to another target nonce (another session, a replay)
#define OVMF_MH_STATUS_UNBOUND_STREAM         0x2B ///< Unbound stream after IMPORT_CHALLENGE asked for a bound one
#define OVMF_MH_STATUS_WRONG_MIGRATION        0x2C ///< Receipt of another migration, or of a bound/unbound mismatch
#define OVMF_MH_STATUS_BAD_RECEIPT            0x2D ///< Receipt MAC invalid, or this helper's own receipt altered
//
// Zero ranges (ABI 2.1). NOT_ZERO is an export argument failure (nothing
// changes); RANGE_OUTSIDE_SHARD fails an import session like the stream
// checks above, and refuses an export's range list without changing it.
//
#define OVMF_MH_STATUS_NOT_ZERO               0x2E ///< A range the host called empty holds a non-zero byte
#define OVMF_MH_STATUS_RANGE_OUTSIDE_SHARD    0x2F ///< A zero range crosses a shard block or lies in another shard's block
//
// Shared pages (ABI 4.0): IMPORT_END found that the shared pages the target
// host received for this shard are not the ones the source helper sealed in
// the END record. The session is failed afterwards.
//
#define OVMF_MH_STATUS_SHARED_PAGES_MISMATCH  0x30 ///< Shared-page count or digest differs from the END record's
//
// Commit proof (ABI 4.1): EXPORT_VERIFY_COMMIT was given a proof whose MAC,
// outcome or receipt digest is not what a target helper 0 that committed
// this stream's migration writes. Nothing changes (the export stays COMPLETE).
//
#define OVMF_MH_STATUS_BAD_COMMIT_PROOF       0x31 ///< Commit proof MAC, outcome or receipt digest invalid
//
// Request rejections (HaltReason, also logged to debugcon). 0x100 and up.
//
#define OVMF_MH_STATUS_REQUEST_SIZE           0x100 ///< Blob size or Size field wrong
#define OVMF_MH_STATUS_REQUEST_SIGNATURE      0x101
#define OVMF_MH_STATUS_REQUEST_VERSION        0x102
#define OVMF_MH_STATUS_REQUEST_FLAGS          0x103 ///< Flags or Reserved not zero
#define OVMF_MH_STATUS_MAILBOX_ALIGNMENT      0x104
#define OVMF_MH_STATUS_MAILBOX_SIZE           0x105
#define OVMF_MH_STATUS_MAILBOX_RESERVED       0x106 ///< Below OVMF_MH_MAILBOX_MIN_BASE
#define OVMF_MH_STATUS_MAILBOX_NOT_RAM        0x107 ///< Not inside one RAM range of the helper VM
#define OVMF_MH_STATUS_WINDOW_ALIGNMENT       0x108
#define OVMF_MH_STATUS_WINDOW_OVERLAP         0x109 ///< Overlaps the mailbox or helper memory
#define OVMF_MH_STATUS_WINDOW_NOT_RAM         0x10A
#define OVMF_MH_STATUS_NO_FW_CFG_MEMORY_MAP   0x10B ///< etc/e820 missing or malformed
#define OVMF_MH_STATUS_HELPER_RAM             0x10C ///< Helper VM RAM does not cover helper memory
#define OVMF_MH_STATUS_SEV_UNSUPPORTED        0x10D ///< SEV is active; this helper refuses to run under SEV yet
#define OVMF_MH_STATUS_WINDOW_RANGES          0x10E ///< WindowRangeCount too large, or an unused range entry not zero
#define OVMF_MH_STATUS_WORK_AREA_INVALID      0x10F ///< Work area misaligned, below MAILBOX_MIN_BASE or over the mailbox
#define OVMF_MH_STATUS_WORK_AREA_NOT_RAM      0x110 ///< Work area not inside one RAM range below 4 GiB
#define OVMF_MH_STATUS_WINDOW_TOO_LARGE       0x111 ///< Window ranges add up to more than OVMF_MH_MAX_WINDOW_SIZE
#define OVMF_MH_STATUS_WORK_AREA_TOO_SMALL    0x112 ///< Work area cannot hold session state and page tracking
#define OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE  0x113 ///< The layout needs more than OVMF_MH_PAGE_TABLE_BUDGET tables
#define OVMF_MH_STATUS_MAPPING_UNSUPPORTED    0x114 ///< A range lies beyond the CPU's physical address width
#define OVMF_MH_STATUS_IDLE_POLICY            0x115 ///< opt/ovmf-mh/idle-policy malformed (size, signature, flags, bounds)
#define OVMF_MH_STATUS_UNEXPECTED             0x1FF

#pragma pack(1)

typedef struct {
  //
  // Identification, written by the helper before State becomes READY.
  //
  UINT64    Signature;                     ///< OVMF_MH_MAILBOX_SIGNATURE
  UINT16    AbiMajor;                      ///< OVMF_MH_ABI_MAJOR
  UINT16    AbiMinor;                      ///< OVMF_MH_ABI_MINOR
  UINT32    HeaderSize;                    ///< OVMF_MH_MAILBOX_HEADER_SIZE
  UINT64    Capabilities;                  ///< OVMF_MH_CAP_* bits
  UINT8     BuildId[16];                   ///< Helper build id (image info BuildId)
  UINT32    State;                         ///< OVMF_MH_STATE_*; written last
  UINT32    HaltReason;                    ///< OVMF_MH_STATUS_* when HALTED, vector when FAULT
  UINT64    FaultAddress;                  ///< RIP of the faulting instruction when FAULT
  UINT64    DataOffset;                    ///< Offset of the data area from the mailbox base
  UINT64    DataSize;                      ///< Bytes in the data area
  UINT64    GuestWindowSize;               ///< Guest bytes the helper accepted
  UINT32    MaxBatchPages;                 ///< Pages per EXPORT_BATCH / IMPORT_BATCH
  UINT32    SessionState;                  ///< OVMF_MH_SESSION_*
  //
  // Idle state (ABI 4.1), written by a HALT_WAKE helper only (offset 88).
  //
  UINT32    Idle;                          ///< OVMF_MH_IDLE_*
  UINT32    HaltCount;                     ///< Halts an NMI ended
  UINT32    WindowWakes;                   ///< NMIs that landed between the idle word and HLT (no halt)
  UINT32    TickWakes;                     ///< Commands found on a tick of the tick window, no NMI needed (ABI 4.2)
  UINT8     Reserved0[152];
  //
  // Command: written by the host, CommandSeq last (offset 256).
  //
  UINT32    CommandSeq;                    ///< Host increments it to post a command
  UINT32    Command;                       ///< OVMF_MH_CMD_*
  UINT64    Arg[OVMF_MH_ARG_COUNT];
  UINT8     Reserved1[72];
  //
  // Response: written by the helper, ResponseSeq last (offset 384).
  //
  UINT32    ResponseSeq;                   ///< Equals CommandSeq once the command is done
  UINT32    Status;                        ///< OVMF_MH_STATUS_*
  UINT64    Result[OVMF_MH_RESULT_COUNT];
  UINT8     Reserved2[72];
  //
  // Counters kept by the helper (offset 512).
  //
  UINT64    CommandsServed;
  UINT64    CommandsFailed;
  UINT8     Reserved3[3568];
} OVMF_MH_MAILBOX_HEADER;

//
// ---------------------------------------------------------------------------
// Launch secret: the transport key, written by the guest owner's tooling into
// the helper's RAM at OVMF_MH_SECRET_PAGE_BASE before the helper runs. The
// helper copies the key into private memory and zeroes the whole page.
// ---------------------------------------------------------------------------
//
#define OVMF_MH_SECRET_SIGNATURE  0x313059454b484d4f  // "OMHKEY01"
#define OVMF_MH_SECRET_VERSION    1
#define OVMF_MH_KEY_SIZE          32

typedef struct {
  UINT64    Signature;                     ///< OVMF_MH_SECRET_SIGNATURE
  UINT32    Version;                       ///< OVMF_MH_SECRET_VERSION
  UINT32    KeySize;                       ///< OVMF_MH_KEY_SIZE
  UINT8     Key[OVMF_MH_KEY_SIZE];         ///< Transport key (AES-256-OCB master key)
} OVMF_MH_SECRET;

//
// ---------------------------------------------------------------------------
// Page stream (docs/stream-format.md): a stream header, then records, then an
// end record. AEAD = AES-256-OCB3 (RFC 7253), 96-bit nonce, 128-bit tag.
// ---------------------------------------------------------------------------
//
#define OVMF_MH_STREAM_MAGIC        0x324d525453484d4f  // "OMHSTRM2"
#define OVMF_MH_STREAM_VERSION      3   ///< 3 (ABI 4.0): the END payload seals the shard's shared pages
#define OVMF_MH_SALT_SIZE           32
#define OVMF_MH_SESSION_ID_SIZE     16
#define OVMF_MH_TAG_SIZE            16
#define OVMF_MH_NONCE_SIZE          12
#define OVMF_MH_DIGEST_SIZE         32
#define OVMF_MH_MIGRATION_ID_SIZE   32
#define OVMF_MH_CHALLENGE_SIZE      32
//
// Stream header Flags. BOUND: the stream is bound to a target's challenge
// nonce (TargetNonce) and MigrationId is SHA-256 over all targets' nonces.
//
#define OVMF_MH_STREAM_BOUND        0x1
#define OVMF_MH_STREAM_FLAGS_KNOWN  0x1
//
// The header bytes [OVMF_MH_STREAM_BINDING_OFFSET, +SIZE) (Flags through
// TargetNonce) follow the KDF info label in the HKDF info of the key
// schedule, so that the session key itself depends on the binding.
//
#define OVMF_MH_STREAM_BINDING_OFFSET  12
#define OVMF_MH_STREAM_BINDING_SIZE    76
//
// HKDF info strings of the key schedule and of the receipt key, and the
// chain digest's label, all used without a terminating NUL.
//
#define OVMF_MH_KDF_INFO            "ovmf-mh v2 stream"
#define OVMF_MH_CHAIN_LABEL         "ovmf-mh v2 chain"
#define OVMF_MH_RECEIPT_INFO        "ovmf-mh v2 receipt"
#define OVMF_MH_PAGE_HASH_INFO      "ovmf-mh v1 page hash"
//
// Commit proof (ABI 4.1): CommitKey = HKDF-SHA256 (IKM = TK, salt =
// MigrationId, info = OVMF_MH_COMMIT_PROOF_INFO, 32 bytes); ReceiptsDigest =
// SHA-256 (OVMF_MH_COMMIT_RECEIPTS_LABEL || the ShardCount receipts
// IMPORT_COMMIT accepted, in shard order).
//
#define OVMF_MH_COMMIT_PROOF_INFO      "ovmf-mh v4 commit proof"
#define OVMF_MH_COMMIT_RECEIPTS_LABEL  "ovmf-mh v4 committed receipts"
#define OVMF_MH_COMMIT_OUTCOME_COMMITTED  1   ///< Target helper 0 verified every shard's receipt (IMPORT_COMMIT)
//
// Shared pages (ABI 4.0): SharedDigest = SHA-256 (OVMF_MH_SHARED_LABEL ||
// for each shared page of the shard, in stream order: UINT64 guest offset ||
// the 4096-byte page). The host computes it (it carries those pages in
// plain text, outside the helpers); EXPORT_END and IMPORT_END read it from
// the data area (Arg2) with its page count (Arg3). With a count of 0 the
// helper reads nothing and uses the digest of no pages, SHA-256 of the label.
//
#define OVMF_MH_SHARED_LABEL        "ovmf-mh v3 shared pages"
#define OVMF_MH_PAGE_HASH_KEY_SIZE  4096

#define OVMF_MH_RECORD_PAGE         1   ///< Payload: 4096 bytes of ciphertext
#define OVMF_MH_RECORD_ZERO         2   ///< No payload: the page is all zero
#define OVMF_MH_RECORD_END          3   ///< Payload: OVMF_MH_END_PAYLOAD, encrypted
#define OVMF_MH_RECORD_ZERO_RANGE   4   ///< Payload: OVMF_MH_ZERO_RANGE_PAYLOAD, encrypted: PageCount pages from GuestOffset are all zero (ABI 2.1)
//
// The split of a guest between the shards of a migration: page P belongs
// to shard (P / OVMF_MH_SHARD_BLOCK_PAGES) mod ShardCount. A ZERO_RANGE
// record covers pages of one block of its own shard only, so that shards
// applied in parallel never zero each other's pages. EXPORT_ZERO_RANGES
// takes at most OVMF_MH_MAX_ZERO_RANGES range entries per call.
//
#define OVMF_MH_SHARD_BLOCK_PAGES   512
#define OVMF_MH_MAX_ZERO_RANGES     256 ///< Range entries per EXPORT_ZERO_RANGES (the list is copied into the page-list buffer)

typedef struct {
  UINT64    Magic;                         ///< OVMF_MH_STREAM_MAGIC
  UINT16    Version;                       ///< OVMF_MH_STREAM_VERSION
  UINT16    HeaderSize;                    ///< sizeof (OVMF_MH_STREAM_HEADER)
  UINT32    Flags;                         ///< OVMF_MH_STREAM_BOUND or 0
  UINT32    ShardIndex;                    ///< This stream's shard, 0..ShardCount-1
  UINT32    ShardCount;                    ///< Shards of the migration, 1..OVMF_MH_MAX_SHARDS
  UINT8     MigrationId[OVMF_MH_MIGRATION_ID_SIZE]; ///< Bound: SHA-256 of the targets' nonces; else host's choice
  UINT8     TargetNonce[OVMF_MH_CHALLENGE_SIZE]; ///< Bound: target ShardIndex's challenge; else zero
  UINT8     Salt[OVMF_MH_SALT_SIZE];       ///< From the source helper's RDRAND
  UINT8     SessionId[OVMF_MH_SESSION_ID_SIZE]; ///< HKDF output, see stream-format.md
  UINT64    GuestSize;                     ///< Source guest window size
  UINT8     Tag[OVMF_MH_TAG_SIZE];         ///< AEAD tag over the fields above
} OVMF_MH_STREAM_HEADER;

typedef struct {
  UINT32    Type;                          ///< OVMF_MH_RECORD_*
  UINT32    PayloadSize;                   ///< 4096 (PAGE), 0 (ZERO), 80 (END), 8 (ZERO_RANGE)
  UINT64    Sequence;                      ///< 1, 2, 3 ... within the session
  UINT64    GuestOffset;                   ///< Page offset in guest RAM (0 for END)
  UINT8     SessionId[OVMF_MH_SESSION_ID_SIZE];
} OVMF_MH_RECORD_HEADER;                   ///< Followed by payload, then the tag

typedef struct {
  UINT64    RecordCount;                   ///< PAGE, ZERO and ZERO_RANGE records before END
  UINT8     ChainDigest[OVMF_MH_DIGEST_SIZE]; ///< SHA-256 chain over their tags
  UINT64    SharedPageCount;               ///< Shared pages the host carried for this shard (ABI 4.0)
  UINT8     SharedDigest[OVMF_MH_DIGEST_SIZE]; ///< Their digest, OVMF_MH_SHARED_LABEL (ABI 4.0)
} OVMF_MH_END_PAYLOAD;

//
// ZERO_RANGE record payload (ABI 2.1), encrypted like a page. The range is
// [GuestOffset, GuestOffset + PageCount * OVMF_MH_PAGE_SIZE), 1 <= PageCount
// <= OVMF_MH_SHARD_BLOCK_PAGES, inside one shard block.
//
typedef struct {
  UINT64    PageCount;                     ///< Pages in the range, all zero when the source helper sealed it
} OVMF_MH_ZERO_RANGE_PAYLOAD;

//
// EXPORT_ZERO_RANGES range-list entry (ABI 2.1): the host's claim that these
// pages are empty, which the helper checks byte by byte before sealing.
//
typedef struct {
  UINT64    GuestOffset;                   ///< First page, page aligned
  UINT64    PageCount;                     ///< 1..OVMF_MH_SHARD_BLOCK_PAGES, inside one block of this shard
} OVMF_MH_ZERO_RANGE_ENTRY;

//
// Receipt of a completed import (IMPORT_RECEIPT), checked by IMPORT_COMMIT.
// Mac = HMAC-SHA256 (ReceiptKey, the bytes before Mac), ReceiptKey =
// HKDF-SHA256 (IKM = TK, salt = MigrationId, info = OVMF_MH_RECEIPT_INFO, 32).
//
typedef struct {
  UINT8     MigrationId[OVMF_MH_MIGRATION_ID_SIZE];
  UINT32    ShardIndex;
  UINT32    ShardCount;
  UINT32    Flags;                         ///< The stream header's Flags
  UINT32    Reserved;                      ///< Zero
  UINT64    RecordCount;                   ///< Records the import verified
  UINT8     ChainDigest[OVMF_MH_DIGEST_SIZE]; ///< Its chain digest D(N)
  UINT8     Mac[OVMF_MH_DIGEST_SIZE];
} OVMF_MH_RECEIPT;

//
// Commit proof (ABI 4.1): written by IMPORT_COMMIT_PROOF on the target helper
// that passed IMPORT_COMMIT, checked by EXPORT_VERIFY_COMMIT on a source
// helper before its host commits. Mac = HMAC-SHA256 (CommitKey, the bytes
// before Mac); see OVMF_MH_COMMIT_PROOF_INFO.
//
typedef struct {
  UINT8     MigrationId[OVMF_MH_MIGRATION_ID_SIZE]; ///< The committed migration
  UINT32    ShardCount;                    ///< Receipts the commit checked
  UINT32    Flags;                         ///< The streams' header Flags
  UINT32    Outcome;                       ///< OVMF_MH_COMMIT_OUTCOME_COMMITTED
  UINT32    Reserved;                      ///< Zero
  UINT8     ReceiptsDigest[OVMF_MH_DIGEST_SIZE]; ///< Of the receipts IMPORT_COMMIT accepted
  UINT8     Mac[OVMF_MH_DIGEST_SIZE];
} OVMF_MH_COMMIT_PROOF;

// Idle policy: optional fw_cfg file "opt/ovmf-mh/idle-policy", for benches
// and tests only (docs/mailbox.md). Without it a helper spins
// OVMF_MH_IDLE_DEFAULT_SPIN_US after its last command and then halts.
//
#define OVMF_MH_IDLE_POLICY_FW_CFG_NAME  "opt/ovmf-mh/idle-policy"
#define OVMF_MH_IDLE_POLICY_SIGNATURE    0x4c44494d          // "MIDL"
#define OVMF_MH_IDLE_POLICY_NEVER_HALT   0x00000001          ///< Spin forever (the pre-4.1 behaviour, a bench baseline)
#define OVMF_MH_IDLE_POLICY_NO_TICK      0x00000002          ///< No tick window: spin, then the deep halt at once (the 4.1 behaviour, ABI 4.2)
#define OVMF_MH_IDLE_DEFAULT_SPIN_US     20000
#define OVMF_MH_IDLE_MAX_SPIN_US         1000000
#define OVMF_MH_IDLE_MAX_STRETCH_US      10000000
//
// Tick window (ABI 4.2): after the spin the helper halts with interrupts on
// and the PIT ticking at OVMF_MH_IDLE_TICK_HZ for OVMF_MH_IDLE_TICK_WINDOW_US,
// the idle word still OVMF_MH_IDLE_BUSY, and looks at CommandSeq on every
// tick; only then does it publish OVMF_MH_IDLE_HALTING and halt for good.
//
#define OVMF_MH_IDLE_TICK_HZ             2000
#define OVMF_MH_IDLE_TICK_WINDOW_US      1000000

typedef struct {
  UINT32    Signature;                     ///< OVMF_MH_IDLE_POLICY_SIGNATURE
  UINT32    Flags;                         ///< OVMF_MH_IDLE_POLICY_* bits; others zero
  UINT32    SpinMicroseconds;              ///< Polling after the last command before halting, <= MAX_SPIN_US
  UINT32    WindowStretchMicroseconds;     ///< Test only: wait this long between the re-check and HLT, <= MAX_STRETCH_US
} OVMF_MH_IDLE_POLICY;

//
// Image info: a constant record in the SEC module that tools find by its
// GUID-shaped signature without running the image. The build id is a PCD
// that the platform DSC sets, so the record holds its address; SEC runs in
// place, so that address maps into the SEC image at its preferred base.
//
#define OVMF_MH_IMAGE_INFO_SIGNATURE_LOW   0x48a0ae2726423d52
#define OVMF_MH_IMAGE_INFO_SIGNATURE_HIGH  0xf27c70db82a48f0d
#define OVMF_MH_FW_CFG_NAME_SIZE           56

typedef struct {
  UINT64    SignatureLow;                  ///< OVMF_MH_IMAGE_INFO_SIGNATURE_LOW
  UINT64    SignatureHigh;                 ///< OVMF_MH_IMAGE_INFO_SIGNATURE_HIGH
  UINT32    InfoSize;                      ///< sizeof (OVMF_MH_IMAGE_INFO)
  UINT16    AbiMajor;
  UINT16    AbiMinor;
  UINT64    Capabilities;
  UINT64    BuildIdAddress;                ///< Address of the 16-byte build id in the mapped image
  UINT8     RequestFwCfgName[OVMF_MH_FW_CFG_NAME_SIZE]; ///< NUL-terminated ASCII
  UINT64    SecretPageBase;                ///< OVMF_MH_SECRET_PAGE_BASE
  UINT64    MailboxMinBase;                ///< OVMF_MH_MAILBOX_MIN_BASE
} OVMF_MH_IMAGE_INFO;

#pragma pack()

//
// Sizes and offsets are the ABI: the compiler checks them here, the Python
// side checks its parse of this file against a host build of these asserts.
//
STATIC_ASSERT (sizeof (OVMF_MH_REQUEST) == 176, "OVMF_MH_REQUEST size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, WindowRangeCount) == 12, "WindowRangeCount offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, MailboxBase) == 16, "MailboxBase offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, WorkAreaBase) == 32, "WorkAreaBase offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, WindowBase) == 48, "WindowBase offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, WindowSize) == 112, "WindowSize offset");

STATIC_ASSERT (sizeof (OVMF_MH_MAILBOX_HEADER) == OVMF_MH_MAILBOX_HEADER_SIZE, "header size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, BuildId) == 24, "BuildId offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, State) == 40, "State offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, DataOffset) == 56, "DataOffset offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, CommandSeq) == 256, "CommandSeq offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, Arg) == 264, "Arg offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, ResponseSeq) == 384, "ResponseSeq offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, Result) == 392, "Result offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, CommandsServed) == 512, "counters offset");

STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, MaxBatchPages) == 80, "MaxBatchPages offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, Idle) == 88, "Idle offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, TickWakes) == 100, "TickWakes offset");
STATIC_ASSERT (sizeof (OVMF_MH_IDLE_POLICY) == 16, "OVMF_MH_IDLE_POLICY size");

STATIC_ASSERT (sizeof (OVMF_MH_SECRET) == 48, "OVMF_MH_SECRET size");
STATIC_ASSERT (sizeof (OVMF_MH_STREAM_HEADER) == 160, "OVMF_MH_STREAM_HEADER size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_STREAM_HEADER, Flags) == OVMF_MH_STREAM_BINDING_OFFSET, "binding offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_STREAM_HEADER, Salt) == OVMF_MH_STREAM_BINDING_OFFSET + OVMF_MH_STREAM_BINDING_SIZE, "binding size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_STREAM_HEADER, MigrationId) == 24, "MigrationId offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_STREAM_HEADER, Salt) == 88, "Salt offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_STREAM_HEADER, Tag) == 144, "header Tag offset");
STATIC_ASSERT (sizeof (OVMF_MH_RECORD_HEADER) == 40, "OVMF_MH_RECORD_HEADER size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_RECORD_HEADER, SessionId) == 24, "record SessionId offset");
STATIC_ASSERT (sizeof (OVMF_MH_END_PAYLOAD) == 80, "OVMF_MH_END_PAYLOAD size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_END_PAYLOAD, SharedPageCount) == 40, "end payload SharedPageCount offset");
STATIC_ASSERT (sizeof (OVMF_MH_RECEIPT) == 120, "OVMF_MH_RECEIPT size");
STATIC_ASSERT (sizeof (OVMF_MH_ZERO_RANGE_PAYLOAD) == 8, "OVMF_MH_ZERO_RANGE_PAYLOAD size");
STATIC_ASSERT (sizeof (OVMF_MH_ZERO_RANGE_ENTRY) == 16, "OVMF_MH_ZERO_RANGE_ENTRY size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_ZERO_RANGE_ENTRY, PageCount) == 8, "zero range entry PageCount offset");
STATIC_ASSERT (OVMF_MH_SHARD_BLOCK_PAGES == OVMF_MH_MAX_BATCH_PAGES, "a shard block is one batch");
STATIC_ASSERT (OVMF_MH_MAX_ZERO_RANGES * 16 <= OVMF_MH_MAX_BATCH_PAGES * 8, "a range list fits the page-list copy");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_RECEIPT, RecordCount) == 48, "receipt RecordCount offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_RECEIPT, Mac) == 88, "receipt Mac offset");
STATIC_ASSERT (sizeof (OVMF_MH_COMMIT_PROOF) == 112, "OVMF_MH_COMMIT_PROOF size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_COMMIT_PROOF, ReceiptsDigest) == 48, "commit proof ReceiptsDigest offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_COMMIT_PROOF, Mac) == 80, "commit proof Mac offset");

STATIC_ASSERT (sizeof (OVMF_MH_IMAGE_INFO) == 112, "OVMF_MH_IMAGE_INFO size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_IMAGE_INFO, BuildIdAddress) == 32, "image BuildIdAddress offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_IMAGE_INFO, RequestFwCfgName) == 40, "fw_cfg name offset");

#endif
