"""The Debian guest in both migration roles: the source boots it from its
disk and describes its devices; the target rebuilds the same devices from
the checked description, on its own path to the shared disk and its own NIC
host side (docs/migration.md, "Migrate a real VM").

Only the guest's RAM goes through the helpers: QEMU's own migration (with
x-ignore-shared) carries the state of the virtio devices, and the disk stays
where it is, on storage both hosts see. The source QEMU flushes and releases
the disk when it stops for the switchover; the target's QEMU opens it on
``migrate-incoming`` and takes it over on ``cont``.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from host_shim.migration.attach import SourceGuest
from host_shim.migration.guest_description import (
    ACCELERATORS,
    CPUS,
    DEBIAN_GUEST,
    MACHINES,
    MAX_VCPUS,
    DescriptionError,
    GuestDescription,
    describe_devices,
    device_model,
    firmware_digest,
)
from host_shim.migration.migration_vm import MIB, MigrationError, ram_file
from host_shim.vm import debian_vm, guest_image, process
from host_shim.vm.attached import QemuHandle
from host_shim.vm.devices import DeviceModel, NicBackend
from host_shim.vm.netns import TAP, L2Network
from host_shim.vm.qemu import QemuConfig, QemuVM

#: Seconds the source gives the Debian guest to boot to its first heartbeat
#: (about 40 s on an idle machine under TCG, minutes on a loaded one).
BOOT_TIMEOUT = 600.0


def disk_info(disk: Path) -> tuple[str, int]:
    """(format, virtual size) of a disk image, as qemu-img sees it."""
    if not disk.is_file():
        raise MigrationError(f"the guest's disk {disk} is not a file")
    result = subprocess.run(["qemu-img", "info", "--output=json", "--force-share", str(disk)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MigrationError(f"qemu-img info {disk} failed: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    return str(info["format"]), int(info["virtual-size"])


def source_guest(image: Path, stack: ExitStack, work: Path, ram_dir: Path | None, guest_mib: int, vcpus: int,
                 disk: Path, helpers: int, *, new_overlay: bool, network: L2Network | None = None,
                 nic: NicBackend | None = None) -> SourceGuest:
    """Boot the Debian guest from its disk (with ``new_overlay``, a fresh
    overlay made there over the cached image) and describe it. Its NIC's
    host side: the tap in the source's namespace of ``network``, else
    ``nic`` (default: none)."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise MigrationError(f"--vcpus {vcpus}: the Debian guest runs with 1..{MAX_VCPUS} vCPUs")
    if new_overlay:
        disk.parent.mkdir(parents=True, exist_ok=True)
        guest_image.overlay(disk)
    disk = disk.absolute()
    disk_format, disk_size = disk_info(disk)
    if network is not None:
        nic = NicBackend("tap", TAP)
    model = DeviceModel(vcpus=vcpus, disk=disk, disk_format=disk_format, nic=nic or NicBackend())
    size = guest_mib * MIB
    ram = ram_file(stack, work, ram_dir, "source", size)
    wrapper = network.enter("source") if network is not None else []
    vm = stack.enter_context(QemuVM(debian_vm.config(image, ram, size, model, wrapper=wrapper), work / "source",
                                    "source"))
    description = GuestDescription(
        guest=DEBIAN_GUEST, machine=MACHINES[0], accel=ACCELERATORS[0], cpu=CPUS[0], memory_mib=guest_mib,
        workload_mib=guest_image.WORKLOAD_MIB, shards=helpers, firmware_sha256=firmware_digest(image),
        vcpus=vcpus, devices=describe_devices(model, disk_size))
    return SourceGuest(vm, ram, size, description)


def target_config(image: Path, ram: Path, size: int, description: GuestDescription, disk: Path | None,
                  nic: NicBackend, wrapper: list[str]) -> QemuConfig:
    """The target QEMU for a checked Debian description: this host's own
    disk path, checked against the described format and size."""
    model = device_model(description, disk, nic)
    described = description.device("virtio-blk-pci")
    if model.disk is not None and described is not None:
        found = disk_info(model.disk)
        if found != (described["format"], described["size"]):
            raise DescriptionError("devices", f"the source's disk is {described['format']}, {described['size']} "
                                   f"bytes; this target's --disk {model.disk} is {found[0]}, {found[1]} bytes")
    return debian_vm.config(image, ram, size, model, incoming=True, wrapper=wrapper)


def announce(target: QemuHandle, description: GuestDescription) -> None:
    """After 'cont': the guest's NIC announces its MAC from its new port
    (QEMU's self-announcement, as libvirt's migration does), so the switch
    sends the client's packets to the target host."""
    if description.device("virtio-net-pci") is not None:
        announce_nic(target)


#: QMP 'announce-self' after 'cont' (ms; QEMU's own defaults for migration).
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def announce_nic(vm: QemuHandle) -> None:
    """The NIC's self-announcement, the same after either migration (plain
    QEMU's baseline included): rounds of RARP, or the guest's own
    gratuitous ARP where its virtio-net driver offers it."""
    vm.qmp("announce-self", **ANNOUNCE)


class ProbeClient:
    """The TCP probe (host_shim/vm/tcp_probe.py) in the client's namespace,
    streaming to the guest's echo service from before the migration until
    the guest runs on the target."""

    def __init__(self, network: L2Network, timeout: float = 180.0) -> None:
        address = guest_image.GUEST_ADDRESS.split("/")[0]
        self.result: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.proc = process.spawn(
            [*network.enter("client"), sys.executable, "-m", "host_shim.vm.tcp_probe", address,
             str(guest_image.ECHO_PORT), "--connect-timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self._line(timeout + 10)
        if line.strip() != "connected":
            self.close()
            raise MigrationError(f"the TCP probe could not reach the guest's echo service at {address}:"
                                 f"{guest_image.ECHO_PORT} from the client namespace: {line.strip() or 'no answer'}")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode(errors="replace") if ready else ""

    def finish(self) -> dict[str, Any]:
        """Stop streaming, wait for the echo's rest, return the probe's
        result (the same on every later call); a probe that gives none is
        said in the result, never raised: the guest's migration is not the
        probe's."""
        with self._lock:
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result
        assert self.proc.stdin is not None
        with suppress(OSError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        line = self._line(60)
        self.close()
        try:
            self.result = dict(json.loads(line))
        except ValueError:
            self.result = {"error": f"the TCP probe gave no result: {line.strip()!r}"}
        return self.result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        process.kill_if_running(self.proc, "the TCP probe")


def start_probe(network: L2Network | None, stack: ExitStack,
                probes: list[ProbeClient] | None = None) -> ProbeClient | None:
    """With the L2 network: the probe, streaming from now on. Given
    ``probes``, it goes there and its owner stops it (the one-machine
    command, after the target role let it stream on); else ``stack`` does."""
    if network is None:
        return None
    probe = ProbeClient(network)
    if probes is not None:
        probes.append(probe)
    else:
        stack.callback(probe.close)
    return probe


#: Seconds the probe streams on after the guest runs on the target: longer
#: than TCP's backed-off retransmission after a downtime of a few seconds.
STREAM_AFTER_RESUME = 8.0


def finish_probe_later(probes: list[ProbeClient]) -> Callable[[], None]:
    """The one-machine target role's last step before it stops the guest:
    if the source started a probe, let it stream on, then stop it."""
    def linger() -> None:
        if probes:
            time.sleep(STREAM_AFTER_RESUME)
            probes[0].finish()

    return linger
