"""Quorums over weighted replicas: every threshold of the protocol goes through here.

Owns: the two thresholds of a cluster (``ClusterConfig.quorum_weight``, 2f+1 with unit weights,
and ``weak_weight``, f+1: a weak certificate, which contains a correct replica), the weight of a
set of replicas, the view-join rule, and ``Certificate``. It may not touch a replica's state:
callers pass the voters in and act on the typed result.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Generic, Iterable, Mapping, Optional, Sequence, TypeVar

if TYPE_CHECKING:
    from ..config import ClusterConfig

V = TypeVar("V")


class Reached(IntEnum):
    """How far a set of voters goes: nothing, a weak certificate (f+1), or a quorum (2f+1)."""

    NONE = 0
    WEAK = 1
    QUORUM = 2


class Quorums:
    """A cluster's thresholds. ``weights[r]`` is replica r's weight (all 1 in the usual case)."""

    __slots__ = ("weights", "unit", "quorum", "weak")

    def __init__(self, weights: Sequence[int], quorum: int, weak: int):
        self.weights = tuple(weights)
        self.unit = all(w == 1 for w in self.weights)
        self.quorum = quorum
        self.weak = weak

    @classmethod
    def of(cls, cfg: ClusterConfig) -> "Quorums":
        return cls(cfg.weights, cfg.quorum_weight, cfg.weak_weight)

    def weight(self, replicas: Iterable[int]) -> int:
        """Total weight of a collection of DISTINCT replica ids (a dict or set: its keys)."""
        if self.unit:
            return len(replicas)  # type: ignore[arg-type]
        w = self.weights
        return sum(w[r] for r in replicas)

    def is_quorum(self, replicas: Iterable[int]) -> bool:
        return self.weight(replicas) >= self.quorum

    def is_weak(self, replicas: Iterable[int]) -> bool:
        return self.weight(replicas) >= self.weak

    def is_quorum_but_one(self, replicas: Iterable[int]) -> bool:
        """Whether ``replicas`` with one more replica of unit weight make a quorum (2f of 3f+1)."""
        return self.weight(replicas) >= self.quorum - 1

    def is_weak_but_one(self, replicas: Iterable[int]) -> bool:
        """Whether ``replicas`` with one more replica of unit weight make a weak certificate (f)."""
        return self.weight(replicas) >= self.weak - 1

    def reached(self, replicas: Iterable[int]) -> Reached:
        w = self.weight(replicas)
        return Reached.QUORUM if w >= self.quorum else Reached.WEAK if w >= self.weak else Reached.NONE

    def join_view(self, views: Mapping[int, int], current: int) -> Optional[int]:
        """The view-join rule (Castro's thesis 2.3.5): ``views`` maps replicas to a view each
        reports (in a ViewChange or a Status). When replicas of weak-certificate weight are in views
        above ``current``, a correct replica is, so a replica behind moves up: to the highest view
        v such that replicas of weak weight are in views >= v (a correct one has reached v). None
        if replicas in higher views weigh less than a weak certificate."""
        higher = sorted(((v, j) for j, v in views.items() if v > current), reverse=True)
        acc = 0
        w = self.weights
        for v, j in higher:
            acc += w[j]
            if acc >= self.weak:
                return v
        return None


class Certificate(Generic[V]):
    """Matching votes of distinct replicas for a value, towards ``threshold`` (a weight).

    ``add`` returns the value the first time the replicas that voted for it reach the threshold,
    and None at every other call: "reached" fires exactly once. A replica's later vote replaces
    its earlier one (only its latest counts)."""

    __slots__ = ("quorums", "threshold", "votes", "value")

    def __init__(self, quorums: Quorums, threshold: int):
        self.quorums = quorums
        self.threshold = threshold
        self.votes: dict[int, V] = {}
        self.value: Optional[V] = None  # the certified value, once reached

    def discard(self, sender: int) -> None:
        """Forget ``sender``'s vote (its latest word no longer supports any value)."""
        self.votes.pop(sender, None)

    def add(self, sender: int, value: V) -> Optional[V]:
        self.votes[sender] = value
        if self.value is not None:
            return None
        if self.quorums.weight([r for r, x in self.votes.items() if x == value]) >= self.threshold:
            self.value = value
            return value
        return None
