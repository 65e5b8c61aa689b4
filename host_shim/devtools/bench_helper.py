"""ovmf-mh bench helper: what one firmware helper VM costs and how fast it
answers, in sections measured side by side in one run.

Section ``idle`` (issue 21): a helper that halts when idle (ABI 4.1,
HALT_WAKE; the default) beside the spinning baseline (the idle policy's
NEVER_HALT, how every helper behaved before): the percent of a CPU its QEMU
uses while it waits for a command (from /proc/PID/stat over
``idle_seconds``), and the round trip of an empty command (QUERY) posted
after the helper had time to halt (``gap`` seconds after the previous one),
median and 99th percentile, with the wake-ups it took, and the median round
trip of a QMP command that does nothing (query-status). The halting helper
is timed both ways the host can wake it, alternating sample by sample: the
wake in flight while the host polls (the default) and the host waiting for
QMP's reply to inject-nmi before it polls (before issue 21's wake work).

Section ``crypto`` (issue 21): export and import MB/s of one helper with and
without the vector page-crypto path (host_shim/devtools/bench_helper_crypto.py).

Sections are entries of SECTIONS (a function from a BenchContext to a JSON
dict) and FORMATTERS (that dict to text lines); a new measure of helper
speed is one more pair, run with ``--section NAME``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helper import abi
from host_shim.devtools.bench_helper_crypto import format_crypto, section_crypto
from host_shim.helpers.helper_vm import HelperSpec, HelperVM, IdlePolicy
from host_shim.helpers.mailbox import Mailbox

#: Seconds between two commands of the latency run: twice the helper's spin
#: (OVMF_MH_IDLE_DEFAULT_SPIN_US), so every command finds it halted (or
#: spinning, the baseline).
DEFAULT_GAP = 2 * abi.load().const("OVMF_MH_IDLE_DEFAULT_SPIN_US") / 1e6


@dataclass(frozen=True)
class BenchContext:
    image: Path
    work: Path
    idle_seconds: float = 5.0
    samples: int = 100
    gap: float = DEFAULT_GAP
    crypto_guest_mib: int = 64
    crypto_rounds: int = 3
    #: Another firmware image (e.g. the main branch's) whose halting helper
    #: section idle times beside this one's, alternating (--compare-image).
    compare_image: Path | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, seconds: float) -> float:
    """Percent of one CPU the process used over the next ``seconds``."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - before) / (time.monotonic() - start)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _TimedWakes:
    """The halting helper's two ways to wake, each timed: ``sync`` waits
    for QMP's reply to inject-nmi before the host polls (how the host woke
    helpers before), ``in_flight`` polls at once while the helper's waker
    thread waits for the reply (HelperVM.wake_async, the default)."""

    def __init__(self, helper: HelperVM) -> None:
        self.helper = helper
        self.reply_ms: list[float] = []
        self.last: Future[object] | None = None

    def sync(self) -> None:
        start = time.monotonic()
        self.helper.wake()
        self.reply_ms.append(1000 * (time.monotonic() - start))

    def in_flight(self) -> Future[object]:
        self.last = self.helper.wake_async()
        return self.last


def _latencies(mailbox: Mailbox, context: BenchContext, wakes: _TimedWakes | None) -> dict[str, list[float]]:
    """Empty commands ``gap`` apart; with ``wakes``, alternating between the
    two ways to wake (one sample of each in turn, so both see the same
    load). Also counts the in-flight wakes whose QMP reply was still out
    when the helper's answer had already arrived."""
    modes: dict[str, list[float]] = {"in_flight": [], "sync": []} if wakes is not None else {"in_flight": []}
    before_reply = 0
    for index in range(context.samples * len(modes)):
        mode = list(modes)[index % len(modes)]
        if wakes is not None:
            mailbox.wake = wakes.in_flight if mode == "in_flight" else wakes.sync
            wakes.last = None
        time.sleep(context.gap)
        modes[mode].append(mailbox.call("QUERY").seconds)
        if wakes is not None and wakes.last is not None and not wakes.last.done():
            before_reply += 1
    modes["before_reply"] = [float(before_reply)]
    return modes


def _measure_helper(context: BenchContext, name: str, policy: IdlePolicy | None) -> dict[str, Any]:
    with HelperVM(HelperSpec(context.image, idle_policy=policy), context.work / name, name) as helper:
        header = helper.wait_ready()
        mailbox = helper.mailbox
        assert mailbox is not None and helper.vm.pid is not None
        halt_wake = bool(header["Capabilities"] & abi.load().const("OVMF_MH_CAP_HALT_WAKE"))
        time.sleep(0.2)  # past the spin after READY
        idle_cpu = cpu_share(helper.vm.pid, context.idle_seconds)
        wakes = _TimedWakes(helper) if halt_wake else None
        latencies = _latencies(mailbox, context, wakes)
        mailbox.wake = helper.wake_async
        after = mailbox.header()
        qmp = []
        for _ in range(max(10, context.samples // 2)):
            start = time.monotonic()
            helper.vm.qmp("query-status")
            qmp.append(time.monotonic() - start)
        row = {
            "qmp_round_trip_ms_median": 1000 * statistics.median(qmp),
            "halt_wake": halt_wake,
            "idle_cpu_percent": idle_cpu,
            "idle_seconds": context.idle_seconds,
            "wake_latency_ms_median": 1000 * statistics.median(latencies["in_flight"]),
            "wake_latency_ms_p99": 1000 * _percentile(latencies["in_flight"], 0.99),
            "samples": len(latencies["in_flight"]),
            "gap_ms": 1000 * context.gap,
            "wakes_sent": mailbox.wakes,
            "halts": after["HaltCount"],
            "window_wakes": after["WindowWakes"],
        }
        if wakes is not None:
            row["answered_before_qmp_reply"] = int(latencies["before_reply"][0])
            row["sync_wake"] = {
                "wake_latency_ms_median": 1000 * statistics.median(latencies["sync"]),
                "wake_latency_ms_p99": 1000 * _percentile(latencies["sync"], 0.99),
                "samples": len(latencies["sync"]),
                "inject_nmi_round_trip_ms_median": statistics.median(wakes.reply_ms) if wakes.reply_ms else 0.0,
            }
        return row


def _compare_images(context: BenchContext, other: Path) -> dict[str, Any]:
    """Wake latency of two firmware images' halting helpers, both running,
    each woken both ways, one sample of each of the four in turn."""
    with HelperVM(HelperSpec(context.image), context.work / "image", "image") as this, \
            HelperVM(HelperSpec(other), context.work / "compare", "compare") as that:
        this.wait_ready()
        that.wait_ready()
        combos = [(name, helper, way) for name, helper in (("image", this), ("compare_image", that))
                  for way in ("in_flight", "sync")]
        timed: dict[tuple[str, str], list[float]] = {(name, way): [] for name, _, way in combos}
        for _ in range(context.samples):
            for name, helper, way in combos:
                mailbox = helper.mailbox
                assert mailbox is not None
                wakes = _TimedWakes(helper)
                mailbox.wake = wakes.in_flight if way == "in_flight" else wakes.sync
                time.sleep(context.gap)
                timed[(name, way)].append(mailbox.call("QUERY").seconds)
        return {
            "image": str(context.image),
            "compare_image": str(other),
            "rows": [{"image": name, "wake": way, "samples": len(values),
                      "wake_latency_ms_median": 1000 * statistics.median(values),
                      "wake_latency_ms_p10": 1000 * _percentile(values, 0.10),
                      "wake_latency_ms_p99": 1000 * _percentile(values, 0.99)}
                     for (name, way), values in timed.items()],
        }


def section_idle(context: BenchContext) -> dict[str, Any]:
    """The halting helper and the spinning baseline, one after the other;
    with ``compare_image``, then both images' halting helpers side by side."""
    result = {
        "halting": _measure_helper(context, "halting", None),
        "spinning": _measure_helper(context, "spinning", IdlePolicy(never_halt=True)),
    }
    if context.compare_image is not None:
        result["images"] = _compare_images(context, context.compare_image)
    return dict(result, load_average=os.getloadavg()[0])


def format_idle(result: dict[str, Any]) -> list[str]:
    halting = result["halting"]
    lines = [
        f"idle firmware helper (load average {result['load_average']:.1f}): CPU while waiting over "
        f"{halting['idle_seconds']:.0f} s, and an empty command's round trip "
        f"{halting['gap_ms']:.0f} ms after the previous one",
        "| helper | idle CPU | wake latency median | p99 | samples | wakes sent | halts | QMP round trip |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("halting", "halts when idle (ABI 4.1)"), ("spinning", "spins (NEVER_HALT baseline)")):
        row = result[name]
        lines.append(
            f"| {label} | {row['idle_cpu_percent']:.1f} % | {row['wake_latency_ms_median']:.2f} ms | "
            f"{row['wake_latency_ms_p99']:.2f} ms | {row['samples']} | {row['wakes_sent']} | {row['halts']} | "
            f"{row['qmp_round_trip_ms_median']:.2f} ms |")
    sync = halting.get("sync_wake")
    if sync is not None:
        lines.append(
            f"same halting helper, alternating: wake in flight while polling (default) median "
            f"{halting['wake_latency_ms_median']:.2f} ms (answer before QMP's reply in "
            f"{halting['answered_before_qmp_reply']} of {halting['samples']}); waiting for QMP's reply first "
            f"(before) median {sync['wake_latency_ms_median']:.2f} ms, p99 {sync['wake_latency_ms_p99']:.2f} ms "
            f"(inject-nmi round trip median {sync['inject_nmi_round_trip_ms_median']:.2f} ms)")
    images = result.get("images")
    if images is not None:
        lines += [
            f"two images' halting helpers side by side, alternating: this {images['image']}, "
            f"compared {images['compare_image']}",
            "| image | wake | median | p10 | p99 | samples |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in images["rows"]:
            image = "this" if row["image"] == "image" else "compared"
            way = "in flight while polling" if row["wake"] == "in_flight" else "waits for QMP's reply"
            lines.append(f"| {image} | {way} | {row['wake_latency_ms_median']:.2f} ms | "
                         f"{row['wake_latency_ms_p10']:.2f} ms | {row['wake_latency_ms_p99']:.2f} ms | "
                         f"{row['samples']} |")
    return lines


#: Sections of the bench, in the order they run by default.
SECTIONS: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "idle": section_idle,
    "crypto": section_crypto,
}
FORMATTERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "idle": format_idle,
    "crypto": format_crypto,
}


def bench_helper(context: BenchContext, sections: list[str] | None = None) -> dict[str, Any]:
    """Run the named sections (default: all) and return their results by name."""
    chosen = sections or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    context.work.mkdir(parents=True, exist_ok=True)
    return {"sections": {name: SECTIONS[name](context) for name in chosen}}


def format_helper_report(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, result in results["sections"].items():
        lines += [*FORMATTERS[name](result), ""]
    return lines[:-1]
