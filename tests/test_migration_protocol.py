"""The two-host migration's control connection and guest description,
without QEMU: hostile descriptions and malformed messages are refused with
the field or the reason named (docs/migration-protocol.md)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from host_shim.migration import migrate as migrate_module
from host_shim.migration import migration_protocol as mp
from host_shim.migration.guest_description import DescriptionError, device_model, firmware_digest, validate
from host_shim.migration.migrate import MigrationConfig
from host_shim.migration.migrate_target import TargetConfig, TargetReport, run_target
from host_shim.migration.migration_vm import MigrationError
from host_shim.vm.devices import NicBackend

DIGEST = "ab" * 32


def _good() -> dict[str, Any]:
    return {"guest": "ovmf-mh-test-guest", "machine": "q35", "accel": "tcg", "cpu": "max", "memory_mib": 256,
            "workload_mib": 64, "shards": 1, "firmware_sha256": DIGEST, "vcpus": 1, "devices": []}


DISK = {"type": "virtio-blk-pci", "format": "qcow2", "size": 1 << 30}
NIC = {"type": "virtio-net-pci", "mac": "52:54:00:12:34:56"}


def _debian() -> dict[str, Any]:
    return _good() | {"guest": "debian-12", "memory_mib": 512, "vcpus": 2,
                      "devices": [dict(DISK), dict(NIC), {"type": "virtio-rng-pci"}, {"type": "serial"},
                                  {"type": "isa-debugcon"}]}


def test_a_good_description_is_accepted_as_sent() -> None:
    description = validate(_good(), firmware_sha256=DIGEST, shards=1)
    assert description.as_json() == _good()


HOSTILE: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown field", {"extra_args": ["-monitor", "stdio"]}, "extra_args", "unknown field"),
    ("shell in the machine", {"machine": "q35; rm -rf /"}, "machine", "not one of q35"),
    ("another accelerator", {"accel": "kvm"}, "accel", "not one of tcg"),
    ("another CPU", {"cpu": "host"}, "cpu", "not one of max"),
    ("another guest", {"guest": "/etc/passwd"}, "guest", "not one of"),
    ("memory as text", {"memory_mib": "256"}, "memory_mib", "must be an integer"),
    ("memory as a boolean", {"memory_mib": True}, "memory_mib", "must be an integer"),
    ("memory as a float", {"memory_mib": 256.0}, "memory_mib", "must be an integer"),
    ("too little memory", {"memory_mib": 16}, "memory_mib", "outside 256..16384"),
    ("huge memory", {"memory_mib": 2**62}, "memory_mib", "outside 256..16384"),
    ("negative workload", {"workload_mib": -1}, "workload_mib", "outside 1..128"),
    ("workload over half", {"workload_mib": 129}, "workload_mib", "outside 1..128"),
    ("shards out of range", {"shards": 65}, "shards", "outside 1..64"),
    ("shards not the target's", {"shards": 2}, "shards", "this target runs 1 helper(s)"),
    ("digest not hex", {"firmware_sha256": "../../" + "a" * 58}, "firmware_sha256", "hexadecimal"),
    ("digest upper case", {"firmware_sha256": "AB" * 32}, "firmware_sha256", "hexadecimal"),
    ("other firmware", {"firmware_sha256": "cd" * 32}, "firmware_sha256", "device state would not fit"),
    ("machine as a list", {"machine": ["q35"]}, "machine", "list is not one of"),
]


@pytest.mark.parametrize(("change", "field", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_descriptions_are_refused_naming_the_field(change: dict[str, Any], field: str, reason: str) -> None:
    body = _good() | change
    with pytest.raises(DescriptionError) as caught:
        validate(body, firmware_sha256=DIGEST, shards=1)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_a_debian_description_with_the_allowed_devices_is_accepted() -> None:
    description = validate(_debian(), firmware_sha256=DIGEST, shards=1)
    assert description.as_json() == _debian()
    assert description.device("virtio-net-pci") == NIC


DEBIAN_HOSTILE: list[tuple[str, dict[str, Any], str, str]] = [
    ("no vCPU", {"vcpus": 0}, "vcpus", "outside 1..8"),
    ("too many vCPUs", {"vcpus": 9}, "vcpus", "outside 1..8"),
    ("vCPUs as text", {"vcpus": "2"}, "vcpus", "must be an integer"),
    ("devices not a list", {"devices": {"type": "virtio-rng-pci"}}, "devices", "must be a list"),
    ("a device not an object", {"devices": [DISK, "virtio-rng-pci"]}, "devices[1]", "must be an object"),
    ("an unknown device", {"devices": [DISK, {"type": "vfio-pci"}]}, "devices[1].type",
     "device 'vfio-pci' is not on this target's allow-list"),
    ("a device with no type", {"devices": [DISK, {"mac": "52:54:00:00:00:01"}]}, "devices[1].type",
     "NoneType is not on this target's allow-list"),
    ("a path in the disk", {"devices": [DISK | {"file": "/etc/shadow"}]}, "devices[0].file",
     "unknown field of a virtio-blk-pci"),
    ("a disk with no size", {"devices": [{"type": "virtio-blk-pci", "format": "raw"}]}, "devices[0].size",
     "missing"),
    ("a disk format QEMU probes", {"devices": [DISK | {"format": "vmdk"}]}, "devices[0].format",
     "must be one of raw, qcow2"),
    ("a disk of negative size", {"devices": [DISK | {"size": -1}]}, "devices[0].size", "must be an integer"),
    ("a second disk", {"devices": [DISK, DISK]}, "devices[1].type", "a second virtio-blk-pci"),
    ("no disk", {"devices": [NIC]}, "devices", "boots from its disk"),
    ("a netdev in the NIC", {"devices": [DISK, NIC | {"netdev": "bridge,br=br0"}]}, "devices[1].netdev",
     "unknown field of a virtio-net-pci"),
    ("a multicast MAC", {"devices": [DISK, NIC | {"mac": "01:00:5e:00:00:01"}]}, "devices[1].mac", "unicast"),
    ("a MAC with options", {"devices": [DISK, NIC | {"mac": "52:54:00:12:34:56,romfile=/x"}]},
     "devices[1].mac", "unicast"),
    ("too many devices", {"devices": [{"type": "serial"}] * 6}, "devices", "at most 5"),
]


@pytest.mark.parametrize(("change", "field", "reason"), [h[1:] for h in DEBIAN_HOSTILE],
                         ids=[h[0] for h in DEBIAN_HOSTILE])
def test_hostile_device_models_are_refused_naming_the_field(change: dict[str, Any], field: str,
                                                            reason: str) -> None:
    with pytest.raises(DescriptionError) as caught:
        validate(_debian() | change, firmware_sha256=DIGEST, shards=1)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_the_test_guest_has_one_vcpu_and_no_virtio_device() -> None:
    with pytest.raises(DescriptionError, match=re.escape("'vcpus': 2 is outside 1..1")):
        validate(_good() | {"vcpus": 2}, firmware_sha256=DIGEST, shards=1)
    with pytest.raises(DescriptionError, match="the test guest has no virtio-net-pci"):
        validate(_good() | {"devices": [NIC]}, firmware_sha256=DIGEST, shards=1)


def test_the_target_builds_its_devices_from_its_own_disk_and_nic(tmp_path: Path) -> None:
    description = validate(_debian(), firmware_sha256=DIGEST, shards=1)
    own_disk = tmp_path / "shared" / "disk.qcow2"
    model = device_model(description, own_disk, NicBackend("tap", "omh-tap1"))
    argv = " ".join(model.qemu_args())
    assert f"file={own_disk},format=qcow2" in argv and "mac=52:54:00:12:34:56,netdev=net0" in argv
    assert "ifname=omh-tap1" in argv and "-smp 2" in argv and "virtio-rng-pci" in argv
    with pytest.raises(DescriptionError, match="given none"):
        device_model(description, None, NicBackend())


@pytest.mark.parametrize("missing", sorted(_good()))
def test_every_field_is_required(missing: str) -> None:
    body = _good()
    del body[missing]
    with pytest.raises(DescriptionError) as caught:
        validate(body, firmware_sha256=DIGEST, shards=1)
    assert (caught.value.field, caught.value.reason) == (missing, "missing")


def test_messages_round_trip() -> None:
    data = mp.encode("verdict", ok=True, reason="", private_pages=3, shared_pages=0, ram_digest=["00"],
                     digest_ms=5)
    (length,) = mp.LENGTH.unpack(data[:4])
    assert length == len(data) - 4
    message = mp.decode(data[4:])
    assert message.type == "verdict" and message["private_pages"] == 3


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not JSON", b"\xff\xfe", "not valid JSON"),
    ("a list", b"[1]", "not a JSON object"),
    ("duplicate key", b'{"type":"accept","device_state_port":1,"device_state_port":2}', "duplicate key"),
    ("NaN", b'{"type":"progress","stream_bytes":NaN}', "not allowed"),
    ("unknown type", b'{"type":"exec"}', "unknown control message type"),
    ("no type", b'{"pages":1}', "unknown control message type"),
    ("extra field", b'{"type":"commit","then":"rm"}', "unknown field(s) ['then']"),
    ("missing field", b'{"type":"accept"}', "missing field(s) ['device_state_port', 'nonces']"),
    ("wrong type", b'{"type":"accept","device_state_port":"22","nonces":[]}', "wrong type"),
    ("bool for int", b'{"type":"accept","device_state_port":true,"nonces":[]}', "wrong type"),
    ("negative", b'{"type":"progress","stream_bytes":-1}', "out of range"),
    ("long text", json.dumps({"type": "abort", "reason": "x" * 5000}).encode(), "longer than"),
    ("deep nesting", b'{"type":"describe","guest":' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),
]


@pytest.mark.parametrize(("data", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(mp.ProtocolError, match=None) as caught:
        mp.decode(data)
    assert reason in str(caught.value)


def _pair(idle: float = 5.0) -> tuple[mp.Channel, socket.socket]:
    ours, theirs = socket.socketpair()
    return mp.Channel(ours, "peer test", idle), theirs


def test_an_oversized_length_is_refused_before_reading() -> None:
    channel, peer = _pair()
    with peer:
        peer.sendall(mp.LENGTH.pack(1 << 30))
        with pytest.raises(mp.ProtocolError, match="announced a 1073741824-byte control message"):
            channel.receive("hello")
    channel.close()


def test_an_unexpected_message_names_what_was_expected() -> None:
    channel, peer = _pair()
    with peer:
        peer.sendall(mp.encode("commit"))
        channel.phase = "pre-copy"
        with pytest.raises(mp.ProtocolError, match="sent 'commit' during pre-copy, expected verdict"):
            channel.receive("verdict")
    channel.close()


def test_the_peers_error_is_raised_with_its_reason() -> None:
    channel, peer = _pair()
    with peer:
        peer.sendall(mp.encode("error", phase="pre-copy", reason="helper 0 exited"))
        expected = r"failed during the handshake \(its phase: pre-copy\): helper 0 exited"
        with pytest.raises(mp.PeerFailed, match=expected):
            channel.receive("verdict")
    channel.close()


def test_a_closed_connection_names_the_peer_and_the_phase() -> None:
    channel, peer = _pair()
    peer.close()
    channel.phase = "switchover"
    with pytest.raises(mp.PeerGone, match="the peer peer test closed the connection during switchover"):
        channel.receive("commit")
    channel.close()


def test_a_silent_peer_is_gone_after_the_idle_timeout() -> None:
    channel, peer = _pair(idle=0.2)
    with peer, pytest.raises(mp.PeerGone, match=r"sent nothing and took nothing for 0.2 s"):
        channel.receive("progress")
    channel.close()


def _run_target_against(tmp_path: Path, talk: Any) -> tuple[TargetReport, Any]:
    """run_target in a thread, a scripted source talking to it; no QEMU is
    ever started unless the description is accepted."""
    image = tmp_path / "image.fd"
    image.write_bytes(b"not really firmware")
    address: list[tuple[str, int]] = []
    listening = threading.Event()

    def on_listening(bound: tuple[str, int]) -> None:
        address.append(bound)
        listening.set()

    config = TargetConfig(image=image, work_dir=tmp_path / "target", key=bytes(32), idle_timeout=5,
                          accept_timeout=10, keep_running=False, on_listening=on_listening)
    reports: list[TargetReport] = []
    thread = threading.Thread(target=lambda: reports.append(run_target(config)), daemon=True)
    thread.start()
    assert listening.wait(10)
    with socket.create_connection(address[0], timeout=10) as sock:
        channel = mp.Channel(sock, "target", 5)
        answer = talk(channel, firmware_digest(image))
    thread.join(timeout=20)
    assert reports, "the target role did not end"
    return reports[0], answer


def test_the_target_refuses_a_hostile_description_and_starts_nothing(tmp_path: Path) -> None:
    def talk(channel: mp.Channel, digest: str) -> mp.Message:
        channel.send("hello", protocol=mp.PROTOCOL, versions=[6, 7])
        assert channel.receive("welcome")["version"] == 6
        channel.send("describe", guest=_good() | {"firmware_sha256": digest, "machine": "pc; reboot"},
                     ram_digest=True)
        return channel.receive("refuse")

    report, answer = _run_target_against(tmp_path, talk)
    assert answer["field"] == "machine" and "not one of q35" in answer["reason"]
    assert report.outcome == "failed"
    assert report.error is not None and "'machine'" in report.error
    assert report.phase.startswith("the guest description")
    assert report.guest_state == "not started"
    assert not (tmp_path / "target" / "target").exists(), "a QEMU work folder was made"


def test_the_target_refuses_a_source_without_a_common_version(tmp_path: Path) -> None:
    def talk(channel: mp.Channel, digest: str) -> mp.Message:
        channel.send("hello", protocol=mp.PROTOCOL, versions=[1, 2, 3, 4, 5])  # before describe's ram_digest
        return channel.receive("error")

    report, answer = _run_target_against(tmp_path, talk)
    assert "versions [1, 2, 3, 4, 5]" in answer["reason"] and answer["phase"] == "the handshake"
    assert report.outcome == "failed" and report.peer.startswith("127.0.0.1:")


def test_the_target_drops_a_source_that_sends_garbage(tmp_path: Path) -> None:
    def talk(channel: mp.Channel, digest: str) -> bytes:
        channel.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return channel.sock.recv(100)

    report, _ = _run_target_against(tmp_path, talk)
    assert report.outcome == "failed"
    assert report.error is not None and "control message" in report.error


def test_a_step_with_its_own_timeout_says_so_and_the_idle_timeout_returns() -> None:
    channel, peer = _pair(idle=7.0)
    with peer, pytest.raises(mp.PeerGone, match=r"did not answer within 0.2 s"):
        channel.receive("accept", timeout=0.2)
    assert channel.sock.gettimeout() == 7.0
    channel.close()


def test_the_one_machine_demo_ends_its_target_role_when_the_source_never_connects(tmp_path: Path) -> None:
    """The source role fails before it connects (no firmware image): the
    target role, waiting in accept in a thread, ends with it at once
    instead of after --accept-timeout."""
    from host_shim.errors import OvmfMhError
    from host_shim.migration.migrate import MigrationConfig, migrate

    started = time.monotonic()
    with pytest.raises(OvmfMhError, match="not found"):
        migrate(MigrationConfig(image=tmp_path / "missing.fd", work_dir=tmp_path / "work", progress=False))
    assert time.monotonic() - started < 30
    assert not [t for t in threading.enumerate() if t.name == "migrate-target"]


NONCE = "ab" * 32


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ([], "0 challenge nonce(s) for 2 shard(s)"),
        ([NONCE, NONCE, NONCE], "3 challenge nonce(s) for 2 shard(s)"),
        ([NONCE, "ab" * 31], "challenge nonce 1 that is not 32 bytes"),
        ([NONCE, "AB" * 32], "challenge nonce 1 that is not 32 bytes"),
        ([NONCE, "zz" * 32], "challenge nonce 1 that is not 32 bytes"),
        ([NONCE, 7], "challenge nonce 1 that is not 32 bytes"),
    ],
    ids=["none", "one too many", "short", "upper case", "not hex", "not a string"],
)
def test_the_source_refuses_hostile_challenge_nonces(values: list[object], reason: str) -> None:
    with pytest.raises(mp.ProtocolError, match=re.escape(reason)):
        mp.decode_nonces(values, 2, "target 127.0.0.1:1")


def test_the_source_takes_one_nonce_per_shard() -> None:
    assert mp.decode_nonces([NONCE, "01" * 32], 2, "target") == [bytes.fromhex(NONCE), bytes([1]) * 32]


def test_the_ram_digest_reads_only_written_memory_and_agrees_across_hole_layouts(tmp_path: Path) -> None:
    """Two RAM files with the same bytes have the same digests though one
    holds written zeros where the other has a hole; one byte changed
    changes exactly its part's digest."""
    from host_shim.migration.migration_vm import DIGEST_PARTS, ram_digest

    size = 1 << 30
    files = [tmp_path / "a.ram", tmp_path / "b.ram"]
    for path in files:
        with path.open("wb") as f:
            f.truncate(size)
            f.seek(size - 5000)
            f.write(b"last part")
    with files[1].open("r+b") as f:
        f.seek(10 << 20)
        f.write(bytes(1 << 20))  # zeros, written: data here, a hole in a.ram
    assert ram_digest(files[0], size) == ram_digest(files[1], size)
    with files[1].open("r+b") as f:
        f.seek(size // 2 + 7)
        f.write(b"\1")
    changed = [i for i, (a, b) in enumerate(zip(ram_digest(files[0], size), ram_digest(files[1], size),
                                                 strict=True)) if a != b]
    assert changed == [DIGEST_PARTS // 2]


# --- bounded waits and messages out of order (hostile peers, no QEMU) ----------------------


def _trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """Send ``data`` one byte every ``every`` seconds until done or stopped."""
    def run() -> None:
        for byte in data:
            if stop.wait(every):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_message_that_trickles_in_ends_within_the_idle_timeout() -> None:
    """One byte every 0.2 s keeps no read waiting past 0.2 s, but the whole
    message must arrive within the idle timeout (1 s): a peer that trickles
    is gone as a silent one is."""
    channel, peer = _pair(idle=1.0)
    stop = threading.Event()
    with peer:
        _trickle(peer, mp.encode("hello", protocol=mp.PROTOCOL, versions=list(mp.VERSIONS)), 0.2, stop)
        started = time.monotonic()
        with pytest.raises(mp.PeerGone, match=r"sent no whole control message within 1 s"):
            channel.receive("hello")
        elapsed = time.monotonic() - started
        stop.set()
    channel.close()
    assert 0.9 < elapsed < 1.0 + 1.0, elapsed


def test_a_message_that_comes_whole_in_time_is_read_however_it_is_cut() -> None:
    channel, peer = _pair(idle=3.0)
    stop = threading.Event()
    with peer:
        data = mp.encode("progress", stream_bytes=7)
        _trickle(peer, data, 0.01, stop).join()
        assert channel.receive("progress")["stream_bytes"] == 7
    channel.close()


def test_the_target_ends_a_handshake_that_trickles_within_its_bound(tmp_path: Path) -> None:
    """A source sending its hello one byte a second held migrate-incoming in
    the handshake for as long as it liked: now the hello must arrive whole
    within --idle-timeout (5 s here), and the target ends, starting nothing."""
    stop = threading.Event()

    def talk(channel: mp.Channel, digest: str) -> float:
        started = time.monotonic()
        _trickle(channel.sock, mp.encode("hello", protocol=mp.PROTOCOL, versions=list(mp.VERSIONS)) * 10, 1.0, stop)
        # Until the target hangs up (its error message, then its close), at
        # most 30 s: the old target waited as long as the bytes came.
        channel.sock.settimeout(30)
        with suppress(OSError):
            while channel.sock.recv(100):
                pass
        stop.set()
        return time.monotonic() - started

    report, elapsed = _run_target_against(tmp_path, talk)
    assert report.outcome == "failed" and report.phase == "the handshake", report
    assert report.error is not None and "sent no whole control message within 5 s" in report.error, report.error
    assert elapsed < 5 + 2, f"the target took {elapsed:.1f} s to end a trickling handshake"
    assert report.guest_state == "not started"


def test_a_verdict_in_the_middle_of_the_stream_is_refused_by_name() -> None:
    """A fake target that answers 'verdict' while the source still sends
    pass 1 was believed: the source went on to move its device state to the
    fake's port. The source's listener refuses it, naming it and the phase."""
    from host_shim.migration.migrate import _TargetListener

    channel, peer = _pair()
    channel.phase = "pre-copy pass 1"
    with peer:
        peer.sendall(mp.encode("progress", stream_bytes=10))
        peer.sendall(mp.encode("verdict", ok=True, reason="", private_pages=1, shared_pages=0,
                               ram_digest=["00"] * 256, digest_ms=1))
        listener = _TargetListener(channel)
        listener.join(5)
    assert listener.verdict is None
    assert isinstance(listener.error, mp.ProtocolError)
    assert "sent 'verdict' during pre-copy pass 1, before the stream's end was sent: out of order, refused" \
        in str(listener.error)
    channel.close()


def test_a_verdict_after_the_stream_ends_is_taken() -> None:
    from host_shim.migration.migrate import _TargetListener

    channel, peer = _pair()
    with peer:
        listener = _TargetListener(channel)
        listener.stream_ending.set()
        peer.sendall(mp.encode("verdict", ok=True, reason="", private_pages=1, shared_pages=0,
                               ram_digest=["00"] * 256, digest_ms=1))
        listener.join(5)
    assert listener.error is None and listener.verdict is not None
    channel.close()


@pytest.mark.parametrize("kind", ["resumed", "running", "welcome", "verdict"])
def test_a_message_before_the_commit_is_refused_by_name(kind: str) -> None:
    """Before the commit the target has nothing to say: what it says is
    named (the error ended in an empty 'expected ""')."""
    from host_shim.migration.migrate import _check_peer_quiet

    fields: dict[str, dict[str, Any]] = {
        "resumed": {}, "running": {"heartbeat": "HB"}, "welcome": {"protocol": mp.PROTOCOL, "version": 4},
        "verdict": {"ok": True, "reason": "", "private_pages": 1, "shared_pages": 0, "ram_digest": [],
                    "digest_ms": 1}}
    channel, peer = _pair()
    channel.phase = "the device-state move"
    with peer:
        peer.sendall(mp.encode(kind, **fields[kind]))
        time.sleep(0.1)
        with pytest.raises(mp.ProtocolError) as caught:
            _check_peer_quiet(channel)
    assert str(caught.value).endswith(f"sent {kind!r} during the device-state move, where it may send nothing: "
                                      "out of order, refused"), str(caught.value)
    channel.close()


def _tcp_pair(idle: float = 5.0) -> tuple[mp.Channel, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname()[:2])
        ours, _ = server.accept()
    return mp.Channel(ours, "source test", idle), theirs


def test_a_failed_import_after_the_source_left_blames_the_source() -> None:
    """A target stopped (SIGSTOP) and continued after its source gave it up
    finds its own helper's mailbox timeout expired too; once in four runs it
    blamed that. The source closed the connection (with stream data of its
    still unread here): that is the cause named."""
    from host_shim.errors import MailboxError
    from host_shim.migration.migrate_target import _import_failure

    channel, peer = _tcp_pair()
    channel.phase = "pre-copy"
    peer.sendall(b"\0" * 4096)  # unread stream
    peer.close()
    deadline = time.monotonic() + 5
    while not channel.peer_departed():
        assert time.monotonic() < deadline, "the peer's close was not seen"
        time.sleep(0.01)
    error = _import_failure(channel, MailboxError("helper-0: no answer to IMPORT_BATCH within 10 s"))
    assert isinstance(error, mp.PeerGone)
    assert str(error).startswith("the peer source test closed the connection during pre-copy"), str(error)
    assert "no answer to IMPORT_BATCH" in str(error)
    channel.close()


def test_a_failed_import_with_the_source_still_there_is_the_imports() -> None:
    from host_shim.migration.migrate_target import _import_failure
    from host_shim.migration.migration_vm import MigrationError

    channel, peer = _tcp_pair()
    with peer:
        error = _import_failure(channel, RuntimeError("shard 0: AUTH_FAILED"))
        assert not channel.peer_departed()
    assert type(error) is MigrationError and str(error) == "the import failed: shard 0: AUTH_FAILED"
    channel.close()


def test_the_source_gives_up_on_a_target_silent_in_the_switchover_within_its_bound() -> None:
    """A link cut during the switchover was seen only after the idle timeout
    (15 s), the source guest paused meanwhile. The target says 'progress'
    every second there: SWITCHOVER_SILENCE (5 s) without a message ends it."""
    from host_shim.migration.migrate import _await_verdict, _TargetListener, _Watch

    channel, peer = _pair(idle=60.0)
    channel.phase = "the target helpers' verification"
    with peer:
        listener = _TargetListener(channel)
        listener.stream_ending.set()
        watch = _Watch([], lambda: listener.error)
        for _ in range(2):
            peer.sendall(mp.encode("progress", stream_bytes=100))
            time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(mp.PeerGone, match=r"said nothing for 5\.\d s during the target helpers' verification"):
            _await_verdict(listener, watch, 256 << 20)
        elapsed = time.monotonic() - started
        watch.close()
    channel.close()
    assert elapsed < mp.SWITCHOVER_SILENCE + 1.0, elapsed


def test_the_source_gives_up_on_a_target_that_only_says_progress_after_its_bound() -> None:
    """A target that says 'progress' every 0.2 s and never its verdict: the
    wait ends at its bound (idle timeout + hashing the guest at HASH_RATE +
    the backlog), not never."""
    from host_shim.migration.migrate import _await_verdict, _TargetListener, _Watch

    channel, peer = _pair(idle=1.0)
    size = 16 << 20  # 1 s of hashing at HASH_RATE
    stop = threading.Event()

    def chatter() -> None:
        while not stop.wait(0.2):
            with suppress(OSError):
                peer.sendall(mp.encode("progress", stream_bytes=0))

    thread = threading.Thread(target=chatter, daemon=True)
    with peer:
        listener = _TargetListener(channel)
        listener.stream_ending.set()
        watch = _Watch([], lambda: listener.error)
        thread.start()
        started = time.monotonic()
        with pytest.raises(Exception, match=r"sent no verdict within 2 s of the stream's end"):
            _await_verdict(listener, watch, size)
        elapsed = time.monotonic() - started
        stop.set()
        watch.close()
    channel.close()
    assert 1.9 < elapsed < 2.0 + 1.0, elapsed


def test_after_resumed_a_silent_target_ends_the_wait_within_the_silence_bound() -> None:
    """A link cut right after the target's 'cont': the source waited 135 s
    and said 'lost'. The target says 'progress' every second until its
    guest's first heartbeat; SWITCHOVER_SILENCE without it ends the wait
    (the caller reports the guest's state as unknown)."""
    from host_shim.migration.migrate import _await_running

    channel, peer = _pair(idle=15.0)
    channel.phase = "the target's first heartbeat"
    with peer:
        peer.sendall(mp.encode("progress", stream_bytes=1))
        started = time.monotonic()
        with pytest.raises(mp.PeerGone, match="did not answer within 5 s"):
            _await_running(channel)
        elapsed = time.monotonic() - started
    channel.close()
    assert elapsed < mp.SWITCHOVER_SILENCE + 1.0, elapsed


def test_after_resumed_progress_then_running_is_taken() -> None:
    from host_shim.migration.migrate import _await_running

    channel, peer = _pair()
    with peer:
        peer.sendall(mp.encode("progress", stream_bytes=1) + mp.encode("running", heartbeat="HB seq=3"))
        assert _await_running(channel)["heartbeat"] == "HB seq=3"
    channel.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_source_connects_to_a_target_that_listens_only_later(tmp_path: Path) -> None:
    """--connect-timeout bounds the whole wait: a target whose
    migrate-incoming starts listening after the source first tried (refused)
    is reached once it listens; one that never listens is given up after
    the timeout, said with the option."""
    port = _free_port()
    accepted: list[socket.socket] = []

    def listen_later() -> None:
        time.sleep(1.0)
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(10)
            accepted.append(server.accept()[0])

    late = threading.Thread(target=listen_later, daemon=True)
    late.start()
    config = MigrationConfig(image=tmp_path / "image.fd", work_dir=tmp_path, connect_timeout=10.0)
    channel = migrate_module._connect(config, ("127.0.0.1", port))
    late.join(timeout=15)
    assert accepted and channel.peer == f"target 127.0.0.1:{port}"
    channel.close()
    accepted[0].close()
    config.connect_timeout = 0.5
    with pytest.raises(MigrationError, match=r"for 0\.5 s \(--connect-timeout\); is 'ovmf-mh migrate-incoming'"):
        migrate_module._connect(config, ("127.0.0.1", _free_port()))


def test_the_reports_state_the_downtime_and_the_guests_stopped_time_apart() -> None:
    """The RAM check stops the guest but is not downtime: both numbers are
    said, and the target says whether it hashed its RAM for the check."""
    checked = migrate_module.MigrationReport(downtime_seconds=0.2, verify_seconds=1.5, stopped_seconds=1.7)
    line = checked.describe()[1]
    assert "downtime 200 ms" in line and "guest stopped 1700 ms: the downtime and the RAM check's 1500 ms" in line
    unchecked = migrate_module.MigrationReport(downtime_seconds=0.2, stopped_seconds=0.2)
    assert "guest stopped 200 ms: the downtime (no RAM check)" in unchecked.describe()[1]
    asked = TargetReport(stream_bytes=1, ram_digest_asked=True, digest_ms=380)
    assert "RAM digest for the source's check in 380 ms" in "\n".join(asked.describe())
    assert "no RAM digest (the source did not ask)" in "\n".join(TargetReport(stream_bytes=1).describe())
