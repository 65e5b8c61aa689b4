"""The kernel's write log of a RAM file (host_shim/migration/dirty_log.py),
on a real file in the test's work folder (ext4 here): every page written
through a shared mapping is logged, a write of the same bytes included;
reading and clearing the log loses no write; tmpfs is refused with a reason
that names the other switchover, before anything starts."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from host_shim.migration.dirty_log import SCAN_CHUNK, DirtyLog, DirtyLogUnavailable, unavailable_reason
from host_shim.migration.migrate import MigrationConfig, _written_pages, migrate
from host_shim.migration.migration_vm import PAGE
from host_shim.migration.write_trace import folio_spans

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
    finally:
        log.close()


def test_without_the_write_record_the_flusher_expiry_puts_the_log_in_doubt(ram: tuple[Path, mmap.mmap]) -> None:
    """Without tracefs the page cache is the whole log: its doubt follows
    the flusher's clock, and the switchover always checks every page."""
    path, _ = ram
    log = DirtyLog(path, PAGES * PAGE, trace=False)
    try:
        log.reset()
        assert log.doubt() is None
        switchover = log.switchover_doubt()
        assert switchover is not None and "sync(2)" in switchover
        log.expire_seconds = 0.0  # the flusher's expiry is past: the log is in doubt
        doubt = log.doubt()
        assert doubt is not None and "dirty_expire_centisecs" in doubt
    finally:
        log.close()


def _write_back_elsewhere(path: Path, how: str) -> None:
    """Another process writes the file back: fsync, sync_file_range or sync(1)."""
    script = {
        "fsync": "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.fsync(fd)",
        "sync_file_range": ("import ctypes,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
                            "assert ctypes.CDLL(None).sync_file_range(fd, 0, 0, 7) == 0"),
    }
    argv = ["sync"] if how == "sync" else [sys.executable, "-c", script[how], str(path)]
    subprocess.run(argv, check=True, timeout=120)


@pytest.mark.parametrize("how", ["fsync", "sync_file_range", "sync"])
def test_a_page_another_process_wrote_back_between_reads_is_still_logged(
        ram: tuple[Path, mmap.mmap], how: str) -> None:
    """The busy host's case: a page written, then written back by somebody
    else (another process's fsync or sync_file_range, sync(1)) before the
    log's read, is clean in the page cache and still in the log; the same
    after a take(), and the log is not in doubt (nothing was lost)."""
    path, memory = ram
    log = DirtyLog(path, PAGES * PAGE)
    try:
        assert log.trace is not None, f"the tests run as root with tracefs: {log.trace_unavailable}"
        log.reset()
        first = [3, 700, 5000, PAGES - 1]
        _write(memory, first, same_bytes=True)
        _write_back_elsewhere(path, how)
        assert not set(first) & set(log.cache_dirty_pages().tolist()), "written back: clean in the page cache"
        assert set(first) <= set(log.dirty_pages().tolist())
        assert set(first) <= set(log.take().tolist())
        # A write after a take, written back elsewhere before the next one.
        _write(memory, [701, 9000], same_bytes=False)
        _write_back_elsewhere(path, how)
        again = set(log.take().tolist())
        assert {701, 9000} <= again
        assert log.trace_pages > 0
        assert log.doubt() is None and log.switchover_doubt() is None
        assert "written back by somebody else" in log.describe_trace()
        # Read and cleared: nothing left to mark.
        assert len(log.take()) == 0
    finally:
        log.close()


def test_a_record_that_lost_events_puts_the_log_in_doubt(ram: tuple[Path, mmap.mmap]) -> None:
    """Tracing switched off in the log's instance (by anyone): the record may
    lack writes, so the log is in doubt until its next reset."""
    path, memory = ram
    log = DirtyLog(path, PAGES * PAGE)
    try:
        assert log.trace is not None
        log.reset()
        (log.trace.instance / "tracing_on").write_text("0\n")
        _write(memory, [42], same_bytes=False)
        doubt = log.switchover_doubt()
        assert doubt is not None and "switched off" in doubt
    finally:
        log.close()
    assert not log.trace.instance.exists(), "the tracefs instance is removed on close"


def test_folio_spans_mark_the_largest_folio_that_can_start_at_each_index() -> None:
    spans = folio_spans(np.array([0, 3, 4, 1024, 1030, 1030], dtype=np.uint64), 1300)
    expected = set(range(0, 512)) | {3} | set(range(4, 8)) | set(range(1024, 1300))
    assert set(spans.tolist()) == expected
    assert list(spans) == sorted(spans.tolist())
    assert len(folio_spans(np.array([7], dtype=np.uint64), 4)) == 0, "an index past the file marks nothing"


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


def test_without_root_the_log_has_no_record_and_the_switchover_says_why(
        ram: tuple[Path, mmap.mmap], monkeypatch: pytest.MonkeyPatch) -> None:
    """tracefs needs root: elsewhere the log falls back to the page cache
    alone, names why, and its switchover always checks every page."""
    path, _ = ram
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    log = DirtyLog(path, PAGES * PAGE)
    try:
        assert log.trace is None and log.trace_unavailable is not None
        assert "needs root" in log.trace_unavailable
        doubt = log.switchover_doubt()
        assert doubt is not None and doubt.startswith("no write record (tracefs needs root")
        assert log.describe_trace().startswith("page cache only; no write record")
    finally:
        log.close()
