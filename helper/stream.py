"""The page-stream codec of docs/stream-format.md.

A stream is ``STREAM_HEADER RECORD(1) ... RECORD(N) END_RECORD(N+1)``; every
piece is authenticated with AES-256-OCB3 under a per-stream key derived by
HKDF-SHA256 from the transport key and a salt. Layouts and constants come
from HelperAbi.h through :mod:`helper.abi`; the only literals here are the two
ASCII labels the format document fixes (the header has no define for them).

The codec has three users: :class:`helper.reference.ReferenceHelper` (the
software helper), the host, which frames untrusted streams with
:func:`split_records` without holding the key, and the tests. It does no
per-page work beyond one AEAD call, one hash update and (export) one zero-page
compare per record: pages stay in C (OpenSSL, ``bytes`` compare) and Python
only touches 40-byte headers.

Verification failures raise :class:`VerifyError` carrying the mailbox status
code that docs/stream-format.md assigns to the check, so a helper can answer
with it directly and a test can compare it against any implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
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

RECORD_PAGE = _A.const("OVMF_MH_RECORD_PAGE")
RECORD_ZERO = _A.const("OVMF_MH_RECORD_ZERO")
RECORD_END = _A.const("OVMF_MH_RECORD_END")

STREAM_HEADER = _A.layout("OVMF_MH_STREAM_HEADER")
RECORD_HEADER = _A.layout("OVMF_MH_RECORD_HEADER")
END_PAYLOAD = _A.layout("OVMF_MH_END_PAYLOAD")

STREAM_HEADER_SIZE = STREAM_HEADER.size
RECORD_HEADER_SIZE = RECORD_HEADER.size
END_PAYLOAD_SIZE = END_PAYLOAD.size
#: Bytes of the stream header covered by its tag (everything before ``Tag``).
STREAM_HEADER_AD_SIZE = STREAM_HEADER.offset("Tag")

#: PayloadSize each record type must carry.
PAYLOAD_SIZES: dict[int, int] = {RECORD_PAGE: PAGE_SIZE, RECORD_ZERO: 0, RECORD_END: END_PAYLOAD_SIZE}
PAGE_RECORD_SIZE = RECORD_HEADER_SIZE + PAGE_SIZE + TAG_SIZE
ZERO_RECORD_SIZE = RECORD_HEADER_SIZE + TAG_SIZE
END_RECORD_SIZE = RECORD_HEADER_SIZE + END_PAYLOAD_SIZE + TAG_SIZE

# The two labels of docs/stream-format.md ("Key schedule", "End payload").
KDF_INFO = abi.load().strings["OVMF_MH_KDF_INFO"].encode()
CHAIN_LABEL = abi.load().strings["OVMF_MH_CHAIN_LABEL"].encode()
OKM_SIZE = KEY_SIZE + SESSION_ID_SIZE

_STATUS = _A.names_with_prefix("OVMF_MH_STATUS_")
_RECORD_PREFIX = struct.Struct("<IIQQ")  # Type, PayloadSize, Sequence, GuestOffset
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


def derive_session(transport_key: Bytes, salt: Bytes) -> SessionKeys:
    """OKM = HKDF-SHA256(IKM = TK, salt, info = KDF_INFO, L = 48); K = OKM[0:32],
    SessionId = OKM[32:48]."""
    if len(transport_key) != KEY_SIZE:
        raise ValueError(f"transport key must be {KEY_SIZE} bytes")
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt must be {SALT_SIZE} bytes")
    okm = HKDF(algorithm=hashes.SHA256(), length=OKM_SIZE, salt=bytes(salt), info=KDF_INFO).derive(bytes(transport_key))
    return SessionKeys(key=okm[:KEY_SIZE], session_id=okm[KEY_SIZE:])


def nonce(sequence: int) -> bytes:
    """``00 00 00 00 || UINT64_LE(sequence)``: sequence 0 is the stream header."""
    return bytes(NONCE_SIZE - 8) + struct.pack("<Q", sequence)


# --- chain digest -------------------------------------------------------------


class ChainDigest:
    """D(0) = SHA-256(CHAIN_LABEL || SessionId); D(i) = SHA-256(D(i-1) || Tag(i)).

    Binds the end record to every PAGE/ZERO record tag in order, so a target
    that saw a different set of records disagrees with the END payload.
    """

    def __init__(self, session_id: Bytes) -> None:
        self._digest = hashlib.sha256(CHAIN_LABEL + bytes(session_id)).digest()

    def update(self, tag: Bytes) -> None:
        self._digest = hashlib.sha256(self._digest + bytes(tag)).digest()

    def digest(self) -> bytes:
        return self._digest


# --- plain encode/decode (no crypto) ---------------------------------------


@dataclass(frozen=True)
class StreamHeader:
    """The fields of ``OVMF_MH_STREAM_HEADER`` as decoded, not yet verified."""

    magic: int
    version: int
    header_size: int
    flags: int
    salt: bytes
    session_id: bytes
    guest_size: int
    tag: bytes


@dataclass(frozen=True)
class RecordHeader:
    """The fields of ``OVMF_MH_RECORD_HEADER`` as decoded, not yet verified."""

    type: int
    payload_size: int
    sequence: int
    guest_offset: int
    session_id: bytes

    def pack(self) -> bytes:
        return RECORD_HEADER.pack(
            Type=self.type,
            PayloadSize=self.payload_size,
            Sequence=self.sequence,
            GuestOffset=self.guest_offset,
            SessionId=self.session_id,
        )


@dataclass(frozen=True)
class EndPayload:
    """The plaintext of the END record."""

    record_count: int
    chain_digest: bytes

    def pack(self) -> bytes:
        return END_PAYLOAD.pack(RecordCount=self.record_count, ChainDigest=self.chain_digest)


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
        salt=f["Salt"],
        session_id=f["SessionId"],
        guest_size=f["GuestSize"],
        tag=f["Tag"],
    )


def decode_record_header(data: Bytes) -> RecordHeader:
    """Decode the first RECORD_HEADER_SIZE bytes of ``data``."""
    if len(data) < RECORD_HEADER_SIZE:
        raise StreamError(f"record header needs {RECORD_HEADER_SIZE} bytes, got {len(data)}")
    rtype, size, sequence, offset = _RECORD_PREFIX.unpack_from(data, 0)
    sid = bytes(data[RECORD_HEADER.offset("SessionId") : RECORD_HEADER_SIZE])
    return RecordHeader(rtype, size, sequence, offset, sid)


def decode_end_payload(data: Bytes) -> EndPayload:
    if len(data) != END_PAYLOAD_SIZE:
        raise StreamError(f"end payload must be {END_PAYLOAD_SIZE} bytes, got {len(data)}")
    f = END_PAYLOAD.unpack(data)
    return EndPayload(record_count=f["RecordCount"], chain_digest=f["ChainDigest"])


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
        self._aead = AESOCB3(keys.key)

    @property
    def session_id(self) -> bytes:
        return self.keys.session_id

    # stream header

    def seal_header(self, salt: Bytes, guest_size: int) -> bytes:
        """The 88-byte stream header; its tag covers bytes 0..71 (empty plaintext)."""
        ad = STREAM_HEADER.pack(
            Magic=STREAM_MAGIC,
            Version=STREAM_VERSION,
            HeaderSize=STREAM_HEADER_SIZE,
            Flags=0,
            Salt=bytes(salt),
            SessionId=self.session_id,
            GuestSize=guest_size,
        )[:STREAM_HEADER_AD_SIZE]
        return ad + self._aead.encrypt(nonce(0), b"", ad)

    def header_tag_ok(self, header: Bytes) -> bool:
        ad = bytes(header[:STREAM_HEADER_AD_SIZE])
        tag = bytes(header[STREAM_HEADER_AD_SIZE:STREAM_HEADER_SIZE])
        try:
            self._aead.decrypt(nonce(0), tag, ad)
        except InvalidTag:
            return False
        return True

    # records

    def seal_record(self, rtype: int, sequence: int, guest_offset: int, plaintext: Bytes) -> bytes:
        """``header || OCB-Encrypt(K, Nonce(sequence), AD = header, plaintext)``."""
        header = RecordHeader(rtype, len(plaintext), sequence, guest_offset, self.session_id).pack()
        return header + self._aead.encrypt(nonce(sequence), plaintext, header)

    def open_record(self, record: Bytes) -> bytes:
        """Check the tag of one whole record and return its plaintext.

        Only the tag is checked here; the structural checks come first, in
        :class:`StreamVerifier`. Raises VerifyError(AUTH_FAILED).
        """
        header = bytes(record[:RECORD_HEADER_SIZE])
        sequence = _RECORD_PREFIX.unpack_from(header, 0)[2]
        try:
            return self._aead.decrypt(nonce(sequence), record[RECORD_HEADER_SIZE:], header)
        except InvalidTag:
            raise VerifyError.named("AUTH_FAILED", f"record {sequence}: tag mismatch", sequence) from None


def record_tag(record: Bytes) -> bytes:
    """The last TAG_SIZE bytes of a whole record."""
    return bytes(record[len(record) - TAG_SIZE :])


# --- the writer ---------------------------------------------------------------


class StreamWriter:
    """The source side: header, then records with sequence 1, 2, ..., then END.

    Holds the sequence counter and the chain so that every record a caller
    emits is numbered and chained exactly once.
    """

    def __init__(self, transport_key: Bytes, salt: Bytes, guest_size: int) -> None:
        self.cipher = StreamCipher(derive_session(transport_key, salt))
        self.header = self.cipher.seal_header(salt, guest_size)
        self.next_sequence = 1
        self.record_count = 0
        self._chain = ChainDigest(self.cipher.session_id)

    def page_record(self, guest_offset: int, page: bytes) -> bytes:
        """One record for a page: ZERO when it is all zero, PAGE otherwise."""
        if page == ZERO_PAGE:
            record = self.cipher.seal_record(RECORD_ZERO, self.next_sequence, guest_offset, b"")
        else:
            record = self.cipher.seal_record(RECORD_PAGE, self.next_sequence, guest_offset, page)
        self._chain.update(record_tag(record))
        self.next_sequence += 1
        self.record_count += 1
        return record

    def end_record(self) -> bytes:
        payload = EndPayload(self.record_count, self._chain.digest()).pack()
        return self.cipher.seal_record(RECORD_END, self.next_sequence, 0, payload)


# --- the verifier -------------------------------------------------------------


@dataclass(frozen=True)
class OpenedRecord:
    """A verified PAGE or ZERO record: where it goes and what (None: zeros)."""

    sequence: int
    guest_offset: int
    page: bytes | None


class StreamVerifier:
    """The target side: every check of docs/stream-format.md, in its order.

    Built from a verified stream header; then :meth:`open_next` takes the
    records of a batch one at a time and :meth:`finish` the END record. The
    caller owns the guest window and writes a page only after open_next
    returned it, i.e. after its tag verified.
    """

    def __init__(self, cipher: StreamCipher, window_size: int) -> None:
        self.cipher = cipher
        self.window_size = window_size
        self.next_sequence = 1
        self.record_count = 0
        self._chain = ChainDigest(cipher.session_id)

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
        if (h.magic, h.version, h.header_size, h.flags) != (STREAM_MAGIC, STREAM_VERSION, STREAM_HEADER_SIZE, 0):
            raise VerifyError.named("BAD_HEADER", "magic, version, size or flags")
        cipher = StreamCipher(derive_session(transport_key, h.salt))
        if not hmac.compare_digest(cipher.session_id, h.session_id):
            raise VerifyError.named("BAD_HEADER", "session id does not derive from this key and salt")
        if not cipher.header_tag_ok(header):
            raise VerifyError.named("BAD_HEADER", "header tag mismatch")
        return cls(cipher, h.guest_size if window_size is None else window_size)

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
        """Verify the PAGE/ZERO record at ``pos`` of a batch; return it and the
        position after it. Raises VerifyError at the first failed check."""
        h, length = self._check_record(buf, pos, (RECORD_PAGE, RECORD_ZERO))
        if h.guest_offset % PAGE_SIZE or h.guest_offset + PAGE_SIZE > self.window_size:
            raise VerifyError.named("BAD_PAGE", f"record {h.sequence}: guest offset {h.guest_offset:#x}", h.sequence)
        record = buf[pos : pos + length]
        plaintext = self.cipher.open_record(record)
        self._chain.update(record_tag(record))
        self.next_sequence += 1
        self.record_count += 1
        page = plaintext if h.type == RECORD_PAGE else None
        return OpenedRecord(h.sequence, h.guest_offset, page), pos + length

    def finish(self, end_record: memoryview) -> int:
        """Verify the END record and what it says against what arrived; return
        the record count.

        The input must be exactly one end record: empty means IMPORT_END came
        without one (TRUNCATED); any other length than END_RECORD_SIZE is a
        partial or padded record (BAD_RECORD), checked before its fields.
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
        return self.record_count


# --- whole streams (tests, tools) ----------------------------------------------


@dataclass(frozen=True)
class DecodedStream:
    header: StreamHeader
    records: list[OpenedRecord]


def decode_stream(transport_key: Bytes, stream: Bytes, guest_size: int | None = None) -> DecodedStream:
    """Verify a complete stream held in memory and return its records.

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
    verifier.finish(body[pos:])
    return DecodedStream(decode_stream_header(view[:STREAM_HEADER_SIZE]), records)


def _is_end_record(body: memoryview, pos: int) -> bool:
    return len(body) - pos >= RECORD_HEADER_SIZE and _RECORD_PREFIX.unpack_from(body, pos)[0] == RECORD_END
