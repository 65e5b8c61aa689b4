"""A QMP connection that writes everything it says and hears to a log.

Both kinds of QEMU the host shim talks to, the ones it starts
(:class:`~host_shim.vm.qemu.QemuVM`) and the user's running one it attaches
to (:class:`~host_shim.vm.attached.AttachedQemu`), keep a ``qmp.log`` in
their work folder with one line per command, answer, error and event,
stamped with seconds since the log's epoch. When a migration fails, that
file is what tells which command was in flight.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from host_shim.errors import QemuError


def client_with_own_loop(address: str) -> tuple[QEMUMonitorProtocol, asyncio.AbstractEventLoop]:
    """A legacy QMP client on an event loop of its own. The legacy client
    runs every command on the loop that was current when it was made; made
    in one thread, all clients would share that thread's loop, and two of
    them used at once from two threads (helpers woken by their mailbox
    threads) fail with "This event loop is already running"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            previous: asyncio.AbstractEventLoop | None = asyncio.get_event_loop()
        except RuntimeError:
            previous = None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        client = QEMUMonitorProtocol(address)
    except BaseException:
        loop.close()
        raise
    finally:
        asyncio.set_event_loop(previous)
    return client, loop


class LoggedQmp:
    """The log opens at once (so it exists for a QEMU that never answers);
    the connection is given to it once negotiated (:meth:`connect`)."""

    def __init__(self, log_path: Path, epoch: float | None = None, *, append: bool = False) -> None:
        """``append``: keep what earlier connections logged (a QEMU that
        outlives this connection, whose earlier sessions' lines tell what
        was done to it), and mark where this connection's lines begin."""
        self.log_path = log_path
        self.epoch = time.monotonic() if epoch is None else epoch
        self.connection: QEMUMonitorProtocol | None = None
        self._log: IO[str] | None = log_path.open("a" if append else "w")
        if append:
            opened = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._log.write(f"--- connection opened {opened}; stamps below count from here\n")
            self._log.flush()
        # A helper's mailbox thread wakes it (inject-nmi) while another
        # thread may stop it: one command at a time on the connection.
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None

    def connect(self, connection: QEMUMonitorProtocol, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Take a negotiated connection; ``loop``, when given, is its own
        event loop (client_with_own_loop), closed with it."""
        self.connection = connection
        self._loop = loop

    def note(self, direction: str, message: object) -> None:
        """One log line: '>' sent, '<' answered, '!' failed, '*' event."""
        if self._log is not None and not self._log.closed:
            stamp = time.monotonic() - self.epoch
            self._log.write(f"{stamp:9.3f} {direction} {json.dumps(message, default=str)}\n")
            self._log.flush()

    def command(self, command: str, error: Callable[[str], QemuError], **arguments: object) -> Any:
        """Run a QMP command and return its answer; a failure (an error
        answer, a lost connection, a timeout) raises ``error(message)``."""
        if self.connection is None:
            raise error(f"QMP is not connected (command {command})")
        with self.lock:
            self.note(">", {"execute": command, "arguments": arguments})
            try:
                result = self.connection.cmd(command, **arguments)
            except Exception as exc:
                self.note("!", {"error": str(exc)})
                raise error(f"QMP command {command} failed: {exc}") from exc
            self.note("<", {"return": result})
            # Under the lock too: reading events runs the connection's event
            # loop, which a command of another thread may be running (the
            # migration's guest throttle stops the guest while the main
            # thread asks QEMU something: "This event loop is already running").
            for event in self._events():
                self.note("*", event)
        return result

    def bare_command(self, command: str, error: Callable[[str], QemuError]) -> None:
        """Run a QMP command that takes no arguments and returns nothing, in
        the fewest bytes: ``{"execute":"NAME"}``, no arguments, no id (the
        lock keeps it the only such command in flight, as qemu.qmp requires).
        QEMU 7.2's monitor reads its socket one byte at a time, a few system
        calls per byte, so a wake-up (inject-nmi) reaches QEMU sooner in 24
        bytes than in the 58 of a command with an id. No event collection
        either: the next ordinary command collects them."""
        if self.connection is None:
            raise error(f"QMP is not connected (command {command})")
        message = {"execute": command}
        with self.lock:
            self.note(">", message)
            try:
                reply = self.connection.cmd_obj(message)
            except Exception as exc:
                self.note("!", {"error": str(exc)})
                raise error(f"QMP command {command} failed: {exc}") from exc
            self.note("<", reply)
        if "return" not in reply:
            detail = reply.get("error", reply)
            if isinstance(detail, dict):
                detail = detail.get("desc", detail)
            raise error(f"QMP command {command} failed: {detail}")

    def events(self) -> list[dict[str, Any]]:
        """The events that arrived so far, without waiting; none once the
        connection is gone."""
        with self.lock:
            return self._events()

    def _events(self) -> list[dict[str, Any]]:
        if self.connection is None:
            return []
        try:
            return [dict(event) for event in self.connection.get_events(wait=False)]
        except Exception:
            return []

    def close(self) -> None:
        """Close the connection and the log (the QEMU itself goes on). Under
        the lock: a helper's waker thread may be running a wake on the
        connection's event loop, which two threads must not run at once."""
        if self.connection is not None:
            with self.lock, suppress(Exception):
                self.connection.close()
            self.connection = None
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
            self._loop = None
        if self._log is not None:
            self._log.close()
            self._log = None
