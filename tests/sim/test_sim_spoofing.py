"""The simulator's spoofing and replaying clients (sim/byzantine_clients.py): they act, and both the
core's own rules (no principal binding: S-19d, S-19e) and the runtime's binding as the simulator
models it (S-19b, S-19c) keep safety, liveness and the view."""

import pytest

from pbft.sim.scenarios import find
from pbft.sim.simulator import CostModel, Simulation


def _drops(sim, reason):
    return sum(sim.replicas[r].drops.get(reason, 0) for r in sim.correct)


@pytest.mark.parametrize("scenario,seed", [("S-19d", 0), ("S-19b", 1)])
def test_spoofed_correct_client_ids_rejected(scenario, seed):
    sim = Simulation(find(scenario).build(4, seed))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)
    assert res.view_changes == 0
    spoofer = next(iter(sim.byz_clients.values()))
    assert spoofer.sent > 1000
    # the attack happened (the S2 oracle checks that no forged request executed): without binding
    # the forged requests fail their MACs in the core; with it they never reach the core
    if sim.sc.bind_principals:
        assert _drops(sim, "spoofed-client") > 1000
        assert _drops(sim, "bad-mac") < 100
    else:
        assert _drops(sim, "bad-mac") > 1000
        assert _drops(sim, "spoofed-client") == 0


@pytest.mark.parametrize("scenario,seed", [("S-19e", 0), ("S-19c", 1)])
def test_replayed_correct_client_frames_harmless(scenario, seed):
    sim = Simulation(find(scenario).build(4, seed))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)  # S3: nothing executed twice
    assert res.view_changes == 0
    if sim.sc.bind_principals:
        assert _drops(sim, "spoofed-client") > 1000
    else:
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
