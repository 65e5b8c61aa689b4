"""Busy processes beside a benchmark (``bench migrate --background-load N``):
a loaded host measured, not guessed.

Each burner is a Python process spinning in a loop, started with the
project's process helper (registered with the reaper, so it does not outlive
the shim) and stopped by its own pid: SIGTERM, then SIGKILL if it lingers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from host_shim.vm import process

#: What each burner runs: one CPU's worth of busy loop, nothing else.
BURNER = "while True:\n    pass\n"


@contextmanager
def background_load(count: int) -> Iterator[list[int]]:
    """Run ``count`` CPU burners for the duration of the block; yields their pids."""
    if count < 0:
        raise ValueError(f"background load must be 0 or more processes, not {count}")
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            burners.append(process.spawn([sys.executable, "-c", BURNER], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield [burner.pid for burner in burners]
    finally:
        for burner in burners:
            if burner.poll() is None:
                with suppress(ProcessLookupError):
                    burner.send_signal(signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    burner.wait(timeout=2.0)
            process.kill_if_running(burner, "background load")
