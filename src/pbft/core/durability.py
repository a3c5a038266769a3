"""What a replica writes to stable storage, and how it comes back from it.

Owns: ``Persistence`` (the records of the current step) and ``restore`` (the replica rebuilt
from its records after a restart). ``restore`` is the cross-area step of a restart: it reads and
checks the records, sets the replica's own fields (the view, whether it is active, the low water
mark, ``needs_state``, the recovery marker; the sends of re-execution are dropped), and asks each
component to restore its own through a method named for it (``Log.restore_progress``,
``Log.restore_certificates``, ``Log.reexecute_committed``, ``Checkpoints.restore``,
``ViewChanges.restore_new_view``, ``ViewChanges.restore_inactive``); it writes no other
component's field.

The core stays pure: it does no I/O itself.  With persistence on, it collects the
records to write in ``Replica.disk`` and the driver takes them with the step's
``Ready`` (``take_ready().persist``) and writes them in **one transaction before it
sends anything the core produced in the same step** (group commit: one write, and in the durable
mode one fsync, per event-loop turn whatever the number of messages handled).  So
nothing leaves a replica before what it implies is on disk:

=============  ============================================  =========================
key            value (msgpack)                               written when
=============  ============================================  =========================
``v``          ``[view, active]``                            a view change starts / a
                                                             new view is installed
``n``          that NewView frame and its ViewChanges        it is installed
``q`` + n      ``{digest: view}`` (the thesis' Q set)        a batch pre-prepares here
``c`` + n      ``[view, digest]`` (the P set)                it prepares (Commit sent)
``k`` + n      ``[view, digest]``                            it commits here
``b`` + d      the batch                                     first seen
``o`` + i      object ``i`` at the persisted checkpoint     a checkpoint commits here
``s``          ``[seqno, digest]`` of that checkpoint        (same transaction)
``h``          ``[seqno, digest]`` of the stable checkpoint  it advances (the log
                                                             below it is deleted)
``R``          the nonce of a recovery under way             it starts / ends
=============  ============================================  =========================

Log records at or below the stable checkpoint are deleted as it advances.  After a
restart (``restore``) the replica has the view it was in, everything it pre-prepared,
prepared and committed (so it never contradicts what it sent before), and the state
of its last committed checkpoint, checked against that checkpoint's digest; it
re-executes the batches committed after it.  If the state does not match its digest
(a torn or corrupted store), the objects are kept but the replica executes nothing
until a state transfer (which moves only the objects that differ) has given it a
certified checkpoint: it starts one at once, to the stable checkpoint of its ``h`` record
(on an idle cluster no later checkpoint would come to make it fetch one).  A damaged log
is discarded whole: the replica then comes back like a new one (and must be counted as
faulty until it has caught up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import msgpack

from ..codec import DecodeError, encode_batch
from ..messages import Batch, NewView
from . import membership
from .events import Restored

if TYPE_CHECKING:
    from .replica import Replica

CheckpointId = tuple[int, bytes]  # (seqno, digest)
# the log's records: view, active, batches, Q and P sets, committed slots (view, digest)
LogRecords = tuple[Any, Any, dict[bytes, Batch], dict[int, dict[bytes, int]], dict[int, tuple[bytes, int]],
                   dict[int, tuple[int, bytes]]]


def _n(prefix: bytes, n: int) -> bytes:
    return prefix + n.to_bytes(8, "big")


def _pack(x: Any) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def deferrable(puts: dict[bytes, Optional[bytes]]) -> bool:
    """Whether a step's records may reach the disk after its sends instead of before: when they
    are all ``k`` records (a batch committed here). No message rests on a ``k`` record: the
    Commit this replica sent rests on its ``c`` record, written before it; the batch committed
    at a quorum of replicas that each wrote their ``c`` record before their Commit; and the
    replies of its execution follow from the order alone. A replica that loses a ``k`` record
    in a crash comes back with the batch prepared, executes it tentatively, and commits it
    again to the same digest at the same sequence number (by the others' Commits, or by its
    prepared certificate through a view change): nothing it sent is contradicted. A driver that
    syncs each write (the durable mode) may thus add such records to its next write, which
    keeps a sync off the path of the step's sends. Every other record, deletions included, is
    written before the sends of its step."""
    if not puts:
        return False
    for key, value in puts.items():
        if value is None or key[:1] != b"k":
            return False
    return True


class Persistence:
    """Owns: the records the current step will write (``puts``; None while persistence is off:
    every hook is then a no-op) and the sequence number of the checkpoint whose objects were last
    written. Reads the replica fields it writes out; may not change them."""

    __slots__ = ("r", "puts", "persisted_ckpt")

    def __init__(self, replica: Replica):
        self.r = replica
        self.puts: Optional[dict[bytes, Optional[bytes]]] = None
        self.persisted_ckpt = -1

    def enable(self) -> None:
        """Start collecting records to write (call before ``restore`` and any message)."""
        self.puts = {}
        self.persisted_ckpt = -1

    def take(self) -> dict[bytes, Optional[bytes]]:
        """The records to write, in one transaction, before the sends of this step go out."""
        puts = self.puts
        if not puts:
            return {}
        self.puts = {}
        return puts

    # -- hooks called by the replica -------------------------------------------------
    def view(self) -> None:
        r = self.r
        if self.puts is not None:
            self.puts[b"v"] = _pack([r.view, r.view_active])
            if r.view_active and r.vc.new_view_raw is not None:
                # the NewView that installed the view, with its ViewChanges: after a restart we
                # still hand it to replicas that missed it (they certify it by f+1 digests)
                self.puts[b"n"] = _pack([r.vc.new_view_raw, list(r.vc.new_view_vc_raws)])

    def q(self, n: int) -> None:
        if self.puts is not None:
            self.puts[_n(b"q", n)] = _pack(self.r.log.preprepared[n])

    def p(self, n: int) -> None:
        if self.puts is not None:
            d, v = self.r.log.prepared[n]
            self.puts[_n(b"c", n)] = _pack([v, d])

    def committed(self, n: int, d: bytes) -> None:
        if self.puts is not None:
            self.puts[_n(b"k", n)] = _pack([self.r.view, d])

    def batch(self, d: bytes, batch: Batch) -> None:
        if self.puts is not None:
            self.puts[b"b" + d] = encode_batch(batch)

    def forget_batch(self, d: bytes) -> None:
        if self.puts is not None:
            self.puts[b"b" + d] = None

    def recovery(self, nonce: Optional[int]) -> None:
        """A recovery with this nonce is under way (None: it ended)."""
        if self.puts is not None:
            self.puts[b"R"] = None if nonce is None else msgpack.packb(nonce)

    def checkpoint(self, n: int, d: bytes) -> None:
        """Write the objects changed since the last persisted checkpoint, as of checkpoint n."""
        if self.puts is None or n <= self.persisted_ckpt:
            return
        st = self.r.state
        puts = self.puts
        for i in st.unpersisted:
            puts[_n(b"o", i)] = st.value_at(n, i)
        puts[b"s"] = _pack([n, d])
        # objects modified after checkpoint n are still to be written next time
        later: set[int] = set(st.dirty)
        for rec in st.records:
            if rec.seqno >= n:
                later.update(rec.objs)
        st.unpersisted = later
        self.persisted_ckpt = n

    def distrust_checkpoint(self) -> None:
        """The checkpoint last written may be wrong (a recovery distrusts the store, a repair found
        our state diverged): the next checkpoint is written whatever its sequence number, even at or
        below that one (the objects to write are in the state's ``unpersisted``)."""
        self.persisted_ckpt = -1

    def gc(self, old_h: int, upto: int, h: int, d: bytes) -> None:
        """The stable checkpoint moved from old_h to (h, d): log records up to ``upto`` go."""
        if self.puts is None:
            return
        puts = self.puts
        puts[b"h"] = _pack([h, d])
        for k in range(old_h + 1, upto + 1):
            puts[_n(b"q", k)] = None
            puts[_n(b"c", k)] = None
            puts[_n(b"k", k)] = None


# -- restart (the cross-area step: the replica's fields, and each component through its methods) --
def restore(r: Replica, records: dict[bytes, bytes], damaged: frozenset[bytes] = frozenset()) -> str:
    """Come back from stable storage.  ``records``: every intact record; ``damaged``: keys
    whose checksum failed (torn or corrupt).  Call right after construction and
    ``enable_persistence``.  Returns a one-word summary: ``fresh``, ``restored``,
    ``state-repair`` (state unusable: fetch before executing) or ``log-lost``."""
    r.recovery_marker = b"R" in records or b"R" in damaged
    if not records and not damaged:
        return "fresh"
    objs, marker, stable, state_damaged, log_damaged = _read_state_records(r, records, damaged)
    outcome = _restore_state(r, objs, marker, stable, state_damaged)
    membership.after_restore(r)  # (the membership of the restored checkpoint, before its log)
    log = None if log_damaged else _read_log(r, records)
    if log is None:
        r._emit(Restored("log-lost"))
        return "log-lost" if outcome == "restored" else outcome
    view, active, batches, q, p, committed = log
    _restore_log(r, records, view, active, batches, q, p, committed)
    membership.after_restore(r)  # (a view record from before the switch: its first view)
    if not r.needs_state:
        r.log.reexecute_committed(committed)
        r.out = []  # replies to clients gone since, checkpoints to be voted again
    if stable is not None and (stable[0] > r.log.last_committed_exec or r.needs_state):
        # the stable checkpoint we were fetching when we stopped; or, our state unusable, the one
        # the window starts at (certified: nothing else would fetch it once the cluster is idle)
        r._start_fetch(*stable, unusable=r.needs_state)
    r._emit(Restored(outcome))
    return outcome


def _read_state_records(r: Replica, records: dict[bytes, bytes], damaged: frozenset[bytes]
                        ) -> tuple[dict[int, bytes], Optional[CheckpointId], Optional[CheckpointId], bool, bool]:
    """The objects, the persisted checkpoint (``s``) and the stable one (``h``) in the store,
    and whether the state's or the log's records are damaged."""
    log_damaged = any(k[:1] in b"vqckbhn" for k in damaged)
    state_damaged = any(k[:1] in b"os" for k in damaged)
    # -- the state at the persisted checkpoint
    objs: dict[int, bytes] = {}
    for k, v in records.items():
        if k[:1] == b"o" and len(k) == 9:
            i = int.from_bytes(k[1:], "big")
            if i < r.state.n:
                objs[i] = v
            else:
                state_damaged = True
    marker: Optional[CheckpointId] = None
    stable: Optional[CheckpointId] = None
    try:
        if b"s" in records:
            s, d = msgpack.unpackb(records[b"s"], raw=False, use_list=False)
            marker = (int(s), bytes(d))
    except Exception:  # noqa: BLE001 - checksummed, so only a bug writes a bad one
        state_damaged = True
    try:
        if b"h" in records:
            s, d = msgpack.unpackb(records[b"h"], raw=False, use_list=False)
            stable = (int(s), bytes(d))
    except Exception:  # noqa: BLE001
        log_damaged = True
    return objs, marker, stable, state_damaged, log_damaged


def _restore_state(r: Replica, objs: dict[int, bytes], marker: Optional[CheckpointId], stable: Optional[CheckpointId],
                   state_damaged: bool) -> str:
    """The state at the persisted checkpoint, checked against its digest: ``restored``, or
    ``state-repair`` (kept, but nothing executes before a certified checkpoint is fetched)."""
    outcome = "restored"
    st = r.state
    if marker is None and objs:
        state_damaged = True  # objects of some checkpoint without the record saying which
    try:
        # objects never written still have their initial value (this replica is new)
        r.rs.put_objs(objs)
    except ValueError:
        state_damaged = True
    st.discard_all()
    st.rebuild()
    st.unpersisted = set()
    if marker is None and not state_damaged:
        r.checkpoints.restore({0: st.checkpoint(0)})  # never got past the initial state
        r.low_water_mark = stable[0] if stable is not None else 0
    elif marker is not None and not state_damaged and st.current_digest(marker[0]) == marker[1]:
        n, d = marker
        st.checkpoint(n)
        r.checkpoints.restore({n: d})
        r.log.restore_progress(n)
        # the window starts at the stable checkpoint, which may be below the state's
        # checkpoint (not yet stable) or above it (it was being fetched)
        r.low_water_mark = stable[0] if stable is not None else 0
        r.disk.persisted_ckpt = n
    elif marker is not None or state_damaged:
        # unusable: keep the objects (a transfer fetches only those that differ) but
        # execute nothing before a certified checkpoint has been fetched.  The log is
        # still ours: the window stays where the persisted checkpoint put it
        base = stable[0] if stable is not None else 0
        r.checkpoints.restore({})
        r.low_water_mark = base
        r.log.restore_progress(base)
        r.needs_state = True
        st.unpersisted = set(range(st.n))
        outcome = "state-repair"
    return outcome


def _read_log(r: Replica, records: dict[bytes, bytes]) -> Optional[LogRecords]:
    """The log records within the window: (view, active, batches, Q, P, committed), or None
    if they do not decode (the log is then lost)."""
    try:
        view, active = msgpack.unpackb(records.get(b"v", _pack([0, True])), raw=False, use_list=False)
        batches: dict[bytes, Batch] = {}
        for k, v in records.items():
            if k[:1] == b"b" and len(k) == 33:
                batches[k[1:]] = r.codec.decode_batch(v)
        q: dict[int, dict[bytes, int]] = {}
        p: dict[int, tuple[bytes, int]] = {}
        committed: dict[int, tuple[int, bytes]] = {}
        for k, v in records.items():
            if len(k) != 9 or k[:1] not in b"qck":
                continue
            n = int.from_bytes(k[1:], "big")
            if not r.low_water_mark < n <= r.low_water_mark + r.log_window:
                continue
            x = msgpack.unpackb(v, raw=False, use_list=False, strict_map_key=False)
            if k[:1] == b"q":
                q[n] = {bytes(dg): int(vv) for dg, vv in x.items()}
            elif k[:1] == b"c":
                p[n] = (bytes(x[1]), int(x[0]))
            else:
                committed[n] = (int(x[0]), bytes(x[1]))
    except (ValueError, TypeError, KeyError, DecodeError, msgpack.UnpackException):
        return None
    return view, active, batches, q, p, committed


def _restore_log(r: Replica, records: dict[bytes, bytes], view: Any, active: Any, batches: dict[bytes, Batch],
                 q: dict[int, dict[bytes, int]], p: dict[int, tuple[bytes, int]],
                 committed: dict[int, tuple[int, bytes]]) -> None:
    """The view (the replica's), the NewView that installed it (``ViewChanges``), the Q and P
    sets, the batches and the slots of the current view (``Log``: what we pre-prepared, prepared
    and committed in it), and the view-change timer of a view not yet active."""
    r.view = int(view)
    r.view_active = bool(active) or r.view == 0
    if r.view_active and r.view > 0 and b"n" in records:
        try:
            nv_raw, vc_raws = msgpack.unpackb(records[b"n"], raw=False, use_list=False)
            fr = r.codec.open_frame(nv_raw)
            nv = r.codec.parse(fr)
            if isinstance(nv, NewView) and nv.view == r.view:
                r.vc.restore_new_view(nv, nv_raw, [bytes(x) for x in vc_raws], fr.digest)
        except (ValueError, TypeError, DecodeError, msgpack.UnpackException):
            pass  # only liveness suffers: peers that missed the NewView wait for the next one
    r.log.restore_certificates(q, p, committed, batches)
    if not r.view_active:
        r.vc.restore_inactive(r.now)
