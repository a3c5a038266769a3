"""Clients learn the membership from the cluster itself (runtime.chain_keeper, runtime.follow):
after a growth 4 -> 7 the replicas serve a membership certificate chain; the added replicas, a
fresh client process and a client running across the change, all with only cluster.toml (no
epoch.json), verify it and work with the 7 replicas, and a tampered epoch.json is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from helpers import netutil
from pbft import BlockingClient
from pbft.config import ConfigError
from pbft.runtime.chain import decode_chain, verify_chain
from pbft.runtime.cluster import EPOCH_FILE, free_port_range, load_cluster
from pbft.runtime.follow import genesis_keys, learn
from pbft.services.kv import KVClient
from pbft.tools.cli import main

pytestmark = pytest.mark.slow

SRC = str(netutil.Path(netutil.__file__).resolve().parents[2] / "src")


def kv(d: str, client: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pbft.cli", "kv", d, "--client", str(client), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_client_with_only_cluster_toml_follows_a_growth_and_a_tampered_epoch_file_is_refused(
        local_cluster, capsys, monkeypatch):
    monkeypatch.setattr(netutil, "free_base_port", lambda span: free_port_range(span, prefer=24000))
    lc = local_cluster(replica_slots=7, clients=2,
                       protocol={"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16,
                                 "view_change_timeout_ms": 500.0})
    d = str(lc.dir)
    c = lc.cluster.client_ids[0]
    # the genesis membership: no link yet
    assert learn(lc.cluster).links == ()
    # a client that runs across the change, with nothing but cluster.toml and no MembershipWatch
    early = BlockingClient(load_cluster(d), lc.cluster.client_ids[1])
    KVClient(early.invoke, timeout=10.0).put(b"before", b"1")

    assert main(["reconfig", d, "add-replica", "--count", "3", "--json"]) == 0
    grow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    epoch_doc = (lc.dir / EPOCH_FILE).read_text()
    # the added replicas start with only cluster.toml too: they learn the membership they join
    # from the replicas' chains, verified against cluster.toml
    (lc.dir / EPOCH_FILE).unlink()
    for i in (4, 5, 6):
        lc.start(i)
    lc.n = 7
    doc = json.loads(epoch_doc)
    links = decode_chain(bytes.fromhex(doc["chain"]))
    g = lc.cluster.genesis_cfg
    m = verify_chain(g, genesis_keys(lc.cluster), links)
    assert (m.n, m.f, m.opens_at, m.epoch) == (7, 2, grow["members_from"], grow["epoch"])
    # signed by genesis members only (ids 0..3), of quorum weight of the genesis membership
    assert {s for s, _ in links[0].signatures} <= {0, 1, 2, 3} and len(links[0].signatures) >= 3

    # a fresh client process with only cluster.toml: it learns the 7 members from the replicas
    assert load_cluster(d).cfg.n == 4  # (what cluster.toml alone says)
    w = kv(d, c, "put", "colour", "green")
    assert w.returncode == 0, w.stderr
    r = kv(d, c, "get", "colour")
    assert r.returncode == 0 and r.stdout.strip() == "green", (r.stdout, r.stderr)
    # the running client follows by itself: its request goes unanswered by the old members alone
    # (the new membership needs 5 replies), it fetches the chain and moves to the 7
    kv_early = KVClient(early.invoke, timeout=30.0)
    kv_early.put(b"after", b"2")
    assert kv_early.get(b"before", read_only=False) == b"1"
    assert early.memberships_followed == 1 and early.cluster.cfg.n == 7
    early.close()
    # the added replicas took part: they executed the put too
    lc.wait_for(lambda: all(lc.status(i)["last_executed"] > grow["members_from"] for i in (4, 5, 6)),
                timeout=30, what="the added replicas executing")
    # every replica serves the chain, the added ones too (learnt before they started)
    lc.wait_for(lambda: all(lc.status(i)["chain"]["n"] == 7 for i in range(7)), timeout=20,
                what="every replica holding the link")
    assert all("the replicas certify a membership of 7 replicas (f=2)" in lc.log_text(i) for i in (4, 5, 6))
    r0 = lc.cluster.slot(0)
    with urllib.request.urlopen(f"http://{r0.metrics_addr}:{r0.metrics_port}/chain?from=0", timeout=5) as resp:
        served = json.loads(resp.read())
    assert served["links"] == 1 and decode_chain(bytes.fromhex(served["chain"])) == links
    with urllib.request.urlopen(f"http://{r0.metrics_addr}:{r0.metrics_port}/chain?from=1", timeout=5) as resp:
        assert json.loads(resp.read())["links"] == 0
    capsys.readouterr()
    assert main(["status", d]) == 0  # (no epoch.json: the membership the replicas' chains certify)
    table = capsys.readouterr().out
    assert "membership: 7 replicas, f=2" in table and "certified by the chain replicas [" in table
    assert table.count(" 7/2") == 7 and " retired " not in table

    # a tampered epoch.json is refused: a membership the chain does not end at ...
    tampered = json.loads(epoch_doc)
    key = "next_members" if "next_members" in tampered else "members"
    tampered[key]["f"] = 1
    (lc.dir / EPOCH_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ConfigError, match="is not the one its certificate chain ends at"):
        load_cluster(d)
    # ... a chain whose signatures do not verify ...
    tampered = json.loads(epoch_doc)
    raw = bytearray(bytes.fromhex(tampered["chain"]))
    raw[-5] ^= 1  # (inside the last signature)
    tampered["chain"] = raw.hex()
    (lc.dir / EPOCH_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ConfigError, match="bad signature"):
        load_cluster(d)
    # ... and a grown membership without its chain
    tampered = json.loads(epoch_doc)
    del tampered["chain"]
    (lc.dir / EPOCH_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ConfigError, match="not the one its certificate chain ends at"):
        load_cluster(d)
    assert kv(d, c, "get", "colour").returncode != 0  # (the command says why, and stops)
    # the remedy the refusal names: `pbft reconfig DIR show` writes it again from the replicas
    capsys.readouterr()
    assert main(["reconfig", d, "show"]) == 0
    assert "reading the configuration from the replicas instead" in capsys.readouterr().err
    assert load_cluster(d).cfg.n == 7 and load_cluster(d).chain
    (lc.dir / EPOCH_FILE).write_text(json.dumps(tampered))
    assert main(["reconfig", d, "set-recovery-period", "3600"]) != 0  # (a change is still refused)
    (lc.dir / EPOCH_FILE).write_text(epoch_doc)


def test_a_replica_key_rotation_is_chained_and_a_client_with_only_cluster_toml_learns_it(
        local_cluster, capsys, monkeypatch):
    """``rotate-key`` of replica 1 on a live cluster of 4: every replica's chain gets the link of
    the rotation's epoch (signed with the keys of the link before: replica 1 with its old key),
    a fresh client with only cluster.toml takes replica 1's new key from the chain (not from
    epoch.json) and its requests complete, and ``pbft reconfig DIR status`` shows it."""
    monkeypatch.setattr(netutil, "free_base_port", lambda span: free_port_range(span, prefer=21400))
    lc = local_cluster(clients=1, protocol={"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16,
                                            "view_change_timeout_ms": 500.0})
    d = str(lc.dir)
    old_key = lc.cluster.public_key_of(1)
    assert main(["reconfig", d, "rotate-key", "1"]) == 0
    capsys.readouterr()
    new_key = load_cluster(d).public_key_of(1)  # (epoch.json, written with the chain that certifies it)
    assert new_key != old_key
    lc.wait_for(lambda: all(lc.status(i)["chain"]["config_epoch"] == 1 for i in range(4)), timeout=20,
                what="every replica holding the rotation's link")
    doc = json.loads((lc.dir / EPOCH_FILE).read_text())
    links = decode_chain(bytes.fromhex(doc["chain"]))
    assert len(links) == 1 and links[0].config is not None and links[0].config.epoch == 1
    assert links[0].members.keys[1] == new_key
    # checked against the genesis keys: replica 1's vote, if it counted, was made with its old key
    assert verify_chain(lc.cluster.genesis_cfg, genesis_keys(lc.cluster), links).keys[1] == new_key
    assert "chain-sign-unavailable" not in lc.log_text(1)
    # every replica serves the configuration the link certifies, matching its digest
    got = learn(lc.cluster)
    assert got.config is not None and got.config.replica_keys[1] == new_key and not got.refused
    assert sorted(got.served_by) == [0, 1, 2, 3]

    (lc.dir / EPOCH_FILE).unlink()  # a client machine with only cluster.toml
    fresh = load_cluster(d)
    assert fresh.public_key_of(1) == old_key and fresh.epoch == 0
    with BlockingClient(fresh, lc.cluster.client_ids[0]) as bc:
        assert bytes(bc.cluster.public.verify[1]) == new_key and bc.cluster.epoch == 1
        store = KVClient(bc.invoke, timeout=20.0)
        store.put(b"rotated", b"yes")
        assert store.get(b"rotated", read_only=False) == b"yes"
    w = kv(d, lc.cluster.client_ids[0], "get", "rotated")  # (a process: the same, from cluster.toml)
    assert w.returncode == 0 and w.stdout.strip() == "yes", (w.stdout, w.stderr)

    assert main(["reconfig", d, "status"]) == 0
    out = capsys.readouterr().out
    assert "configuration epoch 1 (in force from checkpoint" in out
    assert f"replica 1: key {new_key.hex()} (rotated: cluster.toml has {old_key.hex()[:16]}" in out
    assert main(["reconfig", d, "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["epoch"] == 1 and st["rotated"] == [1] and st["configuration"]["replicas"][1] == new_key.hex()
