"""The reaper: a small process that outlives the shim by a moment.

Whatever ends the shim (an exception, a signal, SIGKILL, the OOM killer),
the kernel closes the write end of a pipe the shim holds, and the reaper,
which holds the read end as its stdin, sees end of file. It then SIGKILLs
every process the shim registered and still running (by pid, checked
against the process's start time so a reused pid is never hit) and removes
every file and folder the shim registered. The shim registers a child as
soon as it starts it and unregisters it once it has reaped it itself, so on
an orderly exit the reaper has nothing left to do.

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
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

#: How long the reaper waits for a killed process to go before it removes files.
KILL_WAIT = 5.0


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


def _reap(pids: dict[int, int], paths: list[str]) -> None:
    for pid, started in pids.items():
        if start_time(pid) == started:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
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
    _reap(pids, paths)


if __name__ == "__main__":
    _serve()
