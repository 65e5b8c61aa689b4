"""The commit proof (ABI 4.1, docs/stream-format.md "Commit proof"): what
target helper 0 writes once IMPORT_COMMIT accepted one receipt per shard,
and what a source helper checks (EXPORT_VERIFY_COMMIT) before its host may
stop the source guest for good.

Only a holder of the transport key can make one: its MAC is under a key
HKDF derives from TK with the migration id as salt and a label of its own,
so neither a receipt's MAC nor a stream key stands for it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from helper import abi
from helper import stream as s

_A = abi.load()
PROOF = _A.layout("OVMF_MH_COMMIT_PROOF")
PROOF_SIZE = PROOF.size
#: Bytes of a proof covered by its MAC (everything before ``Mac``).
PROOF_MAC_OFFSET = PROOF.offset("Mac")
PROOF_INFO = _A.strings["OVMF_MH_COMMIT_PROOF_INFO"].encode()
RECEIPTS_LABEL = _A.strings["OVMF_MH_COMMIT_RECEIPTS_LABEL"].encode()
OUTCOME_COMMITTED = _A.const("OVMF_MH_COMMIT_OUTCOME_COMMITTED")


@dataclass(frozen=True)
class CommitProof:
    """``OVMF_MH_COMMIT_PROOF``."""

    migration_id: bytes
    shard_count: int
    flags: int
    receipts_digest: bytes
    outcome: int = OUTCOME_COMMITTED
    reserved: int = 0
    mac: bytes = b""

    def body(self) -> bytes:
        """The bytes the MAC covers."""
        return PROOF.pack(MigrationId=self.migration_id, ShardCount=self.shard_count, Flags=self.flags,
                          Outcome=self.outcome, Reserved=self.reserved,
                          ReceiptsDigest=self.receipts_digest)[:PROOF_MAC_OFFSET]

    def pack(self) -> bytes:
        return self.body() + self.mac

    @classmethod
    def decode(cls, data: s.Bytes) -> CommitProof:
        f = PROOF.unpack(data)
        return cls(f["MigrationId"], f["ShardCount"], f["Flags"], f["ReceiptsDigest"], f["Outcome"],
                   f["Reserved"], f["Mac"])


def receipts_digest(receipts: s.Bytes) -> bytes:
    """SHA-256(RECEIPTS_LABEL || the receipts, in shard order)."""
    return hashlib.sha256(RECEIPTS_LABEL + bytes(receipts)).digest()


def proof_mac(transport_key: s.Bytes, proof: CommitProof) -> bytes:
    """HMAC-SHA256(CommitKey, body), CommitKey = HKDF-SHA256(IKM = TK,
    salt = MigrationId, info = PROOF_INFO, L = 32)."""
    key = HKDF(algorithm=hashes.SHA256(), length=s.KEY_SIZE, salt=proof.migration_id,
               info=PROOF_INFO).derive(bytes(transport_key))
    return hmac.new(key, proof.body(), hashlib.sha256).digest()


def make_proof(transport_key: s.Bytes, binding: s.Binding, receipts: s.Bytes) -> CommitProof:
    """The proof target helper 0 writes after a commit of ``receipts``."""
    proof = CommitProof(binding.migration_id, binding.shard_count, binding.flags, receipts_digest(receipts))
    return CommitProof(proof.migration_id, proof.shard_count, proof.flags, proof.receipts_digest,
                       mac=proof_mac(transport_key, proof))


def receipt_refusal(transport_key: s.Bytes, receipts: Sequence[s.Receipt], own: s.Receipt) -> str | None:
    """Why ``receipts`` (receipt i for shard i) do not all vouch for the
    migration ``own`` belongs to, with ``own`` unchanged at its index (a
    status name), or None: the checks of IMPORT_COMMIT and EXPORT_VERIFY_COMMIT."""
    for index, receipt in enumerate(receipts):
        if (receipt.shard_index, receipt.shard_count) != (index, own.shard_count):
            return "WRONG_SHARD"
        if (receipt.migration_id, receipt.flags, receipt.reserved) != (own.migration_id, own.flags, 0):
            return "WRONG_MIGRATION"
        if not hmac.compare_digest(s.receipt_mac(transport_key, receipt), receipt.mac) or (
            index == own.shard_index and receipt != own
        ):
            return "BAD_RECEIPT"
    return None


def proof_refusal(transport_key: s.Bytes, proof: CommitProof, receipts: s.Bytes, own: s.Receipt) -> str | None:
    """Why ``proof`` with ``receipts`` does not show that the target helpers
    committed the stream whose own receipt is ``own`` (a status name), or
    None: EXPORT_VERIFY_COMMIT's checks after the argument checks."""
    if (proof.migration_id, proof.shard_count, proof.flags, proof.reserved) != (
            own.migration_id, own.shard_count, own.flags, 0):
        return "WRONG_MIGRATION"
    if not hmac.compare_digest(proof_mac(transport_key, proof), proof.mac) or proof.outcome != OUTCOME_COMMITTED:
        return "BAD_COMMIT_PROOF"
    if not hmac.compare_digest(receipts_digest(receipts), proof.receipts_digest):
        return "BAD_COMMIT_PROOF"
    decoded = [s.Receipt.decode(receipts[i : i + s.RECEIPT_SIZE]) for i in range(0, len(receipts), s.RECEIPT_SIZE)]
    return receipt_refusal(transport_key, decoded, own)
