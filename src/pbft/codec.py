"""The single boundary where untrusted bytes become typed messages.

Wire frame (msgpack): ``[tag, sender, header, payload, auth]``

* ``header`` (bin): a msgpack list with the message's fields;
* ``payload`` (bin): bulk data checked by digest rather than by MAC (a
  pre-prepare's batch, a state-transfer's state, a large request's operation, a
  reply's full result), empty otherwise;
* ``auth`` (bin): an *authenticator* (one 16-byte MAC per replica) for
  messages to all replicas, or a single MAC for point-to-point messages.

MACs cover ``frame_digest = BLAKE2b("pbft.msg", tag | sender | header)``.  A
pre-prepare's header holds the batch digest, so its authenticator binds the
batch without hashing it twice; backups check the batch against that digest
(the check that the ``skip-digest-check`` injected bug removes).

Large bodies are hashed once per receiver. A request whose operation has
``REQUEST_OP_PAYLOAD_MIN`` bytes or more carries it in the payload and its
digest (``op_digest``) and length in the header (five fields instead of four,
so the two forms never share a header); ``parse`` checks the payload against
that digest, and the request's vouch key is computed from it. A reply's full
result travels in the payload, its header has the result digest and whether
the result is there; the client checks the result against that digest (it
does so anyway, ``core.client``).

Anything malformed raises ``DecodeError`` with a short reason; callers drop
and count.  No other exception escapes ``open_frame``/``parse``/``open_authenticated``
(the one call that opens, authenticates and parses a frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .config import ClusterConfig
from .crypto import DIGEST_SIZE, MAC_SIZE, KeyRing
from .errors import DecodeError as DecodeError  # re-exported (interpreted: runtime.signer subclasses it)
from .digests import (  # re-exported ("x as x"): the codec's callers read them here too
    NULL_BATCH_DIGEST as NULL_BATCH_DIGEST,
    op_digest as op_digest,
    batch_digest_from_request_digests as batch_digest_from_request_digests,
    checkpoint_digest as checkpoint_digest,
    frame_digest as frame_digest,
    result_digest as result_digest,
    state_digest as state_digest,
    vouch_key as vouch_key,
)
from .messages import (
    ALL_REPLICAS, RECOVERY_OP, REQUEST_OP_PAYLOAD_MIN, REQUEST_REF, REQUEST_REF_BYTES, Batch, BatchData,
    Checkpoint, Commit, Data, Fetch, FetchBatch, Message, MetaData,
    NewView, QueryStable, ReplyStable, Vouch,
    PrePrepare, Prepare, Reply, Request, Status, Tag, ViewChange, ViewChangeAck,
)

U63 = (1 << 63) - 1

# The tags as module constants: on the decode path a global costs a fraction of an enum attribute.
T_REQUEST = Tag.REQUEST
T_REPLY = Tag.REPLY
T_PRE_PREPARE = Tag.PRE_PREPARE
T_PREPARE = Tag.PREPARE
T_COMMIT = Tag.COMMIT
T_CHECKPOINT = Tag.CHECKPOINT
T_STATUS = Tag.STATUS
T_VIEW_CHANGE = Tag.VIEW_CHANGE
T_VIEW_CHANGE_ACK = Tag.VIEW_CHANGE_ACK
T_NEW_VIEW = Tag.NEW_VIEW
T_FETCH = Tag.FETCH
T_DATA = Tag.DATA
T_FETCH_BATCH = Tag.FETCH_BATCH
T_BATCH_DATA = Tag.BATCH_DATA
T_VOUCH = Tag.VOUCH
T_META_DATA = Tag.META_DATA
T_QUERY_STABLE = Tag.QUERY_STABLE
T_REPLY_STABLE = Tag.REPLY_STABLE

TAG = {
    Request: T_REQUEST, Reply: T_REPLY, PrePrepare: T_PRE_PREPARE, Prepare: T_PREPARE, Commit: T_COMMIT,
    Checkpoint: T_CHECKPOINT, Status: T_STATUS, ViewChange: T_VIEW_CHANGE, ViewChangeAck: T_VIEW_CHANGE_ACK,
    NewView: T_NEW_VIEW, Fetch: T_FETCH, Data: T_DATA, FetchBatch: T_FETCH_BATCH, BatchData: T_BATCH_DATA,
    Vouch: T_VOUCH, MetaData: T_META_DATA, QueryStable: T_QUERY_STABLE, ReplyStable: T_REPLY_STABLE,
}
TYPE_OF_TAG = {v: k for k, v in TAG.items()}
# Point-to-point messages carry a single MAC; everything else an authenticator.
SINGLE_MAC = frozenset({TAG[Reply], TAG[Fetch], TAG[MetaData], TAG[Data], TAG[BatchData], TAG[ReplyStable]})


@dataclass(slots=True)
class Frame:
    tag: int
    sender: int
    header: bytes
    payload: bytes
    auth: bytes
    raw: bytes
    digest: bytes  # what the MACs cover; also a Request's digest
    opd: bytes = b""  # a large request's operation digest, once ``parse`` checked it

    def __init__(self, tag: int, sender: int, header: bytes, payload: bytes, auth: bytes, raw: bytes,
                 digest: bytes, opd: bytes = b"") -> None:
        # (its own ``__init__``, as the hot messages have (``pbft.messages``): native when
        # compiled; one is built for every frame received. Every field is a parameter, as in the
        # generated one, which ``dataclasses.replace`` relies on)
        self.tag = tag
        self.sender = sender
        self.header = header
        self.payload = payload
        self.auth = auth
        self.raw = raw
        self.digest = digest
        self.opd = opd

    @property
    def multi(self) -> bool:
        return self.tag not in SINGLE_MAC


def view_change_digest(frame: Frame) -> bytes:
    return frame.digest


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True).pack


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_batch(b: Batch) -> bytes:
    return packb([b.nondet, list(b.requests)])


def batch_wire_bytes(b: Batch) -> int:
    """Upper bound on what batch ``b`` takes inside a message: its encoding and a bin prefix."""
    return BATCH_OVERHEAD_BYTES + len(b.nondet) + sum(5 + len(r) for r in b.requests)


BATCH_OVERHEAD_BYTES = 5 + 1 + 5 + 5  # bin prefix, array, nondet's and the requests' array prefixes


def header_of(msg: Message) -> tuple[int, int, bytes, bytes]:
    """(tag, sender, header, payload) of a message."""
    if isinstance(msg, Request):
        op = msg.op
        if len(op) >= REQUEST_OP_PAYLOAD_MIN:
            return T_REQUEST, msg.client, packb([msg.timestamp, op_digest(op), msg.read_only, msg.replier,
                                                 len(op)]), op
        return T_REQUEST, msg.client, packb([msg.timestamp, op, msg.read_only, msg.replier]), b""
    if isinstance(msg, Reply):
        res = msg.result
        return T_REPLY, msg.replica, packb([msg.view, msg.timestamp, msg.client, msg.tentative, msg.read_only,
                                            msg.result_digest, res is not None]), res if res is not None else b""
    if isinstance(msg, PrePrepare):
        payload = encode_batch(msg.batch) if msg.batch is not None else b""
        return T_PRE_PREPARE, msg.replica, packb([msg.view, msg.seqno, msg.digest]), payload
    if isinstance(msg, Prepare):
        return T_PREPARE, msg.replica, packb([msg.view, msg.seqno, msg.digest]), b""
    if isinstance(msg, Commit):
        return T_COMMIT, msg.replica, packb([msg.view, msg.seqno, msg.digest]), b""
    if isinstance(msg, Checkpoint):
        return T_CHECKPOINT, msg.replica, packb([msg.seqno, msg.digest]), b""
    if isinstance(msg, Status):
        return T_STATUS, msg.replica, packb([msg.view, msg.view_active, msg.stable_seqno, msg.last_executed,
                                       msg.nv_digest]), b""
    if isinstance(msg, ViewChange):
        return T_VIEW_CHANGE, msg.replica, packb([msg.view, msg.stable_seqno, [list(c) for c in msg.checkpoints],
                                       [list(p) for p in msg.prepared], [list(q) for q in msg.preprepared]]), b""
    if isinstance(msg, ViewChangeAck):
        return T_VIEW_CHANGE_ACK, msg.replica, packb([msg.view, msg.vc_replica, msg.vc_digest]), b""
    if isinstance(msg, NewView):
        return T_NEW_VIEW, msg.replica, packb([msg.view, [list(x) for x in msg.view_changes], msg.checkpoint_seqno,
                                        msg.checkpoint_digest, [list(x) for x in msg.chosen],
                                        [encode_batch(b) for b in msg.batches]]), b""
    if isinstance(msg, Fetch):
        return T_FETCH, msg.replica, packb([msg.seqno, msg.digest, msg.level, msg.index, list(msg.want)]), b""
    if isinstance(msg, MetaData):
        return T_META_DATA, msg.replica, packb([msg.seqno, msg.level, msg.index, list(msg.children)]), b""
    if isinstance(msg, Data):
        # the objects travel in the payload: they are checked against certified digests
        return T_DATA, msg.replica, packb([msg.seqno, msg.level, msg.index]), packb([list(o) for o in msg.objs])
    if isinstance(msg, FetchBatch):
        return T_FETCH_BATCH, msg.replica, packb([msg.digest]), b""
    if isinstance(msg, Vouch):
        return T_VOUCH, msg.replica, packb([list(msg.keys)]), b""
    if isinstance(msg, BatchData):
        return T_BATCH_DATA, msg.replica, packb([msg.digest]), encode_batch(msg.batch)
    if isinstance(msg, QueryStable):
        return T_QUERY_STABLE, msg.replica, packb([msg.nonce]), b""
    if isinstance(msg, ReplyStable):
        return T_REPLY_STABLE, msg.replica, packb([msg.checkpoint, msg.prepared, msg.nonce]), b""
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


def seal(msg: Message, keys: KeyRing, to: int | None = None) -> bytes:
    """Encode and authenticate: an authenticator for all replicas, or one MAC for ``to``."""
    return seal_with_digest(msg, keys, to)[0]


def seal_with_digest(msg: Message, keys: KeyRing, to: int | None = None) -> tuple[bytes, bytes]:
    """Like ``seal`` but also returns the frame digest (a Request's digest)."""
    tag, sender, header, payload = header_of(msg)
    d = frame_digest(tag, sender, header)
    if tag in SINGLE_MAC:
        if to is None:
            raise ValueError(f"{type(msg).__name__} is point-to-point: give the receiver")
        auth = keys.mac_for(to, d)
    else:
        auth = keys.authenticator(d)
    return _packb([tag, sender, header, payload, auth]), d


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

def _unpack(raw: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            raw, use_list=False, raw=False, strict_map_key=True,
            max_bin_len=limit, max_str_len=0, max_array_len=limit, max_map_len=0, max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as e:  # ExtraData, FormatError, StackError, limits
        raise DecodeError("malformed") from e


def _int(x: Any, lo: int, hi: int, what: str) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise DecodeError(f"bad-{what}")
    return x


def _bool(x: Any, what: str) -> bool:
    if type(x) is not bool:
        raise DecodeError(f"bad-{what}")
    return x


def _bytes(x: Any, maxlen: int, what: str) -> bytes:
    if type(x) is not bytes or len(x) > maxlen:
        raise DecodeError(f"bad-{what}")
    return x


def _digest(x: Any, what: str = "digest") -> bytes:
    if type(x) is not bytes or len(x) != DIGEST_SIZE:
        raise DecodeError(f"bad-{what}")
    return x


def _child(x: Any) -> bytes:
    """A partition-tree child on the wire: a leaf digest (32 bytes) or a node's sum (256)."""
    if type(x) is not bytes or len(x) not in (DIGEST_SIZE, 256):
        raise DecodeError("bad-child")
    return x


def _object(x: Any, maxlen: int) -> bytes:
    if type(x) is not bytes:
        raise DecodeError("bad-object")
    if len(x) > maxlen:
        raise DecodeError("oversized-object")
    return x


def _pair(x: Any) -> tuple[Any, Any]:
    if type(x) is not tuple or len(x) != 2:
        raise DecodeError("bad-pair")
    return x


def _tuple(x: Any, maxlen: int, what: str) -> tuple[Any, ...]:
    if type(x) is not tuple or len(x) > maxlen:
        raise DecodeError(f"bad-{what}")
    return x


class Codec:
    """Decoder bound to one cluster's limits (principal ids, sizes, window)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.n = cfg.n
        self.client_base = cfg.client_base  # ids n .. client_base-1: replica slots of no member
        self.max_principal = cfg.max_principal
        self.window = cfg.log_window_seqnos
        self.frame_max = cfg.message_size_bytes_max

    # -- outer frame ----------------------------------------------------------
    def open_frame(self, raw: object) -> Frame:  # object: the check below, not a TypeError, when compiled
        """Split and check the outer frame. Does not verify MACs (see ``KeyRing.verify``)."""
        if type(raw) is not bytes:
            raise DecodeError("not-bytes")
        if len(raw) > self.frame_max:
            raise DecodeError("oversized")
        t = _unpack(raw, self.frame_max)
        if type(t) is not tuple or len(t) != 5:
            raise DecodeError("bad-frame")
        tag, sender, header, payload, auth = t
        if type(tag) is not int or tag not in TYPE_OF_TAG:
            raise DecodeError("bad-tag")
        _int(sender, 0, self.max_principal, "sender")
        if self.n <= sender < self.client_base:
            raise DecodeError("not-a-member")
        if type(header) is not bytes or type(payload) is not bytes or type(auth) is not bytes:
            raise DecodeError("bad-frame")
        if tag in SINGLE_MAC:
            if len(auth) != MAC_SIZE:
                raise DecodeError("bad-auth-size")
        elif len(auth) != MAC_SIZE * self.client_base:  # (one MAC per replica slot, member or not)
            raise DecodeError("bad-auth-size")
        # clients send requests only; replicas send everything, requests included (the
        # recovery request of a recovering replica, checked in ``parse``)
        if tag != T_REQUEST and sender >= self.n:
            raise DecodeError("bad-sender-role")
        return Frame(tag, sender, header, payload, auth, raw, frame_digest(tag, sender, header))

    def open_authenticated(self, raw: bytes, keys: KeyRing | None,
                           expect: int | frozenset[int] | tuple[int, ...] | None = None,
                           unexpected: str = "unexpected-type") -> tuple[Frame, Message]:
        """Open, check and parse one untrusted frame: ``(frame, message)``.

        The outer frame (``open_frame``); its tag, which must be ``expect`` (a ``Tag``, or a
        collection of them; ``None``: any), else ``DecodeError(unexpected)``; its MAC, checked
        with ``keys`` (``DecodeError("bad-mac")``); then every field (``parse``).  ``keys=None``
        is for a demultiplexer that learns whose keys check the MAC only from the parsed message
        (replies to several clients over one connection): it must verify it before acting."""
        fr = self.open_frame(raw)
        if expect is not None and (fr.tag != expect if isinstance(expect, int) else fr.tag not in expect):
            raise DecodeError(unexpected)
        if keys is not None and not keys.verify(fr.sender, fr.digest, fr.auth, fr.multi):
            raise DecodeError("bad-mac")
        return fr, self.parse(fr)

    # -- fields ---------------------------------------------------------------
    def parse(self, fr: Frame) -> Message:
        """Typed message from an (authenticated) frame; every field range-checked."""
        cfg = self.cfg
        h = _unpack(fr.header, self.frame_max)
        if type(h) is not tuple:
            raise DecodeError("bad-header")
        tag = fr.tag
        n = self.n
        try:
            if tag == T_REQUEST:
                if len(h) == 4:
                    ts, op, ro, replier = h
                    if fr.payload:
                        raise DecodeError("unexpected-payload")
                    op = _bytes(op, cfg.request_size_bytes_max, "op")
                    if len(op) >= REQUEST_OP_PAYLOAD_MIN:
                        raise DecodeError("op-not-in-payload")
                else:
                    ts, opd, ro, replier, size = h
                    op = _bytes(fr.payload, cfg.request_size_bytes_max, "op")
                    if type(size) is not int or size != len(op) or len(op) < REQUEST_OP_PAYLOAD_MIN:
                        raise DecodeError("bad-op-size")
                    _digest(opd, "op-digest")
                    if op_digest(op) != opd:
                        raise DecodeError("op-digest-mismatch")
                    fr.opd = opd
                req = Request(fr.sender, _int(ts, 1, U63, "timestamp"), op, _bool(ro, "read-only"),
                              _int(replier, ALL_REPLICAS, n - 1, "replier"))
                if fr.sender < n and (req.read_only or not req.op.startswith(RECOVERY_OP)):
                    raise DecodeError("replica-request-not-recovery")
                return req
            if tag == T_REPLY:
                v, ts, client, tent, ro, rd, full = h
                v = _int(v, 0, U63, "view")
                ts = _int(ts, 1, U63, "timestamp")
                client = _int(client, 0, self.max_principal, "client")
                tent = _bool(tent, "tentative")
                ro = _bool(ro, "read-only")
                rd = _digest(rd)
                # (a full result is checked against ``rd`` by the client it is for, ``core.client``)
                res: bytes | None = None
                if _bool(full, "full"):
                    res = _bytes(fr.payload, cfg.reply_size_bytes_max, "result")
                elif fr.payload:
                    raise DecodeError("unexpected-payload")
                return Reply(v, ts, client, fr.sender, tent, ro, rd, res)
            if tag in (T_PRE_PREPARE, T_PREPARE, T_COMMIT):
                v, s, d = h
                v = _int(v, 0, U63, "view")
                s = _int(s, 1, U63, "seqno")
                d = _digest(d)
                if tag == T_PRE_PREPARE:
                    batch = self.decode_batch(fr.payload) if fr.payload else None
                    return PrePrepare(v, s, d, fr.sender, batch)
                if fr.payload:
                    raise DecodeError("unexpected-payload")
                return (Prepare if tag == T_PREPARE else Commit)(v, s, d, fr.sender)
            if tag == T_CHECKPOINT:
                s, d = h
                return Checkpoint(_int(s, 0, U63, "seqno"), _digest(d), fr.sender)
            if tag == T_STATUS:
                v, active, stable, last, nvd = h
                if nvd != b"":
                    _digest(nvd)
                return Status(_int(v, 0, U63, "view"), _bool(active, "active"), _int(stable, 0, U63, "seqno"),
                              _int(last, 0, U63, "seqno"), fr.sender, nvd)
            if tag == T_VIEW_CHANGE:
                return self._view_change(h, fr.sender)
            if tag == T_VIEW_CHANGE_ACK:
                v, j, d = h
                return ViewChangeAck(_int(v, 1, U63, "view"), fr.sender, _int(j, 0, n - 1, "replica"), _digest(d))
            if tag == T_NEW_VIEW:
                return self._new_view(h, fr.sender)
            if tag == T_FETCH:
                s, d, lvl, x, want = h
                if fr.payload:
                    raise DecodeError("unexpected-payload")
                F = cfg.partition_fanout
                return Fetch(_int(s, 0, U63, "seqno"), _digest(d), _int(lvl, 0, 64, "level"), _int(x, 0, U63, "index"),
                             tuple(_int(i, 0, U63, "object") for i in _tuple(want, F, "want")), fr.sender)
            if tag == T_META_DATA:
                s, lvl, x, ch = h
                if fr.payload:
                    raise DecodeError("unexpected-payload")
                return MetaData(_int(s, 0, U63, "seqno"), _int(lvl, 0, 64, "level"), _int(x, 0, U63, "index"),
                                tuple(_child(c) for c in _tuple(ch, cfg.partition_fanout, "children")), fr.sender)
            if tag == T_DATA:
                s, lvl, x = h
                objs = _unpack(fr.payload, self.frame_max)
                objs = tuple((_int(i, 0, U63, "object"), _object(v, cfg.state_size_bytes_max))
                             for i, v in (_pair(o) for o in _tuple(objs, cfg.partition_fanout, "objects")))
                return Data(_int(s, 0, U63, "seqno"), _int(lvl, 0, 64, "level"), _int(x, 0, U63, "index"), objs,
                            fr.sender)
            if tag == T_FETCH_BATCH:
                (d,) = h
                if fr.payload:
                    raise DecodeError("unexpected-payload")
                return FetchBatch(_digest(d), fr.sender)
            if tag == T_VOUCH:
                (ks,) = h
                if fr.payload:
                    raise DecodeError("unexpected-payload")
                return Vouch(fr.sender, tuple(_digest(k) for k in _tuple(ks, VOUCH_KEYS_MAX, "vouch-keys")))
            if tag == T_BATCH_DATA:
                (d,) = h
                return BatchData(_digest(d), fr.sender, self.decode_batch(fr.payload))
            if fr.payload:
                raise DecodeError("unexpected-payload")
            if tag == T_QUERY_STABLE:
                (nonce,) = h
                return QueryStable(fr.sender, _int(nonce, 0, U63, "nonce"))
            if tag == T_REPLY_STABLE:
                c, p, nonce = h
                return ReplyStable(_int(c, 0, U63, "seqno"), _int(p, 0, U63, "seqno"), fr.sender,
                                   _int(nonce, 0, U63, "nonce"))
        except ValueError as e:  # wrong number of fields in the unpacking above
            raise DecodeError("bad-arity") from e
        raise DecodeError("bad-tag")

    def _view_change(self, h: Any, sender: int) -> ViewChange:
        v, stable, ckpts, prepared, preprepared = h
        v = _int(v, 1, U63, "view")
        stable = _int(stable, 0, U63, "seqno")
        W = self.window
        cs = []
        for c in _tuple(ckpts, W + 2, "checkpoints"):
            c = _tuple(c, 2, "checkpoint")
            if len(c) != 2:
                raise DecodeError("bad-checkpoint")
            cs.append((_int(c[0], 0, U63, "seqno"), _digest(c[1])))
        ps = []
        for p in _tuple(prepared, W, "prepared"):
            ps.append(self._ndv(p))
        qs = []
        for q in _tuple(preprepared, W * VC_PREPREPARED_PER_SEQNO_MAX, "preprepared"):
            qs.append(self._ndv(q))
        return ViewChange(v, sender, stable, tuple(cs), tuple(ps), tuple(qs))

    def _ndv(self, x: Any) -> tuple[int, bytes, int]:
        x = _tuple(x, 3, "entry")
        if len(x) != 3:
            raise DecodeError("bad-entry")
        return (_int(x[0], 1, U63, "seqno"), _digest(x[1]), _int(x[2], 0, U63, "view"))

    def _new_view(self, h: Any, sender: int) -> NewView:
        v, vcs, cs, cd, chosen, batches = h
        v = _int(v, 1, U63, "view")
        vl = []
        for x in _tuple(vcs, self.n, "view-changes"):
            x = _tuple(x, 2, "vc-entry")
            if len(x) != 2:
                raise DecodeError("bad-vc-entry")
            vl.append((_int(x[0], 0, self.n - 1, "replica"), _digest(x[1])))
        ch = []
        for x in _tuple(chosen, self.window, "chosen"):
            x = _tuple(x, 2, "chosen-entry")
            if len(x) != 2:
                raise DecodeError("bad-chosen-entry")
            ch.append((_int(x[0], 1, U63, "seqno"), _digest(x[1])))
        bl = tuple(self.decode_batch(_bytes(b, self.frame_max, "batch"))
                   for b in _tuple(batches, self.window, "batches"))
        return NewView(v, sender, tuple(vl), _int(cs, 0, U63, "seqno"), _digest(cd), tuple(ch), bl)

    # -- batches --------------------------------------------------------------
    def decode_batch(self, raw: bytes) -> Batch:
        t = _unpack(raw, self.frame_max)
        if type(t) is not tuple or len(t) != 2:
            raise DecodeError("bad-batch")
        nondet, reqs = t
        _bytes(nondet, NONDET_SIZE_BYTES_MAX, "nondet")
        reqs = _tuple(reqs, self.cfg.batch_requests_max, "batch-size")
        for r in reqs:
            _bytes(r, self.frame_max, "batch-request")
            if r[:1] == REQUEST_REF and len(r) != REQUEST_REF_BYTES:
                raise DecodeError("bad-request-ref")
        return Batch(nondet, reqs)

    def request_of(self, raw: bytes) -> tuple[Frame, Request]:
        """Open and parse one request frame of a batch (its MAC is checked by the caller)."""
        fr = self.open_frame(raw)
        if fr.tag != T_REQUEST:
            raise DecodeError("batch-not-request")
        req = self.parse(fr)
        if not isinstance(req, Request):  # a request frame parses to a Request or raises
            raise DecodeError("batch-not-request")
        return fr, req

    def batch_requests(self, b: Batch) -> list[tuple[Frame, Request]]:
        """Open and parse the request frames of a batch (MACs are checked by the caller)."""
        return [self.request_of(raw) for raw in b.requests]

    def batch_digest(self, b: Batch) -> bytes:
        """Digest of a batch (a reference entry stands for its request's digest). Raises
        DecodeError if it holds malformed requests."""
        ds = [raw[1:] if raw[:1] == REQUEST_REF else self.request_of(raw)[0].digest for raw in b.requests]
        return batch_digest_from_request_digests(b.nondet, ds)


NONDET_SIZE_BYTES_MAX = 256
VOUCH_KEYS_MAX = 4096
VC_PREPREPARED_PER_SEQNO_MAX = 4
