"""Never-written memory, old path against zero ranges (docs/migration.md).

Boots the test guest on a sparse RAM file of each size until its workload
beats, stops it, and exports that RAM file through firmware helpers twice
per round, page by page (``--no-zero-ranges``, every page its own record)
and with zero ranges (EXPORT_ZERO_RANGES for the file's holes), the order
alternating from round to round. Same file, same helpers, same machine
load: the ratios are what counts. Each stream is then imported once (zero
ranges) and compared with the source file, so the fast path is also a
correct one.
"""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from host_shim.migration.migration_vm import MIB, guest_config, ram_file, wait_for_serial
from host_shim.transfer.holes import hole_pages
from host_shim.transfer.pipeline import TransferError, export_ram, import_ram
from host_shim.vm import guest
from host_shim.vm.qemu import QemuVM

PAGE = 4096


def boot_guest_ram(image: Path, work: Path, guest_mib: int, workload_mib: int) -> Path:
    """The RAM file of the test guest after it booted and its workload ran:
    sparse, holding what the guest (and firmware) wrote."""
    size = guest_mib * MIB
    with ExitStack() as stack:
        ram = ram_file(stack, work, None, f"guest-{guest_mib}", size)
        vm = stack.enter_context(QemuVM(guest_config(image, ram, size, incoming=False, workload_mib=workload_mib),
                                        work / f"guest-{guest_mib}", f"bench-{guest_mib}"))
        wait_for_serial(vm, guest.HEARTBEAT, 300)
        vm.qmp("stop")
    return ram


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def bench_zero_ranges(image: Path, work: Path, *, sizes: list[int], rounds: int = 2, helpers: int = 1,
                      workload_mib: int = 64) -> dict[str, Any]:
    key = os.urandom(32)
    results: dict[str, Any] = {"helpers": helpers, "rounds": rounds, "workload_mib": workload_mib, "sizes": []}
    for guest_mib in sizes:
        ram = boot_guest_ram(image, work, guest_mib, workload_mib)
        pages = guest_mib * MIB // PAGE
        holes = int(hole_pages(ram, PAGE).sum())
        runs: dict[str, list[dict[str, float]]] = {"pages": [], "ranges": []}
        for round_number in range(rounds):
            order = ["pages", "ranges"] if round_number % 2 == 0 else ["ranges", "pages"]
            for mode in order:
                out = work / f"{guest_mib}-{mode}.omh"
                with out.open("wb") as sink:
                    summary = export_ram(ram, key, sink, kind="firmware", helpers=helpers, firmware=image,
                                         work_dir=work / f"export-{guest_mib}-{mode}-{round_number}",
                                         progress=False, zero_ranges=mode == "ranges", mailbox_timeout=60.0)
                runs[mode].append({"seconds": summary.transfer_seconds, "total_seconds": summary.seconds,
                                   "stream_bytes": summary.stream_bytes,
                                   "zero_range_pages": summary.zero_range_pages,
                                   "zero_pages": summary.zero_pages})
                print(f"{guest_mib} MiB, round {round_number}, {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
        # The fast path must also be right: import it and compare.
        dst = work / f"{guest_mib}-imported.ram"
        with (work / f"{guest_mib}-ranges.omh").open("rb") as source:
            imported = import_ram(dst, key, source, kind="firmware", firmware=image,
                                  work_dir=work / f"import-{guest_mib}", progress=False, mailbox_timeout=60.0)
        if _digest(dst) != _digest(ram):
            raise TransferError(f"{guest_mib} MiB: the imported RAM file differs from the source")
        best = {mode: min(runs[mode], key=lambda r: r["seconds"]) for mode in runs}
        results["sizes"].append({
            "guest_mib": guest_mib, "pages": pages, "hole_pages": holes,
            "old": best["pages"], "new": best["ranges"], "runs": runs,
            "import_seconds": imported.transfer_seconds,
            "time_ratio": best["pages"]["seconds"] / best["ranges"]["seconds"],
            "bytes_ratio": best["pages"]["stream_bytes"] / best["ranges"]["stream_bytes"],
        })
        for path in (dst, ram, *work.glob(f"{guest_mib}-*.omh")):
            path.unlink(missing_ok=True)
    return results


def format_zero_ranges(results: dict[str, Any]) -> list[str]:
    lines = [
        f"export of the test guest's RAM file after boot ({results['workload_mib']} MiB workload), "
        f"{results['helpers']} firmware helper(s), best of {results['rounds']} alternating rounds",
        "| guest | pages (in holes) | page by page: time, stream | zero ranges: time, stream | time ratio "
        "| bytes ratio | import (zero ranges) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["sizes"]:
        old, new = r["old"], r["new"]
        lines.append(
            f"| {r['guest_mib']} MiB | {r['pages']:,} ({r['hole_pages']:,}) | {old['seconds']:.2f} s, "
            f"{old['stream_bytes'] / 1e6:.1f} MB | {new['seconds']:.2f} s, {new['stream_bytes'] / 1e6:.1f} MB "
            f"({new['zero_range_pages']:,} pages as ranges) | {r['time_ratio']:.1f}x | {r['bytes_ratio']:.1f}x "
            f"| {r['import_seconds']:.2f} s |")
    return lines
