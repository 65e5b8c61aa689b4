"""The second EDK2 tree: the newest edk2 source package Debian serves
(stuart/bootstrap.sh fetches it into .cache/edk2-newest). The image is built
from it through `EDK2_PATH=TREE ovmf-mh build`, exactly as a firmware engineer
points the tool at a tree of their own, and boot-tested: a normal boot to the
guest's userspace, helper mode to READY and an orderly shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ci_provides import missing

from helper import abi
from host_shim import paths
from host_shim.firmware.boot import DIVERSION_MARKER, PEI_MARKERS, BootMode, boot_image
from host_shim.firmware.build import read_build_record
from host_shim.helpers.helper_vm import HelperSpec, HelperVM

pytestmark = pytest.mark.qemu

A = abi.load()
OVMF_MH = str(Path(sys.executable).parent / "ovmf-mh")


@pytest.fixture(scope="module")
def second_tree() -> Path:
    tree = paths.newest_tree()
    if tree is None:
        if os.environ.get("OVMF_MH_SECOND_TREE") == "0":
            pytest.skip("OVMF_MH_SECOND_TREE=0: bootstrap was told not to fetch the second EDK2 tree")
        missing(
            f"no second EDK2 tree in {paths.NEWEST_TREE_DIR}: stuart/bootstrap.sh found no newer "
            "edk2 source package served by Debian (its [setup] lines say why)"
        )
    return tree


@pytest.fixture(scope="module")
def second_firmware(second_tree: Path) -> Path:
    """OVMF_CODE.fd built from the second tree by the CLI with EDK2_PATH set."""
    env = dict(os.environ, EDK2_PATH=str(second_tree))
    result = subprocess.run(
        [OVMF_MH, "build", "--quiet"], cwd=paths.REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=3600, check=False,
    )
    assert result.returncode == 0, f"build from {second_tree} failed:\n{result.stderr[-4000:]}"
    image = Path(result.stdout.strip().splitlines()[-1])
    assert image == paths.firmware_code("DEBUG", second_tree)
    return image


def test_second_tree_build_is_its_own(second_tree: Path, second_firmware: Path) -> None:
    # Own workspace: Conf/ from the tree's templates, output under it.
    workspace = paths.tree_build_root(second_tree)
    assert second_firmware.is_relative_to(workspace)
    assert workspace != paths.tree_build_root(paths.edk2_tree())
    conf = (workspace / "Conf" / "tools_def.txt").read_text()
    template = (second_tree / paths.TOOLS_DEF_TEMPLATE).read_text()
    assert conf == template
    record = read_build_record(second_firmware)
    assert record is not None
    assert record["edk2"] == str(second_tree.resolve())
    assert record["tool_chain"] == paths.tool_chain_tag(second_tree)
    assert record["edk2_version"].startswith("Debian edk2 ")
    inspect = subprocess.run(
        [OVMF_MH, "inspect", "--json", str(second_firmware)], capture_output=True, text=True, check=True
    )
    report = json.loads(inspect.stdout)
    assert report["helper_present"]
    assert report["build_record"]["edk2"] == str(second_tree.resolve())
    assert report["helper"]["build_id"] == record["build_id"]


def test_second_tree_normal_boot_reaches_guest_userspace(second_firmware: Path, work_dir: Path) -> None:
    outcome = boot_image(second_firmware, BootMode.NORMAL, work_dir, timeout=120)
    assert outcome.ok, "\n".join(outcome.describe())
    debugcon = outcome.logs.debugcon.read_text()
    assert DIVERSION_MARKER not in debugcon
    assert "Loading PEIM" in debugcon


def test_second_tree_helper_ready_and_shutdown(second_firmware: Path, work_dir: Path) -> None:
    with HelperVM(HelperSpec(second_firmware), work_dir) as helper:
        header = helper.wait_ready(10.0)
        assert header["State"] == A.const("OVMF_MH_STATE_READY")
        assert helper.mailbox is not None
        query = helper.mailbox.call("QUERY")
        assert query.results[0] == (A.const("OVMF_MH_ABI_MAJOR") << 16) | A.const("OVMF_MH_ABI_MINOR")
        assert helper.shutdown(timeout=30) == 0
        assert helper.mailbox.header()["State"] == A.const("OVMF_MH_STATE_SHUTDOWN")
        debugcon = helper.vm.debugcon_text()
    assert DIVERSION_MARKER in debugcon
    assert not [m for m in PEI_MARKERS if m in debugcon], debugcon
