"""The simulator's spoofing and replaying clients (sim/byzantine_clients.py): they act, and the
core's own rules keep safety, liveness and the view (no principal binding in the simulator)."""

import pytest

from pbft.sim.scenarios import find
from pbft.sim.simulator import CostModel, Simulation


def _drops(sim, reason):
    return sum(sim.replicas[r].drops.get(reason, 0) for r in sim.correct)


@pytest.mark.parametrize("seed", [0, 1])
def test_spoofed_correct_client_ids_rejected(seed):
    sim = Simulation(find("S-19b").build(4, seed))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)
    assert res.view_changes == 0
    # the attack happened: forged requests under the correct clients' ids failed their MACs
    # (the S2 oracle checks that none of them executed)
    assert _drops(sim, "bad-mac") > 1000
    spoofer = next(iter(sim.byz_clients.values()))
    assert spoofer.sent > 1000


@pytest.mark.parametrize("seed", [0, 1])
def test_replayed_correct_client_frames_harmless(seed):
    sim = Simulation(find("S-19c").build(4, seed))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)  # S3: nothing executed twice
    assert res.view_changes == 0
    replays = sum(_drops(sim, r) for r in ("request-duplicate", "request-retransmitted", "request-old-timestamp",
                                            "request-late-copy", "reply-resend-rate-limited"))
    assert replays > 1000


def test_cost_model_charges_the_runtime_per_frame():
    C = CostModel()
    small = C.charge_us(100, 1, 0, 0, 0, 4, reads=0.0)
    # a frame read alone pays the read; one that makes the replica send pays a write per frame
    assert C.charge_us(100, 1, 0, 0, 0, 4, reads=1.0) == pytest.approx(small + C.read_us)
    assert C.charge_us(100, 1, 0, 0, 3, 4, reads=0.0) == pytest.approx(small + 3 * C.frame_send_us)
    # dropped before any MAC: cheaper than a message that was checked
    assert C.charge_us(100, 0, 0, 0, 0, 4, reads=0.0) < small
    # a request costs more than another message of its size
    assert C.charge_us(100, 1, 0, 0, 0, 1, reads=0.0) > small
