/** @file
  libFuzzer harness: the helper's page-table builder
  (MigrationHelperBuildPageTables, MigrationHelperPageTablePages).

  Input: byte 0 holds flags (bit 0: 1 GiB pages offered; bits 1-2: C-bit
  none, 47, 51, or bit 5 of byte 1; bit 3: raw mappings), byte 1 the
  physical address width (as CPUID would report it, not clamped), byte 2
  the table buffer's capacity in pages (1..64), then mappings: raw, 25
  bytes each (virtual, physical, size, attributes), or compact, 13 bytes
  each (virtual gap from the previous end, physical, size, in 4 KiB, 2 MiB
  or 1 GiB units picked by two bits of the attribute byte), at most 12.

  The table buffer sits between PROT_NONE guard pages and is filled with a
  pattern first. The invariants, checked with a walker written here and
  sharing nothing with the builder:
  - a refusal writes nothing (the buffer keeps its pattern), and
    PAGE_TABLES_TOO_LARGE comes exactly when the count exceeds the buffer;
  - a success maps exactly the requested spans: every leaf lies inside one
    mapping at the physical address that mapping gives it, with the C-bit
    exactly when the mapping is private, and the leaves add up to the
    mappings' total size; every table is inside the buffer, reached once,
    and the tables reached are as many as the builder reported and counted.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "FuzzCommon.h"

#define MAX_MAPPINGS    12
//
// The builder's work grows with the tables it may fill (512 leaves each),
// and every path of it, the budget refusal included, is reached with a few
// tables: a capacity of up to 256 cost 2.9 times as much per execution as
// 64 (fuzz_speed.py, same corpus).
//
#define MAX_CAPACITY    64
#define PATTERN         0xA5
#define ADDRESS_BITS    0x000FFFFFFFFFF000ULL
#define ENTRY_PRESENT   0x1ULL
#define ENTRY_LARGE     0x80ULL

STATIC UINT8            *mTables;
STATIC OVMF_MH_MAPPING  *mMappings;
STATIC UINT8            mReached[MAX_CAPACITY];
STATIC UINT8            mPatternPage[FUZZ_PAGE];

typedef struct {
  CONST OVMF_MH_MAPPING  *Mappings;
  UINTN                  Count;
  CONST UINT8            *Buffer;
  UINT64                 Mask;
  UINT64                 TablesPhysical;
  UINTN                  Capacity;
  UINTN                  TablesReached;
  UINT64                 MappedBytes;
} WALK;

/**
  Check one leaf against the mapping list.
**/
STATIC
VOID
CheckLeaf (
  IN OUT WALK    *Walk,
  IN     UINT64  Virtual,
  IN     UINT64  Entry,
  IN     UINT64  Size
  )
{
  UINTN   Index;
  UINT64  Physical;

  Physical = Entry & ADDRESS_BITS & ~Walk->Mask;
  if ((Physical & (Size - 1)) != 0) {
    FuzzFail ("large page not aligned to its size", Entry);
  }

  for (Index = 0; Index < Walk->Count; Index++) {
    CONST OVMF_MH_MAPPING  *M = &Walk->Mappings[Index];

    if ((Virtual >= M->VirtualBase) && (Virtual - M->VirtualBase < M->Size)) {
      if (Size > M->Size - (Virtual - M->VirtualBase)) {
        FuzzFail ("leaf runs past its mapping", Virtual);
      }

      if (Physical != M->PhysicalBase + (Virtual - M->VirtualBase)) {
        FuzzFail ("leaf maps the wrong physical address", Virtual);
      }

      if (((Entry & Walk->Mask) != 0) != (((M->Attributes & OVMF_MH_MAP_PRIVATE) != 0) && (Walk->Mask != 0))) {
        FuzzFail ("leaf C-bit differs from the mapping's privacy", Virtual);
      }

      Walk->MappedBytes += Size;
      return;
    }
  }

  FuzzFail ("leaf outside every mapping", Virtual);
}

/**
  Walk one table (level 3 = PML4) and everything below it.
**/
STATIC
VOID
WalkTable (
  IN OUT WALK    *Walk,
  IN     UINT64  Physical,
  IN     UINTN   Level,
  IN     UINT64  Prefix
  )
{
  UINT64  *Table;
  UINT64  Index;
  UINT64  Entry;
  UINT64  Virtual;
  UINT64  Page;

  if ((Physical < Walk->TablesPhysical) || ((Physical - Walk->TablesPhysical) / FUZZ_PAGE >= Walk->Capacity) ||
      ((Physical & (FUZZ_PAGE - 1)) != 0))
  {
    FuzzFail ("table outside the buffer", Physical);
  }

  Page = (Physical - Walk->TablesPhysical) / FUZZ_PAGE;
  if (mReached[Page]) {
    FuzzFail ("table reached twice", Physical);
  }

  mReached[Page] = 1;
  Walk->TablesReached++;
  Table = (UINT64 *)(Walk->Buffer + Page * FUZZ_PAGE);
  for (Index = 0; Index < 512; Index++) {
    Entry = Table[Index];
    if ((Entry & ENTRY_PRESENT) == 0) {
      continue;
    }

    Virtual = Prefix | (Index << (12 + 9 * Level));
    if ((Level == 0) || ((Entry & ENTRY_LARGE) != 0)) {
      if (Level == 3) {
        FuzzFail ("PS set in a PML4 entry", Entry);
      }

      CheckLeaf (Walk, Virtual, Entry, 1ULL << (12 + 9 * Level));
    } else {
      if ((Walk->Mask != 0) && ((Entry & Walk->Mask) == 0)) {
        FuzzFail ("table entry without the C-bit under SEV", Entry);
      }

      WalkTable (Walk, Entry & ADDRESS_BITS & ~Walk->Mask, Level - 1, Virtual);
    }
  }
}

int
LLVMFuzzerTestOneInput (
  const uint8_t  *Data,
  size_t         Size
  )
{
  OVMF_MH_PAGING  Paging;
  UINTN           Capacity;
  UINTN           Count;
  UINTN           Index;
  UINTN           Entry;
  UINT64          Cursor;
  UINT64          Value[3];
  UINT64          Unit;
  UINT64          Total;
  UINT64          Cr3;
  UINTN           Pages;
  UINTN           Counted;
  UINT32          Status;
  UINT32          CountStatus;
  UINT8           *Tables;
  WALK            Walk;
  BOOLEAN         Raw;

  if (mTables == NULL) {
    mTables   = FuzzGuardedMap (MAX_CAPACITY * FUZZ_PAGE);
    mMappings = (OVMF_MH_MAPPING *)FuzzGuardedMap (MAX_MAPPINGS * sizeof (OVMF_MH_MAPPING));
    memset (mPatternPage, PATTERN, sizeof (mPatternPage));
  }

  if (Size < 3) {
    return 0;
  }

  Raw                        = (BOOLEAN)((Data[0] & 0x8) != 0);
  Entry                      = Raw ? 25 : 13;
  Paging.Allow1GPages        = (BOOLEAN)((Data[0] & 1) != 0);
  Paging.PhysicalAddressBits = Data[1];
  switch ((Data[0] >> 1) & 3) {
    case 0:  Paging.EncryptionMask = 0;
      break;
    case 1:  Paging.EncryptionMask = 1ULL << 47;
      break;
    case 2:  Paging.EncryptionMask = 1ULL << 51;
      break;
    default: Paging.EncryptionMask = 1ULL << (Data[1] & 63);
      break;
  }

  Capacity = 1 + (Data[2] % MAX_CAPACITY);
  Count    = (Size - 3) / Entry;
  if ((Count == 0) || (Count > MAX_MAPPINGS)) {
    return 0;
  }

  //
  // The list ends at a guard page: reading entry Count faults.
  //
  {
    OVMF_MH_MAPPING  *List = mMappings + (MAX_MAPPINGS - Count);

    Cursor = 0;
    Total  = 0;
    for (Index = 0; Index < Count; Index++) {
      CONST UINT8  *In = Data + 3 + Index * Entry;

      if (Raw) {
        memcpy (Value, In, sizeof (Value));
        List[Index].VirtualBase  = Value[0];
        List[Index].PhysicalBase = Value[1];
        List[Index].Size         = Value[2];
        List[Index].Attributes   = In[24];
      } else {
        UINT32  Gap;
        UINT32  Physical;
        UINT32  Length;

        memcpy (&Gap, In, 4);
        memcpy (&Physical, In + 4, 4);
        memcpy (&Length, In + 8, 4);
        Unit                     = ((In[12] >> 1) & 3) == 1 ? 0x200000ULL : (((In[12] >> 1) & 3) == 2 ? 0x40000000ULL : FUZZ_PAGE);
        Cursor                  += (UINT64)(Gap & 0xFFFFF) * FUZZ_PAGE;
        List[Index].VirtualBase  = Cursor;
        List[Index].PhysicalBase = (UINT64)Physical * FUZZ_PAGE;
        List[Index].Size         = (UINT64)(Length & 0x3FF) * Unit + (UINT64)(Length >> 28) * FUZZ_PAGE;
        List[Index].Attributes   = In[12] & 1;
        Cursor                  += List[Index].Size;
      }

      Total += List[Index].Size;
    }

    Tables = mTables + (MAX_CAPACITY - Capacity) * FUZZ_PAGE;
    memset (Tables, PATTERN, Capacity * FUZZ_PAGE);
    CountStatus = MigrationHelperPageTablePages (&Paging, List, Count, Capacity, &Counted);
    Status      = MigrationHelperBuildPageTables (
                    &Paging,
                    List,
                    Count,
                    Tables,
                    0x1010000,
                    Capacity * FUZZ_PAGE,
                    &Cr3,
                    &Pages
                    );

    if (Status != OVMF_MH_STATUS_SUCCESS) {
      for (Index = 0; Index < Capacity; Index++) {
        if (memcmp (Tables + Index * FUZZ_PAGE, mPatternPage, FUZZ_PAGE) != 0) {
          FuzzFail ("a refused build wrote to the table buffer", Status);
        }
      }

      if ((Status == OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE) !=
          ((CountStatus == OVMF_MH_STATUS_SUCCESS) && (Counted > Capacity)))
      {
        FuzzFail ("PAGE_TABLES_TOO_LARGE disagrees with the count", Counted);
      }

      if ((Status != OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE) && (Status != CountStatus)) {
        FuzzFail ("build and count refuse differently", Status);
      }

      return 0;
    }

    if ((CountStatus != OVMF_MH_STATUS_SUCCESS) || (Counted != Pages) || (Pages > Capacity)) {
      FuzzFail ("the count differs from the tables built", ((UINT64)Counted << 32) | Pages);
    }

    //
    // The walker reads the tables where the builder wrote them: the
    // physical base handed to the builder stands for the buffer.
    //
    memset (mReached, 0, sizeof (mReached));
    memset (&Walk, 0, sizeof (Walk));
    Walk.Mappings       = List;
    Walk.Count          = Count;
    Walk.Mask           = Paging.EncryptionMask;
    Walk.TablesPhysical = 0x1010000;
    Walk.Capacity       = Capacity;
    Walk.Buffer         = Tables;
    WalkTable (&Walk, Cr3, 3, 0);
    if (Walk.TablesReached != Pages) {
      FuzzFail ("tables reached differ from tables reported", Walk.TablesReached);
    }

    if (Walk.MappedBytes != Total) {
      FuzzFail ("leaves do not add up to the mappings", Walk.MappedBytes);
    }
  }

  return 0;
}
