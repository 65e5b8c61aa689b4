"""stuart_build --FlashRom builds the platform and boots it in QEMU, and its
exit code says whether the boot reached the guest's userspace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from host_shim import paths

pytestmark = pytest.mark.qemu

STUART_BUILD = str(Path(sys.executable).parent / "stuart_build")


def _flash(firmware: Path, timeout: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OVMF_MH_BOOT_TIMEOUT=timeout)
    return subprocess.run(
        [STUART_BUILD, "-c", str(paths.REPO_ROOT / "stuart" / "PlatformBuild.py"), "TARGET=DEBUG", "--FlashRom"],
        cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def test_flashrom_boots_the_built_image_to_userspace(firmware: Path) -> None:
    result = _flash(firmware, "120")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "boot normal: OK: reached guest userspace" in result.stdout + result.stderr


def test_flashrom_fails_when_the_boot_does_not_get_there(firmware: Path) -> None:
    # Half a second is far too little for OVMF and Linux under TCG.
    result = _flash(firmware, "0.5")
    assert result.returncode != 0
    assert "boot normal: FAILED" in result.stdout + result.stderr
