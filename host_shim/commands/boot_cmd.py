"""ovmf-mh boot: boot an image under QEMU and report what it reached."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from host_shim.firmware.boot import BootMode, boot_image, resolve_image
from host_shim.migration.debian_guest import BOOT_TIMEOUT
from host_shim.vm.debian_vm import GUEST_KINDS

#: Default seconds to wait, per guest: the Debian guest boots through BDS,
#: systemd-boot and systemd, 1.5-3 min under TCG on a loaded machine.
TIMEOUTS = {"test": 60.0, "debian": BOOT_TIMEOUT}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "boot",
        help="boot an image in QEMU (normal or helper mode) and report what it reached",
        description=(
            "normal: boot the real guest (Debian cloud kernel + busybox initramfs) with no "
            "helper request; succeeds when the guest reaches userspace. helper: pass the "
            "fw_cfg helper request; succeeds when the helper publishes READY without "
            "reaching PEI, answers QUERY and powers off on SHUTDOWN. Exit 0 only on success. "
            "QEMU runs under TCG; its command line and logs stay in the work folder."
        ),
    )
    parser.add_argument("--mode", choices=[m.value for m in BootMode], required=True,
                        help="normal: boot the guest without a helper request; helper: boot into the helper")
    parser.add_argument("--guest", choices=GUEST_KINDS, default="test",
                        help="normal mode's guest: the test guest (kernel + busybox initramfs, fast; default) "
                        "or 'debian', a Debian 12 disk the firmware boots through BDS and systemd-boot, "
                        "2 vCPUs, virtio disk, NIC and RNG; it succeeds at multi-user.target and the "
                        "workload's heartbeat (the image is built into .cache/guest-debian first if needed)")
    parser.add_argument("--image", type=Path, help="OVMF code image (default: the DEBUG build)")
    parser.add_argument("--timeout", type=float,
                        help=f"seconds to wait (default {TIMEOUTS['test']:g}; with --guest debian "
                        f"{TIMEOUTS['debian']:g}: its boot takes 1.5-3 min under TCG)")
    parser.add_argument("--work-dir", type=Path, help="folder for QEMU logs (default: a new temp folder)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary (default: text)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    image = resolve_image(args.image)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix=f"ovmf-mh-boot-{args.mode}-"))
    timeout = TIMEOUTS[args.guest] if args.timeout is None else args.timeout
    outcome = boot_image(image, BootMode(args.mode), work.resolve(), timeout, guest_kind=args.guest)
    if args.json:
        print(json.dumps(outcome.as_json(), indent=2))
    else:
        print("\n".join(outcome.describe()))
    return 0 if outcome.ok else 1
