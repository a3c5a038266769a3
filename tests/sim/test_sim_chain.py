"""The membership certificate chain in the simulator (``pbft.sim.chain``): links complete only
with genuine votes of quorum weight of the membership before, every correct replica's chain is
the same and ends at the membership they switched to, a replica that missed a change is not
led beyond its window by the old thresholds, and the oracles catch a chain that takes unchecked
signatures."""

import pytest

from pbft.sim.byzantine import LURE_DIGEST
from pbft.sim.chain import statement
from pbft.sim.scenarios import _grow, _missed_change_config, membership_switched
from pbft.sim.simulator import Simulation


def _members_switched_to(sim):
    return {(r.members_from, r.cfg.n) for r in sim.replicas if r.id not in sim.byz and not r.retired}


@pytest.mark.parametrize("behaviour", ["withhold", "honest", "bogus", "equivocate", "forge"])
def test_links_complete_with_genuine_quorums_only(behaviour):
    # a growth 4 -> 7 with one Byzantine replica of the old membership (its chain votes: behaviour)
    sim = Simulation(_grow(4, 2, faults=frozenset({"loss", "reorder"}), byzantine=((1, "equivocate"),),
                           chain_byzantine=((1, behaviour),)))
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None and membership_switched(sim, res) == []
    ch = sim.chains
    (switched,) = _members_switched_to(sim)
    for r in sim.correct:
        node = ch.nodes[r]
        assert len(node.links) == 1, (r, node.links)
        (link,) = node.links
        assert (link.members.opens_at, link.members.n) == switched
        key = statement(link.prev, link.members)
        assert all((s, key) in ch.signed for s in link.signers)  # (genuine: the registry's)
        assert len(link.signers) >= 3 and set(link.signers) <= {0, 1, 2, 3}  # (quorum weight 3 of 4)
    drops: dict[str, int] = {}
    for r in sim.correct:
        for k, v in ch.nodes[r].drops.items():
            drops[k] = drops.get(k, 0) + v
    if behaviour == "forge":
        assert drops.get("chain-signature-bad", 0) > 0, drops
    if behaviour in ("bogus", "withhold", "forge"):
        assert all(1 not in ch.nodes[r].links[0].signers for r in sim.correct)


def test_a_replica_that_missed_the_change_is_not_lured_beyond_its_window():
    # replica 3 is down from before a growth 4 -> 7 until long after the switch; replicas 1 and 2
    # (two: beyond the old f, within the new one) send it checkpoint votes for a bogus digest
    # beyond its window, a weak certificate of the thresholds it knows
    wanted = []

    def observe(sim, r, ev):
        if r == 3 and ev.kind == "chain-wanted":
            wanted.append(ev.seqno)

    sim = Simulation(_missed_change_config(4, 0), observer=observe)
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None and membership_switched(sim, res) == []
    (switched,) = _members_switched_to(sim)
    assert wanted and wanted[0] > switched[0]  # (the lure: beyond the switch point)
    assert [(r, why) for r, _, why in sim.chains.rejoins] == [(3, f"chain-wanted {wanted[0]}")]
    r3 = sim.replicas[3]
    assert (r3.members_from, r3.cfg.n) == switched and r3 in sim._settled()
    # the negative control: drivers that keep no chain; the same run leads replica 3 to set out
    # to fetch the bogus checkpoint (S7), and it stays behind
    sim = Simulation(_missed_change_config(4, 0, chain=False))
    res = sim.run()
    assert any(v.split(" ", 1)[1].startswith("S7 replica 3") for v in res.violations), res.violations
    assert sim.replicas[3].fetch_target == (wanted[0], LURE_DIGEST)
    assert res.liveness_failure is not None


def test_the_chain_oracles_catch_links_taken_with_unchecked_signatures():
    # replica 1 forges a link (naming every old member as a signer of a bogus membership); the
    # injected bug takes a link frame's signers unchecked
    sim = Simulation(_grow(4, 0, byzantine=((1, "equivocate"),), chain_byzantine=((1, "forge"),),
                           chain_bug="unchecked-signatures"))
    res = sim.run()
    kinds = {v.split(" ", 2)[1] for v in res.violations}
    assert {"C2", "C3"} <= kinds, res.violations[:5]


def test_a_replica_back_from_a_damaged_store_after_the_switch_rejoins_from_its_chain():
    # S-47 at n=4, seed 1: after a growth 4 -> 7 replica 1's object records are damaged and it
    # recovers proactively (replica 2 serves corrupt state). Its store's state is unusable and its
    # configuration is the genesis one: from its chain it comes back a member of the 7 and
    # converges; without the chain it hears only the old members, with a Byzantine one among
    # them, and never gets back (the run fails on L3, and S6: its reply table lacks operations)
    from dataclasses import replace

    from pbft.sim.scenarios import find

    sc = find("S-47")
    sim = Simulation(sc.build(4, 1))
    res = sim.run()
    assert res.violations == [] and res.liveness_failure is None and sc.check(sim, res) == []
    assert [(r, why) for r, _, why in sim.chains.rejoins] == [(1, "start")]
    assert sim.recoveries_done >= 1 and sim.replicas[1].cfg.n == 7
    sim = Simulation(replace(sc.build(4, 1), chain=False))
    res = sim.run()
    assert res.liveness_failure is not None and res.liveness_failure.startswith("L3")
    assert sim.replicas[1].cfg.n == 4 and sim.replicas[1].members_from == 0
