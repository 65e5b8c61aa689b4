"""Helpers that halt when idle and a host that wakes them (docs/mailbox.md,
"Idle and wake"): the lost wake-up race host-built, and in QEMU."""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from helper import abi
from host_shim.errors import HelperTimeout, MailboxError, QemuError, SetupError
from host_shim.helpers import hostcore
from host_shim.helpers.helper_vm import IDLE_POLICY_ENV, HelperSpec, HelperVM, IdlePolicy, idle_policy_from_env
from host_shim.helpers.mailbox import Mailbox
from host_shim.vm.qmp_log import LoggedQmp

A = abi.load()
HEADER = A.layout("OVMF_MH_MAILBOX_HEADER")
HEADER_SIZE = A.const("OVMF_MH_MAILBOX_HEADER_SIZE")

#: Seconds a helper polls after a command before it halts.
SPIN = A.const("OVMF_MH_IDLE_DEFAULT_SPIN_US") / 1e6
#: mh_idle_race flags (tests/c/IdleRaceHarness.c).
HOST_FENCE, REWAKE, NO_FIXUP, IN_WINDOW = 0x1, 0x2, 0x4, 0x8
#: PAUSE loops of a stretched window: long enough (tenths of a second) that
#: the host's wake lands inside it even on a loaded machine.
STRETCH = 2_000_000
#: Stats indices.
ANSWERED, LOST, WAKES, HALTS, WINDOW, POSTED = range(6)


# --- host-built: the race hammered -------------------------------------------------------------


class _Race:
    def __init__(self) -> None:
        self.lib = hostcore.load()
        self.lib.mh_create.restype = ctypes.c_void_p
        self.lib.mh_create.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                       ctypes.c_void_p, ctypes.c_uint64]
        self.lib.mh_destroy.argtypes = [ctypes.c_void_p]
        self.lib.mh_idle_race.restype = ctypes.c_int
        self.lib.mh_idle_race.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_uint32] * 6 + [
            ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]

    def run(self, commands: int, flags: int, stretch: int = 0, timeout: float = 0.05) -> list[int]:
        mailbox = (ctypes.c_uint8 * (HEADER_SIZE + 64 * 1024))()
        context = self.lib.mh_create(ctypes.addressof(mailbox), len(mailbox), None, 0, None, 0)
        assert context
        stats = (ctypes.c_uint64 * 6)()
        try:
            rc = self.lib.mh_idle_race(
                context, ctypes.addressof(mailbox), HEADER.offset("CommandSeq"), HEADER.offset("Command"),
                HEADER.offset("ResponseSeq"), HEADER.offset("Idle"), commands, flags, stretch,
                int(timeout * 1e9), stats)
        finally:
            self.lib.mh_destroy(context)
        assert rc == 0
        return list(stats)


@pytest.fixture(scope="module")
def race() -> _Race:
    return _Race()


@pytest.mark.parametrize("flags", [HOST_FENCE, REWAKE], ids=["host-fence", "no-fence-rewake"])
def test_race_loses_no_command(race: _Race, flags: int) -> None:
    """20,000 commands to a helper thread that goes idle (publish, fence,
    re-check, halt) after every one: every command is answered, and the race
    was really run: the helper both halted and found commands at its re-check."""
    stats = race.run(20000, flags, timeout=2.0)
    assert stats[ANSWERED] == 20000 and stats[LOST] == 0, stats
    assert stats[HALTS] > 0 and stats[WAKES] > 0, stats


def test_race_window_is_fixed_up(race: _Race) -> None:
    """A stretched window (the helper spins between its re-check and the
    halt; the host posts only once the helper is past its re-check): wakes
    land inside it, the handler skips the halt, nothing is lost."""
    stats = race.run(50, HOST_FENCE | IN_WINDOW, stretch=STRETCH, timeout=5.0)
    assert stats[LOST] == 0 and stats[ANSWERED] == 50, stats
    assert stats[WINDOW] > 0, stats


def test_race_without_fixup_loses_commands(race: _Race) -> None:
    """Negative control: the same stretched window with a handler that does
    not move the return address: wakes inside the window are slept through
    and commands are lost (until the harness wakes the helper again), so the
    tests above can fail."""
    stats = race.run(5, HOST_FENCE | IN_WINDOW | NO_FIXUP, stretch=STRETCH, timeout=0.2)
    assert stats[LOST] > 0 and stats[WINDOW] == 0, stats


# --- host side: a wake in flight ----------------------------------------------------------------


class _HaltedHelper:
    """A mailbox whose 'helper' is halted (Idle set) and answers only when
    woken: the wake answers the posted command at once and returns a Future
    that stays pending (QMP's reply not read yet) until the test settles it."""

    def __init__(self) -> None:
        self.memory = bytearray(HEADER_SIZE + 4096)
        self.words = memoryview(self.memory).cast("I")
        self.words[HEADER.offset("Idle") // 4] = A.const("OVMF_MH_IDLE_HALTING")
        self.replies: list[Future[object]] = []

    def wake(self) -> Future[object]:
        self.words[HEADER.offset("Status") // 4] = 0
        self.words[HEADER.offset("ResponseSeq") // 4] = self.words[HEADER.offset("CommandSeq") // 4]
        reply: Future[object] = Future()
        self.replies.append(reply)
        return reply


def test_the_answer_is_taken_before_the_wake_replied_and_a_failed_wake_is_reported() -> None:
    """The host does not wait for the wake's reply (QMP's, for inject-nmi)
    before it polls: the command is answered while the reply is still out.
    When that wake then fails, the next command is refused with a
    MailboxError naming the failure, before anything is posted."""
    helper = _HaltedHelper()
    mailbox = Mailbox(helper.memory, 0, len(helper.memory), wake=helper.wake)
    assert mailbox.call("NOP", timeout=5.0).status == 0
    assert len(helper.replies) == 1 and not helper.replies[0].done()
    helper.replies[0].set_result(None)
    assert mailbox.call("NOP", timeout=5.0).status == 0
    posted = helper.words[HEADER.offset("CommandSeq") // 4]
    helper.replies[1].set_exception(QemuError("QMP command inject-nmi failed: connection reset"))
    with pytest.raises(MailboxError, match=r"waking the halted helper failed: .*connection reset") as caught:
        mailbox.call("NOP", timeout=5.0)
    assert caught.value.command == "NOP"
    assert helper.words[HEADER.offset("CommandSeq") // 4] == posted, "a command was posted after the failure"
    mailbox.release()


def test_a_cancelled_wake_is_no_failure() -> None:
    """A wake cancelled before it ran (HelperVM.close cancels queued ones)
    is not reported as a failed wake."""
    helper = _HaltedHelper()
    mailbox = Mailbox(helper.memory, 0, len(helper.memory), wake=helper.wake)
    assert mailbox.call("NOP", timeout=5.0).status == 0
    assert helper.replies[0].cancel()
    assert mailbox.call("NOP", timeout=5.0).status == 0
    mailbox.release()


class _Monitor:
    """A QMP connection as LoggedQmp sees it: cmd_obj answers with ``reply``."""

    def __init__(self, reply: dict[str, object]) -> None:
        self.reply = reply
        self.sent: list[dict[str, object]] = []

    def cmd_obj(self, message: dict[str, object]) -> dict[str, object]:
        self.sent.append(message)
        return self.reply


def test_the_wake_is_sent_in_the_fewest_bytes_and_its_error_is_raised(tmp_path: Path) -> None:
    """LoggedQmp.bare_command sends {"execute": NAME} alone (QEMU 7.2's
    monitor reads one byte per round of its loop), logs both ways, and
    turns an error reply into a QemuError that quotes QEMU."""
    qmp = LoggedQmp(tmp_path / "qmp.log")
    monitor = _Monitor({"return": {}})
    qmp.connect(monitor)  # type: ignore[arg-type]
    qmp.bare_command("inject-nmi", QemuError)
    assert monitor.sent == [{"execute": "inject-nmi"}]
    monitor.reply = {"error": {"class": "GenericError", "desc": "NMI injection failed"}}
    with pytest.raises(QemuError, match="inject-nmi failed: NMI injection failed"):
        qmp.bare_command("inject-nmi", QemuError)
    qmp.close()
    log = (tmp_path / "qmp.log").read_text()
    assert log.count('> {"execute": "inject-nmi"}') == 2 and "NMI injection failed" in log


def test_closing_waits_for_the_wake_in_flight(tmp_path: Path) -> None:
    """LoggedQmp.close from another thread while the waker thread's
    inject-nmi waits for its reply: the connection (and its event loop) is
    closed only after the wake returned, never under it."""
    import threading

    order: list[str] = []
    release = threading.Event()

    class _Slow(_Monitor):
        def cmd_obj(self, message: dict[str, object]) -> dict[str, object]:
            order.append("wake sent")
            release.wait(5.0)
            order.append("wake replied")
            return {"return": {}}

        def close(self) -> None:
            order.append("closed")

    qmp = LoggedQmp(tmp_path / "qmp.log")
    qmp.connect(_Slow({}))  # type: ignore[arg-type]
    waker = threading.Thread(target=qmp.bare_command, args=("inject-nmi", QemuError))
    waker.start()
    while not order:
        time.sleep(0.001)
    closer = threading.Thread(target=qmp.close)
    closer.start()
    time.sleep(0.2)
    release.set()
    waker.join(5.0)
    closer.join(5.0)
    assert order == ["wake sent", "wake replied", "closed"]


def test_bench_knob_forces_the_idle_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """OVMF_MH_BENCH_IDLE_POLICY: never-halt gives a spec without an idle
    policy NEVER_HALT, a spec's own policy wins, a bad value is refused."""
    monkeypatch.delenv(IDLE_POLICY_ENV, raising=False)
    assert idle_policy_from_env() is None
    monkeypatch.setenv(IDLE_POLICY_ENV, "default")
    assert idle_policy_from_env() is None
    monkeypatch.setenv(IDLE_POLICY_ENV, "never-halt")
    assert idle_policy_from_env() == IdlePolicy(never_halt=True)
    firmware = Path("/nonexistent/OVMF_CODE.fd")
    assert HelperVM(HelperSpec(firmware), Path("/nonexistent")).idle_policy == IdlePolicy(never_halt=True)
    own = IdlePolicy(spin_us=5)
    assert HelperVM(HelperSpec(firmware, idle_policy=own), Path("/nonexistent")).idle_policy == own
    monkeypatch.setenv(IDLE_POLICY_ENV, "sometimes")
    with pytest.raises(SetupError, match="OVMF_MH_BENCH_IDLE_POLICY='sometimes'"):
        HelperVM(HelperSpec(firmware), Path("/nonexistent"))


# --- in QEMU: the firmware helper ----------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_idle(helper: HelperVM, value: int, timeout: float = 20.0) -> None:
    assert helper.mailbox is not None
    deadline = time.monotonic() + timeout
    while helper.mailbox.header()["Idle"] != value:
        assert time.monotonic() < deadline, f"Idle never became {value}: {helper.mailbox.header()['Idle']}"
        time.sleep(0.005)


@pytest.fixture
def halting_helper(firmware: Path, work_dir: Path) -> Iterator[HelperVM]:
    with HelperVM(HelperSpec(firmware), work_dir / "helper") as helper:
        helper.wait_ready()
        yield helper


def test_idle_firmware_helper_uses_almost_no_cpu(halting_helper: HelperVM) -> None:
    """An idle firmware helper halts: it claims HALT_WAKE, publishes Idle and
    its QEMU uses far less than the ~100 % of a CPU a spinning helper uses
    (a generous bound, over 3 s, for a loaded machine)."""
    helper = halting_helper
    assert helper.mailbox is not None and helper.vm.pid is not None
    assert helper.mailbox.header()["Capabilities"] & A.const("OVMF_MH_CAP_HALT_WAKE")
    _wait_idle(helper, A.const("OVMF_MH_IDLE_HALTING"))
    before, start = _cpu_seconds(helper.vm.pid), time.monotonic()
    time.sleep(3.0)
    share = (_cpu_seconds(helper.vm.pid) - before) / (time.monotonic() - start)
    assert share < 0.20, f"idle helper used {share:.0%} of a CPU"


def test_commands_around_the_halt_threshold_are_never_lost(halting_helper: HelperVM) -> None:
    """Commands posted at random delays around the spin-then-halt threshold
    (some to a spinning helper, some to one about to halt, some to a halted
    one): every one is answered, and both paths were taken."""
    helper = halting_helper
    assert helper.mailbox is not None
    rng = random.Random(21)
    for _ in range(150):
        time.sleep(rng.uniform(0.0, 2 * SPIN))
        assert helper.mailbox.call("QUERY").results[1] & A.const("OVMF_MH_CAP_HALT_WAKE")
    header = helper.mailbox.header()
    assert header["CommandsServed"] >= 150
    assert header["HaltCount"] > 0 and helper.mailbox.wakes > 0, (header["HaltCount"], helper.mailbox.wakes)
    assert helper.mailbox.wakes < 150, "every command needed a wake: the helper never caught one while spinning"


def test_nmi_inside_the_halt_window_is_not_slept_through(firmware: Path, work_dir: Path) -> None:
    """The test knob stretches the window between the re-check and HLT to
    1.5 s. A command posted inside it, with exactly one NMI, is answered:
    the handler moved the return address past the HLT (WindowWakes). Then
    the negative control: a command posted in the window with no NMI is not
    answered (the helper halted), until an NMI wakes it."""
    spec = HelperSpec(firmware, idle_policy=IdlePolicy(spin_us=0, stretch_us=1_500_000))
    with HelperVM(spec, work_dir / "helper") as helper:
        helper.wait_ready()
        mailbox = helper.mailbox
        assert mailbox is not None
        stretched = A.const("OVMF_MH_IDLE_STRETCHED")
        sent: list[float] = []

        def one_nmi() -> None:
            if not sent:
                helper.vm.qmp("inject-nmi")
                sent.append(time.monotonic())

        mailbox.wake = one_nmi
        _wait_idle(helper, stretched)
        assert mailbox.call("NOP", timeout=10.0).status == 0
        assert len(sent) == 1
        header = mailbox.header()
        assert header["WindowWakes"] == 1 and header["HaltCount"] == 0, header

        mailbox.wake = None
        _wait_idle(helper, stretched)
        with pytest.raises(HelperTimeout):
            mailbox.call("NOP", timeout=3.0)
        assert mailbox.header()["ResponseSeq"] != mailbox.header()["CommandSeq"]
        helper.vm.qmp("inject-nmi")
        mailbox.wake = helper.wake
        assert mailbox.call("NOP", timeout=10.0).status == 0
        assert mailbox.header()["HaltCount"] >= 1


def test_malformed_idle_policy_is_refused(firmware: Path, work_dir: Path) -> None:
    spec = HelperSpec(firmware, idle_policy=IdlePolicy(signature=0x12345678))
    with HelperVM(spec, work_dir / "helper") as helper:
        assert helper.mailbox is not None
        header = helper.mailbox.wait_published(30.0)
        assert header["State"] == A.const("OVMF_MH_STATE_HALTED")
        assert header["HaltReason"] == A.const("OVMF_MH_STATUS_IDLE_POLICY")
    assert "idle policy: bad signature" in (work_dir / "helper" / "debugcon.log").read_text()


def test_never_halt_policy_is_the_spinning_baseline(firmware: Path, work_dir: Path) -> None:
    spec = HelperSpec(firmware, idle_policy=IdlePolicy(never_halt=True))
    with HelperVM(spec, work_dir / "helper") as helper:
        header = helper.wait_ready()
        assert helper.mailbox is not None
        assert not header["Capabilities"] & A.const("OVMF_MH_CAP_HALT_WAKE")
        time.sleep(0.1)
        assert helper.mailbox.call("NOP").status == 0
        assert helper.mailbox.header()["Idle"] == 0 and helper.mailbox.wakes == 0


# --- the reference helper process keeps the same contract ---------------------------------------


def test_reference_process_blocks_when_idle_and_is_woken(tmp_path: Path) -> None:
    """helper.serve: HALT_WAKE, the idle word set while it waits in
    sigtimedwait (little CPU), and commands at random delays around its spin
    all answered, some of them after a SIGUSR1 wake."""
    from host_shim.helpers.reference_process import ReferenceHelperProcess

    guest = tmp_path / "guest.ram"
    guest.write_bytes(bytes(64 * 4096))
    with ReferenceHelperProcess(guest, None, tmp_path / "helper", target=False) as helper:
        header = helper.wait_ready()
        mailbox = helper.mailbox
        assert mailbox is not None and helper.pid is not None
        assert header["Capabilities"] & A.const("OVMF_MH_CAP_HALT_WAKE")
        deadline = time.monotonic() + 10
        while mailbox.header()["Idle"] != A.const("OVMF_MH_IDLE_HALTING"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        before, start = _cpu_seconds(helper.pid), time.monotonic()
        time.sleep(2.0)
        assert (_cpu_seconds(helper.pid) - before) / (time.monotonic() - start) < 0.20
        rng = random.Random(7)
        for _ in range(100):
            time.sleep(rng.uniform(0.0, 2 * SPIN))
            assert mailbox.call("QUERY").results[1] & A.const("OVMF_MH_CAP_HALT_WAKE")
        assert 0 < mailbox.wakes < 100


def test_two_helpers_woken_from_two_threads_at_once(firmware: Path, work_dir: Path) -> None:
    """Each helper's mailbox thread wakes its own helper over QMP: two QEMUs'
    QMP connections used from two threads at the same time both work (each
    legacy client runs on its own event loop; sharing the starting thread's
    loop failed with 'This event loop is already running')."""
    import threading

    with HelperVM(HelperSpec(firmware), work_dir / "a", "a") as first, \
            HelperVM(HelperSpec(firmware), work_dir / "b", "b") as second:
        first.wait_ready()
        second.wait_ready()
        errors: list[BaseException] = []

        def hammer(helper: HelperVM) -> None:
            try:
                assert helper.mailbox is not None
                for _ in range(40):
                    helper.wake()
                    time.sleep(SPIN / 4)
                    assert helper.mailbox.call("NOP").status == 0
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(helper,)) for helper in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
