"""Oracles: what must hold in every simulated run, checked as the run goes.

The simulator feeds every replica's events (``pbft.core.events``, from each step's ``Ready``) to
``Oracles.on_event`` and calls ``after_step`` after every event it processes.  Violations are
collected as strings (the first few are kept with their simulated time).

Checked (the safety properties of docs/simulation.md, and invariants of PBFT's correctness proof):

* S1 agreement: no two replicas execute different batches (by recomputed
  content digest) at one sequence number once the execution is committed;
* S2 validity: every executed request was issued by a client;
* S3 exactly-once: no replica executes (client, timestamp) twice;
* S4 checkpoints: equal digests at every checkpoint sequence number, and the
  digest binds the sequence number and the state (recomputed here);
* S5/S6 linearizability and no lost acknowledged operation (end of run, see
  ``final_checks`` and ``linearizability``);
* R1 bounded log: slots within (h, h+L], bounded queues and tables;
* P1 (proof: prepared uniqueness) no two replicas prepare different digests
  for the same (view, seqno);
* P2 (proof: a correct primary's pre-prepares) one digest per (view, seqno);
* P3 (proof: committed requests survive view changes) every new view
  installed after (v, n, d) committed-local re-proposes d at n, unless its
  checkpoint covers n;
* P4 (proof: new-view uniqueness) replicas that install view v install the
  same decision when the primary of v is correct;
* P5 monotonicity: a replica's view and low water mark never decrease; its
  last executed sequence number never passes its high water mark.
* S7 fetch targets: a correct replica sets out to fetch only a checkpoint digest the correct
  replicas hold at that sequence number (checked when both are known);
* M1 membership changes: no sequence number after a change's switch point commits in a view of
  the old membership, and each membership's first view is above the last one's.
"""

from __future__ import annotations

from typing import Optional

from ..codec import Codec, DecodeError, checkpoint_digest
from ..core.events import (
    CheckpointTaken, Committed, Event, Executed, MembershipSwitched, NewViewInstalled, Prepared, PrePrepareSent,
    Promoted, RolledBack, Stable, StateTransferred, ViewChangeStarted,
)
from ..messages import RECOVERY_OP


class Oracles:
    def __init__(self, codec: Codec, n: int, window: int, ckpt_interval: int, pending_max: int,
                 members: Optional[int] = None):
        """``n``: the replica ids (every replica slot); ``members``: the replicas at the start
        (default n), whose number a membership change changes from its epoch's first view on."""
        self.codec = codec
        self.n = n
        # membership epochs: (first view, replicas, switch point), from MembershipSwitched events
        self.epochs: list[tuple[int, int, int]] = [(0, members or n, 0)]
        self.committed_views: dict[int, int] = {}  # seqno -> the lowest view it committed in
        self.log_window = window
        self.checkpoint_interval = ckpt_interval
        self.pending_max = pending_max
        self.violations: list[str] = []
        self.now = 0.0
        self.issued: set[tuple[int, int, bytes]] = set()
        self.prepared: dict[tuple[int, int], bytes] = {}
        self.preprepared: dict[tuple[int, int], bytes] = {}
        self.committed_local: dict[int, dict[bytes, int]] = {}  # n -> digest -> lowest view
        self.new_views: dict[int, object] = {}  # view -> decision
        self.committed_exec: dict[int, bytes] = {}  # n -> content digest
        self.ckpt: dict[int, bytes] = {}
        self.execs: list[dict[int, tuple[bytes, tuple, bool]]] = [dict() for _ in range(n)]
        self.done: list[set[tuple[int, int]]] = [set() for _ in range(n)]
        self.view = [0] * n
        self.low_water_marks = [0] * n
        self.views_installed: set[int] = set()
        self.correct: set[int] = set(range(n))  # Byzantine replicas' traces are not checked
        self.fetches: dict[int, dict[bytes, int]] = {}  # seqno -> fetch target digest -> a replica (S7)
        self.fetches_wrong: set[tuple[int, int, bytes]] = set()  # (reported once each)

    def rebase(self, r: int, rep) -> None:
        """Replica r came back from its disk (or was repaired by a recovery): what it executed
        before is behind the state it restored; check it from here on."""
        self.execs[r] = {}
        self.done[r] = set()
        self.low_water_marks[r] = rep.low_water_mark
        self.view[r] = rep.view

    def violation(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"t={self.now:.1f}ms {what}")

    # ---- events -------------------------------------------------------------
    def on_event(self, r: int, ev: Event) -> None:
        if r not in self.correct:
            return
        if isinstance(ev, Prepared):
            v, n, d = ev.view, ev.seqno, ev.digest
            old = self.prepared.setdefault((v, n), d)
            if old != d:
                self.violation(f"P1 replica {r} prepared a different digest at view {v} seqno {n}")
        elif isinstance(ev, PrePrepareSent):
            v, n, d = ev.view, ev.seqno, ev.digest
            old = self.preprepared.setdefault((v, n), d)
            if old != d:
                self.violation(f"P2 primary {r} pre-prepared two digests at view {v} seqno {n}")
        elif isinstance(ev, Committed):
            v, n, d = ev.view, ev.seqno, ev.digest
            ds = self.committed_local.setdefault(n, {})
            ds[d] = min(v, ds.get(d, v))
            if len(ds) > 1:
                self.violation(f"P3 different digests committed at seqno {n}: replica {r} view {v}")
            self.committed_views[n] = min(v, self.committed_views.get(n, v))
            self._check_epochs(n, v, r)
            for nv, dec in self.new_views.items():
                if nv > v:
                    self._check_new_view_keeps(nv, dec, n, d, v)
        elif isinstance(ev, Executed):
            n, batch, executed, tentative = ev.seqno, ev.batch, ev.requests, ev.tentative
            try:
                content = self.codec.batch_digest(batch)
            except DecodeError:
                content = b"undecodable"
            self.execs[r][n] = (content, executed, tentative)
            for c, t, op in executed:
                if c < self.n and op.startswith(RECOVERY_OP):
                    continue  # a replica's recovery request (the library handles it)
                if (c, t, op) not in self.issued:
                    self.violation(f"S2 replica {r} executed a request never issued: client {c} ts {t}")
            if not tentative:
                self._commit_exec(r, n)
        elif isinstance(ev, Promoted):
            upto = ev.upto
            for n in sorted(k for k, e in self.execs[r].items() if k <= upto and e[2]):
                self._commit_exec(r, n)
        elif isinstance(ev, RolledBack):
            target = ev.to_seqno
            for n in [k for k in self.execs[r] if k > target]:
                if not self.execs[r][n][2]:
                    self.violation(f"rollback of committed execution at replica {r} seqno {n}")
                del self.execs[r][n]
        elif isinstance(ev, (CheckpointTaken, StateTransferred)):
            n, d, sdig = ev.seqno, ev.digest, ev.state_root
            if checkpoint_digest(n, sdig) != d:
                self.violation(f"S4 replica {r} checkpoint digest at {n} does not bind seqno and state")
            old = self.ckpt.setdefault(n, d)
            if old != d:
                self.violation(f"S4 replica {r} checkpoint {n} digest differs from another replica's")
            for fd, fr in self.fetches.pop(n, {}).items():
                self._check_fetch(fr, n, fd)
            if isinstance(ev, StateTransferred):
                for k in [k for k in self.execs[r] if k <= n]:
                    del self.execs[r][k]
        elif isinstance(ev, ViewChangeStarted):
            v = ev.view
            if v < self.view[r]:
                self.violation(f"P5 replica {r} view decreased {self.view[r]} -> {v}")
            self.view[r] = v
        elif isinstance(ev, NewViewInstalled):
            v, dec = ev.view, ev.decision
            self.views_installed.add(v)
            old_dec = self.new_views.setdefault(v, dec)
            # (a Byzantine primary may send different, each self-consistent, new views)
            if old_dec != dec and self.primary(v) in self.correct:
                self.violation(f"P4 replica {r} installed a different new-view decision for view {v}")
            for n, ds in self.committed_local.items():
                for d, cv in ds.items():
                    if cv < v:
                        self._check_new_view_keeps(v, dec, n, d, cv)
        elif isinstance(ev, MembershipSwitched):
            base, n = ev.view, ev.n
            if not ev.retired and all(e[0] != base for e in self.epochs):
                if base <= self.epochs[-1][0]:
                    self.violation(f"M1 replica {r} opened membership epoch at view {base}, not above the last one")
                self.epochs.append((base, n, ev.members_from))
                for k, cv in self.committed_views.items():
                    self._check_epochs(k, cv, r)
        elif isinstance(ev, Stable):
            n = ev.seqno
            if n < self.low_water_marks[r]:
                self.violation(f"P5 replica {r} low water mark decreased")
            self.low_water_marks[r] = n
            for k in [k for k in self.execs[r] if k <= n and not self.execs[r][k][2]]:
                del self.execs[r][k]

    def primary(self, v: int) -> int:
        """The primary of view v: of the membership whose epoch v is in."""
        return v % max((e for e in self.epochs if e[0] <= v), key=lambda e: e[0])[1]

    def _check_epochs(self, n: int, v: int, r: int) -> None:
        """M1: a membership orders nothing after the switch point of the next one (a seqno above
        the switch point committed in a view of an earlier epoch)."""
        for base, _members, switch in self.epochs[1:]:
            if v < base and n > switch:
                self.violation(f"M1 seqno {n} committed in view {v} (replica {r}), beyond the switch point "
                               f"{switch} of the membership from view {base}")

    def _check_new_view_keeps(self, nv: int, dec, n: int, d: bytes, cv: int) -> None:
        if n <= dec.checkpoint_seqno:
            return
        chosen = dict(dec.chosen)
        if chosen.get(n) != d:
            self.violation(f"P3 request committed at seqno {n} in view {cv} not kept by new view {nv}")

    def _commit_exec(self, r: int, n: int) -> None:
        content, executed, _ = self.execs[r][n]
        self.execs[r][n] = (content, executed, False)
        old = self.committed_exec.setdefault(n, content)
        if old != content:
            self.violation(f"S1 replica {r} executed a different batch at seqno {n}")
        done = self.done[r]
        for c, t, _op in executed:
            if (c, t) in done:
                self.violation(f"S3 replica {r} executed client {c} timestamp {t} twice")
            done.add((c, t))

    def _check_fetch(self, r: int, n: int, d: bytes) -> None:
        if self.ckpt[n] != d and (r, n, d) not in self.fetches_wrong:
            self.fetches_wrong.add((r, n, d))
            self.violation(f"S7 replica {r} set out to fetch checkpoint {n} with a digest no correct replica holds")

    # ---- after every step ---------------------------------------------------
    def after_step(self, rep) -> None:
        r = rep.id
        t = rep.fetch_target
        if t is not None and r in self.correct:
            if t[0] in self.ckpt:
                self._check_fetch(r, t[0], t[1])
            else:
                self.fetches.setdefault(t[0], {}).setdefault(t[1], r)
        h, L = rep.low_water_mark, self.log_window
        if len(rep.log.slots) > L or any(not (h < k <= h + L) for k in rep.log.slots):
            self.violation(f"R1 replica {r} log outside (h, h+L]: h={h} slots={sorted(rep.log.slots)[:3]}...")
        if rep.last_committed_exec > h + L:
            self.violation(f"P5 replica {r} executed past its high water mark")
        rq = rep.requests
        if max(len(rq.queue), len(rq.pending), len(rq.ro_queue), len(rq.known)) > self.pending_max:
            self.violation(f"R1 replica {r} request queues unbounded")
        if len(rep.checkpoints.committed) > L // self.checkpoint_interval + 2 or len(rep.log.exec_log) > L:
            self.violation(f"R1 replica {r} checkpoint store or execution log unbounded")
        if rep.view != self.view[r] and rep.view < self.view[r]:
            self.violation(f"P5 replica {r} view decreased")
