"""Side by side: the Debian guest's downtime without the RAM check
(--no-verify-ram), with the target hashing its RAM file anyway before its
verdict (as before protocol version 6: "before") and hashing nothing, as the
source did not ask ("after"), alternating, each from its own fresh boot.

    sudo .venv/bin/python -m host_shim.devtools.bench_unasked_digest --guest-mib 1024 --rounds 3 \\
        --work-dir work/unasked-digest

Prints one line per migration (downtime, the target's digest time, the
steps after 'stop') with the load average before it, then the medians. The
"before" runs put the target's hashing back with a stand-in for the target
role's digest step: the same code, told the source asked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from host_shim.firmware.boot import resolve_image
from host_shim.migration import migrate_target
from host_shim.migration.migrate import MigrationConfig, migrate
from host_shim.vm.netns import L2Network


@contextmanager
def target_hashes_anyway() -> Iterator[None]:
    """The target role as before version 6: its digest whatever the source asked."""
    original = migrate_target._verdict_digest

    def always(channel: Any, reader: Any, ram: Path, size: int, report: Any) -> tuple[list[str], int]:
        report.ram_digest_asked = True
        return original(channel, reader, ram, size, report)

    migrate_target._verdict_digest = always
    try:
        yield
    finally:
        migrate_target._verdict_digest = original


def one(variant: str, work: Path, mib: int, network: bool) -> dict[str, Any]:
    load = os.getloadavg()[0]
    config = MigrationConfig(image=resolve_image(None), work_dir=work, guest_mib=mib, guest="debian", vcpus=2,
                             verify_ram=False, idle_timeout=60.0)
    with target_hashes_anyway() if variant == "before" else nullcontext(), \
            L2Network() if network else nullcontext() as net:
        config.network = net
        report = migrate(config)
    target = report.target or {}
    return {"variant": variant, "outcome": report.outcome, "error": report.error, "load_before": load,
            "load_after": os.getloadavg()[0], "downtime_ms": round(1000 * report.downtime_seconds),
            "stopped_ms": round(1000 * report.stopped_seconds), "target_digest_ms": target.get("digest_ms"),
            "device_state_ms": round(1000 * report.device_state_seconds), "steps": report.switchover_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--guest-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--no-network", action="store_true", help="no namespaces, no probe")
    args = parser.parse_args()
    runs = []
    for round_ in range(args.rounds):
        for variant in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
            run = one(variant, (args.work_dir / f"{round_}-{variant}").resolve(), args.guest_mib, not args.no_network)
            runs.append(run)
            print(json.dumps(run), flush=True)
    for variant in ("before", "after"):
        ok = [r["downtime_ms"] for r in runs if r["variant"] == variant and r["outcome"] == "ok"]
        if ok:
            print(f"{variant}: downtime median {statistics.median(ok):.0f} ms over {len(ok)} runs: {ok}")


if __name__ == "__main__":
    main()
