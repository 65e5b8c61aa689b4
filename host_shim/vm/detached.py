"""A QEMU that outlives the command that starts it (`ovmf-mh guest start`),
and its stop by the pid recorded at its start (`ovmf-mh guest stop`).

Unlike every other QEMU the shim starts, a detached one is not registered
with the reaper (host_shim/vm/reaper.py): it is meant to keep running after
the command ends, as a guest the user runs. Everything about it is written
into its folder: ``guest.json`` (pid and start time, QMP socket, RAM file,
command line, logs), ``qemu.pid``, ``qemu-cmdline.txt``, and the serial,
debugcon and stderr logs. Its stop reads that record and ends that process
only: QMP ``quit`` first, then SIGTERM and SIGKILL to its pid, each after
checking that the pid still belongs to the process started (its start time),
never by name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from host_shim.errors import OvmfMhError, QemuError, SetupError
from host_shim.local_files import create_exclusive
from host_shim.vm.attached import AttachedQemu, QmpUnreachable
from host_shim.vm.qemu import QemuConfig, QemuLogs, build_command
from host_shim.vm.reaper import process_state, start_time

RECORD = "guest.json"
#: AF_UNIX socket paths hold at most 107 bytes.
MAX_SOCKET_PATH = 107
#: Seconds a stop waits after each of QMP quit, SIGTERM and SIGKILL.
STOP_WAIT = 10.0


class GuestRecordError(OvmfMhError):
    """The folder holds no usable record of a detached guest."""


@dataclass
class GuestRecord:
    pid: int
    start_time: int
    qmp: str
    ram: str
    work_dir: str
    cmdline: list[str]
    logs: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self) -> None:
        path = Path(self.work_dir) / RECORD
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        partial.replace(path)

    @classmethod
    def load(cls, work: Path) -> GuestRecord:
        path = work / RECORD
        try:
            body = json.loads(path.read_text())
            return cls(**body)
        except FileNotFoundError:
            raise GuestRecordError(f"no {RECORD} in {work}: no guest was started there "
                                   "('ovmf-mh guest start --work-dir DIR' writes it)") from None
        except (ValueError, TypeError) as exc:
            raise GuestRecordError(f"{path} is not a guest record: {exc}") from None

    def alive(self) -> bool:
        """The recorded process still runs (same pid and start time, not a zombie)."""
        return process_state(self.pid) not in (None, "Z", "X") and start_time(self.pid) == self.start_time


def qmp_path_fits(path: Path) -> None:
    if len(str(path)) > MAX_SOCKET_PATH:
        raise SetupError(f"QMP socket path {path} is {len(str(path))} bytes, longer than a unix socket allows "
                         f"({MAX_SOCKET_PATH}): give a shorter --qmp path or --work-dir")


def command(config: QemuConfig, work: Path, qmp: Path) -> list[str]:
    """The argument vector a detached guest in ``work`` runs (pure)."""
    return build_command(config, QemuLogs(work), work / "vars.fd" if config.firmware_vars else None, qmp)


def start(config: QemuConfig, work: Path, qmp: Path, ram: Path, details: dict[str, Any],
          timeout: float = 30.0) -> GuestRecord:
    """Prepare the RAM file and the firmware variables, start QEMU detached
    (its own session, not reaped with this command), wait until QMP says it
    runs, and record it. A QEMU that fails to get there is killed by its pid."""
    work.mkdir(parents=True, exist_ok=True)
    qmp_path_fits(qmp)
    with suppress(GuestRecordError):
        old = GuestRecord.load(work)
        if old.alive():
            raise SetupError(f"a guest started from {work} still runs (QEMU pid {old.pid}): stop it first "
                             f"('ovmf-mh guest stop --work-dir {work}')")
    if qmp.exists() or qmp.is_symlink():
        qmp.unlink()
    logs = QemuLogs(work)
    for stale in (logs.serial, logs.debugcon, logs.pid, work / RECORD):
        stale.unlink(missing_ok=True)
    size = sum(b.size for b in config.memory)
    ram.parent.mkdir(parents=True, exist_ok=True)
    # A regular file there is replaced; a planted link is refused (local_files.py).
    with os.fdopen(create_exclusive(ram), "wb") as f:
        f.truncate(size)
    if config.firmware_vars is not None:
        shutil.copyfile(config.firmware_vars, work / "vars.fd")
    argv = command(config, work, qmp)
    logs.cmdline.write_text(shlex.join(argv) + "\n")
    with logs.stderr.open("wb") as stderr:
        # Not process.spawn: the reaper would kill it when this command ends.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    logs.pid.write_text(f"{proc.pid}\n")
    record = GuestRecord(pid=proc.pid, start_time=start_time(proc.pid) or 0, qmp=str(qmp), ram=str(ram),
                         work_dir=str(work), cmdline=argv,
                         logs={k: str(v) for k, v in logs.as_dict().items() if k != "qmp"}, details=details)
    try:
        _wait_running(proc, qmp, work, timeout, logs)
    except BaseException:
        _kill(proc)
        raise
    record.save()
    return record


def _wait_running(proc: subprocess.Popen[bytes], qmp: Path, work: Path, timeout: float, logs: QemuLogs) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise QemuError(f"guest QEMU pid {proc.pid} exited during start-up", command=proc.args,  # type: ignore[arg-type]
                            exit_code=code, logs=logs.as_dict())
        if qmp.exists():
            vm = AttachedQemu(qmp, work / "qmp-start", "guest")
            try:
                vm.connect()
                status = vm.qmp("query-status").get("status")
                if status == "running":
                    return
                last = QemuError(f"QEMU status {status!r}")
            except (QmpUnreachable, QemuError) as exc:
                last = exc
            finally:
                vm.close()
        time.sleep(0.05)
    raise QemuError(f"guest QEMU pid {proc.pid} did not run within {timeout:g} s ({last})",
                    command=proc.args, logs=logs.as_dict())  # type: ignore[arg-type]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_WAIT)


def _wait_gone(record: GuestRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while record.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(work: Path, *, keep_ram: bool = False, wait: float = STOP_WAIT) -> tuple[GuestRecord, str]:
    """Stop the guest recorded in ``work``: QMP quit, then SIGTERM, then
    SIGKILL, each to the recorded pid while it is still the recorded
    process. Returns the record and how it ended."""
    record = GuestRecord.load(work)
    how = "was not running (already gone)"
    if record.alive():
        how = ""
        vm = AttachedQemu(Path(record.qmp), work / "qmp-stop", "guest")
        try:
            vm.connect()
            # The socket's owner must be the recorded process, not a stranger on a reused path.
            if vm.pid == record.pid:
                with suppress(QemuError):
                    vm.qmp("quit")
                if _wait_gone(record, wait):
                    how = "quit over QMP"
        except QmpUnreachable:
            pass
        finally:
            vm.close()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if how or not record.alive():
                break
            with suppress(ProcessLookupError):
                os.kill(record.pid, signum)
            if _wait_gone(record, wait):
                how = f"ended by {signum.name} to pid {record.pid}"
        if not how:
            raise QemuError(f"guest QEMU pid {record.pid} survived QMP quit, SIGTERM and SIGKILL",
                            logs={k: Path(v) for k, v in record.logs.items()})
    with suppress(OSError):
        Path(record.qmp).unlink(missing_ok=True)
    if not keep_ram:
        Path(record.ram).unlink(missing_ok=True)
    return record, how
