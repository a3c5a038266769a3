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

from dataclasses import dataclass
from typing import Optional, Sequence

from ..codec import NULL_BATCH_DIGEST
from ..messages import ViewChange
from .quorum import Quorums


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
