"""The digests of protocol values: a frame's (what MACs cover), a batch's, a result's, a
request's vouching key, a state's and a checkpoint's, and the digest of the empty batch.

Pure functions of bytes and messages, so ``state`` (checkpoint digests) and the drivers can
compute them without the codec.
"""

from __future__ import annotations

from .crypto import bulk_digest, digest, digest1
from .messages import REQUEST_OP_PAYLOAD_MIN, Request


def frame_digest(tag: int, sender: int, header: bytes) -> bytes:
    return digest1(b"pbft.msg", tag.to_bytes(1, "big") + sender.to_bytes(4, "big", signed=True) + header)


def batch_digest_from_request_digests(nondet: bytes, request_digests: list[bytes] | tuple[bytes, ...]) -> bytes:
    return digest(b"pbft.batch", nondet, *request_digests)


def result_digest(result: bytes) -> bytes:
    return bulk_digest(b"pbft.result", result)


def op_digest(op: bytes) -> bytes:
    """Digest of a large operation: what its request frame's header carries instead of it."""
    return bulk_digest(b"pbft.op", op)


def vouch_key(req: Request, opd: bytes = b"") -> bytes:
    """Identity of a request for vouching: client, timestamp, operation (not the replier,
    which a retransmission changes). An operation of ``REQUEST_OP_PAYLOAD_MIN`` bytes or more
    counts by its digest ``opd`` (computed if not given; the codec gives the one it checked), so
    that it is hashed once per frame; such keys have a personalisation of their own."""
    c, t = req.client.to_bytes(4, "big"), req.timestamp.to_bytes(8, "big")
    ro = b"\x01" if req.read_only else b"\x00"
    if len(req.op) >= REQUEST_OP_PAYLOAD_MIN:
        return digest(b"pbft.vouch.opd", c, t, opd or op_digest(req.op), ro)
    return digest(b"pbft.vouch", c, t, req.op, ro)


def state_digest(state: bytes) -> bytes:
    return digest1(b"pbft.state", state)


def checkpoint_digest(seqno: int, sdigest: bytes, *, bind_seqno: bool = True) -> bytes:
    """Digest of the checkpoint at ``seqno`` whose state has digest ``sdigest``.

    It binds the sequence number (``bind_seqno=False`` exists only for the
    ``checkpoint-digest-without-seqno`` injected bug).
    """
    if bind_seqno:
        return digest(b"pbft.checkpoint", seqno.to_bytes(8, "big"), sdigest)
    return digest(b"pbft.checkpoint", sdigest)


NULL_BATCH_DIGEST = batch_digest_from_request_digests(b"", [])
