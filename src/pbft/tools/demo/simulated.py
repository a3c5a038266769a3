"""``pbft demo``: a short narrated simulation of a 4-replica cluster.

Three clients run a key-value workload; the primary crashes; the backups'
request timers expire, they change view without signatures, the new primary
re-proposes what had prepared, the workload continues, the old primary comes
back and catches up.  Everything runs in simulated time, checked by the same
oracles as ``pbft sim``.
"""

from __future__ import annotations

import sys

from ...codec import NULL_BATCH_DIGEST
from ...sim.simulator import SimConfig, Simulation

CRASH_AT_MS = 60.0
RESTART_AT_MS = 1500.0


def run_demo(seed: int = 7, out=sys.stdout) -> int:
    def say(sim, text):
        print(f"  t={sim.now:8.1f}ms  {text}", file=out)

    state = {"requests": 0, "last_report": 0.0, "views": set(), "vc_started": set()}

    def observer(sim, r, ev):
        kind = ev.kind
        if kind == "execute" and r == 1:
            state["requests"] += len(ev.requests)
            if sim.now - state["last_report"] >= 100.0 or state["last_report"] == 0.0:
                state["last_report"] = sim.now
                say(sim, f"replica 1 has executed {ev.seqno} batches, {state['requests']} requests "
                         f"(each prepared and committed by a quorum of 3)")
        elif kind == "view-change" and ev.view not in state["vc_started"]:
            state["vc_started"].add(ev.view)
            say(sim, f"replica {r} starts a view change to view {ev.view} ({ev.reason}); "
                     f"it sends ViewChange, the others answer with ViewChangeAcks")
        elif kind == "new-view" and ev.view not in state["views"]:
            state["views"].add(ev.view)
            dec = ev.decision
            real = sum(1 for _, d in dec.chosen if d != NULL_BATCH_DIGEST)
            say(sim, f"replica {r} is the primary of view {ev.view}: NewView from checkpoint "
                     f"{dec.checkpoint_seqno}, re-proposing {real} sequence number(s)")
        elif kind == "state-transfer":
            say(sim, f"replica {r} fetched the checkpoint at seqno {ev.seqno} from its peers (state transfer)")
        elif kind == "stable" and r == 1 and ev.seqno % 32 == 0:
            say(sim, f"checkpoint {ev.seqno} is stable (2f+1 matching digests): log garbage-collected")

    sc = SimConfig(seed=seed, replicas=4, clients=3, ops=40, faults=frozenset(),
                   fault_phase_ms=RESTART_AT_MS, script=((CRASH_AT_MS, "crash", 0),))
    sim = Simulation(sc, log_events=True, observer=observer)
    print("pbft demo: 4 replicas tolerate f=1 Byzantine fault; 3 clients run a key-value workload", file=out)
    print("  (simulated network and time; every step checked by the safety oracles)\n", file=out)
    # narrate scripted faults as they happen
    orig_fault = sim._fault

    def fault(kind, arg):
        if kind == "crash-one":
            say(sim, f"*** replica {arg}, the primary of view 0, crashes ***")
        elif kind == "heal":
            say(sim, "replica 0 restarts; it rejoins and catches up from its peers")
        orig_fault(kind, arg)

    sim._fault = fault  # type: ignore[method-assign]
    say(sim, "view 0: replica 0 is the primary")
    res = sim.run()
    print(file=out)
    digests = {r.state_digest().hex()[:16] for r in sim._settled()}
    print(f"result: {res.ops_committed} client operations completed, "
          f"{res.view_changes} view change(s), simulated time {res.sim_time_ms:.0f}ms", file=out)
    for r in sim.replicas:
        print(f"  replica {r.id}: view {r.view}, executed up to seqno {r.last_committed_exec}, "
              f"stable checkpoint {r.low_water_mark}, state digest {r.state_digest().hex()[:16]}", file=out)
    ok = res.ok and len(digests) == 1
    print(f"oracles: {len(res.violations)} safety violations, "
          f"{'history linearizable, ' if not res.violations else ''}"
          f"{'replicas agree' if len(digests) == 1 else 'replicas DIVERGED'}", file=out)
    for v in res.violations[:5]:
        print(f"  violation: {v}", file=out)
    if res.liveness_failure:
        print(f"  liveness: {res.liveness_failure}", file=out)
    return 0 if ok else 1
