"""Liveness of a peer's page stream as progress, not as bytes
(docs/transfer-format.md, "Liveness"; docs/migration-protocol.md).

A receiver used to count a peer as alive as long as any byte arrived
within its idle timeout: a sender trickling one byte a second, or sending
one empty KEEPALIVE frame a second, held it for as long as it liked. Here a
peer is alive while it delivers *progress*: a whole frame that carries work
(any frame but KEEPALIVE, and a RECORDS frame only with a payload). The
receiver waits for the peer at most ``stall`` seconds in all since the last
progress (time this side spends on its own work, with the socket's data
waiting, does not count), and the whole stream at most ``total`` seconds.
Frames that carry no work and arrive without a wait (a flood of KEEPALIVE
frames) do not hold it either: past twice ``stall`` of wall-clock time
since the last progress, such a frame ends the stream.
"""

from __future__ import annotations

import io
import select
import socket
import time
from typing import Any

from host_shim.transfer import container as ct


class StreamStalled(TimeoutError):
    """The peer made no progress within the bound (its message says which)."""


def is_progress(kind: int, payload_size: int) -> bool:
    """Whether a frame carries work: KEEPALIVE never, RECORDS only with a payload."""
    if kind == ct.KIND_KEEPALIVE:
        return False
    return not (kind == ct.KIND_RECORDS and payload_size == 0)


class Liveness:
    """The clocks of one stream: waiting since the last progress, and the
    stream's whole time. ``peer`` and ``option`` name them in errors."""

    def __init__(self, stall: float, peer: str, option: str, total: float | None = None) -> None:
        self.stall = stall
        self.total = total
        self.peer = peer
        self.option = option
        self.started = time.monotonic()
        self.waited = 0.0
        self.progress_at = self.started
        # Bytes and frames that arrived since the last progress (a peer that
        # sends nothing at all is said as silent, not as pretending).
        self.bytes_since = 0

    def progressed(self) -> None:
        """A frame that carries work arrived, or this side just asked the
        peer for something (its challenge): the stall clock restarts."""
        self.waited = 0.0
        self.bytes_since = 0
        self.progress_at = time.monotonic()

    def restart(self) -> None:
        """Both clocks from now (the stream begins)."""
        self.started = time.monotonic()
        self.progressed()

    def on_frame(self, kind: int, payload_size: int) -> None:
        if is_progress(kind, payload_size):
            self.progressed()
        else:
            self.bytes_since += ct.FRAME_HEADER.size + payload_size
            if time.monotonic() - self.progress_at >= 2 * self.stall:
                raise self.stalled()
        if self.total is not None and time.monotonic() - self.started >= self.total:
            raise self.stalled()

    def wait_budget(self) -> float:
        """Seconds this side may still wait for the peer now."""
        budget = self.stall - self.waited
        if self.total is not None:
            budget = min(budget, self.started + self.total - time.monotonic())
        return budget

    def stalled(self) -> StreamStalled:
        if self.total is not None and time.monotonic() - self.started >= self.total:
            return StreamStalled(f"the {self.peer} did not end its stream within {self.total:g} s (the stream's "
                                 "total bound)")
        if not self.bytes_since:
            return StreamStalled(f"the {self.peer} sent nothing for {self.stall:g} s ({self.option}): it is "
                                 "stalled (stopped?) or overloaded")
        return StreamStalled(f"the {self.peer} made no progress for {self.stall:g} s ({self.option}): it sent no "
                             "frame that carries work (KEEPALIVE frames and bytes that trickle in are not "
                             "progress)")

    def wait_readable(self, sock: socket.socket) -> None:
        """Return once ``sock`` has data, or raise StreamStalled when the
        budget runs out first. Time spent here is time waited for the peer."""
        while True:
            # Data already waiting is taken whatever the clocks say: the
            # time this side was busy (or stopped) is not the peer's.
            if select.select([sock], [], [], 0)[0]:
                return
            budget = self.wait_budget()
            if budget <= 0:
                raise self.stalled()
            began = time.monotonic()
            readable = select.select([sock], [], [], budget)[0]
            self.waited += time.monotonic() - began
            if readable:
                return


class LiveSocketIO(io.RawIOBase):
    """A socket's receiving side whose every read waits for the peer within
    the stream's Liveness (wrap it in io.BufferedReader)."""

    def __init__(self, sock: socket.socket, liveness: Liveness) -> None:
        super().__init__()
        self._sock = sock
        self.liveness = liveness

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.liveness.wait_readable(self._sock)
        received = self._sock.recv_into(buffer)
        self.liveness.bytes_since += received
        return received
