"""The normal case and the log: pre-prepare, prepare, commit, and execution in sequence order.

Owns: the slots of the current view (who pre-prepared, prepared and committed what at each
sequence number in the window), the prepared and pre-prepared certificates a ViewChange reports
(the paper's P and Q), the batches the log refers to, the primary's next sequence number, the
pre-prepares held for want of vouches, and execution: how far we executed (tentatively, and with
every batch committed), the record of each execution above the low water mark and its rollback.

May not touch: the request maps (it asks ``Replica`` to admit and check the requests a batch
carries), the checkpoints and the view. A committed execution is reported to the cross-area
steps ``Replica._committed`` (the requests it completes) and to ``Checkpoints``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AbstractSet, Iterable, NamedTuple, Optional

from ..codec import (
    NULL_BATCH_DIGEST, DecodeError, Frame,
    batch_digest_from_request_digests,
)
from ..messages import NULL_BATCH, Batch, Commit, PrePrepare, Prepare, Request, has_refs
from . import membership, reconfig
from .drops import HOLDABLE, Count, Drop
from .events import (
    Committed, Executed, PrePrepared, PrePrepareSent, Prepared, Promoted, RolledBack, ServiceException,
)

if TYPE_CHECKING:
    from .replica import Replica
    from .view_change import Decision



def _index_waiter(index: dict[bytes, set[int]], keys: list[bytes], seqno: int, live: AbstractSet[int],
                  bound: int) -> None:
    """Index the held pre-prepare ``seqno`` under each of ``keys`` (what it waits for). Bounded: past
    ``bound`` keys, those whose pre-prepares are no longer ``live`` (accepted or discarded since) go."""
    for k in keys:
        ns = index.get(k)
        if ns is None:
            ns = index[k] = set()
        ns.add(seqno)
    if len(index) > bound:
        for k in [k for k, ns in index.items() if not any(n in live for n in ns)]:
            del index[k]

class ExecRecord(NamedTuple):
    """What executing a sequence number did: its batch (and digest), and the requests of the batch
    that executed (a request ordered twice executes once)."""

    digest: bytes
    batch: Batch
    requests: tuple[tuple[int, int], ...]  # (client, timestamp)


# what a client gets when the service raised, or returned something other than bytes within the
# reply size limit: the same on every correct replica (see ``Log.run_service``)
SERVICE_ERROR_RESULT = b"\xffpbft:service-error"


@dataclass(slots=True)
class Slot:
    """Per-sequence-number agreement state in the current view."""

    view: int
    digest: Optional[bytes] = None  # digest of the accepted pre-prepare (None until accepted)
    batch: Optional[Batch] = None
    pp_raw: Optional[bytes] = None  # the primary's pre-prepare frame (None if from a NewView)
    prepares: dict[int, bytes] = field(default_factory=dict)
    commits: dict[int, bytes] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False
    held_pp: Optional[tuple[PrePrepare, bytes]] = None  # (PrePrepare, raw) whose agreed value we could not check

    def __init__(self, view: int, digest: Optional[bytes] = None, batch: Optional[Batch] = None,
                 pp_raw: Optional[bytes] = None, prepares: Optional[dict[int, bytes]] = None,
                 commits: Optional[dict[int, bytes]] = None, prepared: bool = False, committed: bool = False,
                 held_pp: Optional[tuple[PrePrepare, bytes]] = None) -> None:
        # (its own ``__init__``, as the hot messages have (``pbft.messages``): native when compiled;
        # one per sequence number at each replica)
        self.view = view
        self.digest = digest
        self.batch = batch
        self.pp_raw = pp_raw
        self.prepares = {} if prepares is None else prepares
        self.commits = {} if commits is None else commits
        self.prepared = prepared
        self.committed = committed
        self.held_pp = held_pp


class Log:
    """The normal case and the log (see the module docstring for what it owns)."""

    __slots__ = ("r", "slots", "prepared", "preprepared", "batches", "seq_assigned", "last_exec",
                 "last_committed_exec", "exec_log", "last_exec_seqno", "executed_digest", "executed_requests",
                 "held", "held_keys", "waiting", "body_waiters", "body_deadline")

    def __init__(self, replica: "Replica"):
        self.r = replica
        # Invariant: every key of slots, prepared, preprepared and exec_log is in the window (h, h + L]
        self.slots: dict[int, Slot] = {}  # seqno -> its agreement in the current view
        self.prepared: dict[int, tuple[bytes, int]] = {}  # seqno -> (digest, view) prepared latest (the paper's P)
        # seqno -> digest -> the latest view we pre-prepared it in (the paper's Q; at most 4 digests)
        self.preprepared: dict[int, dict[bytes, int]] = {}
        self.batches: dict[bytes, tuple[Batch, int]] = {}  # digest -> (batch, highest seqno using it)
        # Invariant: last_committed_exec <= last_exec; seq_assigned >= h
        self.seq_assigned = 0  # primary: last sequence number assigned
        self.last_exec = 0  # executed up to here (tentatively above last_committed_exec)
        self.last_committed_exec = 0  # executed up to here, every batch committed
        self.exec_log: dict[int, ExecRecord] = {}  # executed seqnos above h
        self.last_exec_seqno: dict[int, int] = {}  # client -> seqno of its last execution here (local)
        self.executed_digest: dict[int, bytes] = {}  # client -> frame digest of its last executed request
        self.executed_requests = 0  # metric
        self.held: set[int] = set()  # seqnos whose slot holds a pre-prepare waiting for vouches
        # the held pre-prepares each missing vouch key blocks: a Vouch re-checks only the held
        # pre-prepares its own keys can unblock (work proportional to its keys, not to the log)
        self.held_keys: dict[bytes, set[int]] = {}
        # held pre-prepares whose batch refers to requests (by digest) whose bodies we lack: seqno ->
        # when to ask for the whole batch (None: asked; ``ask_for_bodies``), and the seqnos waiting
        # for each missing request digest (the body may come from its client meanwhile)
        self.waiting: dict[int, Optional[float]] = {}
        self.body_waiters: dict[bytes, set[int]] = {}
        self.body_deadline: Optional[float] = None  # the earliest time in ``waiting``

    def distrust(self) -> None:
        """A recovery begins: the log reloaded from disk may be an attacker's; only what executed
        with every batch committed stays (the objects, checked by a state transfer later)."""
        self.slots.clear()
        self.prepared.clear()
        self.preprepared.clear()
        self.exec_log.clear()
        self.last_exec = self.last_committed_exec

    def promote(self, n: int) -> None:
        """Our tentative executions up to n are the committed ones (a certificate of checkpoint n
        proves it)."""
        r = self.r
        for k in range(self.last_committed_exec + 1, n + 1):
            r._committed(k)
        self.last_committed_exec = n
        r._emit(Promoted(n))

    def discard_upto(self, n: int) -> None:
        """Checkpoint n is stable: the log up to it goes, and the batches only it used; the
        primary assigns sequence numbers above it."""
        r = self.r
        for k in [k for k in self.slots if k <= n]:
            del self.slots[k]
        for k in [k for k in self.prepared if k <= n]:
            del self.prepared[k]
        for k in [k for k in self.preprepared if k <= n]:
            del self.preprepared[k]
        for k in [k for k in self.exec_log if k <= n]:
            del self.exec_log[k]
        for k in [k for k in self.waiting if k <= n]:
            del self.waiting[k]
        for d in [d for d, (_, m) in self.batches.items() if m <= n]:
            del self.batches[d]
            r.disk.forget_batch(d)
        if self.seq_assigned < n:
            self.seq_assigned = n

    def restart(self) -> None:
        """After a crash: the held pre-prepares were volatile. The request frames too: a slot still
        holding a pre-prepare that lacks bodies asks for its batch at once."""
        self.held.clear()
        self.held_keys.clear()
        self._forget_waiting()
        for n in list(self.slots):
            if self._waiting_slot(n) is not None:
                self.waiting[n] = self.body_deadline = self.r.now

    def _forget_waiting(self) -> None:
        self.waiting.clear()
        self.body_waiters.clear()
        self.body_deadline = None

    def unblock(self, key: bytes) -> set[int]:
        """Vouch key ``key`` is certified: the held pre-prepares that waited for it (no longer
        indexed by it)."""
        return self.held_keys.pop(key)

    def forget_uncertified(self, j: int) -> int:
        """Replica j's prepares and commits in slots whose certificate is not complete (stale:
        ``Replica._mark_stale``); how many."""
        stale = 0
        for slot in self.slots.values():
            if not slot.prepared and slot.prepares.pop(j, None) is not None:
                stale += 1
            if not slot.committed and slot.commits.pop(j, None) is not None:
                stale += 1
        return stale

    def rewind_to(self, n: int) -> None:
        """Our state goes back to checkpoint n (a repair): executed up to n, every batch committed;
        the records of executions after n go."""
        for k in [k for k in self.exec_log if k > n]:
            del self.exec_log[k]
        self.last_exec = self.last_committed_exec = n

    def leave_view(self) -> None:
        """A view change: the view's slots and the pre-prepares held in it go (the certificates
        stay: our ViewChange reports them)."""
        self.slots.clear()
        self.held.clear()
        self.held_keys.clear()
        self._forget_waiting()

    def jump_to(self, n: int) -> None:
        """The state is checkpoint n's (a state transfer completed): executed up to n, every batch
        committed; the records of executions up to n go."""
        self.last_exec = self.last_committed_exec = n
        for k in [k for k in self.exec_log if k <= n]:
            del self.exec_log[k]

    # -- a restart from stable storage (``durability.restore``, on a new replica) ----------------
    def restore_progress(self, n: int) -> None:
        """The state restored is checkpoint n's (or, unusable, the window starts at n): executed up
        to n, every batch committed, and the primary assigns sequence numbers above n. Precondition:
        a new log (nothing executed)."""
        assert not self.exec_log and self.last_exec == self.last_committed_exec == self.seq_assigned == 0
        self.last_exec = self.last_committed_exec = self.seq_assigned = n

    def restore_certificates(self, q: dict[int, dict[bytes, int]], p: dict[int, tuple[bytes, int]],
                             committed: dict[int, tuple[int, bytes]], batches: dict[bytes, Batch]) -> None:
        """The log's records: the Q set ``q`` and the P set ``p``, the batches (kept up to the
        window's end), and the slots of the current view (what we pre-prepared, prepared and, by
        ``committed``: seqno -> (view, digest), committed in it); the primary assigns sequence
        numbers above the window's start and above what it pre-prepared. Preconditions: the
        replica's view and low water mark are restored, every seqno is in the window, and the log
        holds no certificate, batch or slot yet."""
        r = self.r
        assert not self.slots and not self.prepared and not self.preprepared and not self.batches
        assert all(self.in_window(n) for n in (*q, *p, *committed))
        self.preprepared.update(q)
        self.prepared.update(p)
        for d, b in batches.items():
            self.batches[d] = (b, r.low_water_mark + r.log_window)
        for n, qd in q.items():
            for d, v in qd.items():
                if v != r.view:
                    continue
                slot = self.slot(n)
                slot.digest = d
                slot.batch = self.batch_for(d)
                if r.primary() != r.id:
                    slot.prepares[r.id] = d
                if p.get(n) == (d, r.view):
                    slot.prepared = True
                    slot.commits[r.id] = d
                if committed.get(n, (None, None))[1] == d:
                    slot.committed = True
        self.seq_assigned = max([self.seq_assigned, r.low_water_mark, *q])

    def reexecute_committed(self, committed: dict[int, tuple[int, bytes]]) -> None:
        """Re-execute, in order, what committed (``committed``: seqno -> (view, digest)) after the
        restored checkpoint, as far as we hold the batches; then tentatively what we had prepared in
        this view (a write acknowledged with tentative replies is then visible again before any read
        is answered). Precondition: the certificates are restored, and the state is usable."""
        assert not self.r.needs_state and self.last_exec == self.last_committed_exec
        n = self.last_committed_exec + 1
        while n in committed:
            d = committed[n][1]
            batch = self.batch_for(d)
            if batch is None:
                break
            slot = self.slots.get(n)
            if slot is None or slot.digest != d:
                slot = self.slot(n)
                slot.view, slot.digest, slot.batch = committed[n][0], d, batch
            self.execute(n, slot, tentative=False)
            n += 1
        self.try_execute()

    def preprepare_chosen(self, dec: Decision, chosen_batches: dict[bytes, Optional[Batch]]) -> int:
        """A NewView installs ``dec``: its chosen batches above the low water mark are pre-prepared
        in the new view (and prepared, at a backup). Returns the highest sequence number it
        covers, from which the primary assigns the next."""
        r = self.r
        top = max(dec.checkpoint_seqno, r.low_water_mark)
        primary = r.is_primary
        end = membership.fence(r)
        for n, dg in dec.chosen:
            if end is not None and n > end:
                continue  # (the old membership orders nothing beyond the switch point)
            top = max(top, n)
            if n <= max(r.low_water_mark, r.members_from):  # (a joiner's log starts after its switch point)
                continue
            slot = self.slot(n)
            slot.digest = dg
            slot.batch = chosen_batches[dg]
            if slot.batch is not None and dg != NULL_BATCH_DIGEST:
                self.remember_batch(dg, slot.batch, n)
            slot.pp_raw = None
            self.note_preprepared(n, dg)
            if not primary:
                slot.prepares[r.id] = dg
                r._broadcast(Prepare(r.view, n, dg, r.id))
        self.seq_assigned = max(top, self.last_committed_exec)
        return top

    def prepare_chosen(self, dec: Decision) -> None:
        """The chosen batches whose prepares are here already (they came before the NewView)."""
        for n, _dg in dec.chosen:
            slot = self.slots.get(n)
            if slot is not None:
                self.check_prepared(n, slot)

    def in_window(self, n: int) -> bool:
        r = self.r
        return r.low_water_mark < n <= r.low_water_mark + r.log_window

    def slot(self, n: int) -> Slot:
        r = self.r
        s = self.slots.get(n)
        if s is None or s.view != r.view:
            s = self.slots[n] = Slot(r.view)
        return s

    def remember_batch(self, d: bytes, batch: Batch, n: int) -> None:
        r = self.r
        assert not has_refs(batch), "a batch kept without its request bodies"
        old = self.batches.get(d)
        if old is None or old[1] < n:
            self.batches[d] = (batch, n)
            if old is None:
                r.disk.batch(d, batch)

    def batch_for(self, d: bytes) -> Optional[Batch]:
        if d == NULL_BATCH_DIGEST:
            return NULL_BATCH
        b = self.batches.get(d)
        return b[0] if b else None

    def try_send_preprepare(self) -> None:
        r = self.r
        cfg = r.cfg
        end = membership.fence(r)
        while (r.view_active and r.is_primary and not r._installing
               and (r.requests.queue or membership.null_goal(r) > self.seq_assigned)
               and self.seq_assigned + 1 <= r.low_water_mark + r.log_window
               and (end is None or self.seq_assigned + 1 <= end)
               and self.seq_assigned - self.last_exec < cfg.batches_in_flight_max
               and r.fetch_target is None and r.recovering is None and not r.needs_state):
            reqs = r.requests.take_batch()
            if reqs:
                nondet = r.service.propose_nondet(r.now + r.wall_offset_ms)
                batch = Batch(nondet, tuple(ri.raw for ri in reqs))
                d = batch_digest_from_request_digests(nondet, [ri.digest for ri in reqs])
                r.requests.ordered(batch, reqs)
                wire = r.requests.compact(batch, reqs)
            elif not r.requests.queue and membership.null_goal(r) > self.seq_assigned:
                # a replica is recovering, or a membership change waits for its switch point, and
                # nothing else is ordered: a null request moves the sequence towards the checkpoint
                batch = wire = NULL_BATCH
                d = NULL_BATCH_DIGEST
            else:
                return
            n = self.seq_assigned + 1
            self.seq_assigned = n
            pp = PrePrepare(r.view, n, d, r.id, wire)
            raw = r._broadcast(pp)
            slot = self.slots.get(n)
            if slot is None or slot.view != r.view:
                slot = self.slots[n] = Slot(r.view)
            slot.digest, slot.batch, slot.pp_raw = d, batch, raw
            self.remember_batch(d, batch, n)
            self.note_preprepared(n, d)
            r._emit(PrePrepareSent(r.view, n, d))
            self.check_prepared(n, slot)

    def note_preprepared(self, n: int, d: bytes) -> None:
        r = self.r
        q = self.preprepared.setdefault(n, {})
        q[d] = r.view
        if len(q) > 4:  # bounded: keep the digests of the latest views
            for old in sorted(q, key=lambda dg: q[dg])[: len(q) - 4]:
                del q[old]
        r.disk.q(n)

    def _ignore_agreement(self, view: int, n: int) -> Optional[Drop]:
        r = self.r
        if not r.view_active:
            return Drop.IN_VIEW_CHANGE
        if view != r.view:
            return Drop.WRONG_VIEW
        if not self.in_window(n) or n <= r.members_from:  # (a joiner's log starts after its switch point)
            return Drop.OUT_OF_WINDOW
        if (end := membership.fence(r)) is not None and n > end:
            return Drop.BEYOND_SWITCH_POINT
        if r.recovering is not None and r.recovery.ignores(n):
            return Drop.RECOVERING
        return None

    def _ignore_preprepare(self, pp: PrePrepare) -> Optional[Drop]:
        r = self.r
        if (why := self._ignore_agreement(pp.view, pp.seqno)) is not None:
            return why
        if pp.replica != r.primary():
            return Drop.PREPREPARE_NOT_FROM_PRIMARY
        if pp.batch is None:
            return Drop.PREPREPARE_WITHOUT_BATCH
        return None

    def on_preprepare(self, pp: PrePrepare, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_preprepare(pp)) is not None:
            return r._drop(why)
        assert r.view_active and pp.view == r.view and self.in_window(pp.seqno) and pp.batch is not None
        n = pp.seqno
        slot = self.slot(n)
        if slot.digest is not None:
            r._drop(Drop.PREPREPARE_DUPLICATE if slot.digest == pp.digest else Drop.PREPREPARE_CONFLICT)
            return
        if n <= self.last_exec and (done := self.exec_log.get(n)) is not None and done.digest != pp.digest:
            r._drop(Drop.PREPREPARE_CONFLICTS_EXECUTED)
            return
        held = slot.held_pp
        if held is not None and held[0].digest == pp.digest and \
                (n in self.waiting or not has_refs(held[0].batch or NULL_BATCH)):
            # (a resent copy of what we hold: nothing it could change; vouches, prepares and the
            # status tick re-check the held one, and request bodies or the fetched batch complete it)
            r._drop(Drop.PREPREPARE_HELD_DUPLICATE)
            return
        if has_refs(pp.batch):
            missing: list[bytes] = []
            full = self._full_batch(pp, missing)
            if full is None:
                self._wait_for_bodies(pp, fr.raw, slot, missing)
                return
            pp = PrePrepare(pp.view, n, pp.digest, pp.replica, full)
        self._check_preprepare(pp, fr.raw, slot)

    def _check_preprepare(self, pp: PrePrepare, raw: bytes, slot: Slot) -> None:
        """Accept, hold or drop the primary's pre-prepare ``pp`` (frame ``raw``), its batch
        complete: its requests' MACs (or vouches), digest and agreed value are checked."""
        r = self.r
        batch = pp.batch
        assert batch is not None and not has_refs(batch)
        missing: list[bytes] = []
        reason = r.requests.check_batch(batch, pp.digest, check_nondet=not self._weakly_prepared(slot, pp.digest),
                                   missing=missing)
        if reason in HOLDABLE:
            # the agreed value looks wrong from here: maybe our clock, maybe an old pre-prepare
            # relayed for catch-up. Accept it once replicas of weight f+1 stand by it (one
            # correct replica checked it when it was fresh: ``_weakly_prepared``).
            if self._weakly_prepared(slot, pp.digest):
                # their prepares came first (a replica catching up gets the prepares and the
                # pre-prepare in one answer, in any order): accept now; a later prepare from the same
                # backups would be a duplicate and never look at the held pre-prepare again
                self._accept_preprepare(pp, raw, slot)
                return
            self._hold_preprepare(pp, raw, slot, missing)
        if reason:
            r._drop(reason)
            return
        self._accept_preprepare(pp, raw, slot)

    # -- pre-prepares whose batch refers to request bodies we lack ---------------------------------
    def _full_batch(self, pp: PrePrepare, missing: Optional[list[bytes]] = None) -> Optional[Batch]:
        """The batch of ``pp`` with every request body in place (one we hold by its digest, or its
        by-digest entries filled from the requests' own frames), or None."""
        assert pp.batch is not None
        b = self.batch_for(pp.digest)
        return b if b is not None else self.r.requests.resolve(pp.batch, missing)

    def _wait_for_bodies(self, pp: PrePrepare, raw: bytes, slot: Slot, missing: list[bytes]) -> None:
        """Hold ``pp``: it refers to requests whose frames we have not received (yet) from their
        clients. They normally come soon; after ``request_body_wait_ms`` we ask for the whole
        batch (``ask_for_bodies``). Bounded: one per slot, the digests of one batch per slot."""
        r = self.r
        r._drop(Drop.PREPREPARE_BODIES_MISSING)  # (counted; held, not discarded)
        slot.held_pp = (pp, raw)
        at = r.now + r.cfg.request_body_wait_ms
        self.waiting[pp.seqno] = at
        if self.body_deadline is None or at < self.body_deadline:
            self.body_deadline = at
        _index_waiter(self.body_waiters, missing, pp.seqno, self.waiting.keys(),
                      2 * r.log_window * r.cfg.batch_requests_max)

    def _waiting_slot(self, n: int) -> Optional[Slot]:
        """The slot of seqno n if it still holds a pre-prepare lacking request bodies."""
        slot = self.slots.get(n)
        if slot is None or slot.held_pp is None or slot.digest is not None or slot.view != self.r.view \
                or not has_refs(slot.held_pp[0].batch or NULL_BATCH):
            self.waiting.pop(n, None)
            return None
        return slot

    def ask_for_bodies(self, now: float) -> None:
        """Held pre-prepares whose request bodies did not come in time: ask for their batches (of
        the primary first; the status tick asks everybody again while they are missing)."""
        r = self.r
        nxt: Optional[float] = None
        for n, at in list(self.waiting.items()):
            slot = self._waiting_slot(n)
            if slot is None or at is None:
                continue
            if now >= at:
                self.waiting[n] = None
                assert slot.held_pp is not None
                r._count(Count.BODIES_FETCHED)
                r.vc.want_batches([slot.held_pp[0].digest], ask=r.primary())
            elif nxt is None or at < nxt:
                nxt = at
        self.body_deadline = nxt

    def body_arrived(self, d: bytes) -> None:
        """The frame of request ``d`` is here: the held pre-prepares that lacked it may go on."""
        for n in sorted(self.body_waiters.pop(d)):
            self._retry_waiting(n)

    def batch_arrived(self, d: bytes) -> None:
        """Batch ``d`` is here whole (a BatchData): the held pre-prepare of it may go on."""
        for n in sorted(self.waiting):
            slot = self._waiting_slot(n)
            if slot is not None and slot.held_pp is not None and slot.held_pp[0].digest == d:
                self._retry_waiting(n)

    def _retry_waiting(self, n: int) -> None:
        slot = self._waiting_slot(n)
        if slot is None or n not in self.waiting:
            return
        assert slot.held_pp is not None
        pp, raw = slot.held_pp
        full = self._full_batch(pp)
        if full is None:
            return
        del self.waiting[n]
        slot.held_pp = None
        self._check_preprepare(PrePrepare(pp.view, n, pp.digest, pp.replica, full), raw, slot)

    def _weakly_prepared(self, slot: Slot, d: bytes) -> bool:
        """Whether replicas of weight > f vouch for the pre-prepared batch ``d`` by their own word:
        the backups that prepared it and the primary, whose pre-prepare it is (the callers hold
        one from the primary of the slot's view). Each of them, if correct, checked every request
        of the batch (verified its MAC, or f+1 vouched for it, or, inductively, f+1 such words)
        and the agreed value when it was fresh, so one of them did."""
        r = self.r
        voters = [j for j, x in slot.prepares.items() if x == d and j != r.id]
        p = r.primary()
        if p != r.id and p not in voters:
            voters.append(p)
        return r.quorums.is_weak(voters)

    def _accept_preprepare(self, pp: PrePrepare, raw: bytes, slot: Slot) -> None:
        r = self.r
        n, batch = pp.seqno, pp.batch
        assert batch is not None  # (on_preprepare drops a pre-prepare without one)
        slot.held_pp = None
        slot.digest, slot.batch, slot.pp_raw = pp.digest, batch, raw
        r.requests.ordered(batch)
        self.remember_batch(pp.digest, batch, n)
        self.note_preprepared(n, pp.digest)
        r._emit(PrePrepared(r.view, n, pp.digest))
        slot.prepares[r.id] = pp.digest
        r._broadcast(Prepare(r.view, n, pp.digest, r.id))
        self.check_prepared(n, slot)

    def _hold_preprepare(self, pp: PrePrepare, raw: bytes, slot: Slot, missing: list[bytes]) -> None:
        """Keep a pre-prepare we cannot accept yet (see ``on_preprepare``), indexed by the vouch
        keys it waits for. Bounded: one per slot, the keys of one batch per slot."""
        r = self.r
        slot.held_pp = (pp, raw)
        self.held.add(pp.seqno)
        _index_waiter(self.held_keys, missing, pp.seqno, self.held, 2 * r.log_window * r.cfg.batch_requests_max)

    def recheck_held(self, seqnos: Iterable[int]) -> None:
        """Check held pre-prepares again (vouches arrived, or the clock moved on)."""
        r = self.r
        for n in seqnos:
            slot = self.slots.get(n)
            if slot is None or slot.held_pp is None:
                self.held.discard(n)
                continue
            if slot.digest is None and slot.view == r.view:
                pp, raw = slot.held_pp
                assert pp.batch is not None  # (only a pre-prepare with its batch is held)
                if has_refs(pp.batch):
                    continue  # (one waiting for request bodies replaced it: ``_retry_waiting``)
                if r.requests.check_batch(pp.batch, pp.digest,
                                     check_nondet=not self._weakly_prepared(slot, pp.digest)) is None:
                    self.held.discard(n)
                    self._accept_preprepare(pp, raw, slot)

    def _ignore_prepare(self, p: Prepare) -> Optional[Drop]:
        r = self.r
        if (why := self._ignore_agreement(p.view, p.seqno)) is not None:
            return why
        if p.replica == r.primary():
            return Drop.PREPARE_FROM_PRIMARY
        return None

    def on_prepare(self, p: Prepare, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_prepare(p)) is not None:
            return r._drop(why)
        assert r.view_active and p.view == r.view and self.in_window(p.seqno)
        slot = self.slot(p.seqno)
        if p.replica in slot.prepares:
            r._drop(Drop.PREPARE_DUPLICATE)
            return
        slot.prepares[p.replica] = p.digest
        held = slot.held_pp
        if held is not None and slot.digest is None and not has_refs(held[0].batch or NULL_BATCH) \
                and self._weakly_prepared(slot, held[0].digest):
            self._accept_preprepare(*held, slot)
            return
        self.check_prepared(p.seqno, slot)

    def check_prepared(self, n: int, slot: Slot) -> None:
        r = self.r
        if slot.prepared or slot.digest is None:
            return
        d = slot.digest
        voters = [j for j, x in slot.prepares.items() if x == d]
        primary = r.primary()
        if primary not in voters:
            voters.append(primary)
        if not r.quorums.is_quorum(voters):
            return
        slot.prepared = True
        self.prepared[n] = (d, r.view)
        r.disk.p(n)
        r._emit(Prepared(r.view, n, d))
        slot.commits[r.id] = d
        r._broadcast(Commit(r.view, n, d, r.id))
        self._check_committed(n, slot)
        self.try_execute()

    def on_commit(self, c: Commit, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_agreement(c.view, c.seqno)) is not None:
            return r._drop(why)
        assert r.view_active and c.view == r.view and self.in_window(c.seqno)
        slot = self.slot(c.seqno)
        if c.replica in slot.commits:
            r._drop(Drop.COMMIT_DUPLICATE)
            return
        slot.commits[c.replica] = c.digest
        self._check_committed(c.seqno, slot)

    def _check_committed(self, n: int, slot: Slot) -> None:
        r = self.r
        if slot.committed or not slot.prepared:
            return
        d = slot.digest
        assert d is not None  # (a prepared slot has its pre-prepare's digest)
        if not r.quorums.is_quorum([j for j, x in slot.commits.items() if x == d]):
            return
        slot.committed = True
        r.disk.committed(n, d)
        r._emit(Committed(r.view, n, d))
        self.try_execute()

    def try_execute(self) -> None:
        r = self.r
        if (r.fetch_target is not None and self.last_exec < r.fetch_target[0]) or r.needs_state:
            return
        progressed = False
        while True:
            # promote tentative executions whose slots have committed
            while self.last_committed_exec < self.last_exec:
                k = self.last_committed_exec + 1
                s = self.slots.get(k)
                if s is None or s.view != r.view or not s.committed:
                    break
                self.last_committed_exec = k
                r._emit(Promoted(k))
                r._committed(k)
                if k % r.checkpoint_interval == 0:
                    r.checkpoints.commit_tentative(k)
                progressed = True
            if r.needs_state:
                break  # (the checkpoint just taken disagreed with a certified one: ``_repair_state``)
            n = self.last_exec + 1
            s = self.slots.get(n)
            if s is None or s.view != r.view or s.digest is None or s.batch is None:
                break
            if (end := membership.fence(r)) is not None and n > end:
                break  # (a slot beyond the switch point, pre-prepared before we knew it: never executed)
            if s.committed and self.last_committed_exec == self.last_exec:
                self.execute(n, s, tentative=False)
            elif s.prepared and r.view_active and r.cfg.tentative_execution:
                self.execute(n, s, tentative=True)
            else:
                break
            progressed = True
        if progressed:
            r.requests.drain_read_only()
            if r.is_primary:
                self.try_send_preprepare()

    def execute(self, n: int, slot: Slot, tentative: bool) -> None:
        r = self.r
        batch = slot.batch
        assert batch is not None
        try:
            reqs = r.requests.batch_requests(batch)
        except DecodeError:  # only reachable with the skip-digest-check bug
            reqs = []
        executed = []
        if reqs:
            r.rs.before_execute()
        for rfr, req in reqs:
            c, t = req.client, req.timestamp
            last = r.last_reply.get(c)
            if last is not None and t <= last[0] and not r.bug_no_ts:
                continue  # exactly-once: ordered twice, executed once
            result = self.apply(req, batch.nondet, n)
            r.rs.set_reply(c, t, result)
            self.last_exec_seqno[c] = n
            self.executed_digest[c] = rfr.digest
            executed.append((c, t, req.op))
            r.requests.send_reply(req, result, tentative=tentative)
        if executed:
            r.requests.executed(executed)
        self.last_exec = n
        self.executed_requests += len(executed)
        assert slot.digest is not None  # (an executed slot has its batch's digest)
        self.exec_log[n] = ExecRecord(slot.digest, batch, tuple((c, t) for c, t, _ in executed))
        r._emit(Executed(n, slot.digest, batch, tuple(executed), tentative))
        if not tentative:
            self.last_committed_exec = n
            r._committed(n)
        if n % r.checkpoint_interval == 0:
            d = r.state.checkpoint(n)
            if tentative:
                r.checkpoints.take_tentative(n, d)
            else:
                r.checkpoints.take(n, d)

    def rollback(self) -> None:
        """Undo tentative executions: restore the newest checkpoint at or below the
        last committed execution and re-execute the committed batches after it."""
        r = self.r
        target = self.last_committed_exec
        base = max(s for s in r.state.seqnos() if s <= target)
        r.state.rollback(base)
        for k in range(base + 1, target + 1):
            batch = self.exec_log[k].batch
            reqs = r.requests.batch_requests(batch)
            if reqs:
                r.rs.before_execute()
            for _rfr, req in reqs:
                last = r.last_reply.get(req.client)
                if last is not None and req.timestamp <= last[0] and not r.bug_no_ts:
                    continue
                result = self.apply(req, batch.nondet, k)
                r.rs.set_reply(req.client, req.timestamp, result)
        for k in range(target + 1, self.last_exec + 1):
            self.exec_log.pop(k, None)
        r.checkpoints.discard_tentative(range(target + 1, self.last_exec + 1))
        r._emit(RolledBack(target))
        self.last_exec = target

    def apply(self, req: Request, nondet: bytes, n: int) -> bytes:
        """Execute one ordered request at sequence number n: the service's operation, or (from
        a replica) a recovery request, or a configuration operation (``reconfig``: every request
        of an administrator, and any with the configuration prefix), which the library handles."""
        r = self.r
        if req.client < r.cfg.n:
            return r.recovery.execute(req.client, req.op, n, req.timestamp)
        if reconfig.handles(r.rs.config, req.client, req.op, n):
            return reconfig.execute_ordered(r, req.client, req.op, n)
        return self.run_service(req.op, req.client, nondet, False)

    def run_service(self, op: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        """``service.execute``; an exception (a bug in the service, triggered by some input) becomes
        the result ``SERVICE_ERROR_RESULT`` on every correct replica alike, so the replicas stay in
        agreement and the client gets an answer, instead of every replica failing on the same
        request. Counted as ``service-exception``."""
        r = self.r
        if read_only and reconfig.handles(r.rs.config, client, op, n := r.log.last_exec + 1):
            return reconfig.execute_ordered(r, client, op, n, read_only=True)
        try:
            result = r.service.execute(op, client, nondet, read_only)
        except Exception as e:  # noqa: BLE001 - the service is user code
            r._count(Count.SERVICE_EXCEPTION)
            r._emit(ServiceException(client, type(e).__name__))
            return SERVICE_ERROR_RESULT
        if type(result) is not bytes:
            r._count(Count.SERVICE_BAD_RESULT)
            return SERVICE_ERROR_RESULT
        if len(result) > r.cfg.reply_size_bytes_max:
            r._count(Count.SERVICE_RESULT_TOO_LARGE)
            return SERVICE_ERROR_RESULT
        return result
