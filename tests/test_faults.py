"""Faults, each with its bound: the command killed (SIGKILL, SIGTERM), a
helper, a peer or a QEMU killed or stopped (SIGSTOP) mid-transfer. After
each the machine must be as it was: no process the command started, no
folder or file of its own, no key bytes in any file the run left.

Every run gets its own TMPDIR and XDG_RUNTIME_DIR (on /dev/shm), so that
"nothing of its own left" is checked exactly, next to other users' runs.
docs/testing.md has the table of these faults with measured times.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helper import abi
from host_shim.errors import MailboxError
from host_shim.helpers.helper_vm import HelperSpec, HelperVM, IdlePolicy
from host_shim.vm.reaper import process_state, start_time

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
# A continued send/receive whose peer is gone: its helper was busy when the
# command stopped, so it gets SHUTDOWN's 2 s and then 2 s to exit before its
# SIGKILL (reference_process.close), plus slack for a loaded machine.
CONTINUED_BOUND = DEATH_BOUND + 5.0


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

    def pages_total(self) -> int:
        found = re.findall(r"\d+/(\d+) pages", self.stderr)
        return int(found[-1]) if found else 0

    def wait_pages(self, pages: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.pages_done() < pages:
            assert self.proc.poll() is None, f"{self.name} ended early: {self.stderr}"
            assert time.monotonic() < deadline, f"{self.name} made no progress: {self.stderr}"
            time.sleep(0.01)

    def helpers(self, timeout: float = 120) -> list[int]:
        """Pids of its helpers, once it runs one: its reference helper
        processes if it has any (migrate's guest QEMUs are not helpers),
        else its QEMUs (helper VMs)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = {pid: _cmdline(pid) for pid in self.descendants()}
            found = ([pid for pid, line in lines.items() if "helper.serve" in line]
                     or [pid for pid, line in lines.items() if "qemu-system" in line])
            if found:
                return found
            assert self.proc.poll() is None, f"{self.name} ended early: {self.stderr}"
            assert time.monotonic() < deadline, f"{self.name} started no helper: {self.stderr}"
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
    # A pytest killed outright (SIGKILL, a CI timeout) runs no finaliser:
    # sweep the folders of runs whose process is gone.
    for stale in shm_base.glob("ovmf-mh-faults-*-*"):
        pid = stale.name.split("-")[3]
        if pid.isdigit() and int(pid) != os.getpid() and process_state(int(pid)) is None:
            shutil.rmtree(stale, ignore_errors=True)
    shm = shm_base / f"ovmf-mh-faults-{os.getpid()}-{work_dir.name[-40:]}"
    shutil.rmtree(shm, ignore_errors=True)
    for folder in (shm / "runtime", shm / "ram"):
        folder.mkdir(parents=True)
    # Short: QMP sockets go in TMPDIR, and AF_UNIX paths are limited to 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="omh-faults-", dir="/tmp"))
    key = work_dir / "transport.key"
    subprocess.run([*OVMF_MH, "keygen", "--out", str(key)], check=True)
    box = Sandbox(work_dir, tmp, shm, key)
    try:
        yield box
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def key_holders(box: Sandbox) -> list[Path]:
    """Files the run left that hold the key bytes: the work folder (but the
    key file itself), its TMPDIR and runtime folder, and anything in
    /dev/shm written since the run started."""
    needle = box.key.read_bytes()
    candidates = [p for folder in (box.root, box.tmp, box.shm) for p in folder.rglob("*")
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


def assert_clean(box: Sandbox, started: dict[int, int], bound: float, report: str = "") -> float:
    """Wait (at most ``bound`` s) until none of ``started`` runs; then check
    that no folder of the run and no key bytes are left, but for the work
    folder a failed command keeps and names in its ``report`` (the helpers'
    logs). Returns the seconds the processes took to go."""
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
        left_over = [p for p in folder.iterdir() if f"helper logs: {p}\n" not in report]
        assert not left_over, f"left in {folder}: {left_over}"
    assert not list(box.root.glob(".*partial")), "a partial output was left"
    assert not key_holders(box), "key bytes left on disk"
    return gone_after


#: Each fault test appends its measured row here (docs/testing.md, fault table).
FAULT_TABLE = Path(__file__).resolve().parents[1] / "work" / "tests" / "fault-table.jsonl"


def record(fault: str, seconds: float, code: int | None, stderr: str, gone: float) -> None:
    """One measured row: the fault, seconds until the command ended (or saw
    it), exit code, the first error line, seconds until its processes went."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    message = next((line for line in lines if "error:" in line or "stopped by" in line
                    or "stopping the migration" in line), "")
    FAULT_TABLE.parent.mkdir(parents=True, exist_ok=True)
    with FAULT_TABLE.open("a") as f:
        f.write(json.dumps({"fault": fault, "seconds": round(seconds, 2), "exit": code,
                            "message": message[:300], "gone_after": round(gone, 2)}) + "\n")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def random_ram(box: Sandbox, mib: int, name: str = "src.ram") -> Path:
    """Random bytes, no page zero (a zero page costs the helper nothing)."""
    path = box.root / name
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    return path


# --- the commands, killed -----------------------------------------------------------------


@contextlib.contextmanager
def midway(command: Command) -> Iterator[list[int]]:
    """Wait until the command's first progress line, then stop (SIGSTOP) its
    helpers: each mailbox command waits for a helper, so the transfer is held
    where it is, however fast the machine, while the test sets up its fault
    inside the block. On leaving it the helpers that still run are continued
    (SIGCONT). Yields their pids."""
    helpers = command.helpers()
    command.wait_pages(1)
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    done, total = command.pages_done(), command.pages_total()
    try:
        assert command.proc.poll() is None and 0 < done < total, (
            f"{command.name} was not midway when its helpers were stopped ({done}/{total} pages): "
            f"{command.stderr}")
        yield helpers
    finally:
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

#: 128 MiB through one reference helper: 0.5 s on an idle fast machine, 6 s on
#: a loaded one. A fault test never races the transfer's end: it waits for
#: the first progress line and then stops the helper (midway()), which holds
#: the transfer where it is until the fault is set up.
RAM_MIB = 128


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
    common: list[str | Path] = ["--helper", helper, "--progress"]
    if command == "export":
        return [box.launch("export", "export", "--ram", random_ram(box, RAM_MIB), "--out", box.root / "out.omh",
                           "--key", box.key, *common)]
    if command == "import":
        shutil.copyfile(stream[1], box.key)
        return [box.launch("import", "import", "--ram", box.root / "dst.ram", "--in", stream[0],
                           "--key", box.key, *common)]
    # The command under test works in a temporary folder (it must go); its
    # peer, which fails, keeps its logs in a folder of the test's.
    peer: list[str | Path] = ["--work-dir", box.root / "peer-work"]
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
        with midway(victim):
            started = {pid: t for c in commands for pid, t in c.descendants().items()}
            assert len(started) >= 2 * len(commands), "each command runs a reaper and a helper"
            os.kill(victim.proc.pid, signum)
        code, seconds = victim.wait_exit(TERM_BOUND if signum == signal.SIGTERM else KILL_BOUND)
        assert code == -signal.SIGKILL if signum == signal.SIGKILL else code == 128 + signum
        if signum == signal.SIGTERM:
            assert "stopped by SIGTERM" in victim.stderr
            assert seconds < TERM_BOUND
        for peer in commands[1:]:
            # Its peer's death is the victim's exit: the survivor ends
            # within DEATH_BOUND of it (waited for longer, so that a slow
            # end is reported with its time).
            peer_code, peer_seconds = peer.wait_exit(DEATH_BOUND + 5)
            assert peer_code == 1, peer.stderr
            assert "closed the connection" in peer.stderr
            assert peer_seconds < DEATH_BOUND, f"{peer.name} ended {peer_seconds:.2f} s after its peer's death"
            record(f"{command} killed by {signal.Signals(signum).name}: its peer {peer.name}",
                   seconds + peer_seconds, peer_code, peer.stderr, 0)
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"{command} killed by {signal.Signals(signum).name} mid-transfer", seconds, code,
               victim.stderr, gone)
        assert not (sandbox.root / "out.omh").exists() and not (sandbox.root / "dst.ram").exists()
    finally:
        for c in commands:
            c.stop()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_hangup_and_interrupt_stop_like_sigterm(sandbox: Sandbox, stream: tuple[Path, Path], signum: int) -> None:
    """SIGHUP (a closed terminal) and SIGINT (Ctrl-C) end an export like
    SIGTERM: exit 128 + signal, a message, nothing left."""
    (victim,) = start_transfer(sandbox, "export", "reference", stream)
    try:
        with midway(victim):
            started = victim.descendants()
            os.kill(victim.proc.pid, signum)
        code, seconds = victim.wait_exit(TERM_BOUND)
        name = signal.Signals(signum).name
        assert code == 128 + signum and f"stopped by {name}" in victim.stderr, victim.stderr
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"export killed by {name} mid-transfer", seconds, code, victim.stderr, gone)
    finally:
        victim.stop()


# --- a helper or a peer dies or stalls ------------------------------------------------------


def need_image(request: pytest.FixtureRequest, helper: str) -> None:
    """The firmware image, built once, only where a firmware helper runs."""
    if helper == "firmware":
        request.getfixturevalue("firmware")


@pytest.mark.qemu
@pytest.mark.parametrize("helper", ["reference", "firmware"])
@pytest.mark.parametrize("command", ["export", "import"])
def test_helper_killed_is_seen_at_once(
    request: pytest.FixtureRequest, sandbox: Sandbox, stream: tuple[Path, Path], command: str, helper: str
) -> None:
    """SIGKILL to the helper mid-transfer: the command fails within
    DEATH_BOUND (detection and stopping everything), names the side, the
    helper and the command it was serving, and leaves nothing."""
    need_image(request, helper)
    (victim,) = start_transfer(sandbox, command, helper, stream)
    try:
        with midway(victim) as helpers:
            started = victim.descendants()
            os.kill(helpers[0], signal.SIGKILL)
        code, seconds = victim.wait_exit(DEATH_BOUND + 10)
        assert code == 1, victim.stderr
        assert seconds < DEATH_BOUND, f"took {seconds:.2f} s: {victim.stderr}"
        side = "source" if command == "export" else "target"
        assert re.search(rf"{side} helper-0 \((helper VM, QEMU|reference helper) pid \d+\) exited while serving",
                         victim.stderr), victim.stderr
        assert re.search(r"failed: [1-9]\d* pages done before the failure", victim.stderr), victim.stderr
        gone = assert_clean(sandbox, started, KILL_BOUND, victim.stderr)
        record(f"{helper} helper of {command} killed (SIGKILL)", seconds, code, victim.stderr, gone)
    finally:
        victim.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("helper", ["reference", "firmware"])
def test_helper_stopped_fails_within_the_mailbox_timeout(
    request: pytest.FixtureRequest, sandbox: Sandbox, helper: str
) -> None:
    """SIGSTOP to the helper for longer than --mailbox-timeout: the export
    fails within that timeout (plus slack), says the helper is stopped, kills
    it by pid (a stopped process answers no soft stop) and leaves nothing."""
    need_image(request, helper)
    victim = sandbox.launch("export", "export", "--ram", random_ram(sandbox, RAM_MIB), "--out",
                            sandbox.root / "out.omh", "--key", sandbox.key, "--helper", helper, "--progress",
                            "--mailbox-timeout", str(STALL_TIMEOUT))
    try:
        # midway() stops the helper; the test keeps it stopped.
        helpers = victim.helpers()
        victim.wait_pages(1)
        pid = helpers[0]
        os.kill(pid, signal.SIGSTOP)
        assert victim.proc.poll() is None and victim.pages_done() < victim.pages_total(), victim.stderr
        started = victim.descendants()
        code, seconds = victim.wait_exit(STALL_TIMEOUT + STALL_SLACK + 10)
        assert code == 1, victim.stderr
        assert STALL_TIMEOUT <= seconds < STALL_TIMEOUT + STALL_SLACK, f"took {seconds:.2f} s"
        assert f"mailbox timeout of {STALL_TIMEOUT:.1f} s (pid {pid} is stopped" in victim.stderr, victim.stderr
        gone = assert_clean(sandbox, started, KILL_BOUND, victim.stderr)
        record(f"{helper} helper of export stopped (SIGSTOP), --mailbox-timeout {STALL_TIMEOUT:g}", seconds, code,
               victim.stderr, gone)
    finally:
        victim.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("stalled", ["receive", "send"])
def test_peer_stopped_fails_after_the_idle_timeout_not_twice_it(
    sandbox: Sandbox, stream: tuple[Path, Path], stalled: str
) -> None:
    """SIGSTOP to one end mid-transfer: the other gives up after
    --idle-timeout N (N <= t < N + slack; it used to take 2N), says so, and
    leaves nothing; the stalled end, continued, fails too."""
    port = _free_port()
    common: list[str | Path] = ["--key", sandbox.key, "--helper", "reference", "--progress",
                                "--idle-timeout", str(STALL_TIMEOUT)]
    receiver = sandbox.launch("receive", "receive", "--ram", sandbox.root / "dst.ram", "--listen",
                              f"127.0.0.1:{port}", *common)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in receiver.stderr:
            assert receiver.proc.poll() is None and time.monotonic() < deadline, receiver.stderr
            time.sleep(0.01)
        sender = sandbox.launch("send", "send", "--ram", random_ram(sandbox, RAM_MIB), "--to", f"127.0.0.1:{port}",
                                *common)
        victim, survivor = (receiver, sender) if stalled == "receive" else (sender, receiver)
        try:
            with midway(victim):
                started = {**victim.descendants(), **survivor.descendants()}
                os.kill(victim.proc.pid, signal.SIGSTOP)
            code, seconds = survivor.wait_exit(STALL_TIMEOUT + STALL_SLACK + 15)
            assert code == 1, survivor.stderr
            assert STALL_TIMEOUT <= seconds < STALL_TIMEOUT + STALL_SLACK, f"took {seconds:.2f} s"
            assert f"for {STALL_TIMEOUT:g} s (--idle-timeout)" in survivor.stderr, survivor.stderr
            # The survivor names the stalled end.
            named = "the sender 127.0.0.1:" if stalled == "send" else f"the receiver at 127.0.0.1:{port}"
            assert named in survivor.stderr, survivor.stderr
            os.kill(victim.proc.pid, signal.SIGCONT)
            continued = time.monotonic()
            # The continued end finds its peer gone at its next read or
            # write, says so, and fails: it never reports a success.
            assert victim.wait_exit(DEATH_BOUND + STALL_TIMEOUT + 10)[0] == 1, victim.stderr
            ended = time.monotonic() - continued
            assert ended < CONTINUED_BOUND, f"the continued {stalled} took {ended:.2f} s: {victim.stderr}"
            peer_gone = ("the receiver at 127.0.0.1:" if stalled == "send" else "the sender 127.0.0.1:")
            # A continued sender may still read the receiver's refusal (the
            # receiver drains for 2 s after saying why): then it quotes it.
            assert peer_gone in victim.stderr, victim.stderr
            assert ("closed the connection" in victim.stderr
                    or "refused the transfer: the sender" in victim.stderr), victim.stderr
            # Both failed: their temporary work folders stay, with the logs
            # they name; nothing else does.
            gone = assert_clean(sandbox, started, KILL_BOUND, survivor.stderr + victim.stderr)
            record(f"{stalled} stopped (SIGSTOP) mid-transfer, --idle-timeout {STALL_TIMEOUT:g}: its peer",
                   seconds, code, survivor.stderr, gone)
            record(f"{stalled} stopped (SIGSTOP), then continued (SIGCONT) after its peer failed", ended, 1,
                   victim.stderr, gone)
        finally:
            sender.stop()
    finally:
        receiver.stop()


def hold(command: Command, started: dict[int, int], seconds: float) -> None:
    """Keep the stopped (SIGSTOP) command stopped ``seconds`` more, then
    SIGCONT: a pause. Every process it started must still be there at the
    end of it (they wait for it, having no timeout of their own)."""
    time.sleep(seconds)
    ended = sorted(set(started) - set(alive(started)))
    os.kill(command.proc.pid, signal.SIGCONT)
    assert not ended, f"{ended} ended while {command.name} was stopped"


@pytest.mark.qemu
def test_export_stopped_waits_and_completes(sandbox: Sandbox) -> None:
    """SIGSTOP to export itself for longer than its mailbox timeout: its
    helpers wait for it (they have no timeout of their own, docs/testing.md),
    nothing fails while it is stopped; after SIGCONT it completes (exit 0) and
    its output imports to the same bytes, and nothing is left."""
    src = random_ram(sandbox, RAM_MIB)
    out = sandbox.root / "out.omh"
    victim = sandbox.launch("export", "export", "--ram", src, "--out", out, "--key", sandbox.key,
                            "--helper", "reference", "--progress", "--mailbox-timeout", str(STALL_TIMEOUT))
    try:
        with midway(victim):
            started = victim.descendants()
            os.kill(victim.proc.pid, signal.SIGSTOP)
        hold(victim, started, STALL_TIMEOUT + 1)
        code, seconds = victim.wait_exit(120)
        assert code == 0, victim.stderr
        assert "mailbox timeout" not in victim.stderr, victim.stderr
        dst = sandbox.root / "dst.ram"
        check = sandbox.launch("import", "import", "--ram", dst, "--in", out, "--key", sandbox.key,
                               "--helper", "reference")
        assert check.wait_exit(120)[0] == 0, check.stderr
        assert dst.read_bytes() == src.read_bytes()
        for path in (out, dst, src):
            path.unlink()
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"export stopped (SIGSTOP) {STALL_TIMEOUT + 1:g} s, longer than --mailbox-timeout "
               f"{STALL_TIMEOUT:g}, then continued", seconds, code, "(none: it completes; output verified)", gone)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.proc.pid, signal.SIGCONT)
        victim.stop()


# --- key bytes, messages, helper kinds ---------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("ending", ["normal", "wrong key", "SIGKILL"])
def test_firmware_helper_leaves_no_key_bytes(firmware: Path, sandbox: Sandbox, ending: str) -> None:
    """The firmware helper's RAM holds the key (launch secret, private copy):
    after a normal export, an import refused for a wrong key, and an export
    killed by SIGKILL no file anywhere holds the key bytes; the refused import
    names the key as the likely cause and counts no page."""
    src = random_ram(sandbox, 16 if ending != "SIGKILL" else RAM_MIB)
    out = sandbox.root / "out.omh"
    export = sandbox.launch("export", "export", "--ram", src, "--out", out, "--key", sandbox.key,
                            "--helper", "firmware", "--progress")
    try:
        if ending == "SIGKILL":
            with midway(export):
                started = export.descendants()
                os.kill(export.proc.pid, signal.SIGKILL)
            export.wait_exit(KILL_BOUND)
            assert_clean(sandbox, started, KILL_BOUND)
            return
        assert export.wait_exit(120)[0] == 0, export.stderr
        if ending == "wrong key":
            other = sandbox.root / "other.key"
            subprocess.run([*OVMF_MH, "keygen", "--out", str(other)], check=True)
            imp = sandbox.launch("import", "import", "--ram", sandbox.root / "dst.ram", "--in", out,
                                 "--key", other, "--helper", "firmware", "--work-dir", sandbox.root / "imp")
            assert imp.wait_exit(120)[0] == 1
            assert "most likely the sender used another key" in imp.stderr, imp.stderr
            assert "BAD_HEADER" in imp.stderr or "AUTH_FAILED" in imp.stderr
            assert "import failed: 0 pages done before the failure" in imp.stderr
            other.unlink()
            assert not (sandbox.root / "dst.ram").exists()
        assert_clean(sandbox, {}, 0)
    finally:
        export.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("moment", ["at once", "helpers starting", "waiting for the stream"])
def test_import_waiting_on_a_fifo_killed_leaves_nothing(firmware: Path, sandbox: Sandbox, moment: str) -> None:
    """An `import --challenge-out` of firmware helpers waiting on a FIFO
    nobody writes, killed by SIGKILL at three moments (before its reaper can
    have learnt much, while its helpers boot, once the challenge is out):
    no process, no folder in TMPDIR or the runtime folder, no key bytes."""
    fifo = sandbox.root / "stream.fifo"
    os.mkfifo(fifo)
    challenge = sandbox.root / "challenge"
    victim = sandbox.launch("import", "import", "--ram", sandbox.root / "dst.ram", "--key", sandbox.key,
                            "--in", fifo, "--challenge-out", challenge, "--helpers", "2",
                            "--guest-size", str(16 * 1024 * 1024))
    started: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        if moment == "at once":
            time.sleep(0.3)
        elif moment == "helpers starting":
            while not any("qemu" in _cmdline(pid) for pid in victim.descendants()):
                assert victim.proc.poll() is None, victim.stderr
                assert time.monotonic() < deadline, "no helper QEMU started"
                time.sleep(0.01)
        else:
            while not challenge.exists():
                assert victim.proc.poll() is None, victim.stderr
                assert time.monotonic() < deadline, "the challenge never appeared"
                time.sleep(0.05)
        started = victim.descendants()
        os.kill(victim.proc.pid, signal.SIGKILL)
        code, seconds = victim.wait_exit(KILL_BOUND)
        assert code == -signal.SIGKILL
        gone = assert_clean(sandbox, started, KILL_BOUND + 5)
        record(f"import on a FIFO killed by SIGKILL ({moment})", seconds, code, victim.stderr, gone)
        assert not (sandbox.root / "dst.ram").exists()
    finally:
        victim.stop()


def _switchover_stop_sent(qmp_log: str) -> bool:
    """Whether the source stopped the guest for the switchover: the 'stop'
    after x-ignore-shared was set, which ends pre-copy (the guest throttle
    of pre-copy stops and continues the guest before it)."""
    start = qmp_log.find('"execute": "migrate-set-capabilities"')
    return start >= 0 and '"execute": "stop"' in qmp_log[start:]


def _gdb_packet(sock: socket.socket, body: str) -> str:
    """One GDB remote-protocol request to QEMU's gdbstub and its reply."""
    sock.sendall(f"${body}#{sum(body.encode()) & 0xFF:02x}".encode())
    reply = b""
    while not re.search(rb"\$[^#]*#[0-9a-f]{2}", reply):
        chunk = sock.recv(4096)
        assert chunk, f"gdbstub closed the connection after {reply!r}"
        reply += chunk
    sock.sendall(b"+")
    return reply.decode(errors="replace")


#: A non-canonical address: fetching from it is a general-protection fault.
NON_CANONICAL = 0x8000_0000_0000_0000


@pytest.mark.qemu
def test_firmware_helper_wipes_its_keys_on_a_cpu_exception(firmware: Path, work_dir: Path) -> None:
    """A real CPU exception in the production image, with no test-only
    switch in it: through QEMU's gdbstub the test sets the idle helper's RIP
    to a non-canonical address; the vCPU takes #GP (vector 13, with an error
    code) through the helper's own IDT into InternalHelperFault. Before it
    the helper's RAM holds its private copy of the key (so the search can
    fail); after FAULT is published it holds the key nowhere, FAULT names
    vector 13 and that RIP, and the next command fails at once saying the
    helper took a CPU exception. The helper polls instead of halting (the
    idle policy, a fw_cfg file, not a build switch)."""
    key = os.urandom(32)
    gdb = Path(tempfile.mkdtemp(prefix="omh-gdb-", dir="/tmp")) / "gdb.sock"
    # An idle helper halts (ABI 4.1), and a halted vCPU runs nothing until an
    # interrupt: with the idle policy NEVER_HALT it polls, and the new RIP runs.
    helper = HelperVM(HelperSpec(firmware, key=key, idle_policy=IdlePolicy(never_halt=True)), work_dir / "helper",
                      "helper-0")
    helper.vm.config.extra_args.extend(["-gdb", f"unix:{gdb},server=on,wait=off"])
    try:
        with helper, socket.socket(socket.AF_UNIX) as sock:
            helper.wait_ready()
            assert helper.mailbox is not None
            assert helper.memory.find(key) != -1, "no private key copy before the fault: the check could not fail"
            sock.settimeout(10)
            sock.connect(str(gdb))
            _gdb_packet(sock, "?")  # QEMU stops the vCPU for the debugger
            # QEMU writes registers only for a client that read the target description.
            _gdb_packet(sock, "qSupported:xmlRegisters=i386")
            assert "x86-64" in _gdb_packet(sock, "qXfer:features:read:target.xml:0,ffb")
            assert "$OK#" in _gdb_packet(sock, "P10=" + NON_CANONICAL.to_bytes(8, "little").hex())  # rip
            sock.sendall(b"$c#63")
            fault = abi.load().const("OVMF_MH_STATE_FAULT")
            deadline = time.monotonic() + 10
            while helper.mailbox.header()["State"] != fault:
                assert time.monotonic() < deadline, f"no FAULT within 10 s: {helper.vm.debugcon_text()}"
                time.sleep(0.01)
            header = helper.mailbox.header()
            assert (header["HaltReason"], header["FaultAddress"]) == (13, NON_CANONICAL), header
            assert helper.memory.find(key) == -1, f"key bytes left in the helper's RAM at {helper.memory.find(key):#x}"
            assert f"FAULT: exception 13, error code 0x0, RIP {NON_CANONICAL:#x}" in helper.vm.debugcon_text()
            asked = time.monotonic()
            with pytest.raises(MailboxError, match=rf"took a CPU exception \(vector 13, RIP {NON_CANONICAL:#x}\)"):
                helper.mailbox.call("NOP", timeout=STALL_TIMEOUT)
            assert time.monotonic() - asked < 1.0
        assert not helper.vm.is_running()
    finally:
        shutil.rmtree(gdb.parent, ignore_errors=True)


@pytest.mark.parametrize("command", ["export", "import"])
def test_host_core_helper_works_in_the_cli(sandbox: Sandbox, command: str) -> None:
    """--helper host-core moves memory (it used to end in a BufferError traceback)."""
    src = random_ram(sandbox, 4)
    out = sandbox.root / "out.omh"
    helper = "host-core" if command == "export" else "reference"
    first = sandbox.launch("export", "export", "--ram", src, "--out", out, "--key", sandbox.key, "--helper", helper)
    assert first.wait_exit(60)[0] == 0, first.stderr
    helper = "host-core" if command == "import" else "reference"
    dst = sandbox.root / "dst.ram"
    second = sandbox.launch("import", "import", "--ram", dst, "--in", out, "--key", sandbox.key, "--helper", helper)
    assert second.wait_exit(60)[0] == 0, second.stderr
    assert "Traceback" not in first.stderr + second.stderr
    assert dst.read_bytes() == src.read_bytes()
    assert_clean(sandbox, {}, 0)


def test_a_sender_that_never_comes_is_named(sandbox: Sandbox) -> None:
    """--accept-timeout says that no sender came, not 'cannot listen'."""
    receiver = sandbox.launch("receive", "receive", "--ram", sandbox.root / "dst.ram", "--listen", "127.0.0.1:0",
                              "--key", sandbox.key, "--helper", "reference", "--accept-timeout", "1",
                              "--work-dir", sandbox.root / "recv")
    code, seconds = receiver.wait_exit(30)
    assert code == 1 and seconds < 10
    assert "no sender connected to 127.0.0.1:0 within 1 s (--accept-timeout)" in receiver.stderr


# --- live migration ------------------------------------------------------------------------

#: Pages of the first pre-copy pass after which the fault strikes (of 65536).
MIGRATE_MIDWAY_PAGES = 8192


def start_migrate(box: Sandbox, *extra: str | Path) -> Command:
    """`ovmf-mh migrate` with reference helpers (the firmware is not the
    point here) and its RAM files in the sandbox's tmpfs folder, returned
    once its first pass is well under way (the tests then hold it there
    with midway()). tmpfs keeps no dirty log: the full check, asked for."""
    command = box.launch("migrate", "migrate", "--helper", "reference", "--key", box.key, "--ram-dir",
                         box.ram_dir, "--switchover", "full-check", "--progress", *extra)
    command.wait_pages(MIGRATE_MIDWAY_PAGES, timeout=240)
    return command


@pytest.mark.qemu
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_migrate_killed_during_precopy_leaves_nothing(firmware: Path, sandbox: Sandbox, signum: int) -> None:
    """migrate killed mid pre-copy: both guest QEMUs, every helper and the
    reaper are gone within the bound; the RAM files (tmpfs), the temporary
    work folder and every socket folder are removed; no key bytes anywhere."""
    victim = start_migrate(sandbox)
    try:
        with midway(victim):
            started = victim.descendants()
            assert sum("qemu-system" in _cmdline(pid) for pid in started) == 2, "source and target QEMU"
            os.kill(victim.proc.pid, signum)
        code, seconds = victim.wait_exit(TERM_BOUND)
        if signum == signal.SIGTERM:
            assert code == 128 + signum and "stopped by SIGTERM" in victim.stderr, victim.stderr
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"migrate killed by {signal.Signals(signum).name} in pre-copy", seconds, code, victim.stderr, gone)
    finally:
        victim.stop()


@pytest.mark.qemu
def test_migrate_stopped_pauses_and_completes(firmware: Path, sandbox: Sandbox) -> None:
    """SIGSTOP to migrate itself in pre-copy for longer than its mailbox
    timeout: its guest QEMUs and helpers wait (a pause, docs/testing.md);
    after SIGCONT the migration completes (the guest runs on the target) and
    nothing is left."""
    # Its work folder (logs, report) stays after a run that reached its
    # report: in the test's own folder, not in TMPDIR.
    victim = start_migrate(sandbox, "--json", "--mailbox-timeout", str(STALL_TIMEOUT), "--work-dir",
                           sandbox.root / "migrate-work")
    try:
        with midway(victim):
            started = victim.descendants()
            os.kill(victim.proc.pid, signal.SIGSTOP)
        hold(victim, started, STALL_TIMEOUT + 1)
        code, seconds = victim.wait_exit(240)
        report = json.loads(victim.proc.communicate()[0])
        assert code == 0, f"{report.get('error')}: {victim.stderr}"
        assert report["outcome"] == "ok" and report["guest_state"] == "running on target", report
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"migrate stopped (SIGSTOP) {STALL_TIMEOUT + 1:g} s in pre-copy, then continued", seconds, code,
               "(none: it completes, guest running on target)", gone)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.proc.pid, signal.SIGCONT)
        victim.stop()


def _fault_seen(command: Command, since: float, needle: str, timeout: float) -> float:
    """Seconds from ``since`` until ``needle`` appears on the command's stderr."""
    while needle not in command.stderr:
        assert time.monotonic() - since < timeout, f"not seen within {timeout} s: {command.stderr}"
        time.sleep(0.01)
    return time.monotonic() - since


@pytest.mark.qemu
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_target_qemu_fault_in_precopy_never_stops_the_source(firmware: Path, sandbox: Sandbox, fault: str) -> None:
    """The target guest QEMU killed (or stopped) during pre-copy: seen
    within 1 s (a stopped one: state T for 0.3 s); the source guest is never
    stopped, keeps beating, the report names the target QEMU, and nothing
    is left."""
    work = sandbox.root / "migrate-work"
    victim = start_migrate(sandbox, "--work-dir", work, "--json")
    try:
        target = int((work / "target" / "qemu.pid").read_text())
        with midway(victim):
            started = victim.descendants()
            os.kill(target, signal.SIGKILL if fault == "SIGKILL" else signal.SIGSTOP)
            killed = time.monotonic()
        seen = _fault_seen(victim, killed, "stopping the migration", 5)
        assert seen < 1.0, f"the target's {fault} was seen after {seen:.2f} s"
        code, _ = victim.wait_exit(120)
        report = json.loads(victim.proc.communicate()[0])
        assert code == 1
        said = "killed by SIGKILL" if fault == "SIGKILL" else "is stopped (state T"
        assert f"target QEMU pid {target}{',' if fault == 'SIGKILL' else ''} {said}" in report["error"], report
        assert "during pre-copy pass" in report["error"], report["error"]
        assert report["guest_state"] == "running on source", report
        assert report["source_heartbeat_after_failure"]
        qmp = (work / "source" / "qmp.log").read_text()
        assert not _switchover_stop_sent(qmp), "the source guest was stopped for a dead target"
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"migrate: target QEMU {fault} in pre-copy", seen, code,
               f"error: {report['error']}", gone)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGCONT)
        victim.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_source_qemu_fault_in_precopy_is_reported_at_once(firmware: Path, sandbox: Sandbox, fault: str) -> None:
    """The source guest QEMU killed (or stopped, for longer than the QMP
    timeout would allow) during pre-copy: seen within 1 s, the command fails
    within DEATH_BOUND of that, the report names the source QEMU and the
    step and says the guest is lost with it; a stopped one is killed by pid,
    nothing is left."""
    work = sandbox.root / "migrate-work"
    victim = start_migrate(sandbox, "--work-dir", work, "--json")
    source = int((work / "source" / "qemu.pid").read_text())
    try:
        with midway(victim):
            started = victim.descendants()
            os.kill(source, getattr(signal, fault))
            faulted = time.monotonic()
        seen = _fault_seen(victim, faulted, "stopping the migration", 5)
        assert seen < 1.0, f"the source's {fault} was seen after {seen:.2f} s"
        code, _ = victim.wait_exit(60)
        ended = time.monotonic() - faulted
        assert ended < 1.0 + DEATH_BOUND, f"migrate ended {ended:.2f} s after the fault"
        report = json.loads(victim.proc.communicate()[0])
        assert code == 1
        said = ", killed by SIGKILL" if fault == "SIGKILL" else " is stopped (state T"
        assert f"source QEMU pid {source}{said}" in report["error"], report["error"]
        assert "during pre-copy pass" in report["error"], report["error"]
        assert report["guest_state"].startswith(f"lost: source QEMU pid {source}"), report
        gone = assert_clean(sandbox, started, KILL_BOUND)
        record(f"migrate: source QEMU {fault} in pre-copy (seen; ended {ended:.2f} s)", seen, code,
               f"error: {report['error']}", gone)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(source, signal.SIGCONT)
        victim.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1])
def test_qemu_killed_while_qmp_connects_is_a_clean_start_up_error(
    firmware: Path, work_dir: Path, delay: float
) -> None:
    """A QEMU that dies while the shim connects to its QMP socket (the race a
    helper killed right after start-up hits) is reported as a QemuError that
    says it exited, never as a traceback out of the QMP library."""
    import threading

    from host_shim.errors import QemuError
    from host_shim.vm.qemu import QemuConfig, QemuVM

    vm = QemuVM(QemuConfig(firmware_code=firmware, memory_mib=64), work_dir, "killed-at-start")

    def kill_when_socket_appears() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = vm.pid
            if pid is not None and vm.qmp_socket.exists():
                time.sleep(delay)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.001)

    killer = threading.Thread(target=kill_when_socket_appears)
    killer.start()
    try:
        vm.start()
    except QemuError as exc:
        assert "exited" in str(exc), str(exc)
    else:
        # The connection won the race; the kill then ends QEMU right after.
        assert vm.wait_exit(10) == -signal.SIGKILL
    finally:
        killer.join()
        vm.stop()
    assert not vm.is_running()
