"""Crafted containers, DONE frames and challenges: each is refused with a
message that names what is wrong, never with a Python traceback, and
nothing is started or created on the word of a header beyond its bounds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helper import abi
from host_shim.cli import main
from host_shim.transfer import container as ct
from host_shim.transfer.pipeline import encode_challenge, unconfirmed_helper_limit

PAGE = 4096
TIB = 1 << 40
OVMF_MH = [sys.executable, "-m", "host_shim.cli"]


@pytest.fixture
def key(work_dir: Path) -> Path:
    path = work_dir / "transport.key"
    assert main(["keygen", "--out", str(path)]) == 0
    return path


def _import(work_dir: Path, key: Path, stream: bytes, *extra: str) -> int:
    """Import ``stream`` in-process (a traceback fails the test); the exit code."""
    (work_dir / "s.omh").write_bytes(stream)
    return main(["import", "--ram", str(work_dir / "dst.ram"), "--key", str(key), "--in", str(work_dir / "s.omh"),
                 "--work-dir", str(work_dir / "import"), *extra])


def _raw_header(guest_size: int, shards: int = 1, reserved: int = 0, flags: int = 0) -> bytes:
    return ct.FILE_HEADER.pack(ct.MAGIC, ct.VERSION, ct.FILE_HEADER.size, flags, guest_size, shards, reserved)


@pytest.mark.parametrize("guest_size", [2**64 - PAGE, 2**63, 2**63 - PAGE, ct.MAX_GUEST_SIZE + PAGE])
def test_a_guest_size_past_the_maximum_is_refused_by_the_parser(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], guest_size: int) -> None:
    """2^64-4096 and 2^63 made sizing the target file raise OverflowError;
    2^63-4096 said "cannot read STREAM: File too large"."""
    code = _import(work_dir, key, _raw_header(guest_size), "--helper", "reference")
    err = capsys.readouterr().err
    assert code == 1
    assert f"guest size {guest_size} bytes is above the maximum of {ct.MAX_GUEST_SIZE} bytes" in err, err
    assert not list(work_dir.glob(".dst.ram*")) and not (work_dir / "dst.ram").exists()
    assert not list((work_dir / "import").glob("helper-*")), "a helper started"


def test_a_guest_size_the_file_system_cannot_hold_names_the_target_file(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """64 TiB: within the container's bound, beyond ext4's 16 TiB files. The
    message names the target file and its size, not the stream."""
    code = _import(work_dir, key, _raw_header(64 * TIB), "--helper", "reference")
    err = capsys.readouterr().err
    assert code == 1
    if "truncated" in err:  # a file system that holds a 64 TiB sparse file (not ext4): a clean refusal later
        assert not list(work_dir.glob(".dst.ram*"))
        return
    assert f"cannot make the target file {work_dir / '.dst.ram.ovmf-mh-partial'} {64 * TIB} bytes long" in err, err
    assert f"cannot read {work_dir / 's.omh'}" not in err
    assert not list(work_dir.glob(".dst.ram*"))


def test_firmware_helpers_refuse_a_guest_larger_than_their_window_before_anything_starts(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1 TiB with firmware helpers failed as "QEMU exited during start-up"."""
    limit = abi.load().const("OVMF_MH_MAX_WINDOW_SIZE")
    code = _import(work_dir, key, _raw_header(TIB), "--helper", "firmware")
    err = capsys.readouterr().err
    assert code == 1
    assert f"at most {limit} bytes" in err and "OVMF_MH_MAX_WINDOW_SIZE" in err, err
    assert not list(work_dir.glob(".dst.ram*")), "the target file was created"
    assert not list((work_dir / "import").rglob("qemu-cmdline.txt")), "a helper VM was started"
    # Export of such a RAM file (sparse: nothing written) is refused the same way.
    ram = work_dir / "big.ram"
    with ram.open("wb") as f:
        f.truncate(TIB)
    assert main(["export", "--ram", str(ram), "--key", str(key), "--out", str(work_dir / "o.omh"),
                 "--work-dir", str(work_dir / "export")]) == 1
    assert f"at most {limit} bytes" in capsys.readouterr().err
    assert not list((work_dir / "export").rglob("qemu-cmdline.txt"))


@pytest.mark.parametrize(("field", "header"), [
    ("reserved field (offset 28) is 0x1", _raw_header(PAGE, reserved=1)),
    ("flags field (offset 12) is 0x4", _raw_header(PAGE, flags=4)),
])
def test_a_non_zero_header_field_is_named(field: str, header: bytes) -> None:
    with pytest.raises(ct.ContainerError, match=field.replace("(", r"\(").replace(")", r"\)")):
        ct.read_file_header(io.BytesIO(header))


def test_a_header_that_differs_from_the_expected_one_names_the_field_and_both_values(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """import --challenge-out knows N and the guest size; the stream says otherwise."""
    (work_dir / "s.omh").write_bytes(_raw_header(8 * PAGE) + bytes(64))
    code = main(["import", "--ram", str(work_dir / "dst.ram"), "--key", str(key), "--in", str(work_dir / "s.omh"),
                 "--helper", "reference", "--helpers", "1", "--guest-size", str(4 * PAGE),
                 "--challenge-out", str(work_dir / "ch"), "--work-dir", str(work_dir / "import")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"guest size {8 * PAGE} (expected {4 * PAGE})" in err, err
    assert "FileHeader(" not in err


def test_a_header_claiming_many_shards_starts_no_helper_without_helpers(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """64 shards in an unverified header started 64 helpers."""
    code = _import(work_dir, key, _raw_header(64 * 512 * PAGE, shards=64), "--helper", "reference")
    err = capsys.readouterr().err
    assert code == 1
    assert f"claims 64 shards; without --helpers an import starts at most {unconfirmed_helper_limit()}" in err, err
    assert "--helpers 64" in err
    assert not list((work_dir / "import").glob("helper-*")), "a helper started"
    assert not list(work_dir.glob(".dst.ram*"))


def test_empty_records_frames_are_refused_by_name() -> None:
    """100,000 of them were accepted, each costing an IMPORT_BATCH."""
    frames = ct.FRAME_HEADER.pack(ct.KIND_RECORDS, 0, 0) * 100_000
    with pytest.raises(ct.ContainerError, match=r"RECORDS frame of 0 bytes \(allowed 56\.\."):
        list(ct.read_frames(io.BytesIO(frames), 1))


def test_empty_records_frames_fail_the_import_at_the_first(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = _raw_header(4 * PAGE) + ct.FRAME_HEADER.pack(ct.KIND_RECORDS, 0, 0) * 100_000
    code = _import(work_dir, key, stream, "--helper", "reference")
    err = capsys.readouterr().err
    assert code == 1 and "RECORDS frame of 0 bytes" in err, err


DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
GOOD = {"excluded_pages": 0, "plain_digest": DIGEST, "private_pages": 4034, "shared_pages": 0, "zero_pages": 0,
        "zero_range_pages": 0}


def _done(**change: object) -> bytes:
    return json.dumps(GOOD | change).encode()


def test_a_good_done_frame_parses_and_zero_range_pages_may_be_absent() -> None:
    assert ct.Totals.decode(_done()).private_pages == 4034
    without = dict(GOOD)
    del without["zero_range_pages"]
    assert ct.Totals.decode(json.dumps(without).encode()).zero_range_pages == 0


@pytest.mark.parametrize(("payload", "reason"), [
    (_done().replace(b"4034", b"1e999"), "is not an integer"),  # was OverflowError
    (_done().replace(b"4034", b"4034.9"), "is not an integer"),  # was truncated to 4034
    (_done().replace(b"4034", b"Infinity"), "is not an integer"),
    (_done(private_pages="4_034"), "private_pages must be an integer"),
    (_done(private_pages="4034"), "private_pages must be an integer"),
    (_done(private_pages=True), "private_pages must be an integer"),
    (_done(private_pages=-1), "private_pages must be an integer from 0"),
    (_done(private_pages=2**63), "private_pages must be an integer from 0"),
    (_done().replace(b"{", b'{"private_pages": 1, ', 1), "key 'private_pages' appears twice"),
    (_done(comment="x"), "unknown key(s) comment"),
    (_done(plain_digest=DIGEST.upper()), "plain_digest must be 64 lower-case hex digits"),
    (_done(plain_digest=7), "plain_digest must be 64 lower-case hex digits"),
    (b'{"excluded_pages": 0}', "missing plain_digest, private_pages, shared_pages, zero_pages"),
    (b"[" * 2000 + b"]" * 2000, "not one flat JSON object"),  # was RecursionError
    (b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", "not one flat JSON object"),
    (b'{"a": {"b": 1}}', "not one flat JSON object"),
    (b"7", "not a JSON object"),
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "malformed DONE frame"),
])
def test_the_done_frame_is_parsed_strictly(payload: bytes, reason: str) -> None:
    with pytest.raises(ct.ContainerError, match="malformed DONE frame") as caught:
        ct.Totals.decode(payload)
    assert reason in str(caught.value)


def _challenge(work_dir: Path, nonces: list[bytes], extra: bytes = b"") -> Path:
    path = work_dir / "challenge"
    path.write_bytes(encode_challenge(nonces, 4 * PAGE) + extra)
    return path


@pytest.mark.parametrize(("nonces", "extra", "reason"), [
    ([bytes(32)], b"", "the nonce of shard 0 is all zero"),
    ([b"\x01" * 32, b"\x02" * 32, b"\x01" * 32], b"", "the nonce of shard 2 repeats the one of shard 0"),
    ([b"\x01" * 32], b"\x00", "has bytes after its last nonce"),
])
def test_export_refuses_a_challenge_no_target_helper_made(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], nonces: list[bytes], extra: bytes,
        reason: str) -> None:
    ram = work_dir / "src.ram"
    ram.write_bytes(b"\x5a" * 4 * PAGE)
    challenge = _challenge(work_dir, nonces, extra)
    out = work_dir / "s.omh"
    assert main(["export", "--ram", str(ram), "--key", str(key), "--out", str(out), "--helper", "reference",
                 "--helpers", str(len(nonces)), "--challenge", str(challenge),
                 "--work-dir", str(work_dir / "export")]) == 1
    err = capsys.readouterr().err
    assert reason in err, err
    assert not out.exists() and not list(work_dir.glob(".s.omh*"))


@pytest.mark.parametrize("refusal", ["helpers", "key"])
def test_a_refusing_receiver_makes_the_sender_report_its_refusal(work_dir: Path, key: Path, refusal: str) -> None:
    """The sender said "connection failed: [Errno 107]" or "not an ovmf-mh
    challenge" after the receiver refused; it must say what the receiver said."""
    ram = work_dir / "src.ram"
    ram.write_bytes(bytes(range(256)) * (2048 * PAGE // 256))
    receiver_key = key
    extra: list[str] = []
    if refusal == "helpers":  # refused at the file header, before the challenge
        extra = ["--helpers", "2"]
        reason = "the stream has 1 shard(s); import uses one helper per shard (got --helpers 2)"
    else:  # refused at the first stream header, while the sender writes
        receiver_key = work_dir / "other.key"
        assert main(["keygen", "--out", str(receiver_key)]) == 0
        reason = "refused IMPORT_BEGIN; the stream header does not authenticate under this key"
    receiver = subprocess.Popen(
        [*OVMF_MH, "receive", "--ram", str(work_dir / "dst.ram"), "--key", str(receiver_key), "--listen",
         "127.0.0.1:0", "--helper", "reference", "--work-dir", str(work_dir / "receive"), *extra],
        stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stderr is not None
        address = receiver.stderr.readline().split()[-1]
        sender = subprocess.run(
            [*OVMF_MH, "send", "--ram", str(ram), "--key", str(key), "--to", address,
             "--helper", "reference", "--work-dir", str(work_dir / "send")],
            capture_output=True, text=True, timeout=120)
    finally:
        receiver.wait(timeout=60)
    assert sender.returncode == 1
    # Whether the sender meets the refusal while it writes or in the verdict at the end, it says it.
    assert reason in sender.stderr, sender.stderr
    assert "refused the transfer: " in sender.stderr or "receiver reports failure: " in sender.stderr
    assert "Errno" not in sender.stderr and "not an ovmf-mh challenge" not in sender.stderr
