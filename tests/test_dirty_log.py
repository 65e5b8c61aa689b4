"""The kernel's write log of a RAM file (host_shim/migration/dirty_log.py),
on a real file in the test's work folder (ext4 here): every page written
through a shared mapping is logged, a write of the same bytes included;
reading and clearing the log loses no write; tmpfs is refused with a reason
that names the other switchover, before anything starts."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from host_shim.migration.dirty_log import SCAN_CHUNK, DirtyLog, DirtyLogUnavailable, unavailable_reason
from host_shim.migration.migrate import MigrationConfig, _written_pages, migrate
from host_shim.migration.migration_vm import PAGE

PAGES = 16384  # 64 MiB: 9 dirty 2 MiB folios would still be far from half


@pytest.fixture
def ram(work_dir: Path) -> Iterator[tuple[Path, mmap.mmap]]:
    reason = unavailable_reason(work_dir)
    assert reason is None, f"the test work folder must keep a dirty log (ext4, Linux 6.5+): {reason}"
    path = work_dir / "guest.ram"
    with path.open("wb") as f:
        f.truncate(PAGES * PAGE)
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED)
    # Touched once, as a running guest's memory is, with different bytes per page.
    for page in range(PAGES):
        memory[page * PAGE] = page % 251 + 1
    try:
        yield path, memory
    finally:
        memory.close()
        os.close(fd)


def _write(memory: mmap.mmap, pages: list[int], same_bytes: bool) -> None:
    for page in pages:
        offset = page * PAGE + 100
        memory[offset] = memory[offset] if same_bytes else (memory[offset] + 1) % 256


def test_every_written_page_is_logged_same_bytes_included(ram: tuple[Path, mmap.mmap]) -> None:
    path, memory = ram
    log = DirtyLog(path, PAGES * PAGE)
    try:
        log.reset()
        assert len(log.dirty_pages()) == 0
        changed = [3, 4, 5, 700, 2048, PAGES - 1]
        rewritten = [9, 1500, 3000]  # the same bytes written again: the ABA case's last step
        _write(memory, changed, same_bytes=False)
        _write(memory, rewritten, same_bytes=True)
        logged = set(log.dirty_pages().tolist())
        # A dirty large folio counts in all its pages: more may be logged, never less.
        assert set(changed) | set(rewritten) <= logged
        assert len(logged) < PAGES // 2
    finally:
        log.close()


def test_take_clears_only_what_it_read_and_a_later_write_is_logged_again(ram: tuple[Path, mmap.mmap]) -> None:
    path, memory = ram
    log = DirtyLog(path, PAGES * PAGE)
    try:
        log.reset()
        _write(memory, [10, 11, 12], same_bytes=False)
        first = log.take()
        assert {10, 11, 12} <= set(first.tolist())
        assert len(log.dirty_pages()) == 0, "take() wrote back what it read"
        _write(memory, [11], same_bytes=True)
        assert 11 in set(log.take().tolist())
        # Pages taken are written back page range by page range: one dirty
        # page outside them stays dirty (clean() touches nothing else).
        _write(memory, [20, 3000], same_bytes=False)
        log.clean(np.array([20], dtype=np.uint64))
        assert 3000 in set(log.dirty_pages().tolist())
        assert log.doubt() is None
        log.expire_seconds = 0.0  # the flusher's expiry is past: the log is in doubt
        doubt = log.doubt()
        assert doubt is not None and "dirty_expire_centisecs" in doubt
    finally:
        log.close()


def test_tmpfs_keeps_no_log_and_migrate_says_so_before_starting(firmware: Path, work_dir: Path) -> None:
    shm = Path(tempfile.mkdtemp(prefix="ovmf-mh-test-", dir="/dev/shm"))
    try:
        reason = unavailable_reason(shm)
        assert reason is not None and "tmpfs" in reason
        with pytest.raises(DirtyLogUnavailable, match="--switchover full-check"):
            migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False, ram_dir=shm))
        assert not list(work_dir.glob("**/qemu.pid")), "refused before any QEMU started"
        assert list(shm.iterdir()) == []
    finally:
        os.rmdir(shm)


def test_a_check_of_every_page_skips_only_pages_never_written(work_dir: Path) -> None:
    """The log's reset checks the pages the RAM file holds data for: a page
    written through a shared mapping (before or after an fsync) is one of
    them, a page in a hole (never written) is not."""
    size = 64 * 1024 * 1024
    ram = work_dir / "guest.ram"
    with ram.open("wb") as new:
        new.truncate(size)
    every_page = np.arange(size // 4096, dtype=np.uint64)
    assert len(_written_pages(ram, every_page)) == 0
    with ram.open("r+b") as f, mmap.mmap(f.fileno(), size) as view:
        view[5 * 4096] = 1
        os.fsync(f.fileno())
        view[40 * 1024 * 1024 + 7 * 4096] = 1  # after the fsync: dirty, not yet written back
        written = _written_pages(ram, every_page)
    assert 5 in written and (40 * 1024 * 1024) // 4096 + 7 in written
    # Holes are found at the file system's grain (2 MiB folios here): far
    # from both writes nothing holds data.
    assert (20 * 1024 * 1024) // 4096 not in written and len(written) < len(every_page) // 4


def test_the_read_starts_from_chunks_and_finds_pages_on_their_borders(work_dir: Path) -> None:
    """A file of two whole scan chunks and a part one: pages on each side of
    every border and the file's last page are found, and nothing far off."""
    pages = 2 * SCAN_CHUNK + 100
    path = work_dir / "large.ram"
    with path.open("wb") as f:
        f.truncate(pages * PAGE)
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(fd, pages * PAGE, mmap.MAP_SHARED)
    log = DirtyLog(path, pages * PAGE)
    try:
        log.reset()
        assert len(log.dirty_pages()) == 0
        written = [0, SCAN_CHUNK - 1, SCAN_CHUNK, 2 * SCAN_CHUNK - 1, 2 * SCAN_CHUNK, pages - 1]
        for page in written:
            memory[page * PAGE + 7] = 1
        logged = log.dirty_pages()
        assert set(written) <= set(logged.tolist())
        assert list(logged) == sorted(logged.tolist())
        # A dirty folio holds at most 2 MiB: 512 pages around each write.
        assert len(logged) <= 512 * len(written)
    finally:
        log.close()
        memory.close()
        os.close(fd)
