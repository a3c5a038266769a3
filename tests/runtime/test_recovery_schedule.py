"""Proactive recovery on by default: the period derived from the configuration (``pbft init``
writes it, a file without it gets it, 0 turns it off), the turns' order (replica n-1 first, so
that a recovering primary costs one view change per period, not one per turn) and a turn that
waits, a bounded time, for another replica's recovery."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pbft.config import ConfigError
from pbft.runtime.cluster import (CLUSTER_FILE, default_period_s, init_cluster, load_cluster, recovery_phase_s,
                                  recovery_turn)
from pbft.tools.guard import next_turn

from helpers.nodeutil import node_on_own_loop


def test_the_period_is_on_by_default_and_derived_from_the_configuration(tmp_path):
    c = init_cluster(tmp_path / "a", 4)
    assert c.recovery.period_s == default_period_s(4) == 4 * c.recovery.alarm_s == 240.0
    assert "period_s = 240.0" in (c.dir / CLUSTER_FILE).read_text()  # written, not implied
    assert init_cluster(tmp_path / "b", 7).recovery.period_s == 420.0
    assert init_cluster(tmp_path / "c", 4, recovery={"alarm_s": 30.0}).recovery.period_s == 120.0
    assert init_cluster(tmp_path / "d", 4, recovery={"period_s": 0.0}).recovery.period_s == 0.0  # off
    # a cluster file without period_s gets the derived one; its own alarm_s counts
    path = c.dir / CLUSTER_FILE
    path.write_text(re.sub(r"period_s = .*\n", "", path.read_text()).replace("alarm_s = 60.0", "alarm_s = 20.0"))
    assert load_cluster(c.dir).recovery.period_s == 80.0
    for bad in ("-1.0", "inf", "nan", "true", '"240"'):
        (tmp_path / "e").mkdir(exist_ok=True)
        e = init_cluster(tmp_path / "e", 4, force=True)
        p = e.dir / CLUSTER_FILE
        p.write_text(re.sub(r"period_s = .*\n", f"period_s = {bad}\n", p.read_text()))
        with pytest.raises(ConfigError, match="period_s"):
            load_cluster(e.dir)


def test_pbft_init_writes_the_period_and_takes_another(tmp_path):
    def init(*extra):
        return subprocess.run([sys.executable, "-m", "pbft.cli", "init", str(tmp_path / "c"), "--replicas", "4",
                               "--force", "--no-integrity", *extra], capture_output=True, text=True, timeout=60)

    out = init()
    assert out.returncode == 0, out.stderr
    assert "every replica every 240 s, one every 60 s" in out.stdout
    assert load_cluster(tmp_path / "c").recovery.period_s == 240.0
    out = init("--recovery-period", "0")
    assert out.returncode == 0 and "proactive recovery: off" in out.stdout
    assert load_cluster(tmp_path / "c").recovery.period_s == 0.0
    assert init("--recovery-period", "3600").returncode == 0
    assert load_cluster(tmp_path / "c").recovery.period_s == 3600.0
    out = init("--recovery-period", "-5")
    assert out.returncode == 2 and "--recovery-period" in out.stderr


@pytest.mark.parametrize("n", [4, 7])
def test_turns_are_evenly_spread_replica_n_minus_1_first(n):
    period = 240.0
    phases = [recovery_phase_s(i, n, period) for i in range(n)]
    assert sorted(phases) == [k * period / n for k in range(n)]
    assert [i for _, i in sorted((p, i) for i, p in enumerate(phases))] == list(range(n - 1, -1, -1))
    for now in (0.0, 1000.0, 17.3, 1.8e9 + 0.25):
        turns = [recovery_turn(now, period, i, n) for i in range(n)]
        for i, t in enumerate(turns):
            assert now < t <= now + period
            assert (t - phases[i]) % period == pytest.approx(0.0, abs=1e-6) or \
                (t - phases[i]) % period == pytest.approx(period, abs=1e-6)
            assert next_turn(now, period, i, n) == t  # the external watchdog keeps the same turns
        gaps = sorted(turns)
        assert all(b - a == pytest.approx(period / n) for a, b in zip(gaps, gaps[1:]))


def view_changes_per_period(order: list[int], n: int, periods: int) -> list[int]:
    """The cluster's view changes in each period when replicas recover in ``order`` and only a
    recovering primary causes one (to the next view, the next replica)."""
    view, out = 0, []
    for _ in range(periods):
        changes = 0
        for i in order:
            if view % n == i:
                view += 1
                changes += 1
        out.append(changes)
    return out


@pytest.mark.parametrize("n", [4, 7, 10])
def test_the_order_costs_about_one_view_change_per_period(n):
    """n view changes every n-1 periods (two in the period where the primary is the first to
    recover), against one at every turn in the order 0, 1, ..., n-1."""
    period = 100.0
    order = sorted(range(n), key=lambda i: recovery_phase_s(i, n, period))
    per_period = view_changes_per_period(order, n, 10 * (n - 1))
    assert set(per_period) <= {1, 2} and abs(sum(per_period) - 10 * n) <= 1
    assert view_changes_per_period(list(range(n)), n, 20)[1:] == [n] * 19


def make_node(tmp_path, replica_id: int = 2, alarm_s: float = 3.0):
    from pbft.runtime import node as node_mod
    from pbft.services.kv import KVService

    cluster = init_cluster(tmp_path / "c", 4, None, ["127.0.0.1"], 42200, 1, recovery={"alarm_s": alarm_s})
    return node_mod.ReplicaNode(cluster, replica_id, cluster.identity(replica_id), KVService(), quiet=False)


def test_a_turn_waits_for_another_replicas_recovery_but_not_for_ever(tmp_path, capsys):
    with node_on_own_loop(lambda: make_node(tmp_path)) as nd:
        later: list[float] = []
        recovered: list[bool] = []
        nd.loop.call_later = lambda delay, fn, *a: later.append(delay)  # type: ignore[method-assign]
        nd.recover_now = lambda: recovered.append(True)  # type: ignore[method-assign]
        # replica 1's recovery request was executed here, its recovery point not yet stable
        nd.replica.recovery.points[1] = 10_000
        nd._watchdog()
        assert not recovered and later == [1.0]
        for _ in range(2):
            nd._watchdog()
        assert not recovered and len(later) == 3
        nd._watchdog()  # alarm_s (3 s) waited: it goes anyway
        assert recovered == [True] and len(later) == 3
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
        acts = [x["action"] for x in lines if x["event"] == "watchdog"]
        assert acts == ["defer", "recover"]
        assert next(x for x in lines if x.get("action") == "defer")["recovering"] == [1]
        # no other recovery under way (its own point does not count): at once
        recovered.clear()
        nd.replica.recovery.points.clear()
        nd.replica.recovery.points[2] = 10_000
        nd._watchdog()
        assert recovered == [True] and len(later) == 3


def test_the_period_in_force_is_the_configurations_else_cluster_tomls():
    import dataclasses

    from pbft.runtime.cluster import RecoveryParams, recovery_period_in_force
    from pbft.state.configuration import Configuration

    params = RecoveryParams(period_s=240.0)
    cs = Configuration.genesis([b"\x01" * 32], {}, [])
    assert recovery_period_in_force(params, None) == recovery_period_in_force(params, cs) == 240.0
    assert recovery_period_in_force(params, dataclasses.replace(cs, recovery_period_ms=3_600_000)) == 3600.0
    assert recovery_period_in_force(params, dataclasses.replace(cs, recovery_period_ms=0)) == 0.0  # off


class FakeHandle:
    def __init__(self, delay: float):
        self.delay = delay
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_the_schedule_follows_a_recovery_period_change_at_the_switch(tmp_path, capsys):
    """The timer of the next turn is armed again at a switch that changes the period: for the
    new one (a turn within 1.5 periods of a start), none when it is 0; /status's config says it."""
    import dataclasses

    with node_on_own_loop(lambda: make_node(tmp_path)) as nd:  # cluster.toml: 4 replicas x alarm_s 3 s = 12 s
        armed: list[FakeHandle] = []

        def call_later(delay, fn, *a):
            armed.append(FakeHandle(delay))
            return armed[-1]

        nd.loop.call_later = call_later  # type: ignore[method-assign]
        assert nd.epochs.describe()["recovery_period_s"] == 12.0
        assert nd.epochs.describe()["recovery_period_from"] == "cluster.toml"
        nd.arm_recovery_timer()
        assert len(armed) == 1 and 0 < armed[0].delay <= 18.0
        base = nd.epochs.active
        assert base is not None
        nd.epochs.switch(dataclasses.replace(base, epoch=1, opens_at=16, recovery_period_ms=3_600_000), 16)
        assert armed[0].cancelled and len(armed) == 2
        assert 1800.0 <= armed[1].delay <= 5400.0  # (just started: not within half a period)
        assert nd.epochs.describe()["recovery_period_s"] == 3600.0
        assert nd.epochs.describe()["recovery_period_from"] == "configuration"
        # a switch that keeps the period leaves the timer alone
        nd.epochs.switch(dataclasses.replace(nd.epochs.active, epoch=2, opens_at=32), 32)
        assert len(armed) == 2 and not armed[1].cancelled
        nd.epochs.switch(dataclasses.replace(nd.epochs.active, epoch=3, opens_at=48, recovery_period_ms=0), 48)
        assert armed[1].cancelled and len(armed) == 2 and nd.recovery_timer is None  # off
        assert nd.epochs.describe()["recovery_period_s"] == 0.0
        recovered: list[bool] = []
        nd.recover_now = lambda: recovered.append(True)  # type: ignore[method-assign]
        nd._watchdog()  # a timer armed before the switch that turned it off: no recovery
        assert not recovered and len(armed) == 2
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
        assert [x["period_s"] for x in lines if x["event"] == "recovery-period"] == [3600.0, 0.0]


def test_the_external_watchdog_follows_the_period_the_replica_reports(tmp_path):
    from pbft.tools.guard import Watchdog

    c = init_cluster(tmp_path / "c", 4, recovery={"period_s": 12.0, "watchdog": "external"})
    wd = Watchdog(c, 1, c.recovery.period_s, "none", ["true"])
    now = 1.8e9
    for junk in ({}, {"config": []}, {"config": {"recovery_period_s": "60"}}, {"config": {"recovery_period_s": -1}},
                 {"config": {"recovery_period_s": float("nan")}}, {"config": {"recovery_period_s": True}}):
        wd.follow_period(junk, now)
        assert wd.period == 12.0
    wd.follow_period({"config": {"recovery_period_s": 3600.0}}, now)
    assert wd.period == 3600.0 and wd.turn == recovery_turn(now, 3600.0, 1, 4)
    wd.follow_period({"config": {"recovery_period_s": 0.0}}, now)
    assert wd.period == 0.0 and wd.turn == float("inf")
