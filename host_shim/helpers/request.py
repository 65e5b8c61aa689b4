"""The fw_cfg request that diverts the firmware into helper mode (version 2:
a mailbox, a work area and a guest window of several ranges;
docs/fw-cfg-request.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from helper import abi

GIB = 1 << 30
#: Where helper VMs split their RAM below and above 4 GiB (QEMU's q35
#: ``max-ram-below-4g``, which helper VMs set so the split is known in advance).
HELPER_RAM_BELOW_4G = 2 * GIB


def work_area_size(window_size: int) -> int:
    """Bytes of work area a helper needs for a guest window of ``window_size``
    bytes: session state plus one tracking entry per page, rounded up to a page."""
    a = abi.load()
    page = a.const("OVMF_MH_PAGE_SIZE")
    size = a.const("OVMF_MH_WORK_AREA_BASE_SIZE") + window_size // page * a.const("OVMF_MH_WORK_AREA_PAGE_BYTES")
    return -(-size // page) * page


def window_ranges(window_offset: int, window_size: int, ram_size: int,
                  below_4g: int = HELPER_RAM_BELOW_4G) -> tuple[tuple[int, int], ...]:
    """The helper-VM physical ranges holding bytes [window_offset, +window_size)
    of its RAM, on a q35 machine whose RAM is ``ram_size`` bytes with at most
    ``below_4g`` of them below 4 GiB (the rest continues at 4 GiB)."""
    low = min(ram_size, below_4g)
    ranges: list[tuple[int, int]] = []
    start, end = window_offset, window_offset + window_size
    if start < low:
        ranges.append((start, min(end, low) - start))
    if end > low:
        first = max(start, low)
        ranges.append((4 * GIB + first - low, end - first))
    return tuple(ranges)


@dataclass(frozen=True)
class HelperRequest:
    mailbox_base: int
    mailbox_size: int
    work_area_base: int = 0
    work_area_size: int = 0
    window: Sequence[tuple[int, int]] = ()  # (base, size) per range, guest offset order
    version: int | None = None
    signature: int | None = None
    flags: int = 0
    range_count: int | None = None  # None: len(window); tests override it

    @property
    def window_size(self) -> int:
        return sum(size for _, size in self.window)

    def encode(self) -> bytes:
        a = abi.load()
        layout = a.layout("OVMF_MH_REQUEST")
        return layout.pack(
            Signature=a.const("OVMF_MH_REQUEST_SIGNATURE") if self.signature is None else self.signature,
            Version=a.const("OVMF_MH_REQUEST_VERSION") if self.version is None else self.version,
            Size=layout.size,
            Flags=self.flags,
            WindowRangeCount=len(self.window) if self.range_count is None else self.range_count,
            MailboxBase=self.mailbox_base,
            MailboxSize=self.mailbox_size,
            WorkAreaBase=self.work_area_base,
            WorkAreaSize=self.work_area_size,
            WindowBase=[base for base, _ in self.window],
            WindowSize=[size for _, size in self.window],
        )


def fw_cfg_name() -> str:
    return abi.load().strings["OVMF_MH_REQUEST_FW_CFG_NAME"]
