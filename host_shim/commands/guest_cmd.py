"""ovmf-mh guest start|stop|command: the test guest as a guest the user
runs, with the QEMU command line that 'ovmf-mh migrate --qmp --ram' can
attach to (docs/migration.md, "Attaching to a running guest")."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from host_shim.errors import OvmfMhError, QemuError
from host_shim.firmware.boot import resolve_image
from host_shim.migration.guest_description import MAX_GUEST_MIB, MIN_GUEST_MIB
from host_shim.migration.migration_vm import MIB, MigrationError, guest_config
from host_shim.vm import debian_vm, detached, guest, guest_image
from host_shim.vm.devices import DeviceModel, parse_nic, present_nic
from host_shim.vm.qemu import QemuConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "guest",
        help="start, stop or print the test guest as a QEMU that 'ovmf-mh migrate --qmp --ram' attaches to",
        description=(
            "The test guest that 'ovmf-mh migrate' boots for its demo (Debian cloud kernel, busybox initramfs, "
            "a workload that rewrites and checks its memory and prints a heartbeat), run as a guest of your "
            "own: its RAM in a shared memory file, a QMP socket, detached from this command. 'guest start' "
            "starts it and records it in its folder; 'ovmf-mh migrate --to HOST:PORT --qmp SOCKET --ram FILE' "
            "migrates it; 'guest stop' ends it by the pid recorded. See docs/migration.md."
        ),
    )
    commands = parser.add_subparsers(dest="guest_command", metavar="ACTION", required=True)

    start = commands.add_parser(
        "start", help="start the test guest detached; print its pid, QMP socket, RAM file and logs",
        description=(
            "Start the test guest's QEMU in its own session, not stopped when this command ends, with its RAM "
            "in a memory-backend-file (share=on) and a QMP unix socket; wait until it runs (and, unless "
            "--no-wait, until its workload's first heartbeat); write guest.json (pid, start time, QMP socket, "
            "RAM file, command line, logs), qemu.pid, qemu-cmdline.txt and the serial, debugcon and stderr "
            "logs into --work-dir, and print them. Refuses while a guest started from the same folder runs."
        ),
    )
    _common(start)
    start.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                       help="wait for the workload's first heartbeat before returning, so the guest is ready to "
                       "migrate (default: wait)")
    start.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                       help="give up (and stop the QEMU) when the guest does not run, or with --wait does not "
                       "beat, within this long (default 180)")
    start.add_argument("--json", action="store_true", help="print the record as JSON (default: text)")
    start.set_defaults(handler=run_start)

    show = commands.add_parser(
        "command", help="print the QEMU command line 'guest start' would run, without starting it",
        description=(
            "Print the test guest's QEMU command line for --work-dir, as 'guest start' runs it, preceded by "
            "the two files it needs prepared (shell comments): the RAM file, sparse, of the guest's size, and "
            "a copy of the firmware variables. Builds the workload initramfs into the cache if needed; "
            "starts nothing."
        ),
    )
    _common(show)
    show.add_argument("--json", action="store_true",
                      help="print the argument vector and the files to prepare as JSON (default: shell text)")
    show.set_defaults(handler=run_command)

    image = commands.add_parser(
        "image", help="build the Debian guest's disk image into .cache/guest-debian (cached; --force rebuilds)",
        description=(
            "Build the Debian 12 disk image '--guest debian' boots: mmdebstrap from the mirror of this "
            "machine's own Debian sources entry, an EFI system partition filled with mtools (systemd-boot at "
            "\\EFI\\BOOT\\BOOTX64.EFI), an ext4 root made by mkfs.ext4 -d, a GPT. Cached by a digest of the "
            "recipe: once built, nothing is fetched again until the recipe changes. Needs root and the tools "
            "stuart/bootstrap.sh installs. Prints the image's path."
        ),
    )
    image.add_argument("--force", action="store_true", help="rebuild even when the cached image is current")
    image.set_defaults(handler=run_image)

    stop = commands.add_parser(
        "stop", help="stop the guest that 'guest start' started in --work-dir, by its recorded pid",
        description=(
            "Read guest.json in --work-dir and stop that QEMU: QMP 'quit' first, then SIGTERM, then SIGKILL, "
            "each to the recorded pid and only while it is still the recorded process (same start time); "
            "never by name. Then remove its QMP socket and, unless --keep-ram, its RAM file. Exit 0 also "
            "when it was no longer running."
        ),
    )
    stop.add_argument("--work-dir", type=Path, required=True, help="the folder 'guest start' wrote")
    stop.add_argument("--keep-ram", action="store_true", help="keep the RAM file (default: remove it)")
    stop.add_argument("--json", action="store_true", help="print what happened as JSON (default: text)")
    stop.set_defaults(handler=run_stop)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", choices=debian_vm.GUEST_KINDS, default="test",
                        help="the test guest (default) or 'debian': the Debian disk image booted by the firmware, "
                        "2 vCPUs, a virtio disk (a qcow2 overlay WORK_DIR/disk.qcow2 over the cached image), a "
                        "virtio NIC (its host side: --nic), a virtio RNG")
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="folder for the guest's record, logs and (by default) RAM file and QMP socket")
    parser.add_argument("--image", type=Path, help="firmware image (default: the DEBUG build)")
    parser.add_argument("--guest-mib", type=int, default=256,
                        help=f"guest RAM, {MIN_GUEST_MIB}..{MAX_GUEST_MIB} (default 256)")
    parser.add_argument("--workload-mib", type=int, default=64,
                        help="memory the workload rewrites, at most half the guest (default 64)")
    parser.add_argument("--ram", type=Path,
                        help="the guest's RAM file, e.g. under /dev/shm (default: WORK_DIR/guest.ram)")
    parser.add_argument("--qmp", type=Path,
                        help="the QMP unix socket, at most 107 bytes of path (default: WORK_DIR/qmp.sock)")
    parser.add_argument("--nic", metavar="none|user|tap:NAME",
                        help="with --guest debian: the host side of the guest's virtio NIC: none (a NIC with no "
                        "link), QEMU's user network, or the tap device NAME, e.g. one on a bridge (default none)")


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    work = args.work_dir.resolve()
    if not MIN_GUEST_MIB <= args.guest_mib <= MAX_GUEST_MIB or not 1 <= args.workload_mib <= args.guest_mib // 2:
        raise MigrationError(f"--guest-mib must be {MIN_GUEST_MIB}..{MAX_GUEST_MIB} and --workload-mib 1..half of "
                             f"it; got {args.guest_mib} and {args.workload_mib}")
    ram = (args.ram or work / "guest.ram").absolute()
    qmp = (args.qmp or work / "qmp.sock").absolute()
    return work, ram, qmp


def _config(args: argparse.Namespace, ram: Path) -> QemuConfig:
    if args.nic is not None and args.guest != "debian":
        raise MigrationError("--nic is the host side of the Debian guest's NIC (--guest debian); the test guest "
                             "has no NIC")
    if args.guest == "debian":
        nic = parse_nic(args.nic or "none")
        disk = args.work_dir.resolve() / "disk.qcow2"
        if not disk.exists():
            args.work_dir.mkdir(parents=True, exist_ok=True)
            guest_image.overlay(disk)
        return debian_vm.config(resolve_image(args.image), ram, args.guest_mib * MIB, DeviceModel(disk=disk, nic=nic))
    return guest_config(resolve_image(args.image), ram, args.guest_mib * MIB, incoming=False,
                        workload_mib=args.workload_mib)


def run_start(args: argparse.Namespace) -> int:
    work, ram, qmp = _paths(args)
    config = _config(args, ram)
    if args.nic is not None:
        present_nic(parse_nic(args.nic))  # QEMU opens the tap in this namespace
    details: dict[str, Any] = {"guest_mib": args.guest_mib, "workload_mib": args.workload_mib,
                               "image": str(config.firmware_code)}
    record = detached.start(config, work, qmp, ram, details, timeout=args.timeout)
    if args.wait:
        try:
            record.details["heartbeat"] = _wait_heartbeat(record, args.timeout)
        except OvmfMhError:
            detached.stop(work)
            raise
        record.save()
    if args.json:
        print(json.dumps(record.as_json(), indent=2))
    else:
        print(f"guest running: QEMU pid {record.pid} ({args.guest_mib} MiB, {args.workload_mib} MiB workload)")
        print(f"  QMP socket   {record.qmp}")
        print(f"  RAM file     {record.ram}")
        print(f"  command line {record.logs['cmdline']}")
        print(f"  serial log   {record.logs['serial']}")
        print(f"  record       {work / detached.RECORD}")
        if "heartbeat" in record.details:
            print(f"  heartbeat    {record.details['heartbeat']}")
        disk = f" --disk {shlex.quote(str(work / 'disk.qcow2'))}" if args.guest == "debian" else ""
        print(f"  migrate it:  ovmf-mh migrate --to HOST:PORT --key KEY --qmp {shlex.quote(record.qmp)} "
              f"--ram {shlex.quote(record.ram)}{disk}")
        print(f"  stop it:     ovmf-mh guest stop --work-dir {shlex.quote(str(work))}")
    return 0


def _wait_heartbeat(record: detached.GuestRecord, timeout: float) -> str:
    """The workload's first heartbeat line on the guest's serial log."""
    serial = Path(record.logs["serial"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(FileNotFoundError):
            text = serial.read_text(errors="replace")
            text = text[: text.rfind("\n") + 1]
            if guest.HEARTBEAT in text:
                index = text.index(guest.HEARTBEAT)
                return text[index : text.index("\n", index)].rstrip("\r")
        if not record.alive():
            raise QemuError(f"guest QEMU pid {record.pid} exited before its first heartbeat",
                            logs={k: Path(v) for k, v in record.logs.items()})
        time.sleep(0.1)
    raise QemuError(f"guest QEMU pid {record.pid}: no heartbeat on its serial console within {timeout:g} s",
                    logs={k: Path(v) for k, v in record.logs.items()})


def run_command(args: argparse.Namespace) -> int:
    work, ram, qmp = _paths(args)
    detached.qmp_path_fits(qmp)
    config = _config(args, ram)
    argv = detached.command(config, work, qmp)
    prepare = {"ram": {"path": str(ram), "size": args.guest_mib * MIB},
               "vars": {"from": str(config.firmware_vars), "to": str(work / "vars.fd")} if config.firmware_vars
               else None}
    if args.json:
        print(json.dumps({"argv": argv, "prepare": prepare}, indent=2))
        return 0
    what = "the Debian guest" if args.guest == "debian" else "the test guest"
    attach = f"--qmp {qmp} --ram {ram}" + (f" --disk {work / 'disk.qcow2'}" if args.guest == "debian" else "")
    print(f"# {what}, attachable by 'ovmf-mh migrate {attach}'; prepare first:")
    print(f"#   mkdir -p {shlex.quote(str(work))} && truncate -s {args.guest_mib * MIB} {shlex.quote(str(ram))}")
    if config.firmware_vars:
        print(f"#   cp {shlex.quote(str(config.firmware_vars))} {shlex.quote(str(work / 'vars.fd'))}")
    print(shlex.join(argv))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    work = args.work_dir.resolve()
    record, how = detached.stop(work, keep_ram=args.keep_ram)
    if args.json:
        print(json.dumps({"pid": record.pid, "stopped": how, "ram_removed": not args.keep_ram}, indent=2))
    else:
        print(f"guest QEMU pid {record.pid} {how}" + ("" if args.keep_ram else f"; removed {record.ram}"))
    return 0


def run_image(args: argparse.Namespace) -> int:
    print(guest_image.build_image(force=args.force))
    return 0
