"""Faults, each with its bound: the command killed (SIGKILL, SIGTERM), a
helper, a peer or a QEMU killed or stopped (SIGSTOP) mid-transfer. After
each the machine must be as it was: no process the command started, no
folder or file of its own, no key bytes in any file the run left.

Every run gets its own TMPDIR and XDG_RUNTIME_DIR (on /dev/shm), so that
"nothing of its own left" is checked exactly, next to other users' runs.
docs/testing.md has the table of these faults with measured times.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_shim.reaper import process_state, start_time

MIB = 1024 * 1024
OVMF_MH = [sys.executable, "-m", "host_shim.cli"]
#: After SIGKILL of the command: every process it started gone, every folder removed.
KILL_BOUND = 5.0
#: After SIGTERM of the command: exited (128 + 15) and clean.
TERM_BOUND = 10.0
#: A dead helper, peer or QEMU: the command fails (exit 1) within this.
DEATH_BOUND = 3.0
#: Mailbox and idle timeouts the SIGSTOP tests use, and the slack over them.
STALL_TIMEOUT = 3.0
STALL_SLACK = 3.0


# --- the sandbox ------------------------------------------------------------------------


@dataclass
class Sandbox:
    root: Path
    tmp: Path
    shm: Path
    key: Path
    started: float = field(default_factory=time.time)

    @property
    def runtime(self) -> Path:
        return self.shm / "runtime"

    @property
    def ram_dir(self) -> Path:
        return self.shm / "ram"

    def env(self) -> dict[str, str]:
        return dict(os.environ, TMPDIR=str(self.tmp), XDG_RUNTIME_DIR=str(self.runtime))

    def launch(self, name: str, *args: str | Path) -> Command:
        stderr = self.root / f"{name}.stderr"
        proc = subprocess.Popen(
            [*OVMF_MH, *(str(a) for a in args)], env=self.env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
        )
        return Command(name, proc, stderr)


@dataclass
class Command:
    name: str
    proc: subprocess.Popen[str]
    stderr_file: Path

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def pages_done(self) -> int:
        """Pages its progress line reports so far (--progress)."""
        found = re.findall(r"(\d+)/\d+ pages", self.stderr)
        return int(found[-1]) if found else 0

    def wait_pages(self, pages: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.pages_done() < pages:
            assert self.proc.poll() is None, f"{self.name} ended early: {self.stderr}"
            assert time.monotonic() < deadline, f"{self.name} made no progress: {self.stderr}"
            time.sleep(0.01)

    def descendants(self) -> dict[int, int]:
        return descendants(self.proc.pid)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Exit code and seconds it took."""
        start = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not end within {timeout} s: {self.stderr}")
        return code, time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``: pid -> start time."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            started = start_time(child)
            if started is not None:
                found[child] = started
                todo.append(child)
    return found


def alive(processes: dict[int, int]) -> list[int]:
    return [pid for pid, started in processes.items()
            if start_time(pid) == started and process_state(pid) not in (None, "Z")]


@pytest.fixture
def sandbox(work_dir: Path) -> Iterator[Sandbox]:
    shm_base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else work_dir
    shm = shm_base / f"ovmf-mh-faults-{os.getpid()}-{work_dir.name[-40:]}"
    shutil.rmtree(shm, ignore_errors=True)
    for folder in (work_dir / "tmp", shm / "runtime", shm / "ram"):
        folder.mkdir(parents=True)
    key = work_dir / "transport.key"
    subprocess.run([*OVMF_MH, "keygen", "--out", str(key)], check=True)
    box = Sandbox(work_dir, work_dir / "tmp", shm, key)
    try:
        yield box
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def key_holders(box: Sandbox) -> list[Path]:
    """Files the run left that hold the key bytes: the work folder (but the
    key file itself), its TMPDIR and runtime folder, and anything in
    /dev/shm written since the run started."""
    needle = box.key.read_bytes()
    candidates = [p for folder in (box.root, box.shm) for p in folder.rglob("*")
                  if p.is_file() and not p.is_symlink() and p != box.key]
    for entry in Path("/dev/shm").iterdir():
        try:
            if entry.is_file() and entry.stat().st_mtime >= box.started and os.access(entry, os.R_OK):
                candidates.append(entry)
        except OSError:
            continue
    holders = []
    for path in candidates:
        try:
            with path.open("rb") as f:
                tail = b""
                while chunk := f.read(8 * MIB):
                    if needle in tail + chunk:
                        holders.append(path)
                        break
                    tail = chunk[-len(needle) :]
        except OSError:
            continue
    return holders


def assert_clean(box: Sandbox, started: dict[int, int], bound: float, *, keep_work: bool = True) -> float:
    """Wait (at most ``bound`` s) until none of ``started`` runs; then check
    that no folder of the run and no key bytes are left. Returns the seconds
    the processes took to go."""
    begin = time.monotonic()
    while alive(started) and time.monotonic() - begin < bound:
        time.sleep(0.02)
    gone_after = time.monotonic() - begin
    left = alive(started)
    for pid in left:  # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running {bound} s after the fault: {left}"
    strays = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
              if str(box.root) in _cmdline(pid) or str(box.shm) in _cmdline(pid)]
    assert not strays, f"processes of this run still running: {strays}"
    for folder in (box.tmp, box.runtime, box.ram_dir):
        assert not list(folder.iterdir()), f"left in {folder}: {list(folder.iterdir())}"
    assert not list(box.root.glob(".*partial")), "a partial output was left"
    assert not key_holders(box), "key bytes left on disk"
    return gone_after


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def random_ram(box: Sandbox, mib: int, name: str = "src.ram") -> Path:
    path = box.root / name
    path.write_bytes(os.urandom(mib * MIB))
    return path


# --- the commands, killed -----------------------------------------------------------------

#: 64 MiB through one reference helper takes about 3 s here: long enough to be
#: killed mid-transfer (after 2048 pages), short enough for the suite.
RAM_MIB = 64
MIDWAY_PAGES = 2048


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A transfer stream of RAM_MIB random MiB and its key, for the import cases."""
    folder = tmp_path_factory.mktemp("stream")
    key = folder / "transport.key"
    subprocess.run([*OVMF_MH, "keygen", "--out", str(key)], check=True)
    src = folder / "src.ram"
    src.write_bytes(os.urandom(RAM_MIB * MIB))
    out = folder / "stream.omh"
    subprocess.run([*OVMF_MH, "export", "--helper", "reference", "--ram", str(src), "--key", str(key),
                    "--out", str(out)], check=True, capture_output=True)
    src.unlink()
    return out, key


def start_transfer(box: Sandbox, command: str, helper: str, stream: tuple[Path, Path]) -> list[Command]:
    """The command under test first, then its peer (send and receive need one)."""
    common = ["--helper", helper, "--progress"]
    if command == "export":
        return [box.launch("export", "export", "--ram", random_ram(box, RAM_MIB), "--out", box.root / "out.omh",
                           "--key", box.key, *common)]
    if command == "import":
        shutil.copyfile(stream[1], box.key)
        return [box.launch("import", "import", "--ram", box.root / "dst.ram", "--in", stream[0],
                           "--key", box.key, *common)]
    # The command under test works in a temporary folder (it must go); its
    # peer, which fails, keeps its logs in a folder of the test's.
    peer = ["--work-dir", box.root / "peer-work"]
    port = _free_port()
    receiver = box.launch("receive", "receive", "--ram", box.root / "dst.ram", "--listen", f"127.0.0.1:{port}",
                          "--key", box.key, *common, *(peer if command == "send" else []))
    deadline = time.monotonic() + 30
    while "listening on" not in receiver.stderr:
        assert receiver.proc.poll() is None and time.monotonic() < deadline, receiver.stderr
        time.sleep(0.01)
    sender = box.launch("send", "send", "--ram", random_ram(box, RAM_MIB), "--to", f"127.0.0.1:{port}",
                        "--key", box.key, *common, *(peer if command == "receive" else []))
    return [sender, receiver] if command == "send" else [receiver, sender]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.qemu
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("command", ["export", "import", "send", "receive"])
def test_command_killed_mid_transfer_leaves_nothing(
    sandbox: Sandbox, stream: tuple[Path, Path], command: str, signum: int
) -> None:
    """Kill the command mid-transfer: within the bound no process it (or its
    peer) started runs, no folder of the run is left, no key bytes rest in
    any file; SIGTERM exits 143 with a message, the peer fails with exit 1."""
    commands = start_transfer(sandbox, command, "reference", stream)
    victim = commands[0]
    try:
        victim.wait_pages(MIDWAY_PAGES)
        started = {pid: t for c in commands for pid, t in c.descendants().items()}
        assert len(started) >= 2 * len(commands), "each command runs a reaper and a helper"
        os.kill(victim.proc.pid, signum)
        code, seconds = victim.wait_exit(TERM_BOUND if signum == signal.SIGTERM else KILL_BOUND)
        assert code == -signal.SIGKILL if signum == signal.SIGKILL else code == 128 + signum
        if signum == signal.SIGTERM:
            assert "stopped by SIGTERM" in victim.stderr
            assert seconds < TERM_BOUND
        for peer in commands[1:]:
            peer_code, _ = peer.wait_exit(DEATH_BOUND + 5)
            assert peer_code == 1, peer.stderr
            assert "closed the connection" in peer.stderr
        assert_clean(sandbox, started, KILL_BOUND)
        assert not (sandbox.root / "out.omh").exists() and not (sandbox.root / "dst.ram").exists()
    finally:
        for c in commands:
            c.stop()
