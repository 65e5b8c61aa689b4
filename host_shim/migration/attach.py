"""Attaching the source role to a guest the user already runs (`ovmf-mh
migrate --qmp SOCKET --ram FILE`, docs/migration.md "Attaching to a running
guest").

Everything the migration needs is asked of the running QEMU over QMP and
checked before anything else happens: the guest must run, its RAM must be
one ``memory-backend-file,share=on`` that is the file the user named (the
helpers map it, the host compares it, ``x-ignore-shared`` skips it), and the
machine, accelerator, vCPU, devices, firmware, kernel, initramfs and kernel
command line must be what the target builds from the guest description,
since QEMU's device state only fits a target QEMU of the same shape. A guest
that does not fit is refused with a named reason (:class:`AttachRefused`)
and left exactly as it was found: the checks only read.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host_shim.errors import QemuError
from host_shim.migration.guest_description import (
    ACCELERATORS,
    CPUS,
    DEBIAN_GUEST,
    DEVICE_TYPES,
    MACHINES,
    MAX_GUEST_MIB,
    MAX_VCPUS,
    MIN_GUEST_MIB,
    TEST_GUEST,
    GuestDescription,
    firmware_digest,
)
from host_shim.migration.migration_vm import MIB, MigrationError
from host_shim.vm import guest
from host_shim.vm.attached import AttachedQemu, QemuHandle, QmpUnreachable, same_file
from host_shim.vm.devices import DISK_FORMATS
from host_shim.vm.guest_image import WORKLOAD_MIB

#: Every reason a guest is refused, as the error and the report name it.
REASONS = (
    "qmp-unreachable", "not-running", "migrating", "machine", "accel", "cpu", "memory-layout",
    "ram-not-file", "ram-not-shared", "ram-file", "memory-size", "devices", "firmware", "kernel",
    "initrd", "append", "disk",
)
#: PCI vendor of virtio devices (Red Hat, Inc.).
VIRTIO_VENDOR = 0x1AF4
#: The devices a user adds that the target creates too (-device isa-debugcon,
#: the firmware's debug console): anything else has no counterpart there.
EXPECTED_ANON_DEVICES = ("isa-debugcon",)
#: The q35 chipset's own PCI functions (bus, slot, function): host bridge,
#: ICH9 LPC, AHCI and SMBus, present whatever the command line.
Q35_BUILTIN_PCI = {(0, 0, 0), (0, 31, 0), (0, 31, 2), (0, 31, 3)}
CPU_TYPE = f"{CPUS[0]}-x86_64-cpu"
WORKLOAD_INIT = re.compile(rb"exec /bin/workload (\d+) (\d+) (\d+)(?: \d+)?\n")


class AttachRefused(MigrationError):
    """The running guest cannot be migrated as it is; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str, qmp_socket: Path) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"refused to attach to the guest at {qmp_socket}: {reason}: {detail}; "
                         "the guest was left as it was")


@dataclass
class SourceGuest:
    """The source role's guest: its QEMU, its RAM file and its description."""

    vm: QemuHandle
    ram: Path
    size: int
    description: GuestDescription
    attached: bool = False
    #: x-ignore-shared as it was found on an attached QEMU (put back at the end).
    ignore_shared_before: bool = False


def attach(vm: AttachedQemu, ram: Path, image: Path, helpers: int, disk: Path | None = None) -> SourceGuest:
    """Connect to the user's QEMU and check it (AttachRefused names what
    does not fit); the guest is left running as it was."""
    try:
        vm.connect()
    except QmpUnreachable as exc:
        raise AttachRefused("qmp-unreachable", str(exc), vm.qmp_socket) from None
    try:
        return _inspect(vm, ram, image, helpers, disk)
    except QemuError as exc:
        vm.close()
        # QMP answered the greeting but failed a query: as good as unreachable.
        raise AttachRefused("qmp-unreachable", str(exc), vm.qmp_socket) from None
    except AttachRefused:
        vm.close()
        raise


def _inspect(vm: AttachedQemu, ram: Path, image: Path, helpers: int, disk: Path | None) -> SourceGuest:
    def refuse(reason: str, detail: str) -> AttachRefused:
        return AttachRefused(reason, detail, vm.qmp_socket)

    status = vm.qmp("query-status").get("status")
    if status != "running":
        raise refuse("not-running", f"QEMU pid {vm.pid} is {status!r}; this command migrates a running guest "
                     "and does not resume one it finds stopped")
    migration = vm.qmp("query-migrate").get("status", "none")
    if migration not in ("none", "failed", "cancelled", "completed"):
        raise refuse("migrating", f"a QEMU migration is already {migration!r} on this guest")

    machine = vm.qmp("qom-get", path="/machine", property="type")
    aliases = {m.get("alias"): m["name"] for m in vm.qmp("query-machines") if m.get("alias")}
    wanted = f"{aliases.get(MACHINES[0], MACHINES[0])}-machine"
    if machine != wanted:
        raise refuse("machine", f"the guest's machine is {machine!r}; the target runs {MACHINES[0]!r} "
                     f"({wanted!r} on this QEMU)")
    if vm.qmp("query-kvm").get("enabled"):
        raise refuse("accel", f"the guest runs under KVM; the target runs {ACCELERATORS[0]!r}")
    cpus = vm.qmp("query-hotpluggable-cpus")
    types = sorted({str(c.get("type")) for c in cpus})
    present = vm.qmp("query-cpus-fast")
    disk_booted = not vm.qmp("qom-get", path="/machine", property="kernel")
    most = MAX_VCPUS if disk_booted else 1
    if types != [CPU_TYPE] or not 1 <= len(present) <= most or len(cpus) != len(present):
        raise refuse("cpu", f"the guest has {len(present)} vCPU(s) of {types} ({len(cpus)} slots); the target "
                     f"runs 1..{most} {CPU_TYPE}")

    size, backend_path = _check_memory(vm, ram, refuse)
    if disk_booted:
        devices = _check_disk_guest_devices(vm, refuse, disk)
        workload_mib = WORKLOAD_MIB
    else:
        _check_devices(vm, refuse)
        devices = ()
    digest = _check_firmware(vm, image, refuse)
    if not disk_booted:
        workload_mib = _check_guest_boot(vm, refuse)
    capabilities = {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}
    description = GuestDescription(
        guest=DEBIAN_GUEST if disk_booted else TEST_GUEST, machine=MACHINES[0], accel=ACCELERATORS[0],
        cpu=CPUS[0], memory_mib=size // MIB, workload_mib=workload_mib, shards=helpers, firmware_sha256=digest,
        vcpus=len(present), devices=devices)
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    (vm.work_dir / "attached-guest.txt").write_text(
        f"QEMU pid {vm.pid}, QMP {vm.qmp_socket}, RAM {backend_path} ({size} bytes), machine {machine}\n"
        f"description: {description.as_json()}\n")
    return SourceGuest(vm, ram, size, description, attached=True,
                       ignore_shared_before=bool(capabilities.get("x-ignore-shared", False)))


def _check_memory(vm: AttachedQemu, ram: Path, refuse: Any) -> tuple[int, str]:
    memdevs = vm.qmp("query-memdev")
    summary = vm.qmp("query-memory-size-summary")
    hotplugged = vm.qmp("query-memory-devices")
    backend = vm.qmp("qom-get", path="/machine", property="memory-backend")
    if len(memdevs) != 1 or hotplugged or summary.get("plugged-memory", 0):
        raise refuse("memory-layout", f"the guest has {len(memdevs)} memory backend(s) and {len(hotplugged)} "
                     "memory device(s); the target runs one backend, the machine's RAM "
                     "(-machine memory-backend=ID), without NUMA nodes or DIMMs")
    if not backend:
        raise refuse("ram-not-file", "the guest's RAM is QEMU's own anonymous memory (-m alone); it must be a "
                     "memory-backend-file named by -machine memory-backend=ID")
    kind = vm.qmp("qom-get", path=backend, property="type")
    if kind != "memory-backend-file":
        raise refuse("ram-not-file", f"the guest's RAM backend {backend} is a {kind}, not a memory-backend-file: "
                     "the helpers and the host cannot map it")
    if vm.qmp("qom-get", path=backend, property="share") is not True:
        raise refuse("ram-not-shared", f"the guest's RAM backend {backend} has share=off: its writes stay in "
                     "QEMU's private copy, invisible to the helpers and the RAM file")
    path = str(vm.qmp("qom-get", path=backend, property="mem-path"))
    if not same_file(Path(path), ram):
        raise refuse("ram-file", f"the guest's RAM is {path}, not --ram {ram}")
    size = int(vm.qmp("qom-get", path=backend, property="size"))
    file_size = ram.stat().st_size
    mib, rest = divmod(size, MIB)
    if rest or not MIN_GUEST_MIB <= mib <= MAX_GUEST_MIB or file_size != size:
        raise refuse("memory-size", f"the guest's RAM is {size} bytes in a file of {file_size}; the target runs "
                     f"a whole number of MiB, {MIN_GUEST_MIB}..{MAX_GUEST_MIB}, the whole file")
    return size, path


def _check_devices(vm: AttachedQemu, refuse: Any) -> None:
    def children(path: str) -> list[str]:
        return sorted(str(p["type"])[len("child<"):-1] for p in vm.qmp("qom-list", path=path)
                      if str(p.get("type", "")).startswith("child<"))

    named = children("/machine/peripheral")
    anonymous = children("/machine/peripheral-anon")
    if named or anonymous != sorted(EXPECTED_ANON_DEVICES):
        raise refuse("devices", f"the guest has the devices {named + anonymous}; the target creates "
                     f"{list(EXPECTED_ANON_DEVICES)} (with -nodefaults), and QEMU's device state fits only "
                     "the same devices")
    # Devices a machine adds by default (a VGA, a NIC without -nodefaults)
    # have no -device of their own: they show on the PCI bus.
    extra = [f"{d.get('class_info', {}).get('desc') or 'device'} at {bus['bus']:02x}:{d['slot']:02x}.{d['function']}"
             for bus in vm.qmp("query-pci") for d in bus.get("devices", [])
             if (bus["bus"], d["slot"], d["function"]) not in Q35_BUILTIN_PCI]
    if extra:
        raise refuse("devices", f"the guest has the PCI devices {extra} beyond the q35 chipset's own; the target "
                     "runs with -nodefaults and none of them")


def _peripherals(vm: AttachedQemu) -> list[tuple[str, str]]:
    """(QOM path, type) of every device given by -device, named or not."""
    found = []
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        for child in vm.qmp("qom-list", path=parent):
            kind = str(child.get("type", ""))
            if kind.startswith("child<"):
                found.append((f"{parent}/{child['name']}", kind[len("child<"):-1]))
    return sorted(found, key=lambda item: item[1])


def _check_disk_guest_devices(vm: AttachedQemu, refuse: Any, disk: Path | None) -> tuple[dict[str, Any], ...]:
    """The devices of a guest the firmware booted from a disk: each on the
    allow-list (DEVICE_TYPES), at most one of each, a virtio-blk-pci among
    them whose image is --disk; returns the description's device list."""
    devices: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path, kind in _peripherals(vm):
        if kind not in DEVICE_TYPES:
            raise refuse("devices", f"the guest has a {kind} ({path}), not on the allow-list "
                         f"({', '.join(DEVICE_TYPES)}): the target would not create it")
        if kind in seen:
            raise refuse("devices", f"the guest has a second {kind} ({path}); the target creates one")
        seen.add(kind)
        if kind == "virtio-blk-pci":
            devices.append(_describe_disk(vm, path, refuse, disk))
        elif kind == "virtio-net-pci":
            devices.append({"type": kind, "mac": str(vm.qmp("qom-get", path=path, property="mac"))})
        elif kind != "isa-debugcon":
            devices.append({"type": kind})
    if "virtio-blk-pci" not in seen:
        raise refuse("devices", "the guest has no -kernel and no virtio-blk-pci disk to boot from")
    virtio = [d for d in devices if d["type"].startswith("virtio-")]
    extra = [f"{d.get('class_info', {}).get('desc') or 'device'} at {bus['bus']:02x}:{d['slot']:02x}.{d['function']}"
             for bus in vm.qmp("query-pci") for d in bus.get("devices", [])
             if (bus["bus"], d["slot"], d["function"]) not in Q35_BUILTIN_PCI and d["id"]["vendor"] != VIRTIO_VENDOR]
    if extra or sum(1 for bus in vm.qmp("query-pci") for d in bus.get("devices", [])
                    if d["id"]["vendor"] == VIRTIO_VENDOR) != len(virtio):
        raise refuse("devices", f"the guest has PCI devices beyond the q35 chipset's own and its -device virtio "
                     f"devices ({extra or 'another virtio device'}); the target runs with -nodefaults")
    return tuple(devices)


def _describe_disk(vm: AttachedQemu, path: str, refuse: Any, disk: Path | None) -> dict[str, Any]:
    blocks = [b for b in vm.qmp("query-block") if str(b.get("qdev", "")).startswith(path)]
    inserted = blocks[0].get("inserted") if len(blocks) == 1 else None
    if not inserted:
        raise refuse("disk", f"the guest's virtio-blk-pci ({path}) has no image inserted")
    found, image_format = Path(str(inserted["file"])), str(inserted["drv"])
    if disk is None or not same_file(found, disk):
        raise refuse("disk", f"the guest's disk is {found}, not --disk {disk}: the target opens --disk, on "
                     "storage both hosts see")
    if image_format not in DISK_FORMATS:
        raise refuse("disk", f"the guest's disk is a {image_format} image; the target opens {', '.join(DISK_FORMATS)}")
    return {"type": "virtio-blk-pci", "format": image_format, "size": int(inserted["image"]["virtual-size"])}


def _check_firmware(vm: AttachedQemu, image: Path, refuse: Any) -> str:
    flash = {b.get("device"): b.get("inserted", {}).get("file") for b in vm.qmp("query-block")}
    code, variables = flash.get("pflash0"), flash.get("pflash1")
    if not code or not variables:
        raise refuse("firmware", "the guest has no pflash firmware code and variables (-drive if=pflash, units "
                     "0 and 1)")
    wanted = firmware_digest(image)
    try:
        found = firmware_digest(Path(code))
    except OSError as exc:
        raise refuse("firmware", f"cannot read the guest's firmware {code}: {exc.strerror or exc}") from None
    if found != wanted:
        raise refuse("firmware", f"the guest runs {code} (SHA-256 {found[:16]}...), not --image {image} "
                     f"({wanted[:16]}...): the helpers and the target run --image")
    return wanted


def _check_guest_boot(vm: AttachedQemu, refuse: Any) -> int:
    """The test guest's kernel, initramfs and command line; returns the
    workload's MiB, read from the initramfs's /init."""
    kernel = str(vm.qmp("qom-get", path="/machine", property="kernel"))
    if not kernel or _digest(Path(kernel)) != _digest(guest.kernel()):
        raise refuse("kernel", f"the guest booted {kernel or 'no -kernel'}, not the test guest's {guest.kernel()}")
    initrd = str(vm.qmp("qom-get", path="/machine", property="initrd"))
    workload_mib = _workload_mib(Path(initrd)) if initrd else None
    if workload_mib is None or not 1 <= workload_mib <= MAX_GUEST_MIB // 2:
        raise refuse("initrd", f"the guest's initramfs {initrd or '(none)'} is not the test guest's workload "
                     "initramfs")
    if _digest(Path(initrd)) != _digest(guest.workload_initramfs(workload_mib)):
        raise refuse("initrd", f"the guest's initramfs {initrd} runs a {workload_mib} MiB workload but is not "
                     "the one this project builds for it (another busybox, workload or tick)")
    append = vm.qmp("qom-get", path="/machine", property="append")
    if append != guest.KERNEL_APPEND:
        raise refuse("append", f"the guest's kernel command line is {append!r}, not {guest.KERNEL_APPEND!r}")
    return workload_mib


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _workload_mib(initrd: Path) -> int | None:
    """The MiB argument of /init's ``exec /bin/workload MIB ...`` line."""
    with suppress(OSError, EOFError, gzip.BadGzipFile):
        found = WORKLOAD_INIT.search(gzip.decompress(initrd.read_bytes()))
        if found:
            return int(found.group(1))
    return None


def restore(source: SourceGuest) -> None:
    """Put back what the migration changed on an attached QEMU that still
    runs: the x-ignore-shared capability (a later plain migration of the
    guest would otherwise skip its RAM)."""
    if not source.attached or not source.vm.is_running() or source.vm.is_stopped():
        return
    with suppress(QemuError):
        if source.vm.qmp("query-migrate").get("status") not in ("active", "setup", "device"):
            source.vm.qmp("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": source.ignore_shared_before}])
