"""A replica replaced: its machine lost, its id back on a new one with nothing stored.

What ``pbft reconfig replace-replica ID`` and a fresh data directory do in the runtime, modelled
in the simulation (the scripted fault ``replace``, ``SimConfig.script``): the replica's process
stops and a new ``Replica`` starts under the same id with an empty store, an empty state and no
log, as the runtime builds a replica that finds nothing stored (``runtime.node``): in view 0 of
the genesis configuration, or as a joiner of the membership in force when a membership change
opened a later one. It catches up like any lagging replica, by the state transfer of a certified
checkpoint. (Its keys stay the simulation's: the new key ``replace-replica`` gives the id in the
runtime is not modelled.)

Until then it has forgotten what it sent: a primary may pre-prepare other requests at sequence
numbers it had assigned, a backup may send a view change without the certificates it had
prepared. So it counts against f and its traces are not checked by the oracles (those that
assume a replica remembers its messages), until it holds the state of a stable checkpoint (from a
state transfer, or its own execution) that covers every sequence number the lost incarnation had
touched: from there on nothing it sends can contradict what it sent before, and it is checked
again like any correct replica.

The scripted fault ``replace-in-view-change`` arms a replacement for the next view change a
correct replica starts: the replica is replaced right after that step, before any new view is
installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..core import membership
from ..core.ready import Ready
from ..core.replica import Replica
from ..services.kv import KVService
from ..storage.memory import MemStore

if TYPE_CHECKING:
    from .simulator import Simulation


@dataclass
class Replaced:
    """One replacement of replica ``replica`` at ``at`` (simulated ms)."""

    replica: int
    at: float
    bound: int  # the highest sequence number the lost incarnation had touched
    old_view: int
    in_view_change: bool  # a correct replica was changing view, no new view installed for it yet
    others_stable: int  # the highest low water mark of the other correct replicas then
    caught_up_at: Optional[float] = None  # when it held a stable checkpoint's state covering ``bound``
    fetches: int = 0  # state transfers it completed
    executed: int = 0  # batches it executed (committed or tentative) since it was replaced
    executed_checked: int = 0  # ... since it was checked again


@dataclass
class Replacements:
    sim: "Simulation"
    armed: list[int] = field(default_factory=list)  # replicas to replace at the next view change
    done: list[Replaced] = field(default_factory=list)
    pending: dict[int, Replaced] = field(default_factory=dict)  # replaced, not caught up yet

    def arm(self, r: int) -> None:
        self.armed.append(r)

    def replace(self, r: int) -> None:
        """Replica r's machine is lost; a fresh one runs under its id from now on."""
        sim = self.sim
        if sim.healed or r in sim.byz or r in sim.retired or not sim.cfg.is_replica(r):
            return
        old = sim.replicas[r]
        bound = max([old.log.seq_assigned, old.last_exec, old.low_water_mark, *old.log.slots])
        changing = [sim.replicas[i] for i in sim.correct if i == r or i not in sim.crashed]
        in_vc = any(not x.view_active and x.view not in sim.oracles.views_installed for x in changing)
        rep, events = self._fresh(r)
        sim.crashed.discard(r)
        sim.recovering.discard(r)
        sim.corrupted.discard(r)
        sim.repairing.discard(r)
        sim.replicas[r] = rep
        sim.inbox[r].clear()
        sim.deficit[r].clear()
        sim.rr[r].clear()
        sim.oracles.correct.discard(r)
        sim.oracles.rebase(r, rep)
        stable = max((sim.replicas[i].low_water_mark for i in sim.correct if i != r), default=0)
        rec = Replaced(r, sim.now, bound, old.view, in_vc, stable)
        self.done.append(rec)
        self.pending[r] = rec
        sim._on_events(r, events)
        sim._note(f"replica {r} replaced: a fresh replica in view {rep.view} (the lost one had touched "
                  f"seqno {bound} in view {old.view}){' during a view change' if in_vc else ''}")
        sim._schedule_wake(r)

    def _fresh(self, r: int) -> tuple[Replica, list]:
        """The replica the runtime builds on a machine with nothing stored, and the events of its
        start (its records and messages go with its first step, as after a reboot)."""
        sim = self.sim
        base, _n, members_from = sim.oracles.epochs[-1]
        cfg = sim.cfg if members_from else sim.genesis_cfg
        if sim.chains is not None:
            # (the runtime's start asks the replicas for their chains: the membership they certify)
            m = sim.chains.started(r, lost=True)
            members_from = m.opens_at
            base = membership.base_view(m.epoch, m.n) if members_from else 0
            cfg = membership.cluster_config(sim.genesis_cfg, m) if members_from else sim.genesis_cfg
        rep = Replica(cfg, r, sim.rings[r], KVService(skew_ms=sim.cfg.nondet_skew_ms_max), now=sim._local(r),
                      genesis_config=sim.genesis)
        events: list = []
        if r in sim.stores:
            sim.stores[r] = MemStore(durable=sim.storage == "durable")
            rep.enable_persistence()
            rep.restore({}, frozenset())
            ready = rep.take_ready()
            sim.carried[r] = Ready(ready.persist, ready.sends)
            events = ready.events
        else:
            sim.carried.pop(r, None)
        if members_from:
            membership.start_as_joiner(rep, base, members_from)
        if sim.chains is not None:
            sim.chains.follow(rep)
        return rep, events

    def on_event(self, r: int, ev) -> None:
        """Before the oracles see replica r's event: a replaced replica's catch-up."""
        kind = ev.kind
        if kind == "view-change" and self.armed and r in self.sim.correct and r not in self.pending:
            from .simulator import FAULT

            for x in self.armed:  # (right after this step: before any new view is installed)
                self.sim._push(self.sim.now, FAULT, "replace", x)
            self.armed = []
        rec = self.pending.get(r)
        if rec is None:
            for d in self.done:
                if d.replica == r and kind == "execute":
                    d.executed += 1
                    if d.caught_up_at is not None:
                        d.executed_checked += 1
            return
        if kind == "state-transfer":
            rec.fetches += 1
        elif kind == "execute":
            rec.executed += 1
        if kind in ("state-transfer", "stable", "execute"):
            rep = self.sim.replicas[r]
            # (a stable checkpoint's certificate moves the low water mark before its state is here)
            if rep.fetch_target is None and not rep.needs_state \
                    and rep.last_exec >= rep.low_water_mark >= max(rec.bound, 1):
                rec.caught_up_at = self.sim.now
                del self.pending[r]
                self.sim.oracles.rebase(r, rep)
                self.sim.oracles.correct.add(r)
                self.sim._note(f"replica {r} caught up at checkpoint {rep.low_water_mark}: checked again")

    def faulty(self) -> set[int]:
        return set(self.pending)
