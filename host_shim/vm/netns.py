"""A data centre's L2 segment on one machine: the source host, the target
host and a client, each in a network namespace of its own, joined by a
bridge in a fourth "switch" namespace (docs/migration.md, "The network").

Each host namespace holds a bridge joining its uplink to a tap the guest's
QEMU opens (a tap can only join a bridge in its own namespace). The
namespaces are anonymous, each held by one ``sleep`` process started with
``unshare --net`` and registered with the reaper: when the holders and the
QEMUs inside are gone, the kernel removes the namespaces with every link in
them, so nothing is left behind, also after a SIGKILL of the command. The
addresses are private ones, used only inside these namespaces.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from host_shim.errors import SetupError
from host_shim.vm import process

HOSTS = ("source", "target")
ROLES = ("switch", *HOSTS, "client")
CLIENT_ADDRESS = "10.0.2.100/24"
#: Each host's own address on its bridge: QEMU's device-state migration goes
#: from the source host's namespace to the target host's over the segment.
HOST_ADDRESSES = {"source": "10.0.2.201/24", "target": "10.0.2.202/24"}
TAP = "omh-tap0"
UPLINK = "omh-up0"
BRIDGE = "omh-br0"


class L2Network:
    """Start with ``with L2Network() as net``; ``net.enter(role)`` is the
    argv prefix that runs a program in that role's namespace."""

    def __init__(self, client_rto_max_ms: int | None = None) -> None:
        self.holders: dict[str, subprocess.Popen[bytes]] = {}
        #: The client host's cap on TCP's retransmission backoff
        #: (net.ipv4.tcp_rto_max_ms, Linux 6.15+, 1000..120000 ms), set in
        #: its namespace only; None keeps the kernel's default (120 s).
        if client_rto_max_ms is not None and not 1000 <= client_rto_max_ms <= 120000:
            raise SetupError(f"the client's TCP RTO cap {client_rto_max_ms} ms is outside 1000..120000 ms "
                             "(net.ipv4.tcp_rto_max_ms)")
        self.client_rto_max_ms = client_rto_max_ms

    def __enter__(self) -> L2Network:
        try:
            for role in ROLES:
                self.holders[role] = process.spawn(["unshare", "--net", "--", "sleep", "infinity"],
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL, start_new_session=True)
            for role in ROLES:
                self._wait_own_namespace(role)
            self._wire()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for holder in self.holders.values():
            if holder.poll() is None:
                holder.terminate()  # sleep ends on SIGTERM; nothing to warn about
            with suppress(subprocess.TimeoutExpired):
                holder.wait(timeout=5)
            process.kill_if_running(holder, "a network namespace's holder")
        self.holders.clear()

    def namespace(self, role: str) -> Path:
        return Path(f"/proc/{self.holders[role].pid}/ns/net")

    def enter(self, role: str) -> list[str]:
        """argv prefix: nsenter execs the program in place (same pid)."""
        return ["nsenter", f"--net={self.namespace(role)}", "--"]

    def _wait_own_namespace(self, role: str, timeout: float = 10.0) -> None:
        ours = Path("/proc/self/ns/net").resolve()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.namespace(role).resolve() != ours and "sleep" in \
                        Path(f"/proc/{self.holders[role].pid}/comm").read_text():
                    return
            except OSError:
                pass
            if self.holders[role].poll() is not None:
                raise SetupError(f"unshare --net for the {role} namespace failed (exit "
                                 f"{self.holders[role].returncode}): network namespaces need root")
            time.sleep(0.02)
        raise SetupError(f"the {role} namespace was not set up within {timeout:g} s")

    def ip(self, role: str, *args: str) -> None:
        result = subprocess.run([*self.enter(role), "ip", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SetupError(f"ip {' '.join(args)} in the {role} namespace failed: {result.stderr.strip()}")

    def _wire(self) -> None:
        for role in ROLES:
            self.ip(role, "link", "set", "lo", "up")
        self.ip("switch", "link", "add", BRIDGE, "type", "bridge")
        self.ip("switch", "link", "set", BRIDGE, "up")
        for role in (*HOSTS, "client"):
            port = f"omh-sw-{role[:3]}"
            self.ip("switch", "link", "add", port, "type", "veth", "peer", "name", UPLINK, "netns",
                    str(self.holders[role].pid))
            self.ip("switch", "link", "set", port, "master", BRIDGE, "up")
            self.ip(role, "link", "set", UPLINK, "up")
        for role in HOSTS:
            self.ip(role, "link", "add", BRIDGE, "type", "bridge")
            self.ip(role, "link", "set", UPLINK, "master", BRIDGE)
            self.ip(role, "tuntap", "add", "dev", TAP, "mode", "tap")
            self.ip(role, "link", "set", TAP, "master", BRIDGE, "up")
            self.ip(role, "addr", "add", HOST_ADDRESSES[role], "dev", BRIDGE)
            self.ip(role, "link", "set", BRIDGE, "up")
        self.ip("client", "addr", "add", CLIENT_ADDRESS, "dev", UPLINK)
        if self.client_rto_max_ms is not None:
            self._sysctl("client", "net.ipv4.tcp_rto_max_ms", str(self.client_rto_max_ms))

    def _sysctl(self, role: str, key: str, value: str) -> None:
        path = Path("/proc/sys") / key.replace(".", "/")
        result = subprocess.run([*self.enter(role), "sh", "-c", f'echo {value} > "{path}"'], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise SetupError(f"{key}={value} in the {role} namespace failed: {result.stderr.strip()} "
                             "(tcp_rto_max_ms needs Linux 6.15 or later)")

    @staticmethod
    def address(role: str) -> str:
        """A host namespace's own address (without the prefix length)."""
        return HOST_ADDRESSES[role].split("/")[0]
