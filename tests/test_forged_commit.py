"""A success a peer can forge is no success (docs/stream-format.md, "Commit
proof"): a fake target that swallows the stream and answers with a made-up
``verdict``, ``resumed`` and ``running`` never makes `ovmf-mh migrate --to`
commit (with or without the RAM comparison), and a receiver that says
``{"outcome": "ok"}`` never makes `ovmf-mh send` exit 0, unless the target
helpers' commit proof verifies in the source's own helpers.

The fake peers are scripted here; the source side is the real program with
its real guest and firmware helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from endpoints import EndpointSpec, ReferenceEndpoint

from helper import commit_proof as cp
from helper import stream as s
from host_shim.helpers.keys import read_key
from host_shim.migration import migration_protocol as mp
from host_shim.transfer import container as ct
from host_shim.transfer.pipeline import encode_challenge

pytestmark = [pytest.mark.qemu, pytest.mark.firmware]

OVMF_MH = Path(sys.executable).parent / "ovmf-mh"
PAGE = s.PAGE_SIZE


@pytest.fixture
def key(work_dir: Path) -> Path:
    path = work_dir / "transport.key"
    subprocess.run([str(OVMF_MH), "keygen", "--out", str(path)], check=True, capture_output=True)
    return path


def genuine_proof_of_another_transfer(key: bytes, shards: int) -> bytes:
    """A real commit proof (reference helpers holding the key) of another,
    earlier transfer: what a peer that recorded one could replay."""
    spec = EndpointSpec(window_size=16 * PAGE, data_size=1 << 20, transport_key=key)
    targets = [ReferenceEndpoint(spec) for _ in range(shards)]
    nonces = []
    for target in targets:
        assert target.call("IMPORT_CHALLENGE", 0, s.CHALLENGE_SIZE)[0] == 0
        nonces.append(bytes(target.data[: s.CHALLENGE_SIZE]))
    receipts = b""
    for index, target in enumerate(targets):
        source = ReferenceEndpoint(spec)
        source.data[: len(b"".join(nonces))] = b"".join(nonces)
        pieces = []
        for command, args in (("EXPORT_BEGIN", (PAGE, s.PAGE_RECORD_SIZE, 2, 0, index, shards)),
                              ("EXPORT_END", (PAGE, s.END_RECORD_SIZE))):
            status, results = source.call(command, *args)
            assert status == 0, command
            pieces.append(bytes(source.data[PAGE : PAGE + results[0]]))
        for command, blob, extra in (("IMPORT_BEGIN", pieces[0], (index, shards)), ("IMPORT_END", pieces[1], ())):
            target.data[PAGE : PAGE + len(blob)] = blob
            assert target.call(command, PAGE, len(blob), *extra)[0] == 0, command
        assert target.call("IMPORT_RECEIPT", 0, s.RECEIPT_SIZE)[0] == 0
        receipts += bytes(target.data[: s.RECEIPT_SIZE])
    targets[0].data[: len(receipts)] = receipts
    assert targets[0].call("IMPORT_COMMIT", 0, len(receipts))[0] == 0
    assert targets[0].call("IMPORT_COMMIT_PROOF", 0, cp.PROOF_SIZE)[0] == 0
    return bytes(targets[0].data[: cp.PROOF_SIZE]) + receipts


def made_up_proof(nonces: list[bytes]) -> bytes:
    """What a peer without the key can make: the right migration id, shard
    count and flags (it chose the nonces), any MAC, any receipts."""
    proof = cp.CommitProof(s.migration_id(nonces), len(nonces), s.STREAM_BOUND, os.urandom(s.DIGEST_SIZE),
                           mac=os.urandom(s.DIGEST_SIZE))
    return proof.pack() + os.urandom(len(nonces) * s.RECEIPT_SIZE)


class _Counting:
    """The connection's reader, counting the stream bytes taken."""

    def __init__(self, channel: mp.Channel) -> None:
        self.channel = channel
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.channel.reader.read(size)
        self.bytes += len(data)
        return data


class FakeTarget:
    """migrate-incoming as a hostile host would run it: it accepts, takes
    the whole stream without importing anything (no helper, no QEMU), then
    says the stream verified, with the proof ``make_proof`` gives (None: no
    ``proof`` message), and answers a commit with ``resumed`` and ``running``."""

    def __init__(self, make_proof: Callable[[list[bytes]], bytes | None]) -> None:
        self.make_proof = make_proof
        self.server = socket.create_server(("127.0.0.1", 0))
        # Takes QEMU's device state like a target QEMU would (so that a
        # source that believed the verdict gets as far as its commit).
        self.device_state = socket.create_server(("127.0.0.1", 0))
        self.device_state_bytes = 0
        self.port = self.server.getsockname()[1]
        self.heard: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        threading.Thread(target=self._swallow_device_state, daemon=True).start()

    def _swallow_device_state(self) -> None:
        with suppress(OSError):
            conn, _ = self.device_state.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    self.device_state_bytes += len(chunk)

    def _run(self) -> None:
        try:
            self.server.settimeout(300)
            sock, _ = self.server.accept()
            with sock:
                self._serve(mp.Channel(sock, "source", 120))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _serve(self, channel: mp.Channel) -> None:
        channel.receive("hello")
        channel.send("welcome", protocol=mp.PROTOCOL, version=mp.VERSIONS[-1])
        shards = channel.receive("describe")["guest"]["shards"]
        nonces = [os.urandom(s.CHALLENGE_SIZE) for _ in range(shards)]
        channel.send("accept", device_state_port=self.device_state.getsockname()[1],
                     nonces=[n.hex() for n in nonces])
        reader = _Counting(channel)
        done = threading.Event()

        def progress() -> None:  # as the real target: the stream taken, at once and every second
            said = -1
            while not done.wait(0.02):
                if reader.bytes != said:
                    said = reader.bytes
                    with suppress(mp.ProtocolError):
                        channel.send("progress", stream_bytes=said)

        talker = threading.Thread(target=progress, daemon=True)
        talker.start()
        header = ct.read_file_header(reader)
        private = 0
        for frame in ct.read_frames(reader, header.shards):
            if frame.kind == ct.KIND_DONE:
                private = ct.Totals.decode(bytes(frame.payload)).private_pages
                break
        done.set()
        talker.join()
        proof = self.make_proof(nonces)
        if proof is not None:
            channel.send("proof", commit_proof=proof[: cp.PROOF_SIZE].hex(),
                         receipts=[proof[i : i + s.RECEIPT_SIZE].hex()
                                   for i in range(cp.PROOF_SIZE, len(proof), s.RECEIPT_SIZE)])
        channel.send("verdict", ok=True, reason="", private_pages=private, shared_pages=0,
                     ram_digest=["00" * 8] * 256, digest_ms=1)
        while True:
            message = channel.receive("progress", "commit", "abort")
            self.heard.append(message.type)
            if message.type == "abort":
                return
            if message.type == "commit":
                channel.send("resumed")
                channel.send("running", heartbeat="ovmf-mh heartbeat 1")
                return

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self.server.close()
        self.device_state.close()


def _run(argv: list[str], work: Path, name: str, timeout: float) -> tuple[int, str, str]:
    with (work / f"{name}.stdout").open("wb") as out, (work / f"{name}.stderr").open("wb") as err:
        proc = subprocess.Popen([str(OVMF_MH), *argv], stdout=out, stderr=err)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    return code, (work / f"{name}.stdout").read_text(), (work / f"{name}.stderr").read_text()


FAKES: dict[str, Callable[[bytes], Callable[[list[bytes]], bytes | None]]] = {
    "no proof": lambda key: lambda nonces: None,
    "made-up proof": lambda key: made_up_proof,
    "replayed proof": lambda key: lambda nonces: genuine_proof_of_another_transfer(key, len(nonces)),
}


@pytest.mark.parametrize("fake", list(FAKES))
def test_a_fake_target_never_makes_the_source_commit(firmware: Path, work_dir: Path, key: Path, ram_dir: Path,
                                                      fake: str) -> None:
    """Without the RAM comparison (which a real host cannot make) the
    source's only ground to commit is the proof: refused, the source guest
    resumes and keeps running, exit 1, and the fake hears ``abort``."""
    target = FakeTarget(FAKES[fake](read_key(key)))
    try:
        code, out, err = _run(["migrate", "--to", f"127.0.0.1:{target.port}", "--key", str(key), "--work-dir",
                               str(work_dir / "source"), "--ram-dir", str(ram_dir), "--helpers", "1", "--json",
                               "--idle-timeout", "30", "--no-progress", "--switchover", "full-check",
                               "--no-verify-ram"], work_dir, "migrate", timeout=600)
        target.join(30)
    finally:
        target.close()
    assert target.error is None, f"the fake target failed: {target.error}"
    assert code == 1, err
    report: dict[str, Any] = json.loads(out)
    assert report["outcome"] == "failed"
    assert "commit proof" in report["error"], report["error"]
    assert report["guest_state"] == "running on source", report
    assert report["source_heartbeat_after_failure"], report
    assert "commit" not in target.heard and target.heard[-1] == "abort", target.heard
    assert target.device_state_bytes == 0, "the device state moved to a target that proved nothing"


class FakeReceiver:
    """`ovmf-mh receive` as a man in the middle would answer: it challenges
    the sender, takes the whole stream (nothing imported: a record the real
    receiver refused is as good as none), and says ``{"outcome": "ok"}``
    with the commit proof ``make_proof`` gives (None: none at all)."""

    def __init__(self, guest_size: int, make_proof: Callable[[list[bytes]], bytes | None]) -> None:
        self.guest_size = guest_size
        self.make_proof = make_proof
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.server.settimeout(300)
            sock, _ = self.server.accept()
            with sock, sock.makefile("rb") as reader:
                header = ct.read_file_header(reader)
                nonces = [os.urandom(s.CHALLENGE_SIZE) for _ in range(header.shards)]
                sock.sendall(encode_challenge(nonces, self.guest_size))
                while reader.read(1 << 16):
                    pass
                verdict: dict[str, Any] = {"outcome": "ok"}
                proof = self.make_proof(nonces)
                if proof is not None:
                    verdict["commit_proof"] = proof.hex()
                sock.sendall(json.dumps(verdict).encode())
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.mark.parametrize("fake", list(FAKES))
def test_send_never_believes_a_forged_ok(firmware: Path, work_dir: Path, key: Path, fake: str) -> None:
    ram = work_dir / "guest.ram"
    with ram.open("wb") as f:
        f.write(os.urandom(64 * PAGE))
        f.truncate(4 << 20)
    receiver = FakeReceiver(ram.stat().st_size, FAKES[fake](read_key(key)))
    code, out, err = _run(["send", "--ram", str(ram), "--key", str(key), "--to", f"127.0.0.1:{receiver.port}",
                           "--helpers", "1", "--work-dir", str(work_dir / "send"), "--json"], work_dir, "send",
                          timeout=300)
    receiver.join(30)
    receiver.server.close()
    assert receiver.error is None, f"the fake receiver failed: {receiver.error}"
    assert code == 1, out + err
    summary = json.loads(out)
    assert summary["outcome"] == "failed" and "commit proof" in summary["error"], summary
