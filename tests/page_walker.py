"""An x86-64 4-level page walker, written from the architecture manuals'
description of the formats and sharing nothing with the helper's builder
(OvmfPkgMigration/Library/MigrationHelperCoreLib/PageTables.c).

It reads tables out of a byte buffer that stands for physical memory at
``base``, and is strict: anything a CPU would fault on (reserved bits set,
a 1 GiB page where the CPU has none, a table outside the buffer) raises
:class:`WalkError`, and so does anything a careful builder never produces
(a table reached twice, an empty table, a table entry without the C-bit
under SEV).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE = 4096
ENTRIES = 512
PRESENT = 1 << 0
WRITABLE = 1 << 1
LARGE = 1 << 7
NO_EXECUTE = 1 << 63
#: Entry bits 12..51 hold a physical address (architectural maximum).
ADDRESS_BITS = ((1 << 52) - 1) & ~(PAGE - 1)
LEVEL_NAMES = ("PT", "PD", "PDPT", "PML4")


class WalkError(AssertionError):
    """The tables are not what a CPU (or a careful builder) accepts."""


@dataclass(frozen=True)
class Leaf:
    virtual: int
    physical: int
    size: int
    encrypted: bool


@dataclass(frozen=True)
class Cpu:
    physical_bits: int
    c_bit: int | None  # position of SEV's C-bit, None without SEV
    has_1g_pages: bool

    @property
    def c_mask(self) -> int:
        return 0 if self.c_bit is None else 1 << self.c_bit

    def reserved_mask(self) -> int:
        """Address bits a CPU faults on: from MAXPHYADDR to bit 51, minus the C-bit."""
        mask = ADDRESS_BITS & ~((1 << self.physical_bits) - 1)
        return mask & ~self.c_mask


class Memory:
    """A buffer standing for physical memory at ``base``."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.base = base

    def table(self, physical: int) -> tuple[int, ...]:
        if physical % PAGE:
            raise WalkError(f"table at {physical:#x} is not page aligned")
        offset = physical - self.base
        if offset < 0 or offset + PAGE > len(self.data):
            raise WalkError(f"table at {physical:#x} lies outside the table buffer")
        return struct.unpack_from(f"<{ENTRIES}Q", self.data, offset)


def _page_size(level: int) -> int:
    return PAGE << (9 * level)


def _decode(entry: int, level: int, cpu: Cpu, where: str) -> tuple[int, bool, bool]:
    """(address, is_leaf, encrypted) of a present entry at ``level`` (3 = PML4)."""
    if entry & NO_EXECUTE:
        raise WalkError(f"{where}: NX set (EFER.NXE is off in SEC: reserved)")
    if entry & cpu.reserved_mask():
        raise WalkError(f"{where}: reserved address bits set in {entry:#x}")
    if not entry & WRITABLE:
        raise WalkError(f"{where}: not writable")
    encrypted = bool(entry & cpu.c_mask)
    address = entry & ADDRESS_BITS & ~cpu.c_mask
    leaf = level == 0 or bool(entry & LARGE)
    if leaf and level == 3:
        raise WalkError(f"{where}: PS set in a PML4 entry (reserved)")
    if leaf and level == 2 and not cpu.has_1g_pages:
        raise WalkError(f"{where}: 1 GiB page on a CPU without 1 GiB pages")
    # Bit 12 is PAT in a large-page entry (the builder uses PAT 0); bits from
    # 13 up to the page size are reserved.
    if leaf and level > 0 and address % _page_size(level):
        raise WalkError(f"{where}: large page at {address:#x} is not aligned to its size")
    return address, leaf, encrypted


def translate(memory: Memory, cr3: int, cpu: Cpu, virtual: int) -> tuple[int, bool] | None:
    """Physical address and C-bit of one virtual address; None when not mapped."""
    if cr3 & cpu.c_mask:
        raise WalkError("CR3 carries the C-bit")
    table = cr3 & ADDRESS_BITS
    for level in (3, 2, 1, 0):
        index = (virtual >> (12 + 9 * level)) & (ENTRIES - 1)
        entry = memory.table(table)[index]
        if not entry & PRESENT:
            return None
        address, leaf, encrypted = _decode(entry, level, cpu, f"{LEVEL_NAMES[level]}[{index}] for {virtual:#x}")
        if leaf:
            return address + (virtual & (_page_size(level) - 1)), encrypted
        if bool(encrypted) != bool(cpu.c_mask):
            raise WalkError(
                f"{LEVEL_NAMES[level]}[{index}]: table entry C-bit is {encrypted}, SEV is {cpu.c_mask != 0}")
        table = address
    raise AssertionError("unreachable")


def leaves(memory: Memory, cr3: int, cpu: Cpu) -> tuple[list[Leaf], int]:
    """Every mapped page in virtual order, and the number of tables reached."""
    if cr3 & cpu.c_mask or cr3 & ~ADDRESS_BITS:
        raise WalkError(f"CR3 {cr3:#x} carries flags or the C-bit")
    seen: set[int] = set()
    found: list[Leaf] = []

    def visit(table: int, level: int, prefix: int) -> None:
        if table in seen:
            raise WalkError(f"table {table:#x} is reached twice")
        seen.add(table)
        entries = memory.table(table)
        present = 0
        for index, entry in enumerate(entries):
            if not entry & PRESENT:
                continue
            present += 1
            virtual = prefix | (index << (12 + 9 * level))
            where = f"{LEVEL_NAMES[level]} {table:#x}[{index}]"
            address, leaf, encrypted = _decode(entry, level, cpu, where)
            if leaf:
                found.append(Leaf(virtual, address, _page_size(level), encrypted))
            else:
                if encrypted != bool(cpu.c_mask):
                    raise WalkError(f"{where}: table entry C-bit is {encrypted}, SEV is {cpu.c_mask != 0}")
                visit(address, level - 1, virtual)
        if present == 0:
            raise WalkError(f"{LEVEL_NAMES[level]} table {table:#x} has no present entry")

    visit(cr3, 3, 0)
    return found, len(seen)


def runs(pages: list[Leaf]) -> list[Leaf]:
    """Merge pages that continue each other (virtual, physical, C-bit) into runs."""
    merged: list[Leaf] = []
    for page in sorted(pages, key=lambda p: p.virtual):
        if merged:
            last = merged[-1]
            if (last.virtual + last.size == page.virtual and last.physical + last.size == page.physical
                    and last.encrypted == page.encrypted):
                merged[-1] = Leaf(last.virtual, last.physical, last.size + page.size, last.encrypted)
                continue
            if last.virtual + last.size > page.virtual:
                raise WalkError(f"pages at {last.virtual:#x} and {page.virtual:#x} overlap")
        merged.append(page)
    return merged
