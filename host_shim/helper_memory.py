"""A helper's own memory as the host holds it: a shared file both the
helper (a QEMU memory backend, or the reference helper process) and the host
map, laid out as HelperAbi.h says (launch secret, then the mailbox)."""

from __future__ import annotations

import mmap
from contextlib import suppress
from pathlib import Path

from host_shim.keys import secret_page_base, secret_record


class HelperMemory:
    """A fresh sparse file of ``size`` bytes, mapped; with ``key``, the
    emulated launch secret written at OVMF_MH_SECRET_PAGE_BASE (the guest
    owner's injection, docs/key-provisioning.md)."""

    def __init__(self, path: Path, size: int, key: bytes | None) -> None:
        self.path = path
        # All zero: no stale mailbox can look READY.
        path.unlink(missing_ok=True)
        with path.open("wb") as f:
            f.truncate(size)
        self._file = path.open("r+b")
        self.map = mmap.mmap(self._file.fileno(), size)
        if key is not None:
            record = secret_record(key)
            self.map[secret_page_base() : secret_page_base() + len(record)] = record

    def close(self, *, keep: bool = False) -> None:
        """Unmap, close and (unless ``keep``) delete the file."""
        # A writer thread stuck on a dead sink may still hold a view of the
        # shared area; the mapping then goes when that view does.
        with suppress(BufferError):
            self.map.close()
        self._file.close()
        if not keep:
            self.path.unlink(missing_ok=True)
