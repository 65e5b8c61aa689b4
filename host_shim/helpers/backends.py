"""Helper backends behind one small interface.

A :class:`Backend` is one migration helper as the host drives it: ``data``
(the data area after the mailbox header), ``window`` (guest RAM as the
helper sees it) and ``call(command, *args) -> (status, results)``. The
pipeline, the conformance suite and the benchmarks use only this.

* ``firmware``: the built OVMF image in helper mode under QEMU, guest RAM
  file as its second NUMA node (DESIGN.md mirror-VM emulation);
* ``reference``: the Python reference helper (helper/reference.py) in a
  process of its own (helper/serve.py) behind the same kind of mailbox, so
  that it works while the host writes (``ReferenceBackend`` is the same
  helper in-process, for the conformance suite and the benchmarks);
* ``host-core``: the firmware's C dispatcher built for the host.

There is no fallback between them: asking for ``firmware`` without a built
image is an error that says how to build it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol

from helper import abi
from helper.reference import ReferenceHelper, SaltSource
from host_shim.errors import SetupError
from host_shim.helpers.helper_vm import MIB, HelperSpec, HelperVM
from host_shim.helpers.hostcore_helper import HostCoreHelper
from host_shim.helpers.keys import secret_record
from host_shim.helpers.mailbox import DEFAULT_TIMEOUT, Mailbox, command_code
from host_shim.helpers.reference_process import ReferenceHelperProcess

KINDS = ("firmware", "reference", "host-core")
DATA_SIZE = 16 * MIB - 4096


class Backend(Protocol):
    @property
    def data(self) -> memoryview: ...

    @property
    def window(self) -> memoryview: ...

    def call(self, command: str | int, *args: int) -> tuple[int, tuple[int, ...]]: ...


class ReferenceBackend:
    def __init__(
        self,
        window: mmap.mmap | bytearray,
        key: bytes | None,
        data_size: int = DATA_SIZE,
        salt_source: SaltSource = os.urandom,
    ) -> None:
        secret = bytearray(secret_record(key)) if key is not None else None
        self.helper = ReferenceHelper(window, bytearray(data_size), secret, salt_source=salt_source)

    @property
    def data(self) -> memoryview:
        return self.helper.data

    @property
    def window(self) -> memoryview:
        return self.helper.window

    def call(self, command: str | int, *args: int) -> tuple[int, tuple[int, ...]]:
        code = command if isinstance(command, int) else command_code(command)
        return self.helper.dispatch(code, args)

    def release(self) -> None:
        self.helper.window.release()
        self.helper.data.release()


class MailboxBackend:
    """A helper behind a shared mailbox: a firmware helper VM or a reference
    helper process. ``call`` raises MailboxError when the helper dies or stalls."""

    def __init__(
        self,
        mailbox: Mailbox,
        memory: mmap.mmap,
        mailbox_base: int,
        window: mmap.mmap | None,
        data_size: int,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.mailbox = mailbox
        self.memory = memory  # the helper's own RAM (tests search it for key bytes)
        self.timeout = timeout
        base = mailbox_base + abi.load().const("OVMF_MH_MAILBOX_HEADER_SIZE")
        self._data = memoryview(memory)[base : base + data_size]
        self._window = memoryview(window) if window is not None else memoryview(b"")

    @property
    def label(self) -> str:
        return self.mailbox.label

    @property
    def data(self) -> memoryview:
        return self._data

    @property
    def window(self) -> memoryview:
        return self._window

    def call(self, command: str | int, *args: int) -> tuple[int, tuple[int, ...]]:
        response = self.mailbox.post_and_wait(command, tuple(args), timeout=self.timeout)
        return response.status, response.results

    def release(self) -> None:
        self._data.release()
        self._window.release()


class MailboxHelper(Protocol):
    """What a helper VM and a reference helper process both offer the host."""

    name: str

    @property
    def mailbox(self) -> Mailbox | None: ...

    @property
    def memory(self) -> mmap.mmap: ...

    @property
    def mailbox_base(self) -> int: ...


def mailbox_backend(
    helper: MailboxHelper, window: mmap.mmap | None, data_size: int, timeout: float = DEFAULT_TIMEOUT
) -> MailboxBackend:
    """The backend of a helper VM or reference helper process that reached READY."""
    if helper.mailbox is None:
        raise SetupError(f"{helper.name}: not started")
    return MailboxBackend(helper.mailbox, helper.memory, helper.mailbox_base, window, data_size, timeout)


def check_guest_size(kind: str, guest_size: int) -> None:
    """Refuse, before anything starts, a guest that helpers of ``kind``
    cannot map: a firmware helper maps the guest RAM as its window, at most
    OVMF_MH_MAX_WINDOW_SIZE bytes (docs/fw-cfg-request.md)."""
    limit = abi.load().const("OVMF_MH_MAX_WINDOW_SIZE")
    if kind == "firmware" and guest_size > limit:
        raise SetupError(f"a {guest_size}-byte guest is larger than firmware helpers map: at most {limit} bytes "
                         f"({limit >> 30} GiB, OVMF_MH_MAX_WINDOW_SIZE)")


@contextmanager
def open_backends(
    kind: str,
    count: int,
    ram: Path,
    key: bytes | None,
    work_dir: Path,
    *,
    firmware: Path | None = None,
    writable: bool = True,
    mailbox_timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[list[Backend]]:
    """Start ``count`` helpers of one kind over the guest RAM file ``ram``.

    Firmware helpers boot in parallel and must all reach READY; any failure
    stops every helper already started (by pid) before the error propagates.
    ``mailbox_timeout`` bounds every command: a helper that answers none
    within it (stopped, wedged) fails the transfer.
    """
    side = "target" if writable else "source"
    if kind not in KINDS:
        raise SetupError(f"unknown helper kind {kind!r}; choose one of {', '.join(KINDS)}")
    if count < 1:
        raise SetupError("at least one helper is needed")
    size = ram.stat().st_size
    check_guest_size(kind, size)
    with ExitStack() as stack:
        handle = stack.enter_context(ram.open("r+b" if writable else "rb"))
        # A source is mapped copy-on-write: helpers that want a writable view
        # get one, and nothing they do reaches the file.
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
        window = stack.enter_context(mmap.mmap(handle.fileno(), size, access=access))
        backends: list[Backend] = []
        if kind == "firmware":
            if firmware is None or not firmware.is_file():
                raise SetupError(
                    f"firmware image {firmware} not found: build it with 'ovmf-mh build' "
                    "(or choose --helper reference explicitly)"
                )
            vms = []
            for index in range(count):
                spec = HelperSpec(firmware, guest_ram=ram, key=key, mailbox_size=DATA_SIZE + 4096)
                vm = stack.enter_context(HelperVM(spec, work_dir / f"helper-{index}", f"{side} helper-{index}"))
                vms.append(vm)
            for vm in vms:
                vm.wait_ready(60)
                backend = mailbox_backend(vm, window, DATA_SIZE, mailbox_timeout)
                stack.callback(backend.release)
                backends.append(backend)
        elif kind == "reference":
            processes = [
                stack.enter_context(
                    ReferenceHelperProcess(ram, key, work_dir / f"helper-{index}", f"{side} helper-{index}",
                                           target=writable, mailbox_size=DATA_SIZE + 4096)
                )
                for index in range(count)
            ]
            for process in processes:
                process.wait_ready(60)
                backend = mailbox_backend(process, window, DATA_SIZE, mailbox_timeout)
                stack.callback(backend.release)
                backends.append(backend)
        else:
            for _ in range(count):
                core = HostCoreHelper(window, key, data_size=DATA_SIZE)
                stack.callback(core.close)
                backends.append(core)
        yield backends
