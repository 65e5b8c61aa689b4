"""The firmware is reproducible: the same sources built a second time, in
another folder and later, give the same bytes (docs/measured-launch.md).

The second build shares the EDK2 tree and its BaseTools (through a .cache
symlink, so under another absolute path) and makes everything else anew.
It is a full DEBUG build of the platform: the one slow test of this file.
RELEASE is checked by hand (docs/measured-launch.md says how).
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pefile  # type: ignore[import-untyped]
import pytest

from host_shim import paths
from host_shim.firmware import repro
from host_shim.firmware.image_diff import compare_bytes
from host_shim.firmware.inspect_image import inspect_bytes, inspect_image


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.firmware
def test_second_build_in_another_folder_is_identical(firmware: Path, tmp_path: Path) -> None:
    dest = tmp_path / "another-checkout-of-ovmf-mh"
    result = repro.rebuild_elsewhere(dest, "DEBUG")
    differences = repro.compare_builds(firmware, result.code)
    lines = [f"{name}: {diff.describe()}" for name, found in differences.items() for diff in found]
    assert not lines, (
        "two builds of the same sources differ (first: {}, second: {}, its log: {}):\n  {}".format(
            firmware.parent, result.code.parent, result.log, "\n  ".join(lines)
        )
    )
    for name in repro.IMAGES:
        print(f"{name}: sha256 {_sha256(firmware.parent / name)} in both builds")
    print(f"second DEBUG build: {result.seconds:.0f} s")
    shutil.rmtree(dest)


# --- the comparison names what differs ----------------------------------------


def _sec_pe_offset(data: bytes) -> tuple[int, pefile.PE]:
    """File offset of the SEC module's PE32 image in the (uncompressed) SECFV."""
    report = inspect_bytes(data)
    assert report.sec is not None and report.sec.flash_address is not None
    offset = report.sec.flash_address - (2**32 - len(data))
    return offset, pefile.PE(data=data[offset:], fast_load=True)


def test_difference_in_sec_is_named(firmware: Path) -> None:
    data = firmware.read_bytes()
    offset, pe = _sec_pe_offset(data)
    stamp = offset + pe.FILE_HEADER.get_file_offset() + 4
    changed = bytearray(data)
    struct.pack_into("<I", changed, stamp, 0x5EED)
    [diff] = compare_bytes(data, bytes(changed))
    assert diff.offset == stamp and diff.length in (1, 2)
    assert any("(SecMain)" in part for part in diff.path), diff.describe()
    assert diff.path[-1] == "PE32 section"
    assert diff.what.startswith("PE TimeDateStamp")
    text = pe.sections[0]
    inside = offset + text.PointerToRawData + 0x10
    changed = bytearray(data)
    changed[inside] ^= 0xFF
    [diff] = compare_bytes(data, bytes(changed))
    name = text.Name.rstrip(b"\0").decode()
    assert f"PE section {name} +0x10" in diff.what, diff.describe()


def test_identical_images_have_no_difference_and_sizes_are_compared(firmware: Path) -> None:
    data = firmware.read_bytes()
    assert compare_bytes(data, data) == []
    [diff] = compare_bytes(data, data + bytes(4096))
    assert "sizes differ" in diff.what
    assert inspect_image(firmware).sec is not None


def test_genfw_wrapper_names_workspace_paths_relative(tmp_path: Path) -> None:
    """stuart/genfw-relative runs GenFw from the workspace with workspace
    paths made relative (the CodeView record keeps no folder), others untouched."""
    fake = tmp_path / "bin" / "GenFw"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\npwd\nfor a do echo "$a"; done\n')
    fake.chmod(0o755)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    wrapper = paths.REPO_ROOT / "stuart" / "genfw-relative"
    argv = [str(wrapper), "-e", "PEIM", "-o", f"{workspace}/Build/a b/X.efi", f"{workspace}/Build/X.dll"]
    argv.append("/elsewhere/Y")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "WORKSPACE": str(workspace)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [str(workspace), "-e", "PEIM", "-o", "Build/a b/X.efi", "Build/X.dll", "/elsewhere/Y"]
    failed = subprocess.run(argv, env={"PATH": env["PATH"]}, capture_output=True, text=True)
    assert failed.returncode != 0 and "WORKSPACE is not set" in failed.stderr
