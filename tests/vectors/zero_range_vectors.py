"""Write the known-answer page stream with zero ranges,
``stream-v3-zero-range.json`` (ABI 2.1): a fixed transport key and salt,
shard 1 of an unbound two-shard export, PAGE, ZERO and ZERO_RANGE records
mixed, encoded by a minimal encoder written here directly on pyca
``cryptography`` (HKDF, AESOCB3), hmac and hashlib from
docs/stream-format.md alone; and the receipt the target helper gives
after importing it.

Like stream_vectors.py, this does not import helper/stream.py, so that a
mistake in the codec's ZERO_RANGE record (payload, associated data, nonce,
chain, record count) shows up as a difference. Layouts and constants come
from HelperAbi.h through helper.abi. The stream is unbound (no challenge)
so that any helper, also one whose entropy the test cannot choose (the C
core, the firmware), can import it.

Run ``python tests/vectors/zero_range_vectors.py`` to rewrite the file;
``--check`` only checks that the file on disk matches.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from helper import abi

VECTORS_DIR = Path(__file__).resolve().parent
OUTPUT = VECTORS_DIR / "stream-v3-zero-range.json"

A = abi.load()
PAGE = A.const("OVMF_MH_PAGE_SIZE")
KEY_SIZE = A.const("OVMF_MH_KEY_SIZE")
TAG_SIZE = A.const("OVMF_MH_TAG_SIZE")
BLOCK = A.const("OVMF_MH_SHARD_BLOCK_PAGES")
TYPES = {name: A.const(f"OVMF_MH_RECORD_{name}") for name in ("PAGE", "ZERO", "END", "ZERO_RANGE")}
HEADER = A.layout("OVMF_MH_STREAM_HEADER")
RECORD = A.layout("OVMF_MH_RECORD_HEADER")
END_PAYLOAD = A.layout("OVMF_MH_END_PAYLOAD")
RECEIPT = A.layout("OVMF_MH_RECEIPT")
OKM_SIZE = KEY_SIZE + A.const("OVMF_MH_SESSION_ID_SIZE")

# docs/stream-format.md, "Key schedule", "End payload", "Receipts".
KDF_INFO = b"ovmf-mh v2 stream"
CHAIN_LABEL = b"ovmf-mh v2 chain"
RECEIPT_INFO = b"ovmf-mh v2 receipt"

TRANSPORT_KEY = hashlib.sha256(b"ovmf-mh zero-range transport key").digest()
SALT = hashlib.sha256(b"ovmf-mh zero-range salt").digest()
MIGRATION_ID = hashlib.sha256(b"ovmf-mh zero-range migration id").digest()
SHARD_INDEX, SHARD_COUNT = 1, 2
#: Four shard blocks: shard 1 owns blocks 1 and 3.
GUEST_PAGES = 4 * BLOCK


def _noise(label: bytes) -> bytes:
    return b"".join(hashlib.sha256(label + i.to_bytes(4, "little")).digest() for i in range(PAGE // 32))


def _records() -> list[tuple[str, str, int, int, bytes]]:
    """(description, type, guest offset, pages, content of the first page) in stream order."""
    return [
        ("page", "PAGE", (BLOCK + 5) * PAGE, 1, _noise(b"page 517")),
        ("zero range: the start of block 1", "ZERO_RANGE", BLOCK * PAGE, 5, bytes(PAGE)),
        ("zero range: the rest of block 1", "ZERO_RANGE", (BLOCK + 6) * PAGE, BLOCK - 6, bytes(PAGE)),
        ("zero range: all of block 3", "ZERO_RANGE", 3 * BLOCK * PAGE, BLOCK, bytes(PAGE)),
        ("zero page in block 3 (again, a later pass)", "ZERO", (3 * BLOCK + 9) * PAGE, 1, bytes(PAGE)),
        ("last page of the guest", "PAGE", (GUEST_PAGES - 1) * PAGE, 1, bytes(PAGE - 1) + b"\x01"),
    ]


def _nonce(sequence: int) -> bytes:
    return bytes(4) + sequence.to_bytes(8, "little")


def build() -> dict[str, Any]:
    binding = (
        bytes(4) + SHARD_INDEX.to_bytes(4, "little") + SHARD_COUNT.to_bytes(4, "little") + MIGRATION_ID + bytes(32)
    )
    info = KDF_INFO + binding
    okm = HKDF(algorithm=hashes.SHA256(), length=OKM_SIZE, salt=SALT, info=info).derive(TRANSPORT_KEY)
    key, session_id = okm[:KEY_SIZE], okm[KEY_SIZE:]
    ocb = AESOCB3(key)
    header_ad = HEADER.pack(
        Magic=A.const("OVMF_MH_STREAM_MAGIC"), Version=A.const("OVMF_MH_STREAM_VERSION"), HeaderSize=HEADER.size,
        Flags=0, ShardIndex=SHARD_INDEX, ShardCount=SHARD_COUNT, MigrationId=MIGRATION_ID, TargetNonce=bytes(32),
        Salt=SALT, SessionId=session_id, GuestSize=GUEST_PAGES * PAGE,
    )[: HEADER.offset("Tag")]
    assert header_ad[12:88] == binding
    header = header_ad + ocb.encrypt(_nonce(0), b"", header_ad)

    chain = [hashlib.sha256(CHAIN_LABEL + session_id).digest()]
    records: list[dict[str, Any]] = []
    for sequence, (description, kind, offset, pages, content) in enumerate(_records(), start=1):
        if kind == "PAGE":
            plaintext = content
        elif kind == "ZERO":
            plaintext = b""
        else:  # OVMF_MH_ZERO_RANGE_PAYLOAD: UINT64 PageCount
            plaintext = pages.to_bytes(8, "little")
        ad = RECORD.pack(Type=TYPES[kind], PayloadSize=len(plaintext), Sequence=sequence, GuestOffset=offset,
                         SessionId=session_id)
        sealed = ad + ocb.encrypt(_nonce(sequence), plaintext, ad)
        chain.append(hashlib.sha256(chain[-1] + sealed[-TAG_SIZE:]).digest())
        records.append({"description": description, "type": TYPES[kind], "sequence": sequence,
                        "guest_offset": offset, "pages": pages, "page": content.hex(), "record": sealed.hex()})

    count = len(records)
    # No shared pages: the END seals their count 0 and the digest of none (ABI 4.0).
    end_payload = END_PAYLOAD.pack(RecordCount=count, ChainDigest=chain[-1], SharedPageCount=0,
                                   SharedDigest=hashlib.sha256(b"ovmf-mh v3 shared pages").digest())
    end_ad = RECORD.pack(Type=TYPES["END"], PayloadSize=END_PAYLOAD.size, Sequence=count + 1, GuestOffset=0,
                         SessionId=session_id)
    end_record = end_ad + ocb.encrypt(_nonce(count + 1), end_payload, end_ad)
    stream = header + b"".join(bytes.fromhex(r["record"]) for r in records) + end_record
    receipt_key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=MIGRATION_ID,
                       info=RECEIPT_INFO).derive(TRANSPORT_KEY)
    receipt_body = RECEIPT.pack(
        MigrationId=MIGRATION_ID, ShardIndex=SHARD_INDEX, ShardCount=SHARD_COUNT, Flags=0, Reserved=0,
        RecordCount=count, ChainDigest=chain[-1],
    )[: RECEIPT.offset("Mac")]
    receipt = receipt_body + hmac.new(receipt_key, receipt_body, hashlib.sha256).digest()
    return {
        "description": "ovmf-mh page stream v3 with ZERO_RANGE records (ABI 2.1, docs/stream-format.md); "
                       "written by zero_range_vectors.py",
        "transport_key": TRANSPORT_KEY.hex(),
        "salt": SALT.hex(),
        "migration_id": MIGRATION_ID.hex(),
        "shard_index": SHARD_INDEX,
        "shard_count": SHARD_COUNT,
        "session_key": key.hex(),
        "session_id": session_id.hex(),
        "guest_size": GUEST_PAGES * PAGE,
        "header": header.hex(),
        "records": records,
        "chain": [d.hex() for d in chain],
        "end_record": end_record.hex(),
        "stream": stream.hex(),
        "receipt": receipt.hex(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file on disk matches")
    options = parser.parse_args(argv)
    text = render()
    if options.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
