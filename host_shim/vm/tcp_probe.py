"""The TCP probe: a client that streams data to the guest's echo service
during a migration and checks that every byte comes back, in order.

Run in the client's namespace (``python -m host_shim.vm.tcp_probe HOST
PORT``): it connects (retrying until ``--connect-timeout``), prints
``connected`` on stdout, sends ``--chunk`` bytes every ``--interval-ms``
and reads the echo, until its stdin closes or says ``stop``; then it waits
up to ``--drain`` seconds for the rest of the echo and prints one JSON
line: ``bytes_sent``, ``bytes_echoed``, ``in_order``, ``connection_reset``,
``longest_gap_ms`` (the longest silence between two echoed chunks) and
``rto_max_ms`` (the cap on its retransmission backoff it ran with) and
``long_gaps`` (each silence of 0.5 s or more: its end on CLOCK_MONOTONIC
and its length).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
from typing import Any


def _pattern(offset: int, size: int) -> bytes:
    """Bytes offset..offset+size of the stream: a position-dependent
    pattern, so a byte lost, repeated or reordered shows."""
    return bytes((i * 131 + (i >> 8)) & 0xFF for i in range(offset, offset + size))


class Probe:
    def __init__(self, conn: socket.socket, chunk: int, interval: float) -> None:
        self.conn = conn
        self.chunk = chunk
        self.interval = interval
        self.sent = 0
        self.echoed = 0
        self.in_order = True
        self.reset = False
        self.longest_gap = 0.0
        self.stopping = threading.Event()
        self._last = time.monotonic()
        self.rto_max_ms = rto_max_ms(conn)
        #: Every silence of LONG_GAP or more: when it ended (CLOCK_MONOTONIC,
        #: the same clock as the shim's time.monotonic()) and how long it was,
        #: so a gap can be placed against the switchover.
        self.long_gaps: list[dict[str, float]] = []

    def send_loop(self) -> None:
        """A chunk every interval. While the guest is stopped for the
        switchover the window closes and the chunk waits, as an
        application's would (a gap, not a reset); only an error of the
        connection itself is a reset. Never blocks past a stop."""
        pending = b""
        next_at = time.monotonic()
        while not self.stopping.is_set():
            if not pending:
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
                    continue
                pending = _pattern(self.sent, self.chunk)
                next_at = max(next_at + self.interval, time.monotonic())
            _, writable, _ = select.select([], [self.conn], [], 0.1)
            if not writable:
                continue
            try:
                count = self.conn.send(pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                self.reset = True
                return
            self.sent += count
            pending = pending[count:]

    def receive_loop(self, deadline: list[float]) -> None:
        while time.monotonic() < deadline[0]:
            if self.stopping.is_set() and self.echoed >= self.sent:
                return
            readable, _, _ = select.select([self.conn], [], [], 0.1)
            if not readable:
                continue
            try:
                data = self.conn.recv(65536)
            except OSError:
                self.reset = True
                return
            if not data:
                self.reset = self.echoed < self.sent
                return
            now = time.monotonic()
            if not self.stopping.is_set():
                self.longest_gap = max(self.longest_gap, now - self._last)
                if now - self._last >= LONG_GAP and len(self.long_gaps) < MAX_LONG_GAPS:
                    self.long_gaps.append({"end": round(now, 3), "ms": round(1000 * (now - self._last), 1)})
            self._last = now
            if data != _pattern(self.echoed, len(data)):
                self.in_order = False
            self.echoed += len(data)

    def result(self) -> dict[str, Any]:
        return {"bytes_sent": self.sent, "bytes_echoed": self.echoed, "in_order": self.in_order,
                "connection_reset": self.reset, "longest_gap_ms": round(self.longest_gap * 1000, 1),
                "rto_max_ms": self.rto_max_ms, "long_gaps": self.long_gaps}


#: Silences at least this long (s) are listed with their end time.
LONG_GAP = 0.5
MAX_LONG_GAPS = 20

#: Linux's TCP_RTO_MAX_MS socket option (6.15+; Python names it not yet).
TCP_RTO_MAX_MS = 44


def rto_max_ms(conn: socket.socket) -> int | None:
    """The cap on this connection's retransmission backoff (its namespace's
    net.ipv4.tcp_rto_max_ms unless set on the socket); None on a kernel
    without it (the cap is then 120 s)."""
    try:
        return conn.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)
    except OSError:
        return None


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host_shim.vm.tcp_probe")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--drain", type=float, default=15.0)
    args = parser.parse_args(argv)
    try:
        conn = _connect(args.host, args.port, args.connect_timeout)
    except OSError as exc:
        print(json.dumps({"error": f"cannot connect to {args.host}:{args.port}: {exc}"}), flush=True)
        return 1
    conn.settimeout(None)
    probe = Probe(conn, args.chunk, args.interval_ms / 1000)
    print("connected", flush=True)
    deadline = [float("inf")]
    sender = threading.Thread(target=probe.send_loop, daemon=True)
    receiver = threading.Thread(target=probe.receive_loop, args=(deadline,), daemon=True)
    sender.start()
    receiver.start()
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    probe.stopping.set()
    sender.join()
    deadline[0] = time.monotonic() + args.drain
    receiver.join()
    conn.close()
    print(json.dumps(probe.result()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
