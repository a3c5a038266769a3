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

**Client requests are paced by per-client credits** (``RequestBudget``), before any parse or
MAC check: each request frame from a client's own connection costs one credit, each reply we
send it gives one back, and credits also come back with time (``rate`` per second), up to
``burst``.  A request that finds its client without a credit is not dropped: it waits in its
client's one slot until the credit is there (``ReplicaNode._defer_request``; counted
``client-request-deferred``), and a newer request of the same client takes the slot
(``client-request-superseded``: a correct client's newer request supersedes its older one
anyway), so every replica still gets every client's latest request (a request known to the
backups but refused by the primary would let a client start view changes).  The connection is
not held: it may carry other clients' requests (a client pool of several identities), which
must not wait behind a flooder's.
A correct client has one request outstanding: it sends a request, gets our reply (or, when we
lag behind, the others'), sends the next; its retransmissions come a retry timeout apart.  So
its credits do not run out at a replica that keeps up.  A client that sends ever newer requests
without waiting for them gets about one request per reply plus ``rate`` per second handled
(parsed, MAC-checked, vouched for), whatever it sends.
"""

from __future__ import annotations

import time
from hashlib import blake2b
from typing import Any, Optional

from ..codec import DecodeError
from .keys import NEWKEY_TAG, Identity, PublicKeys, finish_newkey, newkey_message, precheck_newkey
from .transport import Counters, FrameConn, TokenBucket, peek_first_frame

FIXARRAY5 = 0x95  # msgpack header of a 5-element array: every frame starts with it
UNAUTHENTICATED_NEWKEY_FAILURES_MAX = 4  # signature checks a never-authenticated connection may fail
NEWKEY_RATE_PER_CONN = 200.0  # NewKeys checked per second and connection (burst: 512, or the principals)
NEWKEY_RATE_ALL = 2000.0  # NewKeys checked per second, all connections together (burst as much)
REQUEST_CREDITS_BURST = 16  # a client's request credits (``RequestBudget``) ...
REQUEST_CREDITS_PER_RETRY_TIMEOUT = 2  # ... and how many come back per client retry timeout


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


NEWKEY_RECORD = b"N"  # store records of the latest accepted NewKey timestamps (the core's are other letters)


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
        self.refused = ""  # why the last refused NewKey was refused
        # configuration epochs (runtime.epochs): clients revoked, and the keys rotated away
        self.revoked: frozenset[int] = frozenset()
        self.retired: dict[int, Any] = {}  # principal -> a VerifyKey it no longer signs with
        self.dirty: dict[int, int] = {}  # accepted timestamps not yet handed to the store

    def restore(self, records: dict[bytes, bytes]) -> None:
        """The timestamps ``take_records`` wrote before a restart (other records ignored)."""
        for k, v in records.items():
            if len(k) == 9 and k[:1] == NEWKEY_RECORD and len(v) == 8:
                s = int.from_bytes(k[1:], "big")
                self.last_ts[s] = max(self.last_ts.get(s, 0), int.from_bytes(v, "big"))

    def take_records(self) -> dict[bytes, bytes]:
        """Store records for the timestamps accepted since the last call (``N`` + principal)."""
        out = {NEWKEY_RECORD + s.to_bytes(8, "big"): ts.to_bytes(8, "big") for s, ts in self.dirty.items()}
        self.dirty.clear()
        return out

    def _refuse(self, reason: str) -> None:
        self.counters.drop(reason)
        self.refused = reason

    def screen(self, raw: bytes) -> Optional[str]:
        """Why a NewKey would be refused before its signature is checked (an exact replay, its
        shape, sender or timestamp), or None; changes and counts nothing (``first_frame_screen``)."""
        if self.last_digest.get(frame_sender(raw)) == blake2b(raw, digest_size=16).digest():
            return "newkey-stale"
        if frame_sender(raw) in self.revoked:
            return "newkey-revoked-client"
        try:
            precheck_newkey(raw, self.me, self.public, self.max_principal, self.last_ts,
                            time.time_ns() // 1000, self.skew_us)
        except DecodeError as e:
            return e.reason
        return None

    def accept(self, conn: FrameConn, raw: bytes) -> Optional[tuple[int, bytes]]:
        meta = conn.meta
        s = frame_sender(raw)
        h = blake2b(raw, digest_size=16).digest()
        if self.last_digest.get(s) == h:
            # an exact replay of the latest NewKey accepted from s: one hash and a comparison
            self._refuse("newkey-stale")
            return None
        if s in self.revoked:
            self._refuse("newkey-revoked-client")
            return None
        try:
            nk = precheck_newkey(raw, self.me, self.public, self.max_principal, self.last_ts,
                                 time.time_ns() // 1000, self.skew_us)
        except DecodeError as e:
            self._refuse(e.reason)
            return None
        authenticated = meta.get("authenticated", False)
        if not authenticated and meta.get("newkey-failures", 0) >= UNAUTHENTICATED_NEWKEY_FAILURES_MAX:
            self._refuse("newkey-unauthenticated-limit")
            return None
        now = time.monotonic()
        # signatures cost ~40 us: bound what one connection, and all together, can make us verify
        bucket = meta.get("newkey-bucket")
        if bucket is None:
            # (a burst that covers a client pool's NewKeys for all its identities when it connects)
            bucket = meta["newkey-bucket"] = TokenBucket(rate=NEWKEY_RATE_PER_CONN, burst=self.conn_burst)
        if not bucket.take(now) or not self.bucket.take(now):
            self._refuse("newkey-rate-limited")
            return None
        try:
            k = finish_newkey(nk, self.me, self.public, self.n_replicas, self.last_ts)
        except DecodeError as e:
            if not authenticated:
                meta["newkey-failures"] = meta.get("newkey-failures", 0) + 1
            self._refuse("newkey-rotated-key" if e.reason == "newkey-bad-signature" and self._retired(nk)
                         else e.reason)
            return None
        meta["authenticated"] = True
        self.last_digest[nk.sender] = h
        self.dirty[nk.sender] = nk.timestamp
        return nk.sender, k


    def _retired(self, nk) -> bool:
        """Whether a NewKey whose signature failed is signed with its sender's rotated-away key."""
        vk = self.retired.get(nk.sender)
        if vk is None:
            return False
        try:
            vk.verify(newkey_message(nk.sender, nk.header), nk.signature)
        except Exception:  # noqa: BLE001 - nacl's BadSignatureError and friends
            return False
        return True


def first_frame_screen(gate: NewKeyGate, frame_max: int, full_max: int):
    """The ``Listener.screen`` of a server whose connections must start with a NewKey: from the
    first bytes of a connection just taken from the listen queue, the drop reasons its first
    frame would be counted under before it was closed anyway (the same as ``ReplicaNode`` counts
    on a connection that never authenticated), or None when there is nothing to say yet, or it
    looks right (the connection is then served, and every rule applies).  So a connection is
    refused at accept for a length prefix above ``frame_max`` (``client_frame_bytes_max``;
    ``oversized-frame`` above ``full_max``), a frame that is not a 5-element msgpack list
    (``malformed``), one that is not a NewKey (``spoofed-client``, ``spoofed-replica``,
    ``spoofed-self``: a correct principal's first frame on a connection is its NewKey, so
    forged requests, protocol messages and most replayed captures end here), and, when all of
    the NewKey is already there, what ``NewKeyGate.screen`` says of it (an exact replay, a stale
    or future timestamp...); every refusal but the length's also counts
    ``connection-closed-unauthenticated``."""
    me = gate.me.principal
    n = gate.n_replicas
    closed = "connection-closed-unauthenticated"

    def screen(s, head: bytes) -> Optional[tuple[str, ...]]:
        if len(head) < 4:
            return None
        k = int.from_bytes(head[:4], "big")
        if k > full_max:
            return ("oversized-frame",)
        if k > frame_max:
            return ("unauthenticated-frame-too-large",)
        body = head[4:4 + k]
        if k < 2 or (body and body[0] != FIXARRAY5):
            return ("malformed", closed)
        if len(body) < 2:
            return None  # not enough of it yet
        if body[1] == NEWKEY_TAG:
            raw = peek_first_frame(s, head, frame_max)
            why = None if raw is None else gate.screen(raw)
            return None if why is None else (why, closed)
        if len(body) < min(k, 7):
            return None  # its sender not there yet
        sender = frame_sender(body)
        if sender < 0:
            return ("malformed", closed)
        return ("spoofed-self" if sender == me else "spoofed-replica" if sender < n else "spoofed-client", closed)
    return screen


class RequestBudget:
    """Per-client request credits (see the module notes): ``take`` before a client's request
    frame reaches the core (0: go ahead; else the seconds until its next credit), ``replied``
    for every reply frame sent to it. One entry per client id that sent a request (bounded by
    the cluster's client ids)."""

    __slots__ = ("burst", "rate", "credit")

    def __init__(self, burst: float, rate: float):
        self.burst = float(burst)
        self.rate = float(rate)
        self.credit: dict[int, list] = {}  # client -> [credits, when last updated (s)]

    def take(self, client: int, now: float) -> float:
        e = self.credit.get(client)
        if e is None:
            self.credit[client] = [self.burst - 1.0, now]
            return 0.0
        tok = e[0] + (now - e[1]) * self.rate
        if tok > self.burst:
            tok = self.burst
        e[1] = now
        if tok > 0.999999:  # (not 1.0: a wait computed below must always be enough)
            e[0] = tok - 1.0 if tok > 1.0 else 0.0
            return 0.0
        e[0] = tok
        return (1.0 - tok) / self.rate

    def replied(self, client: int) -> None:
        e = self.credit.get(client)
        if e is not None:
            tok = e[0] + 1.0
            e[0] = tok if tok < self.burst else self.burst


class RequestSlots:
    """Requests waiting for their client's next credit (``RequestBudget.take`` said how long):
    one slot per client, so memory is one request per client id and a newer request of the same
    client takes the slot (``client-request-superseded``). ``park`` keeps one; after ``wait``
    seconds it is handed to ``deliver(conn, raw)`` (which takes the credit, or parks it again)
    unless its connection has closed. The connection itself goes on being read: it may carry
    other clients' requests (a client pool)."""

    __slots__ = ("loop", "counters", "deliver", "waiting")

    def __init__(self, loop, counters: Counters, deliver):
        self.loop = loop
        self.counters = counters
        self.deliver = deliver
        self.waiting: dict[int, tuple[FrameConn, bytes]] = {}

    def park(self, client: int, conn: FrameConn, raw: bytes, wait: float) -> None:
        self.counters.drop("client-request-deferred")
        if client in self.waiting:
            self.counters.drop("client-request-superseded")
            self.waiting[client] = (conn, raw)
            return
        self.waiting[client] = (conn, raw)
        self.loop.call_later(wait, self._release, client)

    def _release(self, client: int) -> None:
        got = self.waiting.pop(client, None)
        if got is None:
            return
        conn, raw = got
        if conn.closed:
            self.counters.drop("peer-down")
            return
        self.deliver(conn, raw)
