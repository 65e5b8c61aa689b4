"""The platform DSC is upstream's OvmfPkgX64.dsc plus exactly the intended edits."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
from ci_provides import missing

from host_shim import paths
from host_shim.firmware import platform_dsc


@pytest.fixture(scope="module", params=["active", "newest"])
def upstream(request: pytest.FixtureRequest) -> str:
    """The DSC of the active tree, and of the second tree the tests build
    (the newest served Debian edk2): the difference is the same on both."""
    tree = paths.edk2_tree() if request.param == "active" else paths.newest_tree()
    if tree is None and os.environ.get("OVMF_MH_SECOND_TREE") == "0":
        pytest.skip("OVMF_MH_SECOND_TREE=0: bootstrap was told not to fetch the second EDK2 tree")
    if tree is None:
        missing(f"no second EDK2 tree in {paths.NEWEST_TREE_DIR} (stuart/bootstrap.sh fetches it)")
    return (tree / platform_dsc.UPSTREAM_DSC).read_text()


def test_difference_is_exactly_the_intended_one(upstream: str) -> None:
    build_id = platform_dsc.BuildId(bytes(range(16)))
    derived = platform_dsc.derive_platform_dsc(upstream, build_id)
    diff = list(difflib.ndiff(upstream.splitlines(), derived.splitlines()))
    removed = [line[2:].strip() for line in diff if line.startswith("- ")]
    added = [line[2:].strip() for line in diff if line.startswith("+ ")]
    assert removed == ["PLATFORM_NAME                  = Ovmf", "OUTPUT_DIRECTORY               = Build/OvmfX64"]
    id_bytes = ", ".join(f"0x{b:02X}" for b in range(16))
    assert added == [
        "PLATFORM_NAME                  = OvmfMh",
        "OUTPUT_DIRECTORY               = Build/OvmfMhX64",
        platform_dsc.CORE_LIB_LINE,
        platform_dsc.DETECTOR_LINE,
        "<PcdsFixedAtBuild>",
        f"gOvmfPkgMigrationTokenSpaceGuid.PcdMigrationHelperBuildId|{{{id_bytes}}}",
    ]
    # The library lines sit inside SecMain's block, after its own NULL libraries.
    lines = derived.splitlines()
    sec = next(i for i, line in enumerate(lines) if line.strip() == "OvmfPkg/Sec/SecMain.inf {")
    end = next(i for i in range(sec, len(lines)) if lines[i].strip() == "}")
    block = [line.strip() for line in lines[sec:end]]
    assert block.index(platform_dsc.DETECTOR_LINE) > block.index("<LibraryClasses>")
    assert block.index("<PcdsFixedAtBuild>") > block.index(platform_dsc.DETECTOR_LINE)


def test_derivation_fails_loudly_on_an_unexpected_dsc(upstream: str) -> None:
    build_id = platform_dsc.BuildId(bytes(16))
    with pytest.raises(platform_dsc.DscDerivationError, match="SecMain"):
        no_block = upstream.replace("OvmfPkg/Sec/SecMain.inf {", "OvmfPkg/Sec/SecMain.inf")
        platform_dsc.derive_platform_dsc(no_block, build_id)
    with pytest.raises(platform_dsc.DscDerivationError, match="OUTPUT_DIRECTORY"):
        platform_dsc.derive_platform_dsc(upstream.replace("OUTPUT_DIRECTORY", "OUTPUT_DIR"), build_id)


def test_build_id_tracks_sources_and_target(tmp_path: Path, upstream: str) -> None:
    package = tmp_path / "Pkg"
    package.mkdir()
    (package / "A.c").write_text("int a;\n")
    first = platform_dsc.compute_build_id(package, "DEBUG", upstream)
    assert first == platform_dsc.compute_build_id(package, "DEBUG", upstream)
    assert first != platform_dsc.compute_build_id(package, "RELEASE", upstream)
    (package / "A.c").write_text("int b;\n")
    assert first != platform_dsc.compute_build_id(package, "DEBUG", upstream)


def test_reproducible_build_options(tmp_path: Path, upstream: str) -> None:
    """Edit 4: every root is mapped to nothing, the more specific (longer)
    prefixes last because GCC applies the last matching map, symlinked roots
    also under their real path; GenFw goes through the wrapper."""
    real_tree = tmp_path / "shared" / "edk2"
    real_tree.mkdir(parents=True)
    workspace = tmp_path / "ws"
    (workspace / ".cache").mkdir(parents=True)
    (workspace / ".cache" / "edk2").symlink_to(real_tree)
    wrapper = workspace / "stuart" / "genfw-relative"
    options = platform_dsc.reproducible_build_options([workspace / ".cache" / "edk2", workspace], wrapper)
    derived = platform_dsc.derive_platform_dsc(upstream, platform_dsc.BuildId(bytes(16)), options)
    assert derived.endswith(options)
    lines = [line.strip() for line in options.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "[BuildOptions]"
    flags = lines[1].removeprefix("GCC:*_*_*_CC_FLAGS = ").split()
    mapped = [flag.removeprefix("-ffile-prefix-map=").removesuffix("=") for flag in flags]
    assert mapped == sorted(mapped, key=len)
    assert set(mapped) == {f"{workspace}/", f"{workspace}/.cache/edk2/", f"{real_tree}/"}
    assert mapped.index(f"{workspace}/") < mapped.index(f"{workspace}/.cache/edk2/")
    assert lines[2] == f"GCC:*_*_*_GENFW_PATH = {wrapper}"
