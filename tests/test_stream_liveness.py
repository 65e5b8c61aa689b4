"""A live migration's stream says the source is alive, and a busy target is
not taken for a silent one (no QEMU: host-core helpers and socket pairs).

A 4 GiB guest's first pass used to fail both ways: its zero ranges kept
the source helper busy for seconds per few KB of stream, which stayed in
the source's socket buffer, so the target heard nothing for its idle
timeout; and the target, checking and zeroing up to 2 MiB per 64-byte
ZERO_RANGE record, read nothing for the idle timeout while its socket
buffer held minutes of work, so the source's blocked write gave up.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, cast

import numpy as np
import pytest

from host_shim.migration import migration_protocol as mp
from host_shim.transfer import container as ct
from host_shim.transfer.pipeline import Exporter, import_ram

PAGE = 4096
#: Seconds a hold in these tests waits for what it expects before failing.
HOLD = 30.0


class RecordingSink(io.RawIOBase):
    """A sink that records what was flushed, and when a KEEPALIVE arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.flushed = 0
        self.changed = threading.Condition()

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        with self.changed:
            self.data += view
            self.changed.notify_all()
        return len(view)

    def flush(self) -> None:
        with self.changed:
            self.flushed = len(self.data)
            self.changed.notify_all()

    def wait(self, predicate: object, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout=HOLD):  # type: ignore[arg-type]
                pytest.fail(f"no {what} within {HOLD:.0f} s")


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(kind, end offset) of each frame after the file header."""
    out = []
    at = ct.FILE_HEADER.size
    while at < len(data):
        kind, _, length = ct.FRAME_HEADER.unpack_from(data, at)
        at += ct.FRAME_HEADER.size + length
        out.append((kind, at))
    return out


def test_frames_go_out_at_once_and_keepalives_fill_a_busy_helpers_silence(tmp_path: Path) -> None:
    src = tmp_path / "src.ram"
    src.write_bytes(os.urandom(4 * 512 * PAGE))  # 4 batches of written pages
    key = os.urandom(32)
    sink = RecordingSink()
    batches = [0]

    def hold(_pages: object) -> None:
        # The helper is "busy" until everything before this batch is on its
        # way (flushed) and a KEEPALIVE frame followed it: nothing else
        # would tell a peer that this side is still there.
        if batches[0]:
            end = len(sink.data)
            sink.wait(lambda: sink.flushed >= end, "flush of the frames already written")
            sink.wait(lambda: any(k == ct.KIND_KEEPALIVE and at > end for k, at in _frames(bytes(sink.data))),
                      "KEEPALIVE frame while the helper is busy")
        batches[0] += 1

    with Exporter(src, key, cast(IO[bytes], sink), kind="host-core", helpers=1, work_dir=tmp_path / "export",
                  keepalive=0.05) as ex:
        ex.send(np.arange(4 * 512, dtype=np.uint64), before_batch=hold)
        ex.finish()
    frames = _frames(bytes(sink.data))
    assert batches[0] == 4
    assert sum(k == ct.KIND_KEEPALIVE for k, _ in frames) >= 3
    assert frames[-1][0] == ct.KIND_DONE
    # The target skips them: the import is the source, byte for byte.
    dst = tmp_path / "dst.ram"
    summary = import_ram(dst, key, io.BytesIO(bytes(sink.data)), kind="host-core", work_dir=tmp_path / "import",
                         progress=False)
    assert summary.private_pages == 4 * 512
    assert dst.read_bytes() == src.read_bytes()


def test_a_file_export_sends_no_keepalive(tmp_path: Path) -> None:
    src = tmp_path / "src.ram"
    src.write_bytes(os.urandom(512 * PAGE))
    sink = RecordingSink()
    with Exporter(src, os.urandom(32), cast(IO[bytes], sink), kind="host-core", helpers=1,
                  work_dir=tmp_path / "export") as ex:
        ex.send(np.arange(512, dtype=np.uint64), before_batch=lambda _pages: time.sleep(0.3))
        ex.finish()
    assert all(k != ct.KIND_KEEPALIVE for k, _ in _frames(bytes(sink.data)))


def _busy_target(peer: socket.socket, advance: bool, release: threading.Event) -> None:
    """A target that reads nothing until ``release`` but says every 0.1 s
    that it is alive: with ``advance``, its stream_bytes grow (it is taking
    the stream, as a target working through a backlog does); without, they
    stay put. Then it reads whatever comes until the end."""
    channel = mp.Channel(peer, "source", 60)
    taken = 0
    while not release.wait(0.1):
        taken += 1 if advance else 0
        try:
            channel.send("progress", stream_bytes=taken)
        except mp.PeerGone:
            return
    with peer:
        while peer.recv(1 << 20):
            pass


@pytest.mark.parametrize("advance", [True, False], ids=["target-taking-the-stream", "target-taking-nothing"])
def test_a_blocked_write_waits_for_a_busy_target_and_gives_up_on_a_stuck_one(advance: bool) -> None:
    ours, theirs = socket.socketpair()
    release = threading.Event()
    target = threading.Thread(target=_busy_target, args=(theirs, advance, release), daemon=True)
    target.start()
    channel = mp.Channel(ours, "target", idle_timeout=1.0)
    channel.phase = "pre-copy pass 1"

    def listen() -> None:
        try:
            while True:
                channel.receive("progress")
        except mp.ProtocolError:
            return

    threading.Thread(target=listen, daemon=True).start()
    stream = channel.stream()
    chunk = os.urandom(1 << 20)
    returned_after_release: list[bool] = []
    failure: mp.PeerGone | None = None
    # The target reads again once the idle timeout has passed three times.
    timer = threading.Timer(3 * channel.idle_timeout, release.set)
    timer.start()
    try:
        # More than the socket buffers hold: the write blocks until then.
        stream.write(chunk)
        returned_after_release.append(release.is_set())
        stream.flush()
    except mp.PeerGone as exc:
        failure = exc
    finally:
        timer.cancel()
        release.set()
        channel.close()
        target.join(timeout=HOLD)
    if advance:
        assert failure is None, failure
        assert returned_after_release == [True], "the write did not block: the test held nothing"

    else:
        assert failure is not None, "a target that took nothing for the idle timeout was waited for"
        assert "sent nothing and took nothing for 1 s" in str(failure) and "pre-copy pass 1" in str(failure)


# --- liveness is progress: a receiver's bound against a sender that only pretends --------

OVMF_MH = Path(sys.executable).parent / "ovmf-mh"
#: The receiver's --idle-timeout in these tests, and the slack its end may take
#: beyond it (stopping its helper, writing its verdict) on a loaded machine.
IDLE = 5.0
SLACK = 5.0


def _pretending_sender(port: int, style: str, stop: threading.Event) -> float:
    """A sender that sends a good file header, takes the receiver's
    challenge, and then only pretends: an empty KEEPALIVE frame every 2 s,
    or a frame header one byte every 2 s. Returns when the receiver hung up
    (the time of the challenge's arrival is when the receiver's clock runs)."""
    from host_shim.transfer.pipeline import read_challenge

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(ct.FileHeader(256 * PAGE, 1).encode())
        reader = sock.makefile("rb", buffering=0)
        read_challenge(cast(IO[bytes], reader))
        challenged = time.monotonic()
        keepalive = ct.FRAME_HEADER.pack(ct.KIND_KEEPALIVE, 0, 0)
        trickle = iter(ct.FRAME_HEADER.pack(ct.KIND_RECORDS, 0, 4096))
        sock.settimeout(2.0)
        while not stop.is_set():
            try:
                if sock.recv(4096) == b"":
                    break  # the receiver hung up (its verdict came first)
            except TimeoutError:
                pass
            except OSError:
                break
            try:
                sock.sendall(keepalive if style == "keepalive" else bytes([next(trickle, 0)]))
            except OSError:
                break
        return challenged


@pytest.mark.parametrize("style", ["keepalive", "trickle"])
def test_receive_ends_a_sender_that_sends_no_progress_within_its_idle_timeout(tmp_path: Path, style: str) -> None:
    """`receive --idle-timeout 5` was held for as long as the sender liked by
    an empty KEEPALIVE every 2 s, or one byte every 2 s: neither is progress.
    It now ends within the idle timeout (plus its own stopping), names the
    sender and the bound, and keeps nothing."""
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    dst = tmp_path / "dst.ram"
    receiver = subprocess.Popen(
        [str(OVMF_MH), "receive", "--ram", str(dst), "--key", str(key), "--listen", "127.0.0.1:0",
         "--helper", "host-core", "--idle-timeout", str(IDLE), "--work-dir", str(tmp_path / "recv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        assert receiver.stderr is not None
        line = receiver.stderr.readline()
        port = int(line.rsplit(":", 1)[1])
        challenged = _pretending_sender(port, style, stop)
        code = receiver.wait(timeout=IDLE + SLACK + 60)
        ended = time.monotonic() - challenged
        err = receiver.stderr.read()
    finally:
        stop.set()
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    print(f"receive against a {style} sender ended {ended:.2f} s after its challenge: {err.strip()[-300:]}")
    assert code == 1, err
    assert "made no progress for 5 s (--idle-timeout)" in err, err
    assert ended < IDLE + SLACK, f"receive took {ended:.2f} s (bound: --idle-timeout {IDLE:g} s + {SLACK:g} s)"
    assert not dst.exists() or dst.stat().st_size == 0


def test_a_flood_of_frames_that_carry_no_work_does_not_hold_the_receiver() -> None:
    """KEEPALIVE frames (or empty RECORDS frames) sent as fast as the link
    allows never make the receiver wait, so the waiting clock alone would
    not end them: past twice the stall bound of wall-clock time since the
    last progress, such a frame ends the stream."""
    from host_shim.transfer.liveness import Liveness, StreamStalled

    liveness = Liveness(0.2, "sender test", "--idle-timeout")
    started = time.monotonic()
    with pytest.raises(StreamStalled, match="made no progress"):
        while time.monotonic() - started < 5:
            liveness.on_frame(ct.KIND_KEEPALIVE, 0)
            liveness.on_frame(ct.KIND_RECORDS, 0)
    assert 0.4 <= time.monotonic() - started < 1.0
    # A frame that carries work restarts the clock.
    liveness.on_frame(ct.KIND_RECORDS, 64)
    liveness.on_frame(ct.KIND_KEEPALIVE, 0)


def test_data_waiting_is_taken_whatever_this_side_was_busy_with() -> None:
    """Time this side spent on its own work (or stopped, SIGSTOP) with the
    peer's data waiting is not the peer's silence; waiting with nothing
    there is, and ends at the bound."""
    from host_shim.transfer.liveness import Liveness, StreamStalled

    ours, theirs = socket.socketpair()
    with ours, theirs:
        liveness = Liveness(0.3, "sender test", "--idle-timeout")
        liveness.waited = 10.0  # far past the bound: as after a long stop
        theirs.sendall(b"x")
        liveness.wait_readable(ours)  # returns: the data is there
        assert ours.recv(1) == b"x"
        started = time.monotonic()
        with pytest.raises(StreamStalled, match=r"sent nothing for 0\.3 s"):
            liveness.wait_readable(ours)
        assert time.monotonic() - started < 0.1  # the budget was spent already
        liveness.progressed()
        started = time.monotonic()
        with pytest.raises(StreamStalled):
            liveness.wait_readable(ours)
        assert 0.25 < time.monotonic() - started < 1.0


def test_a_target_claiming_progress_it_does_not_make_holds_no_write() -> None:
    """A target that reads nothing but reports one byte more taken every
    0.3 s kept the source's blocked write patient for as long as it liked
    (each claim restarts the idle timeout). The write now ends after the
    channel's write stall bound (the target's own stall bound, mirrored)
    without a byte sent, whatever the claims."""
    ours, theirs = socket.socketpair()
    channel = mp.Channel(ours, "target", idle_timeout=1.0)
    channel.write_stall = 2.0
    channel.phase = "pre-copy pass 1"
    stop = threading.Event()

    def lie() -> None:
        taken = 0
        while not stop.wait(0.3):
            taken += 1
            with contextlib.suppress(OSError):
                theirs.sendall(mp.encode("progress", stream_bytes=taken))

    def listen() -> None:
        with contextlib.suppress(mp.ProtocolError):
            while True:
                channel.receive("progress")

    threading.Thread(target=lie, daemon=True).start()
    threading.Thread(target=listen, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(mp.PeerGone):
            stream = channel.stream()
            stream.write(os.urandom(8 << 20))
            stream.flush()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        channel.close()
        theirs.close()
    assert 2.0 <= elapsed < 2.0 + 2.0, elapsed
