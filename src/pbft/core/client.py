"""The PBFT client as a pure state machine.

One outstanding request at a time; timestamps grow.  Every transmission goes
to all replicas (backups vouch for the requests they received, see
``messages.Vouch``); one designated replier sends the full result, the others
its digest.  On timeout the request is sent again asking every replica for the
full result, and the timeout doubles (bounded).

A result is accepted with

* a weak certificate (weight > W_byz, i.e. f+1) of matching *committed* replies, or
* a quorum (2f+1) of matching replies from one view, tentative or not, or
* for read-only requests, a quorum of matching read-only replies; when such a
  quorum can no longer form, or on the first timeout, the client retries the
  operation as an ordinary read-write request (the fallback that keeps
  read-only operations live under a faulty primary).

Digest replies are resolved against a full reply whose result hashes to the
certified digest, whichever replica sent it.  When the designated replier's full
result is not the certified one (a lying replica), every replica is asked for the
full result at once; and the designated replier of the next requests is chosen
among the replicas whose replies matched the last certified result, so one lying
(or crashed) replica costs a client one retransmission, not one per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..codec import Codec, DecodeError, Frame, result_digest, seal
from ..config import ClusterConfig
from ..crypto import KeyRing
from ..messages import ALL_REPLICAS, Reply, Request, Tag
from .quorum import Quorums
from .ready import Ready


@dataclass(slots=True)
class Outcome:
    timestamp: int
    result: bytes
    read_only_fallback: bool  # a read-only request that completed through ordering

    def __init__(self, timestamp: int, result: bytes, read_only_fallback: bool) -> None:
        # (its own ``__init__``, as the hot messages have (``pbft.messages``): native when compiled)
        self.timestamp = timestamp
        self.result = result
        self.read_only_fallback = read_only_fallback


class Client:
    def __init__(self, cfg: ClusterConfig, client_id: int, keys: KeyRing, now: float = 0.0):
        assert cfg.is_client(client_id)
        self.cfg = cfg
        self.quorums = Quorums.of(cfg)
        self.id = client_id
        self.keys = keys
        self.codec = Codec(cfg)
        self.now = now
        self.out: list[tuple[tuple[int, ...], bytes]] = []
        self.drops: dict[str, int] = {}
        self.replicas = tuple(range(cfg.n))
        self.view = 0
        self.timestamp = 0
        self.req: Optional[Request] = None
        self.read_only = False
        self.fell_back = False
        self.replies: dict[int, Reply] = {}
        self.full: dict[bytes, bytes] = {}
        self.deadline: Optional[float] = None
        self.timeout = cfg.client_retry_timeout_ms
        self.retries = 0
        self.done: list[Outcome] = []
        self.responsive: tuple[int, ...] = ()  # replicas whose reply matched the last result
        self.asked_full = False
        self.retransmissions = 0  # metric: every transmission of a request after its first

    # ---- driver interface ---------------------------------------------------
    def set_membership(self, cfg: ClusterConfig, view: int) -> None:
        """The replicas changed (a membership change switched at the replicas, ``core.membership``;
        a driver learns it from the configuration, e.g. ``reconfig show``): authenticate for, send
        to and count replies of the new members, from the new epoch's first ``view`` on. The
        replies collected so far are forgotten; an operation under way is retransmitted."""
        assert cfg.client_base == self.cfg.client_base  # (client ids do not move)
        self.cfg, self.quorums, self.codec = cfg, Quorums.of(cfg), Codec(cfg)
        self.replicas, self.view, self.responsive = tuple(range(cfg.n)), max(self.view, view), ()
        self.replies, self.full = {}, {}

    @property
    def busy(self) -> bool:
        return self.req is not None

    def take_sends(self) -> list[tuple[tuple[int, ...], bytes]]:
        out, self.out = self.out, []
        return out

    def take_ready(self) -> Ready:
        """The sends of the steps since the last call, as a ``Ready`` (a client writes nothing and
        reports no events): drivers may treat replicas and clients alike."""
        return Ready(sends=self.take_sends())

    def next_deadline(self) -> Optional[float]:
        return self.deadline

    def invoke(self, op: bytes, read_only: bool, now: float) -> int:
        """Start a request; returns its timestamp. Requires: no request outstanding."""
        if self.req is not None:
            raise RuntimeError("a PBFT client has at most one outstanding request")
        self.now = now
        self.read_only = read_only
        self.fell_back = False
        self.retries = 0
        self.timeout = self.cfg.client_retry_timeout_ms
        # every replica gets the request from us: backups vouch for it (see messages.Vouch)
        # and can watch the primary order it
        self._issue(op, read_only, broadcast=True)
        return self.timestamp

    def cancel(self) -> None:
        """Forget the outstanding request (the caller gave up waiting; its outcome is unknown).

        The next ``invoke`` uses a larger timestamp, so a late execution of the
        abandoned request can never be mistaken for the new one's."""
        self.req = None
        self.deadline = None
        self.replies = {}
        self.full = {}

    def take_outcomes(self) -> list[Outcome]:
        out, self.done = self.done, []
        return out

    def receive(self, raw: object, now: float) -> None:  # object: see Codec.open_frame
        self.now = now
        try:
            fr = self.codec.open_frame(raw)
            if fr.tag != Tag.REPLY:
                raise DecodeError("client-expects-replies")
            if not self.keys.verify(fr.sender, fr.digest, fr.auth, fr.multi):
                raise DecodeError("bad-mac")
            rep = self.codec.parse(fr)
            if not isinstance(rep, Reply):  # (a reply frame parses to a Reply)
                raise DecodeError("client-expects-replies")
        except DecodeError as e:
            self._drop(e.reason)
            return
        self._on_reply(rep)

    def receive_parsed(self, fr: Frame, rep: Reply, now: float) -> None:
        """Like ``receive`` for a reply frame a demultiplexer already opened and parsed
        (several clients sharing one connection); the MAC is checked here, after the cheap test
        that drops a reply to no outstanding request (the last replies of every request, once
        its result is certified): such a reply is dropped whatever its MAC says."""
        self.now = now
        req = self.req
        if req is None or rep.client != self.id or rep.timestamp != req.timestamp:
            self._drop("reply-stale")
            return
        if not self.keys.verify(fr.sender, fr.digest, fr.auth, fr.multi):
            self._drop("bad-mac")
            return
        self._on_reply(rep)

    def tick(self, now: float) -> None:
        self.now = now
        if self.deadline is None or now < self.deadline or self.req is None:
            return
        if self.asked_full:
            r = self.req
            self.retransmissions += 1
            self.req = Request(r.client, r.timestamp, r.op, r.read_only, ALL_REPLICAS)
            self._send(broadcast=True)
            return
        if self.req.read_only:
            self._fallback()
            return
        self.retries += 1
        self.retransmissions += 1
        self.timeout = min(self.timeout * 2, self.cfg.client_retry_timeout_max_ms)
        r = self.req
        # retransmit to everybody, asking all replicas for the full result
        self.req = Request(r.client, r.timestamp, r.op, r.read_only, ALL_REPLICAS)
        self._send(broadcast=True)

    # ---- internals ----------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _issue(self, op: bytes, read_only: bool, broadcast: bool) -> None:
        self.timestamp += 1
        # the designated replier rotates among replicas that answered last time, so a crashed
        # replica does not keep costing a retransmission
        live = self.responsive or self.replicas
        replier = live[(self.id + self.timestamp) % len(live)]
        self.asked_full = False
        self.req = Request(self.id, self.timestamp, op, read_only, replier)
        self.replies = {}
        self.full = {}
        self._send(broadcast)

    def _send(self, broadcast: bool) -> None:
        assert self.req is not None  # an operation is outstanding
        raw = seal(self.req, self.keys)
        dests = self.replicas if broadcast else (self.view % self.cfg.n,)
        self.out.append((dests, raw))
        self.deadline = self.now + self.timeout

    def _fallback(self) -> None:
        """Read-only attempt failed: order the operation like a write."""
        assert self.req is not None  # an operation is outstanding
        op = self.req.op
        self.fell_back = True
        self.read_only = False
        self._issue(op, False, broadcast=True)

    def _certified(self, req: Request) -> tuple[Optional[bytes], dict[tuple[int, bytes], list[int]]]:
        """The result digest the replies so far certify (a weak certificate of committed replies,
        or a quorum of matching replies in one view), or None; and the replies grouped by
        (view, result digest)."""
        q = self.quorums
        groups: dict[tuple[int, bytes], list[int]] = {}
        committed: dict[bytes, list[int]] = {}
        for r, x in self.replies.items():
            key = (0 if req.read_only else x.view, x.result_digest)
            groups.setdefault(key, []).append(r)
            if not x.tentative and not req.read_only:
                committed.setdefault(x.result_digest, []).append(r)
        certified: Optional[bytes] = None
        for d, rs in committed.items():
            if q.is_weak(rs):
                certified = d
        for (_v, d), rs in groups.items():
            if q.is_quorum(rs):
                certified = d
        return certified, groups

    def _on_reply(self, rep: Reply) -> None:
        req = self.req
        if req is None or rep.client != self.id or rep.timestamp != req.timestamp:
            self._drop("reply-stale")
            return
        if rep.read_only != req.read_only:
            self._drop("reply-kind-mismatch")
            return
        if rep.result is not None:
            if result_digest(rep.result) != rep.result_digest:
                self._drop("reply-result-digest-mismatch")
                return
            self.full[rep.result_digest] = rep.result
        self.replies[rep.replica] = rep
        q = self.quorums
        certified, groups = self._certified(req)
        views = [x.view for x in self.replies.values()]
        if certified is not None:
            if certified not in self.full:
                if req.replier == ALL_REPLICAS:
                    return  # every replica was asked for the full result already
                lied = self.replies.get(req.replier)
                if lied is not None and lied.result is not None and lied.result_digest != certified:
                    # the designated replier sent its full result, and it is not the certified
                    # one: it will send no other. Ask every replica for the result now (they
                    # answer from their reply cache); no grace to wait out
                    self.asked_full = True
                    self.retransmissions += 1
                    self.req = Request(req.client, req.timestamp, req.op, req.read_only, ALL_REPLICAS)
                    self._send(broadcast=True)
                    return
                if not self.asked_full:
                    # the designated replier has not sent it (yet): give it a short grace, then
                    # ask every replica for it instead of waiting out the whole retransmission
                    # timeout
                    self.asked_full = True
                    self.deadline = min(self.deadline or float("inf"), self.now + self.timeout / 8)
                return
            self.view = max(self.view, max(views))
            # the next designated replier is one of the replicas whose reply matched the result:
            # a replica that answered with another one (a lying replica, whose full result cost
            # this request a retransmission) or not at all (a crashed one) is not chosen again
            # until a request's certified result matches its reply
            self.responsive = tuple(sorted(r for r, x in self.replies.items() if x.result_digest == certified))
            self.done.append(Outcome(req.timestamp, self.full[certified], self.fell_back))
            self.req = None
            self.deadline = None
            return
        if req.read_only:
            best = max((q.weight(rs) for rs in groups.values()), default=0)
            # replicas that did not answer our last request are not waited for
            expected = self.responsive or self.replicas
            silent = q.weight([r for r in expected if r not in self.replies])
            if best + silent < q.quorum:  # (no quorum can form any more)
                self._fallback()
