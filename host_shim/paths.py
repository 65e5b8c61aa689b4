"""Where things live: the source checkout, its caches and build outputs.

Every EDK2 tree gets its own build folder ``Build/<tree name>-<digest>``
(the digest is of the tree's resolved path): stuart's workspace for that
tree, holding its ``Conf/``, the derived platform DSC, the EDK2 output and
the logs. Nothing is shared between trees, so switching trees never meets a
``Conf/`` or an AutoGen made from another tree's templates.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from host_shim.errors import SetupError

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
GUEST_DIR = CACHE_DIR / "guest"
BUILD_ROOT = REPO_ROOT / "Build"
PACKAGE_DIR = REPO_ROOT / "OvmfPkgMigration"
DEFAULT_TREE_DIR = CACHE_DIR / "edk2-src"
# The newest EDK2 source package Debian serves (stuart/bootstrap.sh), the
# second tree the tests build and boot.
NEWEST_TREE_DIR = CACHE_DIR / "edk2-newest"
TARGETS = ("DEBUG", "RELEASE")
# Tool-chain tags in order of preference: GCC5 while the tree defines it
# (edk2-stable202211 .. 202602), GCC where GCC5 is gone (202605 and later).
TOOL_CHAIN_TAGS = ("GCC5", "GCC")
TOOLS_DEF_TEMPLATE = Path("BaseTools") / "Conf" / "tools_def.template"
UPSTREAM_DSC = Path("OvmfPkg") / "OvmfPkgX64.dsc"


def _is_tree(path: Path) -> bool:
    return (path / UPSTREAM_DSC).is_file()


def _cached_tree(folder: Path) -> Path | None:
    candidates = sorted(p.parents[1] for p in folder.glob(f"edk2-*/{UPSTREAM_DSC}"))
    return candidates[-1] if candidates else None


def edk2_tree() -> Path:
    """Return the EDK2 tree: $EDK2_PATH, else the cached Debian source package."""
    configured = os.environ.get("EDK2_PATH")
    if configured:
        path = Path(configured).resolve()
        if not _is_tree(path):
            raise SetupError(
                f"EDK2_PATH={configured} is not an EDK2 tree (no {UPSTREAM_DSC}). "
                "Point it at an edk2 checkout with submodules, or unset it to use "
                "Debian's edk2 source package fetched by stuart/bootstrap.sh."
            )
        return path
    tree = _cached_tree(DEFAULT_TREE_DIR)
    if tree is None:
        raise SetupError(
            "no EDK2 source found: run stuart/bootstrap.sh (it fetches Debian's edk2 "
            "source package into .cache/edk2-src), or set EDK2_PATH to an EDK2 tree."
        )
    return tree


def newest_tree() -> Path | None:
    """The newest Debian EDK2 tree bootstrap fetched (.cache/edk2-newest/current names it)."""
    current = NEWEST_TREE_DIR / "current"
    if not current.is_file():
        return None
    tree = NEWEST_TREE_DIR / current.read_text().strip()
    return tree if _is_tree(tree) else None


def tree_key(edk2: Path) -> str:
    """Folder name for a tree's build: its name and a digest of its resolved path."""
    resolved = edk2.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", resolved.name)[:40] or "edk2"
    return f"{name}-{digest}"


def tree_build_root(edk2: Path | None = None) -> Path:
    """stuart's workspace for one EDK2 tree (default: the active tree)."""
    return BUILD_ROOT / tree_key(edk2 if edk2 is not None else edk2_tree())


def platform_root(edk2: Path | None = None) -> Path:
    """Where the derived platform DSC of a tree is written (a packages path entry)."""
    return tree_build_root(edk2) / "Platform"


def tool_chain_tag(edk2: Path | None = None) -> str:
    """The GCC tool-chain tag the tree's own tools_def template defines."""
    tree = edk2 if edk2 is not None else edk2_tree()
    template = tree / TOOLS_DEF_TEMPLATE
    try:
        text = template.read_text(errors="replace")
    except OSError as exc:
        raise SetupError(f"{template} cannot be read ({exc}); is {tree} a complete EDK2 tree?") from exc
    for tag in TOOL_CHAIN_TAGS:
        if re.search(rf"^\*_{tag}_X64_CC_PATH\s*=", text, re.MULTILINE):
            return tag
    raise SetupError(
        f"{template} defines none of the tool-chain tags {', '.join(TOOL_CHAIN_TAGS)} for X64"
    )


def firmware_dir(target: str, edk2: Path | None = None) -> Path:
    """The FV folder of a build of the ovmf-mh platform from one tree."""
    tree = edk2 if edk2 is not None else edk2_tree()
    return tree_build_root(tree) / "Build" / "OvmfMhX64" / f"{target}_{tool_chain_tag(tree)}" / "FV"


def firmware_code(target: str, edk2: Path | None = None) -> Path:
    return firmware_dir(target, edk2) / "OVMF_CODE.fd"


def firmware_vars(target: str, edk2: Path | None = None) -> Path:
    return firmware_dir(target, edk2) / "OVMF_VARS.fd"


def build_stamp(target: str, edk2: Path | None = None) -> Path:
    """The json record `ovmf-mh build` writes next to the FV folder."""
    return firmware_dir(target, edk2).parent / "ovmf-mh-build.json"


def build_log(target: str, edk2: Path | None = None) -> Path:
    return tree_build_root(edk2) / f"ovmf-mh-build-{target}.log"
