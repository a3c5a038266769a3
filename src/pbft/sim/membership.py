"""The simulator's administrator of membership changes (``SimConfig.membership``).

What a deployment's driver does around ``core.membership``, modelled in the simulation: a
genesis configuration with an administrator (every simulated client admitted), the
``set-membership`` request sent at a scripted time, the added replicas started as joiners of the
new epoch once the change is recorded (their ids were reserved as replica slots), the clients
moved to the new members when the first replica switches (as a client reading the new
configuration would), and a retired replica counted for nothing once it reports its switch (it
runs on: a replica lagging behind the switch may need its checkpoint votes and state).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

import nacl.signing

from ..core import membership
from ..core.client import Client
from ..core.reconfig import decode_result, encode_request, genesis_record
from ..core.replica import Replica
from ..services.kv import KVService

if TYPE_CHECKING:
    from .simulator import Simulation


def slots_for(replicas: int, changes: tuple) -> int:
    """The replica slots a run needs: its largest membership."""
    return max([replicas] + [m for _, m in changes])


class Administrator:
    """The administrator client of a simulation with membership changes."""

    def __init__(self, sim: "Simulation", admin_id: int):
        self.sim = sim
        self.id = admin_id
        seed = sim.sc.seed
        self.public = {p: bytes(nacl.signing.SigningKey(random.Random(f"{seed}/ed25519/{p}").randbytes(32)).verify_key)
                       for p in list(range(sim.slots)) + list(sim.cfg.client_ids)}
        n = sim.cfg.n
        self.genesis = genesis_record([self.public[i] for i in range(n)],
                                      {c: self.public[c] for c in sim.cfg.client_ids}, [admin_id])
        self.client = Client(sim.cfg, admin_id, sim.rings[admin_id])
        self.switched: set[int] = set()  # the switch points the clients were moved at
        self.results: list[dict] = []
        self.target: Optional[int] = None
        self.joiners: list[int] = []

    def start_change(self, new_n: int) -> None:
        """Send ``set-membership`` to ``new_n`` replicas (the largest f for it, unit weights)."""
        sim = self.sim
        old_n = sim.cfg.n
        added = [[i, self.public[i]] for i in range(old_n, new_n)]
        op = encode_request("set-membership", new_n, (new_n - 1) // 3, [1] * new_n, added)
        self.target = new_n
        sim._note(f"administrator: set-membership {old_n} -> {new_n}")
        if self.client.busy:
            return  # (one change at a time: scripted changes are far apart)
        t = self.client.invoke(op, False, sim.now)
        sim.oracles.issued.add((self.id, t, op))
        sim._flush(self.id)
        sim._schedule_wake(self.id)

    def on_outcomes(self) -> None:
        for oc in self.client.take_outcomes():
            try:
                res = decode_result(oc.result)
            except ValueError:
                self.sim.oracles.violation("administrator accepted a malformed configuration result")
                continue
            self.results.append(res)
            self.sim._note(f"administrator: {res}")
            if res.get("ok") and "members_at" in res and self.target is not None:
                self._start_joiners(membership.base_view(res["epoch"], self.target), res["members_at"],
                                    self.target)

    def _start_joiners(self, view: int, members_from: int, new_n: int) -> None:
        sim = self.sim
        cfg = sim.cfg
        if new_n <= cfg.n:
            return
        new_cfg = replace(cfg, n=new_n, f=(new_n - 1) // 3, weights=(1,) * new_n, replica_slots=sim.slots)
        for i in range(cfg.n, new_n):
            if i < len(sim.replicas) and sim.replicas[i].members_from == members_from:
                continue  # (started already)
            rep = Replica(new_cfg, i, sim.rings[i], KVService(skew_ms=cfg.nondet_skew_ms_max), now=sim._local(i),
                          genesis_config=self.genesis)
            membership.start_as_joiner(rep, view, members_from)
            if sim.chains is not None:
                sim.chains.follow(rep)
            if i < len(sim.replicas):
                sim.replicas[i] = rep
            else:
                assert i == len(sim.replicas)
                sim.replicas.append(rep)
            sim.retired.discard(i)
            self.joiners.append(i)  # (counted for liveness from the switch on: ``on_switched``)
            sim.oracles.correct.add(i)
            sim.oracles.rebase(i, rep)
            if sim.chains is not None:
                sim.chains.started(i, lost=True)  # (a joiner asks the replicas for their chains)
            sim._note(f"replica {i} starts as a joiner of view {view}")
            sim._schedule_wake(i)

    def on_switched(self, r: int, ev) -> None:
        """Replica r switched (``MembershipSwitched``)."""
        sim = self.sim
        if ev.retired:
            sim.retired.add(r)
            sim.recovering.discard(r)  # (a recovery under way ends with the replica)
            if r in sim.correct:
                sim.correct.remove(r)
            sim._note(f"replica {r} retired at {ev.seqno}")
            return
        if ev.members_from in self.switched:
            return
        self.switched.add(ev.members_from)
        # (the switch may come before the administrator's reply: the added replicas start now)
        self._start_joiners(ev.view, ev.members_from, ev.n)
        new_cfg = sim.replicas[r].cfg
        sim.cfg = new_cfg
        for j in self.joiners:
            if j not in sim.correct and j < new_cfg.n:
                sim.correct.append(j)
        self.joiners = []
        # the replicas leaving are not counted for liveness any more (each retires when it learns
        # that the switch point is stable, or never if it lags: it is no member to wait for)
        sim.correct[:] = [i for i in sim.correct if i < new_cfg.n]
        sim.recovering -= {i for i in sim.recovering if i >= new_cfg.n}
        for c in list(sim.clients.values()) + [self.client]:
            c.set_membership(new_cfg, ev.view)
        sim._note(f"clients move to the {new_cfg.n} replicas of view {ev.view}")
