"""Named scenarios in the deterministic simulator (the catalogue's crash and network parts, docs/adversaries.md)."""

import pytest

from pbft.sim.simulator import SimConfig, Simulation

HALVES = [(a, b) for a in (0, 1) for b in (2, 3)] + [(b, a) for a in (0, 1) for b in (2, 3)]


def isolate(x, n=4):
    return [(x, y) for y in range(n) if y != x] + [(y, x) for y in range(n) if y != x]


def run(observer=None, **kw):
    sim = Simulation(SimConfig(**kw), observer=observer)
    res = sim.run()
    assert res.violations == []
    assert res.liveness_failure is None
    return sim, res


@pytest.mark.parametrize("n", [4, 7])
def test_primary_crashes_mid_batch(n):
    sim, res = run(seed=11, replicas=n, script=((25.0, "crash", 0),), fault_phase_ms=1500.0)
    assert res.view_changes >= 1
    assert res.ops_committed == 3 * 30 + 4


def test_f_consecutive_primaries_crashed():
    # n=7, f=2: primaries of views 0 and 1 both down; progress within f+1 view changes
    sim, res = run(seed=3, replicas=7, script=((25.0, "crash", 0), (25.0, "crash", 1)), fault_phase_ms=4000.0)
    assert max(r.view for r in sim.replicas) >= 2
    assert res.ops_committed == 3 * 30 + 4


def test_partition_in_halves_commits_nothing_then_heals():
    committed_during = []

    def watch(sim, r, ev):
        if ev.kind == "committed" and 100.0 < sim.now < 700.0:
            committed_during.append((sim.now, r, ev))

    sim, res = run(seed=5, script=((100.0, "block", HALVES), (700.0, "unpartition", None)),
                   fault_phase_ms=800.0, observer=watch)
    # messages already in flight at the cut may still land for a moment; afterwards neither half
    # (2 of 4 replicas) can form a quorum
    assert all(t < 105.0 for t, _, _ in committed_during)
    assert res.ops_committed == 3 * 30 + 4


def test_isolated_primary_is_replaced_while_partitioned():
    progress = []

    def watch(sim, r, ev):
        if ev.kind == "new-view" and sim.now < 2000.0:
            progress.append(ev.view)

    sim, res = run(seed=8, script=((50.0, "block", isolate(0)),), fault_phase_ms=2000.0, observer=watch)
    assert progress, "the three connected replicas change view while the old primary is cut off"
    assert res.ops_committed == 3 * 30 + 4


def test_one_way_partition_primary_cannot_send():
    sim, res = run(seed=9, script=((50.0, "block", [(0, 1), (0, 2), (0, 3)]),), fault_phase_ms=1500.0)
    assert res.view_changes >= 1


def test_lagging_replica_beyond_three_windows_catches_up():
    transfers = []

    def watch(sim, r, ev):
        if ev.kind == "state-transfer" and r == 3:
            transfers.append(ev.seqno)

    cluster = dict(checkpoint_interval_seqnos=4, log_window_seqnos=8)
    sim, res = run(seed=2, ops=40, cluster=cluster, script=((5.0, "crash", 3),), fault_phase_ms=1200.0,
                   observer=watch)
    assert transfers and transfers[-1] > 3 * 8, "replica 3 fetched a checkpoint more than 3 windows ahead"
    settled = sim._settled()
    assert sim.replicas[3] in settled
    assert len({r.state_digest() for r in settled}) == 1


@pytest.mark.parametrize("seed", range(5))
def test_loss_duplication_and_replay(seed):
    sim, res = run(seed=seed, faults=frozenset({"loss", "dup", "replay"}), fault_phase_ms=1500.0)
    drops = {}
    for r in sim.replicas:
        for k, v in r.drops.items():
            drops[k] = drops.get(k, 0) + v
    assert sum(v for k, v in drops.items() if "duplicate" in k or "old" in k or "retransmitted" in k) > 0


def test_spliced_preprepares_are_rejected():
    # the network swaps old batches into new pre-prepares (MACs still valid): digests catch it
    total = 0
    for seed in range(10):
        sim, res = run(seed=seed, faults=frozenset({"replay"}), fault_phase_ms=1500.0)
        total += sum(r.drops.get("batch-digest-mismatch", 0) for r in sim.replicas)
    assert total > 0


def test_free_replica_slots_change_nothing_but_the_client_ids():
    # replica slots 4..6 reserved for membership changes: clients are 7.., the oracles hold
    sim, res = run(seed=11, replicas=4, script=((25.0, "crash", 0),), fault_phase_ms=1500.0,
                   cluster=dict(replica_slots=7))
    assert sim.client_ids[0] == 7 and sim.cfg.client_base == 7
    assert res.view_changes >= 1
    assert res.ops_committed == 3 * 30 + 4


def test_membership_grow_runs_the_joiners_and_moves_the_clients():
    from pbft.sim.scenarios import find

    sim = Simulation(find("S-40").build(4, 5), log_events=True)
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None
    assert [r.cfg.n for r in sim.replicas] == [7] * 7 and sim.cfg.n == 7
    assert {r.members_from for r in sim.replicas} == {sim.admin.results[0]["members_at"]}
    assert all(r.last_committed_exec > r.members_from for r in sim.replicas)  # (the joiners too)
    assert sim.oracles.epochs[-1][1] == 7


def test_a_backup_replaces_a_primary_whose_null_batches_to_the_switch_point_stall():
    # a growth 4 -> 7 with replica 1 silent and the clients done early: one backup lags alone in a
    # view change, so the primary's null batches towards the switch point never commit; no
    # client's request arms a timer, and only the backups' watch on the switch point moves the
    # old membership on (without it all stayed below the switch point for good)
    from pbft.core.events import ViewChangeStarted
    from pbft.sim.scenarios import _grow, membership_switched

    cfg = _grow(4, 719, faults=frozenset({"loss", "partition", "replay"}), byzantine=((1, "silent"),),
                clients=1, ops=25, membership=((63.05, 7),))
    reasons = []

    def observe(_sim, _r, ev):
        if isinstance(ev, ViewChangeStarted):
            reasons.append(ev.reason)

    sim = Simulation(cfg, observer=observe)
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None
    assert membership_switched(sim, res) == []
    assert "switch-stalled" in reasons


def test_membership_swarm_configs_run_clean():
    from pbft.sim.scenarios import membership_swarm_config, membership_switched

    kinds = set()
    for seed in (0, 1):
        cfg, kind = membership_swarm_config(4, seed)
        kinds.add(kind)
        assert len(cfg.byzantine) <= 1 and all(0 < i < 4 for i, _ in cfg.byzantine)
        sim = Simulation(cfg)
        res = sim.run()
        assert res.violations == [] and res.liveness_failure is None
        assert membership_switched(sim, res) == []
    cfg, _ = membership_swarm_config(7, 3)
    assert cfg.membership and len(cfg.byzantine) <= 2


def test_a_replaced_replica_starts_from_nothing_and_is_checked_again_once_caught_up():
    # the primary crashes, then its id comes back on a machine with nothing stored (durable stores)
    sim = Simulation(SimConfig(seed=3, replicas=4, clients=3, ops=60, fault_phase_ms=1500.0, storage="durable",
                               script=((400.0, "crash", 0), (450.0, "replace", 0))))
    seen = []
    replace = sim.replacements.replace

    def observed(r):
        old, old_store = sim.replicas[r], sim.stores[r]
        replace(r)
        rep = sim.replicas[r]
        seen.append((rep is not old and sim.stores[r] is not old_store, old.last_exec > 0, rep.view,
                     rep.last_exec, rep.low_water_mark, sim.stores[r].load()[0], r in sim.oracles.correct,
                     r in sim.crashed, sim._faulty_now()))

    sim.replacements.replace = observed
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None
    # fresh: a new replica and store, in view 0 with nothing executed, unchecked, counted against f
    assert seen == [(True, True, 0, 0, 0, {}, False, False, 1)]
    [rec] = sim.replacements.done
    assert rec.bound > 0 and rec.fetches >= 1 and rec.caught_up_at is not None and rec.executed_checked > 0
    assert 0 in sim.oracles.correct and sim._faulty_now() == 0 and not sim.replacements.pending
    others = {r.state_digest() for r in sim.replicas[1:]}
    assert {sim.replicas[0].state_digest()} == others and sim.replicas[0].last_committed_exec > rec.bound


def test_a_replica_replaced_after_a_membership_change_starts_as_a_joiner_of_it():
    # a genesis member replaced after the growth 4 -> 7: with nothing stored it joins the membership
    # in force (its epoch's first view, the switch point), not view 0 of the genesis configuration
    from pbft.sim.scenarios import _grow, _switched

    sim = Simulation(_grow(4, 1, ops=80, script=((700.0, "crash", 1), (750.0, "replace", 1))))
    seen = []
    replace = sim.replacements.replace

    def observed(r):
        replace(r)
        rep = sim.replicas[r]
        seen.append((rep.cfg.n, rep.view, rep.members_from, rep.last_exec))

    sim.replacements.replace = observed
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None and _switched(sim, res) == []
    base, n, switch = sim.oracles.epochs[-1]
    assert n == 7 and switch > 0 and seen == [(7, base, switch, 0)]
    [rec] = sim.replacements.done
    assert rec.fetches >= 1 and rec.caught_up_at is not None
    assert sim.replicas[1].last_committed_exec == sim.replicas[0].last_committed_exec
