/** @file
  libFuzzer harness: the mailbox dispatcher of two helpers (a source and a
  target), driven by a command sequence encoded in the input. Session states
  persist within one input; every input starts from freshly reset helpers.
  FuzzCall() checks the invariants after every command (FuzzCommon.h).

  Input: one flag byte, then steps until the input ends. A step is an
  operation byte: bit 7 picks the helper (0 source, 1 target), the low four
  bits the operation:

    0..10  the command of that code, then OVMF_MH_ARG_COUNT (6) argument
           encodings
    11     a raw 32-bit command code, then OVMF_MH_ARG_COUNT argument
           encodings
    12     write bytes into the data area: u16 offset, u8 length, bytes
    13     write a page list: u16 offset, u8 count, then per page one byte
           (bits 0..2 a page, bits 3..7 below 16 nothing more, else a
           boundary, misaligned or wrapping variant; 0xF8..0xFF: eight
           bytes follow), see HarnessPage()
    14     copy between the helpers' data areas (the host forwarding a
           stream): u16 from, u16 to, u16 length
    15     the host changes guest memory: u8 page, u16 offset, u8 value

  An argument encoding is one byte T (class T >> 5, L = T & 31):
    0 L; 1 u16; 2 DataSize - L; 3 L * record size (L < 16) or a table of
    ABI sizes; 4 u64; 5 MAX_UINT64 - L; 6 1 << (2L); 7 the helper's last
    Result[L % 6].

  Flag byte: bit 0 target without a key; bit 1 RDRAND fails after (flag >>
  2) draws.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "FuzzCommon.h"

#define WINDOW_PAGES  8ULL
#define DATA_SIZE     (32ULL * 1024)
#define MAX_STEPS     32

typedef struct {
  CONST UINT8    *Data;
  UINTN          Size;
  UINTN          Position;
} FUZZ_INPUT;

STATIC FUZZ_HELPER  mHelpers[2];
STATIC UINT8        mPattern[WINDOW_PAGES * FUZZ_PAGE];
STATIC UINT64       mLastResult[2][OVMF_MH_RESULT_COUNT];
STATIC BOOLEAN      mReady;
STATIC BOOLEAN      mTargetKeyless;
STATIC BOOLEAN      mDirty[2] = { TRUE, TRUE };   ///< The last input touched the helper

///
/// 2 GiB in pages: where CHECK_PAGES stopped tracking before ABI 3.0 (now it
/// tracks the whole window); kept among the boundary values.
///
#define OLD_TRACKED_PAGES  0x80000ULL

STATIC CONST UINT64  mSizes[16] = {
  FUZZ_STREAM_HEADER, FUZZ_END_RECORD, 40, 56, FUZZ_RECORD_MAX, FUZZ_PAGE, 8, OVMF_MH_MAX_BATCH_PAGES,
  OVMF_MH_MAX_BATCH_PAGES + 1, OVMF_MH_MAX_BATCH_PAGES * FUZZ_RECORD_MAX, WINDOW_PAGES * FUZZ_PAGE,
  WINDOW_PAGES * FUZZ_PAGE - FUZZ_PAGE, FUZZ_PAGE - 1, OLD_TRACKED_PAGES * FUZZ_PAGE, 72, 0x8000
};

STATIC
UINT64
HarnessTake (
  IN OUT FUZZ_INPUT  *Input,
  IN     UINTN       Bytes
  )
{
  UINT64  Value;
  UINTN   Index;

  Value = 0;
  for (Index = 0; Index < Bytes; Index++) {
    if (Input->Position < Input->Size) {
      Value |= (UINT64)Input->Data[Input->Position++] << (8 * Index);
    }
  }

  return Value;
}

STATIC
UINT64
HarnessArgument (
  IN OUT FUZZ_INPUT  *Input,
  IN     UINTN       Which
  )
{
  UINT64  Tag;
  UINT64  Low;

  Tag = HarnessTake (Input, 1);
  Low = Tag & 31;
  switch (Tag >> 5) {
    case 0:  return Low;
    case 1:  return HarnessTake (Input, 2);
    case 2:  return DATA_SIZE - Low;
    case 3:  return (Low < 16) ? Low * FUZZ_RECORD_MAX : mSizes[Low - 16];
    case 4:  return HarnessTake (Input, 8);
    case 5:  return MAX_UINT64 - Low;
    case 6:  return 1ULL << (2 * Low);
    default: return mLastResult[Which][Low % OVMF_MH_RESULT_COUNT];
  }
}

STATIC
UINT64
HarnessPage (
  IN OUT FUZZ_INPUT  *Input
  )
{
  UINT64  Byte;
  UINT64  Page;

  //
  // Low three bits: a page number; the high bits say what to make of it.
  // One bit flip turns a valid page of a seed into the page right past the
  // window's end, a misaligned or a wrapping offset: bounds are where
  // off-by-one bugs live.
  //
  Byte = HarnessTake (Input, 1);
  Page = (Byte & 7) * FUZZ_PAGE;
  switch (Byte >> 3) {
    case 16: return WINDOW_PAGES * FUZZ_PAGE + Page;
    case 17: return Page + 1;
    case 18: return WINDOW_PAGES * FUZZ_PAGE - Page - 1;
    case 19: return 0 - FUZZ_PAGE - Page;
    case 20: return (1ULL << 63) + Page;
    case 21: return (OLD_TRACKED_PAGES - 1) * FUZZ_PAGE + Page;
    case 22: return 0x100000000ULL - FUZZ_PAGE + Page;
    case 23: return Page + FUZZ_PAGE / 2;
    case 24: return (UINT64)WINDOW_PAGES * FUZZ_PAGE * (1 + (Byte & 7));
    case 25: return MAX_UINT64 - Page;
    case 31: return HarnessTake (Input, 8);
    default: return (Byte >> 3 < 16) ? Page : Page + (WINDOW_PAGES << (Byte >> 3)) * FUZZ_PAGE;
  }
}

STATIC
VOID
HarnessSetUp (
  VOID
  )
{
  UINT64  Index;

  for (Index = 0; Index < sizeof (mPattern); Index++) {
    //
    // Every fourth page zero (ZERO records), the others distinct bytes.
    //
    mPattern[Index] = ((Index / FUZZ_PAGE) % 4 == 0) ? 0 : (UINT8)(Index * 131 + (Index >> 12) * 7 + 1);
  }

  FuzzCreateHelper (&mHelpers[0], DATA_SIZE, WINDOW_PAGES);
  FuzzCreateHelper (&mHelpers[1], DATA_SIZE, WINDOW_PAGES);
  mHelpers[0].HostMarksWrites = TRUE;
  mHelpers[1].HostMarksWrites = TRUE;
  mReady = TRUE;
}

int
LLVMFuzzerTestOneInput (
  const uint8_t  *Data,
  size_t         Size
  )
{
  FUZZ_INPUT   Input;
  FUZZ_HELPER  *Helper;
  UINT64       Arg[OVMF_MH_ARG_COUNT];
  UINT64       Flags;
  UINT64       Op;
  UINT64       Which;
  UINT64       Offset;
  UINT64       Length;
  UINT64       From;
  UINT64       Index;
  UINT32       Command;
  UINTN        Steps;
  UINT8        *Target;

  if (!mReady) {
    HarnessSetUp ();
  }

  Input.Data     = Data;
  Input.Size     = Size;
  Input.Position = 0;
  Flags          = HarnessTake (&Input, 1);
  FuzzSeedRandom (Size, ((Flags & 2) != 0) ? (Flags >> 2) : MAX_UINT64);
  //
  // Only a helper the last input touched (or whose key state changes) needs
  // the reset; an untouched one is already in the start state.
  //
  if (mDirty[0]) {
    FuzzResetHelper (&mHelpers[0], mPattern, TRUE);
  }

  if (mDirty[1] || (mTargetKeyless != ((Flags & 1) != 0))) {
    FuzzResetHelper (&mHelpers[1], NULL, (BOOLEAN)((Flags & 1) == 0));
    mTargetKeyless = (BOOLEAN)((Flags & 1) != 0);
  }

  mDirty[0] = FALSE;
  mDirty[1] = FALSE;
  memset (mLastResult, 0, sizeof (mLastResult));

  for (Steps = 0; (Steps < MAX_STEPS) && (Input.Position < Input.Size); Steps++) {
    Op     = HarnessTake (&Input, 1);
    Which  = Op >> 7;
    Helper = &mHelpers[Which];
    Target = (UINT8 *)Helper->Context.Data;
    mDirty[Which] = TRUE;
    switch (Op & 15) {
      case 12:
        Offset = HarnessTake (&Input, 2);
        Length = HarnessTake (&Input, 1);
        for (Index = 0; Index < Length; Index++) {
          Target[(Offset + Index) % DATA_SIZE] = (UINT8)HarnessTake (&Input, 1);
        }

        FuzzHostWroteData (Helper, Offset, Length);

        break;

      case 13:
        Offset = HarnessTake (&Input, 2) & ~7ULL;
        Length = HarnessTake (&Input, 1);
        for (Index = 0; Index < Length; Index++) {
          UINT64  Page = HarnessPage (&Input);

          memcpy (Target + (Offset + Index * 8) % DATA_SIZE, &Page, sizeof (Page));
        }

        FuzzHostWroteData (Helper, Offset, Length * 8);

        break;

      case 14:
        From   = HarnessTake (&Input, 2);
        Offset = HarnessTake (&Input, 2);
        Length = HarnessTake (&Input, 2);
        if ((From + Length <= DATA_SIZE) && (Offset + Length <= DATA_SIZE)) {
          memcpy ((UINT8 *)mHelpers[1 - Which].Context.Data + Offset, Target + From, Length);
          mDirty[1 - Which] = TRUE;
          FuzzHostWroteData (&mHelpers[1 - Which], Offset, Length);
        }

        break;

      case 15:
        Offset = (HarnessTake (&Input, 1) % WINDOW_PAGES) * FUZZ_PAGE + (HarnessTake (&Input, 2) % FUZZ_PAGE);
        Helper->Window[Offset] = (UINT8)HarnessTake (&Input, 1);
        FuzzHostWroteWindowByte (Helper, Offset);
        break;

      default:
        Command = (UINT32)(Op & 15);
        if (Command == 11) {
          Command = (UINT32)HarnessTake (&Input, 4);
        }

        memset (Arg, 0, sizeof (Arg));
        for (Index = 0; Index < OVMF_MH_ARG_COUNT; Index++) {
          Arg[Index] = HarnessArgument (&Input, (UINTN)Which);
        }

        if (Helper->ShutDown) {
          //
          // The helper VM is off after SHUTDOWN; nothing serves the mailbox.
          //
          break;
        }

        FuzzCall (Helper, Command, Arg, mLastResult[Which]);
        break;
    }
  }

  return 0;
}
