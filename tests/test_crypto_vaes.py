"""The VAES page-crypto path (AesVaes.c) against the AES-NI and portable
paths and pyca cryptography: on the RFC 7253 vectors (Appendix A and the
iterated test), on messages of every length around the eight-block groups,
and on random 4 KiB pages; host-built through ctypes on this CPU, and as a
stand-alone program run natively and under QEMU's user-mode TCG
(``qemu-x86_64 -cpu max``, the same AES helpers as the helper VM's TCG).

Also: the run-time choice (CPUID, XCR0 and the self-test), the request
flag that forbids the path, and the VAES capability bit."""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ci_provides import missing
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from helper import abi
from helper.stream import END_RECORD_SIZE as END
from helper.stream import PAGE_RECORD_SIZE
from helper.stream import STREAM_HEADER_SIZE as HEADER
from host_shim.helpers import hostcore
from host_shim.helpers.hostcore_helper import HostCoreHelper

VECTORS = Path(__file__).resolve().parent / "vectors"
sys.path.insert(0, str(VECTORS))
import make_vectors  # noqa: E402
from ocb_paths_driver import Case, build_driver, run_driver  # noqa: E402

ALLOW_AESNI = 0x1
ALLOW_VAES = 0x2
USES_VAES = 0x100
PATH_AESNI = 2
CPUID7_ECX_VAES = 1 << 9

_P = ctypes.c_void_p
_N = ctypes.c_size_t



def _host_has_vaes() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return " vaes " in flags and " avx2 " in flags


class Core:
    def __init__(self) -> None:
        self.lib = hostcore.load()
        for name, argtypes, restype in (
            ("mh_cpu_has_vaes", [], ctypes.c_int),
            ("mh_set_cpuid7_ecx_clear", [ctypes.c_uint32], None),
            ("mh_ocb_key_struct_size", [], _N),
            ("mh_ocb_init_paths", [_P, _P, _N, ctypes.c_uint32], ctypes.c_int),
            ("mh_ocb_wipe", [_P], None),
            ("mh_ocb_encrypt_with", [_P, _P, _P, _N, _P, _N, _P, _P], ctypes.c_int),
            ("mh_ocb_decrypt_with", [_P, _P, _P, _N, _P, _N, _P, _P], ctypes.c_int),
        ):
            function = getattr(self.lib, name)
            function.argtypes = argtypes
            function.restype = restype

    def seal(self, allow: int, case: Case) -> tuple[int, bytes]:
        """(path bits, ciphertext || tag); also checks that it opens again."""
        key, nonce, ad, plaintext = case
        struct = ctypes.create_string_buffer(self.lib.mh_ocb_key_struct_size())
        path = self.lib.mh_ocb_init_paths(struct, key, len(key), allow)
        assert path, "key refused"
        try:
            out = ctypes.create_string_buffer(max(len(plaintext), 1))
            tag = ctypes.create_string_buffer(16)
            assert self.lib.mh_ocb_encrypt_with(struct, nonce, ad, len(ad), plaintext, len(plaintext), out, tag)
            sealed = out.raw[: len(plaintext)] + tag.raw
            back = ctypes.create_string_buffer(max(len(plaintext), 1))
            assert self.lib.mh_ocb_decrypt_with(struct, nonce, ad, len(ad), out, len(plaintext), tag, back)
            assert back.raw[: len(plaintext)] == plaintext
            bad = bytes([tag.raw[0] ^ 1]) + tag.raw[1:]
            assert not self.lib.mh_ocb_decrypt_with(struct, nonce, ad, len(ad), out, len(plaintext), bad, back)
            return int(path), sealed
        finally:
            self.lib.mh_ocb_wipe(struct)


@pytest.fixture(scope="module")
def core() -> Iterator[Core]:
    yield Core()


def _appendix_a() -> list[Case]:
    vectors = json.loads((VECTORS / "ocb3_rfc7253.json").read_text())["appendix_a_aes128_tag128"]
    return [
        tuple(bytes.fromhex(v[field]) for field in ("key", "nonce", "ad", "plaintext"))  # type: ignore[misc]
        for v in vectors
    ]


def _random_cases(seed: int) -> list[Case]:
    """Lengths around every eight-block group boundary up to 40 blocks, the
    record sizes of the stream (4 KiB pages, 40-byte associated data), both
    key sizes."""
    rng = random.Random(seed)
    lengths = sorted({*range(0, 16 * 40 + 17, 16), *(16 * b + d for b in range(0, 41, 8) for d in (1, 15)), 4096})
    cases: list[Case] = []
    for index, length in enumerate(lengths):
        key = rng.randbytes(32 if index % 3 else 16)
        cases.append((key, rng.randbytes(12), rng.randbytes(rng.choice((0, 8, 40, 100))), rng.randbytes(length)))
    for _ in range(16):
        cases.append((rng.randbytes(32), rng.randbytes(12), rng.randbytes(40), rng.randbytes(4096)))
    return cases


def _iterated_first_pass(key_bits: int) -> list[Case]:
    key = bytes(key_bits // 8 - 1) + bytes([128])
    cases: list[Case] = []
    for i in range(128):
        data = bytes(i)
        cases.append((key, (3 * i + 1).to_bytes(12, "big"), data, data))
        cases.append((key, (3 * i + 2).to_bytes(12, "big"), b"", data))
        cases.append((key, (3 * i + 3).to_bytes(12, "big"), data, b""))
    return cases


def _pyca(case: Case) -> bytes:
    key, nonce, ad, plaintext = case
    return AESOCB3(key).encrypt(nonce, plaintext, ad)


# --- host-built library, on this CPU ----------------------------------------


def test_vaes_chosen_only_when_allowed_and_usable(core: Core) -> None:
    key = bytes(range(32))
    usable = bool(core.lib.mh_cpu_has_vaes())
    if _host_has_vaes():
        assert usable, "this CPU has VAES and AVX2, the core should use them"
    assert core.lib.mh_ocb_init_paths(ctypes.create_string_buffer(4096), key, 32, ALLOW_AESNI) == PATH_AESNI
    struct = ctypes.create_string_buffer(core.lib.mh_ocb_key_struct_size())
    path = core.lib.mh_ocb_init_paths(struct, key, 32, ALLOW_AESNI | ALLOW_VAES)
    assert path == (PATH_AESNI | USES_VAES if usable else PATH_AESNI)
    # VAES without AES-NI is the portable path.
    assert core.lib.mh_ocb_init_paths(struct, key, 32, ALLOW_VAES) == 1
    core.lib.mh_set_cpuid7_ecx_clear(CPUID7_ECX_VAES)
    try:
        assert not core.lib.mh_cpu_has_vaes()
        assert core.lib.mh_ocb_init_paths(struct, key, 32, ALLOW_AESNI | ALLOW_VAES) == PATH_AESNI
    finally:
        core.lib.mh_set_cpuid7_ecx_clear(0)
        core.lib.mh_ocb_wipe(struct)


def test_every_path_matches_pyca_on_vectors_and_random_messages(core: Core) -> None:
    if not core.lib.mh_cpu_has_vaes():
        pytest.skip("this CPU cannot run the VAES path")
    expected_tail = json.loads((VECTORS / "ocb3_rfc7253.json").read_text())["appendix_a_aes128_tag128"]
    for case, vector in zip(_appendix_a(), expected_tail, strict=True):
        for allow in (0, ALLOW_AESNI, ALLOW_AESNI | ALLOW_VAES):
            assert core.seal(allow, case)[1].hex() == vector["ciphertext"]
    for case in _random_cases(21):
        expected = _pyca(case)
        paths = {allow: core.seal(allow, case) for allow in (0, ALLOW_AESNI, ALLOW_AESNI | ALLOW_VAES)}
        assert paths[ALLOW_AESNI | ALLOW_VAES][0] == PATH_AESNI | USES_VAES
        assert {sealed for _, sealed in paths.values()} == {expected}, f"{len(case[3])}-byte message"


@pytest.mark.parametrize("key_bits", [128, 256])
def test_vaes_rfc7253_iterated(core: Core, key_bits: int) -> None:
    if not core.lib.mh_cpu_has_vaes():
        pytest.skip("this CPU cannot run the VAES path")
    vector = next(v for v in json.loads((VECTORS / "ocb3_rfc7253.json").read_text())["iterated"]
                  if v["key_bits"] == key_bits)

    def encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
        path, sealed = core.seal(ALLOW_AESNI | ALLOW_VAES, (key, nonce, ad, plaintext))
        assert path == PATH_AESNI | USES_VAES
        return sealed

    assert make_vectors.ocb_iterated(encrypt, key_bits).hex() == vector["output"]


def test_request_flag_forbids_vaes_and_capability_says_so() -> None:
    """A dispatcher context made with NO_VECTOR_CRYPTO never reports VAES;
    one without it does exactly when the CPU can run the path. Both export
    the same pages into streams the other imports."""
    a = abi.load()
    cap_vaes = a.const("OVMF_MH_CAP_VAES")
    cap_aesni = a.const("OVMF_MH_CAP_AES_NI")
    usable = bool(Core().lib.mh_cpu_has_vaes())
    pages = bytearray(os.urandom(64 * 4096))
    vector = HostCoreHelper(pages, b"k" * 32)
    plain = HostCoreHelper(bytearray(len(pages)), b"k" * 32,
                           request_flags=a.const("OVMF_MH_REQUEST_NO_VECTOR_CRYPTO"))
    try:
        assert bool(vector.header()["Capabilities"] & cap_vaes) == usable
        assert not plain.header()["Capabilities"] & cap_vaes
        assert plain.header()["Capabilities"] & cap_aesni
        # A stream sealed on the vector path opens on the AES-NI path.
        count = len(pages) // 4096
        assert vector.call("EXPORT_BEGIN", 0, HEADER, 0, 0, 0, 1)[0] == 0
        chunks = [bytes(vector.data[:HEADER])]
        vector.data[: 8 * count] = struct.pack(f"<{count}Q", *range(0, len(pages), 4096))
        status, results = vector.call("EXPORT_BATCH", 0, count, 1 << 20, count * PAGE_RECORD_SIZE)
        assert status == 0
        chunks.append(bytes(vector.data[1 << 20 : (1 << 20) + results[0]]))
        assert vector.call("EXPORT_END", 0, END)[0] == 0
        chunks.append(bytes(vector.data[:END]))
        for command, chunk in zip(("IMPORT_BEGIN", "IMPORT_BATCH", "IMPORT_END"), chunks, strict=True):
            plain.data[: len(chunk)] = chunk
            extra = (0, 1) if command == "IMPORT_BEGIN" else ()
            assert plain.call(command, 0, len(chunk), *extra)[0] == 0, command
        assert bytes(plain.window) == bytes(pages)
    finally:
        vector.close()
        plain.close()


# --- the stand-alone program, natively and under qemu-user TCG ---------------


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_driver(tmp_path_factory.mktemp("ocbpaths") / "ocbpaths")


def _check(command: list[str]) -> dict[str, int]:
    cases = [*_appendix_a(), *_random_cases(7), *_iterated_first_pass(128), *_iterated_first_pass(256)]
    cpu, rows = run_driver(command, cases)
    assert cpu["aesni"] == 1
    # The core uses VAES exactly when the 256-bit instructions agree with
    # AES-NI on both lanes (the driver's own check, not the core's).
    assert cpu["vaes_usable"] == (cpu["vaes_cpuid"] and cpu["vaes_raw"])
    for case, row in zip(cases, rows, strict=True):
        expected = _pyca(case)
        for name, (_path, sealed, opened) in row.items():
            assert sealed == expected, f"{name} path, {len(case[3])}-byte message"
            assert opened, f"{name} path did not open its own output"
        assert row["vaes"][0] == (PATH_AESNI | USES_VAES if cpu["vaes_usable"] else PATH_AESNI)
    # The iterated RFC 7253 test: its last step seals all earlier outputs.
    first = len(_appendix_a()) + len(_random_cases(7))
    for key_bits in (128, 256):
        outputs = b"".join(row["vaes"][1] for row in rows[first : first + 384])
        first += 384
        key = bytes(key_bits // 8 - 1) + bytes([128])
        _, last = run_driver(command, [(key, (385).to_bytes(12, "big"), outputs, b"")])
        vector = next(v for v in json.loads((VECTORS / "ocb3_rfc7253.json").read_text())["iterated"]
                      if v["key_bits"] == key_bits)
        assert {sealed.hex() for _, sealed, _ in last[0].values()} == {vector["output"]}
    return cpu


def test_paths_natively(driver: Path) -> None:
    cpu = _check([str(driver)])
    if _host_has_vaes():
        assert cpu["vaes_usable"] == 1


def test_paths_under_qemu_user_tcg(driver: Path) -> None:
    """Under TCG with -cpu max the guest sees VAES and AVX2 in CPUID; the
    path is used only if QEMU computes both lanes right (QEMU 7.2 does not:
    the upper lane of VAESENC and VAESDEC is wrong), and every path's output
    is what pyca computes either way."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        missing("qemu-x86_64 (Debian package qemu-user) is not installed")
    cpu = _check([qemu, "-cpu", "max", str(driver)])
    assert cpu["vaes_cpuid"] == 1, "QEMU's -cpu max offers VAES and AVX2"
