"""The kernel's write log of a guest RAM file: the page cache's dirty state
(docs/migration.md, "The dirty log").

A RAM file on ext4 that QEMU maps shared is a page-cache file. Once a page
is written back (``fsync``, ``sync_file_range``) it is clean, and the first
write through any mapping, QEMU's TCG stores included, makes it dirty again,
even when it writes the same bytes. ``cachestat(2)`` (Linux 6.5+) counts
the dirty pages of any range, so a bisection over the file finds them.

The log is read and cleared like KVM's dirty log in manual-protect mode
(``KVM_GET_DIRTY_LOG`` then ``KVM_CLEAR_DIRTY_LOG`` for the pages seen):
only the pages just read as dirty are written back (``sync_file_range``),
so a page written between the read and the clean is never lost: either it
was already dirty (it is in the set just read, and its helper reads it after
the clean) or it stays dirty for the next read. A whole-file ``fsync`` is
used once, before the first pass, which reads every page anyway.

The log is exact only while nobody else writes the file back. The kernel
does on its own: the flusher writes back an inode dirty for longer than
``vm.dirty_expire_centisecs`` (measured here: 30 s after the reset, 14,336
dirty pages of a 64 MiB file went clean at once), global dirty memory above
the background threshold starts writeback, and so do ``sync(2)`` and memory
pressure (measured here: a ``sync`` loop beside a 4 GiB migration wrote
the RAM file back every few seconds, docs/migration.md). So the log has a
second half: the kernel's record of every folio of the file that became
dirty (host_shim/migration/write_trace.py, a tracepoint), kept whoever
writes the folio back later. Each read is the page cache's dirty pages
plus every page of the folios the record names: a page written back by
somebody else before the read is still marked. Where that record is
unavailable (not root, no tracefs) :meth:`DirtyLog.doubt` names the
flusher's expiry and the background threshold when they may have
happened, and the switchover always checks every page
(:meth:`DirtyLog.switchover_doubt`): a ``sync(2)`` would go unseen.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from host_shim.migration.migration_vm import PAGE, MigrationError
from host_shim.migration.write_trace import WriteTrace, WriteTraceUnavailable, folio_spans

PageNumbers = npt.NDArray[np.uint64]

SYS_CACHESTAT = 451  # x86-64, Linux 6.5+
EXT4_SUPER_MAGIC = 0xEF53
TMPFS_MAGIC = 0x01021994
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
#: Seconds before the flusher's expiry that the log stops being trusted
#: (the flusher wakes every vm.dirty_writeback_centisecs; its check is "older than").
EXPIRY_MARGIN = 2.0
#: Global dirty memory, as a share of the background threshold, from which
#: the kernel may start writing back any inode, ours included.
BACKGROUND_SHARE = 0.8
SAMPLE_INTERVAL = 0.1
#: Pages per range the log's read starts from (256 MiB).
SCAN_CHUNK = 65536


class DirtyLogUnavailable(MigrationError):
    """The RAM file keeps no usable write log (tmpfs, an old kernel)."""


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


def unavailable_reason(folder: Path) -> str | None:
    """Why a RAM file in ``folder`` would keep no dirty log this module can
    read, or None: the file system's type (statfs) and a cachestat(2) call
    on a probe file there."""
    with tempfile.TemporaryFile(dir=folder) as probe:
        buf = _Statfs()
        if _libc.fstatfs(probe.fileno(), ctypes.byref(buf)) != 0:
            return f"statfs in {folder}: {os.strerror(ctypes.get_errno())}"
        kind = int(buf.f_type) & 0xFFFFFFFF
        if kind == TMPFS_MAGIC:
            return f"{folder} is on tmpfs, whose pages are never written back: it keeps no dirty log"
        if kind != EXT4_SUPER_MAGIC:
            return f"{folder} is on a file system of type {kind:#x}; the dirty log is measured exact on ext4 only"
        stat, rng = _Stat(), _Range(0, PAGE)
        if _libc.syscall(SYS_CACHESTAT, probe.fileno(), ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
            return (f"cachestat(2) fails here ({os.strerror(ctypes.get_errno())}; it needs Linux 6.5+, this is "
                    f"{os.uname().release})")
    return None


def _sysctl(name: str) -> int:
    return int(Path(f"/proc/sys/vm/{name}").read_text())


def _vmstat(*names: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in names:
            values[key] = int(value)
    return values


class DirtyLog:
    """The dirty pages of one RAM file, read and cleared per pass."""

    def __init__(self, path: Path, size: int, *, trace: bool = True) -> None:
        reason = unavailable_reason(path.parent)
        if reason is not None:
            raise DirtyLogUnavailable(reason)
        self.path, self.size, self.pages = path, size, size // PAGE
        self._fd = os.open(path, os.O_RDWR)
        self._range, self._stat = _Range(), _Stat()
        self.expire_seconds = _sysctl("dirty_expire_centisecs") / 100
        self.reset_at: float | None = None
        self.calls = 0
        # The highest global dirty memory seen, as a share of the kernel's
        # background-writeback threshold, sampled while the log is in use.
        self.background_peak = 0.0
        # The record of folios that became dirty: None where unavailable, and why.
        self.trace: WriteTrace | None = None
        self.trace_unavailable: str | None = None
        try:
            if not trace:
                raise WriteTraceUnavailable("not asked for")
            self.trace = WriteTrace(path)
        except WriteTraceUnavailable as exc:
            self.trace_unavailable = str(exc)
        # First pages of folios the record named since the last take().
        self._traced: list[PageNumbers] = []
        # Pages marked only by the record (written back by somebody else
        # before the read), over every read so far, and in the last one.
        self.trace_pages = 0
        self.last_trace_pages = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="dirty-log-sampler", daemon=True)
        self._sampler.start()

    # -- kernel calls -------------------------------------------------------------------

    def _dirty_in(self, first: int, count: int) -> int:
        self._range.off, self._range.len = first * PAGE, count * PAGE
        self.calls += 1
        if _libc.syscall(SYS_CACHESTAT, self._fd, ctypes.byref(self._range), ctypes.byref(self._stat), 0) != 0:
            err = ctypes.get_errno()
            raise MigrationError(f"cachestat(2) on {self.path} pages {first}+{count}: {os.strerror(err)}")
        return int(self._stat.dirty)

    def _write_back(self, first: int, count: int) -> None:
        flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
        if _sync_file_range(self._fd, first * PAGE, count * PAGE, flags) != 0:
            err = ctypes.get_errno()
            raise MigrationError(f"sync_file_range on {self.path} pages {first}+{count}: {os.strerror(err)}")

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._note_background()

    def _note_background(self) -> None:
        stat = _vmstat("nr_dirty", "nr_writeback", "nr_dirty_background_threshold")
        threshold = stat.get("nr_dirty_background_threshold", 0)
        if threshold:
            share = (stat.get("nr_dirty", 0) + stat.get("nr_writeback", 0)) / threshold
            self.background_peak = max(self.background_peak, share)

    # -- the log ------------------------------------------------------------------------

    def reset(self) -> None:
        """Write the whole file back: every page clean, and the flusher's
        clock for the file restarts. A page written while the fsync runs is
        cleared without being seen: only where every page is read or
        checked next (before the first pass, or followed by a full
        CHECK_PAGES). The record's events so far are dropped before the
        fsync: a page written after the drop is in the next read even if
        somebody else writes it back."""
        if self.trace is not None:
            self.trace.restart()
        self._traced = []
        os.fsync(self._fd)
        self.reset_at = time.monotonic()
        self.background_peak = 0.0

    def dirty_count(self) -> int:
        """Pages now dirty in the whole file (a dirty large folio counts in
        every page it holds), in one call."""
        return self._dirty_in(0, self.pages)

    def dirty_pages(self) -> PageNumbers:
        """The pages written since the last take() or reset(), ascending:
        those the page cache holds dirty now, and every page of each folio
        the write record named since (it may have been written back by
        somebody else). Reading does not clear."""
        return self._marked(clean=False)

    def take(self) -> PageNumbers:
        """Read the log, then clear the pages read: the next pass sends them.
        The record is read first: a folio dirtied after that read is either
        still dirty in the page cache's read that follows, or in the next
        record read, whoever writes it back meanwhile."""
        return self._marked(clean=True)

    def _marked(self, clean: bool) -> PageNumbers:
        if self.trace is not None:
            self._traced.append(self.trace.drain())
        dirty = self.cache_dirty_pages()
        if clean:
            self.clean(dirty)
        if self.trace is None:
            return dirty
        spans = folio_spans(np.concatenate(self._traced), self.pages)
        if clean:
            self._traced = []
        marked = np.zeros(self.pages, dtype=np.bool_)
        marked[dirty] = True
        marked[spans] = True
        union = np.flatnonzero(marked).astype(np.uint64)
        self.last_trace_pages = len(union) - len(dirty)
        self.trace_pages += self.last_trace_pages
        return union

    def cache_dirty_pages(self) -> PageNumbers:
        """The pages now dirty in the page cache, ascending: a bisection of cachestat(2)
        counts that skips clean ranges and takes all-dirty ranges whole. A
        dirty large folio counts as dirty in every page it holds (more is
        sent, never less)."""
        found: list[PageNumbers] = []
        # cachestat walks the page cache of the range it is given, so each
        # level of a bisection of the whole file walks all of it again: at
        # 16 GiB, with every page cached, that was 200 ms of the downtime.
        # Starting from chunks skips the levels above them.
        stack = [(first, min(SCAN_CHUNK, self.pages - first))
                 for first in reversed(range(0, self.pages, SCAN_CHUNK))]
        while stack:
            first, count = stack.pop()
            dirty = self._dirty_in(first, count)
            if dirty == 0:
                continue
            if dirty >= count:
                found.append(np.arange(first, first + count, dtype=np.uint64))
                continue
            half = count // 2
            stack.append((first + half, count - half))
            stack.append((first, half))
        if not found:
            return np.empty(0, dtype=np.uint64)
        return np.sort(np.concatenate(found))

    def clean(self, pages: PageNumbers) -> None:
        """Write back exactly these pages (runs of them), nothing else: the
        KVM_CLEAR_DIRTY_LOG of this log. Their helper must read them after."""
        if len(pages) == 0:
            return
        numbers = np.asarray(pages, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(numbers)]])
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            self._write_back(int(numbers[start]), end - start)

    def doubt(self, ahead: float = 0.0) -> str | None:
        """Why the kernel may have written back (so cleared) pages this log
        did not report by now, or ``ahead`` seconds from now; None if it
        cannot have. The flusher's expiry counts from the reset: after the
        whole-file fsync the inode was clean, and the first write after it
        starts its clock; clearing page ranges never makes it wholly clean
        while the guest writes. With the write record, only a record that
        lost events is in doubt: it sees the flusher and sync(2) too."""
        if self.trace is not None:
            return self.trace.lost()
        self._note_background()
        if self.reset_at is not None:
            age = time.monotonic() - self.reset_at
            if age + ahead > self.expire_seconds - EXPIRY_MARGIN:
                return (f"the log is {age:.1f} s old{f' (+{ahead:.1f} s for the next pass)' if ahead else ''}: "
                        f"the kernel's flusher writes back a file dirty for vm.dirty_expire_centisecs "
                        f"({self.expire_seconds:.0f} s)")
        if self.background_peak >= BACKGROUND_SHARE:
            return (f"global dirty memory reached {100 * self.background_peak:.0f}% of the kernel's "
                    "background-writeback threshold")
        return None

    def switchover_doubt(self) -> str | None:
        """Why the switchover must check every page: doubt(), or no write
        record (then another process's writeback would go unseen)."""
        if self.trace is None:
            return (f"no write record ({self.trace_unavailable}): a writeback of the RAM file by another "
                    "process (sync(2), fsync) would go unseen")
        return self.doubt()

    def describe_trace(self) -> str:
        """What backs the log, for the report."""
        if self.trace is None:
            return f"page cache only; no write record: {self.trace_unavailable}"
        return (f"page cache + {self.trace.events} writeback_dirty_folio events on inode {self.trace.ino}; "
                f"{self.trace_pages} pages marked only by them (written back by somebody else)")

    def close(self) -> None:
        self._stop.set()
        self._sampler.join(timeout=1)
        if self.trace is not None:
            self.trace.close()
        os.close(self._fd)
