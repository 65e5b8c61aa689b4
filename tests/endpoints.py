"""Helper implementations behind one small interface, for the conformance suite.

An :class:`Endpoint` is one migration helper as the host sees it: a data
area the host writes arguments into and reads results from, the guest RAM
window the helper exports from or imports into, and a mailbox ``call``. The
suite (tests/test_conformance.py) drives every implementation through this
interface only, so the same tests hold the reference helper, the host-built C
dispatcher and the firmware in QEMU to the same semantics.

Adding an implementation: write a class that satisfies :class:`Endpoint`, a
factory ``(EndpointSpec) -> context manager yielding it`` (the context
manager owns whatever must be torn down: a ctypes context, a QEMU process),
register the factory in :data:`FACTORIES` under a short name, and add the
name to ``IMPLEMENTATIONS`` in tests/test_conformance.py (with the marks it
needs, e.g. ``firmware``/``qemu``).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from helper import abi
from helper.reference import SaltSource
from host_shim import paths
from host_shim.firmware.build import build_firmware
from host_shim.helpers.backends import ReferenceBackend, mailbox_backend
from host_shim.helpers.helper_vm import HelperSpec, HelperVM
from host_shim.helpers.hostcore_helper import HostCoreHelper


class Endpoint(Protocol):
    """One helper as the host drives it.

    ``data``
        The data area (the shared area after the 4 KiB mailbox header), as a
        writable byte view: ``Arg[]`` offsets point into it.
    ``window``
        Guest RAM as the helper sees it, as a writable byte view: the suite
        fills a source's pages here and reads a target's pages back.
    ``call(command, *args)``
        Post one command and wait for its answer; returns ``(Status,
        Result[0..5])``. ``command`` is the name after ``OVMF_MH_CMD_``
        (``"EXPORT_BATCH"``) or a raw code (for UNSUPPORTED tests); missing
        arguments are zero; every argument is a UINT64. A non-success status
        is returned, never raised: the statuses are what the suite checks.
    """

    @property
    def data(self) -> memoryview: ...

    @property
    def window(self) -> memoryview: ...

    def call(self, command: str | int, *args: int) -> tuple[int, tuple[int, ...]]: ...


@dataclass(frozen=True)
class EndpointSpec:
    """What the suite asks of a helper: sizes and the injected transport key
    (None: no launch secret, the helper has no key)."""

    window_size: int
    data_size: int
    transport_key: bytes | None


EndpointFactory = Callable[[EndpointSpec], AbstractContextManager[Endpoint]]


def ReferenceEndpoint(spec: EndpointSpec, salt_source: SaltSource = os.urandom) -> ReferenceBackend:
    """The Python reference helper (helper/reference.py) in-process."""
    return ReferenceBackend(bytearray(spec.window_size), spec.transport_key, spec.data_size, salt_source)


@contextmanager
def open_reference(spec: EndpointSpec) -> Iterator[Endpoint]:
    yield ReferenceEndpoint(spec)


#: Implementations by name; tests/test_conformance.py picks from these.
FACTORIES: dict[str, EndpointFactory] = {
    "reference": open_reference,
}


@contextmanager
def open_host_core(spec: EndpointSpec) -> Iterator[Endpoint]:
    """The firmware's C dispatcher built for the host (host_shim.helpers.hostcore_helper)."""
    helper = HostCoreHelper(bytearray(spec.window_size), spec.transport_key, data_size=spec.data_size)
    try:
        yield helper
    finally:
        helper.close()


@contextmanager
def open_firmware(spec: EndpointSpec) -> Iterator[Endpoint]:
    image = build_firmware("DEBUG", show_progress=False)
    root = paths.REPO_ROOT / "work" / "tests" / "conformance"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="firmware-", dir=root))
    guest = work / "guest.ram"
    with guest.open("wb") as new:
        new.truncate(spec.window_size)
    page = abi.load().const("OVMF_MH_PAGE_SIZE")
    mailbox_size = -(-(spec.data_size + page) // page) * page
    helper_spec = HelperSpec(image, mailbox_size=mailbox_size, guest_ram=guest, key=spec.transport_key)
    with guest.open("r+b") as f, mmap.mmap(f.fileno(), spec.window_size) as window, HelperVM(
        helper_spec, work, "conformance"
    ) as vm:
        vm.wait_ready(30)
        endpoint = mailbox_backend(vm, window, spec.data_size)
        try:
            yield endpoint
        finally:
            endpoint.release()
    # Only failures leave their QEMU logs behind.
    shutil.rmtree(work, ignore_errors=True)


FACTORIES["host-core"] = open_host_core
FACTORIES["firmware"] = open_firmware
