"""The guest description the source sends the target (the role a domain
description plays between two libvirt hosts), and its validation on the
target as hostile input (docs/migration-protocol.md).

The target builds its QEMU command line from its own configuration and from
values this module checked against an allow-list: nothing the source sends
reaches a command line, a path or a shell unchecked.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from host_shim.errors import OvmfMhError
from host_shim.transfer import container as ct
from host_shim.vm.devices import DISK_FORMATS, MAC, DeviceModel, NicBackend

#: The guests a target rebuilds: the project's test guest (Debian's cloud
#: kernel, the busybox initramfs and the workload), which each host builds
#: from its own copy of the project, and the Debian guest the firmware boots
#: from a disk on storage both hosts see (host_shim/vm/guest_image.py).
TEST_GUEST = "ovmf-mh-test-guest"
DEBIAN_GUEST = "debian-12"
GUEST_KINDS = (TEST_GUEST, DEBIAN_GUEST)
MACHINES = ("q35",)
ACCELERATORS = ("tcg",)
CPUS = ("max",)
MIN_GUEST_MIB = 256
#: The helpers map and track guests of up to 16 GiB (tested; their window and
#: page tracking come from request version 2, docs/fw-cfg-request.md).
MAX_GUEST_MIB = 16384
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_VCPUS = 8
#: The devices a target creates, each at most once, and the fields each
#: carries (docs/migration.md, "The device allow-list"). The serial port and
#: isa-debugcon every guest has may be listed; the target makes them anyway.
DEVICE_FIELDS: dict[str, tuple[str, ...]] = {
    "virtio-blk-pci": ("type", "format", "size"),
    "virtio-net-pci": ("type", "mac"),
    "virtio-rng-pci": ("type",),
    "serial": ("type",),
    "isa-debugcon": ("type",),
}
DEVICE_TYPES = tuple(DEVICE_FIELDS)
#: Largest disk a description may announce (16 TiB).
MAX_DISK_BYTES = 1 << 44


class DescriptionError(OvmfMhError):
    """The guest description is not one this target runs; ``field`` names why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"guest description field {field!r}: {reason}")


@dataclass(frozen=True)
class GuestDescription:
    guest: str
    machine: str
    accel: str
    cpu: str
    memory_mib: int
    workload_mib: int
    shards: int
    firmware_sha256: str
    vcpus: int = 1
    devices: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["devices"] = [dict(device) for device in self.devices]
        return body

    def device(self, kind: str) -> dict[str, Any] | None:
        """The description of the one device of type ``kind``, if listed."""
        return next((d for d in self.devices if d["type"] == kind), None)


FIELDS = tuple(GuestDescription.__dataclass_fields__)


def firmware_digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DescriptionError(name, "must be an integer")
    if not low <= value <= high:
        raise DescriptionError(name, f"{value} is outside {low}..{high}")
    return value


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = body[name]
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise DescriptionError(name, f"{shown} is not one of {', '.join(allowed)}")
    return value


def _device(entry: object, index: int) -> dict[str, Any]:
    """One device of the list, checked against the allow-list, or
    DescriptionError naming ``devices[i].field`` and, for an unknown one,
    the device."""
    where = f"devices[{index}]"
    if not isinstance(entry, dict):
        raise DescriptionError(where, f"must be an object, not {type(entry).__name__}")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind not in DEVICE_FIELDS:
        shown = repr(kind)[:60] if isinstance(kind, str) else type(kind).__name__
        raise DescriptionError(f"{where}.type", f"device {shown} is not on this target's allow-list "
                               f"({', '.join(DEVICE_TYPES)}): it would not create it")
    for name in sorted(map(str, entry)):
        if name not in DEVICE_FIELDS[kind]:
            raise DescriptionError(f"{where}.{name[:40]}", f"unknown field of a {kind}")
    for name in DEVICE_FIELDS[kind]:
        if name not in entry:
            raise DescriptionError(f"{where}.{name}", f"missing from the {kind}")
    if kind == "virtio-blk-pci":
        if not isinstance(entry["format"], str) or entry["format"] not in DISK_FORMATS:
            raise DescriptionError(f"{where}.format", f"must be one of {', '.join(DISK_FORMATS)}")
        size = entry["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_DISK_BYTES:
            raise DescriptionError(f"{where}.size", f"must be an integer 1..{MAX_DISK_BYTES}")
    if kind == "virtio-net-pci":
        mac = entry["mac"]
        if not isinstance(mac, str) or not MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
            raise DescriptionError(f"{where}.mac", "must be a unicast MAC address, six lowercase hex pairs "
                                   "separated by ':'")
    return dict(entry)


def _devices(body: dict[str, Any], guest: str) -> tuple[dict[str, Any], ...]:
    entries = body["devices"]
    if not isinstance(entries, list):
        raise DescriptionError("devices", f"must be a list, not {type(entries).__name__}")
    if len(entries) > len(DEVICE_TYPES):
        raise DescriptionError("devices", f"{len(entries)} devices; this target creates at most "
                               f"{len(DEVICE_TYPES)}, one of each type")
    devices: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        device = _device(entry, index)
        if any(d["type"] == device["type"] for d in devices):
            raise DescriptionError(f"devices[{index}].type", f"a second {device['type']}: this target creates one")
        devices.append(device)
    kinds = {d["type"] for d in devices}
    if guest == DEBIAN_GUEST and "virtio-blk-pci" not in kinds:
        raise DescriptionError("devices", "the Debian guest boots from its disk: no virtio-blk-pci listed")
    extra = sorted(kinds - {"serial", "isa-debugcon"})
    if guest == TEST_GUEST and extra:
        raise DescriptionError("devices", f"the test guest has no {', '.join(extra)}")
    return tuple(devices)


def validate(body: dict[str, Any], *, firmware_sha256: str, shards: int) -> GuestDescription:
    """The description as this target runs it, or DescriptionError naming
    the first field that is unknown, missing or not allowed. ``shards`` is
    the target's own helper count; the firmware digest is its own image's."""
    for name in sorted(body):
        if name not in FIELDS:
            raise DescriptionError(str(name)[:60], "unknown field")
    for name in FIELDS:
        if name not in body:
            raise DescriptionError(name, "missing")
    guest = _choice(body, "guest", GUEST_KINDS)
    machine = _choice(body, "machine", MACHINES)
    accel = _choice(body, "accel", ACCELERATORS)
    cpu = _choice(body, "cpu", CPUS)
    memory_mib = _integer(body, "memory_mib", MIN_GUEST_MIB, MAX_GUEST_MIB)
    workload_mib = _integer(body, "workload_mib", 1, memory_mib // 2)
    sent_shards = _integer(body, "shards", 1, ct.MAX_SHARDS)
    if sent_shards != shards:
        raise DescriptionError("shards", f"the source sends {sent_shards} shard(s); this target runs {shards} "
                               "helper(s) (--helpers), one per shard")
    digest = body["firmware_sha256"]
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
        raise DescriptionError("firmware_sha256", "must be 64 lowercase hexadecimal digits")
    if digest != firmware_sha256:
        raise DescriptionError("firmware_sha256", f"the source runs firmware {digest[:16]}..., this target "
                               f"{firmware_sha256[:16]}... (--image): device state would not fit")
    vcpus = _integer(body, "vcpus", 1, MAX_VCPUS if guest == DEBIAN_GUEST else 1)
    devices = _devices(body, guest)
    return GuestDescription(guest, machine, accel, cpu, memory_mib, workload_mib, sent_shards, digest, vcpus,
                            devices)


def device_model(description: GuestDescription, disk: Path | None, nic: NicBackend) -> DeviceModel:
    """The devices this target creates for a checked description: the disk
    is this host's own path to the shared storage (never one from the
    wire), the NIC's host side this host's choice, the MAC the guest's."""
    blk = description.device("virtio-blk-pci")
    net = description.device("virtio-net-pci")
    if blk is not None and disk is None:
        raise DescriptionError("devices", "the guest has a virtio-blk-pci disk; this target was given none (--disk)")
    return DeviceModel(vcpus=description.vcpus, disk=disk if blk is not None else None,
                       disk_format=blk["format"] if blk is not None else "raw",
                       mac=net["mac"] if net is not None else None, nic=nic,
                       rng=description.device("virtio-rng-pci") is not None)


def describe_devices(model: DeviceModel, disk_size: int) -> tuple[dict[str, Any], ...]:
    """The description's device list for a source's device model."""
    devices: list[dict[str, Any]] = []
    if model.disk is not None:
        devices.append({"type": "virtio-blk-pci", "format": model.disk_format, "size": disk_size})
    if model.mac is not None:
        devices.append({"type": "virtio-net-pci", "mac": model.mac})
    if model.rng:
        devices.append({"type": "virtio-rng-pci"})
    return tuple(devices)
