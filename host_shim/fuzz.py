"""Build and run the dispatcher fuzz driver (tests/c/fuzz/FuzzDispatch.c).

The driver links the same core sources as the firmware with ASan/UBSan and
puts PROT_NONE guard pages around every buffer the dispatcher is given; see
its file header for the invariants it checks.

Long run (documented in docs/testing.md)::

    .venv/bin/python -m host_shim.fuzz --seed 1 --iterations 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from host_shim import hostcore

DRIVER = hostcore.REPO_ROOT / "tests" / "c" / "fuzz" / "FuzzDispatch.c"
HOST_SHIMS = ("HostShim.c", "HostShimRandom.c")
CFLAGS = [
    "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer", "-fshort-wchar", "-Wall", "-Werror",
]


def build() -> Path:
    """Build (or reuse) the sanitized fuzz driver; return the binary path."""
    core = sorted(hostcore.CORE_LIB_DIR.glob("*.c"))
    shims = [hostcore.HARNESS_DIR / name for name in HOST_SHIMS]
    files = [*core, *shims, DRIVER]
    includes = hostcore.include_dirs()
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in (*files, *hostcore._tracked_headers()):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    output = hostcore.CACHE_DIR / f"fuzz-dispatch-{digest.hexdigest()[:24]}"
    if output.is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".partial")
    command = ["gcc", *CFLAGS, *(f"-I{p}" for p in includes), *map(str, files), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise hostcore.HostLibBuildError(command, result.returncode, result.stderr)
    os.replace(partial, output)
    return output


def run(seed: int, iterations: int, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run the driver; the caller checks returncode (0: no invariant broken)."""
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return subprocess.run(
        [str(build()), str(seed), str(iterations)],
        capture_output=True, text=True, check=False, timeout=timeout, env=env,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the mailbox dispatcher (ASan/UBSan, guard pages).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=100000)
    args = parser.parse_args(argv)
    result = run(args.seed, args.iterations)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
