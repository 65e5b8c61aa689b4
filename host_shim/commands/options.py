"""Options that several commands share, with one help text each."""

from __future__ import annotations

import argparse

from host_shim.helpers.mailbox import DEFAULT_TIMEOUT


def add_mailbox_timeout(parser: argparse.ArgumentParser) -> None:
    """--mailbox-timeout: how long a helper may take to answer one command."""
    parser.add_argument(
        "--mailbox-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="give up on a helper that answers no command for this many seconds (stopped or wedged; a dead "
        f"helper is seen at once, docs/mailbox.md) (default {DEFAULT_TIMEOUT:.0f})",
    )
