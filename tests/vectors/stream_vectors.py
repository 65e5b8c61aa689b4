"""Write the known-answer page stream ``stream-v3.json``: a fixed transport
key, a fixed salt, shard 1 of a two-shard migration bound to two fixed
target nonces, and a few pages (one all zero), encoded by a minimal encoder
written here directly on pyca ``cryptography`` (HKDF, AESOCB3), hmac and
hashlib, from docs/stream-format.md alone, with the two shared pages its
END record seals (ABI 4.0); and the receipt the target helper gives after
importing it.

The encoder deliberately does not import helper/stream.py: the vector is a
second reading of the format document, so a mistake in the codec (key
schedule, nonce, associated data, zero detection, chain) shows up as a
difference instead of being copied into the expected bytes. Structure
layouts and constants still come from HelperAbi.h through helper.abi, the one
definition of them (tests/test_abi.py checks that parse against gcc).

Besides the stream, the file holds the intermediate values (migration id,
KDF info, OKM, session key, session id, every nonce, D(0)..D(N), the shared
pages and their digest, the end payload, the receipt key) so that an implementation can be debugged step
by step. The commit proof (ABI 4.1) target helper 0 gives once it committed
this receipt and shard 0's (a fixed receipt here: shard 0's stream is not
in the file) closes it, with its key and the digest of the receipts.

Run ``python tests/vectors/stream_vectors.py`` to rewrite the file;
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
OUTPUT = VECTORS_DIR / "stream-v3.json"

A = abi.load()
PAGE = A.const("OVMF_MH_PAGE_SIZE")
KEY_SIZE = A.const("OVMF_MH_KEY_SIZE")
TAG_SIZE = A.const("OVMF_MH_TAG_SIZE")
PAGE_RECORD, ZERO_RECORD, END_RECORD = (A.const(f"OVMF_MH_RECORD_{t}") for t in ("PAGE", "ZERO", "END"))
HEADER = A.layout("OVMF_MH_STREAM_HEADER")
RECORD = A.layout("OVMF_MH_RECORD_HEADER")
END_PAYLOAD = A.layout("OVMF_MH_END_PAYLOAD")
RECEIPT = A.layout("OVMF_MH_RECEIPT")
PROOF = A.layout("OVMF_MH_COMMIT_PROOF")
OKM_SIZE = KEY_SIZE + A.const("OVMF_MH_SESSION_ID_SIZE")

# docs/stream-format.md, "Key schedule", "End payload" and "Receipts".
KDF_INFO = b"ovmf-mh v2 stream"
CHAIN_LABEL = b"ovmf-mh v2 chain"
RECEIPT_INFO = b"ovmf-mh v2 receipt"
COMMIT_PROOF_INFO = b"ovmf-mh v4 commit proof"  # "Commit proof"
COMMIT_RECEIPTS_LABEL = b"ovmf-mh v4 committed receipts"
COMMITTED = 1  # the proof's Outcome
SHARED_LABEL = b"ovmf-mh v3 shared pages"  # "End payload": the digest of a shard's shared pages
BOUND = 1  # the header's Flags bit of a bound stream

# The labels of the fixed inputs are those of the version 2 vector: same key, salt and nonces.
TRANSPORT_KEY = hashlib.sha256(b"ovmf-mh stream-v2 transport key").digest()
SALT = hashlib.sha256(b"ovmf-mh stream-v2 salt").digest()
#: The two target helpers' challenge nonces; the stream is shard 1.
TARGET_NONCES = [hashlib.sha256(b"ovmf-mh stream-v2 target nonce %d" % i).digest() for i in range(2)]
SHARD_INDEX = 1
GUEST_PAGES = 16


def _noise(label: bytes, size: int) -> bytes:
    """Deterministic page content: SHA-256 in counter mode."""
    return b"".join(hashlib.sha256(label + i.to_bytes(4, "little")).digest() for i in range(size // 32))


def _pages() -> list[tuple[str, int, bytes]]:
    """(description, guest offset, content) in stream order."""
    last_byte_set = bytes(PAGE - 1) + b"\x01"
    return [
        ("noise", 0x2000, _noise(b"page 0x2000", PAGE)),
        ("zero", 0x0000, bytes(PAGE)),
        ("byte pattern", 0x5000, bytes((7 * i + 3) & 0xFF for i in range(PAGE))),
        ("last byte set (not a zero page)", (GUEST_PAGES - 1) * PAGE, last_byte_set),
        ("zero again", 0x1000, bytes(PAGE)),
    ]


def _shared_pages() -> list[tuple[int, bytes]]:
    """(guest offset, content) of the shard's shared pages, in stream order:
    they travel in plain text beside the stream and are sealed by its END."""
    return [(0x7000, _noise(b"shared page 0x7000", PAGE)), (0x3000, b"\x5a" * PAGE)]


def _nonce(sequence: int) -> bytes:
    return bytes(4) + sequence.to_bytes(8, "little")


def build() -> dict[str, Any]:
    migration_id = hashlib.sha256(b"".join(TARGET_NONCES)).digest()
    # Flags, ShardIndex, ShardCount (UINT32 each), MigrationId, TargetNonce: header bytes 12..87.
    binding = (
        BOUND.to_bytes(4, "little") + SHARD_INDEX.to_bytes(4, "little") + len(TARGET_NONCES).to_bytes(4, "little")
        + migration_id + TARGET_NONCES[SHARD_INDEX]
    )
    info = KDF_INFO + binding
    okm = HKDF(algorithm=hashes.SHA256(), length=OKM_SIZE, salt=SALT, info=info).derive(TRANSPORT_KEY)
    key, session_id = okm[:KEY_SIZE], okm[KEY_SIZE:]
    ocb = AESOCB3(key)

    header_ad = HEADER.pack(
        Magic=A.const("OVMF_MH_STREAM_MAGIC"),
        Version=A.const("OVMF_MH_STREAM_VERSION"),
        HeaderSize=HEADER.size,
        Flags=BOUND,
        ShardIndex=SHARD_INDEX,
        ShardCount=len(TARGET_NONCES),
        MigrationId=migration_id,
        TargetNonce=TARGET_NONCES[SHARD_INDEX],
        Salt=SALT,
        SessionId=session_id,
        GuestSize=GUEST_PAGES * PAGE,
    )[: HEADER.offset("Tag")]
    assert header_ad[:8] == b"OMHSTRM2", "magic as the format document spells it"
    assert header_ad[12:88] == binding, "the binding is header bytes 12..87"
    header = header_ad + ocb.encrypt(_nonce(0), b"", header_ad)

    chain = [hashlib.sha256(CHAIN_LABEL + session_id).digest()]
    records: list[dict[str, Any]] = []
    for sequence, (description, offset, content) in enumerate(_pages(), start=1):
        is_zero = not any(content)
        record_type = ZERO_RECORD if is_zero else PAGE_RECORD
        plaintext = b"" if is_zero else content
        ad = RECORD.pack(
            Type=record_type,
            PayloadSize=len(plaintext),
            Sequence=sequence,
            GuestOffset=offset,
            SessionId=session_id,
        )
        sealed = ad + ocb.encrypt(_nonce(sequence), plaintext, ad)
        chain.append(hashlib.sha256(chain[-1] + sealed[-TAG_SIZE:]).digest())
        records.append(
            {
                "description": description,
                "type": record_type,
                "sequence": sequence,
                "guest_offset": offset,
                "nonce": _nonce(sequence).hex(),
                "page": content.hex(),
                "record": sealed.hex(),
            }
        )

    count = len(records)
    shared = _shared_pages()
    shared_digest = hashlib.sha256(
        SHARED_LABEL + b"".join(offset.to_bytes(8, "little") + content for offset, content in shared)).digest()
    end_payload = END_PAYLOAD.pack(RecordCount=count, ChainDigest=chain[-1], SharedPageCount=len(shared),
                                   SharedDigest=shared_digest)
    end_ad = RECORD.pack(
        Type=END_RECORD, PayloadSize=END_PAYLOAD.size, Sequence=count + 1, GuestOffset=0, SessionId=session_id
    )
    end_record = end_ad + ocb.encrypt(_nonce(count + 1), end_payload, end_ad)

    stream = header + b"".join(bytes.fromhex(r["record"]) for r in records) + end_record
    receipt_key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=migration_id,
                       info=RECEIPT_INFO).derive(TRANSPORT_KEY)
    receipt_body = RECEIPT.pack(
        MigrationId=migration_id, ShardIndex=SHARD_INDEX, ShardCount=len(TARGET_NONCES), Flags=BOUND,
        Reserved=0, RecordCount=count, ChainDigest=chain[-1],
    )[: RECEIPT.offset("Mac")]
    receipt = receipt_body + hmac.new(receipt_key, receipt_body, hashlib.sha256).digest()
    # Shard 0's receipt: fixed values (its stream is not part of this file).
    receipt0_body = RECEIPT.pack(
        MigrationId=migration_id, ShardIndex=0, ShardCount=len(TARGET_NONCES), Flags=BOUND, Reserved=0,
        RecordCount=3, ChainDigest=hashlib.sha256(b"ovmf-mh stream-v2 shard 0 chain").digest(),
    )[: RECEIPT.offset("Mac")]
    receipt0 = receipt0_body + hmac.new(receipt_key, receipt0_body, hashlib.sha256).digest()
    receipts_digest = hashlib.sha256(COMMIT_RECEIPTS_LABEL + receipt0 + receipt).digest()
    commit_key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=migration_id,
                      info=COMMIT_PROOF_INFO).derive(TRANSPORT_KEY)
    proof_body = PROOF.pack(MigrationId=migration_id, ShardCount=len(TARGET_NONCES), Flags=BOUND,
                            Outcome=COMMITTED, Reserved=0, ReceiptsDigest=receipts_digest)[: PROOF.offset("Mac")]
    proof = proof_body + hmac.new(commit_key, proof_body, hashlib.sha256).digest()
    return {
        "description": "ovmf-mh page stream v3 known answer (docs/stream-format.md); written by stream_vectors.py",
        "transport_key": TRANSPORT_KEY.hex(),
        "salt": SALT.hex(),
        "target_nonces": [n.hex() for n in TARGET_NONCES],
        "shard_index": SHARD_INDEX,
        "migration_id": migration_id.hex(),
        "binding": binding.hex(),
        "kdf_info": info.hex(),
        "okm": okm.hex(),
        "session_key": key.hex(),
        "session_id": session_id.hex(),
        "guest_size": GUEST_PAGES * PAGE,
        "page_list": [r["guest_offset"] for r in records],
        "header": header.hex(),
        "records": records,
        "chain": [d.hex() for d in chain],
        "shared_pages": [{"guest_offset": offset, "page": content.hex()} for offset, content in shared],
        "shared_digest": shared_digest.hex(),
        "end_payload": end_payload.hex(),
        "end_record": end_record.hex(),
        "stream": stream.hex(),
        "receipt_key": receipt_key.hex(),
        "receipt": receipt.hex(),
        "receipt_shard0": receipt0.hex(),
        "receipts_digest": receipts_digest.hex(),
        "commit_key": commit_key.hex(),
        "commit_proof": proof.hex(),
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
