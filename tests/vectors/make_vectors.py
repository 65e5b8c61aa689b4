"""Write the known-answer vectors of the page crypto as JSON, after checking
every one of them against pyca ``cryptography`` (OpenSSL).

The values are transcribed from the standards:

* AES: FIPS-197 Appendix B and Appendix C.1 / C.3.
* AES-OCB3: RFC 7253 Appendix A (the AES-128, TAGLEN 128 examples, and the
  iterated "sample results" test whose final outputs the RFC gives for
  AES-128/192/256 with TAGLEN 128).
* SHA-256: the FIPS 180-2 / NIST CSRC examples ("abc", the 448- and 896-bit
  messages, one million "a") and the empty message.
* HMAC-SHA256: RFC 4231 test cases 1, 2, 3, 4, 6, 7 (5 is a truncated MAC).
* HKDF-SHA256: RFC 5869 test cases 1, 2, 3.

Run ``python tests/vectors/make_vectors.py`` to re-check and rewrite the files;
``--check`` only checks that the files on disk match.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VECTORS_DIR = Path(__file__).resolve().parent

Json = dict[str, Any]

# --- FIPS-197 -------------------------------------------------------------

AES_FIPS197: list[Json] = [
    {
        "source": "FIPS-197 Appendix B",
        "key": "2b7e151628aed2a6abf7158809cf4f3c",
        "plaintext": "3243f6a8885a308d313198a2e0370734",
        "ciphertext": "3925841d02dc09fbdc118597196a0b32",
    },
    {
        "source": "FIPS-197 Appendix C.1 (AES-128)",
        "key": "000102030405060708090a0b0c0d0e0f",
        "plaintext": "00112233445566778899aabbccddeeff",
        "ciphertext": "69c4e0d86a7b0430d8cdb78070b4c55a",
    },
    {
        "source": "FIPS-197 Appendix C.3 (AES-256)",
        "key": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "plaintext": "00112233445566778899aabbccddeeff",
        "ciphertext": "8ea2b7ca516745bfeafc49904b496089",
    },
]

# --- RFC 7253 Appendix A --------------------------------------------------

_OCB_KEY = "000102030405060708090A0B0C0D0E0F"
_OCB_MSG = "000102030405060708090A0B0C0D0E0F1011121314151617"
_OCB_MSG += "18191A1B1C1D1E1F2021222324252627"


def _prefix(length: int) -> str:
    return _OCB_MSG[: 2 * length]


# (nonce, AD length, P length, C = ciphertext || tag), RFC 7253 Appendix A.
_OCB_APPENDIX_A: list[tuple[str, int, int, str]] = [
    ("BBAA99887766554433221100", 0, 0, "785407BFFFC8AD9EDCC5520AC9111EE6"),
    ("BBAA99887766554433221101", 8, 8, "6820B3657B6F615A5725BDA0D3B4EB3A257C9AF1F8F03009"),
    ("BBAA99887766554433221102", 8, 0, "81017F8203F081277152FADE694A0A00"),
    ("BBAA99887766554433221103", 0, 8, "45DD69F8F5AAE72414054CD1F35D82760B2CD00D2F99BFA9"),
    (
        "BBAA99887766554433221104",
        16,
        16,
        "571D535B60B277188BE5147170A9A22C3AD7A4FF3835B8C5701C1CCEC8FC3358",
    ),
    ("BBAA99887766554433221105", 16, 0, "8CF761B6902EF764462AD86498CA6B97"),
    (
        "BBAA99887766554433221106",
        0,
        16,
        "5CE88EC2E0692706A915C00AEB8B2396F40E1C743F52436BDF06D8FA1ECA343D",
    ),
    (
        "BBAA99887766554433221107",
        24,
        24,
        "1CA2207308C87C010756104D8840CE1952F09673A448A122C92C62241051F57356D7F3C90BB0E07F",
    ),
    ("BBAA99887766554433221108", 24, 0, "6DC225A071FC1B9F7C69F93B0F1E10DE"),
    (
        "BBAA99887766554433221109",
        0,
        24,
        "221BD0DE7FA6FE993ECCD769460A0AF2D6CDED0C395B1C3CE725F32494B9F914D85C0B1EB38357FF",
    ),
    (
        "BBAA9988776655443322110A",
        32,
        32,
        "BD6F6C496201C69296C11EFD138A467ABD3C707924B964DEAFFC40319AF5A48540FBBA186C5553C68AD9F592A79A4240",
    ),
    ("BBAA9988776655443322110B", 32, 0, "FE80690BEE8A485D11F32965BC9D2A32"),
    (
        "BBAA9988776655443322110C",
        0,
        32,
        "2942BFC773BDA23CABC6ACFD9BFD5835BD300F0973792EF46040C53F1432BCDFB5E1DDE3BC18A5F840B52E653444D5DF",
    ),
    (
        "BBAA9988776655443322110D",
        40,
        40,
        "D5CA91748410C1751FF8A2F618255B68A0A12E093FF454606E59F9C1D0DDC54B"
        "65E8628E568BAD7AED07BA06A4A69483A7035490C5769E60",
    ),
    ("BBAA9988776655443322110E", 40, 0, "C5CD9D1850C141E358649994EE701B68"),
    (
        "BBAA9988776655443322110F",
        0,
        40,
        "4412923493C57D5DE0D700F753CCE0D1D2D95060122E9F15A5DDBFC5787E50B5"
        "CC55EE507BCB084E479AD363AC366B95A98CA5F3000B1479",
    ),
]

# Final outputs of the RFC 7253 Appendix A iterated test, TAGLEN 128.
_OCB_ITERATED: list[tuple[int, str]] = [
    (128, "67E944D23256C5E0B6C61FA22FDF1EA2"),
    (192, "F673F2C3E7174AAE7BAE986CA9F29E17"),
    (256, "D90EB8E9C977C88B79DD793D7FFA161C"),
]

OcbEncrypt = Callable[[bytes, bytes, bytes, bytes], bytes]
"""(key, nonce, associated data, plaintext) -> ciphertext || 16-byte tag."""


def ocb_iterated(encrypt: OcbEncrypt, key_bits: int, tag_bits: int = 128) -> bytes:
    """The RFC 7253 Appendix A iterated test with any OCB implementation."""
    key = bytes(key_bits // 8 - 1) + bytes([tag_bits])
    output = bytearray()
    for i in range(128):
        data = bytes(i)
        output += encrypt(key, (3 * i + 1).to_bytes(12, "big"), data, data)
        output += encrypt(key, (3 * i + 2).to_bytes(12, "big"), b"", data)
        output += encrypt(key, (3 * i + 3).to_bytes(12, "big"), data, b"")
    return encrypt(key, (385).to_bytes(12, "big"), bytes(output), b"")


def _pyca_ocb(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    return AESOCB3(key).encrypt(nonce, plaintext, ad)


# --- SHA-256, HMAC, HKDF ----------------------------------------------------

SHA256: list[Json] = [
    {
        "source": "empty message",
        "message": "",
        "digest": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    },
    {
        "source": "FIPS 180-2 B.1 / NIST example SHA256.pdf: 'abc'",
        "message": b"abc".hex(),
        "digest": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    },
    {
        "source": "FIPS 180-2 B.2: 448-bit message",
        "message": b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".hex(),
        "digest": "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
    },
    {
        "source": "NIST example: 896-bit message",
        "message": (
            b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
            b"hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"
        ).hex(),
        "digest": "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
    },
    {
        "source": "FIPS 180-2 B.3: one million 'a'",
        "repeat": "61",
        "count": 1_000_000,
        "digest": "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
    },
]

HMAC_SHA256: list[Json] = [
    {
        "source": "RFC 4231 test case 1",
        "key": "0b" * 20,
        "data": b"Hi There".hex(),
        "mac": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    },
    {
        "source": "RFC 4231 test case 2",
        "key": b"Jefe".hex(),
        "data": b"what do ya want for nothing?".hex(),
        "mac": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    },
    {
        "source": "RFC 4231 test case 3",
        "key": "aa" * 20,
        "data": "dd" * 50,
        "mac": "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    },
    {
        "source": "RFC 4231 test case 4",
        "key": bytes(range(1, 26)).hex(),
        "data": "cd" * 50,
        "mac": "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    },
    {
        "source": "RFC 4231 test case 6",
        "key": "aa" * 131,
        "data": b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
        "mac": "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    },
    {
        "source": "RFC 4231 test case 7",
        "key": "aa" * 131,
        "data": (
            b"This is a test using a larger than block-size key and a larger than "
            b"block-size data. The key needs to be hashed before being used by the "
            b"HMAC algorithm."
        ).hex(),
        "mac": "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    },
]

HKDF_SHA256: list[Json] = [
    {
        "source": "RFC 5869 test case 1",
        "ikm": "0b" * 22,
        "salt": bytes(range(0x00, 0x0D)).hex(),
        "info": bytes(range(0xF0, 0xFA)).hex(),
        "length": 42,
        "prk": "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "okm": "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    },
    {
        "source": "RFC 5869 test case 2",
        "ikm": bytes(range(0x00, 0x50)).hex(),
        "salt": bytes(range(0x60, 0xB0)).hex(),
        "info": bytes(range(0xB0, 0x100)).hex(),
        "length": 82,
        "prk": "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "okm": "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    },
    {
        "source": "RFC 5869 test case 3 (empty salt and info)",
        "ikm": "0b" * 22,
        "salt": "",
        "info": "",
        "length": 42,
        "prk": "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "okm": "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    },
]


def sha256_message(vector: Json) -> bytes:
    """The message of a SHA256 vector (literal, or a repeated byte string)."""
    if "repeat" in vector:
        return bytes.fromhex(vector["repeat"]) * int(vector["count"])
    return bytes.fromhex(vector["message"])


# --- checks against pyca ----------------------------------------------------


class VectorError(AssertionError):
    """A transcribed vector disagrees with the reference implementation."""


def _expect(what: str, got: bytes, want: str) -> None:
    if got != bytes.fromhex(want):
        raise VectorError(f"{what}: reference gives {got.hex()}, vector says {want.lower()}")


def build_files() -> dict[str, Json]:
    """Check every vector against pyca cryptography / hashlib and return the files."""
    for vector in AES_FIPS197:
        encryptor = Cipher(algorithms.AES(bytes.fromhex(vector["key"])), modes.ECB()).encryptor()
        ciphertext = encryptor.update(bytes.fromhex(vector["plaintext"])) + encryptor.finalize()
        _expect(vector["source"], ciphertext, vector["ciphertext"])

    appendix_a: list[Json] = []
    for nonce, ad_length, plain_length, expected in _OCB_APPENDIX_A:
        vector = {
            "key": _OCB_KEY.lower(),
            "nonce": nonce.lower(),
            "ad": _prefix(ad_length).lower(),
            "plaintext": _prefix(plain_length).lower(),
            "ciphertext": expected.lower(),
        }
        got = _pyca_ocb(
            bytes.fromhex(vector["key"]),
            bytes.fromhex(vector["nonce"]),
            bytes.fromhex(vector["ad"]),
            bytes.fromhex(vector["plaintext"]),
        )
        _expect(f"RFC 7253 A, nonce {nonce}", got, expected)
        appendix_a.append(vector)

    iterated: list[Json] = []
    for key_bits, expected in _OCB_ITERATED:
        _expect(f"RFC 7253 iterated AES-{key_bits}", ocb_iterated(_pyca_ocb, key_bits), expected)
        iterated.append({"key_bits": key_bits, "tag_bits": 128, "output": expected.lower()})

    for vector in SHA256:
        _expect(vector["source"], hashlib.sha256(sha256_message(vector)).digest(), vector["digest"])
        digest = hashes.Hash(hashes.SHA256())
        digest.update(sha256_message(vector))
        _expect(vector["source"] + " (pyca)", digest.finalize(), vector["digest"])

    for vector in HMAC_SHA256:
        mac = hmac.new(bytes.fromhex(vector["key"]), bytes.fromhex(vector["data"]), hashlib.sha256).digest()
        _expect(vector["source"], mac, vector["mac"])

    for vector in HKDF_SHA256:
        salt = bytes.fromhex(vector["salt"])
        ikm = bytes.fromhex(vector["ikm"])
        prk = hmac.new(salt if salt else bytes(32), ikm, hashlib.sha256).digest()
        _expect(vector["source"] + " PRK", prk, vector["prk"])
        okm = HKDF(
            algorithm=hashes.SHA256(),
            length=int(vector["length"]),
            salt=salt if salt else None,
            info=bytes.fromhex(vector["info"]),
        ).derive(ikm)
        _expect(vector["source"] + " OKM", okm, vector["okm"])

    return {
        "aes_fips197.json": {"vectors": AES_FIPS197},
        "ocb3_rfc7253.json": {
            "source": "RFC 7253 Appendix A",
            "appendix_a_aes128_tag128": appendix_a,
            "iterated": iterated,
        },
        "sha256_nist.json": {"vectors": SHA256},
        "hmac_sha256_rfc4231.json": {"vectors": HMAC_SHA256},
        "hkdf_sha256_rfc5869.json": {"vectors": HKDF_SHA256},
    }


def render(content: Json) -> str:
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check and write the page crypto vectors")
    parser.add_argument("--check", action="store_true", help="only compare with the files")
    arguments = parser.parse_args(argv)
    files = build_files()
    stale = [
        name
        for name, content in files.items()
        if not (VECTORS_DIR / name).is_file() or (VECTORS_DIR / name).read_text() != render(content)
    ]
    if arguments.check:
        for name in stale:
            print(f"{name} is missing or out of date", file=sys.stderr)
        return 1 if stale else 0
    for name, content in files.items():
        (VECTORS_DIR / name).write_text(render(content))
    print(f"checked against pyca cryptography and wrote {len(files)} files to {VECTORS_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
