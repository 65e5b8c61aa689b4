"""Migrating a guest the user already runs: `ovmf-mh guest start` starts
the test guest detached, `ovmf-mh migrate-incoming` and `ovmf-mh migrate
--to --qmp --ram` (two programs) migrate it, `ovmf-mh guest stop` ends it by
its recorded pid; and every attach check refuses a guest that does not fit,
with its reason named, leaving the guest as it was.

Each test's work folder holds the QEMU command lines and logs (listed on
failure). Every QEMU a test starts is ended by its own pid, also when the
test fails: the ones it starts itself by their context managers, the
detached guest by 'guest stop' and then by the pid in its qemu.pid, the
programs' QEMUs by their programs' reapers and then by the pids in their
qemu.pid files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import pytest
from ci_provides import missing
from tcp_states import close_wait_sockets

from host_shim.migration.attach import REASONS
from host_shim.migration.guest_description import MAX_GUEST_MIB
from host_shim.migration.migration_vm import MIB, guest_config
from host_shim.vm import debian_vm, guest, guest_image
from host_shim.vm.attached import AttachedQemu
from host_shim.vm.devices import DeviceModel
from host_shim.vm.qemu import QemuVM

pytestmark = [pytest.mark.qemu, pytest.mark.firmware]

OVMF_MH = Path(sys.executable).parent / "ovmf-mh"
SIZE = 256 * MIB


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _qemu_pids(work: Path) -> list[int]:
    pids = []
    for pid_file in work.rglob("qemu.pid"):
        with suppress(ValueError, OSError):
            pids.append(int(pid_file.read_text()))
    return pids


def _kill_leftovers(work: Path) -> None:
    """SIGKILL, by their own pids, the QEMUs whose pid files are in ``work``
    and that still run (the backstop after every orderly stop)."""
    for pid in _qemu_pids(work):
        if _alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _run(argv: list[str], work: Path, name: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """An ovmf-mh command to its end, its output kept in the work folder."""
    result = subprocess.run([str(OVMF_MH), *argv], capture_output=True, text=True, timeout=timeout)
    (work / f"{name}.stdout").write_text(result.stdout)
    (work / f"{name}.stderr").write_text(result.stderr)
    return result


class Program:
    """An ovmf-mh command in the background, its output in the work folder."""

    def __init__(self, argv: list[str], work: Path, name: str) -> None:
        self.stdout_path = work / f"{name}.stdout"
        self.stderr_path = work / f"{name}.stderr"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen([str(OVMF_MH), *argv], stdout=self._out, stderr=self._err)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def report(self) -> dict[str, Any]:
        try:
            body: dict[str, Any] = json.loads(self.stdout_path.read_text())
        except ValueError:
            raise AssertionError(f"no JSON report; {self.stderr_path}: {self.stderr()[-3000:]}") from None
        return body

    def end(self) -> None:
        """SIGKILL by its own pid if it still runs (its reaper stops its QEMUs)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._out.close()
        self._err.close()


@pytest.fixture
def programs(work_dir: Path) -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        program.end()
    _kill_leftovers(work_dir)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for QMP sockets (unix socket paths stop at 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="omh-att-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def detached_guest(work_dir: Path, short_dir: Path) -> Iterator[dict[str, Any]]:
    """The test guest started by 'ovmf-mh guest start' (first heartbeat
    seen), stopped by 'ovmf-mh guest stop' and, should that fail, killed by
    the pid in its qemu.pid."""
    folder = work_dir / "guest"
    try:
        result = _run(["guest", "start", "--work-dir", str(folder), "--qmp", str(short_dir / "qmp.sock"),
                       "--json"], work_dir, "guest-start")
        assert result.returncode == 0, f"guest start failed: {result.stderr[-3000:]}"
        record: dict[str, Any] = json.loads(result.stdout)
        yield record
    finally:
        _run(["guest", "stop", "--work-dir", str(folder)], work_dir, "guest-stop-cleanup")
        _kill_leftovers(folder)


@pytest.fixture
def key(work_dir: Path) -> Path:
    path = work_dir / "transport.key"
    subprocess.run([str(OVMF_MH), "keygen", "--out", str(path)], check=True, capture_output=True)
    return path


def _heartbeats(serial: Path) -> list[int]:
    return [int(n) for n in re.findall(r"HB seq=(\d+) ", serial.read_text(errors="replace"))]


def _status(qmp: Path, work: Path) -> str:
    with AttachedQemu(qmp, work, "check") as vm:
        status: str = vm.qmp("query-status")["status"]
        return status


def _target(programs: list[Program], work: Path, key: Path, ram_dir: Path) -> tuple[Program, int]:
    """'ovmf-mh migrate-incoming' on a free loopback port, and that port."""
    target = Program(["migrate-incoming", "--listen", "127.0.0.1:0", "--key", str(key), "--work-dir",
                      str(work / "target"), "--ram-dir", str(ram_dir), "--json", "--idle-timeout", "10"],
                     work, "migrate-incoming")
    programs.append(target)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", target.stderr())
        if found:
            return target, int(found.group(1))
        assert target.proc.poll() is None, target.stderr()
        time.sleep(0.05)
    raise AssertionError(f"migrate-incoming did not listen: {target.stderr_path}")


def _source(programs: list[Program], work: Path, key: Path, port: int, attached: dict[str, Any],
            *extra: str) -> Program:
    """'ovmf-mh migrate --to' attached to the guest 'guest start' started."""
    source = Program(["migrate", "--to", f"127.0.0.1:{port}", "--key", str(key), "--qmp", attached["qmp"],
                      "--ram", attached["ram"], "--work-dir", str(work / "source"), "--helpers", "1", "--json",
                      # A loaded machine can starve a helper VM for seconds: these tests
                      # strike a fault of their own choosing, not a slow mailbox.
                      "--idle-timeout", "10", "--mailbox-timeout", "60", "--no-progress", *extra], work, "migrate")
    programs.append(source)
    return source


def _beats_on(serial: Path, more: int, timeout: float = 30) -> bool:
    """Whether ``more`` new heartbeats appear on a serial log within ``timeout``."""
    beats = len(_heartbeats(serial))
    deadline = time.monotonic() + timeout
    while len(_heartbeats(serial)) < beats + more and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(_heartbeats(serial)) >= beats + more


def test_a_running_guest_migrates_between_two_programs_and_its_workload_goes_on(
        work_dir: Path, key: Path, detached_guest: dict[str, Any], programs: list[Program], ram_dir: Path) -> None:
    source_pid = detached_guest["pid"]
    assert _alive(source_pid)
    target, port = _target(programs, work_dir, key, ram_dir)
    started = time.monotonic()
    source = _source(programs, work_dir, key, port, detached_guest)
    assert source.proc.wait(timeout=600) == 0, f"{source.stderr_path}: {source.stderr()[-3000:]}"
    elapsed = time.monotonic() - started
    report = source.report()
    print(f"attach migration: command {elapsed:.1f} s, total {report['total_seconds']:.2f} s, downtime "
          f"{1000 * report['downtime_seconds']:.0f} ms, {len(report['passes'])} passes, setup "
          f"{report['setup_seconds']:.2f} s")
    assert report["outcome"] == "ok" and report["guest_state"] == "running on target"
    assert report["guest_mib"] == 256 and report["ram_identical"] is True
    assert report["passes"][0]["pages"] == SIZE // 4096
    assert "left paused" in report["source_qemu"]

    # The workload's state continued: the target's first heartbeat
    # follows the source's last (a guest booted afresh starts at 0).
    source_beats = _heartbeats(Path(detached_guest["logs"]["serial"]))
    found = re.search(r"HB seq=(\d+) .*errors=0", report["target_heartbeat"] or "")
    assert found, report["target_heartbeat"]
    assert source_beats and source_beats[-1] >= 1
    assert source_beats[-1] < int(found.group(1)) <= source_beats[-1] + 2, (source_beats[-3:], found.group(0))

    # The user's source QEMU is left paused, not killed; the target runs
    # the guest, beating, without corruption.
    assert _alive(source_pid) and _status(Path(detached_guest["qmp"]), work_dir / "check") == "postmigrate"
    serial = work_dir / "target" / "target" / "serial.log"
    assert _beats_on(serial, 2), "the guest stopped beating on the target"
    assert guest.CORRUPTION not in serial.read_text(errors="replace")
    # The source is gone: the target, serving the guest, holds no dead
    # control connection (CLOSE-WAIT) meanwhile.
    deadline = time.monotonic() + 5
    while close_wait_sockets(target.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert close_wait_sockets(target.proc.pid) == 0, "migrate-incoming keeps its dead control connection"
    target.proc.send_signal(signal.SIGTERM)
    assert target.proc.wait(timeout=60) == 0, target.stderr()
    assert target.report()["guest_state"] == "ran here until stopped on request"

    stop = _run(["guest", "stop", "--work-dir", str(work_dir / "guest"), "--json"], work_dir, "guest-stop")
    assert stop.returncode == 0, stop.stderr
    assert json.loads(stop.stdout)["stopped"] == "quit over QMP"
    assert _wait_gone(_qemu_pids(work_dir), 10) == []
    assert list(ram_dir.iterdir()) == []


def _hold_pre_copy(work: Path, source: Program) -> list[int]:
    """Once pages flow, stop (SIGSTOP) the source helper VMs by their pids,
    so that a fast machine cannot finish pre-copy before the fault; the
    caller continues them (SIGCONT)."""
    pid_files = [work / "target" / "target-helpers" / "helper-0" / "qemu.pid",
                 work / "source" / "source-helpers" / "helper-0" / "qemu.pid"]
    deadline = time.monotonic() + 300
    while not all(p.exists() for p in pid_files):
        assert source.proc.poll() is None, f"{source.stderr_path}: {source.stderr()[-3000:]}"
        assert time.monotonic() < deadline, "pre-copy never started"
        time.sleep(0.05)
    time.sleep(2.0)  # both helpers run: the stream flows within a second
    helpers = [int(p.read_text()) for p in sorted((work / "source" / "source-helpers").glob("helper-*/qemu.pid"))]
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    assert not _switchover_stop_sent((work / "source" / "source" / "qmp.log").read_text()), \
        "pre-copy was over before the source helpers were stopped"
    return helpers


def _switchover_stop_sent(qmp_log: str) -> bool:
    """Whether the source stopped the guest for the switchover: the 'stop'
    after x-ignore-shared was set, which ends pre-copy (the guest throttle
    of pre-copy stops and continues the guest before it)."""
    start = qmp_log.find('"execute": "migrate-set-capabilities"')
    return start >= 0 and '"execute": "stop"' in qmp_log[start:]


def _wait_for_source_stop(work: Path, source: Program) -> None:
    """Until the source role stopped the guest for the switchover (its QMP log)."""
    qmp_log = work / "source" / "source" / "qmp.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert source.proc.poll() is None, f"{source.stderr_path}: {source.stderr()[-3000:]}"
        with suppress(OSError):
            if _switchover_stop_sent(qmp_log.read_text()):
                return
        time.sleep(0.005)
    raise AssertionError("the source never stopped the guest")


@pytest.mark.parametrize("phase", ["pre-copy", "switchover"])
def test_a_target_killed_leaves_the_attached_guest_running(
        work_dir: Path, key: Path, detached_guest: dict[str, Any], programs: list[Program], ram_dir: Path,
        phase: str) -> None:
    """Pre-copy: the guest never stopped runs on; switchover: the guest the
    command stopped is resumed. Either way the user's QEMU is the same
    process, running and beating, with its migration capabilities as found."""
    target, port = _target(programs, work_dir, key, ram_dir)
    source = _source(programs, work_dir, key, port, detached_guest)
    if phase == "pre-copy":
        helpers = _hold_pre_copy(work_dir, source)
        target.end()
        for pid in helpers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    else:
        _wait_for_source_stop(work_dir, source)
        target.end()
    assert source.proc.wait(timeout=120) == 1, source.stderr()
    report = source.report()
    assert report["outcome"] == "failed" and report["guest_state"] == "running on source", report
    assert f"target 127.0.0.1:{port}" in report["error"], report["error"]
    qmp_log = (work_dir / "source" / "source" / "qmp.log").read_text()
    # Every 'stop' (the pre-copy throttle's, the switchover's) has its 'cont'.
    assert qmp_log.count('"execute": "stop"') == qmp_log.count('"execute": "cont"'), "a stop without its cont"
    assert _switchover_stop_sent(qmp_log) == (phase == "switchover"), "stopped for the switchover, or not"
    assert _alive(detached_guest["pid"])
    assert _status(Path(detached_guest["qmp"]), work_dir / "check") == "running"
    assert _beats_on(Path(detached_guest["logs"]["serial"]), 2), "the guest stopped beating on the source"
    with AttachedQemu(Path(detached_guest["qmp"]), work_dir / "check", "check") as vm:
        capabilities = {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}
    assert capabilities["x-ignore-shared"] is False
    # Only the guest still runs: every helper and the target QEMU are gone.
    others = [p for p in _qemu_pids(work_dir) if p != detached_guest["pid"]]
    assert _wait_gone(others, 15) == []
    print(f"target killed in {phase}: {source.stderr().splitlines()[-1]}")


def test_one_command_migrates_an_attached_guest_and_quits_its_qemu_on_request(
        work_dir: Path, detached_guest: dict[str, Any]) -> None:
    """Without --to both halves run in 'migrate' over loopback; --quit-source
    quits the user's QEMU over QMP once the guest ran on the target."""
    result = _run(["migrate", "--qmp", detached_guest["qmp"], "--ram", detached_guest["ram"], "--work-dir",
                   str(work_dir / "migrate"), "--helpers", "1", "--json", "--no-progress", "--quit-source"],
                  work_dir, "migrate", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["outcome"] == "ok" and report["ram_identical"] is True
    assert report["source_qemu"] == f"pid {detached_guest['pid']} quit over QMP on request (--quit-source)"
    assert "errors=0" in report["target_heartbeat"]
    assert _wait_gone([detached_guest["pid"]], 10) == []
    stop = _run(["guest", "stop", "--work-dir", str(work_dir / "guest"), "--json"], work_dir, "guest-stop")
    assert stop.returncode == 0 and json.loads(stop.stdout)["stopped"] == "was not running (already gone)"


# --- refusals ---------------------------------------------------------------------------------------------


def _user_guest(firmware: Path, work: Path, ram: Path, qmp: Path, **changes: Any) -> QemuVM:
    """A QEMU the test starts as "the user's guest", with a second QMP
    monitor at ``qmp`` for the command to attach to (the test holds the
    first). ``changes`` alter the test guest's configuration."""
    with ram.open("wb") as f:
        f.truncate(changes.pop("ram_file_size", SIZE))
    config = guest_config(firmware, ram, SIZE, incoming=False, workload_mib=64)
    extra = [*changes.pop("extra_args", []), "-chardev", f"socket,id=user-qmp,path={qmp},server=on,wait=off",
             "-mon", "chardev=user-qmp,mode=control"]
    config = dataclasses.replace(config, extra_args=extra, **changes)
    return QemuVM(config, work, "user-guest")


def _share_off(firmware: Path, ram: Path) -> dict[str, Any]:
    return {"memory": [], "memory_mib": 256, "machine": "q35,memory-backend=ram",
            "extra_args": ["-object", f"memory-backend-file,id=ram,size={SIZE},mem-path={ram},share=off"]}


def _other_kernel(folder: Path) -> Path:
    """The test guest's kernel with one byte more: another file, another digest."""
    path = folder / "other-vmlinuz"
    path.write_bytes(guest.kernel().read_bytes() + b"\0")
    return path


CASES: dict[str, Any] = {
    # reason: changes to the user's guest (a function of firmware and RAM file), or None for the test guest as is
    "machine": lambda fw, ram: {"machine": "pc"},
    "cpu": lambda fw, ram: {"cpu": "qemu64"},
    "memory-layout": lambda fw, ram: {"extra_args": ["-object", "memory-backend-ram,id=spare,size=16M"]},
    "ram-not-file": lambda fw, ram: {"memory": [], "memory_mib": 256},
    "ram-not-shared": _share_off,
    "devices": lambda fw, ram: {"extra_args": ["-device", "virtio-rng-pci"]},
    # A default device, with no -device of its own.
    "devices-vga": lambda fw, ram: {"extra_args": ["-vga", "std"]},
    "firmware": lambda fw, ram: {"firmware_code": Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                                 "firmware_vars": Path("/usr/share/OVMF/OVMF_VARS_4M.fd")},
    "memory-size": lambda fw, ram: {"ram_file_size": SIZE + MIB},
    "kernel": lambda fw, ram: {"kernel": _other_kernel(ram.parent)},
    "initrd": lambda fw, ram: {"initrd": guest.workload_initramfs(64, pages_per_tick=128)},
    "append": lambda fw, ram: {"append": guest.KERNEL_APPEND + " quiet"},
}


#: Cases named otherwise than the reason they expect.
REASON_OF = {"devices-vga": "devices"}


def _attach(work: Path, qmp: Path, ram: Path, name: str) -> subprocess.CompletedProcess[str]:
    """'migrate --to' a port nobody listens on: the attach checks come first."""
    return _run(["migrate", "--to", "127.0.0.1:9", "--key", str(work / "transport.key"), "--qmp", str(qmp),
                 "--ram", str(ram), "--work-dir", str(work / name), "--no-progress", "--connect-timeout", "2"],
                work, name, timeout=120)


def _assert_refused(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "refused to attach to the guest at " in result.stderr and f": {reason}: " in result.stderr, result.stderr
    assert "the guest was left as it was" in result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_a_guest_that_does_not_fit_is_refused_with_its_reason_and_left_running(
        firmware: Path, work_dir: Path, key: Path, short_dir: Path, case: str) -> None:
    reason = REASON_OF.get(case, case)
    ram = work_dir / "user.ram"
    qmp = short_dir / "user.sock"
    if reason == "firmware" and not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file():
        missing("Debian's ovmf package (another firmware to run) is not installed")
    changes = CASES[case](firmware, ram)
    with _user_guest(firmware, work_dir / "user-guest", ram, qmp, **changes) as vm:
        before = vm.qmp("query-status")["status"]
        result = _attach(work_dir, qmp, ram, "migrate")
        _assert_refused(result, reason)
        assert vm.is_running() and vm.qmp("query-status")["status"] == before == "running"
        capabilities = {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}
        assert capabilities["x-ignore-shared"] is False
        assert vm.qmp("query-migrate").get("status", "none") == "none"


@pytest.mark.parametrize("mib", [MAX_GUEST_MIB, MAX_GUEST_MIB + 1])
def test_the_memory_size_bound_is_the_largest_guest_the_helpers_migrate(
        firmware: Path, work_dir: Path, key: Path, short_dir: Path, mib: int) -> None:
    """16 GiB (what a running guest was migrated with here) is attached; a
    MiB more is refused as 'memory-size'. Sparse RAM files: the guest
    touches only what its firmware and kernel write while the checks run."""
    ram = work_dir / "user.ram"
    qmp = short_dir / "user.sock"
    size = mib * MIB
    with ram.open("wb") as f:
        f.truncate(size)
    config = guest_config(firmware, ram, size, incoming=False, workload_mib=64)
    config = dataclasses.replace(config, extra_args=["-chardev", f"socket,id=user-qmp,path={qmp},server=on,wait=off",
                                                     "-mon", "chardev=user-qmp,mode=control"])
    try:
        with QemuVM(config, work_dir / "user-guest", "user-guest") as vm:
            result = _attach(work_dir, qmp, ram, "migrate")
            if mib > MAX_GUEST_MIB:
                _assert_refused(result, "memory-size")
                assert f"{MAX_GUEST_MIB}" in result.stderr
            else:
                # Every check passed: the command went on to the target (nobody listens there).
                assert result.returncode == 1 and "refused to attach" not in result.stderr, result.stderr
                assert "cannot connect to the target 127.0.0.1:9" in result.stderr, result.stderr
            assert vm.qmp("query-status")["status"] == "running"
    finally:
        ram.unlink(missing_ok=True)


def test_the_wrong_ram_file_a_paused_guest_and_a_busy_or_missing_monitor_are_refused(
        firmware: Path, work_dir: Path, key: Path, short_dir: Path) -> None:
    ram = work_dir / "user.ram"
    qmp = short_dir / "user.sock"
    other = work_dir / "other.ram"
    other.write_bytes(b"\0" * 4096)
    with _user_guest(firmware, work_dir / "user-guest", ram, qmp) as vm:
        # The guest fits: only the RAM file named is another one.
        _assert_refused(_attach(work_dir, qmp, other, "wrong-ram"), "ram-file")
        assert vm.qmp("query-status")["status"] == "running"
        # A paused guest stays paused: the command does not resume what it found stopped.
        vm.qmp("stop")
        _assert_refused(_attach(work_dir, qmp, ram, "paused"), "not-running")
        assert vm.qmp("query-status")["status"] == "paused"
        vm.qmp("cont")
        # A QEMU migration under way (to nowhere, slowed to a crawl) is not interrupted.
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 4096})
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        _assert_refused(_attach(work_dir, qmp, ram, "migrating"), "migrating")
        assert vm.qmp("query-migrate")["status"] == "active"
        vm.qmp("migrate_cancel")
        # The monitor the test holds answers nobody else.
        _assert_refused(_attach(work_dir, vm.qmp_socket, ram, "busy"), "qmp-unreachable")
        assert vm.qmp("query-status")["status"] == "running"
    _assert_refused(_attach(work_dir, short_dir / "nobody.sock", ram, "missing"), "qmp-unreachable")
    _assert_refused(_attach(work_dir, other, ram, "not-a-socket"), "qmp-unreachable")


def _debian_attach(work: Path, qmp: Path, ram: Path, disk: Path, name: str) -> subprocess.CompletedProcess[str]:
    return _run(["migrate", "--to", "127.0.0.1:9", "--key", str(work / "transport.key"), "--qmp", str(qmp),
                 "--ram", str(ram), "--disk", str(disk), "--work-dir", str(work / name), "--no-progress",
                 "--connect-timeout", "2"], work, name, timeout=120)


DEBIAN_CASES: dict[str, tuple[list[str], str, str]] = {
    # case: (extra QEMU arguments, reason, what the message names)
    "fits": ([], "", ""),
    "an e1000 NIC": (["-device", "e1000"], "devices", "the guest has a e1000"),
    "a second virtio disk": (["-drive", "if=none,id=disk9,file={scratch},format=raw",
                              "-device", "virtio-blk-pci,drive=disk9"], "devices", "a second virtio-blk-pci"),
    "another disk than --disk": ([], "disk", "not --disk"),
}


@pytest.mark.parametrize("case", list(DEBIAN_CASES))
def test_a_disk_booted_guest_is_attached_when_its_devices_are_on_the_allow_list(
        firmware: Path, work_dir: Path, key: Path, short_dir: Path, case: str) -> None:
    """The Debian guest's QEMU (2 vCPUs, virtio disk, NIC and RNG, no
    -kernel): every attach check passes, and the command goes on to the
    target; a device off the allow-list, a second disk or another disk than
    --disk is refused by name, the guest left running. The checks read QEMU,
    not the guest: they run while the firmware still boots it."""
    extra, reason, named = DEBIAN_CASES[case]
    ram, qmp, disk = work_dir / "user.ram", short_dir / "user.sock", work_dir / "disk.qcow2"
    scratch = work_dir / "scratch.raw"
    scratch.write_bytes(bytes(1 << 20))
    with ram.open("wb") as f:
        f.truncate(512 * MIB)
    guest_image.overlay(disk)
    config = debian_vm.config(firmware, ram, 512 * MIB, DeviceModel(vcpus=2, disk=disk))
    config = dataclasses.replace(config, extra_args=[
        *config.extra_args, *(a.format(scratch=scratch) for a in extra),
        "-chardev", f"socket,id=user-qmp,path={qmp},server=on,wait=off", "-mon", "chardev=user-qmp,mode=control"])
    named_disk = scratch if case == "another disk than --disk" else disk
    try:
        with QemuVM(config, work_dir / "user-guest", "user-guest") as vm:
            result = _debian_attach(work_dir, qmp, ram, named_disk, "migrate")
            if reason:
                _assert_refused(result, reason)
                assert named in result.stderr, result.stderr
            else:
                assert result.returncode == 1 and "refused to attach" not in result.stderr, result.stderr
                assert "cannot connect to the target 127.0.0.1:9" in result.stderr, result.stderr
            assert vm.qmp("query-status")["status"] == "running"
    finally:
        ram.unlink(missing_ok=True)


def test_every_reason_has_a_test() -> None:
    covered = {REASON_OF.get(case, case) for case in CASES}
    covered |= {"ram-file", "not-running", "migrating", "qmp-unreachable"}
    covered |= {reason for _, reason, _ in DEBIAN_CASES.values() if reason}
    # Not reproducible on these machines: a KVM guest (KVM runs no guest here).
    untested = {"accel"}
    assert covered | untested == set(REASONS) and not covered & untested


# --- guest start / stop -----------------------------------------------------------------------------------


def test_guest_stop_ends_what_guest_start_started_by_its_pid(work_dir: Path, short_dir: Path) -> None:
    folder = work_dir / "guest"
    try:
        start = _run(["guest", "start", "--work-dir", str(folder), "--qmp", str(short_dir / "qmp.sock"),
                      "--no-wait", "--json"], work_dir, "guest-start")
        assert start.returncode == 0, start.stderr
        record = json.loads(start.stdout)
        pid = record["pid"]
        # Detached: it outlives the command that started it, and says where it is.
        assert _alive(pid) and int((folder / "qemu.pid").read_text()) == pid
        assert Path(record["ram"]).stat().st_size == SIZE
        assert "share=on" in (folder / "qemu-cmdline.txt").read_text()
        again = _run(["guest", "start", "--work-dir", str(folder), "--qmp", str(short_dir / "qmp2.sock")],
                     work_dir, "guest-start-again")
        assert again.returncode != 0 and f"pid {pid}" in again.stderr
        stop = _run(["guest", "stop", "--work-dir", str(folder), "--json"], work_dir, "guest-stop")
        assert stop.returncode == 0, stop.stderr
        assert json.loads(stop.stdout) == {"pid": pid, "stopped": "quit over QMP", "ram_removed": True}
        assert not _alive(pid) and not Path(record["ram"]).exists()
        twice = _run(["guest", "stop", "--work-dir", str(folder), "--json"], work_dir, "guest-stop-twice")
        assert twice.returncode == 0 and json.loads(twice.stdout)["stopped"] == "was not running (already gone)"
    finally:
        _kill_leftovers(folder)


def test_guest_stop_signals_the_recorded_pid_when_qmp_cannot_quit_it(work_dir: Path, short_dir: Path) -> None:
    """The test holds the guest's monitor, so 'quit' cannot reach it: the
    stop falls back to SIGTERM to the recorded pid."""
    folder = work_dir / "guest"
    try:
        start = _run(["guest", "start", "--work-dir", str(folder), "--qmp", str(short_dir / "qmp.sock"),
                      "--no-wait", "--json"], work_dir, "guest-start")
        assert start.returncode == 0, start.stderr
        record = json.loads(start.stdout)
        with AttachedQemu(Path(record["qmp"]), work_dir / "holder", "holder"):
            stop = _run(["guest", "stop", "--work-dir", str(folder), "--keep-ram", "--json"], work_dir,
                        "guest-stop")
        assert stop.returncode == 0, stop.stderr
        assert json.loads(stop.stdout)["stopped"] == f"ended by SIGTERM to pid {record['pid']}"
        assert not _alive(record["pid"]) and Path(record["ram"]).exists()
    finally:
        _kill_leftovers(folder)


def test_guest_stop_leaves_a_process_that_reuses_the_recorded_pid_alone(work_dir: Path) -> None:
    """A record whose pid now belongs to another process (another start
    time) ends nothing."""
    folder = work_dir / "guest"
    folder.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": other.pid, "start_time": 1, "qmp": str(folder / "qmp.sock"), "ram": str(folder / "g.ram"),
                  "work_dir": str(folder), "cmdline": ["qemu-system-x86_64"], "logs": {}, "details": {}}
        (folder / "guest.json").write_text(json.dumps(record))
        stop = _run(["guest", "stop", "--work-dir", str(folder), "--json"], work_dir, "guest-stop")
        assert stop.returncode == 0, stop.stderr
        assert json.loads(stop.stdout)["stopped"] == "was not running (already gone)"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)


#: The guardian's bound (host_shim/vm/reaper.py, RESUME_BOUND) plus one
#: heartbeat period of the workload (1 s) and a second of slack for a loaded
#: machine: the user's guest beats again within this of the program's end.
RESUMED_BEATING = 2.0 + 1.0 + 1.0


def _hold_switchover(work: Path, source: Program) -> list[int]:
    """The source stopped the user's guest for the switchover: stop
    (SIGSTOP) the target helper VMs at once, so that the final pass and the
    end records wait for them and nothing can commit, however fast the
    machine; the target program goes on saying 'progress'. The caller
    continues them (SIGCONT)."""
    _wait_for_source_stop(work, source)
    helpers = [int(p.read_text()) for p in sorted((work / "target" / "target-helpers").glob("helper-*/qemu.pid"))]
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    # The device-state move ('migrate') starts after the target's verdict.
    assert '"execute": "migrate"' not in (work / "source" / "source" / "qmp.log").read_text(), \
        "the switchover was past the verdict before the target helpers were stopped"
    return helpers


def _first_new_beat(serial: Path, since: float, timeout: float) -> float:
    """Seconds from ``since`` until the serial log shows a heartbeat it did not show then."""
    beats = len(_heartbeats(serial))
    while len(_heartbeats(serial)) <= beats:
        assert time.monotonic() - since < timeout, f"no new heartbeat within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - since


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_source_program_ended_in_the_switchover_leaves_the_user_guest_running(
        work_dir: Path, key: Path, detached_guest: dict[str, Any], programs: list[Program], ram_dir: Path,
        signum: int) -> None:
    """SIGTERM: the program resumes the guest it paused and says so; SIGKILL:
    its reaper does, once the program's QMP connection is gone. Either way
    the user's guest beats again within RESUMED_BEATING, its status is
    'running', its capabilities as found, and the target never resumes."""
    target, port = _target(programs, work_dir, key, ram_dir)
    source = _source(programs, work_dir, key, port, detached_guest)
    helpers = _hold_switchover(work_dir, source)
    serial = Path(detached_guest["logs"]["serial"])
    try:
        os.kill(source.proc.pid, signum)
        ended = time.monotonic()
        beating = _first_new_beat(serial, ended, 30)
        code = source.proc.wait(timeout=30)
    finally:
        for pid in helpers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    print(f"source {signal.Signals(signum).name} in the switchover: the user's guest beat again after "
          f"{beating:.2f} s; exit {code}")
    assert beating < RESUMED_BEATING, f"the guest beat again only {beating:.2f} s after the program's end"
    assert code == -signum if signum == signal.SIGKILL else code == 128 + signum, source.stderr()
    if signum == signal.SIGTERM:
        assert "stopped by SIGTERM" in source.stderr() and "was resumed and runs" in source.stderr(), \
            source.stderr()
    assert _alive(detached_guest["pid"])
    assert _beats_on(serial, 2), "the guest stopped beating on the source"
    with AttachedQemu(Path(detached_guest["qmp"]), work_dir / "check", "check") as vm:
        assert vm.qmp("query-status")["status"] == "running"
        capabilities = {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}
    assert capabilities["x-ignore-shared"] is False
    # The target never resumed: it sees its source gone and ends.
    assert target.proc.wait(timeout=60) == 1, target.stderr()
    assert '"cont"' not in (work_dir / "target" / "target" / "qmp.log").read_text()
    assert target.report()["guest_state"] == "never resumed here"


def test_a_source_killed_after_its_commit_leaves_the_user_guest_paused_for_the_target(
        work_dir: Path, key: Path, detached_guest: dict[str, Any], programs: list[Program], ram_dir: Path) -> None:
    """The target program is stopped (SIGSTOP) as the device state moves, so
    that the source's 'commit' waits unread; the source, committed, is
    killed (SIGKILL). Its reaper must not resume the guest: the target, once
    continued, reads the commit and runs it. One copy runs, on the target."""
    target, port = _target(programs, work_dir, key, ram_dir)
    # The full check: this test is about the commit, not about the dirty
    # log on a busy machine (docs/migration.md).
    source = _source(programs, work_dir, key, port, detached_guest, "--switchover", "full-check")
    qmp_log = work_dir / "source" / "source" / "qmp.log"

    def said() -> str:
        with suppress(OSError):
            return qmp_log.read_text(errors="replace")
        return ""

    deadline = time.monotonic() + 600
    while '"execute": "migrate", ' not in said():
        assert source.proc.poll() is None and time.monotonic() < deadline, source.stderr()[-3000:]
        time.sleep(0.005)
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        while '"status": "completed"' not in said():
            assert source.proc.poll() is None and time.monotonic() < deadline, source.stderr()[-3000:]
            time.sleep(0.005)
        time.sleep(1.0)  # the source marks itself committed and writes 'commit' at once
        os.kill(source.proc.pid, signal.SIGKILL)
        source.proc.wait(timeout=30)
        # Past the guardian's bound: the guest stays paused after the migration.
        time.sleep(5.0)
        assert _status(Path(detached_guest["qmp"]), work_dir / "check") == "postmigrate"
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    serial = work_dir / "target" / "target" / "serial.log"
    deadline = time.monotonic() + 120
    while "the guest runs here" not in target.stderr() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _beats_on(serial, 2), "the guest does not run on the target"
    assert _status(Path(detached_guest["qmp"]), work_dir / "check") == "postmigrate"
    # Its source is gone: the target serves the guest without keeping the
    # dead control connection (CLOSE-WAIT).
    assert close_wait_sockets(target.proc.pid) == 0, "migrate-incoming keeps its dead control connection"
    target.proc.send_signal(signal.SIGTERM)
    assert target.proc.wait(timeout=60) == 0, target.stderr()
    report = target.report()
    assert report["outcome"] == "ok" and report["source_lost"], report



def test_a_second_connection_keeps_what_the_first_logged(work_dir: Path, short_dir: Path) -> None:
    """The user's QEMU outlives each connection to it: the qmp.log of a
    later connection in the same work folder adds to the earlier one's
    lines instead of erasing them."""
    qmp = short_dir / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    (work_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert qemu.poll() is None and time.monotonic() < deadline, "QEMU did not open its QMP socket"
            time.sleep(0.05)
        for command in ("query-status", "query-name"):
            with AttachedQemu(qmp, work_dir / "attach") as vm:
                vm.qmp(command)
        log = (work_dir / "attach" / "qmp.log").read_text()
        assert log.count("--- connection opened") == 2, log
        assert '"execute": "query-status"' in log and '"execute": "query-name"' in log, log
        assert log.index("query-status") < log.index("query-name"), log
    finally:
        qemu.terminate()
        with suppress(subprocess.TimeoutExpired):
            qemu.wait(timeout=10)
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
