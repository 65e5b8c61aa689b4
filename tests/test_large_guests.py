"""Guests larger than the helper VM's RAM below 4 GiB, through firmware
helpers: the helper VM's RAM splits at 2 GiB (q35, ``max-ram-below-4g=2G``),
so the guest window is two ranges, the second above 4 GiB, mapped by the
helper's own page tables as one span (docs/fw-cfg-request.md).

The RAM files are sparse: markers are written at the pages that matter
(the last page below the split, the first above it, the last page of the
guest, scattered pages on both sides) and nothing else of the project
touches the rest except through the helpers. Export and import go through
the ``ovmf-mh`` command line and the result is compared byte for byte."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from helper import abi
from host_shim.cli import main
from host_shim.helpers.helper_vm import DEFAULT_MAILBOX_SIZE, HelperSpec, HelperVM
from host_shim.helpers.mailbox import state_name
from host_shim.helpers.request import HELPER_RAM_BELOW_4G, window_ranges
from host_shim.migration.migrate import MigrationConfig, migrate

pytestmark = pytest.mark.qemu

A = abi.load()
PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
#: Bytes compared per read when two sparse files are compared.
CHUNK = 64 * MIB


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def _markers(size: int, own: int, rng: random.Random, count: int) -> dict[int, bytes]:
    """Page offset -> content: both sides of the helper VM's 2 GiB split,
    the guest's first and last page, and ``count`` pages at random."""
    split = HELPER_RAM_BELOW_4G - own  # guest offset of the first page above 4 GiB in the helper VM
    offsets = {0, split - PAGE, split, split + PAGE, size - PAGE}
    offsets |= {rng.randrange(size // PAGE) * PAGE for _ in range(count)}
    return {offset: rng.randbytes(PAGE) for offset in sorted(offsets)}


def _write_markers(path: Path, markers: dict[int, bytes]) -> None:
    with path.open("r+b") as handle:
        for offset, content in markers.items():
            handle.seek(offset)
            handle.write(content)


def _same_sparse_files(a: Path, b: Path) -> bool:
    """Byte for byte, reading only where either file has data (holes read as zero)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    spans: list[tuple[int, int]] = []
    for path in (a, b):
        with path.open("rb") as handle:
            fd, offset, end = handle.fileno(), 0, path.stat().st_size
            while offset < end:
                try:
                    start = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:
                    break
                stop = os.lseek(fd, start, os.SEEK_HOLE)
                spans.append((start, stop))
                offset = stop
    with a.open("rb") as fa, b.open("rb") as fb:
        for start, stop in spans:
            for position in range(start, stop, CHUNK):
                length = min(CHUNK, stop - position)
                fa.seek(position)
                fb.seek(position)
                if fa.read(length) != fb.read(length):
                    return False
    return True


def test_helper_vm_of_a_16g_guest_maps_it_above_4g(firmware: Path, work_dir: Path) -> None:
    """READY with a two-range window of 16 GiB: the request the host shim
    builds, the work area it sizes, the page tables the helper logs."""
    guest = _sparse(work_dir / "guest.ram", 16 * GIB)
    spec = HelperSpec(firmware, guest_ram=guest)
    request = spec.request()
    assert [base for base, _ in request.window] == [spec.own_ram_size, 4 * GIB]
    assert request.window_size == 16 * GIB
    assert spec.work_area_size >= A.const("OVMF_MH_WORK_AREA_BASE_SIZE") + 16 * GIB // PAGE * 8
    assert spec.work_area_base == spec.mailbox_base + DEFAULT_MAILBOX_SIZE
    with HelperVM(spec, work_dir) as helper:
        header = helper.wait_ready(60)
        assert state_name(header["State"]) == "READY"
        assert header["GuestWindowSize"] == 16 * GIB
        debugcon = helper.vm.debugcon_text()
        assert "own page tables loaded" in debugcon, debugcon[-2000:]
        helper.shutdown(timeout=60)
    assert guest.stat().st_blocks == 0, "starting a helper wrote guest memory"


@pytest.mark.parametrize(("guest_gib", "helpers", "count"), [(4, 2, 200), (16, 2, 200)])
def test_export_import_of_a_large_guest_is_byte_identical(
    firmware: Path, work_dir: Path, guest_gib: int, helpers: int, count: int
) -> None:
    """A page map picks the marker pages and a 32 MiB stretch on each side of
    the split (the rest is excluded, so a 16 GiB guest takes minutes, not an
    hour, under TCG); every picked page goes through the helpers' window, the
    ones above the split through its second range, above 4 GiB."""
    size = guest_gib * GIB
    own = HelperSpec(firmware, guest_ram=_sparse(work_dir / "probe.ram", size)).own_ram_size
    assert window_ranges(own, size, own + size)[1][0] == 4 * GIB
    rng = random.Random(14 + guest_gib)
    markers = _markers(size, own, rng, count)
    src = _sparse(work_dir / "src.ram", size)
    _write_markers(src, markers)
    split = HELPER_RAM_BELOW_4G - own
    page_map = bytearray(b"\x02" * (size // PAGE))
    for offset in markers:
        page_map[offset // PAGE] = 0
    stretch = 32 * MIB // PAGE
    page_map[split // PAGE - stretch : split // PAGE + stretch] = bytes(2 * stretch)
    (work_dir / "map.bin").write_bytes(page_map)
    key = work_dir / "transport.key"
    assert main(["keygen", "--out", str(key)]) == 0
    stream = work_dir / "stream.omh"
    assert main(["export", "--ram", str(src), "--key", str(key), "--out", str(stream), "--helper", "firmware",
                 "--helpers", str(helpers), "--page-map", str(work_dir / "map.bin"),
                 "--work-dir", str(work_dir / "export")]) == 0
    dst = work_dir / "dst.ram"
    assert main(["import", "--ram", str(dst), "--key", str(key), "--in", str(stream), "--helper", "firmware",
                 "--work-dir", str(work_dir / "import")]) == 0
    assert dst.stat().st_size == size
    with dst.open("rb") as handle:
        for offset, content in markers.items():
            handle.seek(offset)
            assert handle.read(PAGE) == content, f"page at guest offset {offset:#x}"
    assert _same_sparse_files(src, dst)


#: Set to 1 to run the 16 GiB live migration (minutes, and up to 32 GiB of
#: page cache for the two sparse RAM files: not for CI; docs/testing.md).
LARGE_ENV = "OVMF_MH_LARGE_MIGRATION"


@pytest.mark.firmware
@pytest.mark.parametrize("guest_mib", [
    4096,
    pytest.param(16384, marks=[pytest.mark.manual, pytest.mark.skipif(
        os.environ.get(LARGE_ENV) != "1", reason=f"16 GiB live migration: manual ({LARGE_ENV}=1, docs/testing.md)")]),
])
def test_a_running_large_guest_migrates_with_identical_ram(firmware: Path, work_dir: Path, guest_mib: int) -> None:
    """`ovmf-mh migrate` of a running test guest whose RAM, in the helper
    VMs, runs above 4 GiB: most of it never written, so pass 1 is mostly
    zero ranges, which kept each side busy past the other's idle timeout
    (the source's helper checking them while the stream stayed in its
    buffer, then the target zeroing them while the source's write
    blocked) until the stream said it was alive (test_stream_liveness.py)."""
    report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, guest_mib=guest_mib,
                                     progress=False))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert report.ram_identical is True
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
    pages = guest_mib * MIB // PAGE
    assert report.passes[0].pages == pages
    # Never-written memory went as zero ranges, the source helper checked.
    assert report.passes[0].zero_range_pages > pages // 2, "\n".join(report.describe())
    assert not report.passes[-1].guest_running and 0 < report.downtime_seconds < report.total_seconds
    assert "CORRUPTION" not in (work_dir / "target" / "serial.log").read_text(errors="replace")
    for ram in work_dir.glob("*.ram"):
        ram.unlink()  # sparse, but the page cache they hold goes with them
