"""Build the same sources a second time in another folder and compare the
firmware images byte for byte (the reproducibility check of
docs/measured-launch.md).

The copy holds the checkout's files as git sees them (tracked and untracked,
not ignored: the same sources as the first build, committed or not). Its
``.cache`` is a symlink to the checkout's, so the EDK2 tree and its BaseTools
are shared, yet the build sees the tree under another absolute path (the copy's
``.cache/...``), which is what a guest owner's rebuild in a folder of their own
does too. Everything else (Conf/, Build/, the derived DSC) is made anew.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from host_shim import paths
from host_shim.errors import BuildError
from host_shim.firmware.image_diff import Difference, compare_images

#: The images compared: the code flash a VMM measures and the combined image.
IMAGES = ("OVMF_CODE.fd", "OVMF.fd")


@dataclass(frozen=True)
class RebuildResult:
    code: Path  # OVMF_CODE.fd of the second build
    seconds: float
    log: Path


def copy_checkout(dest: Path, source: Path = paths.REPO_ROOT) -> None:
    """Copy the checkout's sources (git's view, ignored files left out) to ``dest``."""
    listing = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    dest.mkdir(parents=True, exist_ok=False)
    for name in sorted({n for n in listing.decode().split("\0") if n}):
        src = source / name
        if not src.is_file() or src.is_symlink():
            continue  # deleted but still in the index, or the .cache link
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    if (source / ".cache").exists():
        os.symlink((source / ".cache").resolve(), dest / ".cache")


def rebuild_elsewhere(dest: Path, target: str) -> RebuildResult:
    """Copy the checkout to ``dest`` and build ``target`` there with this
    Python (its stuart); return where the image is and how long it took."""
    copy_checkout(dest)
    log = dest.parent / f"{dest.name}-build-{target}.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "host_shim.cli", "build", "--target", target, "--quiet"],
            cwd=dest,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise BuildError(
            f"second build of {target} in {dest} failed (exit {proc.returncode})",
            command=["ovmf-mh", "build", "--target", target],
            log=log,
        )
    lines = proc.stdout.strip().splitlines()
    code = Path(lines[-1]) if lines else Path()
    if not code.is_file() or not code.is_relative_to(dest.resolve()):
        raise BuildError(
            f"second build in {dest} printed {code}, not an image inside it",
            command=["ovmf-mh", "build", "--target", target],
            log=log,
        )
    return RebuildResult(code, seconds, log)


def compare_builds(first_code: Path, second_code: Path) -> dict[str, list[Difference]]:
    """Differences of each of IMAGES between the two builds' FV folders."""
    return {
        name: compare_images(first_code.parent / name, second_code.parent / name) for name in IMAGES
    }
