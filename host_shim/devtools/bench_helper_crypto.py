"""ovmf-mh bench helper, section ``crypto``: export and import MB/s of one
firmware helper with and without the vector (VAES + AVX2) page-crypto path,
side by side in one run.

Two pairs of firmware helpers under QEMU TCG see the same random guest RAM:
one pair started with the default request, one with the request flag
``NO_VECTOR_CRYPTO`` (the AES-NI path, how every helper ran before). Rounds
alternate between the pairs; each round exports the whole guest through the
source helper and imports the stream through the target helper into a
second RAM file, checked byte for byte. Per path: the best round's wall
MB/s, and MB per CPU-second of the helper's QEMU process (its user + system
time over the command, from /proc/PID/stat), which is what the helper's
work costs whatever else the machine runs. Each helper's capabilities say
which path it really took: under QEMU 7.2 the VAES path fails its self-test
(docs/testing.md, "Page crypto under TCG"), so both pairs run AES-NI there
and the ratio is about 1.

The same comparison natively (the host-built core sealing and opening
pages on this CPU, in C loops) shows what the path does where VAES works.

The section is ``section_crypto(context)`` with ``format_crypto(result)``
for its text, for a bench that runs sections by name.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from helper import abi
from helper.stream import END_RECORD_SIZE as END
from helper.stream import PAGE_RECORD_SIZE
from helper.stream import STREAM_HEADER_SIZE as HEADER
from host_shim.errors import MailboxError, OvmfMhError
from host_shim.helpers import hostcore
from host_shim.helpers.helper_vm import MIB, HelperSpec, HelperVM

PAGE = 4096
DEFAULT_GUEST_MIB = 64
DEFAULT_ROUNDS = 3
NATIVE_PAGES = 2048
NATIVE_ROUNDS = 15
#: OVMF_MH_OCB_ALLOW_* of PageCrypto.h (the core's private header) and the
#: flag mh_ocb_pages_paths adds when whole blocks take the VAES loop.
_ALLOW_AESNI = 0x1
_ALLOW_VAES = 0x2
_USES_VAES = 0x100
#: The two configurations compared, as (name, request flags).
PATHS = ("vector", "no-vector")


class CryptoBenchContext(Protocol):
    @property
    def image(self) -> Path: ...
    @property
    def work(self) -> Path: ...
    @property
    def crypto_guest_mib(self) -> int: ...
    @property
    def crypto_rounds(self) -> int: ...


@dataclass(frozen=True)
class CryptoSettings:
    image: Path
    work: Path
    guest_mib: int = DEFAULT_GUEST_MIB
    rounds: int = DEFAULT_ROUNDS


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flags(name: str) -> int:
    return int(abi.load().const("OVMF_MH_REQUEST_NO_VECTOR_CRYPTO")) if name == "no-vector" else 0


def _page_list(first: int, count: int) -> bytes:
    return struct.pack(f"<{count}Q", *range(first * PAGE, (first + count) * PAGE, PAGE))


def _check(who: str, command: str, status: int) -> None:
    if status:
        raise MailboxError(f"{who} refused the benchmark's stream", command=command, status=status)


class _Pair:
    """A source and a target firmware helper with the same request flags."""

    def __init__(self, settings: CryptoSettings, name: str, source_ram: Path, target_ram: Path, key: bytes) -> None:
        flags = _flags(name)
        self.name = name
        self.source = HelperVM(HelperSpec(settings.image, guest_ram=source_ram, key=key, request_flags=flags),
                               settings.work / f"{name}-source", f"{name}-source")
        self.target = HelperVM(HelperSpec(settings.image, guest_ram=target_ram, key=key, request_flags=flags),
                               settings.work / f"{name}-target", f"{name}-target")

    def __enter__(self) -> _Pair:
        self.source.start()
        self.target.start()
        self.source.wait_ready()
        self.target.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()
        self.target.close()

    def capabilities(self) -> int:
        assert self.source.mailbox is not None
        return int(self.source.mailbox.header()["Capabilities"])

    def round(self, pages: int) -> dict[str, float]:
        """Export every page, import the stream; seconds and CPU seconds of each."""
        a = abi.load()
        batch = a.const("OVMF_MH_MAX_BATCH_PAGES")
        src, dst = self.source, self.target
        assert src.mailbox is not None and dst.mailbox is not None
        assert src.vm.pid is not None and dst.vm.pid is not None
        src_data = src.spec.mailbox_base + a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        dst_data = dst.spec.mailbox_base + a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        out = 64 * 1024
        src.mailbox.call("RESET")
        dst.mailbox.call("RESET")

        chunks: list[bytes] = []
        cpu, start = _cpu_seconds(src.vm.pid), time.perf_counter()
        src.mailbox.call("EXPORT_BEGIN", (0, HEADER, 0, 0, 0, 1))
        chunks.append(bytes(src.memory[src_data: src_data + HEADER]))
        for first in range(0, pages, batch):
            count = min(batch, pages - first)
            src.memory[src_data: src_data + 8 * count] = _page_list(first, count)
            res = src.mailbox.call("EXPORT_BATCH", (0, count, out, count * PAGE_RECORD_SIZE), timeout=120)
            if res.status:
                raise MailboxError(f"{src.name} refused a batch", command="EXPORT_BATCH", status=res.status)
            chunks.append(bytes(src.memory[src_data + out: src_data + out + res.results[0]]))
        src.mailbox.call("EXPORT_END", (0, END))
        chunks.append(bytes(src.memory[src_data: src_data + END]))
        export_s, export_cpu = time.perf_counter() - start, _cpu_seconds(src.vm.pid) - cpu

        cpu, start = _cpu_seconds(dst.vm.pid), time.perf_counter()
        dst.memory[dst_data: dst_data + HEADER] = chunks[0]
        _check(dst.name, "IMPORT_BEGIN", dst.mailbox.call("IMPORT_BEGIN", (0, HEADER, 0, 1)).status)
        for chunk in chunks[1:-1]:
            dst.memory[dst_data: dst_data + len(chunk)] = chunk
            _check(dst.name, "IMPORT_BATCH", dst.mailbox.call("IMPORT_BATCH", (0, len(chunk)), timeout=120).status)
        dst.memory[dst_data: dst_data + END] = chunks[-1]
        _check(dst.name, "IMPORT_END", dst.mailbox.call("IMPORT_END", (0, END)).status)
        import_s, import_cpu = time.perf_counter() - start, _cpu_seconds(dst.vm.pid) - cpu
        return {"export_s": export_s, "export_cpu_s": export_cpu, "import_s": import_s, "import_cpu_s": import_cpu}


def _native(pages: int, rounds: int) -> dict[str, dict[str, float]]:
    """AES-256-OCB3 sealing and opening of 4 KiB pages (40 bytes of
    associated data each, one call per page as the helper makes them) by
    the host-built core, per path, in alternating rounds (best counts); the
    opened pages are checked against the sealed ones."""
    lib = hostcore.load()
    p, n = ctypes.c_void_p, ctypes.c_size_t
    lib.mh_ocb_pages_paths.argtypes = [p, n, ctypes.c_uint32, ctypes.c_int, p, p, n, p, n, n, p, p]
    lib.mh_ocb_pages_paths.restype = ctypes.c_int
    size = pages * PAGE
    key = (ctypes.c_uint8 * 32).from_buffer_copy(os.urandom(32))
    nonces = (ctypes.c_uint8 * (12 * pages)).from_buffer_copy(os.urandom(12 * pages))
    ads = (ctypes.c_uint8 * (40 * pages)).from_buffer_copy(os.urandom(40 * pages))
    plain = (ctypes.c_uint8 * size).from_buffer_copy(os.urandom(size))
    sealed = (ctypes.c_uint8 * size)()
    opened = (ctypes.c_uint8 * size)()
    tags = (ctypes.c_uint8 * (16 * pages))()
    allow = {"vector": _ALLOW_AESNI | _ALLOW_VAES, "no-vector": _ALLOW_AESNI}
    best = {name: [float("inf"), float("inf")] for name in PATHS}
    path_bits = {name: 0 for name in PATHS}
    for _ in range(rounds):
        for name in PATHS:
            start = time.perf_counter()
            path_bits[name] = lib.mh_ocb_pages_paths(key, 32, allow[name], 0, nonces, ads, 40, plain, PAGE, pages,
                                                     sealed, tags)
            middle = time.perf_counter()
            ok = lib.mh_ocb_pages_paths(key, 32, allow[name], 1, nonces, ads, 40, sealed, PAGE, pages, opened, tags)
            end = time.perf_counter()
            if not path_bits[name] or not ok or bytes(opened) != bytes(plain):
                raise OvmfMhError(f"host core ({name}): sealing or opening the pages failed")
            best[name] = [min(best[name][0], middle - start), min(best[name][1], end - middle)]
    return {
        name: {
            "vaes": float(bool(path_bits[name] & _USES_VAES)),
            "export_mbps": size / best[name][0] / 1e6,
            "import_mbps": size / best[name][1] / 1e6,
        }
        for name in PATHS
    }


def run_crypto(settings: CryptoSettings) -> dict[str, Any]:
    """Both firmware pairs (alternating rounds, best counts) and the native core."""
    a = abi.load()
    settings.work.mkdir(parents=True, exist_ok=True)
    size = settings.guest_mib * MIB
    pages = size // PAGE
    source_ram, key = settings.work / "source.ram", os.urandom(32)
    source_ram.write_bytes(os.urandom(size))
    targets = {name: settings.work / f"{name}-target.ram" for name in PATHS}
    for path in targets.values():
        with path.open("wb") as f:
            f.truncate(size)
    rows: dict[str, dict[str, Any]] = {}
    pairs = [_Pair(settings, name, source_ram, targets[name], key) for name in PATHS]
    try:
        for pair in pairs:
            pair.__enter__()
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
        for _ in range(settings.rounds):
            for pair in pairs:
                rounds[pair.name].append(pair.round(pages))
        for pair in pairs:
            caps = pair.capabilities()
            runs = rounds[pair.name]
            export_s = min(r["export_s"] for r in runs)
            import_s = min(r["import_s"] for r in runs)
            export_cpu = min(r["export_cpu_s"] for r in runs)
            import_cpu = min(r["import_cpu_s"] for r in runs)
            rows[pair.name] = {
                "vaes": bool(caps & a.const("OVMF_MH_CAP_VAES")),
                "aes_ni": bool(caps & a.const("OVMF_MH_CAP_AES_NI")),
                "export_mbps": size / export_s / 1e6,
                "import_mbps": size / import_s / 1e6,
                "export_mb_per_cpu_s": size / export_cpu / 1e6 if export_cpu > 0 else 0.0,
                "import_mb_per_cpu_s": size / import_cpu / 1e6 if import_cpu > 0 else 0.0,
                "export_rounds_mbps": [size / r["export_s"] / 1e6 for r in runs],
                "import_rounds_mbps": [size / r["import_s"] / 1e6 for r in runs],
            }
    finally:
        for pair in pairs:
            pair.__exit__()
    for name, path in targets.items():
        if path.read_bytes() != source_ram.read_bytes():
            raise OvmfMhError(f"firmware helpers ({name}): the import did not reproduce the source RAM")
    vector, plain = rows["vector"], rows["no-vector"]
    return {
        "guest_mib": settings.guest_mib,
        "rounds": settings.rounds,
        "load_average": os.getloadavg()[0],
        "firmware": rows,
        "ratio_export": vector["export_mbps"] / plain["export_mbps"],
        "ratio_import": vector["import_mbps"] / plain["import_mbps"],
        "ratio_export_cpu": vector["export_mb_per_cpu_s"] / plain["export_mb_per_cpu_s"]
        if plain["export_mb_per_cpu_s"] else 0.0,
        "ratio_import_cpu": vector["import_mb_per_cpu_s"] / plain["import_mb_per_cpu_s"]
        if plain["import_mb_per_cpu_s"] else 0.0,
        "native": _native(NATIVE_PAGES, NATIVE_ROUNDS),
        "native_pages": NATIVE_PAGES,
    }


def section_crypto(context: CryptoBenchContext) -> dict[str, Any]:
    """The section of `ovmf-mh bench helper` (host_shim/devtools/bench_helper.py)."""
    return run_crypto(CryptoSettings(context.image, context.work / "crypto", guest_mib=context.crypto_guest_mib,
                                     rounds=context.crypto_rounds))


def format_crypto(result: dict[str, Any]) -> list[str]:
    lines = [
        f"page crypto of one firmware helper under TCG, {result['guest_mib']} MiB of random pages, best of "
        f"{result['rounds']} alternating rounds (load average {result['load_average']:.1f}; MB = 10^6 B)",
        "| request | path taken | export MB/s | import MB/s | export MB per CPU-s | import MB per CPU-s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, label in (("vector", "default"), ("no-vector", "NO_VECTOR_CRYPTO")):
        row = result["firmware"][name]
        path = "VAES + AVX2" if row["vaes"] else ("AES-NI" if row["aes_ni"] else "portable")
        lines.append(f"| {label} | {path} | {row['export_mbps']:.1f} | {row['import_mbps']:.1f} | "
                     f"{row['export_mb_per_cpu_s']:.1f} | {row['import_mb_per_cpu_s']:.1f} |")
    lines.append(f"ratio default / NO_VECTOR_CRYPTO: export {result['ratio_export']:.2f}, import "
                 f"{result['ratio_import']:.2f} (per CPU-second {result['ratio_export_cpu']:.2f}, "
                 f"{result['ratio_import_cpu']:.2f})")
    lines.append(f"host-built core on this CPU, AES-256-OCB3 on {result['native_pages']} pages, one call per page "
                 f"(seal = export, open = import):")
    for name in PATHS:
        row = result["native"][name]
        path = "VAES + AVX2" if row["vaes"] else "AES-NI"
        lines.append(f"  {name:9} {path:11} export {row['export_mbps']:7.0f} MB/s  "
                     f"import {row['import_mbps']:7.0f} MB/s")
    return lines
