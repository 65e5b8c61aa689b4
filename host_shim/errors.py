"""Exception hierarchy of ovmf-mh. Each error carries the context a user
needs to act on it: the command, the status, the log to read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class OvmfMhError(Exception):
    """Base of every error ovmf-mh reports to a user."""

    exit_code = 1


class SetupError(OvmfMhError):
    """Something the tool needs is missing: EDK2 source, firmware, QEMU."""


class BuildError(OvmfMhError):
    """The firmware build failed."""

    def __init__(self, message: str, *, command: Sequence[str], log: Path | None) -> None:
        self.command = list(command)
        self.log = log
        where = f"; log: {log}" if log else ""
        super().__init__(f"{message} (command: {' '.join(self.command)}{where})")


class ImageFormatError(OvmfMhError):
    """A file is not a firmware image ovmf-mh understands."""

    exit_code = 2


class SevMetadataError(OvmfMhError):
    """A firmware image lacks the SEV metadata a launch measurement needs, or
    carries it corrupt."""

    exit_code = 2


class QemuError(OvmfMhError):
    """QEMU failed to start, died, or misbehaved."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        logs: dict[str, Path] | None = None,
    ) -> None:
        self.command = list(command)
        self.qemu_exit_code = exit_code
        self.logs = dict(logs or {})
        parts = [message]
        if exit_code is not None:
            parts.append(f"QEMU exit code {exit_code}")
        if self.logs:
            parts.append("logs: " + ", ".join(f"{k}={v}" for k, v in self.logs.items()))
        super().__init__("; ".join(parts))


class MailboxError(OvmfMhError):
    """The helper answered a command with an error, or not at all."""

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        status: int | None = None,
        status_name: str | None = None,
        log: Path | None = None,
    ) -> None:
        self.command = command
        self.status = status
        self.status_name = status_name
        self.log = log
        parts = [message]
        if command is not None:
            parts.append(f"command {command}")
        if status is not None:
            parts.append(f"status {status_name or '?'} ({status:#x})")
        if log is not None:
            parts.append(f"helper log: {log}")
        super().__init__("; ".join(parts))


class HelperTimeout(MailboxError):
    """The helper did not become ready or did not answer in time."""


class Terminated(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: the command stops like on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
