"""PNG drawings of migrations: one migration's passes and downtime
(`ovmf-mh migrate --plot`), and the multi-size benchmark (`ovmf-mh bench
migrate --plot`). matplotlib is an optional dependency (the ``dev`` extra);
it is imported only when a plot is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from host_shim.errors import SetupError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise SetupError("--plot needs matplotlib: pip install 'ovmf-mh[dev]' (or matplotlib alone)") from exc
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def dirty_rates(passes: list[dict[str, Any]]) -> list[float]:
    """Pages dirtied per second while each pass ran: what the dirty log
    marked after it (or, without the log, what the next pass sent), over
    this pass's seconds (0 for the last pass: nothing follows)."""
    rates = []
    for index, current in enumerate(passes):
        after = passes[index + 1] if index + 1 < len(passes) else None
        if after is None:
            following = 0
        elif after.get("log_reset"):  # every page was checked: what it sent is what changed
            following = after["pages"]
        else:
            following = after.get("logged") or after["pages"]
        rates.append(following / current["seconds"] if current["seconds"] and following else 0.0)
    return rates


def downtime_steps(switchover_ms: dict[str, int]) -> list[tuple[str, int]]:
    """The downtime split into its steps: the report's milestones after
    'stop' are cumulative; each step is the time since the one before."""
    steps, before = [], 0
    for name, at in switchover_ms.items():
        steps.append((name, max(0, at - before)))
        before = max(before, at)
    return steps


def plot_migration(report: dict[str, Any], path: Path) -> None:
    """Pages per pass (bars) and dirty rate (line), and the downtime's steps."""
    plt = _pyplot()
    passes = report["passes"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), gridspec_kw={"height_ratios": [3, 1.4]})
    numbers = [p["number"] for p in passes]
    colours = ["tab:blue" if p["guest_running"] else "tab:red" for p in passes]
    top.bar(numbers, [p["pages"] for p in passes], color=colours)
    top.set_yscale("log")
    top.set_xlabel("pass (red: guest stopped)")
    top.set_ylabel("pages sent")
    top.set_xticks(numbers)
    rate_axis = top.twinx()
    rate_axis.plot(numbers, dirty_rates(passes), "o-", color="tab:orange")
    rate_axis.set_ylabel("pages dirtied per second during the pass", color="tab:orange")
    top.set_title(f"{report['guest_mib']} MiB guest, {report['helpers']} helper(s), switchover by "
                  f"{report.get('switchover_check') or '?'}: total {report['total_seconds']:.1f} s, "
                  f"downtime {1000 * report['downtime_seconds']:.0f} ms", fontsize=9)
    left = 0
    for index, (name, ms) in enumerate(downtime_steps(report.get("switchover_ms", {}))):
        bottom.barh(0, ms, left=left, color=plt.cm.tab10(index % 10), label=f"{name} {ms} ms")
        left += ms
    bottom.set_yticks([])
    bottom.set_xlabel("ms after the source stopped (downtime)")
    bottom.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_bench(results: dict[str, Any], path: Path) -> None:
    """Downtime and total time against guest size, plain QEMU beside ovmf-mh;
    sizes ovmf-mh did not migrate are marked on the axis."""
    plt = _pyplot()
    rows = results["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key, scale, unit in ((axes[0], "downtime_seconds", 1000, "downtime (ms)"),
                                   (axes[1], "total_seconds", 1, "total time (s)")):
        for who, style in (("plain", "s-"), ("ovmf_mh", "o-")):
            points = [(row["guest_mib"], scale * row[who][key]) for row in rows if row.get(who)]
            if points:
                axis.plot([x for x, _ in points], [y for _, y in points], style,
                          label="plain QEMU" if who == "plain" else "ovmf-mh")
        for row in rows:
            if not row.get("ovmf_mh"):
                axis.axvline(row["guest_mib"], color="grey", linestyle=":")
                axis.annotate("ovmf-mh refused" if row.get("refused") else "ovmf-mh failed",
                              (row["guest_mib"], 0), xycoords=("data", "axes fraction"),
                              rotation=90, fontsize=7, va="bottom", ha="right")
        axis.set_xscale("log", base=2)
        axis.set_xticks([row["guest_mib"] for row in rows])
        axis.set_xticklabels([str(row["guest_mib"]) for row in rows])
        axis.set_xlabel("guest RAM (MiB)")
        axis.set_ylabel(unit)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    figure.suptitle(f"live migration, {results['workload_mib']} MiB workload, RAM files in {results['ram_dir']}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
