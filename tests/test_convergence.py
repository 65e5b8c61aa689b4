"""Pre-copy's switchover decision and the guest throttle, without QEMU:
made-up page rates for the decision, a recording stand-in for the guest's
QMP monitor for the throttle (the real migration with the throttle engaged
is in tests/test_migrate.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from host_shim.errors import QemuError
from host_shim.migration.convergence import (
    AIM_MARGIN,
    MIN_SAMPLE_PAGES,
    SHRINK_TARGET,
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    THROTTLE_STEP,
    Convergence,
    ConvergenceSettings,
    PassNumbers,
)
from host_shim.migration.migration_vm import MigrationError
from host_shim.migration.precopy_control import PreCopyControl
from host_shim.migration.throttle import GuestThrottle


def _numbers(marked: int, seconds: float, dirty_now: int, sent: int = 1000, sent_before: int = 4000) -> PassNumbers:
    return PassNumbers(marked=marked, seconds=seconds, sent=sent, sent_before=sent_before, dirty_now=dirty_now)


def test_a_final_pass_within_the_limit_by_the_last_rate_switches() -> None:
    c = Convergence(ConvergenceSettings(downtime_limit_ms=50))
    # 4,000 marked pages in 1 s: 0.25 ms a page; 150 marked now take 37.5 ms.
    decision = c.after_pass(_numbers(4000, 1.0, 150), 3)
    assert decision.switch and decision.estimate_ms == pytest.approx(37.5)
    assert decision.throttle == 0.0 and "within 50 ms" in decision.reason
    # 250 pages would take 62.5 ms: one more pass.
    c = Convergence(ConvergenceSettings(downtime_limit_ms=50))
    decision = c.after_pass(_numbers(4000, 1.0, 250), 3)
    assert not decision.switch and decision.estimate_ms == pytest.approx(62.5)
    # The same count is fine for a faster pass, and the limit is the user's.
    assert Convergence(ConvergenceSettings(downtime_limit_ms=50)).after_pass(_numbers(4000, 0.5, 250), 3).switch
    assert Convergence(ConvergenceSettings(downtime_limit_ms=70)).after_pass(_numbers(4000, 1.0, 250), 3).switch


def test_a_guest_that_writes_at_more_than_half_the_send_rate_raises_the_throttle_as_its_ratio_asks() -> None:
    c = Convergence()
    # Many passes left: the aim is SHRINK_TARGET. The pass sent 80 % of what
    # the one before sent: the guest writes at 0.8 of the send rate; running
    # 0.625 of the time would have made it 50 %.
    decision = c.after_pass(_numbers(10000, 4.0, 9000, sent=3200, sent_before=4000), 100)
    assert not decision.switch and decision.ratio == pytest.approx(0.8) and decision.aim == SHRINK_TARGET
    assert decision.throttle == pytest.approx(1 - SHRINK_TARGET / 0.8)
    # Then 60 % at that level: the next level scales what runs still.
    decision = c.after_pass(_numbers(9000, 3.6, 8000, sent=1920, sent_before=3200), 100)
    assert decision.throttle == pytest.approx(1 - (SHRINK_TARGET / 0.8) * (SHRINK_TARGET / 0.6))


def test_the_log_marking_whole_folios_does_not_throttle_a_guest_that_converges() -> None:
    """A quiet run's numbers (docs/migration.md, "Convergence"): the log
    still marks 4,612 pages (nine 2 MiB folios) while the pages really
    sent fall from 4,590 to 1,975 to 281: no throttle."""
    c = Convergence(ConvergenceSettings(downtime_limit_ms=100))
    decision = c.after_pass(PassNumbers(marked=10765, seconds=0.464, sent=4590, sent_before=10557,
                                        dirty_now=8707), 3)
    assert not decision.switch and decision.throttle == 0.0
    decision = c.after_pass(PassNumbers(marked=8708, seconds=0.278, sent=1975, sent_before=4590,
                                        dirty_now=6147), 2)
    assert not decision.switch and decision.throttle == 0.0
    decision = c.after_pass(PassNumbers(marked=6148, seconds=0.078, sent=281, sent_before=1975,
                                        dirty_now=4611), 1)
    assert decision.switch and decision.throttle == 0.0


def test_the_aim_is_what_reaches_most_of_the_limit_within_the_passes_left() -> None:
    c = Convergence(ConvergenceSettings(downtime_limit_ms=50))
    # 0.4 ms a page, 8,000 pages: 3,200 ms. 3/4 of the limit in 3 passes:
    # each (37.5 / 3200) ** (1/3) = 0.227.
    decision = c.after_pass(_numbers(10000, 4.0, 8000, sent=3200, sent_before=4000), 3)
    aim = (37.5 / 3200) ** (1 / 3)
    assert AIM_MARGIN == 0.75 and decision.aim == pytest.approx(aim)
    assert decision.throttle == pytest.approx(1 - aim / 0.8)
    # A pass at that aim leaves the throttle as it is.
    level = c.throttle
    assert c.after_pass(_numbers(8000, 3.2, 1600, sent=int(3200 * aim), sent_before=3200), 2).throttle == level
    # With one pass left the aim is the whole way; never above SHRINK_TARGET.
    assert c.aim(500, 1) == pytest.approx(37.5 / 500)
    assert c.aim(60, 10) == SHRINK_TARGET


def test_the_throttle_starts_at_its_first_level_rises_by_a_step_at_least_and_stays_bounded() -> None:
    c = Convergence()
    # Just over the target ratio: the model asks for 9 %; the first level is 20 %.
    assert c.after_pass(_numbers(10000, 4.0, 9000, sent=2200, sent_before=4000), 100).throttle == \
        pytest.approx(THROTTLE_INITIAL)
    # Again just over: at least one step more.
    assert c.after_pass(_numbers(9000, 3.6, 8000, sent=1210, sent_before=2200), 100).throttle == \
        pytest.approx(THROTTLE_INITIAL + THROTTLE_STEP)
    # A guest that writes far faster than the helpers send: the bound.
    for _ in range(5):
        assert c.after_pass(_numbers(10000, 4.0, 9000, sent=4000, sent_before=1000), 100).throttle <= THROTTLE_MAX
    assert c.throttle == THROTTLE_MAX


def test_the_throttle_never_falls_and_a_converging_pass_leaves_it_as_it_is() -> None:
    c = Convergence()
    assert c.after_pass(_numbers(10000, 4.0, 9000, sent=3600, sent_before=4000), 100).throttle > 0
    level = c.throttle
    # Sent less than half the pass before (not yet within the limit): no change.
    decision = c.after_pass(_numbers(9000, 3.6, 2000, sent=1000, sent_before=3600), 100)
    assert not decision.switch and decision.throttle == level


def test_without_auto_converge_the_guest_is_never_throttled() -> None:
    c = Convergence(ConvergenceSettings(auto_converge=False))
    for _ in range(4):
        decision = c.after_pass(_numbers(10000, 4.0, 12000, sent=4000, sent_before=2000), 3)
        assert decision.throttle == 0.0 and not decision.switch


def test_the_pass_limit_ends_pre_copy_and_says_so() -> None:
    c = Convergence()
    decision = c.after_pass(_numbers(10000, 4.0, 9000), 0)
    assert decision.switch and decision.reason.startswith("the pass limit")
    assert decision.estimate_ms == pytest.approx(3600)


def test_a_small_pass_keeps_the_rate_of_the_last_large_one() -> None:
    c = Convergence()
    c.after_pass(_numbers(4000, 1.0, 500), 3)  # 0.25 ms a page
    # 20 pages in 50 ms is the pass's fixed cost, not its rate.
    decision = c.after_pass(_numbers(MIN_SAMPLE_PAGES - 44, 0.05, 100), 3)
    assert decision.seconds_per_page == pytest.approx(0.00025)
    assert decision.switch and decision.estimate_ms == pytest.approx(25)
    # With nothing measured before, a small pass is all there is.
    assert Convergence().after_pass(_numbers(20, 0.05, 20), 3).estimate_ms == pytest.approx(50)
    # An empty pass measured nothing: an empty log fits.
    c = Convergence()
    assert c.after_pass(_numbers(0, 0.01, 0, sent=0, sent_before=0), 3).switch and c.fits(0)


def test_fits_uses_the_last_rate_for_the_catch_up() -> None:
    c = Convergence(ConvergenceSettings(downtime_limit_ms=50))
    c.after_pass(_numbers(4000, 1.0, 5000), 3)
    assert c.fits(200) and not c.fits(201)


@pytest.mark.parametrize("limit", [0, -5, float("nan")])
def test_a_downtime_limit_that_is_no_duration_is_refused(limit: float) -> None:
    with pytest.raises(MigrationError, match="--downtime-limit"):
        ConvergenceSettings(downtime_limit_ms=limit)


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        _numbers(-1, 1.0, 10)
    with pytest.raises(ValueError, match="negative"):
        _numbers(10, float("nan"), 10)


def _simulate(auto_converge: bool, dirty_rate: float, send_rate: float, passes: int = 6) -> tuple[int, Any]:
    """A guest writing ``dirty_rate`` pages/s while it runs (1 - throttle of
    the time) over a 16,384-page working set, helpers sending ``send_rate``
    pages/s, as migrate.py asks: the first decision after pass 2 (pass 1
    sent 38,396 written pages, the workload all dirty after it), then after
    each pass, ``passes`` pre-copy passes at most: passes until the
    decision switches, and that decision."""
    c = Convergence(ConvergenceSettings(downtime_limit_ms=50, auto_converge=auto_converge))
    dirty, sent_before = 16384, 38396
    for number in range(2, passes + 1):
        seconds = dirty / send_rate
        after = min(16384, int(dirty_rate * (1 - c.throttle) * seconds))
        decision = c.after_pass(PassNumbers(marked=dirty, seconds=seconds, sent=dirty, sent_before=sent_before,
                                            dirty_now=after), passes - number)
        if decision.switch:
            return number, decision
        dirty, sent_before = after, dirty
    raise AssertionError("the pass limit always switches")


def test_with_auto_converge_a_guest_that_outwrites_the_helpers_converges_within_the_pass_limit() -> None:
    """The loaded-host case of docs/migration.md: 5,120 pages/s written,
    3,000 pages/s sent. Left alone it never converges (the working set
    stays dirty and the pass limit ends it with seconds of final pass);
    throttled, it fits the limit by the last allowed pass."""
    passes, decision = _simulate(False, 5120, 3000)
    assert passes == 6 and decision.estimate_ms > 1000 and decision.reason.startswith("the pass limit")
    assert decision.throttle == 0
    passes, decision = _simulate(True, 5120, 3000)
    assert passes <= 6 and decision.estimate_ms <= 50 and "within 50 ms" in decision.reason
    assert 0 < decision.throttle <= THROTTLE_MAX
    # A guest that writes at a fifth of the send rate converges untouched.
    passes, decision = _simulate(True, 600, 3000)
    assert "within 50 ms" in decision.reason and decision.throttle == 0


class _Monitor:
    """Stands in for a QEMU's QMP monitor: records stop and cont with the
    guest's state; ``fail`` makes the given command raise (as QEMU's
    monitor would for a QEMU gone)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.running = True
        self.fail: set[str] = set()
        self.lock = threading.Lock()

    def qmp(self, command: str, **_: object) -> Any:
        with self.lock:
            self.commands.append(command)
            if command in self.fail:
                raise QemuError(f"QMP command {command} failed: connection lost")
            self.running = command == "cont"
        return {}


def _wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the throttle did not get there within 30 s"
        time.sleep(0.005)


def test_the_throttle_stops_and_resumes_the_guest_in_turn_and_ends_with_it_running() -> None:
    monitor = _Monitor()
    calls: list[str] = []
    throttle = GuestThrottle(monitor, period=0.02, on_pause=lambda: calls.append("guard"),
                             on_release=lambda: calls.append("release"))
    throttle.set_level(0.5)
    _wait_until(lambda: monitor.commands.count("cont") >= 3)
    throttle.set_level(THROTTLE_MAX)
    _wait_until(lambda: monitor.commands.count("cont") >= 6)
    assert throttle.close() is False
    assert monitor.running and monitor.commands[-1] == "cont"
    # Strictly in turn: never two stops without a cont between them.
    assert monitor.commands == ["stop", "cont"] * (len(monitor.commands) // 2)
    # Guarded once before the first stop, released after the last cont.
    assert calls == ["guard", "release"]
    stats = throttle.stats
    assert stats.max_level == THROTTLE_MAX and stats.cycles == len(monitor.commands) // 2
    assert 0 < stats.stopped_seconds <= stats.engaged_seconds
    # Closed is closed: no level starts it again.
    throttle.set_level(0.5)
    time.sleep(0.05)
    assert monitor.commands[-1] == "cont" and throttle.close() is False


def test_a_throttle_closed_mid_stop_resumes_the_guest_at_once() -> None:
    monitor = _Monitor()
    throttle = GuestThrottle(monitor, period=20.0)
    throttle.set_level(0.1)  # runs 18 s, then stops for 2 s
    time.sleep(0.05)
    # Closed while the guest runs: nothing sent at all.
    assert throttle.close() is False and monitor.commands == []
    monitor = _Monitor()
    throttle = GuestThrottle(monitor, period=20.0)
    throttle.set_level(THROTTLE_MAX)  # runs 2 s, then stops for 18 s
    _wait_until(lambda: monitor.commands == ["stop"])
    began = time.monotonic()
    assert throttle.close() is False
    assert monitor.running and monitor.commands == ["stop", "cont"]
    assert time.monotonic() - began < 15, "close waited for the stop's end"
    # A level of 0 never starts the thread: nothing is sent.
    idle = _Monitor()
    quiet = GuestThrottle(idle)
    quiet.set_level(0.0)
    assert quiet.close() is False and idle.commands == []


def test_a_stop_that_fails_ends_the_throttle_and_close_resumes_the_guest() -> None:
    monitor = _Monitor()
    monitor.fail = {"stop"}
    calls: list[str] = []
    throttle = GuestThrottle(monitor, period=0.01, on_pause=lambda: calls.append("guard"),
                             on_release=lambda: calls.append("release"))
    throttle.set_level(0.5)
    _wait_until(lambda: throttle.stats.error is not None)
    # The failed stop may have stopped the guest (a lost answer): close sends 'cont'.
    assert throttle.close() is False
    assert monitor.commands == ["stop", "cont"] and monitor.running
    assert calls == ["guard", "release"]
    assert "stop failed" in (throttle.stats.error or "")


def test_a_cont_that_keeps_failing_is_reported_and_the_guard_stays() -> None:
    """The caller then counts the guest as stopped by the run and resumes
    it on its failure path (migrate.py); the reaper's guard stays until then."""
    monitor = _Monitor()
    monitor.fail = {"cont"}
    calls: list[str] = []
    throttle = GuestThrottle(monitor, period=0.01, on_pause=lambda: calls.append("guard"),
                             on_release=lambda: calls.append("release"))
    throttle.set_level(0.5)
    _wait_until(lambda: throttle.stats.error is not None)
    assert throttle.close() is True
    assert not monitor.running and monitor.commands == ["stop", "cont", "cont", "cont"]
    assert calls == ["guard"]
    assert "'cont' at the end" in (throttle.stats.error or "")


def test_the_control_throttles_as_decided_and_reports_it() -> None:
    monitor = _Monitor()
    control = PreCopyControl(ConvergenceSettings(downtime_limit_ms=50), monitor)
    assert not control.after_pass(_numbers(10000, 4.0, 9000, sent=3600, sent_before=4000), 100)
    assert control.throttle.level == pytest.approx(1 - SHRINK_TARGET / 0.9)
    _wait_until(lambda: "cont" in monitor.commands)
    assert control.after_pass(_numbers(9000, 3.6, 100, sent=500, sent_before=3600), 2)
    assert control.close() is False and monitor.running
    report = control.report()
    assert report["auto_converge"] is True and report["downtime_limit_ms"] == 50
    assert report["max_level"] == pytest.approx(1 - SHRINK_TARGET / 0.9) and report["cycles"] >= 1
    assert [d["switch"] for d in report["decisions"]] == [False, True]
    assert "throttled up to 44%" in control.describe()
    assert "within 50 ms" in control.describe()


class _OneLoopConnection:
    """A QMP connection whose commands and event reads share one event loop,
    as qemu.qmp's synchronous wrapper does: either raises when the other runs."""

    def __init__(self) -> None:
        self.running = False
        self.clashes = 0

    def _enter(self) -> None:
        if self.running:
            self.clashes += 1
            raise RuntimeError("This event loop is already running")
        self.running = True

    def cmd(self, command: str, **_: object) -> dict[str, Any]:
        self._enter()
        try:
            time.sleep(0.001)
            return {}
        finally:
            self.running = False

    def get_events(self, wait: bool = False) -> list[dict[str, Any]]:
        self._enter()
        try:
            time.sleep(0.0005)
            return []
        finally:
            self.running = False


def test_qmp_commands_from_two_threads_never_share_the_connection(tmp_path: Path) -> None:
    """The throttle's stop/cont and the main thread's commands go to one
    QEMU: a command's reading of events must not run beside another
    thread's command (it did: 'This event loop is already running')."""
    from host_shim.vm.qmp_log import LoggedQmp

    log = LoggedQmp(tmp_path / "qmp.log")
    connection = _OneLoopConnection()
    log.connect(connection)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def hammer() -> None:
        for _ in range(200):
            try:
                log.command("query-status", lambda message: QemuError(message))
            except QemuError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert connection.clashes == 0 and errors == []
