"""Configuration epochs on a real local cluster (``pbft reconfig``): a client admitted, used and
revoked (its sessions end, its NewKeys are refused), a client's key rotated (the old session
ends, the new key works), a replica's key rotated while the cluster keeps serving and refreshing
session keys, and a non-administrator's change refused."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from helpers.metrics import metric, metrics_text
from pbft import BlockingClient
from pbft.config import ConfigError
from pbft.core.reconfig import decode_result, encode_request
from pbft.runtime.client import NotAdmittedError, PbftError
from pbft.runtime.cluster import EPOCH_FILE, load_cluster
from pbft.services.kv import KVClient, encode_op
from pbft.tools.cli import main

PUT = encode_op("put", b"k", b"v")


def _transport_drop(lc, rid: int, reason: str) -> float:
    total = 0.0
    for line in metrics_text(lc, rid).splitlines():
        if line.startswith("pbft_dropped_messages_total{") and 'layer="transport"' in line \
                and f'reason="{reason}"' in line:
            total += float(line.rpartition(" ")[2])
    return total


class _Conn:
    def __init__(self):
        self.meta = {}


def test_the_gate_refuses_revoked_clients_and_rotated_away_keys():
    from pbft.runtime.admission import NewKeyGate
    from pbft.runtime.keys import Identity, PublicKeys, make_newkey, now_timestamp_us
    from pbft.runtime.transport import Counters
    ids = {p: Identity.generate(p) for p in range(6)}  # replicas 0..3, clients 4, 5
    pub = PublicKeys({p: i.public for p, i in ids.items()})
    gate = NewKeyGate(ids[0], pub, 4, 5, 600_000.0, Counters())
    keys = {j: bytes(64) for j in range(4)}
    assert gate.accept(_Conn(), make_newkey(ids[4], pub, keys, now_timestamp_us())) is not None
    # the switch (runtime.epochs): client 4 revoked, client 5's key rotated
    new5 = Identity.generate(5)
    after = PublicKeys({p: (new5.public if p == 5 else i.public) for p, i in ids.items() if p != 4})
    gate.retired[5] = pub.verify[5]
    gate.public, gate.revoked = after, frozenset({4})
    assert gate.accept(_Conn(), make_newkey(ids[4], pub, keys, now_timestamp_us())) is None
    assert gate.accept(_Conn(), make_newkey(ids[5], pub, keys, now_timestamp_us())) is None
    assert gate.counters.drops == {"newkey-revoked-client": 1, "newkey-rotated-key": 1}
    assert gate.accept(_Conn(), make_newkey(new5, pub, keys, now_timestamp_us())) is not None


def test_init_writes_an_administrator_and_free_client_ids(tmp_path):
    from pbft.runtime.cluster import init_cluster
    c = init_cluster(tmp_path / "c", 4, clients=2)
    assert c.client_ids == [4, 5] and c.admins == (6,) and c.cfg.clients_max == 7 and c.epoch == 0
    assert c.identity(6).principal == 6
    text = (tmp_path / "c" / "cluster.toml").read_text()
    (tmp_path / "c" / "cluster.toml").write_text(text.replace("clients = [6]", "clients = [9]"))
    with pytest.raises(ConfigError, match="administrator 9 is not a"):
        load_cluster(tmp_path / "c")
    (tmp_path / "c" / "cluster.toml").write_text(text.replace("client_slots = 7", "client_slots = 2"))
    with pytest.raises(ConfigError, match="client_slots = 2 is below"):
        load_cluster(tmp_path / "c")
    (tmp_path / "c" / "cluster.toml").write_text(text)
    (tmp_path / "c" / EPOCH_FILE).write_text('{"epoch": 1}')
    with pytest.raises(ConfigError, match="not a configuration written by"):
        load_cluster(tmp_path / "c")


def test_set_recovery_period_refuses_a_bad_period_with_the_reason(tmp_path, capsys):
    """Refused before anything is sent (the replicas' own check, with the membership known here)."""
    from pbft.runtime.cluster import init_cluster
    d = str(init_cluster(tmp_path / "c", 4).dir)
    for bad, reason in (("-5", "bad-period"), ("nan", "bad-period"), ("inf", "bad-period"),
                        ("1", "period-too-short: 1 s is below 40 s (4 replicas x 10 s"), ("1e12", "period-too-long")):
        assert main(["reconfig", d, "set-recovery-period", bad]) == 1
        assert f"pbft reconfig: refused: {reason}" in capsys.readouterr().err
    for bad in (["ten"], []):
        assert main(["reconfig", d, "set-recovery-period", *bad]) == 2
        assert "pbft: error: set-recovery-period needs a period in seconds" in capsys.readouterr().err
    assert main(["reconfig", d, "revoke-client", "five"]) == 2
    assert "'five' is not a principal id" in capsys.readouterr().err


@pytest.fixture
def live(local_cluster):
    return local_cluster(protocol={"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16,
                                   "view_change_timeout_ms": 500.0},
                         runtime={"key_refresh_s": 1.0})


def epochs(lc) -> list[int]:
    return [lc.status(i)["config"]["epoch"] for i in range(lc.n)]


def chains(lc) -> list[tuple[int, int]]:
    """(configuration epoch, links) of every replica's configuration certificate chain."""
    return [(c["config_epoch"], c["links"]) for c in (lc.status(i)["chain"] for i in range(lc.n))]


def test_admit_use_revoke_rotate(live, capsys):
    d = str(live.dir)
    assert live.cluster.admins == (8,) and live.cluster.client_ids == [4, 5, 6, 7]
    assert epochs(live) == [0, 0, 0, 0]

    # negative control: a client that is not an administrator cannot change anything
    with BlockingClient(d, 4) as bc:
        res = decode_result(bc.invoke(encode_request("revoke-client", 5), timeout=20.0))
    assert res["ok"] is False and res["reason"].startswith("not-admin")

    assert main(["reconfig", d, "add-client"]) == 0
    out = capsys.readouterr().out
    assert "opens epoch 1" in out and "epoch 1 in force" in out
    live.wait_for(lambda: epochs(live) == [1] * 4, what="every replica in epoch 1")
    assert json.loads((live.dir / EPOCH_FILE).read_text())["epoch"] == 1
    before = load_cluster(d)  # a view of the cluster that still has client 9 (used after its revocation)
    assert 9 in before.client_keys
    held = BlockingClient(before, 9)
    try:
        kv = KVClient(held.invoke, timeout=20.0)
        kv.put(b"new-client", b"works")
        assert kv.get(b"new-client") == b"works"

        assert main(["reconfig", d, "revoke-client", "9"]) == 0
        live.wait_for(lambda: epochs(live) == [2] * 4, what="every replica in epoch 2")
        with pytest.raises(ConfigError):
            load_cluster(d).identity(9)  # the directory's configuration no longer has it
        with pytest.raises(PbftError):  # its open session ended at the switch
            held.invoke(PUT, timeout=3.0)
    finally:
        held.close()
    with pytest.raises(PbftError):  # and its NewKeys are refused
        with BlockingClient(before, 9, wait_s=2.0) as bc:
            bc.invoke(PUT, timeout=3.0)
    assert sum(_transport_drop(live, i, "newkey-revoked-client") for i in range(4)) >= 1
    assert sum(_transport_drop(live, i, "client-session-revoked") for i in range(4)) >= 1

    # rotate client 5's key: its session under the old key ends, the new key works
    with BlockingClient(d, 5) as old5:
        old5.invoke(PUT, timeout=20.0)
        assert main(["reconfig", d, "rotate-key", "5"]) == 0
        live.wait_for(lambda: epochs(live) == [3] * 4, what="every replica in epoch 3")
        with pytest.raises(PbftError):
            old5.invoke(PUT, timeout=3.0)
    assert (live.dir / "keys" / "client-5.key.old").exists()
    # three configuration-only epochs (the genesis membership): one link, the newest, replaced each time
    live.wait_for(lambda: [e for e, _ in chains(live)] == [3] * 4, what="every replica's chain at epoch 3")
    assert chains(live) == [(3, 1)] * 4
    with BlockingClient(d, 5) as new5:
        assert KVClient(new5.invoke, timeout=20.0).get(b"new-client") == b"works"
    assert sum(_transport_drop(live, i, "client-session-rotated") for i in range(4)) >= 1

    # rotate replica 1's long-term key: the cluster keeps working, with replica 1 in it
    old_key = live.cluster.replicas[1].public_key
    refreshes = metric(metrics_text(live, 1), "pbft_key_refreshes_total")
    assert main(["reconfig", d, "rotate-key", "1"]) == 0
    live.wait_for(lambda: epochs(live) == [4] * 4, what="every replica in epoch 4")
    now = load_cluster(d)
    assert now.public_key_of(1) != old_key and now.identity(1).public == now.public_key_of(1)
    assert '"own_key_rotated": true' in live.log_text(1)
    accepted = metric(metrics_text(live, 0), "pbft_newkeys_accepted_total")
    with BlockingClient(d) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        for i in range(30):
            kv.put(b"after-rotation-%d" % i, b"x")
        time.sleep(2.5)  # two key refresh periods
        for i in range(30, 40):
            kv.put(b"after-rotation-%d" % i, b"x")
        assert kv.get(b"after-rotation-39", read_only=False) == b"x"
    # session keys are still refreshed and accepted, with replica 1's new key
    assert metric(metrics_text(live, 1), "pbft_key_refreshes_total") >= refreshes + 2
    assert metric(metrics_text(live, 0), "pbft_newkeys_accepted_total") >= accepted + 2
    st = [live.status(i) for i in range(4)]
    top = max(s["last_executed"] for s in st)
    live.wait_for(lambda: live.status(1)["last_executed"] >= top, what="replica 1 keeping up")

    # operators learn the configuration from the cluster: `show` writes epoch.json again
    (live.dir / EPOCH_FILE).unlink()
    assert load_cluster(d).epoch == 0
    assert main(["reconfig", d, "show"]) == 0
    assert load_cluster(d).epoch == 4 and load_cluster(d).public_key_of(1) == now.public_key_of(1)

    # the proactive-recovery period, changed through the protocol: every replica runs the new one
    assert all(live.status(i)["config"]["recovery_period_from"] == "cluster.toml" for i in range(4))
    assert main(["reconfig", d, "set-recovery-period", "3600"]) == 0
    assert "recorded: set-recovery-period 3600 s opens epoch 5" in capsys.readouterr().out
    live.wait_for(lambda: epochs(live) == [5] * 4, what="every replica in epoch 5")
    assert [live.status(i)["config"]["recovery_period_s"] for i in range(4)] == [3600.0] * 4
    assert json.loads((live.dir / EPOCH_FILE).read_text())["recovery_period_s"] == 3600.0
    assert load_cluster(d).epoch == 5
    assert all('"event": "recovery-period"' in live.log_text(i) for i in range(4))
    # the replica key rotation's membership link, and the recovery period's configuration-only one
    live.wait_for(lambda: [e for e, _ in chains(live)] == [5] * 4, what="every replica's chain at epoch 5")
    assert chains(live) == [(5, 2)] * 4


def test_a_revoked_client_gets_not_admitted_fast(live, capsys, tmp_path):
    """A client revoked while idle: its next call fails with NotAdmittedError within seconds (its
    session keys are refused, so its request goes unanswered; on the first retransmission it reads
    the configuration certified by the replicas' chain), not after its timeout; ``pbft kv`` says
    so and exits non-zero, with an up-to-date directory (epoch.json) or a stale one (the chain);
    the other clients go on."""
    d = str(live.dir)
    stale = tmp_path / "stale"  # what the client's host has: cluster.toml and its key, no epoch.json
    stale.mkdir()
    shutil.copy(live.dir / "cluster.toml", stale / "cluster.toml")
    shutil.copytree(live.dir / "keys", stale / "keys")
    with BlockingClient(d, 7) as idle, BlockingClient(d, 4) as other:
        KVClient(idle.invoke, timeout=20.0).put(b"idle", b"before")
        assert main(["reconfig", d, "revoke-client", "7"]) == 0
        live.wait_for(lambda: epochs(live) == [1] * 4, what="every replica in epoch 1")
        capsys.readouterr()
        t0 = time.monotonic()
        with pytest.raises(NotAdmittedError, match="client 7 is not admitted by the cluster"):
            KVClient(idle.invoke, timeout=20.0).put(b"idle", b"after")
        took = time.monotonic() - t0
        assert took < 8.0, f"the revoked client waited {took:.1f}s (its timeout is 20 s)"
        with pytest.raises(NotAdmittedError):  # final: the next call fails at once
            idle.invoke(PUT, timeout=20.0)
        kv = KVClient(other.invoke, timeout=20.0)
        kv.put(b"other", b"works")
        assert kv.get(b"other") == b"works" and kv.get(b"idle") == b"before"
    for where in (d, str(stale)):
        t0 = time.monotonic()
        assert main(["kv", where, "put", "k", "v", "--client", "7", "--timeout", "20"]) == 1
        assert time.monotonic() - t0 < 10.0
        err = capsys.readouterr().err
        assert "pbft kv: client 7 is not admitted by the cluster (revoked or never added)" in err, err
    assert main(["kv", d, "get", "other", "--client", "5"]) == 0
    assert capsys.readouterr().out == "works\n"
