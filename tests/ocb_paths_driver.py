"""The stand-alone OCB program (tests/c/qemu_user/OcbPaths.c): build it
with gcc, run it natively or under qemu-user, parse its answers. Shared by
the VAES tests."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

from ci_provides import missing

from host_shim.helpers import hostcore

DRIVER = Path(__file__).resolve().parent / "c" / "qemu_user" / "OcbPaths.c"

Case = tuple[bytes, bytes, bytes, bytes]  # key, nonce, ad, plaintext


def build_driver(out: Path) -> Path:
    sources = [p for p in hostcore.CORE_LIB_DIR.glob("*.c")
               if p.name in ("Aes.c", "AesNi.c", "AesVaes.c", "Ocb.c", "Sha256.c", "HmacSha256.c")]
    command = ["gcc", "-O2", "-Wall", "-Werror", "-fshort-wchar", "-fno-strict-aliasing", "-fno-common",
               "-DEFIAPI=__attribute__((ms_abi))", *(f"-I{p}" for p in hostcore.include_dirs()),
               str(DRIVER), *map(str, sources), str(hostcore.HARNESS_DIR / "HostShim.c"), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out


@functools.cache
def emulator_vaes_agrees() -> bool:
    """Whether QEMU's TCG (qemu-user, -cpu max: the same AES helpers as the
    helper VM's) offers VAES and AVX2 and computes VAESENC and VAESDEC on
    both lanes as AESENC and AESDEC do. QEMU 7.2 offers them and gets the
    upper lane wrong."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        missing("qemu-x86_64 (Debian package qemu-user) is not installed")
    with tempfile.TemporaryDirectory() as work:
        driver = build_driver(Path(work) / "ocbpaths")
        cpu, _ = run_driver([qemu, "-cpu", "max", str(driver)], [])
    return bool(cpu["vaes_cpuid"] and cpu["vaes_raw"])


#: Per case, per path name: (key path bits, ciphertext || tag, opened again).
Rows = list[dict[str, tuple[int, bytes, bool]]]


def run_driver(command: list[str], cases: list[Case]) -> tuple[dict[str, int], Rows]:
    """Run the program on the cases; (its CPU line as a dict, rows)."""
    text = "".join(" ".join(field.hex() or "-" for field in case) + "\n" for case in cases)
    result = subprocess.run(command, input=text, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = dict(item.split("=") for item in lines[0].split()[1:])
    cpu = {name: int(value) for name, value in head.items()}
    rows: list[dict[str, tuple[int, bytes, bool]]] = []
    for index in range(len(cases)):
        row: dict[str, tuple[int, bytes, bool]] = {}
        for line in lines[1 + 3 * index : 4 + 3 * index]:
            name, path, cipher, tag, ok, equal = line.split()
            sealed = bytes.fromhex("" if cipher == "-" else cipher) + bytes.fromhex(tag)
            row[name] = (int(path), sealed, ok == "1" and equal == "1")
        rows.append(row)
    return cpu, rows
