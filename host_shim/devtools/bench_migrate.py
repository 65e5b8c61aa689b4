"""ovmf-mh bench migrate: plain QEMU migration and ovmf-mh migration of the
same running test guest, size after size, in one run (docs/migration.md).

Per size the plain migration runs first, then ovmf-mh; the table puts
their total time and downtime side by side with the ratios. A size
ovmf-mh does not migrate is a row that says why, in the words of the
failure: the target's allow-list refuses a guest description it cannot
serve (memory above what its helpers map), a helper that refuses the
guest's memory names its status (e.g. ``WINDOW_NOT_RAM``); it is never
left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from host_shim.errors import OvmfMhError
from host_shim.migration.migrate import MigrationConfig, MigrationReport, migrate, plain_qemu_migration

#: A helper status in an error message: the helper refused, for this reason.
_STATUS = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")

Migrate = Callable[[MigrationConfig], MigrationReport]
Plain = Callable[..., dict[str, Any]]


def parse_sizes(text: str) -> list[int]:
    """'256,1024' -> [256, 1024], each a positive whole number of MiB."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OvmfMhError(f"--guest-mib {text!r}: a comma-separated list of MiB, e.g. 256,1024,4096") from None
    if not sizes or any(size <= 0 for size in sizes):
        raise OvmfMhError(f"--guest-mib {text!r}: a comma-separated list of positive MiB, e.g. 256,1024,4096")
    return sizes


def _ovmf_mh_summary(report: MigrationReport) -> dict[str, Any]:
    final = report.passes[-1] if report.passes else None
    return {
        "total_seconds": report.total_seconds,
        "downtime_seconds": report.downtime_seconds,
        "passes": len(report.passes),
        "final_pass_pages": final.pages if final else 0,
        "switchover_check": report.switchover_check,
        "switchover_ms": report.switchover_ms,
        "ram_identical": report.ram_identical,
        "work_dir": report.work_dir,
    }


def bench_migrate(
    image: Path,
    work: Path,
    *,
    sizes: list[int],
    workload_mib: int = 64,
    helpers: int = 1,
    ram_dir: Path | None = None,
    switchover: str = "dirty-log",
    idle_timeout: float = 60.0,
    run_migrate: Migrate = migrate,
    run_plain: Plain = plain_qemu_migration,
) -> dict[str, Any]:
    """One row per guest size: plain QEMU, then ovmf-mh, same guest, same
    RAM-file place. A failure of either is the row's content, not the end
    of the benchmark. The peer's idle timeout is longer than migrate's
    default: a loaded machine slows the target's last imports, and a
    benchmark measures, it does not test fault detection."""
    rows: list[dict[str, Any]] = []
    for mib in sizes:
        row: dict[str, Any] = {"guest_mib": mib}
        folder = work / f"{mib}-mib"
        try:
            row["plain"] = run_plain(image, folder / "plain", mib, workload_mib, ram_dir)
        except OvmfMhError as exc:
            row["plain_error"] = str(exc)
        try:
            report = run_migrate(MigrationConfig(
                image=image, work_dir=folder / "ovmf-mh", helpers=helpers, guest_mib=mib,
                workload_mib=workload_mib, progress=False, ram_dir=ram_dir, switchover=switchover,
                idle_timeout=idle_timeout))
        except OvmfMhError as exc:  # refused before it started (a size the test guest cannot have)
            row["refused"] = str(exc)
        else:
            if report.outcome == "ok":
                row["ovmf_mh"] = _ovmf_mh_summary(report)
            else:
                error = report.error or "failed without a reason"
                # A helper's status, or the target's refusal of the guest
                # description: this size is refused, not a run that broke.
                refused = _STATUS.search(error) or "refused the guest description" in error
                row["refused" if refused else "failed"] = error
        plain, ours = row.get("plain"), row.get("ovmf_mh")
        if plain and ours:
            row["ratio_total"] = ours["total_seconds"] / plain["total_seconds"]
            row["ratio_downtime"] = (ours["downtime_seconds"] / plain["downtime_seconds"]
                                     if plain["downtime_seconds"] else float("inf"))
            row["downtime_excess_ms"] = 1000 * (ours["downtime_seconds"] - plain["downtime_seconds"])
        rows.append(row)
    return {"workload_mib": workload_mib, "helpers": helpers, "switchover": switchover,
            "ram_dir": str(ram_dir) if ram_dir else "work folder", "rows": rows}


def _cell(run: dict[str, Any] | None) -> tuple[str, str]:
    if not run:
        return "-", "-"
    return f"{run['total_seconds']:.2f} s", f"{1000 * run['downtime_seconds']:.0f} ms"


COLUMNS = ("guest", "plain total", "plain downtime", "ovmf-mh total", "total ratio", "ovmf-mh downtime",
           "downtime ratio", "downtime excess")


def format_table(results: dict[str, Any]) -> list[str]:
    """The benchmark as one Markdown table (it reads as text too), then a
    line per size ovmf-mh did not migrate, with the reason."""
    lines = [
        f"live migration, {results['workload_mib']} MiB workload, {results['helpers']} helper(s) per side, "
        f"switchover by {results['switchover']}, RAM files in {results['ram_dir']}",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(COLUMNS))) + "|",
    ]
    notes = []
    for row in results["rows"]:
        plain_total, plain_down = _cell(row.get("plain"))
        if row.get("plain_error"):
            plain_total = plain_down = "failed"
            notes.append(f"{row['guest_mib']} MiB, plain QEMU failed: {row['plain_error']}")
        ours = row.get("ovmf_mh")
        if ours:
            total, down = _cell(ours)
            ratio_total = f"{row['ratio_total']:.1f}x" if "ratio_total" in row else "-"
            ratio_down = f"{row['ratio_downtime']:.1f}x" if "ratio_downtime" in row else "-"
            excess = f"{row['downtime_excess_ms']:+.0f} ms" if "downtime_excess_ms" in row else "-"
        else:
            word = "refused" if "refused" in row else "failed"
            total, down, ratio_total, ratio_down, excess = word, word, "-", "-", "-"
            notes.append(f"{row['guest_mib']} MiB, ovmf-mh {word}: {row.get('refused') or row.get('failed')}")
        cells = [f"{row['guest_mib']} MiB", plain_total, plain_down, total, ratio_total, down, ratio_down, excess]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + notes
