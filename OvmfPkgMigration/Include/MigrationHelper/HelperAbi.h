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
#define OVMF_MH_ABI_MAJOR  1
#define OVMF_MH_ABI_MINOR  0

#define OVMF_MH_PAGE_SIZE  0x1000

//
// ---------------------------------------------------------------------------
// fw_cfg request: QEMU file "opt/ovmf-mh/request" (-fw_cfg name=...,file=...)
// ---------------------------------------------------------------------------
//
#define OVMF_MH_REQUEST_SIGNATURE  0x52484d4f          // "OMHR"
#define OVMF_MH_REQUEST_VERSION    1
#define OVMF_MH_REQUEST_FW_CFG_NAME  "opt/ovmf-mh/request"

//
// Memory the helper itself uses, in guest-physical addresses of the helper
// VM. The host may place the mailbox and the guest window only at or above
// OVMF_MH_MAILBOX_MIN_BASE; everything below is firmware territory:
// SEC's page tables, temporary RAM and stack (0x800000..0x81FFFF, from the
// OVMF flash layout), the launch-secret page and the helper's private RAM.
//
#define OVMF_MH_SECRET_PAGE_BASE     0x00F00000
#define OVMF_MH_PRIVATE_BASE         0x01000000
#define OVMF_MH_PRIVATE_SIZE         0x00800000
#define OVMF_MH_MAILBOX_MIN_BASE     0x01800000
#define OVMF_MH_MAILBOX_MIN_SIZE     0x00002000
#define OVMF_MH_MAILBOX_MAX_SIZE     0x04000000
//
// The SEC helper runs on the reset vector's identity map, which covers the
// first 4 GiB; nothing the request names may reach above it.
//
#define OVMF_MH_ADDRESS_LIMIT        0x100000000

#pragma pack(1)

typedef struct {
  UINT32    Signature;        ///< OVMF_MH_REQUEST_SIGNATURE
  UINT16    Version;          ///< OVMF_MH_REQUEST_VERSION
  UINT16    Size;             ///< sizeof (OVMF_MH_REQUEST); the blob is exactly this long
  UINT32    Flags;            ///< Must be zero in version 1
  UINT32    Reserved;         ///< Must be zero
  UINT64    MailboxBase;      ///< GPA of the shared area, page aligned
  UINT64    MailboxSize;      ///< Bytes, page aligned, MIN_SIZE..MAX_SIZE
  UINT64    GuestWindowBase;  ///< GPA where guest RAM offset 0 appears (0 with size 0: none)
  UINT64    GuestWindowSize;  ///< Bytes of guest RAM visible, page aligned
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
// Commands (OVMF_MH_MAILBOX_HEADER.Command).
//
#define OVMF_MH_CMD_NOP         0     ///< Round trip only
#define OVMF_MH_CMD_QUERY       1     ///< Results: counters, see docs/mailbox.md
#define OVMF_MH_CMD_SHUTDOWN    2     ///< Acknowledge, then power the helper VM off

//
// Capability bits (OVMF_MH_MAILBOX_HEADER.Capabilities and image info).
//
#define OVMF_MH_CAP_QUERY       0x0000000000000001
#define OVMF_MH_CAP_SHUTDOWN    0x0000000000000002

//
// Status codes: command results (Status) and halt reasons (HaltReason).
//
#define OVMF_MH_STATUS_SUCCESS                0
#define OVMF_MH_STATUS_UNSUPPORTED            1
#define OVMF_MH_STATUS_INVALID_PARAMETER      2
#define OVMF_MH_STATUS_BAD_STATE              3
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
  UINT8     Reserved0[176];
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
STATIC_ASSERT (sizeof (OVMF_MH_REQUEST) == 48, "OVMF_MH_REQUEST size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, MailboxBase) == 16, "MailboxBase offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_REQUEST, GuestWindowBase) == 32, "GuestWindowBase offset");

STATIC_ASSERT (sizeof (OVMF_MH_MAILBOX_HEADER) == OVMF_MH_MAILBOX_HEADER_SIZE, "header size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, BuildId) == 24, "BuildId offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, State) == 40, "State offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, DataOffset) == 56, "DataOffset offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, CommandSeq) == 256, "CommandSeq offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, Arg) == 264, "Arg offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, ResponseSeq) == 384, "ResponseSeq offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, Result) == 392, "Result offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_MAILBOX_HEADER, CommandsServed) == 512, "counters offset");

STATIC_ASSERT (sizeof (OVMF_MH_IMAGE_INFO) == 112, "OVMF_MH_IMAGE_INFO size");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_IMAGE_INFO, BuildIdAddress) == 32, "image BuildIdAddress offset");
STATIC_ASSERT (OFFSET_OF (OVMF_MH_IMAGE_INFO, RequestFwCfgName) == 40, "fw_cfg name offset");

#endif
