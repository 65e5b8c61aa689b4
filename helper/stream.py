"""The page-stream codec of docs/stream-format.md.

A stream is ``STREAM_HEADER RECORD(1) ... RECORD(N) END_RECORD(N+1)``; every
piece is authenticated with AES-256-OCB3 under a per-stream key derived by
HKDF-SHA256 from the transport key and a salt. Layouts and constants come
from HelperAbi.h through :mod:`helper.abi`; the only literals here are the two
ASCII labels the format document fixes (the header has no define for them).

The codec has three users: :class:`helper.reference.ReferenceHelper` (the
software helper), the host, which frames untrusted streams with
:func:`split_records` without holding the key, and the tests. It does no
per-page work beyond one AEAD call, one hash update, one page copy and
(export) one zero-page compare per record: pages stay in C (OpenSSL, buffer
copies and compares) and Python only touches 40-byte headers. The batch paths
(:meth:`StreamWriter.write_records`, :meth:`StreamVerifier.apply_records`)
work in preallocated private buffers with ``encrypt_into``/``decrypt_into``
and precompiled structs, so a record costs no allocation beyond its nonce and
chain digest.

Verification failures raise :class:`VerifyError` carrying the mailbox status
code that docs/stream-format.md assigns to the check, so a helper can answer
with it directly and a test can compare it against any implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from helper import abi

_A = abi.load()

Bytes = bytes | bytearray | memoryview

# --- constants, all from HelperAbi.h ----------------------------------------

PAGE_SIZE = _A.const("OVMF_MH_PAGE_SIZE")
KEY_SIZE = _A.const("OVMF_MH_KEY_SIZE")
SALT_SIZE = _A.const("OVMF_MH_SALT_SIZE")
SESSION_ID_SIZE = _A.const("OVMF_MH_SESSION_ID_SIZE")
TAG_SIZE = _A.const("OVMF_MH_TAG_SIZE")
NONCE_SIZE = _A.const("OVMF_MH_NONCE_SIZE")
DIGEST_SIZE = _A.const("OVMF_MH_DIGEST_SIZE")
STREAM_MAGIC = _A.const("OVMF_MH_STREAM_MAGIC")
STREAM_VERSION = _A.const("OVMF_MH_STREAM_VERSION")
STREAM_BOUND = _A.const("OVMF_MH_STREAM_BOUND")
STREAM_FLAGS_KNOWN = _A.const("OVMF_MH_STREAM_FLAGS_KNOWN")
MIGRATION_ID_SIZE = _A.const("OVMF_MH_MIGRATION_ID_SIZE")
CHALLENGE_SIZE = _A.const("OVMF_MH_CHALLENGE_SIZE")
MAX_SHARDS = _A.const("OVMF_MH_MAX_SHARDS")
BINDING_OFFSET = _A.const("OVMF_MH_STREAM_BINDING_OFFSET")
BINDING_SIZE = _A.const("OVMF_MH_STREAM_BINDING_SIZE")

RECORD_PAGE = _A.const("OVMF_MH_RECORD_PAGE")
RECORD_ZERO = _A.const("OVMF_MH_RECORD_ZERO")
RECORD_END = _A.const("OVMF_MH_RECORD_END")
RECORD_ZERO_RANGE = _A.const("OVMF_MH_RECORD_ZERO_RANGE")
#: Page P belongs to shard (P // SHARD_BLOCK_PAGES) % ShardCount; a ZERO_RANGE stays in one block.
SHARD_BLOCK_PAGES = _A.const("OVMF_MH_SHARD_BLOCK_PAGES")
MAX_ZERO_RANGES = _A.const("OVMF_MH_MAX_ZERO_RANGES")


def shard_of_page(number: int, shards: int) -> int:
    """The shard that carries page ``number`` of a guest split into ``shards``."""
    return (number // SHARD_BLOCK_PAGES) % shards

STREAM_HEADER = _A.layout("OVMF_MH_STREAM_HEADER")
RECORD_HEADER = _A.layout("OVMF_MH_RECORD_HEADER")
END_PAYLOAD = _A.layout("OVMF_MH_END_PAYLOAD")
ZERO_RANGE_PAYLOAD = _A.layout("OVMF_MH_ZERO_RANGE_PAYLOAD")
ZERO_RANGE_ENTRY = _A.layout("OVMF_MH_ZERO_RANGE_ENTRY")
RECEIPT = _A.layout("OVMF_MH_RECEIPT")
RECEIPT_SIZE = RECEIPT.size
#: Bytes of a receipt covered by its MAC (everything before ``Mac``).
RECEIPT_MAC_OFFSET = RECEIPT.offset("Mac")

STREAM_HEADER_SIZE = STREAM_HEADER.size
RECORD_HEADER_SIZE = RECORD_HEADER.size
END_PAYLOAD_SIZE = END_PAYLOAD.size
#: Bytes of the stream header covered by its tag (everything before ``Tag``).
STREAM_HEADER_AD_SIZE = STREAM_HEADER.offset("Tag")

#: PayloadSize each record type must carry.
PAYLOAD_SIZES: dict[int, int] = {
    RECORD_PAGE: PAGE_SIZE,
    RECORD_ZERO: 0,
    RECORD_END: END_PAYLOAD_SIZE,
    RECORD_ZERO_RANGE: ZERO_RANGE_PAYLOAD.size,
}
PAGE_RECORD_SIZE = RECORD_HEADER_SIZE + PAGE_SIZE + TAG_SIZE
ZERO_RECORD_SIZE = RECORD_HEADER_SIZE + TAG_SIZE
END_RECORD_SIZE = RECORD_HEADER_SIZE + END_PAYLOAD_SIZE + TAG_SIZE
ZERO_RANGE_RECORD_SIZE = RECORD_HEADER_SIZE + ZERO_RANGE_PAYLOAD.size + TAG_SIZE
_ZERO_RANGE_COUNT = struct.Struct("<Q")  # OVMF_MH_ZERO_RANGE_PAYLOAD: PageCount
if ZERO_RANGE_PAYLOAD.size != _ZERO_RANGE_COUNT.size or ZERO_RANGE_ENTRY.size != 16:
    raise ImportError("OVMF_MH_ZERO_RANGE_* changed; update helper/stream.py")

# The two labels of docs/stream-format.md ("Key schedule", "End payload").
KDF_INFO = abi.load().strings["OVMF_MH_KDF_INFO"].encode()
CHAIN_LABEL = abi.load().strings["OVMF_MH_CHAIN_LABEL"].encode()
RECEIPT_INFO = abi.load().strings["OVMF_MH_RECEIPT_INFO"].encode()
#: Prefix of a shard's shared-page digest (ABI 4.0, "End payload").
SHARED_LABEL = abi.load().strings["OVMF_MH_SHARED_LABEL"].encode()
if (STREAM_HEADER.offset("Flags"), STREAM_HEADER.offset("Salt")) != (BINDING_OFFSET, BINDING_OFFSET + BINDING_SIZE):
    raise ImportError("OVMF_MH_STREAM_BINDING_* do not frame Flags..TargetNonce of the stream header")
OKM_SIZE = KEY_SIZE + SESSION_ID_SIZE

_STATUS = _A.names_with_prefix("OVMF_MH_STATUS_")
_RECORD_PREFIX = struct.Struct("<IIQQ")  # Type, PayloadSize, Sequence, GuestOffset
#: The whole record header, compiled once (Layout.struct builds a new Struct per call).
_RECORD_STRUCT = RECORD_HEADER.struct
_NONCE = struct.Struct(f"<{NONCE_SIZE - 8}xQ")  # zero bytes, then UINT64_LE(sequence)
#: A nonce immediately followed by the record header it belongs to (the writer's buffers).
NONCE_AND_RECORD = struct.Struct(_NONCE.format + _RECORD_STRUCT.format.lstrip("<"))
if tuple(f.name for f in RECORD_HEADER.fields) != ("Type", "PayloadSize", "Sequence", "GuestOffset", "SessionId"):
    raise ImportError("OVMF_MH_RECORD_HEADER fields changed; update _RECORD_STRUCT users in helper/stream.py")
ZERO_PAGE = bytes(PAGE_SIZE)


def status_code(name: str) -> int:
    """Mailbox status code by name (``"AUTH_FAILED"``), from the header."""
    return _A.const(f"OVMF_MH_STATUS_{name}")


class StreamError(ValueError):
    """Bytes that are not a well-formed piece of a page stream."""


class FramingError(StreamError):
    """A buffer is not a sequence of whole records (host-side framing)."""


class VerifyError(StreamError):
    """A stream failed one of the checks of docs/stream-format.md.

    ``status`` is the mailbox status code the document assigns to the check;
    ``sequence`` the Sequence field of the failing record when its header was
    whole (None otherwise), for IMPORT_BATCH's Result[2].
    """

    def __init__(self, status: int, message: str, sequence: int | None = None) -> None:
        self.status = status
        self.sequence = sequence
        super().__init__(f"{_STATUS.get(status, hex(status))}: {message}")

    @classmethod
    def named(cls, name: str, message: str, sequence: int | None = None) -> VerifyError:
        return cls(status_code(name), message, sequence)


# --- key schedule and nonces ------------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    """What HKDF gives a stream: its OCB key and its public id."""

    key: bytes
    session_id: bytes


@dataclass(frozen=True)
class Binding:
    """The fields of a stream header that tie it to one migration and one
    shard (Flags through TargetNonce, docs/stream-format.md): authenticated
    by the header tag and mixed into the key schedule."""

    flags: int
    shard_index: int
    shard_count: int
    migration_id: bytes
    target_nonce: bytes

    @classmethod
    def bound(cls, nonces: Sequence[Bytes], shard_index: int) -> Binding:
        """Bound to the targets' challenge nonces (in shard order): the
        migration id is SHA-256 over all of them, the target nonce is the
        one of ``shard_index``."""
        joined = b"".join(bytes(n) for n in nonces)
        if not 1 <= len(nonces) <= MAX_SHARDS or len(joined) != len(nonces) * CHALLENGE_SIZE:
            raise ValueError(f"1 to {MAX_SHARDS} nonces of {CHALLENGE_SIZE} bytes each")
        if not 0 <= shard_index < len(nonces):
            raise ValueError(f"shard index {shard_index} outside 0..{len(nonces) - 1}")
        return cls(STREAM_BOUND, shard_index, len(nonces), migration_id(nonces), bytes(nonces[shard_index]))

    @classmethod
    def unbound(cls, migration: Bytes, shard_index: int, shard_count: int) -> Binding:
        """Not bound to any target: the migration id is the host's choice."""
        if len(migration) != MIGRATION_ID_SIZE:
            raise ValueError(f"a migration id is {MIGRATION_ID_SIZE} bytes")
        if not 0 <= shard_index < shard_count <= MAX_SHARDS:
            raise ValueError(f"shard {shard_index} of {shard_count}")
        return cls(0, shard_index, shard_count, bytes(migration), bytes(CHALLENGE_SIZE))

    @property
    def is_bound(self) -> bool:
        return bool(self.flags & STREAM_BOUND)

    def pack(self) -> bytes:
        """The BINDING_SIZE header bytes at BINDING_OFFSET."""
        start, end = BINDING_OFFSET, BINDING_OFFSET + BINDING_SIZE
        return STREAM_HEADER.pack(
            Flags=self.flags,
            ShardIndex=self.shard_index,
            ShardCount=self.shard_count,
            MigrationId=self.migration_id,
            TargetNonce=self.target_nonce,
        )[start:end]


def migration_id(nonces: Sequence[Bytes]) -> bytes:
    """SHA-256 over the targets' challenge nonces in shard order."""
    return hashlib.sha256(b"".join(bytes(n) for n in nonces)).digest()


def derive_session(transport_key: Bytes, salt: Bytes, binding: Bytes) -> SessionKeys:
    """OKM = HKDF-SHA256(IKM = TK, salt, info = KDF_INFO || binding, L = 48);
    K = OKM[0:32], SessionId = OKM[32:48]. ``binding`` is the BINDING_SIZE
    header bytes (``Binding.pack()``)."""
    if len(transport_key) != KEY_SIZE:
        raise ValueError(f"transport key must be {KEY_SIZE} bytes")
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt must be {SALT_SIZE} bytes")
    if len(binding) != BINDING_SIZE:
        raise ValueError(f"binding must be {BINDING_SIZE} bytes")
    info = KDF_INFO + bytes(binding)
    okm = HKDF(algorithm=hashes.SHA256(), length=OKM_SIZE, salt=bytes(salt), info=info).derive(bytes(transport_key))
    return SessionKeys(key=okm[:KEY_SIZE], session_id=okm[KEY_SIZE:])


# --- receipts -------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """``OVMF_MH_RECEIPT``: what a target helper vouches for after IMPORT_END."""

    migration_id: bytes
    shard_index: int
    shard_count: int
    flags: int
    record_count: int
    chain_digest: bytes
    mac: bytes = b""
    reserved: int = 0

    def body(self) -> bytes:
        """The bytes the MAC covers."""
        return RECEIPT.pack(
            MigrationId=self.migration_id,
            ShardIndex=self.shard_index,
            ShardCount=self.shard_count,
            Flags=self.flags,
            Reserved=self.reserved,
            RecordCount=self.record_count,
            ChainDigest=self.chain_digest,
        )[:RECEIPT_MAC_OFFSET]

    def pack(self) -> bytes:
        return self.body() + self.mac

    @classmethod
    def decode(cls, data: Bytes) -> Receipt:
        f = RECEIPT.unpack(data)
        return cls(f["MigrationId"], f["ShardIndex"], f["ShardCount"], f["Flags"], f["RecordCount"],
                   f["ChainDigest"], f["Mac"], f["Reserved"])


def receipt_mac(transport_key: Bytes, receipt: Receipt) -> bytes:
    """HMAC-SHA256(ReceiptKey, body), ReceiptKey = HKDF-SHA256(IKM = TK,
    salt = MigrationId, info = RECEIPT_INFO, L = 32); the key is dropped at
    once."""
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=receipt.migration_id,
               info=RECEIPT_INFO).derive(bytes(transport_key))
    return hmac.new(key, receipt.body(), hashlib.sha256).digest()


def nonce(sequence: int) -> bytes:
    """``00 00 00 00 || UINT64_LE(sequence)``: sequence 0 is the stream header."""
    return _NONCE.pack(sequence)


# --- zero ranges --------------------------------------------------------------


def zero_range_place(guest_offset: int, page_count: int, window_size: int, shard_index: int,
                     shard_count: int) -> str | None:
    """Why a zero range of ``page_count`` >= 1 pages at ``guest_offset`` may
    not be sealed or applied by shard ``shard_index`` of ``shard_count``
    (a status name), or None: BAD_PAGE when it is misaligned or leaves the
    window, RANGE_OUTSIDE_SHARD when it is not inside one shard block of
    that shard (docs/stream-format.md, "Zero ranges")."""
    if guest_offset % PAGE_SIZE or guest_offset >= window_size or page_count > (
        window_size - guest_offset
    ) // PAGE_SIZE:
        return "BAD_PAGE"
    first = guest_offset // PAGE_SIZE
    if (
        page_count > SHARD_BLOCK_PAGES
        or first % SHARD_BLOCK_PAGES + page_count > SHARD_BLOCK_PAGES
        or shard_count == 0
        or (first // SHARD_BLOCK_PAGES) % shard_count != shard_index
    ):
        return "RANGE_OUTSIDE_SHARD"
    return None


def zero_ranges(pages: Sequence[int], shard_block_pages: int = SHARD_BLOCK_PAGES) -> list[tuple[int, int]]:
    """Ascending page numbers as (first page, count) runs, each inside one
    shard block: the ranges EXPORT_ZERO_RANGES takes (in pages, not bytes)."""
    runs: list[tuple[int, int]] = []
    for number in pages:
        if runs:
            first, count = runs[-1]
            if number == first + count and number // shard_block_pages == first // shard_block_pages:
                runs[-1] = (first, count + 1)
                continue
        runs.append((number, 1))
    return runs


# --- chain digest -------------------------------------------------------------


class ChainDigest:
    """D(0) = SHA-256(CHAIN_LABEL || SessionId); D(i) = SHA-256(D(i-1) || Tag(i)).

    Binds the end record to every PAGE/ZERO record tag in order, so a target
    that saw a different set of records disagrees with the END payload.
    """

    def __init__(self, session_id: Bytes) -> None:
        #: D(i); the batch loops read and write it directly.
        self.value = hashlib.sha256(CHAIN_LABEL + bytes(session_id)).digest()

    def update(self, tag: Bytes) -> None:
        self.value = hashlib.sha256(self.value + bytes(tag)).digest()

    def digest(self) -> bytes:
        return self.value


# --- plain encode/decode (no crypto) ---------------------------------------


@dataclass(frozen=True)
class StreamHeader:
    """The fields of ``OVMF_MH_STREAM_HEADER`` as decoded, not yet verified."""

    magic: int
    version: int
    header_size: int
    flags: int
    shard_index: int
    shard_count: int
    migration_id: bytes
    target_nonce: bytes
    salt: bytes
    session_id: bytes
    guest_size: int
    tag: bytes

    @property
    def binding(self) -> Binding:
        return Binding(self.flags, self.shard_index, self.shard_count, self.migration_id, self.target_nonce)


@dataclass(frozen=True)
class RecordHeader:
    """The fields of ``OVMF_MH_RECORD_HEADER`` as decoded, not yet verified."""

    type: int
    payload_size: int
    sequence: int
    guest_offset: int
    session_id: bytes

    def pack(self) -> bytes:
        return _RECORD_STRUCT.pack(self.type, self.payload_size, self.sequence, self.guest_offset, self.session_id)


class SharedPages:
    """The digest of a shard's shared pages (ABI 4.0): SHA-256 over
    SHARED_LABEL, then each page's plain payload (UINT64 guest offset, then
    the page) in stream order, and how many there were. The host computes it
    on both sides (it carries these pages outside the helpers); the source
    helper seals it in the END record, the target helper compares."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(SHARED_LABEL)
        self.count = 0

    def update(self, payload: Bytes) -> None:
        """One shared page: its guest offset (UINT64) and its bytes."""
        self._hash.update(payload)
        self.count += 1

    def digest(self) -> bytes:
        return self._hash.digest()


#: The digest of no shared pages: what a helper uses when told of none.
NO_SHARED_PAGES = SharedPages().digest()


@dataclass(frozen=True)
class EndPayload:
    """The plaintext of the END record."""

    record_count: int
    chain_digest: bytes
    shared_page_count: int = 0
    shared_digest: bytes = NO_SHARED_PAGES

    def pack(self) -> bytes:
        return END_PAYLOAD.pack(RecordCount=self.record_count, ChainDigest=self.chain_digest,
                                SharedPageCount=self.shared_page_count, SharedDigest=self.shared_digest)


def decode_stream_header(data: Bytes) -> StreamHeader:
    """Split exactly STREAM_HEADER_SIZE bytes into fields."""
    if len(data) != STREAM_HEADER_SIZE:
        raise StreamError(f"stream header must be {STREAM_HEADER_SIZE} bytes, got {len(data)}")
    f = STREAM_HEADER.unpack(data)
    return StreamHeader(
        magic=f["Magic"],
        version=f["Version"],
        header_size=f["HeaderSize"],
        flags=f["Flags"],
        shard_index=f["ShardIndex"],
        shard_count=f["ShardCount"],
        migration_id=f["MigrationId"],
        target_nonce=f["TargetNonce"],
        salt=f["Salt"],
        session_id=f["SessionId"],
        guest_size=f["GuestSize"],
        tag=f["Tag"],
    )


def decode_record_header(data: Bytes) -> RecordHeader:
    """Decode the first RECORD_HEADER_SIZE bytes of ``data``."""
    if len(data) < RECORD_HEADER_SIZE:
        raise StreamError(f"record header needs {RECORD_HEADER_SIZE} bytes, got {len(data)}")
    return RecordHeader(*_RECORD_STRUCT.unpack_from(data, 0))


def decode_end_payload(data: Bytes) -> EndPayload:
    if len(data) != END_PAYLOAD_SIZE:
        raise StreamError(f"end payload must be {END_PAYLOAD_SIZE} bytes, got {len(data)}")
    f = END_PAYLOAD.unpack(data)
    return EndPayload(record_count=f["RecordCount"], chain_digest=f["ChainDigest"],
                      shared_page_count=f["SharedPageCount"], shared_digest=f["SharedDigest"])


def split_records(buf: Bytes) -> list[memoryview]:
    """Frame a buffer of whole records (PAGE, ZERO or END) into views, one per
    record, without copying and without the key.

    The host frames untrusted streams with this, so it trusts nothing: each
    record must have a known type, the PayloadSize of that type, and its
    payload and tag inside the buffer. Each step advances by at least one
    record header, so hostile input ends in a :class:`FramingError`, never in
    a loop or an index error.
    """
    view = memoryview(buf).cast("B")
    records: list[memoryview] = []
    pos = 0
    end = len(view)
    while pos < end:
        if end - pos < RECORD_HEADER_SIZE:
            raise FramingError(f"partial record header at byte {pos}: {end - pos} bytes left")
        rtype, size, sequence, _ = _RECORD_PREFIX.unpack_from(view, pos)
        expected = PAYLOAD_SIZES.get(rtype)
        if expected is None:
            raise FramingError(f"record at byte {pos} (sequence {sequence}) has unknown type {rtype}")
        if size != expected:
            raise FramingError(f"record at byte {pos}: type {rtype} with PayloadSize {size}, expected {expected}")
        length = RECORD_HEADER_SIZE + size + TAG_SIZE
        if end - pos < length:
            raise FramingError(f"record at byte {pos} needs {length} bytes, {end - pos} left")
        records.append(view[pos : pos + length])
        pos += length
    return records


# --- the AEAD -----------------------------------------------------------------


class StreamCipher:
    """AES-256-OCB3 under one stream key: seals and opens the header and records.

    The nonce is always derived from the sequence number in the associated
    data, so a caller cannot pair a record with another record's nonce.
    """

    def __init__(self, keys: SessionKeys) -> None:
        self.keys = keys
        self.aead = AESOCB3(keys.key)

    @property
    def session_id(self) -> bytes:
        return self.keys.session_id

    # stream header

    def seal_header(self, salt: Bytes, guest_size: int, binding: Binding) -> bytes:
        """The stream header; its tag covers every byte before it (empty plaintext)."""
        ad = STREAM_HEADER.pack(
            Magic=STREAM_MAGIC,
            Version=STREAM_VERSION,
            HeaderSize=STREAM_HEADER_SIZE,
            Flags=binding.flags,
            ShardIndex=binding.shard_index,
            ShardCount=binding.shard_count,
            MigrationId=binding.migration_id,
            TargetNonce=binding.target_nonce,
            Salt=bytes(salt),
            SessionId=self.session_id,
            GuestSize=guest_size,
        )[:STREAM_HEADER_AD_SIZE]
        return ad + self.aead.encrypt(nonce(0), b"", ad)

    def header_tag_ok(self, header: Bytes) -> bool:
        ad = bytes(header[:STREAM_HEADER_AD_SIZE])
        tag = bytes(header[STREAM_HEADER_AD_SIZE:STREAM_HEADER_SIZE])
        try:
            self.aead.decrypt(nonce(0), tag, ad)
        except InvalidTag:
            return False
        return True

    # records

    def seal_record(self, rtype: int, sequence: int, guest_offset: int, plaintext: Bytes) -> bytes:
        """``header || OCB-Encrypt(K, Nonce(sequence), AD = header, plaintext)``."""
        header = RecordHeader(rtype, len(plaintext), sequence, guest_offset, self.session_id).pack()
        return header + self.aead.encrypt(nonce(sequence), plaintext, header)

    def open_record(self, record: Bytes) -> bytes:
        """Check the tag of one whole record and return its plaintext.

        Only the tag is checked here; the structural checks come first, in
        :class:`StreamVerifier`. Raises VerifyError(AUTH_FAILED).
        """
        header = bytes(record[:RECORD_HEADER_SIZE])
        sequence = _RECORD_PREFIX.unpack_from(header, 0)[2]
        try:
            return self.aead.decrypt(nonce(sequence), record[RECORD_HEADER_SIZE:], header)
        except InvalidTag:
            raise VerifyError.named("AUTH_FAILED", f"record {sequence}: tag mismatch", sequence) from None


def record_tag(record: Bytes) -> bytes:
    """The last TAG_SIZE bytes of a whole record."""
    return bytes(record[len(record) - TAG_SIZE :])


# --- the writer ---------------------------------------------------------------


#: Granularity of write_records' snapshots: a helper allocates snapshot memory
#: only for the chunks it seals pages in. A power of two.
SNAPSHOT_CHUNK_SIZE = 2 * 1024 * 1024


class StreamWriter:
    """The source side: header, then records with sequence 1, 2, ..., then END.

    Holds the sequence counter and the chain so that every record a caller
    emits is numbered and chained exactly once.

    Every record is built in the writer's private buffers: the header that is
    the associated data is packed there, and the tag the chain absorbs is read
    from there, never back from an output buffer someone else can write to.
    With snapshots (CHECK_PAGES tracking) every page is copied once, so that
    the zero check, the encryption and what CHECK_PAGES remembers are the
    same bytes. Without, a page whose first 8 bytes are not zero is certainly
    not a ZERO record and is sealed straight from the window, one copy fewer;
    only a page that may be all zero is copied before the check (a page that
    changes meanwhile yields a record of one of its states either way).
    """

    def __init__(self, transport_key: Bytes, salt: Bytes, guest_size: int, binding: Binding) -> None:
        self.cipher = StreamCipher(derive_session(transport_key, salt, binding.pack()))
        self.header = self.cipher.seal_header(salt, guest_size, binding)
        self.next_sequence = 1
        self.record_count = 0
        self._chain = ChainDigest(self.cipher.session_id)
        self._page = bytearray(PAGE_SIZE)  # the page snapshot
        # Nonce, then the record as it goes out: one pack_into fills both.
        self._page_record = bytearray(NONCE_SIZE + PAGE_RECORD_SIZE)
        self._zero_record = bytearray(NONCE_SIZE + ZERO_RECORD_SIZE)

    def page_record(self, guest_offset: int, page: Bytes) -> bytes:
        """One record for a page: ZERO when it is all zero, PAGE otherwise."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
        out = memoryview(bytearray(PAGE_RECORD_SIZE))
        written, _ = self._write(memoryview(page).cast("B"), (guest_offset,), out, guest_offset)
        return bytes(out[:written])

    def write_records(
        self,
        window: memoryview,
        offsets: Sequence[int],
        out: memoryview,
        snapshots: Sequence[bytearray] | None = None,
    ) -> tuple[int, int]:
        """Seal one record per page ``window[offset : offset + PAGE_SIZE]``, in
        the order of ``offsets``, back to back into ``out``; return (bytes
        written, ZERO records among them). With ``snapshots``, also leave the
        exact bytes each record sealed there: guest offset ``o`` at
        ``snapshots[o // SNAPSHOT_CHUNK_SIZE][o % SNAPSHOT_CHUNK_SIZE:]``
        (the caller has allocated every chunk the offsets touch).

        The caller has checked every offset against the window and that
        ``out`` holds ``len(offsets)`` PAGE records.
        """
        return self._write(window, offsets, out, 0, snapshots)

    def _write(
        self,
        window: memoryview,
        offsets: Sequence[int],
        out: memoryview,
        base: int,
        snapshots: Sequence[bytearray] | None = None,
    ) -> tuple[int, int]:
        """write_records, reading the page of GuestOffset ``offset`` at
        ``window[offset - base]``."""
        page = self._page
        page_view = memoryview(page)
        shift = SNAPSHOT_CHUNK_SIZE.bit_length() - 1
        mask = SNAPSHOT_CHUNK_SIZE - 1
        first_words = window.cast("Q")  # one load tells most non-zero pages
        record = self._page_record
        view = memoryview(record)
        nonce_, head, body, tag = (
            view[:NONCE_SIZE],
            view[NONCE_SIZE : NONCE_SIZE + RECORD_HEADER_SIZE],
            view[NONCE_SIZE + RECORD_HEADER_SIZE :],
            view[-TAG_SIZE:],
        )
        whole = view[NONCE_SIZE:]
        zero = self._zero_record
        zview = memoryview(zero)
        zero_nonce, zero_head, zero_tag = (
            zview[:NONCE_SIZE],
            zview[NONCE_SIZE : NONCE_SIZE + RECORD_HEADER_SIZE],
            zview[NONCE_SIZE + RECORD_HEADER_SIZE :],
        )
        zero_whole = zview[NONCE_SIZE:]
        pack_into = NONCE_AND_RECORD.pack_into
        encrypt_into = self.cipher.aead.encrypt_into
        sha256 = hashlib.sha256
        session_id = self.cipher.session_id
        digest = self._chain.value
        first = sequence = self.next_sequence
        pos = zeros = 0
        try:
            for offset in offsets:
                start = offset - base
                if snapshots is not None:
                    # The snapshot is the private copy: sealed, zero-checked
                    # and remembered are the same bytes, copied once.
                    chunk, at = snapshots[offset >> shift], offset & mask
                    chunk[at : at + PAGE_SIZE] = window[start : start + PAGE_SIZE]
                    plain = memoryview(chunk)[at : at + PAGE_SIZE]
                    is_zero = chunk.startswith(ZERO_PAGE, at)  # a memcmp, unlike memoryview ==
                elif first_words[start >> 3]:
                    plain = window[start : start + PAGE_SIZE]
                    is_zero = False
                else:
                    plain = page_view
                    plain[:] = window[start : start + PAGE_SIZE]
                    is_zero = page == ZERO_PAGE
                if is_zero:
                    pack_into(zero, 0, sequence, RECORD_ZERO, 0, sequence, offset, session_id)
                    encrypt_into(zero_nonce, b"", zero_head, zero_tag)
                    end = pos + ZERO_RECORD_SIZE
                    out[pos:end] = zero_whole
                    digest = sha256(digest + zero_tag).digest()
                    zeros += 1
                else:
                    pack_into(record, 0, sequence, RECORD_PAGE, PAGE_SIZE, sequence, offset, session_id)
                    encrypt_into(nonce_, plain, head, body)
                    end = pos + PAGE_RECORD_SIZE
                    out[pos:end] = whole
                    digest = sha256(digest + tag).digest()
                pos = end
                sequence += 1
        finally:
            self._chain.value = digest
            self.next_sequence = sequence
            self.record_count += sequence - first
            page_view[:] = ZERO_PAGE  # no guest plaintext left behind
            first_words.release()
        return pos, zeros

    def zero_range_record(self, guest_offset: int, page_count: int) -> bytes:
        """One ZERO_RANGE record: ``page_count`` pages from ``guest_offset``
        are all zero. The caller has checked the range (placement and that
        every byte is zero); the record is numbered and chained like a page's."""
        payload = _ZERO_RANGE_COUNT.pack(page_count)
        record = self.cipher.seal_record(RECORD_ZERO_RANGE, self.next_sequence, guest_offset, payload)
        self._chain.update(record_tag(record))
        self.next_sequence += 1
        self.record_count += 1
        return record

    @property
    def chain_digest(self) -> bytes:
        """D(N) over the records written so far (what the END record seals)."""
        return self._chain.digest()

    def end_record(self, shared_page_count: int = 0, shared_digest: bytes = NO_SHARED_PAGES) -> bytes:
        """The END record, sealing the count and chain and the host's account
        of the shard's shared pages (count and digest, see SharedPages)."""
        payload = EndPayload(self.record_count, self._chain.digest(), shared_page_count, shared_digest).pack()
        return self.cipher.seal_record(RECORD_END, self.next_sequence, 0, payload)


# --- the verifier -------------------------------------------------------------


@dataclass(frozen=True)
class OpenedRecord:
    """A verified PAGE, ZERO or ZERO_RANGE record: where it goes and what
    (None: zeros), and how many pages from there (ZERO_RANGE: PageCount)."""

    sequence: int
    guest_offset: int
    page: bytes | None
    pages: int = 1
    zero_range: bool = False


class StreamVerifier:
    """The target side: every check of docs/stream-format.md, in its order.

    Built from a verified stream header; then :meth:`open_next` takes the
    records of a batch one at a time (or :meth:`apply_records` a whole batch)
    and :meth:`finish` the END record. A page reaches the guest window only
    after its tag verified: the caller writes what open_next returned, and
    apply_records decrypts into a private page first (``decrypt_into`` writes
    its output before it checks the tag) and copies it to the window after.
    """

    def __init__(self, cipher: StreamCipher, window_size: int, shard: tuple[int, int] = (0, 1)) -> None:
        self.cipher = cipher
        self.window_size = window_size
        #: (ShardIndex, ShardCount) of the verified header: where ZERO_RANGE records may point.
        self.shard = shard
        self.next_sequence = 1
        self.record_count = 0
        self._chain = ChainDigest(cipher.session_id)
        self._plain = bytearray(PAGE_SIZE)  # decrypt_into target: written before the tag is known good

    @classmethod
    def from_header(cls, transport_key: Bytes, header: Bytes, window_size: int | None = None) -> StreamVerifier:
        """Check magic, version, size, flags, the derived SessionId and the tag
        (BAD_HEADER for each); the header is exactly STREAM_HEADER_SIZE bytes.

        ``window_size`` is the target's guest window that every page must fit
        in (BAD_PAGE); None takes the header's GuestSize (offline decoding).
        """
        if len(header) != STREAM_HEADER_SIZE:
            raise VerifyError.named("BAD_HEADER", f"{len(header)} bytes, expected {STREAM_HEADER_SIZE}")
        h = decode_stream_header(header)
        if (h.magic, h.version, h.header_size) != (STREAM_MAGIC, STREAM_VERSION, STREAM_HEADER_SIZE) or (
            h.flags & ~STREAM_FLAGS_KNOWN
        ):
            raise VerifyError.named("BAD_HEADER", "magic, version, size or flags")
        cipher = StreamCipher(derive_session(transport_key, h.salt, h.binding.pack()))
        if not hmac.compare_digest(cipher.session_id, h.session_id):
            raise VerifyError.named("BAD_HEADER", "session id does not derive from this key and salt")
        if not cipher.header_tag_ok(header):
            raise VerifyError.named("BAD_HEADER", "header tag mismatch")
        return cls(cipher, h.guest_size if window_size is None else window_size, (h.shard_index, h.shard_count))

    def _check_record(self, buf: memoryview, pos: int, allowed: tuple[int, ...]) -> tuple[RecordHeader, int]:
        """Structure, session and sequence of the record at ``pos``, in the
        order of the verification table; returns the header and the record
        length. Nothing cryptographic yet."""
        left = len(buf) - pos
        if left < RECORD_HEADER_SIZE:
            raise VerifyError.named("BAD_RECORD", f"partial record header ({left} bytes)")
        h = decode_record_header(buf[pos : pos + RECORD_HEADER_SIZE])
        if h.type not in allowed:
            raise VerifyError.named("BAD_RECORD", f"record type {h.type} not allowed here", h.sequence)
        if h.payload_size != PAYLOAD_SIZES[h.type]:
            raise VerifyError.named("BAD_RECORD", f"type {h.type} with PayloadSize {h.payload_size}", h.sequence)
        length = RECORD_HEADER_SIZE + h.payload_size + TAG_SIZE
        if left < length:
            raise VerifyError.named("BAD_RECORD", f"record needs {length} bytes, {left} left", h.sequence)
        if not hmac.compare_digest(h.session_id, self.cipher.session_id):
            raise VerifyError.named("WRONG_SESSION", f"record {h.sequence} of another session", h.sequence)
        if h.sequence < self.next_sequence:
            raise VerifyError.named(
                "SEQUENCE_REPLAY", f"record {h.sequence}, expected {self.next_sequence}", h.sequence
            )
        if h.sequence > self.next_sequence:
            raise VerifyError.named("SEQUENCE_GAP", f"record {h.sequence}, expected {self.next_sequence}", h.sequence)
        return h, length

    def open_next(self, buf: memoryview, pos: int) -> tuple[OpenedRecord, int]:
        """Verify the PAGE/ZERO/ZERO_RANGE record at ``pos`` of a batch; return
        it and the position after it. Raises VerifyError at the first failed
        check. A ZERO_RANGE's PageCount is in its encrypted payload, so its
        range is checked after the tag (BAD_RECORD for 0 pages, then
        zero_range_place)."""
        h, length = self._check_record(buf, pos, (RECORD_PAGE, RECORD_ZERO, RECORD_ZERO_RANGE))
        if h.guest_offset % PAGE_SIZE or h.guest_offset + PAGE_SIZE > self.window_size:
            raise VerifyError.named("BAD_PAGE", f"record {h.sequence}: guest offset {h.guest_offset:#x}", h.sequence)
        record = buf[pos : pos + length]
        plaintext = self.cipher.open_record(record)
        opened = OpenedRecord(h.sequence, h.guest_offset, plaintext if h.type == RECORD_PAGE else None)
        if h.type == RECORD_ZERO_RANGE:
            (count,) = _ZERO_RANGE_COUNT.unpack(plaintext)
            if count == 0:
                raise VerifyError.named("BAD_RECORD", f"record {h.sequence}: zero range of 0 pages", h.sequence)
            refusal = zero_range_place(h.guest_offset, count, self.window_size, *self.shard)
            if refusal is not None:
                raise VerifyError.named(
                    refusal, f"record {h.sequence}: {count} pages at {h.guest_offset:#x} for shard "
                    f"{self.shard[0]} of {self.shard[1]}", h.sequence)
            opened = OpenedRecord(h.sequence, h.guest_offset, None, count, True)
        self._chain.update(record_tag(record))
        self.next_sequence += 1
        self.record_count += 1
        return opened, pos + length

    def apply_records(
        self, batch: memoryview, window: memoryview, limit: int
    ) -> tuple[int, int, VerifyError | None, int, int]:
        """Verify the PAGE/ZERO/ZERO_RANGE records of ``batch`` in order and
        write each to ``window`` as soon as its tag (and a range's place)
        verified; return (records applied, PAGE records among them, the first
        failed check or None, ZERO_RANGE records among them, pages those
        covered). A ZERO_RANGE writes only the pages of its range that are
        not zero already (verify, then write: a sparse window stays sparse).

        Same checks, order and statuses as :meth:`open_next` record by record;
        records before a failing one stay applied. A record after ``limit``
        records fails with BATCH_TOO_LARGE. ``batch`` must be private to the
        caller (it is the associated data and the tags the chain absorbs) and
        ``window`` at least ``window_size`` bytes.

        A record whose header passes every structural check goes through the
        inline path below; any other record goes through :meth:`open_next`,
        which raises the check that failed.
        """
        plain = self._plain
        plain_view = memoryview(plain)
        unpack_from = _RECORD_STRUCT.unpack_from
        make_nonce = _NONCE.pack
        decrypt_into = self.cipher.aead.decrypt_into
        decrypt = self.cipher.aead.decrypt
        sha256 = hashlib.sha256
        session_id = self.cipher.session_id
        window_size = self.window_size
        sequence, digest, count = self.next_sequence, self._chain.value, self.record_count
        size = len(batch)
        applied = pages = pos = ranges = range_pages = 0
        error: VerifyError | None = None
        try:
            while pos < size:
                if applied == limit:
                    error = VerifyError.named("BATCH_TOO_LARGE", f"more than {limit} records")
                    break
                left = size - pos
                fast = False
                if left >= RECORD_HEADER_SIZE:
                    rtype, payload_size, field, offset, sid = unpack_from(batch, pos)
                    fast = (
                        field == sequence
                        and sid == session_id
                        and not offset % PAGE_SIZE
                        and offset + PAGE_SIZE <= window_size
                    )
                if fast and rtype == RECORD_PAGE and payload_size == PAGE_SIZE and left >= PAGE_RECORD_SIZE:
                    body = pos + RECORD_HEADER_SIZE
                    end = body + PAGE_SIZE + TAG_SIZE
                    try:
                        decrypt_into(make_nonce(sequence), batch[body:end], batch[pos:body], plain)
                    except InvalidTag:
                        error = VerifyError.named("AUTH_FAILED", f"record {sequence}: tag mismatch", sequence)
                        break
                    window[offset : offset + PAGE_SIZE] = plain_view
                    pages += 1
                elif fast and rtype == RECORD_ZERO and payload_size == 0 and left >= ZERO_RECORD_SIZE:
                    body = pos + RECORD_HEADER_SIZE
                    end = body + TAG_SIZE
                    try:
                        decrypt(make_nonce(sequence), batch[body:end], batch[pos:body])
                    except InvalidTag:
                        error = VerifyError.named("AUTH_FAILED", f"record {sequence}: tag mismatch", sequence)
                        break
                    window[offset : offset + PAGE_SIZE] = ZERO_PAGE
                else:
                    # Some check fails (or the record is unusual): the general
                    # path raises it, with the verifier's state up to date.
                    self.next_sequence, self._chain.value, self.record_count = sequence, digest, count
                    try:
                        opened, pos = self.open_next(batch, pos)
                    except VerifyError as failed:
                        error = failed
                        break
                    sequence, digest, count = self.next_sequence, self._chain.value, self.record_count
                    if opened.zero_range:
                        _zero_pages_in(window, opened.guest_offset, opened.pages)
                        ranges += 1
                        range_pages += opened.pages
                    else:
                        page = ZERO_PAGE if opened.page is None else opened.page
                        window[opened.guest_offset : opened.guest_offset + PAGE_SIZE] = page
                    applied += 1
                    pages += opened.page is not None
                    continue
                digest = sha256(digest + batch[end - TAG_SIZE : end]).digest()
                sequence += 1
                count += 1
                applied += 1
                pos = end
        finally:
            self.next_sequence, self._chain.value, self.record_count = sequence, digest, count
            plain_view[:] = ZERO_PAGE  # no guest plaintext left behind
        return applied, pages, error, ranges, range_pages

    @property
    def chain_digest(self) -> bytes:
        """D(i) over the records verified so far."""
        return self._chain.digest()

    def finish(self, end_record: memoryview, shared_page_count: int = 0,
               shared_digest: bytes = NO_SHARED_PAGES) -> int:
        """Verify the END record and what it says against what arrived; return
        the record count.

        The input must be exactly one end record: empty means IMPORT_END came
        without one (TRUNCATED); any other length than END_RECORD_SIZE is a
        partial or padded record (BAD_RECORD), checked before its fields.
        Last, the shared pages the host received for this shard (count and
        digest) must be those the source sealed (SHARED_PAGES_MISMATCH).
        """
        if len(end_record) == 0:
            raise VerifyError.named("TRUNCATED", "no end record")
        if len(end_record) != END_RECORD_SIZE:
            raise VerifyError.named("BAD_RECORD", f"end record of {len(end_record)} bytes, not {END_RECORD_SIZE}")
        self._check_record(end_record, 0, (RECORD_END,))
        end = decode_end_payload(self.cipher.open_record(end_record))
        if end.record_count != self.record_count or not hmac.compare_digest(end.chain_digest, self._chain.digest()):
            raise VerifyError.named(
                "TRUNCATED", f"end record says {end.record_count} records, {self.record_count} arrived"
            )
        if end.shared_page_count != shared_page_count or not hmac.compare_digest(end.shared_digest, shared_digest):
            raise VerifyError.named(
                "SHARED_PAGES_MISMATCH",
                f"the source sealed {end.shared_page_count} shared pages, the host received {shared_page_count} "
                f"(digests {'equal' if end.shared_digest == shared_digest else 'differ'})",
            )
        return self.record_count


def _zero_pages_in(window: memoryview, offset: int, count: int) -> None:
    """Make ``count`` pages from ``offset`` zero, writing only those that are
    not zero already."""
    end = offset + count * PAGE_SIZE
    if is_zero(window[offset:end]):
        return
    for start in range(offset, end, PAGE_SIZE):
        if bytes(window[start : start + PAGE_SIZE]) != ZERO_PAGE:
            window[start : start + PAGE_SIZE] = ZERO_PAGE


def is_zero(view: Bytes) -> bool:
    """Every byte of ``view`` is zero (one copy and one memcmp)."""
    return bytes(view) == bytes(len(view))


# --- whole streams (tests, tools) ----------------------------------------------


@dataclass(frozen=True)
class DecodedStream:
    header: StreamHeader
    records: list[OpenedRecord]


def decode_stream(transport_key: Bytes, stream: Bytes, guest_size: int | None = None,
                  shared_pages: tuple[int, bytes] = (0, NO_SHARED_PAGES)) -> DecodedStream:
    """Verify a complete stream held in memory and return its records.

    ``shared_pages`` is the (count, digest) of the shared pages that went
    beside the stream (SharedPages): the END record must seal exactly those.

    ``guest_size`` is the target window the pages must fit (default: the
    header's GuestSize). Raises VerifyError with the status a helper would
    return for the first failed check, as if the records after the header
    came in one IMPORT_BATCH and the END record in IMPORT_END.
    """
    view = memoryview(stream).cast("B")
    verifier = StreamVerifier.from_header(transport_key, view[:STREAM_HEADER_SIZE], guest_size)
    body = view[STREAM_HEADER_SIZE:]
    records: list[OpenedRecord] = []
    pos = 0
    while pos < len(body) and not _is_end_record(body, pos):
        opened, pos = verifier.open_next(body, pos)
        records.append(opened)
    verifier.finish(body[pos:], *shared_pages)
    return DecodedStream(decode_stream_header(view[:STREAM_HEADER_SIZE]), records)


def _is_end_record(body: memoryview, pos: int) -> bool:
    return len(body) - pos >= RECORD_HEADER_SIZE and _RECORD_PREFIX.unpack_from(body, pos)[0] == RECORD_END
