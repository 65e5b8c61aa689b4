"""The ovmf-mh command line. Each subcommand lives in its own module and
registers itself here through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from host_shim.errors import OvmfMhError, Terminated

Handler = Callable[[argparse.Namespace], int]


def _command_modules() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    from host_shim.commands import (
        bench_cmd,
        boot_cmd,
        build_cmd,
        fuzz_cmd,
        guest_cmd,
        inspect_cmd,
        keygen_cmd,
        measure_cmd,
        migrate_cmd,
        migrate_incoming_cmd,
        transfer_cmd,
    )

    return [
        build_cmd.register,
        boot_cmd.register,
        inspect_cmd.register,
        measure_cmd.register,
        keygen_cmd.register,
        transfer_cmd.register,
        migrate_cmd.register,
        migrate_incoming_cmd.register,
        guest_cmd.register,
        bench_cmd.register,
        fuzz_cmd.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovmf-mh",
        description=(
            "Build, inspect and drive the ovmf-mh migration helper: an OVMF image whose "
            "SEC phase diverts into a page-encryption helper when QEMU asks through fw_cfg."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _command_modules():
        register(sub)
    return parser


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP end a command like Ctrl-C: every helper and QEMU
    it started is stopped, temporary files removed, exit code 128 + signal.
    A second signal while stopping is ignored (stopping is bounded)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="ovmf-mh: %(message)s",
        stream=sys.stderr,
    )
    # qemu.qmp reports a monitor closing under a QEMU that exits on purpose as
    # an error; QemuVM records QMP traffic in each VM's qmp.log instead.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    handler: Handler = args.handler
    _stop_on_signals()
    try:
        return handler(args)
    except OvmfMhError as exc:
        print(f"ovmf-mh {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", []))
        print(f"ovmf-mh {args.command}: interrupted: stopped by {signal.Signals(signum).name}; every helper "
              f"and QEMU it started is stopped and its temporary files are removed{notes}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
