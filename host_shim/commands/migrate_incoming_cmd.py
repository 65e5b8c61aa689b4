"""ovmf-mh migrate-incoming: the target host's half of a two-host migration."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from host_shim.commands.options import add_mailbox_timeout
from host_shim.errors import OvmfMhError
from host_shim.firmware.boot import resolve_image
from host_shim.helpers.backends import KINDS
from host_shim.helpers.keys import read_key
from host_shim.migration.migrate_target import TargetConfig, TargetReport, run_target
from host_shim.migration.migration_protocol import parse_address
from host_shim.vm import process
from host_shim.vm.devices import parse_nic, present_nic
from host_shim.vm.qemu import describe_logs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "migrate-incoming",
        help="wait for 'ovmf-mh migrate --to' and run the migrated guest on this host",
        description=(
            "Listen for one source ('ovmf-mh migrate --to HOST:PORT' on the source host), check the guest "
            "description it sends against an allow-list, start the target QEMU (-incoming defer, RAM in "
            "a shared file, x-ignore-shared) and the target helpers, import the page stream, verify "
            "every end-of-stream proof, and resume the guest only when the source commits after its "
            "device state moved. Then, by default, keep running the guest in the foreground until "
            "SIGINT or SIGTERM, which stop it (exit 0); with --no-keep-running, stop it once it runs and "
            "exit 0. Any failure before the resume: the guest is never resumed here, everything "
            "started is stopped, exit 1 with the peer and the phase. See docs/migration-protocol.md."
        ),
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to wait on for the source (port 0: a free one, printed on stderr)")
    parser.add_argument("--key", type=Path, required=True,
                        help="transport key file, the same as the source's (it never crosses the connection)")
    parser.add_argument("--image", type=Path,
                        help="firmware image; must be the source's (default: the DEBUG build)")
    parser.add_argument("--helper", choices=KINDS, default="firmware",
                        help="helper implementation on this side (default firmware)")
    parser.add_argument("--helpers", type=int, default=1,
                        help="target helpers, one per shard: the source must send this many (default 1)")
    parser.add_argument("--work-dir", type=Path, help="folder for logs and the RAM file (default: new temp folder)")
    parser.add_argument("--ram-dir", type=Path,
                        help="keep the guest RAM file here while the command runs, e.g. /dev/shm (default: "
                        "in the work folder, kept afterwards)")
    parser.add_argument("--accept-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up when no source connects within this long (default 300)")
    parser.add_argument("--idle-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="the source counts as gone when it sends nothing or takes nothing for this "
                        "long (default 15)")
    parser.add_argument("--heartbeat-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="after the resume, wait this long for the guest's heartbeat (default 20)")
    parser.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=True,
                        help="after the guest runs here, keep running it until SIGINT/SIGTERM (default: yes)")
    add_mailbox_timeout(parser)
    parser.add_argument("--disk", type=Path,
                        help="for a disk-booted guest (the Debian guest): this host's path to its disk on storage "
                        "both hosts see; checked against the format and size the source describes, never a path "
                        "taken from the source (default: none, such a guest is refused)")
    parser.add_argument("--nic", default="none", metavar="none|user|tap:NAME",
                        help="the host side of the guest's virtio NIC on this host: none (a NIC with no link), "
                        "QEMU's user network, or the tap device NAME, e.g. one on a bridge (default none)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.helpers < 1:
        raise OvmfMhError(f"--helpers {args.helpers}: at least 1")
    if args.disk is not None and not args.disk.is_file():
        raise OvmfMhError(f"--disk {args.disk}: not a file; give this host's path to the guest's disk on the storage "
                          "both hosts see")
    nic = present_nic(parse_nic(args.nic))
    image = resolve_image(args.image)
    key = read_key(args.key)
    listen = parse_address(args.listen, "--listen")
    work = (args.work_dir or process.temp_dir("ovmf-mh-incoming-")).resolve()
    config = TargetConfig(
        image=image, work_dir=work, key=key, listen=listen, helper=args.helper, helpers=args.helpers,
        ram_dir=args.ram_dir, accept_timeout=args.accept_timeout, idle_timeout=args.idle_timeout,
        heartbeat_timeout=args.heartbeat_timeout, mailbox_timeout=args.mailbox_timeout,
        keep_running=args.keep_running, on_listening=_say_listening,
        disk=args.disk.absolute() if args.disk else None, nic=nic,
    )
    try:
        report: TargetReport = run_target(config)
    except Exception:
        # A failure not foreseen: the QEMUs' logs say what happened. (A
        # signal, KeyboardInterrupt, keeps nothing: docs/testing.md.)
        if args.work_dir is None:
            process.keep(work)
        raise
    if args.work_dir is None:
        process.keep(work)  # logs and the report
    (work / "report.json").write_text(json.dumps(report.as_json(), indent=2))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.describe()))
    if report.outcome != "ok":
        print(f"ovmf-mh migrate-incoming: error: from the source {report.peer or '(none)'} during "
              f"{report.phase}: {report.error}", file=sys.stderr)
        print("\n".join(describe_logs(report.logs)), file=sys.stderr)
        return 1
    return 0


def _say_listening(address: tuple[str, int]) -> None:
    print(f"listening on {address[0]}:{address[1]}", file=sys.stderr, flush=True)
