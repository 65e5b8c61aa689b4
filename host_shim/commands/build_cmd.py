"""ovmf-mh build: build the firmware through stuart."""

from __future__ import annotations

import argparse

from host_shim import paths
from host_shim.firmware.build import build_firmware


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "build",
        help="build the OVMF image with the migration helper (stuart)",
        description=(
            "Build OVMF X64 with the ovmf-mh SEC helper through stuart "
            "(stuart/PlatformBuild.py), or reuse the existing build when its inputs "
            "(helper sources, target, upstream DSC, build scripts) are unchanged. "
            "The EDK2 tree is $EDK2_PATH (any tree from edk2-stable202211 to current "
            "upstream, with submodules) or Debian's edk2 source package fetched by "
            "stuart/bootstrap.sh; each tree builds in its own Build/<tree>-<digest>/ "
            "with its own BaseTools, Conf/ and tool-chain tag (GCC5, or GCC where the "
            "tree has no GCC5). Progress goes to stderr; the build log is kept in "
            "Build/<tree>-<digest>/ovmf-mh-build-TARGET.log, and a failure names the "
            "first error line and its log. The last line of stdout is the absolute "
            "path of OVMF_CODE.fd."
        ),
    )
    parser.add_argument("--target", choices=paths.TARGETS, default="DEBUG", help="EDK2 build target (default DEBUG)")
    parser.add_argument("--force", action="store_true", help="run stuart even when up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    code = build_firmware(args.target, force=args.force, show_progress=not args.quiet)
    print(code.resolve())
    return 0
