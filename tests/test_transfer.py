"""Moving guest memory through helpers with the CLI: files and TCP, firmware
and reference helpers, parallel helpers, tampering, failures."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helper import stream as s
from host_shim import paths
from host_shim.cli import main
from host_shim.transfer import container as ct

PAGE = 4096
MIB = 1024 * 1024
OVMF_MH = [sys.executable, "-m", "host_shim.cli"]


def make_ram(path: Path, kind: str, pages: int) -> Path:
    rng = __import__("random").Random(kind)
    if kind == "zero":
        data = bytes(pages * PAGE)
    elif kind == "random":
        data = rng.randbytes(pages * PAGE)
    elif kind == "repeated":
        data = rng.randbytes(PAGE) * pages
    else:  # mixed: random, zero and repeated pages, and pages with one byte set
        parts = []
        for n in range(pages):
            choice = n % 4
            if choice == 0:
                parts.append(rng.randbytes(PAGE))
            elif choice == 1:
                parts.append(bytes(PAGE))
            elif choice == 2:
                parts.append(b"\xa5" * PAGE)
            else:
                parts.append(bytes(PAGE - 1) + b"\x01")
        data = b"".join(parts)
    path.write_bytes(data)
    return path


@pytest.fixture
def key(work_dir: Path) -> Path:
    path = work_dir / "transport.key"
    assert main(["keygen", "--out", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(work: Path, key: Path, src: Path, helper: str, helpers: int, name: str = "stream.omh",
           *extra: str | Path) -> Path:
    out = work / name
    assert cli("export", "--ram", src, "--key", key, "--out", out, "--helper", helper,
               "--helpers", str(helpers), "--work-dir", work / f"export-{name}", *extra) == 0
    assert out.is_file() and not (work / f".{name}.partial").exists()
    return out


def import_(work: Path, key: Path, stream: Path, dst: Path, helper: str) -> int:
    return cli("import", "--ram", dst, "--key", key, "--in", stream, "--helper", helper,
               "--work-dir", work / f"import-{dst.name}")


@pytest.mark.qemu
@pytest.mark.parametrize(("helper", "helpers"), [("firmware", 1), ("firmware", 2), ("reference", 1), ("reference", 3)])
@pytest.mark.parametrize(("content", "pages"), [("zero", 256), ("random", 1024), ("mixed", 2048), ("repeated", 2)])
def test_round_trip_is_byte_identical(
    firmware: Path, work_dir: Path, key: Path, helper: str, helpers: int, content: str, pages: int
) -> None:
    src = make_ram(work_dir / "src.ram", content, pages)
    stream = export(work_dir, key, src, helper, helpers)
    dst = work_dir / "dst.ram"
    assert import_(work_dir, key, stream, dst, helper) == 0
    assert digest(dst) == digest(src)
    assert not list(work_dir.glob(".dst.ram.ovmf-mh-partial"))


@pytest.mark.qemu
@pytest.mark.parametrize(("exporter", "importer"), [("firmware", "reference"), ("reference", "firmware")])
def test_firmware_and_reference_streams_interoperate(
    firmware: Path, work_dir: Path, key: Path, exporter: str, importer: str
) -> None:
    src = make_ram(work_dir / "src.ram", "mixed", 1024)
    stream = export(work_dir, key, src, exporter, 2)
    dst = work_dir / "dst.ram"
    assert import_(work_dir, key, stream, dst, importer) == 0
    assert digest(dst) == digest(src)


def _frames(stream: Path) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    data = stream.read_bytes()
    header, offset, frames = data[: ct.FILE_HEADER.size], ct.FILE_HEADER.size, []
    while offset < len(data):
        kind, shard, length = ct.FRAME_HEADER.unpack_from(data, offset)
        offset += ct.FRAME_HEADER.size
        frames.append((kind, shard, data[offset : offset + length]))
        offset += length
    return header, frames


def _write(path: Path, header: bytes, frames: list[tuple[int, int, bytes]]) -> Path:
    path.write_bytes(header + b"".join(ct.FRAME_HEADER.pack(k, s, len(p)) + p for k, s, p in frames))
    return path


def _flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1 :]


def _tamper(kind: str, frames: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    records = [i for i, f in enumerate(frames) if f[0] == ct.KIND_RECORDS and f[2]]
    first = records[0]
    # Frames of different shards may interleave in any order; reorder within one shard.
    second = next(i for i in records[1:] if frames[i][1] == frames[first][1])
    out = list(frames)
    if kind == "flipped-bit":
        k, s, p = out[first]
        out[first] = (k, s, _flip(p, 40 + 100))
    elif kind == "moved-page":
        k, s, p = out[first]
        offset = struct.unpack_from("<Q", p, 16)[0] ^ PAGE
        out[first] = (k, s, p[:16] + struct.pack("<Q", offset) + p[24:])
    elif kind == "dropped-batch":
        del out[first]
    elif kind == "duplicated-batch":
        out.insert(first, out[first])
    elif kind == "reordered-batches":
        out[first], out[second] = out[second], out[first]
    elif kind == "truncated":
        out = [f for f in out if f[0] not in (ct.KIND_STREAM_END, ct.KIND_DONE)]
    elif kind == "no-done":
        out = [f for f in out if f[0] != ct.KIND_DONE]
    elif kind == "wrong-shard":
        k, s, p = out[first]
        out[first] = (k, 1 - s, p)
    return out


#: Tampering -> the reasons a refusal may give (docs/stream-format.md and
#: docs/transfer-format.md): a helper's status for what only a helper can see,
#: the container parser's message for a stream that ends early. A batch moved
#: to the other shard is seen by whichever shard's helper reads first: the
#: one it was moved to (foreign session) or the one it was taken from (gap).
REFUSALS = {
    "flipped-bit": {"status AUTH_FAILED"},
    "moved-page": {"status AUTH_FAILED"},  # the page offset is in the AD
    "dropped-batch": {"status SEQUENCE_GAP"},
    "duplicated-batch": {"status SEQUENCE_REPLAY"},
    "reordered-batches": {"status SEQUENCE_GAP"},
    "truncated": {"stream truncated inside a frame header"},
    "no-done": {"stream truncated inside a frame header"},
    "wrong-shard": {"status WRONG_SESSION", "status SEQUENCE_GAP"},
}
TAMPERING = list(REFUSALS)
#: Helper kind -> the log in each helper's work folder that shows it started.
HELPER_LOGS = {"firmware": "debugcon.log", "reference": "reference-helper.log"}


@pytest.mark.qemu
@pytest.mark.parametrize("helper", ["firmware", "reference"])
@pytest.mark.parametrize("tampering", TAMPERING)
def test_tampered_stream_is_refused_and_dst_untouched(
    firmware: Path, work_dir: Path, key: Path, helper: str, tampering: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_ram(work_dir / "src.ram", "random", 2048)
    stream = export(work_dir, key, src, "reference", 2)
    header, frames = _frames(stream)
    bad = _write(work_dir / "bad.omh", header, _tamper(tampering, frames))
    dst = work_dir / "dst.ram"
    dst.write_bytes(b"\x5a" * (2048 * PAGE))
    before = digest(dst)
    capsys.readouterr()
    assert import_(work_dir, key, bad, dst, helper) == 1
    err = capsys.readouterr().err
    assert digest(dst) == before, "a failed import changed DST"
    assert not list(work_dir.glob(".dst.ram.ovmf-mh-partial"))
    # Refused for the reason this tampering provokes...
    reasons = REFUSALS[tampering]
    assert any(reason in err for reason in reasons), f"expected one of {reasons}:\n{err}"
    if any(reason.startswith("status ") for reason in reasons):
        assert "refused IMPORT_BATCH" in err, err
    # ...by helpers that really started (both shards' helpers reached READY).
    for shard in (0, 1):
        log = work_dir / "import-dst.ram" / f"helper-{shard}" / HELPER_LOGS[helper]
        assert "READY" in log.read_text(errors="replace"), f"helper {shard} never became ready: {log}"


@pytest.mark.qemu
def test_wrong_key_is_refused(firmware: Path, work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_ram(work_dir / "src.ram", "random", 64)
    stream = export(work_dir, key, src, "firmware", 1)
    other = work_dir / "other.key"
    assert cli("keygen", "--out", other) == 0
    dst = work_dir / "dst.ram"
    capsys.readouterr()
    assert cli("import", "--ram", dst, "--key", other, "--in", stream, "--work-dir", work_dir / "imp") == 1
    assert "BAD_HEADER" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.qemu
def test_page_map_sends_shared_pages_plain_and_skips_excluded(firmware: Path, work_dir: Path, key: Path) -> None:
    pages = 512
    src = make_ram(work_dir / "src.ram", "random", pages)
    page_map = bytes(1 if n % 5 == 0 else 2 if n % 7 == 0 else 0 for n in range(pages))
    (work_dir / "map.bin").write_bytes(page_map)
    stream = export(work_dir, key, src, "firmware", 2, "stream.omh", "--page-map", work_dir / "map.bin")
    _, frames = _frames(stream)
    assert sum(f[0] == ct.KIND_PLAIN_PAGE for f in frames) == page_map.count(1)
    # Each shared page travels in its page's shard, whose END record seals
    # their count and digest (opened here with the key, by pyca through the codec).
    for shard in (0, 1):
        plain = [p for k, sh, p in frames if k == ct.KIND_PLAIN_PAGE and sh == shard]
        # 512 pages are one shard block: shard 0 has all the shared pages, shard 1 seals none.
        assert len(plain) == (page_map.count(1) if shard == 0 else 0)
        header = next(p for k, sh, p in frames if k == ct.KIND_STREAM_HEADER and sh == shard)
        end_record = next(p for k, sh, p in frames if k == ct.KIND_STREAM_END and sh == shard)
        decoded = s.decode_stream_header(header)
        cipher = s.StreamCipher(s.derive_session(key.read_bytes(), decoded.salt, decoded.binding.pack()))
        end = s.decode_end_payload(cipher.open_record(end_record))
        want = hashlib.sha256(b"ovmf-mh v3 shared pages" + b"".join(plain)).digest()
        assert (end.shared_page_count, end.shared_digest) == (len(plain), want)
    dst = work_dir / "dst.ram"
    assert import_(work_dir, key, stream, dst, "firmware") == 0
    source, result = src.read_bytes(), dst.read_bytes()
    for n, state in enumerate(page_map):
        page = slice(n * PAGE, (n + 1) * PAGE)
        assert result[page] == (bytes(PAGE) if state == 2 else source[page]), n


#: Arguments (SRC, DST, KEY, OUT and IN stand for files the test makes) -> the error's text.
BAD_ARGUMENTS = {
    "missing RAM file": (["export", "--ram", "nope.ram", "--key", "KEY", "--out", "OUT"],
                         "guest RAM file nope.ram does not exist"),
    "RAM is a directory": (["export", "--ram", ".", "--key", "KEY", "--out", "OUT"], "not a regular file"),
    "no helpers": (["export", "--ram", "SRC", "--key", "KEY", "--out", "OUT", "--helpers", "0"],
                   "a transfer has 1 to 64 shards"),
    "more helpers than shards": (["export", "--ram", "SRC", "--key", "KEY", "--out", "OUT", "--helpers", "65"],
                                 "a transfer has 1 to 64 shards"),
    "output folder missing": (["export", "--ram", "SRC", "--key", "KEY", "--out", "no/such/dir/s.omh"],
                              "cannot write no/such/dir/s.omh"),
    "missing stream": (["import", "--ram", "DST", "--key", "KEY", "--in", "nope.omh"], "cannot read nope.omh"),
    "target is a directory": (["import", "--ram", ".", "--key", "KEY", "--in", "IN"], "is not a regular file"),
    "stream over its own RAM": (["export", "--ram", "SRC", "--key", "KEY", "--out", "./SRC"],
                                "is the guest RAM file itself"),
    "RAM over its own stream": (["import", "--ram", "IN", "--key", "KEY", "--in", "IN"], "is the stream itself"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_get_a_clear_error_and_leave_nothing(
    work_dir: Path, key: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_ram(work_dir / "src.ram", "mixed", 16)
    stream = export(work_dir, key, work_dir / "src.ram", "reference", 1, "in.omh")
    monkeypatch.chdir(work_dir)
    names = {"SRC": "src.ram", "./SRC": "./src.ram", "DST": "dst.ram", "KEY": str(key), "OUT": "out.omh",
             "IN": str(stream)}
    argv, message = BAD_ARGUMENTS[case]
    before = {p.name: p.stat().st_size for p in work_dir.iterdir()}
    assert cli(*[names.get(a, a) for a in argv], "--helper", "reference", "--work-dir", "w") == 1
    assert message in capsys.readouterr().err
    assert {p.name: p.stat().st_size for p in work_dir.iterdir() if p.name != "w"} == before


def test_bad_page_map_is_refused(work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_ram(work_dir / "src.ram", "random", 16)
    (work_dir / "map.bin").write_bytes(bytes([0, 3] + [0] * 14))
    assert cli("export", "--ram", src, "--key", key, "--out", work_dir / "s.omh", "--helper", "reference",
               "--page-map", work_dir / "map.bin") == 1
    assert "page map" in capsys.readouterr().err
    assert not (work_dir / "s.omh").exists()


def test_ram_size_qemu_cannot_map_is_refused_before_any_helper_starts(
    firmware: Path, work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3 pages: QEMU maps a memory backend only in multiples of 8 KiB, so the
    host refuses before it starts a firmware helper (none ever runs)."""
    src = make_ram(work_dir / "src.ram", "random", 3)
    assert cli("export", "--ram", src, "--key", key, "--out", work_dir / "s.omh", "--work-dir", work_dir / "e") == 1
    assert "multiple of 8 KiB" in capsys.readouterr().err
    assert not list((work_dir / "e").rglob("qemu-cmdline.txt")), "a helper VM was started"
    assert not (work_dir / "s.omh").exists()


def test_firmware_helper_without_image_says_how_to_build(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_ram(work_dir / "src.ram", "random", 16)
    assert cli("export", "--ram", src, "--key", key, "--out", work_dir / "s.omh",
               "--image", work_dir / "missing.fd") == 1
    assert "ovmf-mh build" in capsys.readouterr().err


@pytest.mark.qemu
def test_qemu_that_fails_to_start_reports_its_logs(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_ram(work_dir / "src.ram", "random", 16)
    broken = work_dir / "broken.fd"
    broken.write_bytes(b"\xff" * 1000)  # pflash needs whole sectors: QEMU refuses to start
    assert cli("export", "--ram", src, "--key", key, "--out", work_dir / "s.omh", "--image", broken,
               "--work-dir", work_dir / "exp") == 1
    err = capsys.readouterr().err
    assert "QEMU exited during start-up" in err
    stderr_log = re.search(r"stderr=(\S+)", err)
    assert stderr_log is not None and Path(stderr_log.group(1).rstrip(";,")).is_file()


@pytest.mark.qemu
def test_helper_killed_mid_transfer_fails_fast_and_marks_nothing_complete(
    firmware: Path, work_dir: Path, key: Path
) -> None:
    src = make_ram(work_dir / "src.ram", "random", 64 * 256)  # 64 MiB
    stream = export(work_dir, key, src, "reference", 1)
    dst = work_dir / "dst.ram"
    imp_work = work_dir / "imp"
    proc = subprocess.Popen(
        [*OVMF_MH, "import", "--ram", str(dst), "--key", str(key), "--in", str(stream), "--work-dir", str(imp_work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pid_file = imp_work / "helper-0" / "qemu.pid"
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and "READY" in (imp_work / "helper-0" / "debugcon.log").read_text(errors="replace")
                   if (imp_work / "helper-0" / "debugcon.log").exists() else False):
            assert time.monotonic() < deadline, "helper never became ready"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 15, "the failure took too long to report"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "exited" in err
    assert not dst.exists()
    assert not list(work_dir.glob(".dst.ram.ovmf-mh-partial"))


@pytest.mark.qemu
@pytest.mark.parametrize("helper", ["firmware", "reference"])
def test_relative_paths_work_from_any_directory(
    firmware: Path, work_dir: Path, key: Path, helper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths as a user types them, relative to where the command runs (the
    helpers themselves run elsewhere)."""
    make_ram(work_dir / "src.ram", "mixed", 512)
    (work_dir / "k.key").write_bytes(key.read_bytes())
    monkeypatch.chdir(work_dir)
    assert cli("export", "--ram", "src.ram", "--key", "k.key", "--out", "s.omh", "--helper", helper,
               "--work-dir", "exp") == 0
    assert cli("import", "--ram", "dst.ram", "--key", "k.key", "--in", "s.omh", "--helper", helper,
               "--work-dir", "imp") == 0
    assert digest(work_dir / "dst.ram") == digest(work_dir / "src.ram")


#: Source helper kind -> (guest MiB, enough that an export is still running
#: when the first MiB are written; the helper's pid file).
MIDWAY_SOURCES = {"firmware": (64, "qemu.pid"), "reference": (256, "pid")}


@dataclass
class MidwayExport:
    proc: subprocess.Popen[str]
    helper_pid: int
    out: Path
    partial: Path

    def resume(self) -> None:
        """Continue the helper that export_midway stopped (if it still runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.helper_pid, signal.SIGCONT)


@contextmanager
def export_midway(work_dir: Path, key: Path, helper: str) -> Iterator[MidwayExport]:
    """An `ovmf-mh export` of random RAM, yielded once it has written several
    MiB of its stream, with its helper stopped (SIGSTOP) so that the export
    cannot end before the test's fault, however fast the machine: certainly
    mid-transfer. The helper is continued and the export killed (by pid) if
    still running when the block ends."""
    mib, pid_name = MIDWAY_SOURCES[helper]
    src = work_dir / "src.ram"
    src.write_bytes(os.urandom(mib * MIB))
    out, partial, exp_work = work_dir / "stream.omh", work_dir / ".stream.omh.partial", work_dir / "exp"
    proc = subprocess.Popen(
        [*OVMF_MH, "export", "--ram", str(src), "--key", str(key), "--out", str(out), "--helper", helper,
         "--work-dir", str(exp_work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    midway: MidwayExport | None = None
    try:
        deadline = time.monotonic() + 60
        pid_file = exp_work / "helper-0" / pid_name
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the export started no helper"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.002)
        midway = MidwayExport(proc, int(pid_file.read_text()), out, partial)
        while not (partial.exists() and partial.stat().st_size > 4 * MIB):
            assert time.monotonic() < deadline, "the export never got going"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.002)
        os.kill(midway.helper_pid, signal.SIGSTOP)
        assert proc.poll() is None, "the export ended before its helper could be stopped"
        yield midway
    finally:
        if midway is not None:
            midway.resume()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.qemu
@pytest.mark.parametrize("helper", list(MIDWAY_SOURCES))
def test_source_helper_killed_mid_export_leaves_no_stream(
    firmware: Path, work_dir: Path, key: Path, helper: str
) -> None:
    """SIGKILL to the source helper once the stream is being written: the
    export fails within a bound, names the exit, and OUT never appears."""
    with export_midway(work_dir, key, helper) as export_:
        os.kill(export_.helper_pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = export_.proc.communicate(timeout=60)
        assert time.monotonic() - killed < 15, "the failure took too long to report"
    assert export_.proc.returncode == 1, err
    assert "exited" in err
    assert not export_.out.exists()
    assert not export_.partial.exists()


@pytest.mark.qemu
@pytest.mark.parametrize("helper", list(MIDWAY_SOURCES))
def test_interrupted_export_stops_its_helpers_and_leaves_no_stream(
    firmware: Path, work_dir: Path, key: Path, helper: str
) -> None:
    """Ctrl-C (SIGINT to ovmf-mh) while the stream is being written: exit
    130, the helper stopped, neither OUT nor its partial file left."""
    with export_midway(work_dir, key, helper) as export_:
        export_.proc.send_signal(signal.SIGINT)
        export_.resume()
        _, err = export_.proc.communicate(timeout=60)
    assert export_.proc.returncode == 130, err
    assert "interrupted" in err
    assert not export_.out.exists()
    assert not export_.partial.exists()
    status = Path(f"/proc/{export_.helper_pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text(), "the helper outlived the export"


@pytest.mark.qemu
def test_send_and_receive_over_tcp(firmware: Path, work_dir: Path, key: Path) -> None:
    """Over TCP with a page map: every third page shared (plain, sealed by its
    shard's helper), the rest private; DST ends equal to SRC."""
    src = make_ram(work_dir / "src.ram", "mixed", 1024)
    (work_dir / "map.bin").write_bytes(bytes(1 if n % 3 == 0 else 0 for n in range(1024)))
    dst = work_dir / "dst.ram"
    receiver = subprocess.Popen(
        [*OVMF_MH, "receive", "--ram", str(dst), "--key", str(key), "--listen", "127.0.0.1:0",
         "--work-dir", str(work_dir / "recv"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert receiver.stderr is not None
        line = receiver.stderr.readline()
        match = re.search(r"listening on (\S+:\d+)", line)
        assert match, line
        sender = subprocess.run(
            [*OVMF_MH, "send", "--ram", str(src), "--key", str(key), "--to", match.group(1), "--helpers", "2",
             "--page-map", str(work_dir / "map.bin"), "--work-dir", str(work_dir / "send"), "--json"],
            capture_output=True, text=True, timeout=300,
        )
        out, err = receiver.communicate(timeout=120)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert sender.returncode == 0, sender.stderr
    assert receiver.returncode == 0, err
    assert '"outcome": "ok"' in out and '"outcome": "ok"' in sender.stdout
    # Every send is bound to the receiver's helpers (their challenge on the connection).
    assert '"bound": true' in out and '"bound": true' in sender.stdout
    assert '"shared_pages": 342' in out
    assert digest(dst) == digest(src)


@pytest.mark.qemu
def test_receiver_failure_is_reported_to_the_sender(firmware: Path, work_dir: Path, key: Path) -> None:
    src = make_ram(work_dir / "src.ram", "random", 64)
    other = work_dir / "other.key"
    assert cli("keygen", "--out", other) == 0
    dst = work_dir / "dst.ram"
    receiver = subprocess.Popen(
        [*OVMF_MH, "receive", "--ram", str(dst), "--key", str(other), "--listen", "127.0.0.1:0",
         "--helper", "reference"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert receiver.stderr is not None
        match = re.search(r"listening on (\S+:\d+)", receiver.stderr.readline())
        assert match
        sender = subprocess.run(
            [*OVMF_MH, "send", "--ram", str(src), "--key", str(key), "--to", match.group(1), "--helper", "reference"],
            capture_output=True, text=True, timeout=120,
        )
        receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert sender.returncode == 1 and receiver.returncode == 1
    assert "receiver reports failure" in sender.stderr
    assert not dst.exists()


def test_receiver_gives_up_on_a_sender_that_stalls(work_dir: Path, key: Path) -> None:
    """A sender that connects, starts the stream and then hangs (without
    closing): the receiver fails after --idle-timeout, creates no DST and
    stops its helpers."""
    dst = work_dir / "dst.ram"
    receiver = subprocess.Popen(
        [*OVMF_MH, "receive", "--ram", str(dst), "--key", str(key), "--listen", "127.0.0.1:0",
         "--helper", "reference", "--idle-timeout", "1", "--work-dir", str(work_dir / "recv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert receiver.stderr is not None
        match = re.search(r"listening on (\S+):(\d+)", receiver.stderr.readline())
        assert match
        with socket.create_connection((match.group(1), int(match.group(2)))) as stalled:
            stalled.sendall(ct.FileHeader(64 * PAGE, 1).encode())
            started = time.monotonic()
            _, err = receiver.communicate(timeout=60)
            assert time.monotonic() - started < 15
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert receiver.returncode == 1
    assert re.search(r"the sender 127\.0\.0\.1:\d+ sent nothing for 1 s \(--idle-timeout\)", err), err
    assert not dst.exists() and not (work_dir / ".dst.ram.ovmf-mh-partial").exists()
    helper_pid = int((work_dir / "recv" / "helper-0" / "pid").read_text())
    status = Path(f"/proc/{helper_pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text(), "the helper outlived the receiver"


def test_sender_gives_up_on_a_receiver_that_never_answers(work_dir: Path, key: Path) -> None:
    """A receiver that takes the whole stream but never sends a verdict nor
    closes: the sender fails after --idle-timeout instead of hanging."""
    src = make_ram(work_dir / "src.ram", "mixed", 64)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = bytearray()

        def swallow() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(65536):
                    received.extend(chunk)
                time.sleep(10)  # connection open, no verdict

        thread = threading.Thread(target=swallow, daemon=True)
        thread.start()
        sender = subprocess.run(
            [*OVMF_MH, "send", "--ram", str(src), "--key", str(key), "--to", f"127.0.0.1:{port}",
             "--helper", "reference", "--idle-timeout", "1"],
            capture_output=True, text=True, timeout=60,
        )
    assert sender.returncode == 1
    assert "sent no verdict for 1 s" in sender.stderr
    assert received.startswith(b"OMHXFER1")


@functools.cache
def _valid_streams() -> tuple[bytes, ...]:
    """Real transfer streams of the reference helper: 1 and 2 shards, private,
    zero and shared (plain) pages. Seeds of the container fuzz test."""
    root = paths.REPO_ROOT / "work"
    root.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz-seeds-", dir=root))
    try:
        key = work / "k.key"
        assert main(["keygen", "--out", str(key)]) == 0
        src = make_ram(work / "src.ram", "mixed", 24)
        (work / "map.bin").write_bytes(bytes(1 if n % 5 == 0 else 2 if n % 7 == 0 else 0 for n in range(24)))
        streams = []
        for helpers, extra in ((1, ()), (2, ("--page-map", work / "map.bin"))):
            out = export(work, key, src, "reference", helpers, f"seed-{helpers}.omh", *extra)
            streams.append(out.read_bytes())
        return tuple(streams)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _frame_offsets(stream: bytes) -> list[int]:
    """Offsets of the frame headers of a valid stream."""
    offsets, at = [], ct.FILE_HEADER.size
    while at < len(stream):
        offsets.append(at)
        at += ct.FRAME_HEADER.size + ct.FRAME_HEADER.unpack_from(stream, at)[2]
    return offsets


#: One mutation: (operation, position, value).
Mutation = tuple[str, int, int]


@st.composite
def _mutations(draw: st.DrawFn) -> tuple[int, list[Mutation]]:
    """Which valid stream, and a few byte-level mutations of it: flipped or
    overwritten bytes, a cut, an inserted or deleted run, a duplicated slice,
    after the file header; bytes of frame headers (kind, shard, length) on
    purpose, not by luck; and, one time in eight, a flipped bit in the file
    header, which the parser must refuse before any frame. Drawn as a small
    description (readable when a case fails), applied by _mutated."""
    seeds = _valid_streams()
    index = draw(st.integers(0, len(seeds) - 1))
    size = len(seeds[index])
    frame_headers = _frame_offsets(seeds[index])
    mutations: list[Mutation] = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["frame", "flip", "set", "cut", "insert", "delete", "duplicate", "header"]))
        if op == "frame":
            at = draw(st.sampled_from(frame_headers)) + draw(st.integers(0, ct.FRAME_HEADER.size - 1))
            value = draw(st.sampled_from([0x00, 0xFF, 0x01, 0x02, 0x05, 0x06, 0x40, 0x80]))
        elif op == "header":
            at, value = draw(st.integers(0, ct.FILE_HEADER.size - 1)), draw(st.integers(0, 7))
        else:
            at, value = draw(st.integers(ct.FILE_HEADER.size, size)), draw(st.integers(0, 255))
        mutations.append((op, at, value))
    return index, mutations


def _mutated(index: int, mutations: list[Mutation]) -> bytes:
    data = bytearray(_valid_streams()[index])
    for op, at, value in mutations:
        if op in ("frame", "set") and at < len(data):
            data[at] = value
        elif op == "header":
            data[at] ^= 1 << value
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << (value % 8)
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = bytes([value]) * (1 + value % 24)
        elif op == "delete":
            del data[at : at + 1 + value % 64]
        elif op == "duplicate":
            data[at:at] = data[at : at + 1 + value]
    return bytes(data)


def _check_container(data: bytes) -> bool:
    """Parse one input; assert the parser's invariants; return whether the
    input got past the file header to the frame parser."""
    source = io.BytesIO(data)
    try:
        header = ct.read_file_header(source)
    except ct.ContainerError as exc:
        assert str(exc)
        return False
    assert 1 <= header.shards <= ct.MAX_SHARDS
    assert header.guest_size > 0 and header.guest_size % PAGE == 0
    limits = ct._limits()
    frames: list[ct.Frame] = []
    complete = False
    try:
        for frame in ct.read_frames(source, header.shards):
            # Every frame yielded (also before a later error) is of a known
            # kind, for a shard of this stream, of a length its kind allows.
            assert frame.kind in ct.KIND_NAMES
            assert frame.shard < header.shards
            low, high = limits[frame.kind]
            assert low <= len(frame.payload) <= high
            frames.append(frame)
        complete = True
    except ct.ContainerError as exc:
        assert str(exc)
    if complete:
        # A parse that succeeded ends at DONE, and read exactly the bytes its
        # frames re-encode to: nothing skipped, nothing read twice.
        assert frames[-1].kind == ct.KIND_DONE
        assert [f.kind for f in frames].count(ct.KIND_DONE) == 1
        consumed = source.tell()
        assert data[ct.FILE_HEADER.size : consumed] == b"".join(f.encode() for f in frames)
    return True


def test_container_parser_on_mutated_valid_streams() -> None:
    """The container parser (parsed as hostile input) on mutants of real
    streams: only ContainerError, invariants on what it yields, and most
    inputs get past the file header to the frame parser."""
    for seed in _valid_streams():
        assert _check_container(seed), "a valid stream must parse"
    reached: list[bool] = []

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutations())
    def run(case: tuple[int, list[Mutation]]) -> None:
        reached.append(_check_container(_mutated(*case)))

    run()
    assert len(reached) >= 200
    assert sum(reached) / len(reached) >= 0.7, f"only {sum(reached)} of {len(reached)} inputs reached the frames"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_container_parser_rejects_garbage_cleanly(data: bytes) -> None:
    """Arbitrary bytes (nearly all stop at the magic): only ContainerError."""
    _check_container(data)


def test_container_bounds_frames_before_reading_them() -> None:
    header = ct.FileHeader(PAGE, 1).encode()
    huge = ct.FRAME_HEADER.pack(ct.KIND_RECORDS, 0, 1 << 40)
    with pytest.raises(ct.ContainerError, match="RECORDS frame"):
        list(ct.read_frames(io.BytesIO(huge), ct.read_file_header(io.BytesIO(header)).shards))


# --- one migration: shards bound together, to one target, at its guest size -------------------


#: Target helpers of the hostile-container tests: both kinds (firmware under QEMU).
TARGETS = [pytest.param("reference"), pytest.param("firmware", marks=pytest.mark.qemu)]


def _refusal(work_dir: Path, key: Path, bad: Path, capsys: pytest.CaptureFixture[str], helper: str) -> str:
    """Import ``bad`` with ``helper`` helpers: it must fail, leave no DST; return stderr."""
    dst = work_dir / "dst.ram"
    capsys.readouterr()
    assert import_(work_dir, key, bad, dst, helper) == 1
    err = capsys.readouterr().err
    assert not dst.exists() and not list(work_dir.glob(".dst.ram.ovmf-mh-partial"))
    return err


def _shard_frames(frames: list[tuple[int, int, bytes]], shard: int) -> list[tuple[int, int, bytes]]:
    return [f for f in frames if f[0] in (ct.KIND_STREAM_HEADER, ct.KIND_RECORDS, ct.KIND_STREAM_END)
            and f[1] == shard]


def _done(frames: list[tuple[int, int, bytes]], private_pages: int) -> tuple[int, int, bytes]:
    """A DONE frame like the stream's, with ``private_pages`` (the host fixing up its totals)."""
    totals = ct.Totals.decode(next(p for k, _, p in frames if k == ct.KIND_DONE))
    totals.private_pages = private_pages
    return (ct.KIND_DONE, 0, totals.encode())


def _header(guest_size: int, shards: int) -> bytes:
    return ct.FileHeader(guest_size, shards).encode()


@pytest.mark.parametrize("helper", TARGETS)
def test_dropped_shard_with_count_and_totals_fixed_up_is_refused(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], helper: str
) -> None:
    src = make_ram(work_dir / "src.ram", "random", 2048)
    _, frames = _frames(export(work_dir, key, src, "reference", 2))
    kept = _shard_frames(frames, 0)
    bad = _write(work_dir / "bad.omh", _header(2048 * PAGE, 1), [*kept, _done(frames, 1024)])
    err = _refusal(work_dir, key, bad, capsys, helper)
    assert "refused IMPORT_BEGIN" in err and "status WRONG_SHARD" in err, err


@pytest.mark.parametrize("helper", TARGETS)
def test_duplicated_shard_is_refused(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], helper: str
) -> None:
    """Shard 0 also stands in for shard 1 (the same pages twice, counts fixed up)."""
    src = make_ram(work_dir / "src.ram", "random", 2048)
    _, frames = _frames(export(work_dir, key, src, "reference", 2))
    shard0 = _shard_frames(frames, 0)
    twice = [*shard0, *[(k, 1, p) for k, _, p in shard0], _done(frames, 2048)]
    err = _refusal(work_dir, key, _write(work_dir / "bad.omh", _header(2048 * PAGE, 2), twice), capsys, helper)
    assert "refused IMPORT_BEGIN" in err and "status WRONG_SHARD" in err, err


@pytest.mark.parametrize("helper", TARGETS)
def test_shard_of_another_export_is_refused(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], helper: str
) -> None:
    """Two exports of the same RAM; shard 1 of the second replaces shard 1 of the
    first. Every shard verifies on its own; the commit sees two migrations."""
    src = make_ram(work_dir / "src.ram", "random", 2048)
    header, first = _frames(export(work_dir, key, src, "reference", 2, "a.omh"))
    _, second = _frames(export(work_dir, key, src, "reference", 2, "b.omh"))
    mixed = [*_shard_frames(first, 0), *_shard_frames(second, 1), _done(first, 2048)]
    err = _refusal(work_dir, key, _write(work_dir / "bad.omh", header, mixed), capsys, helper)
    assert "refused IMPORT_COMMIT" in err and "status WRONG_MIGRATION" in err, err


@pytest.mark.parametrize("helper", TARGETS)
def test_container_guest_size_lie_is_refused(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], helper: str
) -> None:
    """The container claims a larger guest than the one the helpers sealed."""
    src = make_ram(work_dir / "src.ram", "random", 64)
    _, frames = _frames(export(work_dir, key, src, "reference", 1))
    err = _refusal(work_dir, key, _write(work_dir / "bad.omh", _header(128 * PAGE, 1), frames), capsys, helper)
    assert "refused IMPORT_BEGIN" in err and "status GUEST_SIZE_MISMATCH" in err, err


def _challenged_import(work_dir: Path, key: Path, stream: Path, dst: Path, helpers: int,
                       pages: int, helper: str = "reference") -> tuple[subprocess.Popen[str], Path]:
    """``ovmf-mh import --challenge-out`` started; returns it once its challenge exists."""
    challenge = work_dir / f"{dst.name}.challenge"
    importer = subprocess.Popen(
        [*OVMF_MH, "import", "--ram", str(dst), "--key", str(key), "--in", str(stream), "--helper", helper,
         "--helpers", str(helpers), "--guest-size", str(pages * PAGE), "--challenge-out", str(challenge),
         "--wait", "120", "--json", "--work-dir", str(work_dir / f"import-{dst.name}")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not challenge.exists():
        assert importer.poll() is None, importer.communicate()
        assert time.monotonic() < deadline, "no challenge file"
        time.sleep(0.05)
    return importer, challenge


@pytest.mark.parametrize("helper", TARGETS)
def test_bound_file_transfer_and_replay_of_the_old_stream(work_dir: Path, key: Path, helper: str) -> None:
    src = make_ram(work_dir / "src.ram", "mixed", 1024)
    stream = work_dir / "bound.omh"
    dst = work_dir / "dst.ram"
    importer, challenge = _challenged_import(work_dir, key, stream, dst, 2, 1024, helper)
    try:
        export(work_dir, key, src, "reference", 2, "bound.omh", "--challenge", challenge)
        out, err = importer.communicate(timeout=120)
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
    assert importer.returncode == 0, err
    assert '"bound": true' in out
    assert digest(dst) == digest(src)
    # The complete old stream, replayed to a fresh challenged import: refused.
    again = work_dir / "again.ram"
    replay, _ = _challenged_import(work_dir, key, stream, again, 2, 1024, helper)
    try:
        out, _ = replay.communicate(timeout=120)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
    assert replay.returncode == 1
    assert "refused IMPORT_BEGIN" in out and "status NONCE_MISMATCH" in out, out
    assert not again.exists()


@pytest.mark.parametrize("helper", TARGETS)
def test_unbound_stream_to_a_challenged_import_is_refused(work_dir: Path, key: Path, helper: str) -> None:
    src = make_ram(work_dir / "src.ram", "random", 64)
    stream = export(work_dir, key, src, "reference", 1)
    dst = work_dir / "dst.ram"
    importer, _ = _challenged_import(work_dir, key, stream, dst, 1, 64, helper)
    try:
        out, _ = importer.communicate(timeout=120)
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
    assert importer.returncode == 1
    assert "status UNBOUND_STREAM" in out, out
    assert not dst.exists()


# --- zero ranges: never-written memory (ABI 2.1) ----------------------------------


def make_sparse_ram(path: Path, pages: int, data_pages: list[int]) -> Path:
    """A sparse RAM file: random content in ``data_pages``, holes elsewhere."""
    rng = __import__("random").Random(path.name)
    with path.open("wb") as f:
        f.truncate(pages * PAGE)
        for number in data_pages:
            f.seek(number * PAGE)
            f.write(rng.randbytes(PAGE))
    return path


def data_pages(path: Path) -> list[int]:
    """Page numbers a sparse file holds data for (SEEK_DATA/SEEK_HOLE)."""
    found: list[int] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        position, size = 0, path.stat().st_size
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            position = os.lseek(fd, start, os.SEEK_HOLE)
            found.extend(range(start // PAGE, -(-position // PAGE)))
    finally:
        os.close(fd)
    return found


#: Data pages of the sparse test guest (2048 pages, 4 shard blocks of 2 MiB):
#: runs, single pages, the first and the last page; block 2 holds none;
#: everything else a hole.
SPARSE_DATA = [0, 1, 2, 100, 511, 512, 700, 701, 2047]
#: Pages per 2 MiB: under QEMU on this kernel one page written through a
#: helper VM's RAM mapping allocates the file's whole 2 MiB folio, whatever
#: the helper writes (an import of a single page does it too).
FOLIO_PAGES = 512


def _export_json(work: Path, key: Path, src: Path, helper: str, helpers: int, name: str,
                 capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, int]:
    capsys.readouterr()
    export(work, key, src, helper, helpers, name, "--json", *extra)
    summary: dict[str, int] = json.loads(capsys.readouterr().out)
    return summary


@pytest.mark.parametrize(("helper", "helpers"), [
    pytest.param("firmware", 2, marks=pytest.mark.qemu), ("reference", 1), ("reference", 3), ("host-core", 2)])
def test_sparse_guest_goes_as_zero_ranges(
    work_dir: Path, key: Path, helper: str, helpers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The holes of a sparse RAM file go as zero ranges; the import is byte
    identical, keeps the target file sparse in the holes, and the stream is
    a fraction of the page-by-page one (same RAM, --no-zero-ranges)."""
    src = make_sparse_ram(work_dir / "src.ram", 2048, SPARSE_DATA)
    assert data_pages(src) == SPARSE_DATA
    ranged = _export_json(work_dir, key, src, helper, helpers, "ranged.omh", capsys)
    assert ranged["zero_range_pages"] == 2048 - len(SPARSE_DATA)
    assert ranged["private_pages"] == 2048
    old = _export_json(work_dir, key, src, helper, helpers, "old.omh", capsys, "--no-zero-ranges")
    assert old["zero_range_pages"] == 0 and old["zero_pages"] == 2048 - len(SPARSE_DATA)
    # Beyond the data pages' records: a few 64-byte records against one 56-byte record per zero page.
    data = len(SPARSE_DATA) * s.PAGE_RECORD_SIZE
    ranged_rest = (work_dir / "ranged.omh").stat().st_size - data
    old_rest = (work_dir / "old.omh").stat().st_size - data
    assert 20 * ranged_rest < old_rest, (ranged_rest, old_rest)
    for name in ("ranged.omh", "old.omh"):
        dst = work_dir / f"dst-{name}.ram"
        capsys.readouterr()
        assert cli("import", "--ram", dst, "--key", key, "--in", work_dir / name, "--helper", helper,
                   "--work-dir", work_dir / f"import-{name}", "--json") == 0
        imported = json.loads(capsys.readouterr().out)
        assert imported["private_pages"] == 2048
        assert digest(dst) == digest(src)
        if name == "ranged.omh":
            assert imported["zero_range_pages"] == 2048 - len(SPARSE_DATA)
            written = data_pages(dst)
            if helper == "firmware":
                assert {p // FOLIO_PAGES for p in written} == {p // FOLIO_PAGES for p in SPARSE_DATA}, written
            else:
                assert written == SPARSE_DATA, "zero ranges wrote pages that were zero already"


def _zero_range_frames(frames: list[tuple[int, int, bytes]]) -> list[int]:
    """Indexes of the RECORDS frames that hold ZERO_RANGE records."""
    return [i for i, (k, _, p) in enumerate(frames) if k == ct.KIND_RECORDS and p
            and struct.unpack_from("<I", p)[0] == s.RECORD_ZERO_RANGE]


def _with_totals(frames: list[tuple[int, int, bytes]], change: Callable[[dict[str, Any]], None]) -> list[
        tuple[int, int, bytes]]:
    out = []
    for kind, shard, payload in frames:
        if kind == ct.KIND_DONE:
            fields = json.loads(payload)
            change(fields)
            payload = json.dumps(fields, sort_keys=True).encode()
        out.append((kind, shard, payload))
    return out


def _drop_key(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda fields: fields.pop(name)


def _add(name: str, amount: int) -> Callable[[dict[str, Any]], None]:
    def change(fields: dict[str, Any]) -> None:
        fields[name] += amount
    return change


#: Lies of the container about zero ranges -> the reason the import gives.
ZERO_RANGE_CONTAINER_LIES: dict[str, tuple[Callable[[list[tuple[int, int, bytes]]], list[tuple[int, int, bytes]]],
                                           str]] = {
    "DONE zero_range_pages too high": (lambda f: _with_totals(f, _add("zero_range_pages", 1)), "totals disagree"),
    "DONE zero_range_pages missing": (lambda f: _with_totals(f, _drop_key("zero_range_pages")), "totals disagree"),
    "DONE private_pages counts ranges as one page": (
        lambda f: _with_totals(f, _add("private_pages", -(2048 - len(SPARSE_DATA)) + len(_zero_range_frames(f)))),
        "totals disagree"),
    "zero-range frame dropped": (lambda f: [x for i, x in enumerate(f) if i != _zero_range_frames(f)[0]],
                                 "status SEQUENCE_GAP"),
    "zero-range frame duplicated": (
        lambda f: f[: _zero_range_frames(f)[0] + 1] + f[_zero_range_frames(f)[0] :], "status SEQUENCE_REPLAY"),
    "zero-range frame to the other shard": (
        lambda f: [(k, 1 - sh, p) if i == _zero_range_frames(f)[0] else (k, sh, p) for i, (k, sh, p) in enumerate(f)],
        "refused IMPORT_BATCH"),
    "page count flipped": (
        lambda f: [(k, sh, _flip(p, 40)) if i == _zero_range_frames(f)[0] else (k, sh, p)
                   for i, (k, sh, p) in enumerate(f)], "status AUTH_FAILED"),
    "range moved": (
        lambda f: [(k, sh, p[:16] + struct.pack("<Q", struct.unpack_from("<Q", p, 16)[0] + PAGE) + p[24:])
                   if i == _zero_range_frames(f)[0] else (k, sh, p) for i, (k, sh, p) in enumerate(f)],
        "status AUTH_FAILED"),
    "type changed to ZERO": (
        lambda f: [(k, sh, struct.pack("<I", s.RECORD_ZERO) + p[4:]) if i == _zero_range_frames(f)[0]
                   else (k, sh, p) for i, (k, sh, p) in enumerate(f)], "status BAD_RECORD"),
    "frame cut inside a record": (
        lambda f: [(k, sh, p[:-1]) if i == _zero_range_frames(f)[0] else (k, sh, p)
                   for i, (k, sh, p) in enumerate(f)], "status BAD_RECORD"),
}


@pytest.mark.parametrize("helper", TARGETS)
@pytest.mark.parametrize("lie", list(ZERO_RANGE_CONTAINER_LIES))
def test_zero_range_container_lies_are_refused(
    work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str], helper: str, lie: str
) -> None:
    src = make_sparse_ram(work_dir / "src.ram", 2048, SPARSE_DATA)
    header, frames = _frames(export(work_dir, key, src, "reference", 2))
    assert _zero_range_frames(frames)
    tamper, reason = ZERO_RANGE_CONTAINER_LIES[lie]
    err = _refusal(work_dir, key, _write(work_dir / "bad.omh", header, tamper(frames)), capsys, helper)
    assert reason in err, err


# --- shared pages: sealed per shard by the source helpers (ABI 4.0) ---------------------------------

SHARED_PAGES = 2048


def _shared_map(pages: int) -> bytes:
    """Every fifth page shared, every seventh (not fifth) excluded, the rest private."""
    return bytes(1 if n % 5 == 0 else 2 if n % 7 == 0 else 0 for n in range(pages))


@functools.cache
def _shared_stream(key_bytes: bytes) -> tuple[bytes, list[tuple[int, int, bytes]], bytes]:
    """(file header, frames, source RAM) of a 2-shard reference export with a page map."""
    root = paths.REPO_ROOT / "work"
    root.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shared-pages-", dir=root))
    try:
        key = work / "k.key"
        key.write_bytes(key_bytes)
        key.chmod(0o600)
        src = make_ram(work / "src.ram", "random", SHARED_PAGES)
        (work / "map.bin").write_bytes(_shared_map(SHARED_PAGES))
        header, frames = _frames(export(work, key, src, "reference", 2, "s.omh", "--page-map", work / "map.bin"))
        return header, frames, src.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shard_of_page(number: int) -> int:
    return (number // 512) % 2


def _plain_frame(number: int, content: bytes) -> tuple[int, int, bytes]:
    return (ct.KIND_PLAIN_PAGE, _shard_of_page(number), struct.pack("<Q", number * PAGE) + content)


def _fixed_done(frames: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The frames with DONE made consistent with their plain frames (count and
    unkeyed digest): what anyone on the path can do."""
    plain = [p for k, _, p in frames if k == ct.KIND_PLAIN_PAGE]
    index = next(i for i, f in enumerate(frames) if f[0] == ct.KIND_DONE)
    totals = ct.Totals.decode(frames[index][2])
    totals.shared_pages, totals.plain_digest = len(plain), hashlib.sha256(b"".join(plain)).hexdigest()
    return [*frames[:index], (ct.KIND_DONE, 0, totals.encode()), *frames[index + 1 :]]


def _end_of(frames: list[tuple[int, int, bytes]], shard: int) -> int:
    return next(i for i, f in enumerate(frames) if f[0] == ct.KIND_STREAM_END and f[1] == shard)


def _plain_of(frames: list[tuple[int, int, bytes]], shard: int) -> list[int]:
    return [i for i, f in enumerate(frames) if f[0] == ct.KIND_PLAIN_PAGE and f[1] == shard]


#: A private page (map 0, random content), in shard 1, and an excluded one, in shard 0.
PRIVATE_PAGE = next(n for n in range(512, 1024) if _shared_map(SHARED_PAGES)[n] == 0)
EXCLUDED_PAGE = next(n for n in range(512) if _shared_map(SHARED_PAGES)[n] == 2)
FORGED = b"\x66" * PAGE
Frames = list[tuple[int, int, bytes]]


def _insert(frames: Frames, at: int, frame: tuple[int, int, bytes]) -> Frames:
    return [*frames[:at], frame, *frames[at:]]


def _changed(frames: Frames) -> Frames:
    at = _plain_of(frames, 0)[3]
    k, sh, p = frames[at]
    return [*frames[:at], (k, sh, _flip(p, 8 + 100)), *frames[at + 1 :]]


def _reordered(frames: Frames) -> Frames:
    first, second = _plain_of(frames, 1)[:2]
    out = list(frames)
    out[first], out[second] = out[second], out[first]
    return out


def _other_shard(frames: Frames) -> Frames:
    at = _plain_of(frames, 0)[0]
    k, _, p = frames[at]
    return [*frames[:at], (k, 1, p), *frames[at + 1 :]]


def _done_lie(field: str, change: Callable[[Any], Any]) -> Callable[[Frames], Frames]:
    """DONE with one field changed (the frames before it as they were)."""
    def lie(frames: Frames) -> Frames:
        index = next(i for i, f in enumerate(frames) if f[0] == ct.KIND_DONE)
        totals = ct.Totals.decode(frames[index][2])
        setattr(totals, field, change(getattr(totals, field)))
        return [*frames[:index], (ct.KIND_DONE, 0, totals.encode())]
    return lie


#: Lie -> (what it does to the frames, the refusal). Every lie that changes
#: plain frames also fixes DONE up (count and unkeyed digest), so only the
#: helpers' seal or the receiver's frame checks can catch it.
SHARED_PAGE_LIES: dict[str, tuple[Callable[[Frames], Frames], str]] = {
    "forged page over a private page, before its record": (
        lambda f: _fixed_done(_insert(f, 0, _plain_frame(PRIVATE_PAGE, FORGED))),
        "status SHARED_PAGES_MISMATCH"),
    "forged page over a private page, after its record": (
        lambda f: _fixed_done(_insert(f, _end_of(f, 1), _plain_frame(PRIVATE_PAGE, FORGED))),
        "a helper record of this stream carried that page"),
    "forged page over an excluded page": (
        lambda f: _fixed_done(_insert(f, _end_of(f, 0), _plain_frame(EXCLUDED_PAGE, FORGED))),
        "status SHARED_PAGES_MISMATCH"),
    "changed shared page": (lambda f: _fixed_done(_changed(f)), "status SHARED_PAGES_MISMATCH"),
    "dropped plain frame": (
        lambda f: _fixed_done([x for i, x in enumerate(f) if i != _plain_of(f, 1)[-1]]),
        "status SHARED_PAGES_MISMATCH"),
    "duplicated plain frame": (
        lambda f: _fixed_done(_insert(f, _plain_of(f, 0)[0], f[_plain_of(f, 0)[0]])),
        "status SHARED_PAGES_MISMATCH"),
    "reordered plain frames": (lambda f: _fixed_done(_reordered(f)), "status SHARED_PAGES_MISMATCH"),
    "plain frame after its shard's end": (
        lambda f: _fixed_done(_insert(f, _end_of(f, 0) + 1, (ct.KIND_PLAIN_PAGE, 0, f[_plain_of(f, 0)[0]][2]))),
        "after the end record of shard 0"),
    "plain frame in another shard": (lambda f: _fixed_done(_other_shard(f)), "the page belongs to shard 0"),
    "DONE: one shared page more": (_done_lie("shared_pages", lambda n: n + 1), "totals disagree"),
    "DONE: one private page less": (_done_lie("private_pages", lambda n: n - 1), "totals disagree"),
    "DONE: another plain digest": (_done_lie("plain_digest", lambda _: "00" * 32),
                                   "plain pages do not match the DONE frame's digest"),
}


@pytest.fixture
def shared_key(work_dir: Path) -> Path:
    """A fixed transport key, so that every test of the table imports the same (cached) export."""
    path = work_dir / "shared.key"
    path.write_bytes(bytes(range(0x10, 0x30)))
    path.chmod(0o600)
    return path


def test_shared_page_lies_are_not_no_ops(shared_key: Path) -> None:
    """Guard for the table: every lie changes the container, and the honest
    one carries shared pages in both shards and ends with DONE."""
    _, frames, _ = _shared_stream(shared_key.read_bytes())
    assert _plain_of(frames, 0) and _plain_of(frames, 1) and frames[-1][0] == ct.KIND_DONE
    assert _shared_map(SHARED_PAGES)[PRIVATE_PAGE] == 0 and _shard_of_page(PRIVATE_PAGE) == 1
    for lie, (tamper, _) in SHARED_PAGE_LIES.items():
        assert tamper(frames) != frames, lie


@pytest.mark.parametrize("helper", TARGETS)
def test_honest_shared_pages_import(work_dir: Path, shared_key: Path, helper: str) -> None:
    header, frames, source = _shared_stream(shared_key.read_bytes())
    stream = _write(work_dir / "good.omh", header, frames)
    dst = work_dir / "dst.ram"
    assert import_(work_dir, shared_key, stream, dst, helper) == 0
    result, page_map = dst.read_bytes(), _shared_map(SHARED_PAGES)
    for n in range(SHARED_PAGES):
        page = slice(n * PAGE, (n + 1) * PAGE)
        assert result[page] == (bytes(PAGE) if page_map[n] == 2 else source[page]), n


@pytest.mark.parametrize("helper", TARGETS)
@pytest.mark.parametrize("lie", list(SHARED_PAGE_LIES))
def test_shared_page_lies_are_refused(
    work_dir: Path, shared_key: Path, capsys: pytest.CaptureFixture[str], helper: str, lie: str
) -> None:
    """No frame outside the helpers' records writes a page the import keeps:
    each lie is refused by name and DST never appears."""
    header, frames, _ = _shared_stream(shared_key.read_bytes())
    tamper, reason = SHARED_PAGE_LIES[lie]
    err = _refusal(work_dir, shared_key, _write(work_dir / "bad.omh", header, tamper(frames)), capsys, helper)
    assert reason in err, err
    if reason.startswith("status "):
        assert "refused IMPORT_END" in err, err


def test_record_offsets_reads_every_clear_guest_offset() -> None:
    """The receiver's view of which pages a RECORDS frame names: PAGE, ZERO and
    ZERO_RANGE records alike (a range by its first page), the all-PAGE fast
    path and the mixed path agreeing, and nothing past a malformed record."""
    writer = s.StreamWriter(bytes(32), bytes(32), 2048 * PAGE, s.Binding.unbound(bytes(32), 0, 1))
    pages = b"".join(writer.page_record(n * PAGE, bytes([n]) * PAGE) for n in (7, 3, 9))
    assert list(ct.record_offsets(pages)) == [7 * PAGE, 3 * PAGE, 9 * PAGE]
    mixed = writer.page_record(5 * PAGE, bytes(PAGE)) + writer.zero_range_record(16 * PAGE, 8) + pages
    assert list(ct.record_offsets(mixed)) == [5 * PAGE, 16 * PAGE, 7 * PAGE, 3 * PAGE, 9 * PAGE]
    broken = mixed[:60] + struct.pack("<I", 99) + mixed[64:]  # the second record's PayloadSize
    assert list(ct.record_offsets(broken)) == [5 * PAGE]
    assert list(ct.record_offsets(b"")) == []
    # A record cut short still names its page (its header is whole): more pages
    # counted as private, never fewer; its helper refuses the frame anyway.
    assert list(ct.record_offsets(pages[:-1])) == [7 * PAGE, 3 * PAGE, 9 * PAGE]


def test_version_1_container_is_refused_at_its_header() -> None:
    """Made before ABI 4.0: its shared pages are unsealed; refused before any frame, saying what to do."""
    old = ct.FILE_HEADER.pack(ct.MAGIC, 1, ct.FILE_HEADER.size, 0, 16 * PAGE, 1, 0)
    with pytest.raises(ct.ContainerError, match=r"version 1 .*export it again"):
        ct.read_file_header(io.BytesIO(old))


def _rekind(frames: Frames, kind: int, new_kind: int, shard: int = 0) -> Frames:
    """The first frame of ``kind`` in ``shard`` relabelled ``new_kind`` (payload unchanged)."""
    at = next(i for i, f in enumerate(frames) if f[0] == kind and f[1] == shard and f[2])
    return [*frames[:at], (new_kind, shard, frames[at][2]), *frames[at + 1 :]]


#: The frame header's kind, lied about: who notices (docs/transfer-format.md, "Every field").
KIND_LIES: dict[str, tuple[Callable[[Frames], Frames], str]] = {
    "STREAM_END as RECORDS": (lambda f: _rekind(f, ct.KIND_STREAM_END, ct.KIND_RECORDS), "status BAD_RECORD"),
    "PLAIN_PAGE as RECORDS": (lambda f: _rekind(f, ct.KIND_PLAIN_PAGE, ct.KIND_RECORDS), "status BAD_RECORD"),
    "RECORDS as PLAIN_PAGE": (lambda f: _rekind(f, ct.KIND_RECORDS, ct.KIND_PLAIN_PAGE), "PLAIN_PAGE frame of"),
    "RECORDS as STREAM_END": (lambda f: _rekind(f, ct.KIND_RECORDS, ct.KIND_STREAM_END), "STREAM_END frame of"),
}


@pytest.mark.parametrize("helper", TARGETS)
@pytest.mark.parametrize("lie", list(KIND_LIES))
def test_frame_kind_lies_are_refused(
    work_dir: Path, shared_key: Path, capsys: pytest.CaptureFixture[str], helper: str, lie: str
) -> None:
    header, frames, _ = _shared_stream(shared_key.read_bytes())
    tamper, reason = KIND_LIES[lie]
    err = _refusal(work_dir, shared_key, _write(work_dir / "bad.omh", header, tamper(frames)), capsys, helper)
    assert reason in err, err
