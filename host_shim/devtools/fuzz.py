"""Build and run the fuzzers of the helper core (tests/c/fuzz).

Two kinds, both over the firmware's own core sources and the shared guarded
helpers and invariant checks of ``tests/c/fuzz/FuzzCommon.c``:

* libFuzzer harnesses, one per attack surface (:data:`TARGETS`), built with
  clang and ``-fsanitize=fuzzer,address,undefined``; ``ovmf-mh fuzz`` runs
  them, the test suite runs each briefly and replays the regression inputs
  under ``tests/fuzz-regressions/<target>/``;
* the random scenario driver ``FuzzDispatch.c`` (gcc, ASan/UBSan), kept for
  its end-to-end checks (an intact stream always imports and reproduces the
  source pages).

The dispatcher, session and request-validation sources and the harness are
instrumented for coverage feedback; the crypto primitives (checked against
pyca ``cryptography`` elsewhere), the host shim and the checker are built with
the sanitizers only, so that their inner loops do not drown the feedback
and the speed. Binaries are cached under ``.cache/fuzz`` by a hash of the
compiler, the flags and every source and header.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import helper as helper_pkg
from host_shim.devtools import fuzz_corpus
from host_shim.errors import OvmfMhError
from host_shim.helpers import hostcore

FUZZ_DIR = hostcore.REPO_ROOT / "tests" / "c" / "fuzz"
CACHE_DIR = hostcore.REPO_ROOT / ".cache" / "fuzz"
REGRESSION_DIR = hostcore.REPO_ROOT / "tests" / "fuzz-regressions"
COMMON = FUZZ_DIR / "FuzzCommon.c"
#: Loop-only functions left out of the coverage instrumentation (the file says why).
COVERAGE_IGNORE = FUZZ_DIR / "coverage-ignore.txt"
#: Core sources whose coverage guides the fuzzer (the rest is crypto).
GUIDED_CORE = ("MailboxDispatch.c", "Session.c", "RequestValidation.c", "PageTables.c")


@dataclass(frozen=True)
class Target:
    name: str
    source: str
    max_len: int
    surface: str
    core_files: tuple[str, ...]  # the core sources this surface lives in (coverage is reported on them)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("mailbox", "FuzzMailbox.c", 600, "mailbox dispatcher of a source and a target helper, command sequences",
               ("MailboxDispatch.c", "Session.c")),
        Target("stream", "FuzzStream.c", 40000, "stream import (header, records, END; CHECK_PAGES) under a fixed key",
               ("Session.c",)),
        Target("request", "FuzzRequest.c", 1024, "fw_cfg request validation against an e820 table",
               ("RequestValidation.c", "PageTables.c")),
        Target("page-tables", "FuzzPageTables.c", 400,
               "page-table builder: mapping lists, C-bit, 1 GiB pages, budget; walked independently",
               ("PageTables.c",)),
    )
}
#: Attack surfaces without a harness yet, and why.
MISSING: dict[str, str] = {}

BASE_CFLAGS = (
    "-g", "-O2", "-fno-omit-frame-pointer", "-fshort-wchar", "-fno-strict-aliasing", "-fno-common",
    "-DEFIAPI=__attribute__((ms_abi))", "-Wall", "-Werror",
)
SANITIZERS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
COVERAGE_FLAGS = ("-fprofile-instr-generate", "-fcoverage-mapping")
DRIVER_CFLAGS = (
    "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer", "-fshort-wchar", "-Wall", "-Werror",
)
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


class FuzzError(OvmfMhError):
    """A fuzzer could not be built or run."""


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise FuzzError(
        f"none of {', '.join(names)} found on PATH; stuart/bootstrap.sh installs clang-14, "
        "libclang-rt-14-dev and llvm-14 (libFuzzer and the sanitizer runtimes)"
    )


def clang() -> str:
    return _tool("clang-14", "clang")


def target(name: str) -> Target:
    if name not in TARGETS:
        missing = f" ({MISSING[name]})" if name in MISSING else ""
        raise FuzzError(f"unknown fuzz target {name!r}{missing}; targets: {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.cache
def _identity(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout


def _label(path: Path) -> str:
    """A source's name in a digest: its path in the repository, or the whole
    path of a file outside it (a planted defect's scratch copy)."""
    try:
        return str(path.relative_to(hostcore.REPO_ROOT))
    except ValueError:
        return str(path)


def _digest(compiler: str, flags: Sequence[str], files: Sequence[Path]) -> str:
    digest = hashlib.sha256(_identity(compiler).encode())
    for item in flags:
        digest.update(item.encode() + b"\0")
    for path in (*files, *hostcore._tracked_headers(), FUZZ_DIR / "FuzzCommon.h"):
        digest.update(_label(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _compile(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FuzzError(f"build failed (exit {result.returncode}): {' '.join(command)}\n{result.stderr}")


def _object(compiler: str, flags: Sequence[str], source: Path) -> Path:
    """Compile (or reuse) one object, cached by the compiler, the flags, the
    source and every header it may include."""
    obj = CACHE_DIR / "objects" / f"{source.stem}-{_digest(compiler, flags, [source])}.o"
    if not obj.is_file():
        obj.parent.mkdir(parents=True, exist_ok=True)
        partial = obj.with_name(f".{obj.name}.{os.getpid()}")
        _compile([compiler, *flags, "-c", str(source), "-o", str(partial)])
        os.replace(partial, obj)
    return obj


def build(name: str, variant: str = "fuzz", replace: Mapping[str, Path] | None = None) -> Path:
    """Build (or reuse) a harness; return the binary.

    ``fuzz``: libFuzzer + ASan/UBSan. ``coverage``: libFuzzer + source-based
    coverage (no sanitizers), to replay a corpus and report line coverage.
    ``replace`` maps core source names to files built in their place (a
    planted defect, host_shim/devtools/fuzz_planted.py).
    """
    spec = target(name)
    compiler = clang()
    replace = dict(replace or {})
    core = sorted(hostcore.CORE_LIB_DIR.glob("*.c"))
    unknown = set(replace) - {p.name for p in core}
    if unknown:
        raise FuzzError(f"no core source named {', '.join(sorted(unknown))}")
    guided = [replace.get(p.name, p) for p in core if p.name in GUIDED_CORE] + [FUZZ_DIR / spec.source]
    plain = [replace.get(p.name, p) for p in core if p.name not in GUIDED_CORE]
    plain += [hostcore.HARNESS_DIR / "HostShim.c", COMMON]
    includes = [f"-I{p}" for p in (*hostcore.include_dirs(), FUZZ_DIR)]
    ignore = f"-fsanitize-coverage-ignorelist={COVERAGE_IGNORE}"
    if variant == "fuzz":
        guided_flags = [*BASE_CFLAGS, *SANITIZERS, "-fsanitize=fuzzer-no-link", ignore]
        plain_flags = [*BASE_CFLAGS, *SANITIZERS]
        link_flags = [*BASE_CFLAGS, *SANITIZERS, "-fsanitize=fuzzer"]
    elif variant == "coverage":
        guided_flags = [*BASE_CFLAGS, *COVERAGE_FLAGS, "-fsanitize=fuzzer-no-link", ignore]
        plain_flags = [*BASE_CFLAGS, *COVERAGE_FLAGS]
        link_flags = [*BASE_CFLAGS, *COVERAGE_FLAGS, "-fsanitize=fuzzer"]
    else:
        raise FuzzError(f"unknown build variant {variant!r}")
    digest = _digest(compiler, guided_flags + plain_flags, [*guided, *plain, COVERAGE_IGNORE])
    output = CACHE_DIR / f"{name}-{variant}-{digest}"
    if output.is_file():
        return output
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    objects = [str(_object(compiler, [*guided_flags, *includes], source)) for source in guided]
    objects += [str(_object(compiler, [*plain_flags, *includes], source)) for source in plain]
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".build-") as temporary:
        partial = Path(temporary) / "binary"
        _compile([compiler, *link_flags, *objects, "-o", str(partial)])
        os.replace(partial, output)
    return output


def seed_dir(name: str) -> Path:
    """The seed corpus of a harness, generated by host_shim/devtools/fuzz_corpus.py."""
    target(name)
    # Everything that decides the seeds' bytes: the generator, the ABI and
    # the reference helper that seals the streams.
    generator = b"".join(
        path.read_bytes()
        for path in (Path(fuzz_corpus.__file__), hostcore.PACKAGE_INCLUDE / "MigrationHelper" / "HelperAbi.h",
                     *sorted(Path(helper_pkg.__file__).parent.glob("*.py")))
    )
    directory = CACHE_DIR / "seeds" / f"{name}-{hashlib.sha256(generator).hexdigest()[:16]}"
    if not directory.is_dir():
        partial = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=f".seeds-{name}-"))
        fuzz_corpus.write_seeds(name, partial)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, directory)
        except OSError:  # a concurrent generator won the race
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def dictionary() -> Path:
    text = fuzz_corpus.dictionary()
    path = CACHE_DIR / f"abi-{hashlib.sha256(text.encode()).hexdigest()[:16]}.dict"
    if not path.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def regression_inputs(name: str) -> list[Path]:
    """Inputs kept from findings (and hand-picked corner cases) for a harness."""
    directory = REGRESSION_DIR / name
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


#: libFuzzer's own memory bound per input (its default), in MB.
RSS_LIMIT_MB = 2048


def _memory_limits() -> list[str]:
    """libFuzzer's RSS bound, counted from what the harness inherits.

    libFuzzer reads its peak RSS with getrusage(RUSAGE_SELF), and Linux
    carries the peak of the process that started it across fork and exec:
    a harness started from a Python process that once held 2.4 GB (a pytest
    run after the large-guest tests) reported "out-of-memory (used: 2461Mb)"
    on its first, empty input. The bound is therefore 2048 MB above that
    inherited peak; a single allocation stays bounded at 2048 MB."""
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return [f"-rss_limit_mb={RSS_LIMIT_MB + inherited_mb}", f"-malloc_limit_mb={RSS_LIMIT_MB}"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in SANITIZER_ENV.items():
        env.setdefault(key, value)
    return env


def replay(name: str, inputs: Sequence[Path], timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """Run a harness once over each input (files, or folders of them); exit 0: no finding."""
    files: list[Path] = []
    for path in inputs:
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise FuzzError(f"no inputs to replay in {', '.join(map(str, inputs))}")
    return subprocess.run(
        [str(build(name)), *_memory_limits(), *map(str, files)],
        capture_output=True, text=True, check=False, timeout=timeout, env=_env(),
    )


def reproducer(name: str, artifact: Path) -> str:
    return f".venv/bin/ovmf-mh fuzz --target {name} --replay {artifact}"


@dataclass
class FuzzRun:
    target: str
    seconds: float
    executions: int = 0
    cpu_seconds: float = 0.0
    edges: int = 0
    corpus_size: int = 0
    findings: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    line_coverage: dict[str, tuple[int, int]] | None = None

    @property
    def per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.executions / self.cpu_seconds if self.cpu_seconds else 0.0

    def summary(self) -> str:
        line = (
            f"{self.target}: {self.executions} executions in {self.seconds:.1f} s "
            f"({self.per_second:.0f}/s; {self.per_cpu_second:.0f} per CPU second), "
            f"coverage {self.edges} edges, corpus {self.corpus_size}, findings {len(self.findings)}"
        )
        if self.line_coverage:
            for name in TARGETS[self.target].core_files:
                covered, total = self.line_coverage.get(name, (0, 0))
                line += f"\n  line coverage {name}: {percent(covered, total)} ({covered}/{total})"
            covered = sum(c for c, _ in self.line_coverage.values())
            total = sum(t for _, t in self.line_coverage.values())
            line += f"\n  line coverage of the whole core (crypto included): {percent(covered, total)}"
        return line


def percent(covered: int, total: int) -> str:
    return f"{100.0 * covered / max(total, 1):.1f} %"


_STATS = re.compile(r"stat::(\w+):\s+(\d+)")
_COV = re.compile(r"#\d+\s+\w+\s+cov: (\d+) ft: \d+ corp: (\d+)/")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run(
    name: str,
    work_dir: Path,
    *,
    seconds: float | None = None,
    runs: int | None = None,
    seed: int = 1,
    jobs: int = 1,
) -> FuzzRun:
    """Fuzz one harness with ``jobs`` processes (seeds seed .. seed+jobs-1)
    sharing one corpus under ``work_dir``; findings land in
    ``work_dir/findings``. Stops after ``seconds`` or ``runs`` executions per
    process, or at the first finding of a process."""
    spec = target(name)
    binary = build(name)
    corpus = work_dir / "corpus"
    findings = work_dir / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    limits = []
    if seconds is not None:
        limits.append(f"-max_total_time={max(1, int(seconds))}")
    if runs is not None:
        limits.append(f"-runs={runs}")
    processes = []
    dictionary_path, seeds = dictionary(), seed_dir(name)
    before = os.times()
    started = time.monotonic()
    for job in range(jobs):
        log = work_dir / f"fuzz-{job}.log"
        command = [
            str(binary), f"-seed={seed + job}", *limits, *_memory_limits(), f"-max_len={spec.max_len}",
            f"-dict={dictionary_path}",
            "-print_final_stats=1", "-timeout=60", "-reload=1", f"-artifact_prefix={findings}/",
            str(corpus), str(seeds),
        ]
        handle = log.open("w")
        processes.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env()), log, handle))
    result = FuzzRun(target=name, seconds=0.0)
    try:
        for process, log, handle in processes:
            process.wait()
            handle.close()
            result.logs.append(log)
    finally:
        for process, _, handle in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            handle.close()
    result.seconds = time.monotonic() - started
    after = os.times()
    result.cpu_seconds = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    for log in result.logs:
        text = log.read_text(errors="replace")
        stats = dict(_STATS.findall(text))
        result.executions += int(stats.get("number_of_executed_units", 0))
        if "number_of_executed_units" not in stats:
            done = re.findall(r"^#(\d+)", text, flags=re.MULTILINE)
            result.executions += int(done[-1]) if done else 0
        cov = _COV.findall(text)
        if cov:
            result.edges = max(result.edges, int(cov[-1][0]))
            result.corpus_size = max(result.corpus_size, int(cov[-1][1]))
        result.findings += [Path(p) for p in _ARTIFACT.findall(text)]
    return result


def line_coverage(name: str, inputs: Sequence[Path], work_dir: Path) -> dict[str, tuple[int, int]]:
    """Replay ``inputs`` (corpus folders or files) on the coverage build;
    return {core file: (lines covered, lines)} from llvm-cov."""
    return union_line_coverage({name: inputs}, work_dir)


def union_line_coverage(corpora: dict[str, Sequence[Path]], work_dir: Path) -> dict[str, tuple[int, int]]:
    """Line coverage of the core by several harnesses together: each replays
    its inputs on its coverage build, the profiles are merged and llvm-cov
    counts a line covered when any harness ran it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    profdata = _tool("llvm-profdata-14", "llvm-profdata")
    llvm_cov = _tool("llvm-cov-14", "llvm-cov")
    binaries: list[str] = []
    raws: list[str] = []
    for name, inputs in corpora.items():
        binary = build(name, "coverage")
        raw = work_dir / f"{name}.profraw"
        raw.unlink(missing_ok=True)
        env = dict(os.environ, LLVM_PROFILE_FILE=str(raw))
        result = subprocess.run([str(binary), "-runs=0", *map(str, inputs)], capture_output=True, text=True,
                                check=False, env=env)
        if result.returncode != 0 or not raw.is_file():
            raise FuzzError(f"coverage replay of {name} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
        binaries.append(str(binary))
        raws.append(str(raw))
    data = work_dir / "merged.profdata"
    subprocess.run([profdata, "merge", "-sparse", *raws, "-o", str(data)], check=True, capture_output=True)
    objects = [binaries[0], *(arg for b in binaries[1:] for arg in ("-object", b))]
    exported = subprocess.run(
        [llvm_cov, "export", "-summary-only", f"-instr-profile={data}", *objects],
        capture_output=True, text=True, check=True,
    )
    files: dict[str, tuple[int, int]] = {}
    for entry in json.loads(exported.stdout)["data"][0]["files"]:
        path = Path(entry["filename"])
        if path.parent.name == hostcore.CORE_LIB_DIR.name:
            lines = entry["summary"]["lines"]
            files[path.name] = (int(lines["covered"]), int(lines["count"]))
    return files


# --- the random scenario driver (FuzzDispatch.c) ----------------------------


def build_driver() -> Path:
    """Build (or reuse) the sanitized scenario driver; return the binary path."""
    core = sorted(hostcore.CORE_LIB_DIR.glob("*.c"))
    files = [*core, hostcore.HARNESS_DIR / "HostShim.c", COMMON, FUZZ_DIR / "FuzzDispatch.c"]
    output = CACHE_DIR / f"fuzz-dispatch-{_digest('gcc', DRIVER_CFLAGS, files)}"
    if output.is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".partial")
    includes = [f"-I{p}" for p in (*hostcore.include_dirs(), FUZZ_DIR)]
    _compile(["gcc", *DRIVER_CFLAGS, *includes, *map(str, files), "-o", str(partial)])
    os.replace(partial, output)
    return output


def run_driver(seed: int, iterations: int, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run the scenario driver; the caller checks returncode (0: no invariant broken)."""
    return subprocess.run(
        [str(build_driver()), str(seed), str(iterations)],
        capture_output=True, text=True, check=False, timeout=timeout, env=_env(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m host_shim.devtools.fuzz``: a long run of the scenario driver."""
    parser = argparse.ArgumentParser(description="Run the random scenario driver FuzzDispatch.c (ASan/UBSan).")
    parser.add_argument("--seed", type=int, default=1, help="driver seed (default: 1)")
    parser.add_argument("--iterations", type=int, default=100000, help="scenarios to run (default: 100000)")
    args = parser.parse_args(argv)
    result = run_driver(args.seed, args.iterations)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
