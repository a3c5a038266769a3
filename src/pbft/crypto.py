"""Digests and session-key MACs.

Digests are BLAKE2b-256 with a *personalisation* string per kind of value, so
that a digest of one kind can never be confused with a digest of another
(domain separation).  MACs are keyed BLAKE2b truncated to 16 bytes: measured on
the development machine at ~0.45 us per 32-byte input against ~1.3 us for
HMAC-SHA256 (``python benchmarks/mac_bench.py`` prints the figures), and
BLAKE2b's keyed mode is a PRF by design, so no HMAC construction is needed.

Large bodies (a request's operation, a reply's result: ``digests.op_digest`` and
``result_digest``) are digested with SHA-256 instead (``bulk_digest``), domain-
separated by a first 64-byte block naming the kind: with the SHA extensions of
current x86 and ARM processors it runs at about twice BLAKE2b's speed here
(hashlib's BLAKE2b is the portable C implementation; ``docs/performance.md``,
*Large arguments and results*).

Keys: every ordered pair (sender, receiver) of principals shares a session
key.  ``KeyRing`` holds one principal's keys in both directions.  In the
simulator keys are derived from a seed (``derive_session_keys``); the networked
runtime will establish them with NewKey messages.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable, Mapping

DIGEST_SIZE = 32
MAC_SIZE = 16
KEY_SIZE = 32

_blake2b = hashlib.blake2b
_sha256 = hashlib.sha256
_BULK_PREFIX = b"pbft.bulk\x00"
_bulk: dict[bytes, Any] = {}  # kind -> SHA-256 state after its first block


def digest(kind: bytes, *parts: bytes) -> bytes:
    """Domain-separated digest: ``kind`` (at most 16 bytes) personalises BLAKE2b."""
    h = _blake2b(digest_size=DIGEST_SIZE, person=kind)
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def digest1(kind: bytes, data: bytes) -> bytes:
    """Digest of a single byte string (the hot path: no length framing needed)."""
    return _blake2b(data, digest_size=DIGEST_SIZE, person=kind).digest()


def bulk_digest(kind: bytes, data: bytes) -> bytes:
    """Domain-separated digest of a large body: SHA-256 of one 64-byte block (a prefix and ``kind``,
    at most 16 bytes and no NUL, padded with NULs), then ``data``."""
    h = _bulk.get(kind)
    if h is None:
        if len(kind) > 16 or b"\x00" in kind:
            raise ValueError("a digest kind is at most 16 bytes, without NUL")
        h = _bulk[kind] = _sha256(_BULK_PREFIX + kind.ljust(64 - len(_BULK_PREFIX), b"\x00"))
    h = h.copy()
    h.update(data)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    return _blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def mac_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class KeyRing:
    """Session keys of one principal.

    ``out_keys[j]`` authenticates messages this principal sends to ``j``;
    ``in_keys[j]`` verifies messages it receives from ``j``.
    """

    __slots__ = ("me", "n_replicas", "out_keys", "in_keys", "_zero", "mac_ops")

    def __init__(self, me: int, n_replicas: int, out_keys: Mapping[int, bytes], in_keys: Mapping[int, bytes]):
        self.me = me
        self.n_replicas = n_replicas
        self.out_keys = dict(out_keys)
        self.in_keys = dict(in_keys)
        self._zero = bytes(MAC_SIZE)
        self.mac_ops = 0  # MACs computed or checked: what a cost model charges for

    def authenticator(self, d: bytes) -> bytes:
        """One MAC per replica (the entry for ourselves is zeros), concatenated."""
        out = self.out_keys
        zero = self._zero
        self.mac_ops += self.n_replicas
        return b"".join(
            mac(out[r], d) if r in out else zero for r in range(self.n_replicas)
        )

    def mac_for(self, receiver: int, d: bytes) -> bytes:
        self.mac_ops += 1
        key = self.out_keys.get(receiver)
        if key is None:
            # no session key yet (the receiver has not sent us its NewKey): the receiver would
            # reject any MAC, so send one that it rejects and let retransmission recover
            return self._zero
        return mac(key, d)

    def verify(self, sender: int, d: bytes, auth: bytes, multi: bool) -> bool:
        """Check the MAC meant for us: the ``me``-th entry of an authenticator, or a single MAC."""
        self.mac_ops += 1
        key = self.in_keys.get(sender)
        if key is None:
            return False
        if multi:
            if self.me >= self.n_replicas or len(auth) != self.n_replicas * MAC_SIZE:
                return False
            tag = auth[self.me * MAC_SIZE : (self.me + 1) * MAC_SIZE]
        else:
            if len(auth) != MAC_SIZE:
                return False
            tag = auth
        return mac_equal(mac(key, d), tag)


def _pair_key(master: bytes, i: int, j: int) -> bytes:
    return _blake2b(f"{i}->{j}".encode(), key=master[:64], digest_size=KEY_SIZE, person=b"pbft.sessionkey").digest()


def keyrings_for(master: bytes, n_replicas: int, client_ids: Iterable[int]) -> dict[int, KeyRing]:
    """KeyRings for replicas ``0..n_replicas-1`` and the given clients.

    Clients share keys only with replicas (never with each other).
    """
    replicas = list(range(n_replicas))
    clients = list(client_ids)
    rings: dict[int, KeyRing] = {}
    for r in replicas:
        peers = [p for p in replicas + clients if p != r]
        rings[r] = KeyRing(
            r,
            n_replicas,
            {j: _pair_key(master, r, j) for j in peers},
            {j: _pair_key(master, j, r) for j in peers},
        )
    for c in clients:
        rings[c] = KeyRing(
            c,
            n_replicas,
            {j: _pair_key(master, c, j) for j in replicas},
            {j: _pair_key(master, j, c) for j in replicas},
        )
    return rings
