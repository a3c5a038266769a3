"""The PBFT replica as a pure state machine.

No I/O, no clock, no randomness: a driver (the simulator, the asyncio runtime, a test) feeds it
``receive(bytes, now)`` and ``tick(now)`` and, after each step, carries out the one ``Ready`` that
``take_ready()`` returns (records to write, then messages to send, events, a key refresh: the
contract is ``Ready``'s docstring). ``next_deadline()`` says when ``tick`` must be called next.

Failure discipline: anything a peer or client can send is an expected outcome, counted in
``self.drops[reason]`` (``drops.Drop``) and never raised; anything only our own bug can cause is an
``assert``.

``Replica`` is composed of components that own their fields (each module's docstring says what it
owns and may not touch): ``Log`` (``normal_case``: pre-prepare, prepare, commit, execution,
tentative execution and rollback), ``Requests`` (``requests``: admission, vouching, the primary's
queue, the request timer, read-only requests, replies), ``Checkpoints`` and ``CheckpointVotes``
(``checkpoints``), ``ViewChanges`` (``view_change``: ViewChange, ViewChangeAck, NewView, checked by
every backup with the same decision procedure ``view_change.decide``), ``StatusExchange``
(``status``: Status messages and the repair of what a peer lacks), ``StateTransfer``,
``ProactiveRecovery``, ``Persistence`` (``durability``) and ``SenderBudgets`` (``budgets``). What
stays here: the dispatcher (``receive``, ``tick``), ``take_ready``, ``invariants``, ``restart``,
``begin_recovery``, and the steps that cross areas, named after the protocol's steps (a stable
checkpoint and garbage collection, installing a fetched checkpoint, starting a view change and
installing a new view, answering a Status).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..codec import Codec, DecodeError, Frame, seal
from ..config import ClusterConfig
from ..crypto import KeyRing
from ..messages import (
    BatchData, Checkpoint, Commit, Data, Fetch, FetchBatch, Message, MetaData, NewView, PrePrepare, QueryStable,
    ReplyStable, Prepare, Reply, Request, Status, Tag, ViewChange, ViewChangeAck, Vouch,
)
from ..service import Service
from ..state.partition import Fetcher
from ..state.replica_state import ReplicaState
from . import membership
from .durability import Persistence
from .durability import restore as restore_replica
from .quorum import Reached, Quorums
from .ready import Ready
from .state_transfer import StateTransfer
from .status import StatusExchange
from .recovery import ProactiveRecovery, RecoveryRun
from .budgets import SENDER_BUDGETS, SenderBudgets
from .normal_case import Log
from .requests import Requests
from .view_change import Decision, ViewChanges
from .checkpoints import Checkpoints, CheckpointVotes
from .drops import Count, Drop
from .events import (
    CheckpointMismatch, Event, FetchStarted, NewViewInstalled, Stable, StaleMarked, StateRepairStarted,
    StateTransferred, ViewChangeStarted,
)


class Replica:
    """One replica: the dispatcher, the drivers' interface and the cross-area steps over its
    components (see the module docstring)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        replica_id: int,
        keys: KeyRing,
        service: Service,
        now: float = 0.0, genesis_config: bytes = b"",  # (the configuration's initial value: core.reconfig)
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
        self.budgets = SenderBudgets(self)  # what each replica may make us parse per status interval
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
        self.checkpoint_interval = cfg.checkpoint_interval_seqnos
        self.log_window = cfg.log_window_seqnos
        b = cfg.bugs
        self.bug_skip_digest, self.bug_drop_prepared = "skip-digest-check" in b, "drop-prepared-in-view-change" in b
        self.bug_no_ts, self.bug_ckpt_noseq = "no-timestamp-check" in b, "checkpoint-digest-without-seqno" in b
        # the view (changed by the cross-area steps only); our membership is in force after members_from
        self.view, self.view_active, self.members_from, self.retired = 0, True, 0, False  # (core.membership)
        self.vc = ViewChanges(self)  # the view change: ViewChange, acks, NewView, new-view batches
        self._init_log_and_checkpoints(service, genesis_config)
        self.requests = Requests(self)  # admission, vouching, the primary's queue, the request timer, replies
        self.status = StatusExchange(self, now)  # Status messages: what peers report, our answers
        self._handlers = self._handler_table()

    def _init_log_and_checkpoints(self, service: Service, genesis_config: bytes) -> None:
        cfg = self.cfg
        self.low_water_mark = 0  # low water mark: last stable checkpoint
        self.log = Log(self)  # the normal case and the log: slots, certificates, batches, execution
        # the checkpointed state: the service's objects, the last-reply table, the configuration
        self.rs = ReplicaState(service, cfg.partition_fanout, not self.bug_ckpt_noseq, genesis_config=genesis_config)
        self.state = self.rs.cs
        self.last_reply = self.rs.last_reply  # client -> (timestamp, result); change through rs.set_reply
        self.checkpoints = Checkpoints(self, self.state.checkpoint(0))  # ours, committed and tentative
        self.checkpoint_votes = CheckpointVotes(self.log_window, self.checkpoint_interval)  # the replicas' votes
        self.transfer = StateTransfer(self)  # state transfer: fetching and serving checkpoints
        self.needs_state, self._installing = False, False  # (needs_state: restored damaged, execute nothing)
        self.chain = membership.ChainView()  # what the driver's membership chain says (core.membership)
        self.recovery = ProactiveRecovery(self)  # proactive recovery: ours, and the others' points

    # ==== driver interface ==============================================
    def take_ready(self) -> Ready:
        """Everything the steps since the last call produced, for the driver to carry out: the
        records to write, THEN the messages to send (see ``Ready`` for the whole contract).
        Call it once after every step (``receive``, ``tick``, ``restore``, ``begin_recovery``,
        ``restart``)."""
        self.requests.flush_vouches()
        sends, self.out = self.out, []
        puts = self.disk.take()
        events, refresh = self.events, self.refresh_keys
        if events:
            self.events = []
        if refresh:
            self.refresh_keys = False
        return Ready(puts, sends, events, refresh)

    def begin_recovery(self, now: float, nonce: int) -> None:
        """Start a proactive recovery (after a reboot and ``restore``; ``pbft.core.recovery``);
        ``nonce`` exceeds any this replica used (the runtime: the wall clock in µs). The cross-area
        step: a primary leaves its active view (``ViewChanges.recovery_begins``); distrust (the
        log from disk forgotten, objects unverified until a state transfer checks them); estimation."""
        self.now = now
        self.vc.recovery_begins()
        self.log.distrust()
        self.checkpoints.distrust()
        self.state.discard_all()
        self.state.unpersisted = set(range(self.state.n))
        self.disk.distrust_checkpoint()
        self.needs_state = True
        self.transfer.abandon()
        self.recovery.start(nonce)

    def _mark_stale(self, j: int) -> None:
        """Replica j's recovery request executed here: what we hold from j, received before it
        under j's keys from before its recovery (an intruder's maybe, with those keys), is stale
        and completes no certificate from now on: its prepares and commits in slots whose
        certificate is not complete, its checkpoint votes (none is stable: those are discarded),
        its view changes and acks for views we have not reached, and what its Status claimed.
        Completed certificates are kept. (In the runtime j's reboot replaced its session keys
        before its request: nothing under the old ones verifies any more.) The cross-area step of
        a recovery at the other replicas (``ProactiveRecovery.execute``)."""
        stale = self.log.forget_uncertified(j) + self.checkpoint_votes.forget(j) + self.vc.forget(j)
        self.status.forget(j)
        if stale:
            self.counts[Count.STALE_MESSAGES] = self.counts.get(Count.STALE_MESSAGES, 0) + stale
        self._emit(StaleMarked(j, stale))

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

    def next_deadline(self) -> Optional[float]:
        rec, rq = self.recovering, self.requests
        ds = [d for d in (self.status.deadline, rq.deadline, self.vc.deadline, self.transfer.deadline,
                          rq.vouch_deadline, self.log.body_deadline,
                          rec.next_send if rec is not None and rec.phase != "check" else None) if d is not None]
        return min(ds) if ds else None

    def invariants(self) -> None:
        """Assert what holds after every step whatever the input (a failure is a bug of ours, never
        a peer's doing). Cheap: drivers call it after every step (the simulator, the tests)."""
        assert self.log.last_committed_exec <= self.log.last_exec, "committed execution ahead of execution"
        assert self.view_active or self.view > 0, "view 0 is never changed to"
        assert (self.fetch_target is None) == (self.fetcher is None), "a fetch target without its walk"
        assert self.log.seq_assigned >= self.low_water_mark, "sequence numbers assigned below the low water mark"
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
                # usable only if f+1 replicas report its digest (``ViewChanges.on_unverified_new_view``)
                try:
                    nv = self.codec.parse(fr)
                except DecodeError:
                    return
                if isinstance(nv, NewView):
                    self.vc.on_unverified_new_view(nv, fr)
                return
            if fr.tag == Tag.REQUEST and fr.sender >= self.cfg.n:
                # a request whose MAC for us is wrong may still be genuine (its client may be
                # faulty towards us only): keep the body; it is used only if f+1 replicas vouch
                try:
                    req = self.codec.parse(fr)
                except DecodeError:
                    return
                if isinstance(req, Request) and not req.read_only:
                    self.requests.on_unverified_request(req, fr, relayed)
            return
        if fr.tag in SENDER_BUDGETS and fr.sender < self.cfg.n and not self.budgets.within(fr, relayed):
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
        if self.log.body_deadline is not None and now >= self.log.body_deadline:
            self.log.ask_for_bodies(now)  # (pre-prepares whose requests' frames did not come in time)
        self.requests.tick(now)
        self.vc.tick(now)
        self.transfer.tick(now)

    def restart(self, now: float) -> None:
        """Resume after a crash: durable protocol state kept, volatile state lost.

        The process lost its queues, its timers and messages in flight; the view,
        log, checkpoints and service state are assumed to be on stable storage.
        """
        self.now = now
        self.out = []
        self.requests.restart()
        self.log.restart()
        self.status.restart(now)
        self.vc.restart(now)
        self.transfer.restart(now)

    # ==== helpers =======================================================
    def _drop(self, why: Drop | str) -> None:
        """Count a dropped input under its reason."""
        self.drops[why] = self.drops.get(why, 0) + 1
        self.dropped_total += 1  # (a driver compares it around ``receive``: was the frame wasted?)

    def _drop_undecodable(self, e: DecodeError) -> None:
        """Count a frame or message the codec refused, under the codec's reason."""
        self._drop(e.reason)

    def _count(self, what: Count) -> None:
        """Count something that happened and is not a dropped input (``self.counts``)."""
        self.counts[what] = self.counts.get(what, 0) + 1

    def count_drop(self, why: Drop) -> None:
        """For a driver dropping a frame for us (the simulator's principal binding: ``spoofed-client``)."""
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

    # ==== the steps that cross areas ====================================
    def _state_unverified(self) -> bool:
        """Whether our objects may be wrong: not yet checked against a certified checkpoint after a
        recovery's reboot or a damaged store (``needs_state``), or a state transfer (a catch-up or
        a repair) is replacing them."""
        return self.needs_state or self.fetch_target is not None

    def _committed(self, n: int) -> None:
        """Seqno n's execution is final: its requests leave the pending set, and the request
        timer restarts (only committed progress counts: tentative executions that never commit,
        e.g. under a primary whose commits are missing, must not keep postponing a view change)."""
        self.requests.completed(self.log.exec_log[n].requests)
        if self.view_active:
            self.vc.reset_timeout()
        self.requests.arm_timer()

    def _check_stable(self, n: int) -> None:
        if n <= self.low_water_mark:
            return
        votes = self.checkpoint_votes
        for d in votes.digests(n):
            voters = votes.voters(n, d)
            reached = membership.checkpoint_reached(self, n, voters)
            if reached is Reached.QUORUM:
                self._on_stable_certificate(n, d)
                return
            if reached is Reached.WEAK and self.log.last_committed_exec < n and (
                    n > self.low_water_mark + self.log_window
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
            self._repair_state(n, own, d)
            return
        if own is not None and own == d:
            self._advance_low_water_mark(n, d)
        else:
            if self.log.last_exec > self.log.last_committed_exec:
                self.log.rollback()
            self._advance_low_water_mark(n, d)
            self._start_fetch(n, d)

    def _repair_state(self, n: int, own: bytes, d: bytes) -> None:
        """Our checkpoint n (digest ``own``) disagrees with the certified (n, d): our state diverged
        (corrupted behind the library's back, a bug, a faulty disk). Repair it at once: the log up to
        n goes (n is stable), the objects go back to our checkpoint n, and a state transfer to (n, d)
        walks the partition tree and fetches only the objects that differ. Until it completes we
        execute nothing and answer no read; then the committed batches after n execute again."""
        t = self.transfer.target
        if t is not None and t[0] >= n:
            return  # (a transfer under way already replaces our state)
        if self.log.last_exec > self.log.last_committed_exec:
            self.log.rollback()
        self.needs_state = True  # execute nothing, answer no read, and not recovered, before the fetch
        self._advance_low_water_mark(n, d)
        st = self.state
        if st.has(n):
            # the objects changed after n get our values at n back (the fetch then compares only
            # what our checkpoint n got wrong); they are written again with the fetched checkpoint
            st.unpersisted.update(i for rec in st.records if rec.seqno >= n for i in rec.objs)
            st.rollback(n)
        st.discard_all()
        self.disk.distrust_checkpoint()  # (the fetched checkpoint n is written, even if ours was)
        self.checkpoints.distrust()
        self.log.rewind_to(n)
        self._count(Count.STATE_REPAIR)
        self._emit(StateRepairStarted(n, own, d))
        self._emit(FetchStarted(n, d))
        self.transfer.start(n, d)

    def _advance_low_water_mark(self, n: int, d: bytes) -> None:
        """Checkpoint (n, d) is stable (or certified): discard the log up to it."""
        if n <= self.low_water_mark:
            return
        self.disk.gc(self.low_water_mark, min(n, self.low_water_mark + self.log_window), n, d)
        self.low_water_mark = n
        self._emit(Stable(n))
        self.checkpoints.discard_below(n)
        self.state.discard_below(n)
        self.log.discard_upto(n)
        self.checkpoint_votes.discard_upto(n)
        if self.recovery_points:
            self.recovery.prune_points()
        if self.recovering is not None:
            self.recovery.check_done()
        membership.after_stable(self, n)  # (a membership change switches here)
        if self.is_primary:
            self.log.try_send_preprepare()

    def _start_fetch(self, n: int, d: bytes, unusable: bool = False) -> None:
        """Fetch checkpoint (n, d), certified, unless we are there (``unusable``: not our state) or on our way."""
        t = self.transfer.target
        if t is not None and t[0] >= n:
            return
        if self.log.last_committed_exec >= n and not unusable:
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
        self.requests.caught_up()
        self.checkpoint_votes.record(self.id, n, d)
        self._broadcast(Checkpoint(n, d, self.id))
        # the fetched checkpoint is certified (a correct replica holds it): it becomes our
        # low water mark, so the window moves to where the rest of the cluster is
        self._advance_low_water_mark(n, d)
        self._check_stable(n)
        if self.recovering is not None:
            self.recovery.check_done()
        self.log.try_execute()
        self.requests.drain_read_only()
        if self.is_primary:
            self.log.try_send_preprepare()
        membership.after_stable(self, n)

    def on_status(self, s: Status, fr: Frame) -> None:
        """A peer's Status: learn where it is, act on it, then answer with what it lacks."""
        st = self.status
        # join rule (thesis 2.3.5, on Status rather than ViewChange messages): when replicas of
        # weak-certificate weight (f+1) are in views above ours, at least one correct replica
        # is, so move up (``Quorums.join_view``). This is how a replica that slept through
        # a view change, or restarted without its state, finds the current view even when it
        # has no request of its own to time out on.
        st.learn_view(s)
        if st.learn_stable(s) and s.stable_seqno > max(self.log.last_committed_exec, self.low_water_mark):
            self._check_stable(s.stable_seqno)
        if st.learn_new_view(s):
            self.vc.try_certified_new_view()
        st.learn_stuck(s)
        if s.view > self.view:
            target = self.quorums.join_view(st.peer_views, self.view)
            if target is not None:
                self._start_view_change(target, "status-join")
        st.answer(s)

    def _idle(self) -> bool:
        """Nothing for clients is under way here: no certified request waiting, nothing queued,
        ordered or tentative, no state transfer or recovery."""
        return (self.view_active and self.requests.idle() and self.log.last_exec == self.log.last_committed_exec
                and self.log.seq_assigned <= self.log.last_exec and self.fetch_target is None
                and self.recovering is None and not self.needs_state)

    def _start_view_change(self, v: int, why: str) -> None:
        """Move to view v (not active until its NewView is installed): roll back tentative
        executions, drop this view's slots, held pre-prepares and the primary's queue, and send
        our ViewChange."""
        if v <= self.view or v >= membership.view_limit(self.view) or self.retired:  # (core.membership)
            return
        if self.log.last_exec > self.log.last_committed_exec:
            self.log.rollback()
        self.view = v
        self.view_active = False
        self.disk.view()
        self.log.leave_view()
        self.requests.leave_view()
        self._emit(ViewChangeStarted(v, why))
        self.requests.drain_read_only()
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
        if s > self.low_water_mark:
            if self.checkpoints.committed.get(s) != d:
                self._start_fetch(s, d)
            self._installing = True  # no pre-prepare before the re-proposals are in place
            try:
                self._advance_low_water_mark(s, d)
            finally:
                self._installing = False
        primary = self.is_primary
        self.requests.wait_reads_for(self.log.preprepare_chosen(dec, chosen_batches))
        self.log.prepare_chosen(dec)
        self.requests.new_view(primary)
        self.log.try_execute()
        self.requests.drain_read_only()
        if primary:
            self.log.try_send_preprepare()
        membership.after_stable(self, self.low_water_mark)

    def _handler_table(self) -> dict[type, Callable[[Any, Frame], None]]:
        """The dispatcher's table: message type -> the handler of the component that owns it."""
        vc, transfer, recovery = self.vc, self.transfer, self.recovery
        return {
            Request: self.requests.on_request,
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
            Vouch: self.requests.on_vouch,
        }
