# @file
# Stuart platform for ovmf-mh: OVMF X64 with the migration helper's SEC
# detector linked into SecMain.
#
#   stuart_setup  -c stuart/PlatformBuild.py
#   stuart_update -c stuart/PlatformBuild.py
#   stuart_build  -c stuart/PlatformBuild.py [TARGET=DEBUG|RELEASE] [--FlashRom]
#
# Works offline: the scopes leave out 'edk2-build' and 'ovmf', whose ext_deps
# download nasm and iasl; Debian's nasm and iasl on PATH are used instead.
# The EDK2 tree is $EDK2_PATH or Debian's edk2 source package in .cache/.
# Each tree has its own workspace Build/<tree>-<digest>/ (Conf/, output, logs)
# and brings its own BaseTools and Python build tools: the workspace holds no
# EDK2 tree, so stuart's scan finds no other tree's tool settings.
#
# SPDX-License-Identifier: BSD-2-Clause-Patent
##
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edk2toolext.environment import shell_environment
from edk2toolext.environment.uefi_build import UefiBuilder
from edk2toolext.environment.var_dict import VarDict
from edk2toolext.invocables.edk2_platform_build import BuildSettingsManager
from edk2toolext.invocables.edk2_setup import RequiredSubmodule, SetupSettingsManager
from edk2toolext.invocables.edk2_update import UpdateSettingsManager

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from host_shim import paths  # noqa: E402
from host_shim.firmware import platform_dsc  # noqa: E402

SCOPES = ("ovmf-mh",)
# GenFw, naming the image it converts relative to the workspace.
GENFW_WRAPPER = REPO_ROOT / "stuart" / "genfw-relative"
ARCHITECTURES = ("X64",)
TARGETS = paths.TARGETS


def _workspace() -> str:
    workspace = paths.tree_build_root()
    workspace.mkdir(parents=True, exist_ok=True)
    return str(workspace)


def _packages_path() -> list[str]:
    # The derived DSC is written here during SetPlatformEnv; stuart checks
    # that every packages path entry exists before that.
    platform = paths.platform_root()
    platform.mkdir(parents=True, exist_ok=True)
    return [str(paths.edk2_tree()), str(REPO_ROOT), str(platform)]


def _use_tree_tools(env: VarDict) -> None:
    """Take BaseTools, its Python build tools and its Conf/ templates from the
    active tree (what the tree's own *_path_env.yaml files would set)."""
    base_tools = str(paths.edk2_tree() / "BaseTools")
    shell = shell_environment.GetEnvironment()
    shell.set_shell_var("EDK_TOOLS_PATH", base_tools)
    shell.set_shell_var("BASE_TOOLS_PATH", base_tools)
    env.SetValue("EDK_TOOLS_PATH", base_tools, "ovmf-mh: the EDK2 tree's BaseTools")
    shell.insert_path(os.path.join(base_tools, "BinWrappers", "PosixLike"))
    shell.insert_pypath(os.path.join(base_tools, "Source", "Python"))


class SettingsManager(UpdateSettingsManager, SetupSettingsManager):
    """stuart_setup and stuart_update: nothing to fetch, everything is local."""

    def GetWorkspaceRoot(self) -> str:
        return _workspace()

    def GetPackagesPath(self) -> list[str]:
        return _packages_path()

    def GetActiveScopes(self) -> tuple[str, ...]:
        return SCOPES

    def GetRequiredSubmodules(self) -> list[RequiredSubmodule]:
        # Debian's source package carries the submodules' content already.
        return []

    def GetPackagesSupported(self) -> tuple[str, ...]:
        return ("OvmfPkgMigration",)

    def GetArchitecturesSupported(self) -> tuple[str, ...]:
        return ARCHITECTURES

    def GetTargetsSupported(self) -> tuple[str, ...]:
        return TARGETS


class PlatformBuilder(UefiBuilder, BuildSettingsManager):
    """stuart_build: derive the platform DSC, build it, optionally boot it."""

    def GetWorkspaceRoot(self) -> str:
        return _workspace()

    def GetPackagesPath(self) -> list[str]:
        return _packages_path()

    def GetActiveScopes(self) -> tuple[str, ...]:
        return SCOPES

    def GetName(self) -> str:
        return "OvmfMh"

    def GetLoggingLevel(self, loggerType: str) -> int:
        # The console shows progress; the text log in Build/ keeps everything.
        return logging.INFO if loggerType == "con" else logging.DEBUG

    def SetPlatformEnv(self) -> int:
        target = self.env.GetValue("TARGET", "DEBUG")
        if target not in TARGETS:
            logging.critical("TARGET=%s is not one of %s", target, ", ".join(TARGETS))
            return 1
        _use_tree_tools(self.env)
        build_options = platform_dsc.reproducible_build_options(
            [REPO_ROOT, Path(_workspace()), *(Path(p) for p in _packages_path())], GENFW_WRAPPER
        )
        build_id = platform_dsc.write_platform(
            paths.edk2_tree(), paths.platform_root(), paths.PACKAGE_DIR, target, build_options
        )
        logging.info("ovmf-mh helper build id %s", build_id.hex)
        self.env.SetValue("OVMF_MH_BUILD_ID", build_id.hex, "ovmf-mh platform")
        self.env.SetValue("ACTIVE_PLATFORM", platform_dsc.PLATFORM_DSC, "ovmf-mh platform")
        self.env.SetValue("TARGET_ARCH", "X64", "ovmf-mh platform")
        self.env.SetValue("TOOL_CHAIN_TAG", paths.tool_chain_tag(), "ovmf-mh platform: the tree's tag")
        self.env.SetValue("PRODUCT_NAME", "OVMF-MH", "ovmf-mh platform")
        # Debian's patches make ShellPkg need SecureBootVariableLib, which the
        # OVMF DSC maps only with SECURE_BOOT_ENABLE; the helper needs no shell.
        self.env.SetValue("BLD_*_BUILD_SHELL", "FALSE", "ovmf-mh platform")
        self.env.SetValue("BLD_*_SMM_REQUIRE", "FALSE", "ovmf-mh platform")
        return 0

    def SetPlatformDefaultEnv(self) -> list[object]:
        return []

    def PlatformPreBuild(self) -> int:
        return 0

    def PlatformPostBuild(self) -> int:
        target = self.env.GetValue("TARGET")
        logging.info("ovmf-mh firmware: %s", paths.firmware_code(target))
        return 0

    def PlatformFlashImage(self) -> int:
        """Boot the image in QEMU (headless, debugcon captured): 0 only when
        it reached the guest's userspace (or UEFI's boot manager when no guest
        kernel is cached)."""
        from host_shim.firmware.boot import BootMode, boot_image

        target = self.env.GetValue("TARGET")
        work = paths.tree_build_root() / "flashrom"
        outcome = boot_image(
            paths.firmware_code(target),
            mode=BootMode.NORMAL,
            work_dir=work,
            timeout=float(os.environ.get("OVMF_MH_BOOT_TIMEOUT", "120")),
        )
        for line in outcome.describe():
            logging.info("%s", line)
        return 0 if outcome.ok else 1


if __name__ == "__main__":
    shell_environment.GetBuildVars()
    print("Run me through stuart_setup/stuart_update/stuart_build -c stuart/PlatformBuild.py")
