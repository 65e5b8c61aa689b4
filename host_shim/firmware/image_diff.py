"""Compare two firmware images byte for byte and say what each difference is.

A difference in the flash file is located in the innermost FFS file and
section that holds it (volume, file GUID and module name from its
USER_INTERFACE section, section type). When that section is LZMA-compressed,
the two decoded payloads are compared in turn, so a difference inside
FVMAIN_COMPACT is reported where it really is: in a module's PE32 image,
named down to the PE header field, the debug directory and its CodeView
record, or the PE section (.text, .data) and the bytes around it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pefile  # type: ignore[import-untyped]

from host_shim.firmware.inspect_image import (
    EFI_SECTION_GUID_DEFINED,
    EFI_SECTION_PE32,
    EFI_SECTION_TE,
    Layout,
    Span,
    image_layout,
)

#: Differing bytes closer than this are reported as one run.
MERGE_GAP = 16
#: Runs described per buffer; the rest are counted.
MAX_RUNS = 12

_SECTION_NAMES = {
    0x01: "compression",
    0x02: "GUID-defined",
    0x10: "PE32",
    0x11: "PIC",
    0x12: "TE",
    0x13: "DXE depex",
    0x14: "version",
    0x15: "user interface",
    0x17: "FV image",
    0x18: "freeform subtype GUID",
    0x19: "raw",
    0x1B: "PEI depex",
    0x1C: "MM depex",
}


@dataclass(frozen=True)
class Difference:
    """One run of differing bytes. ``offset`` is a file offset when ``path``
    is empty, else an offset in the decoded payload that ``path`` leads to."""

    offset: int
    length: int
    path: tuple[str, ...]  # outer containers first (e.g. "file ... > LZMA payload")
    what: str

    def describe(self) -> str:
        where = " > ".join(self.path) if self.path else "image file"
        return f"{where}: offset {self.offset:#x} (+{self.length} bytes): {self.what}"


def _runs(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """(start, length) of the differing stretches of two equally long buffers."""
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    if diff.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(diff) > MERGE_GAP)
    starts = np.concatenate(([diff[0]], diff[breaks + 1]))
    ends = np.concatenate((diff[breaks], [diff[-1]]))
    return [(int(s), int(e - s + 1)) for s, e in zip(starts, ends, strict=True)]


def _containing(layout: Layout, buffer: int, offset: int) -> list[tuple[int, Span]]:
    """Spans holding ``offset`` of ``buffer``, outermost first."""
    found = [(i, s) for i, s in enumerate(layout.spans) if s.buffer == buffer and s.start <= offset < s.end]
    return sorted(found, key=lambda item: (item[1].start, -item[1].end))


def _span_name(layout: Layout, span: Span) -> str:
    if span.kind == "file":
        name = layout.ui_names.get(span.file_guid)
        label = f" ({name})" if name else ""
        return f"FV#{span.volume} file {span.file_guid}{label}"
    return f"{_SECTION_NAMES.get(span.type, f'type {span.type:#x}')} section"


def _text(data: bytes, start: int, length: int) -> str:
    """The differing bytes with a little context, printable ASCII kept."""
    lo, hi = max(0, start - 8), min(len(data), start + min(length, 48) + 8)
    return "".join(chr(c) if 32 <= c < 127 else "." for c in data[lo:hi])


def _pe_field(image: bytes, offset: int, kind: int) -> str:
    """Name what lies at ``offset`` of a PE32 or TE image as stored in its section."""
    if kind == EFI_SECTION_TE:
        return f"TE image +{offset:#x}"
    try:
        pe = pefile.PE(data=image, fast_load=True)
    except pefile.PEFormatError:
        return f"PE32 image +{offset:#x} (unparsable)"
    coff = pe.FILE_HEADER.get_file_offset()
    if coff + 4 <= offset < coff + 8:
        return "PE TimeDateStamp"
    opt = pe.OPTIONAL_HEADER.get_file_offset()
    if opt <= offset < opt + pe.FILE_HEADER.SizeOfOptionalHeader:
        if offset - opt in (64, 65, 66, 67):
            return "PE optional header CheckSum"
        return f"PE optional header +{offset - opt:#x}"
    debug_dir = pe.OPTIONAL_HEADER.DATA_DIRECTORY[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]]
    if debug_dir.VirtualAddress and debug_dir.Size:
        dir_off = pe.get_offset_from_rva(debug_dir.VirtualAddress)
        entry = image[dir_off : dir_off + 28]
        if len(entry) == 28:
            _chars, _stamp, _major, _minor, dtype, size, _rva, raw = struct.unpack("<IIHHIIII", entry)
            if raw <= offset < raw + size:
                signature = image[raw : raw + 4].decode("ascii", "replace")
                return f"debug data type {dtype} ({signature} CodeView record: the image's build path)"
        if dir_off <= offset < dir_off + max(debug_dir.Size, 28):
            return "debug directory entry (its SizeOfData: the CodeView path's length)"
    for section in pe.sections:
        start = section.PointerToRawData
        if start <= offset < start + section.SizeOfRawData:
            name = section.Name.rstrip(b"\0").decode("ascii", "replace")
            return f"PE section {name} +{offset - start:#x}"
    return f"PE headers +{offset:#x}"


class _Comparer:
    def __init__(self, a: Layout, b: Layout) -> None:
        self.a, self.b = a, b
        self.out: list[Difference] = []

    def compare(self, buffer: int, path: tuple[str, ...]) -> None:
        data_a, data_b = self.a.buffers[buffer], self.b.buffers[buffer]
        if len(data_a) != len(data_b):
            self.out.append(
                Difference(0, 0, path, f"sizes differ: {len(data_a):#x} vs {len(data_b):#x} bytes")
            )
            return
        runs = _runs(data_a, data_b)
        for start, length in runs[:MAX_RUNS]:
            self.locate(buffer, start, length, path)
        if len(runs) > MAX_RUNS:
            rest = sum(length for _, length in runs[MAX_RUNS:])
            self.out.append(
                Difference(runs[MAX_RUNS][0], rest, path, f"{len(runs) - MAX_RUNS} more runs not described")
            )

    def locate(self, buffer: int, start: int, length: int, path: tuple[str, ...]) -> None:
        chain = _containing(self.a, buffer, start)
        names = tuple(_span_name(self.a, span) for _, span in chain)
        if not chain:
            self.out.append(Difference(start, length, path, "outside every FFS file (volume header or padding)"))
            return
        index, inner = chain[-1]
        decoded = [k for k, src in self.a.buffer_source.items() if src == index]
        if inner.type == EFI_SECTION_GUID_DEFINED and inner.kind == "section" and decoded:
            other = {src: k for k, src in self.b.buffer_source.items()}
            if decoded[0] != other.get(index):
                self.out.append(
                    Difference(start, length, (*path, *names), "compressed payloads do not line up (layouts differ)")
                )
                return
            self.compare(decoded[0], (*path, *names, f"LZMA payload #{decoded[0]}"))
            return
        what = f"bytes differ: '{_text(self.a.buffers[buffer], start, length)}'"
        if inner.kind == "section" and inner.type in (EFI_SECTION_PE32, EFI_SECTION_TE):
            header = 8 if self.a.buffers[buffer][inner.start : inner.start + 3] == b"\xff\xff\xff" else 4
            image = self.a.buffers[buffer][inner.start + header : inner.end]
            at = start - inner.start - header
            field = "section header (the section's size)" if at < 0 else _pe_field(image, at, inner.type)
            what = f"{field}; {what}"
        self.out.append(Difference(start, length, (*path, *names), what))


def compare_bytes(a: bytes, b: bytes, name_a: str = "a", name_b: str = "b") -> list[Difference]:
    """Every differing run of two images, located; empty when identical."""
    if a == b:
        return []
    layout_a = image_layout(a, name_a)
    layout_b = image_layout(b, name_b)
    comparer = _Comparer(layout_a, layout_b)
    comparer.compare(0, ())
    return comparer.out


def compare_images(a: Path, b: Path) -> list[Difference]:
    return compare_bytes(a.read_bytes(), b.read_bytes(), str(a), str(b))
