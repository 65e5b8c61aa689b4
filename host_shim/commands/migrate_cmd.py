"""ovmf-mh migrate: live-migrate a running guest through the helpers."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from host_shim.commands.options import add_mailbox_timeout
from host_shim.firmware.boot import resolve_image
from host_shim.helpers.backends import KINDS
from host_shim.migration.convergence import DEFAULT_DOWNTIME_LIMIT_MS, THROTTLE_MAX, ConvergenceSettings
from host_shim.migration.migrate import SWITCHOVER_MODES, MigrationConfig, MigrationReport, migrate, write_report
from host_shim.migration.migration_protocol import parse_address
from host_shim.migration.migration_vm import MigrationError
from host_shim.vm import process
from host_shim.vm.debian_vm import DEFAULT_MIB, GUEST_KINDS
from host_shim.vm.devices import NicBackend, parse_nic, present_nic
from host_shim.vm.netns import L2Network
from host_shim.vm.qemu import describe_logs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "migrate",
        help="live-migrate a running guest from a source QEMU to a target QEMU through the helpers",
        description=(
            "With --to HOST:PORT this is the source host's half: the target host runs 'ovmf-mh "
            "migrate-incoming' there. Without --to, both halves run in this command, the target's in a "
            "thread, over loopback TCP: the same protocol (docs/migration-protocol.md). "
            "Boot the test guest (Debian cloud kernel, busybox initramfs and a workload that keeps "
            "rewriting and checking a pattern in guest memory) on a source QEMU with its RAM in a "
            "shared file, start a target QEMU with -incoming defer and its own RAM file, start the "
            "target helpers, then pre-copy guest memory through source and target helpers (full pass, "
            "then dirty passes), stop the source, send the last pages, move device state with QEMU's "
            "migration (x-ignore-shared), verify every end-of-stream proof and only then resume the "
            "target. Exit 0 only when the target runs and its heartbeat continues. The source QEMU (and, "
            "without --to, the target QEMU) is shut down when the command ends. "
            "With --qmp SOCKET --ram FILE the guest is instead one you already run (e.g. 'ovmf-mh guest "
            "start'): its machine, memory backend, devices, firmware and boot files are checked over QMP "
            "first, and a guest that does not fit is refused with the reason named, untouched; after a "
            "migration its QEMU is left paused (or quit with --quit-source), never killed. See "
            "docs/migration.md."
        ),
    )
    parser.add_argument("--image", type=Path, help="firmware image (default: the DEBUG build)")
    parser.add_argument("--to", metavar="HOST:PORT",
                        help="migrate to 'ovmf-mh migrate-incoming' listening there (default: none, both "
                        "halves in this command over loopback)")
    parser.add_argument("--key", type=Path,
                        help="transport key file, the same on both hosts; required with --to (default "
                        "without --to: a fresh one for this run)")
    parser.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="keep trying while the target refuses the connection ('migrate-incoming' not listening "
                        "yet), give up after this long (default 30)")
    parser.add_argument("--idle-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="the target counts as gone when it says nothing (it reports progress every "
                        "second) or takes no data for this long (default 15)")
    parser.add_argument("--helper", choices=KINDS, default="firmware",
                        help="helper implementation on both sides (default firmware; --image is the guests' "
                        "firmware whatever the helper kind)")
    parser.add_argument("--helpers", type=int, default=1,
                        help="helpers per side (default 1: on a 2-core machine more TCG helpers compete "
                        "with the guest for the CPUs)")
    parser.add_argument("--qmp", type=Path, metavar="SOCKET",
                        help="migrate the guest you already run whose QMP unix socket this is, instead of "
                        "booting the test guest; needs --ram (docs/migration.md, 'Attaching to a running guest')")
    parser.add_argument("--ram", type=Path, metavar="FILE",
                        help="with --qmp: the running guest's RAM file, its memory-backend-file with share=on "
                        "(checked against what QEMU says)")
    parser.add_argument("--quit-source", action="store_true",
                        help="with --qmp: quit the source QEMU over QMP once the guest runs on the target "
                        "(default: leave it paused, in QEMU's postmigrate state, for you to end)")
    parser.add_argument("--guest-mib", type=int,
                        help="RAM of the test guest this command boots (default 256; not with --qmp: read "
                        "from the running guest)")
    parser.add_argument("--workload-mib", type=int,
                        help="memory the booted test guest's workload rewrites (default 64; not with --qmp: "
                        "read from the running guest's initramfs)")
    parser.add_argument("--guest", choices=GUEST_KINDS, default="test",
                        help="the guest this command boots: the test guest (default) or 'debian', the Debian 12 "
                        "disk the firmware boots, with --vcpus vCPUs, a virtio disk, NIC and RNG (docs/migration.md, "
                        "'Migrate a real VM'); not with --qmp")
    parser.add_argument("--vcpus", type=int, default=2, help="with --guest debian: vCPUs, 1..8 (default 2)")
    parser.add_argument("--disk", type=Path,
                        help="with --guest debian: the guest's disk on storage both hosts see (default: a fresh "
                        "qcow2 overlay WORK_DIR/disk.qcow2 over the cached image); with --qmp: the attached "
                        "guest's disk, checked against what QEMU says (the target opens this path)")
    parser.add_argument("--network", action=argparse.BooleanOptionalAction, default=True,
                        help="with --guest debian: put the source host, the target host and a client in network "
                        "namespaces on one L2 segment, the guest's NIC on a tap in each host's, and stream a TCP "
                        "connection from the client to the guest's echo service through the migration (the report's "
                        "tcp_probe); needs root; not with --to (default on; --no-network: a NIC with no host side)")
    parser.add_argument("--client-rto-max-ms", type=int, metavar="MS",
                        help="with --network: cap the client's TCP retransmission backoff at MS "
                        "(net.ipv4.tcp_rto_max_ms in its namespace, 1000..120000, Linux 6.15+), so its first "
                        "retransmission after the switchover comes at most MS after 'cont' (default: the kernel's "
                        "120000; docs/migration.md, 'The probe's gap')")
    parser.add_argument("--nic", metavar="none|user|tap:NAME",
                        help="with --guest debian and --to: the host side of the guest's virtio NIC on this (the "
                        "source) host: none (a NIC with no link), QEMU's user network, or the tap device NAME, e.g. "
                        "one on a bridge; the target names its own with 'migrate-incoming --nic' (default none)")
    parser.add_argument("--max-passes", type=int, default=6, help="pre-copy passes at most (default 6)")
    parser.add_argument("--downtime-limit", type=float, default=DEFAULT_DOWNTIME_LIMIT_MS, metavar="MS",
                        help="stop pre-copy once the final pass, by the page rate the last pass measured, would "
                        "take at most this long with the guest stopped: the pages the dirty log marks times the "
                        "seconds per page of the last pass (the check and the send; the target's verification, "
                        "the device state and 'cont' come on top) (default "
                        f"{DEFAULT_DOWNTIME_LIMIT_MS} ms)")
    parser.add_argument("--auto-converge", action=argparse.BooleanOptionalAction, default=True,
                        help="while a pre-copy pass leaves more than half of its pages dirty again, throttle the "
                        "guest: stop it for a share of every 100 ms (QMP stop/cont), raised after each such pass, "
                        f"at most {100 * THROTTLE_MAX:.0f}%%; the guest always runs again when pre-copy ends, "
                        "whatever ends it (default on; --no-auto-converge: the pass limit ends a pre-copy that "
                        "does not converge)")
    parser.add_argument("--switchover", choices=SWITCHOVER_MODES, default="dirty-log",
                        help="how pre-copy passes and the switchover find dirty pages: dirty-log, the kernel's "
                        "write log of the source RAM file (needs it on ext4, Linux 6.5+: the switchover then "
                        "reads only the pages written since the last pass), or full-check, a host copy of the "
                        "RAM and a CHECK_PAGES of every page at switchover (any file system, e.g. --ram-dir "
                        "/dev/shm) (default dirty-log)")
    parser.add_argument("--verify-all", action="store_true",
                        help="with the dirty log, also have the helpers check every page at switchover and "
                        "report the pages the log missed (costs downtime in proportion to the guest)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw the migration's passes (pages and dirty rate per pass) and its downtime's "
                        "steps into this PNG (needs matplotlib)")
    parser.add_argument("--no-verify-ram", action="store_true",
                        help="skip comparing the RAM files at switchover")
    parser.add_argument("--work-dir", type=Path, help="folder for logs and RAM files (default: new temp folder)")
    parser.add_argument("--ram-dir", type=Path,
                        help="keep the two guest RAM files here for the run only, e.g. /dev/shm (tmpfs: "
                        "faster, no disk page faults); default: in the work folder, kept afterwards")
    parser.add_argument("--zero-ranges", action=argparse.BooleanOptionalAction, default=True,
                        help="send never-written pages (holes of the source RAM file) as zero ranges the "
                        "source helpers check (default on; --no-zero-ranges: page by page)")
    add_mailbox_timeout(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress lines on stderr (default: when stderr is a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the options, migrate, and say the report; 1 unless the guest
    runs on the target."""
    _check_options(args)
    nic = present_nic(parse_nic(args.nic)) if args.nic is not None else None
    # A temporary work folder stays after the run (logs, report, RAM files
    # unless --ram-dir) but not after the command is killed: the reaper
    # removes it unless the run reached its report.
    work = (args.work_dir or process.temp_dir("ovmf-mh-migrate-")).resolve()
    config = _config(args, work, nic)
    try:
        # The namespaces hold both hosts: only when this command runs both roles.
        with L2Network(client_rto_max_ms=args.client_rto_max_ms) if _networked(args) else nullcontext() as network:
            config.network = network
            report = migrate(config)
    except Exception:
        # Refused before it started, or a failure not foreseen: whatever
        # QEMU ran keeps its logs. (A signal, KeyboardInterrupt, keeps
        # nothing: docs/testing.md.)
        if args.work_dir is None:
            process.keep(work)
        raise
    if args.work_dir is None:
        process.keep(work)
    return _say_report(args, report, work)


def _check_options(args: argparse.Namespace) -> None:
    """Options that do not go together, refused by name before anything starts."""
    if (args.qmp is None) != (args.ram is None):
        raise MigrationError("--qmp SOCKET and --ram FILE go together: the running guest's QMP socket and RAM "
                             "file")
    if args.quit_source and args.qmp is None:
        raise MigrationError("--quit-source applies to a guest attached with --qmp; the test guest this command "
                             "boots is always stopped by it")
    if args.qmp is not None:
        given = [option for option, value in (("--guest-mib", args.guest_mib), ("--workload-mib", args.workload_mib))
                 if value is not None]
        if args.to and args.ram_dir is not None:
            given.append("--ram-dir")
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise MigrationError(f"{', '.join(given)} {verb} not apply with --qmp: the running guest has its own "
                                 "RAM file and sizes (--ram-dir still places the target's RAM file without --to)")
    if args.guest == "debian" and args.qmp is not None:
        raise MigrationError("--guest debian boots the Debian guest here; --qmp attaches to a guest you run")
    if args.guest != "debian" and args.disk is not None and args.qmp is None:
        raise MigrationError("--disk is the disk of the Debian guest (--guest debian) or of the guest attached with "
                             "--qmp")
    if args.client_rto_max_ms is not None and not _networked(args):
        raise MigrationError("--client-rto-max-ms is the TCP probe's client: it goes with --guest debian and the "
                             "network of namespaces (not --no-network, not --to)")
    if args.nic is not None and args.guest != "debian":
        raise MigrationError("--nic is the host side of the Debian guest's NIC (--guest debian)")
    if args.nic is not None and not args.to:
        raise MigrationError("--nic names the source host's side of the NIC with --to; with both roles in this "
                             "command --network (the default) puts it on a tap in each host's namespace, and "
                             "--no-network leaves it without a host side")


def _networked(args: argparse.Namespace) -> bool:
    """The network of namespaces holds both hosts: only the Debian guest
    with --network, both roles in this command."""
    return bool(args.guest == "debian" and args.network and not args.to)


def _config(args: argparse.Namespace, work: Path, nic: NicBackend | None) -> MigrationConfig:
    """The migration the options ask for."""
    default_mib = DEFAULT_MIB if args.guest == "debian" else 256
    return MigrationConfig(
        image=resolve_image(args.image),
        work_dir=work,
        key_file=args.key,
        helper=args.helper,
        helpers=args.helpers,
        guest_mib=default_mib if args.guest_mib is None else args.guest_mib,
        workload_mib=64 if args.workload_mib is None else args.workload_mib,
        max_passes=args.max_passes,
        convergence=ConvergenceSettings(downtime_limit_ms=args.downtime_limit, auto_converge=args.auto_converge),
        switchover=args.switchover,
        verify_all=args.verify_all,
        verify_ram=not args.no_verify_ram,
        progress=args.progress,
        ram_dir=args.ram_dir,
        mailbox_timeout=args.mailbox_timeout,
        zero_ranges=args.zero_ranges,
        target=parse_address(args.to, "--to") if args.to else None,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        attach_qmp=args.qmp.absolute() if args.qmp else None,
        attach_ram=args.ram.absolute() if args.ram else None,
        quit_source=args.quit_source,
        guest=args.guest,
        vcpus=args.vcpus,
        disk=args.disk.absolute() if args.disk else None,
        nic=nic,
    )


def _say_report(args: argparse.Namespace, report: MigrationReport, work: Path) -> int:
    """The report in WORK/report.json and on stdout (--json, --plot); the
    error on stderr. The exit code: 0 only for a guest running on the target."""
    write_report(report, work / "report.json")
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.describe()))
    if args.plot is not None and report.passes:
        from host_shim.devtools.plots import plot_migration

        plot_migration(report.as_json(), args.plot)
        print(f"passes and downtime drawn in {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if report.outcome != "ok":
        print(f"ovmf-mh migrate: error: {report.error}; the guest is {report.guest_state}", file=sys.stderr)
        print("\n".join(describe_logs(report.logs)), file=sys.stderr)
        return 1
    return 0
