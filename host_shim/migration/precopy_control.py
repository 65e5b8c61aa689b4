"""The pre-copy's end and the guest's throttle of one migration: the
decision (host_shim/migration/convergence.py) applied to the throttle
(host_shim/migration/throttle.py), and what both did for the report
(``throttle``; docs/migration.md, "Convergence")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from host_shim.migration.convergence import Convergence, ConvergenceSettings, PassNumbers
from host_shim.migration.throttle import Guest, GuestThrottle


class PreCopyControl:
    """Ask after each pre-copy pass whether to switch over; throttle the
    guest as decided until :meth:`close`, which every way out of pre-copy
    calls before anything else touches the guest's run state."""

    def __init__(self, settings: ConvergenceSettings, guest: Guest, *,
                 on_pause: Callable[[], None] = lambda: None,
                 on_release: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.convergence = Convergence(settings)
        self.throttle = GuestThrottle(guest, on_pause=on_pause, on_release=on_release)

    def after_pass(self, numbers: PassNumbers, passes_left: int) -> bool:
        """True: stop pre-copy now (Convergence.after_pass)."""
        decision = self.convergence.after_pass(numbers, passes_left)
        self.throttle.set_level(decision.throttle)
        return decision.switch

    def fits(self, dirty: int) -> bool:
        """``dirty`` marked pages fit the downtime limit by the last measured rate."""
        return self.convergence.fits(dirty)

    def close(self) -> bool:
        """The throttle ends with the guest running; True if it may still be
        paused (GuestThrottle.close)."""
        return self.throttle.close()

    def __enter__(self) -> PreCopyControl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def report(self) -> dict[str, Any]:
        stats = asdict(self.throttle.stats)
        return {
            "auto_converge": self.settings.auto_converge,
            "downtime_limit_ms": self.settings.downtime_limit_ms,
            **stats,
            "decisions": [decision.as_json() for decision in self.convergence.decisions],
        }

    def describe(self) -> str:
        stats = self.throttle.stats
        last = self.convergence.decisions[-1] if self.convergence.decisions else None
        decided = f"pre-copy ended: {last.reason}" if last is not None and last.switch else "no switchover decision"
        if stats.max_level == 0:
            throttled = "the guest was never throttled" + ("" if self.settings.auto_converge
                                                           else " (--no-auto-converge)")
        else:
            throttled = (f"the guest was throttled up to {100 * stats.max_level:.0f}% for "
                         f"{stats.engaged_seconds:.2f} s ({stats.cycles} stops, {stats.stopped_seconds:.2f} s "
                         "stopped)" + (f"; {stats.error}" if stats.error else ""))
        return f"{decided}; {throttled}"
