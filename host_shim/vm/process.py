"""Child processes and temporary paths that end with the shim.

Every process the shim starts goes through :func:`spawn`, which registers
it with the reaper (host_shim/vm/reaper.py): if the shim dies without stopping
it, even by SIGKILL, the reaper kills it. Temporary folders that must not
outlive the shim are made by :func:`temp_dir` or registered with
:func:`remove_on_exit`. Processes are always ended by their own pid, never
by name: other processes of the same program are someone else's.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from host_shim.vm.reaper import process_state, reaper

log = logging.getLogger(__name__)

#: Seconds a process gets to die after SIGKILL before the shim gives up waiting.
KILL_WAIT = 10.0


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen, with the child registered with the reaper at once."""
    watcher = reaper()
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **popen)
    watcher.watch_pid(proc.pid)
    return proc


def is_stopped(proc: subprocess.Popen[bytes]) -> bool:
    """True when the process is stopped (SIGSTOP, a debugger): it will not
    answer anything, so a soft stop would only wait for its timeout."""
    return proc.poll() is None and process_state(proc.pid) in ("T", "t")


def kill_if_running(proc: subprocess.Popen[bytes], label: str) -> None:
    """SIGKILL to ``proc``'s own pid if it still runs after its soft stop,
    then reap it and unregister it from the reaper."""
    if proc.poll() is None:
        log.warning("%s pid %d did not stop; killing it", label, proc.pid)
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_WAIT)
    if proc.returncode is not None:
        reaper().forget_pid(proc.pid)


def describe_exit(code: int | None) -> str:
    """'exit code 1', 'killed by SIGKILL', or 'still running'."""
    if code is None:
        return "still running"
    if code < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def remove_on_exit(path: Path) -> None:
    """Have the reaper remove ``path`` if the shim dies before it does."""
    reaper().watch_path(path)


def keep(path: Path) -> None:
    """``path`` stays after all (a failure's logs); the reaper leaves it."""
    reaper().forget_path(path)


def remove(path: Path) -> None:
    """Remove a file or folder now and unregister it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    reaper().forget_path(path)


#: Random names tried for a temporary folder before giving up.
_TEMP_NAME_TRIES = 100


def temp_dir(prefix: str, base: Path | None = None) -> Path:
    """A new folder (mode 0700) that the reaper removes if the shim dies.
    The reaper learns the name before the folder exists, so that a SIGKILL
    between the two leaves no folder behind (``mkdtemp`` then register had
    that window)."""
    parent = Path(base if base is not None else tempfile.gettempdir())
    for _ in range(_TEMP_NAME_TRIES):
        path = parent / f"{prefix}{secrets.token_hex(5)}"
        remove_on_exit(path)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            reaper().forget_path(path)  # somebody else's: never the reaper's to remove
            continue
        return path
    raise FileExistsError(f"no free name for a temporary folder {parent / prefix}* after {_TEMP_NAME_TRIES} tries")


def private_base() -> Path:
    """Where files holding key bytes go: a RAM-backed folder when there is
    one (XDG_RUNTIME_DIR, else /dev/shm), else the temp folder."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def private_file(folder: Path, name: str) -> Path:
    """A new empty file, mode 0600, in a folder from ``temp_dir``."""
    path = folder / name
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    return path
