"""A software migration helper with the semantics of the firmware's mailbox
dispatcher (docs/mailbox.md, docs/stream-format.md).

It is the executable specification the conformance suite holds every other
implementation to (the host-built C dispatcher, the firmware in QEMU), and a
helper the host can use where no helper VM exists. Every argument and every
byte of the data area is treated as hostile: :meth:`ReferenceHelper.dispatch`
validates instead of catching, and answers every input with a status.

Order of the checks, for every command (the first failing check answers):

1. session FAILED and the command is not NOP, QUERY, RESET or SHUTDOWN:
   SESSION_FAILED (also for unknown command codes);
2. unknown command code: UNSUPPORTED; more than OVMF_MH_ARG_COUNT arguments
   or an argument outside UINT64: INVALID_PARAMETER (the mailbox cannot carry
   either; only Python callers can);
3. session state not one the command accepts: BAD_STATE
   (EXPORT_BEGIN/IMPORT_BEGIN: IDLE or COMPLETE; *_BATCH, *_END: EXPORTING
   or IMPORTING respectively);
4. EXPORT_BEGIN/IMPORT_BEGIN without a transport key: NO_KEY;
5. EXPORT_BATCH: count > MaxBatchPages (BATCH_TOO_LARGE), then the page list
   range and the output range (OUT_OF_BOUNDS), then every list entry
   (BAD_PAGE), then the capacity for ``count`` full PAGE records
   (BUFFER_TOO_SMALL);
   EXPORT_BEGIN/EXPORT_END: the output range (OUT_OF_BOUNDS), then
   (EXPORT_BEGIN) unknown flag bits, a shard count outside
   1..OVMF_MH_MAX_SHARDS or a shard index not below it (INVALID_PARAMETER),
   the binding input range (OUT_OF_BOUNDS), then capacity for the header or
   end record (BUFFER_TOO_SMALL), then (EXPORT_BEGIN) the entropy source
   (NO_ENTROPY), (EXPORT_END, ABI 4.0) the shared-page digest's range
   when the shared page count is not 0 (OUT_OF_BOUNDS);
   IMPORT_CHALLENGE: the output range (OUT_OF_BOUNDS), capacity for a nonce
   (BUFFER_TOO_SMALL), the entropy source (NO_ENTROPY, which also drops an
   earlier challenge);
   IMPORT_RECEIPT/IMPORT_COMMIT: BAD_STATE unless the session is COMPLETE
   after an import; then the range (OUT_OF_BOUNDS); then the receipt
   capacity (BUFFER_TOO_SMALL) or a commit input that is not exactly
   ShardCount receipts (INVALID_PARAMETER);
   CHECK_PAGES: an export session that was not begun with TRACK_PAGES
   answers BAD_STATE at step 3;
   EXPORT_ZERO_RANGES (ABI 2.1): count > MAX_ZERO_RANGES (BATCH_TOO_LARGE),
   the range list and the output range (OUT_OF_BOUNDS), then entry by
   entry: PageCount 0 (INVALID_PARAMETER), misaligned or leaving the window
   (BAD_PAGE), not inside one shard block of this stream's shard
   (RANGE_OUTSIDE_SHARD); then capacity for ``count`` ZERO_RANGE records
   (BUFFER_TOO_SMALL); then every byte of every range is read: NOT_ZERO
   with Result[0] = the guest offset of the first page that is not zero;
   IMPORT_*: the input range (OUT_OF_BOUNDS), then (IMPORT_BATCH) size above
   MaxBatchPages full PAGE records (BATCH_TOO_LARGE), (IMPORT_END, ABI 4.0)
   the shared-page digest's range when the shared page count is not 0
   (OUT_OF_BOUNDS);
6. IMPORT_*: the stream checks of docs/stream-format.md in its order, record
   by record; records before the failing one stay applied. IMPORT_BATCH also
   refuses a record after MaxBatchPages records with BATCH_TOO_LARGE.
   A ZERO_RANGE record (ABI 2.1), after its tag: BAD_RECORD (PageCount 0),
   BAD_PAGE (the range leaves the window), RANGE_OUTSIDE_SHARD (not inside
   one shard block of the header's shard); IMPORT_BATCH's Result[3] and
   Result[4] count the ZERO_RANGE records applied and their pages.
   IMPORT_BEGIN, once the header authenticated: GUEST_SIZE_MISMATCH,
   WRONG_SHARD, UNBOUND_STREAM, NONCE_MISMATCH (Result[0] = the header's
   GuestSize); IMPORT_END, once the end record proved the records:
   SHARED_PAGES_MISMATCH when the shared pages the host says it received
   (Arg3 pages, digest at Arg2) are not those the source sealed (ABI 4.0);
   IMPORT_COMMIT, receipt by receipt: WRONG_SHARD, WRONG_MIGRATION,
   BAD_RECEIPT.
7. Commit proof (ABI 4.1). IMPORT_COMMIT_PROOF: BAD_STATE unless an
   IMPORT_COMMIT of the completed import passed; the range (OUT_OF_BOUNDS);
   the capacity (BUFFER_TOO_SMALL). EXPORT_VERIFY_COMMIT: BAD_STATE unless
   the session is COMPLETE after an export; the range (OUT_OF_BOUNDS); an
   input that is not one proof and ShardCount receipts (INVALID_PARAMETER);
   then the proof's migration id, shard count, flags and reserved field
   (WRONG_MIGRATION), its MAC and outcome, its receipt digest
   (BAD_COMMIT_PROOF), then the receipts as IMPORT_COMMIT checks them, this
   shard's against the receipt of what this session exported. Every
   refusal of EXPORT_VERIFY_COMMIT leaves the session as it was.

Checks 1-5 look only at arguments (and the page list) and leave the session
as it was; an export failure writes nothing. A failed check of step 6 leaves
the import session FAILED. A challenge is good for one IMPORT_BEGIN, whatever
its outcome; RESET and EXPORT_BEGIN drop it.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import or_

from helper import abi
from helper import commit_proof as cp
from helper import stream as s

_A = abi.load()

WritableBuffer = bytearray | memoryview | mmap.mmap
#: Draws the salt of EXPORT_BEGIN; None means the entropy source failed.
SaltSource = Callable[[int], bytes | None]
Outcome = tuple[int, tuple[int, ...]]

ARG_COUNT = _A.const("OVMF_MH_ARG_COUNT")
RESULT_COUNT = _A.const("OVMF_MH_RESULT_COUNT")
MAX_BATCH_PAGES = _A.const("OVMF_MH_MAX_BATCH_PAGES")
#: Largest IMPORT_BATCH input: what an EXPORT_BATCH of MaxBatchPages can produce.
MAX_IMPORT_BATCH_SIZE = MAX_BATCH_PAGES * s.PAGE_RECORD_SIZE
_U64_LIMIT = 1 << 64
_PAGE_LIST_ENTRY = 8  # UINT64 guest offsets
if s.PAGE_SIZE & (s.PAGE_SIZE - 1):
    raise ImportError("ReferenceHelper._pages_ok assumes a power-of-two page size")

SECRET = _A.layout("OVMF_MH_SECRET")
SECRET_SIGNATURE = _A.const("OVMF_MH_SECRET_SIGNATURE")
SECRET_VERSION = _A.const("OVMF_MH_SECRET_VERSION")

EXPORT_TRACK_PAGES = _A.const("OVMF_MH_EXPORT_TRACK_PAGES")
EXPORT_FLAGS_KNOWN = _A.const("OVMF_MH_EXPORT_FLAGS_KNOWN")
EXPORT_BOUND = _A.const("OVMF_MH_EXPORT_BOUND")
CMD = {name: _A.const(f"OVMF_MH_CMD_{name}") for name in _A.names_with_prefix("OVMF_MH_CMD_").values()}
STATUS = {name: _A.const(f"OVMF_MH_STATUS_{name}") for name in _A.names_with_prefix("OVMF_MH_STATUS_").values()}
SESSION = {name: _A.const(f"OVMF_MH_SESSION_{name}") for name in _A.names_with_prefix("OVMF_MH_SESSION_").values()}

#: Commands a FAILED session still serves normally.
_ALWAYS_SERVED = frozenset(CMD[n] for n in ("NOP", "QUERY", "RESET", "SHUTDOWN"))


class _Refused(Exception):
    """A check failed: answer with ``status`` (and ``results``). Raised by the
    check helpers, caught only by dispatch(), so the handlers read as the
    documented list of checks."""

    def __init__(self, status: int, results: Sequence[int] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.results = tuple(results)


def _refuse(name: str) -> _Refused:
    return _Refused(STATUS[name])


def read_and_wipe_secret(secret: WritableBuffer) -> bytearray | None:
    """Take the transport key out of a launch-secret buffer and zero the whole
    buffer, valid or not, as the firmware does with its secret page, so the key
    lives only in the helper's private memory afterwards."""
    view = memoryview(secret).cast("B")
    key: bytearray | None = None
    if len(view) >= SECRET.size:
        fields = SECRET.unpack(view[: SECRET.size])
        valid = (fields["Signature"], fields["Version"], fields["KeySize"]) == (
            SECRET_SIGNATURE,
            SECRET_VERSION,
            s.KEY_SIZE,
        )
        key = bytearray(fields["Key"]) if valid else None
    view[:] = bytes(len(view))
    return key


def _writable_view(buffer: WritableBuffer, what: str) -> memoryview:
    view = memoryview(buffer).cast("B")
    if view.readonly:
        raise ValueError(f"{what} must be writable")
    return view


class SealedPages:
    """CHECK_PAGES' memory: the exact bytes an export session sealed for
    each page. The firmware keeps a keyed 64-bit NH hash per page instead
    (Session.c); both give the same answers except that this one never
    collides (the hash does with probability about 2^-32).

    The copies live in chunks of stream.SNAPSHOT_CHUNK_SIZE allocated when
    a page in them is first sealed, so a helper that serves one shard of a
    guest holds copies of that shard only."""

    def __init__(self, window_pages: int) -> None:
        chunks = -(-window_pages * s.PAGE_SIZE // s.SNAPSHOT_CHUNK_SIZE)
        self.chunks: list[bytearray] = [_UNSEALED] * chunks
        self.sent = bytearray(window_pages)

    def prepare(self, offsets: Sequence[int]) -> list[bytearray]:
        """Allocate the chunks ``offsets`` fall in; the list write_records takes."""
        for offset in offsets:
            index = offset // s.SNAPSHOT_CHUNK_SIZE
            if self.chunks[index] is _UNSEALED:
                self.chunks[index] = bytearray(s.SNAPSHOT_CHUNK_SIZE)
        return self.chunks

    def record(self, offsets: Sequence[int]) -> None:
        for offset in offsets:
            self.sent[offset // s.PAGE_SIZE] = _SEALED_COPY

    def record_zero(self, offset: int, pages: int) -> None:
        """A ZERO_RANGE sealed these pages as zero: no copy, like the
        firmware's shared hash of the zero page."""
        first = offset // s.PAGE_SIZE
        self.sent[first : first + pages] = bytes([_SEALED_ZERO]) * pages

    def changed(self, offsets: Sequence[int], window: memoryview) -> list[int]:
        """1 per page whose current content is not what was last sealed."""
        flags = []
        for offset in offsets:
            number = offset // s.PAGE_SIZE
            if not self.sent[number]:
                flags.append(1)
            elif self.sent[number] == _SEALED_ZERO:
                flags.append(int(not s.is_zero(window[offset : offset + s.PAGE_SIZE])))
            else:
                chunk = self.chunks[offset // s.SNAPSHOT_CHUNK_SIZE]
                current = window[offset : offset + s.PAGE_SIZE]
                flags.append(int(not chunk.startswith(current, offset % s.SNAPSHOT_CHUNK_SIZE)))
        return flags


#: Placeholder of a snapshot chunk no page of which was sealed yet.
_UNSEALED = bytearray()
#: SealedPages.sent: the page's snapshot holds what was sealed; it was sealed in a ZERO_RANGE.
_SEALED_COPY = 1
_SEALED_ZERO = 2


@dataclass
class _Export:
    writer: s.StreamWriter
    sealed: SealedPages | None  # None: not tracked (no TRACK_PAGES)
    shard: tuple[int, int]  # (ShardIndex, ShardCount) of the header: where zero ranges may lie
    binding: s.Binding


@dataclass
class _Import:
    verifier: s.StreamVerifier
    binding: s.Binding


@dataclass(frozen=True)
class _Imported:
    """What a completed import vouches for in its receipt (or what a
    completed export expects the target's receipt to say)."""

    binding: s.Binding
    record_count: int
    chain_digest: bytes

    def receipt(self, transport_key: bytes | bytearray) -> s.Receipt:
        b = self.binding
        receipt = s.Receipt(b.migration_id, b.shard_index, b.shard_count, b.flags, self.record_count,
                            self.chain_digest)
        return dataclasses.replace(receipt, mac=s.receipt_mac(transport_key, receipt))


class ReferenceHelper:
    """The mailbox dispatcher in software: one guest window, one data area,
    at most one session (export or import) at a time.

    ``window`` is guest RAM as the helper sees it (a whole number of pages),
    ``data`` the data area the offsets of the arguments point into. ``secret``
    is the emulated launch secret (an OVMF_MH_SECRET blob, as
    ``host_shim.helpers.keys.secret_record`` builds it): read once and wiped in the
    caller's buffer.
    ``salt_source`` stands for RDRAND so that tests get deterministic streams.

    Key wiping is best effort: the transport key is zeroed in place, session
    keys live in OpenSSL objects that are dropped.
    """

    def __init__(
        self,
        window: WritableBuffer,
        data: WritableBuffer,
        secret: WritableBuffer | None = None,
        *,
        salt_source: SaltSource = os.urandom,
    ) -> None:
        self.window = _writable_view(window, "guest window")
        if len(self.window) % s.PAGE_SIZE:
            raise ValueError("guest window must be a whole number of pages")
        self.data = _writable_view(data, "data area")
        self._salt_source = salt_source
        self._transport_key = read_and_wipe_secret(secret) if secret is not None else None
        self._state = SESSION["IDLE"]
        self._session: _Export | _Import | None = None
        #: IMPORT_CHALLENGE's nonce until the next IMPORT_BEGIN uses it.
        self._challenge: bytes | None = None
        #: The completed import IMPORT_RECEIPT and IMPORT_COMMIT speak for.
        self._imported: _Imported | None = None
        #: The completed export EXPORT_VERIFY_COMMIT checks a proof against.
        self._exported: _Imported | None = None
        #: The receipts the passed IMPORT_COMMIT accepted (IMPORT_COMMIT_PROOF).
        self._committed: bytes | None = None
        #: IMPORT_BATCH's private copy of its input, allocated at first use and reused.
        self._import_buffer: memoryview | None = None
        self.shutdown_requested = False
        #: OVMF_MH_CAP_* of how the helper is run, like the firmware's
        #: platform capabilities: HALT_WAKE when a process serves it (helper.serve).
        self.platform_capabilities = 0
        self._handlers: dict[int, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
            CMD["NOP"]: self._nop,
            CMD["QUERY"]: self._query,
            CMD["SHUTDOWN"]: self._shutdown,
            CMD["RESET"]: self._reset,
            CMD["EXPORT_BEGIN"]: self._export_begin,
            CMD["EXPORT_BATCH"]: self._export_batch,
            CMD["EXPORT_END"]: self._export_end,
            CMD["IMPORT_BEGIN"]: self._import_begin,
            CMD["IMPORT_BATCH"]: self._import_batch,
            CMD["IMPORT_END"]: self._import_end,
            CMD["CHECK_PAGES"]: self._check_pages,
            CMD["IMPORT_CHALLENGE"]: self._import_challenge,
            CMD["IMPORT_RECEIPT"]: self._import_receipt,
            CMD["IMPORT_COMMIT"]: self._import_commit,
            CMD["EXPORT_ZERO_RANGES"]: self._export_zero_ranges,
            CMD["IMPORT_COMMIT_PROOF"]: self._import_commit_proof,
            CMD["EXPORT_VERIFY_COMMIT"]: self._export_verify_commit,
        }

    # --- public view ---------------------------------------------------------

    @property
    def session_state(self) -> int:
        return self._state

    @property
    def key_loaded(self) -> bool:
        return self._transport_key is not None

    @property
    def capabilities(self) -> int:
        caps = 0
        for name in ("QUERY", "SHUTDOWN", "EXPORT", "IMPORT", "CHECK_PAGES", "BINDING", "ZERO_RANGES",
                     "COMMIT_PROOF"):
            caps |= _A.const(f"OVMF_MH_CAP_{name}")
        if self.key_loaded:
            caps |= _A.const("OVMF_MH_CAP_KEY_LOADED")
        return caps | self.platform_capabilities

    def dispatch(self, command: int, args: Sequence[int]) -> Outcome:
        """Serve one command: (status, six results). Never raises for any
        command or argument value or any data-area content."""
        try:
            results = self._serve(command, args)
        except _Refused as refused:
            return refused.status, _six(refused.results)
        return STATUS["SUCCESS"], _six(results)

    # --- dispatch ------------------------------------------------------------

    def _serve(self, command: int, args: Sequence[int]) -> tuple[int, ...]:
        if self._state == SESSION["FAILED"] and command not in _ALWAYS_SERVED:
            raise _refuse("SESSION_FAILED")
        handler = self._handlers.get(command) if isinstance(command, int) else None
        if handler is None:
            raise _refuse("UNSUPPORTED")
        return handler(_check_args(args))

    def _require_state(self, *names: str) -> None:
        if self._state not in {SESSION[n] for n in names}:
            raise _refuse("BAD_STATE")

    def _require_key(self) -> bytearray:
        if self._transport_key is None:
            raise _refuse("NO_KEY")
        return self._transport_key

    def _region(self, offset: int, size: int) -> memoryview:
        """The data-area range [offset, offset + size), or OUT_OF_BOUNDS."""
        if offset > len(self.data) or size > len(self.data) - offset:
            raise _refuse("OUT_OF_BOUNDS")
        return self.data[offset : offset + size]

    def _end_session(self, state: str) -> None:
        """Drop the session (and its key) and enter ``state``."""
        self._session = None
        self._state = SESSION[state]

    # --- housekeeping commands ------------------------------------------------

    def _nop(self, args: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def _query(self, args: tuple[int, ...]) -> tuple[int, ...]:
        version = (_A.const("OVMF_MH_ABI_MAJOR") << 16) | _A.const("OVMF_MH_ABI_MINOR")
        return version, self.capabilities, len(self.window), len(self.data), self._state, MAX_BATCH_PAGES

    def _shutdown(self, args: tuple[int, ...]) -> tuple[int, ...]:
        """Wipe all key material; the firmware then powers off. Later commands
        find no key (reference only: a real helper serves nothing after this)."""
        self._end_session("IDLE")
        if self._transport_key is not None:
            self._transport_key[:] = bytes(len(self._transport_key))
            self._transport_key = None
        self.shutdown_requested = True
        return ()

    def _reset(self, args: tuple[int, ...]) -> tuple[int, ...]:
        self._end_session("IDLE")
        self._challenge = None
        self._forget_completed()
        return ()

    # --- export ---------------------------------------------------------------

    def _export_begin(self, args: tuple[int, ...]) -> tuple[int, ...]:
        out_offset, capacity, flags, binding_offset, shard_index, shard_count = args[:6]
        self._require_state("IDLE", "COMPLETE")
        key = self._require_key()
        out = self._region(out_offset, capacity)
        if flags & ~EXPORT_FLAGS_KNOWN:
            raise _refuse("INVALID_PARAMETER")
        if not 0 < shard_count <= s.MAX_SHARDS or shard_index >= shard_count:
            raise _refuse("INVALID_PARAMETER")
        bound = bool(flags & EXPORT_BOUND)
        binding_size = shard_count * s.CHALLENGE_SIZE if bound else s.MIGRATION_ID_SIZE
        binding_input = bytes(self._region(binding_offset, binding_size))  # private copy
        if capacity < s.STREAM_HEADER_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        salt = self._salt_source(s.SALT_SIZE)
        if salt is None:
            raise _refuse("NO_ENTROPY")
        if len(salt) != s.SALT_SIZE:
            raise ValueError(f"salt_source returned {len(salt)} bytes, not {s.SALT_SIZE}")
        if bound:
            nonces = [binding_input[i : i + s.CHALLENGE_SIZE] for i in range(0, binding_size, s.CHALLENGE_SIZE)]
            binding = s.Binding.bound(nonces, shard_index)
        else:
            binding = s.Binding.unbound(binding_input, shard_index, shard_count)
        self._challenge = None
        self._forget_completed()
        writer = s.StreamWriter(key, salt, len(self.window), binding)
        out[: len(writer.header)] = writer.header
        tracked = SealedPages(len(self.window) // s.PAGE_SIZE) if flags & EXPORT_TRACK_PAGES else None
        self._session = _Export(writer, tracked, (shard_index, shard_count), binding)
        self._state = SESSION["EXPORTING"]
        return (len(writer.header),)

    def _export_batch(self, args: tuple[int, ...]) -> tuple[int, ...]:
        list_offset, count, out_offset, capacity = args[:4]
        self._require_state("EXPORTING")
        if count > MAX_BATCH_PAGES:
            raise _refuse("BATCH_TOO_LARGE")
        page_list = bytes(self._region(list_offset, count * _PAGE_LIST_ENTRY))  # private copy
        out = self._region(out_offset, capacity)
        offsets = struct.unpack(f"<{count}Q", page_list)
        if not self._pages_ok(offsets):
            raise _refuse("BAD_PAGE")
        if capacity < count * s.PAGE_RECORD_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        # Every check passed: the records go straight into the output range.
        session = self._export_session()
        snapshots = session.sealed.prepare(offsets) if session.sealed is not None else None
        written, zero_pages = session.writer.write_records(self.window, offsets, out, snapshots)
        if session.sealed is not None:
            session.sealed.record(offsets)
        return written, count, zero_pages

    def _export_zero_ranges(self, args: tuple[int, ...]) -> tuple[int, ...]:
        """The host's claim that runs of pages are empty, checked byte by
        byte; one ZERO_RANGE record per run, or a refusal that changes nothing."""
        list_offset, count, out_offset, capacity = args[:4]
        self._require_state("EXPORTING")
        if count > s.MAX_ZERO_RANGES:
            raise _refuse("BATCH_TOO_LARGE")
        entries = bytes(self._region(list_offset, count * s.ZERO_RANGE_ENTRY.size))  # private copy
        out = self._region(out_offset, capacity)
        words = struct.unpack(f"<{2 * count}Q", entries)
        ranges = list(zip(words[0::2], words[1::2], strict=True))
        session = self._export_session()
        for offset, pages in ranges:
            if pages == 0:
                raise _refuse("INVALID_PARAMETER")
            refusal = s.zero_range_place(offset, pages, len(self.window), *session.shard)
            if refusal is not None:
                raise _refuse(refusal)
        if capacity < count * s.ZERO_RANGE_RECORD_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        for offset, pages in ranges:
            end = offset + pages * s.PAGE_SIZE
            if not s.is_zero(self.window[offset:end]):
                first = next(o for o in range(offset, end, s.PAGE_SIZE)
                             if not s.is_zero(self.window[o : o + s.PAGE_SIZE]))
                raise _Refused(STATUS["NOT_ZERO"], (first,))
        pos = 0
        for offset, pages in ranges:
            record = session.writer.zero_range_record(offset, pages)
            out[pos : pos + len(record)] = record
            pos += len(record)
            if session.sealed is not None:
                session.sealed.record_zero(offset, pages)
        return pos, count, sum(pages for _, pages in ranges)

    def _check_pages(self, args: tuple[int, ...]) -> tuple[int, ...]:
        list_offset, count, out_offset = args[:3]
        self._require_state("EXPORTING")
        sealed = self._export_session().sealed
        if sealed is None:  # an untracked export has nothing to compare against
            raise _refuse("BAD_STATE")
        if count > MAX_BATCH_PAGES:
            raise _refuse("BATCH_TOO_LARGE")
        page_list = bytes(self._region(list_offset, count * _PAGE_LIST_ENTRY))
        out = self._region(out_offset, count)
        offsets = struct.unpack(f"<{count}Q", page_list)
        if not self._pages_ok(offsets):
            raise _refuse("BAD_PAGE")
        flags = sealed.changed(offsets, self.window)
        out[:count] = bytes(flags)
        return (sum(flags),)

    def _shared_pages(self, offset: int, count: int) -> bytes:
        """The host's digest of a shard's shared pages (Arg2), read once,
        only when it names pages (Arg3): the digest of none otherwise."""
        if count == 0:
            return s.NO_SHARED_PAGES
        return bytes(self._region(offset, s.DIGEST_SIZE))

    def _export_end(self, args: tuple[int, ...]) -> tuple[int, ...]:
        out_offset, capacity, shared_at, shared_count = args[0], args[1], args[2], args[3]
        self._require_state("EXPORTING")
        out = self._region(out_offset, capacity)
        if capacity < s.END_RECORD_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        shared_digest = self._shared_pages(shared_at, shared_count)
        session = self._export_session()
        writer = session.writer
        record = writer.end_record(shared_count, shared_digest)
        out[: len(record)] = record
        self._end_session("COMPLETE")
        self._exported = _Imported(session.binding, writer.record_count, writer.chain_digest)
        return len(record), writer.record_count

    def _pages_ok(self, offsets: Sequence[int]) -> bool:
        """Every offset page aligned with its page inside the window. The page
        size is a power of two, so the OR of all offsets is aligned exactly
        when each one is, and the largest offset bounds them all."""
        if not offsets:
            return True
        return reduce(or_, offsets) % s.PAGE_SIZE == 0 and max(offsets) + s.PAGE_SIZE <= len(self.window)

    def _export_writer(self) -> s.StreamWriter:
        return self._export_session().writer

    def _export_session(self) -> _Export:
        assert isinstance(self._session, _Export), "EXPORTING without an export session"
        return self._session

    # --- import ---------------------------------------------------------------

    def _import_begin(self, args: tuple[int, ...]) -> tuple[int, ...]:
        in_offset, size, shard_index, shard_count = args[:4]
        self._require_state("IDLE", "COMPLETE")
        key = self._require_key()
        # Private copy; one byte more than a header is enough to see a wrong size.
        header = bytes(self._region(in_offset, size)[: s.STREAM_HEADER_SIZE + 1])
        challenge, self._challenge = self._challenge, None  # good for one IMPORT_BEGIN
        self._forget_completed()
        try:
            verifier = s.StreamVerifier.from_header(key, header, len(self.window))
        except s.VerifyError as error:
            self._end_session("FAILED")
            raise _Refused(error.status) from None
        h = s.decode_stream_header(header)
        refusal = self._misdirected(h, shard_index, shard_count, challenge)
        if refusal is not None:
            self._end_session("FAILED")
            raise _Refused(STATUS[refusal], (h.guest_size,))
        self._session = _Import(verifier, h.binding)
        self._state = SESSION["IMPORTING"]
        return (h.guest_size,)

    def _misdirected(self, h: s.StreamHeader, shard_index: int, shard_count: int,
                     challenge: bytes | None) -> str | None:
        """Why an authentic header is not meant for this helper now, or None."""
        if h.guest_size != len(self.window):
            return "GUEST_SIZE_MISMATCH"
        if not 0 < h.shard_count <= s.MAX_SHARDS or h.shard_index >= h.shard_count or (
            (h.shard_index, h.shard_count) != (shard_index, shard_count)
        ):
            return "WRONG_SHARD"
        bound = bool(h.flags & s.STREAM_BOUND)
        if challenge is not None and not bound:
            return "UNBOUND_STREAM"
        if bound and (challenge is None or h.target_nonce != challenge):
            return "NONCE_MISMATCH"
        return None

    def _import_challenge(self, args: tuple[int, ...]) -> tuple[int, ...]:
        out_offset, capacity = args[0], args[1]
        self._require_state("IDLE", "COMPLETE")
        self._require_key()
        out = self._region(out_offset, capacity)
        if capacity < s.CHALLENGE_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        nonce = self._salt_source(s.CHALLENGE_SIZE)
        if nonce is None:
            self._challenge = None
            raise _refuse("NO_ENTROPY")
        if len(nonce) != s.CHALLENGE_SIZE:
            raise ValueError(f"salt_source returned {len(nonce)} bytes, not {s.CHALLENGE_SIZE}")
        self._challenge = bytes(nonce)
        self._forget_completed()
        out[: s.CHALLENGE_SIZE] = self._challenge
        return (s.CHALLENGE_SIZE,)

    def _forget_completed(self) -> None:
        """A new session (or a challenge) ends what the last one vouched for."""
        self._imported = None
        self._exported = None
        self._committed = None

    def _own_receipt(self) -> s.Receipt:
        """The receipt of the completed import (BAD_STATE without one)."""
        if self._state != SESSION["COMPLETE"] or self._imported is None:
            raise _refuse("BAD_STATE")
        return self._imported.receipt(self._require_key())

    def _import_receipt(self, args: tuple[int, ...]) -> tuple[int, ...]:
        out_offset, capacity = args[0], args[1]
        own = self._own_receipt()
        out = self._region(out_offset, capacity)
        if capacity < s.RECEIPT_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        out[: s.RECEIPT_SIZE] = own.pack()
        return (s.RECEIPT_SIZE,)

    def _import_commit(self, args: tuple[int, ...]) -> tuple[int, ...]:
        in_offset, size = args[0], args[1]
        own = self._own_receipt()
        data = self._region(in_offset, size)
        if size != own.shard_count * s.RECEIPT_SIZE:
            raise _refuse("INVALID_PARAMETER")
        receipts = bytes(data)  # private copy
        key = self._require_key()
        decoded = [s.Receipt.decode(receipts[i : i + s.RECEIPT_SIZE]) for i in range(0, size, s.RECEIPT_SIZE)]
        refusal = cp.receipt_refusal(key, decoded, own)
        if refusal is not None:
            self._forget_completed()
            self._end_session("FAILED")
            raise _refuse(refusal)
        self._committed = receipts
        return (own.shard_count,)

    def _import_commit_proof(self, args: tuple[int, ...]) -> tuple[int, ...]:
        out_offset, capacity = args[0], args[1]
        if self._state != SESSION["COMPLETE"] or self._imported is None or self._committed is None:
            raise _refuse("BAD_STATE")
        out = self._region(out_offset, capacity)
        if capacity < cp.PROOF_SIZE:
            raise _refuse("BUFFER_TOO_SMALL")
        out[: cp.PROOF_SIZE] = cp.make_proof(self._require_key(), self._imported.binding, self._committed).pack()
        return (cp.PROOF_SIZE,)

    def _export_verify_commit(self, args: tuple[int, ...]) -> tuple[int, ...]:
        in_offset, size = args[0], args[1]
        if self._state != SESSION["COMPLETE"] or self._exported is None:
            raise _refuse("BAD_STATE")
        data = self._region(in_offset, size)
        shards = self._exported.binding.shard_count
        if size != cp.PROOF_SIZE + shards * s.RECEIPT_SIZE:
            raise _refuse("INVALID_PARAMETER")
        copy = bytes(data)  # private copy
        key = self._require_key()
        own = self._exported.receipt(key)
        refusal = cp.proof_refusal(key, cp.CommitProof.decode(copy[: cp.PROOF_SIZE]), copy[cp.PROOF_SIZE :], own)
        if refusal is not None:
            raise _refuse(refusal)
        return (shards,)

    def _import_batch(self, args: tuple[int, ...]) -> tuple[int, ...]:
        in_offset, size = args[0], args[1]
        self._require_state("IMPORTING")
        source = self._region(in_offset, size)
        if size > MAX_IMPORT_BATCH_SIZE:
            raise _refuse("BATCH_TOO_LARGE")
        if self._import_buffer is None:
            self._import_buffer = memoryview(bytearray(MAX_IMPORT_BATCH_SIZE))
        batch = self._import_buffer[:size]
        batch[:] = source  # private copy before any check
        verifier = self._import_verifier()
        applied, pages, error, ranges, range_pages = verifier.apply_records(batch, self.window, MAX_BATCH_PAGES)
        if error is not None:
            raise self._import_failed(error, applied, pages, ranges, range_pages)
        return applied, pages, 0, ranges, range_pages

    def _import_end(self, args: tuple[int, ...]) -> tuple[int, ...]:
        in_offset, size, shared_at, shared_count = args[0], args[1], args[2], args[3]
        self._require_state("IMPORTING")
        # Private copy; one byte more than an end record is enough to see a wrong size.
        end = memoryview(bytes(self._region(in_offset, size)[: s.END_RECORD_SIZE + 1]))
        shared_digest = self._shared_pages(shared_at, shared_count)
        verifier = self._import_verifier()
        try:
            count = verifier.finish(end, shared_count, shared_digest)
        except s.VerifyError as error:
            self._end_session("FAILED")
            raise _Refused(error.status) from None
        binding = self._import_session().binding
        self._end_session("COMPLETE")
        self._imported = _Imported(binding, count, verifier.chain_digest)
        return (count,)

    def _import_failed(self, error: s.VerifyError, applied: int, pages: int, ranges: int,
                       range_pages: int) -> _Refused:
        """End the import FAILED; Result[2] is the failing record's Sequence
        field, or the expected sequence when its header was not whole."""
        failing = self._import_verifier().next_sequence if error.sequence is None else error.sequence
        self._end_session("FAILED")
        return _Refused(error.status, (applied, pages, failing, ranges, range_pages))

    def _import_verifier(self) -> s.StreamVerifier:
        return self._import_session().verifier

    def _import_session(self) -> _Import:
        assert isinstance(self._session, _Import), "IMPORTING without an import session"
        return self._session


def _check_args(args: Sequence[int]) -> tuple[int, ...]:
    """Pad to OVMF_MH_ARG_COUNT; refuse what a UINT64 mailbox slot cannot hold."""
    if len(args) > ARG_COUNT:
        raise _refuse("INVALID_PARAMETER")
    if not all(isinstance(a, int) and 0 <= a < _U64_LIMIT for a in args):
        raise _refuse("INVALID_PARAMETER")
    return tuple(args) + (0,) * (ARG_COUNT - len(args))


def _six(results: Sequence[int]) -> tuple[int, ...]:
    return tuple(results) + (0,) * (RESULT_COUNT - len(results))
