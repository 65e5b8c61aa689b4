"""Where the reference helper's time goes, per 4 KiB page.

Each step of StreamWriter.write_records is timed alone over the same RAM
file, then the whole of it, untracked and with CHECK_PAGES snapshots in
fresh memory; the raw AEAD call the pipeline benchmark compares against is
the first line. ``ovmf-mh bench pipeline --profile`` prints the table
(docs/transfer-format.md, "Speed").
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from helper import stream as s

PAGE = s.PAGE_SIZE
BATCH = 512


def _per_page(pages: int, run: Callable[[], object], rounds: int = 3) -> float:
    """Microseconds per page, best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / pages * 1e6


@contextmanager
def _fresh_mapping(ram: Path) -> Iterator[memoryview]:
    """The RAM file as a helper maps it: copy-on-write, new each time."""
    with ram.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as window:
        view = memoryview(window)
        try:
            yield view
        finally:
            view.release()


def profile_reference(ram: Path) -> dict[str, float]:
    """Microseconds per page of each step, over the pages of ``ram``."""
    pages = ram.stat().st_size // PAGE
    data = ram.read_bytes()
    view = memoryview(data)
    aead = AESOCB3(os.urandom(s.KEY_SIZE))
    nonce = os.urandom(s.NONCE_SIZE)
    ad = bytes(s.RECORD_HEADER_SIZE)
    record = bytearray(s.NONCE_SIZE + s.PAGE_RECORD_SIZE)
    record_view = memoryview(record)
    head = record_view[s.NONCE_SIZE : s.NONCE_SIZE + s.RECORD_HEADER_SIZE]
    body = record_view[s.NONCE_SIZE + s.RECORD_HEADER_SIZE :]
    out = memoryview(bytearray(BATCH * s.PAGE_RECORD_SIZE))
    steps: dict[str, float] = {}

    def raw() -> None:
        for index in range(pages):
            aead.encrypt(nonce, view[index * PAGE : (index + 1) * PAGE], ad)

    def encrypt_into() -> None:
        for index in range(pages):
            aead.encrypt_into(nonce, view[index * PAGE : (index + 1) * PAGE], head, body)

    def read_mapping() -> None:
        page = bytearray(PAGE)
        with _fresh_mapping(ram) as window:
            for offset in range(0, pages * PAGE, PAGE):
                page[:] = window[offset : offset + PAGE]

    def copy_out() -> None:
        whole = record_view[s.NONCE_SIZE :]
        for index in range(pages):
            at = (index % BATCH) * s.PAGE_RECORD_SIZE
            out[at : at + s.PAGE_RECORD_SIZE] = whole

    def chain() -> None:
        digest, tag = bytes(32), bytes(s.TAG_SIZE)
        for _ in range(pages):
            digest = hashlib.sha256(digest + tag).digest()

    session_id = os.urandom(16)

    def pack() -> None:
        for index in range(pages):
            s.NONCE_AND_RECORD.pack_into(record, 0, index, s.RECORD_PAGE, PAGE, index, index * PAGE, session_id)

    steps["raw AEAD: pyca AESOCB3.encrypt, one call per page (the baseline)"] = _per_page(pages, raw)
    steps["encrypt_into a private record buffer"] = _per_page(pages, encrypt_into)
    steps["reading the page from a fresh mapping of the RAM file"] = _per_page(pages, read_mapping)
    steps["chain: one SHA-256 per record"] = _per_page(pages, chain)
    steps["record copied to the output region"] = _per_page(pages, copy_out)
    steps["record header packed"] = _per_page(pages, pack)
    steps["whole write_records, untracked"] = _whole(ram, pages, tracked=False)
    steps["whole write_records, TRACK_PAGES (snapshots in fresh memory)"] = _whole(ram, pages, tracked=True)
    return steps


def _whole(ram: Path, pages: int, *, tracked: bool) -> float:
    """One pass of write_records as the helper runs it, allocation included."""
    binding = s.Binding.unbound(os.urandom(s.MIGRATION_ID_SIZE), 0, 1)
    writer = s.StreamWriter(os.urandom(s.KEY_SIZE), os.urandom(s.SALT_SIZE), pages * PAGE, binding)
    out = memoryview(bytearray(BATCH * s.PAGE_RECORD_SIZE))
    with _fresh_mapping(ram) as window:
        start = time.perf_counter()
        chunks = None
        if tracked:
            chunks = [bytearray(s.SNAPSHOT_CHUNK_SIZE) for _ in range(-(-pages * PAGE // s.SNAPSHOT_CHUNK_SIZE))]
        for first in range(0, pages, BATCH):
            count = min(BATCH, pages - first)
            writer.write_records(window, range(first * PAGE, (first + count) * PAGE, PAGE), out, chunks)
        return (time.perf_counter() - start) / pages * 1e6


def format_profile(steps: dict[str, float]) -> list[str]:
    lines = ["reference helper, microseconds per 4 KiB page (each step timed alone)"]
    lines += [f"  {value:6.2f}  {name}" for name, value in steps.items()]
    return lines
