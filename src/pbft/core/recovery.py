"""Proactive recovery (BFT-PR, Castro's thesis ch. 4), the core's part.

The driver reboots the replica (a fresh process, a clean copy of the code, the state
reloaded from disk, new session keys sent with NewKey so that every key a client or
attacker knew is dropped) and then calls :meth:`Replica.begin_recovery`.  From there:

1. **Distrust.**  The log reloaded from disk is dropped (an attacker may have written
   it); the objects are kept but treated as unverified (``needs_state``): nothing is
   executed until a state transfer to a certified checkpoint has checked every object
   against the partition tree, fetching those that differ (corrupt or stale).
2. **Estimation** (QueryStable / ReplyStable).  Each replica j answers with its last
   stable checkpoint c_j and the highest sequence number it prepared p_j; keeping the
   lowest c and highest p per replica, the recovering replica picks L_M, the largest
   c_j such that replicas other than j of weight 2f reported c <= L_M and replicas
   other than j of weight f reported p >= L_M; its estimate is H_M = L_M + L.  It
   takes no part in agreement for sequence numbers up to H_M (it no longer knows what
   it said about them before the reboot).
3. **Recovery request**, ordered like any request (so every replica agrees on when
   the recovery happened).  Its timestamp is the recovering replica's clock (µs), and
   replicas take a replica's request only within ``nondet_skew_ms_max`` of their own clocks
   (``Requests._timestamp_limit``), so a request an intruder had ordered with j's keys
   before the reboot is at most that far ahead of the clocks. Replicas answer a replica's
   request older than its last executed one with that one's cached reply; once f+1 have,
   j timestamps its request again from its clock (``_on_newer_reply``), until it is newer
   than the intruder's (what the thesis' co-processor counter achieves).  When a replica
   executes replica j's recovery request at sequence number n_R, it records j's recovery
   point H = max(H_M, floor(n_R/K)*K + L) (the high water mark when the request executed:
   nothing j may have said before it is for a later sequence number), marks the messages
   it holds from j as stale (``Replica._mark_stale``: j's votes from before the recovery,
   maybe forged with its old keys, complete no certificate), and asks its driver to
   refresh its own session keys (``Ready.refresh_keys``); the reply tells j the point.
4. **Null requests.**  While a recovery point is not yet covered by a stable
   checkpoint and there is nothing else to order, the primary orders null batches, so
   the checkpoint after H arrives even on an idle system.
5. **End.**  The recovering replica is recovered once its state has been checked
   (a transfer completed) and it holds a stable checkpoint at or after H.

A recovering replica must be counted among the f faulty ones until it has recovered
(docs/recovery.md: the window of vulnerability).

``ProactiveRecovery`` owns: our recovery under way (``run``), the recovery points learnt by
executing other replicas' recovery requests (``points``), the admission of those requests and the
QueryStable answer budget, and the recovery counters. It may not touch the log, the state or the
checkpoints: step 1 (distrust) is ``Replica.begin_recovery``, the cross-area step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import msgpack

from ..codec import Frame, result_digest, seal
from ..messages import ALL_REPLICAS, RECOVERY_OP, QueryStable, ReplyStable, Reply, Request
from . import membership
from .quorum import Certificate
from .drops import Drop
from .events import (
    Recovered, RecoveryEstimated, RecoveryPointLearned, RecoveryRequestExecuted, RecoveryStarted,
)

if TYPE_CHECKING:
    from .replica import Replica


@dataclass
class RecoveryRun:
    nonce: int  # the QueryStable nonce and the store's marker: grows across reboots (wall clock)
    started: float
    phase: str = "estimate"  # estimate -> request -> check
    reports: dict[int, tuple[int, int]] = field(default_factory=dict)  # j -> (lowest c, highest p)
    estimate: Optional[int] = None
    request_raw: Optional[bytes] = None
    ts: int = 0  # the recovery request's timestamp (our clock in µs when we made it)
    newer: set[int] = field(default_factory=set)  # replicas that executed a newer one of ours
    final: Optional[Certificate[bytes]] = None  # final replies' results to the recovery request
    any: Optional[Certificate[bytes]] = None  # all replies' results (final or tentative)
    request_seqno: Optional[int] = None
    point: Optional[int] = None
    next_send: float = 0.0


class ProactiveRecovery:
    """The component (see the module docstring for what it owns)."""

    __slots__ = ("r", "run", "points", "recoveries", "last_recovery_ms", "stable_answered", "admitted",
                 "stale_marked")

    def __init__(self, replica: "Replica"):
        self.r = replica
        self.run: Optional[RecoveryRun] = None  # our recovery under way (None: not recovering)
        self.points: dict[int, int] = {}  # replica -> recovery point H (learned by executing)
        self.recoveries = 0
        self.last_recovery_ms: Optional[float] = None
        self.stable_answered: dict[int, float] = {}  # replica -> when we last answered its QueryStable
        self.admitted: dict[int, tuple[int, float]] = {}  # replica -> (timestamp, when admitted)
        self.stale_marked: dict[int, int] = {}  # replica -> timestamp of the recovery request we marked for

    # ------------------------------------------------------------------
    # at the recovering replica
    # ------------------------------------------------------------------
    def start(self, nonce: int) -> None:
        """Our recovery begins (``Replica.begin_recovery`` distrusted the log first)."""
        r = self.r
        self.run = RecoveryRun(nonce=nonce, started=r.now)
        r.disk.recovery(nonce)
        r._emit(RecoveryStarted(nonce))
        self._send()

    def _send(self) -> None:
        r = self.r
        rec = self.run
        assert rec is not None  # called while a recovery is under way
        rec.next_send = r.now + r.cfg.status_interval_ms * 2
        if rec.phase == "estimate":
            r._broadcast(QueryStable(r.id, rec.nonce))
        elif rec.phase == "request" and rec.request_raw is not None:
            r.out.append((r.others, rec.request_raw))

    def _make_request(self) -> None:
        """(Re)make our recovery request, timestamped with our clock in µs (and above the last)."""
        r = self.r
        rec = self.run
        assert rec is not None and rec.estimate is not None
        rec.ts = max(rec.ts + 1, int((r.now + r.wall_offset_ms) * 1000.0), 1)
        rec.newer = set()
        rec.final = rec.any = None  # (replies to an older timestamp are no longer wanted)
        req = Request(r.id, rec.ts, RECOVERY_OP + msgpack.packb(rec.estimate), False, ALL_REPLICAS)
        rec.request_raw = seal(req, r.keys)

    def tick(self) -> None:
        r = self.r
        rec = self.run
        if rec is not None and rec.phase != "check" and r.now >= rec.next_send:
            self._send()

    def _ignore_reply_stable(self, m: ReplyStable) -> Optional[Drop]:
        rec = self.run
        if rec is None or rec.phase != "estimate" or m.nonce != rec.nonce:
            return Drop.REPLY_STABLE_UNEXPECTED
        return None

    def on_reply_stable(self, m: ReplyStable, fr: Optional[Frame] = None) -> None:
        r = self.r
        if (why := self._ignore_reply_stable(m)) is not None:
            return r._drop(why)
        rec = self.run
        assert rec is not None and rec.phase == "estimate"
        old = rec.reports.get(m.replica)
        rec.reports[m.replica] = (m.checkpoint, m.prepared) if old is None else \
            (min(old[0], m.checkpoint), max(old[1], m.prepared))
        H_M = self._estimate(rec.reports)
        if H_M is None:
            return
        rec.estimate = H_M
        rec.phase = "request"
        self._make_request()
        r._emit(RecoveryEstimated(H_M))
        self._send()

    def _estimate(self, reports: dict[int, tuple[int, int]]) -> Optional[int]:
        r = self.r
        q = r.quorums
        best = None
        for j, (cj, _) in reports.items():
            # replicas other than j of weight 2f (with unit weights) report c <= cj, of weight f p >= cj
            if q.is_quorum_but_one([k for k, (ck, _) in reports.items() if k != j and ck <= cj]) and \
                    q.is_weak_but_one([k for k, (_, pk) in reports.items() if k != j and pk >= cj]) and \
                    (best is None or cj > best):
                best = cj
        return None if best is None else best + r.log_window

    def _ignore_recovery_reply(self, m: Reply) -> Optional[Drop]:
        r = self.r
        rec = self.run
        if rec is None or rec.phase != "request" or m.client != r.id or m.timestamp != rec.ts \
                or m.result is None or result_digest(m.result) != m.result_digest:
            return Drop.REPLY_UNEXPECTED
        return None

    def on_recovery_reply(self, m: Reply, fr: Optional[Frame] = None) -> None:
        r = self.r
        rec = self.run
        if rec is not None and rec.phase == "request" and m.client == r.id and m.timestamp > rec.ts:
            return self._on_newer_reply(m)
        if (why := self._ignore_recovery_reply(m)) is not None:
            return r._drop(why)
        rec = self.run
        assert rec is not None and rec.phase == "request" and m.result is not None
        # the result is certified by a weak certificate of final replies or a quorum of any replies
        if rec.final is None or rec.any is None:
            rec.final = Certificate(r.quorums, r.quorums.weak)
            rec.any = Certificate(r.quorums, r.quorums.quorum)
        if m.tentative:
            rec.final.discard(m.replica)
            certified = None
        else:
            certified = rec.final.add(m.replica, m.result)
        certified = rec.any.add(m.replica, m.result) or certified
        if certified is None:
            return
        try:
            tag, n_R, H = msgpack.unpackb(certified, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            return  # f+1 replicas cannot all be faulty: unreachable
        rec.request_seqno, rec.point, rec.phase = int(n_R), int(H), "check"
        r._emit(RecoveryPointLearned(rec.request_seqno, rec.point))
        self.check_done()

    def _on_newer_reply(self, m: Reply) -> None:
        """A replica answered our recovery request with the cached reply of a newer one of ours it
        executed: one an intruder had ordered under our keys before the reboot, timestamped ahead of
        our clock (at most ``nondet_skew_ms_max`` ahead of the replicas' clocks then), so that ours
        looks old. Once replicas of weak-certificate weight say so (a correct one among them: a
        faulty one alone cannot make us churn), we timestamp our request again from our clock
        (above the last), and send it; this repeats until our clock has passed the intruder's
        timestamp, a delay of about two clock skews at most. No timer renews it: a request that
        goes unanswered otherwise is only retransmitted, never superseded (which would restart the
        backups' request timers on it)."""
        r = self.r
        rec = self.run
        assert rec is not None and rec.phase == "request"
        rec.newer.add(m.replica)
        if not r.quorums.is_weak(rec.newer):
            return
        self._make_request()
        self._send()

    def check_done(self) -> None:
        """Recovered: the state was checked against a certified checkpoint, and a stable
        checkpoint covers the recovery point."""
        r = self.r
        rec = self.run
        if rec is None or rec.phase != "check" or rec.point is None or r.needs_state or r.low_water_mark < rec.point:
            return
        self.run = None
        self.recoveries += 1
        self.last_recovery_ms = r.now - rec.started
        r.disk.recovery(None)
        r._emit(Recovered(rec.point, self.last_recovery_ms))
        membership.after_stable(r, r.low_water_mark)  # (a switch point that became stable meanwhile)

    def ignores(self, n: int) -> bool:
        rec = self.run
        return rec is not None and (rec.estimate is None or n <= rec.estimate)

    # ------------------------------------------------------------------
    # at every replica
    # ------------------------------------------------------------------
    def admit(self, req: Request) -> Optional[Drop]:
        """Whether to take replica j's recovery request in (vouch for it, order it), or why not.

        A replica's new recovery request is admitted here at most once per half base view-change
        timeout; its retransmissions (same timestamp) always are. A Byzantine replica flooding
        recovery requests then gets at most one per interval per correct replica certified (f+1
        vouches include a correct replica's), a correct primary orders at most one per interval,
        and every correct replica refreshes its keys (in the runtime) at most once per few
        seconds whatever gets ordered. This is a local decision, like any decision to vouch: what
        is executed stays deterministic (an ordered recovery request executes at every replica
        alike, and its effects are bounded: the recovery point is at most n + 2L, see
        ``execute``). Replicas admit at slightly different moments, so a
        backup may hold a newer request of j than the one the primary orders: when one of j's
        recovery requests executes, any other of j's waiting here is folded into it (``Replica._committed``),
        so that it never runs our request timer out (half a timeout: the primary admits a new
        one before a backup's could time out). A correct replica that reboots during its
        recovery and sends a new request waits at most one interval more (it retransmits)."""
        r = self.r
        j, t = req.client, req.timestamp
        if t > r.requests._timestamp_limit(j):
            return None  # (the ordinary checks drop it; recorded, it would exempt every later one)
        last = self.admitted.get(j)
        if last is not None and t != last[0]:
            if t < last[0]:
                return None  # (older than the admitted one: the ordinary checks drop it)
            if r.now - last[1] < r.cfg.view_change_timeout_ms / 2:
                return Drop.RECOVERY_REQUEST_RATE_LIMITED
        if last is None or t != last[0]:
            self.admitted[j] = (t, r.now)
        return None

    def _ignore_query_stable(self, m: QueryStable) -> Optional[Drop]:
        r = self.r
        last = self.stable_answered.get(m.replica)
        if last is not None and r.now - last < r.cfg.status_interval_ms / 2:
            return Drop.QUERY_STABLE_RATE_LIMITED
        return None

    def on_query_stable(self, m: QueryStable, fr: Optional[Frame] = None) -> None:
        r = self.r
        if (why := self._ignore_query_stable(m)) is not None:
            return r._drop(why)
        self.stable_answered[m.replica] = r.now
        prepared = max(max(r.log.prepared, default=0), r.log.last_exec, r.low_water_mark)
        r._send_to(m.replica, seal(ReplyStable(r.low_water_mark, prepared, r.id, m.nonce), r.keys, to=m.replica))

    def execute(self, j: int, op: bytes, n: int, t: int) -> bytes:
        """Replica j's recovery request (timestamp t) executes at sequence number n (every replica
        alike). Its recovery point is the larger of its estimate H_M and the high water mark at n,
        floor(n/K)*K + L: j may have sent messages (or an intruder, with its keys) for sequence
        numbers up to there before its request, and j is recovered only once a stable checkpoint
        has taken the log past them."""
        r = self.r
        try:
            H_M = msgpack.unpackb(op[len(RECOVERY_OP):])
        except (ValueError, TypeError, msgpack.UnpackException):
            H_M = None
        if type(H_M) is not int or H_M < 0 or H_M > n + 2 * r.log_window:
            # an honest estimate is a stable checkpoint plus L, so at most about n + L: a larger
            # one would make the primary order null requests far ahead for nothing
            return msgpack.packb(["error", "malformed recovery request"])
        H = max(H_M, (n // r.checkpoint_interval) * r.checkpoint_interval + r.log_window)
        self.points[j] = H
        r._emit(RecoveryRequestExecuted(j, n, H))
        if j != r.id:
            r.refresh_keys = True  # (in the runtime: our session keys too, see ``Ready``)
            if self.stale_marked.get(j) != t:  # (once per request: a rollback executes it again)
                self.stale_marked[j] = t
                r._mark_stale(j)
        return msgpack.packb(["recovery", n, H])

    def null_goal(self) -> int:
        """The sequence number the primary orders null batches up to (0: none needed)."""
        r = self.r
        if not self.points:
            return 0
        K = r.checkpoint_interval
        goal = max(-(-H // K) * K for H in self.points.values())
        return goal if goal > r.low_water_mark else 0

    def prune_points(self) -> None:
        r = self.r
        K = r.checkpoint_interval
        for j in [j for j, H in self.points.items() if r.low_water_mark >= -(-H // K) * K]:
            del self.points[j]
