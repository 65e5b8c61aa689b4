"""What the kernel says of a process's TCP connections (for the tests that
check that a program keeps no dead connection)."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

#: /proc/net/tcp's state of a connection whose peer closed it and this side did not.
CLOSE_WAIT = "08"


def close_wait_sockets(pid: int) -> int:
    """TCP sockets of process ``pid`` in CLOSE-WAIT: its /proc/PID/fd against
    /proc/net/tcp and /proc/net/tcp6 (this network namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == CLOSE_WAIT and fields[9] in inodes:
                count += 1
    return count
