"""The known-answer stream (tests/vectors/stream-v3.json, written by an
encoder independent of helper/stream.py) against the codec and the
reference helper."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from helper import abi
from helper import commit_proof as cp
from helper import stream as s
from helper.reference import ReferenceHelper
from host_shim.helpers.keys import secret_record

VECTORS = Path(__file__).resolve().parent / "vectors"
VECTOR_FILE = VECTORS / "stream-v3.json"
sys.path.insert(0, str(VECTORS))
import stream_vectors  # noqa: E402

A = abi.load()


@pytest.fixture(scope="module")
def vector() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTOR_FILE.read_text())
    return loaded


def _b(vector: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(vector[name])


def test_file_is_what_the_generator_writes() -> None:
    assert stream_vectors.main(["--check"]) == 0


def _binding(vector: dict[str, Any]) -> s.Binding:
    return s.Binding.bound([bytes.fromhex(n) for n in vector["target_nonces"]], vector["shard_index"])


def test_binding_and_migration_id(vector: dict[str, Any]) -> None:
    binding = _binding(vector)
    assert binding.migration_id == _b(vector, "migration_id")
    assert binding.pack() == _b(vector, "binding") == _b(vector, "header")[s.BINDING_OFFSET : s.BINDING_OFFSET + 76]
    assert _b(vector, "kdf_info") == s.KDF_INFO + binding.pack()


def test_key_schedule_by_rfc5869_steps(vector: dict[str, Any]) -> None:
    """HKDF spelled out with HMAC (extract, then expand), so that swapped salt
    and key in both encoders would still be caught."""
    prk = hmac.new(_b(vector, "salt"), _b(vector, "transport_key"), hashlib.sha256).digest()
    info = _b(vector, "kdf_info")
    t1 = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + info + b"\x02", hashlib.sha256).digest()
    assert (t1 + t2)[: s.OKM_SIZE] == _b(vector, "okm")
    keys = s.derive_session(_b(vector, "transport_key"), _b(vector, "salt"), _binding(vector).pack())
    assert keys.key + keys.session_id == _b(vector, "okm")
    assert keys.session_id == _b(vector, "session_id")


def test_codec_pieces(vector: dict[str, Any]) -> None:
    writer = s.StreamWriter(_b(vector, "transport_key"), _b(vector, "salt"), vector["guest_size"], _binding(vector))
    assert writer.header == _b(vector, "header")
    chain = s.ChainDigest(_b(vector, "session_id"))
    assert chain.digest().hex() == vector["chain"][0]
    for record, expected_chain in zip(vector["records"], vector["chain"][1:], strict=True):
        assert s.nonce(record["sequence"]).hex() == record["nonce"]
        assert writer.page_record(record["guest_offset"], bytes.fromhex(record["page"])).hex() == record["record"]
        chain.update(s.record_tag(bytes.fromhex(record["record"])))
        assert chain.digest().hex() == expected_chain
    shared = s.SharedPages()
    for page in vector["shared_pages"]:
        shared.update(struct.pack("<Q", page["guest_offset"]) + bytes.fromhex(page["page"]))
    assert shared.digest() == _b(vector, "shared_digest")
    assert writer.end_record(shared.count, shared.digest()) == _b(vector, "end_record")


def test_codec_decodes_and_verifies(vector: dict[str, Any]) -> None:
    decoded = s.decode_stream(_b(vector, "transport_key"), _b(vector, "stream"), shared_pages=(
        len(vector["shared_pages"]), _b(vector, "shared_digest")))
    assert decoded.header.salt == _b(vector, "salt")
    assert decoded.header.guest_size == vector["guest_size"]
    assert len(decoded.records) == len(vector["records"])
    for got, want in zip(decoded.records, vector["records"], strict=True):
        assert (got.sequence, got.guest_offset) == (want["sequence"], want["guest_offset"])
        page = bytes.fromhex(want["page"])
        assert got.page == (None if page == bytes(s.PAGE_SIZE) else page)
    end = s.decode_end_payload(
        s.StreamCipher(
            s.derive_session(_b(vector, "transport_key"), _b(vector, "salt"), _binding(vector).pack())
        ).open_record(_b(vector, "end_record"))
    )
    assert end.pack() == _b(vector, "end_payload")
    assert (end.shared_page_count, end.shared_digest) == (len(vector["shared_pages"]), _b(vector, "shared_digest"))
    with pytest.raises(s.VerifyError) as refused:  # the stream, but the host lost a shared page
        s.decode_stream(_b(vector, "transport_key"), _b(vector, "stream"))
    assert refused.value.status == s.status_code("SHARED_PAGES_MISMATCH")


def _helper(vector: dict[str, Any], random: bytes) -> ReferenceHelper:
    """A reference helper whose entropy source always gives ``random``."""
    secret = bytearray(secret_record(_b(vector, "transport_key")))
    return ReferenceHelper(bytearray(vector["guest_size"]), bytearray(1 << 16), secret, salt_source=lambda n: random)


def _call(helper: ReferenceHelper, command: str, *args: int) -> tuple[int, ...]:
    status, results = helper.dispatch(A.const(f"OVMF_MH_CMD_{command}"), args)
    assert status == A.const("OVMF_MH_STATUS_SUCCESS"), command
    return results


def _export_vector(vector: dict[str, Any]) -> tuple[ReferenceHelper, bytes]:
    """Source helper 1 of the migration exports the vector's pages: (helper, stream)."""
    helper = _helper(vector, _b(vector, "salt"))
    for record in vector["records"]:
        offset = record["guest_offset"]
        helper.window[offset : offset + s.PAGE_SIZE] = bytes.fromhex(record["page"])
    offsets = vector["page_list"]
    struct.pack_into(f"<{len(offsets)}Q", helper.data, 0, *offsets)
    out, capacity, nonces_at = 0x1000, len(helper.data) - 0x1000, 0x800
    nonces = b"".join(bytes.fromhex(n) for n in vector["target_nonces"])
    helper.data[nonces_at : nonces_at + len(nonces)] = nonces
    bound = A.const("OVMF_MH_EXPORT_BOUND")
    shared_at = 0x700
    helper.data[shared_at : shared_at + s.DIGEST_SIZE] = _b(vector, "shared_digest")
    pieces = []
    for command, args in (
        ("EXPORT_BEGIN", (out, capacity, bound, nonces_at, vector["shard_index"], len(vector["target_nonces"]))),
        ("EXPORT_BATCH", (0, len(offsets), out, capacity)),
        ("EXPORT_END", (out, capacity, shared_at, len(vector["shared_pages"]))),
    ):
        written = _call(helper, command, *args)[0]
        pieces.append(bytes(helper.data[out : out + written]))
    return helper, b"".join(pieces)


def test_reference_export_reproduces_the_stream(vector: dict[str, Any]) -> None:
    assert _export_vector(vector)[1] == _b(vector, "stream")


def test_commit_proof_of_the_vector(vector: dict[str, Any]) -> None:
    """The codec makes the vector's proof from its two receipts, and source
    helper 1, having exported the vector's stream, accepts it (and refuses it
    with one bit changed, leaving its export as it was)."""
    key = _b(vector, "transport_key")
    receipts = _b(vector, "receipt_shard0") + _b(vector, "receipt")
    assert cp.receipts_digest(receipts) == _b(vector, "receipts_digest")
    proof = cp.CommitProof.decode(_b(vector, "commit_proof"))
    assert proof.receipts_digest == _b(vector, "receipts_digest")
    assert hmac.new(_b(vector, "commit_key"), proof.body(), hashlib.sha256).digest() == proof.mac
    assert cp.make_proof(key, _binding(vector), receipts).pack() == _b(vector, "commit_proof")
    helper, _ = _export_vector(vector)
    at = 0x2000
    for blob, status in ((bytes([proof.mac[0] ^ 1]) + proof.mac[1:], "BAD_COMMIT_PROOF"), (proof.mac, "SUCCESS")):
        data = proof.body() + blob + receipts
        helper.data[at : at + len(data)] = data
        result = helper.dispatch(A.const("OVMF_MH_CMD_EXPORT_VERIFY_COMMIT"), (at, len(data)))
        assert result[0] == A.const(f"OVMF_MH_STATUS_{status}"), status
    assert result[1][0] == len(vector["target_nonces"])


def test_reference_import_of_the_stream(vector: dict[str, Any]) -> None:
    """Target helper 1 of the migration: its challenge is the vector's nonce 1."""
    index, count = vector["shard_index"], len(vector["target_nonces"])
    helper = _helper(vector, bytes.fromhex(vector["target_nonces"][index]))
    _call(helper, "IMPORT_CHALLENGE", 0, s.CHALLENGE_SIZE)
    helper.window[:] = b"\xee" * len(helper.window)
    stream = _b(vector, "stream")
    header, body, end = (
        stream[: s.STREAM_HEADER_SIZE],
        stream[s.STREAM_HEADER_SIZE : -s.END_RECORD_SIZE],
        stream[-s.END_RECORD_SIZE :],
    )
    shared_at = 0x8000
    helper.data[shared_at : shared_at + s.DIGEST_SIZE] = _b(vector, "shared_digest")
    extra = {"IMPORT_BEGIN": (index, count), "IMPORT_BATCH": (), "IMPORT_END": (shared_at, len(vector["shared_pages"]))}
    for command, blob in (("IMPORT_BEGIN", header), ("IMPORT_BATCH", body), ("IMPORT_END", end)):
        helper.data[: len(blob)] = blob
        _call(helper, command, 0, len(blob), *extra[command])
    assert _call(helper, "IMPORT_RECEIPT", 0, s.RECEIPT_SIZE)[0] == s.RECEIPT_SIZE
    assert bytes(helper.data[: s.RECEIPT_SIZE]) == _b(vector, "receipt")
    receipt = s.Receipt.decode(_b(vector, "receipt"))
    assert s.receipt_mac(_b(vector, "transport_key"), receipt) == receipt.mac
    for record in vector["records"]:
        offset = record["guest_offset"]
        assert bytes(helper.window[offset : offset + s.PAGE_SIZE]).hex() == record["page"]
