/** @file
  The helper's own 4-level page tables: the firmware memory, the work area
  and the mailbox identity mapped, the guest window (several physical
  ranges, below and above 4 GiB) mapped as one contiguous virtual span.

  Everything here is arithmetic on caller-provided memory: the same code
  builds the tables in SEC and, host-built, in tests that walk the result
  with an independent walker (tests/page_walker.py).

  SEV: private mappings (and the entries that point to tables) carry the
  encryption mask, shared mappings never do. The mask comes from the
  caller (CPUID 0x8000001F when SEV is active, 0 otherwise).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include "MigrationHelperCoreInternal.h"

#define PT_ENTRIES           512
#define PT_PRESENT           BIT0
#define PT_READ_WRITE        BIT1
#define PT_ACCESSED          BIT5
#define PT_DIRTY             BIT6
#define PT_PAGE_SIZE         BIT7
#define PT_TABLE_FLAGS       (PT_PRESENT | PT_READ_WRITE | PT_ACCESSED)
#define PT_LEAF_FLAGS        (PT_PRESENT | PT_READ_WRITE | PT_ACCESSED | PT_DIRTY)
#define PT_ADDRESS_MASK      0x000FFFFFFFFFF000ULL
#define PT_SIZE_4K           0x1000ULL
#define PT_SIZE_2M           0x200000ULL
#define PT_SIZE_1G           0x40000000ULL
#define PT_CANONICAL_LIMIT   0x0000800000000000ULL   ///< End of the lower canonical half (48-bit)
#define PT_MAX_PHYSICAL_BITS 52
#define PT_MIN_PHYSICAL_BITS 32
#define PT_LEVELS            4                       ///< PML4 (3), PDPT (2), PD (1), PT (0)

///
/// Builder state. Tables == NULL counts tables instead of writing them.
///
typedef struct {
  UINT8     *Tables;
  UINT64    Physical;
  UINTN     Capacity;                     ///< Tables the buffer holds
  UINTN     Used;                         ///< Tables allocated (or counted)
  UINTN     Limit;                        ///< Count mode: stop once Used exceeds it
  UINT64    Mask;                         ///< Encryption mask
  UINT64    LastPrefix[PT_LEVELS - 1];    ///< Count mode: last table seen per level (PT, PD, PDPT)
  BOOLEAN   PrefixSeen[PT_LEVELS - 1];
} PT_BUILDER;

/**
  Shift of the virtual-address bits that index a table of a level.

  @param[in] Level  0 (PT) to 3 (PML4).

  @return 12, 21, 30 or 39.
**/
STATIC
UINTN
InternalLevelShift (
  IN UINTN  Level
  )
{
  return 12 + 9 * Level;
}

/**
  Check the paging configuration and the mapping list.

  @param[in] Paging        What the CPU offers.
  @param[in] Mappings      Spans to map.
  @param[in] MappingCount  Number of entries.

  @retval OVMF_MH_STATUS_SUCCESS              All can be mapped.
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED  Something cannot.
**/
STATIC
UINT32
InternalCheckMappings (
  IN CONST OVMF_MH_PAGING   *Paging,
  IN CONST OVMF_MH_MAPPING  *Mappings,
  IN UINTN                  MappingCount
  )
{
  UINTN   Index;
  UINT64  PhysicalLimit;
  UINT64  PreviousEnd;

  if ((Paging == NULL) || (Mappings == NULL) || (MappingCount == 0) ||
      (Paging->PhysicalAddressBits < PT_MIN_PHYSICAL_BITS) ||
      (Paging->PhysicalAddressBits > PT_MAX_PHYSICAL_BITS))
  {
    return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
  }

  PhysicalLimit = (1ULL << Paging->PhysicalAddressBits);
  if (Paging->EncryptionMask != 0) {
    //
    // One bit, inside the entry's address field and above every address
    // the CPU can reach (under SEV, CPUID reports the reduced width).
    //
    if (((Paging->EncryptionMask & (Paging->EncryptionMask - 1)) != 0) ||
        ((Paging->EncryptionMask & PT_ADDRESS_MASK) == 0) ||
        (Paging->EncryptionMask < PhysicalLimit))
    {
      return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
    }
  }

  PreviousEnd = 0;
  for (Index = 0; Index < MappingCount; Index++) {
    if ((Mappings[Index].Size == 0) ||
        (((Mappings[Index].VirtualBase | Mappings[Index].PhysicalBase | Mappings[Index].Size) &
          (PT_SIZE_4K - 1)) != 0) ||
        ((Mappings[Index].Attributes & ~(UINT32)OVMF_MH_MAP_KNOWN) != 0) ||
        (Mappings[Index].VirtualBase < PreviousEnd) ||
        (Mappings[Index].VirtualBase >= PT_CANONICAL_LIMIT) ||
        (Mappings[Index].Size > PT_CANONICAL_LIMIT - Mappings[Index].VirtualBase) ||
        (Mappings[Index].PhysicalBase >= PhysicalLimit) ||
        (Mappings[Index].Size > PhysicalLimit - Mappings[Index].PhysicalBase))
    {
      return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
    }

    PreviousEnd = Mappings[Index].VirtualBase + Mappings[Index].Size;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Take a zeroed table from the buffer.

  @param[in,out] Builder  Builder in write mode with room left.

  @return The table's physical address.
**/
STATIC
UINT64
InternalAllocateTable (
  IN OUT PT_BUILDER  *Builder
  )
{
  UINT64  Physical;

  ZeroMem (Builder->Tables + Builder->Used * PT_SIZE_4K, PT_SIZE_4K);
  Physical = Builder->Physical + Builder->Used * PT_SIZE_4K;
  Builder->Used++;
  return Physical;
}

/**
  Map a run of pages of one size (4 KiB, 2 MiB or 1 GiB) that all fall
  into one leaf table.

  @param[in,out] Builder    The builder.
  @param[in]     Virtual    Virtual address of the first page, aligned to
                            the page size.
  @param[in]     Physical   Physical address of the first page, aligned to
                            the page size.
  @param[in]     LeafLevel  0 (4 KiB), 1 (2 MiB) or 2 (1 GiB).
  @param[in]     Pages      Pages in the run, 1 to the entries left in the
                            leaf table from Virtual's entry on.
  @param[in]     Private    Whether the pages carry the encryption mask.

  @retval OVMF_MH_STATUS_SUCCESS              Mapped (or counted).
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED  A page is mapped already.
**/
STATIC
UINT32
InternalMapRun (
  IN OUT PT_BUILDER  *Builder,
  IN     UINT64      Virtual,
  IN     UINT64      Physical,
  IN     UINTN       LeafLevel,
  IN     UINTN       Pages,
  IN     BOOLEAN     Private
  )
{
  UINTN   Level;
  UINT64  *Table;
  UINT64  Entry;
  UINT64  Prefix;
  UINTN   Index;
  UINTN   Last;
  UINT64  Leaf;
  UINT64  PageSize;

  if (Builder->Tables == NULL) {
    //
    // Leaves arrive in ascending virtual order, so a table, once left,
    // never comes back: a table is new exactly when its prefix changes.
    //
    for (Level = LeafLevel; Level < PT_LEVELS - 1; Level++) {
      Prefix = (Virtual >> InternalLevelShift (Level + 1));
      if (!Builder->PrefixSeen[Level] || (Builder->LastPrefix[Level] != Prefix)) {
        Builder->PrefixSeen[Level] = TRUE;
        Builder->LastPrefix[Level] = Prefix;
        Builder->Used++;
      }
    }

    return OVMF_MH_STATUS_SUCCESS;
  }

  Table = (UINT64 *)Builder->Tables;
  for (Level = PT_LEVELS - 1; Level > LeafLevel; Level--) {
    Index = (UINTN)((Virtual >> InternalLevelShift (Level)) & (PT_ENTRIES - 1));
    Entry = Table[Index];
    if ((Entry & PT_PRESENT) == 0) {
      Entry        = InternalAllocateTable (Builder) | Builder->Mask | PT_TABLE_FLAGS;
      Table[Index] = Entry;
    } else if ((Entry & PT_PAGE_SIZE) != 0) {
      return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
    }

    Table = (UINT64 *)(Builder->Tables + ((Entry & PT_ADDRESS_MASK & ~Builder->Mask) - Builder->Physical));
  }

  Index    = (UINTN)((Virtual >> InternalLevelShift (LeafLevel)) & (PT_ENTRIES - 1));
  Last     = Index + Pages;
  PageSize = 1ULL << InternalLevelShift (LeafLevel);
  Leaf     = Physical | PT_LEAF_FLAGS | (Private ? Builder->Mask : 0) | ((LeafLevel > 0) ? PT_PAGE_SIZE : 0);
  for ( ; Index < Last; Index++) {
    if ((Table[Index] & PT_PRESENT) != 0) {
      return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
    }

    Table[Index] = Leaf;
    Leaf        += PageSize;
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Map every span with the largest pages its alignment allows.

  @param[in,out] Builder       The builder.
  @param[in]     Paging        What the CPU offers.
  @param[in]     Mappings      Checked spans.
  @param[in]     MappingCount  Number of entries.

  @retval OVMF_MH_STATUS_SUCCESS              Mapped (or counted).
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED  A page was mapped twice.
**/
STATIC
UINT32
InternalMapAll (
  IN OUT PT_BUILDER             *Builder,
  IN     CONST OVMF_MH_PAGING   *Paging,
  IN     CONST OVMF_MH_MAPPING  *Mappings,
  IN     UINTN                  MappingCount
  )
{
  UINTN    Index;
  UINT64   Virtual;
  UINT64   Physical;
  UINT64   Left;
  UINT64   Both;
  UINTN    LeafLevel;
  UINT64   PageSize;
  UINTN    Pages;
  BOOLEAN  Private;
  UINT32   Status;

  for (Index = 0; Index < MappingCount; Index++) {
    Virtual  = Mappings[Index].VirtualBase;
    Physical = Mappings[Index].PhysicalBase;
    Left     = Mappings[Index].Size;
    Private  = (BOOLEAN)((Mappings[Index].Attributes & OVMF_MH_MAP_PRIVATE) != 0);
    while (Left > 0) {
      Both = Virtual | Physical;
      if (Paging->Allow1GPages && ((Both & (PT_SIZE_1G - 1)) == 0) && (Left >= PT_SIZE_1G)) {
        LeafLevel = 2;
        PageSize  = PT_SIZE_1G;
      } else if (((Both & (PT_SIZE_2M - 1)) == 0) && (Left >= PT_SIZE_2M)) {
        LeafLevel = 1;
        PageSize  = PT_SIZE_2M;
      } else {
        LeafLevel = 0;
        PageSize  = PT_SIZE_4K;
      }

      //
      // The pages that follow, up to the end of this leaf table, take the
      // same size: a larger page needs a virtual address aligned to it,
      // which only the next table's first entry has, and both addresses
      // stay aligned to this size while at least one such page is left.
      // So one walk maps the whole run, and a count sees one table.
      //
      Pages = PT_ENTRIES - (UINTN)((Virtual >> InternalLevelShift (LeafLevel)) & (PT_ENTRIES - 1));
      if (Left / PageSize < Pages) {
        Pages = (UINTN)(Left / PageSize);
      }

      Status = InternalMapRun (Builder, Virtual, Physical, LeafLevel, Pages, Private);
      if (Status != OVMF_MH_STATUS_SUCCESS) {
        return Status;
      }

      //
      // A count past the limit is an answer already. Every run needs at
      // most a table per level, so this bounds the work any layout costs.
      //
      if ((Builder->Tables == NULL) && (Builder->Used > Builder->Limit)) {
        return OVMF_MH_STATUS_SUCCESS;
      }

      Virtual  += Pages * PageSize;
      Physical += Pages * PageSize;
      Left     -= Pages * PageSize;
    }
  }

  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Count the 4 KiB tables MigrationHelperBuildPageTables() needs for a list
  of mappings, without writing anything.

  @param[in]  Paging        What the CPU offers.
  @param[in]  Mappings      Spans to map, sorted by virtual address, disjoint.
  @param[in]  MappingCount  Number of entries.
  @param[in]  Limit         Stop counting once more than this many are needed.
  @param[out] TablePages    Receives the number of tables (the PML4 included),
                            or a number above Limit when more are needed.

  @retval OVMF_MH_STATUS_SUCCESS              Counted.
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED  The list or Paging is invalid.
**/
UINT32
EFIAPI
MigrationHelperPageTablePages (
  IN  CONST OVMF_MH_PAGING   *Paging,
  IN  CONST OVMF_MH_MAPPING  *Mappings,
  IN  UINTN                  MappingCount,
  IN  UINTN                  Limit,
  OUT UINTN                  *TablePages
  )
{
  PT_BUILDER  Builder;
  UINT32      Status;

  *TablePages = 0;
  Status      = InternalCheckMappings (Paging, Mappings, MappingCount);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  ZeroMem (&Builder, sizeof (Builder));
  Builder.Used  = 1;   // the PML4
  Builder.Limit = Limit;
  Status       = InternalMapAll (&Builder, Paging, Mappings, MappingCount);
  if (Status == OVMF_MH_STATUS_SUCCESS) {
    *TablePages = Builder.Used;
  }

  return Status;
}

/**
  Build 4-level page tables for a list of mappings.

  @param[in]  Paging          What the CPU offers.
  @param[in]  Mappings        Spans to map, sorted by virtual address, disjoint.
  @param[in]  MappingCount    Number of entries.
  @param[out] Tables          Writable buffer for the tables, 4 KiB aligned.
  @param[in]  TablesPhysical  Physical address of Tables (what entries name).
  @param[in]  TablesSize      Bytes of the buffer.
  @param[out] Cr3             Receives the value to load into CR3.
  @param[out] TablePages      Receives the number of tables written.

  @retval OVMF_MH_STATUS_SUCCESS                The tables are built.
  @retval OVMF_MH_STATUS_MAPPING_UNSUPPORTED    The list, Paging or the buffer
                                                is invalid.
  @retval OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE  The buffer cannot hold the
                                                tables; nothing was written.
**/
UINT32
EFIAPI
MigrationHelperBuildPageTables (
  IN  CONST OVMF_MH_PAGING   *Paging,
  IN  CONST OVMF_MH_MAPPING  *Mappings,
  IN  UINTN                  MappingCount,
  OUT VOID                   *Tables,
  IN  UINT64                 TablesPhysical,
  IN  UINTN                  TablesSize,
  OUT UINT64                 *Cr3,
  OUT UINTN                  *TablePages
  )
{
  PT_BUILDER  Builder;
  UINTN       Needed;
  UINT32      Status;
  UINT64      PhysicalLimit;

  *Cr3        = 0;
  *TablePages = 0;
  Status      = MigrationHelperPageTablePages (Paging, Mappings, MappingCount, TablesSize / PT_SIZE_4K, &Needed);
  if (Status != OVMF_MH_STATUS_SUCCESS) {
    return Status;
  }

  PhysicalLimit = (1ULL << Paging->PhysicalAddressBits);
  if ((Tables == NULL) || (((UINTN)Tables & (PT_SIZE_4K - 1)) != 0) ||
      ((TablesPhysical & (PT_SIZE_4K - 1)) != 0) || (TablesPhysical >= PhysicalLimit) ||
      (TablesSize / PT_SIZE_4K > (PhysicalLimit - TablesPhysical) / PT_SIZE_4K))
  {
    return OVMF_MH_STATUS_MAPPING_UNSUPPORTED;
  }

  if (Needed > TablesSize / PT_SIZE_4K) {
    return OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE;
  }

  ZeroMem (&Builder, sizeof (Builder));
  Builder.Tables   = (UINT8 *)Tables;
  Builder.Physical = TablesPhysical;
  Builder.Capacity = TablesSize / PT_SIZE_4K;
  Builder.Mask     = Paging->EncryptionMask;
  InternalAllocateTable (&Builder);
  Status = InternalMapAll (&Builder, Paging, Mappings, MappingCount);
  if ((Status != OVMF_MH_STATUS_SUCCESS) || (Builder.Used != Needed)) {
    //
    // Not reached: the count and the build walk the same leaves.
    //
    return (Status != OVMF_MH_STATUS_SUCCESS) ? Status : OVMF_MH_STATUS_UNEXPECTED;
  }

  //
  // CR3 names the PML4 without the C-bit, as OVMF's reset vector does: an
  // SEV guest's page-table walks are private whatever the C-bit says.
  //
  *Cr3        = TablesPhysical;
  *TablePages = Builder.Used;
  return OVMF_MH_STATUS_SUCCESS;
}

/**
  Insert an identity mapping into a list kept sorted by address.

  @param[in,out] Mappings  The list.
  @param[in,out] Count     Its length, incremented.
  @param[in]     Base      First byte.
  @param[in]     Size      Bytes.
  @param[in]     Private   Whether the span is private (C-bit under SEV).
**/
STATIC
VOID
InternalInsertIdentity (
  IN OUT OVMF_MH_MAPPING  *Mappings,
  IN OUT UINTN            *Count,
  IN     UINT64           Base,
  IN     UINT64           Size,
  IN     BOOLEAN          Private
  )
{
  UINTN  Index;

  Index = *Count;
  while ((Index > 0) && (Mappings[Index - 1].VirtualBase > Base)) {
    Mappings[Index] = Mappings[Index - 1];
    Index--;
  }

  Mappings[Index].VirtualBase  = Base;
  Mappings[Index].PhysicalBase = Base;
  Mappings[Index].Size         = Size;
  Mappings[Index].Attributes   = Private ? OVMF_MH_MAP_PRIVATE : 0;
  (*Count)++;
}

/**
  The helper's address space for a validated request.

  @param[in]  Request        A request MigrationHelperValidateRequest() accepted.
  @param[out] Mappings       Receives up to OVMF_MH_MAX_MAPPINGS entries.
  @param[out] MappingCount   Receives the number of entries.
  @param[out] WindowVirtual  Receives the virtual address of guest offset 0.
**/
VOID
EFIAPI
MigrationHelperHelperMappings (
  IN  CONST OVMF_MH_REQUEST  *Request,
  OUT OVMF_MH_MAPPING        *Mappings,
  OUT UINTN                  *MappingCount,
  OUT UINT64                 *WindowVirtual
  )
{
  UINTN   Count;
  UINTN   Index;
  UINT64  Virtual;

  Count = 0;
  InternalInsertIdentity (
    Mappings,
    &Count,
    OVMF_MH_FIRMWARE_RAM_BASE,
    OVMF_MH_MAILBOX_MIN_BASE - OVMF_MH_FIRMWARE_RAM_BASE,
    TRUE
    );
  InternalInsertIdentity (Mappings, &Count, Request->MailboxBase, Request->MailboxSize, FALSE);
  InternalInsertIdentity (Mappings, &Count, Request->WorkAreaBase, Request->WorkAreaSize, TRUE);
  InternalInsertIdentity (
    Mappings,
    &Count,
    OVMF_MH_ADDRESS_LIMIT,
    BASE_4GB - OVMF_MH_ADDRESS_LIMIT,
    TRUE
    );

  //
  // The window starts at the same offset within a 1 GiB page as its first
  // range, so that range can use the largest pages its alignment allows.
  //
  Virtual        = OVMF_MH_WINDOW_VIRTUAL_BASE;
  *WindowVirtual = Virtual;
  if (Request->WindowRangeCount > 0) {
    Virtual       += Request->WindowBase[0] & (PT_SIZE_1G - 1);
    *WindowVirtual = Virtual;
  }

  for (Index = 0; Index < Request->WindowRangeCount; Index++) {
    Mappings[Count].VirtualBase  = Virtual;
    Mappings[Count].PhysicalBase = Request->WindowBase[Index];
    Mappings[Count].Size         = Request->WindowSize[Index];
    Mappings[Count].Attributes   = OVMF_MH_MAP_PRIVATE;
    Virtual                     += Request->WindowSize[Index];
    Count++;
  }

  *MappingCount = Count;
}
