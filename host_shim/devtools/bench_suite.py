"""ovmf-mh bench suite: what halting helpers do to the test suite's time.

Issue 21 asks that ``make test`` grow by no more than 10 % once helpers halt
when idle. The whole suite takes too long to run twice on a shared machine,
so this bench times a representative part of it, the test files that start
the most firmware helpers, as separate pytest runs: once with every firmware
helper forced to spin (the idle policy NEVER_HALT, through the bench knob
OVMF_MH_BENCH_IDLE_POLICY=never-halt that the helper launcher reads: how
helpers behaved before ABI 4.1) and once with the default (spin 20 ms, then
halt until woken), alternating the order round by round so that both see
the same machine. Each run reports its wall time, the CPU time of pytest and
everything it waited for (its QEMUs and helper processes) and the load
average; the summary gives each policy's total and the ratio.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from host_shim import paths
from host_shim.helpers.helper_vm import IDLE_POLICY_ENV
from host_shim.vm import process

#: Test files that start many firmware helpers (transfer and pipeline,
#: migration protocol, faults): the default subset.
DEFAULT_TESTS = ("tests/test_transfer.py", "tests/test_migration_protocol.py", "tests/test_faults.py")
#: The spinning baseline first, then the default; later rounds alternate.
POLICIES = ("never-halt", "default")

#: One pytest run: (test paths, idle policy, log file) -> its measurements.
Runner = Callable[[Sequence[str], str, Path], dict[str, Any]]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pytest(tests: Sequence[str], policy: str, log: Path) -> dict[str, Any]:
    """Run pytest on ``tests`` with the idle policy forced through the
    environment; wall time, CPU time of pytest and its descendants (each
    reaped by its parent, so counted in ours), pytest's summary line."""
    env = dict(os.environ, **{IDLE_POLICY_ENV: policy})
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    load_before = os.getloadavg()[0]
    cpu_before, start = _children_cpu(), time.monotonic()
    with log.open("wb") as out:
        proc = process.spawn(argv, cwd=paths.REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        finally:
            process.kill_if_running(proc, "pytest")
    wall = time.monotonic() - start
    lines = log.read_text(errors="replace").strip().splitlines()
    return {
        "policy": policy,
        "wall_seconds": wall,
        "cpu_seconds": _children_cpu() - cpu_before,
        "exit_code": code,
        "summary": lines[-1] if lines else "",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "log": str(log),
    }


def bench_suite(work: Path, tests: Sequence[str] = DEFAULT_TESTS, rounds: int = 1,
                runner: Runner = run_pytest) -> dict[str, Any]:
    """``rounds`` rounds of one run per policy, the order alternating."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for round_index in range(rounds):
        order = POLICIES if round_index % 2 == 0 else tuple(reversed(POLICIES))
        for policy in order:
            run = runner(tests, policy, work / f"round{round_index + 1}-{policy}.log")
            runs.append(dict(run, round=round_index + 1))
    totals = {policy: {"wall_seconds": sum(r["wall_seconds"] for r in runs if r["policy"] == policy),
                       "cpu_seconds": sum(r["cpu_seconds"] for r in runs if r["policy"] == policy)}
              for policy in POLICIES}
    base, new = totals["never-halt"], totals["default"]
    return {
        "tests": list(tests),
        "rounds": rounds,
        "runs": runs,
        "totals": totals,
        "wall_ratio": new["wall_seconds"] / base["wall_seconds"] if base["wall_seconds"] else 0.0,
        "cpu_ratio": new["cpu_seconds"] / base["cpu_seconds"] if base["cpu_seconds"] else 0.0,
        "all_passed": all(r["exit_code"] == 0 for r in runs),
    }


def _counts(summary: str) -> str:
    """'12 passed, 1 skipped' out of pytest's last line."""
    found = re.findall(r"\d+ (?:passed|failed|error|errors|skipped|xfailed|xpassed)", summary)
    return ", ".join(found) or summary


def format_suite(results: dict[str, Any]) -> list[str]:
    lines = [
        f"test suite subset ({' '.join(results['tests'])}), {results['rounds']} round(s), firmware helpers "
        f"spinning ({IDLE_POLICY_ENV}=never-halt, before ABI 4.1) against halting when idle (default)",
        "| round | helpers | wall | CPU (pytest + children) | load average before / after | tests |",
        "|---:|---|---:|---:|---|---|",
    ]
    for run in results["runs"]:
        label = "spin (never-halt)" if run["policy"] == "never-halt" else "halt when idle (default)"
        lines.append(
            f"| {run['round']} | {label} | {run['wall_seconds']:.1f} s | {run['cpu_seconds']:.1f} s | "
            f"{run['load_average_before']:.1f} / {run['load_average_after']:.1f} | {_counts(run['summary'])} |")
    totals = results["totals"]
    lines.append(
        f"total: spinning {totals['never-halt']['wall_seconds']:.1f} s wall, "
        f"{totals['never-halt']['cpu_seconds']:.1f} s CPU; halting {totals['default']['wall_seconds']:.1f} s wall, "
        f"{totals['default']['cpu_seconds']:.1f} s CPU; halting / spinning: wall {results['wall_ratio']:.2f}, "
        f"CPU {results['cpu_ratio']:.2f}")
    if not results["all_passed"]:
        lines.append("some runs had failures (exit code not 0): their times are not comparable; see the logs")
    return lines
