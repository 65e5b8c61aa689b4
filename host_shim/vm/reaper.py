"""The reaper: a small process that outlives the shim by a moment.

Whatever ends the shim (an exception, a signal, SIGKILL, the OOM killer),
the kernel closes the write end of a pipe the shim holds, and the reaper,
which holds the read end as its stdin, sees end of file. It then SIGKILLs
every process the shim registered and still running (by pid, checked
against the process's start time so a reused pid is never hit) and removes
every file and folder the shim registered. The shim registers a child as
soon as it starts it and unregisters it once it has reaped it itself, so on
an orderly exit the reaper has nothing left to do.

It is also the guardian of a guest the shim paused: ``migrate --qmp SOCKET
--ram FILE`` stops the user's guest for the switchover and registers it
here first (its QMP socket, its QEMU's pid and start time). Should the shim
end before it commits the migration (a SIGKILL included), the reaper
connects to that QMP socket once the shim's connection is gone (a monitor
serves one client at a time), and sends ``cont`` when ``query-status`` says
the guest is paused (a migration of its device state still running is
cancelled first): the guest runs again within RESUME_BOUND. The shim
unregisters the guest before it sends ``commit`` (from then on the target
may run it: the reaper must never resume it) and once it resumed the guest
itself. A guest the user paused is never registered (the shim migrates
only a running one), and a QEMU whose pid now names another process, or a
socket served by another pid, is left alone.

This file is the reaper's program too (``python reaper.py``): it imports
only the standard library, and it ignores SIGINT, SIGTERM and SIGHUP (it
runs in a session of its own), so the signal that ends the shim never ends
it before its work is done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

#: How long the reaper waits for a killed process to go before it removes files.
KILL_WAIT = 5.0
#: Within this many seconds of the shim's end the guest it paused runs again.
RESUME_BOUND = 2.0
#: How long the reaper keeps trying to reach the guest's QMP monitor (the
#: shim's connection closes as it dies; the monitor then greets the next).
RESUME_WAIT = 10.0
#: After its first look the reaper keeps looking this long: the shim's last
#: 'stop', sent just before it died, may still be queued in the monitor and
#: run after the reaper found the guest running (seen once in a few runs).
RESUME_SETTLE = 1.0
#: QMP run states in which a guest the shim paused is resumed: stopped by
#: the shim, or its device state moved to a target that was never told to
#: commit (and so never runs it).
RESUMABLE = ("paused", "postmigrate", "finish-migrate")
#: query-migrate states of a migration still in flight: cancelled first.
MIGRATING = ("setup", "active", "device", "pre-switchover", "cancelling", "wait-unplug")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def process_state(pid: int) -> str | None:
    """One-letter state (R, S, T for stopped, Z...), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


class Reaper:
    """The shim's side: registers pids and paths with the reaper process."""

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-I", str(Path(__file__).resolve())],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(read_end)
        self._lock = threading.Lock()

    def _send(self, *message: object) -> None:
        line = (json.dumps(list(message)) + "\n").encode()
        with self._lock, suppress(OSError):
            os.write(self._write_end, line)

    def watch_pid(self, pid: int) -> None:
        started = start_time(pid)
        if started is not None:
            self._send("+pid", pid, started)

    def forget_pid(self, pid: int) -> None:
        self._send("-pid", pid)

    def watch_path(self, path: Path) -> None:
        self._send("+path", str(path.absolute()))

    def forget_path(self, path: Path) -> None:
        self._send("-path", str(path.absolute()))

    def guard_guest(self, qmp_socket: Path, pid: int, ignore_shared: bool) -> None:
        """The shim is about to pause the guest of this QMP socket: should
        it end before :meth:`release_guest`, resume it (and put its
        x-ignore-shared capability back as ``ignore_shared``)."""
        started = start_time(pid)
        if started is not None:
            self._send("+guest", str(qmp_socket.absolute()), pid, started, ignore_shared)

    def release_guest(self, qmp_socket: Path) -> None:
        """The guest is no longer the reaper's to resume: the shim resumed it
        itself, or is about to commit its migration."""
        self._send("-guest", str(qmp_socket.absolute()))


_reaper: Reaper | None = None
_reaper_lock = threading.Lock()


def reaper() -> Reaper:
    """This process's reaper, started on first use."""
    global _reaper
    with _reaper_lock:
        if _reaper is None or _reaper.proc.poll() is not None:
            _reaper = Reaper()
        return _reaper


# --- the reaper process --------------------------------------------------------------


class _NotTheGuest(Exception):
    """The socket is served by another process than the registered QEMU."""


class _Qmp:
    """Just enough QMP for the guardian, standard library only: one command
    at a time, events skipped."""

    def __init__(self, path: str, pid: int, deadline: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        self._deadline = deadline
        try:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            self._sock.connect(path)
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[0] != pid:
                raise _NotTheGuest(f"{path} is served by another process than QEMU pid {pid}")
            self._line()  # the greeting, once the monitor takes this client
            self.command("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _line(self) -> dict[str, object]:
        while b"\n" not in self._buffer:
            self._sock.settimeout(max(0.01, self._deadline - time.monotonic()))
            chunk = self._sock.recv(65536)
            if not chunk:
                raise OSError("the QMP monitor closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        value = json.loads(line)
        if not isinstance(value, dict):
            raise OSError("QMP sent something that is not an object")
        return value

    def command(self, name: str, **arguments: object) -> object:
        self._sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        while True:
            answer = self._line()
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise OSError(f"QMP {name}: {answer['error']}")

    def close(self) -> None:
        self._sock.close()


def _connect_qmp(path: str, pid: int, started: int) -> _Qmp | None:
    """The guest's monitor, retried until RESUME_WAIT: the shim's own
    connection may still be closing. None when the QEMU is gone."""
    deadline = time.monotonic() + RESUME_WAIT
    while time.monotonic() < deadline:
        if start_time(pid) != started:
            return None
        try:
            return _Qmp(path, pid, min(deadline, time.monotonic() + 1.0))
        except _NotTheGuest:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


def resume_guest(path: str, pid: int, started: int, ignore_shared: bool) -> str:
    """Resume the guest the shim paused, if it is still paused; what was done."""
    qmp = _connect_qmp(path, pid, started)
    if qmp is None:
        return "unreachable"
    try:
        migration = qmp.command("query-migrate")
        if isinstance(migration, dict) and migration.get("status") in MIGRATING:
            qmp.command("migrate_cancel")
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                migration = qmp.command("query-migrate")
                if not isinstance(migration, dict) or migration.get("status") not in MIGRATING:
                    break
                time.sleep(0.02)
        status = qmp.command("query-status")
        state = status.get("status") if isinstance(status, dict) else None
        done = f"left {state}"
        if state in RESUMABLE:
            qmp.command("cont")
            done = f"resumed from {state}"
        settle = time.monotonic() + RESUME_SETTLE
        while state in (*RESUMABLE, "running") and time.monotonic() < settle:
            time.sleep(0.05)
            status = qmp.command("query-status")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "paused":
                # The dead shim's own 'stop', run late.
                qmp.command("cont")
                done = "resumed after a late stop"
        with suppress(OSError):
            qmp.command("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
        return done
    except (OSError, ValueError) as exc:
        return f"failed: {exc}"
    finally:
        qmp.close()


def _reap(pids: dict[int, int], paths: list[str], guests: dict[str, tuple[int, int, bool]]) -> None:
    for pid, started in pids.items():
        if start_time(pid) == started:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # The guest first: its bound is RESUME_BOUND, the files can wait.
    for path, (pid, started, ignore_shared) in guests.items():
        resume_guest(path, pid, started, ignore_shared)
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline and any(
        start_time(pid) == started and process_state(pid) != "Z" for pid, started in pids.items()
    ):
        time.sleep(0.01)
    for path in reversed(paths):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(path)


def _serve() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    pids: dict[int, int] = {}
    paths: list[str] = []
    guests: dict[str, tuple[int, int, bool]] = {}
    for raw in sys.stdin.buffer:
        try:
            verb, subject, *rest = json.loads(raw)
        except ValueError:
            continue
        if verb == "+pid":
            pids[int(subject)] = int(rest[0])
        elif verb == "-pid":
            pids.pop(int(subject), None)
        elif verb == "+path":
            paths.append(str(subject))
        elif verb == "-path":
            with suppress(ValueError):
                paths.remove(str(subject))
        elif verb == "+guest":
            guests[str(subject)] = (int(rest[0]), int(rest[1]), bool(rest[2]))
        elif verb == "-guest":
            guests.pop(str(subject), None)
    _reap(pids, paths, guests)


if __name__ == "__main__":
    _serve()
