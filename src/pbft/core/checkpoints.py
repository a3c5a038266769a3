"""Checkpoints: ours, and which replica voted which checkpoint digest at which sequence number.

``Checkpoints`` owns our checkpoints: the digests of those taken after committed execution (each
voted for with a Checkpoint message) and of those taken after tentative execution (voted for once
their batches commit, or promoted by a certificate of others' votes). May not touch: the state
(it holds the checkpoints' records), the log and the view.

``CheckpointVotes`` owns the votes (replica -> {seqno: digest}), each replica's bounded to the
checkpoints a log window holds (a Byzantine replica cannot grow them).

``Replica._check_stable`` (the cross-area step) asks both and acts on the certificates: a stable
checkpoint and garbage collection (``Replica._advance_low_water_mark``), promotion, state
transfer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from ..codec import Frame
from ..messages import Checkpoint
from .drops import Drop
from .events import CheckpointTaken

if TYPE_CHECKING:
    from .replica import Replica


class CheckpointVotes:
    __slots__ = ("limit", "votes")

    def __init__(self, window: int, interval: int):
        self.limit = window // interval + 2  # votes kept per replica: the checkpoints of a window
        # Invariant: len(self.votes[r]) <= self.limit for every replica r
        self.votes: dict[int, dict[int, bytes]] = {}

    def record(self, r: int, n: int, d: bytes) -> None:
        """Replica r's vote for digest d at checkpoint n (its latest for n counts); its oldest
        votes beyond the limit go."""
        votes = self.votes.setdefault(r, {})
        votes[n] = d
        if len(votes) > self.limit:
            for old in sorted(votes)[: len(votes) - self.limit]:
                del votes[old]

    def forget(self, r: int) -> int:
        """Replica r's votes (stale: ``Replica._mark_stale``); how many."""
        return len(self.votes.pop(r, {}))

    def digests(self, n: int) -> set[bytes]:
        """The digests some replica voted for at checkpoint n."""
        return {v[n] for v in self.votes.values() if n in v}

    def voters(self, n: int, d: bytes) -> list[int]:
        """The replicas that voted for digest d at checkpoint n."""
        return [r for r, v in self.votes.items() if v.get(n) == d]

    def discard_upto(self, n: int) -> None:
        """Forget the votes for checkpoints at or below n (stable: the log below is gone)."""
        for votes in self.votes.values():
            for k in [k for k in votes if k <= n]:
                del votes[k]


class Checkpoints:
    """Our checkpoints (see the module docstring for what it owns)."""

    __slots__ = ("r", "committed", "tentative")

    def __init__(self, replica: "Replica", initial: bytes):
        self.r = replica
        # seqno -> digest of our checkpoints taken after committed execution (the state keeps a
        # record for each, and for each tentative one: copy-on-write, see pbft.state.partition);
        # none below the stable checkpoint
        self.committed: dict[int, bytes] = {0: initial}
        self.tentative: dict[int, bytes] = {}  # seqno -> digest of a checkpoint taken after tentative execution

    def take_tentative(self, n: int, d: bytes) -> None:
        """Checkpoint n, taken after executing tentatively: no vote until its batches commit."""
        self.tentative[n] = d

    def commit_tentative(self, n: int) -> None:
        """The batches up to tentative checkpoint n committed: it is ours, vote for it."""
        self.take(n, self.tentative.pop(n))

    def discard_tentative(self, seqnos: Iterable[int]) -> None:
        """The tentative executions that took these checkpoints were rolled back."""
        for k in seqnos:
            self.tentative.pop(k, None)

    def discard_below(self, n: int) -> None:
        """Checkpoint n is stable: the older checkpoints go (and the tentative ones up to n)."""
        for k in [k for k in self.tentative if k <= n]:
            del self.tentative[k]
        for k in [k for k in self.committed if k < n]:
            del self.committed[k]

    def distrust(self) -> None:
        """A recovery begins: our checkpoints are unverified until a state transfer checks them."""
        self.tentative.clear()
        self.committed = {}

    def restore(self, committed: dict[int, bytes]) -> None:
        """A restart from stable storage (``durability.restore``): our committed checkpoints are
        ``committed`` (seqno -> digest: the restored state's, checked against its digest; none when
        the state is unusable). Precondition: a new replica (no tentative checkpoint)."""
        assert not self.tentative and len(committed) <= 1
        self.committed = dict(committed)

    def installed(self, n: int, d: bytes) -> None:
        """A state transfer installed certified checkpoint (n, d): it is ours (and written)."""
        self.tentative.clear()
        self.committed[n] = d
        self.r.disk.checkpoint(n, d)

    def take(self, n: int, d: bytes) -> None:
        """Checkpoint n (whose record the state already holds) is committed: vote for it."""
        r = self.r
        self.committed[n] = d
        r.disk.checkpoint(n, d)
        r._emit(CheckpointTaken(n, d, r.state.root_at(n)))
        r.checkpoint_votes.record(r.id, n, d)
        r._broadcast(Checkpoint(n, d, r.id))
        r._check_stable(n)

    def _ignore_checkpoint(self, m: Checkpoint) -> Optional[Drop]:
        r = self.r
        if m.seqno <= r.low_water_mark:
            return Drop.CHECKPOINT_OLD
        if m.seqno % r.checkpoint_interval != 0:
            return Drop.CHECKPOINT_OFF_INTERVAL
        return None

    def on_checkpoint(self, m: Checkpoint, fr: Frame) -> None:
        r = self.r
        if (why := self._ignore_checkpoint(m)) is not None:
            return r._drop(why)
        assert m.seqno > r.low_water_mark and m.seqno % r.checkpoint_interval == 0
        r.checkpoint_votes.record(m.replica, m.seqno, m.digest)
        r._check_stable(m.seqno)

    def promote(self, n: int, d: bytes) -> None:
        """Our tentative executions up to n produced the state a correct replica checkpointed
        after committed execution: they are the committed ones."""
        r = self.r
        r.log.promote(n)
        del self.tentative[n]
        self.take(n, d)
        r.log.try_execute()  # later slots may have committed meanwhile: promote them too

