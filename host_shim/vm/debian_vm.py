"""The Debian guest's QEMU configuration: booted by the firmware from its
disk (no -kernel), RAM in a shared memory file like the test guest's, the
devices of a :class:`~host_shim.vm.devices.DeviceModel`."""

from __future__ import annotations

from pathlib import Path

from host_shim.vm.devices import DeviceModel
from host_shim.vm.qemu import MemoryBackend, QemuConfig

GUEST_KINDS = ("test", "debian")
DEFAULT_MIB = 512


def config(image: Path, ram: Path, size: int, devices: DeviceModel, *, incoming: bool = False,
           wrapper: list[str] | None = None) -> QemuConfig:
    """Source and target differ in their RAM file and -incoming only."""
    from host_shim.firmware.boot import vars_for

    if devices.disk is None:
        raise ValueError("the Debian guest boots from its disk: the device model needs one")
    return QemuConfig(
        firmware_code=image,
        firmware_vars=vars_for(image),
        memory=[MemoryBackend("ram", ram, size)],
        incoming="defer" if incoming else None,
        extra_args=devices.qemu_args() + (["-S"] if incoming else []),
        wrapper=list(wrapper or []),
    )
