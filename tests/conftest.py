"""Shared fixtures: the firmware image that `ovmf-mh build` produces, and a
work folder per test whose QEMU artefacts are listed when the test fails."""

from __future__ import annotations

import re
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from host_shim import paths
from host_shim.build import build_firmware

WORK_ROOT = paths.REPO_ROOT / "work" / "tests"


@pytest.fixture(scope="session")
def firmware() -> Path:
    """OVMF_CODE.fd of the DEBUG build, built (or found up to date) once."""
    return build_firmware("DEBUG", show_progress=False)


@pytest.fixture
def work_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    path = WORK_ROOT / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.ovmf_mh_work_dir = path
    yield path


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
