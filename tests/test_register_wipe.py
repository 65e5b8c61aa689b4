"""What a host sees in a waiting helper's registers.

On SEV without ES the host reads a guest's register state at every exit,
a halted helper's included; the helper's memory is encrypted, its
registers are not. The page crypto leaves round keys, OCB offsets and
plaintext in the vector registers, so the helper zeroes them before it
publishes each response (InternalMhWipeVectorRegisters). Here QEMU's
`info registers` stands for the host's view."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from host_shim.helpers import backends
from host_shim.helpers.helper_vm import HelperVM
from host_shim.transfer import pipeline

pytestmark = pytest.mark.qemu

#: One vector register in QEMU's dump: XMMnn=hi lo, or YMMnn=four quads.
_VECTOR = re.compile(r"\b([XY]MM\d\d)=((?:[0-9a-f]{16} ?)+)")
#: Seconds a helper gets to halt after its last answer (the spin is 20 ms).
HALT_WAIT = 10.0


def _registers(helper: HelperVM) -> str:
    text: str = helper.vm.qmp("human-monitor-command", **{"command-line": "info registers"})
    return text


def _halted_dump(helper: HelperVM) -> str:
    deadline = time.monotonic() + HALT_WAIT
    while True:
        dump = _registers(helper)
        if "HLT=1" in dump or time.monotonic() > deadline:
            return dump
        time.sleep(0.05)


def test_a_helper_waiting_after_an_export_holds_nothing_in_its_vector_registers(
    firmware: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export of 1 MiB of random pages through a firmware helper; once the
    stream is written the helper waits (halted) for the commit proof: each
    of its sixteen vector registers reads zero, whole. With the firmware of
    before the wipe, the same dump held the crypto's values in all of them."""
    started: list[HelperVM] = []

    class RecordedHelperVM(HelperVM):
        def __enter__(self) -> RecordedHelperVM:
            started.append(self)
            super().__enter__()
            return self

    monkeypatch.setattr(backends, "HelperVM", RecordedHelperVM)
    ram = work_dir / "src.ram"
    ram.write_bytes(os.urandom(1 << 20))
    dumps: list[str] = []

    def look_then_stop() -> bytes:
        dumps.extend(_halted_dump(helper) for helper in started)
        raise _Looked

    with (work_dir / "stream.omh").open("wb") as sink, pytest.raises(_Looked):
        pipeline.export_ram(ram, os.urandom(32), sink, firmware=firmware, work_dir=work_dir / "export",
                            confirm=look_then_stop)
    assert len(dumps) == 1, f"expected one helper's dump, got {len(dumps)}"
    (work_dir / "registers.txt").write_text(dumps[0])
    assert "HLT=1" in dumps[0], f"the helper never halted ({work_dir / 'registers.txt'})"
    vectors = dict((name, value.split()) for name, value in _VECTOR.findall(dumps[0]))
    assert len(vectors) == 16, f"QEMU's dump named {len(vectors)} vector registers ({work_dir / 'registers.txt'})"
    left = {name: " ".join(quads) for name, quads in vectors.items() if any(int(q, 16) for q in quads)}
    assert not left, f"vector registers not zeroed while the helper waits: {left}"


class _Looked(Exception):
    """The test's confirm callback ends the export once it has looked."""
