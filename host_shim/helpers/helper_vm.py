"""Helper VMs: QEMU running the ovmf-mh firmware in helper mode.

Memory layout (mirror-VM emulation, DESIGN.md): the helper VM's own RAM is
a shared memory file the host maps; when the helper serves a guest, the
guest's RAM file is a second NUMA node, so guest offset X is byte
own_ram_size + X of the helper VM's RAM. Helper VMs are q35 machines with
``max-ram-below-4g=2G``: RAM past 2 GiB continues at 4 GiB, so a large
guest's window is two ranges (own_ram_size .. 2 GiB, then 4 GiB ..). The
fw_cfg request (version 2) names the mailbox, the work area right after it
(session state and page tracking, sized from the window) and those ranges.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from helper import abi
from host_shim.errors import MailboxError, QemuError, SetupError
from host_shim.helpers.helper_memory import HelperMemory
from host_shim.helpers.mailbox import Mailbox
from host_shim.helpers.request import HELPER_RAM_BELOW_4G, HelperRequest, fw_cfg_name, window_ranges, work_area_size
from host_shim.vm.qemu import MemoryBackend, QemuConfig, QemuVM

MIB = 1024 * 1024
DEFAULT_OWN_RAM = 64 * MIB
DEFAULT_MAILBOX_SIZE = 16 * MIB
# QEMU rounds the machine's RAM size up to 8 KiB; NUMA nodes must add up to it.
QEMU_RAM_ALIGNMENT = 8192
#: Seconds a helper gets to answer SHUTDOWN and power off when it is closed.
SHUTDOWN_TIMEOUT = 2.0


#: The helper VM's machine, as small as q35 allows (docs/fw-cfg-request.md): no
#: 8259 PIC, no PIT, no HPET, no SMBus, no SATA, no vmport, no i8042;
#: q35 keeps its IO-APIC and the ICH9 LPC bridge (fw_cfg, the ACPI PM block).
HELPER_MACHINE = (f"q35,max-ram-below-4g={HELPER_RAM_BELOW_4G},pic=off,pit=off,hpet=off,smbus=off,sata=off,"
                  "vmport=off,graphics=off,i8042=off")
#: No local APIC: QMP inject-nmi then raises the NMI on the CPU itself (with a
#: local APIC, QEMU routes it through LINT1, masked after reset).
HELPER_CPU = "max,-apic"

#: Own RAM grows in steps of this much when the work area needs more.
OWN_RAM_STEP = 2 * MIB


@dataclass(frozen=True)
class IdlePolicy:
    """The optional fw_cfg idle policy (OVMF_MH_IDLE_POLICY, docs/mailbox.md):
    benches and tests only. ``never_halt`` is the spinning baseline;
    ``stretch_us`` a test knob that widens the halt window."""

    spin_us: int = field(default_factory=lambda: int(abi.load().const("OVMF_MH_IDLE_DEFAULT_SPIN_US")))
    never_halt: bool = False
    stretch_us: int = 0
    signature: int | None = None  # None: the right one; tests override it

    def encode(self) -> bytes:
        a = abi.load()
        return a.layout("OVMF_MH_IDLE_POLICY").pack(
            Signature=a.const("OVMF_MH_IDLE_POLICY_SIGNATURE") if self.signature is None else self.signature,
            Flags=a.const("OVMF_MH_IDLE_POLICY_NEVER_HALT") if self.never_halt else 0,
            SpinMicroseconds=self.spin_us,
            WindowStretchMicroseconds=self.stretch_us,
        )


#: Bench knob (docs/testing.md, "Idle helpers"): ``never-halt`` gives every
#: helper VM whose spec names no idle policy the NEVER_HALT policy, so that a
#: whole test run can be timed with spinning helpers beside one with the
#: default (``ovmf-mh bench suite``). Unset or ``default``: the firmware's
#: default. Any other value is refused.
IDLE_POLICY_ENV = "OVMF_MH_BENCH_IDLE_POLICY"


def idle_policy_from_env() -> IdlePolicy | None:
    """The idle policy IDLE_POLICY_ENV forces, or None (the default)."""
    value = os.environ.get("OVMF_MH_BENCH_IDLE_POLICY", "")  # IDLE_POLICY_ENV, spelled out for tests/test_docs.py
    if value in ("", "default"):
        return None
    if value == "never-halt":
        return IdlePolicy(never_halt=True)
    raise SetupError(f"{IDLE_POLICY_ENV}={value!r}: expected 'never-halt' or 'default' (a bench knob, "
                     "docs/testing.md)")


@dataclass
class HelperSpec:
    firmware_code: Path
    own_ram: int | None = None  # None: DEFAULT_OWN_RAM, or more when the work area needs it
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    guest_ram: Path | None = None
    key: bytes | None = None  # transport key, injected as the launch secret
    request_override: bytes | None = None  # raw blob, for tests of bad requests
    request_flags: int = 0  # OVMF_MH_REQUEST_* flags, e.g. NO_VECTOR_CRYPTO
    idle_policy: IdlePolicy | None = None  # None: the firmware's default (spin, then halt)

    @property
    def mailbox_base(self) -> int:
        return int(abi.load().const("OVMF_MH_MAILBOX_MIN_BASE"))

    @property
    def guest_size(self) -> int:
        return self.guest_ram.stat().st_size if self.guest_ram else 0

    @property
    def work_area_base(self) -> int:
        return self.mailbox_base + self.mailbox_size

    @property
    def work_area_size(self) -> int:
        return work_area_size(self.guest_size)

    @property
    def own_ram_size(self) -> int:
        if self.own_ram is not None:
            return self.own_ram
        needed = self.work_area_base + self.work_area_size
        return max(DEFAULT_OWN_RAM, -(-needed // OWN_RAM_STEP) * OWN_RAM_STEP)

    def request(self) -> HelperRequest:
        window = self.guest_size
        return HelperRequest(
            mailbox_base=self.mailbox_base,
            mailbox_size=self.mailbox_size,
            work_area_base=self.work_area_base,
            work_area_size=self.work_area_size,
            window=window_ranges(self.own_ram_size, window, self.own_ram_size + window) if window else (),
            flags=self.request_flags,
        )


class HelperVM:
    """A helper VM with its own RAM mapped on the host. Context manager."""

    def __init__(self, spec: HelperSpec, work_dir: Path, name: str = "helper") -> None:
        self.spec = spec
        self.work_dir = work_dir
        self.name = name
        self.request_file = work_dir / "request.bin"
        self.idle_policy_file = work_dir / "idle-policy.bin"
        self._memory: HelperMemory | None = None
        self.mailbox: Mailbox | None = None
        self.ready_header: dict[str, Any] | None = None
        #: The thread that sends wakes (wake_async), made at the first one.
        self._waker: ThreadPoolExecutor | None = None
        #: The spec's idle policy, else the one the bench knob forces.
        self.idle_policy = spec.idle_policy if spec.idle_policy is not None else idle_policy_from_env()
        # The own-RAM file is made at start, in a private folder (helper_memory.py).
        memory = [MemoryBackend("own", Path("/nonexistent"), spec.own_ram_size)]
        if spec.guest_ram is not None:
            guest_size = spec.guest_ram.stat().st_size
            if guest_size == 0 or guest_size % QEMU_RAM_ALIGNMENT:
                raise SetupError(
                    f"guest RAM {spec.guest_ram} is {guest_size} bytes; firmware helpers map it as a QEMU "
                    f"memory backend, whose size must be a positive multiple of {QEMU_RAM_ALIGNMENT // 1024} KiB"
                )
            memory.append(MemoryBackend("guest", spec.guest_ram, spec.guest_ram.stat().st_size))
        self.vm = QemuVM(
            QemuConfig(
                firmware_code=spec.firmware_code,
                machine=HELPER_MACHINE,
                cpu=HELPER_CPU,
                memory=memory,
                numa=len(memory) > 1,
                fw_cfg_files=[(fw_cfg_name(), self.request_file)] + (
                    [(abi.load().strings["OVMF_MH_IDLE_POLICY_FW_CFG_NAME"], self.idle_policy_file)]
                    if self.idle_policy is not None else []),
            ),
            work_dir,
            name,
        )

    def __enter__(self) -> HelperVM:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Create the RAM file and request, start QEMU; does not wait for READY."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        blob = self.spec.request_override or self.spec.request().encode()
        self.request_file.write_bytes(blob)
        if self.idle_policy is not None:
            self.idle_policy_file.write_bytes(self.idle_policy.encode())
        self._memory = HelperMemory(self.spec.own_ram_size, self.spec.key)
        self.vm.config.memory[0] = MemoryBackend("own", self._memory.path, self.spec.own_ram_size)
        if self.spec.mailbox_base + self.spec.mailbox_size <= self.spec.own_ram_size:
            self.mailbox = Mailbox(
                self._memory.map,
                self.spec.mailbox_base,
                self.spec.mailbox_size,
                is_alive=self.vm.is_running,
                debugcon=self.vm.logs.debugcon,
                label=f"{self.name} (helper VM)",
            )
        # else: only deliberately broken requests (tests) get here: the helper
        # must refuse them, and the host has no mapping of that mailbox.
        self.vm.start()
        # QMP answers only once QEMU has mapped its memory backends: the file
        # holding the key loses its name now.
        self._memory.unlink()
        if self.mailbox is not None:
            self.mailbox.label = f"{self.name} (helper VM, QEMU pid {self.vm.pid})"
            self.mailbox.pid = self.vm.pid
            self.mailbox.wake = self.wake_async

    def wake(self) -> None:
        """Wake the halted helper: an NMI through QMP (its vCPU has no local
        APIC, so QEMU raises the NMI on the CPU directly), in the fewest
        bytes QMP takes (QemuVM.qmp_bare); returns once QEMU replied."""
        self.vm.qmp_bare("inject-nmi")

    def wake_async(self) -> Future[object]:
        """Send the wake from this helper's waker thread and return at once:
        the mailbox polls for the answer meanwhile (QEMU raises the NMI before
        it replies, so the helper's answer usually comes first) and reads the
        Future later, so a failed wake is still reported. Wakes run one after
        the other, in the order sent."""
        if self._waker is None:
            self._waker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-wake")
        return self._waker.submit(self.wake)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.mailbox is None:
            raise QemuError(f"{self.name}: not started")
        try:
            self.ready_header = self.mailbox.wait_ready(timeout)
        except MailboxError as exc:
            exc.args = (f"{exc.args[0]}; QEMU logs in {self.work_dir}",)
            raise
        return self.ready_header

    def shutdown(self, timeout: float = 10.0) -> int:
        """Orderly shutdown through the mailbox; returns QEMU's exit code."""
        if self.mailbox is None:
            raise QemuError(f"{self.name}: not started")
        self.mailbox.call("SHUTDOWN")
        return self.vm.wait_exit(timeout)

    @property
    def memory(self) -> mmap.mmap:
        if self._memory is None:
            raise QemuError(f"{self.name}: not started")
        return self._memory.map

    @property
    def mailbox_base(self) -> int:
        return self.spec.mailbox_base

    def close(self) -> None:
        """SHUTDOWN (the helper wipes its keys and powers off) when it is idle
        and answering, then QMP quit and SIGKILL, each bounded in time."""
        if (self.mailbox is not None and self.ready_header is not None
                and self.mailbox.shutdown_if_idle(SHUTDOWN_TIMEOUT)):
            with suppress(QemuError):
                self.vm.wait_exit(SHUTDOWN_TIMEOUT)
        if self._waker is not None:
            # A wake still queued is moot now; the one in flight ends with
            # its QMP reply (or QEMU's exit) before stop() closes the
            # connection it runs on.
            self._waker.shutdown(wait=True, cancel_futures=True)
            self._waker = None
        self.vm.stop()
        if self.mailbox is not None:
            self.mailbox.release()
        self.mailbox = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None
