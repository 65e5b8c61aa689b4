/** @file
  libFuzzer harness: stream import under the fixed transport key. The input
  is a control byte followed by a stream (header, records, end record); the
  seeds are real streams sealed with the fixed key (host_shim/fuzz_corpus.py).
  FuzzCall() checks the invariants after every command (FuzzCommon.h): above
  all, no byte reaches the guest window unless the checker authenticated the
  record that carries it, and no import completes without a verified end.

  Control byte: bits 0..2 records per IMPORT_BATCH (0: the whole middle in
  one batch); bit 3 import the same stream a second time (replay after
  COMPLETE); bit 4 RESET before the end record; bit 5 after a completed
  import, export the imported pages with TRACK_PAGES and check them with
  CHECK_PAGES (none changed; then a changed page is reported).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "FuzzCommon.h"

#define WINDOW_PAGES  16ULL
#define DATA_SIZE     (96ULL * 1024)

STATIC FUZZ_HELPER  mHelper;
STATIC BOOLEAN      mReady;

/**
  Length of the record at Offset by its own framing (the harness's view,
  used only to cut batches), at least one byte.
**/
STATIC
UINT64
HarnessRecordLength (
  IN CONST UINT8  *Stream,
  IN UINT64       Offset,
  IN UINT64       End
  )
{
  UINT32  Payload;

  if (End - Offset < sizeof (OVMF_MH_RECORD_HEADER)) {
    return End - Offset;
  }

  memcpy (&Payload, Stream + Offset + 4, sizeof (Payload));
  if (Payload > End - Offset - sizeof (OVMF_MH_RECORD_HEADER)) {
    return End - Offset;
  }

  return sizeof (OVMF_MH_RECORD_HEADER) + Payload + OVMF_MH_TAG_SIZE;
}

/**
  Tracked export of the pages the import wrote, then CHECK_PAGES.

  @param[in] Pages  Page offsets, Count of them.
  @param[in] Count  Number of pages (at least one).
**/
STATIC
VOID
HarnessCheckPages (
  IN CONST UINT64  *Pages,
  IN UINT64        Count
  )
{
  UINT64  Arg[OVMF_MH_ARG_COUNT];
  UINT64  Result[OVMF_MH_RESULT_COUNT];
  UINT64  *List;
  UINT64  Out;

  memset (Arg, 0, sizeof (Arg));
  Arg[1] = FUZZ_STREAM_HEADER;
  Arg[2] = OVMF_MH_EXPORT_TRACK_PAGES;
  Arg[5] = 1;
  if (FuzzCall (&mHelper, OVMF_MH_CMD_EXPORT_BEGIN, Arg, Result) != OVMF_MH_STATUS_SUCCESS) {
    FuzzFail ("tracked export after an import", 0);
  }

  List = (UINT64 *)mHelper.Context.Data;
  memcpy (List, Pages, Count * sizeof (UINT64));
  mHelper.DataStale = TRUE;
  Out    = 8 * 1024;
  Arg[0] = 0;
  Arg[1] = Count;
  Arg[2] = Out;
  Arg[3] = DATA_SIZE - Out;
  if (FuzzCall (&mHelper, OVMF_MH_CMD_EXPORT_BATCH, Arg, Result) != OVMF_MH_STATUS_SUCCESS) {
    FuzzFail ("export of imported pages", Count);
  }

  Arg[3] = 0;
  if ((FuzzCall (&mHelper, OVMF_MH_CMD_CHECK_PAGES, Arg, Result) != OVMF_MH_STATUS_SUCCESS) || (Result[0] != 0)) {
    FuzzFail ("CHECK_PAGES reports a page that did not change", Result[0]);
  }

  mHelper.Window[Pages[0] + 17] ^= 0x5a;
  mHelper.WindowStale            = TRUE;
  Arg[1] = 1;
  if ((FuzzCall (&mHelper, OVMF_MH_CMD_CHECK_PAGES, Arg, Result) != OVMF_MH_STATUS_SUCCESS) ||
      (Result[0] != 1) || (mHelper.Context.Data[Out] != 1))
  {
    FuzzFail ("CHECK_PAGES misses a changed page", Result[0]);
  }
}

/**
  Import the stream once.

  @param[in] Control  The control byte.
  @param[in] Size     Stream bytes in the data area (from offset 0).

  @return The status of the last command.
**/
STATIC
UINT32
HarnessImport (
  IN UINT8   Control,
  IN UINT64  Size
  )
{
  STATIC UINT64  Pages[OVMF_MH_MAX_BATCH_PAGES];
  UINT64         Arg[OVMF_MH_ARG_COUNT];
  UINT64         Result[OVMF_MH_RESULT_COUNT];
  UINT64         End;
  UINT64         Position;
  UINT64         Cut;
  UINT64         Records;
  UINT64         PageCount;
  UINT64         PerBatch;
  UINT32         Status;
  CONST UINT8    *Stream;

  Stream = (CONST UINT8 *)mHelper.Context.Data;
  memset (Arg, 0, sizeof (Arg));
  Arg[1] = (Size < FUZZ_STREAM_HEADER) ? Size : FUZZ_STREAM_HEADER;
  Arg[3] = 1;
  Status = FuzzCall (&mHelper, OVMF_MH_CMD_IMPORT_BEGIN, Arg, Result);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  End       = (Size >= FUZZ_STREAM_HEADER + FUZZ_END_RECORD) ? Size - FUZZ_END_RECORD : FUZZ_STREAM_HEADER;
  Position  = FUZZ_STREAM_HEADER;
  PerBatch  = Control & 7;
  PageCount = 0;
  while (Position < End) {
    Cut     = Position;
    Records = 0;
    while ((Cut < End) && ((PerBatch == 0) || (Records < PerBatch))) {
      if ((PageCount < OVMF_MH_MAX_BATCH_PAGES) && (End - Cut >= sizeof (OVMF_MH_RECORD_HEADER))) {
        memcpy (&Pages[PageCount], Stream + Cut + OFFSET_OF (OVMF_MH_RECORD_HEADER, GuestOffset), sizeof (UINT64));
        PageCount++;
      }

      Cut += HarnessRecordLength (Stream, Cut, End);
      Records++;
    }

    Arg[0] = Position;
    Arg[1] = Cut - Position;
    Status = FuzzCall (&mHelper, OVMF_MH_CMD_IMPORT_BATCH, Arg, Result);
    if (Status != OVMF_MH_STATUS_SUCCESS) {
      return Status;
    }

    Position = Cut;
  }

  if ((Control & 0x10) != 0) {
    return FuzzCall (&mHelper, OVMF_MH_CMD_RESET, Arg, Result);
  }

  Arg[0] = End;
  Arg[1] = Size - End;
  Arg[2] = 0;                  // no shared pages: the seeds seal none
  Arg[3] = 0;
  Status = FuzzCall (&mHelper, OVMF_MH_CMD_IMPORT_END, Arg, Result);
  if ((Status == OVMF_MH_STATUS_SUCCESS) && ((Control & 0x20) != 0) && (PageCount > 0)) {
    HarnessCheckPages (Pages, PageCount);
  }

  return Status;
}

int
LLVMFuzzerTestOneInput (
  const uint8_t  *Data,
  size_t         Size
  )
{
  UINT64  StreamSize;
  UINT8   Control;

  if (!mReady) {
    FuzzCreateHelper (&mHelper, DATA_SIZE, WINDOW_PAGES);
    mHelper.HostMarksWrites = TRUE;
    mReady                  = TRUE;
  }

  if (Size == 0) {
    return 0;
  }

  Control    = Data[0];
  StreamSize = (Size - 1 < DATA_SIZE) ? Size - 1 : DATA_SIZE;
  FuzzSeedRandom (Size, MAX_UINT64);
  FuzzResetHelper (&mHelper, NULL, TRUE);
  memcpy ((VOID *)mHelper.Context.Data, Data + 1, StreamSize);
  mHelper.DataStale = TRUE;
  if ((HarnessImport (Control, StreamSize) == OVMF_MH_STATUS_SUCCESS) && ((Control & 0x08) != 0)) {
    //
    // A replayed stream: the same header starts a fresh session (the host
    // may import a stream twice), and the window must again hold exactly
    // what authenticated.
    //
    memcpy ((VOID *)mHelper.Context.Data, Data + 1, StreamSize);
    mHelper.DataStale = TRUE;
    HarnessImport (Control & 0x07, StreamSize);
  }

  return 0;
}
