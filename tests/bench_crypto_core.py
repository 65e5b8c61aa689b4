"""Throughput of the helper's AES-256-OCB3 on 4 KiB pages, next to pyca
cryptography's (OpenSSL's) AESOCB3 and AESGCM on the same data in the same run.

Not a test: ``python tests/bench_crypto_core.py [--pages N] [--rounds R]``.

The helper's numbers come from one ctypes call per batch (its C loop encrypts
every page with its own nonce and 8 bytes of associated data, as the helper
does). The OpenSSL numbers are given two ways: one Python call per page (the
same per-page work, plus Python's call overhead) and one call on the whole
buffer as a single message (OpenSSL's bulk rate, no per-page cost).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from host_shim import hostcore as hostlib

PAGE_SIZE = 4096
AD_SIZE = 8


def best_rate(label: str, size: int, rounds: int, run: Callable[[], object]) -> float:
    """Run ``run`` ``rounds`` times, print and return the best rate in MB/s (10^6 B/s)."""
    run()  # warm up caches, page in buffers
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    rate = size / best / 1e6
    print(f"  {label:<58} {rate:9.0f} MB/s")
    return rate


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=2048, help="pages per batch (default 2048 = 8 MiB)")
    parser.add_argument("--rounds", type=int, default=7, help="timed repetitions; the best counts")
    arguments = parser.parse_args(argv)

    lib = hostlib.load()
    pointer, size_t, integer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.mh_ocb_encrypt_pages.argtypes = [pointer, size_t, pointer, pointer, size_t, pointer]
    lib.mh_ocb_encrypt_pages.argtypes += [size_t, size_t, pointer, pointer, integer]
    lib.mh_ocb_encrypt_pages.restype = integer
    lib.mh_ocb_decrypt_pages.argtypes = lib.mh_ocb_encrypt_pages.argtypes
    lib.mh_ocb_decrypt_pages.restype = size_t
    lib.mh_cpu_has_aesni.restype = integer

    count = arguments.pages
    total = count * PAGE_SIZE
    key = os.urandom(32)
    nonces = os.urandom(12 * count)
    ads = os.urandom(AD_SIZE * count)
    pages = os.urandom(total)
    cipher = ctypes.create_string_buffer(total)
    plain = ctypes.create_string_buffer(total)
    tags = ctypes.create_string_buffer(16 * count)

    print(f"{cpu_model()}; AES-NI detected: {bool(lib.mh_cpu_has_aesni())}")
    print(f"{count} pages of {PAGE_SIZE} bytes ({total / 2**20:.0f} MiB), AES-256, best of {arguments.rounds}")

    def encrypt(portable: int) -> Callable[[], object]:
        def run() -> object:
            path = lib.mh_ocb_encrypt_pages(
                key, 32, nonces, ads, AD_SIZE, pages, PAGE_SIZE, count, cipher, tags, portable
            )
            if path == 0:
                raise RuntimeError("mh_ocb_encrypt_pages failed")
            return path

        return run

    def decrypt() -> object:
        verified = lib.mh_ocb_decrypt_pages(key, 32, nonces, ads, AD_SIZE, cipher, PAGE_SIZE, count, tags, plain, 0)
        if verified != count:
            raise RuntimeError(f"only {verified} of {count} pages verified")
        return verified

    print("helper (C, one call per batch):")
    ours = best_rate("OCB3 encrypt, AES-NI path, per page", total, arguments.rounds, encrypt(0))
    best_rate("OCB3 decrypt, AES-NI path, per page", total, arguments.rounds, decrypt)
    if plain.raw != pages:
        raise RuntimeError("decryption did not give the pages back")
    best_rate("OCB3 encrypt, portable path, per page", total, max(1, arguments.rounds // 3), encrypt(1))

    ocb = AESOCB3(key)
    gcm = AESGCM(key)
    views = [pages[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(count)]
    page_nonces = [nonces[12 * i : 12 * i + 12] for i in range(count)]
    page_ads = [ads[AD_SIZE * i : AD_SIZE * (i + 1)] for i in range(count)]

    def per_page(aead: AESOCB3 | AESGCM) -> Callable[[], object]:
        def run() -> object:
            encrypt_page = aead.encrypt
            return [encrypt_page(n, p, a) for n, p, a in zip(page_nonces, views, page_ads, strict=True)]

        return run

    print("pyca cryptography / OpenSSL (Python loop, one call per page):")
    openssl_ocb = best_rate("AESOCB3 encrypt, per page", total, arguments.rounds, per_page(ocb))
    openssl_gcm = best_rate("AESGCM encrypt, per page", total, arguments.rounds, per_page(gcm))
    print("pyca cryptography / OpenSSL (whole buffer as one message):")
    best_rate("AESOCB3 encrypt, one message", total, arguments.rounds, lambda: ocb.encrypt(nonces[:12], pages, b""))
    best_rate("AESGCM encrypt, one message", total, arguments.rounds, lambda: gcm.encrypt(nonces[:12], pages, b""))

    print(
        f"helper AES-NI OCB3 per page: {ours:.0f} MB/s = {ours / openssl_ocb:.2f}x OpenSSL OCB3, "
        f"{ours / openssl_gcm:.2f}x OpenSSL GCM (per page)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
