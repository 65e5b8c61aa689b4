"""ovmf-mh keygen: create a transport key (the guest owner's role)."""

from __future__ import annotations

import argparse
from pathlib import Path

from host_shim.helpers.keys import generate_key


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "keygen",
        help="create a transport key for the helpers (guest owner)",
        description=(
            "Write a new random 256-bit transport key to OUT (mode 0600). This is the guest "
            "owner's role: the key reaches source and target helpers as a launch secret, "
            "never through the mailbox, fw_cfg or any log. See docs/key-provisioning.md."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="key file to create")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    generate_key(args.out, force=args.force)
    print(args.out.resolve())
    return 0
