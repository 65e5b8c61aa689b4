"""What the host's file systems do during a migration's switchover: one
`migrate --guest debian` (both roles here) with the kernel's ext4 and jbd2
trace events recorded in a tracefs instance of its own (clock: monotonic,
as ``time.monotonic``), ``/proc/meminfo`` Dirty/Writeback sampled every
5 ms, and the time of every QMP command of both QEMUs. It prints, from
'stop' to the target's 'cont', each fsync (file, process, duration), each
journal commit and the writeback of each RAM file, next to the QMP steps.

    sudo .venv/bin/python -m host_shim.devtools.trace_switchover --guest-mib 1024 --work-dir work/trace-1

Needs root (tracefs). A diagnosis instrument, not a test: the numbers are
those of one machine's disk and load (docs/migration.md, "Where the slow
device-state step's time went").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_shim.firmware.boot import resolve_image
from host_shim.migration.migrate import MigrationConfig, migrate
from host_shim.vm import qemu
from host_shim.vm.netns import L2Network

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("ext4/ext4_sync_file_enter", "ext4/ext4_sync_file_exit", "jbd2/jbd2_start_commit",
          "jbd2/jbd2_end_commit", "ext4/ext4_writepages_result")
LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\].*?\s(?P<ts>\d+\.\d+):\s(?P<event>\w+):\s(?P<rest>.*)$")


@dataclass
class Record:
    qmp: list[tuple[float, str, str]] = field(default_factory=list)  # (time, QEMU's folder, command)
    meminfo: list[tuple[float, int, int]] = field(default_factory=list)  # (time, Dirty kB, Writeback kB)


@contextmanager
def trace_instance(name: str) -> Iterator[Path]:
    """A tracefs instance with :data:`EVENTS` on, removed at the end."""
    folder = TRACEFS / "instances" / name
    folder.mkdir()
    try:
        (folder / "trace_clock").write_text("mono")
        (folder / "buffer_size_kb").write_text("65536")
        for event in EVENTS:
            (folder / "events" / event / "enable").write_text("1")
        (folder / "tracing_on").write_text("1")
        yield folder
    finally:
        (folder / "tracing_on").write_text("0")
        folder.rmdir()


def _sample_meminfo(record: Record, stop: threading.Event) -> None:
    while not stop.wait(0.005):
        values = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        record.meminfo.append((time.monotonic(), int(values["Dirty"].split()[0]),
                               int(values["Writeback"].split()[0])))


@contextmanager
def qmp_times(record: Record) -> Iterator[None]:
    """Every QMP command of every QEMU, with its end time (the command's
    answer), its QEMU's folder and, for query-migrate, the status."""
    original = qemu.QemuVM.qmp

    def timed(self: qemu.QemuVM, command: str, **arguments: object) -> Any:
        answer = original(self, command, **arguments)
        if command != "query-migrate" or (isinstance(answer, dict) and answer.get("status") == "completed"):
            name = command if command != "query-migrate" else "query-migrate: completed"
            record.qmp.append((time.monotonic(), self.work_dir.name, name))
        return answer

    qemu.QemuVM.qmp = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        qemu.QemuVM.qmp = original  # type: ignore[method-assign]


def _inodes(work: Path) -> dict[int, str]:
    found = {}
    for path in work.rglob("*"):
        if path.is_file() and path.stat().st_size >= 1 << 20:
            found[path.stat().st_ino] = str(path.relative_to(work))
    return found


def timeline(trace: str, record: Record, inodes: dict[int, str]) -> list[str]:
    """The switchover, 'stop' to 'cont' (100 ms either side), as lines of
    ms after 'stop'."""
    stops = [t for t, _, c in record.qmp if c == "stop"]
    conts = [t for t, _, c in record.qmp if c == "cont"]
    if not stops or not conts:
        return ["no 'stop' and 'cont' recorded"]
    stop, cont = stops[-1], conts[-1]
    begin, end = stop - 0.1, cont + 0.1
    lines: list[tuple[float, str]] = [(t, f"QMP {c} ({who})") for t, who, c in record.qmp if begin <= t <= end]
    sync_enter: dict[tuple[str, str], float] = {}
    written: dict[str, int] = {}
    for raw in trace.splitlines():
        match = LINE.match(raw)
        if not match:
            continue
        ts, event, rest = float(match["ts"]), match["event"], match["rest"]
        ino_match = re.search(r"\bino (\d+)", rest)
        name = inodes.get(int(ino_match[1]), f"ino {ino_match[1]}") if ino_match else ""
        if event == "ext4_sync_file_enter":
            sync_enter[(match["pid"], name)] = ts
        elif event == "ext4_sync_file_exit" and begin <= ts <= end:
            entered = sync_enter.pop((match["pid"], name), None)
            took = f"{1000 * (ts - entered):.0f} ms" if entered is not None else "?"
            lines.append((ts, f"fsync {name} by {match['comm']}-{match['pid']} took {took}"))
        elif event in ("jbd2_start_commit", "jbd2_end_commit") and begin <= ts <= end:
            lines.append((ts, f"{event} {rest}"))
        elif event == "ext4_writepages_result" and begin <= ts <= end:
            pages = re.search(r"pages_written (\d+)", rest)
            if pages:
                written[name] = written.get(name, 0) + int(pages[1])
                lines.append((ts, f"writeback {name}: {pages[1]} pages by {match['comm']}"))
    for t, dirty, back in record.meminfo:
        if begin <= t <= end and int(1000 * (t - stop)) % 50 < 5:
            lines.append((t, f"meminfo Dirty {dirty // 1024} MiB, Writeback {back // 1024} MiB"))
    lines.sort()
    out = [f"{1000 * (t - stop):+8.1f} ms  {text}" for t, text in lines]
    out.append("pages written back per file, 'stop' to 'cont': " + json.dumps(written))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--guest-mib", type=int, default=1024)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--verify-ram", action="store_true", help="run the RAM check (default: left out)")
    parser.add_argument("--no-network", action="store_true", help="no namespaces, no probe")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    record = Record()
    config = MigrationConfig(image=resolve_image(None), work_dir=work, guest_mib=args.guest_mib, guest="debian",
                             vcpus=args.vcpus, verify_ram=args.verify_ram, idle_timeout=60.0)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_meminfo, args=(record, stop), daemon=True)
    with trace_instance(f"ovmf-mh-trace-{os.getpid()}") as folder:
        sampler.start()
        with qmp_times(record), (L2Network() if not args.no_network else _none()) as network:
            config.network = network
            report = migrate(config)
        stop.set()
        trace = (folder / "trace").read_text()
    print("\n".join(report.describe()))
    for line in timeline(trace, record, _inodes(work)):
        print(line)
    (work / "trace.txt").write_text(trace)


@contextmanager
def _none() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
