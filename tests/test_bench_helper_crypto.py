"""`ovmf-mh bench helper`, section crypto, end to end on a small guest: both
request configurations run, each helper's path is the one its request and
the CPU allow, the ratios are what the rows say, and nothing is timed as
pass/fail. Also the firmware helper under TCG: the request flag is accepted,
the capability and the debug log name the path, and a stream sealed by the
default helper opens in the reference helper."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ocb_paths_driver import emulator_vaes_agrees

from helper import abi
from helper.reference import ReferenceHelper
from helper.stream import END_RECORD_SIZE, PAGE_RECORD_SIZE, STREAM_HEADER_SIZE
from host_shim import cli
from host_shim.devtools.bench_helper_crypto import format_crypto
from host_shim.helpers.helper_vm import HelperSpec, HelperVM
from host_shim.helpers.keys import secret_record


def test_bench_helper_crypto_end_to_end(firmware: Path, work_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["bench", "helper", "--section", "crypto", "--crypto-guest-mib", "4", "--crypto-rounds", "2",
                     "--image", str(firmware), "--work-dir", str(work_dir), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)["sections"]["crypto"]
    rows = result["firmware"]
    assert set(rows) == {"vector", "no-vector"}
    assert not rows["no-vector"]["vaes"], "NO_VECTOR_CRYPTO must keep the helper off the VAES path"
    assert rows["vector"]["aes_ni"] and rows["no-vector"]["aes_ni"]
    # Under TCG the default helper takes VAES exactly when the emulator's
    # 256-bit AES is right (QEMU 7.2: it is not).
    assert rows["vector"]["vaes"] == emulator_vaes_agrees()
    for row in rows.values():
        assert len(row["export_rounds_mbps"]) == 2
        assert row["export_mbps"] == pytest.approx(max(row["export_rounds_mbps"]))
        assert row["import_mbps"] == pytest.approx(max(row["import_rounds_mbps"]))
    assert result["ratio_export"] == pytest.approx(rows["vector"]["export_mbps"] / rows["no-vector"]["export_mbps"])
    assert result["ratio_import"] == pytest.approx(rows["vector"]["import_mbps"] / rows["no-vector"]["import_mbps"])
    native = result["native"]
    assert native["no-vector"]["vaes"] == 0.0
    assert all(row["export_mbps"] > 0 and row["import_mbps"] > 0 for row in native.values())
    text = "\n".join(format_crypto(result))
    assert "| NO_VECTOR_CRYPTO | AES-NI |" in text and "ratio default / NO_VECTOR_CRYPTO" in text


@pytest.mark.parametrize("flags", [0, 1], ids=["default", "no-vector"])
def test_firmware_helper_path_under_tcg(firmware: Path, work_dir: Path, flags: int) -> None:
    """The firmware helper accepts the flag, says which path it took (the
    capability and the debug log), and its export opens in the reference
    helper's import (pyca's AES-OCB3) byte for byte."""
    a = abi.load()
    assert flags in (0, a.const("OVMF_MH_REQUEST_NO_VECTOR_CRYPTO"))
    pages = 256
    ram = work_dir / "guest.ram"
    ram.write_bytes(os.urandom(pages * 4096))
    key = os.urandom(32)
    with HelperVM(HelperSpec(firmware, guest_ram=ram, key=key, request_flags=flags), work_dir / "fw", "fw") as vm:
        header = vm.wait_ready()
        vaes = bool(header["Capabilities"] & a.const("OVMF_MH_CAP_VAES"))
        assert vaes == (flags == 0 and emulator_vaes_agrees())
        # The helper names its path after publishing READY (the capability
        # is in the header): wait for the log line that follows it.
        assert vm.vm.wait_for_log(vm.vm.logs.debugcon, "ovmf-mh: READY:", 30) is not None
        log = vm.vm.logs.debugcon.read_text(errors="replace")
        assert "ovmf-mh: page crypto on " + ("VAES + AVX2" if vaes else "AES-NI") in log
        if flags:
            assert "the request forbids the VAES path" in log
        assert vm.mailbox is not None
        stream = vm.mailbox
        data = vm.spec.mailbox_base + a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        assert stream.call("EXPORT_BEGIN", (0, STREAM_HEADER_SIZE, 0, 0, 0, 1)).status == 0
        chunks = [bytes(vm.memory[data: data + STREAM_HEADER_SIZE])]
        vm.memory[data: data + 8 * pages] = b"".join((i * 4096).to_bytes(8, "little") for i in range(pages))
        response = stream.call("EXPORT_BATCH", (0, pages, 1 << 20, pages * PAGE_RECORD_SIZE))
        assert response.status == 0
        chunks.append(bytes(vm.memory[data + (1 << 20): data + (1 << 20) + response.results[0]]))
        assert stream.call("EXPORT_END", (0, END_RECORD_SIZE)).status == 0
        chunks.append(bytes(vm.memory[data: data + END_RECORD_SIZE]))
    window = bytearray(pages * 4096)
    area = bytearray(2 << 20)
    reference = ReferenceHelper(window, area, bytearray(secret_record(key)))
    for command, chunk in zip(("IMPORT_BEGIN", "IMPORT_BATCH", "IMPORT_END"), chunks, strict=True):
        area[: len(chunk)] = chunk
        args = (0, len(chunk), 0, 1) if command == "IMPORT_BEGIN" else (0, len(chunk))
        status, _ = reference.dispatch(a.const(f"OVMF_MH_CMD_{command}"), args)
        assert status == 0, f"the reference helper refused the firmware's {command} input: status {status:#x}"
    assert bytes(window) == ram.read_bytes()
