"""Checkpoint votes: which replica said which checkpoint digest at which sequence number.

Owns: the votes (replica -> {seqno: digest}), each replica's bounded to the checkpoints a log
window holds (a Byzantine replica cannot grow them). May not touch: the replica's checkpoints,
state or log; ``Replica._check_stable`` (the cross-area step) asks it who voted for what and acts
on the certificates (stable checkpoint, promotion, state transfer).
"""

from __future__ import annotations


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
