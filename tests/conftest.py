"""Shared fixtures: the firmware image that `ovmf-mh build` produces, and a
work folder per test whose QEMU artefacts are listed when the test fails."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Generator, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from host_shim import paths
from host_shim.firmware.build import build_firmware
from host_shim.vm.reaper import process_state

WORK_ROOT = paths.REPO_ROOT / "work" / "tests"


@pytest.fixture(scope="session")
def firmware() -> Path:
    """OVMF_CODE.fd of the DEBUG build, built (or found up to date) once."""
    return build_firmware("DEBUG", show_progress=False)


#: A test's RAM folder on tmpfs: omh-ram-PID-XXXX, the pytest's pid in the
#: name so that a later run can sweep the folders of one killed outright.
SHM = Path("/dev/shm")
RAM_DIR_PREFIX = "omh-ram-"


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    """RAM files on tmpfs for this test only: nothing may stay there (a
    leftover folder inside fails the test). tmpfs keeps no dirty log, so a
    source asks for the full check. Folders of a pytest that was killed
    outright (SIGKILL, a CI timeout: no finaliser ran) are swept first."""
    for stale in SHM.glob(f"{RAM_DIR_PREFIX}*-*"):
        pid = stale.name[len(RAM_DIR_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and process_state(int(pid)) is None:
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{RAM_DIR_PREFIX}{os.getpid()}-", dir=SHM))
    yield path
    for leftover in path.iterdir():
        leftover.unlink()
    path.rmdir()


@pytest.fixture
def work_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    path = WORK_ROOT / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.ovmf_mh_work_dir = path
    yield path


@pytest.fixture(autouse=True)
def private_tmpdir(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Each test gets its own short TMPDIR (QMP socket paths must stay under
    108 bytes). A command that fails keeps its temporary work folder for its
    logs, by design; after the test whatever was kept moves into the test's
    work folder, and the private TMPDIR is removed: no run leaves folders in
    /tmp."""
    tmp_path_factory.getbasetemp()  # fixed before TMPDIR changes, so it outlives this test
    tmp = Path(tempfile.mkdtemp(prefix="omh-test-"))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    try:
        yield tmp
    finally:
        work = getattr(request.node, "ovmf_mh_work_dir", None)
        kept = sorted(tmp.iterdir()) if tmp.is_dir() else []
        if work is not None and kept:
            dest = Path(work) / "kept-tmp"
            dest.mkdir(exist_ok=True)
            for path in kept:
                with suppress(OSError, shutil.Error):
                    shutil.move(str(path), str(dest / path.name))
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    work = getattr(item, "ovmf_mh_work_dir", None)
    if work is not None and report.failed:
        files = sorted(p for p in Path(work).rglob("*") if p.is_file() and not p.name.endswith(".ram"))
        listing = "\n".join(f"  {p}" for p in files) or "  (no files)"
        report.sections.append(("QEMU artefacts", f"work folder {work}:\n{listing}"))
    return report
