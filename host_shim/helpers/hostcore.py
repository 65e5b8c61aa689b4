"""Build the helper's portable core into a host shared library for ctypes.

Every ``.c`` file of ``OvmfPkgMigration/Library/MigrationHelperCoreLib`` and of
``tests/c`` is compiled with the host gcc against EDK2's ``MdePkg/Include``, in
one gcc call, into ``.cache/hostlib/<hash>.so``. The hash covers the compiler,
the flags and the content of every source and header that can be included, so
an edit anywhere rebuilds and an unchanged tree reuses the cached library.

``EFIAPI`` is ``ms_abi`` as in the firmware build; ``tests/c/HostShim.c``
provides the few BaseLib/BaseMemoryLib functions the core calls, and the
harness files in ``tests/c`` export plain System V functions for ctypes.

Variants:

``release``
    ``-O2``: for tests and benchmarks.
``asan``
    AddressSanitizer + UndefinedBehaviorSanitizer, no recovery. The ASan
    runtime must be loaded first, so use it from a process started with
    :func:`sanitizer_env` (``LD_PRELOAD`` of libasan); :func:`load` refuses
    otherwise.

Command line: ``python -m host_shim.helpers.hostcore [--variant asan]`` builds and prints
the path of the library.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO_ROOT / "OvmfPkgMigration"
PACKAGE_INCLUDE = PACKAGE_DIR / "Include"
CORE_LIB_DIR = PACKAGE_DIR / "Library" / "MigrationHelperCoreLib"
HARNESS_DIR = REPO_ROOT / "tests" / "c"
CACHE_DIR = REPO_ROOT / ".cache" / "hostlib"

#: Flags every variant uses: the parts of EDK2's GCC5 flags that change the
#: meaning of the code (wchar size, aliasing, calling convention).
COMMON_CFLAGS: tuple[str, ...] = (
    "-fPIC",
    "-shared",
    "-Wall",
    "-Werror",
    "-fshort-wchar",
    "-fno-strict-aliasing",
    "-fno-common",
    "-DEFIAPI=__attribute__((ms_abi))",
)

VARIANT_CFLAGS: dict[str, tuple[str, ...]] = {
    "release": ("-O2",),
    "asan": (
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ),
}


class HostLibError(RuntimeError):
    """The host library could not be built or loaded."""


class HostLibBuildError(HostLibError):
    """gcc failed; ``stderr`` holds its diagnostics."""

    def __init__(self, command: Sequence[str], returncode: int, stderr: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"gcc failed with exit status {returncode} building the host library\n"
            f"command: {' '.join(command)}\n{stderr}"
        )


def _edk2_tree() -> Path:
    from host_shim import paths

    return paths.edk2_tree()


def include_dirs() -> list[Path]:
    """Include directories, in search order."""
    edk2 = _edk2_tree()
    return [
        CORE_LIB_DIR,
        HARNESS_DIR,
        PACKAGE_INCLUDE,
        edk2 / "MdePkg" / "Include",
        edk2 / "MdePkg" / "Include" / "X64",
    ]


def sources(exclude: Iterable[str] = ()) -> list[Path]:
    """Every .c file of the core library and of tests/c, minus ``exclude`` (file names)."""
    skip = set(exclude)
    found = sorted(CORE_LIB_DIR.glob("*.c")) + sorted(HARNESS_DIR.glob("*.c"))
    return [path for path in found if path.name not in skip]


def _tracked_headers() -> list[Path]:
    headers = list(CORE_LIB_DIR.glob("*.h")) + list(HARNESS_DIR.glob("*.h"))
    headers += PACKAGE_INCLUDE.rglob("*.h")
    return sorted(headers)


@functools.lru_cache(maxsize=1)
def _compiler_identity() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostLibError("gcc not found on PATH: it is needed to build the host library")
    result = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    return f"{gcc}\n{result.stdout}"


def _cflags(variant: str, extra_cflags: Sequence[str]) -> list[str]:
    if variant not in VARIANT_CFLAGS:
        raise HostLibError(f"unknown host library variant {variant!r}; known: {', '.join(VARIANT_CFLAGS)}")
    return [*COMMON_CFLAGS, *VARIANT_CFLAGS[variant], *extra_cflags]


def build(
    variant: str = "release",
    *,
    extra_cflags: Sequence[str] = (),
    exclude: Iterable[str] = (),
) -> Path:
    """Build (or reuse) the host library and return its path.

    Raises :class:`HostLibBuildError` with gcc's stderr when compilation fails.
    """
    flags = _cflags(variant, extra_cflags)
    files = sources(exclude)
    if not files:
        raise HostLibError(f"no C sources found under {CORE_LIB_DIR} and {HARNESS_DIR}")
    includes = include_dirs()

    digest = hashlib.sha256()
    digest.update(_compiler_identity().encode())
    for item in (*flags, *(str(path) for path in includes)):
        digest.update(item.encode() + b"\0")
    for path in (*files, *_tracked_headers()):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    output = CACHE_DIR / f"{digest.hexdigest()[:32]}.so"
    if output.is_file():
        return output

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=CACHE_DIR, prefix=".build-", suffix=".so")
    os.close(handle)
    temporary = Path(temporary_name)
    command = [
        "gcc",
        *flags,
        *(f"-I{path}" for path in includes),
        *(str(path) for path in files),
        "-o",
        str(temporary),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise HostLibBuildError(command, result.returncode, result.stderr)
        # Atomic: concurrent builders of the same sources race harmlessly.
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def asan_runtime() -> Path:
    """The libasan the asan variant links against (for LD_PRELOAD)."""
    result = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = Path(result.stdout.strip())
    if result.returncode != 0 or not path.is_absolute() or not path.exists():
        raise HostLibError(f"cannot locate libasan.so via gcc: {result.stderr.strip()}")
    return path.resolve()


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that loads the ``asan`` variant."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = str(asan_runtime())
    # CPython itself leaks by design; leak reports would drown real findings.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    # Route every Python allocation (ctypes buffers included) through malloc,
    # so ASan knows their bounds; pymalloc arenas would hide overruns.
    env["PYTHONMALLOC"] = "malloc"
    return env


@functools.cache
def _load_cached(variant: str, extra_cflags: tuple[str, ...], exclude: tuple[str, ...]) -> ctypes.CDLL:
    if variant == "asan" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise HostLibError(
            "the asan variant needs the ASan runtime preloaded: run the process with "
            "hostlib.sanitizer_env() (LD_PRELOAD=libasan.so)"
        )
    path = build(variant, extra_cflags=extra_cflags, exclude=exclude)
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise HostLibError(f"cannot load {path}: {error}") from error


def load(
    variant: str = "release",
    *,
    extra_cflags: Sequence[str] = (),
    exclude: Iterable[str] = (),
) -> ctypes.CDLL:
    """Build if needed and load the host library (once per process and options).

    ``exclude`` names .c files to leave out (tests that build a variant
    without one file); nothing outside the call's arguments changes what is
    built.
    """
    return _load_cached(variant, tuple(extra_cflags), tuple(sorted(exclude)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variant", choices=sorted(VARIANT_CFLAGS), default="release")
    parser.add_argument("--exclude", action="append", default=[], help="skip this .c file name")
    arguments = parser.parse_args(argv)
    try:
        print(build(arguments.variant, exclude=arguments.exclude))
    except HostLibError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
