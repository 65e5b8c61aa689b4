"""The known-answer stream with zero ranges (tests/vectors/stream-v3-zero-range.json,
written by an encoder independent of helper/stream.py) against the codec,
the reference helper's export, and the import of every helper
implementation (reference, the C core built for the host, the firmware)."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from endpoints import FACTORIES, Endpoint, EndpointSpec

from helper import abi
from helper import stream as s
from helper.reference import ReferenceHelper
from host_shim.helpers.keys import secret_record

VECTORS = Path(__file__).resolve().parent / "vectors"
sys.path.insert(0, str(VECTORS))
import zero_range_vectors  # noqa: E402

A = abi.load()
VECTOR: dict[str, Any] = json.loads(zero_range_vectors.OUTPUT.read_text())
KEY = bytes.fromhex(VECTOR["transport_key"])
SHARD = (VECTOR["shard_index"], VECTOR["shard_count"])


def _b(name: str) -> bytes:
    return bytes.fromhex(VECTOR[name])


def _binding() -> s.Binding:
    return s.Binding.unbound(_b("migration_id"), *SHARD)


def test_file_is_what_the_generator_writes() -> None:
    assert zero_range_vectors.main(["--check"]) == 0


def test_vector_holds_every_record_type() -> None:
    kinds = {r["type"] for r in VECTOR["records"]}
    assert kinds == {s.RECORD_PAGE, s.RECORD_ZERO, s.RECORD_ZERO_RANGE}


def test_codec_pieces() -> None:
    writer = s.StreamWriter(KEY, _b("salt"), VECTOR["guest_size"], _binding())
    assert writer.header == _b("header")
    for record in VECTOR["records"]:
        if record["type"] == s.RECORD_ZERO_RANGE:
            sealed = writer.zero_range_record(record["guest_offset"], record["pages"])
        else:
            sealed = writer.page_record(record["guest_offset"], bytes.fromhex(record["page"]))
        assert sealed.hex() == record["record"], record["description"]
    assert writer.end_record() == _b("end_record")


def test_codec_decodes_the_ranges() -> None:
    decoded = s.decode_stream(KEY, _b("stream"))
    got = [(r.sequence, r.guest_offset, r.pages, r.zero_range) for r in decoded.records]
    want = [(r["sequence"], r["guest_offset"], r["pages"], r["type"] == s.RECORD_ZERO_RANGE)
            for r in VECTOR["records"]]
    assert got == want


def test_reference_export_reproduces_the_stream() -> None:
    secret = bytearray(secret_record(KEY))
    helper = ReferenceHelper(bytearray(VECTOR["guest_size"]), bytearray(1 << 16), secret,
                             salt_source=lambda n: _b("salt"))
    out, capacity, binding_at = 0x1000, (1 << 16) - 0x1000, 0x800
    helper.data[binding_at : binding_at + 32] = _b("migration_id")

    def call(command: str, *args: int) -> bytes:
        status, results = helper.dispatch(A.const(f"OVMF_MH_CMD_{command}"), args)
        assert status == 0, command
        return bytes(helper.data[out : out + results[0]])

    pieces = [call("EXPORT_BEGIN", out, capacity, 0, binding_at, *SHARD)]
    for record in VECTOR["records"]:
        # The guest as it is when the record is sealed (the last page is
        # written after block 3 went as a zero range: a later pass).
        offset = record["guest_offset"]
        helper.window[offset : offset + s.PAGE_SIZE] = bytes.fromhex(record["page"])
        if record["type"] == s.RECORD_ZERO_RANGE:
            struct.pack_into("<2Q", helper.data, 0, record["guest_offset"], record["pages"])
            pieces.append(call("EXPORT_ZERO_RANGES", 0, 1, out, capacity))
        else:
            struct.pack_into("<Q", helper.data, 0, record["guest_offset"])
            pieces.append(call("EXPORT_BATCH", 0, 1, out, capacity))
    pieces.append(call("EXPORT_END", out, capacity))
    assert b"".join(pieces) == _b("stream")


IMPLEMENTATIONS = [pytest.param("reference"), pytest.param("host-core"),
                   pytest.param("firmware", marks=[pytest.mark.firmware, pytest.mark.qemu])]


@pytest.fixture(params=IMPLEMENTATIONS)
def target(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    with FACTORIES[request.param](EndpointSpec(VECTOR["guest_size"], 1 << 20, KEY)) as endpoint:
        yield endpoint


def test_import_of_the_stream(target: Endpoint) -> None:
    """Every implementation imports the vector: the ranges end zero over
    stale content, the pages arrive, the counts and the receipt are the
    vector's."""
    target.window[:] = os.urandom(len(target.window))
    stream = _b("stream")
    header, body, end = stream[: s.STREAM_HEADER_SIZE], stream[s.STREAM_HEADER_SIZE : -s.END_RECORD_SIZE], \
        stream[-s.END_RECORD_SIZE :]

    def call(command: str, blob: bytes, *extra: int) -> tuple[int, ...]:
        target.data[: len(blob)] = blob
        status, results = target.call(command, 0, len(blob), *extra)
        assert status == 0, f"{command}: status {status:#x}"
        return results

    call("IMPORT_BEGIN", header, *SHARD)
    ranges = [r for r in VECTOR["records"] if r["type"] == s.RECORD_ZERO_RANGE]
    pages = [r for r in VECTOR["records"] if r["type"] == s.RECORD_PAGE]
    assert call("IMPORT_BATCH", body)[:5] == (len(VECTOR["records"]), len(pages), 0, len(ranges),
                                              sum(r["pages"] for r in ranges))
    assert call("IMPORT_END", end)[0] == len(VECTOR["records"])
    status, results = target.call("IMPORT_RECEIPT", 0, s.RECEIPT_SIZE)
    assert status == 0 and bytes(target.data[: results[0]]) == _b("receipt")
    touched = set()
    for record in reversed(VECTOR["records"]):  # the last record of a page decides it
        offset = record["guest_offset"]
        for page in range(offset, offset + record["pages"] * s.PAGE_SIZE, s.PAGE_SIZE):
            if page not in touched:
                touched.add(page)
                want = bytes.fromhex(record["page"]) if record["type"] == s.RECORD_PAGE else bytes(s.PAGE_SIZE)
                assert bytes(target.window[page : page + s.PAGE_SIZE]) == want, (record["description"], page)
    assert len(touched) == 2 * zero_range_vectors.BLOCK  # every page of blocks 1 and 3
