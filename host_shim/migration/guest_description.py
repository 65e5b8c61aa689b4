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

#: The one guest this step migrates: the project's test guest (Debian's
#: cloud kernel, the busybox initramfs and the workload), which each host
#: builds from its own copy of the project.
GUEST_KINDS = ("ovmf-mh-test-guest",)
MACHINES = ("q35",)
ACCELERATORS = ("tcg",)
CPUS = ("max",)
MIN_GUEST_MIB = 256
#: The helpers map and track guests of up to 16 GiB (tested; their window and
#: page tracking come from request version 2, docs/fw-cfg-request.md).
MAX_GUEST_MIB = 16384
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


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
    return GuestDescription(guest, machine, accel, cpu, memory_mib, workload_mib, sent_shards, digest)
