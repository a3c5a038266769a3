"""`pbft attack`: a short run of a few attack classes against a real local cluster, and its pieces.

The run asserts only what cannot flake on a loaded machine: no replica exits, every acknowledged
write of the correct workload reads back, no lie of a Byzantine replica is accepted, every replica
stays under the RSS limit, and under each attack a drop counter of a relevant reason rose.  Throughput
floors are reported by the command, never asserted here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbft.tools.attack import ATTACKS, FLOORS, RSS_LIMIT_MIB, parse_attacks
from pbft.tools.attack.run import counter_deltas, exit_status, parse_metrics, print_report
from pbft.config import ConfigError

SRC = str(Path(__file__).resolve().parents[2] / "src")

# attack -> drop reasons (any layer) of which at least one must rise beyond its quiet-window rate.
# Any one of them will do, so that a defence renaming or refining a reason does not break the test;
# every reason listed exists in the code.
EXPECTED_REASONS = {
    "garbage": {"malformed", "oversized-frame", "bad-frame", "bad-tag", "newkey-malformed",
                "unauthenticated-frame-too-large", "connection-closed-unauthenticated", "accept-paused"},
    "forged-client-mac": {"bad-mac", "spoofed-client", "newkey-bad-signature"},
    "replay": {"newkey-stale", "newkey-rate-limited", "request-old-timestamp", "request-duplicate",
               "request-late-copy", "request-retransmitted", "spoofed-client"},
    # (connections beyond the listener's accept budget wait in the kernel's queue: accept-paused;
    # beyond one address's share they are closed at once)
    "conn-flood": {"connection-limit", "connection-evicted", "idle-timeout", "accept-paused",
                   "accept-source-over-budget", "closed-before-frame"},
    "replica-vouch-flood": {"vouch-unknown-dropped", "vouch-duplicate"},
    "replica-viewchange-flood": {"view-change-rate-limited", "replica-flood-held"},
    # lies go to clients, which must reject them: nothing to drop at the replicas
    "replica-wrong-replies": None,
}
QUICK = list(EXPECTED_REASONS)


def run_attack(*args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pbft.tools.cli", "attack", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_short_attack_run(capsys):
    p = run_attack("--attacks", ",".join(QUICK), "--duration-s", "2", "--rounds", "2", "--quiet-s", "1.5",
                   "--settle-max-s", "5", "--json")
    assert p.stdout.strip(), p.stderr
    out = json.loads(p.stdout)  # stdout holds exactly one JSON object
    assert p.returncode == 0, (out.get("replica_exits"), out.get("workload"), p.stderr[-2000:])
    assert out["ok"] and not out["replica_exits"]
    assert out["replicas_alive_at_end"] == 4
    w = out["workload"]
    assert w["wrong_results"] == 0 and not w["unverified"], w
    assert w["verified_clients"] == out["clients"]
    assert w["acknowledged_writes"] > 0
    assert [a["attack"] for a in out["attacks"]] == [n for n in parse_attacks("all") if n in QUICK]
    for a in out["attacks"]:
        name = a["attack"]
        assert a["error"] is None, (name, a["error"])
        assert a["replicas_alive"] == a["replicas_expected"], name
        assert a["replicas_expected"] == (3 if a["class"] == "replica" else 4), name
        assert a["rss_peak_mib"] is not None and a["rss_peak_mib"] < RSS_LIMIT_MIB, (name, a["memory"])
        if EXPECTED_REASONS[name] is not None:
            rose = {k.split(":", 1)[1] for k, v in a["drops"].items() if v > 0}
            assert rose & EXPECTED_REASONS[name], (name, a["drops"], a["drops_raw"])
        assert a["floor"] == FLOORS[a["class"]]
        assert a["verdict"] in ("PASS", "FAIL")
        # two rounds, each against its own quiet windows; the fraction is their median
        assert a["rounds"] == 2 and len(a["round_fractions"]) == 2 and len(a["quiet_ops_per_s"]) == 3
        if a["throughput_fraction"] is not None:
            lo, hi = a["spread"]
            assert lo <= a["throughput_fraction"] <= hi
            assert a["throughput_fraction"] == round(sum(a["round_fractions"]) / 2, 3)
    by = {a["attack"]: a for a in out["attacks"]}
    for name in ("replica-vouch-flood", "replica-wrong-replies"):
        assert by[name]["attacker"]["checks"]["keys_exchanged"] is True, name
    assert by["conn-flood"]["attacker"]["sent"]["connections"] > 1024  # beyond connections_max
    assert by["replay"]["attacker"]["checks"]["captured_bytes"] > 0
    # the lying replica did answer the workload's requests, and no lie was accepted (wrong_results 0)
    assert by["replica-wrong-replies"]["attacker"]["sent"]["lying-replies"] > 0
    # exit status: floors count only when enforced
    assert exit_status(out, False) == 0
    assert exit_status(out, True) == (0 if all(a["verdict"] == "PASS" for a in out["attacks"]) else 1)
    assert exit_status(dict(out, ok=False), False) == 1
    # the table prints every attack
    print_report(out)
    text = capsys.readouterr().out
    assert all(a["attack"] in text for a in out["attacks"])
    assert ("share the machine's" if out["cpu_placement"] is None else "a machine of its own") in text


def test_list_and_bad_arguments():
    p = run_attack("--list", timeout=60)
    assert p.returncode == 0
    assert [line.split()[0] for line in p.stdout.splitlines()] == [a[0] for a in ATTACKS]
    p = run_attack("--attacks", "garbage,no-such-attack", timeout=60)
    assert p.returncode == 2 and "unknown attack 'no-such-attack'" in p.stderr
    p = run_attack("--duration-s", "0", timeout=60)
    assert p.returncode == 2 and "--duration-s" in p.stderr
    p = run_attack("--rounds", "0", timeout=60)
    assert p.returncode == 2 and "--rounds" in p.stderr
    p = run_attack("--attacker-nice", "20", timeout=60)
    assert p.returncode == 2 and "--attacker-nice" in p.stderr


def test_median():
    from pbft.tools.attack.run import _median
    assert _median([0.5]) == 0.5
    assert _median([0.2, 0.9, 1.0]) == 0.9  # one bad round does not decide
    assert _median([0.8, 1.0]) == 0.9


def test_parse_attacks():
    assert parse_attacks("all") == [a[0] for a in ATTACKS]
    # canonical order whatever the order given; classes expand
    assert parse_attacks("replay,garbage") == ["garbage", "replay"]
    assert parse_attacks("client") == ["client-flood"]
    assert all(n.startswith("replica-") for n in parse_attacks("replica"))
    with pytest.raises(ConfigError):
        parse_attacks("garbage,nope")


def test_metrics_parsing_and_deltas():
    text = "\n".join([
        "# HELP pbft_dropped_messages_total Messages dropped",
        'pbft_dropped_messages_total{layer="transport",reason="malformed",replica="0"} 5.0',
        'pbft_dropped_messages_total{layer="protocol",reason="bad-mac",replica="0"} 2.0',
        'pbft_frames_received_total{replica="0"} 12.0',
        'pbft_view{replica="0"} 3.0',  # a gauge: not a counter
        'pbft_request_latency_seconds_bucket{le="0.001",replica="0"} 7.0',
    ])
    m = parse_metrics(text)
    assert m == {"drop:transport:malformed": 5.0, "drop:protocol:bad-mac": 2.0, "pbft_frames_received": 12.0}
    s0 = {"t": 0.0, "r": {0: {"metrics": m}, 1: {"metrics": None}}}
    m1 = dict(m, **{"drop:transport:malformed": 9.0, "drop:transport:idle-timeout": 1.0})
    s1 = {"t": 1.0, "r": {0: {"metrics": m1}, 1: {"metrics": {"drop:transport:malformed": 100.0}}}}
    # replica 1 did not answer the first time: it is left out rather than counted from zero
    assert counter_deltas(s0, s1) == {"drop:transport:malformed": 4.0, "drop:transport:idle-timeout": 1.0}


def test_forged_frames_carry_a_mac_per_replica_slot():
    """With replica slots beyond n, an attack's forged frame must fail on its MACs, not on the
    authenticator's size (else the attack measures nothing but a length check)."""
    from types import SimpleNamespace

    from pbft.codec import Codec, DecodeError, seal
    from pbft.config import ClusterConfig
    from pbft.messages import Prepare
    from pbft.tools.attack.workers import random_ring

    cfg = ClusterConfig.create(4, replica_slots=7, clients_max=2)
    ctx = SimpleNamespace(n=cfg.n, cfg=cfg)
    raw = seal(Prepare(0, 1, b"\x01" * 32, 2), random_ring(ctx, 2))
    Codec(cfg).open_frame(raw)  # (the outer frame is fine)
    with pytest.raises(DecodeError, match="bad-mac"):
        Codec(cfg).open_authenticated(raw, random_ring(ctx, 0))
