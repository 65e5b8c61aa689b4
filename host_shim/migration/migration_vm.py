"""What both migration roles share: the test guest's QEMU configuration,
its RAM file, its serial console, and the digest of a RAM file that lets the
source check the target's copy at switchover (docs/migration.md)."""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack
from pathlib import Path

from host_shim.errors import OvmfMhError
from host_shim.local_files import create_exclusive
from host_shim.transfer.holes import hole_pages
from host_shim.vm import guest, process
from host_shim.vm.attached import QemuHandle
from host_shim.vm.qemu import MemoryBackend, QemuConfig

PAGE = 4096
MIB = 1024 * 1024
#: The RAM digest has this many parts, whatever the guest size: a mismatch
#: names the region, and the verdict message stays small.
DIGEST_PARTS = 256
#: Bytes hashed at a time; a chunk in a hole of the RAM file is not read.
DIGEST_CHUNK = 2 * 1024 * 1024


class MigrationError(OvmfMhError):
    """The migration failed; the report says where and in which state the guest is."""


def guest_config(image: Path, ram: Path, size: int, *, incoming: bool, workload_mib: int,
                 aba_pages: int = 0) -> QemuConfig:
    """Source and target differ only in their RAM file and -incoming (and
    the source's workload may flip ABA pages: the initramfs is read at boot
    only, the target gets the guest's memory)."""
    from host_shim.firmware.boot import vars_for

    return QemuConfig(
        firmware_code=image,
        firmware_vars=vars_for(image),
        memory=[MemoryBackend("ram", ram, size)],
        kernel=guest.kernel(),
        initrd=guest.workload_initramfs(workload_mib, aba_pages=aba_pages),
        append=guest.KERNEL_APPEND,
        incoming="defer" if incoming else None,
        extra_args=["-S"] if incoming else [],
    )


def ram_file(stack: ExitStack, work: Path, ram_dir: Path | None, role: str, size: int) -> Path:
    """A fresh sparse RAM file of ``size`` bytes for ``role``. In ``ram_dir``
    it gets a unique name and is deleted when ``stack`` closes (after the
    QEMU it stops); in the work folder it stays for inspection."""
    if ram_dir is None:
        path = work / f"{role}.ram"
    else:
        if not ram_dir.is_dir():
            raise MigrationError(f"--ram-dir {ram_dir} is not a folder")
        path = ram_dir / f"ovmf-mh-{os.getpid()}-{work.name}-{role}.ram"
        process.remove_on_exit(path)
        stack.callback(process.remove, path)
    # --ram-dir may be shared (/dev/shm): never through a link planted at the name (local_files.py).
    with os.fdopen(create_exclusive(path), "wb") as f:
        f.truncate(size)
    return path


def ram_digest(path: Path, size: int) -> list[str]:
    """DIGEST_PARTS BLAKE2b digests of equal parts of a RAM file: a
    comparison of bytes, as SEV would allow for ciphertext, never an
    interpretation of them. A part's digest is that of its DIGEST_CHUNK
    chunks' digests; a chunk in a hole of the file is all zero and gets the
    zero chunk's digest without being read, so the cost follows the memory
    written, not the guest's size (hashing two 16 GiB files byte by byte
    kept the stopped guest waiting 138 s), and two files agree whichever
    of them has a hole where the other holds zeros."""
    part = size // DIGEST_PARTS
    chunk = min(DIGEST_CHUNK, part)
    if part % chunk or chunk % PAGE:
        raise MigrationError(f"a {size}-byte RAM file does not split into {DIGEST_PARTS} parts of whole chunks")
    zero = hashlib.blake2b(bytes(chunk), digest_size=16).digest()
    flags = hole_pages(path, PAGE).reshape(-1, chunk // PAGE)
    hole = [bool(row.all()) for row in flags]
    buffer = bytearray(chunk)
    digests = []
    with path.open("rb", buffering=0) as f:
        for first in range(0, size // chunk, part // chunk):
            outer = hashlib.blake2b(digest_size=8)
            for index in range(first, first + part // chunk):
                if hole[index]:
                    outer.update(zero)
                    continue
                f.seek(index * chunk)
                view = memoryview(buffer)[: f.readinto(buffer) or 0]
                outer.update(hashlib.blake2b(view, digest_size=16).digest())
            digests.append(outer.hexdigest())
    return digests


def _complete_lines(text: str) -> str:
    """text up to its last newline: the guest may be mid-way through a line."""
    return text[: text.rfind("\n") + 1]


def wait_for_serial(vm: QemuHandle, needle: str, timeout: float, after: int = 0) -> str:
    """The first complete serial line (after offset ``after``) containing needle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _complete_lines(vm.serial_text()[after:])
        if needle in text:
            index = text.index(needle)
            return text[index : text.index("\n", index)].rstrip("\r")
        if not vm.is_running():
            raise vm.error(f"QEMU exited while waiting for {needle!r} on the serial console")
        time.sleep(0.05)
    raise vm.error(f"no {needle!r} on the serial console within {timeout:.0f} s")
