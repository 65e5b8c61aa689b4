"""Move guest memory through helpers: export a RAM file into a transfer
stream, import a transfer stream into a RAM file (docs/transfer-format.md).

Export: N helpers each own one helper stream ("shard"); private pages are
dealt to them in batches of MaxBatchPages, round robin, one thread per
helper. Each helper's data area holds two output regions: while the helper
seals the next batch into one, a writer thread puts the other on the sink
straight from the shared mapping (no copy), so reading guest pages (inside
the helpers), encryption and writing overlap. Shared pages (from a page
map) travel as plain frames, each in its page's shard, whose helper seals
their count and digest in its end record; excluded pages not at all.

Import: the reader parses frames (hostile input, bounded), hands each
shard's frames to that shard's helper thread through a bounded queue (back
pressure), and writes plain pages itself after its own checks (docs). The
result counts only when every shard's end record verified inside its helper,
with the shard's shared pages as the target received them, the totals
agree, and target helper 0 accepted IMPORT_COMMIT with every shard's receipt.

Binding (docs/stream-format.md): with a challenge, each target helper draws
a nonce (IMPORT_CHALLENGE), the source helpers get all of them and bind
shard k to nonce k and to their SHA-256 (the migration id); without one, the
exporter picks a random migration id (an unbound stream: no replay
protection, but shards of one export still belong together).

How an import can never be mistaken for complete (``mode="replace"``, the
CLI's): the helpers write into a hidden temporary file next to DST; only
after full verification is it flushed, fsync'ed and renamed over DST. On
any failure the temporary file is deleted and DST is left as it was (absent
if it did not exist). ``mode="in-place"`` writes DST directly; the caller
(live migration) must not use DST unless the import returned success.
"""

from __future__ import annotations

import functools
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from helper import abi
from helper import stream as s
from host_shim.errors import MailboxError, OvmfMhError
from host_shim.helpers.backends import Backend, check_guest_size, open_backends
from host_shim.helpers.mailbox import DEFAULT_TIMEOUT, status_name
from host_shim.local_files import create_exclusive
from host_shim.progress import Progress
from host_shim.transfer import commit_proof
from host_shim.transfer import container as ct
from host_shim.transfer import holes as zr
from host_shim.vm import process

LIST_AT = 0
IO_AT = 64 * 1024
#: Output regions per helper for EXPORT_BATCH: one being sealed, one being written.
OUTPUT_REGIONS = 2

PAGE_PRIVATE = 0
PAGE_SHARED = 1
PAGE_EXCLUDED = 2

#: Pages one EXPORT_ZERO_RANGES call may cover (32 MiB): the source helper
#: reads every byte of them and the target helper every byte again in one
#: IMPORT_BATCH, so a call must stay well inside the mailbox timeout under
#: TCG (a full list of 256 whole blocks, 512 MiB, took over 10 s on a
#: loaded machine).
ZERO_RANGE_PAGES_PER_CALL = 8192

#: Page numbers, as the hot loop uses them: no Python work per page.
PageNumbers = npt.NDArray[np.uint64]


class TransferError(OvmfMhError):
    """A transfer failed; nothing was marked complete."""


#: Nonces of the target helpers, in shard order (IMPORT_CHALLENGE).
Nonces = list[bytes]
CHALLENGE_MAGIC = b"OMHCHAL2"
#: Challenge message: magic, shard count (u32), reserved (u32), guest size (u64), then the nonces.
CHALLENGE_HEADER = struct.Struct("<8sIIQ")


def encode_challenge(nonces: Nonces, guest_size: int) -> bytes:
    """The challenge a target sends its source (a file or the TCP connection)."""
    return CHALLENGE_HEADER.pack(CHALLENGE_MAGIC, len(nonces), 0, guest_size) + b"".join(nonces)


def read_challenge(source: ct.Reader | IO[bytes]) -> tuple[Nonces, int]:
    """Parse a challenge (hostile input: bounded): (nonces, guest size)."""
    magic, count, reserved, guest_size = CHALLENGE_HEADER.unpack(
        ct.read_exact(source, CHALLENGE_HEADER.size, "the challenge header"))
    if magic != CHALLENGE_MAGIC or reserved:
        raise TransferError("not an ovmf-mh challenge (bad magic or reserved field)")
    if not 1 <= count <= ct.MAX_SHARDS:
        raise TransferError(f"challenge for {count} shards; 1 to {ct.MAX_SHARDS}")
    size = abi.load().const("OVMF_MH_CHALLENGE_SIZE")
    raw = ct.read_exact(source, count * size, "the challenge nonces")
    nonces = [raw[i : i + size] for i in range(0, len(raw), size)]
    for index, nonce in enumerate(nonces):
        # A target helper draws its nonce at random: all zero or twice is no challenge of theirs.
        if not any(nonce):
            raise TransferError(f"challenge: the nonce of shard {index} is all zero")
        if nonce in nonces[:index]:
            raise TransferError(f"challenge: the nonce of shard {index} repeats the one of shard "
                                f"{nonces.index(nonce)}")
    return nonces, guest_size


#: Statuses of IMPORT_BEGIN that a stream sealed under another key produces.
WRONG_KEY_STATUSES = ("BAD_HEADER", "AUTH_FAILED")


def partial_summary(error: BaseException) -> TransferSummary | None:
    """What a failed transfer really did before it failed (see _attach), also
    for an error raised while handling the transfer's own."""
    for candidate in (error, error.__context__):
        summary = getattr(candidate, "transfer_summary", None)
        if isinstance(summary, TransferSummary):
            return summary
    return None


def _attach(error: BaseException, summary: TransferSummary) -> None:
    if partial_summary(error) is None:
        error.transfer_summary = summary  # type: ignore[attr-defined]


@dataclass
class TransferSummary:
    direction: str
    helper: str
    helpers: int
    guest_bytes: int
    outcome: str = "failed"
    private_pages: int = 0
    shared_pages: int = 0
    excluded_pages: int = 0
    zero_pages: int = 0
    #: Private pages that went as ZERO_RANGE records (EXPORT_ZERO_RANGES), not page by page.
    zero_range_pages: int = 0
    stream_bytes: int = 0
    seconds: float = 0.0
    helper_start_seconds: float = 0.0  # part of ``seconds`` spent starting helpers
    # Part of ``seconds`` from all helpers READY to the last page verified
    # (import) or the DONE frame written (export): without starting and
    # stopping helpers and without making the import durable.
    transfer_seconds: float = 0.0
    error: str | None = None
    work_dir: str | None = None
    shard_records: list[int] = field(default_factory=list)
    #: The streams were bound to the target helpers' challenge nonces.
    bound: bool = False
    #: Import: target helper 0's commit proof and the receipts it covers, as
    #: hex (docs/stream-format.md, "Commit proof"); export: "verified" once
    #: the source helpers accepted the target's.
    commit_proof: str = ""

    @property
    def pages(self) -> int:
        return self.private_pages + self.shared_pages

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pages"] = self.pages
        out["pages_per_s"] = self.pages / self.seconds if self.seconds else 0.0
        out["mb_per_s"] = self.guest_bytes / self.seconds / 1e6 if self.seconds else 0.0
        return out

    def describe(self) -> str:
        rate = self.pages / self.seconds if self.seconds else 0.0
        done = "" if self.outcome == "ok" else " done before the failure"
        text = (
            f"{self.direction} {self.outcome}: {self.pages} pages{done} ({self.private_pages} private through "
            f"{self.helpers} {self.helper} helper(s), {self.shared_pages} shared, {self.excluded_pages} "
            f"excluded, {self.zero_pages} zero, {self.zero_range_pages} as zero ranges), {self.stream_bytes} "
            f"stream bytes in {self.seconds:.2f} s ({rate:.0f} pages/s)"
        )
        if self.error:
            text += f"\n  error: {self.error}"
        if self.work_dir and self.outcome != "ok":
            text += f"\n  helper logs: {self.work_dir}"
        return text


def _geometry() -> tuple[int, int, int]:
    a = abi.load()
    page = a.const("OVMF_MH_PAGE_SIZE")
    record = a.layout("OVMF_MH_RECORD_HEADER").size + page + a.const("OVMF_MH_TAG_SIZE")
    return page, a.const("OVMF_MH_MAX_BATCH_PAGES"), record


def load_page_map(path: Path | None, pages: int) -> bytes | None:
    """One byte per guest page: 0 private, 1 shared, 2 excluded (docs)."""
    if path is None:
        return None
    data = path.read_bytes()
    if len(data) != pages:
        raise TransferError(f"page map {path} has {len(data)} entries; the guest has {pages} pages")
    bad = set(data) - {PAGE_PRIVATE, PAGE_SHARED, PAGE_EXCLUDED}
    if bad:
        raise TransferError(f"page map {path} holds values {sorted(bad)}; allowed: 0 private, 1 shared, 2 excluded")
    return data


def _plan(pages: int, page_map: bytes | None) -> tuple[PageNumbers, list[int], int]:
    if page_map is None:
        return np.arange(pages, dtype=np.uint64), [], 0
    states = np.frombuffer(page_map, dtype=np.uint8)
    private = np.flatnonzero(states == PAGE_PRIVATE).astype(np.uint64)
    shared = [int(p) for p in np.flatnonzero(states == PAGE_SHARED)]
    return private, shared, pages - len(private) - len(shared)


def _pack_offsets(chunk: PageNumbers, page: int) -> bytes:
    """A page list as the helpers read it: little-endian UINT64 guest offsets."""
    return (chunk * np.uint64(page)).astype("<u8").tobytes()


def _call(backend: Backend, command: str, *args: int) -> tuple[int, ...]:
    """Run one helper command; a refusal raises MailboxError naming the helper."""
    status, results = backend.call(command, *args)
    if status != 0:
        who = getattr(backend, "label", "helper")
        name = status_name(status)
        hint = ""
        if command == "IMPORT_BEGIN" and name in WRONG_KEY_STATUSES:
            hint = ("; the stream header does not authenticate under this key: most likely the sender used "
                    "another key (check --key on both sides), else the stream is damaged")
        raise MailboxError(f"{who} refused {command}{hint}", command=command, status=status, status_name=name)
    return results


def _calls(counts: npt.NDArray[np.uint64], max_ranges: int, max_pages: int) -> list[tuple[int, int]]:
    """Split runs of ``counts`` pages into calls of at most ``max_ranges``
    runs and (unless one run alone is larger) ``max_pages`` pages:
    (start, stop) index pairs."""
    calls: list[tuple[int, int]] = []
    start, pages = 0, 0
    for index, count in enumerate(counts.tolist()):
        if index > start and (index - start == max_ranges or pages + count > max_pages):
            calls.append((start, index))
            start, pages = index, 0
        pages += count
    if start < len(counts):
        calls.append((start, len(counts)))
    return calls


class _Failure:
    """First error of any thread; everyone else stops at the next check."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.event = threading.Event()
        self._lock = threading.Lock()

    def set(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self.event.set()

    def raise_if_set(self) -> None:
        if self.error is not None:
            raise self.error


def _thread(target: Callable[[], None], failure: _Failure, name: str) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as exc:
            failure.set(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@contextmanager
def _timed(summary: TransferSummary) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        summary.seconds = time.monotonic() - start


# --- export ------------------------------------------------------------------------


@dataclass
class PassStats:
    pages: int
    zero_pages: int
    stream_bytes: int
    seconds: float
    zero_range_pages: int = 0


class Exporter:
    """Source side of a transfer, usable for several passes over the same
    guest (live migration re-sends dirtied pages in later passes).

    Each helper keeps one session for the whole transfer: records of later
    passes follow earlier ones in its stream, so the target applies them in
    order and ends with the last version of every page. A writer thread puts
    frames on the sink while the helper threads work.
    """

    def __init__(
        self,
        src: Path,
        key: bytes,
        sink: IO[bytes],
        *,
        kind: str = "firmware",
        helpers: int = 1,
        firmware: Path | None = None,
        work_dir: Path,
        track_pages: bool = False,
        mailbox_timeout: float = DEFAULT_TIMEOUT,
        challenge: Callable[[], Nonces] | None = None,
        zero_ranges: bool = True,
        keepalive: float | None = None,
    ) -> None:
        """``challenge`` gives the target helpers' nonces once the file
        header is on the sink (a TCP peer answers it with them); without
        it the streams are unbound. ``zero_ranges``: pages in holes of the
        RAM file go as ZERO_RANGE records (EXPORT_ZERO_RANGES, ABI 2.1),
        which the source helper checks; False sends every page as its own
        record (what a 2.0 target accepts). ``keepalive``: put a
        KEEPALIVE frame on the sink after this many seconds without a
        frame (a live migration's peer counts silence as gone); every
        frame is flushed to the sink once no other is queued behind it."""
        self.page, self.batch, self.record = _geometry()
        self.keepalive = keepalive
        self.zero_ranges = zero_ranges
        self._zero_range_record = abi.load().layout("OVMF_MH_RECORD_HEADER").size + abi.load().layout(
            "OVMF_MH_ZERO_RANGE_PAYLOAD").size + abi.load().const("OVMF_MH_TAG_SIZE")
        self._max_ranges = abi.load().const("OVMF_MH_MAX_ZERO_RANGES")
        if abi.load().const("OVMF_MH_SHARD_BLOCK_PAGES") != self.batch:
            raise TransferError("the shard block of HelperAbi.h is not MaxBatchPages; shard_of assumes it is")
        self._challenge = challenge
        self._nonces: Nonces | None = None
        self._migration_id = os.urandom(abi.load().const("OVMF_MH_MIGRATION_ID_SIZE"))
        # Only live migration asks CHECK_PAGES; tracking costs every helper
        # bookkeeping per page (a copy of each page, in the reference helper).
        self._begin_flags = abi.load().const("OVMF_MH_EXPORT_TRACK_PAGES") if track_pages else 0
        if not 1 <= helpers <= ct.MAX_SHARDS:
            raise TransferError(f"--helpers {helpers}: a transfer has 1 to {ct.MAX_SHARDS} shards, one per helper")
        if not src.is_file():
            raise TransferError(f"guest RAM file {src} does not exist or is not a regular file")
        self.size = src.stat().st_size
        if self.size == 0 or self.size % self.page:
            raise TransferError(f"{src}: size {self.size} is not a positive multiple of {self.page}")
        self.src, self.key, self.sink = src, key, sink
        self.kind, self.helpers, self.firmware, self.work_dir = kind, helpers, firmware, work_dir
        self.mailbox_timeout = mailbox_timeout
        self.summary = TransferSummary("export", kind, helpers, self.size, work_dir=str(work_dir))
        self._failure = _Failure()
        self._count_lock = threading.Lock()
        # One frame per helper queued (and at most OUTPUT_REGIONS per helper
        # not yet written): what is in flight must still be imported after a
        # live migration stops the guest.
        self._frames: queue.Queue[tuple[ct.Frame, Callable[[], None] | None] | None] = queue.Queue(maxsize=helpers)
        self._free_regions: list[queue.Queue[int]] = []
        self._digest = ct.PlainDigest()
        # Per shard, the shared pages as the writer puts them on the sink
        # (one queue, so in stream order): sealed by EXPORT_END.
        self._shared = [s.SharedPages() for _ in range(helpers)]
        self._stack = ExitStack()
        self._backends: list[Backend] = []
        self._writer: threading.Thread | None = None
        self._window: memoryview | None = None
        self._started = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------

    def start_helpers(self) -> None:
        """Start the helpers and map the RAM file, nothing on the sink yet:
        a live migration starts them while its target prepares (then
        ``with`` goes on from here). Once; ``__enter__`` does it otherwise.
        On failure the caller closes the Exporter (``__exit__``)."""
        if self._backends:
            return
        self._backends = self._stack.enter_context(
            open_backends(self.kind, self.helpers, self.src, self.key, self.work_dir,
                          firmware=self.firmware, writable=False, mailbox_timeout=self.mailbox_timeout)
        )
        self._free_regions = [self._output_regions(backend) for backend in self._backends]
        raw = self._stack.enter_context(self.src.open("rb"))
        window_map = self._stack.enter_context(mmap.mmap(raw.fileno(), self.size, access=mmap.ACCESS_READ))
        self._window = memoryview(window_map)
        self._stack.callback(self._window.release)
        self.summary.helper_start_seconds = time.monotonic() - self._started

    def __enter__(self) -> Exporter:
        try:
            self.start_helpers()
            self._write(ct.FileHeader(self.size, self.helpers).encode())
            if self._challenge is not None:
                self.sink.flush()
                self._nonces = self._challenge()
                if len(self._nonces) != self.helpers:
                    raise TransferError(f"the target sent {len(self._nonces)} challenge nonce(s) for "
                                        f"{self.helpers} shard(s)")
                self.summary.bound = True
            self._writer = _thread(self._write_frames, self._failure, "export-writer")
            self._run_shards(lambda index, backend: self._begin(index, backend))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def abort(self, error: BaseException) -> None:
        """Stop every helper thread at its next step with ``error`` (another
        thread saw the transfer fail: a dead peer, a dead QEMU)."""
        self._failure.set(error)

    def _close(self) -> None:
        self._failure.event.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        # Frames never written hold views of the helpers' shared areas.
        with suppress(queue.Empty):
            while True:
                item = self._frames.get_nowait()
                if item is not None and isinstance(item[0].payload, memoryview):
                    item[0].payload.release()
        self._stack.close()
        self.summary.seconds = time.monotonic() - self._started

    # -- frames -------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.summary.stream_bytes += len(data)

    def _write_frames(self) -> None:
        last = time.monotonic()
        while True:
            try:
                frame = self._frames.get(timeout=0.1)
            except queue.Empty:
                if self._failure.event.is_set():
                    return
                if self.keepalive is not None and time.monotonic() - last >= self.keepalive:
                    self._write(ct.FRAME_HEADER.pack(ct.KIND_KEEPALIVE, 0, 0))
                    self.sink.flush()
                    last = time.monotonic()
                continue
            if frame is None:
                return
            last = time.monotonic()
            item, written = frame
            try:
                if item.kind == ct.KIND_PLAIN_PAGE:
                    self._digest.update(item.payload)
                # Header and payload separately: no copy of the payload.
                self._write(ct.FRAME_HEADER.pack(item.kind, item.shard, len(item.payload)))
                self._write(item.payload)
            finally:
                if isinstance(item.payload, memoryview):
                    item.payload.release()
            if written is not None:
                written()
            if self.keepalive is not None and self._frames.empty():
                # Nothing queued behind it: on its way now, not when the
                # sink's buffer fills (a frame of zero ranges is a few KB
                # for many seconds of helper work).
                self.sink.flush()

    def _put(self, frame: ct.Frame, written: Callable[[], None] | None = None) -> None:
        """Queue a frame for the writer; ``written`` runs once it is on the sink."""
        while not self._failure.event.is_set():
            with suppress(queue.Full):
                self._frames.put((frame, written), timeout=0.1)
                return
        if isinstance(frame.payload, memoryview):
            frame.payload.release()
        self._failure.raise_if_set()
        raise TransferError("export stopped")

    def _output_regions(self, backend: Backend) -> queue.Queue[int]:
        size = -(-self.batch * self.record // self.page) * self.page
        if IO_AT + OUTPUT_REGIONS * size > len(backend.data):
            raise TransferError(f"a helper's data area ({len(backend.data)} bytes) cannot hold "
                                f"{OUTPUT_REGIONS} output regions of {size} bytes")
        free: queue.Queue[int] = queue.Queue()
        for region in range(OUTPUT_REGIONS):
            free.put(IO_AT + region * size)
        return free

    def _take_region(self, index: int) -> int:
        """An output region of helper ``index`` that the writer is done with."""
        while not self._failure.event.is_set():
            with suppress(queue.Empty):
                return self._free_regions[index].get(timeout=0.1)
        self._failure.raise_if_set()
        raise TransferError("export stopped")

    def _run_shards(self, work: Callable[[int, Backend], None]) -> None:
        threads = [
            _thread(lambda i=i, b=b: work(i, b), self._failure, f"export-{i}")  # type: ignore[misc]
            for i, b in enumerate(self._backends)
        ]
        for thread in threads:
            while thread.is_alive() and not self._failure.event.is_set():
                thread.join(timeout=0.1)
        self._failure.raise_if_set()

    # -- helper commands ----------------------------------------------------------------

    def _begin(self, index: int, backend: Backend) -> None:
        region = self._take_region(index)
        flags = self._begin_flags
        if self._nonces is not None:
            backend.data[LIST_AT : LIST_AT + len(b"".join(self._nonces))] = b"".join(self._nonces)
            flags |= abi.load().const("OVMF_MH_EXPORT_BOUND")
        else:
            backend.data[LIST_AT : LIST_AT + len(self._migration_id)] = self._migration_id
        try:
            written = _call(backend, "EXPORT_BEGIN", region, self.record, flags, LIST_AT, index, self.helpers)[0]
            header = bytes(backend.data[region : region + written])
        finally:
            self._free_regions[index].put(region)
        self._put(ct.Frame(ct.KIND_STREAM_HEADER, index, header))

    def send(
        self,
        pages: PageNumbers | list[int],
        meter: Progress | None = None,
        before_batch: Callable[[PageNumbers], None] | None = None,
    ) -> PassStats:
        """One pass: the given page numbers through the helpers, in parallel.
        ``before_batch`` sees each batch's page numbers just before its helper
        reads them (live migration snapshots them there)."""
        started = time.monotonic()
        sizes = [0] * self.helpers
        # A page always travels in the same shard: shards are applied in
        # parallel on the target, so only within one shard is a re-sent page
        # guaranteed to land after its older copy.
        mine = self._by_shard(pages)
        zeros = [0] * self.helpers
        ranged = [0] * self.helpers
        empty = zr.hole_pages(self.src, self.page) if self.zero_ranges else None

        def work(index: int, backend: Backend) -> None:
            data = backend.data
            own = mine[index]
            if empty is not None and len(own):
                in_hole = empty[own.astype(np.int64)]
                covered, written, refused = self._send_zero_ranges(index, backend, own[in_hole], meter, before_batch)
                ranged[index] += covered
                sizes[index] += written
                own = np.concatenate((own[~in_hole], refused))
            for chunk in (own[i : i + self.batch] for i in range(0, len(own), self.batch)):
                self._failure.raise_if_set()
                data[LIST_AT : LIST_AT + 8 * len(chunk)] = _pack_offsets(chunk, self.page)
                region = self._take_region(index)
                if before_batch is not None:
                    before_batch(chunk)
                try:
                    written, _, zero = _call(
                        backend, "EXPORT_BATCH", LIST_AT, len(chunk), region, len(chunk) * self.record
                    )[:3]
                except BaseException:
                    self._free_regions[index].put(region)
                    raise
                zeros[index] += zero
                sizes[index] += ct.FRAME_HEADER.size + written
                with self._count_lock:
                    self.summary.private_pages += len(chunk)
                # The writer returns the region once the records are on the sink.
                self._put(ct.Frame(ct.KIND_RECORDS, index, data[region : region + written]),
                          lambda free=self._free_regions[index], region=region: free.put(region))  # type: ignore[misc]
                if meter is not None:
                    meter.advance(len(chunk))

        try:
            self._run_shards(work)
        finally:
            self.summary.zero_pages += sum(zeros)
            self.summary.zero_range_pages += sum(ranged)
        return PassStats(len(pages), sum(zeros), sum(sizes), time.monotonic() - started, sum(ranged))

    def _send_zero_ranges(
        self,
        index: int,
        backend: Backend,
        pages: PageNumbers,
        meter: Progress | None,
        before_batch: Callable[[PageNumbers], None] | None,
    ) -> tuple[int, int, PageNumbers]:
        """Pages the host believes empty, as runs inside shard blocks,
        through EXPORT_ZERO_RANGES: the helper checks every byte and seals
        one record per run. A list the helper refuses with NOT_ZERO (a page
        was written since the host looked) changes nothing; its pages are
        returned to go as ordinary records. Returns (pages covered, frame
        bytes, pages refused)."""
        firsts, counts = zr.runs(pages, self.batch)
        data = backend.data
        covered = size = 0
        refused: list[PageNumbers] = [np.empty(0, dtype=np.uint64)]
        for start, stop in _calls(counts, self._max_ranges, ZERO_RANGE_PAGES_PER_CALL):
            self._failure.raise_if_set()
            first, count = firsts[start:stop], counts[start:stop]
            entries = np.empty((len(first), 2), dtype="<u8")
            entries[:, 0] = first * np.uint64(self.page)
            entries[:, 1] = count
            data[LIST_AT : LIST_AT + entries.nbytes] = entries.tobytes()
            offsets = np.repeat(np.cumsum(count) - count, count.astype(np.int64))
            numbers = np.repeat(first, count.astype(np.int64)) + (
                np.arange(int(count.sum()), dtype=np.uint64) - offsets)
            region = self._take_region(index)
            if before_batch is not None:
                before_batch(numbers)
            try:
                written, _, pages_covered = _call(
                    backend, "EXPORT_ZERO_RANGES", LIST_AT, len(first), region, len(first) * self._zero_range_record
                )[:3]
            except MailboxError as error:
                self._free_regions[index].put(region)
                if error.status_name != "NOT_ZERO":
                    raise
                refused.append(numbers)
                continue
            except BaseException:
                self._free_regions[index].put(region)
                raise
            covered += pages_covered
            size += ct.FRAME_HEADER.size + written
            with self._count_lock:
                self.summary.private_pages += pages_covered
            self._put(ct.Frame(ct.KIND_RECORDS, index, data[region : region + written]),
                      lambda free=self._free_regions[index], region=region: free.put(region))  # type: ignore[misc]
            if meter is not None:
                meter.advance(pages_covered)
        return covered, size, np.concatenate(refused)

    def shard_of(self, number: int) -> int:
        """The helper that carries page ``number``, the same in every pass."""
        return s.shard_of_page(number, self.helpers)

    def _by_shard(self, pages: PageNumbers | list[int]) -> list[PageNumbers]:
        """``pages`` split by shard_of, each part in the original order."""
        numbers = np.asarray(pages, dtype=np.uint64)
        shards = (numbers // np.uint64(s.SHARD_BLOCK_PAGES)) % np.uint64(self.helpers)
        return [numbers[shards == index] for index in range(self.helpers)]

    def changed_since_sent(self, pages: PageNumbers | list[int]) -> PageNumbers:
        """Of ``pages``, those whose content differs from what their helper
        last sent (CHECK_PAGES, a keyed hash inside the helper: exact even
        when a page changed and changed back while it was being read).
        Needs an Exporter made with ``track_pages=True``."""
        # A page only ever travels in its own shard, so that helper is the one
        # to ask; a page it never sent it reports as changed.
        by_shard = self._by_shard(pages)
        found: list[PageNumbers] = [np.empty(0, dtype=np.uint64)] * self.helpers

        def work(index: int, backend: Backend) -> None:
            data = backend.data
            mine = by_shard[index]
            changed = []
            for start in range(0, len(mine), self.batch):
                chunk = mine[start : start + self.batch]
                data[LIST_AT : LIST_AT + 8 * len(chunk)] = _pack_offsets(chunk, self.page)
                # The flags go into a free output region: the other may still
                # hold records on their way to the sink.
                region = self._take_region(index)
                try:
                    _call(backend, "CHECK_PAGES", LIST_AT, len(chunk), region)
                    flags = bytes(data[region : region + len(chunk)])
                finally:
                    self._free_regions[index].put(region)
                changed.append(chunk[np.frombuffer(flags, dtype=np.uint8) != 0])
            if changed:
                found[index] = np.concatenate(changed)

        self._run_shards(work)
        return np.concatenate(found)

    def send_plain(self, pages: list[int], meter: Progress | None = None) -> None:
        """Shared pages, as plain frames (they are not confidential), each in
        its page's shard; that shard's helper seals their count and digest in
        its end record (``finish``), so the target can tell them from forgeries."""
        assert self._window is not None
        for number in pages:
            self._failure.raise_if_set()
            offset = number * self.page
            shard = self.shard_of(number)
            payload = ct.PLAIN_PAGE.pack(offset) + bytes(self._window[offset : offset + self.page])
            # Digested in the order the frames enter the writer's queue, which
            # is the order they reach the sink.
            self._shared[shard].update(payload)
            self._put(ct.Frame(ct.KIND_PLAIN_PAGE, shard, payload))
            self.summary.shared_pages += 1
            if meter is not None:
                meter.advance(1)

    def finish(self, excluded_pages: int = 0) -> TransferSummary:
        """End every helper's stream and write the DONE frame."""

        def end(index: int, backend: Backend) -> None:
            shared = self._shared[index]
            backend.data[LIST_AT : LIST_AT + s.DIGEST_SIZE] = shared.digest()
            region = self._take_region(index)
            try:
                written = _call(backend, "EXPORT_END", region, self.record, LIST_AT, shared.count)[0]
                end_record = bytes(backend.data[region : region + written])
            finally:
                self._free_regions[index].put(region)
            self._put(ct.Frame(ct.KIND_STREAM_END, index, end_record))

        self._run_shards(end)
        self._put_and_drain()
        self.summary.excluded_pages = excluded_pages
        totals = ct.Totals(self.summary.private_pages, self.summary.shared_pages, excluded_pages,
                           self.summary.zero_pages, self._digest.hexdigest(), self.summary.zero_range_pages)
        done = ct.Frame(ct.KIND_DONE, 0, totals.encode())
        self._write(done.encode())
        self.sink.flush()
        self.summary.transfer_seconds = time.monotonic() - self._started - self.summary.helper_start_seconds
        self.summary.outcome = "ok"
        return self.summary

    def verify_commit(self, blob: bytes, peer: str) -> None:
        """Every source helper checks the target's commit proof against the
        stream it exported (EXPORT_VERIFY_COMMIT); CommitProofError if one
        refuses. Call after finish(), before anything is committed."""
        commit_proof.verify(self._backends, blob, peer)
        self.summary.commit_proof = "verified"

    def _put_and_drain(self) -> None:
        """Let the writer put every queued frame on the sink, then stop it."""
        self._put_end_marker()
        if self._writer is not None:
            while self._writer.is_alive() and not self._failure.event.is_set():
                self._writer.join(timeout=0.1)
            self._writer = None
        self._failure.raise_if_set()

    def _put_end_marker(self) -> None:
        while not self._failure.event.is_set():
            with suppress(queue.Full):
                self._frames.put(None, timeout=0.1)
                return
        self._failure.raise_if_set()


def export_ram(
    src: Path,
    key: bytes,
    sink: IO[bytes],
    *,
    kind: str = "firmware",
    helpers: int = 1,
    firmware: Path | None = None,
    work_dir: Path,
    page_map: Path | None = None,
    progress: bool | None = None,
    mailbox_timeout: float = DEFAULT_TIMEOUT,
    challenge: Callable[[], Nonces] | None = None,
    zero_ranges: bool = True,
    confirm: Callable[[], bytes] | None = None,
) -> TransferSummary:
    """Write the transfer stream of RAM file ``src`` to ``sink`` (one pass),
    bound to the target's ``challenge`` nonces if given, else unbound;
    pages in holes of ``src`` as zero ranges unless ``zero_ranges`` is False.
    ``confirm`` (a TCP sender): called once the stream is written, returns
    the target's commit proof, which every source helper must accept before
    this returns (CommitProofError otherwise).
    On failure the exception carries what was done (``partial_summary``)."""
    # Checks the arguments and the RAM file; starts nothing before __enter__.
    exporter = Exporter(src, key, sink, kind=kind, helpers=helpers, firmware=firmware, work_dir=work_dir,
                        mailbox_timeout=mailbox_timeout, challenge=challenge, zero_ranges=zero_ranges)
    pages = exporter.size // exporter.page
    private, shared, excluded = _plan(pages, load_page_map(page_map, pages))
    meter = Progress("export", len(private) + len(shared), enabled=progress)
    try:
        with exporter:
            exporter.send(private, meter)
            exporter.send_plain(shared, meter)
            summary = exporter.finish(excluded)
            if confirm is not None:
                exporter.verify_commit(confirm(), "receiver")
    except BaseException as exc:
        exporter.summary.error = str(exc)
        _attach(exc, exporter.summary)
        raise
    finally:
        meter.finish()
    return summary


# --- import ------------------------------------------------------------------------


def _challenge_all(backends: list[Backend]) -> Nonces:
    """A fresh nonce from every target helper, in shard order."""
    size = abi.load().const("OVMF_MH_CHALLENGE_SIZE")
    nonces = []
    for backend in backends:
        written = _call(backend, "IMPORT_CHALLENGE", IO_AT, size)[0]
        nonces.append(bytes(backend.data[IO_AT : IO_AT + written]))
    return nonces


def _commit(backends: list[Backend]) -> bytes:
    """Every target helper's receipt, checked by helper 0 (IMPORT_COMMIT):
    each shard of this migration imported completely, exactly once. Returns
    helper 0's commit proof followed by those receipts, for the source."""
    size = abi.load().layout("OVMF_MH_RECEIPT").size
    receipts = b""
    for backend in backends:
        written = _call(backend, "IMPORT_RECEIPT", IO_AT, size)[0]
        receipts += bytes(backend.data[IO_AT : IO_AT + written])
    first = backends[0]
    first.data[IO_AT : IO_AT + len(receipts)] = receipts
    _call(first, "IMPORT_COMMIT", IO_AT, len(receipts))
    return commit_proof.take(first, receipts)


def unconfirmed_helper_limit() -> int:
    """The most helpers an import starts on the word of a file header alone
    (no --helpers): max(4, CPUs). The header is not verified before the
    helpers run, so it must not make the host start 64 of them."""
    return max(4, os.cpu_count() or 1)


def _prepare_target(dst: Path, guest_size: int, mode: str) -> Path:
    if mode == "in-place":
        if not dst.is_file() or dst.stat().st_size != guest_size:
            raise TransferError(
                f"{dst} must exist with the stream's guest size ({guest_size} bytes) for in-place import"
            )
        return dst
    if dst.exists() and not dst.is_file():
        raise TransferError(f"{dst} is not a regular file")
    if dst.exists() and dst.stat().st_size != guest_size:
        raise TransferError(
            f"{dst} has {dst.stat().st_size} bytes; the stream carries a {guest_size}-byte guest"
        )
    partial = dst.with_name(f".{dst.name}.ovmf-mh-partial")
    # A leftover of a killed import is replaced; a planted link is refused (local_files.py).
    descriptor = create_exclusive(partial)
    process.remove_on_exit(partial)  # even if the import is killed
    with os.fdopen(descriptor, "wb") as f:
        try:
            f.truncate(guest_size)
        except OSError as exc:  # EFBIG: beyond what the file system holds
            process.remove(partial)
            raise TransferError(
                f"cannot make the target file {partial} {guest_size} bytes long (the guest size of the stream's "
                f"header): {exc.strerror or exc}; the file system of {dst} holds files up to a smaller size"
            ) from None
    return partial


@dataclass
class _ImportRun:
    """One import's state, handed from phase to phase: the stream's header,
    the file the helpers write, the summary being filled and, per shard,
    what its helper thread has applied so far."""

    header: ct.FileHeader
    mode: str
    target: Path
    summary: TransferSummary
    meter: Progress
    started: float
    failure: _Failure = field(default_factory=_Failure)
    completed: list[bool] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    zero_pages: list[int] = field(default_factory=list)
    range_records: list[int] = field(default_factory=list)
    range_pages: list[int] = field(default_factory=list)
    applied_pages: list[int] = field(default_factory=list)
    #: Shared pages per shard (count, digest) as received before the shard's
    #: STREAM_END; its helper compares them with what the source sealed.
    sealed_shared: list[tuple[int, bytes]] = field(default_factory=list)
    #: Short queues: what is in flight must be imported before a switchover.
    queues: list[queue.Queue[ct.Frame | None]] = field(default_factory=list)
    #: Plain (shared) pages written so far.
    shared_pages: int = 0

    def __post_init__(self) -> None:
        shards = self.header.shards
        self.completed = [False] * shards
        self.records, self.zero_pages = [0] * shards, [0] * shards
        self.range_records, self.range_pages, self.applied_pages = [0] * shards, [0] * shards, [0] * shards
        self.sealed_shared = [(0, s.NO_SHARED_PAGES)] * shards
        self.queues = [queue.Queue(maxsize=1) for _ in range(shards)]


def import_ram(
    dst: Path,
    key: bytes,
    source: IO[bytes],
    *,
    kind: str = "firmware",
    helpers: int | None = None,
    firmware: Path | None = None,
    work_dir: Path,
    mode: str = "replace",
    progress: bool | None = None,
    expect: ct.FileHeader | None = None,
    on_ready: Callable[[], None] | None = None,
    mailbox_timeout: float = DEFAULT_TIMEOUT,
    challenge: Callable[[Nonces, int], None] | None = None,
    on_committed: Callable[[TransferSummary], None] | None = None,
    on_frame: Callable[[int, int], None] | None = None,
) -> TransferSummary:
    """Read a transfer stream from ``source`` into RAM file ``dst``; raises
    TransferError (or the helper's MailboxError) unless everything verified.

    With ``expect`` (the shard count and guest size the caller knows), the
    target helpers start and ``on_ready`` is called before a single byte of
    the stream is read: the receiving side is up before any page moves.
    On failure the exception carries what was done (``partial_summary``):
    pages applied by the helpers before it, none of them kept in ``replace`` mode.

    With ``challenge``, every target helper draws a nonce (IMPORT_CHALLENGE)
    once the helpers run, before ``on_ready`` and before a frame is read;
    ``challenge`` gets them (in shard order) and the guest size, to pass
    to the source. The
    helpers then accept only streams bound to their own nonce. In any case
    the import succeeds only after target helper 0 committed every shard's
    receipt (IMPORT_COMMIT).

    ``on_committed`` (in-place mode) gets the summary as soon as the commit
    succeeded, before the helpers are shut down: a live migration's target
    can give its verdict while its helper VMs power off (a helper VM that
    mapped a 16 GiB guest takes a while to exit).

    ``on_frame`` gets each frame's kind and payload size as it is read (the
    stream's liveness: host_shim/transfer/liveness.py).

    The phases, each a function: ``_import_prepare`` (header, target file),
    then with the helpers running ``_import_ready`` (challenge, the expected
    header), ``_import_stream`` (every frame through its shard's helper),
    ``_import_check_totals`` and ``_import_commit`` (IMPORT_COMMIT), and
    last ``_import_keep`` (replace mode: the file becomes DST).
    """
    run = _import_prepare(dst, source, kind=kind, helpers=helpers, work_dir=work_dir, mode=mode,
                          progress=progress, expect=expect)
    succeeded = False
    with _timed(run.summary):
        try:
            with open_backends(kind, run.header.shards, run.target, key, work_dir, firmware=firmware,
                               mailbox_timeout=mailbox_timeout) as backends, \
                    run.target.open("r+b") as raw, mmap.mmap(raw.fileno(), run.header.guest_size) as target_map:
                run.summary.helper_start_seconds = time.monotonic() - run.started
                _import_ready(run, backends, source, expect, challenge, on_ready)
                totals, digest = _import_stream(run, backends, source, target_map, on_frame)
                private = _import_check_totals(run, totals, digest)
                _import_commit(run, backends, target_map, private, totals, on_committed)
            _import_keep(run, dst)
            succeeded = True
        except BaseException as exc:
            run.summary.error = str(exc)
            if not succeeded:
                _import_partial(run, exc)
            raise
        finally:
            run.meter.finish()
            if mode == "replace" and not succeeded:
                process.remove(run.target)
    run.summary.outcome = "ok"
    return run.summary


def _import_prepare(dst: Path, source: IO[bytes], *, kind: str, helpers: int | None, work_dir: Path, mode: str,
                    progress: bool | None, expect: ct.FileHeader | None) -> _ImportRun:
    """Phase prepare: the stream's header (read, or the expected one), the
    helper count it allows, and the file the helpers will write."""
    page, _, _ = _geometry()
    header = expect if expect is not None else ct.read_file_header(source)
    if helpers is not None and helpers != header.shards:
        raise TransferError(
            f"the stream has {header.shards} shard(s); import uses one helper per shard "
            f"(got --helpers {helpers})"
        )
    if helpers is None and expect is None and header.shards > unconfirmed_helper_limit():
        # Nothing in the header is verified until a helper runs: it alone must not start 64 helpers.
        raise TransferError(
            f"the stream's header claims {header.shards} shards; without --helpers an import starts at most "
            f"{unconfirmed_helper_limit()} helpers (max(4, CPUs)) on a header nothing has verified yet: give "
            f"--helpers {header.shards} to start that many")
    check_guest_size(kind, header.guest_size)
    summary = TransferSummary("import", kind, header.shards, header.guest_size, work_dir=str(work_dir),
                              stream_bytes=ct.FILE_HEADER.size)
    target = _prepare_target(dst, header.guest_size, mode)
    meter = Progress("import", header.guest_size // page, enabled=progress)
    return _ImportRun(header, mode, target, summary, meter, started=time.monotonic())


def _import_ready(run: _ImportRun, backends: list[Backend], source: IO[bytes], expect: ct.FileHeader | None,
                  challenge: Callable[[Nonces, int], None] | None, on_ready: Callable[[], None] | None) -> None:
    """Phase prepare, helpers running: their nonces to the source, the
    caller told, and (with ``expect``) the stream's header checked."""
    if challenge is not None:
        challenge(_challenge_all(backends), run.header.guest_size)
        run.summary.bound = True
    if on_ready is not None:
        on_ready()
    if expect is not None:
        found = ct.read_file_header(source)
        if found != expect:
            raise TransferError("the stream is not the one expected: " + ct.describe_mismatch(found, expect))


def _import_shard(run: _ImportRun, index: int, backend: Backend) -> None:
    """Thread body of shard ``index``: its frames, in order, through its helper."""
    data = backend.data
    began = False
    while True:
        frame = run.queues[index].get()
        if frame is None or run.failure.event.is_set():
            return
        if run.completed[index]:
            raise TransferError(f"shard {index}: frames after its end record")
        data[IO_AT : IO_AT + len(frame.payload)] = frame.payload
        if frame.kind == ct.KIND_STREAM_HEADER:
            if began:
                raise TransferError(f"shard {index}: second stream header")
            guest = _call(backend, "IMPORT_BEGIN", IO_AT, len(frame.payload), index, run.header.shards)[0]
            if guest != run.header.guest_size:
                raise TransferError(f"shard {index}: the helper verified a {guest}-byte guest, the "
                                    f"container claims {run.header.guest_size} bytes")
            began = True
        elif not began:
            raise TransferError(f"shard {index}: {ct.KIND_NAMES[frame.kind]} before the stream header")
        elif frame.kind == ct.KIND_RECORDS:
            applied, written, _, ranges, covered = _call(backend, "IMPORT_BATCH", IO_AT, len(frame.payload))[:5]
            run.zero_pages[index] += applied - written - ranges
            run.range_records[index] += ranges
            run.range_pages[index] += covered
            run.applied_pages[index] += applied - ranges + covered
            run.meter.advance(applied - ranges + covered)
        else:
            # What this shard's plain frames were when its end record
            # arrived (the reader stores it before queueing the frame).
            count, shared_digest = run.sealed_shared[index]
            data[LIST_AT : LIST_AT + len(shared_digest)] = shared_digest
            run.records[index] = _call(backend, "IMPORT_END", IO_AT, len(frame.payload), LIST_AT, count)[0]
            run.completed[index] = True


def _import_stream(run: _ImportRun, backends: list[Backend], source: IO[bytes], target_map: mmap.mmap,
                   on_frame: Callable[[int, int], None] | None) -> tuple[ct.Totals, str]:
    """Phase pre-copy: every frame of the stream, sealed ones through their
    shard's helper thread, plain ones written here; returns the DONE
    frame's totals and the plain pages' digest."""
    workers = [_thread(functools.partial(_import_shard, run, i, b), run.failure, f"import-{i}")
               for i, b in enumerate(backends)]
    try:
        totals, digest = _import_frames(run, source, target_map, on_frame)
        for q in run.queues:
            _put_unless_failed(run.failure, q, None)
        for worker in workers:
            while worker.is_alive() and not run.failure.event.is_set():
                worker.join(timeout=0.1)
        run.failure.raise_if_set()
    finally:
        run.failure.event.set()
        for q in run.queues:
            with suppress(queue.Full):
                q.put_nowait(None)
    if totals is None:
        raise TransferError("stream ended without its DONE frame")
    return totals, digest


def _put_unless_failed(failure: _Failure, q: queue.Queue[ct.Frame | None], item: ct.Frame | None) -> None:
    """Put ``item`` on a shard's queue, waiting while it is full, unless a thread failed."""
    while not failure.event.is_set():
        with suppress(queue.Full):
            q.put(item, timeout=0.1)
            return


def _import_frames(run: _ImportRun, source: IO[bytes], target_map: mmap.mmap,
                   on_frame: Callable[[int, int], None] | None) -> tuple[ct.Totals | None, str]:
    """The reader: parse frames (hostile input, bounded), write plain pages
    after their checks, queue the others for their shard."""
    page, _, _ = _geometry()
    digest = ct.PlainDigest()
    plain = ct.PlainPageChecker(run.header)
    totals: ct.Totals | None = None
    for frame in ct.read_frames(source, run.header.shards):
        run.failure.raise_if_set()
        run.summary.stream_bytes += ct.FRAME_HEADER.size + len(frame.payload)
        if on_frame is not None:
            on_frame(frame.kind, len(frame.payload))
        if frame.kind == ct.KIND_PLAIN_PAGE:
            offset = plain.accept(frame)
            digest.update(frame.payload)
            target_map[offset : offset + page] = frame.payload[ct.PLAIN_PAGE.size :]
            run.shared_pages += 1
            run.meter.advance(1)
        elif frame.kind == ct.KIND_DONE:
            totals = ct.Totals.decode(bytes(frame.payload))
        elif frame.kind == ct.KIND_KEEPALIVE:
            continue
        else:
            if frame.kind == ct.KIND_RECORDS:
                plain.records(frame)
            elif frame.kind == ct.KIND_STREAM_END:
                run.sealed_shared[frame.shard] = plain.end(frame.shard)
            _put_unless_failed(run.failure, run.queues[frame.shard], frame)
    return totals, digest.hexdigest()


def _import_check_totals(run: _ImportRun, totals: ct.Totals, digest: str) -> int:
    """Every shard ended verified and the counts agree with the DONE frame;
    returns the private pages that arrived."""
    missing = [i for i, ok in enumerate(run.completed) if not ok]
    if missing:
        raise TransferError(f"shard(s) {missing} never delivered a verified end record (truncated stream)")
    # A ZERO_RANGE record is one record of the END count and
    # PageCount pages (the helpers report both per batch).
    private = sum(run.records) - sum(run.range_records) + sum(run.range_pages)
    if private != totals.private_pages or run.shared_pages != totals.shared_pages:
        raise TransferError(
            f"totals disagree: {private} private / {run.shared_pages} shared pages arrived, "
            f"DONE says {totals.private_pages} / {totals.shared_pages}"
        )
    if sum(run.range_pages) != totals.zero_range_pages:
        raise TransferError(
            f"totals disagree: {sum(run.range_pages)} pages arrived as zero ranges, DONE says "
            f"{totals.zero_range_pages}"
        )
    if digest != totals.plain_digest:
        raise TransferError("plain pages do not match the DONE frame's digest")
    return private


def _import_commit(run: _ImportRun, backends: list[Backend], target_map: mmap.mmap, private: int,
                   totals: ct.Totals, on_committed: Callable[[TransferSummary], None] | None) -> None:
    """Phase commit: target helper 0 commits every shard's receipt; the
    summary is filled and (in place) given to ``on_committed`` at once."""
    summary = run.summary
    summary.commit_proof = _commit(backends).hex()
    summary.transfer_seconds = time.monotonic() - run.started - summary.helper_start_seconds
    if run.mode == "replace":
        # Durable before the rename; in place (live migration),
        # QEMU reads the same page cache and waiting for the disk
        # would only lengthen the downtime.
        target_map.flush()
    summary.private_pages = private
    summary.shared_pages = run.shared_pages
    summary.excluded_pages = totals.excluded_pages
    summary.zero_pages = sum(run.zero_pages)
    summary.zero_range_pages = sum(run.range_pages)
    summary.shard_records = list(run.records)
    if on_committed is not None and run.mode != "replace":
        on_committed(summary)


def _import_keep(run: _ImportRun, dst: Path) -> None:
    """Replace mode, helpers stopped: the verified file, made durable, becomes DST."""
    if run.mode == "replace":
        with run.target.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(run.target, dst)
        process.keep(run.target)


def _import_partial(run: _ImportRun, error: BaseException) -> None:
    """What a failed import did before ``error``, on the summary it carries."""
    summary = run.summary
    summary.private_pages = sum(run.applied_pages)
    summary.shared_pages = run.shared_pages
    summary.zero_pages = sum(run.zero_pages)
    summary.zero_range_pages = sum(run.range_pages)
    _attach(error, summary)
