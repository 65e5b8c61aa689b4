"""Build the ovmf-mh firmware through stuart, or reuse an up-to-date build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from host_shim import paths
from host_shim.errors import BuildError
from host_shim.firmware import platform_dsc
from host_shim.firmware.build_errors import first_error

log = logging.getLogger(__name__)

PLATFORM_BUILD = paths.REPO_ROOT / "stuart" / "PlatformBuild.py"
# stuart console lines worth showing while a build runs.
_PROGRESS_PREFIXES = ("PROGRESS", "SECTION", "ERROR", "CRITICAL", "WARNING")
#: Seconds a stopped build step's process group gets after SIGTERM before SIGKILL.
STEP_STOP_GRACE_SECONDS = 5.0


def _stuart(tool: str) -> str:
    return str(Path(sys.executable).parent / tool)


def _run_logged(
    argv: list[str], log_path: Path, show_progress: bool, cwd: Path, extra_logs: tuple[Path, ...] = ()
) -> None:
    """Run a build step with its output in log_path; on failure raise a
    BuildError naming the first real error line and the log that holds it
    (extra_logs: logs the step writes itself, searched when its output has
    no error line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    started = time.time()
    with log_path.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        # Its own process group, so that a stop of this command (Ctrl-C,
        # SIGTERM: Terminated) stops the make and compiler processes the step
        # started too, not only the step itself.
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.startswith(("ERROR", "CRITICAL")):
                    errors.append(line.rstrip())
                if show_progress and line.startswith(_PROGRESS_PREFIXES):
                    print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
            code = proc.wait()
        except BaseException:
            _stop_step(proc, out)
            raise
    if code != 0:
        for candidate in (log_path, *extra_logs):
            if not candidate.is_file() or candidate.stat().st_mtime < started - 1:
                continue  # a log left by an earlier run says nothing about this one
            with candidate.open(errors="replace") as text:
                found = first_error(text)
            if found is not None:
                raise BuildError(f"{Path(argv[0]).name} failed: {found}", command=argv, log=candidate)
        summary = "; ".join(errors[:5]) or f"exit code {code}"
        raise BuildError(f"{Path(argv[0]).name} failed: {summary}", command=argv, log=log_path)


def _stop_step(proc: subprocess.Popen[str], out: TextIO) -> None:
    """Stop a build step's whole process group (its pid is the group's id):
    SIGTERM, then SIGKILL for whatever is left after a grace period. Only
    the group this command started is signalled, never a process by name."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STEP_STOP_GRACE_SECONDS)
        if not _group_alive(proc.pid):
            break
    out.write(f"\n[ovmf-mh] build step stopped (process group {proc.pid})\n")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def ensure_basetools(edk2: Path, show_progress: bool) -> None:
    """Build the tree's C BaseTools once (about a minute), in the tree."""
    if (edk2 / "BaseTools" / "Source" / "C" / "bin" / "GenFw").is_file():
        return
    if show_progress:
        print(f"  building EDK2 BaseTools of {edk2} (once, about a minute)", file=sys.stderr, flush=True)
    _run_logged(
        ["make", "-C", str(edk2 / "BaseTools"), f"-j{os.cpu_count() or 2}"],
        paths.tree_build_root(edk2) / "basetools.log",
        False,
        paths.REPO_ROOT,
    )


def describe_tree(edk2: Path) -> str:
    """Which EDK2 this is: Debian's package version, the git commit, or unknown."""
    changelog = edk2 / "debian" / "changelog"
    if changelog.is_file():
        first = changelog.read_text(errors="replace").split("\n", 1)[0]
        if "(" in first and ")" in first:
            return "Debian edk2 " + first.split("(", 1)[1].split(")", 1)[0]
    if (edk2 / ".git").exists():
        result = subprocess.run(
            ["git", "-C", str(edk2), "describe", "--always", "--tags", "--dirty"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode == 0:
            return "git " + result.stdout.strip()
    return "unknown (no debian/changelog, no git metadata)"


def _inputs_digest(target: str, edk2: Path) -> str:
    upstream = (edk2 / platform_dsc.UPSTREAM_DSC).read_text()
    build_id = platform_dsc.compute_build_id(paths.PACKAGE_DIR, target, upstream)
    digest = hashlib.sha256(build_id.value)
    digest.update(str(edk2).encode())
    for script in (PLATFORM_BUILD, Path(platform_dsc.__file__), PLATFORM_BUILD.parent / "genfw-relative"):
        digest.update(script.read_bytes())
    return digest.hexdigest()


def read_build_record(image: Path) -> dict[str, Any] | None:
    """The record `ovmf-mh build` wrote next to an image's FV folder (which
    EDK2 tree, tool chain, target, build id), or None for other images."""
    stamp = image.resolve().parent.parent / "ovmf-mh-build.json"
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def build_firmware(target: str = "DEBUG", *, force: bool = False, show_progress: bool = True) -> Path:
    """Return the path of OVMF_CODE.fd for ``target``, building it if needed."""
    if target not in paths.TARGETS:
        raise ValueError(f"target must be one of {paths.TARGETS}")
    edk2 = paths.edk2_tree()
    workspace = paths.tree_build_root(edk2)
    code = paths.firmware_code(target, edk2)
    digest = _inputs_digest(target, edk2)
    stamp = paths.build_stamp(target, edk2)
    if not force and code.is_file() and stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("inputs") == digest:
            log.info("firmware %s is up to date (build id %s)", target, recorded.get("build_id"))
            return code

    ensure_basetools(edk2, show_progress)
    ready = workspace / ".stuart-ready"
    if not ready.is_file() or ready.read_text() != str(edk2):
        for tool in ("stuart_setup", "stuart_update"):
            _run_logged(
                [_stuart(tool), "-c", str(PLATFORM_BUILD)],
                workspace / f"{tool}.log",
                show_progress,
                paths.REPO_ROOT,
            )
        ready.write_text(str(edk2))

    started = time.monotonic()
    build_log = paths.build_log(target, edk2)
    stamp.unlink(missing_ok=True)
    _run_logged(
        [_stuart("stuart_build"), "-c", str(PLATFORM_BUILD), f"TARGET={target}"],
        build_log,
        show_progress,
        paths.REPO_ROOT,
        # The EDK2 build's own output (compiler lines) is in stuart's log.
        extra_logs=(workspace / "Build" / "BUILDLOG_OvmfMh.txt",),
    )
    if not code.is_file():
        raise BuildError(f"build finished but {code} is missing", command=["stuart_build"], log=build_log)
    upstream = (edk2 / platform_dsc.UPSTREAM_DSC).read_text()
    build_id = platform_dsc.compute_build_id(paths.PACKAGE_DIR, target, upstream)
    stamp.write_text(
        json.dumps(
            {
                "inputs": digest,
                "build_id": build_id.hex,
                "target": target,
                "edk2": str(edk2),
                "edk2_version": describe_tree(edk2),
                "tool_chain": paths.tool_chain_tag(edk2),
                "seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )
    log.info("built %s in %.0f s (build id %s)", code, time.monotonic() - started, build_id.hex)
    return code
