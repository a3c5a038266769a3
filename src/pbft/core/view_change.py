"""The new-view decision procedure of the MAC-only view change (Castro's thesis, ch. 3).

Given a set S of ViewChange messages for view ``v`` (each vouched for by a
quorum, see ``Replica``), the new primary, and every backup checking it,
computes deterministically:

1. the starting checkpoint: the highest ``(s, d)`` such that a weak
   certificate (weight > W_byz) of messages in S holds ``(s, d)`` among their
   checkpoints (so a correct replica has it) and a quorum of messages have
   their stable checkpoint ``<= s``;
2. for every sequence number ``n`` above ``s``, either a batch digest ``d``:
   A1. a quorum of messages m with ``m.stable < n`` whose prepared entry for
       ``n`` is absent, from an earlier view, or ``(d, v')`` itself, and
   A2. a weak certificate of messages that pre-prepared ``d`` at ``n`` in a
       view ``>= v'``,
   where ``(n, d, v')`` is a prepared entry of some message in S; or the null
   request when a quorum of messages have ``m.stable < n`` and no prepared
   entry for ``n``.

If some sequence number satisfies neither rule yet, the decision is
incomplete: the primary waits for more view-change messages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from ..codec import NULL_BATCH_DIGEST, DecodeError, Frame, batch_wire_bytes, seal
from ..messages import Batch, BatchData, FetchBatch, NewView, ViewChange, ViewChangeAck
from .drops import Count, Drop
from .quorum import Quorums

if TYPE_CHECKING:
    from .replica import Replica


@dataclass(frozen=True, slots=True)
class Decision:
    checkpoint_seqno: int
    checkpoint_digest: bytes
    chosen: tuple[tuple[int, bytes], ...]  # (seqno, digest); NULL_BATCH_DIGEST for null requests


def decide(
    vcs: Sequence[ViewChange],
    quorums: Quorums,
    window: int,
) -> Optional[Decision]:
    """The new-view decision for S = ``vcs``, or None if S does not determine one yet."""
    is_quorum, is_weak = quorums.is_quorum, quorums.is_weak
    # 1. checkpoint
    best = _starting_checkpoint(vcs, quorums)
    if best is None:
        return None
    s0, d0 = best

    # index prepared (P) and pre-prepared (Q) entries
    P: list[dict[int, tuple[bytes, int]]] = []
    Q: list[dict[int, dict[bytes, int]]] = []
    for m in vcs:
        p: dict[int, tuple[bytes, int]] = {}
        for n, d, v in m.prepared:
            if n not in p or v > p[n][1]:
                p[n] = (d, v)
        P.append(p)
        q: dict[int, dict[bytes, int]] = {}
        for n, d, v in m.preprepared:
            qd = q.setdefault(n, {})
            if v > qd.get(d, -1):
                qd[d] = v
        Q.append(q)
    max_n = max((n for p in P for n in p), default=s0)
    chosen: list[tuple[int, bytes]] = []
    for n in range(s0 + 1, min(max_n, s0 + window) + 1):
        below = [i for i, m in enumerate(vcs) if m.stable_seqno < n]
        pick: Optional[bytes] = None
        # candidates from prepared entries, highest view first
        cand = sorted({P[i][n] for i in range(len(vcs)) if n in P[i]}, key=lambda dv: (-dv[1], dv[0]))
        for d, v in cand:
            a1 = [vcs[i].replica for i in below
                  if n not in P[i] or P[i][n][1] < v or (P[i][n][1] == v and P[i][n][0] == d)]
            if not is_quorum(a1):
                continue
            a2 = [vcs[i].replica for i in range(len(vcs)) if Q[i].get(n, {}).get(d, -1) >= v]
            if not is_weak(a2):
                continue
            pick = d
            break
        if pick is None:
            nulls = [vcs[i].replica for i in below if n not in P[i]]
            if is_quorum(nulls):
                pick = NULL_BATCH_DIGEST
        if pick is None:
            return None
        chosen.append((n, pick))
    return Decision(s0, d0, tuple(chosen))


def _starting_checkpoint(vcs: Sequence[ViewChange], quorums: Quorums) -> Optional[tuple[int, bytes]]:
    """The highest (s, d) that a weak certificate of messages holds among their checkpoints and
    that a quorum of messages have their stable checkpoint at or below."""
    cands: dict[tuple[int, bytes], list[int]] = {}
    for m in vcs:
        for c in set(m.checkpoints):
            cands.setdefault(c, []).append(m.replica)
    best: Optional[tuple[int, bytes]] = None
    for (s, d), holders in cands.items():
        if not quorums.is_weak(holders):
            continue
        if not quorums.is_quorum([m.replica for m in vcs if m.stable_seqno <= s]):
            continue
        if best is None or s > best[0]:
            best = (s, d)
    return best


VIEW_LOOKAHEAD_MAX = 1 << 20  # view-change messages further ahead than this are dropped
# base view-change timeouts a recovering replica restored in a view change waits for the others' view
RECOVERING_VIEW_WAIT = 2


@dataclass(slots=True)
class VCInfo:
    msg: ViewChange
    digest: bytes
    raw: bytes


class ViewChanges:
    """The view change's state and handlers (see the module docstring for what it owns)."""

    __slots__ = ("r", "new_view", "new_view_raw", "new_view_vc_raws", "new_view_digest", "pending", "future",
                 "unverified", "view_changes", "acks", "mine_raw", "ahead_at", "timeout_ms", "deadline",
                 "batches_wanted", "batches_answered", "rejoin_backoff_ms", "rejoin_at", "idle_rejoins")

    def __init__(self, replica: "Replica"):
        r = self.r = replica
        # the NewView that installed the current view (None in view 0), its frame, the frames of the
        # ViewChanges it names and its frame's digest (our Status reports it)
        self.new_view: Optional[NewView] = None
        self.new_view_raw: Optional[bytes] = None
        self.new_view_vc_raws: list[bytes] = []
        self.new_view_digest = b""
        self.pending: Optional[tuple[NewView, bytes]] = None  # a NewView for the view we are changing to
        # Invariant: len(self.future) <= 2
        self.future: dict[int, tuple[NewView, bytes]] = {}  # NewViews for views we have not reached
        self.unverified: Optional[tuple[NewView, bytes, bytes]] = None  # (nv, raw, digest), MAC unchecked
        # (view, sender) -> its ViewChange; at most two views per sender, none below our view
        self.view_changes: dict[tuple[int, int], VCInfo] = {}
        self.acks: dict[tuple[int, int, bytes], set[int]] = {}  # (view, sender, digest) -> who acked it
        self.mine_raw: Optional[bytes] = None  # our ViewChange for the view we are changing to
        self.ahead_at: dict[int, float] = {}  # replica -> when we took its last ViewChange beyond view + 1
        self.timeout_ms = r.cfg.view_change_timeout_ms  # doubles with every view change that fails
        self.deadline: Optional[float] = None  # the view-change timer
        self.batches_wanted: dict[bytes, float] = {}  # batch digest -> when last asked for (FetchBatch)
        self.batches_answered: dict[int, dict[bytes, float]] = {}  # peer -> batch digest -> when sent
        # idle rejoin (``idle_rejoin_tick``): the backoff between rejoins nobody's request asked for
        self.rejoin_backoff_ms = r.cfg.view_change_timeout_ms
        self.rejoin_at = 0.0
        self.idle_rejoins = 0  # metric

    def tick(self, now: float) -> None:
        """The view-change timer: the view we are changing to did not come in time, try the next
        (the timeout doubling, up to its maximum)."""
        r = self.r
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if not r.view_active:
                self.timeout_ms = min(self.timeout_ms * 2, r.cfg.view_change_timeout_max_ms)
                r._start_view_change(r.view + 1, "view-change-timer")

    def send_view_change(self, v: int) -> None:
        """``Replica._start_view_change`` moved us to view v: our ViewChange for it (our checkpoints
        and what we prepared and pre-prepared above our stable checkpoint), then whatever it
        completes (a NewView held for v, the timer, the NewView if we lead v)."""
        r = self.r
        self.new_view = None
        self.new_view_raw = None
        self.new_view_vc_raws = []
        self.deadline = None
        h = r.low_water_mark
        prepared = tuple(sorted((n, d, pv) for n, (d, pv) in r.log.prepared.items() if n > h))
        preprepared = tuple(sorted((n, d, qv) for n, q in r.log.preprepared.items() if n > h
                                   for d, qv in q.items()))
        if r.bug_drop_prepared:
            prepared, preprepared = (), ()
        ckpts = tuple(sorted((s, cd) for s, cd in r.checkpoints.committed.items() if s >= h))
        vc = ViewChange(v, r.id, h, ckpts, prepared, preprepared)
        raw = r._broadcast(vc)
        self.mine_raw = raw
        fr = r.codec.open_frame(raw)
        self.view_changes[(v, r.id)] = VCInfo(vc, fr.digest, raw)
        self.prune()
        for k in [k for k in self.future if k < v]:
            del self.future[k]
        if v in self.future:
            self.pending = self.future.pop(v)
        self.after_input()

    def primary_recovering(self) -> bool:
        """A proactive recovery begins here (``recovery_begins``, before the log reloaded from
        disk is distrusted; or ``hand_over``, before the reboot): the primary of an active
        view v leaves it at once for v + 1 (Castro's thesis, proactive recovery). Recovering, it
        would order nothing for clients until the backups' request timers ran out; instead its
        ViewChange for v + 1 (what its log prepared and pre-prepared, as a timer's would carry)
        makes the backups join at once (``on_view_change``). The recovery itself goes on in view
        v + 1, led by another. Whether we left our view."""
        r = self.r
        if not (r.view_active and r.primary() == r.id):
            return False
        r._start_view_change(r.view + 1, "primary-recovering")
        return True

    def recovery_begins(self) -> None:
        """``Replica.begin_recovery``, before the log reloaded from disk is distrusted: the primary
        of an active view hands it over (``primary_recovering``). A replica restored in a view
        change without its ViewChange (``restore_inactive``; a primary that handed its view over
        before its reboot, ``hand_over``) waits ``RECOVERING_VIEW_WAIT`` base timeouts before it
        moves on alone to the next view: recovering, it counts among the f faulty ones, the
        others complete the view change without it, and it finds the view they installed
        through their Status (the NewView certified by their digests, or the join rule), which
        after a reboot takes a while (connections, keys). Not longer: a replica restored alone in
        a higher view than the others (it had timed out alone before a power loss) sends a
        ViewChange again only when it moves on, and only then can the others follow it."""
        r = self.r
        if not self.primary_recovering() and not r.view_active and self.mine_raw is None \
                and self.deadline is not None:
            self.deadline = max(self.deadline, r.now + RECOVERING_VIEW_WAIT * r.cfg.view_change_timeout_ms)

    def hand_over(self, now: float) -> bool:
        """A driver's step (the runtime's, when its watchdog fires, before the process reboots for
        a recovery, which takes a while: exec, the state reloaded): ``primary_recovering`` at once,
        so that the backups need not wait for the new process to start. The driver then takes the
        Ready (the view record, then our ViewChange) before it reboots; the new process restores
        view v + 1, not active, and learns its NewView from the others' Status answers."""
        self.r.now = now
        return self.primary_recovering()

    def installed(self, nv: NewView, raw: bytes, vc_raws: list[bytes]) -> None:
        """``Replica._install_new_view`` installs NewView ``nv`` (frame ``raw``; ``vc_raws``: the
        frames of its ViewChanges, empty when f+1 Status messages certified it)."""
        self.pending = None
        self.unverified = None
        self.new_view_digest = self.r.codec.open_frame(raw).digest
        self.batches_wanted.clear()
        self.new_view, self.new_view_raw, self.new_view_vc_raws = nv, raw, vc_raws
        self.deadline = None
        self.mine_raw = None
        self.prune()

    # -- a restart from stable storage (``durability.restore``, on a new replica) ----------------
    def restore_new_view(self, nv: NewView, raw: bytes, vc_raws: list[bytes], digest: bytes) -> None:
        """The NewView that installed the restored active view (frame ``raw``, whose digest is
        ``digest``; ``vc_raws``: its ViewChanges' frames), handed again to replicas that missed it.
        Preconditions: the replica's view is restored, active and nv's; no NewView is held yet."""
        r = self.r
        assert r.view_active and nv.view == r.view > 0 and self.new_view is None
        self.new_view, self.new_view_raw, self.new_view_vc_raws = nv, raw, vc_raws
        self.new_view_digest = digest

    def restore_inactive(self, now: float) -> None:
        """The restored view is not active yet (we were changing to it): its view-change timer runs
        from ``now``. Precondition: the replica's view is restored, and not active."""
        assert not self.r.view_active
        self.deadline = now + self.timeout_ms

    def on_unverified_new_view(self, nv: NewView, fr: Frame) -> None:
        """A NewView whose MAC fails here (relayed after our keys changed: we restarted, or
        refreshed keys): kept, the highest such, and usable only if f+1 replicas report its
        digest (``try_certified_new_view``)."""
        r = self.r
        if nv.view >= r.view and (self.unverified is None or nv.view >= self.unverified[0].view):
            self.unverified = (nv, fr.raw, fr.digest)
            self.try_certified_new_view()

    def forget(self, j: int) -> int:
        """Replica j's view changes and acks for views above ours (stale: ``Replica._mark_stale``);
        how many."""
        view = self.r.view
        stale = 0
        for k in [k for k in self.view_changes if k[1] == j and k[0] > view]:
            del self.view_changes[k]
            stale += 1
        for ka, ackers in self.acks.items():
            if ka[0] > view and j in ackers:
                ackers.discard(j)
                stale += 1
        self.ahead_at.pop(j, None)
        return stale

    def reset_timeout(self) -> None:
        """Committed progress in an active view: the view-change timeout returns to its base."""
        self.timeout_ms = self.r.cfg.view_change_timeout_ms

    def restart(self, now: float) -> None:
        """After a crash, in a view change: the view-change timer again."""
        if not self.r.view_active:
            if self.mine_raw is None:
                self.deadline = now + self.timeout_ms  # (no ViewChange of ours for this view)
            else:
                # the view-change timer runs only once a quorum is changing to this view, as
                # before the crash: a replica alone in a view change does not escalate on restarts
                self.deadline = None
                self.after_input()

    def status_tick(self, now: float) -> None:
        """With our Status: the idle rejoin, and the batches still missing asked of everybody
        again, the longest-waiting first."""
        r = self.r
        self.idle_rejoin_tick()
        if self.batches_wanted:
            wanted = self.batches_wanted
            due = [d for d, t in wanted.items() if now - t >= r.cfg.status_interval_ms / 2][:8]
            for d in due:
                del wanted[d]
                wanted[d] = now
                r.out.append((r.others, seal(FetchBatch(d, r.id), r.keys)))

    def idle_rejoin_tick(self) -> None:
        """Idle rejoin: on an idle cluster, follow a replica left alone in a view change.

        A replica that timed out alone (it was partitioned, or slow) sits in view v' > v, not
        active, while the others carry on in v. It may never come back to v by itself: it sent
        ViewChange(v'), which a NewView for v' may be built from, so if it prepared or committed
        anything in v afterwards, that ViewChange would misreport it and break the quorum
        intersection that carries committed requests into later views. Under load the others
        join it at their next view change; on an idle cluster nothing ever times out, so it
        would stay out (and the cluster one fault closer to stalling) until the next request.

        So when this replica has been idle (``_idle``, and no client request executed) for a base
        view-change timeout, and a replica has reported for as long that it is changing to
        v' > v, and we hold its ViewChange for v', we start a view change to v' ourselves (the
        lowest such v'). That is always safe: any replica may start a view change at any time;
        safety never depends on why (it is exactly what our request timer would do). It needs no
        trust in the stuck replica for safety, and what it costs, one view change while nobody
        is waiting, is bounded against a Byzantine replica that claims to be stuck for ever: only
        an idle replica rejoins, so one replica's claims cannot make a busy cluster change view
        (the f+1 join rule still guards that), and rejoins back off, the interval doubling up to
        the view-change timeout maximum (reset after that long without one)."""
        r = self.r
        if not r.status.peer_stuck or r.now < self.rejoin_at or not r._idle():
            return
        base = r.cfg.view_change_timeout_ms
        if r.now - r.requests.last_client_exec < base:
            return
        targets = [v for j, (v, since) in r.status.peer_stuck.items()
                   if v > r.view and r.now - since >= base and (v, j) in self.view_changes]
        if not targets:
            return
        if r.now - self.rejoin_at >= r.cfg.view_change_timeout_max_ms:
            self.rejoin_backoff_ms = base
        self.idle_rejoins += 1
        self.rejoin_at = r.now + self.rejoin_backoff_ms
        self.rejoin_backoff_ms = min(2 * self.rejoin_backoff_ms, r.cfg.view_change_timeout_max_ms)
        r._start_view_change(min(targets), "idle-rejoin")

    def prune(self) -> None:
        r = self.r
        for k in [k for k in self.view_changes if k[0] < r.view]:
            del self.view_changes[k]
        for ka in [ka for ka in self.acks if ka[0] < r.view]:
            del self.acks[ka]

    def _valid(self, vc: ViewChange) -> bool:
        r = self.r
        lo, hi = vc.stable_seqno, vc.stable_seqno + r.log_window
        if not all(lo < n <= hi and v < vc.view for n, _, v in vc.prepared):
            return False
        if not all(lo < n <= hi and v < vc.view for n, _, v in vc.preprepared):
            return False
        if len({n for n, _, _ in vc.prepared}) != len(vc.prepared):
            return False
        # (the sender may not hold its stable checkpoint yet: it can be fetching it)
        return all(lo <= s <= hi for s, _ in vc.checkpoints)

    def _ignore_view_change(self, vc: ViewChange, fr: Frame) -> Optional[Drop]:
        r = self.r
        if vc.view < r.view:
            return Drop.VIEW_CHANGE_OLD
        if vc.view == r.view and r.view_active:
            # (a sender that is behind learns the new view from our answer to its Status;
            # answering here could echo relayed view changes between replicas forever)
            return Drop.VIEW_CHANGE_FOR_ACTIVE_VIEW
        if vc.view > r.view + VIEW_LOOKAHEAD_MAX:
            return Drop.VIEW_CHANGE_TOO_FAR
        if not self._valid(vc):
            return Drop.VIEW_CHANGE_INVALID
        old = self.view_changes.get((vc.view, vc.replica))
        if old is not None:
            return Drop.VIEW_CHANGE_CONFLICT if old.digest != fr.digest else Drop.VIEW_CHANGE_DUPLICATE
        if vc.view > r.view + 1:
            # a correct replica moves to a higher view at most once per view-change timeout (they
            # double), so a new view change more than one view ahead of ours comes from each sender
            # at most about that often; a replica sending them faster (each would cost us an ack
            # to everybody, and them the handling of it) floods: the extra ones are dropped, and
            # the sender's latest is resent with its Status anyway
            last = self.ahead_at.get(vc.replica)
            if last is not None and r.now - last < r.cfg.view_change_timeout_ms / 2:
                return Drop.VIEW_CHANGE_RATE_LIMITED
        return None

    def on_view_change(self, vc: ViewChange, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_view_change(vc, fr)) is not None:
            return r._drop(why)
        assert vc.view >= r.view and (vc.view, vc.replica) not in self.view_changes
        key = (vc.view, vc.replica)
        if vc.view > r.view + 1:
            self.ahead_at[vc.replica] = r.now
        # keep at most two pending views per sender (bounded memory)
        mine = sorted(k for k in self.view_changes if k[1] == vc.replica)
        while len(mine) >= 2:
            del self.view_changes[mine.pop(0)]
        self.view_changes[key] = VCInfo(vc, fr.digest, fr.raw)
        ack = ViewChangeAck(vc.view, r.id, vc.replica, fr.digest)
        self.acks.setdefault((vc.view, vc.replica, fr.digest), set()).add(r.id)
        r._broadcast(ack)
        # join rule: a weak certificate of replicas is already in higher views; or the primary of
        # our active view v abandons it (``primary_recovering``): its ViewChange for v + 1, and
        # only for v + 1, is enough (a primary can stall its own view anyway: this costs nothing
        # but the view change the backups' timers would start)
        if vc.view > r.view:
            if r.view_active and vc.view == r.view + 1 and vc.replica == r.primary():
                r._start_view_change(vc.view, "primary-left")
                return
            higher: dict[int, int] = {}
            for (v, j) in self.view_changes:
                if v > r.view and j != r.id:
                    higher[j] = min(v, higher.get(j, v))
            target = r.quorums.join_view(higher, r.view)
            if target is not None:
                r._start_view_change(target, "join")
                return
        self.after_input()

    def _ignore_view_change_ack(self, a: ViewChangeAck) -> Optional[Drop]:
        r = self.r
        if a.view < r.view or a.view > r.view + VIEW_LOOKAHEAD_MAX:
            return Drop.VIEW_CHANGE_ACK_OUT_OF_RANGE
        if a.vc_replica == a.replica:
            return Drop.VIEW_CHANGE_ACK_SELF
        if a.replica in self.acks.get((a.view, a.vc_replica, a.vc_digest), ()):
            return Drop.VIEW_CHANGE_ACK_DUPLICATE
        return None

    def on_view_change_ack(self, a: ViewChangeAck, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_view_change_ack(a)) is not None:
            return r._drop(why)
        assert a.view >= r.view and a.vc_replica != a.replica
        self.acks.setdefault((a.view, a.vc_replica, a.vc_digest), set()).add(a.replica)
        bound = 4 * r.cfg.n * r.cfg.n
        if len(self.acks) > bound:
            self.prune()
            if len(self.acks) > bound:
                # acks for view changes we do not hold (forged digests, far views): a flooder's,
                # or ones whose ViewChange has not arrived (then the acker resends them to the new
                # primary in answer to its Status)
                vcs = self.view_changes
                for k in [k for k in self.acks
                          if (info := vcs.get(k[:2])) is None or info.digest != k[2]][:len(self.acks) - bound]:
                    del self.acks[k]
                    r._drop(Drop.VIEW_CHANGE_ACK_UNMATCHED_DROPPED)
        # only an ack of a ViewChange we hold, for the view we are changing to and lead, can
        # complete anything (``try_new_view``): others must not re-run the decision (a flood
        # of acks would make us run it once per ack)
        info = self.view_changes.get((a.view, a.vc_replica))
        if a.view == r.view and info is not None and info.digest == a.vc_digest:
            self.after_input()

    def _vouched(self, v: int) -> list[VCInfo]:
        """ViewChanges for view v that a quorum vouches for (sender, new primary, ackers)."""
        r = self.r
        primary = r.primary(v)
        out = []
        for (vv, j), info in self.view_changes.items():
            if vv != v:
                continue
            vouchers = set(self.acks.get((v, j, info.digest), ())) | {j, primary}
            if j == r.id or r.quorums.is_quorum(vouchers):
                out.append(info)
        return out

    def after_input(self) -> None:
        r = self.r
        if r.view_active:
            return
        v = r.view
        # start the view-change timer once a quorum is changing to v
        if self.deadline is None:
            senders = [j for (vv, j) in self.view_changes if vv == v]
            if r.quorums.is_quorum(senders):
                self.deadline = r.now + self.timeout_ms
        if r.primary(v) == r.id:
            self.try_new_view()
        elif self.pending is not None:
            self.try_accept_new_view()

    def _decide(self, infos: list[VCInfo]) -> Optional[Decision]:
        r = self.r
        return decide([i.msg for i in sorted(infos, key=lambda i: i.msg.replica)],
                      r.quorums, r.log_window)

    def try_new_view(self) -> None:
        r = self.r
        infos = self._vouched(r.view)
        if not r.quorums.is_quorum([i.msg.replica for i in infos]):
            return
        dec = self._decide(infos)
        if dec is None:
            return
        missing = self._missing_batches(dec.chosen)
        if missing:
            self.want_batches(missing)
            return  # wait for a BatchData from any replica that has them
        # the NewView carries batch bodies up to a byte budget, lowest sequence numbers first, so
        # that it stays well within the message size whatever the load; a backup lacking one of
        # the others fetches it by digest (FetchBatch / BatchData) before installing the view
        batches: list[Batch] = []
        budget = r.cfg.new_view_batch_bytes_max
        given = set()
        for n, d in dec.chosen:
            if d == NULL_BATCH_DIGEST or n <= r.low_water_mark or d in given:
                continue
            full = r.log.batch_for(d)
            assert full is not None  # (_missing_batches found none missing)
            b = r.requests.compact(full)  # (large requests by digest: the backups have them)
            size = batch_wire_bytes(b)
            if size <= budget:
                budget -= size
                given.add(d)
                batches.append(b)
        infos.sort(key=lambda i: i.msg.replica)
        nv = NewView(r.view, r.id, tuple((i.msg.replica, i.digest) for i in infos),
                     dec.checkpoint_seqno, dec.checkpoint_digest, dec.chosen, tuple(batches))
        raw = r._broadcast(nv)
        for i in infos:
            if i.msg.replica != r.id:
                r.out.append((r.others, i.raw))
        r._install_new_view(nv, raw, [i.raw for i in infos], dec)

    def _missing_batches(self, chosen: Iterable[tuple[int, bytes]]) -> list[bytes]:
        """Digests of the non-null batches of ``chosen`` above our low water mark that we lack
        (those at or below it are never installed: their slots are discarded)."""
        r = self.r
        out = []
        for n, d in chosen:
            if n > r.low_water_mark and d != NULL_BATCH_DIGEST and r.log.batch_for(d) is None and d not in out:
                out.append(d)
        return out

    def want_batches(self, digests: list[bytes], ask: Optional[int] = None) -> None:
        """Ask for batches by digest: of replica ``ask`` (the primary of a NewView that needs them:
        it holds them all), else of every other replica; the status tick asks everybody again for
        those still missing."""
        r = self.r
        new = [d for d in digests if d not in self.batches_wanted]
        for d in new:
            self.batches_wanted[d] = r.now
        dests = (ask,) if ask is not None and ask != r.id else r.others
        for d in new:
            r.out.append((dests, seal(FetchBatch(d, r.id), r.keys)))

    def _ignore_fetch_batch(self, m: FetchBatch) -> Optional[Drop]:
        r = self.r
        if m.digest not in r.log.batches:
            return Drop.FETCH_BATCH_UNKNOWN
        last = self.batches_answered.get(m.replica, {}).get(m.digest)
        if last is not None and r.now - last < r.cfg.status_interval_ms / 2:
            return Drop.FETCH_BATCH_RATE_LIMITED
        return None

    def on_fetch_batch(self, m: FetchBatch, fr: Frame) -> None:
        """Answer with a batch we hold (any batch in our log). Each peer gets a given batch at most
        once per half status interval: a replica asking again and again cannot turn this one into
        an amplifier; what it can get per interval is bounded by our log (as for Status)."""
        r = self.r
        if (why := self._ignore_fetch_batch(m)) is not None:
            return r._drop(why)
        b = r.log.batches[m.digest]
        sent = self.batches_answered.setdefault(m.replica, {})
        if len(sent) >= 2 * r.log_window:  # bounded: forget answers older than the interval
            for k in [k for k, t in sent.items() if r.now - t >= r.cfg.status_interval_ms / 2]:
                del sent[k]
            if len(sent) >= 2 * r.log_window:
                r._drop(Drop.FETCH_BATCH_RATE_LIMITED)
                return
        sent[m.digest] = r.now
        r._send_to(m.replica, seal(BatchData(m.digest, r.id, b[0]), r.keys, to=m.replica))

    def _ignore_batch_data(self, m: BatchData) -> Optional[Drop]:
        r = self.r
        if m.digest not in self.batches_wanted:
            return Drop.BATCH_DATA_UNREQUESTED
        try:
            ok = r.codec.batch_digest(m.batch) == m.digest
        except DecodeError:
            ok = False
        return None if ok else Drop.BATCH_DATA_DIGEST_MISMATCH

    def on_batch_data(self, m: BatchData, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_batch_data(m)) is not None:
            return r._drop(why)
        assert m.digest in self.batches_wanted
        batch = r.requests.resolve(m.batch)  # (a correct replica sends every body: it keeps them)
        if batch is None:
            return r._drop(Drop.BATCH_DATA_INCOMPLETE)
        del self.batches_wanted[m.digest]
        r.log.remember_batch(m.digest, batch, r.low_water_mark + r.log_window)
        if r.view_active:
            r.log.batch_arrived(m.digest)  # a pre-prepare may have been waiting for its bodies
        # a NewView (to build, or to accept) may have been waiting for this batch
        if not r.view_active and r.primary() == r.id:
            self.try_new_view()
        elif not r.view_active and self.pending is not None:
            self.try_accept_new_view()
        self.try_certified_new_view()

    def _ignore_new_view(self, nv: NewView) -> Optional[Drop]:
        r = self.r
        if nv.view < r.view or (nv.view == r.view and r.view_active):
            return Drop.NEW_VIEW_OLD
        if nv.replica != r.primary(nv.view):
            return Drop.NEW_VIEW_NOT_FROM_PRIMARY
        return None

    def on_new_view(self, nv: NewView, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_new_view(nv)) is not None:
            return r._drop(why)
        assert nv.view >= r.view and nv.replica == r.primary(nv.view)
        if nv.view > r.view:
            # one replica's word cannot move us to a higher view (S-25): keep it until we get
            # there ourselves (timeouts, or the join rule on view changes from f+1 replicas)
            self.future[nv.view] = (nv, fr.raw)
            while len(self.future) > 2:
                del self.future[min(self.future)]
            r._drop(Drop.NEW_VIEW_FOR_FUTURE_VIEW)
            return
        self.pending = (nv, fr.raw)
        self.try_accept_new_view()

    def try_accept_new_view(self) -> None:
        r = self.r
        if self.pending is None:
            return
        nv, raw = self.pending
        if nv.view != r.view or r.view_active:
            self.pending = None
            return
        infos = []
        for j, d in nv.view_changes:
            info = self.view_changes.get((nv.view, j))
            if info is None or info.digest != d:
                return  # wait for the view-change message (relayed by the primary or resent)
            infos.append(info)
        if len({j for j, _ in nv.view_changes}) != len(nv.view_changes) or \
                not r.quorums.is_quorum([j for j, _ in nv.view_changes]):
            self._reject_new_view(Drop.NEW_VIEW_TOO_FEW_VIEW_CHANGES)
            return
        dec = self._decide(infos)
        if dec is None or (dec.checkpoint_seqno, dec.checkpoint_digest, dec.chosen) != \
                (nv.checkpoint_seqno, nv.checkpoint_digest, nv.chosen):
            self._reject_new_view(Drop.NEW_VIEW_WRONG_DECISION)
            return
        problem = self._take_new_view_batches(nv)
        if problem:
            self._reject_new_view(problem)
            return
        if nv.batches:  # taken: not hashed again when it is tried again (as batches arrive)
            nv = replace(nv, batches=())
            self.pending = (nv, raw)
        if self._wait_for_new_view_batches(nv):
            return
        r._install_new_view(nv, raw, [i.raw for i in infos], dec)

    def _take_new_view_batches(self, nv: NewView) -> Optional[Drop]:
        """Remember the batches a NewView carries for its chosen digests (each checked against its
        digest); what is wrong, or None. A NewView need not carry every chosen batch: see
        ``_wait_for_new_view_batches``."""
        r = self.r
        given = {}
        for b in nv.batches:
            try:
                d = r.codec.batch_digest(b)
            except DecodeError:
                return Drop.NEW_VIEW_BAD_BATCH
            full = r.requests.resolve(b)  # (a batch without its bodies counts as not carried)
            if full is not None:
                given[d] = full
        for n, d in nv.chosen:
            if d in given:
                r.log.remember_batch(d, given[d], n)
        return None

    def _wait_for_new_view_batches(self, nv: NewView) -> bool:
        """Whether the NewView must wait for chosen batches we lack (then they are asked for, of its
        primary first; ``on_batch_data`` tries the NewView again as they arrive, each checked
        against its digest). The view-change timer still runs meanwhile: batches that never come
        lead to the next view, as a NewView that never came would."""
        r = self.r
        missing = self._missing_batches(nv.chosen)
        if not missing:
            return False
        if any(d not in self.batches_wanted for d in missing):
            r._count(Count.NEW_VIEW_WAITING_FOR_BATCHES)  # (counted: how often a NewView waits)
        self.want_batches(missing, ask=nv.replica)
        return True

    def _reject_new_view(self, reason: Drop) -> None:
        r = self.r
        r._drop(reason)
        self.pending = None
        r._start_view_change(r.view + 1, reason)

    def try_certified_new_view(self) -> None:
        """Install a NewView vouched for by f+1 replicas' Status digests, without its view changes.

        A replica that restarted (or whose keys changed) cannot check the MACs of view-change
        messages sent before; but f+1 replicas reporting that the NewView with this digest
        installed their view include a correct one, which checked it."""
        if self.unverified is None and self.pending is None and not self.future:
            return
        r = self.r
        cands = []
        if self.unverified is not None:
            cands.append(self.unverified)
        if self.pending is not None:
            nv, raw = self.pending
            cands.append((nv, raw, r.codec.open_frame(raw).digest))
        for nv, raw in self.future.values():
            cands.append((nv, raw, r.codec.open_frame(raw).digest))
        for nv, raw, d in sorted(cands, key=lambda c: -c[0].view):
            if nv.view < r.view or (nv.view == r.view and r.view_active):
                continue
            if nv.replica != r.primary(nv.view):
                continue
            if not r.quorums.is_weak(r.status.reporting_new_view(nv.view, d)):
                continue
            if self._take_new_view_batches(nv):
                continue
            if self._wait_for_new_view_batches(nv):
                return  # (tried again as the batches arrive)
            if nv.view > r.view:
                r._start_view_change(nv.view, "certified-new-view")
                if r.view_active or r.view != nv.view:
                    return  # (installed through the ordinary path meanwhile)
            self.unverified = None
            r._count(Count.NEW_VIEW_CERTIFIED_BY_STATUS)  # (counted: how often this path is used)
            r._install_new_view(nv, raw, [], Decision(nv.checkpoint_seqno, nv.checkpoint_digest, nv.chosen))
            return
