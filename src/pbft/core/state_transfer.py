"""State transfer: fetching a certified checkpoint from other replicas, and serving ours.

Owns: the transfer under way (its target checkpoint, the walk of the partition tree that fetches
only the objects that differ, the retransmission deadline and the replier rotation), the budget
of what we answer to each replica's Fetch messages, and ``stats``.

May not touch: the log, execution, checkpoints or requests. It reads the replica's checkpoints
(to serve them, and to know who holds the target) and sends through the replica; when the walk
is complete it hands the checkpoint to ``Replica._install_fetched_checkpoint``, the cross-area
step (the new low water mark, execution resumed from the fetched state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..codec import seal
from ..messages import Checkpoint, Data, Fetch, MetaData
from ..state.partition import Fetcher
from .drops import REPLIER_FAULTS, Drop
from .events import StateRebuilt

if TYPE_CHECKING:
    from .replica import Replica


class StateTransfer:
    __slots__ = ("r", "target", "fetcher", "deadline", "attempt", "served", "stats")

    def __init__(self, replica: "Replica"):
        self.r = replica
        # Invariant: ``target`` (seqno, digest) and ``fetcher`` (its walk) are both set or both None
        self.target: Optional[tuple[int, bytes]] = None
        self.fetcher: Optional[Fetcher] = None
        self.deadline: Optional[float] = None  # when to ask again, of the next replier
        self.attempt = 0  # rotates the replier on each retransmission
        self.served: dict[int, tuple[float, int]] = {}  # peer -> (interval start, bytes answered)
        self.stats = {"transfers": 0, "objects": 0, "bytes": 0, "metadata": 0, "rebuilds": 0}

    # ---- fetching -------------------------------------------------------------------------
    def start(self, n: int, d: bytes) -> None:
        r = self.r
        self._tally()  # (a transfer moved on to a newer checkpoint: what it fetched still counts)
        self.target = (n, d)
        self.fetcher = Fetcher(r.state, n, d, max_objs=r.cfg.partition_fanout)
        self.attempt = 0
        self.send()

    def abandon(self) -> None:
        """Forget the transfer under way (a recovery distrusts what it had fetched)."""
        self._tally()
        self.target = None
        self.fetcher = None

    def _tally(self) -> None:
        """Count what the fetcher under way fetched, once (``stats``)."""
        f = self.fetcher
        if f is not None:
            self.stats["objects"] += f.fetched_objs
            self.stats["bytes"] += f.fetched_bytes
            self.stats["metadata"] += f.metas
            self.fetcher = None

    def restart(self, now: float) -> None:
        """After a crash: ask again at once for what was in flight."""
        if self.target is not None:
            self.deadline = now

    def tick(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if self.target is not None:
                self.attempt += 1
                self.send(resend=True)

    def send(self, resend: bool = False) -> None:
        """Ask for the next nodes of the walk (a window of them in flight), or finish it.
        ``resend``: ask again, of the next replier, for everything in flight."""
        r = self.r
        assert self.target is not None and self.fetcher is not None
        n, d = self.target
        f = self.fetcher
        reqs = f.in_flight() if resend else []
        reqs += f.requests()
        if f.done():
            self._finish()
            return
        if not reqs:
            return
        holders = sorted(j for j in r.checkpoint_votes.voters(n, d) if j != r.id) or list(r.others)
        to = holders[self.attempt % len(holders)]
        for lvl, x, want in reqs:
            r._send_to(to, seal(Fetch(n, d, lvl, x, want, r.id), r.keys, to=to))
        self.deadline = r.now + r.cfg.state_fetch_timeout_ms

    def _ignore_reply(self, m: MetaData | Data) -> Optional[Drop]:
        if self.fetcher is None or self.target is None or self.target[0] != m.seqno:
            return Drop.DATA_UNREQUESTED
        return None

    def _on_reply(self, m: MetaData | Data, err_of: Callable[[Fetcher], Optional[str]]) -> None:
        r = self.r
        if (why := self._ignore_reply(m)) is not None:
            return r._drop(why)
        assert self.fetcher is not None
        err = err_of(self.fetcher)
        if err is not None:
            # a faulty (or outdated) replier: never installed; ask another one
            why = Drop(err)
            r._drop(why)
            if why in REPLIER_FAULTS:
                self.attempt += 1
                self.send(resend=True)
            return
        self.deadline = r.now + r.cfg.state_fetch_timeout_ms  # progress
        self.send()

    def on_meta_data(self, m: MetaData) -> None:
        self._on_reply(m, lambda f: f.on_meta(m.level, m.index, m.children))

    def on_data(self, m: Data) -> None:
        self._on_reply(m, lambda f: f.on_data(m.level, m.index, m.objs))

    def _finish(self) -> None:
        r = self.r
        assert self.target is not None and self.fetcher is not None
        n, d = self.target
        f = self.fetcher
        self._tally()
        if not f.finish():
            # an object differs from its leaf digest without our tree knowing (corrupted in
            # memory, or changed without ``modify``): check every object, then walk again
            bad = r.state.rebuild()
            self.stats["rebuilds"] += 1
            r._emit(StateRebuilt(n, len(bad)))
            self.fetcher = Fetcher(r.state, n, d, max_objs=r.cfg.partition_fanout)
            self.send()
            return
        self.stats["transfers"] += 1
        self.target = None
        self.fetcher = None
        self.deadline = None
        r._install_fetched_checkpoint(n, d)

    # ---- serving ----------------------------------------------------------------------------
    def on_fetch(self, m: Fetch) -> None:
        r = self.r
        n = m.seqno
        if r.checkpoints.committed.get(n) != m.digest or not r.state.has(n):
            r._drop(Drop.FETCH_UNKNOWN_CHECKPOINT)
            # tell the requester about our newer stable checkpoint, if any
            lwm, ck = r.low_water_mark, r.checkpoints.committed
            if lwm > n and lwm in ck:
                r._send_to(m.replica, seal(Checkpoint(lwm, ck[lwm], r.id), r.keys))
            return
        st = r.state
        if not m.want:
            children = st.children_at(n, m.level, m.index)
            if children is None:
                r._drop(Drop.FETCH_BAD_NODE)
                return
            if self._budget(m.replica, 40 * len(children)):
                r._send_to(m.replica, seal(MetaData(n, m.level, m.index, children, r.id), r.keys, to=m.replica))
            return
        if m.level != st.depth - 1 or not 0 <= m.index < st.counts[m.level]:
            r._drop(Drop.FETCH_BAD_NODE)
            return
        lo = m.index * st.F
        hi = lo + st.children_count(m.level, m.index)
        budget = r.cfg.message_size_bytes_max - 256  # objects are at most message size - 512
        objs = []
        for i in m.want:
            if not lo <= i < hi:
                r._drop(Drop.FETCH_BAD_OBJECT)
                return
            v = st.value_at(n, i)
            budget -= len(v) + 16
            if budget < 0:
                break
            objs.append((i, v))
        if not objs:
            r._drop(Drop.FETCH_OBJECT_TOO_LARGE)
            return
        if self._budget(m.replica, sum(len(v) + 16 for _, v in objs)):
            r._send_to(m.replica, seal(Data(n, m.level, m.index, tuple(objs), r.id), r.keys, to=m.replica))

    def _budget(self, j: int, size: int) -> bool:
        """Whether we may answer replica j's Fetch with ``size`` more bytes: at most two messages'
        worth per status interval per replica. A Fetch is small and its answer may be a whole
        message, so without a budget a replica could make us send many times what it sends; a
        fetcher whose request goes unanswered asks again, of the next replier, on its timeout."""
        r = self.r
        start, used = self.served.get(j, (r.now, 0))
        if r.now - start >= r.cfg.status_interval_ms:
            start, used = r.now, 0
        if used > 0 and used + size > 2 * r.cfg.message_size_bytes_max:
            r._drop(Drop.FETCH_RATE_LIMITED)
            return False
        self.served[j] = (start, used + size)
        return True
