"""The reference helper as a process (helper/serve.py) behind the mailbox
client: the header it publishes, a stream it exports that the in-process
reference imports, statuses and counters, and how it ends (SHUTDOWN, a
SIGKILL seen by the host, its host process going away)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helper import abi
from helper.serve import REFERENCE_BUILD_ID
from host_shim import paths
from host_shim.errors import MailboxError
from host_shim.helpers.backends import MailboxBackend, ReferenceBackend, mailbox_backend
from host_shim.helpers.mailbox import status_name
from host_shim.helpers.reference_process import ReferenceHelperProcess

A = abi.load()
PAGE = A.const("OVMF_MH_PAGE_SIZE")
PAGES = 96
DATA_SIZE = 1024 * 1024
KEY = bytes(range(0x20, 0x40))
RECORD = A.layout("OVMF_MH_RECORD_HEADER").size + PAGE + A.const("OVMF_MH_TAG_SIZE")


def _guest(path: Path) -> Path:
    pages = [os.urandom(PAGE) if i % 3 else bytes(PAGE) for i in range(PAGES)]
    path.write_bytes(b"".join(pages))
    return path


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[ReferenceHelperProcess, MailboxBackend]]:
    guest = _guest(tmp_path / "guest.ram")
    with ReferenceHelperProcess(guest, KEY, tmp_path / "helper", target=False,
                                mailbox_size=DATA_SIZE + PAGE) as process:
        process.wait_ready(30)
        backend = mailbox_backend(process, None, DATA_SIZE)
        try:
            yield process, backend
        finally:
            backend.release()


def _export(backend: MailboxBackend) -> list[bytes]:
    """Header, one batch of every page, end record: the stream as pieces."""
    pieces = []
    # Shard 0 of 1, unbound; the migration id is the data area's first 32 bytes.
    status, results = backend.call("EXPORT_BEGIN", 65536, 4096, 0, 0, 0, 1)
    assert status_name(status) == "SUCCESS"
    pieces.append(bytes(backend.data[65536 : 65536 + results[0]]))
    backend.data[: 8 * PAGES] = struct.pack(f"<{PAGES}Q", *range(0, PAGES * PAGE, PAGE))
    status, results = backend.call("EXPORT_BATCH", 0, PAGES, 65536, PAGES * RECORD)
    assert status_name(status) == "SUCCESS"
    assert results[1] == PAGES and results[2] == PAGES // 3  # every third page is zero
    pieces.append(bytes(backend.data[65536 : 65536 + results[0]]))
    status, results = backend.call("EXPORT_END", 65536, 4096)
    assert status_name(status) == "SUCCESS"
    pieces.append(bytes(backend.data[65536 : 65536 + results[0]]))
    return pieces


def test_ready_header_and_secret_wiped(source: tuple[ReferenceHelperProcess, MailboxBackend]) -> None:
    process, _ = source
    assert process.mailbox is not None
    header = process.mailbox.header()
    assert header["Signature"] == A.const("OVMF_MH_MAILBOX_SIGNATURE")
    assert header["State"] == A.const("OVMF_MH_STATE_READY")
    assert (header["AbiMajor"], header["AbiMinor"]) == (A.const("OVMF_MH_ABI_MAJOR"), A.const("OVMF_MH_ABI_MINOR"))
    assert header["BuildId"] == REFERENCE_BUILD_ID
    assert header["Capabilities"] & A.const("OVMF_MH_CAP_KEY_LOADED")
    assert header["DataSize"] == DATA_SIZE
    assert header["GuestWindowSize"] == PAGES * PAGE
    assert header["MaxBatchPages"] == A.const("OVMF_MH_MAX_BATCH_PAGES")
    base = A.const("OVMF_MH_SECRET_PAGE_BASE")
    assert process.memory[base : base + PAGE] == bytes(PAGE)


def test_export_is_imported_by_the_in_process_reference(
    source: tuple[ReferenceHelperProcess, MailboxBackend], tmp_path: Path
) -> None:
    _, backend = source
    header, records, end = _export(backend)
    target = ReferenceBackend(bytearray(PAGES * PAGE), KEY, DATA_SIZE)
    for command, piece in (("IMPORT_BEGIN", header), ("IMPORT_BATCH", records), ("IMPORT_END", end)):
        target.data[: len(piece)] = piece
        status, _ = target.call(command, 0, len(piece), *((0, 1) if command == "IMPORT_BEGIN" else ()))
        assert status_name(status) == "SUCCESS", command
    assert bytes(target.window) == (tmp_path / "guest.ram").read_bytes()
    target.release()


def test_statuses_counters_and_shutdown(source: tuple[ReferenceHelperProcess, MailboxBackend]) -> None:
    process, backend = source
    assert process.mailbox is not None
    assert status_name(backend.call(0x7777)[0]) == "UNSUPPORTED"
    assert status_name(backend.call("EXPORT_BATCH", 0, 1, 0, RECORD)[0]) == "BAD_STATE"
    assert status_name(backend.call("NOP")[0]) == "SUCCESS"
    header = process.mailbox.header()
    assert (header["CommandsServed"], header["CommandsFailed"]) == (1, 2)
    assert status_name(backend.call("SHUTDOWN")[0]) == "SUCCESS"
    assert process.mailbox.header()["State"] == A.const("OVMF_MH_STATE_SHUTDOWN")
    assert process.close() == 0
    assert "exit 0 (SHUTDOWN)" in process.log_file.read_text()


def test_a_killed_helper_is_reported(source: tuple[ReferenceHelperProcess, MailboxBackend]) -> None:
    process, backend = source
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(MailboxError, match="exited while serving") as caught:
        backend.call("NOP")
    assert time.monotonic() - started < 5
    assert caught.value.log == process.log_file


def test_the_helper_does_not_outlive_its_host(tmp_path: Path) -> None:
    """A host that dies without SHUTDOWN: the helper does not outlive it. The
    host's reaper kills it at once (host_shim/vm/reaper.py); were the reaper
    gone too, the helper notices the host is gone and exits by itself."""
    guest = _guest(tmp_path / "guest.ram")
    host_script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from host_shim.helpers.reference_process import ReferenceHelperProcess\n"
        "p = ReferenceHelperProcess(Path(sys.argv[1]), None, Path(sys.argv[2]), target=False,\n"
        "                           mailbox_size=1 << 20)\n"
        "p.start(); p.wait_ready(30); print(p.pid, flush=True)\n"
        "import os; os._exit(0)  # no SHUTDOWN, no cleanup\n"
    )
    host = subprocess.run([sys.executable, "-c", host_script, str(guest), str(tmp_path / "helper")],
                          capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=60, check=True)
    pid = int(host.stdout.split()[0])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.05)
        else:
            assert not Path(f"/proc/{pid}").exists(), "helper outlived its host"
        log = (tmp_path / "helper" / "reference-helper.log").read_text()
        assert "READY" in log
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_a_command_posted_right_after_ready_is_served() -> None:
    """The host may post its first command the moment it sees READY, before
    the helper's serve loop has read the mailbox: that command is served,
    not lost (a lost IMPORT_BEGIN once cost a transfer its mailbox timeout)."""
    import mmap
    import threading

    from helper.serve import MailboxServer

    header = A.layout("OVMF_MH_MAILBOX_HEADER")
    offsets = {f.name: f.offset for f in header.fields}
    base = A.const("OVMF_MH_MAILBOX_MIN_BASE")
    size = A.const("OVMF_MH_MAILBOX_HEADER_SIZE") + PAGE
    memory = mmap.mmap(-1, base + size)
    window = mmap.mmap(-1, 16 * PAGE)
    server = MailboxServer(memory, base, size, window)
    try:
        server.publish_ready()
        words = memoryview(memory)[base : base + A.const("OVMF_MH_MAILBOX_HEADER_SIZE")].cast("I")
        assert words[offsets["State"] // 4] == A.const("OVMF_MH_STATE_READY")

        def post(seq: int, command: str) -> None:
            words[offsets["Command"] // 4] = A.const(f"OVMF_MH_CMD_{command}")
            words[offsets["CommandSeq"] // 4] = seq

        post(1, "NOP")  # before the serve loop runs
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        deadline = time.monotonic() + 10
        while words[offsets["ResponseSeq"] // 4] != 1:
            assert time.monotonic() < deadline, "the command posted right after READY was never answered"
            time.sleep(0.001)
        assert words[offsets["Status"] // 4] == A.const("OVMF_MH_STATUS_SUCCESS")
        post(2, "SHUTDOWN")
        loop.join(10)
        assert not loop.is_alive()
        words.release()
    finally:
        server.release()
