"""Boot an image under QEMU and report what it reached.

normal: no helper request; the image must boot the real guest (Debian cloud
        kernel + busybox initramfs) to userspace, and must not divert. With
        the Debian guest, the firmware boots a Debian 12 disk through BDS
        and systemd-boot, and the guest must reach multi-user.target.
helper: with a valid request; the helper must publish READY, must not reach
        PEI, must answer QUERY, and must power off on SHUTDOWN.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from helper import abi
from host_shim import paths
from host_shim.errors import OvmfMhError, SetupError
from host_shim.helpers.helper_vm import HelperSpec, HelperVM
from host_shim.vm import debian_vm, guest, guest_image
from host_shim.vm.devices import DeviceModel, NicBackend
from host_shim.vm.qemu import QemuConfig, QemuLogs, QemuVM

DIVERSION_MARKER = "SEC diverts into the migration helper"
READY_MARKER = "ovmf-mh: READY"
# Lines that only appear once SEC has handed over to the PEI core.
PEI_MARKERS = ("Loading PEIM", "PeiCore", "Platform PEIM Loaded")


class BootMode(enum.Enum):
    NORMAL = "normal"
    HELPER = "helper"


@dataclass
class BootOutcome:
    mode: BootMode
    ok: bool
    reached: str
    seconds: float | None
    logs: QemuLogs
    details: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        verdict = "OK" if self.ok else "FAILED"
        when = f" after {self.seconds:.2f} s" if self.seconds is not None else ""
        lines = [f"boot {self.mode.value}: {verdict}: reached {self.reached}{when}"]
        lines += [f"  {d}" for d in self.details]
        lines.append(f"  logs in {self.logs.work_dir}:")
        lines += [f"    {name:9} {path}" for name, path in self.logs.as_dict().items()]
        return lines

    def as_json(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "ok": self.ok,
            "reached": self.reached,
            "seconds": self.seconds,
            "details": self.details,
            "logs": {k: str(v) for k, v in self.logs.as_dict().items()},
        }


def vars_for(image: Path) -> Path | None:
    """The variable store that goes with a split OVMF_CODE image, if any."""
    name = image.name
    if "CODE" not in name:
        return None
    candidate = image.with_name(name.replace("CODE", "VARS"))
    return candidate if candidate.is_file() else None


def resolve_image(image: Path | None, target: str = "DEBUG") -> Path:
    path = image if image is not None else paths.firmware_code(target)
    if not path.is_file():
        hint = "build it with 'ovmf-mh build'" if image is None else "check the path"
        raise SetupError(f"firmware image {path} not found; {hint}")
    return path.resolve()


def _boot_normal(image: Path, work_dir: Path, timeout: float) -> BootOutcome:
    config = QemuConfig(
        firmware_code=image,
        firmware_vars=vars_for(image),
        memory_mib=256,
        kernel=guest.kernel(),
        initrd=guest.initramfs(guest.BOOT_CHECK_INIT),
        append=guest.KERNEL_APPEND,
    )
    with QemuVM(config, work_dir, "normal") as vm:
        seconds = vm.wait_for_log(vm.logs.serial, guest.USERSPACE_MARKER, timeout)
        # The guest powers itself off after printing the marker.
        exit_code = None
        if seconds is not None:
            try:
                exit_code = vm.wait_exit(30)
            except OvmfMhError:
                exit_code = None
        debugcon = vm.debugcon_text()
    details = []
    diverted = DIVERSION_MARKER in debugcon
    if diverted:
        details.append("debugcon shows a helper diversion although no request was given")
    if seconds is None:
        details.append(f"serial log never showed {guest.USERSPACE_MARKER!r} within {timeout:.0f} s")
        tail = [line for line in vm.serial_text().splitlines() if line.strip()][-5:]
        details += [f"serial: {line}" for line in tail]
    else:
        details.append(f"guest powered off, QEMU exit code {exit_code}")
    ok = seconds is not None and not diverted
    reached = "guest userspace" if seconds is not None else "no userspace"
    return BootOutcome(BootMode.NORMAL, ok, reached, seconds, vm.logs, details)


#: OVMF's BDS writes "[Bds] Expand <device path>" to debugcon when it expands
#: a boot option to the removable-media path on a disk it found.
BDS_EXPAND_MARKER = "[Bds] Expand"
REMOVABLE_MEDIA_PATH = "\\EFI\\BOOT\\BOOTX64.EFI"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _echo(port: int, timeout: float) -> str | None:
    """Send bytes to the guest's echo service through QEMU's user network;
    what came back, or None if nothing did within ``timeout``."""
    payload = os.urandom(4096)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(payload)
                received = b""
                while len(received) < len(payload):
                    chunk = conn.recv(len(payload) - len(received))
                    if not chunk:
                        break
                    received += chunk
        except OSError:
            received = b""
        if received == payload:
            return f"{len(payload)} bytes echoed back unchanged"
        time.sleep(1)
    return None


def _boot_debian(image: Path, work_dir: Path, timeout: float) -> BootOutcome:
    disk = guest_image.overlay(work_dir / "disk.qcow2")
    ram = work_dir / "guest.ram"
    with ram.open("wb") as f:
        f.truncate(debian_vm.DEFAULT_MIB * 1024 * 1024)
    port = _free_port()
    devices = DeviceModel(vcpus=2, disk=disk, nic=NicBackend("user", forward=(port, guest_image.ECHO_PORT)))
    config = debian_vm.config(image, ram, debian_vm.DEFAULT_MIB * 1024 * 1024, devices)
    details: list[str] = []
    try:
        with QemuVM(config, work_dir, "debian") as vm:
            seconds = vm.wait_for_log(vm.logs.serial, guest_image.MULTI_USER_MARKER, timeout)
            beat = echoed = None
            if seconds is not None:
                beat = vm.wait_for_log(vm.logs.serial, guest.HEARTBEAT, 30)
                echoed = _echo(port, 60)
            debugcon = vm.debugcon_text()
            serial = vm.serial_text()
    finally:
        ram.unlink(missing_ok=True)
    bds = [line.strip() for line in debugcon.splitlines()
           if BDS_EXPAND_MARKER in line and REMOVABLE_MEDIA_PATH in line]
    details += bds[-1:] or [f"debugcon shows BDS expanding no boot option to {REMOVABLE_MEDIA_PATH}"]
    if DIVERSION_MARKER in debugcon:
        details.append("debugcon shows a helper diversion although no request was given")
    ready = [line.strip() for line in serial.splitlines() if guest_image.MULTI_USER_MARKER in line]
    if seconds is None:
        details.append(f"serial log never showed {guest_image.MULTI_USER_MARKER!r} within {timeout:.0f} s")
        details += [f"serial: {line}" for line in serial.splitlines() if line.strip()][-8:]
    else:
        details += ready[:1]
        details.append("workload heartbeat seen" if beat is not None else "no workload heartbeat within 30 s")
        details.append(f"TCP echo service (guest port {guest_image.ECHO_PORT}): {echoed or 'no answer within 60 s'}")
    ok = seconds is not None and beat is not None and bool(bds) and DIVERSION_MARKER not in debugcon \
        and echoed is not None
    reached = "Debian multi-user.target" if seconds is not None else "no multi-user.target"
    return BootOutcome(BootMode.NORMAL, ok, reached, seconds, vm.logs, details)


def _boot_helper(image: Path, work_dir: Path, timeout: float) -> BootOutcome:
    a = abi.load()
    details: list[str] = []
    with HelperVM(HelperSpec(firmware_code=image), work_dir) as helper:
        start = time.monotonic()
        header = helper.wait_ready(timeout)
        seconds = (helper.vm.started_at and time.monotonic() - helper.vm.started_at) or (
            time.monotonic() - start
        )
        details.append(
            f"READY: ABI {header['AbiMajor']}.{header['AbiMinor']}, build "
            f"{bytes(header['BuildId']).hex()}, capabilities {header['Capabilities']:#x}"
        )
        assert helper.mailbox is not None
        query = helper.mailbox.call("QUERY")
        details.append(f"QUERY answered in {query.seconds * 1e6:.0f} us: {list(query.results)}")
        exit_code = helper.shutdown(timeout=30)
        details.append(f"SHUTDOWN: QEMU exited with code {exit_code}")
        debugcon = helper.vm.debugcon_text()
    pei = [m for m in PEI_MARKERS if m in debugcon]
    if pei:
        details.append(f"debugcon shows PEI activity: {pei}")
    if DIVERSION_MARKER not in debugcon:
        details.append("debugcon lacks the diversion message")
    ok = not pei and DIVERSION_MARKER in debugcon and exit_code == 0
    expected_abi = (a.const("OVMF_MH_ABI_MAJOR"), a.const("OVMF_MH_ABI_MINOR"))
    if (header["AbiMajor"], header["AbiMinor"]) != expected_abi:
        details.append(f"ABI mismatch: host expects {expected_abi}")
        ok = False
    return BootOutcome(BootMode.HELPER, ok, "helper READY", seconds, helper.vm.logs, details)


def boot_image(image: Path, mode: BootMode, work_dir: Path, timeout: float = 60.0,
               guest_kind: str = "test") -> BootOutcome:
    """Boot ``image`` in ``mode`` (normal mode: the test guest or the Debian
    guest); the outcome says whether it reached what the mode expects. QEMU
    is always stopped before this returns."""
    if not image.is_file():
        raise SetupError(f"firmware image {image} not found; build it with 'ovmf-mh build'")
    work_dir.mkdir(parents=True, exist_ok=True)
    if guest_kind == "debian":
        if mode is not BootMode.NORMAL:
            raise SetupError("--guest debian boots in normal mode only (--mode normal)")
        return _boot_debian(image, work_dir, timeout)
    if mode is BootMode.NORMAL:
        return _boot_normal(image, work_dir, timeout)
    return _boot_helper(image, work_dir, timeout)
