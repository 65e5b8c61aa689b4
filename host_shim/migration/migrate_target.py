"""The target role of a migration (`ovmf-mh migrate-incoming`, and the
target half of the one-machine `ovmf-mh migrate`): wait for one source,
check its guest description, prepare the target QEMU and helpers, import
the page stream, say whether every end-of-stream proof verified, and resume
the guest only when the source commits (docs/migration-protocol.md).

The target never resumes a guest whose stream did not verify or whose
source did not commit; whatever fails, every QEMU and helper it started is
stopped by its own pid and its RAM file in --ram-dir is removed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from host_shim.errors import OvmfMhError, QemuError
from host_shim.helpers.mailbox import DEFAULT_TIMEOUT
from host_shim.migration import debian_guest
from host_shim.migration import migration_protocol as mp
from host_shim.migration.guest_description import (
    DEBIAN_GUEST,
    DescriptionError,
    GuestDescription,
    firmware_digest,
    validate,
)
from host_shim.migration.migration_vm import MIB, MigrationError, guest_config, ram_digest, ram_file, wait_for_serial
from host_shim.transfer import commit_proof
from host_shim.transfer import container as ct
from host_shim.transfer.pipeline import TransferSummary, import_ram
from host_shim.vm import guest
from host_shim.vm.devices import NicBackend
from host_shim.vm.qemu import QemuConfig, QemuVM, describe_logs, logs_under

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often the target tells the source it is alive during the stream.
PROGRESS_INTERVAL = 1.0
WATCH_INTERVAL = 0.1
#: How often the import's watch looks: also how late, at most, the source
#: hears that the stream it sent was taken.
IMPORT_WATCH_INTERVAL = 0.02


@dataclass
class TargetConfig:
    image: Path
    work_dir: Path
    key: bytes
    listen: tuple[str, int] = ("127.0.0.1", 0)
    helper: str = "firmware"
    helpers: int = 1
    ram_dir: Path | None = None
    accept_timeout: float = 300.0
    idle_timeout: float = 15.0
    heartbeat_timeout: float = 20.0
    mailbox_timeout: float = DEFAULT_TIMEOUT
    # After the guest runs here: stay in the foreground running it until
    # SIGINT/SIGTERM (True), or stop it and return (the one-machine demo).
    keep_running: bool = True
    # Told the bound address once listening (port 0 picks a free one).
    on_listening: Callable[[tuple[str, int]], None] | None = None
    # Called right after the target is resumed (failure-injection tests).
    after_resume: Callable[[QemuVM], None] | None = None
    # The Debian guest's disk on storage both hosts see, as this host names it
    # (never a path from the source), and the host side of its NIC.
    disk: Path | None = None
    nic: NicBackend = field(default_factory=NicBackend)
    # Programs the target QEMU starts through (nsenter into this host's namespace),
    # and the address its device-state migration listens on there (default: the
    # control connection's).
    wrapper: list[str] = field(default_factory=list)
    device_state_host: str | None = None
    # Without keep_running: called once the guest runs here, before this
    # role stops it (the one-machine demo's TCP probe streams on meanwhile).
    linger: Callable[[], None] | None = None


@dataclass
class TargetReport:
    outcome: str = "failed"
    peer: str = ""
    phase: str = "waiting for a source"
    guest: dict[str, Any] | None = None
    guest_state: str = "not started"
    setup_seconds: float = 0.0
    stream_bytes: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    zero_range_pages: int = 0
    # Whether the source asked for the RAM digest (its RAM check), and the
    # time this side took to compute it with the guest stopped (0 if not asked).
    ram_digest_asked: bool = False
    digest_ms: int = 0
    target_heartbeat: str | None = None
    # Set when the source could not be told that the guest resumed here (it
    # went away after its commit): the guest runs here all the same.
    source_lost: str | None = None
    error: str | None = None
    work_dir: str = ""
    # Every QEMU this role ran (its guest QEMU and helpers): its folder under
    # work_dir -> its logs (vm/qemu.py, logs_under).
    logs: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> list[str]:
        lines = [f"migrate-incoming {self.outcome}: source {self.peer or '(none)'}; guest is {self.guest_state}"]
        if self.guest:
            lines.append(f"  guest: {json.dumps(self.guest, sort_keys=True)}")
        if self.stream_bytes:
            lines.append(f"  stream: {self.stream_bytes} bytes, {self.private_pages} private ({self.zero_range_pages} "
                         f"as zero ranges) and {self.shared_pages} shared pages verified; prepared in "
                         f"{self.setup_seconds:.2f} s; "
                         + (f"RAM digest for the source's check in {self.digest_ms} ms (the guest stopped)"
                            if self.ram_digest_asked else "no RAM digest (the source did not ask)"))
        if self.target_heartbeat:
            lines.append(f"  heartbeat on this host: {self.target_heartbeat}")
        if self.source_lost:
            lines.append(f"  the source may not know the guest runs here: {self.source_lost}")
        if self.error:
            lines.append(f"  error during {self.phase}: {self.error}")
            lines.extend(describe_logs(self.logs))
        lines.append(f"  logs in {self.work_dir}")
        return lines


class _CountingReader:
    """The stream as it arrives, counted for the progress messages."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes += len(data)
        return data


def listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise MigrationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def run_target(config: TargetConfig, server: socket.socket | None = None) -> TargetReport:
    """One incoming migration, from accept to the guest running here (and,
    with keep_running, until SIGINT/SIGTERM). Never raises for a failed
    migration: the report says what failed, in which phase, from whom."""
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    report = TargetReport(work_dir=str(work))
    server = server or listen(config.listen)
    channel: mp.Channel | None = None
    with ExitStack() as stack:
        try:
            with server:
                bound = server.getsockname()[:2]
                if config.on_listening is not None:
                    config.on_listening((bound[0], bound[1]))
                server.settimeout(config.accept_timeout)
                try:
                    conn, address = server.accept()
                except TimeoutError:
                    raise MigrationError(f"no source connected to {bound[0]}:{bound[1]} within "
                                         f"{config.accept_timeout:g} s (--accept-timeout)") from None
            report.peer = f"{address[0]}:{address[1]}"
            channel = mp.Channel(conn, report.peer, config.idle_timeout)
            stack.callback(channel.close)
            description = _handshake(channel, config, report)
            target = _receive_guest(channel, config, report, description, stack, bound[0])
            if config.keep_running:
                _serve_guest(report, target)
            else:
                if config.linger is not None:
                    config.linger()
                report.guest_state = "ran here, stopped on exit (--no-keep-running)"
            report.phase = "done"
        except (OvmfMhError, OSError) as exc:
            report.error = str(exc)
            if channel is not None:
                report.phase = channel.phase
                if not isinstance(exc, mp.PeerGone) and not channel.phase.endswith("(refused)"):
                    # The source learns why at once, instead of by a broken pipe.
                    with suppress(OvmfMhError):
                        channel.send("error", phase=channel.phase, reason=str(exc)[: mp.MAX_TEXT])
                channel.abandon()
            if "never resumed" in report.guest_state:
                report.guest_state = "never resumed here"
        # Every QEMU and helper stops here, by its own pid; RAM files in
        # --ram-dir go with them. Their logs stay in the work folder.
    report.logs = logs_under(work)
    return report


def _handshake(channel: mp.Channel, config: TargetConfig, report: TargetReport) -> GuestDescription:
    hello = channel.receive("hello")
    versions = [v for v in hello["versions"] if isinstance(v, int) and not isinstance(v, bool)]
    common = sorted(set(versions) & set(mp.VERSIONS))
    if hello["protocol"] != mp.PROTOCOL or not common:
        raise mp.ProtocolError(f"the source {channel.peer} speaks {hello['protocol'][:40]!r} versions "
                               f"{hello['versions'][:8]}; this target speaks {mp.PROTOCOL} {list(mp.VERSIONS)}")
    channel.send("welcome", protocol=mp.PROTOCOL, version=common[-1])
    channel.phase = "the guest description"
    message = channel.receive("describe")
    try:
        description = validate(message["guest"], firmware_sha256=firmware_digest(config.image),
                               shards=config.helpers)
    except DescriptionError as exc:
        channel.send("refuse", field=exc.field, reason=exc.reason[: mp.MAX_TEXT])
        channel.phase = "the guest description (refused)"
        raise MigrationError(f"refused the guest description of the source {channel.peer}: {exc}") from None
    report.guest = description.as_json()
    report.ram_digest_asked = message["ram_digest"]
    return description


def _target_qemu(config: TargetConfig, description: GuestDescription, ram: Path, size: int) -> QemuConfig:
    if description.guest == DEBIAN_GUEST:
        return debian_guest.target_config(config.image, ram, size, description, config.disk, config.nic,
                                          config.wrapper)
    return guest_config(config.image, ram, size, incoming=True, workload_mib=description.workload_mib)


@dataclass
class _TargetRun:
    """One incoming migration's state, handed from phase to phase: the
    connection, the guest as described and validated, the target QEMU
    waiting for it, and the report being filled."""

    channel: mp.Channel
    config: TargetConfig
    report: TargetReport
    description: GuestDescription
    stack: ExitStack
    size: int
    ram: Path
    target: QemuVM
    device_state_port: int
    prepare_start: float
    reader: _CountingReader


def _receive_guest(channel: mp.Channel, config: TargetConfig, report: TargetReport,
                   description: GuestDescription, stack: ExitStack, listen_host: str) -> QemuVM:
    """The target's phases: prepare, pre-copy (the import), commit (the
    verdict, then the source's commit), resume on it, and the guest's first
    heartbeat here. Returns the target QEMU, running the guest."""
    run = _target_prepare(channel, config, report, description, stack, listen_host)
    summary = _target_pre_copy(run)
    _target_commit(run, summary)
    serial_before = _target_resume(run)
    _target_running(run, serial_before)
    return run.target


def _target_prepare(channel: mp.Channel, config: TargetConfig, report: TargetReport,
                    description: GuestDescription, stack: ExitStack, listen_host: str) -> _TargetRun:
    """Phase prepare: the RAM file and the target QEMU the guest description
    asks for, waiting for the device state."""
    work = config.work_dir
    size = description.memory_mib * MIB
    channel.phase = "the target's preparation"
    prepare_start = time.monotonic()
    ram = ram_file(stack, work, config.ram_dir, "target", size)
    target = stack.enter_context(QemuVM(_target_qemu(config, description, ram, size), work / "target", "target"))
    report.guest_state = "waiting for the stream (never resumed)"
    target.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    device_state_port = _listen_for_device_state(target, config.device_state_host or listen_host)
    return _TargetRun(channel, config, report, description, stack, size, ram, target, device_state_port,
                      prepare_start, _CountingReader(channel.reader))


class _IncomingStream:
    """The import of the source's stream (import_ram, in place), in its own
    thread: what it said so far, read by the phases."""

    def __init__(self, run: _TargetRun) -> None:
        self.run = run
        self.ready = threading.Event()
        # Set once target helper 0 committed every receipt: the verdict need
        # not wait for the helper VMs to power off (the import's thread stops
        # them meanwhile, and is joined before this role ends).
        self.committed = threading.Event()
        # Set on the commit or when the import's thread ends, whichever first.
        self.settled = threading.Event()
        self.summary: TransferSummary | None = None
        self.error: BaseException | None = None
        # The target helpers' challenge nonces, drawn before on_ready: the source
        # helpers bind their streams to them, so only this migration's streams
        # are accepted here.
        self.nonces: list[bytes] = []
        # Alive means progress: the source's stream within its bounds
        # (migration_protocol.stream_liveness), its clocks restarted at 'accept'.
        self.liveness = mp.stream_liveness(run.config.idle_timeout, run.size, f"source {run.channel.peer}")

    def on_committed(self, summary: TransferSummary) -> None:
        self.summary = summary
        self.committed.set()
        self.settled.set()

    def receive(self) -> None:
        run, config = self.run, self.run.config
        try:
            self.summary = import_ram(
                run.ram, config.key, cast(IO[bytes], run.reader), kind=config.helper, firmware=config.image,
                work_dir=config.work_dir / "target-helpers", mode="in-place", progress=False,
                expect=ct.FileHeader(run.size, run.description.shards), on_ready=self.ready.set,
                mailbox_timeout=config.mailbox_timeout,
                challenge=lambda given, _size: self.nonces.extend(given), on_committed=self.on_committed,
                on_frame=self.liveness.on_frame,
            )
        except BaseException as exc:
            if self.committed.is_set():
                # Stopping the helpers after the commit: the guest's memory
                # is verified and in place; said, not a failure.
                log.warning("migrate-incoming: stopping the target helpers after their commit: %s", exc)
                return
            self.error = exc
            self.ready.set()
        finally:
            self.settled.set()


def _target_pre_copy(run: _TargetRun) -> TransferSummary:
    """Phase pre-copy: the target helpers start, the source hears 'accept'
    with their nonces, and the stream is imported until its commit."""
    channel, report = run.channel, run.report
    incoming = _IncomingStream(run)
    channel.stream_liveness = incoming.liveness
    receiver = threading.Thread(target=incoming.receive, name="migrate-incoming-receive", daemon=True)
    receiver.start()
    # After a commit the helpers power off in that thread: done before this
    # role ends (before a commit, a failure ends it as it always did).
    run.stack.callback(lambda: receiver.join(30) if incoming.committed.is_set() else None)
    # Should anything below fail, the import stops reading at once.
    run.stack.callback(channel.abandon)
    incoming.ready.wait()
    if incoming.error is not None:
        raise MigrationError(f"the target helpers did not start: {incoming.error}")
    report.setup_seconds = time.monotonic() - run.prepare_start
    incoming.liveness.restart()
    channel.send("accept", device_state_port=run.device_state_port,
                 nonces=[nonce.hex() for nonce in incoming.nonces])
    channel.phase = "pre-copy"
    _watch_import(channel, run.target, run.reader, incoming.settled)
    channel.stream_liveness = None
    report.stream_bytes = run.reader.bytes
    if incoming.error is not None:
        raise _import_failure(channel, incoming.error)
    summary = incoming.summary
    assert summary is not None  # settled without an error: the import's summary is there
    report.private_pages = summary.private_pages
    report.zero_range_pages = summary.zero_range_pages
    report.shared_pages = summary.shared_pages
    return summary


def _target_commit(run: _TargetRun, summary: TransferSummary) -> None:
    """Phase commit: the commit proof and the verdict to the source, then
    its commit (or its abort)."""
    channel = run.channel
    channel.phase = "the verdict"
    # A target QEMU that no longer answers QMP (a wedged main loop) would
    # fail only after the commit, when the source can no longer resume:
    # found now, the source resumes its guest.
    run.target.qmp("query-status")
    digest, digest_ms = _verdict_digest(channel, run.reader, run.ram, run.size, run.report)
    # Target helper 0's commit proof: the only thing the source commits on.
    channel.send("proof", **commit_proof.encode(bytes.fromhex(summary.commit_proof)))
    channel.send("verdict", ok=True, reason="", private_pages=summary.private_pages,
                 shared_pages=summary.shared_pages, ram_digest=digest, digest_ms=digest_ms)
    run.report.guest_state = "verified, waiting for the source's commit (never resumed)"
    channel.phase = "switchover"
    # The source hashes its RAM and moves the device state before it
    # commits, saying it is alive every second meanwhile.
    _await_commit(channel, run.size)


def _target_resume(run: _TargetRun) -> int:
    """Phase resume: the device state in, 'cont', the guest's MAC announced
    and the source told. Returns where the serial console stood before."""
    channel, report, target = run.channel, run.report, run.target
    channel.phase = "the device-state move"
    _wait_for_device_state(target)
    serial_before = len(target.serial_text())
    channel.phase = "resume"
    # Said before the command: a 'cont' whose answer is lost may have run.
    report.guest_state = "resumed here (cont sent)"
    target.qmp("cont")
    report.guest_state = "running here"
    debian_guest.announce(target, run.description)
    # From here on this is the only copy of the guest that may run: the
    # source sent commit and never resumes its own. A source that is gone
    # now (it gave up waiting for 'resumed', or the link broke) costs the
    # guest nothing; the report says the source may not know.
    _tell_source(channel, report, "resumed")
    if run.config.after_resume is not None:
        run.config.after_resume(target)
    return serial_before


def _target_running(run: _TargetRun, serial_before: int) -> None:
    """After the resume: the guest's first heartbeat here, without
    corruption, said to the source; then the connection closes."""
    channel, report, target = run.channel, run.report, run.target
    channel.phase = "the first heartbeat after resume"
    try:
        report.target_heartbeat = _while_telling_source(channel, report, run.reader, lambda: wait_for_serial(
            target, guest.HEARTBEAT, run.config.heartbeat_timeout, after=serial_before))
    except QemuError as exc:
        report.guest_state = "lost: the target QEMU failed after switchover"
        raise MigrationError(f"target QEMU failed after switchover: {exc}") from exc
    if guest.CORRUPTION in target.serial_text():
        report.guest_state = "running here, reporting corruption"
        raise MigrationError("the workload reports CORRUPTION on the target")
    _tell_source(channel, report, "running", heartbeat=report.target_heartbeat[: mp.MAX_TEXT])
    channel.phase = "running the guest"
    # The protocol is over: the connection closes now, not when the guest
    # stops (a source that left would keep it in CLOSE-WAIT meanwhile).
    channel.close()
    report.outcome = "ok"


def _import_failure(channel: mp.Channel, error: BaseException) -> OvmfMhError:
    """What a failed import is said as. A stream that stops short is the
    source going away, not a forgery; and so is any failure once the source
    has left: a target stopped (SIGSTOP) and continued finds its own helper's
    mailbox timeout expired as well, but the cause is the source that gave it
    up meanwhile."""
    if isinstance(error, OSError) or (isinstance(error, ct.ContainerError) and "truncated" in str(error)):
        return channel.gone(error)
    if channel.peer_departed():
        gone = channel.gone(None)
        return mp.PeerGone(f"{gone} (this side's import then failed too: {error})", peer=gone.peer,
                           phase=gone.phase)
    return MigrationError(f"the import failed: {error}")


def _verdict_digest(channel: mp.Channel, reader: _CountingReader, ram: Path, size: int,
                    report: TargetReport) -> tuple[list[str], int]:
    """The RAM digest for the verdict and its time in ms: only if the source
    asked for it (its RAM check, the emulation's check: docs/migration.md),
    since the guest is stopped meanwhile; else nothing, at no cost. Timed so
    the source can leave it out of the downtime. Hashing 256 MiB takes
    seconds on a loaded machine: the source hears progress meanwhile, as
    during the import, so that only a silent target counts as gone."""
    if not report.ram_digest_asked:
        return [], 0
    digest_start = time.monotonic()
    digest = _alive_while(channel, reader, lambda: ram_digest(ram, size))
    report.digest_ms = round(1000 * (time.monotonic() - digest_start))
    return digest, report.digest_ms


def _alive_while(channel: mp.Channel, reader: _CountingReader, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread, telling the source every PROGRESS_INTERVAL
    that this side is alive; its result, or its exception."""
    return _run_saying_progress(work, lambda: channel.send("progress", stream_bytes=reader.bytes),
                                "migrate-incoming-work")


def _run_saying_progress(work: Callable[[], T], say_progress: Callable[[], None], name: str) -> T:
    """Run ``work`` in a thread named ``name``, calling ``say_progress``
    every PROGRESS_INTERVAL until it ends; its result, or its exception."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    while True:
        worker.join(timeout=PROGRESS_INTERVAL)
        if not worker.is_alive():
            break
        say_progress()
    if failure:
        raise failure[0]
    return result[0]


#: The longest the device state may take to arrive after the source's commit,
#: and the source to move it after the verdict.
DEVICE_STATE_LIMIT = 60.0


def _await_commit(channel: mp.Channel, size: int) -> None:
    """After the verdict: the source's 'commit'. It says 'progress' every
    second while it hashes its RAM and moves the device state:
    SWITCHOVER_SILENCE without a message is a stopped source or a cut link;
    the whole wait is bounded by its hashing and the device-state move."""
    bound = mp.hashing_bound(channel.idle_timeout, size) + DEVICE_STATE_LIMIT
    deadline = time.monotonic() + bound
    while True:
        timeout = min(mp.SWITCHOVER_SILENCE, channel.idle_timeout)
        if channel.receive("commit", "progress", timeout=timeout).type == "commit":
            return
        if time.monotonic() >= deadline:
            raise MigrationError(f"the source {channel.peer} did not commit within {bound:.0f} s of the verdict "
                                 "(the bound for hashing its RAM and moving the device state)")


def _while_telling_source(channel: mp.Channel, report: TargetReport, reader: _CountingReader,
                          work: Callable[[], T]) -> T:
    """After the resume: run ``work`` (waiting for the guest's heartbeat),
    telling the source every PROGRESS_INTERVAL that this side is alive; a
    source that no longer hears it is noted (_tell_source), not a failure."""
    return _run_saying_progress(
        work, lambda: _tell_source(channel, report, "progress", stream_bytes=reader.bytes),
        "migrate-incoming-after-resume")


def _tell_source(channel: mp.Channel, report: TargetReport, kind: str, **fields: Any) -> None:
    """A message after the resume: a source that can no longer hear it is
    noted, not a failure (the guest runs here, and only here)."""
    if report.source_lost is not None:
        return
    try:
        channel.send(kind, **fields)
    except mp.PeerGone as exc:
        report.source_lost = f"'{kind}' did not reach the source: {exc}"
        log.warning("migrate-incoming: the guest runs here, but %s; the source may report the guest's "
                    "state as unknown", report.source_lost)


def _listen_for_device_state(target: QemuVM, host: str) -> int:
    """QEMU's own migration channel for device state, on a free port of the
    control connection's address; the port goes to the source in ``accept``."""
    bracketed = f"[{host}]" if ":" in host else host
    target.qmp("migrate-incoming", uri=f"tcp:{bracketed}:0")
    for entry in target.qmp("query-migrate").get("socket-address", []):
        if entry.get("type") == "inet":
            return int(entry["port"])
    raise MigrationError("the target QEMU did not say which port its incoming migration listens on")


def _watch_import(channel: mp.Channel, target: QemuVM, reader: _CountingReader, settled: threading.Event) -> None:
    """Wait for the import's commit (or its end), telling the source every
    PROGRESS_INTERVAL that this side is alive; a target QEMU that dies or
    stops ends the import."""
    next_progress = time.monotonic() + PROGRESS_INTERVAL
    reported = reader.bytes
    stopped_since: float | None = None
    while not settled.is_set():
        settled.wait(IMPORT_WATCH_INTERVAL)
        # No abandon() here: the source should read why before the cut.
        if not target.is_running():
            raise MigrationError(f"{target.describe()}, during pre-copy")
        if target.is_stopped():
            stopped_since = stopped_since or time.monotonic()
            if time.monotonic() - stopped_since > 0.3:
                raise MigrationError(f"target QEMU pid {target.pid} is stopped (state T: SIGSTOP or a debugger) "
                                     "and can answer nothing, during pre-copy")
        else:
            stopped_since = None
        # While the stream moves, say so at once: before it stops the guest
        # the source waits until this side has taken what it sent, so
        # that the downtime holds no backlog (docs/migration-protocol.md).
        moved = reader.bytes != reported
        if (moved or time.monotonic() >= next_progress) and not settled.is_set():
            reported = reader.bytes
            channel.send("progress", stream_bytes=reported)
            next_progress = time.monotonic() + PROGRESS_INTERVAL


def _wait_for_device_state(target: QemuVM) -> None:
    deadline = time.monotonic() + 60
    while target.qmp("query-status").get("status") == "inmigrate":
        if time.monotonic() > deadline:
            raise MigrationError("the device state did not arrive within 60 s of the source's commit")
        time.sleep(0.005)


def _serve_guest(report: TargetReport, target: QemuVM) -> None:
    """Run the guest in the foreground until SIGINT/SIGTERM (a normal end:
    the guest stops with the command) or until its QEMU dies (a failure)."""
    log.info("migrate-incoming: the guest runs here (QEMU pid %s); SIGINT or SIGTERM stops it", target.pid)
    try:
        while target.is_running():
            time.sleep(0.2)
    except KeyboardInterrupt:
        report.guest_state = "ran here until stopped on request"
        return
    report.outcome = "failed"
    report.guest_state = f"lost: {target.describe()}"
    raise MigrationError(f"{target.describe()} while running the guest")
