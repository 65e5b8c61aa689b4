"""The reference helper in a process of its own (helper/serve.py), driven
through the same mailbox client as a firmware helper VM.

Its memory file is laid out like a helper VM's RAM: the host writes the
emulated launch secret at OVMF_MH_SECRET_PAGE_BASE before the process
starts, and the mailbox sits at OVMF_MH_MAILBOX_MIN_BASE. The work folder
keeps the command line, the pid and the process's log; the process is
stopped by SHUTDOWN and, if that does not end it, killed by its own pid.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from helper import abi
from helper.serve import WAKE_SIGNAL
from host_shim import paths
from host_shim.errors import SetupError
from host_shim.helpers.helper_memory import HelperMemory
from host_shim.helpers.mailbox import Mailbox
from host_shim.vm import process
from host_shim.vm.process import kill_if_running


class ReferenceHelperProcess:
    """One reference helper process over one guest RAM file. Context manager."""

    def __init__(
        self,
        guest_ram: Path,
        key: bytes | None,
        work_dir: Path,
        name: str = "reference",
        *,
        target: bool,
        mailbox_size: int = 16 * 1024 * 1024,
    ) -> None:
        # Absolute: the process runs in the source tree, not in the caller's directory.
        self.guest_ram = guest_ram.absolute()
        self.key = key
        self.work_dir = work_dir.absolute()
        self.name = name
        self.target = target
        self.mailbox_base = abi.load().const("OVMF_MH_MAILBOX_MIN_BASE")
        self.mailbox_size = mailbox_size
        self.log_file = self.work_dir / "reference-helper.log"
        self.mailbox: Mailbox | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._memory: HelperMemory | None = None

    def __enter__(self) -> ReferenceHelperProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def memory(self) -> mmap.mmap:
        if self._memory is None:
            raise SetupError(f"{self.name}: not started")
        return self._memory.map

    def command(self) -> list[str]:
        argv = [
            sys.executable, "-m", "helper.serve",
            "--memory", str(self._memory.path if self._memory else "-"),
            "--mailbox-base", hex(self.mailbox_base),
            "--mailbox-size", hex(self.mailbox_size),
            "--guest-ram", str(self.guest_ram),
        ]
        return argv + (["--target"] if self.target else [])

    def start(self) -> None:
        """Lay out the memory file, start the process; does not wait for READY."""
        if not self.guest_ram.is_file():
            raise SetupError(f"guest RAM file {self.guest_ram} does not exist")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._memory = HelperMemory(self.mailbox_base + self.mailbox_size, self.key)
        argv = self.command()
        (self.work_dir / "command-line.txt").write_text(" ".join(argv) + "\n")
        env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
        with self.log_file.open("wb") as out:
            self._proc = process.spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=paths.REPO_ROOT, env=env)
        (self.work_dir / "pid").write_text(f"{self._proc.pid}\n")
        self.mailbox = Mailbox(self._memory.map, self.mailbox_base, self.mailbox_size,
                               is_alive=self.is_running, debugcon=self.log_file,
                               label=f"{self.name} (reference helper pid {self._proc.pid})",
                               wake=self.wake)
        self.mailbox.pid = self._proc.pid

    def wake(self) -> None:
        """Wake the idle process (helper.serve's WAKE_SIGNAL), by its own pid."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, WAKE_SIGNAL)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.mailbox is None:
            raise SetupError(f"{self.name}: not started")
        header = self.mailbox.wait_ready(timeout)  # its errors name the log
        # The process has mapped its memory file: the key loses its name now.
        if self._memory is not None:
            self._memory.unlink()
        return header

    def close(self, soft_timeout: float = 2.0) -> int | None:
        """SHUTDOWN through the mailbox (skipped when a command is in flight
        or the process is stopped), then SIGKILL to the process's own pid."""
        proc = self._proc
        if (proc is not None and proc.poll() is None and self.mailbox is not None
                and self.mailbox.shutdown_if_idle(soft_timeout)):
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=soft_timeout)
        if proc is not None:
            kill_if_running(proc, f"{self.name}: reference helper")
        if self.mailbox is not None:
            self.mailbox.release()
            self.mailbox = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        return None if proc is None else proc.returncode
