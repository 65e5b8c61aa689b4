"""EDK2 trees without QEMU: one workspace per tree, the tree's own tool-chain
tag, the first real error line of a failing build, choosing the newest Debian
source package that is actually served, complete serial lines only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ci_provides import missing

from host_shim import paths
from host_shim.errors import BuildError, SetupError
from host_shim.firmware import build, edk2_debian
from host_shim.firmware.build_errors import first_error
from host_shim.migration import migrate


def _tree(root: Path, *tags: str) -> Path:
    (root / "OvmfPkg").mkdir(parents=True)
    (root / paths.UPSTREAM_DSC).write_text("[Defines]\n")
    template = root / paths.TOOLS_DEF_TEMPLATE
    template.parent.mkdir(parents=True)
    template.write_text("".join(f"*_{tag}_X64_CC_PATH = DEF({tag}_X64_PREFIX)gcc\n" for tag in tags))
    return root


def test_tool_chain_tag_comes_from_the_trees_template(tmp_path: Path) -> None:
    assert paths.tool_chain_tag(_tree(tmp_path / "old", "GCC48", "GCC5")) == "GCC5"
    assert paths.tool_chain_tag(_tree(tmp_path / "both", "GCC5", "GCC")) == "GCC5"
    assert paths.tool_chain_tag(_tree(tmp_path / "new", "GCC", "CLANGDWARF")) == "GCC"
    with pytest.raises(SetupError, match="none of the tool-chain tags"):
        paths.tool_chain_tag(_tree(tmp_path / "odd", "VS2019"))
    assert paths.firmware_code("DEBUG", tmp_path / "new").parent.parent.name == "DEBUG_GCC"


def test_each_tree_has_its_own_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _tree(tmp_path / "a" / "edk2", "GCC5")
    second = _tree(tmp_path / "b" / "edk2", "GCC")
    link = tmp_path / "link"
    link.symlink_to(first)
    assert paths.tree_build_root(first) != paths.tree_build_root(second)
    assert paths.tree_build_root(link) == paths.tree_build_root(first), "keyed by the resolved path"
    assert paths.tree_build_root(first).parent == paths.BUILD_ROOT
    monkeypatch.setenv("EDK2_PATH", str(second))
    assert paths.edk2_tree() == second.resolve()
    assert paths.firmware_code("DEBUG").is_relative_to(paths.tree_build_root(second))
    monkeypatch.setenv("EDK2_PATH", str(tmp_path))
    with pytest.raises(SetupError, match="is not an EDK2 tree"):
        paths.edk2_tree()


# --- the error line of a failing build ---------------------------------------


def test_first_error_prefers_the_compiler_line() -> None:
    log = [
        "DEBUG - error: no such command: `make`\n",
        "INFO - Building ... SecMain.inf [X64]\n",
        'INFO - "gcc" -MMD -Werror=implicit -c -o SecMain.obj SecMain.c\n',
        "INFO - SecMain.c:12:3: error: implicit declaration of function 'Foo'\n",
        "INFO - make: *** [GNUmakefile:400: SecMain.obj] Error 1\n",
        "INFO - build.py...\n",
        " : error 7000: Failed to execute command\n",
    ]
    assert first_error(log) == "SecMain.c:12:3: error: implicit declaration of function 'Foo'"
    assert first_error(log[4:]) == "make: *** [GNUmakefile:400: SecMain.obj] Error 1"
    assert first_error(log[5:]) == ": error 7000: Failed to execute command"
    assert first_error(log[4:5]) == "make: *** [GNUmakefile:400: SecMain.obj] Error 1"
    link = [
        "INFO - /usr/bin/ld: x.o: in function `y':\n",
        "INFO - x.c:52: undefined reference to `InternalZ'\n",
        "INFO - collect2: error: ld returned 1 exit status\n",
        "INFO - make: *** [GNUmakefile:9: Sec.dll] Error 1\n",
        "INFO -  : error 7000: Failed to execute command\n",
    ]
    assert first_error(link) == "x.c:52: undefined reference to `InternalZ'"
    assert first_error(link[2:]) == "make: *** [GNUmakefile:9: Sec.dll] Error 1"
    assert first_error(link[2:3]) == "collect2: error: ld returned 1 exit status"
    assert first_error(["all fine\n", "WARNING - something\n"]) is None


def test_failing_make_names_the_compiler_error_and_its_log(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        missing("needs gcc and make (build-essential)")
    (tmp_path / "broken.c").write_text("int main(void) { return undefined_thing; }\n")
    (tmp_path / "Makefile").write_text(
        textwrap.dedent(
            """\
            all:
            \t@echo compiling lots of files
            \tgcc -Werror -c broken.c -o broken.o
            """
        )
    )
    log = tmp_path / "logs" / "make.log"
    with pytest.raises(BuildError) as caught:
        build._run_logged(["make", "-C", str(tmp_path)], log, False, tmp_path)
    message = str(caught.value)
    assert "broken.c:1:" in message and "error:" in message and "undefined_thing" in message
    assert f"log: {log}" in message
    assert caught.value.log == log and "Error" in log.read_text()


_STOPPED_BUILD_DRIVER = """\
import sys
from pathlib import Path
from host_shim import cli
from host_shim.firmware import build
cli._stop_on_signals()
work = Path(sys.argv[1])
build._run_logged(["sh", str(work / "step.sh")], work / "step.log", False, work)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_stopped_build_stops_the_processes_its_step_started(tmp_path: Path) -> None:
    """SIGTERM of a build (as of `ovmf-mh build`) ends the step's whole
    process tree, as make and the compilers would be, not only the step."""
    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "step.sh").write_text(
        f"sleep 300 &\necho $! > {pid_file}\necho started\nwait\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", _STOPPED_BUILD_DRIVER, str(tmp_path)],
                              stderr=subprocess.PIPE, text=True)
    grandchild = 0
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert driver.poll() is None, f"driver ended early: {driver.stderr.read() if driver.stderr else ''}"
            assert time.monotonic() < deadline, "the build step never started its child"
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        assert _alive(grandchild)
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=60)
        assert code != 0
        deadline = time.monotonic() + 30
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), f"the step's child {grandchild} outlived the stopped build"
        assert "build step stopped" in (tmp_path / "step.log").read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if grandchild and _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# --- the newest Debian source package that is served -------------------------

SHOWSRC = """\
Package: edk2
Version: 2026.08+ds-2
Directory: pool/main/e/edk2
Checksums-Sha256:
 aa 3156 edk2_2026.08+ds-2.dsc
 bb 61556488 edk2_2026.08+ds.orig.tar.xz
 cc 79140 edk2_2026.08+ds-2.debian.tar.xz

Package: edk2
Version: 2025.02-8+deb13u1
Directory: pool/main/e/edk2
Checksums-Sha256:
 dd 2656 edk2_2025.02-8+deb13u1.dsc
 ee 29646336 edk2_2025.02.orig.tar.xz
 ff 53652 edk2_2025.02-8+deb13u1.debian.tar.xz

Package: edk2
Version: 2025.02-8
Directory: pool/main/e/edk2
Checksums-Sha256:
 11 29646336 edk2_2025.02.orig.tar.xz
 22 53600 edk2_2025.02-8.debian.tar.xz

Package: edk2-other
Version: 2099.01-1
Directory: pool/main/e/edk2-other
Checksums-Sha256:
 33 1 edk2-other_2099.01.orig.tar.xz
 44 1 edk2-other_2099.01-1.debian.tar.xz
"""


def test_versions_are_ordered_newest_first() -> None:
    versions = edk2_debian.parse_showsrc(SHOWSRC)
    assert [v.version for v in versions] == ["2026.08+ds-2", "2025.02-8+deb13u1", "2025.02-8"]
    assert [f.name for f in versions[0].tarballs()] == [
        "edk2_2026.08+ds.orig.tar.xz", "edk2_2026.08+ds-2.debian.tar.xz",
    ]
    assert versions[1].upstream == "2025.02"


def test_a_listed_but_unserved_version_falls_back_to_the_newest_served(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    versions = edk2_debian.parse_showsrc(SHOWSRC)
    asked: list[str] = []

    def served(url: str) -> str | None:
        asked.append(url)
        return "HTTP 404" if "2026.08" in url else None

    monkeypatch.setattr(edk2_debian, "_served", served)
    chosen = edk2_debian.newest_served(versions, "http://mirror.invalid/debian")
    assert chosen is not None and chosen.version == "2025.02-8+deb13u1"
    assert asked[0] == "http://mirror.invalid/debian/pool/main/e/edk2/edk2_2026.08%2Bds.orig.tar.xz"
    assert "2026.08+ds-2 is listed but not served" in capsys.readouterr().err
    monkeypatch.setattr(edk2_debian, "_served", lambda url: "HTTP 404")
    assert edk2_debian.newest_served(versions, "http://mirror.invalid/debian") is None


def test_mirror_is_derived_from_the_machines_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: x-security\n\n"
        "Types: deb\nURIs: http://archive.example/debian/\nSuites: x\n"
    )
    assert edk2_debian.derive_mirror((deb822,)) == "http://archive.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert edk2_debian.derive_mirror((tmp_path / "absent.sources", one_line)) == "http://one.example/debian"
    with pytest.raises(SetupError, match="no Debian archive URI"):
        edk2_debian.derive_mirror((tmp_path / "absent.sources",))


# --- serial console lines ----------------------------------------------------


class _GrowingSerial:
    """A VM whose serial log grows by one chunk per read."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks
        self.reads = 0

    def serial_text(self) -> str:
        self.reads += 1
        return "".join(self.chunks[: self.reads])

    def is_running(self) -> bool:
        return True


def test_heartbeat_is_read_only_when_its_line_is_complete() -> None:
    vm = _GrowingSerial(["boot\nHB seq=6 sweeps=4\nHB seq=7 sweeps=", "5 errors=0\n"])
    line = migrate._wait_for(vm, "HB seq=", timeout=5, after=len("boot\nHB seq=6 sweeps=4\n"))  # type: ignore[arg-type]
    assert line == "HB seq=7 sweeps=5 errors=0"
    assert vm.reads == 2
