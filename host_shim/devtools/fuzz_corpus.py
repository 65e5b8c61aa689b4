"""Seed corpora and the dictionary for the libFuzzer harnesses (tests/c/fuzz).

Everything is generated, nothing is typed in by hand:

* ``stream`` seeds are real streams: the reference helper (helper/reference.py)
  exports pages under the harnesses' fixed key, exactly as ``ovmf-mh export``
  drives a helper, and the reference helper imports each one back before it
  is kept (so every seed is a stream the firmware must accept).
* ``mailbox`` seeds encode command sequences (FuzzMailbox.c's input format)
  that the reference helper served successfully on the harness's own window:
  export sessions with and without TRACK_PAGES and CHECK_PAGES, the stream
  forwarded to the target and imported, replays, resets, tampering, and a
  commit whose proof goes back to the source (EXPORT_VERIFY_COMMIT, as it
  is and with a byte flipped).
* ``request`` seeds are the fw_cfg requests helper VMs get
  (host_shim/helpers/helper_vm.py through host_shim/helpers/request.py) with e820 tables as
  QEMU builds them for those VMs.
* The dictionary holds the ABI's magic values, command codes, record types
  and sizes, taken from HelperAbi.h through helper/abi.py.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from helper import abi
from helper import commit_proof as cp
from helper import stream as s
from helper.reference import CMD, STATUS, ReferenceHelper
from host_shim.helpers.helper_vm import DEFAULT_MAILBOX_SIZE, DEFAULT_OWN_RAM
from host_shim.helpers.keys import secret_record
from host_shim.helpers.request import HELPER_RAM_BELOW_4G, HelperRequest, window_ranges, work_area_size

PAGE = 4096
#: The harnesses' fixed transport key (FUZZ_KEY_BYTE in FuzzCommon.h).
FUZZ_KEY = bytes(range(32))
#: FuzzMailbox.c's helpers.
MAILBOX_WINDOW_PAGES = 8
MAILBOX_DATA_SIZE = 32 * 1024
#: FuzzStream.c's helper.
STREAM_WINDOW_PAGES = 16
#: Stream header and END record sizes, from HelperAbi.h.
HEADER = s.STREAM_HEADER_SIZE
END = s.END_RECORD_SIZE
BOUND = abi.load().const("OVMF_MH_EXPORT_BOUND")
E820_RAM = 1
E820_RESERVED = 2


def mailbox_pattern() -> bytes:
    """The source window FuzzMailbox.c starts every input with (mPattern)."""
    out = bytearray(MAILBOX_WINDOW_PAGES * PAGE)
    for index in range(len(out)):
        if (index // PAGE) % 4:
            out[index] = (index * 131 + (index >> 12) * 7 + 1) & 0xFF
    return bytes(out)


def _salts() -> Iterator[bytes]:
    counter = 0
    while True:
        counter += 1
        yield counter.to_bytes(4, "little") * 8


def _helper(window: bytearray, data: bytearray, keyed: bool = True) -> ReferenceHelper:
    salts = _salts()
    secret = bytearray(secret_record(FUZZ_KEY)) if keyed else None
    return ReferenceHelper(window, data, secret, salt_source=lambda size: next(salts)[:size])


def _call(helper: ReferenceHelper, command: str, *args: int) -> tuple[int, ...]:
    status, results = helper.dispatch(CMD[command], [*args, *[0] * (6 - len(args))])
    if status != STATUS["SUCCESS"]:
        raise RuntimeError(f"reference helper refused {command}{args}: status {status:#x}")
    return results


def export_stream(window: bytes, pages: list[int], tracked: bool = False,
                  zero_ranges: Sequence[tuple[int, int]] = ()) -> bytes:
    """A real stream of ``pages`` (page numbers) of ``window``, sealed under
    FUZZ_KEY; first, ``zero_ranges`` ((first page, count), all zero in
    ``window``) as ZERO_RANGE records (EXPORT_ZERO_RANGES)."""
    data = bytearray(len(pages) * (PAGE + 56) + len(zero_ranges) * (s.ZERO_RANGE_RECORD_SIZE + 16) + 4096)
    helper = _helper(bytearray(window), data)
    # Shard 0 of 1, unbound; the migration id is the data area's first 32 bytes (zero).
    header = _call(helper, "EXPORT_BEGIN", 0, HEADER, 1 if tracked else 0, 0, 0, 1)[0]
    stream = bytes(data[:header])
    if zero_ranges:
        flat = [v for first, count in zero_ranges for v in (first * PAGE, count)]
        struct.pack_into(f"<{len(flat)}Q", data, 0, *flat)
        out = len(flat) * 8
        written = _call(helper, "EXPORT_ZERO_RANGES", 0, len(zero_ranges), out, len(data) - out)[0]
        stream += bytes(data[out : out + written])
    struct.pack_into(f"<{len(pages)}Q", data, 0, *(p * PAGE for p in pages))
    out = len(pages) * 8
    written = _call(helper, "EXPORT_BATCH", 0, len(pages), out, len(data) - out)[0]
    stream += bytes(data[out : out + written])
    end = _call(helper, "EXPORT_END", 0, END)[0]
    stream += bytes(data[:end])
    _verify(stream, len(window))
    return stream


def _verify(stream: bytes, window_size: int) -> None:
    """Import the stream with the reference helper: every seed must verify."""
    data = bytearray(stream)
    helper = _helper(bytearray(window_size), data)
    _call(helper, "IMPORT_BEGIN", 0, HEADER, 0, 1)
    _call(helper, "IMPORT_BATCH", HEADER, len(stream) - HEADER - END)
    _call(helper, "IMPORT_END", len(stream) - END, END)


# --- FuzzMailbox.c input encoding -------------------------------------------


def _arg(value: int) -> bytes:
    if value < 32:
        return bytes([value])
    if value < 0x10000:
        return bytes([0x20]) + struct.pack("<H", value)
    return bytes([0x80]) + struct.pack("<Q", value)


#: FuzzMailbox.c's opcode that takes the command code from the next 4 bytes
#: (codes 11 and up share the opcode space with the harness's own operations).
RAW_COMMAND = 11


def _cmd(helper: int, command: str, *args: int) -> bytes:
    padded = [*args, *[0] * (abi.load().const("OVMF_MH_ARG_COUNT") - len(args))]
    code = CMD[command]
    op = bytes([helper << 7 | code]) if code < RAW_COMMAND else bytes([helper << 7 | RAW_COMMAND]) + struct.pack(
        "<I", code
    )
    return op + b"".join(_arg(a) for a in padded)


def _page_list(helper: int, offset: int, pages: list[int]) -> bytes:
    return bytes([helper << 7 | 13]) + struct.pack("<HB", offset, len(pages)) + bytes(pages)


def _forward(from_helper: int, source: int, target: int, length: int) -> bytes:
    return bytes([from_helper << 7 | 14]) + struct.pack("<HHH", source, target, length)


def _poke(helper: int, page: int, offset: int, value: int) -> bytes:
    return bytes([helper << 7 | 15, page]) + struct.pack("<HB", offset, value)


def _write(helper: int, offset: int, payload: bytes) -> bytes:
    return bytes([helper << 7 | 12]) + struct.pack("<HB", offset, len(payload)) + payload


def mailbox_sequence(pages: list[int], tracked: bool, tail: str) -> bytes:
    """Export ``pages`` on the source, forward the stream, import it on the
    target; ``tail`` adds a variant (see :func:`mailbox_seeds`). The sizes
    come from the reference helper serving the same sequence."""
    window = bytearray(mailbox_pattern())
    data = bytearray(MAILBOX_DATA_SIZE)
    source = _helper(window, data)
    list_at, out_at, check_at, end_at, bind_at, receipt_at = 0x0, 0x100, 0x7000, 0x7200, 0x7400, 0x7500
    shared_at = 0x7800
    proof_at = 0x7600  # the proof, then the receipt: up to 0x76E8
    seq = bytes([0])
    flags = 1 if tracked else 0
    if tail == "bound":
        # The target's challenge travels to the source, which binds the stream to it.
        seq += _cmd(1, "IMPORT_CHALLENGE", bind_at, s.CHALLENGE_SIZE)
        seq += _forward(1, bind_at, bind_at, s.CHALLENGE_SIZE)
        flags |= BOUND
    seq += _cmd(0, "EXPORT_BEGIN", 0, HEADER, flags, bind_at, 0, 1)
    _call(source, "EXPORT_BEGIN", 0, HEADER, flags, bind_at, 0, 1)
    seq += _forward(0, 0, 0, HEADER)
    seq += _page_list(0, list_at, pages)
    struct.pack_into(f"<{len(pages)}Q", data, list_at, *(p * PAGE for p in pages))
    capacity = len(pages) * (PAGE + 56)
    seq += _cmd(0, "EXPORT_BATCH", list_at, len(pages), out_at, capacity)
    written = _call(source, "EXPORT_BATCH", list_at, len(pages), out_at, capacity)[0]
    if tracked:
        seq += _cmd(0, "CHECK_PAGES", list_at, len(pages), check_at)
        _call(source, "CHECK_PAGES", list_at, len(pages), check_at)
        if tail == "changed":
            seq += _poke(0, pages[0], 100, 0x77) + _cmd(0, "CHECK_PAGES", list_at, len(pages), check_at)
    seq += _forward(0, out_at, HEADER, written)
    if tail in ("shared", "shared-lie"):
        # The source host's digest of one shared page (any 32 bytes), sealed
        # by EXPORT_END; the target host hands the same (or, lying, none).
        seq += _write(0, shared_at, bytes(range(0x40, 0x40 + s.DIGEST_SIZE)))
        seq += _cmd(0, "EXPORT_END", end_at, END, shared_at, 1)
        seq += _forward(0, shared_at, shared_at, s.DIGEST_SIZE)
    else:
        seq += _cmd(0, "EXPORT_END", end_at, END)
    seq += _forward(0, end_at, HEADER + written, END)
    if tail == "tamper":
        seq += _write(1, HEADER + 40 + 7, b"\x01")
    seq += _cmd(1, "IMPORT_BEGIN", 0, HEADER, 0, 1)
    seq += _cmd(1, "IMPORT_BATCH", HEADER, written)
    if tail == "reset":
        seq += _cmd(1, "RESET")
    if tail == "shared":
        seq += _cmd(1, "IMPORT_END", HEADER + written, END, shared_at, 1)
    else:
        seq += _cmd(1, "IMPORT_END", HEADER + written, END)
    if tail in ("bound", "commit", "shared", "proof", "proof-forged"):
        seq += _cmd(1, "IMPORT_RECEIPT", receipt_at, s.RECEIPT_SIZE)
        seq += _cmd(1, "IMPORT_COMMIT", receipt_at, s.RECEIPT_SIZE)
    if tail in ("proof", "proof-forged"):
        # Target helper 0's commit proof and the receipt it covers travel
        # back to the source, which checks them against what it exported.
        seq += _cmd(1, "IMPORT_COMMIT_PROOF", proof_at, cp.PROOF_SIZE)
        seq += _forward(1, proof_at, proof_at, cp.PROOF_SIZE)
        seq += _forward(1, receipt_at, proof_at + cp.PROOF_SIZE, s.RECEIPT_SIZE)
        if tail == "proof-forged":
            seq += _write(0, proof_at + cp.PROOF_MAC_OFFSET, b"\x00")
        seq += _cmd(0, "EXPORT_VERIFY_COMMIT", proof_at, cp.PROOF_SIZE + s.RECEIPT_SIZE)
    if tail == "replay":
        seq += _cmd(1, "IMPORT_BEGIN", 0, HEADER, 0, 1) + _cmd(1, "IMPORT_BATCH", HEADER, written)
    seq += _cmd(1, "QUERY") + _cmd(0, "QUERY")
    return seq


def mailbox_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for pages in ([1], [0, 1, 2], [3, 4, 5, 6, 7]):
        for tracked in (False, True):
            for tail in ("", "changed", "tamper", "reset", "replay", "bound", "commit", "shared", "shared-lie",
                         "proof", "proof-forged"):
                if tail == "changed" and not tracked:
                    continue
                name = f"seq-{len(pages)}p-{'tracked' if tracked else 'plain'}-{tail or 'clean'}"
                seeds[name] = mailbox_sequence(pages, tracked, tail)
    seeds["hostile-commands"] = (
        bytes([2])
        + _cmd(1, "IMPORT_BATCH", 0, 0xFFFF)
        + _cmd(0, "EXPORT_BATCH", 0, 513, 0, 0)
        + _cmd(0, "EXPORT_BEGIN", MAILBOX_DATA_SIZE - 8, HEADER)
        + _cmd(0, "EXPORT_BEGIN", 0, HEADER, 4, 0, 0, 1)
        + _cmd(1, "IMPORT_COMMIT", 0, s.RECEIPT_SIZE)
        + _cmd(1, "IMPORT_COMMIT_PROOF", 0, cp.PROOF_SIZE)
        + _cmd(0, "EXPORT_VERIFY_COMMIT", 0, cp.PROOF_SIZE + s.RECEIPT_SIZE)
        + _cmd(0, "SHUTDOWN")
        + _cmd(0, "QUERY")
    )
    seeds["no-key-target"] = (
        bytes([1]) + _cmd(1, "IMPORT_BEGIN", 0, HEADER, 0, 1) + _cmd(1, "EXPORT_BEGIN", 0, HEADER, 0, 0, 0, 1)
    )
    return seeds


def stream_window() -> bytes:
    """The source window the stream seeds are exported from: every third page zero."""
    window = bytearray(STREAM_WINDOW_PAGES * PAGE)
    for page in range(STREAM_WINDOW_PAGES):
        if page % 3:
            window[page * PAGE : (page + 1) * PAGE] = bytes([(page * 29 + i) & 0xFF for i in range(PAGE)])
    return bytes(window)


def stream_seeds() -> dict[str, bytes]:
    window = stream_window()
    seeds: dict[str, bytes] = {}
    for pages in ([0], [1, 2, 3], [5, 0, 9, 4, 14, 15, 1, 2]):
        stream = export_stream(window, pages)
        for control in (0x00, 0x01, 0x02, 0x08, 0x10, 0x20):
            seeds[f"stream-{len(pages)}p-c{control:02x}"] = bytes([control]) + stream
    # Zero ranges (ABI 2.1): runs of never-written pages, then pages, some of
    # them inside a range sent before (a later pass).
    sparse = bytearray(window)
    for first, count in ZERO_RANGE_SEED:
        sparse[first * PAGE : (first + count) * PAGE] = bytes(count * PAGE)
    stream = export_stream(bytes(sparse), [1, 2, 8, 10, 11], zero_ranges=ZERO_RANGE_SEED)
    for control in (0x00, 0x01, 0x03, 0x08, 0x10, 0x20):
        seeds[f"stream-zr-c{control:02x}"] = bytes([control]) + stream
    return seeds


#: The zero ranges of the stream seeds: (first page, pages) in FuzzStream.c's 16-page window.
ZERO_RANGE_SEED = [(3, 5), (12, 4), (0, 1)]


def request_seeds() -> dict[str, bytes]:
    mib = 1024 * 1024
    gib = 1024 * mib

    def e820(*entries: tuple[int, int, int]) -> bytes:
        return b"".join(struct.pack("<QQI", base, size, kind) for base, size, kind in entries)

    reserved = (0xFEFFC000, 0x4000, E820_RESERVED)
    mailbox = abi.load().const("OVMF_MH_MAILBOX_MIN_BASE")
    work = mailbox + DEFAULT_MAILBOX_SIZE
    seeds: dict[str, bytes] = {}
    for window in (0, 16 * mib, 256 * mib, 4 * gib):
        own = max(DEFAULT_OWN_RAM, work + work_area_size(window))
        ram = own + window
        request = HelperRequest(
            mailbox_base=mailbox,
            mailbox_size=DEFAULT_MAILBOX_SIZE,
            work_area_base=work,
            work_area_size=work_area_size(window),
            window=window_ranges(own, window, ram) if window else (),
        ).encode()
        low = min(ram, HELPER_RAM_BELOW_4G)
        split = ((0, low, E820_RAM),) + (((4 * gib, ram - low, E820_RAM),) if ram > low else ())
        seeds[f"request-window-{window // mib}m"] = bytes([0, 0]) + request + e820(*split, reserved)
        seeds[f"request-window-{window // mib}m-nodes"] = (
            bytes([0, 0]) + request + e820((0, own, E820_RAM), *((own, low - own, E820_RAM),) if window else (),
                                           *split[1:])
        )
    bad = HelperRequest(mailbox_base=0x1800800, mailbox_size=DEFAULT_MAILBOX_SIZE, work_area_base=work,
                        work_area_size=work_area_size(0)).encode()
    seeds["request-misaligned"] = bytes([0, 0]) + bad + e820((0, DEFAULT_OWN_RAM, E820_RAM))
    seeds["request-short-blob"] = bytes([0xF0, 40]) + bad[:40] + e820((0, DEFAULT_OWN_RAM, E820_RAM))
    version1 = struct.pack("<IHHIIQQQQ", abi.load().const("OVMF_MH_REQUEST_SIGNATURE"), 1, 48, 0, 0, mailbox,
                           DEFAULT_MAILBOX_SIZE, DEFAULT_OWN_RAM, 16 * mib)
    seeds["request-version-1"] = bytes([0xF0, 48]) + version1 + e820((0, DEFAULT_OWN_RAM + 16 * mib, E820_RAM))
    return seeds


def page_table_seeds() -> dict[str, bytes]:
    """Mapping lists for FuzzPageTables.c: the address spaces of q35 helper
    VMs (tests/c/fuzz/FuzzPageTables.c documents the encoding)."""
    mib = 1024 * 1024
    gib = 1024 * mib
    page = 4096

    def raw(*spans: tuple[int, int, int, int]) -> bytes:
        return b"".join(struct.pack("<QQQB", v, p, s, a) for v, p, s, a in spans)

    def helper_space(guest: int) -> list[tuple[int, int, int, int]]:
        own = max(DEFAULT_OWN_RAM, 0x2800000 + work_area_size(guest))
        spans = [(0x800000, 0x800000, 0x1000000, 1), (0x1800000, 0x1800000, DEFAULT_MAILBOX_SIZE, 0),
                 (0x2800000, 0x2800000, work_area_size(guest), 1)]
        spans.append((0xFF000000, 0xFF000000, 0x1000000, 1))
        virtual = (1 << 40) + own % gib
        for base, size in window_ranges(own, guest, own + guest):
            spans.append((virtual, base, size, 1))
            virtual += size
        return spans

    seeds: dict[str, bytes] = {}
    for guest in (256 * mib, 4 * gib, 16 * gib):
        for flags, label in ((0x1, "1g"), (0x0, "2m"), (0x3 | 0x8, "cbit47-1g"), (0x4 | 0x8, "cbit51-2m")):
            seeds[f"page-tables-q35-{guest // mib}m-{label}"] = (
                bytes([flags | 0x8, 46, 64]) + raw(*helper_space(guest)))
    # Compact: a 4 KiB-unit span straddling 2 MiB, a 2 MiB-unit one, a 1 GiB-unit one.
    compact = struct.pack("<IIIB", 0x1FF, 0x1FF, 4, 0) + struct.pack("<IIIB", 0x200, 0x400, 3, 2 | 1)
    compact += struct.pack("<IIIB", 0x40000, 0x40000, 2, 4 | 1)
    seeds["page-tables-compact"] = bytes([0x1, 46, 16]) + compact
    seeds["page-tables-too-small"] = bytes([0x0, 46, 2]) + compact
    seeds["page-tables-overlap"] = bytes([0x9, 46, 8]) + raw((1 << 40, 0, 2 * page, 1), (1 << 40 | page, gib, page, 0))
    return seeds


SEEDS = {"mailbox": mailbox_seeds, "stream": stream_seeds, "request": request_seeds,
         "page-tables": page_table_seeds}


def write_seeds(target: str, directory: Path) -> int:
    """Write the seeds of one harness into ``directory``; return how many."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[target]()
    for name, blob in seeds.items():
        (directory / name).write_bytes(blob)
    return len(seeds)


def dictionary() -> str:
    """A libFuzzer dictionary of the ABI's magic values, codes and sizes."""
    a = abi.load()
    entries: dict[str, bytes] = {}

    def add(name: str, value: int, width: int) -> None:
        entries[f"{name.lower()}_{width}"] = value.to_bytes(width, "little")

    for name, value in sorted(a.constants.items()):
        short = name.removeprefix("OVMF_MH_")
        if short.endswith(("SIGNATURE", "MAGIC")) or short.startswith("IMAGE_INFO_SIGNATURE"):
            width = 8 if value > 0xFFFFFFFF else 4
            add(short, value, width)
        elif short.startswith(("CMD_", "RECORD_", "STREAM_VERSION", "EXPORT_", "STATUS_", "COMMIT_OUTCOME_")):
            add(short, value, 4)
        elif short.startswith(("MAX_BATCH", "MAX_ZERO_RANGES", "SHARD_BLOCK_PAGES", "PAGE_SIZE", "MAILBOX_MIN",
                               "MAILBOX_MAX", "ADDRESS_LIMIT",
                               "PRIVATE_", "SECRET_PAGE")):
            add(short, value, 8)
    for name in ("OVMF_MH_STREAM_HEADER", "OVMF_MH_RECORD_HEADER", "OVMF_MH_REQUEST", "OVMF_MH_ZERO_RANGE_PAYLOAD",
                 "OVMF_MH_RECEIPT", "OVMF_MH_COMMIT_PROOF"):
        add(name.removeprefix("OVMF_MH_") + "_SIZE", a.layout(name).size, 4)
    lines = [key + '="' + "".join(f"\\x{b:02x}" for b in blob) + '"' for key, blob in entries.items()]
    return "# generated from HelperAbi.h by host_shim/devtools/fuzz_corpus.py\n" + "\n".join(lines) + "\n"
