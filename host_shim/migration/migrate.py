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

This module is the source role; the target role is host_shim/migration/migrate_target.py,
reached over TCP (docs/migration-protocol.md): in another program on
another host (``--to``), or in a thread of this one over loopback.

Dirty pages come from the kernel's write log of the source RAM file (the
page cache's dirty state, host_shim/migration/dirty_log.py): each pass
sends what the log marks, and the switchover sends only the pages written
since the last pass, exactly, without reading the others. Where the RAM
file keeps no log (tmpfs), ``--switchover full-check`` is the older way:
the host compares the RAM file with a copy of what it held when each page
was last sent (numpy, page granular), and at switchover every source
helper checks every page (CHECK_PAGES). Either way the host never
interprets the bytes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from host_shim.errors import OvmfMhError
from host_shim.helpers.keys import read_key
from host_shim.helpers.mailbox import DEFAULT_TIMEOUT
from host_shim.migration import debian_guest
from host_shim.migration import migration_protocol as mp
from host_shim.migration.attach import SourceGuest, attach, restore
from host_shim.migration.convergence import ConvergenceSettings, PassNumbers
from host_shim.migration.dirty_log import DirtyLog, DirtyLogUnavailable, unavailable_reason
from host_shim.migration.guest_description import (
    ACCELERATORS,
    CPUS,
    DEBIAN_GUEST,
    GUEST_KINDS,
    MACHINES,
    GuestDescription,
    firmware_digest,
)
from host_shim.migration.migrate_target import TargetConfig, TargetReport, listen, run_target
from host_shim.migration.migration_vm import (
    DIGEST_PARTS,
    MIB,
    PAGE,
    MigrationError,
    guest_config,
    ram_digest,
    ram_file,
    wait_for_serial,
)
from host_shim.migration.precopy_control import PreCopyControl
from host_shim.progress import Progress
from host_shim.transfer import commit_proof
from host_shim.transfer.holes import hole_pages
from host_shim.transfer.pipeline import Exporter, PageNumbers
from host_shim.vm import guest, process
from host_shim.vm.attached import AttachedQemu, QemuHandle
from host_shim.vm.devices import NicBackend
from host_shim.vm.netns import TAP, L2Network
from host_shim.vm.qemu import QemuVM, describe_logs, logs_under
from host_shim.vm.reaper import MIGRATING, reaper

log = logging.getLogger(__name__)

MIN_GUEST_MIB = 256
#: How the switchover finds the pages to send (docs/migration.md).
SWITCHOVER_MODES = ("dirty-log", "full-check")


@dataclass
class PassReport:
    number: int
    pages: int
    zero_pages: int
    stream_bytes: int
    seconds: float
    guest_running: bool
    # With the dirty log: pages it marked, and the seconds of the CHECK_PAGES
    # that kept those whose content is not what their helper sealed.
    logged: int = 0
    check_seconds: float = 0.0
    # The log was reset before this pass (fsync, then CHECK_PAGES of every
    # page instead of the logged ones), and why.
    log_reset: str | None = None
    #: Pages of this pass that went as ZERO_RANGE records (never-written memory).
    zero_range_pages: int = 0

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
    # From 'stop' to the target's 'cont', less the RAM check (a test
    # instrument: --no-verify-ram leaves it out).
    downtime_seconds: float = 0.0
    # The RAM check's time (the target's digest and the source's, with the
    # guest stopped) and the guest's whole stopped time, the check included.
    verify_seconds: float = 0.0
    stopped_seconds: float = 0.0
    device_state_seconds: float = 0.0
    check_seconds: float = 0.0
    check_pages_changed: int = 0
    # 'dirty-log', 'dirty-log + full CHECK_PAGES' or 'full-check', and why
    # a full check ran with the log.
    switchover_check: str = ""
    switchover_reason: str | None = None
    log_read_seconds: float = 0.0
    log_pages: int = 0
    # Pages the full check found changed that the log did not mark (only
    # when both ran: --verify-all, or a log in doubt). 0 when the log is exact.
    log_missed_pages: int | None = None
    # What backs the log: the page cache and the kernel's write record
    # (dirty_log.py), with the pages only the record marked, or why no record.
    log_trace: str = ""
    # Before 'stop': how long the source waited for the target to take the
    # stream sent so far, and how many bytes it had not taken then.
    catch_up_seconds: float = 0.0
    catch_up_backlog: int = 0
    # Pre-copy passes run after a catch-up because the guest wrote much meanwhile.
    catch_up_passes: int = 0
    switchover_ms: dict[str, int] = field(default_factory=dict)  # milestones after 'stop'
    # Pre-copy's end and the guest's throttle (precopy_control.py): the
    # decision after each pass, the levels, the time the guest was stopped.
    throttle: dict[str, Any] = field(default_factory=dict)
    throttle_summary: str = ""
    phase_seconds: dict[str, float] = field(default_factory=dict)  # milestones after 'started'
    setup_seconds: float = 0.0
    passes: list[PassReport] = field(default_factory=list)
    ram_identical: bool | None = None
    target_heartbeat: str | None = None
    # The TCP probe's result (the Debian guest with --network): bytes sent and echoed, reset, longest gap.
    tcp_probe: dict[str, Any] | None = None
    source_heartbeat_after_failure: str | None = None
    guest_state: str = "unknown"
    # What became of the source QEMU: stopped by this command (the demo's),
    # or, attached to the user's, left paused or quit on request.
    source_qemu: str = ""
    error: str | None = None
    work_dir: str = ""
    # The target role's own report, when this command ran it (one machine).
    target: dict[str, Any] | None = None
    # Every QEMU this command ran (guests and helpers, both roles on one
    # machine): its folder under work_dir -> its logs (vm/qemu.py, logs_under).
    logs: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passes"] = [dict(asdict(p), pages_per_s=p.pages_per_s) for p in self.passes]
        pages = sum(p.pages for p in self.passes)
        moving = sum(p.seconds for p in self.passes)
        out["pages"] = pages
        out["zero_range_pages"] = sum(p.zero_range_pages for p in self.passes)
        out["pages_per_s"] = pages / moving if moving else 0.0
        return out

    def _stopped_text(self) -> str:
        if self.verify_seconds:
            return (f"guest stopped {1000 * self.stopped_seconds:.0f} ms: the downtime and the RAM check's "
                    f"{1000 * self.verify_seconds:.0f} ms")
        return f"guest stopped {1000 * self.stopped_seconds:.0f} ms: the downtime (no RAM check)"

    def describe(self) -> list[str]:
        lines = [
            f"migration {self.outcome}: {self.guest_mib} MiB guest, {self.helpers} {self.helper} helper(s); "
            f"guest is {self.guest_state}",
            f"  total {self.total_seconds:.2f} s from the target's accept to target running "
            f"(target QEMU and helpers prepared before, the source helpers started beside them, in "
            f"{self.setup_seconds:.2f} s), "
            f"downtime {1000 * self.downtime_seconds:.0f} ms "
            f"(device state {1000 * self.device_state_seconds:.0f} ms), {self._stopped_text()}; "
            "steps after stop (RAM check left out): "
            + ", ".join(f"{step} {ms} ms" for step, ms in self.switchover_ms.items()),
            f"  switchover by {self.switchover_check or 'nothing yet'}"
            + (f" ({self.switchover_reason})" if self.switchover_reason else "")
            + (f": dirty log read in {1000 * self.log_read_seconds:.0f} ms, {self.log_pages} pages"
               if self.switchover_check.startswith("dirty-log") else "")
            + f"; CHECK_PAGES {1000 * self.check_seconds:.0f} ms found {self.check_pages_changed} changed"
            + (f"; pages the log missed: {self.log_missed_pages}" if self.log_missed_pages is not None else "")
            + (f"\n  dirty log: {self.log_trace}" if self.log_trace else ""),
            f"  {self.throttle_summary}" if self.throttle_summary else "  pre-copy ended before any decision",
            f"  before stop, the target caught up with {self.catch_up_backlog} stream bytes in "
            f"{1000 * self.catch_up_seconds:.0f} ms ({self.catch_up_passes} pass(es) after a catch-up)",
        ]
        for p in self.passes:
            state = "guest running" if p.guest_running else "guest stopped"
            logged = f" of {p.logged} logged (checked in {p.check_seconds:.2f} s)" if p.logged else ""
            if p.log_reset:
                logged = f" of all, log reset ({p.log_reset}; checked in {p.check_seconds:.2f} s)"
            lines.append(
                f"  pass {p.number}: {p.pages} pages{logged} ({p.zero_pages} zero, {p.zero_range_pages} as zero "
                f"ranges), {p.stream_bytes} bytes, "
                f"{p.seconds:.2f} s, {p.pages_per_s:.0f} pages/s, {state}"
            )
        if self.ram_identical is not None:
            lines.append(f"  target RAM file identical to source at switchover: {self.ram_identical}")
        if self.target_heartbeat:
            lines.append(f"  target heartbeat: {self.target_heartbeat}")
        if self.tcp_probe:
            lines.append(f"  TCP probe: {self.tcp_probe}")
        if self.source_heartbeat_after_failure:
            lines.append(f"  source heartbeat after the failure: {self.source_heartbeat_after_failure}")
        if self.source_qemu:
            lines.append(f"  source QEMU: {self.source_qemu}")
        if self.error:
            lines.append(f"  error: {self.error}")
            lines.extend(describe_logs(self.logs))
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
    # Pages the source guest's workload keeps changing and changing back
    # (the ABA case a comparison of bytes cannot see).
    aba_pages: int = 0
    max_passes: int = 6
    # When pre-copy ends (the final pass's estimate within the downtime
    # limit) and whether the guest is throttled until it does.
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)
    # 'dirty-log': passes and switchover follow the kernel's write log of
    # the RAM file (ext4); 'full-check': host comparison and CHECK_PAGES of
    # every page (any file system). Never switched silently.
    switchover: str = "dirty-log"
    # With the dirty log, also run CHECK_PAGES over every page at switchover
    # and count what the log missed (costs guest-size downtime).
    verify_all: bool = False
    verify_ram: bool = True
    heartbeat_timeout: float = 20.0
    progress: bool | None = None
    # Where the source and target RAM files live: None keeps them in the work
    # folder (and after the run); a folder such as /dev/shm holds them for the
    # run only. tmpfs spares QEMU and the helpers the disk file system's page
    # faults and writeback (docs/migration.md).
    ram_dir: Path | None = None
    # Called with the target QEMU right after it is resumed (failure-injection
    # tests; one machine only).
    after_switchover: Callable[[QemuVM], None] | None = None
    # Seconds a helper may take to answer one command (docs/mailbox.md).
    mailbox_timeout: float = DEFAULT_TIMEOUT
    # 'test' (the test guest) or 'debian' (host_shim/migration/debian_guest.py):
    # its vCPUs and its disk on shared storage (None: a fresh overlay in the work folder).
    guest: str = "test"
    vcpus: int = 2
    disk: Path | None = None
    # The Debian guest's L2 network (source, target and client namespaces):
    # its NIC on a tap in each host's namespace, a TCP probe from the client.
    network: L2Network | None = None
    # Without that network: the host side of the Debian guest's NIC on the
    # source host (None: a NIC with no link); --to's target names its own.
    nic: NicBackend | None = None
    # Pages in holes of the source RAM file (never written) go as zero
    # ranges that the source helpers check (EXPORT_ZERO_RANGES, ABI 2.1).
    zero_ranges: bool = True
    # `ovmf-mh migrate-incoming` at this address; None runs the target role
    # in this process over loopback TCP.
    target: tuple[str, int] | None = None
    connect_timeout: float = 30.0
    # Seconds the peer may stay silent (or take nothing) before it counts as gone.
    idle_timeout: float = 15.0
    # A guest the user already runs (--qmp SOCKET --ram FILE) instead of the
    # test guest this command boots; its QEMU is never stopped by this
    # command, only quit on request after a migration (--quit-source).
    attach_qmp: Path | None = None
    attach_ram: Path | None = None
    quit_source: bool = False


#: Seconds the target may take to prepare (QEMU, helpers) before it answers.
PREPARE_TIMEOUT = 120.0
#: How often the source tells a verified target it is alive, until the commit.
PROGRESS_INTERVAL = 1.0
#: The longest wait, before 'stop', for the target to take what was sent:
#: past it the switchover goes ahead and the backlog is downtime.
CATCH_UP_LIMIT = 5.0
CATCH_UP_POLL = 0.005
#: Passes the catch-up may add when the guest wrote much while it waited.
CATCH_UP_PASSES = 2
#: How often the watch looks at the source QEMU and the target side.
WATCH_INTERVAL = 0.1
#: How long a guest QEMU may stay stopped (state T in /proc/PID/stat: SIGSTOP,
#: a debugger) before the watch calls it a fault. A stopped QEMU answers no
#: QMP command, so waiting longer only delays the failure.
STOPPED_GRACE = 0.3


class _Watch:
    """Looks at the guest QEMU(s) and the target side every WATCH_INTERVAL
    while the migration runs: a QEMU that dies, or a target side that fails,
    stops the run at once (through ``on_fault``) instead of at the next step
    that happens to need it. ``phase`` says what the run was doing."""

    def __init__(self, vms: list[QemuHandle], target_error: Callable[[], BaseException | None]) -> None:
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
            if message is not None:
                message = f"{message}, during {self.phase}"
            else:
                error = self._target_error()
                if isinstance(error, mp.ProtocolError):
                    message = str(error)  # it names the peer and the phase
                elif error is not None:
                    message = f"the target side failed: {error}, during {self.phase}"
            if message is not None:
                self.fault = MigrationError(f"{message} ({time.monotonic() - self.started:.1f} s into the run)")
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


def _wait_for(vm: QemuHandle, needle: str, timeout: float, after: int = 0) -> str:
    return wait_for_serial(vm, needle, timeout, after)


class _TargetListener:
    """Reads what the target says during pre-copy and the switchover, in
    its own thread: its progress (it is alive), its verdict, or its error.
    Silence past the idle timeout, a closed connection or an error message
    make ``error`` set, which the watch turns into a stop of the run."""

    def __init__(self, channel: mp.Channel) -> None:
        self.channel = channel
        self.verdict: mp.Message | None = None
        #: The target's ``proof`` (its commit proof), which comes before its verdict.
        self.proof: mp.Message | None = None
        self.error: BaseException | None = None
        # Set by the source before its stream's end (DONE) goes: a verdict
        # before it is out of order (a target cannot have verified a stream
        # it has not seen end).
        self.stream_ending = threading.Event()
        # Set when the source stops its guest: from then on the target's
        # silence is bounded by SWITCHOVER_SILENCE, not the idle timeout.
        self.switchover = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate-target-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                message = self.channel.receive(*(("progress", "verdict") if self.proof else
                                                   ("progress", "proof", "verdict")))
                if message.type in ("proof", "verdict") and not self.stream_ending.is_set():
                    raise mp.ProtocolError(
                        f"the peer {self.channel.peer} sent {message.type!r} during {self.channel.phase}, before "
                        "the stream's end was sent: out of order, refused", peer=self.channel.peer,
                        phase=self.channel.phase)
                if message.type == "proof":
                    self.proof = message
                if message.type == "verdict":
                    self.verdict = message
                    return
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive()

    def fault(self) -> BaseException | None:
        """What the watch stops the run for: the listener's error, or, in
        the switchover, a target silent for SWITCHOVER_SILENCE (it says
        'progress' every second: a stopped target or a cut link)."""
        if self.error is not None or not self.switchover.is_set() or not self.alive():
            return self.error
        silent = time.monotonic() - self.channel.last_message_at
        if silent < mp.SWITCHOVER_SILENCE:
            return None
        return mp.PeerGone(f"the peer {self.channel.peer} said nothing for {silent:.1f} s during "
                           f"{self.channel.phase} (it says 'progress' every second: at most "
                           f"{mp.SWITCHOVER_SILENCE:g} s)", peer=self.channel.peer, phase=self.channel.phase)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


#: How often the source tries again while the target refuses the connection.
CONNECT_RETRY = 0.2


def _connect(config: MigrationConfig, address: tuple[str, int]) -> mp.Channel:
    """The control connection, tried again while the target refuses it (its
    `migrate-incoming` not listening yet), until --connect-timeout."""
    peer = f"target {address[0]}:{address[1]}"
    deadline = time.monotonic() + config.connect_timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=max(0.1, deadline - time.monotonic()))
            break
        except ConnectionRefusedError as exc:
            if time.monotonic() + CONNECT_RETRY < deadline:
                time.sleep(CONNECT_RETRY)
                continue
            raise MigrationError(f"cannot connect to the {peer}: {exc.strerror or exc} for "
                                 f"{config.connect_timeout:g} s (--connect-timeout); is 'ovmf-mh "
                                 "migrate-incoming' listening there?") from exc
        except OSError as exc:
            raise MigrationError(f"cannot connect to the {peer}: {exc.strerror or exc}; is 'ovmf-mh "
                                 "migrate-incoming' listening there?") from exc
    return mp.Channel(sock, peer, config.idle_timeout)


def _handshake(channel: mp.Channel, description: GuestDescription, ram_digest: bool) -> tuple[int, list[bytes]]:
    """Hello, guest description (and whether the target is to send its RAM
    digest: only for the RAM check), the target's answer once its QEMU and
    helpers are up: the port of its QEMU's incoming migration (device state)
    and its helpers' challenge nonces, one per shard, which the source
    helpers bind their streams to (docs/stream-format.md)."""
    channel.send("hello", protocol=mp.PROTOCOL, versions=list(mp.VERSIONS))
    welcome = channel.receive("welcome")
    if welcome["protocol"] != mp.PROTOCOL or welcome["version"] not in mp.VERSIONS:
        raise mp.ProtocolError(f"the {channel.peer} chose {welcome['protocol'][:40]!r} version "
                               f"{welcome['version']}; this source speaks {mp.PROTOCOL} {list(mp.VERSIONS)}")
    channel.phase = "the guest description"
    channel.send("describe", guest=description.as_json(), ram_digest=ram_digest)
    channel.phase = "the target's preparation"
    # Its QEMU and helpers start first (and, on a fresh host, the test
    # guest's workload is compiled): longer than a silence in a stream.
    answer = channel.receive("accept", "refuse", timeout=max(PREPARE_TIMEOUT, channel.idle_timeout))
    if answer.type == "refuse":
        raise MigrationError(f"the {channel.peer} refused the guest description: field {answer['field']!r}: "
                             f"{answer['reason']}")
    port: int = answer["device_state_port"]
    if not 1 <= port <= 65535:
        raise mp.ProtocolError(f"the {channel.peer} named device-state port {port}")
    return port, mp.decode_nonces(answer["nonces"], description.shards, channel.peer)


def migrate(config: MigrationConfig) -> MigrationReport:
    """Run one live migration; never leaves the guest half-resumed. With
    ``config.target`` the target is `ovmf-mh migrate-incoming` at that
    address; without, this function runs the target role itself, in a
    thread, over loopback TCP: the same protocol, the same code. With
    ``config.attach_qmp`` the guest is the user's running QEMU, checked
    first (AttachRefused names what does not fit, the guest untouched)."""
    _check_config(config)
    if config.target is not None:
        if config.key_file is None:
            raise MigrationError("--to needs --key FILE: the guest owner's transport key, the same file on "
                                 "both hosts (it never crosses the connection)")
        return _migrate_source(config, read_key(config.key_file), config.target)
    return _migrate_both_roles(config, read_key(config.key_file) if config.key_file else os.urandom(32))


def _check_config(config: MigrationConfig) -> None:
    """What the migration asks for, refused by name before anything starts."""
    if (config.attach_qmp is None) != (config.attach_ram is None):
        raise MigrationError("--qmp and --ram go together: the running guest's QMP socket and its RAM file")
    if config.attach_qmp is None and (config.guest_mib < MIN_GUEST_MIB
                                      or config.workload_mib > config.guest_mib // 2):
        raise MigrationError(
            f"the test guest needs at least {MIN_GUEST_MIB} MiB (its kernel and initramfs do not start "
            f"under OVMF in less) and a workload of at most half of it; got {config.guest_mib} MiB "
            f"with a {config.workload_mib} MiB workload"
        )
    if config.switchover not in SWITCHOVER_MODES:
        raise MigrationError(f"--switchover {config.switchover!r}: one of {', '.join(SWITCHOVER_MODES)}")
    if config.switchover == "dirty-log":
        folder = config.ram_dir or config.work_dir
        folder.mkdir(parents=True, exist_ok=True)
        reason = unavailable_reason(folder)
        if reason is not None:
            raise DirtyLogUnavailable(f"the source RAM file would keep no dirty log: {reason}; "
                                      "'--switchover full-check' checks every page at switchover instead")
    elif config.verify_all:
        raise MigrationError("--verify-all adds a full CHECK_PAGES to the dirty log; --switchover full-check "
                             "checks every page already")


def _migrate_both_roles(config: MigrationConfig, key: bytes) -> MigrationReport:
    """The one-machine migration: the target role in a thread over loopback
    TCP, the source role here; one report holding both."""
    # The TCP probe, once the source started it, streams on after 'cont'
    # and is stopped by the target role while it still runs the guest.
    probes: list[debian_guest.ProbeClient] = []
    hook = config.after_switchover
    target_config = TargetConfig(
        image=config.image, work_dir=config.work_dir, key=key, helper=config.helper, helpers=config.helpers,
        ram_dir=config.ram_dir, idle_timeout=config.idle_timeout, heartbeat_timeout=config.heartbeat_timeout,
        mailbox_timeout=config.mailbox_timeout, keep_running=False, after_resume=hook,
        disk=_shared_disk(config),
        nic=NicBackend("tap", TAP) if config.network else NicBackend(),
        wrapper=config.network.enter("target") if config.network else [],
        device_state_host=config.network.address("target") if config.network else None,
        linger=debian_guest.finish_probe_later(probes),
    )
    server = listen(("127.0.0.1", 0))
    results: list[TargetReport] = []
    target = threading.Thread(target=lambda: results.append(run_target(target_config, server)),
                              name="migrate-target", daemon=True)
    target.start()
    try:
        report = _migrate_source(config, key, server.getsockname()[:2], probes)
    finally:
        # A source that never connected leaves the target waiting in accept:
        # shutting the listening socket down wakes it. Once connected, the
        # source's end closed the connection, and the target side ends too.
        with suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        target.join(timeout=60)
        tcp_probe = probes[0].finish() if probes else None
    report.tcp_probe = tcp_probe
    if results:
        report.target = results[0].as_json()
    # Both roles' QEMUs ran under this work folder.
    report.logs = logs_under(config.work_dir)
    return report


@dataclass
class _SourceRun:
    """One outgoing migration, handed from phase to phase: what it was
    asked, the source guest, the report being filled, the ExitStack that
    stops everything it started, and how far it got (the failure path
    reads the flags and whatever connection, listener and watch exist)."""

    config: MigrationConfig
    key: bytes
    address: tuple[str, int]
    report: MigrationReport
    stack: ExitStack
    guest: SourceGuest
    probes: list[debian_guest.ProbeClient] | None
    channel: mp.Channel | None = None
    listener: _TargetListener | None = None
    watch: _Watch | None = None
    #: The switchover decision and the guest's throttle, from pass 2 on.
    control: PreCopyControl | None = None
    #: The source guest was (or may have been) stopped for the switchover.
    stopped: bool = False
    #: The whole stream, its end included, is on the connection.
    stream_done: bool = False
    #: 'commit' was (or may have been) sent: the source never resumes.
    committed: bool = False
    #: The target said it resumed the guest.
    resumed_target: bool = False


@dataclass
class _Link:
    """The phases from pre-copy on: the target's connection, the listener
    and watch over it, the source helpers and the one way dirty pages are
    found (the kernel's log, or the host's copy)."""

    channel: mp.Channel
    listener: _TargetListener
    watch: _Watch
    device_state_port: int
    exporter: Exporter
    dirty_log: DirtyLog | None
    tracker: DirtyTracker | None
    every_page: PageNumbers
    #: When the migration proper started (the target prepared).
    started: float
    #: When the source guest stopped, and the switchover's marks since then.
    stop_at: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    #: The target's verdict (its 'digest_ms' is not downtime).
    verdict: mp.Message | None = None
    #: Says 'progress' to the target from its verdict to the commit.
    alive: _KeepAlive | None = None

    @property
    def digest_seconds(self) -> float:
        return self.verdict["digest_ms"] / 1000 if self.verdict is not None else 0.0


def _migrate_source(config: MigrationConfig, key: bytes, address: tuple[str, int],
                    probes: list[debian_guest.ProbeClient] | None = None) -> MigrationReport:
    """The source role's phases: prepare (the guest, the target, the
    helpers), pre-copy, switchover (the guest stopped, the final pass),
    the target's verdict, the device-state move, commit and resume on the
    target. A failure resumes the guest here unless it was committed."""
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    report = MigrationReport(helper=config.helper, helpers=config.helpers, guest_mib=config.guest_mib,
                             work_dir=str(work))
    stack = ExitStack()
    try:
        source_guest = _source_guest(config, stack, work)
    except BaseException:
        stack.close()
        raise
    report.guest_mib = source_guest.description.memory_mib
    run = _SourceRun(config, key, address, report, stack, source_guest, probes)
    try:
        link = _source_prepare(run)
        _source_pre_copy(run, link)
        _source_switchover(run, link)
        _source_verdict(run, link)
        _source_device_state(run, link)
        _source_commit(run, link)
        _source_resume(run, link)
    except (OvmfMhError, OSError) as exc:
        _source_failed(run, exc)
    except KeyboardInterrupt as exc:
        # SIGINT, SIGTERM, SIGHUP (cli.py): the user's guest is resumed
        # here if this command paused it, and the message says so.
        if run.channel is not None:
            run.channel.abandon()
        run.stopped = (run.control is not None and run.control.close()) or run.stopped
        exc.add_note(_resume_after_signal(source_guest, run.stopped, run.committed))
        raise
    finally:
        # Every QEMU and helper this run started stops here, by its own pid.
        stack.close()
        if run.control is not None:
            report.throttle, report.throttle_summary = run.control.report(), run.control.describe()
        # Their logs stay in the work folder; a failure names them.
        report.logs = logs_under(work)
    return report


def _source_prepare(run: _SourceRun) -> _Link:
    """Phase prepare: the guest beating, the target connected and prepared
    (the handshake) while the source helpers start beside it, the dirty
    pages tracked."""
    config, stack, source_guest = run.config, run.stack, run.guest
    if not source_guest.attached:
        _wait_for(source_guest.vm, guest.HEARTBEAT, _boot_timeout(source_guest))
    debian_guest.start_probe(config.network, stack, run.probes)
    prepare_start = time.monotonic()
    channel = run.channel = _connect(config, run.address)
    stack.callback(channel.close)
    # The source helpers start (and the dirty log is reset) while the
    # target prepares: neither needs the target, and both wait on it.
    nonces_given: list[bytes] = []
    exporter, dirty_log, tracker = _source_helpers(run, channel, nonces_given)
    early = stack.enter_context(_Beside(exporter.start_helpers, dirty_log.reset if dirty_log else None))
    device_state_port, nonces = _handshake(channel, source_guest.description, config.verify_ram)
    nonces_given.extend(nonces)
    channel.write_stall = mp.stream_liveness(config.idle_timeout, source_guest.size, channel.peer).stall
    listener = run.listener = _TargetListener(channel)
    watch = run.watch = _Watch([source_guest.vm], listener.fault)
    stack.callback(watch.close)
    # The target side is prepared, as a plain migration's target QEMU is
    # before 'migrate': the migration proper starts here.
    run.report.setup_seconds = time.monotonic() - prepare_start
    started = time.monotonic()

    watch.phase = channel.phase = "the source helpers' start"
    early.join()
    exporter.__enter__()
    # From now on a fault stops the helpers' work at their next step.
    watch.on_fault = exporter.abort
    watch.check()
    run.report.phase_seconds["source_helpers_start"] = time.monotonic() - started
    every_page = np.arange(source_guest.size // PAGE, dtype=np.uint64)
    return _Link(channel, listener, watch, device_state_port, exporter, dirty_log, tracker, every_page, started)


def _source_helpers(run: _SourceRun, channel: mp.Channel,
                    nonces: list[bytes]) -> tuple[Exporter, DirtyLog | None, DirtyTracker | None]:
    """The source helpers (not started yet; bound to ``nonces`` once the
    target gave them) and the one way to find dirty pages: the kernel's
    log, or the host's copy. Each is stopped by the run's ExitStack."""
    config, source_guest = run.config, run.guest
    exporter = Exporter(source_guest.ram, run.key, channel.stream(), kind=config.helper, helpers=config.helpers,
                        firmware=config.image, work_dir=config.work_dir / "source-helpers", track_pages=True,
                        mailbox_timeout=config.mailbox_timeout, challenge=lambda: list(nonces),
                        zero_ranges=config.zero_ranges, keepalive=mp.STREAM_KEEPALIVE)
    run.stack.push(exporter)
    dirty_log: DirtyLog | None = None
    tracker: DirtyTracker | None = None
    if config.switchover == "dirty-log":
        dirty_log = DirtyLog(source_guest.ram, source_guest.size)
        run.stack.callback(dirty_log.close)
    else:
        tracker = DirtyTracker(source_guest.ram, source_guest.size)
        run.stack.callback(tracker.close)
    return exporter, dirty_log, tracker


def _run_pass(run: _SourceRun, link: _Link, pages: PageNumbers, running: bool, logged: int = 0,
              check_seconds: float = 0.0, log_reset: str | None = None) -> None:
    """One pass: ``pages`` sealed by the source helpers onto the stream."""
    report = run.report
    link.watch.phase = link.channel.phase = \
        f"{'pre-copy' if running else 'the final'} pass {len(report.passes) + 1}"
    report.phase_seconds[f"pass_{len(report.passes) + 1}_start"] = time.monotonic() - link.started
    meter = Progress(f"pass {len(report.passes) + 1}", len(pages), enabled=run.config.progress)
    stats = link.exporter.send(pages, meter, link.tracker.record if link.tracker is not None else None)
    meter.finish()
    report.passes.append(PassReport(len(report.passes) + 1, stats.pages, stats.zero_pages,
                                    stats.stream_bytes, stats.seconds, running, logged, check_seconds,
                                    log_reset, stats.zero_range_pages))


def _source_pre_copy(run: _SourceRun, link: _Link) -> None:
    """Phase pre-copy, the guest running: every page once (the log was reset
    beside the handshake: every page clean), then passes of what it wrote
    since, until the pre-copy control says switch (precopy_control.py) or
    max_passes; then the target's catch-up. It ends with the throttle
    released and QEMU told to skip the shared RAM."""
    _run_pass(run, link, link.every_page, True)
    control = run.control = run.stack.enter_context(_precopy_control(run.config, run.guest))
    while len(run.report.passes) < run.config.max_passes:
        _pre_copy_pass(run, link)
        if _switch_now(control, run.report.passes, link.dirty_log, run.config.max_passes):
            break
    _source_catch_up(run, link, control)
    control.close()
    _skip_shared_ram(run.guest.vm)


def _pre_copy_pass(run: _SourceRun, link: _Link) -> int:
    """One pass of what was written since the last; its page count."""
    dirty_log = link.dirty_log
    if dirty_log is None:
        assert link.tracker is not None
        dirty_pages = _take(link.tracker)
        _run_pass(run, link, dirty_pages, True)
        return len(dirty_pages)
    # The next pass and the switchover must end before the
    # kernel's flusher may clear the log on its own: as long as
    # the last pass is the room asked for (passes shrink; one
    # that does not makes the switchover check every page).
    doubt = dirty_log.doubt(ahead=run.report.passes[-1].seconds)
    check_start = time.monotonic()
    if doubt is None:
        # Read and clear the log, then keep the logged pages
        # whose content is not what their helper sealed: a write
        # after the clear is in the next read.
        logged = dirty_log.take()
        dirty_pages = link.exporter.changed_since_sent(logged)
    else:
        # Reset: every page clean (the flusher's clock restarts),
        # then every page checked, so a write the fsync cleared
        # unseen, or the flusher did before, is still found.
        # Every page but those never written (_written_pages).
        dirty_log.reset()
        logged = _written_pages(run.guest.ram, link.every_page)
        dirty_pages = link.exporter.changed_since_sent(logged)
    _run_pass(run, link, dirty_pages, True, len(logged), time.monotonic() - check_start, doubt)
    return len(dirty_pages)


def _source_catch_up(run: _SourceRun, link: _Link, control: PreCopyControl) -> None:
    """The target imports behind the source; what it has not taken yet
    at 'stop' would be downtime. Wait (the guest running) until it
    took everything sent. What the guest writes meanwhile goes in the
    final pass, or, when the log says that is more than a converged
    pass, in one more pass, with its own wait."""
    report, dirty_log = run.report, link.dirty_log
    link.watch.phase = link.channel.phase = "the target's catch-up"
    for attempt in range(1 + CATCH_UP_PASSES):
        waited, backlog = _wait_for_catch_up(link.channel, link.watch)
        report.catch_up_seconds += waited
        report.catch_up_backlog += backlog
        if dirty_log is None or attempt == CATCH_UP_PASSES or control.fits(dirty_log.dirty_count()):
            break
        report.catch_up_passes += 1
        _pre_copy_pass(run, link)
        link.watch.phase = link.channel.phase = "the target's catch-up"


def _source_switchover(run: _SourceRun, link: _Link) -> None:
    """Phase switchover: from here until the target resumes, the guest runs
    nowhere. Never for a target that is already gone or silent. The guest
    stops, the final pass goes and the stream ends."""
    report, marks = run.report, link.marks
    link.watch.check()
    link.watch.phase = link.channel.phase = "switchover (source guest stopped)"
    link.stop_at = stop_at = time.monotonic()
    # Marked before the command: a 'stop' whose answer is lost (a QMP
    # timeout) may have stopped the guest, and a failure must resume it.
    _guard_paused_guest(run.guest)
    link.listener.switchover.set()
    run.stopped = True
    run.guest.vm.qmp("stop")
    marks["stop"] = time.monotonic() - stop_at
    if link.dirty_log is not None:
        final = _switchover_by_log(link.dirty_log, link.exporter, link.every_page, run.config.verify_all, report,
                                   marks, stop_at, run.guest.ram)
    else:
        assert link.tracker is not None
        final = _switchover_by_full_check(link.tracker, link.exporter, link.every_page, report)
        marks["check"] = time.monotonic() - stop_at
    _run_pass(run, link, final, False, report.log_pages, report.check_seconds)
    marks["final_pass"] = time.monotonic() - stop_at
    link.listener.stream_ending.set()
    link.exporter.finish()
    link.channel.stream().flush()
    run.stream_done = True


def _source_verdict(run: _SourceRun, link: _Link) -> None:
    """The target helpers' verification: the target's verdict, its commit
    proof accepted by every source helper and (--verify-ram) its RAM
    digest compared with this side's."""
    channel, listener, watch = link.channel, link.listener, link.watch
    watch.phase = channel.phase = "the target helpers' verification"
    _await_verdict(listener, watch, run.guest.size)
    watch.check()
    verdict = link.verdict = listener.verdict
    if verdict is None:
        raise MigrationError(f"the {channel.peer} sent no verdict: {listener.error}")
    if not verdict["ok"]:
        raise MigrationError(f"the {channel.peer} did not verify the stream: {verdict['reason']}")
    link.marks["target_verified"] = time.monotonic() - link.stop_at - link.digest_seconds
    # The target waits for the commit; until then it hears progress
    # every second (it gives a silent source up after 5 s), so a source
    # busy checking the commit proof, hashing or moving the device state
    # is not taken for a silent one.
    link.alive = run.stack.enter_context(_KeepAlive(channel, sum(p.stream_bytes for p in run.report.passes)))
    _verify_target_commit(link.exporter, listener, channel, run.config.helpers)
    link.marks["commit_proof_verified"] = time.monotonic() - link.stop_at - link.digest_seconds
    if run.config.verify_ram:
        _verify_ram(run, link)


def _verify_ram(run: _SourceRun, link: _Link) -> None:
    """After the verdict, not while the target verifies: on one machine
    the two would compete for the CPUs and slow the part that is downtime."""
    report, size = run.report, run.guest.size
    assert link.verdict is not None
    verify_start = time.monotonic()
    differing = _differing_parts(ram_digest(run.guest.ram, size), link.verdict["ram_digest"], size)
    report.ram_identical = not differing
    # Not downtime: the target's digest (before its verdict) and the source's.
    report.verify_seconds = link.digest_seconds + time.monotonic() - verify_start
    if differing:
        message = (f"target RAM differs from the source RAM at switchover in {len(differing)} of "
                   f"{DIGEST_PARTS} parts, first at {[hex(p) for p in differing[:8]]}")
        with suppress(OvmfMhError):
            link.channel.send("abort", reason=message)
        raise MigrationError(message)


def _source_device_state(run: _SourceRun, link: _Link) -> None:
    """The device state (QEMU's own migration, RAM left out) to the target."""
    config, report = run.config, run.report
    link.watch.phase = link.channel.phase = "the device-state move"
    device_state_host = config.network.address("target") if config.network else run.address[0]
    report.device_state_seconds = _migrate_device_state(run.guest.vm, device_state_host, link.device_state_port)
    link.marks["device_state"] = time.monotonic() - link.stop_at - report.verify_seconds
    link.watch.check()
    assert link.alive is not None
    link.alive.close()


def _source_commit(run: _SourceRun, link: _Link) -> None:
    """Phase commit: the point of no return. Once the target may resume
    the guest, the source must not (two running copies of one guest are
    worse than one lost one)."""
    channel = link.channel
    # A target that gave up meanwhile (its error is waiting unread) is
    # not sent a commit that would keep this guest stopped for nothing.
    _check_peer_quiet(channel)
    # Marked before the write: a write that fails may still have delivered it.
    channel.phase = "the target's resume"
    _release_paused_guest(run.guest)
    run.committed = True
    channel.send("commit")


def _source_resume(run: _SourceRun, link: _Link) -> None:
    """Phase resume: the target resumed the guest, then its first heartbeat
    there; the source QEMU is left as asked."""
    report, channel = run.report, link.channel
    channel.receive("resumed")
    run.resumed_target = True
    link.marks["cont"] = time.monotonic() - link.stop_at - report.verify_seconds
    report.switchover_ms = {k: round(1000 * v) for k, v in link.marks.items()}
    report.stopped_seconds = time.monotonic() - link.stop_at
    report.downtime_seconds = report.stopped_seconds - report.verify_seconds
    report.total_seconds = time.monotonic() - link.started - report.verify_seconds
    report.guest_state = "running on target"
    channel.phase = "the target's first heartbeat"
    # The target waits for the guest's first heartbeat before it says
    # so, saying 'progress' every second meanwhile.
    running = _await_running(channel)
    report.target_heartbeat = running["heartbeat"]
    report.outcome = "ok"
    report.source_qemu = _leave_source(run.guest, run.config.quit_source)


def _source_failed(run: _SourceRun, exc: OvmfMhError | OSError) -> None:
    """A failed run: the report says why (the first cause), the target
    hears it if it waits for a commit, and the guest goes on where it can."""
    report, channel, listener = run.report, run.channel, run.listener
    # The throttle ends first: the guest runs (or counts as stopped here).
    run.stopped = (run.control is not None and run.control.close()) or run.stopped
    # The target's reason beats the broken pipe it caused on this side.
    if listener is not None and listener.error is None and listener.alive():
        listener.join(timeout=1.0)
    cause = listener.error if listener is not None else None
    report.error = str(cause) if cause is not None and not isinstance(exc, (MigrationError, mp.PeerFailed)) \
        else str(exc)
    fault = run.watch.fault if run.watch is not None else None
    if fault is not None and fault is not exc:
        # The watch saw the first cause; what failed after it is its consequence.
        report.error = f"{fault} (then: {exc})"
    if channel is not None and run.stream_done and not run.committed and not isinstance(exc, mp.ProtocolError):
        # The target learns at once why it will not resume (mid-stream,
        # the cut connection says it: a message there would read as a
        # malformed frame).
        with suppress(OvmfMhError):
            channel.send("abort", reason=report.error[: mp.MAX_TEXT])
    if channel is not None:
        channel.abandon()
    report.guest_state = _guest_after_failure(run, exc) or report.guest_state


def _guest_after_failure(run: _SourceRun, exc: OvmfMhError | OSError) -> str | None:
    """Where the guest is after a failure, resumed here if this run stopped
    it and nothing was committed; None when that cannot be told."""
    source_guest, source = run.guest, run.guest.vm
    if run.resumed_target and isinstance(exc, mp.PeerGone):
        return ("unknown: the target resumed the guest ('resumed'), then the connection broke or "
                "went silent before its first heartbeat: the guest may run there")
    if run.resumed_target:
        return "lost: the target failed after it resumed the guest"
    if run.committed:
        return ("unknown: the target was told to resume and did not confirm; the source "
                + ("guest stays paused, in the user's QEMU" if source_guest.attached
                   else "guest stayed stopped and ends with the run"))
    if not source.is_running():
        return f"lost: {source.describe()}"
    if source.is_stopped() and source_guest.attached:
        # It answers no QMP command, and it is the user's: left as it is.
        return (f"stopped: the user's source QEMU pid {source.pid} is stopped (SIGSTOP or a "
                "debugger) and answers nothing; this command leaves it so")
    if source.is_stopped():
        # It answers no QMP command; the run's end kills it with the rest.
        return f"lost: source QEMU pid {source.pid} is stopped and ends with the run"
    return _resume_here(run)


def _resume_here(run: _SourceRun) -> str | None:
    """The source guest resumed (if this run stopped it) and seen to go on."""
    source_guest, source, report = run.guest, run.guest.vm, run.report
    with suppress(OvmfMhError):
        if run.stopped:
            source.qmp("cont")
            _release_paused_guest(source_guest)
        # Show that the guest really goes on: running, and beating
        # (the user's serial console is not this command's to read).
        serial_before = len(source.serial_text())
        status = source.qmp("query-status").get("status")
        if status == "running" and source_guest.attached:
            return "running on source"
        if status == "running":
            report.source_heartbeat_after_failure = _wait_for(source, guest.HEARTBEAT, 15, after=serial_before)
            return "running on source"
    return None
class _Beside:
    """Work run in a thread beside the caller's (the source helpers' start
    and the log's reset while the target prepares): :meth:`join` waits for
    it and raises what it raised; leaving the ``with`` block joins it first,
    so nothing it started is closed under it."""

    def __init__(self, *work: Callable[[], None] | None) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=([w for w in work if w is not None],),
                                        name="migrate-source-early", daemon=True)
        self._thread.start()

    def _run(self, work: list[Callable[[], None]]) -> None:
        try:
            for step in work:
                step()
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _Beside:
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join()


def _precopy_control(config: MigrationConfig, source: SourceGuest) -> PreCopyControl:
    """The switchover decision and the guest's throttle; while the throttle
    may hold the user's guest paused, the reaper guards it."""
    return PreCopyControl(config.convergence, source.vm, on_pause=lambda: _guard_paused_guest(source),
                          on_release=lambda: _release_paused_guest(source))


def _switch_now(control: PreCopyControl, passes: list[PassReport], dirty_log: DirtyLog | None,
                max_passes: int) -> bool:
    """After a pre-copy pass: stop pre-copy now? With the dirty log, the
    pass checked and sent what the log marked at its start, and the log's
    count now is the final pass's work; with the full check, the pass's
    own pages stand for the next pass's. Pass 1's pages in zero ranges were
    never written: they are not what the guest writes."""
    last, before = passes[-1], passes[-2]
    sent_before = before.pages - before.zero_range_pages
    if dirty_log is not None:
        numbers = PassNumbers(marked=last.logged, seconds=last.check_seconds + last.seconds, sent=last.pages,
                              sent_before=sent_before, dirty_now=dirty_log.dirty_count())
    else:
        numbers = PassNumbers(marked=last.pages, seconds=last.seconds, sent=last.pages, sent_before=sent_before,
                              dirty_now=last.pages)
    return control.after_pass(numbers, max_passes - len(passes))


def _verify_target_commit(exporter: Exporter, listener: _TargetListener, channel: mp.Channel, shards: int) -> None:
    """Before anything is committed: the target's commit proof, accepted by
    every source helper (docs/stream-format.md, "Commit proof"). A verdict,
    ``resumed`` or ``running`` is a plain message anyone on the path can
    write; only helpers holding the transport key that committed every shard
    of this stream can write the proof. Without it the source guest resumes
    here, with or without the RAM comparison."""
    if listener.proof is None:
        raise commit_proof.CommitProofError(
            f"the {channel.peer} sent its verdict without a commit proof: nothing shows that its helpers "
            "imported and committed this stream; not committing")
    blob = commit_proof.decode(listener.proof["commit_proof"], listener.proof["receipts"], shards, channel.peer)
    exporter.verify_commit(blob, channel.peer)


class _KeepAlive:
    """Sends ``progress`` to the target every PROGRESS_INTERVAL from its own
    thread until closed (between the verdict and the commit). A send that
    fails ends it; the commit then finds the connection gone."""

    def __init__(self, channel: mp.Channel, stream_bytes: int) -> None:
        self._channel = channel
        self._stream_bytes = stream_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate-keep-alive", daemon=True)
        self._thread.start()

    def __enter__(self) -> _KeepAlive:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL):
            try:
                self._channel.send("progress", stream_bytes=self._stream_bytes)
            except OvmfMhError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _wait_for_catch_up(channel: mp.Channel, watch: _Watch) -> tuple[float, int]:
    """Flush the stream and wait until the target reports having taken all
    of it, at most CATCH_UP_LIMIT; return the seconds waited and the bytes
    the target had not taken when the wait began (or still had not, when
    the limit ended it)."""
    channel.stream().flush()
    started = time.monotonic()
    backlog = channel.stream_bytes_sent - channel.peer_stream_bytes
    while channel.peer_stream_bytes < channel.stream_bytes_sent:
        watch.check()
        if time.monotonic() - started >= CATCH_UP_LIMIT:
            return time.monotonic() - started, channel.stream_bytes_sent - channel.peer_stream_bytes
        time.sleep(CATCH_UP_POLL)
    return time.monotonic() - started, backlog


#: The slowest rate the verdict's bound allows the target for stream it had
#: not taken when the stream ended (its backlog).
BACKLOG_RATE = 1024 * 1024


def _await_verdict(listener: _TargetListener, watch: _Watch, size: int) -> None:
    """Wait for the target's verdict, the guest stopped. The target says
    'progress' every second while it imports and hashes: SWITCHOVER_SILENCE
    without a message is a stopped target or a cut link, not the idle
    timeout's 15 s. And the whole wait follows the work left: the stream the
    target had not taken (at BACKLOG_RATE) and the hashing of its RAM."""
    channel = listener.channel
    began = time.monotonic()
    backlog = max(0, channel.stream_bytes_sent - max(channel.peer_stream_bytes, 0))
    bound = mp.hashing_bound(channel.idle_timeout, size) + backlog / BACKLOG_RATE
    while listener.alive() and watch.fault is None:
        listener.join(timeout=WATCH_INTERVAL)
        silent = time.monotonic() - channel.last_message_at
        if listener.alive() and silent >= mp.SWITCHOVER_SILENCE:
            raise mp.PeerGone(f"the peer {channel.peer} said nothing for {silent:.1f} s during {channel.phase} "
                              f"(it says 'progress' every second: at most {mp.SWITCHOVER_SILENCE:g} s)",
                              peer=channel.peer, phase=channel.phase)
        if listener.alive() and time.monotonic() - began >= bound:
            raise MigrationError(f"the {channel.peer} sent no verdict within {bound:.0f} s of the stream's end "
                                 f"(the bound for its backlog of {backlog} bytes and hashing {size >> 20} MiB)")


def _await_running(channel: mp.Channel) -> mp.Message:
    """After 'resumed': the target's 'running' (its guest's first
    heartbeat), with its 'progress' every second meanwhile. A silence of
    SWITCHOVER_SILENCE ends the wait (PeerGone: the guest's state is then
    unknown), and so does the whole wait's bound."""
    deadline = time.monotonic() + channel.idle_timeout + PREPARE_TIMEOUT
    while True:
        timeout = min(mp.SWITCHOVER_SILENCE, max(0.1, deadline - time.monotonic()))
        message = channel.receive("running", "progress", timeout=timeout)
        if message.type == "running":
            return message
        if time.monotonic() >= deadline:
            raise mp.PeerGone(f"the peer {channel.peer} did not report the guest's first heartbeat within "
                              f"{channel.idle_timeout + PREPARE_TIMEOUT:g} s of 'resumed'", peer=channel.peer,
                              phase=channel.phase)


def _check_peer_quiet(channel: mp.Channel) -> None:
    """Before the commit the target has nothing to say: anything readable
    now is its ``error`` or its end (raised as such)."""
    readable, _, _ = select.select([channel.sock], [], [], 0)
    if readable:
        channel.receive()  # raises: nothing is expected here


def _source_guest(config: MigrationConfig, stack: ExitStack, work: Path) -> SourceGuest:
    """The guest to migrate: the user's running QEMU, attached and checked
    (--qmp, --ram), or the test guest, booted here on a fresh RAM file."""
    if config.attach_qmp is not None and config.attach_ram is not None:
        vm = AttachedQemu(config.attach_qmp, work / "source", "source")
        found = attach(vm, config.attach_ram, config.image, config.helpers, config.disk)
        stack.callback(vm.close)
        stack.callback(restore, found)  # before the connection closes
        return found
    if config.guest == "debian":
        disk = _shared_disk(config)
        assert disk is not None
        return debian_guest.source_guest(config.image, stack, work, config.ram_dir, config.guest_mib, config.vcpus,
                                         disk, config.helpers, new_overlay=config.disk is None,
                                         network=config.network, nic=config.nic)
    size = config.guest_mib * MIB
    ram = ram_file(stack, work, config.ram_dir, "source", size)
    booted = stack.enter_context(QemuVM(guest_config(config.image, ram, size, incoming=False,
                                                     workload_mib=config.workload_mib, aba_pages=config.aba_pages),
                                            work / "source", "source"))
    description = GuestDescription(
        guest=GUEST_KINDS[0], machine=MACHINES[0], accel=ACCELERATORS[0], cpu=CPUS[0],
        memory_mib=config.guest_mib, workload_mib=config.workload_mib, shards=config.helpers,
        firmware_sha256=firmware_digest(config.image))
    return SourceGuest(booted, ram, size, description)


def _shared_disk(config: MigrationConfig) -> Path | None:
    """The Debian guest's disk both roles open (one machine: the same path)."""
    if config.attach_qmp is not None:
        return config.disk
    if config.guest != "debian":
        return None
    return (config.disk or config.work_dir / "disk.qcow2").absolute()


def _boot_timeout(source: SourceGuest) -> float:
    return debian_guest.BOOT_TIMEOUT if source.description.guest == DEBIAN_GUEST else 120.0


def _guard_paused_guest(source: SourceGuest) -> None:
    """Before 'stop': the reaper, which outlives this program, resumes the
    user's guest should the program end (a SIGKILL included) before it
    commits or resumes the guest itself (host_shim/vm/reaper.py). The test
    guest this command boots ends with it: nothing to guard."""
    if source.attached and isinstance(source.vm, AttachedQemu) and source.vm.pid is not None:
        reaper().guard_guest(source.vm.qmp_socket, source.vm.pid, source.ignore_shared_before)


def _release_paused_guest(source: SourceGuest) -> None:
    """The guest is no longer the reaper's to resume: about to commit (the
    target may run it from then on), or resumed here."""
    if source.attached and isinstance(source.vm, AttachedQemu):
        reaper().release_guest(source.vm.qmp_socket)


def _resume_after_signal(source: SourceGuest, stopped: bool, committed: bool) -> str:
    """On SIGINT/SIGTERM/SIGHUP: resume the user's guest if this command
    paused it and did not commit; the sentence the command ends with."""
    if not source.attached:
        return "the test guest it booted is stopped with it"
    if not stopped:
        return "the user's guest was never paused and runs on"
    if committed:
        return ("the user's guest stays paused: the migration was committed and the target may run it "
                "(its state is unknown)")
    vm = source.vm
    for attempt in range(2):
        try:
            if attempt and isinstance(vm, AttachedQemu):
                # The signal may have cut a QMP exchange short: a new connection.
                vm.close()
                vm.connect()
            _cancel_device_state_move(vm)
            vm.qmp("cont")
            status = vm.qmp("query-status").get("status")
        except OvmfMhError:
            continue
        if status == "running":
            _release_paused_guest(source)
            return f"the user's guest (QEMU pid {vm.pid}), paused for the switchover, was resumed and runs"
    return (f"the user's guest (QEMU pid {vm.pid}) was paused for the switchover and did not answer 'cont'; "
            "the reaper resumes it as this command exits")


def _cancel_device_state_move(vm: QemuHandle) -> None:
    """A device-state move still in flight is cancelled (QEMU refuses 'cont'
    meanwhile); at most 3 s."""
    if vm.qmp("query-migrate").get("status") not in MIGRATING:
        return
    vm.qmp("migrate_cancel")
    deadline = time.monotonic() + 3.0
    while vm.qmp("query-migrate").get("status") in MIGRATING and time.monotonic() < deadline:
        time.sleep(0.02)


def _leave_source(source: SourceGuest, quit_source: bool) -> str:
    """After a migration: the demo's QEMU stops with the run; the user's is
    left paused (QEMU's 'postmigrate': resuming it would run a second copy
    of the guest), or quit over QMP when the user asked for it."""
    if not source.attached:
        return "stopped by this command, which started it"
    if quit_source and isinstance(source.vm, AttachedQemu):
        if source.vm.quit():
            return f"pid {source.vm.pid} quit over QMP on request (--quit-source)"
        return f"pid {source.vm.pid} was asked to quit over QMP (--quit-source) and still runs; it is left so"
    return (f"pid {source.vm.pid} left paused (postmigrate) for the user: do not resume it, the guest runs "
            "on the target; 'quit' it over QMP, or 'ovmf-mh guest stop' for a guest 'ovmf-mh guest start' "
            "started")


def _take(tracker: DirtyTracker | None) -> PageNumbers:
    assert tracker is not None
    return tracker.take_dirty()


def _written_pages(ram: Path, every_page: PageNumbers) -> PageNumbers:
    """Of every page, those the RAM file holds data for. A page in a hole
    was never written since the file was made (nothing here punches holes),
    so it is zero, and what its helper sealed was zero: a check of every
    page need not read it. That keeps the log's reset, and a switchover
    whose log is in doubt, in proportion to the memory the guest wrote, not
    to its size (a 16 GiB guest's every-page check outlasted the flusher's
    30 s, so each reset left the log in doubt again). Asked after the
    reset's fsync: a page written later is in the log. The host's word, as
    the log is (docs/migration.md, "What the helpers verify")."""
    return every_page[~hole_pages(ram, PAGE)]


def _switchover_by_log(dirty_log: DirtyLog, exporter: Exporter, every_page: PageNumbers, verify_all: bool,
                       report: MigrationReport, marks: dict[str, float], stop_at: float,
                       ram: Path) -> PageNumbers:
    """The pages to send with the guest stopped. The kernel's log marks every
    page written since its last pass (a write of the same bytes included);
    of those, each source helper names the ones whose content is not what
    it last sealed (CHECK_PAGES over the logged pages only: a page changed
    and changed back while its helper read it differs from the sealed
    bytes; a page in a dirty large folio that nobody wrote does not). A
    page the log does not mark was not written since its helper read it.
    A full CHECK_PAGES runs instead when asked (``--verify-all``: it also
    counts what the log missed), or when the kernel may have written back
    pages on its own."""
    start = time.monotonic()
    logged = dirty_log.dirty_pages()
    report.log_read_seconds = time.monotonic() - start
    report.log_pages = len(logged)
    marks["log_read"] = time.monotonic() - stop_at
    doubt = dirty_log.switchover_doubt()
    report.log_trace = dirty_log.describe_trace()
    full = verify_all or doubt is not None
    check_start = time.monotonic()
    # --verify-all checks every page (it counts what the log missed); a log
    # in doubt, every page that holds data and whatever the log marks.
    if verify_all:
        checked = every_page
    elif full:
        checked = np.union1d(_written_pages(ram, every_page), logged).astype(np.uint64)
    else:
        checked = logged
    changed = exporter.changed_since_sent(checked)
    report.check_seconds = time.monotonic() - check_start
    report.check_pages_changed = len(changed)
    marks["check"] = time.monotonic() - stop_at
    if not full:
        report.switchover_check = "dirty-log"
        return changed
    report.switchover_check = "dirty-log + full CHECK_PAGES"
    report.switchover_reason = "--verify-all" if verify_all else f"log in doubt: {doubt}"
    report.log_missed_pages = len(np.setdiff1d(changed, logged))
    return changed


def _switchover_by_full_check(tracker: DirtyTracker, exporter: Exporter, every_page: PageNumbers,
                              report: MigrationReport) -> PageNumbers:
    """Pages the host sees changed since their last send, plus every other
    page whose source helper says its content is not what it sealed: a page
    can change and change back while a helper reads it, which no comparison
    on the host can see (CHECK_PAGES, docs/migration.md). Both run at once:
    numpy's comparison releases the GIL while the helpers hash."""
    report.switchover_check = "full-check"
    host_dirty: list[PageNumbers] = []
    comparer = threading.Thread(target=lambda: host_dirty.append(tracker.take_dirty()), daemon=True)
    check_start = time.monotonic()
    comparer.start()
    changed = exporter.changed_since_sent(every_page)
    comparer.join()
    report.check_seconds = time.monotonic() - check_start
    report.check_pages_changed = len(changed)
    return np.unique(np.concatenate([changed, *host_dirty]))


def _differing_parts(source: list[str], target: list[Any], size: int) -> list[int]:
    """Offsets of the RAM digest parts that differ (all, if the target's
    list is not a list of DIGEST_PARTS strings)."""
    part = size // DIGEST_PARTS
    if len(target) != DIGEST_PARTS:
        return [i * part for i in range(DIGEST_PARTS)]
    return [i * part for i, (a, b) in enumerate(zip(source, target, strict=True)) if a != b]


def _skip_shared_ram(source: QemuHandle) -> None:
    """QEMU's own migration is to skip the guest RAM (x-ignore-shared).
    Set before 'stop', not in the downtime (a QMP round trip, 2 to 15 ms
    measured); an attached guest gets its setting back at the end
    (attach.restore), and the test guest's QEMU ends with the run."""
    source.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


#: How often the device-state move's end is looked for (one QMP round trip each).
DEVICE_STATE_POLL = 0.001


def _migrate_device_state(source: QemuHandle, host: str, port: int) -> float:
    """QEMU's own migration, guest RAM skipped (x-ignore-shared, set by
    _skip_shared_ram before 'stop'): only device state and the small
    ROM/flash blocks go, to the port the target named in its answer."""
    started = time.monotonic()
    bracketed = f"[{host}]" if ":" in host else host
    source.qmp("migrate", uri=f"tcp:{bracketed}:{port}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = source.qmp("query-migrate").get("status")
        if status == "completed":
            return time.monotonic() - started
        if status in ("failed", "cancelled"):
            raise source.error(f"QEMU device-state migration to {host}:{port} {status}")
        time.sleep(DEVICE_STATE_POLL)
    raise source.error("QEMU device-state migration did not complete within 60 s")


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
        rams = {role: ram_file(stack, work, ram_dir, role, size) for role in ("source", "target")}
        source = stack.enter_context(QemuVM(
            guest_config(image, rams["source"], size, incoming=False, workload_mib=workload_mib),
            work / "source", "plain-source"))
        _wait_for(source, guest.HEARTBEAT, 120)
        target = stack.enter_context(QemuVM(
            guest_config(image, rams["target"], size, incoming=True, workload_mib=workload_mib),
            work / "target", "plain-target"))
        channel = stack.enter_context(_temp_folder("ovmf-mh-mig-")) / "migration.sock"
        return qemu_migration(source, target, f"unix:{channel}", work)


def qemu_migration(source: QemuHandle, target: QemuHandle, uri: str, work: Path,
                   after_cont: Callable[[QemuHandle], None] | None = None) -> dict[str, Any]:
    """QEMU's own migration from a running source to a target QEMU started
    with '-incoming defer' and '-S', over ``uri``; 'cont' on the target
    (then ``after_cont``, e.g. its NIC's announcement), its next heartbeat
    and no kernel fault. Times from QEMU's stats."""
    target.qmp("migrate-incoming", uri=uri)
    source.qmp("migrate", uri=uri)
    deadline = time.monotonic() + 300
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = source.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.01)
    if info.get("status") != "completed":
        raise MigrationError(f"plain QEMU migration ended as {info.get('status')}")
    completed_at = time.monotonic()
    # QEMU sets 'completed' a moment before it records the run's total
    # time and downtime: until then query-migrate answers 0 for both.
    settle = time.monotonic() + 5
    while not info.get("total-time") and time.monotonic() < settle:
        time.sleep(0.02)
        info = source.qmp("query-migrate")
    if not info.get("total-time"):
        raise MigrationError("plain QEMU migration completed but QEMU reported no total time "
                             f"(see {work / 'source'})")
    while target.qmp("query-status").get("status") == "inmigrate":
        time.sleep(0.005)
    serial_before = len(target.serial_text())
    target.qmp("cont")
    # QEMU's downtime ends when the source sent its last byte; the guest
    # runs again once the target loaded it and 'cont' returned.
    cont_after = time.monotonic() - completed_at
    if after_cont is not None:
        after_cont(target)
    heartbeat = _wait_for(target, guest.HEARTBEAT, 30, after=serial_before)
    _check_plain_target(target, serial_before, work)
    return {
        "total_seconds": info["total-time"] / 1000,
        "downtime_seconds": info.get("downtime", 0) / 1000,
        "cont_after_completed_seconds": cont_after,
        "transferred_bytes": info.get("ram", {}).get("transferred", 0),
        "target_heartbeat": heartbeat,
    }


#: Lines a guest kernel prints when it faults, panics or starts again
#: (panic=-1 reboots at once, and the rebooted guest beats too).
KERNEL_FAULTS = ("BUG:", "kernel BUG at", "Oops:", "Kernel panic", "general protection fault", "Linux version",
                 "CORRUPTION")


def _check_plain_target(target: QemuHandle, serial_before: int, work: Path) -> None:
    """The plain baseline's target must go on as the guest that was
    migrated: its console since 'cont', until its next heartbeat after the
    first, holds no kernel fault and no new boot (docs/migration.md,
    "Plain QEMU's baseline")."""
    with suppress(OvmfMhError):
        _wait_for(target, guest.HEARTBEAT, 10, after=len(target.serial_text()))
    text = target.serial_text()[serial_before:]
    faults = [line.strip() for line in text.splitlines() if any(mark in line for mark in KERNEL_FAULTS)]
    if faults:
        raise MigrationError(f"plain QEMU migration: the target's guest kernel failed after 'cont': {faults[0]!r} "
                             f"(see {work / 'target'})")
