"""ovmf-mh inspect: the built ovmf-mh image, Debian's stock OVMF, files that are
not firmware images, and hostile variations of real and synthetic images.

The built image is never built here: run `ovmf-mh build` first. Debian's stock
image comes from the `ovmf` package that stuart/bootstrap.sh installs.
"""

from __future__ import annotations

import json
import lzma
import random
import re
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helper import abi
from host_shim import cli, paths
from host_shim.errors import ImageFormatError
from host_shim.firmware.inspect_image import (
    FFS2_GUID,
    LZMA_SECTION_GUID,
    SEC_MAIN_FILE_GUID,
    ImageReport,
    inspect_bytes,
    inspect_image,
)

STOCK_IMAGE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
FW_CFG_NAME = "opt/ovmf-mh/request"


def build_logs() -> tuple[Path, Path]:
    """The active tree's build logs: ours (per target), then stuart's."""
    return (paths.build_log("DEBUG"), paths.tree_build_root() / "Build" / "BUILDLOG_OvmfMh.txt")


# --- inputs ------------------------------------------------------------------


def built_image() -> Path:
    path = paths.firmware_code("DEBUG")
    if not path.is_file():
        pytest.fail(
            f"built firmware {path} is missing: run `ovmf-mh build` (DEBUG) before these tests",
            pytrace=False,
        )
    return path


def stock_image() -> Path:
    if not STOCK_IMAGE.is_file():
        pytest.fail(
            f"Debian's stock OVMF {STOCK_IMAGE} is missing: run stuart/bootstrap.sh (it installs the `ovmf` package)",
            pytrace=False,
        )
    return STOCK_IMAGE


def logged_build_id() -> str:
    """The build id the DEBUG build logged: its own log first (per target), then
    stuart's BUILDLOG_OvmfMh.txt (whichever target ran last)."""
    for log in build_logs():
        if log.is_file():
            ids = re.findall(r"ovmf-mh helper build id ([0-9a-f]{32})", log.read_text())
            if ids:
                return str(ids[-1])
    pytest.fail(
        f"no 'ovmf-mh helper build id' line in {' or '.join(map(str, build_logs()))}: run `ovmf-mh build`",
        pytrace=False,
    )


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the built image -----------------------------------------------------------


def test_built_image_carries_the_helper() -> None:
    a = abi.load()
    report = inspect_image(built_image())
    assert report.sec is not None
    assert report.sec.file_guid == str(SEC_MAIN_FILE_GUID)
    assert report.sec.image_format == "PE32"
    assert report.sec.executes_in_place is True
    helper = report.helper
    assert helper is not None, "no OVMF_MH_IMAGE_INFO record in the built SEC module"
    assert helper.build_id == logged_build_id(), (
        "the image's build id differs from the build log's: is a build running, or is the "
        "image older than the log? run `ovmf-mh build`"
    )
    assert (helper.abi_major, helper.abi_minor) == (
        a.const("OVMF_MH_ABI_MAJOR"),
        a.const("OVMF_MH_ABI_MINOR"),
    )
    assert helper.abi_supported
    assert helper.fw_cfg_names == (FW_CFG_NAME,)
    assert helper.fw_cfg_names == (a.strings["OVMF_MH_REQUEST_FW_CFG_NAME"],)
    assert helper.info_size == a.layout("OVMF_MH_IMAGE_INFO").size
    # Which capabilities the image claims grows with the ABI; every bit must have
    # a name in the header, and QUERY and SHUTDOWN are there since ABI 1.0.
    caps = a.names_with_prefix("OVMF_MH_CAP_")
    assert helper.capabilities is not None
    assert helper.capability_names == tuple(caps[bit] for bit in sorted(caps) if helper.capabilities & bit)
    assert sum(bit for bit in caps if helper.capabilities & bit) == helper.capabilities
    assert {"QUERY", "SHUTDOWN"} <= set(helper.capability_names)
    assert helper.secret_page_base == a.const("OVMF_MH_SECRET_PAGE_BASE")
    assert helper.mailbox_min_base == a.const("OVMF_MH_MAILBOX_MIN_BASE")


def test_built_image_volumes() -> None:
    report = inspect_image(built_image())
    flash = [fv for fv in report.firmware_volumes if fv.in_flash]
    nested = [fv for fv in report.firmware_volumes if not fv.in_flash]
    # FVMAIN_COMPACT and SECFV in flash; PEIFV and DXEFV inside FVMAIN_COMPACT's LZMA section.
    assert len(flash) == 2
    assert flash[-1].offset + flash[-1].size == report.size
    assert len(nested) == 2
    for fv in nested:
        assert fv.parent == flash[0].index
        assert fv.encapsulation == "LZMA section > FV image section"
        assert fv.file_count and fv.file_count > 1
    assert report.sec is not None
    assert report.firmware_volumes[report.sec.volume] is flash[-1]


def test_combined_image_has_variable_store_and_helper() -> None:
    combined = built_image().with_name("OVMF.fd")
    if not combined.is_file():
        pytest.fail(f"{combined} is missing: run `ovmf-mh build`", pytrace=False)
    report = inspect_image(combined)
    assert report.firmware_volumes[0].file_system == "NV variable store"
    assert report.firmware_volumes[0].file_count is None
    assert report.helper is not None
    assert report.helper.build_id == inspect_image(built_image()).helper.build_id  # type: ignore[union-attr]


def test_cli_text_for_built_image(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, str(built_image()))
    assert code == 0, err
    assert "Migration helper: present" in out
    assert logged_build_id() in out
    assert FW_CFG_NAME in out
    assert "QUERY" in out and "SHUTDOWN" in out


def test_cli_json_for_built_image(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--json", str(built_image()))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "ovmf-mh-inspect/1"
    assert doc["helper_present"] is True
    assert doc["sec_found"] is True
    assert doc["helper"]["build_id"] == logged_build_id()
    assert doc["helper"]["fw_cfg_names"] == [FW_CFG_NAME]
    assert {"QUERY", "SHUTDOWN"} <= set(doc["helper"]["capability_names"])
    assert doc["helper"]["abi_major"] == abi.load().const("OVMF_MH_ABI_MAJOR")
    assert len(doc["firmware_volumes"]) == 4


# --- Debian's stock image --------------------------------------------------------


def test_stock_image_has_no_helper() -> None:
    report = inspect_image(stock_image())
    assert report.sec_found
    assert report.sec is not None and report.sec.is_ovmf_sec_main
    assert not report.helper_present
    assert report.helper is None


def test_cli_stock_image(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, str(stock_image()))
    assert code == 0, err
    assert "Migration helper: absent" in out
    code, out, err = run_cli(capsys, "--json", str(stock_image()))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["helper_present"] is False
    assert doc["helper"] is None
    assert doc["sec_found"] is True


# --- not firmware images -----------------------------------------------------------


def expect_format_error(capsys: pytest.CaptureFixture[str], path: Path, *fragments: str) -> str:
    with pytest.raises(ImageFormatError) as info:
        inspect_image(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    for argv in ((str(path),), ("--json", str(path))):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2
        assert out == ""
        assert err.startswith("ovmf-mh inspect: error: ")
        assert message in err
    return message


def test_random_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(1).randbytes(512 * 1024))
    expect_format_error(capsys, path, "not a firmware image", "_FVH")


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.fd"
    path.write_bytes(b"")
    expect_format_error(capsys, path, "empty")


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_format_error(capsys, tmp_path / "nope.fd", "no such file")


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_format_error(capsys, tmp_path, "directory")


def test_truncated_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "truncated.fd"
    path.write_bytes(built_image().read_bytes()[: 100 * 1024])
    expect_format_error(capsys, path, "truncated")


def _record_signature() -> bytes:
    """The 16 signature bytes that open OVMF_MH_IMAGE_INFO, from the header."""
    a = abi.load()
    layout = a.layout("OVMF_MH_IMAGE_INFO")
    return layout.pack(
        SignatureLow=a.const("OVMF_MH_IMAGE_INFO_SIGNATURE_LOW"),
        SignatureHigh=a.const("OVMF_MH_IMAGE_INFO_SIGNATURE_HIGH"),
    )[: layout.offset("InfoSize")]


def _fv_checksum_fixed(data: bytearray, start: int) -> None:
    (header_length,) = struct.unpack_from("<H", data, start + 48)
    struct.pack_into("<H", data, start + 50, 0)
    total = sum(struct.unpack_from(f"<{header_length // 2}H", data, start))
    struct.pack_into("<H", data, start + 50, (-total) & 0xFFFF)


def _secfv_offset(data: bytes | bytearray) -> int:
    report = inspect_bytes(bytes(data))
    assert report.sec is not None
    return report.firmware_volumes[report.sec.volume].offset


@pytest.mark.parametrize(
    ("new_length", "fix_checksum", "fragment"),
    [
        (0x10_0000, False, "FvLength"),  # runs past the end of the file
        (0x1000, False, "checksum"),  # fits, but the header checksum gives it away
        (0x10_0000, True, "FvLength"),  # consistent header, runs past the end
        (0x1000, True, "does not fit"),  # consistent header, cuts its files off
        (0, True, "header length"),
    ],
)
def test_corrupted_fv_length(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    new_length: int,
    fix_checksum: bool,
    fragment: str,
) -> None:
    data = bytearray(built_image().read_bytes())
    start = _secfv_offset(data)
    struct.pack_into("<Q", data, start + 32, new_length)
    if fix_checksum:
        _fv_checksum_fixed(data, start)
    path = tmp_path / "corrupt.fd"
    path.write_bytes(bytes(data))
    expect_format_error(capsys, path, fragment)


def test_corrupted_build_id_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = abi.load().layout("OVMF_MH_IMAGE_INFO")
    data = bytearray(built_image().read_bytes())
    record = data.find(_record_signature())
    assert record > 0
    struct.pack_into("<Q", data, record + layout.offset("BuildIdAddress"), 0x1234)
    path = tmp_path / "bad-record.fd"
    path.write_bytes(bytes(data))
    expect_format_error(capsys, path, "BuildIdAddress")


def test_unknown_abi_major_is_reported_not_decoded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = abi.load()
    layout = a.layout("OVMF_MH_IMAGE_INFO")
    data = bytearray(built_image().read_bytes())
    record = data.find(_record_signature())
    struct.pack_into("<H", data, record + layout.offset("AbiMajor"), 99)
    path = tmp_path / "future.fd"
    path.write_bytes(bytes(data))
    report = inspect_image(path)
    assert report.helper is not None
    assert report.helper.abi_major == 99
    assert not report.helper.abi_supported
    assert report.helper.build_id is None
    assert any("not readable" in note for note in report.notes)
    code, out, _ = run_cli(capsys, str(path))
    assert code == 0
    assert "Migration helper: present" in out and "not readable by this tool" in out


# --- synthetic images: nesting and hostile structure --------------------------------

FFS_GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")


def _section(kind: int, body: bytes) -> bytes:
    size = 4 + len(body)
    return struct.pack("<I", size | kind << 24) + body


def _sections(*items: bytes) -> bytes:
    out = b""
    for item in items:
        out += b"\0" * (-len(out) % 4) + item
    return out


def _lzma_section(inner: bytes) -> bytes:
    compressed = lzma.compress(inner, format=lzma.FORMAT_ALONE)
    # EDK2 writes the real size where xz's "alone" encoder writes "unknown".
    compressed = compressed[:5] + struct.pack("<Q", len(inner)) + compressed[13:]
    header = LZMA_SECTION_GUID.bytes_le + struct.pack("<HH", 4 + 20, 0x01)
    return _section(0x02, header + compressed)


def _ffs(file_type: int, body: bytes, guid: uuid.UUID = FFS_GUID) -> bytes:
    size = 24 + len(body)
    state = 0xF8  # EFI_FILE_DATA_VALID with erase polarity 1
    header = guid.bytes_le + struct.pack("<HBB", 0, file_type, 0) + size.to_bytes(3, "little")
    return header + bytes([state]) + body


def _fv(*files: bytes, length: int | None = None) -> bytes:
    body = b""
    for f in files:
        body += b"\xff" * (-len(body) % 8) + f
    header_length = 72
    total = length or header_length + len(body) + (-len(body) % 8)
    header = bytearray(
        b"\0" * 16
        + FFS2_GUID.bytes_le
        + struct.pack("<Q4sIHHHBB", total, b"_FVH", 0x4FEFF, header_length, 0, 0, 0, 2)
        + struct.pack("<IIII", total // 0x1000 or 1, 0x1000, 0, 0)
    )
    _fv_checksum_fixed(header, 0)
    out = bytes(header) + body
    return out + b"\xff" * (total - len(out))


def _synthetic_image() -> bytes:
    inner_fv = _fv(_ffs(0x07, _sections(_section(0x19, b"raw data"))))
    outer = _fv(
        _ffs(0x0B, _sections(_lzma_section(_sections(_section(0x17, inner_fv))))),
        _ffs(0x03, _sections(_section(0x10, b"MZ not really a PE"))),
        length=0x2000,
    )
    return outer


def test_synthetic_nested_lzma_volume() -> None:
    image = _synthetic_image()
    # The bogus PE32 of the SEC file is a format error, reported as such.
    with pytest.raises(ImageFormatError, match="PE32 image is malformed"):
        inspect_bytes(image)
    without_sec = _fv(
        _ffs(0x0B, _sections(_lzma_section(_sections(_section(0x17, _fv(_ffs(0x07, b""))))))),
        length=0x1000,
    )
    report = inspect_bytes(without_sec)
    assert [fv.encapsulation for fv in report.firmware_volumes] == [
        "flash",
        "LZMA section > FV image section",
    ]
    assert report.firmware_volumes[1].parent == 0
    assert report.firmware_volumes[1].file_count == 1
    assert not report.sec_found and not report.helper_present


def test_deeply_nested_sections_are_refused() -> None:
    body = _section(0x19, b"x")
    for _ in range(40):
        header = uuid.UUID(int=7).bytes_le + struct.pack("<HH", 4 + 20, 0)  # no processing
        body = _section(0x02, header + body)
    with pytest.raises(ImageFormatError, match="nested"):
        inspect_bytes(_fv(_ffs(0x07, body), length=0x1000))


def test_lzma_size_bomb_is_refused() -> None:
    section = bytearray(_lzma_section(b"\0" * 64))
    struct.pack_into("<Q", section, 4 + 20 + 5, 1 << 40)
    image = _fv(_ffs(0x0B, bytes(section)), length=0x1000)
    with pytest.raises(ImageFormatError, match="LZMA"):
        inspect_bytes(image)


def _check_hostile(data: bytes) -> None:
    try:
        report = inspect_bytes(data)
    except ImageFormatError as exc:
        assert str(exc)
    else:
        assert isinstance(report, ImageReport)
        json.dumps(report.to_json())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_synthetic_images(data: st.DataObject) -> None:
    image = bytearray(_synthetic_image())
    for _ in range(data.draw(st.integers(1, 8))):
        offset = data.draw(st.integers(0, 0x200))
        image[offset] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(image)))
    _check_hostile(bytes(image[:cut]))


@pytest.fixture(scope="module")
def sec_volume() -> bytes:
    data = built_image().read_bytes()
    start = _secfv_offset(data)
    return data[start:]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_sec_volume(sec_volume: bytes, data: st.DataObject) -> None:
    """Flip bytes in the headers of the real SECFV, its SEC file, the SEC PE32
    headers and the helper record; truncate anywhere."""
    image = bytearray(sec_volume)
    layout = abi.load().layout("OVMF_MH_IMAGE_INFO")
    record = image.find(_record_signature())
    assert record > 0
    regions = st.one_of(st.integers(0, 0x400), st.integers(record, record + layout.size - 1))
    for _ in range(data.draw(st.integers(1, 6))):
        image[data.draw(regions)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        image = image[: data.draw(st.integers(1, len(image)))]
    _check_hostile(bytes(image))
