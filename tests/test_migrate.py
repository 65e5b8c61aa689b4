"""Live migration of a real running guest through the firmware helpers."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

from helper import abi
from host_shim.migration.convergence import THROTTLE_MAX, ConvergenceSettings
from host_shim.migration.migrate import MigrationConfig, migrate
from host_shim.vm.qemu import QemuVM

pytestmark = [pytest.mark.qemu, pytest.mark.firmware]

A = abi.load()


def test_live_migration_keeps_the_guest_running_and_its_memory_intact(firmware: Path, work_dir: Path) -> None:
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert report.guest_state == "running on target"
    assert report.ram_identical is True
    # The RAM file is on ext4: the log drives the switchover (with the full
    # check beside it only if the log got older than the flusher's expiry).
    assert report.switchover_check == "dirty-log" or (report.switchover_reason or "").startswith("log in doubt"), \
        "\n".join(report.describe())
    # The guest writes between the last pass and 'stop', unless the throttle
    # held it stopped for most of that time (a loaded machine).
    assert report.passes[-1].logged == report.log_pages
    assert report.log_pages > 0 or report.throttle["max_level"] > 0, "\n".join(report.describe())
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
    assert len(report.passes) >= 2
    assert report.passes[0].pages == 256 * 256  # the full first pass
    assert not report.passes[-1].guest_running and all(p.guest_running for p in report.passes[:-1])
    assert 0 < report.downtime_seconds < report.total_seconds
    # The RAM check: asked of the target, timed, and the guest's stopped
    # time is the downtime plus it.
    assert report.target is not None and report.target["ram_digest_asked"] is True
    assert report.verify_seconds >= report.target["digest_ms"] / 1000 > 0
    assert report.stopped_seconds == pytest.approx(report.downtime_seconds + report.verify_seconds)
    assert "CORRUPTION" not in (work_dir / "target" / "serial.log").read_text(errors="replace")


def test_without_the_ram_check_the_stopped_guest_waits_for_no_hashing(firmware: Path, work_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-verify-ram: the target is not asked for its RAM digest, so
    neither side hashes a RAM file while the guest is stopped (that was
    downtime the report put in the device-state step), and the guest's
    stopped time is the downtime."""
    from host_shim.migration import migrate as source_role
    from host_shim.migration import migrate_target
    from host_shim.migration.migration_vm import ram_digest

    hashed: list[str] = []

    def counted(role: str) -> Callable[[Path, int], list[str]]:
        def wrapper(path: Path, size: int) -> list[str]:
            hashed.append(role)
            return ram_digest(path, size)
        return wrapper

    monkeypatch.setattr(migrate_target, "ram_digest", counted("target"))
    monkeypatch.setattr(source_role, "ram_digest", counted("source"))
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False, verify_ram=False))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert hashed == []
    assert report.ram_identical is None and report.verify_seconds == 0
    assert report.target is not None and report.target["ram_digest_asked"] is False
    assert report.target["digest_ms"] == 0
    assert report.stopped_seconds == report.downtime_seconds > 0
    assert "guest stopped" in report.describe()[1] and "(no RAM check)" in report.describe()[1]
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat


def test_reference_helpers_with_ram_files_on_tmpfs(firmware: Path, work_dir: Path) -> None:
    """The reference helper processes as helpers, the RAM files in a tmpfs
    folder for the run only (tmpfs keeps no dirty log: the full check, asked
    for): the same exact result, and nothing left there."""
    shm = Path("/dev/shm")
    # Every Linux the project runs on has it (glibc's POSIX shared memory): no skip.
    assert shm.is_dir() and os.access(shm, os.W_OK), "no writable /dev/shm on this machine"
    ram_dir = Path(tempfile.mkdtemp(prefix="ovmf-mh-test-", dir=shm))
    try:
        report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helper="reference", helpers=1,
                                         progress=False, ram_dir=ram_dir, switchover="full-check"))
        assert report.outcome == "ok", "\n".join(report.describe())
        assert report.ram_identical is True
        assert report.switchover_check == "full-check" and report.log_missed_pages is None
        assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
        assert list(ram_dir.iterdir()) == []
        assert not list(work_dir.glob("*.ram"))
    finally:
        shutil.rmtree(ram_dir, ignore_errors=True)


def test_pages_changed_and_changed_back_are_resent_and_the_run_draws_its_passes(
    firmware: Path, work_dir: Path
) -> None:
    """The ABA case: the source guest's workload keeps 64 pages at fixed
    content and flips each to other bytes and back, over and over, while
    the helpers read them (a read mid-flip seals bytes the page no longer
    holds, and a comparison of old and new bytes calls such a page
    unchanged). The dirty log marks every write, so the target's RAM is
    identical at switchover; --verify-all's full CHECK_PAGES finds no page
    the log missed. Then the report is drawn (ovmf-mh migrate --plot)."""
    from host_shim.devtools.plots import plot_migration

    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False, aba_pages=64,
                                     verify_all=True))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert report.switchover_check == "dirty-log + full CHECK_PAGES"
    assert report.ram_identical is True
    assert report.log_missed_pages == 0, "\n".join(report.describe())
    # The kernel's write record backed the log (root and tracefs here).
    assert report.log_trace.startswith("page cache + "), report.log_trace
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
    # The flips really ran on the source until it stopped: its heartbeats count them.
    source_serial = (work_dir / "source" / "serial.log").read_text(errors="replace")
    flips = [int(m) for m in re.findall(r"HB seq=\d+ .*aba=(\d+) errors=0", source_serial)]
    assert len(flips) >= 2 and flips[-1] > flips[0] > 0
    assert "CORRUPTION" not in (work_dir / "target" / "serial.log").read_text(errors="replace")
    picture = work_dir / "passes.png"
    plot_migration(report.as_json(), picture)
    import matplotlib.image

    pixels = matplotlib.image.imread(picture)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 10, "more than a blank image"


def _commands_served(own_ram: Path) -> int:
    """CommandsServed of the helper whose own RAM file this is, read through
    the host's view of the file (the mailbox is at OVMF_MH_MAILBOX_MIN_BASE)."""
    layout = A.layout("OVMF_MH_MAILBOX_HEADER")
    base = A.const("OVMF_MH_MAILBOX_MIN_BASE")
    with own_ram.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as memory:
        header = layout.unpack(memory[base : base + layout.size])
    served: int = header["CommandsServed"]
    return served


def _own_ram(helper_dir: Path) -> Path:
    """The helper VM's own RAM file, through its QEMU's open descriptor (the
    file lives in a private folder and may be unlinked once QEMU maps it: it
    holds the key)."""
    pid = int((helper_dir / "qemu.pid").read_text())
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if "helper-own.ram" in os.readlink(fd):
            return fd
    raise ValueError(f"QEMU {pid} has no helper-own.ram open")


#: Commands the target helper must have served before the kill: IMPORT_BEGIN
#: and at least 3 IMPORT_BATCH of 512 pages (a full first pass of the 256 MiB
#: guest is 128 batches): pages are certainly moving.
SERVED_BEFORE_KILL = 4


def test_target_helper_killed_mid_migration_leaves_the_source_running(firmware: Path, work_dir: Path) -> None:
    helper_dir = work_dir / "target-helpers" / "helper-0"
    killed: list[int] = []
    served_at_kill: list[int] = []

    def kill_target_helper() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            pid_file = helper_dir / "qemu.pid"
            try:
                served = _commands_served(_own_ram(helper_dir)) if pid_file.exists() else 0
            except (OSError, ValueError):  # not created yet, or already gone
                served = 0
            if served >= SERVED_BEFORE_KILL:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                served_at_kill.append(served)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_target_helper, daemon=True)
    killer.start()
    started = time.monotonic()
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False))
    killer.join(timeout=5)
    assert killed, "the target helper never imported pages"
    assert served_at_kill[0] >= SERVED_BEFORE_KILL
    assert report.outcome == "failed"
    assert report.guest_state == "running on source", "\n".join(report.describe())
    assert report.source_heartbeat_after_failure is not None and "errors=0" in report.source_heartbeat_after_failure
    assert report.error is not None and "exited" in report.error
    assert time.monotonic() - started < 240


def _throttle_commands(qmp_log: Path) -> list[str]:
    """The source QEMU's stop and cont commands, in order, from its qmp.log."""
    text = qmp_log.read_text(errors="replace") if qmp_log.exists() else ""
    return re.findall(r'> \{"execute": "(stop|cont)"', text)


def test_a_small_downtime_limit_throttles_the_guest_and_it_runs_on_the_target(firmware: Path, work_dir: Path) -> None:
    """A downtime limit of 1 ms no pass can meet: from the second pass on
    the guest is throttled (QMP stop/cont), the pass limit ends pre-copy,
    and the guest goes on on the target, its memory intact."""
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False,
                                     convergence=ConvergenceSettings(downtime_limit_ms=1)))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert report.guest_state == "running on target" and report.ram_identical is True
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
    throttle = report.throttle
    assert throttle["cycles"] > 0 and 0 < throttle["max_level"] <= THROTTLE_MAX and throttle["error"] is None
    assert 0 < throttle["stopped_seconds"] <= throttle["engaged_seconds"]
    decisions = throttle["decisions"]
    assert decisions and not decisions[0]["switch"] and decisions[-1]["switch"]
    assert [d["throttle"] for d in decisions] == sorted(d["throttle"] for d in decisions)
    # Every throttle stop was followed by its cont; the switchover's stop is the last command.
    commands = _throttle_commands(work_dir / "source" / "qmp.log")
    assert commands[-1] == "stop" and commands[:-1] == ["stop", "cont"] * throttle["cycles"]
    assert "throttled up to" in "\n".join(report.describe())
    assert "CORRUPTION" not in (work_dir / "target" / "serial.log").read_text(errors="replace")


def test_a_target_killed_mid_throttle_leaves_the_source_guest_running(firmware: Path, work_dir: Path) -> None:
    """The target QEMU killed while the throttle runs (a stop and its cont
    seen in the source's qmp.log): the migration fails, the throttle ends
    with a cont, and the source guest runs and beats."""
    killed: list[int] = []

    def kill_target_mid_throttle() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if _throttle_commands(work_dir / "source" / "qmp.log")[:2] == ["stop", "cont"]:
                pid = int((work_dir / "target" / "qemu.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_target_mid_throttle, daemon=True)
    killer.start()
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False,
                                     convergence=ConvergenceSettings(downtime_limit_ms=1)))
    killer.join(timeout=5)
    assert killed, "the throttle never engaged"
    assert report.outcome == "failed", "\n".join(report.describe())
    assert report.guest_state == "running on source", "\n".join(report.describe())
    assert report.source_heartbeat_after_failure is not None and "errors=0" in report.source_heartbeat_after_failure
    assert report.throttle["cycles"] > 0
    # The throttle's last command was its cont, before the run looked at the
    # guest (query-status said running), and it sent nothing after the run.
    commands = _throttle_commands(work_dir / "source" / "qmp.log")
    assert commands[-1] == "cont" and commands == ["stop", "cont"] * (len(commands) // 2)
    time.sleep(0.5)
    assert _throttle_commands(work_dir / "source" / "qmp.log") == commands


def test_a_target_that_leaves_in_the_handshake_stops_the_source_helpers_started_beside_it(
    firmware: Path, work_dir: Path
) -> None:
    """The source helpers start while the target prepares. A target that
    reads the source's hello and closes the connection a second later: the
    run fails with the handshake's error, waits for the helpers' start,
    stops them by their pids, and the guest was never touched (running,
    beating)."""
    import socket

    from host_shim.helpers.keys import generate_key

    server = socket.create_server(("127.0.0.1", 0))
    described: list[bytes] = []

    def leave_after_the_hello() -> None:
        connection, _ = server.accept()
        with connection:
            connection.settimeout(120)
            while b'"hello"' not in b"".join(described):
                chunk = connection.recv(65536)
                if not chunk:
                    return
                described.append(chunk)
            time.sleep(1.0)  # the source helpers are starting meanwhile

    fake = threading.Thread(target=leave_after_the_hello, daemon=True)
    fake.start()
    key = work_dir / "transport.key"
    generate_key(key)
    try:
        report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False,
                                         key_file=key, target=server.getsockname()[:2]))
    finally:
        server.close()
    fake.join(timeout=5)
    assert described, "the source never said hello"
    assert report.outcome == "failed" and "closed the connection" in (report.error or ""), report.error
    assert report.guest_state == "running on source", "\n".join(report.describe())
    assert report.source_heartbeat_after_failure is not None
    pid_files = list((work_dir / "source-helpers").rglob("qemu.pid"))
    assert pid_files, "the source helpers were not started beside the handshake"
    for pid_file in pid_files:
        assert not Path(f"/proc/{int(pid_file.read_text())}").exists() or \
            Path(f"/proc/{int(pid_file.read_text())}/stat").read_text().split(") ")[1][0] == "Z"


def test_target_qemu_dying_after_switchover_is_reported(firmware: Path, work_dir: Path) -> None:
    def kill_target(target: QemuVM) -> None:
        assert target.pid is not None
        os.kill(target.pid, signal.SIGKILL)

    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False,
                                     after_switchover=kill_target))
    assert report.outcome == "failed"
    assert report.error is not None and "after switchover" in report.error
    assert "lost" in report.guest_state


def test_a_failed_migration_keeps_every_qemus_logs_and_names_them(firmware: Path, private_tmpdir: Path) -> None:
    """`ovmf-mh migrate` without --work-dir (a temporary work folder), a
    target helper SIGKILLed once it imports pages: the command fails, and
    the command line, debugcon, serial and QMP logs of every QEMU it ran,
    the killed target helper's included, are still there afterwards, each
    named by path on stderr."""
    killed: list[int] = []

    def kill_target_helper() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for pid_file in private_tmpdir.glob("ovmf-mh-migrate-*/target-helpers/helper-0/qemu.pid"):
                with suppress(OSError, ValueError):
                    if _commands_served(_own_ram(pid_file.parent)) >= SERVED_BEFORE_KILL:
                        pid = int(pid_file.read_text())
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_target_helper, daemon=True)
    killer.start()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ovmf-mh"), "migrate", "--image", str(firmware), "--json",
         "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    killer.join(timeout=5)
    assert killed, f"the target helper never imported pages: {result.stderr[-2000:]}"
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["outcome"] == "failed" and "exited" in report["error"]
    work = Path(report["work_dir"])
    assert work.parent == private_tmpdir and work.is_dir(), "the temporary work folder was not kept"
    roles = {"source", "target", "source-helpers/helper-0", "target-helpers/helper-0"}
    assert set(report["logs"]) == roles, report["logs"]
    for role in roles:
        logs = report["logs"][role]
        for kind, name in (("cmdline", "qemu-cmdline.txt"), ("debugcon", "debugcon.log"),
                           ("serial", "serial.log"), ("qmp", "qmp.log")):
            path = Path(logs[kind])
            assert path == work / role / name and path.is_file(), (role, kind, logs)
            assert str(path) in result.stderr, f"{path} not named in the error:\n{result.stderr[-3000:]}"
        assert "qemu-system" in Path(logs["cmdline"]).read_text()
        assert "query-status" in Path(logs["qmp"]).read_text()
    helper = report["logs"]["target-helpers/helper-0"]
    assert "READY" in Path(helper["debugcon"]).read_text(errors="replace")
    assert "HB seq=" in Path(report["logs"]["source"]["serial"]).read_text(errors="replace")
    assert str(killed[0]) in (work / "target-helpers" / "helper-0" / "qemu.pid").read_text()
