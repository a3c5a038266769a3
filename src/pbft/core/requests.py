"""Requests: admission, vouching, the primary's queue, the request timer, read-only requests and
replies.

Owns: every map of requests not yet executed (the latest known request of each client, with its
vouch key; the vouches, ours to send and others' with their per-replica budget; the trusted and
suspected clients; the frames we verified ourselves; the primary's queue and what it has in
flight; the requests a backup watches with the request timer; the read-only requests waiting for
committed state) and the cached-reply rate limit.

May not touch: the log, the checkpoints and the view. It reads the last-reply table (the state's)
and asks ``Replica`` to start a view change when the request timer expires; ``Log`` takes the
primary's batches from it (``take_batch``) and has it check the batches of pre-prepares
(``check_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..codec import (
    BATCH_OVERHEAD_BYTES, NONDET_SIZE_BYTES_MAX, DecodeError, Frame, batch_digest_from_request_digests,
    result_digest, seal, vouch_key,
)
from ..messages import ALL_REPLICAS, REQUEST_REF, Batch, Reply, Request, Tag, Vouch, has_refs, request_ref
from . import membership
from .drops import Drop

if TYPE_CHECKING:
    from .replica import Replica


VOUCH_BATCH_MAX = 1024


T_REQUEST = int(Tag.REQUEST)  # (compared once per request frame a batch brings: a plain int)


@dataclass(slots=True)
class ReqInfo:
    req: Request
    digest: bytes
    raw: bytes
    key: bytes = b""  # vouch key
    verified: bool = True  # our own MAC entry verified
    since: float = 0.0  # backups: when it became certified here (or the current view started)

    def __init__(self, req: Request, digest: bytes, raw: bytes, key: bytes = b"", verified: bool = True,
                 since: float = 0.0) -> None:
        # (its own ``__init__``, as the hot messages have (``pbft.messages``): native when compiled)
        self.req = req
        self.digest = digest
        self.raw = raw
        self.key = key
        self.verified = verified
        self.since = since


class Requests:
    """Request admission, vouching and replies (see the module docstring for what it owns)."""

    __slots__ = ("r", "known", "key_client", "vouches", "vouch_out", "vouch_urgent", "vouch_deadline",
                 "vouch_unknown", "vouch_unknown_max", "trusted", "suspects", "seen", "seen_max", "queue",
                 "inflight", "pending", "deadline", "ro_queue", "ro_barrier", "reply_resent", "last_client_exec",
                 "batch_checks", "switch_watch", "bodies")

    def __init__(self, replica: "Replica"):
        self.r = replica
        cfg = replica.cfg
        # request dissemination: every replica gets each request from its client, vouches for
        # those whose MAC verifies here, and treats a request as genuine once f+1 vouch for it.
        # Invariant: the clients of queue, pending and inflight have a request in known, or had one
        # that executed here (tentatively, for inflight); key_client maps exactly known's keys
        self.known: dict[int, ReqInfo] = {}  # client -> latest request not yet executed (committed)
        self.key_client: dict[bytes, int] = {}  # vouch key -> client, for the requests in ``known``
        self.vouches: dict[bytes, set[int]] = {}  # vouch key -> replicas that vouched
        self.vouch_out: dict[bytes, None] = {}  # vouch keys to send (an ordered set)
        self.vouch_urgent = False
        self.vouch_deadline: Optional[float] = None
        # per-replica budgets for vouches (a Byzantine replica may send Vouch messages full of keys
        # as fast as it can): a vouch for a key matching no request here (yet: the vouch may have
        # overtaken the request) is kept only up to ``vouch_unknown_max`` keys per replica, oldest
        # dropped (``vouch-unknown-dropped``); vouches for known requests are bounded by ``known``.
        # So one replica can neither grow our memory nor evict the other replicas' vouches.
        self.vouch_unknown: dict[int, dict[bytes, None]] = {}  # replica -> its unknown keys, oldest first
        self.vouch_unknown_max = 2 * max(cfg.clients_max, 32)
        # fast path: a primary orders a request from a *trusted* client as soon as its own MAC
        # verifies, without waiting for f+1 vouches (one message delay less). Trusted: some
        # request of the client was vouched for by backups of weight f+1 (its authenticators
        # verify at correct backups); never a suspect: a client whose MAC failed here or whose
        # request sat in a pre-prepare we could not accept for want of vouches.
        self.trusted: set[int] = set()
        self.suspects: set[int] = set()
        # request frames received from their clients, opened, parsed and (MAC) verified here:
        # a pre-prepare that batches them is then checked without opening them again
        self.seen: dict[bytes, tuple[Frame, Request]] = {}
        self.seen_max = max(1024, 8 * cfg.clients_max)
        # request frames received from their clients (verified here or not), by frame digest: the
        # bodies of a pre-prepare's by-digest entries (``resolve``); bounded as ``seen``
        self.bodies: dict[bytes, bytes] = {}
        self.queue: dict[int, ReqInfo] = {}  # primary: client -> certified request waiting for a batch
        self.inflight: dict[int, int] = {}  # primary: client -> timestamp ordered but not yet executed
        # backup: client -> certified request not yet committed here, and the request timer that
        # replaces a primary which does not commit it in time
        self.pending: dict[int, ReqInfo] = {}
        self.deadline: Optional[float] = None
        self.switch_watch: Optional[tuple[int, float]] = None  # (committed execution, since): ``_watch_switch``
        self.ro_queue: dict[int, ReqInfo] = {}  # client -> read-only request waiting for committed state
        self.ro_barrier = 0  # read-only requests wait until we executed this far (set by new views)
        # client -> (timestamp, tentative, when) of the last cached reply we sent again (one entry
        # per principal id: bounded by the codec's range of senders)
        self.reply_resent: dict[int, tuple[int, bool, float]] = {}
        self.last_client_exec = replica.now  # when a client's request last executed (the idle rejoin)
        self.batch_checks = 0  # pre-prepared batches checked (check_batch; what vouches re-check is bounded)

    def restart(self) -> None:
        """After a crash: the requests, vouches and timers were volatile."""
        self.queue.clear()
        self.inflight.clear()
        self.ro_queue.clear()
        self.pending.clear()
        self.known.clear()
        self.key_client.clear()
        self.seen.clear()
        self.bodies.clear()
        self.vouches.clear()
        self.vouch_unknown.clear()
        self.vouch_out.clear()
        self.vouch_deadline = None
        self.vouch_urgent = False
        self.deadline = None

    def tick(self, now: float) -> None:
        """The request timer: a certified request not committed within the view-change timeout of
        becoming known here replaces the primary."""
        r = self.r
        self._watch_switch(now)
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if r.view_active and self.pending:
                if r.fetch_target is not None:
                    # we are behind and fetching state: we cannot judge the primary yet
                    self.deadline = now + r.vc.timeout_ms
                elif now - min(ri.since for ri in self.pending.values()) >= r.vc.timeout_ms:
                    r._start_view_change(r.view + 1, "request-timer")
                else:
                    self.arm_timer()

    def _watch_switch(self, now: float) -> None:
        """A membership change waits for its switch point, which the primary reaches with null
        batches once the clients are done; no client's request covers those, so the request timer
        would never fire. A backup whose committed execution does not move towards the switch
        point within the view-change timeout replaces the primary, as for a request."""
        r = self.r
        end = membership.fence(r)
        done = r.log.last_committed_exec
        if (end is None or done >= end or not r.view_active or r.is_primary or r.retired
                or r.fetch_target is not None):
            self.switch_watch = None
            return
        w = self.switch_watch
        if w is None or w[0] != done:
            self.switch_watch = (done, now)
        elif now - w[1] >= r.vc.timeout_ms:
            self.switch_watch = None
            r._start_view_change(r.view + 1, "switch-stalled")

    def flush_vouches(self) -> None:
        """Before a step's sends leave: one Vouch per driver step (vouches batch themselves under
        load). They wait up to ``vouch_delay_ms`` for another message to the replicas to travel
        with (one write per peer instead of two; under load there always is one), and a request
        superseded meanwhile is not vouched for at all; vouches for retransmitted requests go at
        once."""
        r = self.r
        if not self.vouch_out:
            # (every key left before its vouch did: superseded, or ordered, ``ordered``)
            self.vouch_urgent = False
            self.vouch_deadline = None
        elif (self.vouch_urgent or (self.vouch_deadline is not None and r.now >= self.vouch_deadline)
              or any(dests[0] < r.cfg.n for dests, _ in r.out)):
            self.vouch_urgent = False
            self.vouch_deadline = None
            keys, self.vouch_out = list(self.vouch_out), {}
            for i in range(0, len(keys), VOUCH_BATCH_MAX):
                r._broadcast(Vouch(r.id, tuple(keys[i:i + VOUCH_BATCH_MAX])))

    def ordered(self, batch: Batch, infos: Optional[list[ReqInfo]] = None) -> None:
        """The requests of ``batch`` are in a pre-prepare we sent (``infos``: the primary's) or
        accepted: our vouches for them, not sent yet, are not sent at all. Our pre-prepare or
        Prepare says what the vouch would (we verified each request, or f+1 vouched for it), and
        a replica that holds the pre-prepare for want of vouches accepts it once the primary and
        backups of weight f+1 in all stand by it (``Log._weakly_prepared``). In the normal case
        a vouch waits for company or ``vouch_delay_ms`` and the pre-prepare arrives first, so
        requests ordered at once cost no Vouch messages; one that waits (load, an untrusted
        client, a retransmission) was vouched for before it was ordered."""
        out = self.vouch_out
        if not out:
            return
        if infos is not None:
            for ri in infos:
                out.pop(ri.key, None)
            return
        seen, known = self.seen, self.known
        for raw in batch.requests:
            s = seen.get(raw)
            if s is not None:
                info = known.get(s[1].client)
                if info is not None and info.req.timestamp == s[1].timestamp:
                    out.pop(info.key, None)

    def on_unverified_request(self, req: Request, fr: Frame, relayed: bool) -> None:
        """A request whose MAC for us is wrong may still be genuine (its client may be faulty
        towards us only): the body is kept, used only if f+1 replicas vouch for it."""
        if not relayed:
            # its client sent us a bad authenticator entry (in the runtime only a frame from the
            # connection its client's NewKey came on gets here)
            self.suspects.add(req.client)
        large = self._keep_if_large(req, fr)
        self._on_ordered_request(req, fr, verified=False)
        if large:
            self._body_arrived(fr.digest)

    def _keep_if_large(self, req: Request, fr: Frame) -> bool:
        """Keep the frame of a request a pre-prepare may carry by digest (its operation is over
        ``request_inline_op_bytes_max``; read-only ones are never ordered); whether it is one."""
        if len(req.op) <= self.r.cfg.request_inline_op_bytes_max or req.read_only:
            return False
        bodies = self.bodies
        if fr.digest not in bodies and len(bodies) >= self.seen_max:
            del bodies[next(iter(bodies))]
        bodies[fr.digest] = fr.raw
        return True

    def _body_arrived(self, d: bytes) -> None:
        """A request frame with digest ``d`` is here: the pre-prepares waiting for its body may go on."""
        r = self.r
        if d in r.log.body_waiters:
            r.log.body_arrived(d)

    def compact(self, batch: Batch, reqs: Optional[list["ReqInfo"]] = None) -> Batch:
        """``batch`` as a message carries it: each request whose operation is over
        ``request_inline_op_bytes_max`` by its digest (the receivers have it from its client, or
        fetch the whole batch). Precondition: a batch we keep (every body in place). ``reqs``: its
        requests, already parsed (the primary's new batch), else they are parsed here."""
        lim = self.r.cfg.request_inline_op_bytes_max
        if reqs is not None:
            entries = [(ri.digest, len(ri.req.op), ri.raw) for ri in reqs]
        else:
            if all(len(e) <= lim for e in batch.requests):
                return batch  # (a frame is longer than its operation)
            try:
                entries = [(fr.digest, len(req.op), fr.raw) for fr, req in self.batch_requests(batch)]
            except DecodeError:  # (only reachable with the skip-digest-check bug)
                return batch
        if all(k <= lim for _, k, _ in entries):
            return batch
        return Batch(batch.nondet, tuple(request_ref(d) if k > lim else raw for d, k, raw in entries))

    def resolve(self, batch: Batch, missing: Optional[list[bytes]] = None) -> Optional[Batch]:
        """``batch`` with each by-digest entry replaced by the request frame with that digest that
        we hold (received from its client: its MAC is checked as any batch's, ``check_batch``),
        or None if we lack one (``missing``, if given, receives the digests we lack)."""
        if not has_refs(batch):
            return batch
        bodies = self.bodies
        out = []
        lacking = False
        for e in batch.requests:
            if e[:1] == REQUEST_REF:
                raw = bodies.get(e[1:])
                if raw is None:
                    lacking = True
                    if missing is not None:
                        missing.append(e[1:])
                    continue
                e = raw
            out.append(e)
        return None if lacking else Batch(batch.nondet, tuple(out))

    def take_batch(self) -> list[ReqInfo]:
        """The primary's next batch: queued requests in arrival order, bounded by count and by
        bytes, so that the PrePrepare (and a BatchData carrying the batch) fits in a message; the
        config guarantees that a single request always does. They are in flight from now on."""
        r = self.r
        cfg = r.cfg
        reqs: list[ReqInfo] = []
        room = cfg.batch_bytes_max - BATCH_OVERHEAD_BYTES - NONDET_SIZE_BYTES_MAX
        queue = self.queue
        for c in list(queue):
            ri = queue[c]
            last = r.last_reply.get(c)
            if last is not None and ri.req.timestamp <= last[0] and not r.bug_no_ts:
                del queue[c]
                continue
            size = 5 + len(ri.raw)
            if size > room:
                if reqs:
                    break  # waits for the next batch
                del queue[c]  # (a frame larger than the config allows: not reachable)
                r._drop(Drop.REQUEST_TOO_LARGE_FOR_BATCH)
                continue
            del queue[c]
            room -= size
            reqs.append(ri)
            self.inflight[c] = ri.req.timestamp
            if len(reqs) >= cfg.batch_requests_max:
                break
        return reqs

    def executed(self, done: list[tuple[int, int, bytes]]) -> None:
        """These (client, timestamp, op) executed: no longer in flight at the primary."""
        inflight = self.inflight
        for c, t, _ in done:
            if inflight.get(c, 0) <= t:
                inflight.pop(c, None)

    def completed(self, done: tuple[tuple[int, int], ...]) -> None:
        """These (client, timestamp) executed with their batch committed: they leave the pending
        set and the known requests (and the timer restarts: ``Replica._committed``)."""
        r = self.r
        replicas = r.cfg.n
        for c, t in done:
            # (a replica's newer recovery request, admitted here but not at the primary within the
            # admission interval, is folded into the one executed: see ``ProactiveRecovery.admit``)
            p = self.pending.get(c)
            if p is not None and (p.req.timestamp <= t or c < replicas):
                del self.pending[c]
            k = self.known.get(c)
            if k is not None and (k.req.timestamp <= t or c < replicas):
                self.key_client.pop(self.known.pop(c).key, None)
                self.vouches.pop(k.key, None)
            if c >= replicas:
                self.last_client_exec = r.now

    def leave_view(self) -> None:
        """A view change: the primary's queue and what it had in flight go, and the timer stops."""
        self.deadline = None
        self.queue.clear()
        self.inflight.clear()

    def wait_reads_for(self, top: int) -> None:
        """A NewView re-proposed up to ``top``: read-only requests wait until we executed that far
        (a write acknowledged by 2f+1 tentative replies is re-proposed there)."""
        self.ro_barrier = top

    def new_view(self, primary: bool) -> None:
        """A NewView is installed: the new primary proposes what clients asked the backups (our old
        selves) to order; a backup gives the new primary a full timeout for each request it
        watches."""
        r = self.r
        if primary:
            self.pending.clear()
            for c in list(self.known):
                self.consider(c)
        elif self.pending:
            for ri in self.pending.values():
                ri.since = r.now
            self.arm_timer()

    def caught_up(self) -> None:
        """A state transfer installed a checkpoint: the watched requests it executed are done."""
        last_reply = self.r.last_reply
        for c in [c for c, ri in self.pending.items() if ri.req.timestamp <= last_reply.get(c, (0,))[0]]:
            del self.pending[c]
        if not self.pending:
            self.deadline = None

    def idle(self) -> bool:
        """No request is waiting, queued, ordered or watched here."""
        return not self.pending and not self.queue and not self.inflight and not self.ro_queue

    def on_request(self, req: Request, fr: Frame) -> None:
        seen = self.seen
        if len(seen) >= self.seen_max:
            del seen[next(iter(seen))]
        seen[fr.raw] = (fr, req)
        large = self._keep_if_large(req, fr)
        self._admit(req, fr)
        if large:
            self._body_arrived(fr.digest)

    def _admit(self, req: Request, fr: Frame) -> None:
        r = self.r
        if req.read_only:
            self._on_read_only(ReqInfo(req, fr.digest, fr.raw))
            return
        if req.client < r.cfg.n:
            reason = r.recovery.admit(req)  # (a replica's: its recovery request)
            if reason:
                r._drop(reason)
                return
        self._on_ordered_request(req, fr, verified=True)

    def _timestamp_limit(self, client: int = -1) -> float:
        """The largest request timestamp we take now from ``client``: our wall clock (in µs, as
        clients' timestamps) plus ``timestamp_skew_ms_max``, or for a replica (its recovery
        request, timestamped with its clock) plus the replicas' clock skew ``nondet_skew_ms_max``.
        A request beyond it would, once executed, make its client's genuine requests look old
        until our clock caught up (for good at 2^63-1): it is neither vouched for, nor ordered,
        nor accepted in a pre-prepare. The tighter bound for replicas is what lets a recovery
        get through after an intruder ordered one under the replica's keys
        (``ProactiveRecovery._on_newer_reply``)."""
        r = self.r
        skew = r.cfg.nondet_skew_ms_max if 0 <= client < r.cfg.n else r.cfg.timestamp_skew_ms_max
        return (r.now + r.wall_offset_ms + skew) * 1000.0

    def _on_ordered_request(self, req: Request, fr: Frame, verified: bool) -> None:
        r = self.r
        c, t = req.client, req.timestamp
        if t > self._timestamp_limit(c):
            r._drop(Drop.REQUEST_FUTURE_TIMESTAMP)
            return
        last = r.last_reply.get(c)
        if last is not None and t <= last[0] and not r.bug_no_ts:
            return self._on_executed_request(req, fr, verified, last)
        key = vouch_key(req, fr.opd)
        cur = self.known.get(c)
        if cur is not None:
            if not self._replaces_known(cur, req, fr, verified, key):
                return
        elif len(self.known) >= r.cfg.pending_requests_max:
            r._drop(Drop.KNOWN_REQUESTS_FULL)
            return
        ri = ReqInfo(req, fr.digest, fr.raw, key, verified)
        old = self.known.pop(c, None)
        if old is not None:
            self.key_client.pop(old.key, None)
        self.known[c] = ri  # (re)inserted last: the primary batches in arrival order
        self.key_client[key] = c
        if verified:
            self._add_vouch(key, r.id)
            self.vouch_out[key] = None
            if c not in self.trusted and c not in self.suspects:
                self.vouch_urgent = True  # a newcomer: its first requests wait for our vouch
            elif self.vouch_deadline is None:
                self.vouch_deadline = r.now + r.cfg.vouch_delay_ms
            p = self.pending.get(c)
            if p is not None and p.req.timestamp < t:
                # the client itself superseded the request we watch (its vouches are gone, here and
                # wherever the newer one arrived: no primary can order it any more). A correct
                # client never does before its request completes, or it gave up waiting: the
                # primary is judged on the newer one, from when it is certified here
                del self.pending[c]
                self.arm_timer()
        self.consider(c)

    def _on_executed_request(self, req: Request, fr: Frame, verified: bool, last: tuple[int, bytes]) -> None:
        """A request at or below the timestamp of the client's last executed one: a late copy, a
        retransmission (answered from the reply cache), or old."""
        r = self.r
        c, t = req.client, req.timestamp
        if not verified:
            r._drop(Drop.REQUEST_UNVERIFIED_OLD)
        elif t == last[0] and r.log.executed_digest.get(c) == fr.digest and req.replier != ALL_REPLICAS:
            # the client's own copy of a request we already executed from a pre-prepare that
            # overtook it (the primary's fast path): not a retransmission, nothing to answer
            r._drop(Drop.REQUEST_LATE_COPY)
        elif t == last[0]:
            # the cached reply is only as final as the execution that produced it
            tentative = r.log.last_exec_seqno.get(c, 0) > r.log.last_committed_exec
            r._drop(Drop.REQUEST_RETRANSMITTED)
            sent = self.reply_resent.get(c)
            if sent is not None and sent[0] == t and sent[1] == tentative and \
                    r.now - sent[2] < r.cfg.client_retry_timeout_ms / 2:
                # at most one cached reply per client per half retry timeout: a correct
                # client retransmits less often, so replays (a faulty replica may relay
                # captured requests) cannot make us amplify towards the client
                r._drop(Drop.REPLY_RESEND_RATE_LIMITED)
            else:
                self.reply_resent[c] = (t, tentative, r.now)
                self.send_reply(req, last[1], tentative=tentative)
            if tentative and c not in self.pending and r.view_active and not r.is_primary:
                # the client still waits for a commit that has not come: time it, so a primary
                # that never completes it is replaced (after a restart, nothing else would)
                self.pending[c] = ReqInfo(req, fr.digest, fr.raw, vouch_key(req, fr.opd), True, r.now)
                self.arm_timer()
        else:
            r._drop(Drop.REQUEST_OLD_TIMESTAMP)
            if c < r.cfg.n:
                self._answer_old_recovery_request(c, last)

    def _replaces_known(self, cur: ReqInfo, req: Request, fr: Frame, verified: bool, key: bytes) -> bool:
        """Whether a request of the client whose latest known one is ``cur`` takes its place (if
        not, it was dropped: superseded, a duplicate, or an unverified copy)."""
        r = self.r
        c, t = req.client, req.timestamp
        if cur.verified and not verified:
            r._drop(Drop.REQUEST_UNVERIFIED)  # never displaces what the client surely sent
            return False
        if cur.verified == verified:
            if cur.req.timestamp > t:
                r._drop(Drop.REQUEST_SUPERSEDED)
                return False
            if cur.req.timestamp == t:
                if cur.key != key:
                    r._drop(Drop.REQUEST_TIMESTAMP_REUSED)
                else:
                    r._drop(Drop.REQUEST_DUPLICATE)
                    if verified:
                        # a retransmission: the client is still waiting. Vouch again (ours may
                        # have been lost) and make sure the primary has the request
                        self.vouch_out[key] = None
                        self.vouch_urgent = True
                        if r.view_active and not r.is_primary and c in self.pending:
                            r._send_to(r.primary(), fr.raw)
                        self.consider(c)
                return False
        if cur.key != key:
            self.vouches.pop(cur.key, None)
            self.vouch_out.pop(cur.key, None)  # superseded before our vouch left: never mind it
        if verified and cur.verified and cur.req.timestamp < t and r.is_primary and \
                self.inflight.get(c, 0) < cur.req.timestamp and \
                r.last_reply.get(c, (0,))[0] < cur.req.timestamp:
            # at the primary, a new request while the previous one is not even ordered: not a
            # closed-loop client (a correct one waits for its result, which needs the request
            # ordered). No fast path for it (see ``trusted``)
            self.suspects.add(c)
        return True

    def _add_vouch(self, key: bytes, j: int) -> bool:
        """Record r's vouch for ``key``; whether it is new. A vouch for a key we know no request
        for counts against r's own budget (``vouch_unknown``), never against anybody else's."""
        r = self.r
        vs = self.vouches.get(key)
        if vs is None:
            vs = self.vouches[key] = set()
        elif j in vs:
            return False
        vs.add(j)
        if j != r.id and key not in self.key_client:
            fifo = self.vouch_unknown.get(j)
            if fifo is None:
                fifo = self.vouch_unknown[j] = {}
            fifo[key] = None
            if len(fifo) > self.vouch_unknown_max:
                old = next(iter(fifo))
                del fifo[old]
                r._drop(Drop.VOUCH_UNKNOWN_DROPPED)
                if old not in self.key_client:  # (a request for it arrived since: keep the vouch)
                    ovs = self.vouches.get(old)
                    if ovs is not None:
                        ovs.discard(j)
                        if not ovs:
                            del self.vouches[old]
        return True

    def _certified(self, key: bytes) -> bool:
        r = self.r
        vs = self.vouches.get(key)
        return vs is not None and r.quorums.is_weak(vs)

    def consider(self, c: int) -> None:
        """A known request became (or may have become) certified: order it, or watch the primary."""
        r = self.r
        ri = self.known.get(c)
        if ri is None:
            return
        if not self._certified(ri.key):
            # (and only for a client with nothing in flight: a closed-loop client's previous
            # request has executed before it sends the next; one that floods us waits for vouches,
            # so that its requests supersede each other instead of filling batches)
            if not (ri.verified and c in self.trusted and c not in self.suspects
                    and r.view_active and r.is_primary and c not in self.inflight):
                return
        t = ri.req.timestamp
        if r.view_active and r.is_primary:
            if self.inflight.get(c, 0) >= t:
                return
            cur = self.queue.get(c)
            if cur is not None and cur.req.timestamp >= t:
                return
            self.queue[c] = ri
            r.log.try_send_preprepare()
            return
        cur = self.pending.get(c)
        if cur is None or cur.req.timestamp < t:
            ri.since = r.now
            self.pending[c] = ri
        if r.view_active and self.deadline is None:
            self.arm_timer()

    def arm_timer(self) -> None:
        """Every certified request must commit within the view-change timeout of becoming known
        here: the timer follows the oldest one, so a primary that commits some requests but
        starves others (slow or censoring) is still replaced."""
        r = self.r
        if self.pending and r.view_active:
            self.deadline = min(ri.since for ri in self.pending.values()) + r.vc.timeout_ms
        else:
            self.deadline = None

    def on_vouch(self, m: Vouch, fr: Frame) -> None:
        # work proportional to the message's own keys: a duplicate vouch costs a lookup, an unknown
        # key its sender's budget, and only the held pre-prepares that wait for one of these keys
        # are checked again
        r = self.r
        key_client = self.key_client
        trusted = self.trusted
        held_keys = r.log.held_keys  # (read here; the log gives up the entries: ``Log.unblock``)
        unblocked: set[int] = set()
        dup = skipped = unknown = 0
        cap = self.vouch_unknown_max
        for k in m.keys:
            if k not in key_client:
                # (beyond its budget in one message, an unknown key costs a lookup: inserting it
                # would only evict another of the same sender's)
                if unknown >= cap:
                    skipped += 1
                    continue
                unknown += 1
            if not self._add_vouch(k, m.replica):
                dup += 1
                continue
            c = key_client.get(k)
            if c is not None:
                if c not in trusted:
                    vs = self.vouches.get(k, ())
                    if r.quorums.is_weak([j for j in vs if j != r.id]):
                        trusted.add(c)
                self.consider(c)
            if held_keys and k in held_keys and self._certified(k):
                unblocked |= r.log.unblock(k)
        if dup:
            r._drop(Drop.VOUCH_DUPLICATE)
        if skipped:
            r.drops[Drop.VOUCH_UNKNOWN_DROPPED] = r.drops.get(Drop.VOUCH_UNKNOWN_DROPPED, 0) + skipped
        r.work_units += len(m.keys) - skipped + skipped // 16
        if unblocked:
            # pre-prepares held back for want of these vouches may now be acceptable
            r.log.recheck_held(sorted(unblocked))

    def _read_only_ready(self) -> bool:
        """Whether our state reflects every operation a client may have seen complete.

        Not while tentative executions are outstanding, while changing view (they were
        rolled back), or after a view change until we have executed everything the new
        view re-proposed: a write acknowledged by 2f+1 tentative replies is re-proposed
        there and must be visible to later reads. Never while our state is unverified or being
        fetched (``_state_unverified``).
        """
        r = self.r
        return (r.log.last_exec == r.log.last_committed_exec and not r._state_unverified()
                and r.view_active and r.log.last_committed_exec >= self.ro_barrier)

    def _on_read_only(self, ri: ReqInfo) -> None:
        r = self.r
        if r._state_unverified():
            # refused, not queued: a restarted replica may wait long for its check, and an object
            # forged on its disk must never reach a client (the client falls back to ordering)
            r._drop(Drop.READ_ONLY_STATE_UNVERIFIED)
            return
        if not self._read_only_ready():
            # wait until tentative executions have committed
            if ri.req.client not in self.ro_queue and len(self.ro_queue) >= r.cfg.pending_requests_max:
                r._drop(Drop.RO_QUEUE_FULL)
                return
            self.ro_queue[ri.req.client] = ri
            return
        result = r.log.run_service(ri.req.op, ri.req.client, b"", True)
        self.send_reply(ri.req, result, tentative=False, read_only=True)

    def drain_read_only(self) -> None:
        if self.ro_queue and self._read_only_ready():
            q, self.ro_queue = self.ro_queue, {}
            for ri in q.values():
                self._on_read_only(ri)

    def send_reply(self, req: Request, result: bytes, tentative: bool, read_only: bool = False) -> None:
        r = self.r
        full = req.replier == ALL_REPLICAS or req.replier == r.id
        rep = Reply(r.view, req.timestamp, req.client, r.id, tentative, read_only,
                    result_digest(result), result if full else None)
        r._send_to(req.client, seal(rep, r.keys, to=req.client))

    def check_batch(self, batch: Batch, d: bytes, check_nondet: bool = True,
                     missing: Optional[list[bytes]] = None) -> Optional[Drop]:
        """Why a pre-prepared batch is unacceptable, or None. Checks MACs, digest, request timestamps, nondet.
        ``missing`` (if given) receives the vouch keys of the requests that lack vouches."""
        r = self.r
        self.batch_checks += 1
        try:
            reqs = self.batch_requests(batch)
        except DecodeError:
            return Drop.BATCH_MALFORMED
        r.work_units += len(reqs)
        seen = set()
        unvouched = False
        req_seen = self.seen
        for rfr, req in reqs:
            if rfr.raw not in req_seen and not r.keys.verify(rfr.sender, rfr.digest, rfr.auth, True):
                vk = vouch_key(req, rfr.opd)
                if not self._certified(vk):
                    unvouched = True
                    self.suspects.add(req.client)  # its authenticator is bad for us: no fast path for it
                    if missing is not None:
                        missing.append(vk)
            if req.read_only:
                return Drop.BATCH_READ_ONLY_REQUEST
            if req.client in seen:
                return Drop.BATCH_DUPLICATE_CLIENT
            seen.add(req.client)
        if not r.bug_skip_digest:
            if batch_digest_from_request_digests(batch.nondet, [f.digest for f, _ in reqs]) != d:
                return Drop.BATCH_DIGEST_MISMATCH
        if unvouched:
            return Drop.BATCH_REQUEST_UNVOUCHED
        if check_nondet and reqs:
            limit, replicas = self._timestamp_limit(), r.cfg.n
            for _, req in reqs:
                if req.timestamp > (limit if req.client >= replicas else self._timestamp_limit(req.client)):
                    return Drop.BATCH_REQUEST_FUTURE_TIMESTAMP
            if not r.service.check_nondet(batch.nondet, r.now + r.wall_offset_ms):
                return Drop.BATCH_NONDET_REJECTED
        return None

    def batch_requests(self, batch: Batch) -> list[tuple[Frame, Request]]:
        """The (frame, request) pairs of a batch; frames we received from their clients
        ourselves are not opened again (``seen``: their MACs verified here)."""
        seen = self.seen
        codec = self.r.codec
        out: list[tuple[Frame, Request]] = []
        for raw in batch.requests:
            hit = seen.get(raw)
            out.append(hit if hit is not None else codec.request_of(raw))
        return out

    def _answer_old_recovery_request(self, j: int, last: tuple[int, bytes]) -> None:
        """Replica j's recovery request is older than its last one executed here (an intruder may
        have had one ordered under j's keys, timestamped ahead): answer with that one's cached reply,
        so that j timestamps its request again (``ProactiveRecovery._on_newer_reply``). At most one
        per half client retry timeout, as cached replies to clients."""
        r = self.r
        sent = self.reply_resent.get(j)
        if sent is not None and sent[0] == last[0] and r.now - sent[2] < r.cfg.client_retry_timeout_ms / 2:
            r._drop(Drop.REPLY_RESEND_RATE_LIMITED)
            return
        tentative = r.log.last_exec_seqno.get(j, 0) > r.log.last_committed_exec
        self.reply_resent[j] = (last[0], tentative, r.now)
        rep = Reply(r.view, last[0], j, r.id, tentative, False, result_digest(last[1]), last[1])
        r._send_to(j, seal(rep, r.keys, to=j))
