"""Seed sweeps under every network fault, and the checker's self-test (injected bugs)."""

import pytest

from pbft.config import KNOWN_BUGS
from pbft.sim.simulator import ALL_FAULTS, DISK_FAULTS, SimConfig, Simulation

FAULTS = frozenset(ALL_FAULTS)
WITH_DISK = frozenset(ALL_FAULTS + DISK_FAULTS)


def sweep(replicas: int, seeds: range, faults=FAULTS):
    failures = []
    ops = 0
    for seed in seeds:
        res = Simulation(SimConfig(seed=seed, replicas=replicas, faults=faults)).run()
        ops += res.ops_committed
        assert res.ops_committed > 0
        if not res.ok:
            failures.append((seed, res.violations[:3], res.liveness_failure))
    return failures, ops


@pytest.mark.slow
def test_sweep_200_seeds_n4_all_faults():
    failures, ops = sweep(4, range(200))
    assert failures == [], f"reproduce with: pbft sim --seeds 1 --first-seed SEED --faults all: {failures}"
    assert ops >= 200 * 90


@pytest.mark.slow
def test_sweep_50_seeds_n7_all_faults():
    failures, ops = sweep(7, range(1000, 1050))
    assert failures == [], f"reproduce with: pbft sim --replicas 7 --seeds 1 --first-seed SEED --faults all: {failures}"


@pytest.mark.slow
def test_sweep_150_seeds_n4_network_and_storage_faults():
    """Crashes that come back from a simulated disk (power loss, torn writes, corrupted records),
    whole-cluster power loss, proactive recoveries after corruption in memory or on disk."""
    failures, ops = sweep(4, range(150), WITH_DISK)
    assert failures == [], f"reproduce with: pbft sim --seeds 1 --first-seed SEED --faults all+disk: {failures}"


@pytest.mark.slow
def test_sweep_30_seeds_n7_network_and_storage_faults():
    failures, ops = sweep(7, range(2000, 2030), WITH_DISK)
    assert failures == [], (f"reproduce with: pbft sim --replicas 7 --seeds 1 --first-seed SEED --faults all+disk: "
                            f"{failures}")


@pytest.mark.slow
def test_sweep_weighted_quorums_all_faults():
    """Five replicas weighted 2,2,1,1,1 (f=1, W=7, W_byz=2, Q=5): safety and liveness hold."""
    for seed in range(30):
        res = Simulation(SimConfig(seed=seed, replicas=5, faults=FAULTS, cluster=dict(weights=(2, 2, 1, 1, 1)))).run()
        assert res.ok, (seed, res.violations[:3], res.liveness_failure)


@pytest.mark.slow
def test_sweep_n10_all_faults():
    for seed in range(3):
        res = Simulation(SimConfig(seed=seed, replicas=10, faults=FAULTS)).run()
        assert res.ok, (seed, res.violations[:3], res.liveness_failure)


# a bug that only a membership change exercises runs with one, under a closed-loop load
BUG_RUNS = {"order-beyond-switch-point": dict(membership=((30.0, 7),), clients=8, think_ms=(0.0, 0.0))}


@pytest.mark.parametrize("bug", sorted(KNOWN_BUGS))
def test_injected_bug_is_caught(bug):
    """S-28: each deliberately broken protocol variant must be reported within 50 seeds."""
    for seed in range(50):
        res = Simulation(SimConfig(seed=seed, faults=FAULTS, bugs=frozenset([bug]), **BUG_RUNS.get(bug, {}))).run()
        if res.violations:
            return
    pytest.fail(f"injected bug {bug} went unnoticed for 50 seeds")


def test_runs_are_reproducible_from_the_seed():
    a = Simulation(SimConfig(seed=42, faults=FAULTS), log_events=True).run()
    b = Simulation(SimConfig(seed=42, faults=FAULTS), log_events=True).run()
    assert (a.events, a.messages, a.sim_time_ms, a.log) == (b.events, b.messages, b.sim_time_ms, b.log)
