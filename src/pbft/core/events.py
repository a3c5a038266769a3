"""The events a replica reports: what happened in a step, for observers only.

Owns: the event types. Touches no protocol state. Events leave the core in ``Ready.events``
(``pbft.core.ready``); the simulator's oracles, the runtime's logs and metrics, the demo and the
tests read their fields. No protocol effect travels as an event: a driver that ignores every
event still runs the protocol correctly.

Each type's ``kind`` is a short name (stable: logs and tests use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


class Event:
    """Base of every event: ``kind`` names it."""

    __slots__ = ()
    kind: ClassVar[str] = ""


# ---- agreement and execution --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrePrepareSent(Event):
    """The primary assigned ``seqno`` to the batch ``digest`` in ``view``."""

    kind: ClassVar[str] = "pre-prepare"
    view: int
    seqno: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class PrePrepared(Event):
    """A backup accepted the primary's pre-prepare (and sent its Prepare)."""

    kind: ClassVar[str] = "pre-prepared"
    view: int
    seqno: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Prepared(Event):
    """A quorum prepared ``digest`` at ``seqno`` in ``view`` (this replica sent its Commit)."""

    kind: ClassVar[str] = "prepared"
    view: int
    seqno: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Committed(Event):
    """Committed-local: a quorum of Commits for ``digest`` at ``seqno`` in ``view``."""

    kind: ClassVar[str] = "committed"
    view: int
    seqno: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Executed(Event):
    """The batch at ``seqno`` executed; ``requests``: ``(client, timestamp, op)`` of those
    executed (others were executed before: exactly-once)."""

    kind: ClassVar[str] = "execute"
    seqno: int
    digest: bytes
    batch: Any  # messages.Batch
    requests: tuple[tuple[int, int, bytes], ...]  # (client, timestamp, operation) of each executed
    tentative: bool


@dataclass(frozen=True, slots=True)
class Promoted(Event):
    """Tentative executions up to ``upto`` are now final (committed)."""

    kind: ClassVar[str] = "promote"
    upto: int


@dataclass(frozen=True, slots=True)
class RolledBack(Event):
    """Tentative executions above ``to_seqno`` were undone."""

    kind: ClassVar[str] = "rollback"
    to_seqno: int


@dataclass(frozen=True, slots=True)
class ServiceException(Event):
    """The service raised on a client's operation (the client gets the service-error result)."""

    kind: ClassVar[str] = "service-exception"
    client: int
    error: str


# ---- checkpoints and state transfer ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CheckpointTaken(Event):
    """Checkpoint ``seqno`` committed here with ``digest`` (of ``seqno`` and ``state_root``)."""

    kind: ClassVar[str] = "checkpoint"
    seqno: int
    digest: bytes
    state_root: bytes


@dataclass(frozen=True, slots=True)
class Stable(Event):
    """The low water mark moved to ``seqno`` (the log up to it was discarded)."""

    kind: ClassVar[str] = "stable"
    seqno: int


@dataclass(frozen=True, slots=True)
class CheckpointMismatch(Event):
    """Our checkpoint ``seqno`` differs from the one a quorum certified."""

    kind: ClassVar[str] = "checkpoint-mismatch"
    seqno: int
    ours: bytes
    certified: bytes


@dataclass(frozen=True, slots=True)
class StateRepairStarted(Event):
    """Our checkpoint ``seqno`` disagreed with the certified ``certified``: our state went back to
    our checkpoint ``seqno`` and the objects that differ from the certified one are being fetched."""

    kind: ClassVar[str] = "state-repair"
    seqno: int
    ours: bytes
    certified: bytes


@dataclass(frozen=True, slots=True)
class FetchStarted(Event):
    """A state transfer towards checkpoint (``seqno``, ``digest``) began."""

    kind: ClassVar[str] = "fetch"
    seqno: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class StateRebuilt(Event):
    """A transfer found objects that differ from their leaf digests; the tree was rebuilt."""

    kind: ClassVar[str] = "state-rebuild"
    seqno: int
    objects_corrupt: int


@dataclass(frozen=True, slots=True)
class StateTransferred(Event):
    """A state transfer to checkpoint ``seqno`` completed."""

    kind: ClassVar[str] = "state-transfer"
    seqno: int
    digest: bytes
    state_root: bytes


# ---- view changes -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ViewChangeStarted(Event):
    """This replica moved to ``view`` (not yet active) and sent its ViewChange."""

    kind: ClassVar[str] = "view-change"
    view: int
    reason: str


@dataclass(frozen=True, slots=True)
class NewViewInstalled(Event):
    """``view`` became active here with ``decision`` (``view_change.Decision``)."""

    kind: ClassVar[str] = "new-view"
    view: int
    decision: Any


# ---- restarts and proactive recovery -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Restored(Event):
    """``restore`` came back from stable storage: ``outcome`` as it returned."""

    kind: ClassVar[str] = "restore"
    outcome: str


@dataclass(frozen=True, slots=True)
class RecoveryStarted(Event):
    kind: ClassVar[str] = "recovery-start"
    nonce: int


@dataclass(frozen=True, slots=True)
class RecoveryEstimated(Event):
    """The recovering replica's estimate of the high water mark (H_M in the thesis)."""

    kind: ClassVar[str] = "recovery-estimate"
    estimate: int


@dataclass(frozen=True, slots=True)
class RecoveryPointLearned(Event):
    """The recovering replica learnt when its request executed, and its recovery point."""

    kind: ClassVar[str] = "recovery-point"
    request_seqno: int
    recovery_point: int


@dataclass(frozen=True, slots=True)
class Recovered(Event):
    kind: ClassVar[str] = "recovered"
    recovery_point: int
    duration_ms: float


@dataclass(frozen=True, slots=True)
class RecoveryRequestExecuted(Event):
    """Replica ``replica``'s recovery request executed here at ``seqno``."""

    kind: ClassVar[str] = "recovery-request"
    replica: int
    seqno: int
    recovery_point: int


@dataclass(frozen=True, slots=True)
class StaleMarked(Event):
    """Replica ``replica``'s recovery request executed: the messages we held from it (prepares and
    commits of uncompleted certificates, checkpoint votes not yet stable, view changes and acks
    for views not yet started), received under its keys from before the recovery, were dropped."""

    kind: ClassVar[str] = "stale-marked"
    replica: int
    messages: int


@dataclass(frozen=True, slots=True)
class MembershipSwitched(Event):
    """Checkpoint ``seqno`` is stable and the membership recorded in its state (in force after
    ``members_from``) is now ours: ``n`` replicas, whose first view is ``view`` (``retired``: we
    are not one of them any more)."""

    kind: ClassVar[str] = "membership"
    seqno: int
    members_from: int
    n: int
    view: int
    retired: bool


@dataclass(frozen=True, slots=True)
class ChainWanted(Event):
    """Votes of weak weight (with our membership's thresholds) for checkpoint ``seqno``, beyond
    our window: before we catch up to it, our driver, which keeps the membership certificate
    chain (``Replica.chain.follows``), must tell us the newest membership it certifies
    (``membership.learn_chain``): a change we missed may have made those voters Byzantine-able."""

    kind: ClassVar[str] = "chain-wanted"
    seqno: int
