"""Importing a ZERO record leaves a page that is already zero untouched, as
ZERO_RANGE does: on a fresh target RAM file (sparse, on ext4) the host then
allocates nothing for it. A page that is not zero is still zeroed. Checked
with the host-built core over a memory-mapped sparse file: its allocated
blocks after the import are those of the one page that had data."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from helper.stream import END_RECORD_SIZE as END
from helper.stream import PAGE_RECORD_SIZE
from helper.stream import STREAM_HEADER_SIZE as HEADER
from host_shim.helpers.hostcore_helper import HostCoreHelper

PAGE = 4096
PAGES = 64


def _zero_stream(key: bytes) -> list[bytes]:
    source = HostCoreHelper(bytearray(PAGES * PAGE), key)
    try:
        assert source.call("EXPORT_BEGIN", 0, HEADER, 0, 0, 0, 1)[0] == 0
        chunks = [bytes(source.data[:HEADER])]
        source.data[: 8 * PAGES] = struct.pack(f"<{PAGES}Q", *range(0, PAGES * PAGE, PAGE))
        status, results = source.call("EXPORT_BATCH", 0, PAGES, 1 << 20, PAGES * PAGE_RECORD_SIZE)
        assert status == 0 and results[2] == PAGES, "every page should be a ZERO record"
        chunks.append(bytes(source.data[1 << 20 : (1 << 20) + results[0]]))
        assert source.call("EXPORT_END", 0, END)[0] == 0
        chunks.append(bytes(source.data[:END]))
        return chunks
    finally:
        source.close()


def test_zero_records_do_not_write_pages_that_are_already_zero(tmp_path: Path) -> None:
    key = os.urandom(32)
    chunks = _zero_stream(key)
    ram = tmp_path / "target.ram"
    with ram.open("wb") as f:
        f.truncate(PAGES * PAGE)
    with ram.open("r+b") as f:
        window = mmap.mmap(f.fileno(), PAGES * PAGE)
    try:
        window[7 * PAGE : 8 * PAGE] = os.urandom(PAGE)  # the one page with data
        window.flush()
        blocks_before = ram.stat().st_blocks
        if blocks_before == 0 or blocks_before > 64:
            pytest.skip(f"{tmp_path} does not allocate file blocks page by page (st_blocks {blocks_before})")
        target = HostCoreHelper(window, key)
        try:
            for command, chunk in zip(("IMPORT_BEGIN", "IMPORT_BATCH", "IMPORT_END"), chunks, strict=True):
                target.data[: len(chunk)] = chunk
                extra = (0, 1) if command == "IMPORT_BEGIN" else ()
                assert target.call(command, 0, len(chunk), *extra)[0] == 0, command
        finally:
            target.close()
        assert window[:] == bytes(PAGES * PAGE), "every page must be zero after the import"
        window.flush()
    finally:
        window.close()
    # Only the page that held data was written (with zeros); the 63 holes
    # stayed holes.
    assert ram.stat().st_blocks == blocks_before
