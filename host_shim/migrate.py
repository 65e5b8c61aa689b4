"""Live migration of a running guest through the helpers (docs/migration.md).

Source QEMU runs the guest with its RAM in a shared memory file; the target
QEMU waits with ``-incoming defer -S`` on its own RAM file. Target helpers
start first (the reference RFC's start-migrate-incoming); then pre-copy:
a full pass through the source helpers, then passes over the pages dirtied
meanwhile, until the remainder is small or the pass limit is hit. Then the
source stops, the last dirty pages and the end records go, QEMU's own
migration moves only device state (``x-ignore-shared``), the target helpers
verify every end-of-stream proof, and only then does the target ``cont``.
Before that point any failure resumes the source and says why.

Dirty pages are found by comparing the source RAM file with a host copy of
what it held when each page was last sent (numpy, page granular). This
needs no QEMU patch and no guest cooperation, and it also holds when guest
memory is SEV-encrypted: SEV encrypts deterministically per physical
address, so a page whose ciphertext did not change did not change, and any
write changes it. The host never interprets the bytes, it only compares.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from host_shim import container as ct
from host_shim import guest, process
from host_shim.errors import OvmfMhError, QemuError
from host_shim.keys import read_key
from host_shim.mailbox import DEFAULT_TIMEOUT
from host_shim.pipeline import Exporter, PageNumbers, TransferSummary, import_ram
from host_shim.progress import Progress
from host_shim.qemu import MemoryBackend, QemuConfig, QemuVM

log = logging.getLogger(__name__)

PAGE = 4096
MIB = 1024 * 1024
MIN_GUEST_MIB = 256


class MigrationError(OvmfMhError):
    """The migration failed; the report says where and in which state the guest is."""


@dataclass
class PassReport:
    number: int
    pages: int
    zero_pages: int
    stream_bytes: int
    seconds: float
    guest_running: bool

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0


@dataclass
class MigrationReport:
    outcome: str = "failed"
    helper: str = "firmware"
    helpers: int = 1
    guest_mib: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    verify_seconds: float = 0.0
    device_state_seconds: float = 0.0
    check_seconds: float = 0.0
    check_pages_changed: int = 0
    switchover_ms: dict[str, int] = field(default_factory=dict)  # milestones after 'stop'
    phase_seconds: dict[str, float] = field(default_factory=dict)  # milestones after 'started'
    setup_seconds: float = 0.0
    passes: list[PassReport] = field(default_factory=list)
    ram_identical: bool | None = None
    target_heartbeat: str | None = None
    source_heartbeat_after_failure: str | None = None
    guest_state: str = "unknown"
    error: str | None = None
    work_dir: str = ""

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passes"] = [dict(asdict(p), pages_per_s=p.pages_per_s) for p in self.passes]
        pages = sum(p.pages for p in self.passes)
        moving = sum(p.seconds for p in self.passes)
        out["pages"] = pages
        out["pages_per_s"] = pages / moving if moving else 0.0
        return out

    def describe(self) -> list[str]:
        lines = [
            f"migration {self.outcome}: {self.guest_mib} MiB guest, {self.helpers} {self.helper} helper(s); "
            f"guest is {self.guest_state}",
            f"  total {self.total_seconds:.2f} s from source helper start to target running "
            f"(target QEMU and helpers prepared before, in {self.setup_seconds:.2f} s), "
            f"downtime {1000 * self.downtime_seconds:.0f} ms "
            f"(CHECK_PAGES {1000 * self.check_seconds:.0f} ms found {self.check_pages_changed} changed; "
            f"device state {1000 * self.device_state_seconds:.0f} ms; RAM check of "
            f"{1000 * self.verify_seconds:.0f} ms not counted)",
        ]
        for p in self.passes:
            state = "guest running" if p.guest_running else "guest stopped"
            lines.append(
                f"  pass {p.number}: {p.pages} pages ({p.zero_pages} zero), {p.stream_bytes} bytes, "
                f"{p.seconds:.2f} s, {p.pages_per_s:.0f} pages/s, {state}"
            )
        if self.ram_identical is not None:
            lines.append(f"  target RAM file identical to source at switchover: {self.ram_identical}")
        if self.target_heartbeat:
            lines.append(f"  target heartbeat: {self.target_heartbeat}")
        if self.source_heartbeat_after_failure:
            lines.append(f"  source heartbeat after the failure: {self.source_heartbeat_after_failure}")
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append(f"  logs in {self.work_dir}")
        return lines


@dataclass
class MigrationConfig:
    image: Path
    work_dir: Path
    key_file: Path | None = None
    helper: str = "firmware"
    helpers: int = 2
    guest_mib: int = 256
    workload_mib: int = 64
    max_passes: int = 6
    converge_pages: int = 2048
    verify_ram: bool = True
    heartbeat_timeout: float = 20.0
    progress: bool | None = None
    # Where the source and target RAM files live: None keeps them in the work
    # folder (and after the run); a folder such as /dev/shm holds them for the
    # run only. tmpfs spares QEMU and the helpers the disk file system's page
    # faults and writeback (docs/migration.md).
    ram_dir: Path | None = None
    # Called right after the target is resumed (failure-injection tests).
    after_switchover: Callable[[QemuVM, QemuVM], None] | None = None
    # Seconds a helper may take to answer one command (docs/mailbox.md).
    mailbox_timeout: float = DEFAULT_TIMEOUT


#: How often the watch looks at the two guest QEMUs and the target side.
WATCH_INTERVAL = 0.1
#: How long a guest QEMU may stay stopped (state T in /proc/PID/stat: SIGSTOP,
#: a debugger) before the watch calls it a fault. A stopped QEMU answers no
#: QMP command, so waiting longer only delays the failure.
STOPPED_GRACE = 0.3


class _Watch:
    """Looks at both guest QEMUs and the target side every WATCH_INTERVAL
    while the migration runs: a QEMU that dies, or a target side that fails,
    stops the run at once (through ``on_fault``) instead of at the next step
    that happens to need it. ``phase`` says what the run was doing."""

    def __init__(self, vms: list[QemuVM], target_error: Callable[[], BaseException | None]) -> None:
        self.vms = vms
        self.phase = "start-up"
        self.started = time.monotonic()
        self.fault: MigrationError | None = None
        self.on_fault: Callable[[MigrationError], None] = lambda error: None
        self._target_error = target_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stopped_since: dict[str, float] = {}
        while not self._stop.wait(WATCH_INTERVAL):
            message = None
            for vm in self.vms:
                if vm.pid is not None and not vm.is_running():
                    message = f"{vm.describe()}"
                    break
                if vm.is_stopped():
                    since = stopped_since.setdefault(vm.name, time.monotonic())
                    if time.monotonic() - since >= STOPPED_GRACE:
                        message = (f"{vm.name} QEMU pid {vm.pid} is stopped (state T: SIGSTOP or a debugger) "
                                   "and can answer nothing")
                        break
                else:
                    stopped_since.pop(vm.name, None)
            else:
                error = self._target_error()
                if error is not None:
                    message = f"the target side failed: {error}"
            if message is not None:
                self.fault = MigrationError(
                    f"{message}, during {self.phase} ({time.monotonic() - self.started:.1f} s into the run)")
                # Said at once: stopping the rest (and checking that the
                # source guest goes on) takes a while longer.
                log.warning("migrate: %s; stopping the migration", self.fault)
                self.on_fault(self.fault)
                return

    def check(self) -> None:
        if self.fault is not None:
            raise self.fault

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def guest_config(image: Path, ram: Path, size: int, *, incoming: bool, workload_mib: int) -> QemuConfig:
    """Source and target differ only in their RAM file and -incoming."""
    from host_shim.boot import vars_for

    return QemuConfig(
        firmware_code=image,
        firmware_vars=vars_for(image),
        memory=[MemoryBackend("ram", ram, size)],
        kernel=guest.kernel(),
        initrd=guest.workload_initramfs(workload_mib),
        append=guest.KERNEL_APPEND,
        incoming="defer" if incoming else None,
        extra_args=["-S"] if incoming else [],
    )


class DirtyTracker:
    """Page-granular comparison of the RAM file with what was last sent."""

    def __init__(self, ram: Path, size: int) -> None:
        self._file = ram.open("rb")
        self._live = np.memmap(self._file, dtype=np.uint64, mode="r", shape=(size // PAGE, PAGE // 8))
        # Filled batch by batch as pages are sent (np.empty: no upfront cost).
        self._sent = np.empty_like(self._live)
        self._lock = threading.Lock()

    def record(self, pages: PageNumbers) -> None:
        """Remember these pages as they are now, just before a helper reads
        them: a later write shows up as a difference."""
        index = np.asarray(pages, dtype=np.int64)
        with self._lock:
            self._sent[index] = self._live[index]

    def take_dirty(self) -> PageNumbers:
        """Pages whose content differs from what was last recorded, ascending."""
        return np.flatnonzero(np.any(self._live != self._sent, axis=1)).astype(np.uint64)

    def close(self) -> None:
        del self._live
        self._file.close()


def _complete_lines(text: str) -> str:
    """text up to its last newline: the guest may be mid-way through a line."""
    return text[: text.rfind("\n") + 1]


def _wait_for(vm: QemuVM, needle: str, timeout: float, after: int = 0) -> str:
    """The first complete serial line (after offset ``after``) containing needle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _complete_lines(vm.serial_text()[after:])
        if needle in text:
            index = text.index(needle)
            return text[index : text.index("\n", index)].rstrip("\r")
        if not vm.is_running():
            raise vm.error(f"QEMU exited while waiting for {needle!r} on the serial console")
        time.sleep(0.05)
    raise vm.error(f"no {needle!r} on the serial console within {timeout:.0f} s")


def _check_answers(target: QemuVM) -> None:
    """The target QEMU must answer QMP before the source guest stops for it."""
    try:
        target.qmp("query-status")
    except QemuError as exc:
        state = "is stopped (SIGSTOP?) and" if target.is_stopped() else "is running but"
        raise MigrationError(f"{target.name} QEMU pid {target.pid} {state} does not answer QMP before the "
                             "switchover; the source guest was not stopped") from exc


def _migrate_device_state(source: QemuVM, target: QemuVM) -> float:
    started = time.monotonic()
    # AF_UNIX paths are short; work folders can be deep.
    folder = process.temp_dir("ovmf-mh-mig-")
    channel = folder / "device-state.sock"
    try:
        for vm in (source, target):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        target.qmp("migrate-incoming", uri=f"unix:{channel}")
        source.qmp("migrate", uri=f"unix:{channel}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = source.qmp("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise source.error(f"QEMU device-state migration {status}")
            time.sleep(0.005)
        else:
            raise source.error("QEMU device-state migration did not complete within 60 s")
        while target.qmp("query-status").get("status") == "inmigrate":
            time.sleep(0.005)
    except QemuError as exc:
        for vm in (target, source):
            if not vm.is_running():
                raise MigrationError(f"{vm.describe()}, while the device state moved") from exc
        raise
    finally:
        process.remove(folder)
    return time.monotonic() - started


def migrate(config: MigrationConfig) -> MigrationReport:
    """Run one live migration; never leaves the guest half-resumed."""
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if config.guest_mib < MIN_GUEST_MIB or config.workload_mib > config.guest_mib // 2:
        raise MigrationError(
            f"the test guest needs at least {MIN_GUEST_MIB} MiB (its kernel and initramfs do not start "
            f"under OVMF in less) and a workload of at most half of it; got {config.guest_mib} MiB "
            f"with a {config.workload_mib} MiB workload"
        )
    report = MigrationReport(helper=config.helper, helpers=config.helpers, guest_mib=config.guest_mib,
                             work_dir=str(work))
    size = config.guest_mib * MIB
    key = read_key(config.key_file) if config.key_file else os.urandom(32)
    stack = ExitStack()
    source_ram, target_ram = _ram_files(stack, work, config.ram_dir, size)
    source = stack.enter_context(QemuVM(guest_config(config.image, source_ram, size, incoming=False,
                                                     workload_mib=config.workload_mib),
                                        work / "source", "source"))
    stopped = False
    resumed_target = False
    try:
        _wait_for(source, guest.HEARTBEAT, 120)
        prepare_start = time.monotonic()
        target = stack.enter_context(QemuVM(guest_config(config.image, target_ram, size, incoming=True,
                                                         workload_mib=config.workload_mib),
                                            work / "target", "target"))
        send_sock, receive_sock = socket.socketpair()
        stack.callback(send_sock.close)
        stack.callback(receive_sock.close)
        ready = threading.Event()
        imported: dict[str, Any] = {}
        # The target helpers' challenge nonces: the source helpers bind their
        # streams to them, so the target accepts this migration's streams only.
        nonces: list[bytes] = []

        def receive() -> None:
            with cast(IO[bytes], receive_sock.makefile("rb", buffering=256 * 1024)) as stream:
                try:
                    imported["summary"] = import_ram(
                        target_ram, key, stream, kind=config.helper, firmware=config.image,
                        work_dir=work / "target-helpers", mode="in-place", progress=False,
                        expect=ct.FileHeader(size, config.helpers), on_ready=ready.set,
                        mailbox_timeout=config.mailbox_timeout,
                        challenge=lambda given, _size: nonces.extend(given),
                    )
                except BaseException as exc:
                    imported["error"] = exc
                    ready.set()
                    with suppress(OSError):
                        receive_sock.shutdown(socket.SHUT_RDWR)

        receiver = threading.Thread(target=receive, name="migrate-receive", daemon=True)
        receiver.start()
        watch = _Watch([source, target], lambda: cast(BaseException | None, imported.get("error")))
        stack.callback(watch.close)
        watch.phase = "the target helpers' start"
        if not ready.wait(120) or "error" in imported:
            raise MigrationError(f"target helpers did not start: {imported.get('error')}")
        watch.check()
        # The target side is prepared, as a plain migration's target QEMU is
        # before 'migrate': the migration proper starts here.
        report.setup_seconds = time.monotonic() - prepare_start
        started = time.monotonic()

        sink = cast(IO[bytes], send_sock.makefile("wb", buffering=256 * 1024))
        # After a failure the other end may be gone: flushing must not raise.
        stack.callback(_close_quietly, sink)
        watch.phase = "the source helpers' start"
        exporter = stack.enter_context(
            Exporter(source_ram, key, sink, kind=config.helper, helpers=config.helpers,
                     firmware=config.image, work_dir=work / "source-helpers", track_pages=True,
                     mailbox_timeout=config.mailbox_timeout, challenge=lambda: list(nonces))
        )
        # From now on a fault stops the helpers' work at their next step.
        watch.on_fault = exporter.abort
        watch.check()
        report.phase_seconds["source_helpers_start"] = time.monotonic() - started
        tracker = DirtyTracker(source_ram, size)
        stack.callback(tracker.close)

        def run_pass(pages: PageNumbers, running: bool) -> None:
            watch.phase = f"{'pre-copy' if running else 'the final'} pass {len(report.passes) + 1}"
            report.phase_seconds[f"pass_{len(report.passes) + 1}_start"] = time.monotonic() - started
            meter = Progress(f"pass {len(report.passes) + 1}", len(pages), enabled=config.progress)
            stats = exporter.send(pages, meter, tracker.record)
            meter.finish()
            report.passes.append(PassReport(len(report.passes) + 1, stats.pages, stats.zero_pages,
                                            stats.stream_bytes, stats.seconds, running))

        every_page = np.arange(size // PAGE, dtype=np.uint64)
        run_pass(every_page, True)
        while len(report.passes) < config.max_passes:
            dirty_pages = tracker.take_dirty()
            run_pass(dirty_pages, True)
            if len(dirty_pages) <= config.converge_pages:
                break

        # Switchover: from here until cont, the guest runs nowhere. Never for
        # a target side that is already gone.
        watch.check()
        _check_answers(target)
        watch.phase = "switchover (source guest stopped)"
        stop_at = time.monotonic()
        source.qmp("stop")
        stopped = True
        # Pages the host sees changed since their last send, plus every other
        # page whose source helper says its content is not what it sealed:
        # a page can change and change back while a helper reads it, which no
        # comparison on the host can see (CHECK_PAGES, docs/migration.md).
        # Both run at once: numpy's comparison releases the GIL while the
        # helpers hash.
        host_dirty: list[PageNumbers] = []
        comparer = threading.Thread(target=lambda: host_dirty.append(tracker.take_dirty()), daemon=True)
        check_start = time.monotonic()
        comparer.start()
        changed = exporter.changed_since_sent(every_page)
        comparer.join()
        report.check_seconds = time.monotonic() - check_start
        report.check_pages_changed = len(changed)
        final = np.unique(np.concatenate([changed, *host_dirty]))
        marks = {"check": time.monotonic() - stop_at}
        run_pass(final, False)
        marks["final_pass"] = time.monotonic() - stop_at
        exporter.finish()
        sink.close()
        watch.phase = "the target helpers' verification"
        deadline = time.monotonic() + 120
        while receiver.is_alive() and time.monotonic() < deadline and watch.fault is None:
            receiver.join(timeout=WATCH_INTERVAL)
        watch.check()
        if "error" in imported or "summary" not in imported:
            raise MigrationError(f"target helpers did not verify the stream: {imported.get('error', 'timeout')}")
        receive_summary: TransferSummary = imported["summary"]
        if receive_summary.outcome != "ok":
            raise MigrationError(f"import ended as {receive_summary.outcome}")
        marks["target_verified"] = time.monotonic() - stop_at
        watch.phase = "the device-state move"
        report.device_state_seconds = _migrate_device_state(source, target)
        marks["device_state"] = time.monotonic() - stop_at
        if config.verify_ram:
            verify_start = time.monotonic()
            differing = _differing_pages(source_ram, target_ram)
            report.ram_identical = not differing
            report.verify_seconds = time.monotonic() - verify_start
            if differing:
                raise MigrationError(
                    f"target RAM differs from the source RAM at switchover in {len(differing)} page(s), "
                    f"first {[hex(p * PAGE) for p in differing[:8]]}"
                )
        serial_before = len(target.serial_text())
        watch.check()
        target.qmp("cont")
        resumed_target = True
        marks["cont"] = time.monotonic() - stop_at - report.verify_seconds
        report.switchover_ms = {k: round(1000 * v) for k, v in marks.items()}
        report.downtime_seconds = time.monotonic() - stop_at - report.verify_seconds
        report.total_seconds = time.monotonic() - started - report.verify_seconds
        report.guest_state = "running on target"
        if config.after_switchover is not None:
            config.after_switchover(source, target)
        try:
            report.target_heartbeat = _wait_for(target, guest.HEARTBEAT, config.heartbeat_timeout,
                                                after=serial_before)
        except QemuError as exc:
            report.guest_state = "lost: the target QEMU failed after switchover"
            raise MigrationError(f"target QEMU failed after switchover: {exc}") from exc
        if guest.CORRUPTION in target.serial_text():
            report.guest_state = "running on target, reporting corruption"
            raise MigrationError("the workload reports CORRUPTION on the target")
        report.outcome = "ok"
    except (OvmfMhError, OSError) as exc:
        # The target side's reason beats the broken pipe it caused on this side.
        cause = imported.get("error") if "imported" in locals() else None
        report.error = str(cause) if cause is not None and not isinstance(exc, MigrationError) else str(exc)
        fault = watch.fault if "watch" in locals() else None
        if fault is not None and fault is not exc:
            # The watch saw the first cause; what failed after it is its consequence.
            report.error = f"{fault} (then: {exc})"
        if not resumed_target and not source.is_running():
            report.guest_state = f"lost: {source.describe()}"
        elif not resumed_target and source.is_stopped():
            # It answers no QMP command; the run's end kills it with the rest.
            report.guest_state = f"lost: source QEMU pid {source.pid} is stopped and ends with the run"
        elif not resumed_target:
            with suppress(OvmfMhError):
                if stopped:
                    source.qmp("cont")
                # Show that the guest really goes on: running, and beating.
                serial_before = len(source.serial_text())
                if source.qmp("query-status").get("status") == "running":
                    report.source_heartbeat_after_failure = _wait_for(source, guest.HEARTBEAT, 15, after=serial_before)
                    report.guest_state = "running on source"
    finally:
        # Every QEMU and helper this run started stops here, by its own pid.
        stack.close()
    return report


def _ram_files(stack: ExitStack, work: Path, ram_dir: Path | None, size: int) -> tuple[Path, Path]:
    """Fresh sparse source and target RAM files of ``size`` bytes. In
    ``ram_dir`` they get unique names and are deleted when ``stack`` closes
    (after the QEMUs it stops); in the work folder they stay for inspection."""
    if ram_dir is None:
        files = (work / "source.ram", work / "target.ram")
    else:
        if not ram_dir.is_dir():
            raise MigrationError(f"--ram-dir {ram_dir} is not a folder")
        prefix = f"ovmf-mh-{os.getpid()}-{work.name}"
        files = (ram_dir / f"{prefix}-source.ram", ram_dir / f"{prefix}-target.ram")
        for ram in files:
            process.remove_on_exit(ram)
            stack.callback(process.remove, ram)
    for ram in files:
        ram.unlink(missing_ok=True)
        with ram.open("wb") as f:
            f.truncate(size)
    return files


@contextmanager
def _temp_folder(prefix: str) -> Iterator[Path]:
    folder = process.temp_dir(prefix)
    try:
        yield folder
    finally:
        process.remove(folder)


def _close_quietly(stream: IO[bytes]) -> None:
    with suppress(OSError):
        stream.close()


def _differing_pages(a: Path, b: Path) -> list[int]:
    """Pages whose bytes differ between two RAM files of equal size."""
    left = np.memmap(a, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
    right = np.memmap(b, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
    return [int(p) for p in np.flatnonzero(np.any(left != right, axis=1))]


def write_report(report: MigrationReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=2))


def plain_qemu_migration(
    image: Path, work: Path, guest_mib: int, workload_mib: int, ram_dir: Path | None = None
) -> dict[str, Any]:
    """The baseline: QEMU's own migration of the same guest, RAM through
    QEMU's stream (no helpers, no confidentiality). Times from QEMU's stats."""
    work.mkdir(parents=True, exist_ok=True)
    size = guest_mib * MIB
    with ExitStack() as stack:
        source_ram, target_ram = _ram_files(stack, work, ram_dir, size)
        rams = {"source": source_ram, "target": target_ram}
        source = stack.enter_context(QemuVM(
            guest_config(image, rams["source"], size, incoming=False, workload_mib=workload_mib),
            work / "source", "plain-source"))
        _wait_for(source, guest.HEARTBEAT, 120)
        target = stack.enter_context(QemuVM(
            guest_config(image, rams["target"], size, incoming=True, workload_mib=workload_mib),
            work / "target", "plain-target"))
        channel = stack.enter_context(_temp_folder("ovmf-mh-mig-")) / "migration.sock"
        target.qmp("migrate-incoming", uri=f"unix:{channel}")
        source.qmp("migrate", uri=f"unix:{channel}")
        deadline = time.monotonic() + 300
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = source.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if info.get("status") != "completed":
            raise MigrationError(f"plain QEMU migration ended as {info.get('status')}")
        while target.qmp("query-status").get("status") == "inmigrate":
            time.sleep(0.005)
        serial_before = len(target.serial_text())
        target.qmp("cont")
        heartbeat = _wait_for(target, guest.HEARTBEAT, 30, after=serial_before)
        return {
            "total_seconds": info["total-time"] / 1000,
            "downtime_seconds": info.get("downtime", 0) / 1000,
            "transferred_bytes": info.get("ram", {}).get("transferred", 0),
            "target_heartbeat": heartbeat,
        }


def bench_migrate(image: Path, work: Path, *, guest_mib: int = 256, workload_mib: int = 64,
                  helpers: int = 2, ram_dir: Path | None = None) -> dict[str, Any]:
    """Plain QEMU migration and ovmf-mh migration of the same guest, in one
    run, all with their RAM files in the same place."""
    results: dict[str, Any] = {"guest_mib": guest_mib, "workload_mib": workload_mib,
                               "ram_dir": str(ram_dir) if ram_dir else "work folder"}
    results["plain"] = plain_qemu_migration(image, work / "plain", guest_mib, workload_mib, ram_dir)
    for count in sorted({1, helpers}):
        report = migrate(MigrationConfig(image=image, work_dir=work / f"ovmf-mh-{count}", helpers=count,
                                         guest_mib=guest_mib, workload_mib=workload_mib, progress=False,
                                         ram_dir=ram_dir))
        if report.outcome != "ok":
            raise MigrationError(f"ovmf-mh migration with {count} helper(s) failed: {report.error}")
        results[f"ovmf_mh_{count}"] = report.as_json()
        plain = results["plain"]
        results[f"ratio_total_{count}"] = report.total_seconds / plain["total_seconds"]
        results[f"downtime_excess_ms_{count}"] = 1000 * (report.downtime_seconds - plain["downtime_seconds"])
    return results
