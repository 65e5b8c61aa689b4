"""Executions per CPU second of libFuzzer harness builds, side by side.

The machines are shared and noisy, so speed is never a pass/fail test: this
runs two (or more) builds of a harness alternately, in rounds, each with the
same libFuzzer command from a copy of the same corpus, and prints the
executions per CPU second of every run (user + system time of that process,
from ``wait4``) and the ratio of the medians. docs/testing.md quotes it.

    python -m host_shim.devtools.fuzz_speed --corpus DIR [--runs N] [--rounds K] OLD NEW

Each run is ``BINARY -seed=2 -runs=N -max_len=600 -dict=abi.dict OUT CORPUS``
(OUT a fresh folder, CORPUS a fresh copy of DIR). Build an old harness from
an old commit in a scratch worktree (``fuzz.build("mailbox")`` there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from host_shim.devtools import fuzz


@dataclass(frozen=True)
class SpeedRun:
    binary: Path
    executions: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def per_cpu_second(self) -> float:
        return self.executions / self.cpu_seconds if self.cpu_seconds else 0.0


def run_once(binary: Path, corpus: Path, runs: int, max_len: int, work: Path) -> SpeedRun:
    """One libFuzzer run of ``runs`` executions; CPU time of that process alone."""
    out, copy = work / "out", work / "corpus"
    for path in (out, copy):
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(corpus, copy)
    command = [str(binary), "-seed=2", f"-runs={runs}", f"-max_len={max_len}", f"-dict={fuzz.dictionary()}",
               str(out), str(copy)]
    with (work / "log").open("w") as log:
        started = os.times().elapsed
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=fuzz._env())
        _, status, usage = os.wait4(process.pid, 0)
        wall = os.times().elapsed - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise fuzz.FuzzError(f"{binary} exited {process.returncode}; log: {work / 'log'}")
    return SpeedRun(binary, runs, usage.ru_utime + usage.ru_stime, wall)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Executions per CPU second of harness builds, run alternately.")
    parser.add_argument("binaries", nargs="+", type=Path, help="harness binaries (e.g. the old build, then the new)")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus folder every run starts from (copied)")
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions per run (default: 1000000)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each binary, alternating (default: 1)")
    parser.add_argument("--max-len", type=int, default=600, help="libFuzzer -max_len (default: 600, mailbox)")
    args = parser.parse_args(argv)
    results: dict[Path, list[SpeedRun]] = {binary: [] for binary in args.binaries}
    with tempfile.TemporaryDirectory(prefix="fuzz-speed-") as temporary:
        for round_number in range(1, args.rounds + 1):
            for binary in args.binaries:
                result = run_once(binary, args.corpus, args.runs, args.max_len, Path(temporary))
                results[binary].append(result)
                print(f"round {round_number}: {binary.name}: {result.executions} executions in "
                      f"{result.cpu_seconds:.1f} CPU s ({result.wall_seconds:.1f} s wall): "
                      f"{result.per_cpu_second:,.0f} per CPU second", flush=True)
    medians = {binary: statistics.median(r.per_cpu_second for r in runs) for binary, runs in results.items()}
    first = args.binaries[0]
    for binary, median in medians.items():
        print(f"median {binary.name}: {median:,.0f} per CPU second ({median / medians[first]:.2f} x {first.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
