"""Slow the source guest during pre-copy: a duty cycle of QMP ``stop`` and
``cont`` (docs/migration.md, "Convergence").

QEMU's own vCPU throttle (``cpu-throttle-percentage``) acts only inside
QEMU's RAM migration, which ``x-ignore-shared`` leaves with nothing to do
until the device-state move at the switchover; and it only takes CPU time
from the vCPUs while the guest's clock runs on, so a guest whose writes
are paced by its clock (the test workload sleeps 50 ms per 256 pages)
writes as much as before. A stopped VM's clock stops too (TCG's virtual
clock and the guest's TSC are paused with it): a guest stopped for a share
of each period writes that share less, and its vCPU thread leaves that
share of a CPU to the helpers.

Bounded: the stopped share is at most THROTTLE_MAX of a PERIOD (the guest
runs at least the rest of each period). Never left stopped: the thread
resumes the guest at the end of each stop, whenever it is told to end;
:meth:`GuestThrottle.close` (called by every path out of pre-copy) joins it
and resumes the guest if a ``cont`` failed, and says so if that fails too.
While the throttle may hold the user's guest paused, the reaper guards it
(``on_pause``/``on_release``: a program killed mid-stop leaves the guest to
the reaper, which resumes it, docs/migration-protocol.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from host_shim.errors import OvmfMhError
from host_shim.migration.convergence import THROTTLE_MAX

log = logging.getLogger(__name__)

#: Seconds of one stop-and-run cycle.
PERIOD = 0.1


class Guest(Protocol):
    """What the throttle needs of the source QEMU (a QemuHandle)."""

    def qmp(self, command: str, **arguments: object) -> Any: ...


@dataclass
class ThrottleStats:
    """What the throttle did, for the report."""

    level: float = 0.0
    max_level: float = 0.0
    #: Seconds from the throttle's first stop to its end.
    engaged_seconds: float = 0.0
    #: Seconds the guest spent stopped by it (each from before 'stop' to after 'cont').
    stopped_seconds: float = 0.0
    cycles: int = 0
    error: str | None = None


class GuestThrottle:
    """A duty cycle of the source guest, at the level last set (0: off)."""

    def __init__(self, guest: Guest, *, period: float = PERIOD,
                 on_pause: Callable[[], None] = lambda: None,
                 on_release: Callable[[], None] = lambda: None) -> None:
        self._guest = guest
        self._period = period
        self._on_pause = on_pause
        self._on_release = on_release
        self.stats = ThrottleStats()
        self._level = 0.0
        self._end = threading.Event()
        self._thread: threading.Thread | None = None
        self._engaged_at: float | None = None
        #: True from the 'stop' sent until a 'cont' answered: the guest may be paused by the throttle.
        self.holding = False
        self._guarded = False

    @property
    def level(self) -> float:
        return self._level

    def set_level(self, level: float) -> None:
        """The share of each period the guest is stopped from now on, 0..THROTTLE_MAX."""
        if not 0.0 <= level <= THROTTLE_MAX:
            raise ValueError(f"throttle level {level}: between 0 and {THROTTLE_MAX}")
        if self._end.is_set():
            return
        self._level = level
        self.stats.level = level
        self.stats.max_level = max(self.stats.max_level, level)
        if level > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migrate-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._end.wait(self._period * (1.0 - self._level)):
                self._stop_for(self._period * self._level)
        except OvmfMhError as exc:
            # The source QEMU gone or not answering: the run's watch or its
            # next QMP command reports that; close() tries 'cont' once more.
            self.stats.error = str(exc)
            log.warning("migrate: the guest throttle ended: %s", exc)

    def _stop_for(self, seconds: float) -> None:
        if not self._guarded:
            self._on_pause()
            self._guarded = True
        if self._engaged_at is None:
            self._engaged_at = time.monotonic()
        began = time.monotonic()
        self.holding = True
        self._guest.qmp("stop")
        try:
            self._end.wait(seconds)
        finally:
            self._guest.qmp("cont")
            self.holding = False
            self.stats.stopped_seconds += time.monotonic() - began
            self.stats.cycles += 1

    def close(self) -> bool:
        """End the throttle, the guest running; True if it may still be
        paused (a 'cont' failed twice: the caller's failure path resumes it
        as a guest it stopped). Idempotent."""
        self._end.set()
        if self._thread is not None:
            self._thread.join()
        if self._engaged_at is not None:
            self.stats.engaged_seconds = time.monotonic() - self._engaged_at
            self._engaged_at = None
        for _ in range(2):
            if not self.holding:
                break
            try:
                self._guest.qmp("cont")
                self.holding = False
            except OvmfMhError as exc:
                self.stats.error = f"{self.stats.error or ''}; 'cont' at the end: {exc}".lstrip("; ")
        if self._guarded and not self.holding:
            self._on_release()
            self._guarded = False
        return self.holding
