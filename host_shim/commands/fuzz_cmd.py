"""ovmf-mh fuzz: coverage-guided fuzzing of the helper core (libFuzzer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from host_shim.devtools import fuzz

DEFAULT_WORK_DIR = Path("work/fuzz")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    targets = ", ".join(f"{t.name} ({t.surface})" for t in fuzz.TARGETS.values())
    parser = sub.add_parser(
        "fuzz",
        help="fuzz the helper core with libFuzzer (ASan/UBSan, guard pages, invariant checks)",
        description=(
            "Build the libFuzzer harnesses of tests/c/fuzz from the firmware's own core sources "
            "(clang, -fsanitize=fuzzer,address,undefined) and run them. Prints executions, "
            "executions per second, coverage and findings per target; every crashing input is saved "
            "under WORK_DIR/TARGET/findings with a one-line command that reproduces it. Copy a fixed "
            f"finding into tests/fuzz-regressions/TARGET/ to keep it in the test suite. Targets: {targets}. "
            "Exit status 1 when anything was found. See docs/testing.md."
        ),
    )
    parser.add_argument(
        "--target", action="append", choices=sorted(fuzz.TARGETS), default=None,
        help="harness to run; repeat for several (default: all of them, one after another)",
    )
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="wall-clock seconds per target (default: 60)")
    parser.add_argument("--runs", type=int, default=None,
                        help="also stop each process after this many executions "
                             "(default: no limit; --seconds still applies)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fuzzing processes per target, sharing one corpus (default: 1)")
    parser.add_argument("--seed", type=int, default=1,
                        help="libFuzzer seed of the first process; process N uses SEED+N (default: 1)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"corpus, findings and logs, one folder per target (default: {DEFAULT_WORK_DIR})")
    parser.add_argument("--coverage", action="store_true",
                        help="afterwards, replay the corpus on a coverage build and report the core's line "
                             "coverage (llvm-cov)")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="INPUT", default=None,
                        help="run the target once over these inputs (files or corpus folders) instead of fuzzing")
    parser.set_defaults(handler=run)


def _replay(args: argparse.Namespace) -> int:
    names = args.target or list(fuzz.TARGETS)
    if len(names) != 1:
        raise fuzz.FuzzError("--replay needs exactly one --target")
    result = fuzz.replay(names[0], args.replay, timeout=None)
    print(result.stdout, end="")
    print(result.stderr, end="")
    verdict = "no finding" if result.returncode == 0 else f"FINDING (exit {result.returncode})"
    print(f"{names[0]}: replayed {len(args.replay)} input(s): {verdict}")
    return 0 if result.returncode == 0 else 1


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.seconds <= 0:
        raise fuzz.FuzzError("--jobs must be at least 1 and --seconds positive")
    if args.replay:
        return _replay(args)
    found = 0
    for name in args.target or list(fuzz.TARGETS):
        work = args.work_dir / name
        print(f"{name}: building and fuzzing for {args.seconds:.0f} s with {args.jobs} job(s); logs in {work}",
              flush=True)
        result = fuzz.run(name, work, seconds=args.seconds, runs=args.runs, seed=args.seed, jobs=args.jobs)
        if args.coverage:
            result.line_coverage = fuzz.line_coverage(name, [work / "corpus", fuzz.seed_dir(name)], work / "coverage")
        print(result.summary(), flush=True)
        for artifact in result.findings:
            print(f"  finding {artifact}; reproduce: {fuzz.reproducer(name, artifact)}")
        found += len(result.findings)
    names = args.target or list(fuzz.TARGETS)
    if args.coverage and len(names) > 1:
        union = fuzz.union_line_coverage(
            {name: [args.work_dir / name / "corpus", fuzz.seed_dir(name)] for name in names},
            args.work_dir / "coverage",
        )
        for file, (covered, total) in sorted(union.items()):
            if total:
                print(f"core line coverage, all targets together: {file} {fuzz.percent(covered, total)} "
                      f"({covered}/{total})")
    for name, why in fuzz.MISSING.items():
        print(f"{name}: no harness ({why})")
    return 1 if found else 0
