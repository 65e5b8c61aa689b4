"""The reference helper as a process of its own, serving the mailbox in a
shared memory file the way the firmware serves it in its VM's RAM.

    python -m helper.serve --memory OWN.ram --guest-ram GUEST.ram [--target]

OWN.ram is laid out like a helper VM's RAM (HelperAbi.h): the emulated
launch secret at OVMF_MH_SECRET_PAGE_BASE, read and wiped at start, and the
mailbox at --mailbox-base for --mailbox-size bytes. The host drives it with
the same mailbox client as a firmware helper (host_shim/helpers/mailbox.py), and
because it is a separate process it encrypts while the host writes the
previous batch: the GIL would serialise the two in one process (pyca's AEAD
calls hold it).

The guest RAM file is mapped writable only with --target; a source maps it
copy-on-write, so nothing the helper does can reach the file.

Idle and wake (HALT_WAKE, docs/mailbox.md): after SPIN_SECONDS without a
command the process sets the idle word, looks at CommandSeq once more and
then blocks in sigtimedwait() on SIGUSR1, which it keeps blocked: a wake-up
the host sends between the idle word and the wait stays pending, so it is
never lost, the POSIX form of the firmware's NMI and HLT window.

Exit codes: 0 after SHUTDOWN, 2 for bad arguments, 3 when the host process
went away without SHUTDOWN (the helper does not outlive its host).
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from helper import abi
from helper.reference import ReferenceHelper

_A = abi.load()
_HEADER = _A.layout("OVMF_MH_MAILBOX_HEADER")
_OFF = {f.name: f.offset for f in _HEADER.fields}
_ARGS = struct.Struct(f"<I{_A.const('OVMF_MH_ARG_COUNT')}Q")  # Command, Arg[]
_RESPONSE = struct.Struct(f"<I{_A.const('OVMF_MH_RESULT_COUNT')}Q")  # Status, Result[]
if _OFF["Command"] != _OFF["CommandSeq"] + 4 or _OFF["Status"] != _OFF["ResponseSeq"] + 4:
    raise ImportError("helper.serve expects Command after CommandSeq and Status after ResponseSeq")
#: Build id the reference helper publishes: "ovmf-mh-ref-py" padded, never a firmware build id.
REFERENCE_BUILD_ID = b"ovmf-mh-ref-py\0\0"
#: Seconds of busy polling after a response before the helper blocks, the
#: firmware's default: a host that keeps the helper busy posts its next batch
#: within this time.
SPIN_SECONDS = _A.const("OVMF_MH_IDLE_DEFAULT_SPIN_US") / 1e6
#: The host's wake-up (Mailbox.wake): blocked, and taken only by sigtimedwait.
WAKE_SIGNAL = signal.SIGUSR1
#: Seconds one wait for the wake-up lasts before the helper checks that its host lives.
HOST_CHECK_SECONDS = 1.0


class MailboxServer:
    """Publish READY and serve commands until SHUTDOWN."""

    def __init__(self, memory: mmap.mmap, mailbox_base: int, mailbox_size: int, window: mmap.mmap) -> None:
        header_size = _A.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        if mailbox_size <= header_size or mailbox_base + mailbox_size > len(memory):
            raise ValueError(f"mailbox {mailbox_base:#x}+{mailbox_size:#x} does not fit the memory file")
        secret_base = _A.const("OVMF_MH_SECRET_PAGE_BASE")
        self._memory = memoryview(memory)
        self._view = self._memory[mailbox_base : mailbox_base + mailbox_size]
        self._words = self._view[:header_size].cast("I")
        secret = self._memory[secret_base : secret_base + _A.const("OVMF_MH_PAGE_SIZE")]
        self.helper = ReferenceHelper(window, self._view[header_size:], secret)
        self.helper.platform_capabilities = _A.const("OVMF_MH_CAP_HALT_WAKE")
        secret.release()
        self._served = 0
        self._failed = 0
        self._ready_seq: int = 0

    def release(self) -> None:
        self.helper.window.release()
        self.helper.data.release()
        self._words.release()
        self._view.release()
        self._memory.release()

    def _store_u32(self, field: str, value: int) -> None:
        # One aligned 32-bit store, as the firmware writes these words.
        self._words[_OFF[field] // 4] = value

    def publish_ready(self) -> None:
        identity = _HEADER.pack(
            Signature=_A.const("OVMF_MH_MAILBOX_SIGNATURE"),
            AbiMajor=_A.const("OVMF_MH_ABI_MAJOR"),
            AbiMinor=_A.const("OVMF_MH_ABI_MINOR"),
            HeaderSize=_A.const("OVMF_MH_MAILBOX_HEADER_SIZE"),
            Capabilities=self.helper.capabilities,
            BuildId=REFERENCE_BUILD_ID,
            DataOffset=_A.const("OVMF_MH_MAILBOX_HEADER_SIZE"),
            DataSize=len(self.helper.data),
            GuestWindowSize=len(self.helper.window),
            MaxBatchPages=_A.const("OVMF_MH_MAX_BATCH_PAGES"),
            SessionState=self.helper.session_state,
        )
        # The host may post its first command as soon as it sees READY: the
        # sequence number to serve after is taken before, never after (a
        # command posted between READY and the first read would be lost).
        self._ready_seq = self._words[_OFF["CommandSeq"] // 4]
        # Everything but State first, State last: the host waits on it.
        state = _OFF["State"]
        self._view[:state] = identity[:state]
        self._view[state + 4 : _OFF["CommandSeq"]] = identity[state + 4 : _OFF["CommandSeq"]]
        self._store_u32("State", _A.const("OVMF_MH_STATE_READY"))

    def serve_one(self, last: int) -> int:
        """Serve the posted command if CommandSeq moved past ``last``; return
        the sequence number now answered."""
        seq: int = self._words[_OFF["CommandSeq"] // 4]
        if seq == last:
            return last
        command, *args = _ARGS.unpack_from(self._view, _OFF["Command"])  # snapshot, then dispatch
        status, results = self.helper.dispatch(command, args)
        if status == _A.const("OVMF_MH_STATUS_SUCCESS"):
            self._served += 1
        else:
            self._failed += 1
        struct.pack_into("<QQ", self._view, _OFF["CommandsServed"], self._served, self._failed)
        _RESPONSE.pack_into(self._view, _OFF["Status"], status, *results)
        self._store_u32("SessionState", self.helper.session_state)
        if self.helper.shutdown_requested:
            self._store_u32("State", _A.const("OVMF_MH_STATE_SHUTDOWN"))
        self._store_u32("ResponseSeq", seq)
        return seq

    def wait_for_wake(self, last: int) -> bool:
        """Publish the idle word, look at CommandSeq once more, then wait for
        the host's wake-up (at most HOST_CHECK_SECONDS). WAKE_SIGNAL must be
        blocked in this thread. False when the wait timed out."""
        self._store_u32("Idle", _A.const("OVMF_MH_IDLE_HALTING"))
        try:
            if self._words[_OFF["CommandSeq"] // 4] != last:
                return True
            return signal.sigtimedwait({WAKE_SIGNAL}, HOST_CHECK_SECONDS) is not None
        finally:
            self._store_u32("Idle", _A.const("OVMF_MH_IDLE_BUSY"))

    def run(self, host_alive: Callable[[], bool] = lambda: True) -> int:
        """The serve loop: spin briefly after each response, then block until
        the host wakes the helper. WAKE_SIGNAL must be blocked in this thread."""
        last = self._ready_seq
        idle_since = time.perf_counter()
        while True:
            answered = self.serve_one(last)
            if answered != last:
                last = answered
                if self.helper.shutdown_requested:
                    return 0
                idle_since = time.perf_counter()
                continue
            if time.perf_counter() - idle_since > SPIN_SECONDS:
                if not self.wait_for_wake(last) and not host_alive():
                    return 3
                idle_since = time.perf_counter()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m helper.serve",
        description="Run the reference migration helper as a process serving the mailbox in a shared "
        "memory file (laid out like a helper VM's RAM) over one guest RAM file.",
    )
    parser.add_argument("--memory", type=Path, required=True,
                        help="the helper's own memory file: launch secret and mailbox")
    parser.add_argument("--mailbox-base", type=lambda v: int(v, 0), default=_A.const("OVMF_MH_MAILBOX_MIN_BASE"),
                        help="offset of the mailbox in --memory (default %(default)#x)")
    parser.add_argument("--mailbox-size", type=lambda v: int(v, 0), default=16 * 1024 * 1024,
                        help="bytes of mailbox, header included (default %(default)#x)")
    parser.add_argument("--guest-ram", type=Path, required=True, help="the guest RAM file the helper serves")
    parser.add_argument("--target", action="store_true",
                        help="map the guest RAM writable (import); without it, copy-on-write (export)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = _parse(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE_SIGNAL})
    with options.memory.open("r+b") as own, options.guest_ram.open("r+b" if options.target else "rb") as guest:
        memory = mmap.mmap(own.fileno(), 0)
        access = mmap.ACCESS_WRITE if options.target else mmap.ACCESS_COPY
        window = mmap.mmap(guest.fileno(), 0, access=access)
        server = MailboxServer(memory, options.mailbox_base, options.mailbox_size, window)
        print(f"reference helper pid {os.getpid()}: READY, window {len(window)} bytes, "
              f"{'target' if options.target else 'source'}", file=sys.stderr, flush=True)
        server.publish_ready()
        code = server.run(lambda: os.getppid() == parent)
        reason = "SHUTDOWN" if code == 0 else "host process gone"
        print(f"reference helper pid {os.getpid()}: exit {code} ({reason})", file=sys.stderr, flush=True)
        server.release()
        window.close()
        memory.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
