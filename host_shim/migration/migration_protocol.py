"""The control connection between `ovmf-mh migrate --to` (source) and
`ovmf-mh migrate-incoming` (target): framing and strict parsing of its
messages (docs/migration-protocol.md).

A message is a 4-byte big-endian length followed by that many bytes of
UTF-8 JSON: one object whose "type" names the message. The peer is
untrusted: lengths are bounded before anything is read, duplicate keys,
NaN/Infinity, unknown types and unknown or missing fields are refused, and
every value is checked for its type and range by the receiver.
"""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import IO, Any, cast

from host_shim.errors import OvmfMhError
from host_shim.transfer import container as ct
from host_shim.transfer.liveness import Liveness, StreamStalled

PROTOCOL = "ovmf-mh-migration"
#: Versions this program speaks. Version 2: ``accept`` carries the target
#: helpers' challenge nonces, which bind every shard to this migration.
#: Version 3 (ABI 4.0): the same messages; the page stream is transfer
#: container version 2, whose end records seal each shard's shared pages.
#: Version 4: the source's stream carries KEEPALIVE frames while its helpers
#: put nothing on it, each frame goes out once no other is queued, and a
#: blocked write waits as long as the target reports taking the stream.
#: Version 5 (ABI 4.1): before its ``verdict`` the target sends ``proof``,
#: target helper 0's commit proof with the receipts it covers; the source
#: commits only once its own helpers accepted it.
#: Version 6: ``describe`` says whether the source wants the target's RAM
#: digest (``ram_digest``); without, the target hashes nothing and its
#: ``verdict`` carries an empty list and ``digest_ms`` 0 (the hashing is
#: done with the guest stopped: downtime nobody had asked for).
VERSIONS = (6,)
#: Seconds without a frame after which the source sends a KEEPALIVE frame.
STREAM_KEEPALIVE = 1.0
#: During the switchover (the guest runs nowhere) and after the target's
#: 'resumed', both sides say 'progress' every second while they work: this
#: many seconds of silence there mean a stopped peer or a cut link, not the
#: idle timeout's.
SWITCHOVER_SILENCE = 5.0
#: The target's bounds on the source's page stream (docs/migration-protocol.md,
#: "Bounds"): waiting for a frame that carries work, --idle-timeout plus this
#: per GiB of guest (a source's helpers check every page of a reset log with
#: only KEEPALIVE frames on the wire: tens of seconds at 16 GiB) ...
STREAM_STALL_PER_GIB = 10.0
#: ... and the whole stream, from 'accept' to its DONE frame.
STREAM_LIMIT = 300.0
STREAM_LIMIT_PER_GIB = 60.0
#: The slowest rate the bounds after the stream allow for hashing a RAM file.
HASH_RATE = 16 * 1024 * 1024
GIB = 1024 * 1024 * 1024


def stream_liveness(idle_timeout: float, guest_size: int, peer: str) -> Liveness:
    """The target's bounds on a source's page stream of a guest of this size."""
    gib = guest_size / GIB
    return Liveness(idle_timeout + STREAM_STALL_PER_GIB * gib, peer, "--idle-timeout plus "
                    f"{STREAM_STALL_PER_GIB:g} s per GiB of guest", total=STREAM_LIMIT + STREAM_LIMIT_PER_GIB * gib)


def hashing_bound(idle_timeout: float, guest_size: int) -> float:
    """How long a peer may take over a step that hashes its RAM file (a
    verdict, or the source's check before its commit), saying 'progress'
    meanwhile."""
    return idle_timeout + guest_size / HASH_RATE
LENGTH = struct.Struct(">I")
#: No control message comes near this; a length above it is refused unread.
MAX_MESSAGE = 16 * 1024
MAX_TEXT = 1024
#: Bytes of one target helper's challenge nonce (IMPORT_CHALLENGE).
NONCE_SIZE = 32

#: The fields each message type carries: name -> JSON type(s). Exactly these.
MESSAGE_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"protocol": str, "versions": list},
    "welcome": {"protocol": str, "version": int},
    "describe": {"guest": dict, "ram_digest": bool},
    "accept": {"device_state_port": int, "nonces": list},
    "refuse": {"field": str, "reason": str},
    "progress": {"stream_bytes": int},
    "proof": {"commit_proof": str, "receipts": list},
    "verdict": {"ok": bool, "reason": str, "private_pages": int, "shared_pages": int, "ram_digest": list,
                "digest_ms": int},
    "commit": {},
    "abort": {"reason": str},
    "resumed": {},
    "running": {"heartbeat": str},
    "error": {"phase": str, "reason": str},
}


def decode_nonces(values: list[Any], shards: int, peer: str) -> list[bytes]:
    """The target helpers' challenge nonces of an ``accept``: exactly one per
    shard, each 32 bytes as 64 lower-case hex digits (hostile input)."""
    if len(values) != shards:
        raise ProtocolError(f"the {peer} sent {len(values)} challenge nonce(s) for {shards} shard(s)")
    nonces = []
    for index, value in enumerate(values):
        if not isinstance(value, str) or len(value) != 2 * NONCE_SIZE or value.strip("0123456789abcdef"):
            raise ProtocolError(f"the {peer} sent challenge nonce {index} that is not {NONCE_SIZE} bytes "
                                f"of lower-case hex: {str(value)[:80]!r}")
        nonces.append(bytes.fromhex(value))
    return nonces


class ProtocolError(OvmfMhError):
    """The peer sent something the protocol does not allow, or went away."""

    def __init__(self, message: str, *, peer: str = "", phase: str = "") -> None:
        self.peer = peer
        self.phase = phase
        super().__init__(message)


class PeerGone(ProtocolError):
    """The connection ended, was reset, or stayed silent past the idle timeout."""


class PeerFailed(ProtocolError):
    """The peer said it failed (an ``error`` or ``abort`` message)."""


@dataclass(frozen=True)
class Message:
    type: str
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    """One JSON object, strictly: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_object,
                           parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # bool is an int in Python; the protocol keeps them apart.
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind)


def decode(data: bytes) -> Message:
    body = parse_json_object(data, "a control message")
    kind = body.pop("type", None)
    if not isinstance(kind, str) or kind not in MESSAGE_FIELDS:
        raise ProtocolError(f"unknown control message type {str(kind)[:40]!r}")
    expected = MESSAGE_FIELDS[kind]
    unknown = sorted(set(body) - set(expected))
    missing = sorted(set(expected) - set(body))
    if unknown or missing:
        raise ProtocolError(f"{kind} message: unknown field(s) {unknown}, missing field(s) {missing}")
    for name, value_type in expected.items():
        value = body[name]
        if not _is(value, value_type):
            raise ProtocolError(f"{kind} message: field {name!r} has the wrong type")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ProtocolError(f"{kind} message: field {name!r} longer than {MAX_TEXT} characters")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
            raise ProtocolError(f"{kind} message: field {name!r} out of range")
    return Message(kind, body)


def encode(kind: str, **fields: Any) -> bytes:
    if kind not in MESSAGE_FIELDS or set(fields) != set(MESSAGE_FIELDS[kind]):
        raise ValueError(f"malformed {kind} message: {sorted(fields)}")
    body = json.dumps({"type": kind, **fields}, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"{kind} message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return LENGTH.pack(len(body)) + body


#: TCP states (linux/tcp_states.h) of a connection whose peer has closed it.
_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8
_TCP_LAST_ACK = 9

#: Seconds a blocked write waits before it looks again at whether the peer
#: is still taking the stream (see _PatientSocketIO).
WRITE_SLICE = 0.5


class _PatientSocketIO(io.RawIOBase):
    """The sending side of the connection. A write that the peer does not
    take at once is not yet a silent peer: a target can be busy for many
    seconds with what the kernel's socket buffers already hold (a ZERO_RANGE
    record is 64 bytes on the wire and up to 2 MiB for its helper to check
    and zero; a buffer of them is minutes of work). So a blocked write gives
    up only when neither this side could send a byte nor the peer reported
    taking more of the stream (its ``progress`` messages) for the idle
    timeout. A write on a socket whose timeout is the idle timeout gave up
    after that many seconds however busy the peer said it was."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        # Its own descriptor, with its own timeout: the reader thread keeps
        # the idle timeout on the original. shutdown() on either cuts both.
        self._sock = channel.sock.dup()
        self._sock.settimeout(WRITE_SLICE)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        sent_at = time.monotonic()
        while True:
            try:
                return self._sock.send(view)
            except TimeoutError:
                quiet = time.monotonic() - max(sent_at, self._channel.peer_took_at)
                if quiet >= self._channel.idle_timeout:
                    raise
                # However often the peer says it took more, a write that
                # sends no byte for this long ends: a target that claims
                # progress it does not make holds nobody.
                stall = self._channel.write_stall
                if stall is not None and time.monotonic() - sent_at >= stall:
                    raise

    def close(self) -> None:
        with suppress(OSError):
            self._sock.close()
        super().close()


class MessageDeadline(TimeoutError):
    """A control message did not arrive whole in time: a peer that trickles
    a byte now and then is as gone as a silent one."""


class _DeadlineSocketIO(io.RawIOBase):
    """The receiving side of the connection. While a control message is
    read, every read waits at most until the message's deadline (its step's
    timeout from when its first byte was awaited), however often bytes
    trickle in; otherwise, and for the page stream, at most the socket's
    timeout per read, as a plain socket file would."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        sock = self._channel.sock
        deadline = self._channel.message_deadline
        liveness = self._channel.stream_liveness
        if deadline is None and liveness is not None:
            # The page stream: alive means progress (transfer/liveness.py).
            liveness.wait_readable(sock)
            received = sock.recv_into(buffer)
            liveness.bytes_since += received
            return received
        if deadline is not None:
            remaining = deadline - time.monotonic()
            readable = remaining > 0 and select.select([sock], [], [], remaining)[0]
            if not readable and self._channel.message_bytes:
                raise MessageDeadline("the message did not arrive whole in time")
            if not readable:
                raise TimeoutError("nothing arrived")
        received = sock.recv_into(buffer)
        self._channel.message_bytes += received
        return received


class Channel:
    """One control connection: messages both ways, the page stream from the
    source to the target in between. Sends are serialised (the target's
    progress messages come from their own thread). The socket's timeout is
    the idle timeout: a read that waits longer means the peer went silent;
    a write waits as long as the peer says it takes the stream
    (_PatientSocketIO)."""

    def __init__(self, sock: socket.socket, peer: str, idle_timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.phase = "the handshake"
        sock.settimeout(idle_timeout)
        # When the peer last showed it takes what this side sends: any
        # message but a progress that reports no more stream than before.
        self.peer_took_at = time.monotonic()
        self._peer_stream_bytes = -1
        # Page-stream bytes this side has handed to the writer (the source).
        self.stream_bytes_sent = 0
        # While a control message is read: when it must have arrived whole.
        self.message_deadline: float | None = None
        # Bytes that arrived since the message's first byte was awaited.
        self.message_bytes = 0
        # While the target reads the page stream: its bounds (stream_liveness).
        self.stream_liveness: Liveness | None = None
        # The source's bound on one write that sends nothing, whatever the
        # target's 'progress' claims (the target's stall bound, mirrored).
        self.write_stall: float | None = None
        # When the peer's last whole message arrived.
        self.last_message_at = time.monotonic()
        self.reader = cast(IO[bytes], io.BufferedReader(_DeadlineSocketIO(self), buffer_size=256 * 1024))
        self.writer = cast(IO[bytes], io.BufferedWriter(_PatientSocketIO(self), buffer_size=256 * 1024))
        self._send_lock = threading.Lock()

    @property
    def peer_stream_bytes(self) -> int:
        """The page-stream bytes the peer last said it took (its ``progress``);
        -1 before it said any."""
        return self._peer_stream_bytes

    def gone(self, exc: BaseException | None, timeout: float | None = None) -> PeerGone:
        if isinstance(exc, StreamStalled):
            return PeerGone(f"{exc}, during {self.phase}", peer=self.peer, phase=self.phase)
        if isinstance(exc, MessageDeadline):
            how = (f"sent no whole control message within {timeout or self.idle_timeout:g} s (bytes that "
                   "trickle in are not a message)")
        elif isinstance(exc, TimeoutError) and timeout is not None:
            how = f"did not answer within {timeout:g} s"
        elif isinstance(exc, TimeoutError):
            how = f"sent nothing and took nothing for {self.idle_timeout:g} s (--idle-timeout)"
        elif exc is None or isinstance(exc, ct.ContainerError):
            how = "closed the connection"
        else:
            how = f"broke the connection ({getattr(exc, 'strerror', None) or exc})"
        return PeerGone(f"the peer {self.peer} {how} during {self.phase}", peer=self.peer, phase=self.phase)

    def send(self, kind: str, **fields: Any) -> None:
        data = encode(kind, **fields)
        with self._send_lock:
            try:
                self.writer.write(data)
                self.writer.flush()
            except (OSError, ValueError) as exc:
                raise self.gone(exc) from exc

    def stream(self) -> IO[bytes]:
        """The page stream's sink: the writer, with a failed write said as
        the peer's (PeerGone names it and the phase) rather than as a bare
        socket error."""
        return cast(IO[bytes], _StreamSink(self))

    def receive(self, *expected: str, timeout: float | None = None) -> Message:
        """The next message, which must be one of ``expected``, or the
        peer's ``error``/``abort``, raised as PeerFailed. ``timeout``
        replaces the idle timeout for a step the peer may take long over
        without a word (starting its QEMU and helpers, say)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            return self._receive(expected, timeout)
        finally:
            if timeout is not None:
                self.sock.settimeout(self.idle_timeout)

    def _receive(self, expected: tuple[str, ...], timeout: float | None) -> Message:
        # The whole message within the step's timeout (the idle timeout
        # unless the step has its own): liveness is a message, not a byte.
        self.message_deadline = time.monotonic() + (timeout if timeout is not None else self.idle_timeout)
        self.message_bytes = 0
        try:
            (length,) = LENGTH.unpack(ct.read_exact(self.reader, LENGTH.size, "a message length"))
            if not 0 < length <= MAX_MESSAGE:
                raise ProtocolError(f"the peer {self.peer} announced a {length}-byte control message during "
                                    f"{self.phase} (at most {MAX_MESSAGE})", peer=self.peer, phase=self.phase)
            data = ct.read_exact(self.reader, length, "a control message")
        except (OSError, ValueError, ct.ContainerError) as exc:
            raise self.gone(exc, timeout) from exc
        finally:
            self.message_deadline = None
        self.last_message_at = time.monotonic()
        try:
            message = decode(data)
        except ProtocolError as exc:
            raise ProtocolError(f"the peer {self.peer} sent a malformed message during {self.phase}: {exc}",
                                peer=self.peer, phase=self.phase) from None
        if message.type != "progress" or message["stream_bytes"] > self._peer_stream_bytes:
            self.peer_took_at = time.monotonic()
            if message.type == "progress":
                self._peer_stream_bytes = message["stream_bytes"]
        if message.type in ("error", "abort") and message.type not in expected:
            theirs = f" (its phase: {message['phase']})" if message.type == "error" else ""
            raise PeerFailed(f"the peer {self.peer} failed during {self.phase}{theirs}: {message['reason']}",
                             peer=self.peer, phase=self.phase)
        if message.type not in expected:
            wanted = f"expected {' or '.join(expected)}" if expected else "where it may send nothing"
            raise ProtocolError(f"the peer {self.peer} sent {message.type!r} during {self.phase}, {wanted}: "
                                "out of order, refused", peer=self.peer, phase=self.phase)
        return message

    def peer_departed(self) -> bool:
        """Whether the peer closed or reset the connection, even with data of
        its still unread here (the kernel's TCP state says it: CLOSE_WAIT
        once its FIN arrived; a reset leaves an error pending)."""
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return True
            state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return True
        return state in (_TCP_CLOSE_WAIT, _TCP_CLOSE, _TCP_LAST_ACK)

    def close(self) -> None:
        for stream in (self.writer, self.reader):
            with suppress(OSError, ValueError):
                stream.close()
        self.abandon()
        self.sock.close()

    def abandon(self) -> None:
        """Cut the connection now (both directions), without flushing into a
        peer that may be stalled: the other side sees it at once."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _StreamSink:
    """What the exporter writes the stream to (Channel.stream)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self._channel.writer.write(data)
        except (OSError, ValueError) as exc:
            raise self._channel.gone(exc) from exc
        self._channel.stream_bytes_sent += written
        return written

    def flush(self) -> None:
        try:
            self._channel.writer.flush()
        except (OSError, ValueError) as exc:
            raise self._channel.gone(exc) from exc


def parse_address(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OvmfMhError(f"{option}: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
