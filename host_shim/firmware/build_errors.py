"""Find the line that says why a BaseTools or EDK2 build failed.

A failing build prints hundreds of lines, and its last ones (stuart's
"Build Process Exception", make's "Error 2", collect2's "ld returned 1 exit
status") only say that it failed. The first compiler, assembler, linker or
EDK2 build-tool error is the one to show; make's own line only when there is
none of those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The earliest line matching any of these is the cause.
_CAUSE = re.compile(
    # gcc/clang/nasm/iasl: "file.c:12:3: error: ...", "fatal error: ...".
    r"(?:^|\s|:)(?:fatal )?error:\s"
    # ld: "undefined reference to `X'", "multiple definition of", a missing library.
    r"|undefined reference to|multiple definition of|ld(?:\.\w+)?: cannot find"
    # EDK2 build tools: "OvmfPkgX64.dsc(123): error 4000: Instance of library class ...".
    r"|\berror [0-9A-F]{4}:",
    re.IGNORECASE,
)
# Lines that only report that an earlier step failed.
_CONSEQUENCE = re.compile(r"collect2: error: ld returned|\berror 7000: Failed to execute command", re.IGNORECASE)
# make: "make[2]: *** [GNUmakefile:12: x.o] Error 1", "No rule to make target".
_MAKE = re.compile(r"\bmake(?:\[\d+\])?: \*\*\*")
# stuart prefixes its console lines with the level; drop it before matching.
_LEVEL_PREFIX = re.compile(r"^(?:INFO|ERROR|WARNING|CRITICAL|SECTION|PROGRESS) - ")
_MAX_CHARS = 400


def first_error(lines: Iterable[str]) -> str | None:
    """The first real error line of a build's output, or None. stuart's
    DEBUG lines are its environment probes (e.g. `cargo make --version`
    answering "error: no such command"), never the build's error."""
    cleaned = [
        _LEVEL_PREFIX.sub("", line.rstrip("\n")).strip() for line in lines if not line.startswith("DEBUG - ")
    ]
    commands = ("gcc ", "cc ", "g++ ", '"gcc"', "$ ")
    for pattern in (_CAUSE, _MAKE, _CONSEQUENCE):
        for line in cleaned:
            if line.startswith(commands):  # an echoed command line, flags and all
                continue
            if pattern.search(line) and (pattern is _CONSEQUENCE or not _CONSEQUENCE.search(line)):
                return line[:_MAX_CHARS]
    return None
