"""Derive the ovmf-mh platform DSC from the EDK2 tree's OvmfPkgX64.dsc.

No upstream DSC text is committed: the build reads the DSC of whatever EDK2
tree it uses and applies exactly these edits, each of which must match once
or the derivation fails loudly:

1. ``PLATFORM_NAME`` becomes ``OvmfMh`` and ``OUTPUT_DIRECTORY`` becomes
   ``Build/OvmfMhX64``, so a stock build in the same workspace is untouched.
2. Inside the ``OvmfPkg/Sec/SecMain.inf { ... }`` block, under
   ``<LibraryClasses>``: the ``MigrationHelperCoreLib`` mapping and the
   ``NULL|...SecMigrationHelperLib.inf`` line that links the detector in.
3. In the same block, a ``<PcdsFixedAtBuild>`` section setting
   ``PcdMigrationHelperBuildId`` to the build id.
4. At the end, a ``[BuildOptions]`` section that keeps the folders of this
   build out of the image (docs/measured-launch.md, "Reproducible build"):
   ``-ffile-prefix-map=ROOT/=`` for the workspace and every packages path
   entry (``__FILE__`` in ASSERTs becomes package-relative), and GenFw run
   through ``stuart/genfw-relative``, which names the image it converts
   relative to the workspace (the CodeView path in each PE debug directory).

``tests/test_platform_dsc.py`` checks that the difference is exactly this.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

UPSTREAM_DSC = "OvmfPkg/OvmfPkgX64.dsc"
PLATFORM_DIR = "OvmfMhPlatform"
PLATFORM_DSC = f"{PLATFORM_DIR}/OvmfMhX64.dsc"
OUTPUT_DIRECTORY = "Build/OvmfMhX64"
PLATFORM_NAME = "OvmfMh"

CORE_LIB_LINE = (
    "MigrationHelperCoreLib|"
    "OvmfPkgMigration/Library/MigrationHelperCoreLib/MigrationHelperCoreLib.inf"
)
DETECTOR_LINE = "NULL|OvmfPkgMigration/Library/SecMigrationHelperLib/SecMigrationHelperLib.inf"
PCD_SPACE = "gOvmfPkgMigrationTokenSpaceGuid"


class DscDerivationError(RuntimeError):
    """The upstream DSC does not have the shape the derivation expects."""


@dataclass(frozen=True)
class BuildId:
    """128-bit helper build id: the bytes of PcdMigrationHelperBuildId."""

    value: bytes

    @property
    def hex(self) -> str:
        return self.value.hex()


def compute_build_id(package_dir: Path, target: str, upstream_dsc_text: str) -> BuildId:
    """Hash the helper package sources, the build target and the upstream DSC."""
    digest = hashlib.sha256()
    digest.update(b"ovmf-mh build id v1\0")
    digest.update(target.encode() + b"\0")
    digest.update(hashlib.sha256(upstream_dsc_text.encode()).digest())
    for path in sorted(p for p in package_dir.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return BuildId(digest.digest()[:16])


def _replace_define(text: str, name: str, value: str) -> str:
    pattern = re.compile(rf"^(\s*{name}\s*=\s*)(\S+)[ \t]*$", re.MULTILINE)
    matches = pattern.findall(text)
    if len(matches) != 1:
        raise DscDerivationError(f"expected one {name} define in {UPSTREAM_DSC}, found {len(matches)}")
    return pattern.sub(lambda m: m.group(1) + value, text, count=1)


def reproducible_build_options(source_roots: Sequence[Path], genfw: Path) -> str:
    """The [BuildOptions] section of edit 4. Each root is mapped with and
    without symlinks resolved; the longest prefixes come last, because GCC
    applies the last matching -ffile-prefix-map."""
    roots = sorted({str(r) for root in source_roots for r in (root, root.resolve())}, key=len)
    maps = " ".join(f"-ffile-prefix-map={root.rstrip('/')}/=" for root in roots)
    return (
        "\n# ovmf-mh: no folder of this build in the image (reproducible build)\n"
        "[BuildOptions]\n"
        f"  GCC:*_*_*_CC_FLAGS = {maps}\n"
        f"  GCC:*_*_*_GENFW_PATH = {genfw}\n"
    )


def derive_platform_dsc(upstream_text: str, build_id: BuildId, build_options: str = "") -> str:
    """Return the platform DSC text: upstream plus the documented edits
    (``build_options``, from :func:`reproducible_build_options`, is edit 4)."""
    text = _replace_define(upstream_text, "PLATFORM_NAME", PLATFORM_NAME)
    text = _replace_define(text, "OUTPUT_DIRECTORY", OUTPUT_DIRECTORY)

    block = re.compile(
        r"^(?P<indent>[ \t]*)OvmfPkg/Sec/SecMain\.inf[ \t]*\{[ \t]*\n"
        r"(?P<body>(?:.*\n)*?)"
        r"(?P=indent)\}[ \t]*$",
        re.MULTILINE,
    )
    found = block.findall(text)
    if len(found) != 1:
        raise DscDerivationError(
            f"expected one 'OvmfPkg/Sec/SecMain.inf {{...}}' block in {UPSTREAM_DSC}, "
            f"found {len(found)}"
        )

    def edit(match: re.Match[str]) -> str:
        indent = match.group("indent")
        body = match.group("body")
        lib_header = re.search(r"^([ \t]*)<LibraryClasses>[ \t]*\n", body, re.MULTILINE)
        if lib_header is None:
            raise DscDerivationError("SecMain.inf block has no <LibraryClasses> section")
        inner = lib_header.group(1)
        entry = inner + "  "
        # The new library lines go at the end of the <LibraryClasses> section.
        rest = body[lib_header.end():]
        next_section = re.search(r"^[ \t]*<", rest, re.MULTILINE)
        split = lib_header.end() + (next_section.start() if next_section else len(rest))
        added_libs = f"{entry}{CORE_LIB_LINE}\n{entry}{DETECTOR_LINE}\n"
        id_bytes = ", ".join(f"0x{b:02X}" for b in build_id.value)
        added_pcds = (
            f"{inner}<PcdsFixedAtBuild>\n"
            f"{entry}{PCD_SPACE}.PcdMigrationHelperBuildId|{{{id_bytes}}}\n"
        )
        new_body = body[:split] + added_libs + body[split:] + added_pcds
        return f"{indent}OvmfPkg/Sec/SecMain.inf {{\n{new_body}{indent}}}"

    text = block.sub(edit, text, count=1)
    if build_options:
        text = text.rstrip("\n") + "\n" + build_options
    return text


def write_platform(
    edk2_path: Path,
    platform_root: Path,
    package_dir: Path,
    target: str,
    build_options: str = "",
) -> BuildId:
    """Write the derived DSC under platform_root; return the build id it carries."""
    upstream = (edk2_path / UPSTREAM_DSC).read_text()
    build_id = compute_build_id(package_dir, target, upstream)
    out = platform_root / PLATFORM_DSC
    out.parent.mkdir(parents=True, exist_ok=True)
    derived = derive_platform_dsc(upstream, build_id, build_options)
    # Rewriting an unchanged file would make the EDK2 build redo its AutoGen.
    if not out.exists() or out.read_text() != derived:
        out.write_text(derived)
    return build_id
