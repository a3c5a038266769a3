"""Protocol messages as typed, immutable values, named as in the paper.

These are plain values: no encoding, no authentication.  ``codec`` is the only
place where bytes become messages (and where every field is range-checked);
the sender of a message is the authenticated principal of the frame that
carried it, stored in the ``replica`` / ``client`` field.

Sequence-number sets inside ViewChange are tuples of tuples so that messages
stay hashable and immutable:

* ``checkpoints``: ``((seqno, digest), ...)`` checkpoints the sender holds
  (its stable one and any later ones it has taken);
* ``prepared`` (the thesis' P): ``((seqno, digest, view), ...)``: for each
  sequence number above the sender's stable checkpoint, the request batch that
  prepared there in the latest view in which one prepared;
* ``preprepared`` (the thesis' Q): ``((seqno, digest, view), ...)``: batches
  that pre-prepared at the sender, each with the latest view in which it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Union


class Tag(IntEnum):
    """The wire tag of each message type (the first field of a frame): the only place the
    numbers are written; ``codec.TAG`` maps each message class to its tag."""

    REQUEST = 1
    REPLY = 2
    PRE_PREPARE = 3
    PREPARE = 4
    COMMIT = 5
    CHECKPOINT = 6
    STATUS = 7
    VIEW_CHANGE = 8
    VIEW_CHANGE_ACK = 9
    NEW_VIEW = 10
    FETCH = 11
    DATA = 12
    FETCH_BATCH = 13
    BATCH_DATA = 14
    VOUCH = 15
    NEW_KEY = 16  # the runtime's signed session-key frame (``pbft.runtime.keys``), not a codec message
    META_DATA = 17
    QUERY_STABLE = 18
    REPLY_STABLE = 19
    MEMBERSHIP_LINK = 20  # the runtime's membership chain frame (``pbft.runtime.chain_keeper``), not a codec message


ALL_REPLICAS = -1  # a Request's ``replier`` when every replica must send the full result
# an operation of at least this many bytes travels in its request frame's payload, and the header
# (what the MACs cover) carries its digest (``digests.op_digest``): each receiver hashes the
# operation once, for the frame's MAC and the request's vouch key alike (``codec``)
REQUEST_OP_PAYLOAD_MIN = 256
# the operation of a recovery request (a Request whose sender is a replica): the prefix, then
# msgpack of the recovering replica's estimated recovery point H_M (docs/recovery.md)
RECOVERY_OP = b"\xffpbft:recover:"


# The messages built for every request (Request, Reply, Batch, PrePrepare, Prepare, Commit) write
# their own ``__init__``: ``dataclass`` keeps a class's own, and compiled (``make native``) it runs
# as native code, about 50-100 ns against about 1 us for the one ``dataclass`` generates, which
# the interpreter runs even in a compiled module (a replica builds about a dozen per request at
# one client). Frozen all the same: ``object.__setattr__`` is how a frozen dataclass's own
# ``__init__`` sets its fields; equality, hashing and ``repr`` are still generated.
@dataclass(frozen=True, slots=True)
class Request:
    client: int
    timestamp: int
    op: bytes
    read_only: bool
    replier: int  # designated replier (sends the full result), or ALL_REPLICAS

    def __init__(self, client: int, timestamp: int, op: bytes, read_only: bool, replier: int) -> None:
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "timestamp", timestamp)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "read_only", read_only)
        object.__setattr__(self, "replier", replier)


@dataclass(frozen=True, slots=True)
class Reply:
    view: int
    timestamp: int
    client: int
    replica: int
    tentative: bool
    read_only: bool
    result_digest: bytes
    result: Optional[bytes]  # None in a digest reply

    def __init__(self, view: int, timestamp: int, client: int, replica: int, tentative: bool, read_only: bool,
                 result_digest: bytes, result: Optional[bytes]) -> None:
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "timestamp", timestamp)
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "replica", replica)
        object.__setattr__(self, "tentative", tentative)
        object.__setattr__(self, "read_only", read_only)
        object.__setattr__(self, "result_digest", result_digest)
        object.__setattr__(self, "result", result)


@dataclass(frozen=True, slots=True)
class Batch:
    """What the primary orders at one sequence number: requests plus the agreed non-deterministic value.

    ``requests`` holds the requests' authenticated wire frames, so that every
    backup can check the client's MAC for itself. On the wire (a PrePrepare) an entry may
    instead be a *reference*: ``REQUEST_REF`` followed by the request's frame digest, for a
    large request that every replica gets from its client anyway (docs/protocol.md). The batch
    digest is over the request digests, so it is the same whichever form an entry takes; a
    replica keeps and executes batches with every body in place.
    """

    nondet: bytes
    requests: tuple[bytes, ...]

    def __init__(self, nondet: bytes, requests: tuple[bytes, ...]) -> None:
        object.__setattr__(self, "nondet", nondet)
        object.__setattr__(self, "requests", requests)


NULL_BATCH = Batch(b"", ())
# the first byte of a by-digest batch entry (no request frame starts with it: a frame is a
# msgpack array); the entry is this byte and the 32-byte frame digest of the request
REQUEST_REF = b"\x00"
REQUEST_REF_BYTES = 33


def request_ref(request_digest: bytes) -> bytes:
    """The by-digest batch entry of the request whose frame digest is ``request_digest``."""
    return REQUEST_REF + request_digest


def has_refs(b: Batch) -> bool:
    """Whether some entry of ``b`` is a reference (its body is not in the batch)."""
    return any(e[:1] == REQUEST_REF for e in b.requests)


@dataclass(frozen=True, slots=True)
class PrePrepare:
    view: int
    seqno: int
    digest: bytes
    replica: int
    batch: Optional[Batch]  # None only when the payload was withheld

    def __init__(self, view: int, seqno: int, digest: bytes, replica: int, batch: Optional[Batch]) -> None:
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "seqno", seqno)
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "replica", replica)
        object.__setattr__(self, "batch", batch)


@dataclass(frozen=True, slots=True)
class Prepare:
    view: int
    seqno: int
    digest: bytes
    replica: int

    def __init__(self, view: int, seqno: int, digest: bytes, replica: int) -> None:
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "seqno", seqno)
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "replica", replica)


@dataclass(frozen=True, slots=True)
class Commit:
    view: int
    seqno: int
    digest: bytes
    replica: int

    def __init__(self, view: int, seqno: int, digest: bytes, replica: int) -> None:
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "seqno", seqno)
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "replica", replica)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seqno: int
    digest: bytes
    replica: int


@dataclass(frozen=True, slots=True)
class Status:
    """Periodic summary; peers answer with whatever the sender appears to be missing."""

    view: int
    view_active: bool  # False while the sender is changing views
    stable_seqno: int
    last_executed: int
    replica: int
    # digest of the NewView frame that installed the sender's (active) view, b"" if none: f+1
    # matching digests certify a NewView whose MAC the receiver cannot check (keys changed)
    nv_digest: bytes = b""


@dataclass(frozen=True, slots=True)
class ViewChange:
    view: int  # the view being moved to
    replica: int
    stable_seqno: int
    checkpoints: tuple[tuple[int, bytes], ...]
    prepared: tuple[tuple[int, bytes, int], ...]
    preprepared: tuple[tuple[int, bytes, int], ...]


@dataclass(frozen=True, slots=True)
class ViewChangeAck:
    """``replica`` vouches that it received ViewChange ``vc_digest`` from ``vc_replica``."""

    view: int
    replica: int
    vc_replica: int
    vc_digest: bytes


@dataclass(frozen=True, slots=True)
class NewView:
    view: int
    replica: int
    view_changes: tuple[tuple[int, bytes], ...]  # (sender, ViewChange digest) of the set S used
    checkpoint_seqno: int
    checkpoint_digest: bytes
    chosen: tuple[tuple[int, bytes], ...]  # (seqno, batch digest) re-proposed in this view
    batches: tuple[Batch, ...]  # the non-null batches among ``chosen``


@dataclass(frozen=True, slots=True)
class Fetch:
    """State transfer: ask about node (level, index) of checkpoint (seqno, digest)'s partition tree.

    With ``want`` empty: the digests of its children (answered by MetaData).  With
    ``want`` (object numbers below a node of the last interior level): those objects
    (answered by Data).
    """

    seqno: int
    digest: bytes
    level: int
    index: int
    want: tuple[int, ...]
    replica: int


@dataclass(frozen=True, slots=True)
class MetaData:
    """The children digests of partition-tree node (level, index) at checkpoint ``seqno``."""

    seqno: int
    level: int
    index: int
    children: tuple[bytes, ...]
    replica: int


@dataclass(frozen=True, slots=True)
class Data:
    """Objects (number, value) below node (level, index) at checkpoint ``seqno``."""

    seqno: int
    level: int
    index: int
    objs: tuple[tuple[int, bytes], ...]
    replica: int


@dataclass(frozen=True, slots=True)
class FetchBatch:
    """Ask for a request batch by digest (a new primary missing a batch it must re-propose)."""

    digest: bytes
    replica: int


@dataclass(frozen=True, slots=True)
class BatchData:
    """A batch, self-certified by its digest: anybody may supply it."""

    digest: bytes
    replica: int
    batch: Batch


@dataclass(frozen=True, slots=True)
class Vouch:
    """``replica`` received these requests (by vouch key) from their clients with a valid MAC.

    A request is *certified* at a replica once replicas of weak-certificate weight (f+1)
    vouch for it: at least one correct replica then saw the client send it.  Primaries
    order only certified requests, and a backup accepts a request in a pre-prepare if its
    own MAC verifies or the request is certified, so a client whose authenticator is
    valid at some replicas only cannot stall a batch (and cause a view change).
    """

    replica: int
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class QueryStable:
    """A recovering replica asks where the others are (estimation of its recovery point)."""

    replica: int
    nonce: int


@dataclass(frozen=True, slots=True)
class ReplyStable:
    """The sender's last stable checkpoint and the highest sequence number it prepared."""

    checkpoint: int
    prepared: int
    replica: int
    nonce: int


Message = Union[
    Request, Reply, PrePrepare, Prepare, Commit, Checkpoint, Status,
    ViewChange, ViewChangeAck, NewView, Fetch, MetaData, Data, FetchBatch, BatchData, Vouch,
    QueryStable, ReplyStable,
]
