"""Guards a mutation audit found no test for: each test fails when its
guard is broken (keygen's chmod, the helper memory file's mode, the
reaper's start-time check, boot_image(HELPER)'s verdict) and a planted
symbolic link never redirects what a command writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import ci_provides
import pytest

from host_shim.cli import main
from host_shim.firmware import boot
from host_shim.firmware.boot import BootMode, boot_image
from host_shim.helpers.helper_memory import HelperMemory
from host_shim.helpers.keys import secret_page_base
from host_shim.vm import reaper

PAGE = 4096


def test_keygen_force_over_an_existing_0644_file_leaves_it_0600(work_dir: Path) -> None:
    out = work_dir / "old.key"
    out.write_bytes(b"x" * 32)
    out.chmod(0o644)
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_bytes() != b"x" * 32


def test_keygen_never_writes_through_a_planted_link(work_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = work_dir / "victim"
    victim.write_bytes(b"keep me")
    (work_dir / "k.key").symlink_to(victim)
    assert main(["keygen", "--out", str(work_dir / "k.key"), "--force"]) == 1
    assert "a symbolic link to" in capsys.readouterr().err
    assert victim.read_bytes() == b"keep me"


def test_the_helper_memory_file_holding_the_key_is_private() -> None:
    memory = HelperMemory(secret_page_base() + 2 * PAGE, bytes(range(32)))
    try:
        assert memory.path.stat().st_mode & 0o777 == 0o600
        assert memory.folder.stat().st_mode & 0o777 == 0o700
    finally:
        memory.close()
    assert not memory.path.exists()


def test_the_reaper_signals_a_pid_only_if_its_start_time_matches() -> None:
    """A registered pid whose start time differs (the pid was reused by
    another process) is not signalled; with the recorded start time it is."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = reaper.start_time(sleeper.pid)
        assert started is not None
        reaper._reap({sleeper.pid: started + 1}, [], {})
        time.sleep(0.2)
        assert sleeper.poll() is None, "a pid with another start time was signalled"
        reaper._reap({sleeper.pid: started}, [], {})
        assert sleeper.wait(timeout=10) == -9
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


@pytest.mark.qemu
def test_boot_helper_reports_a_ready_helper(firmware: Path, work_dir: Path) -> None:
    outcome = boot_image(firmware, BootMode.HELPER, work_dir, timeout=120)
    assert outcome.ok, outcome.describe()
    assert any(d.startswith("READY: ABI") for d in outcome.details)
    assert any(d.startswith("QUERY answered") for d in outcome.details)
    assert "SHUTDOWN: QEMU exited with code 0" in outcome.details


@pytest.mark.qemu
def test_boot_helper_reports_failure_when_a_check_fails(
        firmware: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The same real helper, judged against a diversion message it never
    prints: boot_image must say it failed, and `boot --mode helper` exit 1."""
    monkeypatch.setattr(boot, "DIVERSION_MARKER", "a message no helper prints")
    outcome = boot_image(firmware, BootMode.HELPER, work_dir / "direct", timeout=120)
    assert not outcome.ok
    assert "debugcon lacks the diversion message" in outcome.details
    assert main(["boot", "--mode", "helper", "--image", str(firmware), "--work-dir", str(work_dir / "cli")]) == 1
    assert "debugcon lacks the diversion message" in capsys.readouterr().out


# --- partial files next to a path the user chose ----------------------------------------------


@pytest.fixture
def key(work_dir: Path) -> Path:
    path = work_dir / "transport.key"
    assert main(["keygen", "--out", str(path)]) == 0
    return path


def _ram(work_dir: Path) -> Path:
    ram = work_dir / "src.ram"
    ram.write_bytes(bytes(range(256)) * (16 * PAGE // 256))
    return ram


def test_export_leaves_a_link_planted_at_its_partial_file_and_its_target_untouched(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = work_dir / "victim"
    victim.write_bytes(b"keep me")
    (work_dir / ".s.omh.partial").symlink_to(victim)
    assert main(["export", "--ram", str(_ram(work_dir)), "--key", str(key), "--out", str(work_dir / "s.omh"),
                 "--helper", "reference", "--work-dir", str(work_dir / "e")]) == 1
    err = capsys.readouterr().err
    assert f"is in the way: it is a symbolic link to {victim}" in err, err
    assert victim.read_bytes() == b"keep me"
    assert (work_dir / ".s.omh.partial").is_symlink() and not (work_dir / "s.omh").exists()


def test_export_replaces_a_leftover_partial_file_and_its_stream_is_private(work_dir: Path, key: Path) -> None:
    (work_dir / ".s.omh.partial").write_bytes(b"left by a killed export")
    assert main(["export", "--ram", str(_ram(work_dir)), "--key", str(key), "--out", str(work_dir / "s.omh"),
                 "--helper", "reference", "--work-dir", str(work_dir / "e")]) == 0
    assert (work_dir / "s.omh").read_bytes().startswith(b"OMHXFER1")
    assert (work_dir / "s.omh").stat().st_mode & 0o777 == 0o600


def test_import_leaves_a_link_planted_at_its_partial_file_and_its_target_untouched(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--ram", str(_ram(work_dir)), "--key", str(key), "--out", str(work_dir / "s.omh"),
                 "--helper", "reference", "--work-dir", str(work_dir / "e")]) == 0
    victim = work_dir / "victim"
    victim.write_bytes(b"keep me")
    (work_dir / ".dst.ram.ovmf-mh-partial").symlink_to(victim)
    assert main(["import", "--ram", str(work_dir / "dst.ram"), "--key", str(key), "--in", str(work_dir / "s.omh"),
                 "--helper", "reference", "--work-dir", str(work_dir / "i")]) == 1
    err = capsys.readouterr().err
    assert f"is in the way: it is a symbolic link to {victim}" in err, err
    assert victim.read_bytes() == b"keep me" and not (work_dir / "dst.ram").exists()
    # Without the link the same import works, and the guest RAM it writes is private.
    (work_dir / ".dst.ram.ovmf-mh-partial").unlink()
    assert main(["import", "--ram", str(work_dir / "dst.ram"), "--key", str(key), "--in", str(work_dir / "s.omh"),
                 "--helper", "reference", "--work-dir", str(work_dir / "i2")]) == 0
    assert (work_dir / "dst.ram").read_bytes() == (work_dir / "src.ram").read_bytes()
    assert (work_dir / "dst.ram").stat().st_mode & 0o777 == 0o600


def test_challenge_out_leaves_a_link_planted_at_its_partial_file_and_its_target_untouched(
        work_dir: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = work_dir / "victim"
    victim.write_bytes(b"keep me")
    (work_dir / ".ch.partial").symlink_to(victim)
    assert main(["import", "--ram", str(work_dir / "dst.ram"), "--key", str(key), "--in", str(work_dir / "s.omh"),
                 "--helper", "reference", "--helpers", "1", "--guest-size", str(16 * PAGE), "--challenge-out",
                 str(work_dir / "ch"), "--wait", "1", "--work-dir", str(work_dir / "i")]) == 1
    err = capsys.readouterr().err
    assert f"is in the way: it is a symbolic link to {victim}" in err, err
    assert victim.read_bytes() == b"keep me" and not (work_dir / "ch").exists()
    assert os.path.islink(work_dir / ".ch.partial")


def test_a_missing_thing_ci_provides_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI provides it"):
        ci_provides.missing("Debian's ovmf package is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="Debian's ovmf package is not installed"):
        ci_provides.missing("Debian's ovmf package is not installed")
