"""Host side of the helper mailbox (docs/mailbox.md).

The mailbox lives in the helper VM's own RAM, which is a shared memory file
the host maps. The host writes Command and Arg[] and then CommandSeq; the
helper answers with Status and Result[] and then ResponseSeq. x86 keeps
stores in order and loads in order, and every access here is a single
struct pack/unpack on the mapping. Offsets come from the C header through
helper.abi.

Helpers with HALT_WAKE (ABI 4.1) halt when idle and publish the idle word
first. After posting CommandSeq the host reads that word and, when it is
set, calls ``wake`` (a firmware helper: QMP inject-nmi; the reference
helper process: SIGUSR1). A wake may return a Future (the firmware helper's
inject-nmi runs on a thread of its own): the host then polls for the answer
at once instead of waiting for QMP's reply, which usually comes after the
helper has answered, and a wake that failed is reported by the next look at
its Future. x86 may let that load pass the CommandSeq store
(the one reordering it allows, and Python has no fence), so while waiting
the host keeps reading the idle word and wakes the helper again, at most
every REWAKE_SECONDS, as long as it is idle and has not answered: a command
is never lost, only delayed (docs/mailbox.md, "Idle and wake").
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helper import abi
from host_shim.errors import HelperTimeout, MailboxError, QemuError
from host_shim.vm.reaper import process_state

#: Seconds a helper may take to answer one command before the host gives up
#: on it (docs/mailbox.md; --mailbox-timeout). A full batch takes tens of
#: milliseconds under TCG, so this only trips on a helper that stalled.
DEFAULT_TIMEOUT = 10.0
#: Seconds between two wake-ups of a helper that stays idle without answering.
REWAKE_SECONDS = 0.01
#: Seconds after a wake during which the host polls for the answer with the
#: shortest nap (WOKEN_NAP_SECONDS): a woken helper answers within a
#: millisecond or two; a batch that takes longer is polled as usual.
WOKEN_POLL_SECONDS = 0.005
#: The nap between two looks right after a wake. Not zero: the thread that
#: sends the wake (inject-nmi over QMP) needs the GIL meanwhile.
WOKEN_NAP_SECONDS = 0.00002


@dataclass(frozen=True)
class Response:
    command: str
    status: int
    results: tuple[int, ...]
    seconds: float


def status_name(status: int) -> str:
    return abi.load().names_with_prefix("OVMF_MH_STATUS_").get(status, "UNKNOWN")


def state_name(state: int) -> str:
    return abi.load().names_with_prefix("OVMF_MH_STATE_").get(state, "UNKNOWN")


def command_code(name: str) -> int:
    return abi.load().const(f"OVMF_MH_CMD_{name.upper()}")


class Mailbox:
    """Client for one helper's mailbox in a host mapping of its RAM."""

    def __init__(
        self,
        memory: Any,
        base: int,
        size: int,
        *,
        is_alive: Callable[[], bool] = lambda: True,
        debugcon: Path | None = None,
        label: str = "helper",
        wake: Callable[[], Future[object] | None] | None = None,
    ) -> None:
        a = abi.load()
        self._layout = a.layout("OVMF_MH_MAILBOX_HEADER")
        if size < self._layout.size:
            raise ValueError("mailbox smaller than its header")
        if base < 0 or base + size > len(memory):
            raise ValueError(f"mailbox {base:#x}+{size:#x} lies outside the mapping")
        self._whole = memoryview(memory)
        self._view = self._whole[base : base + size]
        self._words = self._view[: self._layout.size].cast("I")
        self.size = size
        self._is_alive = is_alive
        #: Wakes a halted helper (HALT_WAKE); None: the helper never halts. It
        #: returns None when the wake is done (a signal), or the Future of a
        #: wake still in flight (QMP inject-nmi on a thread of its own).
        self.wake = wake
        #: Wake-ups sent so far (benches and tests read it).
        self.wakes = 0
        #: Wakes still in flight (their QMP reply not read yet), oldest first.
        self._wakes_in_flight: list[Future[object]] = []
        self.debugcon = debugcon
        #: Names the helper in errors: which one, what kind, which pid.
        self.label = label
        self.pid: int | None = None
        #: True while a command is posted and not answered.
        self.busy = False
        self._seq = 0
        self._off = {f.name: f.offset for f in self._layout.fields}
        #: The shortest time each (command, Arg[1]) took so far. Arg[1] is the
        #: amount of work of every batch command (pages or bytes), so a full
        #: batch is compared with full batches only.
        self._fastest: dict[tuple[int, int], float] = {}

    def release(self) -> None:
        """Drop the views of the mapping so that it can be closed."""
        self._words.release()
        self._view.release()
        self._whole.release()

    def header(self) -> dict[str, Any]:
        return self._layout.unpack(self._view[: self._layout.size])

    def _u32(self, field: str) -> int:
        value: int = self._words[self._off[field] // 4]
        return value

    def _store_u32(self, field: str, value: int) -> None:
        # One aligned 32-bit store: struct.pack_into writes byte by byte, and
        # the helper polls these words concurrently.
        self._words[self._off[field] // 4] = value

    def wait_published(self, timeout: float) -> dict[str, Any]:
        """Wait until the helper publishes any state (READY, HALTED, FAULT...)."""
        a = abi.load()
        signature = a.const("OVMF_MH_MAILBOX_SIGNATURE")
        deadline = time.monotonic() + timeout
        while True:
            header = self.header()
            if header["Signature"] == signature and header["State"] != a.const("OVMF_MH_STATE_NONE"):
                return header
            if not self._is_alive():
                raise MailboxError(f"{self.label} exited before publishing its mailbox", log=self.debugcon)
            if time.monotonic() > deadline:
                raise HelperTimeout(
                    f"{self.label} did not publish its mailbox within {timeout:.1f} s{self._state()}",
                    log=self.debugcon,
                )
            time.sleep(0.002)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        a = abi.load()
        header = self.wait_published(timeout)
        if header["State"] != a.const("OVMF_MH_STATE_READY"):
            reason = header["HaltReason"]
            raise MailboxError(
                f"helper is {state_name(header['State'])}, not READY",
                status=reason,
                status_name=status_name(reason),
                log=self.debugcon,
            )
        if header["AbiMajor"] != a.const("OVMF_MH_ABI_MAJOR"):
            raise MailboxError(
                f"helper speaks ABI {header['AbiMajor']}.{header['AbiMinor']}, this host "
                f"{a.const('OVMF_MH_ABI_MAJOR')}.{a.const('OVMF_MH_ABI_MINOR')}",
                log=self.debugcon,
            )
        self._seq = self._u32("ResponseSeq")
        return header

    def call(self, command: str, args: tuple[int, ...] = (), timeout: float = DEFAULT_TIMEOUT) -> Response:
        """Post one command and wait for its response; raise MailboxError on a
        non-success status, HelperTimeout when the helper does not answer."""
        response = self.post_and_wait(command, args, timeout)
        if response.status != abi.load().const("OVMF_MH_STATUS_SUCCESS"):
            raise MailboxError(
                f"{self.label} refused the command",
                command=command,
                status=response.status,
                status_name=status_name(response.status),
                log=self.debugcon,
            )
        return response

    def _wake_if_idle(self, command: str, idle_index: int, now: float, last_wake: float) -> float:
        """Wake the helper when it published the idle word and the last wake
        is REWAKE_SECONDS old; return the time of the last wake."""
        self._collect_wakes(command)
        if self.wake is None or not self._words[idle_index] or now - last_wake < REWAKE_SECONDS:
            return last_wake
        if self._state():
            # Stopped (SIGSTOP): it can take no wake-up; the timeout names it.
            return last_wake
        try:
            pending = self.wake()
        except (OSError, QemuError) as exc:
            raise self._wake_failed(command, exc) from exc
        if pending is not None:
            self._wakes_in_flight.append(pending)
        self.wakes += 1
        return now

    def _collect_wakes(self, command: str) -> None:
        """Read the outcome of the wakes in flight that are done: a wake that
        failed (QMP error, QEMU gone) raises MailboxError, naming the command
        being posted or waited for now; one still in flight stays."""
        while self._wakes_in_flight and self._wakes_in_flight[0].done():
            done = self._wakes_in_flight.pop(0)
            exc = None if done.cancelled() else done.exception()
            if exc is not None:
                raise self._wake_failed(command, exc) from exc

    def _wake_failed(self, command: str, exc: BaseException) -> MailboxError:
        if not self._is_alive():
            return MailboxError(f"{self.label} exited while serving", command=command, log=self.debugcon)
        return MailboxError(f"{self.label}: waking the halted helper failed: {exc}", command=command,
                            log=self.debugcon)

    def _fault(self, command: str) -> MailboxError:
        """The helper took a CPU exception: it wiped its keys, published FAULT
        with the vector and the faulting RIP, and halted (docs/mailbox.md)."""
        header = self.header()
        return MailboxError(
            f"{self.label} took a CPU exception (vector {header['HaltReason']}, RIP {header['FaultAddress']:#x}) "
            "while serving, wiped its keys and halted; this is a helper defect, its log has the details",
            command=command, log=self.debugcon)

    def _state(self) -> str:
        state = process_state(self.pid) if self.pid is not None else None
        return f" (pid {self.pid} is stopped, e.g. by SIGSTOP)" if state in ("T", "t") else ""

    def shutdown_if_idle(self, timeout: float) -> bool:
        """Ask the helper to wipe its keys and end (SHUTDOWN), unless a
        command is still in flight or the helper is stopped. True when the
        helper accepted it (and so ends by itself)."""
        if self.busy or not self._is_alive() or self._state():
            return False
        with suppress(MailboxError):
            return self.post_and_wait("SHUTDOWN", timeout=timeout).status == 0
        return False

    def post_and_wait(
        self, command: str | int, args: tuple[int, ...] = (), timeout: float = DEFAULT_TIMEOUT
    ) -> Response:
        """Post a command (name or raw code) and return whatever status it got."""
        self.busy = True
        try:
            response = self._post_and_wait(command, args, timeout)
        finally:
            self.busy = False
        return response

    def _post_and_wait(self, command: str | int, args: tuple[int, ...], timeout: float) -> Response:
        a = abi.load()
        count = a.const("OVMF_MH_ARG_COUNT")
        if len(args) > count:
            raise ValueError(f"at most {count} arguments")
        code = command if isinstance(command, int) else command_code(command)
        command = command if isinstance(command, str) else f"{code:#x}"
        # A wake of an earlier command that failed is reported before
        # anything is posted.
        self._collect_wakes(command)
        padded = tuple(a & 0xFFFFFFFFFFFFFFFF for a in args) + (0,) * (count - len(args))
        struct.pack_into(f"<I{count}Q", self._view, self._off["Command"], code, *padded)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        start = time.monotonic()
        self._store_u32("CommandSeq", self._seq)
        idle_index = self._off["Idle"] // 4
        last_wake = self._wake_if_idle(command, idle_index, start, -REWAKE_SECONDS)
        deadline = start + timeout
        spins = 0
        response_index = self._off["ResponseSeq"] // 4
        # A full batch under TCG takes tens of milliseconds: first sleep most
        # of the fastest such batch so far in one go, instead of dozens of
        # wake-ups that take CPU (and the GIL) from the helpers and the other
        # threads. The fastest, so a batch that is quicker than usual (zero
        # pages) is rarely overslept.
        work = (code, padded[1])
        head_start = 0.8 * self._fastest.get(work, 0.0)
        if head_start > 0.0005:
            time.sleep(min(head_start, timeout))
        while self._words[response_index] != self._seq:
            spins += 1
            if spins > 200:
                if not self._is_alive():
                    raise MailboxError(f"{self.label} exited while serving", command=command, log=self.debugcon)
                if self._u32("State") == a.const("OVMF_MH_STATE_FAULT"):
                    raise self._fault(command)
                if time.monotonic() > deadline:
                    raise HelperTimeout(
                        f"{self.label} gave no response within the mailbox timeout of {timeout:.1f} s"
                        f"{self._state()}; if the machine is merely slow, raise --mailbox-timeout",
                        command=command, log=self.debugcon,
                    )
                now = time.monotonic()
                last_wake = self._wake_if_idle(command, idle_index, now, last_wake)
                # Sleeping releases the GIL for other helpers' threads; the
                # nap grows with the wait (at most 2% of it, 0.5 ms), so long
                # batches cost few wake-ups and short commands stay quick.
                # Right after a wake the answer is near: shortest naps.
                if now - last_wake < WOKEN_POLL_SECONDS:
                    time.sleep(WOKEN_NAP_SECONDS)
                else:
                    time.sleep(min(0.0005, max(0.00005, (now - start) / 50)))
        seconds = time.monotonic() - start
        if last_wake < start:
            # Only commands the helper took while polling set the head start:
            # a wake-up's QMP round trip is not work, and sleeping it away
            # before the first look would make every later wake slower.
            self._fastest[work] = min(seconds, self._fastest.get(work, seconds))
        n = a.const("OVMF_MH_RESULT_COUNT")
        status, *results = struct.unpack_from(f"<I{n}Q", self._view, self._off["Status"])
        return Response(command, status, tuple(results), seconds)
