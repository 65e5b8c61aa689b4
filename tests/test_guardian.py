"""The reaper as the guardian of a guest the shim paused (host_shim/vm/reaper.py),
without QEMU: a fake QMP monitor that serves one client at a time stands
for the user's QEMU. Whatever ends the shim before it releases the guest
(here: its end of the reaper's pipe closes, as the kernel closes it for a
killed process), the reaper connects once the shim's QMP connection is gone
and resumes the guest within RESUME_BOUND if it is paused; after a release
(the shim's commit) it never does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_shim.vm.reaper import RESUME_BOUND, Reaper


class FakeMonitor:
    """A QMP monitor on a unix socket, one client at a time (as QEMU's):
    answers the few commands the guardian sends and records them."""

    def __init__(self, path: Path, status: str, migration: str = "none") -> None:
        self.path = path
        self.status = status
        self.migration = migration
        self.commands: list[tuple[float, str, dict[str, Any]]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(4)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return [name for _, name, _ in self.commands]

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            # A client that goes mid-answer (the guardian gave up) ends its session.
            with client, contextlib.suppress(OSError):
                self._session(client)

    def _session(self, client: socket.socket) -> None:
        client.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        buffer = b""
        while True:
            try:
                chunk = client.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                name = request["execute"]
                self.commands.append((time.monotonic(), name, request.get("arguments", {})))
                client.sendall(json.dumps({"return": self._answer(name)}).encode() + b"\n")
                # An event between answers, as QEMU sends them: skipped.
                client.sendall(b'{"event": "RESUME", "data": {}}\n' if name == "cont" else b"")

    def _answer(self, name: str) -> Any:
        if name == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if name == "query-migrate":
            return {"status": self.migration}
        if name == "migrate_cancel":
            self.migration = "cancelled"
            self.status = "paused"
        if name == "cont":
            self.status = "running"
        return {}

    def close(self) -> None:
        self._stop = True
        self._server.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="omh-guard-") as path:
        yield Path(path)


def _end_shim(reaper: Reaper) -> float:
    """What the kernel does for a killed shim: its end of the pipe closes."""
    os.close(reaper._write_end)
    return time.monotonic()


def _wait_reaper(reaper: Reaper) -> None:
    reaper.proc.wait(timeout=30)


@pytest.mark.parametrize(("status", "migration"), [("paused", "none"), ("postmigrate", "completed"),
                                                   ("paused", "active")])
def test_a_guest_the_shim_paused_runs_again_within_the_bound_when_the_shim_dies(
        folder: Path, status: str, migration: str) -> None:
    monitor = FakeMonitor(folder / "qmp.sock", status, migration)
    try:
        # The shim's own QMP connection: the monitor serves nobody else
        # until it closes, as the killed shim's kernel closes it.
        shim_qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        shim_qmp.connect(str(monitor.path))
        reaper = Reaper()
        reaper.guard_guest(monitor.path, os.getpid(), ignore_shared=False)
        time.sleep(0.2)
        ended = _end_shim(reaper)
        time.sleep(0.3)
        shim_qmp.close()
        _wait_reaper(reaper)
        names = monitor.names()
        assert "cont" in names, names
        resumed = next(at for at, name, _ in monitor.commands if name == "cont")
        print(f"guest resumed {resumed - ended:.2f} s after the shim ended ({status}, migration {migration})")
        assert resumed - ended < RESUME_BOUND
        assert monitor.status == "running"
        if migration == "active":
            assert names.index("migrate_cancel") < names.index("cont")
        else:
            assert "migrate_cancel" not in names
        # The capability goes back as the shim found it.
        capabilities = [args for _, name, args in monitor.commands if name == "migrate-set-capabilities"]
        assert capabilities == [{"capabilities": [{"capability": "x-ignore-shared", "state": False}]}]
    finally:
        monitor.close()


def test_a_released_guest_is_never_resumed(folder: Path) -> None:
    """The shim releases the guest before it commits: from then on the
    target may run it, and the reaper must not."""
    monitor = FakeMonitor(folder / "qmp.sock", "postmigrate", "completed")
    try:
        reaper = Reaper()
        reaper.guard_guest(monitor.path, os.getpid(), ignore_shared=False)
        reaper.release_guest(monitor.path)
        _end_shim(reaper)
        _wait_reaper(reaper)
        assert monitor.commands == [] and monitor.status == "postmigrate"
    finally:
        monitor.close()


@pytest.mark.parametrize("status", ["running", "shutdown", "inmigrate"])
def test_a_guest_that_is_not_paused_is_left_as_it_is(folder: Path, status: str) -> None:
    monitor = FakeMonitor(folder / "qmp.sock", status)
    try:
        reaper = Reaper()
        reaper.guard_guest(monitor.path, os.getpid(), ignore_shared=True)
        _end_shim(reaper)
        _wait_reaper(reaper)
        assert "cont" not in monitor.names() and "query-status" in monitor.names()
        assert monitor.status == status
    finally:
        monitor.close()


def test_a_monitor_served_by_another_process_is_left_alone(folder: Path) -> None:
    """The pid registered is not the one serving the socket (the QEMU went
    and something else listens there): nothing is sent."""
    monitor = FakeMonitor(folder / "qmp.sock", "paused")
    try:
        reaper = Reaper()
        # The reaper's own pid: alive, but not the process serving the socket.
        reaper.guard_guest(monitor.path, reaper.proc.pid, ignore_shared=False)
        _end_shim(reaper)
        _wait_reaper(reaper)
        assert monitor.commands == [] and monitor.status == "paused"
    finally:
        monitor.close()


class LateStopMonitor(FakeMonitor):
    """The dead shim's 'stop' still queued in the monitor: the guardian's
    first look finds the guest running, the stop runs right after it."""

    def _answer(self, name: str) -> Any:
        answer = super()._answer(name)
        if name == "query-status" and not getattr(self, "stopped_late", False):
            self.stopped_late = True
            self.status = "paused"
        return answer


def test_a_late_stop_of_the_dead_shim_is_resumed_too(folder: Path) -> None:
    monitor = LateStopMonitor(folder / "qmp.sock", "running")
    try:
        reaper = Reaper()
        reaper.guard_guest(monitor.path, os.getpid(), ignore_shared=False)
        _end_shim(reaper)
        _wait_reaper(reaper)
        names = monitor.names()
        assert names.count("query-status") >= 2 and "cont" in names, names
        assert monitor.status == "running"
    finally:
        monitor.close()
