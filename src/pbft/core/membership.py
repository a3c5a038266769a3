"""Membership changes: the ``set-membership`` operation, its switch point, and the configuration
of the replicas (n, f, weights) in force at a sequence number.

The replica ids are 0..replica_slots-1 (``ClusterConfig.replica_slots``, fixed at ``pbft init``);
the members are always 0..n-1: a change grows n (the added ids at the top, each with its public
key) or shrinks it (the highest ids leave), changes f and the weights, or all of these at once.
Replacing a machine is ``rotate-key`` of the same id.

The switch point. A change executed at sequence number k, in the checkpoint interval that ends
at c (``reconfig.switch_seqno``), opens the new membership at ``S = c - CI + L`` (CI: checkpoint
interval, L: log window): the old membership orders the sequence numbers up to S, the new one
those after S. Why S: a replica that has not executed k has a stable checkpoint h < k, so h <=
c - CI and it accepts agreement messages only up to h + L <= S; a replica that has executed k
knows S (from its state) and refuses old-membership agreement, proposals and execution beyond S
(``fence``). So no sequence number after S is ever ordered or executed by the old membership,
and the new membership starts from checkpoint S, certified by the old quorum.

Pure and deterministic: validation uses only the operation, the configuration recorded and the
cluster's fixed parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

from ..config import ClusterConfig, ConfigError
from ..state.configuration import Configuration, Membership

if TYPE_CHECKING:
    from .quorum import Quorums, Reached
    from .replica import Replica

__all__ = ["cluster_config", "fold", "fence", "members_switch_seqno", "set_membership"]


def members_switch_seqno(c: int, cfg: ClusterConfig) -> int:
    """The last sequence number the old membership orders, for a change whose checkpoint is c."""
    return c - cfg.checkpoint_interval_seqnos + cfg.log_window_seqnos


def current(cs: Configuration, cfg: ClusterConfig) -> Membership:
    """The membership ``cs`` holds in force (the genesis one is ``cfg``'s, which every replica
    has until the first change, with the genesis keys)."""
    if cs.members is not None:
        return cs.members
    return Membership(len(cs.replica_keys), cfg.f, tuple(cfg.weights) or (1,) * len(cs.replica_keys),
                      tuple(cs.replica_keys), 0)


def fold(cs: Configuration, n: int) -> Configuration:
    """``cs`` with a recorded change whose switch point is before n made the one in force."""
    nxt = cs.next_members
    if nxt is None or nxt.opens_at >= n:
        return cs
    return replace(cs, replica_keys=nxt.keys, members=nxt, next_members=None)


def cluster_config(cfg: ClusterConfig, m: Optional[Membership]) -> ClusterConfig:
    """``cfg`` with membership m (None: ``cfg`` itself); the replica slots, and so the client
    ids, do not move."""
    if m is None or (m.n, m.f, m.weights) == (cfg.n, cfg.f, tuple(cfg.weights)):
        return cfg
    return replace(cfg, n=m.n, f=m.f, weights=m.weights, replica_slots=cfg.client_base)


def _bad_quorum(cfg: ClusterConfig, n: int, f: int, weights: tuple[int, ...]) -> str:
    """Why membership (n, f, weights) is not usable with the cluster's other parameters ("": it is)."""
    try:
        replace(cfg, n=n, f=f, weights=weights, replica_slots=cfg.client_base).validate()
    except ConfigError as e:
        msg = str(e)
        quorum = any(w in msg for w in ("tolerate", "unsafe", "cannot be live", "weight"))
        return f"{'unsafe-quorum' if quorum else 'bad-parameters'}: {msg}"
    return ""


def set_membership(cs: Configuration, args: tuple[Any, ...], cfg: ClusterConfig, n: int,
                   keys_in_use: set[bytes], valid_key: Any) -> tuple[str, Optional[Configuration]]:
    """Validate ``set-membership (n, f, weights, [[id, public key] ...])`` executed at sequence
    number n against the latest configuration ``cs``: (the reason of a refusal, None) or ("", the
    configuration with the change recorded, its switch point still to set by the caller).
    The pairs are the added ids (old n .. new n - 1), each with its public key."""
    if (len(args) != 4 or type(args[0]) is not int or type(args[1]) is not int or type(args[2]) is not tuple
            or not all(type(w) is int for w in args[2]) or type(args[3]) is not tuple
            or not all(type(p) is tuple and len(p) == 2 and type(p[0]) is int for p in args[3])):
        return "malformed: set-membership takes n, f, weights, [[id, public key] ...]", None
    new_n, f, weights, added = args[0], args[1], tuple(args[2]), args[3]
    if cs.next_members is not None and cs.next_members.opens_at >= n:
        return (f"membership-change-pending: a change opens at {cs.next_members.opens_at}; one at a time"), None
    cs = fold(cs, n)
    old = current(cs, cfg)
    if not 1 <= new_n <= cfg.client_base:
        return (f"beyond-replica-slots: replica ids are 0..{cfg.client_base - 1} "
                f"(replica_slots, chosen at init)"), None
    if why := _bad_quorum(cfg, new_n, f, weights):
        return why, None
    if (new_n, f, weights) == (old.n, old.f, old.weights):
        return "unchanged: that is the membership in force", None
    ids = [p[0] for p in added]
    if ids != list(range(old.n, new_n)):
        want = f"{old.n}..{new_n - 1}" if new_n > old.n else "none"
        return f"not-contiguous: the added ids must be {want}, in order, each with its key", None
    keys = [p[1] for p in added]
    if not all(valid_key(k) for k in keys):
        return "bad-key: not an Ed25519 public key", None
    kept = tuple(old.keys[:min(old.n, new_n)])
    if len(set(keys)) != len(keys) or any(k in keys_in_use or k in kept for k in keys):
        return "key-in-use: another principal has this key", None
    nxt = Membership(new_n, f, weights, kept + tuple(keys), 0)
    return "", replace(cs, next_members=nxt)


def fence(r: "Replica") -> Optional[int]:
    """The last sequence number replica r may order or execute with its membership: the switch
    point of a change its (possibly tentative) state records and that r has not switched to, or,
    while r fetches the state of its low water mark, the latest a change in that state can have;
    None: no bound but the log window."""
    if "order-beyond-switch-point" in r.cfg.bugs:  # (injected bug: no fence)
        return None
    s = _switch_point(r)
    t = r.fetch_target
    if t is not None and r.log.last_exec < t[0]:
        # our low water mark is a checkpoint whose state we are still fetching: a change recorded
        # there (executed at or before t) opens at most at t - CI + L
        b = t[0] - r.checkpoint_interval + r.log_window
        s = b if s is None else min(s, b)
    return s


def _switch_point(r: "Replica") -> Optional[int]:
    rec = r.rs.config
    if rec is None:
        return None
    nxt = rec.latest.next_members
    if nxt is None or nxt.opens_at <= r.members_from:
        return None
    return nxt.opens_at


def base_view(epoch: int, n: int) -> int:
    """The first view of a membership opened with configuration ``epoch``: above every view an
    earlier membership can reach (views of an epoch stay below the next one's ``epoch << 32``),
    and a multiple of n, so that its primary is replica 0, a member of every membership."""
    b = epoch << 32
    return -(-b // n) * n


def view_epoch(view: int) -> int:
    """The configuration epoch whose membership ``view`` belongs to (``base_view``)."""
    return view >> 32


def view_limit(view: int) -> int:
    """The first view beyond the membership epoch of ``view``: a replica never changes to it in
    its membership (a later membership's views start at or above it, ``base_view``: a lagging
    replica must not take part in them with its old thresholds; it catches up by checkpoints)."""
    return (view_epoch(view) + 1) << 32


def null_goal(r: "Replica") -> int:
    """The sequence number up to which the primary orders null batches when it has nothing else
    to order: a recovering replica's goal, or the switch point of a membership change, so that
    the switch does not wait for load (0: none). (Null batches up to the switch point are
    harmless even if the change itself is rolled back: they are within the window.)"""
    return max(r.recovery.null_goal(), _switch_point(r) or 0)


def quorums_at(r: "Replica", n: int) -> "Quorums":
    """The thresholds that certify checkpoint n at replica r: ours, or, for a checkpoint after
    the switch point of a change our state records (we lag: the others may have switched,
    and the members we are leaving stop), the new membership's, whose members hold it."""
    s = _switch_point(r)
    if s is None or n <= s:  # (S itself is the old membership's last checkpoint: its thresholds)
        return r.quorums
    rec = r.rs.config
    assert rec is not None and rec.latest.next_members is not None
    return _quorums_of(r.cfg, rec.latest.next_members)


@functools.lru_cache(maxsize=16)
def _quorums_of(cfg: ClusterConfig, m: Membership) -> "Quorums":
    """The thresholds of membership m (both values are frozen: one computation per change)."""
    from .quorum import Quorums

    return Quorums.of(cluster_config(cfg, m))


@dataclass(slots=True)
class ChainView:
    """What replica r's driver says of the membership certificate chain it keeps (the runtime's
    ``chain_keeper``). With ``follows`` set, a catch-up beyond our window on a weak certificate
    waits for the driver's answer (``ChainWanted``, then ``learn_chain``), given again after
    every stable checkpoint: a change we missed entirely (our state does not record it) may have
    raised f, and the old members' f+1 votes then prove nothing. ``known``: the newest membership
    the chain certifies, when it is newer than ours; checkpoints after its switch point count with
    its thresholds and its members' votes. A driver without a chain leaves ``follows`` unset (the
    old thresholds count, as before the change)."""

    follows: bool = False
    known: Optional[Membership] = None
    answered: bool = False
    asked: bool = False


def _chain_members(r: "Replica", n: int) -> Optional[Membership]:
    m = r.chain.known
    if m is None or not r.chain.follows or m.opens_at <= r.members_from or n <= m.opens_at:
        return None
    return m


def checkpoint_reached(r: "Replica", n: int, voters: list[int]) -> "Reached":
    """How far ``voters`` (of one digest at checkpoint n) go at replica r, with the thresholds of
    ``quorums_at`` (or of the membership our driver's chain certifies after its switch point,
    ``ChainView``); with a new membership's, only its members' votes count (a removed replica
    still sends frames we accept as an old member's: its vote must not count towards the new
    membership's thresholds, nor may an id beyond its weights). A weak certificate beyond our
    window with our own thresholds counts for nothing until the driver's chain answered."""
    from .quorum import Reached

    q = quorums_at(r, n)
    if q is r.quorums and (m := _chain_members(r, n)) is not None:
        q = _quorums_of(r.cfg, m)
    if q is not r.quorums:
        voters = [v for v in voters if v < len(q.weights)]
    reached = q.reached(voters)
    ch = r.chain
    if reached is Reached.WEAK and q is r.quorums and ch.follows and not ch.answered \
            and n > r.low_water_mark + r.log_window:
        if not ch.asked:
            ch.asked = True
            from .events import ChainWanted

            r._emit(ChainWanted(n))
        return Reached.NONE
    return reached


def learn_chain(r: "Replica", m: Optional[Membership]) -> None:
    """Driver input: the newest membership its chain certifies (checked by the driver: signatures
    of quorum weight of each membership before), or None if none is newer than ours; the
    checkpoints with votes beyond our window are looked at again. Call ``take_ready`` after."""
    ch = r.chain
    ch.known = m if m is not None and m.opens_at > r.members_from else None
    ch.answered, ch.asked = True, False
    for n in sorted({k for v in r.checkpoint_votes.votes.values() for k in v if k > r.low_water_mark}):
        r._check_stable(n)


def after_stable(r: "Replica", n: int) -> None:
    """Checkpoint n is stable and our state is checkpoint n's: if the membership in force after n
    (in checkpoint n's state) is not ours yet, switch to it. Drivers read ``MembershipSwitched``."""
    from .reconfig import config_at

    r.chain.answered = r.chain.asked = False  # (a later catch-up beyond the window asks the chain again)
    if r.retired or r._installing:
        return
    cs = config_at(r, n)
    m = cs.members_at(n + 1) if cs is not None else None
    if m is None or m.opens_at <= r.members_from or r.log.last_committed_exec < n:
        return
    switch(r, n, m, base_view(m.epoch, m.n))


def _drop_log(r: "Replica", floor: Optional[int] = None) -> None:
    """The old membership's log is dropped (what it holds is the old membership's to order): a
    tentative execution rolled back, its batches forgotten, no seqno assigned at or below
    ``floor`` (default: the last one assigned) or the last executed one."""
    log = r.log
    if log.last_exec > log.last_committed_exec:
        log.rollback()
    for d in list(log.batches):
        r.disk.forget_batch(d)
    for table in (log.slots, log.prepared, log.preprepared, log.batches, log.held_keys):
        table.clear()
    log.held.clear()
    log.seq_assigned = max(log.seq_assigned if floor is None else floor, log.last_exec)


def switch(r: "Replica", n: int, m: Membership, view: int) -> None:
    """The new membership is a fresh instance started from stable checkpoint n (its switch point
    or, for a replica that fetched a later checkpoint, that one): its configuration (n, f,
    weights: ``others``, ``quorums``, the codec's limits, the primary), an empty log above n,
    the views of the new epoch (from ``view``: its primary is replica 0, active at once), fresh
    view-change, status and budget bookkeeping. Messages of the old epoch are refused from now on
    (older views, seqnos at or below n; the old members' ids beyond n are not members). A
    replica beyond the new n retires (``MembershipSwitched.retired``): it takes part in no view and
    the members drop its frames as not a member's, but it still answers a lagging old member's
    Status with its checkpoint votes and serves state, until its driver stops it."""
    from .budgets import SenderBudgets
    from .checkpoints import CheckpointVotes
    from .events import MembershipSwitched
    from .status import StatusExchange
    from .view_change import ViewChanges

    old_n = r.cfg.n
    cfg = _adopt(r, m)
    _drop_log(r, n)
    r.checkpoint_votes = CheckpointVotes(r.log_window, r.checkpoint_interval)
    # the requests known so far are frames authenticated for the old members (a new member could
    # not check them in a batch): forgotten, as after a restart; clients retransmit to the new ones
    r.requests.restart()
    if view >= r.view:  # (an old-epoch view change to this view number is no view change here)
        r.view, r.view_active = view, not r.retired
    r.disk.view()
    r.vc, r.status, r.budgets = ViewChanges(r), StatusExchange(r, r.now), SenderBudgets(r)
    r._handlers = r._handler_table()
    r._emit(MembershipSwitched(n, m.opens_at, cfg.n, view, r.retired))
    if r.retired:
        return
    own = r.checkpoints.committed.get(n)
    if own is not None:
        from ..codec import seal
        from ..messages import Checkpoint

        r.checkpoint_votes.record(r.id, n, own)
        raw = seal(Checkpoint(n, own, r.id), r.keys)
        for j in range(old_n, cfg.n):  # the joiners: where to fetch the state from
            r._send_to(j, raw)
    r.vc.reset_timeout()
    if not r.view_active:
        # (a view change of the old epoch reached a view of this one: ours, for the new members)
        r.vc.send_view_change(r.view)
    if r.is_primary:
        r.log.try_send_preprepare()


def _adopt(r: "Replica", m: Membership) -> ClusterConfig:
    """Replica r's configuration becomes membership m's (thresholds, peers, the codec's limits)."""
    from ..codec import Codec
    from .quorum import Quorums

    cfg = cluster_config(r.cfg, m)
    r.cfg, r.codec, r.quorums, r.members_from = cfg, Codec(cfg), Quorums.of(cfg), m.opens_at
    r.retired = not cfg.is_replica(r.id)
    r.others = tuple(i for i in range(cfg.n) if i != r.id)  # (a retired replica's frames: not a member's)
    return cfg


def after_restore(r: "Replica") -> None:
    """A restart from stable storage restored checkpoint h (``durability.restore``): the
    membership in force after h (in h's state) is ours, whatever the driver's configuration said
    (cluster.toml's, for a runtime), and our view is at least its first one."""
    from .reconfig import config_at

    h = r.low_water_mark
    cs = config_at(r, h)
    m = cs.members_at(h + 1) if cs is not None else None
    if m is None:
        return
    if m.opens_at > r.members_from or (m.n, m.f, m.weights) != (r.cfg.n, r.cfg.f, tuple(r.cfg.weights)):
        _adopt(r, m)
    base = base_view(m.epoch, m.n)
    if r.view < base:
        r.view, r.view_active = base, not r.retired


def chain_newer(r: "Replica", head: Membership) -> Optional[Membership]:
    """Whether replica r should take ``head``, the last membership its driver's chain certifies:
    ``head`` if it is newer than r's, r is one of its members (and not retired), and it is not
    the change r's state records as pending (r switches to that one at its switch point);
    otherwise None. The drivers' common rule before ``rejoin``."""
    if head.opens_at <= r.members_from or r.id >= head.n or r.retired:
        return None
    rec = r.rs.config
    nxt = rec.latest.next_members if rec is not None and not r.needs_state else None
    if nxt is not None and nxt.opens_at == head.opens_at:
        return None
    return head


def rejoin_wanted(r: "Replica", head: Membership, n: int) -> Optional[Membership]:
    """At a ``ChainWanted`` for checkpoint n: the membership r rejoins (``rejoin``), if
    ``chain_newer`` gives one and n is after its switch point (f + 1 of r's old members vote for
    a checkpoint the new membership ordered: it is in force); otherwise None (r stays a member of
    its own membership, which may still need it to reach the switch point)."""
    m = chain_newer(r, head)
    return m if m is not None and n > m.opens_at else None


def rejoin(r: "Replica", m: Membership) -> None:
    """Driver input: replica r (restarted, or lagging behind a change it missed) is told by its
    driver's membership chain (checked: quorum weight of each membership before) that membership
    m, newer than r's and not a change r's state records, is in force: r takes part in m from
    now on as m's joiner (its thresholds, peers and views; nothing ordered at or below m's switch
    point, whose sequence numbers the memberships before ordered), keeps its state and catches up
    by a certified checkpoint of m like any lagging replica. The log of the old membership is
    dropped (what it holds is the old membership's to order)."""
    _drop_log(r)
    _adopt(r, m)
    from .budgets import SenderBudgets
    from .checkpoints import CheckpointVotes
    from .status import StatusExchange

    r.checkpoint_votes = CheckpointVotes(r.log_window, r.checkpoint_interval)
    r.requests.restart()  # (as at a switch: clients retransmit to the new members)
    r.status, r.budgets = StatusExchange(r, r.now), SenderBudgets(r)
    start_as_joiner(r, max(r.view, base_view(m.epoch, m.n)), m.opens_at)
    r.disk.view()


def start_as_joiner(r: "Replica", view: int, members_from: int) -> None:
    """A replica added by a membership change starts from nothing in the new epoch: in its base
    view (active), lagging; the members' Checkpoint of the switch point (and later ones, and
    their Status) make it fetch a certified checkpoint like any lagging replica."""
    r.view, r.view_active, r.members_from = view, True, members_from
    r.vc = type(r.vc)(r)
    r._handlers = r._handler_table()
