"""When pre-copy may stop, and how hard to slow a guest that writes faster
than the helpers send (docs/migration.md, "Convergence").

Plain QEMU switches over when the bytes still dirty, at the bandwidth it
measured, fit its downtime limit; with auto-converge it throttles the
guest's vCPUs while they do not. This is the same decision for the
helpers' page stream:

* **The estimate.** The last pre-copy pass took ``seconds`` for the
  ``marked`` pages the log marked at its start (the helpers' check of
  them and the send of those that changed): that is the time per marked
  page. The final pass, the guest stopped, does the same work for the
  pages the log marks now (``dirty_now``). Switch when ``dirty_now``
  times that time fits the downtime limit.
* **Auto-converge.** A pass sends the pages written during the pass
  before it: ``sent / sent_before`` is the rate the guest writes at
  against the rate the helpers send (the log's own counts will not do:
  it marks 2 MiB folios whole, so a few written pages keep thousands
  marked). To fit AIM_MARGIN of the limit within the pre-copy passes
  still allowed, that ratio must be at most the aim: the
  ``passes_left``-th root of (AIM_MARGIN of the limit ÷ the estimate),
  and at most SHRINK_TARGET (a guest that writes at more than half the
  rate the helpers send is throttled, as QEMU's auto-converge does). A
  ratio above the aim raises the throttle (host_shim/migration/throttle.py,
  a duty cycle of the guest) to the level that would have brought it to
  the aim, if the guest's writes fall in proportion to the time it runs:
  at least by THROTTLE_STEP, at most to THROTTLE_MAX. It never falls
  during one migration (as QEMU's). More passes allowed (``--max-passes``)
  make a gentler throttle.

Only the decision lives here, with no clock and no QEMU: the caller
measures, this module decides (tests/test_convergence.py drives it with
made-up rates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from host_shim.migration.migration_vm import MigrationError

#: Milliseconds the final pass may take by the estimate (``--downtime-limit``).
DEFAULT_DOWNTIME_LIMIT_MS = 50
#: A pass converges fast enough when it leaves at most this share of its
#: marked pages dirty again.
SHRINK_TARGET = 0.5
#: The throttle's first level, its smallest rise, and its bound (the share
#: of each period the guest is stopped).
THROTTLE_INITIAL = 0.2
THROTTLE_STEP = 0.1
THROTTLE_MAX = 0.9
#: The throttle aims at this share of the limit: a model that lands exactly
#: on the limit misses it by any pass a little worse than the last.
AIM_MARGIN = 0.75
#: A pass of fewer marked pages than this measures its fixed costs more than
#: its rate: the time per page then comes from the last larger pass.
MIN_SAMPLE_PAGES = 64


@dataclass(frozen=True)
class ConvergenceSettings:
    """What the user chose (``--downtime-limit``, ``--auto-converge``)."""

    downtime_limit_ms: float = DEFAULT_DOWNTIME_LIMIT_MS
    auto_converge: bool = True

    def __post_init__(self) -> None:
        if not self.downtime_limit_ms > 0:
            raise MigrationError(f"--downtime-limit {self.downtime_limit_ms:g}: a number of milliseconds above 0")


@dataclass(frozen=True)
class PassNumbers:
    """What a pre-copy pass measured, as the decision needs it."""

    #: Pages the log marked when the pass began (its check covered them), and
    #: the seconds of the check and the send.
    marked: int
    seconds: float
    #: Pages the pass sent (those that had changed), and the pages the pass
    #: before it sent (for pass 1: its pages outside zero ranges).
    sent: int
    sent_before: int
    #: Pages the log marks now: the final pass's work if pre-copy ended here.
    dirty_now: int

    def __post_init__(self) -> None:
        if min(self.marked, self.sent, self.sent_before, self.dirty_now) < 0 or not self.seconds >= 0:
            raise ValueError(f"pass numbers {self}: nothing here is negative")


@dataclass(frozen=True)
class Decision:
    """One look after a pre-copy pass: its numbers and what was decided."""

    numbers: PassNumbers
    #: Seconds per marked page this decision used, and the final pass's estimate.
    seconds_per_page: float
    estimate_ms: float
    #: sent / sent_before, and the most it may be without a throttle rise.
    ratio: float
    aim: float
    #: Stop pre-copy now; and the throttle level for what follows.
    switch: bool
    throttle: float
    reason: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Convergence:
    """The decisions of one migration, pass after pass."""

    settings: ConvergenceSettings = field(default_factory=ConvergenceSettings)
    throttle: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    _seconds_per_page: float | None = None

    def estimate_ms(self, dirty: int) -> float:
        """The final pass's time by the last measured rate, for ``dirty``
        marked pages (0 before any pass gave a rate: nothing known to wait for)."""
        return 1000 * dirty * (self._seconds_per_page or 0.0)

    def fits(self, dirty: int) -> bool:
        """Whether ``dirty`` marked pages, sent with the guest stopped, fit the limit."""
        return self.estimate_ms(dirty) <= self.settings.downtime_limit_ms

    def after_pass(self, numbers: PassNumbers, passes_left: int) -> Decision:
        """Decide after a pre-copy pass, ``passes_left`` more allowed."""
        if numbers.marked >= MIN_SAMPLE_PAGES or self._seconds_per_page is None:
            self._seconds_per_page = numbers.seconds / numbers.marked if numbers.marked else 0.0
        estimate = self.estimate_ms(numbers.dirty_now)
        ratio = numbers.sent / numbers.sent_before if numbers.sent_before else 0.0
        aim = self.aim(estimate, passes_left)
        limit = self.settings.downtime_limit_ms
        dirty = numbers.dirty_now
        if estimate <= limit:
            switch, reason = True, f"{dirty} pages by the last rate take {estimate:.0f} ms, within {limit:g} ms"
        elif passes_left <= 0:
            switch, reason = True, f"the pass limit: {dirty} pages left, {estimate:.0f} ms by the last rate"
        else:
            switch, reason = False, f"{dirty} pages would take {estimate:.0f} ms (limit {limit:g} ms)"
            self.throttle = self._next_throttle(ratio, aim)
        decision = Decision(numbers=numbers, seconds_per_page=self._seconds_per_page or 0.0, estimate_ms=estimate,
                            ratio=ratio, aim=aim, switch=switch, throttle=self.throttle, reason=reason)
        self.decisions.append(decision)
        return decision

    def aim(self, estimate_ms: float, passes_left: int) -> float:
        """The ratio each of the ``passes_left`` passes may have for a final
        pass of ``estimate_ms`` now to fit AIM_MARGIN of the limit after
        them; at most SHRINK_TARGET."""
        if estimate_ms <= 0 or passes_left <= 0:
            return SHRINK_TARGET
        fitting = AIM_MARGIN * self.settings.downtime_limit_ms / estimate_ms
        return float(min(SHRINK_TARGET, fitting ** (1.0 / passes_left)))

    def _next_throttle(self, ratio: float, aim: float) -> float:
        if not self.settings.auto_converge or ratio <= aim:
            return self.throttle
        # The guest's writes scale with the share of time it runs (1 - level):
        # the level that would have brought the ratio to the aim.
        wanted = 1.0 - (1.0 - self.throttle) * aim / ratio
        return min(THROTTLE_MAX, max(wanted, self.throttle + THROTTLE_STEP, THROTTLE_INITIAL))
