"""The namespaces of the L2 network and the TCP probe, without QEMU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from host_shim.vm.netns import BRIDGE, L2Network

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept()
while (d := c.recv(65536)):
    c.sendall(d)
"""


def _probe(prefix: list[str], host: str, port: int, seconds: float, *options: str) -> dict[str, object]:
    probe = subprocess.Popen([*prefix, sys.executable, "-m", "host_shim.vm.tcp_probe", host, str(port),
                              "--connect-timeout", "20", "--drain", "5", *options],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdin is not None and probe.stdout is not None
        assert probe.stdout.readline().strip() == "connected"
        time.sleep(seconds)
        probe.stdin.write("stop\n")
        probe.stdin.close()
        result: dict[str, object] = json.loads(probe.stdout.readline())
        assert probe.wait(timeout=30) == 0
        return result
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()


def test_the_probe_counts_every_byte_echoed_in_order() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    result = _probe([], "127.0.0.1", server.getsockname()[1], 1.0)
    server.close()
    assert result["bytes_sent"] == result["bytes_echoed"] and int(str(result["bytes_sent"])) >= 10 * 1024
    assert result["in_order"] is True and result["connection_reset"] is False
    assert float(str(result["longest_gap_ms"])) < 1000


def test_a_peer_that_stops_reading_for_a_while_is_a_gap_not_a_reset() -> None:
    """As a guest stopped for the switchover: the echo pauses, the window
    fills and the probe's sends wait; nothing is lost and nothing is reset,
    and the pause shows as the longest gap."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo_with_a_pause() -> None:
        conn, _ = server.accept()
        with conn:
            paused = False
            while data := conn.recv(65536):
                conn.sendall(data)
                if not paused:
                    paused = True
                    time.sleep(2.0)

    threading.Thread(target=echo_with_a_pause, daemon=True).start()
    result = _probe([], "127.0.0.1", server.getsockname()[1], 3.0, "--chunk", "65536", "--interval-ms", "1")
    server.close()
    assert result["connection_reset"] is False, result
    assert result["bytes_sent"] == result["bytes_echoed"] and result["in_order"] is True, result
    assert float(str(result["longest_gap_ms"])) >= 1500, result


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_the_client_reaches_a_host_namespace_across_the_switch_and_nothing_is_left() -> None:
    with L2Network() as net:
        namespaces = [net.namespace(role).resolve() for role in ("switch", "source", "target", "client")]
        assert len(set(namespaces)) == 4 and Path("/proc/self/ns/net").resolve() not in namespaces
        # A stand-in for the guest: an address on the source host's bridge.
        net.ip("source", "addr", "add", "10.0.2.15/24", "dev", BRIDGE)
        server = subprocess.Popen([*net.enter("source"), sys.executable, "-c", ECHO_SERVER, "10.0.2.15", "7"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            result = _probe(net.enter("client"), "10.0.2.15", 7, 0.5)
        finally:
            server.kill()
            server.wait()
        assert result["bytes_sent"] == result["bytes_echoed"] and result["connection_reset"] is False
        # The device-state path: from the source host's namespace to the target host's own address.
        target = net.address("target")
        server = subprocess.Popen([*net.enter("target"), sys.executable, "-c", ECHO_SERVER, target, "4444"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            result = _probe(net.enter("source"), target, 4444, 0.5)
        finally:
            server.kill()
            server.wait()
        assert result["bytes_sent"] == result["bytes_echoed"]
        holders = [holder.pid for holder in net.holders.values()]
    # The holders are gone, and with them the namespaces and every link in them.
    assert not any(Path(f"/proc/{pid}").exists() for pid in holders)
