"""Where things live: the source checkout, its caches and build outputs."""

from __future__ import annotations

import os
from pathlib import Path

from host_shim.errors import SetupError

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
GUEST_DIR = CACHE_DIR / "guest"
BUILD_ROOT = REPO_ROOT / "Build"
PLATFORM_ROOT = BUILD_ROOT / "Platform"
PACKAGE_DIR = REPO_ROOT / "OvmfPkgMigration"
TOOL_CHAIN = "GCC5"
TARGETS = ("DEBUG", "RELEASE")


def edk2_tree() -> Path:
    """Return the EDK2 tree: $EDK2_PATH, else the cached Debian source package."""
    configured = os.environ.get("EDK2_PATH")
    if configured:
        path = Path(configured).resolve()
        if not (path / "OvmfPkg" / "OvmfPkgX64.dsc").is_file():
            raise SetupError(
                f"EDK2_PATH={configured} is not an EDK2 tree (no OvmfPkg/OvmfPkgX64.dsc). "
                "Point it at an edk2 checkout with submodules, or unset it to use "
                "Debian's edk2 source package fetched by stuart/bootstrap.sh."
            )
        return path
    candidates = sorted((CACHE_DIR / "edk2-src").glob("edk2-*/OvmfPkg/OvmfPkgX64.dsc"))
    if not candidates:
        raise SetupError(
            "no EDK2 source found: run stuart/bootstrap.sh (it fetches Debian's edk2 "
            "source package into .cache/edk2-src), or set EDK2_PATH to an EDK2 tree."
        )
    return candidates[-1].parents[1]


def firmware_dir(target: str) -> Path:
    """The FV folder of a build of the ovmf-mh platform."""
    return BUILD_ROOT / "OvmfMhX64" / f"{target}_{TOOL_CHAIN}" / "FV"


def firmware_code(target: str) -> Path:
    return firmware_dir(target) / "OVMF_CODE.fd"


def firmware_vars(target: str) -> Path:
    return firmware_dir(target) / "OVMF_VARS.fd"
