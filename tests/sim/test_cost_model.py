"""The calibrated cost model: the relative orderings the live runtime shows, which hold by wide
margins in the deterministic simulator (the absolute figures are printed by
benchmarks/sim_vs_live.py, not tested)."""

from dataclasses import replace

import pytest

from pbft.messages import Tag
from pbft.sim.cpus import CLIENT_PROC
from pbft.sim.simulator import CostModel, SimConfig, Simulation

WINDOW = (100.0, 400.0)


def _bench(arg: int, res: int, ro: bool, clients: int, cost: CostModel) -> dict:
    sc = SimConfig(1, clients=clients, ops=1_000_000, think_ms=(0.0, 0.0), cost=cost, bench=(arg, res, ro),
                   net_ms=(0.01, 0.03), fault_phase_ms=WINDOW[1], stop_at_heal=True, keys=1, idle_bound_ms=None,
                   quiesce_ms=200.0, cpu_samples_ms=WINDOW)
    sim = Simulation(sc)
    res_ = sim.run()
    assert res_.ok, (res_.violations, res_.liveness_failure)
    lo, hi = WINDOW
    done = [k for k in sim.history if k.ret is not None and lo <= k.ret <= hi and k.client in sim.clients]
    a, b = sim.cpu_samples
    used = {p: b["used"].get(p, 0.0) - a["used"].get(p, 0.0) for p in b["used"]}
    wait = sum(b["wait"].get(p, 0.0) - a["wait"].get(p, 0.0) for p in b["wait"])
    n = len(done)
    assert n > 0
    return {"ops": n, "replica_us": sum(used.get(r, 0.0) for r in range(4)) * 1000 / n / 4,
            "client_us": used.get(CLIENT_PROC, 0.0) * 1000 / n, "wait_us": wait * 1000 / n,
            "p50": sorted(k.ret - k.invoke for k in done)[n // 2]}


def test_charge_grows_with_size_and_work():
    C = CostModel()
    small = C.charge_us(200, 1, 0, 0, 0, Tag.REQUEST)
    assert C.charge_us(4200, 1, 0, 0, 0, Tag.REQUEST) > small
    assert C.charge_us(30_200, 1, 0, 0, 0, Tag.REQUEST) > C.charge_us(4200, 1, 0, 0, 0, Tag.REQUEST)
    # a request costs more than a protocol message of its size; executing costs more again
    assert small > C.charge_us(200, 1, 0, 0, 0, Tag.PREPARE)
    assert C.charge_us(200, 2, 1, 0, 0, Tag.PREPARE) > C.charge_us(200, 1, 0, 0, 0, Tag.PREPARE)
    # a frame dropped before its MAC costs less than one that is checked
    assert C.charge_us(200, 0, 0, 0, 0, -1) < C.charge_us(200, 1, 0, 0, 0, Tag.PREPARE)


@pytest.mark.slow
def test_shared_cpus_orderings():
    shared = CostModel(cores=2)
    rw32 = _bench(0, 0, False, 32, shared)
    rw1 = _bench(0, 0, False, 1, shared)
    ro1 = _bench(0, 0, True, 1, shared)
    big = _bench(4096, 0, False, 32, shared)
    # one client: every message wakes a process and rides alone, so an operation costs several
    # times the CPU it costs under load (live: ~320 against ~49 us per replica)
    assert rw1["replica_us"] > 3 * rw32["replica_us"]
    assert rw1["client_us"] > rw32["client_us"]
    # read-only operations skip agreement: cheaper and faster than read-write ones
    assert ro1["replica_us"] < rw1["replica_us"] / 2 and ro1["p50"] < rw1["p50"]
    # 4 KB arguments cost the replicas more per operation than empty ones
    assert big["replica_us"] > rw32["replica_us"] * 1.2
    # five processes on two CPUs wait for one under load; with a CPU each they hardly do
    own = _bench(0, 0, False, 32, replace(shared, cores=5))
    assert rw32["wait_us"] > 4 * own["wait_us"]
    # and one CPU for all of them does less than two
    one = _bench(0, 0, False, 32, replace(shared, cores=1))
    assert one["ops"] < rw32["ops"] * 0.75


def test_default_is_one_cpu_per_replica():
    """Without ``cores`` the clients cost nothing and no process waits for another's CPU (the
    model the scenarios' throughput floors were set with)."""
    r = _bench(0, 0, False, 8, CostModel())
    assert r["client_us"] == 0.0 and r["wait_us"] == 0.0 and r["replica_us"] > 0.0
