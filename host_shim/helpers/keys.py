"""Transport keys: generation (the guest owner's role) and the emulated
launch-secret injection into a helper VM's memory.

On SEV the guest owner's tooling injects the key as a launch secret into a
page the firmware reserved, encrypted under the launch key that only the
measured helper can read. Here the host writes the same OVMF_MH_SECRET
record into the helper VM's RAM file before QEMU starts; the helper copies
the key into private memory and zeroes the page (docs/key-provisioning.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from helper import abi
from host_shim.errors import OvmfMhError


class KeyError_(OvmfMhError):
    """A key file is missing, unreadable or malformed."""


def key_size() -> int:
    return abi.load().const("OVMF_MH_KEY_SIZE")


def generate_key(out: Path, *, force: bool = False) -> None:
    """Write a fresh random transport key, readable by the owner only."""
    if out.exists() and not force:
        raise KeyError_(f"{out} exists; refusing to overwrite a key (use --force)")
    key = os.urandom(key_size())
    # Never through a symbolic link: the key would land wherever it points.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(out, flags, 0o600)
    except OSError as exc:
        what = f"a symbolic link to {os.readlink(out)}, left untouched" if out.is_symlink() else exc.strerror
        raise KeyError_(f"cannot write the key to {out}: {what}") from None
    try:
        # --force over an existing file: its old mode stays unless changed here.
        os.fchmod(fd, 0o600)
        os.write(fd, key)
    finally:
        os.close(fd)


def read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(key) != key_size():
        raise KeyError_(f"{path} is not an ovmf-mh key: {len(key)} bytes, expected {key_size()}")
    return key


def secret_record(key: bytes) -> bytes:
    """The OVMF_MH_SECRET record that carries a key into a helper."""
    a = abi.load()
    if len(key) != a.const("OVMF_MH_KEY_SIZE"):
        raise KeyError_("transport key has the wrong size")
    return a.layout("OVMF_MH_SECRET").pack(
        Signature=a.const("OVMF_MH_SECRET_SIGNATURE"),
        Version=a.const("OVMF_MH_SECRET_VERSION"),
        KeySize=len(key),
        Key=key,
    )


def secret_page_base() -> int:
    return abi.load().const("OVMF_MH_SECRET_PAGE_BASE")
