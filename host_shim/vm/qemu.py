"""QEMU lifecycle over QMP.

A :class:`QemuConfig` describes a VM; :class:`QemuVM` launches it with the
command line built as a list, checks readiness over QMP (``qemu.qmp``), keeps
every artefact in its work folder (command line, debugcon, serial, QMP and
stderr logs) and shuts QEMU down by its own pid: softly over QMP first, then
SIGKILL. It is a context manager, so a failing test still stops its QEMU.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from host_shim.errors import QemuError, SetupError
from host_shim.vm import process
from host_shim.vm.process import describe_exit, is_stopped, kill_if_running
from host_shim.vm.qmp_log import LoggedQmp, client_with_own_loop

log = logging.getLogger(__name__)

QEMU_BINARY = os.environ.get("OVMF_MH_QEMU", "qemu-system-x86_64")
DEBUGCON_PORT = 0x402
#: Seconds any QMP command may take: a stopped or wedged QEMU must not hang the shim.
QMP_TIMEOUT = 10.0
#: Seconds QEMU gets to act on QMP 'quit' before it is killed by its pid.
QUIT_TIMEOUT = 3.0


@dataclass(frozen=True)
class MemoryBackend:
    """A ``memory-backend-file`` with ``share=on``: the host can mmap it."""

    backend_id: str
    path: Path
    size: int


@dataclass
class QemuConfig:
    """Everything that decides a QEMU command line."""

    firmware_code: Path
    firmware_vars: Path | None = None  # copied into the work folder before use
    machine: str = "q35"
    accel: str = "tcg"
    cpu: str = "max"
    memory: list[MemoryBackend] = field(default_factory=list)
    memory_mib: int = 256  # used only when ``memory`` is empty
    numa: bool = False  # one NUMA node per backend (mirror-VM layout)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    fw_cfg_files: list[tuple[str, Path]] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    incoming: str | None = None
    # Programs QEMU is started through, which exec it in place (same pid),
    # e.g. nsenter into a network namespace (host_shim/vm/netns.py).
    wrapper: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QemuLogs:
    work_dir: Path

    @property
    def cmdline(self) -> Path:
        return self.work_dir / "qemu-cmdline.txt"

    @property
    def debugcon(self) -> Path:
        return self.work_dir / "debugcon.log"

    @property
    def serial(self) -> Path:
        return self.work_dir / "serial.log"

    @property
    def qmp(self) -> Path:
        return self.work_dir / "qmp.log"

    @property
    def stderr(self) -> Path:
        return self.work_dir / "qemu-stderr.log"

    @property
    def pid(self) -> Path:
        return self.work_dir / "qemu.pid"

    def as_dict(self) -> dict[str, Path]:
        return {
            "cmdline": self.cmdline,
            "debugcon": self.debugcon,
            "serial": self.serial,
            "qmp": self.qmp,
            "stderr": self.stderr,
        }


#: The logs a failure names, in this order (stderr and the pid file are beside them).
KEPT_LOGS = ("cmdline", "debugcon", "serial", "qmp", "stderr")


def logs_under(folder: Path) -> dict[str, dict[str, str]]:
    """The logs of every QEMU that ran in ``folder`` or below it: QemuVM
    writes its command line into its work folder before it starts QEMU.
    Keyed by that work folder, relative to ``folder`` ('target-helpers/
    helper-0'), then by log name (KEPT_LOGS), absolute paths of the files
    that exist."""
    found: dict[str, dict[str, str]] = {}
    if not folder.is_dir():
        return found
    for cmdline in sorted(folder.rglob(QemuLogs(folder).cmdline.name)):
        paths = QemuLogs(cmdline.parent).as_dict()
        found[str(cmdline.parent.relative_to(folder))] = {
            name: str(paths[name].absolute()) for name in KEPT_LOGS if paths[name].exists()
        }
    return found


def describe_logs(logs: dict[str, dict[str, str]], indent: str = "  ") -> list[str]:
    """Lines that name each QEMU's kept logs, for an error report."""
    if not logs:
        return [f"{indent}no QEMU logs (no QEMU was started)"]
    lines = [f"{indent}logs of each QEMU (command line, debugcon, serial, QMP, stderr):"]
    for name, paths in logs.items():
        lines.append(f"{indent}  {name}:")
        lines.extend(f"{indent}    {kind:8} {path}" for kind, path in paths.items())
    return lines


def qemu_binary() -> str:
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise SetupError(
            f"{QEMU_BINARY} not found: install Debian's qemu-system-x86 (stuart/bootstrap.sh "
            "does) or set OVMF_MH_QEMU to a QEMU binary"
        )
    return found


def build_command(
    config: QemuConfig, logs: QemuLogs, vars_copy: Path | None, qmp_socket: Path
) -> list[str]:
    """The QEMU argument vector for a config (pure: no side effects)."""
    argv = [
        qemu_binary(),
        "-machine",
        f"{config.machine},accel={config.accel}",
        "-cpu",
        config.cpu,
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-chardev",
        f"socket,id=qmp,path={qmp_socket},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=debugcon,path={logs.debugcon}",
        "-device",
        f"isa-debugcon,iobase={DEBUGCON_PORT:#x},chardev=debugcon",
        "-serial",
        f"file:{logs.serial}",
        "-drive",
        f"if=pflash,format=raw,unit=0,file={config.firmware_code},readonly=on",
    ]
    if vars_copy is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if config.memory:
        total = sum(b.size for b in config.memory)
        argv += ["-m", f"{total // 1024}k"]
        for backend in config.memory:
            argv += [
                "-object",
                f"memory-backend-file,id={backend.backend_id},size={backend.size},"
                f"mem-path={backend.path},share=on",
            ]
        if config.numa:
            for node, backend in enumerate(config.memory):
                argv += ["-numa", f"node,nodeid={node},memdev={backend.backend_id}"]
        else:
            if len(config.memory) != 1:
                raise ValueError("several memory backends need numa=True")
            argv[2] += f",memory-backend={config.memory[0].backend_id}"
    else:
        argv += ["-m", f"{config.memory_mib}M"]
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    if config.append is not None:
        argv += ["-append", config.append]
    for name, path in config.fw_cfg_files:
        argv += ["-fw_cfg", f"name={name},file={path}"]
    if config.incoming is not None:
        argv += ["-incoming", config.incoming]
    argv += config.extra_args
    return argv


class QemuVM:
    """One QEMU process. Use as a context manager, or call start()/stop()."""

    def __init__(self, config: QemuConfig, work_dir: Path, name: str = "vm") -> None:
        self.config = config
        self.name = name
        self.work_dir = work_dir
        self.logs = QemuLogs(work_dir)
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: LoggedQmp | None = None
        self.started_at: float | None = None
        # AF_UNIX paths are limited to 108 bytes; work folders can be deeper.
        self._socket_dir: Path | None = None
        self.qmp_socket = Path()

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def error(self, message: str) -> QemuError:
        return QemuError(
            f"{self.name}: {message}",
            command=self.argv,
            exit_code=self.exit_code(),
            logs=self.logs.as_dict(),
        )

    def start(self, timeout: float = 15.0) -> None:
        """Launch QEMU and wait until QMP answers ``query-status``."""
        if not self.config.firmware_code.is_file():
            raise SetupError(
                f"firmware image {self.config.firmware_code} not found; build it with "
                "'ovmf-mh build' or pass an existing OVMF image"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.logs.debugcon, self.logs.serial):
            stale.unlink(missing_ok=True)
        self._socket_dir = process.temp_dir("ovmf-mh-qmp-")
        self.qmp_socket = self._socket_dir / "qmp.sock"
        vars_copy = None
        if self.config.firmware_vars is not None:
            vars_copy = self.work_dir / "vars.fd"
            shutil.copyfile(self.config.firmware_vars, vars_copy)
        self.argv = [*self.config.wrapper, *build_command(self.config, self.logs, vars_copy, self.qmp_socket)]
        self.logs.cmdline.write_text(shlex.join(self.argv) + "\n")
        stderr = self.logs.stderr.open("wb")
        log.debug("%s: starting %s", self.name, shlex.join(self.argv))
        self.started_at = time.monotonic()
        self._qmp = LoggedQmp(self.logs.qmp, self.started_at)
        self._proc = process.spawn(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stderr.close()
        self.logs.pid.write_text(f"{self._proc.pid}\n")
        try:
            self._connect_qmp(timeout)
        except BaseException:
            self.stop()
            raise

    def _connect_qmp(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                raise self.error("QEMU exited during start-up")
            if self.qmp_socket.exists():
                qmp, loop = client_with_own_loop(str(self.qmp_socket))
                try:
                    qmp.connect()
                except Exception as exc:
                    last_error = exc
                    # Closing a half-open connection to a QEMU that just died
                    # raises the connection's own EOFError again.
                    with suppress(Exception):
                        qmp.close()
                    loop.close()
                    time.sleep(0.02)
                    continue
                qmp.settimeout(QMP_TIMEOUT)
                if self._qmp is None:
                    raise self.error("QEMU was stopped during start-up")
                self._qmp.connect(qmp, loop)
                try:
                    self.qmp("query-status")
                except QemuError:
                    # A QEMU killed just now closes its socket before the
                    # kernel reports its exit: give the exit a moment to land.
                    with suppress(QemuError):
                        self.wait_exit(1.0)
                    if self.exit_code() is not None:
                        raise self.error("QEMU exited during start-up") from None
                    raise
                return
            time.sleep(0.02)
        raise self.error(f"QMP did not answer within {timeout:.0f} s ({last_error})")

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run a QMP command; log it and its answer to qmp.log."""
        if self._qmp is None:
            raise self.error(f"QMP is not connected (command {command})")
        return self._qmp.command(command, self.error, **arguments)

    def qmp_bare(self, command: str) -> None:
        """Run a QMP command without arguments or result in the fewest bytes
        (LoggedQmp.bare_command): the helper's wake-up, inject-nmi."""
        if self._qmp is None:
            raise self.error(f"QMP is not connected (command {command})")
        self._qmp.bare_command(command, self.error)

    def events(self) -> list[dict[str, Any]]:
        return [] if self._qmp is None else self._qmp.events()

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def describe(self) -> str:
        """'target QEMU pid 123, killed by SIGKILL': for messages."""
        if self._proc is None:
            return f"{self.name} QEMU (not started)"
        return f"{self.name} QEMU pid {self._proc.pid}, {describe_exit(self._proc.poll())}"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_stopped(self) -> bool:
        """Running but stopped (SIGSTOP): it answers nothing."""
        return self._proc is not None and is_stopped(self._proc)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; raise QemuError on timeout."""
        if self._proc is None:
            raise self.error("QEMU was never started")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"QEMU did not exit within {timeout:.0f} s") from None

    def stop(self, soft_timeout: float = QUIT_TIMEOUT) -> int | None:
        """Shut QEMU down: QMP 'quit', then SIGKILL to its own pid. Bounded:
        a stopped QEMU is killed at once, a wedged one after ``soft_timeout``."""
        proc = self._proc
        session = self._qmp
        connection = session.connection if session is not None else None
        if proc is not None and proc.poll() is None and session is not None and connection is not None \
                and not is_stopped(proc):
            with suppress(Exception), session.lock:
                session.note(">", {"execute": "quit"})
                connection.settimeout(soft_timeout)
                connection.cmd("quit")
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=soft_timeout)
        if proc is not None:
            kill_if_running(proc, f"{self.name}: QEMU")
        if self._qmp is not None:
            self._qmp.close()
        if self._socket_dir is not None:
            process.remove(self._socket_dir)
            self._socket_dir = None
        return proc.returncode if proc is not None else None

    # -- logs ---------------------------------------------------------------

    def debugcon_text(self) -> str:
        return _read_text(self.logs.debugcon)

    def serial_text(self) -> str:
        return _read_text(self.logs.serial)

    def wait_for_log(
        self, path: Path, needle: str, timeout: float, poll: float = 0.05
    ) -> float | None:
        """Seconds since start until ``needle`` appeared in a log, or None if
        QEMU exited or the timeout passed first."""
        deadline = time.monotonic() + timeout
        while True:
            if needle in _read_text(path):
                return time.monotonic() - (self.started_at or 0.0)
            if not self.is_running() or time.monotonic() > deadline:
                return None
            time.sleep(poll)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
