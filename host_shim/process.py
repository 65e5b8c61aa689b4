"""Ending a child process by its own pid."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from contextlib import suppress

log = logging.getLogger(__name__)


def kill_if_running(proc: subprocess.Popen[bytes], label: str) -> None:
    """SIGKILL to ``proc``'s own pid if it still runs after its soft stop,
    then reap it. Never by name: other processes of the same program are
    someone else's."""
    if proc.poll() is None:
        log.warning("%s pid %d did not stop; killing it", label, proc.pid)
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
