"""A QEMU the user runs, reached through its QMP socket (``ovmf-mh migrate
--qmp SOCKET``): the same questions as :class:`~host_shim.vm.qemu.QemuVM`
asks of a QEMU it started (QMP, alive, stopped by a signal), but never a
kill. Closing it only closes the QMP connection: the QEMU is the user's.

Its pid comes from the kernel, not from QEMU: ``SO_PEERCRED`` on the
connected QMP socket names the process that listens there. That lets the
migration's watch see the QEMU die or stop (SIGSTOP) at once, as for a QEMU
it started; the pid is never signalled.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from qemu.qmp.legacy import QEMUMonitorProtocol

from host_shim.errors import QemuError
from host_shim.vm.qemu import QMP_TIMEOUT
from host_shim.vm.qmp_log import LoggedQmp
from host_shim.vm.reaper import process_state, start_time

log = logging.getLogger(__name__)

#: Seconds to wait for the QMP greeting: a QEMU whose monitor already
#: serves another client never answers a second one.
GREETING_TIMEOUT = 5.0


class QemuHandle(Protocol):
    """What the migration's source role needs of its guest's QEMU, whoever started it."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def qmp(self, command: str, **arguments: object) -> Any: ...

    def is_running(self) -> bool: ...

    def is_stopped(self) -> bool: ...

    def describe(self) -> str: ...

    def error(self, message: str) -> QemuError: ...

    def serial_text(self) -> str: ...


class QmpUnreachable(QemuError):
    """No QEMU answers QMP at the socket given."""


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class AttachedQemu:
    """A running QEMU the user started, over its QMP unix socket. Use as a
    context manager; leaving it closes the connection and nothing else."""

    def __init__(self, qmp_socket: Path, work_dir: Path, name: str = "source") -> None:
        self.qmp_socket = qmp_socket
        self.work_dir = work_dir
        self.name = name
        self._pid: int | None = None
        self._start_time: int | None = None
        self._qmp: LoggedQmp | None = None

    def __enter__(self) -> AttachedQemu:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._pid

    def _unreachable(self, reason: str) -> QmpUnreachable:
        return QmpUnreachable(f"no QEMU answers QMP at {self.qmp_socket}: {reason}")

    def connect(self, timeout: float = GREETING_TIMEOUT) -> None:
        """Connect, learn the QEMU's pid, negotiate QMP; QmpUnreachable
        names why when nothing answers."""
        try:
            mode = self.qmp_socket.stat().st_mode
        except OSError as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None
        if not stat.S_ISSOCK(mode):
            raise self._unreachable("not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.qmp_socket))
                # The greeting comes at once from a monitor that is free; a
                # monitor serving another client leaves the connection waiting.
                if not sock.recv(1, socket.MSG_PEEK):
                    raise self._unreachable("the connection closed before the QMP greeting")
            except TimeoutError:
                raise self._unreachable(f"no QMP greeting within {timeout:g} s (is another client, "
                                        "libvirt say, connected to this monitor?)") from None
            except OSError as exc:
                raise self._unreachable(exc.strerror or str(exc)) from None
            self._pid = _peer_pid(sock)
            self._start_time = start_time(self._pid)
            sock.settimeout(None)
            qmp = QEMUMonitorProtocol(sock)
            try:
                qmp.connect()
            except Exception as exc:
                with suppress(Exception):
                    qmp.close()
                raise self._unreachable(f"QMP negotiation failed: {exc}") from None
        except BaseException:
            sock.close()
            raise
        qmp.settimeout(QMP_TIMEOUT)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # The user's QEMU outlives this connection; a later connection to it
        # (a retry, a second command with the same work folder) must not
        # erase what this one did to it.
        self._qmp = LoggedQmp(self.work_dir / "qmp.log", append=True)
        self._qmp.connect(qmp)

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run a QMP command; log it and its answer to qmp.log."""
        if self._qmp is None:
            raise self.error(f"QMP is not connected (command {command})")
        return self._qmp.command(command, self.error, **arguments)

    def is_running(self) -> bool:
        """The same process still exists (its start time guards against a reused pid)."""
        if self._pid is None:
            return False
        state = process_state(self._pid)
        return state not in (None, "Z", "X") and start_time(self._pid) == self._start_time

    def is_stopped(self) -> bool:
        return self.is_running() and self._pid is not None and process_state(self._pid) in ("T", "t")

    def describe(self) -> str:
        state = "still running" if self.is_running() else "gone"
        return f"{self.name} QEMU pid {self._pid} (the user's, attached through {self.qmp_socket}), {state}"

    def error(self, message: str) -> QemuError:
        return QemuError(f"{self.name} QEMU pid {self._pid} at {self.qmp_socket}: {message}",
                         logs={"qmp": self.work_dir / "qmp.log"})

    def serial_text(self) -> str:
        """The user's serial console is not this command's to read."""
        return ""

    def quit(self, timeout: float = 10.0) -> bool:
        """QMP 'quit', on the user's request only; True once the process is gone."""
        with suppress(QemuError):
            self.qmp("quit")
        deadline = time.monotonic() + timeout
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.is_running()

    def close(self) -> None:
        """Close the QMP connection; the QEMU goes on as it is."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (device and inode: links and relative paths count)."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
