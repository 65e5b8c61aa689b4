"""Temporary folders and the reaper: a shim killed at any moment leaves
none of the folders it made (host_shim/vm/process.py ``temp_dir``)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_shim.vm import process

#: Makes temporary folders as fast as it can until it is killed; prints
#: its reaper's pid first.
_MAKER = """\\
import sys
from pathlib import Path
from host_shim.vm import process
from host_shim.vm.reaper import reaper
base = Path(sys.argv[1])
print(reaper().proc.pid, flush=True)
while True:
    process.temp_dir("made-", base)
"""

KILLS = 20


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_a_shim_killed_while_making_folders_leaves_none(tmp_path: Path) -> None:
    """SIGKILL lands anywhere in temp_dir, KILLS times: once the reaper has
    done its work nothing is left (with mkdtemp-then-register, a kill
    between the two leaked the folder)."""
    left: list[str] = []
    for round_ in range(KILLS):
        base = tmp_path / f"round-{round_}"
        base.mkdir()
        maker = subprocess.Popen([sys.executable, "-c", _MAKER, str(base)], stdout=subprocess.PIPE, text=True)
        try:
            assert maker.stdout is not None
            reaper_pid = int(maker.stdout.readline())
            time.sleep(0.05 + 0.01 * round_)
            assert any(base.iterdir()), "the maker made no folder"
            maker.send_signal(signal.SIGKILL)
            maker.wait(timeout=30)
            assert _gone(reaper_pid, 30), f"the reaper {reaper_pid} outlived its shim by 30 s"
        finally:
            if maker.poll() is None:
                maker.kill()
                maker.wait()
        left += [str(p) for p in base.iterdir()]
    assert not left, f"{len(left)} folders outlived the shim and its reaper: {left[:5]}"


def test_a_name_in_use_is_skipped_and_never_handed_to_the_reaper(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A name somebody else's folder holds is passed over, and the reaper is
    told to forget it (else it would remove that folder at exit)."""
    names = iter(["taken", "free"])
    monkeypatch.setattr(secrets, "token_hex", lambda _n: next(names))
    (tmp_path / "x-taken").mkdir()
    watched: list[tuple[str, Path, bool]] = []

    class Recorder:
        def watch_path(self, path: Path) -> None:
            watched.append(("watch", path, path.exists()))

        def forget_path(self, path: Path) -> None:
            watched.append(("forget", path, path.exists()))

    monkeypatch.setattr(process, "reaper", lambda: Recorder())
    made = process.temp_dir("x-", tmp_path)
    assert made == tmp_path / "x-free" and made.is_dir()
    assert oct(made.stat().st_mode & 0o777) == oct(0o700)
    assert watched == [("watch", tmp_path / "x-taken", True), ("forget", tmp_path / "x-taken", True),
                       ("watch", tmp_path / "x-free", False)]
    assert set(os.listdir(tmp_path)) == {"x-taken", "x-free"}


@pytest.fixture
def dead_runs_folder() -> Iterator[Path]:
    """A RAM folder as a pytest killed outright would leave it: its pid gone."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    path = Path(f"/dev/shm/omh-ram-{int(ended.stdout)}-left")
    path.mkdir()
    (path / "source.ram").write_bytes(b"\0" * 4096)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_ram_folder_of_a_killed_run_is_swept(dead_runs_folder: Path, request: pytest.FixtureRequest) -> None:
    """The tests' tmpfs RAM folders carry the pytest's pid: the next test
    that takes one removes those whose pytest is gone (a SIGKILL or a CI
    timeout runs no finaliser), and leaves a live run's alone."""
    live = Path(f"/dev/shm/omh-ram-{os.getpid()}-live")
    live.mkdir()
    try:
        mine: Path = request.getfixturevalue("ram_dir")
        assert mine.name.startswith(f"omh-ram-{os.getpid()}-")
        assert not dead_runs_folder.exists(), "the killed run's folder is still there"
        assert live.is_dir(), "a live run's folder was swept"
    finally:
        shutil.rmtree(live, ignore_errors=True)
