"""Find the line that says why a BaseTools or EDK2 build failed.

A failing build prints hundreds of lines, and its last ones (stuart's
"Build Process Exception", make's "Error 2") only say that it failed. The
first compiler, linker, make or EDK2 build-tool error is the one to show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# In order of preference: the earliest line matching the first pattern that
# matches anywhere wins.
_PATTERNS = (
    # gcc/clang/nasm/iasl: "file.c:12:3: error: ...", "fatal error: ...".
    re.compile(r"(?:^|\s|:)(?:fatal )?error:\s", re.IGNORECASE),
    # ld: "undefined reference to `X'", "multiple definition of".
    re.compile(r"undefined reference to|multiple definition of|ld(?:\.\w+)?: cannot find"),
    # EDK2 build tools: "...OvmfPkgX64.dsc(123): error 4000: Instance of library class ...".
    re.compile(r"\berror [0-9A-F]{4}:", re.IGNORECASE),
    # make: "make[2]: *** [GNUmakefile:12: x.o] Error 1", "No rule to make target".
    re.compile(r"\bmake(?:\[\d+\])?: \*\*\*"),
)
# stuart prefixes its console lines with the level; drop it before matching.
_LEVEL_PREFIX = re.compile(r"^(?:INFO|ERROR|WARNING|CRITICAL|DEBUG|SECTION|PROGRESS) - ")
_MAX_CHARS = 400


def first_error(lines: Iterable[str]) -> str | None:
    """The first real error line of a build's output, or None. stuart's
    DEBUG lines are its environment probes (e.g. `cargo make --version`
    answering "error: no such command"), never the build's error."""
    cleaned = [
        _LEVEL_PREFIX.sub("", line.rstrip("\n")).strip() for line in lines if not line.startswith("DEBUG - ")
    ]
    for pattern in _PATTERNS:
        for line in cleaned:
            if pattern.search(line) and not _is_noise(line):
                return line[:_MAX_CHARS]
    return None


def _is_noise(line: str) -> bool:
    # Command lines echoed by make contain "-Werror" or "error" in paths; flags
    # and file names are not errors.
    return line.startswith(("gcc ", "cc ", "g++ ", '"gcc"', "$ ")) or "-Werror=" in line.split(" error:")[0]
