"""Plain QEMU's migration of the Debian guest: the baseline of `ovmf-mh bench
migrate --guest debian` (docs/migration.md, "Migrate a real VM").

The same VM as ovmf-mh's run: booted by the firmware from a fresh overlay of
the cached image, with its vCPUs, virtio disk, NIC and RNG, its RAM in a
shared memory file, the workload running. As root the two QEMUs sit in the
source and target host namespaces of an L2 segment (host_shim/vm/netns.py),
QEMU's stream goes from the source host's namespace to the target host's
over that segment, and the client's TCP probe streams through the whole
migration, as it does for ovmf-mh. QEMU moves RAM and devices itself, with
its default parameters (no helpers, no confidentiality).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from host_shim.migration import debian_guest
from host_shim.migration.migrate import qemu_migration
from host_shim.migration.migration_vm import MIB, MigrationError, ram_file, wait_for_serial
from host_shim.vm import debian_vm, guest, guest_image
from host_shim.vm.attached import QemuHandle
from host_shim.vm.devices import DeviceModel, NicBackend
from host_shim.vm.netns import TAP, L2Network
from host_shim.vm.qemu import QemuVM

#: The target QEMU's port for QEMU's stream, on its host's own address in
#: its own namespace (nothing else listens there).
STREAM_PORT = 4444


def plain_debian_migration(image: Path, work: Path, guest_mib: int, vcpus: int, ram_dir: Path | None,
                           network: L2Network | None) -> dict[str, Any]:
    """Boot the Debian guest, migrate it with QEMU's own migration, resume
    it on the target and report QEMU's total time and downtime, and, with
    ``network``, the TCP probe's result (it streams on for as long after
    'cont' as in ovmf-mh's run)."""
    work.mkdir(parents=True, exist_ok=True)
    size = guest_mib * MIB
    disk = guest_image.overlay(work / "disk.qcow2").absolute()
    disk_format, _ = debian_guest.disk_info(disk)
    nic = NicBackend("tap", TAP) if network is not None else NicBackend()
    model = DeviceModel(vcpus=vcpus, disk=disk, disk_format=disk_format, nic=nic)
    with ExitStack() as stack:
        rams = {role: ram_file(stack, work, ram_dir, role, size) for role in ("source", "target")}
        source = stack.enter_context(QemuVM(
            debian_vm.config(image, rams["source"], size, model,
                             wrapper=network.enter("source") if network else None),
            work / "source", "plain-source"))
        wait_for_serial(source, guest.HEARTBEAT, debian_guest.BOOT_TIMEOUT)
        probe = debian_guest.start_probe(network, stack)
        target = stack.enter_context(QemuVM(
            debian_vm.config(image, rams["target"], size, model, incoming=True,
                             wrapper=network.enter("target") if network else None),
            work / "target", "plain-target"))
        if network is not None:
            uri = f"tcp:{network.address('target')}:{STREAM_PORT}"
        else:
            uri = f"unix:{work / 'migration.sock'}"
        resumed: list[float] = []

        def after_cont(vm: QemuHandle) -> None:
            resumed.append(time.monotonic())
            debian_guest.announce_nic(vm)

        result = qemu_migration(source, target, uri, work, after_cont=after_cont)
        if probe is not None:
            # As ovmf-mh's target does: the probe streams on after 'cont',
            # so a backed-off retransmission still lands in the run.
            time.sleep(max(0.0, resumed[0] + debian_guest.STREAM_AFTER_RESUME - time.monotonic()))
            result["tcp_probe"] = probe.finish()
            # On the probe's clock (CLOCK_MONOTONIC): its long gaps against 'cont'.
            result["cont_monotonic"] = round(resumed[0], 3)
            check_probe(result["tcp_probe"], work)
        return result


def check_probe(probe: dict[str, Any], work: Path) -> None:
    """A baseline whose guest lost, reordered or changed the client's bytes
    is no measurement (QEMU 7.2 under TCG can send a page before the guest's
    last write to it: docs/migration.md, "Plain QEMU's baseline"); the
    bench runs it again once."""
    if "error" in probe or probe["connection_reset"] or not probe["in_order"] or \
            probe["bytes_echoed"] != probe["bytes_sent"]:
        raise MigrationError(f"plain QEMU migration: the guest's TCP echo after it was not the bytes sent "
                             f"({probe}; see {work / 'target'})")
