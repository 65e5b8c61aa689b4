"""Creating the files a command writes next to a path the user chose.

A partial or temporary file (``.OUT.partial``, ``.DST.ovmf-mh-partial``,
``.CH.partial``) lives in a folder that someone else may write too. It is
created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: never through a symbolic link
planted at its name, never into a file that appeared there between a check
and the open. A leftover regular file of a killed run is removed first (its
name is ours); a symbolic link or anything else is left untouched, its
target too, and the command says what it found.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from host_shim.errors import OvmfMhError

#: Owner only: a partial file may hold guest RAM (import) or shared pages in
#: plain text (export).
PRIVATE_MODE = 0o600


class LocalFileError(OvmfMhError):
    """A file the command must create is in the way (a symbolic link, a folder...)."""


def _what(path: Path) -> str:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISDIR(info.st_mode):
        return "a folder"
    return "not a regular file"


def create_exclusive(path: Path, mode: int = PRIVATE_MODE, *, replace_leftover: bool = True) -> int:
    """Create ``path`` as a new empty file (``O_CREAT|O_EXCL|O_NOFOLLOW``,
    ``mode``) and return its descriptor, open for reading and writing.

    A regular file already there (a leftover of a killed run) is removed
    first when ``replace_leftover``; anything else is refused with
    LocalFileError, untouched."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        info = path.lstat()
        if not (replace_leftover and stat.S_ISREG(info.st_mode)):
            raise LocalFileError(
                f"{path} is in the way: it is {_what(path)}; left it (and what it points to) untouched; "
                "remove it or choose another name") from None
    path.unlink()
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        raise LocalFileError(f"{path} appeared again while it was being replaced ({_what(path)}); left it "
                             "untouched") from None
