"""The PBFT replica as a pure state machine.

No I/O, no clock, no randomness: a driver (the simulator, the asyncio
runtime, a test) feeds it ``receive(bytes, now)`` and ``tick(now)`` and, after each
step, carries out the one ``Ready`` that ``take_ready()`` returns (records to write,
then messages to send, events, a key refresh: the contract is ``Ready``'s docstring).
``next_deadline()`` says when ``tick`` must be called next.

Failure discipline: anything a peer or client can send is an
expected outcome, counted in ``self.drops[reason]`` (``drops.Drop``) and never raised;
anything only our own bug can cause is an ``assert``.

Protocol outline (names follow the paper and the thesis):

* normal case: PrePrepare / Prepare / Commit, batching with a bounded number
  of batches in flight, execution in sequence order, tentative execution of
  prepared batches (rolled back if a view change intervenes);
* last-reply table (part of the checkpointed state) for exactly-once;
* checkpoints every K, stable with a quorum of matching Checkpoint messages,
  garbage collection and the water marks h < n <= h + L;
* Status messages, answered with whatever the sender lacks (checkpoints,
  pre-prepares, prepares, commits, view-change and new-view messages);
* MAC-only view changes: ViewChange, ViewChangeAck (multicast, see
  docs/protocol.md), NewView checked by every backup with the same
  deterministic decision procedure (``view_change.decide``);
* checkpointed state as objects with copy-on-write checkpoints and a partition
  tree of digests (``pbft.state``); state transfer walks the tree of a certified
  checkpoint and fetches only the objects that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..codec import (
    Codec, DecodeError, Frame,
    batch_digest_from_request_digests, result_digest, seal, vouch_key,
)
from ..config import ClusterConfig
from ..crypto import KeyRing
from ..messages import (
    ALL_REPLICAS, Batch, BatchData, Checkpoint, Commit, Data, Fetch, FetchBatch, Message, MetaData, NewView,
    PrePrepare, QueryStable, ReplyStable,
    Prepare, Reply, Request, Status, Tag, ViewChange, ViewChangeAck, Vouch,
)
from ..service import Service
from ..state.partition import Fetcher
from ..state.replica_state import ReplicaState
from .durability import Persistence
from .durability import restore as restore_replica
from .quorum import Reached, Quorums
from .ready import Ready
from .state_transfer import StateTransfer
from .status import StatusExchange
from .recovery import ProactiveRecovery, RecoveryRun
from .normal_case import Log
from .view_change import Decision, ViewChanges
from .checkpoints import Checkpoints, CheckpointVotes
from .drops import Count, Drop
from .events import (
    CheckpointMismatch, Event, FetchStarted, NewViewInstalled, ServiceException, Stable,
    StateTransferred, ViewChangeStarted,
)

VOUCH_BATCH_MAX = 1024
# what one replica may make us parse and handle per status interval, per kind of message that a
# correct replica sends a few of per interval (checked before parsing; ``Replica._within_budget``):
# tag -> (name, unit, limit, drop when relayed, drop when over budget). Vouch: 8 x 34 bytes per key
# of max(VOUCH_BATCH_MAX, 16 clients_max) keys, far above what a correct replica vouches for in an
# interval (one key per request it receives); Status: one per interval from a correct replica;
# QueryStable: one per two intervals
SENDER_BUDGETS: dict[int, tuple[str, str, int, Drop, Drop]] = {
    Tag.VOUCH: ("vouch", "bytes", 8 * 34, Drop.VOUCH_RELAYED, Drop.VOUCH_OVER_BUDGET),
    Tag.STATUS: ("status", "count", 8, Drop.STATUS_RELAYED, Drop.STATUS_OVER_BUDGET),
    Tag.QUERY_STABLE: ("query-stable", "count", 4, Drop.QUERY_STABLE_RELAYED, Drop.QUERY_STABLE_OVER_BUDGET),
}
T_REQUEST = int(Tag.REQUEST)  # (compared once per request frame a batch brings: a plain int)
# what a client gets when the service raised, or returned something other than bytes within the
# reply size limit: the same on every correct replica (see ``_run_service``)
SERVICE_ERROR_RESULT = b"\xffpbft:service-error"


@dataclass(slots=True)
class ReqInfo:
    req: Request
    digest: bytes
    raw: bytes
    key: bytes = b""  # vouch key
    verified: bool = True  # our own MAC entry verified
    since: float = 0.0  # backups: when it became certified here (or the current view started)


class Replica:
    def __init__(
        self,
        cfg: ClusterConfig,
        replica_id: int,
        keys: KeyRing,
        service: Service,
        now: float = 0.0,
    ):
        assert cfg.is_replica(replica_id)
        self.cfg = cfg
        self.id = replica_id
        self.keys = keys
        self.codec = Codec(cfg)
        self.service = service
        self.now = now
        self.out: list[tuple[tuple[int, ...], bytes]] = []  # this step's sends (``take_ready``)
        self.events: list[Event] = []  # this step's events (``take_ready``)
        self.refresh_keys = False  # this step executed another replica's recovery request
        self.drops: dict[str, int] = {}  # Drop (or a codec's DecodeError reason) -> inputs dropped
        self.counts: dict[str, int] = {}  # Count -> how often (what happened that is not a drop)
        self.dropped_total = 0
        self.sender_budget: dict[tuple[int, int], tuple[float, int]] = {}  # (replica, tag) -> (start, used)
        self.disk = Persistence(self)  # the records each step writes (off until enable_persistence)
        self.recovery_marker = False  # the store says a recovery was under way (``begin_recovery`` again)
        # handler work a peer's messages caused, in items (vouch keys, requests checked): the
        # simulator's CPU model charges it, so that work one message makes us do is measured
        self.work_units = 0
        # wall-clock time minus ``now``, set by a driver whose ``now`` is a monotonic clock: services
        # propose and check non-deterministic values (e.g. timestamps) against now + this offset
        self.wall_offset_ms = 0.0
        self.others = tuple(r for r in range(cfg.n) if r != replica_id)
        self.quorums = Quorums.of(cfg)  # every threshold goes through it
        self.K = cfg.checkpoint_interval_seqnos
        self.L = cfg.log_window_seqnos
        self.bug_skip_digest = "skip-digest-check" in cfg.bugs
        self.bug_drop_prepared = "drop-prepared-in-view-change" in cfg.bugs
        self.bug_no_ts = "no-timestamp-check" in cfg.bugs
        self.bug_ckpt_noseq = "checkpoint-digest-without-seqno" in cfg.bugs

        self.view = 0
        self.view_active = True
        self.vc = ViewChanges(self)  # the view change: ViewChange, acks, NewView, new-view batches
        self._init_log_and_checkpoints(service)
        self._init_requests(cfg)
        self.status = StatusExchange(self, now)  # Status messages: what peers report, our answers
        self.last_client_exec = now  # when a client's request last executed (``ViewChanges.idle_rejoin_tick``)
        self._handlers = self._handler_table()

    def _init_log_and_checkpoints(self, service: Service) -> None:
        cfg = self.cfg
        # log and execution
        self.h = 0  # low water mark: last stable checkpoint
        self.log = Log(self)  # the normal case and the log: slots, certificates, batches, execution
        # the checkpointed state: the service's objects and the last-reply table
        self.rs = ReplicaState(service, fanout=cfg.partition_fanout, bind_seqno=not self.bug_ckpt_noseq)
        self.state = self.rs.cs
        self.last_reply = self.rs.last_reply  # client -> (timestamp, result); change through rs.set_reply

        # checkpoints
        # seqno -> digest of committed checkpoints (the state keeps a record for each, and
        # for each tentative one: copy-on-write, see pbft.state.partition)
        self.checkpoints = Checkpoints(self, self.state.checkpoint(0))  # ours, committed and tentative
        self.checkpoint_votes = CheckpointVotes(self.L, self.K)  # who voted for which checkpoint
        self.transfer = StateTransfer(self)  # state transfer: fetching and serving checkpoints
        self.needs_state = False  # restored from a damaged store: execute nothing before a transfer
        self._installing = False
        self.recovery = ProactiveRecovery(self)  # proactive recovery: ours, and the others' points

    def _init_requests(self, cfg: ClusterConfig) -> None:
        # requests
        self.queue: dict[int, ReqInfo] = {}  # primary: client -> latest request waiting for a batch
        self.pending: dict[int, ReqInfo] = {}  # backup: client -> request not yet executed (request timer)
        self.inflight: dict[int, int] = {}  # primary: client -> timestamp ordered but not yet executed
        self.req_deadline: Optional[float] = None
        self.ro_queue: dict[int, ReqInfo] = {}
        self.ro_barrier = 0  # read-only requests wait until we executed this far (set by new views)
        # request dissemination: every replica gets each request from its client, vouches for
        # those whose MAC verifies here, and treats a request as genuine once f+1 vouch for it
        self.known: dict[int, ReqInfo] = {}  # client -> latest request not yet executed (committed)
        self.vouches: dict[bytes, set[int]] = {}  # vouch key -> replicas that vouched
        self.vouch_out: dict[bytes, None] = {}  # vouch keys to send (an ordered set)
        self.vouch_urgent = False
        self.vouch_deadline: Optional[float] = None
        self.key_client: dict[bytes, int] = {}  # vouch key -> client, for the requests in ``known``
        # request frames received from their clients, opened, parsed and (MAC) verified here:
        # a pre-prepare that batches them is then checked without opening them again
        self.req_seen: dict[bytes, tuple[Frame, Request]] = {}
        self.req_seen_max = max(1024, 8 * cfg.clients_max)
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
        # client -> (timestamp, tentative, when) of the last cached reply we sent again (one entry
        # per principal id: bounded by the codec's range of senders)
        self.reply_resent: dict[int, tuple[int, bool, float]] = {}

    # =====================================================================
    # driver interface
    # =====================================================================
    def take_ready(self) -> Ready:
        """Everything the steps since the last call produced, for the driver to carry out: the
        records to write, THEN the messages to send (see ``Ready`` for the whole contract).
        Call it once after every step (``receive``, ``tick``, ``restore``, ``begin_recovery``,
        ``restart``)."""
        sends = self._take_sends()
        puts = self.disk.take()
        events, refresh = self.events, self.refresh_keys
        if events:
            self.events = []
        if refresh:
            self.refresh_keys = False
        return Ready(puts, sends, events, refresh)

    def begin_recovery(self, now: float, nonce: int) -> None:
        """Start a proactive recovery (after a reboot and ``restore``; ``pbft.core.recovery``).
        ``nonce``: a number larger than any this replica used before (the runtime uses the wall
        clock in µs). The cross-area step: first distrust, forgetting the log reloaded from disk
        and keeping the objects unverified (nothing executes before a state transfer to a
        certified checkpoint has checked them), then the estimation starts."""
        self.now = now
        self.log.distrust()
        self.checkpoints.distrust()
        self.state.discard_all()
        self.state.unpersisted = set(range(self.state.n))
        self.needs_state = True
        self.transfer.abandon()
        self.recovery.start(nonce)

    # read-only views of proactive recovery (drivers, metrics and tests read them)
    @property
    def recovering(self) -> Optional[RecoveryRun]:
        return self.recovery.run

    @property
    def recovery_points(self) -> dict[int, int]:
        return self.recovery.points

    @property
    def recoveries(self) -> int:
        return self.recovery.recoveries

    @property
    def last_recovery_ms(self) -> Optional[float]:
        return self.recovery.last_recovery_ms

    def enable_persistence(self) -> None:
        """Start collecting records to write (call before ``restore`` and any message)."""
        self.disk.enable()

    def restore(self, records: dict[bytes, bytes], damaged: frozenset[bytes] = frozenset()) -> str:
        """Come back from stable storage (``pbft.core.durability.restore``): returns ``fresh``,
        ``restored``, ``state-repair`` or ``log-lost``."""
        return restore_replica(self, records, damaged)

    def _take_sends(self) -> list[tuple[tuple[int, ...], bytes]]:
        # one Vouch per driver step: vouches batch themselves under load. They wait up to
        # ``vouch_delay_ms`` for another message to the replicas to travel with (one write per
        # peer instead of two; under load there always is one), and a request superseded
        # meanwhile is not vouched for at all; vouches for retransmitted requests go at once
        if self.vouch_out and (self.vouch_urgent
                               or (self.vouch_deadline is not None and self.now >= self.vouch_deadline)
                               or any(dests[0] < self.cfg.n for dests, _ in self.out)):
            self.vouch_urgent = False
            self.vouch_deadline = None
            keys, self.vouch_out = list(self.vouch_out), {}
            for i in range(0, len(keys), VOUCH_BATCH_MAX):
                self._broadcast(Vouch(self.id, tuple(keys[i:i + VOUCH_BATCH_MAX])))
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> Optional[float]:
        rec = self.recovering
        ds = [d for d in (self.status.deadline, self.req_deadline, self.vc.deadline, self.transfer.deadline,
                          self.vouch_deadline, rec.next_send if rec is not None and rec.phase != "check" else None)
              if d is not None]
        return min(ds) if ds else None

    def invariants(self) -> None:
        """Assert what holds after every step whatever the input (a failure is a bug of ours,
        never a peer's doing). Cheap: drivers call it after every step (the simulator, the
        hand-driven cluster of the tests)."""
        assert self.log.last_committed_exec <= self.log.last_exec, "committed execution ahead of execution"
        assert self.view_active or self.view > 0, "view 0 is never changed to"
        assert (self.fetch_target is None) == (self.fetcher is None), "a fetch target without its walk"
        assert self.log.seq_assigned >= self.h, "sequence numbers assigned below the low water mark"
        assert len(self.vc.future) <= 2, "future NewViews unbounded"
        assert self.recovering is None or self.recovering.phase in ("estimate", "request", "check")
        assert self.vc.pending is None or not self.view_active or self.vc.pending[0].view != self.view, \
            "a NewView pending for the active view"
        assert not self.out or self.out[-1][0], "a send without destinations"

    def receive(self, raw: object, now: float, relayed: bool = False) -> None:  # object: see Codec.open_frame
        """Handle one frame from the network. Never raises on bad input.

        ``relayed``: the driver knows the frame did not come from its sender itself (a replica
        forwarded a client's request): a MAC that fails on it is no evidence against the sender."""
        self.now = now
        try:
            fr = self.codec.open_frame(raw)
        except DecodeError as e:
            self._drop_undecodable(e)
            return
        if fr.sender == self.id:
            self._drop(Drop.FROM_SELF)
            return
        if not self.keys.verify(fr.sender, fr.digest, fr.auth, fr.multi):
            self._drop(Drop.BAD_MAC)
            if fr.tag == Tag.NEW_VIEW and fr.sender < self.cfg.n:
                # a NewView relayed after our keys changed (we restarted, or refreshed keys):
                # usable only if f+1 replicas report its digest (``_try_certified_new_view``)
                try:
                    nv = self.codec.parse(fr)
                except DecodeError:
                    return
                if isinstance(nv, NewView) and nv.view >= self.view and \
                        (self.vc.unverified is None or nv.view >= self.vc.unverified[0].view):
                    self.vc.unverified = (nv, fr.raw, fr.digest)
                    self.vc.try_certified_new_view()
                return
            if fr.tag == Tag.REQUEST and fr.sender >= self.cfg.n:
                # a request whose MAC for us is wrong may still be genuine (its client may be
                # faulty towards us only): keep the body; it is used only if f+1 replicas vouch
                try:
                    req = self.codec.parse(fr)
                except DecodeError:
                    return
                if isinstance(req, Request) and not req.read_only:
                    if not relayed:
                        # its client sent us a bad authenticator entry (in the runtime only a
                        # frame from the connection its client's NewKey came on gets here)
                        self.suspects.add(req.client)
                    self._on_ordered_request(req, fr, verified=False)
            return
        if fr.tag in SENDER_BUDGETS and fr.sender < self.cfg.n and not self._within_budget(fr, relayed):
            return
        try:
            msg = self.codec.parse(fr)
        except DecodeError as e:
            self._drop_undecodable(e)
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._drop(Drop.UNEXPECTED_TYPE)
            return
        handler(msg, fr)

    def tick(self, now: float) -> None:
        self.now = now
        if self.recovering is not None:
            self.recovery.tick()
        if self.status.due(now):
            self.status.send()
            self.vc.try_certified_new_view()
            if self.log.held:
                # the lowest held pre-prepares again (the clock moved on; a request or our own vouch
                # may have completed a certificate): a few per tick, bounded work
                self.log.recheck_held(sorted(self.log.held)[:4])
            self.vc.status_tick(now)
        if self.req_deadline is not None and now >= self.req_deadline:
            self.req_deadline = None
            if self.view_active and self.pending:
                if self.fetch_target is not None:
                    # we are behind and fetching state: we cannot judge the primary yet
                    self.req_deadline = now + self.vc.timeout_ms
                elif now - min(ri.since for ri in self.pending.values()) >= self.vc.timeout_ms:
                    self._start_view_change(self.view + 1, "request-timer")
                else:
                    self._arm_request_timer()
        self.vc.tick(now)
        self.transfer.tick(now)

    def restart(self, now: float) -> None:
        """Resume after a crash: durable protocol state kept, volatile state lost.

        The process lost its queues, its timers and messages in flight; the view,
        log, checkpoints and service state are assumed to be on stable storage.
        """
        self.now = now
        self.out = []
        self.queue.clear()
        self.inflight.clear()
        self.ro_queue.clear()
        self.pending.clear()
        self.known.clear()
        self.key_client.clear()
        self.req_seen.clear()
        self.log.held.clear()
        self.log.held_keys.clear()
        self.vouches.clear()
        self.vouch_unknown.clear()
        self.vouch_out.clear()
        self.vouch_deadline = None
        self.vouch_urgent = False
        self.req_deadline = None
        self.status.restart(now)
        self.vc.restart(now)
        self.transfer.restart(now)

    def _within_budget(self, fr: Frame, relayed: bool) -> bool:
        """Before parsing: whether replica ``fr.sender`` (its MAC verified) is within its budget
        for this kind of message this status interval (``SENDER_BUDGETS``); if not, the frame is
        dropped at the cost of its MAC check. Vouch, Status and QueryStable are never relayed by
        correct replicas, so a relayed one is dropped too (another replica cannot spend the
        author's budget by replaying its frames)."""
        _, unit, limit, relayed_drop, over_drop = SENDER_BUDGETS[fr.tag]
        if relayed:
            self._drop(relayed_drop)
            return False
        if unit == "bytes":
            cost, limit = len(fr.raw), limit * max(VOUCH_BATCH_MAX, 16 * self.cfg.clients_max)
        else:
            cost = 1
        k = (fr.sender, fr.tag)
        start, used = self.sender_budget.get(k, (self.now, 0))
        if self.now - start >= self.cfg.status_interval_ms:
            start, used = self.now, 0
        if used > 0 and used + cost > limit:
            self._drop(over_drop)
            return False
        self.sender_budget[k] = (start, used + cost)
        return True

    # =====================================================================
    # helpers
    # =====================================================================
    def _drop(self, why: Drop) -> None:
        """Count a dropped input under its reason."""
        self.drops[why] = self.drops.get(why, 0) + 1
        self.dropped_total += 1  # (a driver compares it around ``receive``: was the frame wasted?)

    def _drop_undecodable(self, e: DecodeError) -> None:
        """Count a frame or message the codec refused, under the codec's reason."""
        self.drops[e.reason] = self.drops.get(e.reason, 0) + 1
        self.dropped_total += 1

    def _count(self, what: Count) -> None:
        """Count something that happened and is not a dropped input (``self.counts``)."""
        self.counts[what] = self.counts.get(what, 0) + 1

    def count_drop(self, why: Drop) -> None:
        """For a driver that drops a frame before the core on the replica's behalf (the
        simulator's model of the runtime's principal binding: ``spoofed-client``)."""
        self._drop(why)

    def _emit(self, ev: Event) -> None:
        self.events.append(ev)

    def primary(self, view: Optional[int] = None) -> int:
        return (self.view if view is None else view) % self.cfg.n

    @property
    def is_primary(self) -> bool:
        return self.primary() == self.id

    def _broadcast(self, msg: Message) -> bytes:
        raw = seal(msg, self.keys)
        self.out.append((self.others, raw))
        return raw

    def _send_to(self, dest: int, raw: bytes) -> None:
        self.out.append(((dest,), raw))

    def _apply(self, req: Request, nondet: bytes, n: int) -> bytes:
        """Execute one ordered request at sequence number n: the service's operation, or (from
        a replica) a recovery request, which the library handles itself."""
        if req.client < self.cfg.n:
            return self.recovery.execute(req.client, req.op, n)
        return self._run_service(req.op, req.client, nondet, False)

    def _run_service(self, op: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        """``service.execute``; an exception (a bug in the service, triggered by some input) becomes
        the result ``SERVICE_ERROR_RESULT`` on every correct replica alike, so the replicas stay in
        agreement and the client gets an answer, instead of every replica failing on the same
        request. Counted as ``service-exception``."""
        try:
            result = self.service.execute(op, client, nondet, read_only)
        except Exception as e:  # noqa: BLE001 - the service is user code
            self._count(Count.SERVICE_EXCEPTION)
            self._emit(ServiceException(client, type(e).__name__))
            return SERVICE_ERROR_RESULT
        if type(result) is not bytes:
            self._count(Count.SERVICE_BAD_RESULT)
            return SERVICE_ERROR_RESULT
        if len(result) > self.cfg.reply_size_bytes_max:
            self._count(Count.SERVICE_RESULT_TOO_LARGE)
            return SERVICE_ERROR_RESULT
        return result

    def _batch_requests(self, batch: Batch) -> list[tuple[Frame, Request]]:
        """The (frame, request) pairs of a batch; frames we received from their clients
        ourselves are not opened again (``req_seen``: their MACs verified here)."""
        seen = self.req_seen
        codec = self.codec
        out: list[tuple[Frame, Request]] = []
        for raw in batch.requests:
            hit = seen.get(raw)
            if hit is None:
                fr = codec.open_frame(raw)
                if fr.tag != T_REQUEST:
                    raise DecodeError("batch-not-request")
                req = codec.parse(fr)
                if not isinstance(req, Request):  # (a request frame parses to a Request)
                    raise DecodeError("batch-not-request")
                hit = (fr, req)
            out.append(hit)
        return out

    # read-only views of the state transfer (drivers, metrics and tests read them)
    @property
    def fetch_target(self) -> Optional[tuple[int, bytes]]:
        return self.transfer.target

    @property
    def fetcher(self) -> Optional[Fetcher]:
        return self.transfer.fetcher

    @property
    def transfer_stats(self) -> dict[str, int]:
        return self.transfer.stats

    # read-only views of the log's progress (drivers, metrics and tests read them)
    @property
    def last_exec(self) -> int:
        return self.log.last_exec

    @property
    def last_committed_exec(self) -> int:
        return self.log.last_committed_exec

    def state_digest(self) -> bytes:
        """Digest of the current state (the partition tree's root)."""
        return self.state.root

    # =====================================================================
    # requests
    # =====================================================================
    def on_request(self, req: Request, fr: Frame) -> None:
        seen = self.req_seen
        if len(seen) >= self.req_seen_max:
            del seen[next(iter(seen))]
        seen[fr.raw] = (fr, req)
        if req.read_only:
            self._on_read_only(ReqInfo(req, fr.digest, fr.raw))
            return
        if req.client < self.cfg.n:
            reason = self.recovery.admit(req)  # (a replica's: its recovery request)
            if reason:
                self._drop(reason)
                return
        self._on_ordered_request(req, fr, verified=True)

    def _timestamp_limit(self) -> float:
        """The largest request timestamp we take now: our wall clock (in µs, as clients'
        timestamps) plus ``timestamp_skew_ms_max``. A request beyond it would, once executed,
        make its client's genuine requests look old until our clock caught up (for good at
        2^63-1): it is neither vouched for, nor ordered, nor accepted in a pre-prepare."""
        return (self.now + self.wall_offset_ms + self.cfg.timestamp_skew_ms_max) * 1000.0

    def _on_ordered_request(self, req: Request, fr: Frame, verified: bool) -> None:
        c, t = req.client, req.timestamp
        if t > self._timestamp_limit():
            self._drop(Drop.REQUEST_FUTURE_TIMESTAMP)
            return
        last = self.last_reply.get(c)
        if last is not None and t <= last[0] and not self.bug_no_ts:
            return self._on_executed_request(req, fr, verified, last)
        key = vouch_key(req)
        cur = self.known.get(c)
        if cur is not None:
            if not self._replaces_known(cur, req, fr, verified, key):
                return
        elif len(self.known) >= self.cfg.pending_requests_max:
            self._drop(Drop.KNOWN_REQUESTS_FULL)
            return
        ri = ReqInfo(req, fr.digest, fr.raw, key, verified)
        old = self.known.pop(c, None)
        if old is not None:
            self.key_client.pop(old.key, None)
        self.known[c] = ri  # (re)inserted last: the primary batches in arrival order
        self.key_client[key] = c
        if verified:
            self._add_vouch(key, self.id)
            self.vouch_out[key] = None
            if c not in self.trusted and c not in self.suspects:
                self.vouch_urgent = True  # a newcomer: its first requests wait for our vouch
            elif self.vouch_deadline is None:
                self.vouch_deadline = self.now + self.cfg.vouch_delay_ms
            p = self.pending.get(c)
            if p is not None and p.req.timestamp < t:
                # the client itself superseded the request we watch (its vouches are gone, here and
                # wherever the newer one arrived: no primary can order it any more). A correct
                # client never does before its request completes, or it gave up waiting: the
                # primary is judged on the newer one, from when it is certified here
                del self.pending[c]
                self._arm_request_timer()
        self._consider(c)

    def _on_executed_request(self, req: Request, fr: Frame, verified: bool, last: tuple[int, bytes]) -> None:
        """A request at or below the timestamp of the client's last executed one: a late copy, a
        retransmission (answered from the reply cache), or old."""
        c, t = req.client, req.timestamp
        if not verified:
            self._drop(Drop.REQUEST_UNVERIFIED_OLD)
        elif t == last[0] and self.log.executed_digest.get(c) == fr.digest and req.replier != ALL_REPLICAS:
            # the client's own copy of a request we already executed from a pre-prepare that
            # overtook it (the primary's fast path): not a retransmission, nothing to answer
            self._drop(Drop.REQUEST_LATE_COPY)
        elif t == last[0]:
            # the cached reply is only as final as the execution that produced it
            tentative = self.log.last_exec_seqno.get(c, 0) > self.log.last_committed_exec
            self._drop(Drop.REQUEST_RETRANSMITTED)
            sent = self.reply_resent.get(c)
            if sent is not None and sent[0] == t and sent[1] == tentative and \
                    self.now - sent[2] < self.cfg.client_retry_timeout_ms / 2:
                # at most one cached reply per client per half retry timeout: a correct
                # client retransmits less often, so replays (a faulty replica may relay
                # captured requests) cannot make us amplify towards the client
                self._drop(Drop.REPLY_RESEND_RATE_LIMITED)
            else:
                self.reply_resent[c] = (t, tentative, self.now)
                self._send_reply(req, last[1], tentative=tentative)
            if tentative and c not in self.pending and self.view_active and not self.is_primary:
                # the client still waits for a commit that has not come: time it, so a primary
                # that never completes it is replaced (after a restart, nothing else would)
                self.pending[c] = ReqInfo(req, fr.digest, fr.raw, vouch_key(req), True, self.now)
                self._arm_request_timer()
        else:
            self._drop(Drop.REQUEST_OLD_TIMESTAMP)

    def _replaces_known(self, cur: ReqInfo, req: Request, fr: Frame, verified: bool, key: bytes) -> bool:
        """Whether a request of the client whose latest known one is ``cur`` takes its place (if
        not, it was dropped: superseded, a duplicate, or an unverified copy)."""
        c, t = req.client, req.timestamp
        if cur.verified and not verified:
            self._drop(Drop.REQUEST_UNVERIFIED)  # never displaces what the client surely sent
            return False
        if cur.verified == verified:
            if cur.req.timestamp > t:
                self._drop(Drop.REQUEST_SUPERSEDED)
                return False
            if cur.req.timestamp == t:
                if cur.key != key:
                    self._drop(Drop.REQUEST_TIMESTAMP_REUSED)
                else:
                    self._drop(Drop.REQUEST_DUPLICATE)
                    if verified:
                        # a retransmission: the client is still waiting. Vouch again (ours may
                        # have been lost) and make sure the primary has the request
                        self.vouch_out[key] = None
                        self.vouch_urgent = True
                        if self.view_active and not self.is_primary and c in self.pending:
                            self._send_to(self.primary(), fr.raw)
                        self._consider(c)
                return False
        if cur.key != key:
            self.vouches.pop(cur.key, None)
            self.vouch_out.pop(cur.key, None)  # superseded before our vouch left: never mind it
        if verified and cur.verified and cur.req.timestamp < t and self.is_primary and \
                self.inflight.get(c, 0) < cur.req.timestamp and \
                self.last_reply.get(c, (0,))[0] < cur.req.timestamp:
            # at the primary, a new request while the previous one is not even ordered: not a
            # closed-loop client (a correct one waits for its result, which needs the request
            # ordered). No fast path for it (see ``trusted``)
            self.suspects.add(c)
        return True

    def _add_vouch(self, key: bytes, r: int) -> bool:
        """Record r's vouch for ``key``; whether it is new. A vouch for a key we know no request
        for counts against r's own budget (``vouch_unknown``), never against anybody else's."""
        vs = self.vouches.get(key)
        if vs is None:
            vs = self.vouches[key] = set()
        elif r in vs:
            return False
        vs.add(r)
        if r != self.id and key not in self.key_client:
            fifo = self.vouch_unknown.get(r)
            if fifo is None:
                fifo = self.vouch_unknown[r] = {}
            fifo[key] = None
            if len(fifo) > self.vouch_unknown_max:
                old = next(iter(fifo))
                del fifo[old]
                self._drop(Drop.VOUCH_UNKNOWN_DROPPED)
                if old not in self.key_client:  # (a request for it arrived since: keep the vouch)
                    ovs = self.vouches.get(old)
                    if ovs is not None:
                        ovs.discard(r)
                        if not ovs:
                            del self.vouches[old]
        return True

    def _certified(self, key: bytes) -> bool:
        vs = self.vouches.get(key)
        return vs is not None and self.quorums.is_weak(vs)

    def _consider(self, c: int) -> None:
        """A known request became (or may have become) certified: order it, or watch the primary."""
        ri = self.known.get(c)
        if ri is None:
            return
        if not self._certified(ri.key):
            # (and only for a client with nothing in flight: a closed-loop client's previous
            # request has executed before it sends the next; one that floods us waits for vouches,
            # so that its requests supersede each other instead of filling batches)
            if not (ri.verified and c in self.trusted and c not in self.suspects
                    and self.view_active and self.is_primary and c not in self.inflight):
                return
        t = ri.req.timestamp
        if self.view_active and self.is_primary:
            if self.inflight.get(c, 0) >= t:
                return
            cur = self.queue.get(c)
            if cur is not None and cur.req.timestamp >= t:
                return
            self.queue[c] = ri
            self.log.try_send_preprepare()
            return
        cur = self.pending.get(c)
        if cur is None or cur.req.timestamp < t:
            ri.since = self.now
            self.pending[c] = ri
        if self.view_active and self.req_deadline is None:
            self._arm_request_timer()

    def _arm_request_timer(self) -> None:
        """Every certified request must commit within the view-change timeout of becoming known
        here: the timer follows the oldest one, so a primary that commits some requests but
        starves others (slow or censoring) is still replaced."""
        if self.pending and self.view_active:
            self.req_deadline = min(ri.since for ri in self.pending.values()) + self.vc.timeout_ms
        else:
            self.req_deadline = None

    def on_vouch(self, m: Vouch, fr: Frame) -> None:
        # work proportional to the message's own keys: a duplicate vouch costs a lookup, an unknown
        # key its sender's budget, and only the held pre-prepares that wait for one of these keys
        # are checked again
        key_client = self.key_client
        trusted = self.trusted
        held_keys = self.log.held_keys
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
                    if self.quorums.is_weak([r for r in vs if r != self.id]):
                        trusted.add(c)
                self._consider(c)
            if held_keys and k in held_keys and self._certified(k):
                unblocked |= held_keys.pop(k)
        if dup:
            self._drop(Drop.VOUCH_DUPLICATE)
        if skipped:
            self.drops[Drop.VOUCH_UNKNOWN_DROPPED] = self.drops.get(Drop.VOUCH_UNKNOWN_DROPPED, 0) + skipped
        self.work_units += len(m.keys) - skipped + skipped // 16
        if unblocked:
            # pre-prepares held back for want of these vouches may now be acceptable
            self.log.recheck_held(sorted(unblocked))

    def _read_only_ready(self) -> bool:
        """Whether our state reflects every operation a client may have seen complete.

        Not while tentative executions are outstanding, while changing view (they were
        rolled back), or after a view change until we have executed everything the new
        view re-proposed: a write acknowledged by 2f+1 tentative replies is re-proposed
        there and must be visible to later reads.
        """
        return (self.log.last_exec == self.log.last_committed_exec and self.fetch_target is None
                and self.view_active and self.log.last_committed_exec >= self.ro_barrier)

    def _on_read_only(self, ri: ReqInfo) -> None:
        if not self._read_only_ready():
            # wait until tentative executions have committed
            if ri.req.client not in self.ro_queue and len(self.ro_queue) >= self.cfg.pending_requests_max:
                self._drop(Drop.RO_QUEUE_FULL)
                return
            self.ro_queue[ri.req.client] = ri
            return
        result = self._run_service(ri.req.op, ri.req.client, b"", True)
        self._send_reply(ri.req, result, tentative=False, read_only=True)

    def _drain_read_only(self) -> None:
        if self.ro_queue and self._read_only_ready():
            q, self.ro_queue = self.ro_queue, {}
            for ri in q.values():
                self._on_read_only(ri)

    def _send_reply(self, req: Request, result: bytes, tentative: bool, read_only: bool = False) -> None:
        full = req.replier == ALL_REPLICAS or req.replier == self.id
        rep = Reply(self.view, req.timestamp, req.client, self.id, tentative, read_only,
                    result_digest(result), result if full else None)
        self._send_to(req.client, seal(rep, self.keys, to=req.client))

    # =====================================================================
    # normal case
    # =====================================================================
    def _check_batch(self, batch: Batch, d: bytes, check_nondet: bool = True,
                     missing: Optional[list[bytes]] = None) -> Optional[Drop]:
        """Why a pre-prepared batch is unacceptable, or None. Checks MACs, digest, request timestamps, nondet.
        ``missing`` (if given) receives the vouch keys of the requests that lack vouches."""
        try:
            reqs = self._batch_requests(batch)
        except DecodeError:
            return Drop.BATCH_MALFORMED
        self.work_units += len(reqs)
        seen = set()
        unvouched = False
        req_seen = self.req_seen
        for rfr, req in reqs:
            if rfr.raw not in req_seen and not self.keys.verify(rfr.sender, rfr.digest, rfr.auth, True):
                vk = vouch_key(req)
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
        if not self.bug_skip_digest:
            if batch_digest_from_request_digests(batch.nondet, [r.digest for r, _ in reqs]) != d:
                return Drop.BATCH_DIGEST_MISMATCH
        if unvouched:
            return Drop.BATCH_REQUEST_UNVOUCHED
        if check_nondet and reqs:
            limit = self._timestamp_limit()
            for _, req in reqs:
                if req.timestamp > limit:
                    return Drop.BATCH_REQUEST_FUTURE_TIMESTAMP
            if not self.service.check_nondet(batch.nondet, self.now + self.wall_offset_ms):
                return Drop.BATCH_NONDET_REJECTED
        return None

    # =====================================================================
    # execution
    # =====================================================================
    def _committed(self, n: int) -> None:
        """Seqno n's execution is final: its requests leave the pending set, and the request
        timer restarts (only committed progress counts: tentative executions that never commit,
        e.g. under a primary whose commits are missing, must not keep postponing a view change)."""
        replicas = self.cfg.n
        for c, t in self.log.exec_log[n].requests:
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
                self.last_client_exec = self.now  # (idle rejoin: when a client's request last executed)
        if self.view_active:
            self.vc.reset_timeout()
        self._arm_request_timer()

    # =====================================================================
    # checkpoints, garbage collection, state transfer
    # =====================================================================
    def _check_stable(self, n: int) -> None:
        if n <= self.h:
            return
        votes = self.checkpoint_votes
        for d in votes.digests(n):
            voters = votes.voters(n, d)
            reached = self.quorums.reached(voters)
            if reached is Reached.QUORUM:
                self._on_stable_certificate(n, d)
                return
            if reached is Reached.WEAK and self.log.last_committed_exec < n and (
                    n > self.h + self.L
                    or self.quorums.is_weak(self.status.stable_at(n))):
                # a correct replica is past our whole window, or replicas of weak weight have
                # discarded the log up to n (nobody will resend what we lack there): catch up to
                # checkpoint n, which a correct replica computed from committed requests
                if self.log.last_exec >= n and self.checkpoints.tentative.get(n) == d:
                    self.checkpoints.promote(n, d)  # our tentative executions up to n are the committed ones
                    return
                if self.log.last_exec > self.log.last_committed_exec:
                    self.log.rollback()
                self._start_fetch(n, d)
                return

    def _on_stable_certificate(self, n: int, d: bytes) -> None:
        own = self.checkpoints.committed.get(n)
        if own is None and self.checkpoints.tentative.get(n) == d and self.log.last_exec >= n:
            # the certificate proves everything up to n committed: promote
            self.checkpoints.promote(n, d)
            return
        if own is not None and own != d:
            self._emit(CheckpointMismatch(n, own, d))
        if own is not None and own == d:
            self._advance_low_water_mark(n, d)
        else:
            if self.log.last_exec > self.log.last_committed_exec:
                self.log.rollback()
            self._advance_low_water_mark(n, d)
            self._start_fetch(n, d)

    def _advance_low_water_mark(self, n: int, d: bytes) -> None:
        """Checkpoint (n, d) is stable (or certified): discard the log up to it."""
        if n <= self.h:
            return
        self.disk.gc(self.h, min(n, self.h + self.L), n, d)
        self.h = n
        self._emit(Stable(n))
        self.checkpoints.discard_below(n)
        self.state.discard_below(n)
        self.log.discard_upto(n)
        self.checkpoint_votes.discard_upto(n)
        if self.recovery_points:
            self.recovery.prune_points()
        if self.recovering is not None:
            self.recovery.check_done()
        if self.is_primary:
            self.log.try_send_preprepare()

    def _start_fetch(self, n: int, d: bytes) -> None:
        """Fetch checkpoint (n, d), certified by others, unless we are there or on our way."""
        t = self.transfer.target
        if t is not None and t[0] >= n:
            return
        if self.log.last_committed_exec >= n:
            return
        if self.log.last_exec > self.log.last_committed_exec:
            self.log.rollback()
        self._emit(FetchStarted(n, d))
        self.transfer.start(n, d)

    def _install_fetched_checkpoint(self, n: int, d: bytes) -> None:
        """The state transfer to certified checkpoint (n, d) completed: it becomes our state, our
        last execution and (being certified) our low water mark."""
        self.state.checkpoint(n)
        self.needs_state = False
        self.log.jump_to(n)
        self.checkpoints.installed(n, d)
        self._emit(StateTransferred(n, d, self.state.root_at(n)))
        for c in [c for c, ri in self.pending.items() if ri.req.timestamp <= self.last_reply.get(c, (0,))[0]]:
            del self.pending[c]
        if not self.pending:
            self.req_deadline = None
        self.checkpoint_votes.record(self.id, n, d)
        self._broadcast(Checkpoint(n, d, self.id))
        # the fetched checkpoint is certified (a correct replica holds it): it becomes our
        # low water mark, so the window moves to where the rest of the cluster is
        self._advance_low_water_mark(n, d)
        self._check_stable(n)
        if self.recovering is not None:
            self.recovery.check_done()
        self.log.try_execute()
        self._drain_read_only()
        if self.is_primary:
            self.log.try_send_preprepare()

    # =====================================================================
    # status: repair of lost messages
    # =====================================================================
    def on_status(self, s: Status, fr: Frame) -> None:
        """A peer's Status: learn where it is, act on it, then answer with what it lacks."""
        st = self.status
        # join rule (thesis 2.3.5, on Status rather than ViewChange messages): when replicas of
        # weak-certificate weight (f+1) are in views above ours, at least one correct replica
        # is, so move up (``Quorums.join_view``). This is how a replica that slept through
        # a view change, or restarted without its state, finds the current view even when it
        # has no request of its own to time out on.
        st.learn_view(s)
        if st.learn_stable(s) and s.stable_seqno > self.log.last_committed_exec and s.stable_seqno > self.h:
            self._check_stable(s.stable_seqno)
        if st.learn_new_view(s) and (self.vc.unverified is not None or self.vc.pending is not None
                                     or self.vc.future):
            self.vc.try_certified_new_view()
        st.learn_stuck(s)
        if s.view > self.view:
            target = self.quorums.join_view(st.peer_views, self.view)
            if target is not None:
                self._start_view_change(target, "status-join")
        st.answer(s)

    # =====================================================================
    # view changes
    # =====================================================================
    def _idle(self) -> bool:
        """Nothing for clients is under way here: no certified request waiting, nothing queued,
        ordered or tentative, no state transfer or recovery."""
        return (self.view_active and not self.pending and not self.queue and not self.inflight
                and not self.ro_queue and self.log.last_exec == self.log.last_committed_exec
                and self.log.seq_assigned <= self.log.last_exec and self.fetch_target is None
                and self.recovering is None and not self.needs_state)

    def _start_view_change(self, v: int, why: str) -> None:
        """Move to view v (not active until its NewView is installed): roll back tentative
        executions, drop this view's slots, held pre-prepares and the primary's queue, and send
        our ViewChange."""
        if v <= self.view:
            return
        if self.log.last_exec > self.log.last_committed_exec:
            self.log.rollback()
        self.view = v
        self.view_active = False
        self.disk.view()
        self.log.leave_view()
        self.req_deadline = None
        self.queue.clear()
        self.inflight.clear()
        self._emit(ViewChangeStarted(v, why))
        self._drain_read_only()
        self.vc.send_view_change(v)

    def _install_new_view(self, nv: NewView, raw: bytes, vc_raws: list[bytes], dec: Decision) -> None:
        """The new view's log: move to its starting checkpoint (fetching it if we lack it), then
        pre-prepare (and, at a backup, prepare) its chosen batches; the primary then proposes what
        clients asked the backups to order."""
        self.view_active = True
        self.vc.installed(nv, raw, vc_raws)
        self.disk.view()
        self._emit(NewViewInstalled(self.view, dec))
        s, d = dec.checkpoint_seqno, dec.checkpoint_digest
        # the chosen batches, taken before the low water mark moves: one fetched by BatchData is
        # kept only up to the old window's end, which moving to checkpoint s may discard
        chosen_batches = {dg: self.log.batch_for(dg) for _, dg in dec.chosen}
        if s > self.h:
            if self.checkpoints.committed.get(s) != d:
                self._start_fetch(s, d)
            self._installing = True  # no pre-prepare before the re-proposals are in place
            try:
                self._advance_low_water_mark(s, d)
            finally:
                self._installing = False
        primary = self.is_primary
        # reads wait until we executed what the new view re-proposed (``_read_only_ready``)
        self.ro_barrier = self.log.preprepare_chosen(dec, chosen_batches)
        self.log.prepare_chosen(dec)
        if primary:
            # propose what clients asked the backups (our old selves) to order
            self.pending.clear()
            for c in list(self.known):
                self._consider(c)
        elif self.pending:
            for ri in self.pending.values():  # the new primary gets a full timeout for each
                ri.since = self.now
            self._arm_request_timer()
        self.log.try_execute()
        self._drain_read_only()
        if primary:
            self.log.try_send_preprepare()

    def _handler_table(self) -> dict[type, Callable[[Any, Frame], None]]:
        """The dispatcher's table: message type -> the handler of the component that owns it."""
        vc, transfer, recovery = self.vc, self.transfer, self.recovery
        return {
            Request: self.on_request,
            PrePrepare: self.log.on_preprepare,
            Prepare: self.log.on_prepare,
            Commit: self.log.on_commit,
            Checkpoint: self.checkpoints.on_checkpoint,
            Status: self.on_status,
            ViewChange: vc.on_view_change,
            ViewChangeAck: vc.on_view_change_ack,
            NewView: vc.on_new_view,
            Fetch: lambda m, fr: transfer.on_fetch(m),
            MetaData: lambda m, fr: transfer.on_meta_data(m),
            Data: lambda m, fr: transfer.on_data(m),
            QueryStable: lambda m, fr: recovery.on_query_stable(m),
            ReplyStable: lambda m, fr: recovery.on_reply_stable(m),
            Reply: lambda m, fr: recovery.on_recovery_reply(m),
            FetchBatch: vc.on_fetch_batch,
            BatchData: vc.on_batch_data,
            Vouch: self.on_vouch,
        }
