"""The kernel's record of every page-cache folio of one file that became
dirty: the ``writeback:writeback_dirty_folio`` tracepoint, filtered on the
file's inode, in a private tracefs instance (docs/migration.md, "When the
kernel clears the log itself").

The page cache's dirty state (host_shim/migration/dirty_log.py) forgets a
write once anybody writes the page back: ``sync(2)`` by any process, the
flusher, another process's ``fsync``. The tracepoint fires each time a clean
folio becomes dirty (for a shared mapping: the first write after a
writeback faults through ``page_mkwrite``), whoever cleans it later, so a
write the dirty state lost is still in this record. The event names the
folio's first page (its index), not its size: :func:`folio_spans` marks the
largest folio that can start there.

Nothing here reads the file's bytes: the events are page numbers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from contextlib import suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from host_shim.migration.migration_vm import MigrationError

PageNumbers = npt.NDArray[np.uint64]

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "events/writeback/writeback_dirty_folio"
INSTANCE_PREFIX = "ovmf-mh-dirty-"
#: Ring buffer per CPU (KiB): about 60,000 events each (an event is about
#: 70 bytes); a drainer thread empties it every DRAIN_INTERVAL, and an
#: overflow is counted (then the log is in doubt, never silently short).
BUFFER_KIB = 4096
DRAIN_INTERVAL = 0.1
#: Largest page-cache folio on x86-64 (MAX_PAGECACHE_ORDER = PMD order): 2 MiB.
MAX_FOLIO_PAGES = 512
TRACEFS_MAGIC = 0x74726163

_INDEX = re.compile(rb"ino=(\d+) index=(\d+)")
_libc = ctypes.CDLL(None, use_errno=True)


class WriteTraceUnavailable(MigrationError):
    """No tracefs this program may use (not root, no tracefs, no such event)."""


def _mounted() -> bool:
    return (TRACEFS / "instances").is_dir() and (TRACEFS / EVENT).is_dir()


def _mount() -> None:
    """Mount tracefs at its usual place, as root may (it is not mounted by
    default on every host)."""
    if _mounted() or not TRACEFS.is_dir():
        return
    if _libc.mount(b"nodev", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise WriteTraceUnavailable(f"cannot mount tracefs at {TRACEFS}: {os.strerror(err)}")


def folio_spans(indexes: PageNumbers, pages: int) -> PageNumbers:
    """Every page of each folio that can start at these page indexes: a
    page-cache folio is naturally aligned, so one starting at index i holds
    at most 2**ctz(i) pages, and at most MAX_FOLIO_PAGES. More is marked
    than was written, never less; sorted, unique, below ``pages``."""
    if len(indexes) == 0:
        return np.empty(0, dtype=np.uint64)
    first = np.unique(np.asarray(indexes, dtype=np.int64))
    first = first[first < pages]
    # Lowest set bit of each index (index 0: the largest folio).
    low = first & -first
    length = np.where(first == 0, MAX_FOLIO_PAGES, np.minimum(low, MAX_FOLIO_PAGES))
    length = np.minimum(first + length, pages) - first
    # Every page of the ranges [first, first + length), then their union.
    starts = np.repeat(first - (np.cumsum(length) - length), length)
    return np.unique(starts + np.arange(int(length.sum()), dtype=np.int64)).astype(np.uint64)


def _reap_stale_instances() -> None:
    """Remove the instances of programs that died without removing theirs."""
    for entry in (TRACEFS / "instances").glob(f"{INSTANCE_PREFIX}*"):
        pid_text = entry.name[len(INSTANCE_PREFIX):].partition("-")[0]
        if pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists():
            with suppress(OSError):
                entry.rmdir()


class WriteTrace:
    """The folios of one file that became dirty since the last drain."""

    _serial = 0

    def __init__(self, path: Path) -> None:
        if os.geteuid() != 0:
            raise WriteTraceUnavailable("tracefs needs root (this program runs as uid "
                                        f"{os.geteuid()})")
        _mount()
        if not _mounted():
            raise WriteTraceUnavailable(f"no tracefs with {EVENT} at {TRACEFS}")
        _reap_stale_instances()
        self.path = path
        self.ino = os.stat(path).st_ino
        WriteTrace._serial += 1
        self.instance = TRACEFS / "instances" / f"{INSTANCE_PREFIX}{os.getpid()}-{WriteTrace._serial}"
        try:
            self.instance.mkdir()
        except OSError as exc:
            raise WriteTraceUnavailable(f"cannot create the tracefs instance {self.instance}: {exc}") from exc
        self._lock = threading.Lock()
        self._pending: list[PageNumbers] = []
        self._tail = b""
        self._error: str | None = None
        self.events = 0
        self._lost_before: dict[str, int] = {}
        self._fd = -1
        try:
            self._write("buffer_size_kb", str(BUFFER_KIB))
            # Full buffer: new events are dropped and counted, old ones kept.
            self._write("options/overwrite", "0")
            self._write(f"{EVENT}/filter", f"ino == {self.ino}")
            self._write(f"{EVENT}/enable", "1")
            self._write("tracing_on", "1")
            self._fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            self._remove()
            raise WriteTraceUnavailable(f"cannot trace {EVENT} in {self.instance}: {exc}") from exc
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="write-trace", daemon=True)
        self._drainer.start()

    def _write(self, name: str, value: str) -> None:
        (self.instance / name).write_text(value + "\n")

    # -- reading ------------------------------------------------------------------------

    def _read_pending(self) -> None:
        """Read whatever the ring buffer holds now into _pending (lock held)."""
        chunks = []
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._error = f"reading {self.instance / 'trace_pipe'}: {exc}"
                break
            if not data:
                break
            chunks.append(data)
        if not chunks:
            return
        text = self._tail + b"".join(chunks)
        cut = text.rfind(b"\n") + 1
        self._tail = text[cut:]
        found = _INDEX.findall(text[:cut])
        if found:
            pairs = np.array(found, dtype=np.uint64).reshape(-1, 2)
            # The filter keeps this inode; an event of another is a filter gone wrong.
            if np.any(pairs[:, 0] != self.ino):
                self._error = f"the trace holds events of inodes other than {self.ino}: its filter was changed"
            self._pending.append(pairs[:, 1])
            self.events += len(pairs)

    def _drain_loop(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL):
            with self._lock:
                self._read_pending()

    def drain(self) -> PageNumbers:
        """First page indexes of the folios that became dirty since the last
        drain (repeats possible), everything committed until now included."""
        with self._lock:
            self._read_pending()
            taken, self._pending = self._pending, []
        if not taken:
            return np.empty(0, dtype=np.uint64)
        return np.concatenate(taken)

    def _losses(self) -> dict[str, int]:
        """Events the ring buffer could not keep, per CPU and counter."""
        counts: dict[str, int] = {}
        for stats in (self.instance / "per_cpu").glob("cpu*/stats"):
            for line in stats.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("overrun", "commit overrun", "dropped events"):
                    counts[f"{stats.parent.name} {key}"] = int(value)
        return counts

    def restart(self) -> None:
        """Forget the events so far and what was lost before: the caller
        reads every page after this (a reset of the log)."""
        self.drain()
        with self._lock:
            self._error = None
        try:
            self._lost_before = self._losses()
        except (OSError, ValueError):
            self._lost_before = {}

    def lost(self) -> str | None:
        """Why this record may lack an event since the last restart(), or
        None: events dropped by a full buffer, tracing switched off, the
        event disabled, a read error."""
        if self._error is not None:
            return self._error
        try:
            if (self.instance / "tracing_on").read_text().strip() != "1":
                return f"tracing was switched off in {self.instance}"
            if (self.instance / EVENT / "enable").read_text().strip() != "1":
                return f"{EVENT} was disabled in {self.instance}"
            for key, count in self._losses().items():
                if count != self._lost_before.get(key, 0):
                    return f"the write record lost events ({key} {count - self._lost_before.get(key, 0)})"
        except (OSError, ValueError) as exc:
            return f"cannot read the state of {self.instance}: {exc}"
        return None

    def close(self) -> None:
        self._stop.set()
        self._drainer.join(timeout=1)
        self._remove()

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with suppress(OSError):
            self._write(f"{EVENT}/enable", "0")
        with suppress(OSError):
            self.instance.rmdir()
