"""ovmf-mh measure: the launch digests of the built image and of Debian's
stock OVMF against an independent computation (tests/launch_reference.py,
written from the AMD specs, not from sev-snp-measure), and clear errors for
files that are not firmware images or lack the SEV metadata a mode needs.

The built image is never built here: run `ovmf-mh build` first. Debian's
stock images come from the `ovmf` package that stuart/bootstrap.sh installs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import launch_reference as ref
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sevsnpmeasure import vcpu_types

from host_shim import cli, paths
from host_shim.errors import SevMetadataError
from host_shim.firmware.inspect_image import inspect_image
from host_shim.firmware.measure import Mode
from host_shim.firmware.sev_metadata import read_sev_launch_info

#: Debian's 2 MiB OVMF carries the SNP metadata; the 4 MiB build does not.
STOCK_SNP = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")


def _need(path: Path, how: str) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: {how}", pytrace=False)
    return path


def built_image() -> Path:
    return _need(paths.firmware_code("DEBUG"), "run `ovmf-mh build` (DEBUG) before these tests")


def stock(path: Path) -> Path:
    return _need(path, "run stuart/bootstrap.sh (it installs the `ovmf` package)")


def run_measure(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["measure", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected(image: bytes, mode: Mode, vcpus: int, vcpu_type: str) -> str:
    sig = vcpu_types.CPU_SIGS[vcpu_type]
    if mode is Mode.SEV:
        return ref.sev_digest(image).hex()
    if mode is Mode.SEV_ES:
        return ref.seves_digest(image, vcpus, sig).hex()
    return ref.snp_digest(image, vcpus, sig, 0x1).hex()


def stock_snp_image() -> Path:
    return stock(STOCK_SNP)


IMAGES = {"built": built_image, "stock": stock_snp_image}


@pytest.mark.parametrize("which", sorted(IMAGES))
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
@pytest.mark.parametrize(("vcpus", "vcpu_type"), [(1, "EPYC-v4"), (4, "EPYC-Milan")])
def test_digest_matches_independent_computation(
    capsys: pytest.CaptureFixture[str], which: str, mode: Mode, vcpus: int, vcpu_type: str
) -> None:
    image = IMAGES[which]()
    argv = [str(image), "--mode", mode.value, "--vcpus", str(vcpus), "--vcpu-type", vcpu_type, "--json"]
    code, out, err = run_measure(capsys, *argv)
    assert code == 0, err
    result = json.loads(out)
    want = expected(image.read_bytes(), mode, vcpus, vcpu_type)
    assert result["digest"] == want
    assert len(bytes.fromhex(result["digest"])) == (48 if mode is Mode.SNP else 32)
    assert result["algorithm"] == mode.algorithm
    # The text form prints the same digest.
    code, text, _ = run_measure(capsys, *argv[:-1])
    assert code == 0
    assert text.splitlines()[-1] == f"Digest ({mode.algorithm}): {want}"


def test_digests_tell_inputs_apart() -> None:
    """Every input the digest claims to depend on changes it: image, mode,
    vCPU count, vCPU type (so no mode silently ignores one)."""
    built, stock_image = built_image().read_bytes(), stock(STOCK_SNP).read_bytes()
    digests = {
        (name, mode, vcpus, vcpu_type): expected(data, mode, vcpus, vcpu_type)
        for name, data in (("built", built), ("stock", stock_image))
        for mode in Mode
        for vcpus in (1, 2)
        for vcpu_type in ("EPYC-v4", "EPYC-Milan")
    }
    # SEV hashes the image only, so vCPUs do not matter there; everywhere else they do.
    distinct = {(k[0], k[1]) if k[1] is Mode.SEV else k for k in digests}
    assert len(set(digests.values())) == len(distinct)


def test_stock_4m_image_has_no_snp_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    image = stock(STOCK_4M)
    for mode in (Mode.SEV, Mode.SEV_ES):
        code, out, err = run_measure(capsys, str(image), "--mode", mode.value, "--json")
        assert code == 0, err
        assert json.loads(out)["digest"] == expected(image.read_bytes(), mode, 1, "EPYC-v4")
    code, out, err = run_measure(capsys, str(image), "--mode", "snp")
    assert code == 2
    assert out == ""
    assert "no OVMF SEV metadata (SNP sections)" in err and str(image) in err


def test_not_a_firmware_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "kernel.bin"
    bogus.write_bytes(bytes(range(256)) * 64)
    for mode in Mode:
        code, out, err = run_measure(capsys, str(bogus), "--mode", mode.value)
        assert (code, out) == (2, "")
        assert "not a firmware image" in err and str(bogus) in err
    code, out, err = run_measure(capsys, str(tmp_path / "missing.fd"), "--mode", "sev")
    assert (code, out) == (2, "")
    assert "no such file" in err


def test_firmware_image_without_sev_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    """The variable store is a firmware volume but carries no OVMF table."""
    vars_image = stock(STOCK_VARS)
    for mode in Mode:
        code, out, err = run_measure(capsys, str(vars_image), "--mode", mode.value)
        assert (code, out) == (2, "")
        assert "carries no SEV metadata" in err


def test_image_with_the_table_cut_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The built image with its reset-vector table footer zeroed: still a
    firmware image, no longer one with SEV metadata."""
    data = bytearray(built_image().read_bytes())
    data[-32 - 18 : -32] = bytes(18)
    broken = tmp_path / "OVMF_CODE.fd"
    broken.write_bytes(bytes(data))
    code, out, err = run_measure(capsys, str(broken), "--mode", "sev")
    assert (code, out) == (2, "")
    assert "carries no SEV metadata" in err


def test_kernel_needs_a_hashes_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fkernel" * 100)
    for image in (built_image(), stock(STOCK_SNP)):
        for mode in Mode:
            code, out, err = run_measure(capsys, str(image), "--mode", mode.value, "--kernel", str(kernel))
            assert (code, out) == (2, "")
            assert "no kernel-hashes page" in err
    code, _, err = run_measure(capsys, str(built_image()), "--mode", "sev", "--initrd", str(kernel))
    assert code == 2 and "give --kernel too" in err
    code, _, err = run_measure(capsys, str(built_image()), "--mode", "snp", "--vcpus", "0")
    assert code == 2 and "--vcpus must be at least 1" in err


def test_inspect_lists_what_the_measurement_depends_on(capsys: pytest.CaptureFixture[str]) -> None:
    image = built_image()
    report = inspect_image(image)
    info = report.sev_launch
    assert info is not None and info == read_sev_launch_info(image.read_bytes())
    # OvmfPkgX64: SEV-ES reset block and SNP sections, but no kernel hashes
    # and no LAUNCH_SECRET page (those are OvmfPkg/AmdSev's).
    assert info.sev_es_ap_reset_ip is not None
    assert [s.type_name for s in info.sections] == ["SNP_SEC_MEM", "SNP_SEC_MEM", "SNP_SECRETS", "CPUID", "SNP_SEC_MEM"]
    assert info.hash_table == (0, 0) and not info.kernel_hashes_sev
    assert info.secret_block == (0, 0)
    assert report.helper is not None and report.sec_measured is True
    # The helper's own secret page and mailbox are RAM the launch does not measure.
    assert report.helper.secret_page_base is not None
    for section in info.sections:
        assert not section.gpa <= report.helper.secret_page_base < section.gpa + section.size
    assert cli.main(["inspect", str(image)]) == 0
    text = capsys.readouterr().out
    assert "SEV-ES reset:      AP reset IP" in text
    assert "kernel hashes:     hash table block with base 0" in text
    assert "SNP metadata:      5 sections" in text
    assert "SEC measured:      yes: the SEC module and the migration helper in it" in text
    assert cli.main(["inspect", "--json", str(image)]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["sec_in_measured_range"] is True
    assert len(as_json["sev_launch"]["snp_sections"]) == 5


def test_measure_copies_nothing_and_reads_a_combined_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OVMF.fd (variables + code, one flash) is measured as a whole, ending at 4 GiB."""
    combined = built_image().with_name("OVMF.fd")
    _need(combined, "run `ovmf-mh build`")
    copy = tmp_path / "OVMF.fd"
    shutil.copyfile(combined, copy)
    code, out, err = run_measure(capsys, str(copy), "--mode", "snp", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["digest"] == expected(copy.read_bytes(), Mode.SNP, 1, "EPYC-v4")
    assert result["measured_range"] == [2**32 - copy.stat().st_size, 2**32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OVMF.fd"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hostile_reset_vector_tables(data: st.DataObject) -> None:
    """Random bytes written over the table, its footer and the SEV metadata of
    a real image: the reader either parses it or raises SevMetadataError
    (which inspect turns into a note and measure into exit 2), never anything else."""
    image = bytearray(_STOCK_TAIL)
    info = read_sev_launch_info(bytes(image))
    assert info.metadata_offset is not None
    targets = [len(image) - 32 - 18, len(image) - 32 - 200, info.metadata_offset]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.sampled_from(targets)) + data.draw(st.integers(0, 200))
        value = data.draw(st.binary(min_size=1, max_size=4))
        image[at : at + len(value)] = value
    with contextlib.suppress(SevMetadataError):
        read_sev_launch_info(bytes(image))


#: The last 64 KiB of Debian's 2 MiB image: its reset vector, table and metadata.
_STOCK_TAIL = STOCK_SNP.read_bytes()[-0x10000:] if STOCK_SNP.is_file() else bytes(0x10000)
