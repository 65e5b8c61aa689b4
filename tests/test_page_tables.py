"""The helper's page-table builder (PageTables.c), host-built, against the
independent walker in tests/page_walker.py: over edge-case and randomised
layouts (fixed seed), C-bit positions 47 and 51 and none, with and without
1 GiB pages, every mapped page, its physical address and its C-bit must be
exactly what the mapping list asks for, nothing else may be mapped, every
page must be the largest the alignment allows, and the table count must be
the one the builder reported and counted in advance."""

from __future__ import annotations

import ctypes
import mmap
import random
from collections.abc import Sequence
from dataclasses import dataclass

import page_walker as w
import pytest

from helper import abi
from host_shim.helpers import hostcore

A = abi.load()
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PRIVATE = 1
SUCCESS = A.const("OVMF_MH_STATUS_SUCCESS")
UNSUPPORTED = A.const("OVMF_MH_STATUS_MAPPING_UNSUPPORTED")
TOO_LARGE = A.const("OVMF_MH_STATUS_PAGE_TABLES_TOO_LARGE")
TABLES_PHYSICAL = A.const("OVMF_MH_PRIVATE_BASE") + 0x10000


class Mapping(ctypes.Structure):
    _fields_ = [
        ("VirtualBase", ctypes.c_uint64),
        ("PhysicalBase", ctypes.c_uint64),
        ("Size", ctypes.c_uint64),
        ("Attributes", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class Span:
    virtual: int
    physical: int
    size: int
    private: bool = True


CPUS = [
    pytest.param(w.Cpu(46, None, True), id="plain-1g"),
    pytest.param(w.Cpu(46, None, False), id="plain-2m"),
    pytest.param(w.Cpu(46, 47, True), id="cbit47-1g"),
    pytest.param(w.Cpu(43, 47, False), id="cbit47-2m"),
    pytest.param(w.Cpu(48, 51, True), id="cbit51-1g"),
    pytest.param(w.Cpu(52 - 8, 51, False), id="cbit51-2m"),
]


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    library = hostcore.load()
    library.mh_page_table_pages.restype = ctypes.c_uint32
    library.mh_build_page_tables.restype = ctypes.c_uint32
    library.mh_validate_request.restype = ctypes.c_uint32
    library.mh_helper_mappings.restype = ctypes.c_size_t
    library.mh_work_area_size.restype = ctypes.c_uint64
    library.mh_work_area_size.argtypes = [ctypes.c_uint64]
    library.mh_window_virtual_base.restype = ctypes.c_uint64
    assert library.mh_mapping_struct_size() == ctypes.sizeof(Mapping)
    return library


@dataclass
class Built:
    status: int
    cr3: int
    pages: int
    counted: int
    tables: bytes


def _array(spans: Sequence[Span]) -> ctypes.Array[Mapping]:
    items = (Mapping * max(1, len(spans)))()
    for index, span in enumerate(spans):
        items[index] = Mapping(span.virtual, span.physical, span.size, PRIVATE if span.private else 0)
    return items


def build(lib: ctypes.CDLL, spans: Sequence[Span], cpu: w.Cpu, capacity: int = 4096, fill: int = 0) -> Built:
    items = _array(spans)
    counted = ctypes.c_size_t(0)
    count_status = lib.mh_page_table_pages(
        items, ctypes.c_size_t(len(spans)), ctypes.c_uint64(cpu.c_mask), ctypes.c_uint32(cpu.physical_bits),
        ctypes.c_int(cpu.has_1g_pages), ctypes.byref(counted),
    )
    buffer = mmap.mmap(-1, capacity * w.PAGE)  # page aligned, as the builder requires
    try:
        if fill:
            buffer.write(bytes([fill]) * len(buffer))
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        cr3, pages = ctypes.c_uint64(0), ctypes.c_size_t(0)
        status = lib.mh_build_page_tables(
            items, ctypes.c_size_t(len(spans)), ctypes.c_uint64(cpu.c_mask), ctypes.c_uint32(cpu.physical_bits),
            ctypes.c_int(cpu.has_1g_pages), ctypes.c_void_p(address), ctypes.c_uint64(TABLES_PHYSICAL),
            ctypes.c_size_t(len(buffer)), ctypes.byref(cr3), ctypes.byref(pages),
        )
        data = bytes(buffer)
    finally:
        del address
        buffer.close()
    assert count_status == (status if status != TOO_LARGE else SUCCESS)
    return Built(status, cr3.value, pages.value, counted.value, data)


def expected_runs(spans: Sequence[Span], cpu: w.Cpu) -> list[w.Leaf]:
    return w.runs([w.Leaf(s.virtual, s.physical, s.size, s.private and cpu.c_mask != 0) for s in spans])


def check(lib: ctypes.CDLL, spans: Sequence[Span], cpu: w.Cpu, rng: random.Random | None = None) -> Built:
    built = build(lib, spans, cpu, capacity=max(64, _table_bound(spans)))
    assert built.status == SUCCESS, f"status {built.status:#x} for {spans}"
    memory = w.Memory(built.tables, TABLES_PHYSICAL)
    pages, tables = w.leaves(memory, built.cr3, cpu)
    # Exactly the requested spans are mapped, with the requested C-bits.
    assert w.runs(pages) == expected_runs(spans, cpu)
    # The count the builder reported, the count it predicted, the tables reached.
    assert built.pages == built.counted == tables
    # Every page is the largest its alignment and its span allow.
    _check_largest_pages(pages, spans, cpu)
    # Point translations through the walker's per-address path agree.
    for span in spans:
        points = {0, span.size - 1, span.size // 2 & ~7}
        if rng is not None:
            points |= {rng.randrange(span.size) for _ in range(8)}
        for offset in points:
            assert w.translate(memory, built.cr3, cpu, span.virtual + offset) == (
                span.physical + offset, span.private and cpu.c_mask != 0)
        for outside in (span.virtual - 1, span.virtual + span.size):
            if 0 <= outside < 1 << 47 and not any(s.virtual <= outside < s.virtual + s.size for s in spans):
                assert w.translate(memory, built.cr3, cpu, outside) is None
    return built


def _table_bound(spans: Sequence[Span]) -> int:
    bound = 1
    for span in spans:
        bound += 3 * 2 + span.size // (512 * 512 * w.PAGE) + span.size // (512 * w.PAGE) + 2
        if (span.virtual - span.physical) % (2 * MIB):
            bound += span.size // (512 * w.PAGE)
    return bound


def _check_largest_pages(pages: list[w.Leaf], spans: Sequence[Span], cpu: w.Cpu) -> None:
    sizes = [4 * KIB, 2 * MIB] + ([GIB] if cpu.has_1g_pages else [])
    for page in pages:
        span = next(s for s in spans if s.virtual <= page.virtual < s.virtual + s.size)
        for bigger in (size for size in sizes if size > page.size):
            first = page.virtual - page.virtual % bigger
            # The builder walks each span from its start: a bigger page fits
            # where both addresses are aligned to it and the rest of the span
            # from there holds it.
            if (page.virtual % bigger == 0 and page.physical % bigger == 0
                    and page.virtual + bigger <= span.virtual + span.size):
                raise AssertionError(f"{page} could have been a {bigger:#x} page ({first:#x})")


# --- layouts ---------------------------------------------------------------------------------

def _identity(base: int, size: int, private: bool = True) -> Span:
    return Span(base, base, size, private)


WINDOW = 1 << 40


def q35_split(guest: int, own: int = 64 * MIB, below: int = 2 * GIB) -> list[Span]:
    """A helper VM on q35 whose RAM is split at 2 GiB: its own RAM, then the
    guest's, so the window is own..2G, then 4G.. (docs/fw-cfg-request.md)."""
    first = below - own
    spans = [
        _identity(0x800000, 0x1000000),
        _identity(0x1800000, 16 * MIB, private=False),
        _identity(0x2800000, 40 * MIB),
        _identity(0xFF000000, 16 * MIB),
    ]
    virtual = WINDOW + own % GIB
    spans.append(Span(virtual, own, min(first, guest)))
    if guest > first:
        spans.append(Span(virtual + first, 4 * GIB, guest - first))
    return spans


EDGE_LAYOUTS: dict[str, list[Span]] = {
    "q35-4g-guest": q35_split(4 * GIB),
    "q35-16g-guest": q35_split(16 * GIB),
    "q35-64g-guest": q35_split(64 * GIB),
    "small-guest-below-4g": q35_split(256 * MIB),
    "straddles-1g": [Span(WINDOW + GIB - 6 * MIB, GIB - 6 * MIB, 12 * MIB)],
    "straddles-2m": [Span(WINDOW + 2 * MIB - 12 * KIB, 6 * MIB - 12 * KIB, 40 * KIB)],
    "straddles-1g-unaligned": [Span(WINDOW + GIB - 20 * KIB, 3 * GIB - 20 * KIB, 2 * GIB + 44 * KIB)],
    "adjacent-ranges": [
        Span(WINDOW, 4 * GIB, 2 * MIB), Span(WINDOW + 2 * MIB, 8 * GIB, 4 * KIB),
        Span(WINDOW + 2 * MIB + 4 * KIB, 12 * GIB + 4 * KIB, GIB),
        Span(WINDOW + GIB + 2 * MIB + 8 * KIB, 0x5000, 4 * KIB),
    ],
    "adjacent-shared-and-private": [
        _identity(0x1800000, 2 * MIB, private=False), _identity(0x1A00000, 2 * MIB),
        _identity(0x1C00000, 4 * KIB, private=False), _identity(0x1C01000, 2 * GIB),
    ],
    "above-4g-only": [Span(WINDOW, 5 * GIB, 11 * GIB)],
    "one-page": [_identity(0x1000, 4 * KIB)],
    "top-of-lower-half": [Span((1 << 47) - 2 * GIB, 0x1000_0000_0000 - 2 * GIB, 2 * GIB)],
    "window-crosses-pml4-entry": [Span((1 << 39) - 3 * MIB, 3 * GIB - 3 * MIB, 8 * MIB)],
    "incongruent-second-range": [Span(WINDOW + 64 * MIB, 64 * MIB, 2 * MIB + 12 * KIB),
                                 Span(WINDOW + 66 * MIB + 12 * KIB, 4 * GIB, 8 * MIB)],
}


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("layout", sorted(EDGE_LAYOUTS))
def test_edge_layouts_walk_exactly(lib: ctypes.CDLL, cpu: w.Cpu, layout: str) -> None:
    spans = EDGE_LAYOUTS[layout]
    if max(s.physical + s.size for s in spans) > 1 << cpu.physical_bits:
        # Beyond this CPU's MAXPHYADDR: refused, not mapped.
        assert build(lib, spans, cpu).status == UNSUPPORTED
        return
    check(lib, spans, cpu)


def _random_spans(rng: random.Random, cpu: w.Cpu) -> list[Span]:
    spans: list[Span] = []
    virtual = rng.choice([0, 0x1000, WINDOW, 3 * GIB - 5 * MIB])
    used: list[tuple[int, int]] = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice(["page", "small", "congruent-2m", "congruent-1g", "big"])
        if kind == "page":
            size = rng.randint(1, 40) * w.PAGE
        elif kind == "small":
            size = rng.randint(1, 1500) * w.PAGE
        elif kind == "congruent-2m":
            size = rng.randint(1, 3000) * 2 * MIB + rng.randint(0, 3) * w.PAGE
        elif kind == "congruent-1g":
            size = rng.randint(1, 20) * GIB + rng.randint(0, 3) * 2 * MIB
        else:
            size = rng.choice([4, 16, 24]) * GIB
        virtual += rng.choice([0, 0, w.PAGE * rng.randint(1, 600), 2 * MIB * rng.randint(1, 600), GIB])
        if virtual + size > 1 << 47:
            break
        for _attempt in range(50):
            if kind in ("page", "small"):
                physical = rng.randrange(0, (1 << cpu.physical_bits) - size, w.PAGE)
            else:
                granule = GIB if kind != "congruent-2m" else 2 * MIB
                physical = rng.randrange(0, (1 << cpu.physical_bits) - size - granule, granule)
                physical += virtual % granule
            if not any(physical < end and start < physical + size for start, end in used):
                break
        else:
            continue
        used.append((physical, physical + size))
        spans.append(Span(virtual, physical, size, rng.random() < 0.8))
        virtual += size
    return spans


@pytest.mark.parametrize("cpu", CPUS)
def test_random_layouts_walk_exactly(lib: ctypes.CDLL, cpu: w.Cpu) -> None:
    rng = random.Random(0x0E1A_2026 + cpu.physical_bits * 100 + (cpu.c_bit or 0) + cpu.has_1g_pages)
    for _ in range(30):
        spans = _random_spans(rng, cpu)
        if spans:
            check(lib, spans, cpu, rng)


# --- refusals ----------------------------------------------------------------------------------

CPU = w.Cpu(46, 47, True)
BAD_LISTS = {
    "empty-span": [Span(WINDOW, 0, 0)],
    "misaligned-virtual": [Span(WINDOW + 8, 0, 4 * KIB)],
    "misaligned-physical": [Span(WINDOW, 0x800, 4 * KIB)],
    "misaligned-size": [Span(WINDOW, 0, 4 * KIB + 1)],
    "overlapping": [Span(WINDOW, 0, 8 * KIB), Span(WINDOW + 4 * KIB, 1 << 30, 4 * KIB)],
    "unsorted": [Span(WINDOW + GIB, 0, 4 * KIB), Span(WINDOW, GIB, 4 * KIB)],
    "non-canonical": [Span(1 << 47, 0, 4 * KIB)],
    "crosses-canonical-limit": [Span((1 << 47) - 4 * KIB, 0, 8 * KIB)],
    "beyond-maxphyaddr": [Span(WINDOW, (1 << 46) - 4 * KIB, 8 * KIB)],
    "wraps": [Span(0xFFFF_FFFF_FFFF_F000, 0, 8 * KIB)],
}


@pytest.mark.parametrize("name", sorted(BAD_LISTS))
def test_bad_mapping_lists_are_refused_and_nothing_is_written(lib: ctypes.CDLL, name: str) -> None:
    built = build(lib, BAD_LISTS[name], CPU, capacity=8, fill=0xA5)
    assert built.status == UNSUPPORTED
    assert built.tables == bytes([0xA5]) * len(built.tables)
    assert (built.cr3, built.pages) == (0, 0)


@pytest.mark.parametrize(("physical_bits", "c_bit"), [(47, 46), (48, 47), (46, 11), (46, 52), (31, None), (53, None)])
def test_bad_paging_configurations_are_refused(lib: ctypes.CDLL, physical_bits: int, c_bit: int | None) -> None:
    built = build(lib, [Span(WINDOW, 0, 4 * KIB)], w.Cpu(physical_bits, c_bit, True), capacity=8, fill=0xA5)
    assert built.status == UNSUPPORTED
    assert built.tables == bytes([0xA5]) * len(built.tables)


def test_a_buffer_too_small_is_refused_before_anything_is_written(lib: ctypes.CDLL) -> None:
    spans = [Span(WINDOW + 2 * MIB - 4 * KIB, 6 * GIB + 4 * KIB, 64 * MIB)]  # incongruent: 4 KiB pages
    needed = build(lib, spans, CPU, capacity=64).pages
    assert needed > 8
    built = build(lib, spans, CPU, capacity=needed - 1, fill=0xA5)
    assert built.status == TOO_LARGE and built.counted == needed
    assert built.tables == bytes([0xA5]) * len(built.tables)
    assert build(lib, spans, CPU, capacity=needed).status == SUCCESS


# --- the request's address space -------------------------------------------------------------

def _request(mailbox: tuple[int, int], work: tuple[int, int], window: Sequence[tuple[int, int]]) -> bytes:
    return A.layout("OVMF_MH_REQUEST").pack(
        Signature=A.const("OVMF_MH_REQUEST_SIGNATURE"), Version=A.const("OVMF_MH_REQUEST_VERSION"),
        Size=A.layout("OVMF_MH_REQUEST").size, WindowRangeCount=len(window),
        MailboxBase=mailbox[0], MailboxSize=mailbox[1], WorkAreaBase=work[0], WorkAreaSize=work[1],
        WindowBase=[b for b, _ in window], WindowSize=[s for _, s in window],
    )


def helper_mappings(lib: ctypes.CDLL, blob: bytes, ram: Sequence[tuple[int, int]]) -> tuple[list[Span], int]:
    ranges = (ctypes.c_uint64 * (2 * len(ram)))(*[v for r in ram for v in r])
    request = ctypes.create_string_buffer(A.layout("OVMF_MH_REQUEST").size)
    usable = ctypes.c_int(0)
    status = lib.mh_validate_request(blob, ctypes.c_size_t(len(blob)), ranges, ctypes.c_size_t(len(ram)), request,
                                     ctypes.byref(usable))
    assert status == SUCCESS, f"request refused: {status:#x}"
    items = (Mapping * A.const("OVMF_MH_MAX_WINDOW_RANGES") * 2)()
    window = ctypes.c_uint64(0)
    count = lib.mh_helper_mappings(request, items, ctypes.byref(window))
    flat = ctypes.cast(items, ctypes.POINTER(Mapping))
    return [Span(flat[i].VirtualBase, flat[i].PhysicalBase, flat[i].Size, bool(flat[i].Attributes & PRIVATE))
            for i in range(count)], window.value


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("guest_gib", [1, 4, 16])
def test_request_address_space(lib: ctypes.CDLL, cpu: w.Cpu, guest_gib: int) -> None:
    """A q35 helper VM's request: the window's guest offsets appear in one
    virtual span over both RAM ranges; the mailbox alone is shared; the
    table count stays within the budget."""
    guest = guest_gib * GIB
    own = 128 * MIB
    below = min(own + guest, 2 * GIB)
    ram = [(0, below)] + ([(4 * GIB, own + guest - below)] if own + guest > below else [])
    window = [(own, below - own)] + ([(4 * GIB, own + guest - below)] if own + guest > below else [])
    work = (0x2800000, _page_up(lib.mh_work_area_size(guest)))
    spans, virtual = helper_mappings(lib, _request((0x1800000, 16 * MIB), work, window), ram)
    assert virtual == lib.mh_window_virtual_base() + own % GIB
    shared = [s for s in spans if not s.private]
    assert shared == [Span(0x1800000, 0x1800000, 16 * MIB, False)]
    guest_spans = [s for s in spans if s.virtual >= virtual]
    assert [(s.physical, s.size) for s in guest_spans] == window
    assert guest_spans[0].virtual == virtual and sum(s.size for s in guest_spans) == guest
    built = check(lib, spans, cpu)
    assert built.pages <= A.const("OVMF_MH_PAGE_TABLE_BUDGET")


def _page_up(size: int) -> int:
    return -(-size // w.PAGE) * w.PAGE


def test_random_requests_map_their_window_contiguously(lib: ctypes.CDLL) -> None:
    rng = random.Random(14)
    for _ in range(30):
        ram_end = rng.choice([2 * GIB, 3 * GIB])
        above = rng.randint(1, 40) * GIB + rng.randint(0, 511) * 2 * MIB
        ram = [(0, ram_end), (4 * GIB, above)]
        window: list[tuple[int, int]] = []
        work = _page_up(lib.mh_work_area_size(above + ram_end))
        cursor = 0x2800000 + work
        for _range in range(rng.randint(1, 4)):
            cursor += rng.randint(0, 4) * w.PAGE
            size = rng.randint(1, 2000) * w.PAGE
            if cursor + size > ram_end:
                break
            window.append((cursor, size))
            cursor += size
        base = 4 * GIB
        for _range in range(rng.randint(0, 3)):
            base += rng.choice([0, w.PAGE, 2 * MIB]) * rng.randint(0, 3)
            # Large ranges stay 2 MiB-congruent with the window (4 KiB pages
            # over gigabytes would only slow the walk down); small ones need not.
            size = rng.choice([w.PAGE, 2 * MIB, 64 * MIB]) * rng.randint(1, 3)
            if base + size > 4 * GIB + above:
                break
            window.append((base, size))
            base += size
        if not window:
            continue
        total = sum(size for _, size in window)
        assert lib.mh_work_area_size(total) <= work
        spans, virtual = helper_mappings(lib, _request((0x1800000, 16 * MIB), (0x2800000, work), window), ram)
        built = check(lib, spans, w.Cpu(46, 51, rng.random() < 0.5), rng)
        memory = w.Memory(built.tables, TABLES_PHYSICAL)
        offset = 0
        for physical, size in window:  # guest offset -> its physical page, through the window
            for probe in {0, size - w.PAGE}:
                assert w.translate(memory, built.cr3, w.Cpu(46, 51, True), virtual + offset + probe) == (
                    physical + probe, True)
            offset += size
