"""Planted defects and the regression inputs that catch them.

Each :data:`PLANTED` entry is a defect put into a scratch copy of one core
source (a text replacement that must match exactly once, so a changed core
makes the entry fail loudly instead of planting nothing), the message with
which the harness reports it, and the input kept in
``tests/fuzz-regressions/<target>/planted-<name>``. The mailbox inputs are
made here from the ABI (FuzzMailbox.c's input format, through
host_shim/devtools/fuzz_corpus.py's encoder), the stream inputs from real streams
the reference helper seals under the harnesses' fixed key, so that an ABI
or stream-format change regenerates them.

``tests/test_fuzz_harnesses.py`` builds the harness with each defect
compiled in and replays its input: the build must report the defect; the
real core replays every input clean (the regression replay). That proves
each input still reaches the code it was kept for.

    python -m host_shim.devtools.fuzz_planted            # rewrite the inputs
    python -m host_shim.devtools.fuzz_planted --check    # exit 1 when a file differs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from helper import stream as s
from host_shim.devtools import fuzz
from host_shim.devtools.fuzz_corpus import (
    MAILBOX_DATA_SIZE,
    PAGE,
    _cmd,
    _page_list,
    export_stream,
    mailbox_sequence,
    stream_window,
)
from host_shim.helpers import hostcore

HEADER = s.STREAM_HEADER_SIZE
#: Offsets in FuzzMailbox.c's data area (32 KiB) the inputs use.
LIST_AT, OUT_AT, BIND_AT = 0x0, 0x100, 0x7400
#: FuzzMailbox.c's page byte for "the page right past the window's end" (HarnessPage, case 16).
PAGE_PAST_WINDOW_END = 16 << 3
RECORD_MAX = 40 + PAGE + 16
TRACK_PAGES = 1
UNKNOWN_COMMAND = 0x20


def _export_begin(flags: int = 0, out: int = OUT_AT, capacity: int = HEADER) -> bytes:
    """The source's EXPORT_BEGIN: unbound, shard 0 of 1, migration id at BIND_AT."""
    return _cmd(0, "EXPORT_BEGIN", out, capacity, flags, BIND_AT, 0, 1)


def _tracked_batch() -> bytes:
    """A tracked export of page 1 (not a zero page of the harness's pattern)."""
    return (
        _export_begin(TRACK_PAGES)
        + _page_list(0, LIST_AT, [1])
        + _cmd(0, "EXPORT_BATCH", LIST_AT, 1, OUT_AT, RECORD_MAX)
    )


def _raw(code: int) -> bytes:
    """A command by its code (FuzzMailbox.c's raw-command operation, 11)."""
    return bytes([11]) + code.to_bytes(4, "little") + bytes(6)


def _stream(tamper: str) -> bytes:
    """FuzzStream.c's input (control byte 0: the records in one IMPORT_BATCH)
    of a real stream of pages 1 and 2 under the fixed key, with one fault:
    ``flip`` a ciphertext byte of the first PAGE record (its tag fails),
    ``gap`` the first record left out (a sequence gap)."""
    stream = export_stream(stream_window(), [1, 2])
    header, end = stream[:HEADER], stream[-s.END_RECORD_SIZE :]
    records = [bytes(r) for r in s.split_records(stream[HEADER : -s.END_RECORD_SIZE])]
    if tamper == "flip":
        first = bytearray(records[0])
        first[40 + 100] ^= 0x01
        records[0] = bytes(first)
    else:
        records = records[1:]
    return bytes([0]) + header + b"".join(records) + end


@dataclass(frozen=True)
class Planted:
    name: str  # the input is tests/fuzz-regressions/<target>/planted-<name>
    target: str
    source: str  # core source the defect goes into
    old: str
    new: str
    expect: str  # what the harness prints when it catches the defect
    make: Callable[[], bytes]

    @property
    def path(self) -> Path:
        return fuzz.REGRESSION_DIR / self.target / f"planted-{self.name}"



PLANTED: tuple[Planted, ...] = (
    Planted(
        "shutdown-keeps-key", "mailbox", "MailboxDispatch.c",
        "    case OVMF_MH_CMD_SHUTDOWN:\n      MigrationHelperWipeKeys (Context);\n",
        "    case OVMF_MH_CMD_SHUTDOWN:\n      InternalEndSession (Session);\n",
        "SHUTDOWN left the transport key in memory",
        lambda: bytes([0]) + _export_begin() + _cmd(0, "SHUTDOWN"),
    ),
    Planted(
        "refused-batch-moves-sequence", "mailbox", "Session.c",
        "  if (Arg[3] < Count * OVMF_MH_MAX_RECORD_SIZE) {\n",
        "  if (Arg[3] < Count * OVMF_MH_MAX_RECORD_SIZE) {\n    Session->NextSequence += Count;\n",
        "a refused command changed the session",
        lambda: bytes([0]) + _export_begin() + _page_list(0, LIST_AT, [1])
        + _cmd(0, "EXPORT_BATCH", LIST_AT, 1, OUT_AT, RECORD_MAX - 1),
    ),
    Planted(
        "header-outside-output-span", "mailbox", "Session.c",
        "  CopyMem ((VOID *)(Context->Data + Arg[0]), Header, sizeof (*Header));\n",
        "  CopyMem ((VOID *)(Context->Data + Arg[0] + 8), Header, sizeof (*Header));\n",
        "data area written outside the output span",
        lambda: bytes([0]) + _export_begin(),
    ),
    Planted(
        "data-area-bound-off-by-a-page", "mailbox", "Session.c",
        "  return (BOOLEAN)((Offset <= Context->DataSize) && (Size <= Context->DataSize - Offset));\n",
        "  return (BOOLEAN)((Offset <= Context->DataSize + OVMF_MH_PAGE_SIZE) &&\n"
        "                   (Size <= Context->DataSize + OVMF_MH_PAGE_SIZE - Offset));\n",
        "AddressSanitizer: SEGV",
        lambda: bytes([0]) + _export_begin(out=MAILBOX_DATA_SIZE),
    ),
    Planted(
        "guest-page-bound-off-by-a-page", "mailbox", "Session.c",
        "                   (GuestOffset <= Context->GuestWindowSize - OVMF_MH_PAGE_SIZE));\n",
        "                   (GuestOffset <= Context->GuestWindowSize));\n",
        "AddressSanitizer: SEGV",
        lambda: bytes([0]) + _export_begin() + _page_list(0, LIST_AT, [PAGE_PAST_WINDOW_END])
        + _cmd(0, "EXPORT_BATCH", LIST_AT, 1, OUT_AT, RECORD_MAX),
    ),
    Planted(
        "unknown-command-odd-status", "mailbox", "MailboxDispatch.c",
        "    default:\n      return OVMF_MH_STATUS_UNSUPPORTED;\n",
        "    default:\n      return 0x50;\n",
        "unknown status",
        lambda: bytes([0]) + _raw(UNKNOWN_COMMAND),
    ),
    Planted(
        "query-writes-data-area", "mailbox", "MailboxDispatch.c",
        "      Result[5] = OVMF_MH_MAX_BATCH_PAGES;\n",
        "      Result[5] = OVMF_MH_MAX_BATCH_PAGES;\n      Context->Data[Context->DataSize - 1] ^= 1;\n",
        "AddressSanitizer: use-after-poison",
        lambda: bytes([0]) + _cmd(0, "QUERY"),
    ),
    Planted(
        "export-begin-writes-window", "mailbox", "Session.c",
        "  Session->State = OVMF_MH_SESSION_EXPORTING;\n",
        "  Session->State = OVMF_MH_SESSION_EXPORTING;\n  Context->GuestWindow[Context->GuestWindowSize - 1] ^= 1;\n",
        "AddressSanitizer: use-after-poison",
        lambda: bytes([0]) + _export_begin(),
    ),
    Planted(
        "check-pages-writes-window", "mailbox", "Session.c",
        "    Out[Index] = Changed;\n",
        "    Out[Index] = Changed;\n    ((volatile UINT8 *)Context->GuestWindow)[Session->PageList[Index] + 5] ^= 1;\n",
        "guest window written by a command other than IMPORT_BATCH",
        lambda: bytes([0]) + _tracked_batch() + _cmd(0, "CHECK_PAGES", LIST_AT, 1, OUT_AT),
    ),
    Planted(
        "page-hash-key-kept", "mailbox", "Session.c",
        "    MigrationHelperSecureZero (Session->PageHashKey, sizeof (Session->PageHashKey));\n",
        "",
        "a page-hash key outlived its export session",
        lambda: bytes([0]) + _tracked_batch() + _cmd(0, "EXPORT_END", OUT_AT, s.END_RECORD_SIZE),
    ),
    Planted(
        "shared-pages-unchecked", "mailbox", "Session.c",
        "        Status = OVMF_MH_STATUS_SHARED_PAGES_MISMATCH;\n",
        "",
        "IMPORT_END accepted shared pages the source helper did not seal",
        lambda: mailbox_sequence([1], False, "shared-lie"),
    ),
    Planted(
        "unauthenticated-page-written", "stream", "Session.c",
        "      Status = OVMF_MH_STATUS_AUTH_FAILED;\n      break;\n",
        "      Status = OVMF_MH_STATUS_AUTH_FAILED;\n"
        "      if (Record.Type == OVMF_MH_RECORD_PAGE) {\n"
        "        CopyMem ((VOID *)(Context->GuestWindow + Record.GuestOffset), Batch + Position + sizeof (Record),"
        " OVMF_MH_PAGE_SIZE);\n"
        "      }\n\n"
        "      break;\n",
        "guest window holds a byte no authenticated record carried",
        lambda: _stream("flip"),
    ),
    Planted(
        "failed-import-left-usable", "stream", "Session.c",
        "  Result[0] = Records;\n  if (Status != OVMF_MH_STATUS_SUCCESS) {\n"
        "    InternalEndSession (Session);\n    Session->State = OVMF_MH_SESSION_FAILED;\n",
        "  Result[0] = Records;\n  if (Status != OVMF_MH_STATUS_SUCCESS) {\n"
        "    InternalEndSession (Session);\n    Session->State = OVMF_MH_SESSION_IDLE;\n",
        "a stream failure left the session usable",
        lambda: _stream("gap"),
    ),
)


def planted(name: str) -> Planted:
    for entry in PLANTED:
        if entry.name == name:
            return entry
    raise fuzz.FuzzError(f"no planted defect {name!r}; known: {', '.join(p.name for p in PLANTED)}")


def build_planted(entry: Planted) -> Path:
    """The harness built with the defect compiled in (cached like every build)."""
    original = (hostcore.CORE_LIB_DIR / entry.source).read_text()
    if original.count(entry.old) != 1:
        raise fuzz.FuzzError(
            f"planted defect {entry.name}: the text it replaces occurs {original.count(entry.old)} times "
            f"in {entry.source} (expected once); update host_shim/devtools/fuzz_planted.py to the core"
        )
    copy = fuzz.CACHE_DIR / "planted" / entry.name / entry.source
    text = original.replace(entry.old, entry.new)
    if not copy.is_file() or copy.read_text() != text:
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f".{copy.name}.partial")
        partial.write_text(text)
        partial.replace(copy)
    return fuzz.build(entry.target, replace={entry.source: copy})


def replay_planted(entry: Planted, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Replay the entry's kept input on the build with its defect."""
    return subprocess.run(
        [str(build_planted(entry)), str(entry.path)],
        capture_output=True, text=True, check=False, timeout=timeout, env=fuzz._env(),
    )


def generated() -> dict[Path, bytes]:
    """The inputs this module makes, by path."""
    return {entry.path: entry.make() for entry in PLANTED}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or check) the planted-* regression inputs.")
    parser.add_argument("--check", action="store_true", help="only compare the files with what would be written")
    args = parser.parse_args(argv)
    stale = [path for path, blob in generated().items() if not path.is_file() or path.read_bytes() != blob]
    if args.check:
        for path in stale:
            print(f"differs from host_shim/devtools/fuzz_planted.py: {path}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generated()[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
