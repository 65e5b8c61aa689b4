"""Which pages of a guest RAM file the host may call empty.

The host never reads guest memory to decide this (it is opaque to the host,
as it would be under SEV): it asks the file system which ranges of the
sparse RAM file were never written (``SEEK_DATA``/``SEEK_HOLE``). A page in a
hole reads as zero; a page the guest wrote, or a page QEMU or the kernel
populated, is data. The answer is only a claim: the source helper checks
every byte before it seals a ZERO_RANGE record (EXPORT_ZERO_RANGES), and a
claim that is wrong (the guest wrote the page since) is refused with
NOT_ZERO and the pages go as ordinary records.

On a real SEV host the same role is played by what the hypervisor knows
without reading guest memory: guest pages never faulted in (holes of the
guest_memfd or of the RAM file backing the guest), which QEMU and KVM
track anyway. docs/stream-format.md, "Zero ranges".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt


def hole_pages(path: Path, page: int) -> npt.NDArray[np.bool_]:
    """One flag per page of the file at ``path``: True when the whole page
    lies in a hole (never written). A file system without SEEK_HOLE support
    reports the whole file as data, so every flag is False."""
    size = path.stat().st_size
    holes = np.zeros(size // page, dtype=np.bool_)
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after position
                    raise
                data = size
            holes[-(-position // page) : min(data, size) // page] = True
            if data >= size:
                break
            position = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.close(fd)
    return holes


def runs(numbers: npt.NDArray[np.uint64], block: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Page numbers as runs of consecutive pages inside one block of
    ``block`` pages: (first page of each run, pages in it), in the order
    of ``numbers``."""
    if len(numbers) == 0:
        empty = np.empty(0, dtype=np.uint64)
        return empty, empty
    values = numbers.astype(np.int64)
    breaks = (np.diff(values) != 1) | (values[1:] // block != values[:-1] // block)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    counts = np.diff(np.concatenate((starts, [len(values)])))
    return numbers[starts], counts.astype(np.uint64)
