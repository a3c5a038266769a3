"""Status messages: what each replica tells the others about where it is, and the repair of what
a peer lacks (its answer).

Owns: when our next Status goes (``deadline``), what each peer last reported (its view, its
stable checkpoint, the digest of the NewView that installed its view, whether it claims to be
changing to a view above ours and since when), and when we last answered each peer.

May not touch: anything else. It reads the replica's log, checkpoints and view-change messages to
answer a peer (resending our own messages, sealed again, and relaying others' as they came), and
reports what it learnt to ``Replica.on_status``, the cross-area step (join rule, stable
checkpoints, NewViews certified by Status).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..codec import seal
from ..messages import Checkpoint, Commit, PrePrepare, Prepare, Status, ViewChangeAck
from . import membership
from .drops import Drop

if TYPE_CHECKING:
    from .replica import Replica


class StatusExchange:
    __slots__ = ("r", "deadline", "answered", "peer_views", "peer_stable", "peer_nv", "peer_stuck")

    def __init__(self, replica: "Replica", now: float):
        r = replica
        self.r = r
        self.deadline = now + r.cfg.status_interval_ms * (1 + r.id / (4 * r.cfg.n))
        self.answered: dict[int, float] = {}  # peer -> when we last answered its Status
        self.peer_views: dict[int, int] = {}  # replica -> view in its latest Status
        self.peer_stable: dict[int, int] = {}  # replica -> highest stable checkpoint it reported
        self.peer_nv: dict[int, tuple[int, bytes]] = {}  # replica -> (active view, its NewView digest)
        # idle rejoin (``ViewChanges.idle_rejoin_tick``): replicas whose Status says they are changing
        # to a view above ours, with since when
        self.peer_stuck: dict[int, tuple[int, float]] = {}

    def due(self, now: float) -> bool:
        """Whether our Status is due (then the next one is scheduled an interval later)."""
        if now < self.deadline:
            return False
        self.deadline = now + self.r.cfg.status_interval_ms
        return True

    def restart(self, now: float) -> None:
        self.deadline = now + self.r.cfg.status_interval_ms / 4

    def send(self) -> None:
        r = self.r
        # report the point up to which this view's agreement is complete here: a sequence number
        # executed in an earlier view but not yet committed in this one still needs our peers'
        # prepares and commits (and they need ours)
        upto = r.log.last_committed_exec
        for n in sorted(r.log.slots):
            if n > upto:
                break
            sl = r.log.slots[n]
            if sl.view == r.view and not sl.committed:
                upto = max(n - 1, r.low_water_mark)
                break
        r._broadcast(Status(r.view, r.view_active, r.low_water_mark, upto, r.id,
                            r.vc.new_view_digest if r.view_active else b""))

    # ---- what a peer reports ------------------------------------------------------------------
    def learn_view(self, s: Status) -> None:
        self.peer_views[s.replica] = s.view

    def learn_stable(self, s: Status) -> bool:
        """Record the peer's stable checkpoint; whether it is higher than it said before."""
        if s.stable_seqno > self.peer_stable.get(s.replica, 0):
            self.peer_stable[s.replica] = s.stable_seqno
            return True
        return False

    def learn_new_view(self, s: Status) -> bool:
        """Record the digest of the NewView that installed the peer's view; whether it changed (only
        then is it worth hashing NewView frames again: a flood of Status must not make us)."""
        if s.view_active and s.nv_digest and self.peer_nv.get(s.replica) != (s.view, s.nv_digest):
            self.peer_nv[s.replica] = (s.view, s.nv_digest)
            return True
        return False

    def learn_stuck(self, s: Status) -> None:
        r = self.r
        if s.view > r.view and not s.view_active:
            cur = self.peer_stuck.get(s.replica)
            if cur is None or cur[0] != s.view:
                self.peer_stuck[s.replica] = (s.view, r.now)
        else:
            self.peer_stuck.pop(s.replica, None)

    def forget(self, j: int) -> None:
        """What replica j's Status messages claimed (stale: ``Replica._mark_stale``)."""
        for peer in (self.peer_views, self.peer_stable, self.peer_nv, self.peer_stuck):
            peer.pop(j, None)

    def stable_at(self, n: int) -> list[int]:
        """The replicas that reported a stable checkpoint at or above n."""
        return [j for j, st in self.peer_stable.items() if st >= n]

    def reporting_new_view(self, view: int, digest: bytes) -> list[int]:
        """The replicas that reported view ``view`` installed by the NewView with ``digest``."""
        return [j for j, x in self.peer_nv.items() if x == (view, digest)]

    # ---- the answer ---------------------------------------------------------------------------
    def answer(self, s: Status) -> None:
        """Send the peer what its Status shows it lacks. Rate-limited per peer: a flood of Status
        messages must not turn this replica into an amplifier."""
        r, j = self.r, s.replica
        last = self.answered.get(j)
        if last is not None and r.now - last < r.cfg.status_interval_ms / 2:
            r._drop(Drop.STATUS_RATE_LIMITED)
            return
        self.answered[j] = r.now
        # a peer still in an earlier membership cannot join our views: it catches up by our
        # checkpoints (``core.membership``)
        earlier = membership.view_limit(s.view) <= r.view
        if not earlier and (s.view < r.view or (s.view == r.view and not s.view_active)):
            self._send_view_change_state(j)
            if s.view < r.view:
                return
        # our checkpoint votes above the peer's stable one (the stable one that lets it move on,
        # and votes it may have lost: after a restart they are what makes the next one stable)
        for n in sorted(k for k in r.checkpoints.committed if k > s.stable_seqno):
            r._send_to(j, seal(Checkpoint(n, r.checkpoints.committed[n], r.id), r.keys))
        if s.view != r.view or not r.view_active or not s.view_active:
            return
        self._resend_log(j, s.last_executed)

    def _send_view_change_state(self, j: int) -> None:
        """A peer behind us in views: the NewView of our view (with its ViewChanges), or our
        ViewChange (and to the new primary our acks). Our own messages are sealed again with the
        current keys (the peer may have restarted or refreshed its keys since); others' are
        relayed as they came."""
        r = self.r
        if r.view_active and r.vc.new_view_raw is not None and r.vc.new_view is not None:
            r._send_to(j, seal(r.vc.new_view, r.keys) if r.vc.new_view.replica == r.id else r.vc.new_view_raw)
            for raw in r.vc.new_view_vc_raws:
                r._send_to(j, raw)
        elif not r.view_active and r.vc.mine_raw is not None:
            mine = r.vc.view_changes.get((r.view, r.id))
            r._send_to(j, seal(mine.msg, r.keys) if mine is not None else r.vc.mine_raw)
            if j == r.primary():
                for (v, k, d), ackers in r.vc.acks.items():
                    if v == r.view and r.id in ackers:
                        r._send_to(j, seal(ViewChangeAck(v, r.id, k, d), r.keys))

    def _resend_log(self, j: int, last_executed: int) -> None:
        """The peer is in our view: our pre-prepares (or the NewView), prepares and commits above
        what it executed. Bounded by sequence numbers and by bytes (about one message's worth of
        batches per answer: the peer's next Status continues from where it then is), the NewView
        at most once."""
        r = self.r
        budget = r.cfg.status_resend_seqnos_max
        bytes_left = r.cfg.message_size_bytes_max
        nv_sent = False
        start = max(last_executed, r.low_water_mark) + 1
        top = max(r.log.slots, default=0)
        for n in range(start, top + 1):
            if budget <= 0 or bytes_left <= 0:
                break
            slot = r.log.slots.get(n)
            if slot is None or slot.view != r.view or slot.digest is None:
                continue
            budget -= 1
            if (r.is_primary and slot.batch is not None) or slot.pp_raw is not None:
                # the primary seals its pre-prepare again (with the current keys; a slot restored
                # from disk has no frame: without this a primary that restarted could not give a
                # backup the pre-prepares it missed, and the NewView it sends instead is old news
                # to a backup already in the view); a backup relays the primary's frame
                if r.is_primary and slot.batch is not None:
                    pp = seal(PrePrepare(r.view, n, slot.digest, r.id, r.requests.compact(slot.batch)), r.keys)
                else:
                    assert slot.pp_raw is not None
                    pp = slot.pp_raw
                r._send_to(j, pp)
                bytes_left -= len(pp)
            elif r.vc.new_view_raw is not None and not nv_sent:
                nv_sent = True
                r._send_to(j, r.vc.new_view_raw)
                bytes_left -= len(r.vc.new_view_raw)
            if r.id in slot.prepares:
                r._send_to(j, seal(Prepare(r.view, n, slot.digest, r.id), r.keys))
            if r.id in slot.commits:
                r._send_to(j, seal(Commit(r.view, n, slot.digest, r.id), r.keys))
