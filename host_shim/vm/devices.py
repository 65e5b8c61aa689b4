"""The devices of a disk-booted guest as data, and the QEMU arguments for them.

A :class:`DeviceModel` holds only what the allow-list of the guest
description admits (docs/migration.md, "The device allow-list"): vCPUs, one
virtio-blk-pci disk, one virtio-net-pci NIC, one virtio-rng-pci. The serial
port and isa-debugcon every guest has come from :mod:`host_shim.vm.qemu`.
The NIC's host side is each host's own choice (:class:`NicBackend`), never
part of what a source sends.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from host_shim.errors import SetupError

MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
#: QEMU's own prefix for locally administered NIC addresses.
DEFAULT_MAC = "52:54:00:12:34:56"
DISK_FORMATS = ("raw", "qcow2")
NIC_BACKENDS = ("none", "user", "tap")


@dataclass(frozen=True)
class NicBackend:
    """The host side of the guest's NIC: nothing (the guest sees a NIC with
    no link partner), QEMU's user network, or a tap device this host names."""

    kind: str = "none"
    tap: str | None = None
    #: With the user network: this host's loopback port forwarded to the guest's echo port.
    forward: tuple[int, int] | None = None

    def qemu_args(self, netdev_id: str) -> list[str]:
        if self.kind == "user":
            if self.forward is not None:
                host_port, guest_port = self.forward
                return ["-netdev", f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"]
            return ["-netdev", f"user,id={netdev_id}"]
        if self.kind == "tap":
            if self.tap is None:
                raise ValueError("a tap NIC backend needs the tap's name")
            return ["-netdev", f"tap,id={netdev_id},ifname={self.tap},script=no,downscript=no"]
        if self.kind == "none":
            return []
        raise ValueError(f"unknown NIC backend {self.kind!r}")


TAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def parse_nic(text: str) -> NicBackend:
    """--nic none|user|tap:NAME (a Linux interface name, checked)."""
    if text in ("none", "user"):
        return NicBackend(text)
    if text.startswith("tap:") and TAP_NAME.fullmatch(text[4:]):
        return NicBackend("tap", text[4:])
    raise SetupError(f"--nic {text!r}: one of none, user, tap:NAME (NAME a network interface name, at most "
                     "15 letters, digits, '_', '.' or '-')")


def present_nic(nic: NicBackend) -> NicBackend:
    """``nic``, once its tap exists in this process's network namespace
    (QEMU opens it there); SetupError saying how to make it otherwise."""
    if nic.kind == "tap" and nic.tap is not None:
        try:
            socket.if_nametoindex(nic.tap)
        except OSError:
            raise SetupError(f"--nic tap:{nic.tap}: no network interface {nic.tap!r} in this host's network namespace; "
                             f"create the tap first (e.g. 'ip tuntap add dev {nic.tap} mode tap', then put it on a "
                             "bridge)") from None
    return nic


@dataclass(frozen=True)
class DeviceModel:
    vcpus: int = 2
    disk: Path | None = None
    disk_format: str = "qcow2"
    mac: str | None = DEFAULT_MAC
    nic: NicBackend = NicBackend()
    rng: bool = True

    def qemu_args(self) -> list[str]:
        """-smp and -device arguments (pure). The disk is the boot device:
        the firmware's BDS finds it and starts the boot loader at the
        removable-media path. The disk goes through the host's page cache
        (cache=writeback): what QEMU reads from it into guest RAM is then an
        ordinary write through the RAM file's mapping, which the dirty log of
        the RAM file sees (O_DIRECT would fill pinned pages instead)."""
        argv = ["-smp", str(self.vcpus)]
        if self.disk is not None:
            argv += ["-drive", f"if=none,id=disk0,file={self.disk},format={self.disk_format},cache=writeback",
                     "-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
        if self.mac is not None:
            backend = self.nic.qemu_args("net0")
            netdev = ",netdev=net0" if backend else ""
            argv += [*backend, "-device", f"virtio-net-pci,mac={self.mac}{netdev},romfile="]
        if self.rng:
            argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
        return argv
