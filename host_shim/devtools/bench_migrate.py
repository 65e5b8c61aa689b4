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

import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from host_shim.devtools.background_load import background_load as load
from host_shim.errors import OvmfMhError
from host_shim.helpers.keys import generate_key
from host_shim.migration.convergence import ConvergenceSettings
from host_shim.migration.migrate import MigrationConfig, MigrationReport, migrate, plain_qemu_migration
from host_shim.migration.migration_vm import MigrationError
from host_shim.vm import process

#: A helper status in an error message: the helper refused, for this reason.
_STATUS = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")

#: Plain QEMU's migration of the test guest can leave the target kernel
#: crashed (docs/migration.md): the baseline is run once more then.
PLAIN_RETRIES = 1

#: The speed goals (issue 21) each row is held against: total time at most
#: this many times plain QEMU's, downtime at most plain QEMU's + this.
TOTAL_RATIO_TARGET = 2.5
DOWNTIME_EXCESS_TARGET_MS = 150.0

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
        # The RAM check's seconds: the guest is stopped then too, but they
        # are not in downtime_seconds (a test's oracle, not the migration).
        "verify_seconds": report.verify_seconds,
        # The guest's whole stopped time, 'stop' to 'cont': the downtime and the check.
        "stopped_seconds": report.stopped_seconds,
        "device_state_seconds": report.device_state_seconds,
        "throttle": {key: report.throttle[key] for key in ("max_level", "engaged_seconds", "stopped_seconds")
                     if key in report.throttle},
        "phase_seconds": report.phase_seconds,
        "work_dir": report.work_dir,
        "tcp_probe": report.tcp_probe,
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
    run_migrate: Migrate | None = None,
    run_plain: Plain = plain_qemu_migration,
    background_load: int = 0,
    convergence: ConvergenceSettings | None = None,
) -> dict[str, Any]:
    """One row per guest size: plain QEMU, then ovmf-mh, same guest, same
    RAM-file place. A failure of either is the row's content, not the end
    of the benchmark. The peer's idle timeout is longer than migrate's
    default: a loaded machine slows the target's last imports, and a
    benchmark measures, it does not test fault detection."""
    rows: list[dict[str, Any]] = []
    run = run_migrate or migrate_two_programs
    for mib in sizes:
        row: dict[str, Any] = {"guest_mib": mib}
        folder = work / f"{mib}-mib"
        with load(background_load):
            row.update(_plain_baseline(run_plain, image, folder, mib, workload_mib, ram_dir))
        try:
            with load(background_load):
                report = run(MigrationConfig(
                    image=image, work_dir=folder / "ovmf-mh", helpers=helpers, guest_mib=mib,
                    workload_mib=workload_mib, progress=False, ram_dir=ram_dir, switchover=switchover,
                    idle_timeout=idle_timeout, convergence=convergence or ConvergenceSettings()))
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
            row["targets"] = {"total_ratio": row["ratio_total"] <= TOTAL_RATIO_TARGET,
                              "downtime_excess": row["downtime_excess_ms"] <= DOWNTIME_EXCESS_TARGET_MS}
        rows.append(row)
    settings = convergence or ConvergenceSettings()
    return {"workload_mib": workload_mib, "helpers": helpers, "switchover": switchover,
            "background_load": background_load, "downtime_limit_ms": settings.downtime_limit_ms,
            "auto_converge": settings.auto_converge,
            "roles": "two programs over loopback TCP" if run_migrate is None else "as given",
            "ram_dir": str(ram_dir) if ram_dir else "work folder", "rows": rows}


def _plain_baseline(run_plain: Plain, image: Path, folder: Path, mib: int, workload_mib: int,
                    ram_dir: Path | None) -> dict[str, Any]:
    """The baseline's part of a row: plain QEMU's migration, run again once
    when it fails (docs/migration.md, "Plain QEMU's baseline"): a failed
    run is never a measurement. ``plain`` holds the run that succeeded,
    ``plain_retried`` why the first did not; ``plain_error`` what failed
    when both did."""
    errors: list[str] = []
    for attempt in range(1 + PLAIN_RETRIES):
        try:
            result = run_plain(image, folder / ("plain" if attempt == 0 else f"plain-retry-{attempt}"), mib,
                               workload_mib, ram_dir)
        except OvmfMhError as exc:
            errors.append(str(exc))
            continue
        return {"plain": result, "plain_retried": errors[0]} if errors else {"plain": result}
    return {"plain_error": "; then, run again: ".join(errors)}


def _cell(run: dict[str, Any] | None) -> tuple[str, str]:
    if not run:
        return "-", "-"
    return f"{run['total_seconds']:.2f} s", f"{1000 * run['downtime_seconds']:.0f} ms"


COLUMNS = ("guest", "plain total", "plain downtime", "ovmf-mh total", "total ratio", "ovmf-mh downtime",
           "downtime ratio", "downtime excess", f"total ≤ {TOTAL_RATIO_TARGET:g}x",
           f"downtime ≤ plain + {DOWNTIME_EXCESS_TARGET_MS:.0f} ms", "throttle")


def format_table(results: dict[str, Any]) -> list[str]:
    """The benchmark as one Markdown table (it reads as text too), then a
    line per size ovmf-mh did not migrate, with the reason."""
    lines = [
        f"live migration, {results['workload_mib']} MiB workload, {results['helpers']} helper(s) per side, "
        f"switchover by {results['switchover']}, ovmf-mh roles: {results.get('roles', 'as given')}, "
        f"RAM files in {results['ram_dir']}, background load {results.get('background_load', 0)} busy "
        f"process(es) during each run, downtime limit {results.get('downtime_limit_ms', '-')} ms, auto-converge "
        f"{'on' if results.get('auto_converge', True) else 'off'}",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(COLUMNS))) + "|",
    ]
    notes = []
    for row in results["rows"]:
        plain_total, plain_down = _cell(row.get("plain"))
        if row.get("plain_error"):
            plain_total = plain_down = "failed"
            notes.append(f"{row['guest_mib']} MiB, plain QEMU failed twice: {row['plain_error']}")
        elif row.get("plain_retried"):
            plain_total, plain_down = f"{plain_total} (2nd run)", f"{plain_down} (2nd run)"
            notes.append(f"{row['guest_mib']} MiB, plain QEMU's first run failed and is not a measurement "
                         f"(run again, the baseline is the second run): {row['plain_retried']}")
        ours = row.get("ovmf_mh")
        if ours:
            total, down = _cell(ours)
            ratio_total = f"{row['ratio_total']:.1f}x" if "ratio_total" in row else "-"
            ratio_down = f"{row['ratio_downtime']:.1f}x" if "ratio_downtime" in row else "-"
            excess = f"{row['downtime_excess_ms']:+.0f} ms" if "downtime_excess_ms" in row else "-"
            throttle = _throttle_cell(ours.get("throttle", {}))
        else:
            word = "refused" if "refused" in row else "failed"
            total, down, ratio_total, ratio_down, excess, throttle = word, word, "-", "-", "-", "-"
            notes.append(f"{row['guest_mib']} MiB, ovmf-mh {word}: {row.get('refused') or row.get('failed')}")
        targets = row.get("targets", {})
        met = [("met" if targets[key] else "missed") if key in targets else "-"
               for key in ("total_ratio", "downtime_excess")]
        cells = [f"{row['guest_mib']} MiB", plain_total, plain_down, total, ratio_total, down, ratio_down, excess,
                 *met, throttle]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + notes


def _throttle_cell(throttle: dict[str, Any]) -> str:
    """'up to 60%, 4.1 s (2.0 s stopped)', or 'none'."""
    if not throttle.get("max_level"):
        return "none"
    return (f"up to {100 * throttle['max_level']:.0f}%, {throttle['engaged_seconds']:.1f} s "
            f"({throttle['stopped_seconds']:.1f} s stopped)")


def migrate_two_programs(config: MigrationConfig) -> MigrationReport:
    """One ovmf-mh migration as on two hosts, over loopback TCP: the target
    role is an `ovmf-mh migrate-incoming` program of its own, the source
    role runs here, as `migrate --to` would (two processes: neither role's
    Python competes with the other's for one interpreter lock)."""
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    key_file = work / "transport.key"
    if not key_file.exists():
        generate_key(key_file)
    with _target_program(config, work, key_file) as address:
        return migrate(dataclasses.replace(config, work_dir=work / "source", key_file=key_file, target=address))


@contextmanager
def _target_program(config: MigrationConfig, work: Path, key_file: Path) -> Iterator[tuple[str, int]]:
    """`ovmf-mh migrate-incoming --no-keep-running` on a free loopback port,
    in its own process (output in ``work``); yields its address. It exits
    once the guest runs there (or the migration failed); it is ended by its
    own pid if it has not exited 60 s after the source finished."""
    argv = [sys.executable, "-c", "import sys; from host_shim.cli import main; sys.exit(main())",
            "migrate-incoming", "--listen", "127.0.0.1:0", "--key", str(key_file), "--image", str(config.image),
            "--helpers", str(config.helpers), "--work-dir", str(work / "target"), "--no-keep-running",
            "--idle-timeout", str(config.idle_timeout), "--json"]
    if config.ram_dir is not None:
        argv += ["--ram-dir", str(config.ram_dir)]
    stderr_path = work / "migrate-incoming.stderr"
    with (work / "migrate-incoming.stdout").open("wb") as stdout, stderr_path.open("wb") as stderr:
        proc = process.spawn(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", stderr_path.read_text(errors="replace"))
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MigrationError(f"migrate-incoming did not listen ({process.describe_exit(proc.poll())}); "
                                     f"see {stderr_path}")
            time.sleep(0.05)
        yield "127.0.0.1", int(found.group(1))
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    finally:
        process.kill_if_running(proc, "migrate-incoming")
