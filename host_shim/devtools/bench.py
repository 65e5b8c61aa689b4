"""ovmf-mh bench crypto: page crypto speed, side by side in one run.

Native (host-built core, the firmware's C sources compiled with gcc):
* raw AES-256-OCB3 over 4 KiB pages, AES-NI path and portable path;
* the dispatcher's EXPORT_BATCH / IMPORT_BATCH (records, zero-page check,
  chain digest: everything the helper does per page);
* pyca cryptography (OpenSSL) AESOCB3 and AESGCM-256 on the same pages, one
  call per page (the same per-page work, plus Python's per-call cost) and
  AESGCM on the whole buffer in 1 MiB messages (OpenSSL's bulk rate).

Firmware (the built image under QEMU TCG, through the mailbox): export of a
guest RAM file by a source helper and import into a second file by a target
helper; MB/s, pages/s, NOP round trip and the share of mailbox overhead.

Speeds are ratios measured in the same process; absolute numbers vary with
the machine's load.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from helper import abi
from helper.stream import END_RECORD_SIZE as END
from helper.stream import PAGE_RECORD_SIZE
from helper.stream import STREAM_HEADER_SIZE as HEADER
from host_shim.helpers import hostcore
from host_shim.helpers.helper_vm import MIB, HelperSpec, HelperVM
from host_shim.helpers.hostcore_helper import HostCoreHelper

PAGE = 4096


def _page_list(first: int, count: int) -> bytes:
    """EXPORT_BATCH's page list for pages first .. first + count - 1."""
    return struct.pack(f"<{count}Q", *range(first * PAGE, (first + count) * PAGE, PAGE))


def _best(rounds: int, run: Callable[[], object]) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def _host_raw(data: bytes, pages: int, rounds: int, portable: bool) -> float:
    lib = hostcore.load()
    p, n = ctypes.c_void_p, ctypes.c_size_t
    lib.mh_ocb_encrypt_pages.argtypes = [p, n, p, p, n, p, n, n, p, p, ctypes.c_int]
    key = (ctypes.c_uint8 * 32).from_buffer_copy(os.urandom(32))
    nonces = (ctypes.c_uint8 * (12 * pages)).from_buffer_copy(os.urandom(12 * pages))
    ads = (ctypes.c_uint8 * (40 * pages))()
    src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    out = (ctypes.c_uint8 * len(data))()
    tags = (ctypes.c_uint8 * (16 * pages))()

    def run() -> None:
        if not lib.mh_ocb_encrypt_pages(key, 32, nonces, ads, 40, src, PAGE, pages, out, tags, int(portable)):
            raise RuntimeError("host core refused to encrypt")

    return _mbps(len(data), _best(rounds, run))


def _host_dispatch(data: bytes, pages: int, rounds: int) -> tuple[float, float]:
    """EXPORT_BATCH and IMPORT_BATCH rates through the host-built dispatcher."""
    batch = abi.load().const("OVMF_MH_MAX_BATCH_PAGES")
    record = PAGE_RECORD_SIZE
    key = os.urandom(32)
    source_window = bytearray(data)
    target_window = bytearray(len(data))
    source = HostCoreHelper(source_window, key, data_size=batch * record + 65536)
    target = HostCoreHelper(target_window, key, data_size=batch * record + 65536)
    try:
        stream: list[bytes] = []

        def export() -> None:
            stream.clear()
            source.call("RESET")
            # Shard 0 of 1, unbound: the migration id is whatever the data area holds.
            status, res = source.call("EXPORT_BEGIN", 0, HEADER, 0, 0, 0, 1)
            stream.append(bytes(source.data[:HEADER]))
            for start in range(0, pages, batch):
                count = min(batch, pages - start)
                source.data[: 8 * count] = _page_list(start, count)
                status, res = source.call("EXPORT_BATCH", 0, count, 65536, count * record)
                if status:
                    raise RuntimeError(f"EXPORT_BATCH status {status:#x}")
                stream.append(bytes(source.data[65536 : 65536 + res[0]]))
            source.call("EXPORT_END", 0, END)
            stream.append(bytes(source.data[:END]))

        export_seconds = _best(rounds, export)
        chunks = list(stream)

        def import_() -> None:
            target.call("RESET")
            target.data[:HEADER] = chunks[0]
            if target.call("IMPORT_BEGIN", 0, HEADER, 0, 1)[0]:
                raise RuntimeError("IMPORT_BEGIN failed")
            for chunk in chunks[1:-1]:
                target.data[: len(chunk)] = chunk
                status, _ = target.call("IMPORT_BATCH", 0, len(chunk))
                if status:
                    raise RuntimeError(f"IMPORT_BATCH status {status:#x}")
            target.data[:END] = chunks[-1]
            if target.call("IMPORT_END", 0, END)[0]:
                raise RuntimeError("IMPORT_END failed")

        import_seconds = _best(rounds, import_)
        if target_window != source_window:
            raise RuntimeError("host core import did not reproduce the source pages")
        return _mbps(len(data), export_seconds), _mbps(len(data), import_seconds)
    finally:
        source.close()
        target.close()


def _openssl(data: bytes, pages: int, rounds: int) -> dict[str, float]:
    key = os.urandom(32)
    nonces = [os.urandom(12) for _ in range(pages)]
    ad = bytes(40)
    views = [data[i * PAGE : (i + 1) * PAGE] for i in range(pages)]
    ocb, gcm = AESOCB3(key), AESGCM(key)

    def per_page(cipher: AESOCB3 | AESGCM) -> Callable[[], None]:
        def run() -> None:
            for nonce, page in zip(nonces, views, strict=True):
                cipher.encrypt(nonce, page, ad)

        return run

    chunk = 1024 * 1024

    def gcm_bulk() -> None:
        for offset in range(0, len(data), chunk):
            gcm.encrypt(nonces[0], data[offset : offset + chunk], None)

    return {
        "openssl_ocb_per_page": _mbps(len(data), _best(rounds, per_page(ocb))),
        "openssl_gcm_per_page": _mbps(len(data), _best(rounds, per_page(gcm))),
        "openssl_gcm_bulk_1mib": _mbps(len(data), _best(rounds, gcm_bulk)),
    }


def _firmware(image: Path, guest_mib: int, work: Path) -> dict[str, float]:
    """Export a random guest RAM file through a firmware helper and import it
    through another; MB/s of each, verified byte for byte."""
    a = abi.load()
    batch = a.const("OVMF_MH_MAX_BATCH_PAGES")
    record = PAGE_RECORD_SIZE
    size = guest_mib * MIB
    pages = size // PAGE
    source_ram, target_ram = work / "source.ram", work / "target.ram"
    source_ram.write_bytes(os.urandom(size))
    with target_ram.open("wb") as f:
        f.truncate(size)
    key = os.urandom(32)
    out_offset = 64 * 1024
    with HelperVM(HelperSpec(image, guest_ram=source_ram, key=key), work / "source", "source") as src, \
            HelperVM(HelperSpec(image, guest_ram=target_ram, key=key), work / "target", "target") as dst:
        src.wait_ready()
        dst.wait_ready()
        assert src.mailbox is not None and dst.mailbox is not None
        src_data = src.spec.mailbox_base + a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        dst_data = dst.spec.mailbox_base + a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        nop_start = time.perf_counter()
        for _ in range(200):
            src.mailbox.call("NOP")
        nop = (time.perf_counter() - nop_start) / 200

        chunks: list[bytes] = []
        start = time.perf_counter()
        src.mailbox.call("EXPORT_BEGIN", (0, HEADER, 0, 0, 0, 1))
        chunks.append(bytes(src.memory[src_data : src_data + HEADER]))
        batches = 0
        for first in range(0, pages, batch):
            count = min(batch, pages - first)
            src.memory[src_data : src_data + 8 * count] = _page_list(first, count)
            res = src.mailbox.call("EXPORT_BATCH", (0, count, out_offset, count * record), timeout=120)
            chunks.append(bytes(src.memory[src_data + out_offset : src_data + out_offset + res.results[0]]))
            batches += 1
        src.mailbox.call("EXPORT_END", (0, END))
        chunks.append(bytes(src.memory[src_data : src_data + END]))
        export_seconds = time.perf_counter() - start

        start = time.perf_counter()
        dst.memory[dst_data : dst_data + HEADER] = chunks[0]
        dst.mailbox.call("IMPORT_BEGIN", (0, HEADER, 0, 1))
        for chunk in chunks[1:-1]:
            dst.memory[dst_data : dst_data + len(chunk)] = chunk
            dst.mailbox.call("IMPORT_BATCH", (0, len(chunk)), timeout=120)
        dst.memory[dst_data : dst_data + END] = chunks[-1]
        dst.mailbox.call("IMPORT_END", (0, END))
        import_seconds = time.perf_counter() - start
        src.shutdown()
        dst.shutdown()
    if source_ram.read_bytes() != target_ram.read_bytes():
        raise RuntimeError("firmware import did not reproduce the source RAM")
    return {
        "firmware_export_mbps": _mbps(size, export_seconds),
        "firmware_import_mbps": _mbps(size, import_seconds),
        "firmware_export_pages_per_s": pages / export_seconds,
        "firmware_import_pages_per_s": pages / import_seconds,
        "firmware_nop_round_trip_us": nop * 1e6,
        "firmware_mailbox_overhead": nop * batches / export_seconds,
        "firmware_guest_mib": float(guest_mib),
    }


def bench_crypto(
    *, pages: int = 2048, rounds: int = 5, firmware: Path | None = None, guest_mib: int = 64
) -> dict[str, Any]:
    data = os.urandom(pages * PAGE)
    results: dict[str, Any] = {"pages": pages, "page_size": PAGE, "aead": "AES-256-OCB3"}
    results["core_raw_aesni_mbps"] = _host_raw(data, pages, rounds, portable=False)
    results["core_raw_portable_mbps"] = _host_raw(data, pages, rounds, portable=True)
    export, import_ = _host_dispatch(data, pages, rounds)
    results["core_export_mbps"] = export
    results["core_import_mbps"] = import_
    results.update(_openssl(data, pages, rounds))
    results["ratio_export_vs_openssl_gcm_per_page"] = export / results["openssl_gcm_per_page"]
    results["ratio_export_vs_openssl_gcm_bulk"] = export / results["openssl_gcm_bulk_1mib"]
    results["ratio_raw_vs_openssl_ocb_per_page"] = (
        results["core_raw_aesni_mbps"] / results["openssl_ocb_per_page"]
    )
    if firmware is not None:
        with tempfile.TemporaryDirectory(prefix="ovmf-mh-bench-") as work:
            results.update(_firmware(firmware, guest_mib, Path(work)))
    return results


def format_report(results: dict[str, Any]) -> list[str]:
    lines = [f"page crypto, {results['aead']}, {results['pages']} pages of 4 KiB (MB/s = 10^6 B/s)"]
    labels = [
        ("core_raw_aesni_mbps", "host core, raw OCB, AES-NI path"),
        ("core_raw_portable_mbps", "host core, raw OCB, portable path"),
        ("core_export_mbps", "host core, EXPORT_BATCH (records, zero check, chain)"),
        ("core_import_mbps", "host core, IMPORT_BATCH (verify, then write)"),
        ("openssl_ocb_per_page", "OpenSSL AESOCB3, one call per page"),
        ("openssl_gcm_per_page", "OpenSSL AES-256-GCM, one call per page"),
        ("openssl_gcm_bulk_1mib", "OpenSSL AES-256-GCM, 1 MiB messages"),
    ]
    for key, label in labels:
        lines.append(f"  {label:<56} {results[key]:9.0f}")
    lines.append(f"  ratio export / OpenSSL GCM per page: {results['ratio_export_vs_openssl_gcm_per_page']:.2f}")
    lines.append(f"  ratio export / OpenSSL GCM bulk:     {results['ratio_export_vs_openssl_gcm_bulk']:.2f}")
    lines.append(f"  ratio raw OCB / OpenSSL OCB per page: {results['ratio_raw_vs_openssl_ocb_per_page']:.2f}")
    if "firmware_export_mbps" in results:
        lines.append(f"firmware helper under TCG, {results['firmware_guest_mib']:.0f} MiB guest, through the mailbox")
        for kind in ("export", "import"):
            mbps = results[f"firmware_{kind}_mbps"]
            pages_per_s = results[f"firmware_{kind}_pages_per_s"]
            lines.append(f"  {kind} {mbps:7.1f} MB/s ({pages_per_s:.0f} pages/s)")
        lines.append(f"  NOP round trip {results['firmware_nop_round_trip_us']:.1f} us; mailbox overhead "
                     f"{100 * results['firmware_mailbox_overhead']:.3f}% of export time")
    return lines


# --- ovmf-mh bench pipeline ---------------------------------------------------------
#
# Throughputs count the transfer only (TransferSummary.transfer_seconds):
# from all helpers READY to the DONE frame written (export) or the last end
# record verified (import). Starting and stopping helpers and the import's
# fsync are fixed costs that do not scale with helpers; the report gives
# them separately.


def _pipeline_run(
    kind: str, helpers: int, src: Path, key: bytes, work: Path, firmware: Path | None
) -> dict[str, float]:
    from host_shim.transfer.pipeline import export_ram, import_ram

    stream = work / f"{kind}-{helpers}.omh"
    dst = work / f"{kind}-{helpers}.ram"
    with stream.open("wb") as sink:
        exported = export_ram(src, key, sink, kind=kind, helpers=helpers, firmware=firmware,
                              work_dir=work / f"export-{kind}-{helpers}", progress=False)
    with stream.open("rb") as source:
        imported = import_ram(dst, key, source, kind=kind, firmware=firmware,
                              work_dir=work / f"import-{kind}-{helpers}", progress=False)
    if dst.read_bytes() != src.read_bytes():
        raise RuntimeError(f"{kind} pipeline with {helpers} helper(s) did not reproduce the RAM file")
    size = exported.guest_bytes
    stream.unlink()
    dst.unlink()
    return {
        "export_mbps": _mbps(size, exported.transfer_seconds),
        "import_mbps": _mbps(size, imported.transfer_seconds),
        "export_total_s": exported.seconds,
        "import_total_s": imported.seconds,
        "helper_start_s": exported.helper_start_seconds,
        "import_fixed_s": imported.seconds - imported.transfer_seconds,
    }


def _best_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per measure, the best of several runs: rates highest, times lowest."""
    return {
        name: (max if name.endswith("_mbps") else min)(run[name] for run in runs)
        for name in runs[0]
    }


def _reference_alone(src: Path, key: bytes, work: Path) -> float:
    """The pipeline's reference helper process driven directly: EXPORT_BEGIN,
    EXPORT_BATCH over every page, EXPORT_END, nothing written anywhere. What
    the pipeline would reach if the shim cost nothing."""
    from host_shim.helpers.backends import DATA_SIZE, mailbox_backend
    from host_shim.helpers.reference_process import ReferenceHelperProcess
    from host_shim.transfer.pipeline import IO_AT, LIST_AT

    batch = abi.load().const("OVMF_MH_MAX_BATCH_PAGES")
    record = PAGE_RECORD_SIZE
    pages = src.stat().st_size // PAGE
    with ReferenceHelperProcess(src, key, work / "reference-alone", target=False,
                                mailbox_size=DATA_SIZE + PAGE) as process:
        process.wait_ready(60)
        backend = mailbox_backend(process, None, DATA_SIZE)
        try:
            start = time.perf_counter()
            if backend.call("EXPORT_BEGIN", IO_AT, record, 0, LIST_AT, 0, 1)[0]:
                raise RuntimeError("reference EXPORT_BEGIN failed")
            for first in range(0, pages, batch):
                count = min(batch, pages - first)
                backend.data[LIST_AT : LIST_AT + 8 * count] = _page_list(first, count)
                status, _ = backend.call("EXPORT_BATCH", LIST_AT, count, IO_AT, count * record)
                if status:
                    raise RuntimeError(f"reference EXPORT_BATCH status {status:#x}")
            if backend.call("EXPORT_END", IO_AT, record)[0]:
                raise RuntimeError("reference EXPORT_END failed")
            return _mbps(pages * PAGE, time.perf_counter() - start)
        finally:
            backend.release()


def bench_pipeline(
    *, guest_mib: int = 128, helpers: int = 2, firmware: Path | None = None, rounds: int = 3,
    profile: bool = False,
) -> dict[str, Any]:
    """The shim's overhead and the helpers' scaling, side by side in one run.

    The 1-helper and N-helper runs alternate, ``rounds`` times each, and the
    best of each counts: on a shared machine a burst of load then hits one
    round, not one configuration."""
    results: dict[str, Any] = {"guest_mib": guest_mib, "helpers": helpers, "rounds": rounds}
    size = guest_mib * MIB
    key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="ovmf-mh-bench-pipeline-", dir=Path.cwd()) as tmp:
        work = Path(tmp)
        src = work / "src.ram"
        src.write_bytes(os.urandom(size))

        copy_seconds = _best(2, lambda: __import__("shutil").copyfile(src, work / "copy.ram"))
        (work / "copy.ram").unlink()
        results["plain_copy_mbps"] = _mbps(size, copy_seconds)

        data = src.read_bytes()
        ocb = AESOCB3(key)
        nonces = [os.urandom(12) for _ in range(size // PAGE)]
        ad = bytes(40)

        def raw() -> None:
            view = memoryview(data)
            for index, nonce in enumerate(nonces):
                ocb.encrypt(nonce, view[index * PAGE : (index + 1) * PAGE], ad)

        results["raw_aead_mbps"] = _mbps(size, _best(2, raw))
        alone, ref_one, ref_n = [], [], []
        for _ in range(rounds):
            alone.append(_reference_alone(src, key, work))
            ref_one.append(_pipeline_run("reference", 1, src, key, work, None))
            ref_n.append(_pipeline_run("reference", helpers, src, key, work, None))
        reference, reference_n = _best_runs(ref_one), _best_runs(ref_n)
        results["reference_helper_alone_mbps"] = max(alone)
        results["reference_export_mbps"] = reference["export_mbps"]
        results["reference_import_mbps"] = reference["import_mbps"]
        results[f"reference_{helpers}_export_mbps"] = reference_n["export_mbps"]
        results["ratio_reference_vs_raw_aead"] = reference["export_mbps"] / results["raw_aead_mbps"]
        results["ratio_reference_helper_alone_vs_raw_aead"] = (
            results["reference_helper_alone_mbps"] / results["raw_aead_mbps"]
        )
        # The shim's own cost: the same helper driven by the pipeline, or directly.
        results["ratio_reference_pipeline_vs_helper_alone"] = (
            reference["export_mbps"] / results["reference_helper_alone_mbps"]
        )
        results[f"ratio_reference_{helpers}_vs_raw_aead"] = (
            reference_n["export_mbps"] / results["raw_aead_mbps"]
        )
        if profile:
            from host_shim.devtools.profile_reference import profile_reference

            results["reference_profile_us_per_page"] = profile_reference(src)
        if firmware is not None:
            runs_one, runs_n = [], []
            for _ in range(rounds):
                runs_one.append(_pipeline_run("firmware", 1, src, key, work, firmware))
                runs_n.append(_pipeline_run("firmware", helpers, src, key, work, firmware))
            one, many = _best_runs(runs_one), _best_runs(runs_n)
            results["firmware_1_export_mbps"] = one["export_mbps"]
            results["firmware_1_import_mbps"] = one["import_mbps"]
            results[f"firmware_{helpers}_export_mbps"] = many["export_mbps"]
            results[f"firmware_{helpers}_import_mbps"] = many["import_mbps"]
            results["firmware_export_rounds_mbps"] = {
                "1": [run["export_mbps"] for run in runs_one],
                str(helpers): [run["export_mbps"] for run in runs_n],
            }
            results["firmware_import_rounds_mbps"] = {
                "1": [run["import_mbps"] for run in runs_one],
                str(helpers): [run["import_mbps"] for run in runs_n],
            }
            results["firmware_helper_start_s"] = many["helper_start_s"]
            results["firmware_import_fixed_s"] = many["import_fixed_s"]
            results["ratio_firmware_n_vs_1_export"] = many["export_mbps"] / one["export_mbps"]
            results["ratio_firmware_n_vs_1_import"] = many["import_mbps"] / one["import_mbps"]
            results["ratio_firmware_n_export_vs_plain_copy"] = many["export_mbps"] / results["plain_copy_mbps"]
    return results


def format_pipeline_report(results: dict[str, Any]) -> list[str]:
    n = results["helpers"]
    lines = [
        f"pipeline, {results['guest_mib']} MiB of random guest RAM, file transport (MB/s = 10^6 B/s); "
        f"best of {results['rounds']} alternating rounds; transfer time only (helper start/stop and "
        "the import's fsync excluded, shown below)"
    ]
    rows = [
        ("plain_copy_mbps", "plain copy of the RAM file (baseline)"),
        ("raw_aead_mbps", "raw AEAD (pyca AESOCB3, one call per page)"),
        ("reference_helper_alone_mbps", "reference helper process alone (no writes)"),
        ("reference_export_mbps", "reference helper pipeline, export"),
        ("reference_import_mbps", "reference helper pipeline, import"),
        (f"reference_{n}_export_mbps", f"{n} reference helpers pipeline, export"),
        ("firmware_1_export_mbps", "1 firmware helper, export"),
        ("firmware_1_import_mbps", "1 firmware helper, import"),
        (f"firmware_{n}_export_mbps", f"{n} firmware helpers, export"),
        (f"firmware_{n}_import_mbps", f"{n} firmware helpers, import"),
    ]
    for key, label in rows:
        if key in results:
            lines.append(f"  {label:<50} {results[key]:9.1f}")
    lines.append(f"  ratio reference pipeline / raw AEAD: {results['ratio_reference_vs_raw_aead']:.2f} "
                 f"({n} helpers: {results[f'ratio_reference_{n}_vs_raw_aead']:.2f})")
    lines.append(f"  ratio reference helper alone / raw AEAD: "
                 f"{results['ratio_reference_helper_alone_vs_raw_aead']:.2f}")
    lines.append(
        "  ratio reference pipeline / reference helper alone (the shim's overhead): "
        f"{results['ratio_reference_pipeline_vs_helper_alone']:.2f}"
    )
    if "ratio_firmware_n_vs_1_export" in results:
        lines.append(f"  ratio {n} / 1 firmware helpers: export {results['ratio_firmware_n_vs_1_export']:.2f}, "
                     f"import {results['ratio_firmware_n_vs_1_import']:.2f}")
        for kind in ("export", "import"):
            rounds = results[f"firmware_{kind}_rounds_mbps"]
            lines.append(f"  {kind} rounds: " + "; ".join(
                f"{count} helper(s) " + " ".join(f"{v:.1f}" for v in values) for count, values in rounds.items()))
        lines.append(f"  helper start {results['firmware_helper_start_s']:.2f} s; import's stop, msync, fsync "
                     f"and rename {results['firmware_import_fixed_s']:.2f} s (excluded above)")
    return lines
