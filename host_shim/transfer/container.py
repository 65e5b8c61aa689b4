"""The transfer container: how the host carries one or more helper streams
(one per helper, "shards") plus plain shared pages in one file or TCP stream.

The container is host framing only. Everything confidential inside it is a
helper stream (docs/stream-format.md), authenticated end to end by the
helpers; the container adds no secrecy and is parsed as hostile input:
every length is bounded before anything is allocated. Layout
(little endian), see docs/transfer-format.md:

    file header (32 bytes)
    frame*        frame header (16 bytes: kind u32, shard u32, length u64) + payload
    DONE frame    totals, checked by the receiver
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol

import numpy as np
import numpy.typing as npt

from helper import abi
from helper import stream as s
from host_shim.errors import OvmfMhError

MAGIC = b"OMHXFER1"
#: 2 (ABI 4.0): PLAIN_PAGE frames travel in their page's shard, whose END
#: record seals them; a version-1 container cannot prove its shared pages.
VERSION = 2
FILE_HEADER = struct.Struct("<8sHHIQII")  # magic, version, header size, flags, guest size, shards, reserved
FRAME_HEADER = struct.Struct("<IIQ")  # kind, shard, payload length
PLAIN_PAGE = struct.Struct("<Q")  # guest offset, then the page

KIND_STREAM_HEADER = 1
KIND_RECORDS = 2
KIND_STREAM_END = 3
KIND_PLAIN_PAGE = 4
KIND_DONE = 5
#: Nothing: a live migration's source says it is still there while its
#: helpers work on something that puts nothing on the stream (a check of
#: every page, a run of zero ranges). Empty, shard 0; the reader skips it.
KIND_KEEPALIVE = 6

KIND_NAMES = {
    KIND_STREAM_HEADER: "STREAM_HEADER",
    KIND_RECORDS: "RECORDS",
    KIND_STREAM_END: "STREAM_END",
    KIND_PLAIN_PAGE: "PLAIN_PAGE",
    KIND_DONE: "DONE",
    KIND_KEEPALIVE: "KEEPALIVE",
}

MAX_SHARDS = 64
#: The largest guest a transfer carries: 64 TiB. The receiver creates a
#: sparse target file of the header's guest size and maps it whole before
#: anything is verified, so the bound must fit the address space of a
#: process (128 TiB on x86-64) with room to spare, far below off_t's 2^63.
MAX_GUEST_SIZE = 1 << 46


class ContainerError(OvmfMhError):
    """The transfer stream is malformed, truncated or inconsistent."""


def _limits() -> dict[int, tuple[int, int]]:
    """(minimum, maximum) payload length per frame kind."""
    a = abi.load()
    page = a.const("OVMF_MH_PAGE_SIZE")
    header = a.layout("OVMF_MH_STREAM_HEADER").size
    record = a.layout("OVMF_MH_RECORD_HEADER").size
    tag = a.const("OVMF_MH_TAG_SIZE")
    end = record + a.layout("OVMF_MH_END_PAYLOAD").size + tag
    batch = a.const("OVMF_MH_MAX_BATCH_PAGES") * (record + page + tag)
    return {
        KIND_STREAM_HEADER: (header, header),
        # At least one record: the exporter never writes an empty batch, and
        # an empty frame would cost the receiver a helper call for nothing.
        KIND_RECORDS: (record + tag, batch),
        KIND_STREAM_END: (end, end),
        KIND_PLAIN_PAGE: (PLAIN_PAGE.size + page, PLAIN_PAGE.size + page),
        KIND_DONE: (2, 4096),
        KIND_KEEPALIVE: (0, 0),
    }


@dataclass(frozen=True)
class FileHeader:
    guest_size: int
    shards: int

    def encode(self) -> bytes:
        return FILE_HEADER.pack(MAGIC, VERSION, FILE_HEADER.size, 0, self.guest_size, self.shards, 0)


@dataclass(frozen=True)
class Frame:
    kind: int
    shard: int
    payload: bytes | memoryview

    def encode(self) -> bytes:
        return FRAME_HEADER.pack(self.kind, self.shard, len(self.payload)) + bytes(self.payload)


@dataclass
class Totals:
    """What the DONE frame promises; the receiver recounts and compares."""

    private_pages: int = 0
    shared_pages: int = 0
    excluded_pages: int = 0
    zero_pages: int = 0
    plain_digest: str = ""
    #: Private pages that went as ZERO_RANGE records (ABI 2.1); checked. Absent
    #: in streams written before, which hold no such records: 0.
    zero_range_pages: int = 0

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Totals:
        """Parse a DONE frame strictly (docs/transfer-format.md, "DONE frame"):
        one flat JSON object, each key once, exactly the known keys
        (``zero_range_pages`` optional), counts JSON integers 0..2^63-1,
        the digest 64 lower-case hex digits."""
        fields = _done_fields(payload)
        missing = sorted(DONE_COUNTS - {"zero_range_pages"} - fields.keys() | {"plain_digest"} - fields.keys())
        if missing:
            raise ContainerError(f"malformed DONE frame: missing {', '.join(missing)}")
        unknown = sorted(fields.keys() - DONE_COUNTS - {"plain_digest"})
        if unknown:
            raise ContainerError(f"malformed DONE frame: unknown key(s) {', '.join(unknown)}")
        counts: dict[str, int] = {}
        for name in DONE_COUNTS:
            value = fields.get(name, 0)
            if type(value) is not int or not 0 <= value < 1 << 63:
                raise ContainerError(f"malformed DONE frame: {name} must be an integer from 0 to 2^63-1, "
                                     f"not {json.dumps(value)[:40]}")
            counts[name] = value
        digest = fields["plain_digest"]
        if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
            raise ContainerError(f"malformed DONE frame: plain_digest must be 64 lower-case hex digits, "
                                 f"not {json.dumps(digest)[:80]}")
        return cls(plain_digest=digest, **counts)


#: The counts of a DONE frame; ``zero_range_pages`` may be absent (before ABI 2.1).
DONE_COUNTS = frozenset({"private_pages", "shared_pages", "excluded_pages", "zero_pages", "zero_range_pages"})
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def _refuse_float(text: str) -> object:
    raise ContainerError(f"malformed DONE frame: {text[:40]} is not an integer")


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name, value in pairs:
        if name in fields:
            raise ContainerError(f"malformed DONE frame: key {name[:40]!r} appears twice")
        fields[name] = value
    return fields


def _done_fields(payload: bytes) -> dict[str, object]:
    """The DONE frame's one flat JSON object. Its values are integers and a
    hex string, so a second '{' or any '[' is malformed: refused before the
    parser (whose recursion a deep nest would exhaust) sees it."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ContainerError("malformed DONE frame: not UTF-8") from None
    if text.count("{") > 1 or "[" in text:
        raise ContainerError("malformed DONE frame: not one flat JSON object (nested '{' or '[')")
    try:
        fields = json.loads(text, object_pairs_hook=_unique, parse_float=_refuse_float,
                            parse_constant=_refuse_float)
    except ValueError as exc:
        raise ContainerError(f"malformed DONE frame: {exc}") from None
    if not isinstance(fields, dict):
        raise ContainerError("malformed DONE frame: not a JSON object")
    return fields


class PlainDigest:
    """SHA-256 over all plain pages in stream order (offset, then content),
    DONE's ``plain_digest``: unkeyed, a consistency check of the container
    only. What authenticates shared pages is each shard's digest, sealed by
    its source helper in the END record (PlainPageChecker, IMPORT_END)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, payload: bytes | memoryview) -> None:
        self._hash.update(payload)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


#: The clear fields of a PAGE record, for reading a whole RECORDS frame of them at once.
_PAGE_RECORDS = np.dtype({"names": ["type", "size", "offset"], "formats": ["<u4", "<u4", "<u8"],
                          "offsets": [0, 4, 16], "itemsize": s.PAGE_RECORD_SIZE})
_RECORD_PREFIX = struct.Struct("<IIQQ")  # Type, PayloadSize, Sequence, GuestOffset


def record_offsets(payload: bytes | memoryview) -> npt.NDArray[np.uint64]:
    """The GuestOffset fields (clear, not yet authenticated) of the records in
    a RECORDS frame whose 40-byte header is whole, up to the first header of
    an unknown type or size (its helper refuses the frame anyway). A
    ZERO_RANGE record names its first page only: its PageCount is encrypted."""
    view = memoryview(payload).cast("B")
    if len(view) % s.PAGE_RECORD_SIZE == 0:
        # The common case, a batch of PAGE records: no Python work per record.
        fields = np.frombuffer(view, dtype=_PAGE_RECORDS)
        if bool(np.all(fields["type"] == s.RECORD_PAGE)) and bool(np.all(fields["size"] == s.PAGE_SIZE)):
            return fields["offset"].astype(np.uint64)
    offsets = []
    at = 0
    while len(view) - at >= s.RECORD_HEADER_SIZE:
        kind, size, _, offset = _RECORD_PREFIX.unpack_from(view, at)
        if s.PAYLOAD_SIZES.get(kind) != size or kind == s.RECORD_END:
            break
        offsets.append(offset)
        at += s.RECORD_HEADER_SIZE + size + s.TAG_SIZE
    return np.array(offsets, dtype=np.uint64)


class PlainPageChecker:
    """What the receiver checks of PLAIN_PAGE frames before it writes one
    (docs/transfer-format.md): the page lies in the guest and in the frame's
    shard, that shard's STREAM_END has not come yet, and no helper record of
    this stream named the page (a private page). It keeps each shard's
    count and digest of its shared pages (helper.stream.SharedPages) for
    IMPORT_END, where the target helper compares them with what the source
    helper sealed: the check that decides."""

    def __init__(self, header: FileHeader) -> None:
        a = abi.load()
        self._page = a.const("OVMF_MH_PAGE_SIZE")
        self._header = header
        self._shared = [s.SharedPages() for _ in range(header.shards)]
        self._ended = [False] * header.shards
        self._private = np.zeros(header.guest_size // self._page, dtype=np.bool_)

    def accept(self, frame: Frame) -> int:
        """Check a PLAIN_PAGE frame and count it in its shard; return its guest offset."""
        offset = int(PLAIN_PAGE.unpack_from(frame.payload)[0])
        if offset % self._page or offset + self._page > self._header.guest_size:
            raise ContainerError(f"plain page at offset {offset:#x} outside the guest")
        number = offset // self._page
        owner = s.shard_of_page(number, self._header.shards)
        if frame.shard != owner:
            raise ContainerError(f"plain page at offset {offset:#x} in a frame of shard {frame.shard}; "
                                 f"the page belongs to shard {owner}")
        if self._ended[frame.shard]:
            raise ContainerError(f"plain page at offset {offset:#x} after the end record of shard {frame.shard}")
        if self._private[number]:
            raise ContainerError(f"plain page at offset {offset:#x}: a helper record of this stream carried "
                                 "that page (a private page)")
        self._shared[frame.shard].update(frame.payload)
        return offset

    def records(self, frame: Frame) -> None:
        """Remember the pages a RECORDS frame names (clear headers)."""
        numbers = record_offsets(frame.payload) // np.uint64(self._page)
        self._private[numbers[numbers < np.uint64(len(self._private))].astype(np.int64)] = True

    def end(self, shard: int) -> tuple[int, bytes]:
        """The shard's STREAM_END arrived: no plain page for it after this;
        its shared pages' (count, digest), for IMPORT_END."""
        self._ended[shard] = True
        return self._shared[shard].count, self._shared[shard].digest()


class Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


def read_exact(source: Reader | IO[bytes], size: int, what: str) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = source.read(remaining)
        if not chunk:
            raise ContainerError(f"stream truncated inside {what} ({size - remaining} of {size} bytes)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_file_header(source: Reader | IO[bytes]) -> FileHeader:
    raw = read_exact(source, FILE_HEADER.size, "the file header")
    magic, version, size, flags, guest_size, shards, reserved = FILE_HEADER.unpack(raw)
    if magic != MAGIC:
        raise ContainerError("not an ovmf-mh transfer stream (bad magic)")
    if version == 1:
        raise ContainerError("transfer stream version 1 (before ABI 4.0): its shared pages are not sealed by the "
                             f"helpers and its helper streams are version 2; this receiver needs version {VERSION}: "
                             "export it again")
    if version != VERSION:
        raise ContainerError(f"unsupported transfer stream version {version} (this receiver reads version {VERSION})")
    if size != FILE_HEADER.size:
        raise ContainerError(f"file header: header size field is {size}, must be {FILE_HEADER.size}")
    if flags:
        raise ContainerError(f"file header: flags field (offset 12) is {flags:#x}, must be 0")
    if reserved:
        raise ContainerError(f"file header: reserved field (offset 28) is {reserved:#x}, must be 0")
    page = abi.load().const("OVMF_MH_PAGE_SIZE")
    if guest_size == 0 or guest_size % page:
        raise ContainerError(f"guest size {guest_size} is not a positive multiple of the page size")
    if guest_size > MAX_GUEST_SIZE:
        raise ContainerError(f"file header: guest size {guest_size} bytes is above the maximum of "
                             f"{MAX_GUEST_SIZE} bytes ({MAX_GUEST_SIZE >> 40} TiB) a transfer carries")
    if not 1 <= shards <= MAX_SHARDS:
        raise ContainerError(f"file header: {shards} shards; at most {MAX_SHARDS}")
    return FileHeader(guest_size, shards)


def describe_mismatch(got: FileHeader, expected: FileHeader) -> str:
    """Which field of a file header differs from the one expected, with both values."""
    fields = [f"{name} {getattr(got, name)} (expected {getattr(expected, name)})"
              for name in ("guest_size", "shards") if getattr(got, name) != getattr(expected, name)]
    return "file header: " + ", ".join(fields).replace("guest_size", "guest size")


def read_frames(source: Reader | IO[bytes], shards: int) -> Iterator[Frame]:
    """Yield frames until (and including) DONE; every length is checked
    against its kind's bound before the payload is read."""
    limits = _limits()
    while True:
        kind, shard, length = FRAME_HEADER.unpack(read_exact(source, FRAME_HEADER.size, "a frame header"))
        if kind not in limits:
            raise ContainerError(f"unknown frame kind {kind}")
        low, high = limits[kind]
        if not low <= length <= high:
            raise ContainerError(f"{KIND_NAMES[kind]} frame of {length} bytes (allowed {low}..{high})")
        if shard >= shards:
            raise ContainerError(f"frame for shard {shard} of a {shards}-shard stream")
        frame = Frame(kind, shard, read_exact(source, length, f"a {KIND_NAMES[kind]} frame"))
        yield frame
        if kind == KIND_DONE:
            return
