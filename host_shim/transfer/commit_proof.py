"""The commit proof on the host (docs/stream-format.md, "Commit proof"):
target helper 0 writes it once it committed every shard's receipt; the
source's helpers check it before their host may commit (stop the source
guest for good, or say a transfer succeeded).

The host only carries the proof: it travels as the proof followed by the N
receipts it covers, in shard order (``blob``), hex-encoded on the wire, and
only the helpers can tell a genuine one. A peer that forged a success ("ok",
``verdict``) has no proof that a source helper accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from helper import commit_proof as cp
from helper import stream as s
from host_shim.errors import MailboxError, OvmfMhError
from host_shim.helpers.backends import Backend
from host_shim.helpers.mailbox import status_name

#: Where the proof goes in a helper's data area (free once a stream ended).
PROOF_AT = 0


class CommitProofError(OvmfMhError):
    """No proof, a malformed one, or one the source helpers refuse: the
    source must not commit."""


def blob_size(shards: int) -> int:
    """Bytes of a proof with the receipts of ``shards`` shards."""
    return cp.PROOF_SIZE + shards * s.RECEIPT_SIZE


def take(target0: Backend, receipts: bytes) -> bytes:
    """Target helper 0's proof of the commit it just passed, followed by the
    receipts that commit accepted."""
    status, results = target0.call("IMPORT_COMMIT_PROOF", PROOF_AT, cp.PROOF_SIZE)
    if status != 0:
        raise MailboxError("target helper 0 refused IMPORT_COMMIT_PROOF after its commit",
                           command="IMPORT_COMMIT_PROOF", status=status, status_name=status_name(status))
    return bytes(target0.data[PROOF_AT : PROOF_AT + results[0]]) + receipts


def verify(sources: Sequence[Backend], blob: bytes, peer: str) -> None:
    """Every source helper checks ``blob`` against the stream it exported
    (EXPORT_VERIFY_COMMIT); raise CommitProofError naming the first refusal."""
    if len(blob) != blob_size(len(sources)):
        raise CommitProofError(
            f"the {peer} sent a commit proof of {len(blob)} bytes; a proof of {len(sources)} shard(s) is "
            f"{blob_size(len(sources))} bytes: it did not commit this migration")
    for index, helper in enumerate(sources):
        helper.data[PROOF_AT : PROOF_AT + len(blob)] = blob
        status, results = helper.call("EXPORT_VERIFY_COMMIT", PROOF_AT, len(blob))
        if status != 0:
            raise CommitProofError(
                f"source helper {index} refuses the {peer}'s commit proof ({status_name(status)}): the target "
                "helpers did not prove that they imported and committed this stream")
        if results[0] != len(sources):
            raise CommitProofError(f"source helper {index} checked a proof of {results[0]} shard(s), not "
                                   f"{len(sources)}")


def encode(blob: bytes) -> dict[str, Any]:
    """The fields of a ``proof`` control message: the proof and each receipt as hex."""
    receipts = blob[cp.PROOF_SIZE :]
    return {"commit_proof": blob[: cp.PROOF_SIZE].hex(),
            "receipts": [receipts[i : i + s.RECEIPT_SIZE].hex() for i in range(0, len(receipts), s.RECEIPT_SIZE)]}


def decode(proof: Any, receipts: Any, shards: int, peer: str) -> bytes:
    """The blob of a ``proof`` message (hostile input): the proof and
    exactly ``shards`` receipts, each lower-case hex of its exact size."""
    if not isinstance(receipts, list) or len(receipts) != shards:
        count = len(receipts) if isinstance(receipts, list) else "no list of"
        raise CommitProofError(f"the {peer} sent {count} receipt(s) with its commit proof for {shards} shard(s)")
    blob = _hex(proof, cp.PROOF_SIZE, "its commit proof", peer)
    for index, receipt in enumerate(receipts):
        blob += _hex(receipt, s.RECEIPT_SIZE, f"receipt {index}", peer)
    return blob


def from_hex(text: Any, peer: str) -> bytes:
    """A blob as one hex string (``receive``'s JSON verdict); its size is
    checked by verify() against the shards exported."""
    if not isinstance(text, str) or not text:
        raise CommitProofError(f"the {peer} reported success without a commit proof: it did not show that its "
                               "helpers imported and committed the stream")
    return _hex(text, len(text) // 2, "its commit proof", peer)


def _hex(value: Any, size: int, what: str, peer: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or value.strip("0123456789abcdef"):
        raise CommitProofError(f"the {peer} sent {what} that is not {size} bytes of lower-case hex: "
                               f"{str(value)[:40]!r}")
    return bytes.fromhex(value)
