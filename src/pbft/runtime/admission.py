"""What a server checks before any MAC check or core call: who may speak on a connection.

**Principals are bound to connections.**  A principal (replica or client) is *bound* to the
connection on which the latest NewKey from it was accepted (a signed message: only the holder
of the principal's long-term key can make one, and its timestamp must grow).  A frame whose
header claims sender ``s`` is taken only

* on the connection ``s`` is bound to, or
* on a connection a replica is bound to: replicas relay what others sent (a client's request
  to the primary, pre-prepares, view changes and new views for catch-up); what they relay is
  still checked by MAC or by digest, and a client's request relayed with a bad MAC is no
  evidence against the client (``Replica.receive(..., relayed=True)``).

Anything else is dropped on arrival, before any MAC check and without touching any state kept
for the claimed sender, counted as ``spoofed-client``, ``spoofed-replica`` or, for a frame
claiming the receiver's own id, ``spoofed-self``.  So an attacker without keys, and one that
replays captured frames on a connection of its own, costs a receiver one header parse and one
dictionary lookup per frame, and changes nothing.  A connection on which no NewKey was ever
accepted is closed on its first such frame: a correct principal sends its NewKey first on every
connection, so such a connection is either an impostor's or one whose NewKey we dropped (rate
limit), and closing it makes a correct peer reconnect and send a fresh NewKey.

**NewKeys are admitted cheaply first** (``NewKeyGate``): an exact replay of the latest NewKey
accepted from its sender is recognised by one hash and a comparison; then shape, a known sender,
a timestamp newer than the last one accepted from it (older captures end here) and not more than
``timestamp_skew_ms_max`` ahead of our wall clock; only then the rate limits (per connection
and for all connections together) and the signature check (~40 µs) and unsealing.  A
connection that never presented a valid NewKey may fail the signature check only a few times;
after that its NewKeys are dropped unchecked (``newkey-unauthenticated-limit``).
"""

from __future__ import annotations

import time
from hashlib import blake2b
from typing import Optional

from ..codec import DecodeError
from .keys import Identity, PublicKeys, finish_newkey, precheck_newkey
from .transport import Counters, FrameConn, TokenBucket

FIXARRAY5 = 0x95  # msgpack header of a 5-element array: every frame starts with it
UNAUTHENTICATED_NEWKEY_FAILURES_MAX = 4  # signature checks a never-authenticated connection may fail
NEWKEY_RATE_PER_CONN = 200.0  # NewKeys checked per second and connection (burst: 512, or the principals)
NEWKEY_RATE_ALL = 2000.0  # NewKeys checked per second, all connections together (burst as much)


def frame_sender(raw: bytes) -> int:
    """The sender id in a frame's header, read without decoding the frame: ``raw`` is
    ``[tag, sender, ...]`` in msgpack, the tag a positive fixint and the sender a positive
    fixint, uint8, uint16 or uint32 (what msgpack writes for ids). Anything else (which no
    correct principal sends) gives -1."""
    if len(raw) < 7 or raw[0] != FIXARRAY5 or raw[1] >= 0x80:
        return -1
    b = raw[2]
    if b < 0x80:
        return b
    if b == 0xCC:
        return raw[3]
    if b == 0xCD:
        return (raw[3] << 8) | raw[4]
    if b == 0xCE:
        return int.from_bytes(raw[3:7], "big")
    return -1


class NewKeyGate:
    """NewKey admission for one server (see the module notes). ``accept`` returns
    ``(sender, keys)`` as ``keys.accept_newkey`` does, or None with the reason counted."""

    def __init__(self, me: Identity, public: PublicKeys, n_replicas: int, max_principal: int,
                 skew_ms: float, counters: Counters):
        self.me = me
        self.public = public
        self.n_replicas = n_replicas
        self.max_principal = max_principal
        self.skew_us = int(skew_ms * 1000)
        self.counters = counters
        self.last_ts: dict[int, int] = {}
        self.last_digest: dict[int, bytes] = {}  # sender -> digest of the latest NewKey accepted from it
        self.bucket = TokenBucket(rate=NEWKEY_RATE_ALL, burst=NEWKEY_RATE_ALL)
        self.conn_burst = float(min(NEWKEY_RATE_ALL, max(512, max_principal + 1)))

    def accept(self, conn: FrameConn, raw: bytes) -> Optional[tuple[int, bytes]]:
        meta = conn.meta
        s = frame_sender(raw)
        h = blake2b(raw, digest_size=16).digest()
        if self.last_digest.get(s) == h:
            # an exact replay of the latest NewKey accepted from s: one hash and a comparison
            self.counters.drop("newkey-stale")
            return None
        try:
            nk = precheck_newkey(raw, self.me, self.public, self.max_principal, self.last_ts,
                                 time.time_ns() // 1000, self.skew_us)
        except DecodeError as e:
            self.counters.drop(e.reason)
            return None
        authenticated = meta.get("authenticated", False)
        if not authenticated and meta.get("newkey-failures", 0) >= UNAUTHENTICATED_NEWKEY_FAILURES_MAX:
            self.counters.drop("newkey-unauthenticated-limit")
            return None
        now = time.monotonic()
        # signatures cost ~40 us: bound what one connection, and all together, can make us verify
        bucket = meta.get("newkey-bucket")
        if bucket is None:
            # (a burst that covers a client pool's NewKeys for all its identities when it connects)
            bucket = meta["newkey-bucket"] = TokenBucket(rate=NEWKEY_RATE_PER_CONN, burst=self.conn_burst)
        if not bucket.take(now) or not self.bucket.take(now):
            self.counters.drop("newkey-rate-limited")
            return None
        try:
            k = finish_newkey(nk, self.me, self.public, self.n_replicas, self.last_ts)
        except DecodeError as e:
            self.counters.drop(e.reason)
            if not authenticated:
                meta["newkey-failures"] = meta.get("newkey-failures", 0) + 1
            return None
        meta["authenticated"] = True
        self.last_digest[nk.sender] = h
        return nk.sender, k
