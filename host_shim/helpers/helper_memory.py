"""A helper's own memory as the host holds it: a shared file both the
helper (a QEMU memory backend, or the reference helper process) and the host
map, laid out as HelperAbi.h says (launch secret, then the mailbox).

The file holds the transport key (the launch-secret page until the helper
wipes it, and the helper's private copy), so it never rests on disk: it is
created with mode 0600 in a private folder (mode 0700) on a RAM-backed file
system where there is one, and unlinked as soon as the helper has it open
(:meth:`HelperMemory.unlink`); from then on only the two mappings hold it,
and it is gone when both processes are. If the shim dies first, the reaper
removes the folder.
"""

from __future__ import annotations

import mmap
import os
from contextlib import suppress

from host_shim.helpers.keys import secret_page_base, secret_record
from host_shim.vm import process


class HelperMemory:
    """A fresh sparse file of ``size`` bytes, mapped; with ``key``, the
    emulated launch secret written at OVMF_MH_SECRET_PAGE_BASE (the guest
    owner's injection, docs/key-provisioning.md)."""

    def __init__(self, size: int, key: bytes | None) -> None:
        self.folder = process.temp_dir("ovmf-mh-helper-", process.private_base())
        self.path = process.private_file(self.folder, "helper-own.ram")
        self._file = self.path.open("r+b")
        self._file.truncate(size)
        self.map = mmap.mmap(self._file.fileno(), size)
        if key is not None:
            record = secret_record(key)
            self.map[secret_page_base() : secret_page_base() + len(record)] = record

    def unlink(self) -> None:
        """The helper has the file open: drop its name (and folder) for good.
        OVMF_MH_KEEP_RAM=1 keeps it, for debugging a helper."""
        if os.environ.get("OVMF_MH_KEEP_RAM") != "1":
            process.remove(self.folder)

    def close(self) -> None:
        """Unmap, close and delete the file."""
        # A writer thread stuck on a dead sink may still hold a view of the
        # shared area; the mapping then goes when that view does.
        with suppress(BufferError):
            self.map.close()
        self._file.close()
        self.unlink()
