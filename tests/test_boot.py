"""Boot tests under QEMU TCG against the image `ovmf-mh build` produced."""

from __future__ import annotations

import hashlib
import mmap
import struct
import time
from pathlib import Path

import pytest

from helper import abi
from host_shim.firmware.boot import DIVERSION_MARKER, PEI_MARKERS, BootMode, boot_image
from host_shim.helpers.helper_vm import MIB, HelperSpec, HelperVM
from host_shim.helpers.mailbox import state_name, status_name
from host_shim.helpers.request import work_area_size

pytestmark = pytest.mark.qemu

A = abi.load()
MIN_BASE = A.const("OVMF_MH_MAILBOX_MIN_BASE")
GIB = 1024 * MIB
READY_BOUND_S = 10.0
#: Seconds for one command on a loaded machine (a NOP takes well under 1 ms under TCG).
COMMAND_BOUND_S = 30.0
#: How long a refused request's helper is watched for a mailbox write after it logged the refusal.
NO_WRITE_WATCH_S = 1.0


def test_normal_boot_reaches_guest_userspace(firmware: Path, work_dir: Path) -> None:
    outcome = boot_image(firmware, BootMode.NORMAL, work_dir, timeout=120)
    assert outcome.ok, "\n".join(outcome.describe())
    debugcon = outcome.logs.debugcon.read_text()
    assert DIVERSION_MARKER not in debugcon
    assert "Loading PEIM" in debugcon, "a normal boot goes through PEI"


def test_helper_mode_ready_without_pei_and_orderly_shutdown(firmware: Path, work_dir: Path) -> None:
    with HelperVM(HelperSpec(firmware), work_dir) as helper:
        header = helper.wait_ready(READY_BOUND_S)
        assert header["State"] == A.const("OVMF_MH_STATE_READY")
        assert header["HeaderSize"] == A.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        assert header["Capabilities"] & A.const("OVMF_MH_CAP_SHUTDOWN")
        assert bytes(header["BuildId"]) != bytes(16)
        assert helper.mailbox is not None
        query = helper.mailbox.call("QUERY")
        assert query.results[0] == (A.const("OVMF_MH_ABI_MAJOR") << 16) | A.const("OVMF_MH_ABI_MINOR")
        nop = helper.mailbox.post_and_wait("NOP", (), timeout=COMMAND_BOUND_S)
        assert nop.status == A.const("OVMF_MH_STATUS_SUCCESS")
        exit_code = helper.shutdown(timeout=30)
        assert exit_code == 0
        assert helper.mailbox.header()["State"] == A.const("OVMF_MH_STATE_SHUTDOWN")
        debugcon = helper.vm.debugcon_text()
    assert DIVERSION_MARKER in debugcon
    assert "shutdown requested" in debugcon
    assert not [m for m in PEI_MARKERS if m in debugcon], debugcon


def test_unknown_command_gets_error_status(firmware: Path, work_dir: Path) -> None:
    with HelperVM(HelperSpec(firmware), work_dir) as helper:
        helper.wait_ready(READY_BOUND_S)
        assert helper.mailbox is not None
        # A raw command code the ABI does not define, bypassing name lookup. The
        # client writes Command and Arg[], then CommandSeq with one aligned 32-bit
        # store (docs/mailbox.md), and waits against a monotonic deadline.
        failed_before = helper.mailbox.header()["CommandsFailed"]
        response = helper.mailbox.post_and_wait(0xDEAD, (), timeout=COMMAND_BOUND_S)
        assert status_name(response.status) == "UNSUPPORTED"
        header = helper.mailbox.header()
        assert header["ResponseSeq"] == header["CommandSeq"] == 1
        assert header["CommandsFailed"] == failed_before + 1
        assert header["State"] == A.const("OVMF_MH_STATE_READY")
        # ...and the helper still serves known commands afterwards.
        assert status_name(helper.mailbox.post_and_wait("NOP", (), timeout=COMMAND_BOUND_S).status) == "SUCCESS"


WORK_BASE = MIN_BASE + 16 * MIB
WORK_SIZE = work_area_size(64 * MIB)


def _blob(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "Signature": A.const("OVMF_MH_REQUEST_SIGNATURE"),
        "Version": A.const("OVMF_MH_REQUEST_VERSION"),
        "Size": A.layout("OVMF_MH_REQUEST").size,
        "MailboxBase": MIN_BASE,
        "MailboxSize": 16 * MIB,
        "WorkAreaBase": WORK_BASE,
        "WorkAreaSize": WORK_SIZE,
    }
    fields.update(overrides)
    if "WindowBase" in overrides and "WindowRangeCount" not in overrides:
        fields["WindowRangeCount"] = len(overrides["WindowBase"])  # type: ignore[arg-type]
    return A.layout("OVMF_MH_REQUEST").pack(**fields)


GOOD = _blob()
VERSION_1 = struct.pack("<IHHIIQQQQ", A.const("OVMF_MH_REQUEST_SIGNATURE"), 1, 48, 0, 0, MIN_BASE, 16 * MIB,
                        64 * MIB, 32 * MIB)
#: Window range 0 ends 4 KiB short of 2 GiB, so range 1 (at 4 GiB) is not
#: 2 MiB-congruent with its place in the window: 5 GiB of 4 KiB pages need
#: 2,560 page tables, more than the budget.
INCONGRUENT = _blob(WindowBase=[64 * MIB + 4096, 4 * GIB], WindowSize=[2 * GIB - 64 * MIB - 8192, 5 * GIB],
                    WorkAreaSize=work_area_size(8 * GIB))
# (id, blob, expected reason, whether the mailbox was usable, own RAM MiB, guest MiB)
BAD_REQUESTS = [
    ("short-blob", GOOD[:-1], "REQUEST_SIZE", False, 64, 0),
    ("long-blob", GOOD + b"\0", "REQUEST_SIZE", False, 64, 0),
    ("size-field", _blob(Size=48), "REQUEST_SIZE", False, 64, 0),
    ("signature", _blob(Signature=0x12345678), "REQUEST_SIGNATURE", False, 64, 0),
    ("version-1-request", VERSION_1, "REQUEST_VERSION", False, 64, 32),
    ("version", _blob(Version=3), "REQUEST_VERSION", False, 64, 0),
    ("flags", _blob(Flags=2), "REQUEST_FLAGS", False, 64, 0),
    ("flags-high-bit", _blob(Flags=0x80000000), "REQUEST_FLAGS", False, 64, 0),
    ("too-many-ranges", _blob(WindowRangeCount=9), "WINDOW_RANGES", False, 64, 0),
    ("unused-range-not-zero", _blob(WindowRangeCount=0, WindowSize=[0, 4096]), "WINDOW_RANGES", False, 64, 0),
    ("mailbox-misaligned", _blob(MailboxBase=MIN_BASE + 0x800), "MAILBOX_ALIGNMENT", False, 64, 0),
    ("mailbox-too-small", _blob(MailboxSize=0x1000), "MAILBOX_SIZE", False, 64, 0),
    # One page over OVMF_MH_MAILBOX_MAX_SIZE, in RAM (160 MiB), the work area after it: only the size is wrong.
    ("mailbox-one-page-too-large", _blob(MailboxSize=A.const("OVMF_MH_MAILBOX_MAX_SIZE") + 4096,
                                         WorkAreaBase=MIN_BASE + 80 * MIB), "MAILBOX_SIZE", False, 160, 0),
    ("mailbox-over-sec-memory", _blob(MailboxBase=0x800000, MailboxSize=0x10000), "MAILBOX_RESERVED", False, 64,
     0),
    ("mailbox-past-ram", _blob(MailboxBase=56 * MIB, MailboxSize=16 * MIB), "MAILBOX_NOT_RAM", False, 64, 0),
    ("mailbox-wraps", _blob(MailboxBase=0xFFFFFFFFFFFFF000, MailboxSize=0x2000), "MAILBOX_NOT_RAM", False, 64, 0),
    ("helper-ram-too-small", GOOD, "HELPER_RAM", False, 16, 0),
    ("work-area-over-mailbox", _blob(WorkAreaBase=MIN_BASE + 8 * MIB), "WORK_AREA_INVALID", True, 64, 0),
    ("work-area-past-ram", _blob(WorkAreaBase=63 * MIB), "WORK_AREA_NOT_RAM", True, 64, 0),
    ("window-misaligned", _blob(WindowBase=[64 * MIB + 8], WindowSize=[32 * MIB]), "WINDOW_ALIGNMENT", True, 64,
     32),
    ("window-over-mailbox", _blob(WindowBase=[MIN_BASE], WindowSize=[32 * MIB]), "WINDOW_OVERLAP", True, 64, 32),
    ("window-over-work-area", _blob(WindowBase=[WORK_BASE], WindowSize=[4096]), "WINDOW_OVERLAP", True, 64, 32),
    ("window-ranges-overlap", _blob(WindowBase=[64 * MIB, 72 * MIB], WindowSize=[16 * MIB, 8 * MIB]),
     "WINDOW_OVERLAP", True, 64, 32),
    ("window-past-ram", _blob(WindowBase=[64 * MIB], WindowSize=[64 * MIB]), "WINDOW_NOT_RAM", True, 64, 32),
    ("work-area-too-small", _blob(WindowBase=[64 * MIB], WindowSize=[32 * MIB], WorkAreaSize=MIB),
     "WORK_AREA_TOO_SMALL", True, 64, 32),
    ("page-tables-over-budget", INCONGRUENT, "PAGE_TABLES_TOO_LARGE", True, 64, 8 * 1024),
]


def _assert_no_mailbox_written(memory: mmap.mmap, blob: bytes) -> None:
    """No mailbox header appears in the helper's RAM, watched for a while after
    the rejection was logged (a helper publishes right after logging): not at
    the refused address the request named, where that lies in RAM, nor
    anywhere else (e.g. below it, by a helper computing addresses mod 2^64)."""
    signature = A.const("OVMF_MH_MAILBOX_SIGNATURE").to_bytes(8, "little")
    named = None
    if len(blob) == A.layout("OVMF_MH_REQUEST").size or len(blob) == len(VERSION_1):
        named = struct.unpack_from("<Q", blob, A.layout("OVMF_MH_REQUEST").offset("MailboxBase"))[0]
    deadline = time.monotonic() + NO_WRITE_WATCH_S
    while True:
        if named is not None and named < len(memory):
            assert memory[named : named + 8] != signature, f"mailbox written at the refused address {named:#x}"
        found = memory.find(signature)
        assert found < 0, f"a mailbox signature at {found:#x} of the helper's RAM"
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("blob", "reason", "mailbox_usable", "own_mib", "guest_mib"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_malformed_request_is_refused(
    firmware: Path,
    work_dir: Path,
    blob: bytes,
    reason: str,
    mailbox_usable: bool,
    own_mib: int,
    guest_mib: int,
) -> None:
    guest_ram = None
    before = None
    if guest_mib:
        guest_ram = work_dir / "guest.ram"
        if guest_mib <= 64:
            guest_ram.write_bytes(bytes(range(256)) * (guest_mib * MIB // 256))
            before = hashlib.sha256(guest_ram.read_bytes()).hexdigest()
        else:  # sparse: nothing may allocate a block of it
            with guest_ram.open("wb") as handle:
                handle.truncate(guest_mib * MIB)
    spec = HelperSpec(firmware, own_ram=own_mib * MIB, guest_ram=guest_ram, request_override=blob)
    with HelperVM(spec, work_dir) as helper:
        # The rejection line ends with "halting": wait for all of it, not its start.
        seconds = helper.vm.wait_for_log(helper.vm.logs.debugcon, "; halting", timeout=15)
        assert seconds is not None, "no rejection logged"
        debugcon = helper.vm.debugcon_text()
        assert f"request rejected: {reason}" in debugcon
        # The helper halts: QEMU stays up, never reaches PEI nor boots anything.
        assert helper.vm.is_running()
        assert not [m for m in PEI_MARKERS if m in debugcon]
        if mailbox_usable:
            assert helper.mailbox is not None
            # The helper logs first, then publishes the halt in the mailbox.
            header = helper.mailbox.wait_published(timeout=10)
            assert state_name(header["State"]) == "HALTED"
            assert status_name(header["HaltReason"]) == reason
        else:
            # The requested mailbox was not usable: the helper wrote no
            # mailbox, neither where the request named it nor anywhere else.
            _assert_no_mailbox_written(helper.memory, blob)
        assert helper.vm.serial_text() == ""
    if before is not None:
        assert guest_ram is not None and hashlib.sha256(guest_ram.read_bytes()).hexdigest() == before, (
            "guest RAM changed")
    elif guest_ram is not None:
        assert guest_ram.stat().st_blocks == 0, "a block of the sparse guest RAM was written"


def test_launch_secret_is_loaded_and_wiped(firmware: Path, work_dir: Path) -> None:
    key = bytes(range(32))
    base = A.const("OVMF_MH_SECRET_PAGE_BASE")
    with HelperVM(HelperSpec(firmware, key=key), work_dir) as helper:
        # The host injected the record before QEMU started...
        header = helper.wait_ready(READY_BOUND_S)
        assert header["Capabilities"] & A.const("OVMF_MH_CAP_KEY_LOADED")
        # ...and the helper has zeroed the whole page by the time it is READY.
        assert bytes(helper.memory[base : base + A.const("OVMF_MH_PAGE_SIZE")]) == bytes(4096)
        assert key.hex() not in helper.vm.debugcon_text().lower()
        helper.shutdown(timeout=30)


def test_without_launch_secret_the_helper_has_no_key(firmware: Path, work_dir: Path) -> None:
    with HelperVM(HelperSpec(firmware), work_dir) as helper:
        header = helper.wait_ready(READY_BOUND_S)
        assert not header["Capabilities"] & A.const("OVMF_MH_CAP_KEY_LOADED")
        assert helper.mailbox is not None
        response = helper.mailbox.post_and_wait("EXPORT_BEGIN", (0, 4096))
        assert status_name(response.status) == "NO_KEY"
        assert "transport key absent" in helper.vm.debugcon_text()
