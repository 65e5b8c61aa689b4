"""Conformance of every helper implementation to docs/mailbox.md and
docs/stream-format.md.

Each test runs against endpoints from tests/endpoints.py: ``endpoint`` is one
helper, ``endpoint_pair`` a (source, target) pair over every combination of
IMPLEMENTATIONS, so a stream exported by one implementation is imported by
every other. Statuses are compared by name (readable failures) and derived,
like every size and offset, from HelperAbi.h through helper.abi.

Conventions this suite pins where the documents leave room (see the module
docstring of helper/reference.py for the full order of checks):

* IMPORT_BATCH results on failure: [0] records applied before the failing
  one, [1] of those, pages written from PAGE records, [2] the Sequence field
  of the failing record, or the expected sequence number when the failing
  record's 40-byte header is not whole in the batch (or was never read:
  the record after MaxBatchPages records);
* EXPORT_BATCH needs capacity for ``count`` full PAGE records whatever the
  pages hold; IMPORT_BATCH takes at most MaxBatchPages full PAGE records of
  input (BATCH_TOO_LARGE, session unchanged) and at most MaxBatchPages
  records (BATCH_TOO_LARGE for the next one, a stream failure);
* argument failures (BAD_STATE, NO_KEY, OUT_OF_BOUNDS, BATCH_TOO_LARGE of
  the arguments, BUFFER_TOO_SMALL, an export's BAD_PAGE) leave the session as
  it was; an unknown command in a FAILED session gets SESSION_FAILED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from endpoints import FACTORIES, Endpoint, EndpointSpec, ReferenceEndpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helper import abi
from helper import commit_proof as cp
from helper import stream as s
from helper.reference import MAX_IMPORT_BATCH_SIZE, ReferenceHelper, SaltSource
from host_shim.errors import HelperTimeout, MailboxError
from host_shim.helpers.backends import MailboxBackend, ReferenceBackend
from host_shim.helpers.hostcore_helper import HostCoreHelper
from host_shim.helpers.keys import secret_record

A = abi.load()
STATUS_NAMES = A.names_with_prefix("OVMF_MH_STATUS_")
SESSION_NAMES = A.names_with_prefix("OVMF_MH_SESSION_")
PAGE = s.PAGE_SIZE
MAX_BATCH = A.const("OVMF_MH_MAX_BATCH_PAGES")
U64_MAX = (1 << 64) - 1

# --- implementations ------------------------------------------------------------

#: Implementations under test; each name is a key of endpoints.FACTORIES.
IMPLEMENTATIONS: list[str] = ["reference", "host-core", "firmware"]
#: Marks an implementation needs (e.g. "firmware": [pytest.mark.firmware, pytest.mark.qemu]).
MARKS: dict[str, list[pytest.MarkDecorator]] = {"firmware": [pytest.mark.firmware, pytest.mark.qemu]}

KEY = bytes(range(0x40, 0x60))
OTHER_KEY = bytes(range(0x80, 0xA0))
WINDOW_PAGES = 1024
SPEC = EndpointSpec(window_size=WINDOW_PAGES * PAGE, data_size=4 << 20, transport_key=KEY)

LIST_AT = 0  # page lists (at most MaxBatchPages * 8 = one page)
OUT_AT = PAGE  # export output, import input


def _param(names: Sequence[str]) -> object:
    marks = [m for name in names for m in MARKS.get(name, [])]
    return pytest.param(tuple(names), id="->".join(names), marks=marks)


@pytest.fixture(params=[_param([name]) for name in IMPLEMENTATIONS])
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    """One helper of each implementation, with the transport key KEY."""
    (name,) = request.param
    with FACTORIES[name](SPEC) as ep:
        yield ep


@pytest.fixture(params=[_param([name]) for name in IMPLEMENTATIONS])
def keyless_endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    """One helper of each implementation started without a launch secret."""
    (name,) = request.param
    with FACTORIES[name](EndpointSpec(SPEC.window_size, SPEC.data_size, None)) as ep:
        yield ep


@pytest.fixture(params=[_param(pair) for pair in itertools.product(IMPLEMENTATIONS, repeat=2)])
def endpoint_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Endpoint, Endpoint]]:
    """(source, target) for every combination of implementations, same key."""
    source_name, target_name = request.param
    with FACTORIES[source_name](SPEC) as source, FACTORIES[target_name](SPEC) as target:
        yield source, target


# --- driving a helper ------------------------------------------------------------


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"unknown {status:#x}")


def expect(ep: Endpoint, name: str, command: str | int, *args: int) -> tuple[int, ...]:
    """Call and check the status by name; return the results."""
    status, results = ep.call(command, *args)
    assert status_name(status) == name, f"{command}{args}: {status_name(status)}, expected {name}"
    assert len(results) == A.const("OVMF_MH_RESULT_COUNT")
    return results


def ok(ep: Endpoint, command: str | int, *args: int) -> tuple[int, ...]:
    return expect(ep, "SUCCESS", command, *args)


def session_state(ep: Endpoint) -> str:
    return SESSION_NAMES[ok(ep, "QUERY")[4]]


def put(ep: Endpoint, blob: bytes, at: int = OUT_AT) -> tuple[int, int]:
    """Place ``blob`` in the data area; return (offset, size) for the arguments."""
    ep.data[at : at + len(blob)] = blob
    return at, len(blob)


def send(ep: Endpoint, command: str, blob: bytes, expected: str = "SUCCESS",
         shard: tuple[int, int] = (0, 1)) -> tuple[int, ...]:
    """IMPORT_* one blob from the data area; IMPORT_BEGIN also announces
    ``shard`` (index, count)."""
    extra = shard if command == "IMPORT_BEGIN" else ()
    return expect(ep, expected, command, *put(ep, blob), *extra)


@dataclass
class Stream:
    header: bytes
    batches: list[bytes]
    end: bytes

    @property
    def records(self) -> list[bytes]:
        return [bytes(r) for batch in self.batches for r in s.split_records(batch)]

    @property
    def whole(self) -> bytes:
        return self.header + b"".join(self.batches) + self.end


TRACK_PAGES = A.const("OVMF_MH_EXPORT_TRACK_PAGES")


#: The migration id of the suite's unbound exports.
MIGRATION = bytes(range(0xC0, 0xE0))
#: Where export_begin puts the binding input (free at EXPORT_BEGIN).
BIND_AT = LIST_AT


def export_begin(ep: Endpoint, flags: int = 0, binding: bytes = MIGRATION, shard: tuple[int, int] = (0, 1)) -> bytes:
    """EXPORT_BEGIN with ``binding`` (a migration id, or with BOUND the nonces)."""
    put(ep, binding, BIND_AT)
    written = ok(ep, "EXPORT_BEGIN", OUT_AT, s.STREAM_HEADER_SIZE, flags, BIND_AT, *shard)[0]
    assert written == s.STREAM_HEADER_SIZE
    return bytes(ep.data[OUT_AT : OUT_AT + written])


def export_batch(ep: Endpoint, offsets: Sequence[int]) -> bytes:
    n = len(offsets)
    put(ep, struct.pack(f"<{n}Q", *offsets), LIST_AT)
    written, records, zeros = ok(ep, "EXPORT_BATCH", LIST_AT, n, OUT_AT, n * s.PAGE_RECORD_SIZE)[:3]
    batch = bytes(ep.data[OUT_AT : OUT_AT + written])
    framed = s.split_records(batch)
    assert records == n == len(framed)
    assert zeros == sum(len(r) == s.ZERO_RECORD_SIZE for r in framed)
    return batch


def export_end(ep: Endpoint) -> bytes:
    written = ok(ep, "EXPORT_END", OUT_AT, s.END_RECORD_SIZE)[0]
    assert written == s.END_RECORD_SIZE
    return bytes(ep.data[OUT_AT : OUT_AT + written])


def export(ep: Endpoint, batches: Sequence[Sequence[int]]) -> Stream:
    header = export_begin(ep)
    return Stream(header, [export_batch(ep, offsets) for offsets in batches], export_end(ep))


def import_stream(ep: Endpoint, stream: Stream) -> int:
    """Import a whole stream; return IMPORT_END's record count."""
    send(ep, "IMPORT_BEGIN", stream.header)
    for batch in stream.batches:
        send(ep, "IMPORT_BATCH", batch)
    return send(ep, "IMPORT_END", stream.end)[0]


def page_at(ep: Endpoint, offset: int) -> bytes:
    return bytes(ep.window[offset : offset + PAGE])


def fill(ep: Endpoint, offset: int, content: bytes) -> None:
    ep.window[offset : offset + len(content)] = content


def scramble(ep: Endpoint) -> bytes:
    """Fill the whole window with noise (a target's stale RAM); return it."""
    noise = os.urandom(len(ep.window))
    ep.window[:] = noise
    return noise


# --- source content --------------------------------------------------------------

#: Pages of the tampering scenarios: (page number, kind), in stream order. Record
#: index 2 is a PAGE record (payload to flip), index 1 a ZERO record.
SCENARIO = [(3, "random"), (1, "zero"), (4, "random"), (7, "random"), (5, "zero"), (9, "random")]


def page_content(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "pattern":
        return bytes([seed & 0xFF]) * PAGE
    return os.urandom(PAGE)


@dataclass
class Scenario:
    source: Endpoint
    target: Endpoint
    stream: Stream
    offsets: list[int]
    pages: list[bytes]
    target_before: bytes

    def expected_window(self, applied: int) -> bytes:
        """The target window after the first ``applied`` records, and no others."""
        window = bytearray(self.target_before)
        for offset, page in zip(self.offsets[:applied], self.pages[:applied], strict=True):
            window[offset : offset + PAGE] = page
        return bytes(window)


@pytest.fixture
def scenario(endpoint_pair: tuple[Endpoint, Endpoint]) -> Scenario:
    """SCENARIO exported by the source in one batch; the target scrambled."""
    source, target = endpoint_pair
    offsets = [number * PAGE for number, _ in SCENARIO]
    pages = [page_content(kind, i) for i, (_, kind) in enumerate(SCENARIO)]
    for offset, page in zip(offsets, pages, strict=True):
        fill(source, offset, page)
    stream = export(source, [offsets])
    return Scenario(source, target, stream, offsets, pages, scramble(target))


def with_field(record: bytes, **fields: int | bytes) -> bytes:
    """A record with some header fields replaced (the tag is left as it was)."""
    header = s.RECORD_HEADER.unpack(record[: s.RECORD_HEADER_SIZE])
    header.update(fields)
    return s.RECORD_HEADER.pack(**header) + record[s.RECORD_HEADER_SIZE :]


def flip(blob: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(blob)
    out[index] ^= 1 << bit
    return bytes(out)


def field_index(layout: abi.Layout, name: str, byte: int = 0) -> int:
    return layout.offset(name) + byte


# --- round trips -------------------------------------------------------------------


def round_trip(source: Endpoint, target: Endpoint, batches: Sequence[Sequence[int]]) -> Stream:
    """Export ``batches`` from the source, import into a scrambled target and
    check every page named arrived byte for byte."""
    scramble(target)
    stream = export(source, batches)
    offsets = [o for batch in batches for o in batch]
    assert import_stream(target, stream) == len(offsets)
    for offset in set(offsets):
        assert page_at(target, offset) == page_at(source, offset), f"page {offset:#x}"
    assert session_state(target) == "COMPLETE"
    assert session_state(source) == "COMPLETE"
    return stream


def test_round_trip_random_pages(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    offsets = [n * PAGE for n in range(0, 64, 3)]
    for offset in offsets:
        fill(source, offset, os.urandom(PAGE))
    stream = round_trip(source, target, [offsets])
    assert all(len(r) == s.PAGE_RECORD_SIZE for r in stream.records)


def test_round_trip_zero_pages_clear_stale_target_pages(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    offsets = [n * PAGE for n in range(16)]
    fill(source, 0, bytes(16 * PAGE))
    stream = round_trip(source, target, [offsets])
    assert all(len(r) == s.ZERO_RECORD_SIZE for r in stream.records)
    assert bytes(target.window[: 16 * PAGE]) == bytes(16 * PAGE)


def test_round_trip_mixed_pages(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """Random, zero, one-byte-nonzero (not a zero page) and patterned pages."""
    source, target = endpoint_pair
    almost_zero = bytearray(PAGE)
    almost_zero[-1] = 1
    contents = [os.urandom(PAGE), bytes(PAGE), bytes(almost_zero), b"\xff" * PAGE, bytes(PAGE), os.urandom(PAGE)]
    offsets = [n * PAGE for n in (10, 2, 30, 31, 0, WINDOW_PAGES - 1)]
    for offset, content in zip(offsets, contents, strict=True):
        fill(source, offset, content)
    stream = round_trip(source, target, [offsets])
    sizes = [len(r) for r in stream.records]
    assert sizes == [s.PAGE_RECORD_SIZE, s.ZERO_RECORD_SIZE] + [s.PAGE_RECORD_SIZE] * 2 + [
        s.ZERO_RECORD_SIZE,
        s.PAGE_RECORD_SIZE,
    ]


def test_round_trip_repeated_pages(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """The same content at many offsets, and one offset sent again after it
    changed (a page dirtied during migration): the later record wins."""
    source, target = endpoint_pair
    same = os.urandom(PAGE)
    offsets = [n * PAGE for n in range(8)]
    for offset in offsets:
        fill(source, offset, same)
    scramble(target)
    send(target, "IMPORT_BEGIN", export_begin(source))
    send(target, "IMPORT_BATCH", export_batch(source, [*offsets, offsets[0]]))
    fill(source, offsets[0], os.urandom(PAGE))
    send(target, "IMPORT_BATCH", export_batch(source, [offsets[0], offsets[0]]))
    assert send(target, "IMPORT_END", export_end(source))[0] == len(offsets) + 3
    for offset in offsets:
        assert page_at(target, offset) == page_at(source, offset)


def test_round_trip_many_batches_regrouped(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """Batches are host framing only: records exported in batches of 5 import
    one at a time, or all at once."""
    source, target = endpoint_pair
    offsets = [n * PAGE for n in range(40)]
    for offset in offsets[::2]:
        fill(source, offset, os.urandom(PAGE))
    batches = [offsets[i : i + 5] for i in range(0, len(offsets), 5)]
    stream = export(source, batches)
    scramble(target)
    send(target, "IMPORT_BEGIN", stream.header)
    for record in stream.records:
        applied, pages = send(target, "IMPORT_BATCH", record)[:2]
        assert applied == 1
        assert pages == (len(record) == s.PAGE_RECORD_SIZE)
    assert send(target, "IMPORT_END", stream.end)[0] == len(offsets)
    assert bytes(target.window[: 40 * PAGE]) == bytes(source.window[: 40 * PAGE])

    ok(target, "RESET")
    scramble(target)
    send(target, "IMPORT_BEGIN", stream.header)
    applied, pages = send(target, "IMPORT_BATCH", b"".join(stream.records))[:2]
    assert (applied, pages) == (40, 20)
    send(target, "IMPORT_END", stream.end)
    assert bytes(target.window[: 40 * PAGE]) == bytes(source.window[: 40 * PAGE])


def test_round_trip_max_batch(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    offsets = [n * PAGE for n in range(MAX_BATCH)]
    fill(source, 0, os.urandom(MAX_BATCH * PAGE))
    fill(source, 7 * PAGE, bytes(PAGE))
    stream = round_trip(source, target, [offsets])
    assert len(stream.batches[0]) == (MAX_BATCH - 1) * s.PAGE_RECORD_SIZE + s.ZERO_RECORD_SIZE


def test_empty_stream_and_empty_batch(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    stream = round_trip(source, target, [[]])
    assert stream.batches == [b""]


def test_stream_decodes_with_the_codec(endpoint: Endpoint) -> None:
    """Any implementation's stream verifies with helper/stream.py and the key."""
    offsets = [0, PAGE, 5 * PAGE]
    fill(endpoint, 0, os.urandom(PAGE))
    fill(endpoint, PAGE, bytes(PAGE))
    fill(endpoint, 5 * PAGE, os.urandom(PAGE))
    stream = export(endpoint, [offsets])
    decoded = s.decode_stream(KEY, stream.whole)
    assert decoded.header.guest_size == SPEC.window_size
    assert [r.guest_offset for r in decoded.records] == offsets
    assert [r.page for r in decoded.records] == [page_at(endpoint, 0), None, page_at(endpoint, 5 * PAGE)]


def test_every_export_has_a_fresh_salt_and_session(endpoint: Endpoint) -> None:
    first = export(endpoint, [[0]])
    second = export(endpoint, [[0]])
    h1, h2 = s.decode_stream_header(first.header), s.decode_stream_header(second.header)
    assert h1.salt != h2.salt
    assert h1.session_id != h2.session_id
    assert first.records[0] != second.records[0]


def test_results_of_import(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    fill(source, 0, os.urandom(PAGE))
    fill(source, PAGE, bytes(PAGE))
    stream = export(source, [[0, PAGE, 0]])
    assert send(target, "IMPORT_BEGIN", stream.header)[0] == SPEC.window_size
    assert send(target, "IMPORT_BATCH", stream.batches[0]) == (3, 2, 0, 0, 0, 0)
    assert send(target, "IMPORT_END", stream.end) == (3, 0, 0, 0, 0, 0)


# --- tampering with records -----------------------------------------------------------

Tamper = Callable[[list[bytes]], list[bytes]]

_PAYLOAD = s.RECORD_HEADER_SIZE + 100


def _other_page(records: list[bytes]) -> list[bytes]:
    """Record 2 claims another page that is inside the window."""
    moved = s.decode_record_header(records[2]).guest_offset + PAGE
    return [*records[:2], with_field(records[2], GuestOffset=moved)]


#: name -> (records sent in one IMPORT_BATCH, expected status, records applied)
RECORD_TAMPERING: dict[str, tuple[Tamper, str, int]] = {
    "payload bit": (lambda r: [*r[:2], flip(r[2], _PAYLOAD, 3), *r[3:]], "AUTH_FAILED", 2),
    "last payload bit": (lambda r: [*r[:2], flip(r[2], -s.TAG_SIZE - 1, 7), *r[3:]], "AUTH_FAILED", 2),
    "tag bit": (lambda r: [*r[:2], flip(r[2], -1), *r[3:]], "AUTH_FAILED", 2),
    "zero record tag bit": (lambda r: [r[0], flip(r[1], -5, 2), *r[2:]], "AUTH_FAILED", 1),
    "type page->zero": (lambda r: [*r[:2], with_field(r[2], Type=s.RECORD_ZERO)], "BAD_RECORD", 2),
    "type zero->page": (lambda r: [r[0], with_field(r[1], Type=s.RECORD_PAGE), *r[2:]], "BAD_RECORD", 1),
    "type unknown": (lambda r: [*r[:2], with_field(r[2], Type=7)], "BAD_RECORD", 2),
    "type end in a batch": (lambda r: [*r[:2], with_field(r[2], Type=s.RECORD_END)], "BAD_RECORD", 2),
    "payload size": (lambda r: [*r[:2], with_field(r[2], PayloadSize=PAGE - 16)], "BAD_RECORD", 2),
    "zero record payload size": (lambda r: [r[0], with_field(r[1], PayloadSize=16)], "BAD_RECORD", 1),
    "session id bit": (
        lambda r: [*r[:2], flip(r[2], field_index(s.RECORD_HEADER, "SessionId", 15))],
        "WRONG_SESSION",
        2,
    ),
    "sequence up": (lambda r: [*r[:2], with_field(r[2], Sequence=4)], "SEQUENCE_GAP", 2),
    "sequence down": (lambda r: [*r[:2], with_field(r[2], Sequence=2)], "SEQUENCE_REPLAY", 2),
    "sequence high bit": (
        lambda r: [*r[:2], flip(r[2], field_index(s.RECORD_HEADER, "Sequence", 7), 7)],
        "SEQUENCE_GAP",
        2,
    ),
    "sequence zero": (lambda r: [with_field(r[0], Sequence=0), *r[1:]], "SEQUENCE_REPLAY", 0),
    "offset misaligned": (lambda r: [*r[:2], flip(r[2], field_index(s.RECORD_HEADER, "GuestOffset"))], "BAD_PAGE", 2),
    "offset outside window": (lambda r: [*r[:2], with_field(r[2], GuestOffset=SPEC.window_size)], "BAD_PAGE", 2),
    "offset wraps": (lambda r: [*r[:2], with_field(r[2], GuestOffset=U64_MAX - PAGE + 1)], "BAD_PAGE", 2),
    "moved to another page": (_other_page, "AUTH_FAILED", 2),
    "dropped": (lambda r: [*r[:2], *r[3:]], "SEQUENCE_GAP", 2),
    "duplicated": (lambda r: [*r[:3], r[2], *r[3:]], "SEQUENCE_REPLAY", 3),
    "reordered": (lambda r: [*r[:2], r[3], r[2], *r[4:]], "SEQUENCE_GAP", 2),
    "replayed from earlier": (lambda r: [*r[:5], r[1], r[5]], "SEQUENCE_REPLAY", 5),
    "truncated record": (lambda r: [*r[:2], r[2][:-1]], "BAD_RECORD", 2),
    "partial record header": (lambda r: [*r[:2], r[2][: s.RECORD_HEADER_SIZE - 1]], "BAD_RECORD", 2),
    "trailing byte": (lambda r: [*r, b"\x01"], "BAD_RECORD", 6),
}


def _failing_sequence(record: bytes, expected: int) -> int:
    """IMPORT_BATCH Result[2]: the record's Sequence field when its header is whole."""
    return s.decode_record_header(record).sequence if len(record) >= s.RECORD_HEADER_SIZE else expected


@pytest.mark.parametrize("case", list(RECORD_TAMPERING))
def test_tampered_record(scenario: Scenario, case: str) -> None:
    tamper, expected, applied = RECORD_TAMPERING[case]
    target = scenario.target
    tampered = tamper(scenario.stream.records)
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    results = send(target, "IMPORT_BATCH", b"".join(tampered), expected)
    pages = sum(p != bytes(PAGE) for p in scenario.pages[:applied])
    assert results == (applied, pages, _failing_sequence(tampered[applied], applied + 1), 0, 0, 0)
    assert bytes(target.window) == scenario.expected_window(applied), "guest written after a failure"
    assert session_state(target) == "FAILED"


def test_replay_in_a_later_batch(scenario: Scenario) -> None:
    records, target = scenario.stream.records, scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    send(target, "IMPORT_BATCH", b"".join(records[:4]))
    assert send(target, "IMPORT_BATCH", records[1] + records[4], "SEQUENCE_REPLAY")[:3] == (0, 0, 2)
    assert bytes(target.window) == scenario.expected_window(4)


def test_record_of_another_session(scenario: Scenario) -> None:
    """A second export with the same key: its records are refused, also when
    they carry the right sequence number."""
    other = export(scenario.source, [scenario.offsets])
    target = scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    send(target, "IMPORT_BATCH", scenario.stream.records[0])
    send(target, "IMPORT_BATCH", other.records[1], "WRONG_SESSION")
    assert bytes(target.window) == scenario.expected_window(1)


def test_records_of_another_session_under_its_header(scenario: Scenario) -> None:
    other = export(scenario.source, [scenario.offsets])
    send(scenario.target, "IMPORT_BEGIN", other.header)
    send(scenario.target, "IMPORT_BATCH", scenario.stream.batches[0], "WRONG_SESSION")
    assert bytes(scenario.target.window) == scenario.target_before


def test_failed_session_is_sticky_until_reset(scenario: Scenario) -> None:
    records, target = scenario.stream.records, scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    send(target, "IMPORT_BATCH", flip(records[0], -1), "AUTH_FAILED")
    send(target, "IMPORT_BATCH", records[0], "SESSION_FAILED")
    send(target, "IMPORT_END", scenario.stream.end, "SESSION_FAILED")
    send(target, "IMPORT_BEGIN", scenario.stream.header, "SESSION_FAILED")
    expect(target, "SESSION_FAILED", "EXPORT_BEGIN", OUT_AT, s.STREAM_HEADER_SIZE)
    expect(target, "SESSION_FAILED", "EXPORT_BATCH", LIST_AT, 0, OUT_AT, 0)
    expect(target, "SESSION_FAILED", "EXPORT_END", OUT_AT, s.END_RECORD_SIZE)
    ok(target, "NOP")
    assert session_state(target) == "FAILED"
    assert bytes(target.window) == scenario.target_before
    ok(target, "RESET")
    assert session_state(target) == "IDLE"
    assert import_stream(target, scenario.stream) == len(SCENARIO)
    assert bytes(target.window) == scenario.expected_window(len(SCENARIO))


def test_unknown_command_in_a_failed_session(scenario: Scenario) -> None:
    send(scenario.target, "IMPORT_BEGIN", flip(scenario.stream.header, 0), "BAD_HEADER")
    expect(scenario.target, "SESSION_FAILED", 0x77)


# --- tampering with the stream header ------------------------------------------------------

HEADER_FIELDS = [
    "Magic", "Version", "HeaderSize", "Flags", "ShardIndex", "ShardCount", "MigrationId", "TargetNonce", "Salt",
    "SessionId", "GuestSize", "Tag",
]


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_tampered_header(scenario: Scenario, field: str) -> None:
    header = flip(scenario.stream.header, field_index(s.STREAM_HEADER, field))
    assert send(scenario.target, "IMPORT_BEGIN", header, "BAD_HEADER") == (0,) * 6
    assert session_state(scenario.target) == "FAILED"
    send(scenario.target, "IMPORT_BATCH", scenario.stream.records[0], "SESSION_FAILED")
    assert bytes(scenario.target.window) == scenario.target_before


@pytest.mark.parametrize("cut", [-1, +1, -s.STREAM_HEADER_SIZE])
def test_header_of_wrong_size(scenario: Scenario, cut: int) -> None:
    header = scenario.stream.header[:cut] if cut < 0 else scenario.stream.header + b"\0" * cut
    send(scenario.target, "IMPORT_BEGIN", header, "BAD_HEADER")
    assert session_state(scenario.target) == "FAILED"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wrong_transport_key_is_bad_header(scenario: Scenario, implementation: str) -> None:
    with FACTORIES[implementation](EndpointSpec(SPEC.window_size, SPEC.data_size, OTHER_KEY)) as stranger:
        scramble(stranger)
        before = bytes(stranger.window)
        send(stranger, "IMPORT_BEGIN", scenario.stream.header, "BAD_HEADER")
        send(stranger, "IMPORT_BATCH", scenario.stream.batches[0], "SESSION_FAILED")
        assert bytes(stranger.window) == before


# --- the end of the stream -------------------------------------------------------------------


def _import_all_records(scenario: Scenario, count: int | None = None) -> Endpoint:
    target = scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    send(target, "IMPORT_BATCH", b"".join(scenario.stream.records[:count]))
    return target


def test_truncated_stream_without_end_record(scenario: Scenario) -> None:
    target = _import_all_records(scenario)
    expect(target, "TRUNCATED", "IMPORT_END", OUT_AT, 0)
    assert session_state(target) == "FAILED"


def test_end_record_with_records_missing(scenario: Scenario) -> None:
    target = _import_all_records(scenario, 4)
    send(target, "IMPORT_END", scenario.stream.end, "SEQUENCE_GAP")
    assert session_state(target) == "FAILED"
    assert bytes(target.window) == scenario.expected_window(4)


END_TAMPERING: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "payload bit": (lambda e: flip(e, s.RECORD_HEADER_SIZE + 3), "AUTH_FAILED"),
    "tag bit": (lambda e: flip(e, -1, 6), "AUTH_FAILED"),
    "guest offset": (lambda e: with_field(e, GuestOffset=PAGE), "AUTH_FAILED"),
    "type page": (lambda e: with_field(e, Type=s.RECORD_PAGE), "BAD_RECORD"),
    "type zero": (lambda e: with_field(e, Type=s.RECORD_ZERO), "BAD_RECORD"),
    "payload size": (lambda e: with_field(e, PayloadSize=0), "BAD_RECORD"),
    "short": (lambda e: e[:-1], "BAD_RECORD"),
    "long": (lambda e: e + b"\0", "BAD_RECORD"),
    "header only": (lambda e: e[: s.RECORD_HEADER_SIZE], "BAD_RECORD"),
    "session id": (lambda e: flip(e, field_index(s.RECORD_HEADER, "SessionId")), "WRONG_SESSION"),
    "sequence down": (lambda e: with_field(e, Sequence=len(SCENARIO)), "SEQUENCE_REPLAY"),
    "sequence up": (lambda e: with_field(e, Sequence=len(SCENARIO) + 2), "SEQUENCE_GAP"),
}


@pytest.mark.parametrize("case", list(END_TAMPERING))
def test_tampered_end_record(scenario: Scenario, case: str) -> None:
    tamper, expected = END_TAMPERING[case]
    target = _import_all_records(scenario)
    assert send(target, "IMPORT_END", tamper(scenario.stream.end), expected) == (0,) * 6
    assert session_state(target) == "FAILED"


def test_end_record_inside_a_batch(scenario: Scenario) -> None:
    target = _import_all_records(scenario)
    send(target, "IMPORT_BATCH", scenario.stream.end, "BAD_RECORD")


def test_end_record_of_another_session(scenario: Scenario) -> None:
    other = export(scenario.source, [scenario.offsets])
    target = _import_all_records(scenario)
    send(target, "IMPORT_END", other.end, "WRONG_SESSION")


def _forged_end(scenario: Scenario, count: int, digest: bytes) -> bytes:
    """An END record with valid tag but chosen content: only the key holder
    can build it, so this is the check behind the tag."""
    header = s.decode_stream_header(scenario.stream.header)
    cipher = s.StreamCipher(s.derive_session(KEY, header.salt, header.binding.pack()))
    payload = s.EndPayload(count, digest).pack()
    return cipher.seal_record(s.RECORD_END, len(SCENARIO) + 1, 0, payload)


def test_end_record_with_wrong_count(scenario: Scenario) -> None:
    real = s.decode_end_payload(
        s.StreamCipher(_keys(scenario.stream.header)).open_record(
            scenario.stream.end
        )
    )
    target = _import_all_records(scenario)
    send(target, "IMPORT_END", _forged_end(scenario, real.record_count - 1, real.chain_digest), "TRUNCATED")


def test_end_record_with_wrong_chain_digest(scenario: Scenario) -> None:
    target = _import_all_records(scenario)
    send(target, "IMPORT_END", _forged_end(scenario, len(SCENARIO), bytes(s.DIGEST_SIZE)), "TRUNCATED")


def test_forged_end_matches_the_real_one(scenario: Scenario) -> None:
    """Guard for the two tests above: the forgery recipe with the true
    content reproduces the source's end record."""
    digest = s.ChainDigest(s.decode_stream_header(scenario.stream.header).session_id)
    for record in scenario.stream.records:
        digest.update(s.record_tag(record))
    assert _forged_end(scenario, len(SCENARIO), digest.digest()) == scenario.stream.end


# --- shared pages sealed in the END record (ABI 4.0) -----------------------------------------------

#: Where the shared-page digest goes in the data area (away from the list and the I/O at OUT_AT).
SHARED_AT = 3 * PAGE


def _shared(*pages: tuple[int, bytes]) -> s.SharedPages:
    """The digest of some shared pages, computed independently of the codec's class
    as a cross-check of its definition (SHA-256 of the label, then offset || page)."""
    shared = s.SharedPages()
    for offset, page in pages:
        shared.update(struct.pack("<Q", offset) + page)
    independent = hashlib.sha256(b"ovmf-mh v3 shared pages" + b"".join(
        struct.pack("<Q", offset) + page for offset, page in pages)).digest()
    assert shared.digest() == independent and shared.count == len(pages)
    return shared


SHARED = ((5 * PAGE, b"\x11" * PAGE), (9 * PAGE, b"\x22" * PAGE))


def _export_sealing(source: Endpoint, offsets: list[int], shared: s.SharedPages) -> Stream:
    header = export_begin(source)
    batch = export_batch(source, offsets)
    put(source, shared.digest(), SHARED_AT)
    written = ok(source, "EXPORT_END", OUT_AT, s.END_RECORD_SIZE, SHARED_AT, shared.count)[0]
    return Stream(header, [batch], bytes(source.data[OUT_AT : OUT_AT + written]))


def _end_with_shared(target: Endpoint, stream: Stream, shared: s.SharedPages, expected: str) -> tuple[int, ...]:
    send(target, "IMPORT_BEGIN", stream.header)
    send(target, "IMPORT_BATCH", stream.batches[0])
    put(target, shared.digest(), SHARED_AT)
    return expect(target, expected, "IMPORT_END", *put(target, stream.end), SHARED_AT, shared.count)


def test_end_record_seals_the_shared_pages(scenario: Scenario) -> None:
    """What the source sealed is in the END payload; the target accepts the
    same count and digest and gives its receipt."""
    sealed = _shared(*SHARED)
    stream = _export_sealing(scenario.source, scenario.offsets, sealed)
    end = s.decode_end_payload(s.StreamCipher(_keys(stream.header)).open_record(stream.end))
    assert (end.shared_page_count, end.shared_digest) == (2, sealed.digest())
    assert _end_with_shared(scenario.target, stream, _shared(*SHARED), "SUCCESS")[0] == len(SCENARIO)
    assert ok(scenario.target, "IMPORT_RECEIPT", OUT_AT, s.RECEIPT_SIZE)[0] == s.RECEIPT_SIZE


def test_end_record_of_no_shared_pages_holds_the_empty_digest(endpoint: Endpoint) -> None:
    """Count 0: nothing is read at Arg2 (here out of bounds), the digest of none is sealed."""
    header = export_begin(endpoint)
    written = ok(endpoint, "EXPORT_END", OUT_AT, s.END_RECORD_SIZE, U64_MAX, 0)[0]
    end = s.decode_end_payload(s.StreamCipher(_keys(header)).open_record(
        bytes(endpoint.data[OUT_AT : OUT_AT + written])))
    assert (end.shared_page_count, end.shared_digest) == (0, hashlib.sha256(b"ovmf-mh v3 shared pages").digest())


#: The target host's account of the shard's shared pages, against the source's SHARED.
SHARED_LIES: dict[str, tuple[tuple[int, bytes], ...]] = {
    "a changed shared page": (SHARED[0], (SHARED[1][0], b"\x23" * PAGE)),
    "a forged page over a private page": (*SHARED, (0, b"\x66" * PAGE)),
    "a dropped page": (SHARED[0],),
    "reordered pages": (SHARED[1], SHARED[0]),
    "a page moved": (SHARED[0], (SHARED[1][0] + PAGE, SHARED[1][1])),
    "none at all": (),
}


@pytest.mark.parametrize("lie", list(SHARED_LIES))
def test_shared_pages_not_sealed_are_refused(scenario: Scenario, lie: str) -> None:
    stream = _export_sealing(scenario.source, scenario.offsets, _shared(*SHARED))
    target = scenario.target
    assert _end_with_shared(target, stream, _shared(*SHARED_LIES[lie]), "SHARED_PAGES_MISMATCH") == (0,) * 6
    assert session_state(target) == "FAILED"
    expect(target, "SESSION_FAILED", "IMPORT_RECEIPT", OUT_AT, s.RECEIPT_SIZE)


def test_shared_count_lie_with_the_right_digest_is_refused(scenario: Scenario) -> None:
    stream = _export_sealing(scenario.source, scenario.offsets, _shared(*SHARED))
    target = scenario.target
    send(target, "IMPORT_BEGIN", stream.header)
    send(target, "IMPORT_BATCH", stream.batches[0])
    put(target, _shared(*SHARED).digest(), SHARED_AT)
    expect(target, "SHARED_PAGES_MISMATCH", "IMPORT_END", *put(target, stream.end), SHARED_AT, 3)
    assert session_state(target) == "FAILED"


def test_shared_digest_outside_the_data_area_changes_nothing(endpoint: Endpoint) -> None:
    """EXPORT_END and IMPORT_END check the digest's range like any argument:
    OUT_OF_BOUNDS, the session as it was; the same call with a good range then works."""
    data = len(endpoint.data)
    header = export_begin(endpoint)
    expect(endpoint, "OUT_OF_BOUNDS", "EXPORT_END", OUT_AT, s.END_RECORD_SIZE, data - s.DIGEST_SIZE + 1, 1)
    expect(endpoint, "OUT_OF_BOUNDS", "EXPORT_END", OUT_AT, s.END_RECORD_SIZE, U64_MAX, 1)
    assert session_state(endpoint) == "EXPORTING"
    put(endpoint, bytes(s.DIGEST_SIZE), SHARED_AT)
    end = bytes(endpoint.data[OUT_AT : OUT_AT + ok(endpoint, "EXPORT_END", OUT_AT, s.END_RECORD_SIZE,
                                                  SHARED_AT, 1)[0]])
    send(endpoint, "IMPORT_BEGIN", header)
    expect(endpoint, "OUT_OF_BOUNDS", "IMPORT_END", *put(endpoint, end), U64_MAX - 8, 1)
    assert session_state(endpoint) == "IMPORTING"
    put(endpoint, bytes(s.DIGEST_SIZE), SHARED_AT)
    assert expect(endpoint, "SUCCESS", "IMPORT_END", *put(endpoint, end), SHARED_AT, 1)[0] == 0


# --- arguments, states and commands -------------------------------------------------------------


def test_nop_and_query(endpoint: Endpoint) -> None:
    assert ok(endpoint, "NOP") == (0,) * 6
    version, caps, window, data, state, max_batch = ok(endpoint, "QUERY")
    assert version == (A.const("OVMF_MH_ABI_MAJOR") << 16) | A.const("OVMF_MH_ABI_MINOR")
    for cap in ("QUERY", "SHUTDOWN", "EXPORT", "IMPORT", "KEY_LOADED"):
        assert caps & A.const(f"OVMF_MH_CAP_{cap}"), cap
    assert (window, data) == (len(endpoint.window), len(endpoint.data))
    assert SESSION_NAMES[state] == "IDLE"
    assert max_batch == MAX_BATCH


#: The first code after the last command HelperAbi.h defines.
FIRST_UNKNOWN = max(v for k, v in A.constants.items() if k.startswith("OVMF_MH_CMD_")) + 1


@pytest.mark.parametrize("code", [FIRST_UNKNOWN, 0x100, 0xFFFF, 0xFFFFFFFF])
def test_unknown_command(endpoint: Endpoint, code: int) -> None:
    assert expect(endpoint, "UNSUPPORTED", code, 1, 2, 3) == (0,) * 6
    ok(endpoint, "NOP")


def test_no_key(keyless_endpoint: Endpoint) -> None:
    ep = keyless_endpoint
    assert not ok(ep, "QUERY")[1] & A.const("OVMF_MH_CAP_KEY_LOADED")
    expect(ep, "NO_KEY", "EXPORT_BEGIN", OUT_AT, s.STREAM_HEADER_SIZE)
    expect(ep, "NO_KEY", "IMPORT_BEGIN", OUT_AT, s.STREAM_HEADER_SIZE)
    assert session_state(ep) == "IDLE"


BAD_STATE_CASES: dict[str, list[str]] = {
    # state reached by the setup commands -> commands refused there
    "IDLE": ["EXPORT_BATCH", "EXPORT_END", "IMPORT_BATCH", "IMPORT_END"],
    "EXPORTING": ["EXPORT_BEGIN", "IMPORT_BEGIN", "IMPORT_BATCH", "IMPORT_END"],
    "IMPORTING": ["IMPORT_BEGIN", "EXPORT_BEGIN", "EXPORT_BATCH", "EXPORT_END"],
    "COMPLETE": ["EXPORT_BATCH", "EXPORT_END", "IMPORT_BATCH", "IMPORT_END"],
}


def _enter(ep: Endpoint, state: str) -> None:
    if state == "EXPORTING":
        export_begin(ep)
    elif state == "COMPLETE":
        export(ep, [[0]])
    elif state == "IMPORTING":
        header = export_begin(ep)
        ok(ep, "RESET")
        send(ep, "IMPORT_BEGIN", header)
    assert session_state(ep) == state


def _valid_args(command: str) -> tuple[int, ...]:
    """Arguments that pass every argument check of ``command``, so that the
    state is the only thing wrong."""
    if command == "EXPORT_BATCH":
        return (LIST_AT, 0, OUT_AT, 0)
    if command == "IMPORT_BATCH":
        return (OUT_AT, 0)
    return (OUT_AT, s.END_RECORD_SIZE if command.endswith("_END") else s.STREAM_HEADER_SIZE)


@pytest.mark.parametrize(
    ("state", "command"), [(state, command) for state, commands in BAD_STATE_CASES.items() for command in commands]
)
def test_bad_state(endpoint: Endpoint, state: str, command: str) -> None:
    _enter(endpoint, state)
    assert expect(endpoint, "BAD_STATE", command, *_valid_args(command)) == (0,) * 6
    assert session_state(endpoint) == state


def test_import_after_export_and_export_after_import(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """COMPLETE accepts a new session of either direction."""
    source, target = endpoint_pair
    round_trip(source, target, [[0]])
    round_trip(target, source, [[PAGE]])
    round_trip(source, target, [[2 * PAGE]])


def test_reset_abandons_an_export(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    abandoned_header = export_begin(source)
    abandoned = export_batch(source, [0])
    ok(source, "RESET")
    assert session_state(source) == "IDLE"
    expect(source, "BAD_STATE", "EXPORT_BATCH", LIST_AT, 0, OUT_AT, 0)
    stream = round_trip(source, target, [[0]])
    assert s.decode_stream_header(abandoned_header).session_id != s.decode_stream_header(stream.header).session_id
    ok(target, "RESET")
    send(target, "IMPORT_BEGIN", stream.header)
    send(target, "IMPORT_BATCH", abandoned, "WRONG_SESSION")


def test_reset_abandons_an_import(scenario: Scenario) -> None:
    target, stream = scenario.target, scenario.stream
    send(target, "IMPORT_BEGIN", stream.header)
    send(target, "IMPORT_BATCH", stream.records[0])
    ok(target, "RESET")
    assert session_state(target) == "IDLE"
    send(target, "IMPORT_BATCH", stream.records[1], "BAD_STATE")
    assert import_stream(target, stream) == len(SCENARIO)


def test_reset_when_idle(endpoint: Endpoint) -> None:
    ok(endpoint, "RESET")
    assert session_state(endpoint) == "IDLE"


# Ranges of the data area that are out of bounds: (offset, size) given DataSize.
def _out_of_bounds(data_size: int) -> list[tuple[int, int]]:
    return [
        (data_size, 1),
        (data_size + 1, 0),
        (data_size - 1, 2),
        (0, data_size + 1),
        (U64_MAX, 1),
        (U64_MAX, U64_MAX),
        (1, U64_MAX),
        (PAGE, U64_MAX - PAGE + 1),  # offset + size wraps to 0
        (U64_MAX - PAGE + 2, PAGE),  # wraps to 1
    ]


OOB_COMMANDS: dict[str, tuple[str, Callable[[int, int], tuple[int, ...]]]] = {
    # command -> (state to start from, arguments with the range under test)
    "EXPORT_BEGIN": ("IDLE", lambda o, n: (o, n)),
    "EXPORT_BATCH out": ("EXPORTING", lambda o, n: (LIST_AT, 1, o, n)),
    "EXPORT_END": ("EXPORTING", lambda o, n: (o, n)),
    "IMPORT_BEGIN": ("IDLE", lambda o, n: (o, n)),
    "IMPORT_BATCH": ("IMPORTING", lambda o, n: (o, n)),
    "IMPORT_END": ("IMPORTING", lambda o, n: (o, n)),
    "EXPORT_VERIFY_COMMIT": ("COMPLETE", lambda o, n: (o, n)),
}


@pytest.mark.parametrize("case", list(OOB_COMMANDS))
def test_out_of_bounds(endpoint: Endpoint, case: str) -> None:
    state, make_args = OOB_COMMANDS[case]
    command = case.split()[0]
    _enter(endpoint, state)
    put(endpoint, struct.pack("<Q", 0), LIST_AT)
    before = bytes(endpoint.data)
    for offset, size in _out_of_bounds(len(endpoint.data)):
        args = make_args(offset, size)
        assert expect(endpoint, "OUT_OF_BOUNDS", command, *args) == (0,) * 6, (offset, size)
    assert session_state(endpoint) == state
    assert bytes(endpoint.data) == before


def test_out_of_bounds_page_list(endpoint: Endpoint) -> None:
    _enter(endpoint, "EXPORTING")
    size = len(endpoint.data)
    for offset, count in [(size - 8, 2), (size, 1), (U64_MAX, 1), (U64_MAX - 7, 1), (size - 4, 1)]:
        expect(endpoint, "OUT_OF_BOUNDS", "EXPORT_BATCH", offset, count, OUT_AT, s.PAGE_RECORD_SIZE)
    assert session_state(endpoint) == "EXPORTING"


def _keys(header: bytes) -> s.SessionKeys:
    decoded = s.decode_stream_header(header)
    return s.derive_session(KEY, decoded.salt, decoded.binding.pack())


def test_ranges_that_end_exactly_at_the_end_of_the_data_area(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    end = len(source.data)
    fill(source, 0, os.urandom(PAGE))
    ok(source, "EXPORT_BEGIN", end - s.STREAM_HEADER_SIZE, s.STREAM_HEADER_SIZE, 0, end - 32, 0, 1)
    header = bytes(source.data[end - s.STREAM_HEADER_SIZE :])
    put(source, struct.pack("<Q", 0), end - 8)
    written = ok(source, "EXPORT_BATCH", end - 8, 1, end - 8 - s.PAGE_RECORD_SIZE, s.PAGE_RECORD_SIZE)[0]
    batch = bytes(source.data[end - 8 - written : end - 8])
    ok(source, "EXPORT_END", end - s.END_RECORD_SIZE, s.END_RECORD_SIZE)
    final = bytes(source.data[end - s.END_RECORD_SIZE :])
    t_end = len(target.data)
    for command, blob in (("IMPORT_BEGIN", header), ("IMPORT_BATCH", batch), ("IMPORT_END", final)):
        put(target, blob, t_end - len(blob))
        ok(target, command, t_end - len(blob), len(blob), *((0, 1) if command == "IMPORT_BEGIN" else ()))
    assert page_at(target, 0) == page_at(source, 0)


BAD_PAGES = [1, PAGE // 2, PAGE - 1, SPEC.window_size, SPEC.window_size + PAGE, U64_MAX - PAGE + 1, U64_MAX]


@pytest.mark.parametrize("bad", BAD_PAGES, ids=hex)
def test_export_bad_page(endpoint_pair: tuple[Endpoint, Endpoint], bad: int) -> None:
    """An invalid entry anywhere in the list: nothing written, and the session
    goes on as if the batch had not been asked for."""
    source, target = endpoint_pair
    fill(source, 0, os.urandom(2 * PAGE))
    header = export_begin(source)
    put(source, struct.pack("<3Q", 0, PAGE, bad), LIST_AT)
    sentinel = b"\xa5" * (3 * s.PAGE_RECORD_SIZE)
    put(source, sentinel)
    assert expect(source, "BAD_PAGE", "EXPORT_BATCH", LIST_AT, 3, OUT_AT, len(sentinel)) == (0,) * 6
    assert bytes(source.data[OUT_AT : OUT_AT + len(sentinel)]) == sentinel
    assert session_state(source) == "EXPORTING"
    stream = Stream(header, [export_batch(source, [0, PAGE])], export_end(source))
    assert import_stream(target, stream) == 2


def test_last_page_of_the_window_is_valid(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    last = SPEC.window_size - PAGE
    fill(source, last, os.urandom(PAGE))
    round_trip(source, target, [[last]])


@pytest.mark.parametrize("count", [MAX_BATCH + 1, 1 << 32, (1 << 61) + 1, U64_MAX])
def test_export_batch_too_large(endpoint: Endpoint, count: int) -> None:
    _enter(endpoint, "EXPORTING")
    expect(endpoint, "BATCH_TOO_LARGE", "EXPORT_BATCH", LIST_AT, count, OUT_AT, len(endpoint.data) - OUT_AT)
    assert session_state(endpoint) == "EXPORTING"


@pytest.mark.parametrize("size", [MAX_IMPORT_BATCH_SIZE + 1, SPEC.data_size])
def test_import_batch_too_large(scenario: Scenario, size: int) -> None:
    """IMPORT_BATCH input is at most what an EXPORT_BATCH of MaxBatchPages
    pages can produce; checked after the range, before any content."""
    target = scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    put(target, scenario.stream.batches[0], 0)
    expect(target, "BATCH_TOO_LARGE", "IMPORT_BATCH", 0, size)
    assert session_state(target) == "IMPORTING"
    assert bytes(target.window) == scenario.target_before
    assert send(target, "IMPORT_BATCH", scenario.stream.batches[0])[0] == len(SCENARIO)


def test_import_batch_of_more_than_max_records(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """MaxBatchPages records per IMPORT_BATCH even when they are small (ZERO):
    the record after them fails the import with BATCH_TOO_LARGE."""
    source, target = endpoint_pair
    offsets = [n * PAGE for n in range(MAX_BATCH + 1)]
    stream = export(source, [offsets[:MAX_BATCH], offsets[MAX_BATCH:]])
    before = scramble(target)
    send(target, "IMPORT_BEGIN", stream.header)
    results = send(target, "IMPORT_BATCH", b"".join(stream.batches), "BATCH_TOO_LARGE")
    assert results[:3] == (MAX_BATCH, 0, MAX_BATCH + 1)
    assert bytes(target.window[: MAX_BATCH * PAGE]) == bytes(MAX_BATCH * PAGE)
    assert bytes(target.window[MAX_BATCH * PAGE :]) == before[MAX_BATCH * PAGE :]
    assert session_state(target) == "FAILED"


def test_import_batch_of_max_size_is_accepted(scenario: Scenario) -> None:
    target = scenario.target
    send(target, "IMPORT_BEGIN", scenario.stream.header)
    padded = scenario.stream.batches[0] + bytes(MAX_IMPORT_BATCH_SIZE - len(scenario.stream.batches[0]))
    # Accepted as a size: the zero padding then fails as a record, after the real ones applied.
    assert send(target, "IMPORT_BATCH", padded, "BAD_RECORD")[0] == len(SCENARIO)


BUFFER_CASES: dict[str, tuple[str, str, Callable[[], tuple[int, ...]]]] = {
    "EXPORT_BEGIN": ("IDLE", "EXPORT_BEGIN", lambda: (OUT_AT, s.STREAM_HEADER_SIZE - 1, 0, BIND_AT, 0, 1)),
    "EXPORT_BATCH page": ("EXPORTING", "EXPORT_BATCH", lambda: (LIST_AT, 1, OUT_AT, s.PAGE_RECORD_SIZE - 1)),
    "EXPORT_BATCH zero pages": ("EXPORTING", "EXPORT_BATCH", lambda: (LIST_AT, 2, OUT_AT, 2 * s.PAGE_RECORD_SIZE - 1)),
    "EXPORT_BATCH nothing": ("EXPORTING", "EXPORT_BATCH", lambda: (LIST_AT, 1, OUT_AT, 0)),
    "EXPORT_END": ("EXPORTING", "EXPORT_END", lambda: (OUT_AT, s.END_RECORD_SIZE - 1)),
}


@pytest.mark.parametrize("case", list(BUFFER_CASES))
def test_buffer_too_small(endpoint_pair: tuple[Endpoint, Endpoint], case: str) -> None:
    """Capacity below the worst case (a full PAGE record per listed page, even
    for zero pages): nothing written, session unchanged, stream still whole."""
    source, target = endpoint_pair
    state, command, make_args = BUFFER_CASES[case]
    fill(source, 0, bytes(2 * PAGE))  # zero pages: the output would fit, the rule is the worst case
    header = export_begin(source) if state == "EXPORTING" else None
    put(source, struct.pack("<2Q", 0, PAGE), LIST_AT)
    sentinel = b"\x5a" * (2 * s.PAGE_RECORD_SIZE)
    put(source, sentinel)
    assert expect(source, "BUFFER_TOO_SMALL", command, *make_args()) == (0,) * 6
    assert bytes(source.data[OUT_AT : OUT_AT + len(sentinel)]) == sentinel
    assert session_state(source) == state
    if header is None:
        header = export_begin(source)
    stream = Stream(header, [export_batch(source, [0, PAGE])], export_end(source))
    assert import_stream(target, stream) == 2


#: Arguments that fail two checks at once: the first in the documented order
#: answers. (state, command, args, status); D stands for DataSize.
D = SPEC.data_size
CHECK_ORDER: dict[str, tuple[str, str, tuple[int, ...], str]] = {
    "state before bounds": ("IDLE", "EXPORT_BATCH", (U64_MAX, 1, U64_MAX, 1), "BAD_STATE"),
    "state before bounds, import": ("EXPORTING", "IMPORT_BEGIN", (U64_MAX, 1), "BAD_STATE"),
    "batch size before list bounds": ("EXPORTING", "EXPORT_BATCH", (U64_MAX, MAX_BATCH + 1, 0, 0), "BATCH_TOO_LARGE"),
    "import bounds before size": ("IMPORTING", "IMPORT_BATCH", (U64_MAX, MAX_IMPORT_BATCH_SIZE + 1), "OUT_OF_BOUNDS"),
    "list bounds before out bounds": ("EXPORTING", "EXPORT_BATCH", (D, 1, D, 1), "OUT_OF_BOUNDS"),
    "out bounds before capacity": ("EXPORTING", "EXPORT_BATCH", (LIST_AT, 1, D - 10, 20), "OUT_OF_BOUNDS"),
    "bounds before capacity": ("IDLE", "EXPORT_BEGIN", (D - 10, 20), "OUT_OF_BOUNDS"),
    "bounds before flags": ("IDLE", "EXPORT_BEGIN", (D - 10, 20, 2), "OUT_OF_BOUNDS"),
    "flags before capacity": ("IDLE", "EXPORT_BEGIN", (OUT_AT, 20, 4, 0, 0, 1), "INVALID_PARAMETER"),
    "shards before binding bounds": ("IDLE", "EXPORT_BEGIN", (OUT_AT, 20, 0, U64_MAX, 1, 1), "INVALID_PARAMETER"),
    "binding bounds before capacity": ("IDLE", "EXPORT_BEGIN", (OUT_AT, 20, 2, D - 32, 0, 2), "OUT_OF_BOUNDS"),
    "challenge bounds before capacity": ("IDLE", "IMPORT_CHALLENGE", (D - 10, 20), "OUT_OF_BOUNDS"),
    "receipt state before bounds": ("IDLE", "IMPORT_RECEIPT", (U64_MAX, 1), "BAD_STATE"),
    "commit state before bounds": ("EXPORTING", "IMPORT_COMMIT", (U64_MAX, 1), "BAD_STATE"),
    "untracked before check arguments": ("EXPORTING", "CHECK_PAGES", (U64_MAX, MAX_BATCH + 1, U64_MAX), "BAD_STATE"),
    "empty range at the end is in bounds": ("IDLE", "EXPORT_BEGIN", (D, 0, 0, 0, 0, 1), "BUFFER_TOO_SMALL"),
    "pages before capacity": ("EXPORTING", "EXPORT_BATCH", (LIST_AT, 1, OUT_AT, 0), "BAD_PAGE"),
    "end bounds before end record": ("IMPORTING", "IMPORT_END", (D, 1), "OUT_OF_BOUNDS"),
    "proof state before bounds": ("COMPLETE", "IMPORT_COMMIT_PROOF", (U64_MAX, 1), "BAD_STATE"),
    "verify state before bounds": ("EXPORTING", "EXPORT_VERIFY_COMMIT", (U64_MAX, 1), "BAD_STATE"),
    "verify bounds before size": ("COMPLETE", "EXPORT_VERIFY_COMMIT", (D - 10, 20), "OUT_OF_BOUNDS"),
    "verify size before the proof": ("COMPLETE", "EXPORT_VERIFY_COMMIT", (OUT_AT, cp.PROOF_SIZE), "INVALID_PARAMETER"),
}


@pytest.mark.parametrize("case", list(CHECK_ORDER))
def test_check_order(endpoint: Endpoint, case: str) -> None:
    state, command, args, expected = CHECK_ORDER[case]
    _enter(endpoint, state)
    put(endpoint, struct.pack("<Q", 1), LIST_AT)  # a misaligned page: BAD_PAGE where the list is checked
    expect(endpoint, expected, command, *args)
    assert session_state(endpoint) == state


def test_key_is_checked_before_bounds(keyless_endpoint: Endpoint) -> None:
    expect(keyless_endpoint, "NO_KEY", "EXPORT_BEGIN", U64_MAX, U64_MAX)
    expect(keyless_endpoint, "NO_KEY", "IMPORT_BEGIN", U64_MAX, 1)


def test_shutdown(endpoint: Endpoint) -> None:
    """SHUTDOWN wipes the key material: a helper in the middle of an export
    answers SUCCESS, and an in-process helper then finds no key for a new
    session. A firmware helper publishes State SHUTDOWN and powers its VM off:
    a later command finds its QEMU gone (not a timeout)."""
    ok(endpoint, "EXPORT_BEGIN", OUT_AT, PAGE, 0, BIND_AT, 0, 1)
    ok(endpoint, "SHUTDOWN")
    if isinstance(endpoint, MailboxBackend):
        assert endpoint.mailbox.header()["State"] == A.const("OVMF_MH_STATE_SHUTDOWN")
        with pytest.raises(MailboxError, match="exited") as error:
            endpoint.mailbox.post_and_wait("NOP", (), timeout=60)
        assert not isinstance(error.value, HelperTimeout), "the helper VM did not power off"
    else:
        # (The session state SHUTDOWN leaves is not specified: the reference
        # says IDLE, the C dispatcher keeps EXPORTING. RESET makes it IDLE and
        # keeps the transport key, so only a wiped key gives NO_KEY here.)
        ok(endpoint, "RESET")
        expect(endpoint, "NO_KEY", "EXPORT_BEGIN", OUT_AT, PAGE)


# --- the reference helper only -------------------------------------------------------------------


def _reference(key: bytes | None = KEY, salt_source: SaltSource = os.urandom) -> ReferenceHelper:
    secret = bytearray(secret_record(key)) if key is not None else None
    return ReferenceHelper(bytearray(16 * PAGE), bytearray(1 << 16), secret, salt_source=salt_source)


def test_reference_reads_and_wipes_the_secret() -> None:
    page = bytearray(PAGE)
    page[:48] = secret_record(KEY)
    helper = ReferenceHelper(bytearray(PAGE), bytearray(PAGE), page)
    assert helper.key_loaded
    assert page == bytearray(PAGE)


@pytest.mark.parametrize("field", ["Signature", "Version", "KeySize"])
def test_reference_ignores_a_malformed_secret_and_wipes_it(field: str) -> None:
    secret = bytearray(flip(secret_record(KEY), A.layout("OVMF_MH_SECRET").offset(field)))
    helper = ReferenceHelper(bytearray(PAGE), bytearray(PAGE), secret)
    assert not helper.key_loaded
    assert secret == bytearray(len(secret))
    assert helper.dispatch(A.const("OVMF_MH_CMD_EXPORT_BEGIN"), [0, PAGE])[0] == A.const("OVMF_MH_STATUS_NO_KEY")


def test_reference_shutdown_wipes_the_key() -> None:
    helper = _reference()
    assert helper.dispatch(A.const("OVMF_MH_CMD_SHUTDOWN"), [])[0] == 0
    assert helper.shutdown_requested and not helper.key_loaded
    assert helper.dispatch(A.const("OVMF_MH_CMD_EXPORT_BEGIN"), [0, PAGE])[0] == A.const("OVMF_MH_STATUS_NO_KEY")


def test_reference_no_entropy() -> None:
    helper = _reference(salt_source=lambda n: None)
    status, _ = helper.dispatch(A.const("OVMF_MH_CMD_EXPORT_BEGIN"), [0, PAGE, 0, 0, 0, 1])
    assert status_name(status) == "NO_ENTROPY"
    assert helper.session_state == A.const("OVMF_MH_SESSION_IDLE")
    assert bytes(helper.data) == bytes(len(helper.data))


@pytest.mark.parametrize("args", [[-1], [1 << 64], [0] * 7, [0, -5, 0]])
def test_reference_refuses_what_a_mailbox_cannot_carry(args: list[int]) -> None:
    status, results = _reference().dispatch(A.const("OVMF_MH_CMD_EXPORT_BEGIN"), args)
    assert status_name(status) == "INVALID_PARAMETER"
    assert results == (0,) * 6


def test_reference_rejects_bad_buffers() -> None:
    with pytest.raises(ValueError, match="whole number of pages"):
        ReferenceHelper(bytearray(PAGE + 1), bytearray(PAGE))
    with pytest.raises(ValueError, match="writable"):
        ReferenceHelper(memoryview(bytes(PAGE)), bytearray(PAGE))


def test_reference_endpoint_with_fixed_salt_is_deterministic() -> None:
    salt = bytes(range(32))
    one, two = (ReferenceEndpoint(SPEC, salt_source=lambda n: salt) for _ in range(2))
    for ep in (one, two):
        fill(ep, 0, b"\x11" * PAGE)
    assert export(one, [[0, PAGE]]).whole == export(two, [[0, PAGE]]).whole


# --- properties: codec -------------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=U64_MAX)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)


@given(u32, u32, u64, u64, st.binary(min_size=s.SESSION_ID_SIZE, max_size=s.SESSION_ID_SIZE))
def test_record_header_round_trip(rtype: int, size: int, sequence: int, offset: int, sid: bytes) -> None:
    header = s.RecordHeader(rtype, size, sequence, offset, sid)
    packed = header.pack()
    assert len(packed) == s.RECORD_HEADER_SIZE
    assert s.decode_record_header(packed) == header


@given(u64, st.binary(min_size=s.DIGEST_SIZE, max_size=s.DIGEST_SIZE))
def test_end_payload_round_trip(count: int, digest: bytes) -> None:
    payload = s.EndPayload(count, digest)
    assert s.decode_end_payload(payload.pack()) == payload


@given(
    st.binary(min_size=s.KEY_SIZE, max_size=s.KEY_SIZE),
    st.binary(min_size=s.SALT_SIZE, max_size=s.SALT_SIZE),
    u64,
)
def test_stream_header_round_trip(key: bytes, salt: bytes, guest_size: int) -> None:
    binding = s.Binding.unbound(MIGRATION, 0, 1)
    keys = s.derive_session(key, salt, binding.pack())
    header = s.StreamCipher(keys).seal_header(salt, guest_size, binding)
    decoded = s.decode_stream_header(header)
    assert (decoded.magic, decoded.version, decoded.header_size, decoded.flags) == (
        s.STREAM_MAGIC,
        s.STREAM_VERSION,
        s.STREAM_HEADER_SIZE,
        0,
    )
    assert decoded.binding == binding
    assert (decoded.salt, decoded.session_id, decoded.guest_size) == (salt, keys.session_id, guest_size)
    verifier = s.StreamVerifier.from_header(key, header, 0)
    assert verifier.cipher.session_id == keys.session_id


_record_kinds = st.sampled_from([s.RECORD_PAGE, s.RECORD_ZERO, s.RECORD_END])


@st.composite
def records(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    rtype = draw(_record_kinds)
    plaintext = draw(st.binary(min_size=s.PAYLOAD_SIZES[rtype], max_size=s.PAYLOAD_SIZES[rtype]))
    return rtype, draw(u64), draw(u64), plaintext


_CIPHER = s.StreamCipher(s.derive_session(KEY, bytes(s.SALT_SIZE), s.Binding.unbound(MIGRATION, 0, 1).pack()))


@given(st.lists(records(), max_size=5))
def test_records_seal_split_and_open(items: list[tuple[int, int, int, bytes]]) -> None:
    sealed = [_CIPHER.seal_record(*item) for item in items]
    framed = s.split_records(b"".join(sealed))
    assert [bytes(r) for r in framed] == sealed
    for (rtype, sequence, offset, plaintext), record in zip(items, framed, strict=True):
        header = s.decode_record_header(record)
        assert (header.type, header.sequence, header.guest_offset) == (rtype, sequence, offset)
        assert header.payload_size == len(plaintext)
        assert _CIPHER.open_record(record) == plaintext


@given(st.binary(max_size=3 * s.PAGE_RECORD_SIZE))
def test_split_records_on_random_bytes(data: bytes) -> None:
    try:
        framed = s.split_records(data)
    except s.FramingError:
        return
    assert b"".join(framed) == data


@st.composite
def garbled_records(draw: st.DrawFn) -> bytes:
    """Valid record framing with random header fields and cuts."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        rtype = draw(st.sampled_from([s.RECORD_PAGE, s.RECORD_ZERO, s.RECORD_END, 0, 4, 0xFFFFFFFF]))
        size = draw(st.sampled_from([s.PAYLOAD_SIZES.get(rtype, 0), 0, 40, PAGE, 0xFFFFFFFF]))
        header = s.RecordHeader(rtype, size, draw(u64), draw(u64), bytes(16)).pack()
        parts.append(header + bytes(min(size, PAGE + 100)) + bytes(s.TAG_SIZE))
    blob = b"".join(parts)
    return blob[: draw(st.integers(0, len(blob)))]


@given(garbled_records())
def test_split_records_on_garbled_framing(data: bytes) -> None:
    try:
        framed = s.split_records(data)
    except s.FramingError:
        return
    assert b"".join(framed) == data


_STREAM_STATUSES = {s.status_code(n) for n in ("BAD_HEADER", "BAD_RECORD", "WRONG_SESSION", "SEQUENCE_GAP")} | {
    s.status_code(n) for n in ("SEQUENCE_REPLAY", "BAD_PAGE", "AUTH_FAILED", "TRUNCATED")
}


def _small_stream() -> bytes:
    helper = _reference(salt_source=lambda n: bytes(n))
    helper.window[:PAGE] = b"\x33" * PAGE
    struct.pack_into("<2Q", helper.data, 0, 0, PAGE)
    parts = []
    for command, args in (
        ("EXPORT_BEGIN", (PAGE, PAGE, 0, 2 * PAGE, 0, 1)),
        ("EXPORT_BATCH", (0, 2, PAGE, 4 * PAGE)),
        ("EXPORT_END", (PAGE, PAGE)),
    ):
        status, results = helper.dispatch(A.const(f"OVMF_MH_CMD_{command}"), args)
        assert status == 0
        parts.append(bytes(helper.data[PAGE : PAGE + results[0]]))
    return b"".join(parts)


SMALL_STREAM = _small_stream()


@given(st.lists(st.tuples(st.integers(0, len(SMALL_STREAM) - 1), st.integers(0, 7)), min_size=1, max_size=3))
def test_decode_stream_rejects_every_bit_flip(flips: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL_STREAM)
    for index, bit in flips:
        data[index] ^= 1 << bit
    if bytes(data) == SMALL_STREAM:
        return
    with pytest.raises(s.VerifyError) as error:
        s.decode_stream(KEY, data)
    assert error.value.status in _STREAM_STATUSES


@given(st.binary(max_size=2 * PAGE))
def test_decode_stream_on_random_bytes(data: bytes) -> None:
    with pytest.raises(s.VerifyError) as error:
        s.decode_stream(KEY, data)
    assert error.value.status in _STREAM_STATUSES


# --- properties: the reference dispatcher never raises -------------------------------------------

_KNOWN_STATUSES = set(STATUS_NAMES)
_commands = st.one_of(st.integers(0, 12), u32)
_args = st.lists(
    st.one_of(st.integers(0, 1 << 17), st.sampled_from([0, PAGE, U64_MAX, U64_MAX - PAGE + 1, 1 << 63]), u64),
    max_size=6,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(_commands, _args, st.binary(max_size=512), st.integers(0, 1 << 16)), max_size=12),
    st.booleans(),
)
def test_reference_dispatch_never_raises(
    calls: list[tuple[int, list[int], bytes, int]], seeded_with_stream: bool
) -> None:
    """Random commands, arguments and data-area bytes (optionally after a valid
    stream was placed in the data area): every call answers a known status."""
    helper = _reference()
    if seeded_with_stream:
        helper.data[: len(SMALL_STREAM)] = SMALL_STREAM
    for command, args, blob, at in calls:
        at = min(at, len(helper.data) - len(blob))
        helper.data[at : at + len(blob)] = blob
        status, results = helper.dispatch(command, args)
        assert status in _KNOWN_STATUSES
        assert len(results) == 6 and all(0 <= r <= U64_MAX for r in results)


# --- CHECK_PAGES (ABI 1.2; tracking opt-in since 1.3) ---------------------------------


def check_pages(ep: Endpoint, offsets: Sequence[int], expected: str = "SUCCESS") -> list[int]:
    n = len(offsets)
    put(ep, struct.pack(f"<{n}Q", *offsets), LIST_AT)
    results = expect(ep, expected, "CHECK_PAGES", LIST_AT, n, OUT_AT)
    if expected != "SUCCESS":
        return []
    flags = list(ep.data[OUT_AT : OUT_AT + n])
    assert results[0] == sum(flags)
    return flags


def test_check_pages_tells_changed_from_unchanged(endpoint: Endpoint) -> None:
    sent = [0, PAGE, 2 * PAGE, 9 * PAGE]
    fill(endpoint, 0, os.urandom(3 * PAGE))
    fill(endpoint, 9 * PAGE, bytes(PAGE))  # a ZERO record is remembered too
    export_begin(endpoint, TRACK_PAGES)
    export_batch(endpoint, sent)
    assert check_pages(endpoint, sent) == [0, 0, 0, 0]
    # One bit in one page; a page never sent in this session.
    endpoint.window[PAGE + 17] ^= 0x04
    assert check_pages(endpoint, [*sent, 5 * PAGE]) == [0, 1, 0, 0, 1]
    # Changed and changed back: the same content as sent counts as unchanged.
    endpoint.window[PAGE + 17] ^= 0x04
    assert check_pages(endpoint, [PAGE]) == [0]
    # Re-sending a changed page makes its new content the reference.
    endpoint.window[2 * PAGE] ^= 0xFF
    assert check_pages(endpoint, [2 * PAGE]) == [1]
    export_batch(endpoint, [2 * PAGE])
    assert check_pages(endpoint, [2 * PAGE]) == [0]


def test_check_pages_refuses_bad_arguments(endpoint: Endpoint) -> None:
    expect(endpoint, "BAD_STATE", "CHECK_PAGES", LIST_AT, 1, OUT_AT)
    export_begin(endpoint, TRACK_PAGES)
    expect(endpoint, "BATCH_TOO_LARGE", "CHECK_PAGES", LIST_AT, MAX_BATCH + 1, OUT_AT)
    expect(endpoint, "OUT_OF_BOUNDS", "CHECK_PAGES", 2**64 - 8, 1, OUT_AT)
    expect(endpoint, "OUT_OF_BOUNDS", "CHECK_PAGES", LIST_AT, 2, SPEC.data_size - 1)
    check_pages(endpoint, [WINDOW_PAGES * PAGE], "BAD_PAGE")
    check_pages(endpoint, [PAGE + 8], "BAD_PAGE")
    # A session that is not exporting has nothing to compare against.
    export_end(endpoint)
    expect(endpoint, "BAD_STATE", "CHECK_PAGES", LIST_AT, 1, OUT_AT)


@pytest.mark.firmware
@pytest.mark.qemu
def test_firmware_page_hash_key_does_not_outlive_its_session() -> None:
    """docs/mailbox.md: the page-hash key k = HKDF-SHA256(TK, the stream's
    salt, "ovmf-mh v1 page hash", 4096) is derived by the first tracked
    EXPORT_BATCH and wiped when the session ends. k is computed here with pyca
    and searched, 32 bytes at a time, in the firmware helper's own RAM: all
    of it there after the batch (so the search can fail, and the firmware's
    derivation is pyca's), none of it after RESET, or after EXPORT_END."""
    info = A.strings["OVMF_MH_PAGE_HASH_INFO"].encode()
    size = A.const("OVMF_MH_PAGE_HASH_KEY_SIZE")
    with FACTORIES["firmware"](SPEC) as endpoint:
        assert isinstance(endpoint, MailboxBackend)
        fill(endpoint, 0, page_content("random", 7))
        for ending in ("RESET", "EXPORT_END"):
            salt = s.decode_stream_header(export_begin(endpoint, TRACK_PAGES)).salt
            export_batch(endpoint, [0])
            key = HKDF(algorithm=hashes.SHA256(), length=size, salt=salt, info=info).derive(KEY)
            chunks = [key[at : at + 32] for at in range(0, size, 32)]
            found = [at for at, chunk in enumerate(chunks) if endpoint.memory.find(chunk) != -1]
            assert found == list(range(len(chunks))), f"page-hash key not in the helper's RAM before {ending}"
            if ending == "RESET":
                ok(endpoint, "RESET")
            else:
                export_end(endpoint)
            left = [at * 32 for at, chunk in enumerate(chunks) if endpoint.memory.find(chunk) != -1]
            assert not left, f"page-hash key bytes (offsets {left[:8]}) left in the helper's RAM after {ending}"


def test_check_pages_needs_a_tracked_export(endpoint: Endpoint) -> None:
    """Without TRACK_PAGES the session keeps nothing to compare against: the
    check is refused (never answered "unchanged"), the stream is unaffected,
    and the next export may ask for tracking."""
    fill(endpoint, 0, os.urandom(2 * PAGE))
    header = export_begin(endpoint)
    batch = export_batch(endpoint, [0, PAGE])
    put(endpoint, struct.pack("<Q", 0), LIST_AT)
    expect(endpoint, "BAD_STATE", "CHECK_PAGES", LIST_AT, 1, OUT_AT)
    assert session_state(endpoint) == "EXPORTING"
    stream = Stream(header, [batch], export_end(endpoint))
    reference = ReferenceEndpoint(SPEC)
    assert import_stream(reference, stream) == 2
    export_begin(endpoint, TRACK_PAGES)
    export_batch(endpoint, [0])
    assert check_pages(endpoint, [0, PAGE]) == [0, 1]


@pytest.mark.parametrize("flags", [0x4, 0x80, 1 << 63, U64_MAX])
def test_export_begin_refuses_unknown_flags(endpoint: Endpoint, flags: int) -> None:
    sentinel = b"\x5a" * s.STREAM_HEADER_SIZE
    put(endpoint, sentinel)
    args = (OUT_AT, s.STREAM_HEADER_SIZE, flags, BIND_AT, 0, 1)
    assert expect(endpoint, "INVALID_PARAMETER", "EXPORT_BEGIN", *args) == (0,) * 6
    assert bytes(endpoint.data[OUT_AT : OUT_AT + len(sentinel)]) == sentinel
    assert session_state(endpoint) == "IDLE"
    export_begin(endpoint, TRACK_PAGES)


# --- binding a stream to a migration (ABI 2.0) -------------------------------------------------

BOUND = A.const("OVMF_MH_EXPORT_BOUND")
RECEIPT_AT = 2 * PAGE


def challenge(ep: Endpoint) -> bytes:
    written = ok(ep, "IMPORT_CHALLENGE", OUT_AT, s.CHALLENGE_SIZE)[0]
    assert written == s.CHALLENGE_SIZE
    return bytes(ep.data[OUT_AT : OUT_AT + written])


def receipt(ep: Endpoint) -> bytes:
    written = ok(ep, "IMPORT_RECEIPT", RECEIPT_AT, s.RECEIPT_SIZE)[0]
    assert written == s.RECEIPT_SIZE
    return bytes(ep.data[RECEIPT_AT : RECEIPT_AT + written])


def commit(ep: Endpoint, receipts: Sequence[bytes], expected: str = "SUCCESS") -> tuple[int, ...]:
    return expect(ep, expected, "IMPORT_COMMIT", *put(ep, b"".join(receipts), RECEIPT_AT))


def bound_export(source: Endpoint, nonces: Sequence[bytes], index: int, pages: Sequence[int]) -> Stream:
    header = export_begin(source, BOUND, b"".join(nonces), (index, len(nonces)))
    return Stream(header, [export_batch(source, pages)], export_end(source))


def import_shard(target: Endpoint, stream: Stream, shard: tuple[int, int], begin: str = "SUCCESS") -> None:
    send(target, "IMPORT_BEGIN", stream.header, begin, shard)
    if begin == "SUCCESS":
        for batch in stream.batches:
            send(target, "IMPORT_BATCH", batch)
        send(target, "IMPORT_END", stream.end)


@pytest.fixture(params=[_param([name]) for name in IMPLEMENTATIONS])
def small_target(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    """A helper of each implementation whose guest window is half of SPEC's."""
    (name,) = request.param
    with FACTORIES[name](EndpointSpec(SPEC.window_size // 2, SPEC.data_size, KEY)) as ep:
        yield ep


def test_header_of_another_guest_size_is_refused(small_target: Endpoint) -> None:
    source = ReferenceEndpoint(SPEC)
    fill(source, 0, os.urandom(PAGE))
    stream = export(source, [[0]])
    before = scramble(small_target)
    results = send(small_target, "IMPORT_BEGIN", stream.header, "GUEST_SIZE_MISMATCH")
    assert results[0] == SPEC.window_size
    assert session_state(small_target) == "FAILED"
    send(small_target, "IMPORT_BATCH", stream.batches[0], "SESSION_FAILED")
    assert bytes(small_target.window) == before


@pytest.mark.parametrize("shard", [(1, 2), (0, 2), (0, 0), (1, 1)])
def test_header_of_another_shard_is_refused(scenario: Scenario, shard: tuple[int, int]) -> None:
    send(scenario.target, "IMPORT_BEGIN", scenario.stream.header, "WRONG_SHARD", shard)
    assert session_state(scenario.target) == "FAILED"
    assert bytes(scenario.target.window) == scenario.target_before


def test_bound_stream_round_trip_and_commit(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    fill(source, 0, os.urandom(PAGE))
    nonce = challenge(target)
    stream = bound_export(source, [nonce], 0, [0, PAGE])
    header = s.decode_stream_header(stream.header)
    assert header.flags == s.STREAM_BOUND and header.target_nonce == nonce
    assert header.migration_id == hashlib.sha256(nonce).digest() == s.migration_id([nonce])
    assert (header.shard_index, header.shard_count) == (0, 1)
    import_shard(target, stream, (0, 1))
    assert page_at(target, 0) == page_at(source, 0)
    mine = receipt(target)
    decoded = s.Receipt.decode(mine)
    assert (decoded.migration_id, decoded.shard_index, decoded.shard_count, decoded.flags) == (
        header.migration_id, 0, 1, s.STREAM_BOUND)
    assert decoded.record_count == 2
    assert decoded.mac == s.receipt_mac(KEY, decoded)  # pyca HKDF and hmac: an independent check
    assert commit(target, [mine])[0] == 1
    assert session_state(target) == "COMPLETE"


def test_every_challenge_is_fresh(endpoint: Endpoint) -> None:
    assert len({challenge(endpoint) for _ in range(4)}) == 4


def test_old_complete_stream_replayed_to_a_fresh_session(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    fill(source, 0, os.urandom(PAGE))
    old = bound_export(source, [challenge(target)], 0, [0])
    import_shard(target, old, (0, 1))
    ok(target, "RESET")
    scramble(target)
    before = bytes(target.window)
    challenge(target)
    import_shard(target, old, (0, 1), "NONCE_MISMATCH")
    assert session_state(target) == "FAILED"
    assert bytes(target.window) == before


def test_unbound_stream_after_a_challenge(scenario: Scenario) -> None:
    challenge(scenario.target)
    send(scenario.target, "IMPORT_BEGIN", scenario.stream.header, "UNBOUND_STREAM")
    assert session_state(scenario.target) == "FAILED"


def test_bound_stream_without_a_challenge(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    stream = bound_export(source, [os.urandom(s.CHALLENGE_SIZE)], 0, [0])
    import_shard(target, stream, (0, 1), "NONCE_MISMATCH")


def test_a_challenge_serves_one_import_begin(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    source, target = endpoint_pair
    stream = bound_export(source, [challenge(target)], 0, [0])
    send(target, "IMPORT_BEGIN", flip(stream.header, 0), "BAD_HEADER")
    ok(target, "RESET")
    import_shard(target, stream, (0, 1), "NONCE_MISMATCH")
    ok(target, "RESET")
    challenge(target)
    ok(target, "RESET")  # RESET drops a challenge too
    import_shard(target, stream, (0, 1), "NONCE_MISMATCH")


def test_receipt_and_commit_need_a_completed_import(endpoint: Endpoint) -> None:
    expect(endpoint, "BAD_STATE", "IMPORT_RECEIPT", RECEIPT_AT, s.RECEIPT_SIZE)
    export(endpoint, [[0]])  # COMPLETE after an export: nothing to vouch for
    expect(endpoint, "BAD_STATE", "IMPORT_RECEIPT", RECEIPT_AT, s.RECEIPT_SIZE)
    expect(endpoint, "BAD_STATE", "IMPORT_COMMIT", RECEIPT_AT, s.RECEIPT_SIZE)


def test_receipts_are_the_same_bytes_in_every_implementation(endpoint: Endpoint) -> None:
    source = ReferenceEndpoint(SPEC)
    fill(source, 0, os.urandom(PAGE))
    stream = export(source, [[0, PAGE, 2 * PAGE]])
    reference = ReferenceEndpoint(SPEC)
    import_stream(reference, stream)
    import_stream(endpoint, stream)
    assert receipt(endpoint) == receipt(reference)
    expect(endpoint, "BUFFER_TOO_SMALL", "IMPORT_RECEIPT", RECEIPT_AT, s.RECEIPT_SIZE - 1)
    expect(endpoint, "INVALID_PARAMETER", "IMPORT_COMMIT", RECEIPT_AT, s.RECEIPT_SIZE + 1)
    assert session_state(endpoint) == "COMPLETE"


@dataclass
class TwoShards:
    """A bound two-shard migration: the endpoint under test is target 0 (the
    committer), reference helpers are the sources and target 1."""

    target0: Endpoint
    target1: Endpoint
    nonces: list[bytes]
    streams: list[Stream]


@pytest.fixture
def two_shards(endpoint: Endpoint) -> TwoShards:
    target1 = ReferenceEndpoint(SPEC)
    nonces = [challenge(endpoint), challenge(target1)]
    sources = [ReferenceEndpoint(SPEC), ReferenceEndpoint(SPEC)]
    for source in sources:
        fill(source, 0, os.urandom(2 * PAGE))
    streams = [bound_export(sources[0], nonces, 0, [0]), bound_export(sources[1], nonces, 1, [PAGE])]
    return TwoShards(endpoint, target1, nonces, streams)


def _import_both(m: TwoShards) -> list[bytes]:
    import_shard(m.target0, m.streams[0], (0, 2))
    import_shard(m.target1, m.streams[1], (1, 2))
    return [receipt(m.target0), receipt(m.target1)]


def test_two_shards_commit(two_shards: TwoShards) -> None:
    receipts = _import_both(two_shards)
    assert commit(two_shards.target0, receipts)[0] == 2


def test_dropped_shard_with_count_fixed_up(two_shards: TwoShards) -> None:
    """The host drops shard 1 and tells target 0 there is one shard."""
    import_shard(two_shards.target0, two_shards.streams[0], (0, 1), "WRONG_SHARD")


@pytest.mark.parametrize("case", ["dropped", "duplicated", "swapped"])
def test_commit_refuses_a_dropped_or_duplicated_shard(two_shards: TwoShards, case: str) -> None:
    r0, r1 = _import_both(two_shards)
    receipts = {"dropped": [r0, r0], "duplicated": [r0, r0], "swapped": [r1, r0]}[case]
    if case == "dropped":
        # One receipt where two are due: the size, an argument check.
        commit(two_shards.target0, [r0], "INVALID_PARAMETER")
        assert session_state(two_shards.target0) == "COMPLETE"
    commit(two_shards.target0, receipts, "WRONG_SHARD")
    assert session_state(two_shards.target0) == "FAILED"


def test_commit_refuses_a_shard_of_another_migration(two_shards: TwoShards) -> None:
    r0, _ = _import_both(two_shards)
    # Target 1 takes part in another migration; its genuine receipt there is no use here.
    other_nonces = [os.urandom(s.CHALLENGE_SIZE), challenge(two_shards.target1)]
    other = ReferenceEndpoint(SPEC)
    import_shard(two_shards.target1, bound_export(other, other_nonces, 1, [PAGE]), (1, 2))
    commit(two_shards.target0, [r0, receipt(two_shards.target1)], "WRONG_MIGRATION")


def test_substituted_shard_is_refused_at_import(two_shards: TwoShards) -> None:
    """Shard 1 of another export bound to other nonces: target 1 refuses it."""
    other = bound_export(ReferenceEndpoint(SPEC), [two_shards.nonces[0], os.urandom(s.CHALLENGE_SIZE)], 1, [0])
    import_shard(two_shards.target1, other, (1, 2), "NONCE_MISMATCH")


@pytest.mark.parametrize("field", ["RecordCount", "ChainDigest", "Mac", "Reserved"])
@pytest.mark.parametrize("whose", [0, 1])
def test_commit_refuses_a_forged_receipt(two_shards: TwoShards, field: str, whose: int) -> None:
    receipts = _import_both(two_shards)
    receipts[whose] = flip(receipts[whose], s.RECEIPT.offset(field))
    expected = "WRONG_MIGRATION" if field == "Reserved" else "BAD_RECEIPT"
    commit(two_shards.target0, receipts, expected)


def test_commit_refuses_receipts_under_another_key(two_shards: TwoShards) -> None:
    r0, r1 = _import_both(two_shards)
    forged = s.Receipt.decode(r1)
    forged = dataclasses.replace(forged, mac=s.receipt_mac(OTHER_KEY, forged))
    commit(two_shards.target0, [r0, forged.pack()], "BAD_RECEIPT")


# --- commit proof (ABI 4.1) --------------------------------------------------------

PROOF_AT = 3 * PAGE


def commit_proof(ep: Endpoint, expected: str = "SUCCESS") -> bytes:
    results = expect(ep, expected, "IMPORT_COMMIT_PROOF", PROOF_AT, cp.PROOF_SIZE)
    if expected != "SUCCESS":
        return b""
    assert results[0] == cp.PROOF_SIZE
    return bytes(ep.data[PROOF_AT : PROOF_AT + cp.PROOF_SIZE])


def verify_commit(ep: Endpoint, proof: bytes, receipts: Sequence[bytes], expected: str = "SUCCESS") -> tuple[int, ...]:
    return expect(ep, expected, "EXPORT_VERIFY_COMMIT", *put(ep, proof + b"".join(receipts), PROOF_AT))


@dataclass
class Committed:
    """A bound two-shard migration through commit: source 0 and target 0 are
    the pair under test, shard 1 runs on reference helpers."""

    sources: list[Endpoint]
    targets: list[Endpoint]
    nonces: list[bytes]
    receipts: list[bytes]
    proof: bytes


def _migrate_two_shards(sources: Sequence[Endpoint], targets: Sequence[Endpoint]) -> Committed:
    nonces = [challenge(t) for t in targets]
    for index, source in enumerate(sources):
        fill(source, 0, os.urandom(2 * PAGE))
        import_shard(targets[index], bound_export(source, nonces, index, [0, PAGE]), (index, 2))
    receipts = [receipt(t) for t in targets]
    assert commit(targets[0], receipts)[0] == 2
    return Committed(list(sources), list(targets), nonces, receipts, commit_proof(targets[0]))


@pytest.fixture
def committed(endpoint_pair: tuple[Endpoint, Endpoint]) -> Committed:
    source, target = endpoint_pair
    return _migrate_two_shards([source, ReferenceEndpoint(SPEC)], [target, ReferenceEndpoint(SPEC)])


def test_commit_proof_is_verified_by_every_source(committed: Committed) -> None:
    proof = cp.CommitProof.decode(committed.proof)
    header_binding = s.Binding.bound(committed.nonces, 0)
    assert (proof.migration_id, proof.shard_count, proof.flags, proof.outcome, proof.reserved) == (
        header_binding.migration_id, 2, s.STREAM_BOUND, cp.OUTCOME_COMMITTED, 0)
    # pyca HKDF and hmac, hashlib: an independent check of the MAC and the digest.
    assert proof.mac == cp.proof_mac(KEY, proof)
    assert proof.receipts_digest == hashlib.sha256(cp.RECEIPTS_LABEL + b"".join(committed.receipts)).digest()
    for source in committed.sources:
        assert verify_commit(source, committed.proof, committed.receipts)[0] == 2
        assert session_state(source) == "COMPLETE"
    assert commit_proof(committed.targets[0]) == committed.proof  # same bytes when asked again


def test_commit_proof_is_the_same_bytes_in_every_implementation(committed: Committed) -> None:
    binding = s.Binding.bound(committed.nonces, 0)
    assert committed.proof == cp.make_proof(KEY, binding, b"".join(committed.receipts)).pack()


def test_commit_proof_needs_a_passed_commit(endpoint: Endpoint) -> None:
    commit_proof(endpoint, "BAD_STATE")  # IDLE
    export(endpoint, [[0]])
    commit_proof(endpoint, "BAD_STATE")  # COMPLETE after an export
    source = ReferenceEndpoint(SPEC)
    stream = bound_export(source, [challenge(endpoint)], 0, [0])
    import_shard(endpoint, stream, (0, 1))
    commit_proof(endpoint, "BAD_STATE")  # imported, not committed
    mine = receipt(endpoint)
    commit(endpoint, [mine])
    expect(endpoint, "OUT_OF_BOUNDS", "IMPORT_COMMIT_PROOF", SPEC.data_size - 10, cp.PROOF_SIZE)
    expect(endpoint, "BUFFER_TOO_SMALL", "IMPORT_COMMIT_PROOF", PROOF_AT, cp.PROOF_SIZE - 1)
    assert verify_commit(source, commit_proof(endpoint), [mine])[0] == 1
    challenge(endpoint)  # a new session ends what the last commit proved
    commit_proof(endpoint, "BAD_STATE")


def test_failed_commit_gives_no_proof(two_shards: TwoShards) -> None:
    r0, r1 = _import_both(two_shards)
    commit(two_shards.target0, [r0, flip(r1, s.RECEIPT.offset("Mac"))], "BAD_RECEIPT")
    commit_proof(two_shards.target0, "SESSION_FAILED")
    ok(two_shards.target0, "RESET")
    commit_proof(two_shards.target0, "BAD_STATE")


def test_verify_commit_needs_a_completed_export(endpoint: Endpoint) -> None:
    size = cp.PROOF_SIZE + s.RECEIPT_SIZE
    expect(endpoint, "BAD_STATE", "EXPORT_VERIFY_COMMIT", PROOF_AT, size)  # IDLE
    source = ReferenceEndpoint(SPEC)
    import_shard(endpoint, bound_export(source, [challenge(endpoint)], 0, [0]), (0, 1))
    expect(endpoint, "BAD_STATE", "EXPORT_VERIFY_COMMIT", PROOF_AT, size)  # COMPLETE after an import
    export_begin(endpoint)
    expect(endpoint, "BAD_STATE", "EXPORT_VERIFY_COMMIT", PROOF_AT, size)  # EXPORTING
    export_end(endpoint)
    ok(endpoint, "RESET")
    expect(endpoint, "BAD_STATE", "EXPORT_VERIFY_COMMIT", PROOF_AT, size)  # RESET forgets the export


def _proof_field(name: str, value: int | bytes, remac: bool) -> Callable[[Committed], tuple[bytes, list[bytes]]]:
    def lie(m: Committed) -> tuple[bytes, list[bytes]]:
        fields: dict[str, Any] = {name: value}
        proof = dataclasses.replace(cp.CommitProof.decode(m.proof), **fields)
        if remac:  # only a holder of TK could: checks the field itself, behind the MAC
            proof = dataclasses.replace(proof, mac=cp.proof_mac(KEY, proof))
        return proof.pack(), m.receipts
    return lie


def _made_up(m: Committed) -> tuple[bytes, list[bytes]]:
    """A fake target that imported nothing: it knows the migration id (the
    nonces it sent), the shard count and the flags, not TK."""
    proof = cp.CommitProof(s.migration_id(m.nonces), 2, s.STREAM_BOUND, os.urandom(s.DIGEST_SIZE),
                           mac=os.urandom(s.DIGEST_SIZE))
    return proof.pack(), m.receipts


def _under_other_key(m: Committed) -> tuple[bytes, list[bytes]]:
    proof = cp.CommitProof.decode(m.proof)
    return dataclasses.replace(proof, mac=cp.proof_mac(OTHER_KEY, proof)).pack(), m.receipts


def _receipt_swapped(m: Committed) -> tuple[bytes, list[bytes]]:
    """The receipts the proof covers, but one changed on the way."""
    return m.proof, [m.receipts[0], flip(m.receipts[1], s.RECEIPT.offset("ChainDigest"))]


def _receipt_mac_made_by_proof_key(m: Committed) -> tuple[bytes, list[bytes]]:
    """A receipt key is not the commit key: a proof MACed like a receipt fails."""
    proof = cp.CommitProof.decode(m.proof)
    key = HKDF(algorithm=hashes.SHA256(), length=s.KEY_SIZE, salt=proof.migration_id,
               info=s.RECEIPT_INFO).derive(KEY)
    return dataclasses.replace(proof, mac=hmac.new(key, proof.body(), hashlib.sha256).digest()).pack(), m.receipts


def _another_stream_of_this_shard(m: Committed) -> tuple[bytes, list[bytes]]:
    """Target 0 (holding TK) committed another stream of shard 0 of this
    migration (another export of the same nonces): the proof is genuine, but
    not for the stream this source sent."""
    other = ReferenceEndpoint(SPEC)
    fill(other, 0, os.urandom(PAGE))
    stream = bound_export(other, m.nonces, 0, [0])
    target = ReferenceEndpoint(SPEC, salt_source=lambda n: m.nonces[0][:n])  # draws target 0's nonce again
    assert challenge(target) == m.nonces[0]
    import_shard(target, stream, (0, 2))
    receipts = [receipt(target), m.receipts[1]]
    assert commit(target, receipts)[0] == 2
    return commit_proof(target), receipts


PROOF_LIES: dict[str, tuple[Callable[[Committed], tuple[bytes, list[bytes]]], str]] = {
    "made up by a target that imported nothing": (_made_up, "BAD_COMMIT_PROOF"),
    "MAC flipped": (lambda m: (flip(m.proof, cp.PROOF.offset("Mac")), m.receipts), "BAD_COMMIT_PROOF"),
    "MAC under another key": (_under_other_key, "BAD_COMMIT_PROOF"),
    "MAC under the receipt key": (_receipt_mac_made_by_proof_key, "BAD_COMMIT_PROOF"),
    "outcome changed": (_proof_field("outcome", 2, False), "BAD_COMMIT_PROOF"),
    "outcome not committed, MACed": (_proof_field("outcome", 0, True), "BAD_COMMIT_PROOF"),
    "receipt digest changed": (lambda m: (flip(m.proof, cp.PROOF.offset("ReceiptsDigest")), m.receipts),
                               "BAD_COMMIT_PROOF"),
    "a receipt changed on the way": (_receipt_swapped, "BAD_COMMIT_PROOF"),
    "migration id": (_proof_field("migration_id", os.urandom(s.MIGRATION_ID_SIZE), True), "WRONG_MIGRATION"),
    "shard count": (_proof_field("shard_count", 1, True), "WRONG_MIGRATION"),
    "flags": (_proof_field("flags", 0, True), "WRONG_MIGRATION"),
    "reserved": (_proof_field("reserved", 1, True), "WRONG_MIGRATION"),
    "receipts swapped, MACed": (lambda m: (cp.make_proof(KEY, s.Binding.bound(m.nonces, 0), b"".join(
        m.receipts[::-1])).pack(), m.receipts[::-1]), "WRONG_SHARD"),
    "another stream of this shard, MACed": (_another_stream_of_this_shard, "BAD_RECEIPT"),
}


@pytest.mark.parametrize("case", list(PROOF_LIES))
def test_verify_commit_refuses_a_proof_that_does_not_prove(committed: Committed, case: str) -> None:
    """Every refusal leaves the export as it was: the genuine proof still verifies."""
    make, expected = PROOF_LIES[case]
    proof, receipts = make(committed)
    source = committed.sources[0]
    assert verify_commit(source, proof, receipts, expected) == (0,) * 6
    assert session_state(source) == "COMPLETE"
    assert verify_commit(source, committed.proof, committed.receipts)[0] == 2


def test_verify_commit_refuses_a_replayed_proof(endpoint: Endpoint) -> None:
    """The proof of an earlier, complete migration of the same guest between
    the same helpers does not prove the next one."""
    sources = [endpoint, ReferenceEndpoint(SPEC)]
    targets = [ReferenceEndpoint(SPEC), ReferenceEndpoint(SPEC)]
    old = _migrate_two_shards(sources, targets)
    for ep in targets:
        ok(ep, "RESET")
    new = _migrate_two_shards(sources, targets)
    verify_commit(endpoint, old.proof, old.receipts, "WRONG_MIGRATION")
    # The old receipts under a proof of the new migration id: only TK could MAC it; the receipts still say old.
    relabel = cp.make_proof(KEY, s.Binding.bound(new.nonces, 0), b"".join(old.receipts))
    verify_commit(endpoint, relabel.pack(), old.receipts, "WRONG_MIGRATION")
    assert verify_commit(endpoint, new.proof, new.receipts)[0] == 2


def test_verify_commit_wrong_size(committed: Committed) -> None:
    source = committed.sources[0]
    verify_commit(source, committed.proof, committed.receipts[:1], "INVALID_PARAMETER")
    verify_commit(source, committed.proof + b"\0", committed.receipts, "INVALID_PARAMETER")
    assert session_state(source) == "COMPLETE"


# --- zero ranges (ABI 2.1) --------------------------------------------------------

RANGE_AT = LIST_AT  # range lists (at most MAX_ZERO_RANGES * 16 bytes = one page)
BLOCK = s.SHARD_BLOCK_PAGES


def zero_ranges_call(ep: Endpoint, ranges: Sequence[tuple[int, int]], expected: str = "SUCCESS",
                     capacity: int | None = None) -> tuple[int, ...]:
    """EXPORT_ZERO_RANGES of (guest offset, page count) entries."""
    flat = [v for entry in ranges for v in entry]
    put(ep, struct.pack(f"<{len(flat)}Q", *flat), RANGE_AT)
    room = len(ranges) * s.ZERO_RANGE_RECORD_SIZE if capacity is None else capacity
    return expect(ep, expected, "EXPORT_ZERO_RANGES", RANGE_AT, len(ranges), OUT_AT, room)


def export_zero_ranges(ep: Endpoint, ranges: Sequence[tuple[int, int]]) -> bytes:
    written, records, pages = zero_ranges_call(ep, ranges)[:3]
    assert (written, records, pages) == (len(ranges) * s.ZERO_RANGE_RECORD_SIZE, len(ranges),
                                         sum(n for _, n in ranges))
    batch = bytes(ep.data[OUT_AT : OUT_AT + written])
    assert [s.decode_record_header(r).type for r in s.split_records(batch)] == [s.RECORD_ZERO_RANGE] * len(ranges)
    return batch


#: (guest offset, pages) zero ranges of the round trip: a whole block, a run
#: in the middle of block 1, the window's last page.
RANGES = [(0, BLOCK), ((BLOCK + 3) * PAGE, 100), ((WINDOW_PAGES - 1) * PAGE, 1)]
#: Pages with content, outside RANGES.
DATA_PAGES = [(BLOCK + 1) * PAGE, (BLOCK + 200) * PAGE, (WINDOW_PAGES - 2) * PAGE]


def _zero_range_stream(source: Endpoint, flags: int = 0) -> Stream:
    for offset in DATA_PAGES:
        fill(source, offset, os.urandom(PAGE))
    header = export_begin(source, flags)
    batches = [export_zero_ranges(source, RANGES[:2]), export_batch(source, DATA_PAGES),
               export_zero_ranges(source, RANGES[2:])]
    return Stream(header, batches, export_end(source))


def test_zero_range_round_trip(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """Ranges and pages interleaved in one stream; the target's stale pages in
    every range end zero, counted as imported pages, and the END record counts
    one record per range."""
    source, target = endpoint_pair
    stream = _zero_range_stream(source)
    scramble(target)
    send(target, "IMPORT_BEGIN", stream.header)
    first = send(target, "IMPORT_BATCH", stream.batches[0])
    assert first[:5] == (2, 0, 0, 2, BLOCK + 100)
    assert send(target, "IMPORT_BATCH", stream.batches[1])[:5] == (3, 3, 0, 0, 0)
    assert send(target, "IMPORT_BATCH", stream.batches[2])[:5] == (1, 0, 0, 1, 1)
    assert send(target, "IMPORT_END", stream.end)[0] == len(RANGES) + len(DATA_PAGES)
    for offset, pages in RANGES:
        assert bytes(target.window[offset : offset + pages * PAGE]) == bytes(pages * PAGE), hex(offset)
    for offset in DATA_PAGES:
        assert page_at(target, offset) == page_at(source, offset)
    decoded = s.decode_stream(KEY, stream.whole)
    assert [(r.guest_offset, r.pages) for r in decoded.records if r.zero_range] == RANGES


def _data_pages(path: Path) -> list[int]:
    """Offsets of the pages a sparse file holds data for (SEEK_DATA/SEEK_HOLE)."""
    found: list[int] = []
    size = path.stat().st_size
    with path.open("rb") as f:
        position = 0
        while position < size:
            try:
                start = os.lseek(f.fileno(), position, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            found.extend(range(start - start % PAGE, stop, PAGE))
            position = stop
    return found


@pytest.mark.parametrize("implementation", ["reference", "host-core"])
def test_zero_range_keeps_a_sparse_target_sparse(tmp_path: Path, implementation: str) -> None:
    """Verify, then write: a range over pages that are zero already writes
    nothing, so a sparse target RAM file stays sparse there; a stale page
    in a range is zeroed (its block stays allocated, holding zeros)."""
    stream = _zero_range_stream(ReferenceEndpoint(SPEC))
    ram = tmp_path / "target.ram"
    with ram.open("wb") as new:
        new.truncate(SPEC.window_size)
    stale = RANGES[1][0] + 7 * PAGE
    with ram.open("r+b") as f, mmap.mmap(f.fileno(), SPEC.window_size) as window:
        window[stale : stale + PAGE] = b"\x01" * PAGE
        ep: Any = (ReferenceBackend(window, KEY, SPEC.data_size) if implementation == "reference"
                   else HostCoreHelper(window, KEY, data_size=SPEC.data_size))
        try:
            assert import_stream(ep, stream) == len(RANGES) + len(DATA_PAGES)
            assert bytes(window[stale : stale + PAGE]) == bytes(PAGE)
        finally:
            if implementation == "host-core":
                ep.close()
            else:
                ep.release()
        window.flush()
    assert _data_pages(ram) == sorted([stale, *DATA_PAGES])


def test_zero_range_refused_when_not_zero(endpoint_pair: tuple[Endpoint, Endpoint]) -> None:
    """A range the host calls empty that holds one byte: NOT_ZERO, nothing
    written, no sequence number used; the export goes on."""
    source, target = endpoint_pair
    liar = (BLOCK + 10) * PAGE
    fill(source, liar + PAGE - 1, b"\x01")
    header = export_begin(source)
    before = bytes(source.data[OUT_AT : OUT_AT + 4 * s.ZERO_RANGE_RECORD_SIZE])
    results = zero_ranges_call(source, [(0, 8), (BLOCK * PAGE, 64)], "NOT_ZERO")
    assert results[0] == liar
    assert bytes(source.data[OUT_AT : OUT_AT + 4 * s.ZERO_RANGE_RECORD_SIZE]) == before
    assert session_state(source) == "EXPORTING"
    stream = Stream(header, [export_zero_ranges(source, [(0, 8)]), export_batch(source, [liar])], export_end(source))
    scramble(target)
    assert import_stream(target, stream) == 2
    assert page_at(target, liar) == page_at(source, liar)


#: EXPORT_ZERO_RANGES argument refusals: (ranges, capacity or None, shard, status).
ZERO_RANGE_ARGUMENTS: dict[str, tuple[list[tuple[int, int]], int | None, tuple[int, int], str]] = {
    "empty range": ([(0, 1), (PAGE, 0)], None, (0, 1), "INVALID_PARAMETER"),
    "misaligned": ([(PAGE + 8, 1)], None, (0, 1), "BAD_PAGE"),
    "starts outside the window": ([(WINDOW_PAGES * PAGE, 1)], None, (0, 1), "BAD_PAGE"),
    "ends outside the window": ([((WINDOW_PAGES - 2) * PAGE, 3)], None, (0, 1), "BAD_PAGE"),
    "wrapping count": ([(PAGE, U64_MAX)], None, (0, 1), "BAD_PAGE"),
    "crosses a block": ([((BLOCK - 1) * PAGE, 2)], None, (0, 1), "RANGE_OUTSIDE_SHARD"),
    "longer than a block": ([(0, BLOCK + 1)], None, (0, 1), "RANGE_OUTSIDE_SHARD"),
    "another shard's block": ([(0, 1)], None, (1, 2), "RANGE_OUTSIDE_SHARD"),
    "capacity": ([(0, 1), (PAGE, 1)], 2 * s.ZERO_RANGE_RECORD_SIZE - 1, (0, 1), "BUFFER_TOO_SMALL"),
}


@pytest.mark.parametrize("case", list(ZERO_RANGE_ARGUMENTS))
def test_zero_range_arguments(endpoint: Endpoint, case: str) -> None:
    ranges, capacity, shard, expected = ZERO_RANGE_ARGUMENTS[case]
    export_begin(endpoint, shard=shard)
    endpoint.data[OUT_AT : OUT_AT + PAGE] = b"\xa5" * PAGE
    zero_ranges_call(endpoint, ranges, expected, capacity)
    assert bytes(endpoint.data[OUT_AT : OUT_AT + PAGE]) == b"\xa5" * PAGE, "output written after a refusal"
    assert session_state(endpoint) == "EXPORTING"
    assert export_end(endpoint)  # the session is intact


def test_zero_range_state_count_and_bounds(endpoint: Endpoint) -> None:
    expect(endpoint, "BAD_STATE", "EXPORT_ZERO_RANGES", RANGE_AT, 1, OUT_AT, s.ZERO_RANGE_RECORD_SIZE)
    export_begin(endpoint)
    expect(endpoint, "BATCH_TOO_LARGE", "EXPORT_ZERO_RANGES", RANGE_AT, s.MAX_ZERO_RANGES + 1, OUT_AT, 1 << 20)
    size = len(endpoint.data)
    expect(endpoint, "OUT_OF_BOUNDS", "EXPORT_ZERO_RANGES", size - 8, 1, OUT_AT, s.ZERO_RANGE_RECORD_SIZE)
    expect(endpoint, "OUT_OF_BOUNDS", "EXPORT_ZERO_RANGES", RANGE_AT, 1, size - 8, s.ZERO_RANGE_RECORD_SIZE)
    # The largest list: MAX_ZERO_RANGES one-page ranges, in two blocks of the one shard.
    assert zero_ranges_call(endpoint, [(i * PAGE, 1) for i in range(s.MAX_ZERO_RANGES)])[1] == s.MAX_ZERO_RANGES


def test_zero_range_is_tracked_for_check_pages(endpoint: Endpoint) -> None:
    """Pages sealed in a range are remembered as zero: CHECK_PAGES reports
    exactly the one written afterwards."""
    export_begin(endpoint, TRACK_PAGES)
    export_zero_ranges(endpoint, [(0, 16)])
    fill(endpoint, 5 * PAGE + 100, b"\x07")
    offsets = [i * PAGE for i in range(16)]
    put(endpoint, struct.pack("<16Q", *offsets), LIST_AT)
    assert ok(endpoint, "CHECK_PAGES", LIST_AT, 16, OUT_AT)[0] == 1
    assert bytes(endpoint.data[OUT_AT : OUT_AT + 16]) == bytes(5) + b"\x01" + bytes(10)


def _forged_zero_range(header: bytes, sequence: int, offset: int, pages: int) -> bytes:
    """A ZERO_RANGE record sealed with the stream's key, as only a helper
    holding the transport key could: for the checks after the tag."""
    h = s.decode_stream_header(header)
    cipher = s.StreamCipher(s.derive_session(KEY, h.salt, h.binding.pack()))
    return cipher.seal_record(s.RECORD_ZERO_RANGE, sequence, offset, struct.pack("<Q", pages))


#: Authenticated ZERO_RANGE records a source helper would never seal: (offset, pages, shard, status).
FORGED_RANGES: dict[str, tuple[int, int, tuple[int, int], str]] = {
    "no pages": (0, 0, (0, 1), "BAD_RECORD"),
    "leaves the window": ((WINDOW_PAGES - 1) * PAGE, 2, (0, 1), "BAD_PAGE"),
    "crosses a block": ((BLOCK - 1) * PAGE, 2, (0, 1), "RANGE_OUTSIDE_SHARD"),
    "another shard's block": (0, 4, (1, 2), "RANGE_OUTSIDE_SHARD"),
}


@pytest.mark.parametrize("case", list(FORGED_RANGES))
def test_target_refuses_a_misplaced_zero_range(endpoint_pair: tuple[Endpoint, Endpoint], case: str) -> None:
    offset, pages, shard, expected = FORGED_RANGES[case]
    source, target = endpoint_pair
    header = export_begin(source, shard=shard)
    good = export_zero_ranges(source, [(BLOCK * PAGE if shard == (1, 2) else 2 * PAGE, 1)])
    before = scramble(target)
    send(target, "IMPORT_BEGIN", header, shard=shard)
    results = send(target, "IMPORT_BATCH", good + _forged_zero_range(header, 2, offset, pages), expected)
    assert results[:5] == (1, 0, 2, 1, 1)
    window = bytearray(before)
    applied = s.split_records(good)[0]
    start = s.decode_record_header(applied).guest_offset
    window[start : start + PAGE] = bytes(PAGE)
    assert bytes(target.window) == bytes(window), "guest written by a refused range"
    assert session_state(target) == "FAILED"


def _field_lie(name: str, value: int | bytes) -> Callable[[bytes], bytes]:
    return lambda record: with_field(record, **{name: value})


#: Lies in a ZERO_RANGE record's fields, checked before the tag or by it.
ZERO_RANGE_LIES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "type ZERO": (_field_lie("Type", s.RECORD_ZERO), "BAD_RECORD"),
    "type PAGE": (_field_lie("Type", s.RECORD_PAGE), "BAD_RECORD"),
    "type END": (_field_lie("Type", s.RECORD_END), "BAD_RECORD"),
    "unknown type": (_field_lie("Type", 5), "BAD_RECORD"),
    "payload size 0": (_field_lie("PayloadSize", 0), "BAD_RECORD"),
    "payload size 16": (_field_lie("PayloadSize", 16), "BAD_RECORD"),
    "sequence ahead": (_field_lie("Sequence", 3), "SEQUENCE_GAP"),
    "sequence behind": (_field_lie("Sequence", 1), "SEQUENCE_REPLAY"),
    "moved": (_field_lie("GuestOffset", 64 * PAGE), "AUTH_FAILED"),
    "outside the window": (_field_lie("GuestOffset", WINDOW_PAGES * PAGE), "BAD_PAGE"),
    "misaligned": (_field_lie("GuestOffset", 8), "BAD_PAGE"),
    "other session": (_field_lie("SessionId", bytes(16)), "WRONG_SESSION"),
    "page count flipped": (lambda r: flip(r, s.RECORD_HEADER_SIZE), "AUTH_FAILED"),
    "tag flipped": (lambda r: flip(r, len(r) - 1), "AUTH_FAILED"),
    "truncated": (lambda r: r[:-1], "BAD_RECORD"),
}


@pytest.mark.parametrize("case", list(ZERO_RANGE_LIES))
def test_zero_range_record_lies(endpoint_pair: tuple[Endpoint, Endpoint], case: str) -> None:
    lie, expected = ZERO_RANGE_LIES[case]
    source, target = endpoint_pair
    header = export_begin(source)
    first, second = s.split_records(export_zero_ranges(source, [(0, 8), (32 * PAGE, 16)]))
    before = scramble(target)
    send(target, "IMPORT_BEGIN", header)
    results = send(target, "IMPORT_BATCH", bytes(first) + lie(bytes(second)), expected)
    assert results[0] == 1 and results[3:5] == (1, 8)
    window = bytearray(before)
    window[: 8 * PAGE] = bytes(8 * PAGE)
    assert bytes(target.window) == bytes(window), "guest written by a refused record"
    assert session_state(target) == "FAILED"
