"""Cluster files and keys: every mistake is a clear one-line error, never a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from helpers.chainutil import chain_hex
from helpers.netutil import SRC
from pbft.config import ConfigError
from pbft.runtime.cluster import init_cluster, load_cluster


def pbft(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pbft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=30, env=env)


def test_init_writes_cluster_and_private_keys(tmp_path):
    c = init_cluster(tmp_path, 7, None, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 9000, 3)
    assert c.n == 7 and c.cfg.f == 2 and c.cfg.quorum_weight == 5
    assert [r.host for r in c.replicas] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2 + ["10.0.0.1"]
    assert [r.port for r in c.replicas] == list(range(9000, 9007))
    assert c.client_ids == [7, 8, 9]
    for p in (tmp_path / "keys").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    # the identities load and match the public keys in the file
    assert c.identity(3).public == c.replicas[3].public_key
    assert c.identity(8).public == c.client_keys[8]
    again = load_cluster(tmp_path)
    assert again.cfg == c.cfg


def edit(path, old, new):
    s = path.read_text()
    assert old in s, old
    path.write_text(s.replace(old, new, 1))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: edit(d / "cluster.toml", "faults = 1", "faults = 2"), "cannot tolerate 2 Byzantine faults"),
    (lambda d: edit(d / "cluster.toml", "port = 7001", "port = 7000"), "already used by replica 0"),
    (lambda d: edit(d / "cluster.toml", "id = 3\n", "id = 2\n"), "appears twice"),
    (lambda d: edit(d / "cluster.toml", "weight = 1", "weight = 9"), "weights"),
    (lambda d: edit(d / "cluster.toml", "[cluster]", "[cluster"), "not valid TOML"),
    (lambda d: edit(d / "cluster.toml", "replicas = 4", 'replicas = "four"'), "replicas must be an integer"),
    (lambda d: edit(d / "cluster.toml", "checkpoint_interval_seqnos = 128", "checkpoint_interval_seqnos = 100"),
     "multiple of the checkpoint interval"),
    (lambda d: edit(d / "cluster.toml", "[protocol]", "[protocol]\nfrobs = 3"), "unknown protocol parameter"),
    (lambda d: edit(d / "cluster.toml", "receive_budget_frames = 64", "receive_budget_frames = -1"),
     "must be a positive int"),
    (lambda d: edit(d / "cluster.toml", 'public_key = "', 'public_key = "zz'), "public_key must be"),
    (lambda d: edit(d / "cluster.toml", 'scheduling = "batch"', 'scheduling = "fifo"'),
     "scheduling must be one of batch, normal"),
    (lambda d: os.remove(d / "cluster.toml"), "cannot read"),
])
def test_bad_cluster_files_are_one_line_errors(tmp_path, mutate, message):
    init_cluster(tmp_path, 4, None, None, 7000, 2)
    mutate(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_cluster(tmp_path)
    p = pbft("status", tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("pbft: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_bad_key_files(tmp_path):
    c = init_cluster(tmp_path, 4, None, None, 7000, 2)
    (tmp_path / "keys" / "replica-1.key").write_text("nothex\n")
    with pytest.raises(ConfigError, match="not a hex key"):
        c.identity(1)
    (tmp_path / "keys" / "replica-1.key").write_text("00" * 32 + "\n")
    with pytest.raises(ConfigError, match="does not match the public key"):
        c.identity(1)
    os.remove(tmp_path / "keys" / "replica-2.key")
    p = pbft("replica", tmp_path, "--id", 2)
    assert p.returncode == 2 and "cannot read key file" in p.stderr and "Traceback" not in p.stderr
    p = pbft("replica", tmp_path, "--id", 9)
    assert p.returncode == 2 and "--id must be a replica id" in p.stderr


@pytest.mark.slow
def test_init_refuses_impossible_clusters(tmp_path):
    p = pbft("init", tmp_path / "a", "--replicas", 3, "--faults", 1)
    assert p.returncode == 2 and "need at least 3f+1 = 4" in p.stderr
    p = pbft("init", tmp_path / "b", "--replicas", 4, "--hosts", "bad host")
    assert p.returncode == 2 and "bad host name" in p.stderr
    assert pbft("init", tmp_path / "c", "--replicas", 4).returncode == 0
    p = pbft("init", tmp_path / "c", "--replicas", 4)
    assert p.returncode == 2 and "already exists" in p.stderr
    p = pbft("replica", tmp_path / "c", "--id", 0, "--service", "nosuchmodule:X")
    assert p.returncode == 2 and "cannot load service" in p.stderr


def test_init_with_replica_slots_starts_client_ids_after_them(tmp_path):
    c = init_cluster(tmp_path, 4, None, None, 7000, 2, replica_slots=7)
    assert c.n == 4 and c.cfg.replica_slots == 7 and c.cfg.client_base == 7
    assert c.client_ids == [7, 8] and c.admins == (9,)
    assert c.identity(8).public == c.client_keys[8]
    assert load_cluster(tmp_path).cfg == c.cfg
    edit(tmp_path / "cluster.toml", "replica_slots = 7", "replica_slots = 3")
    with pytest.raises(ConfigError, match=r"replica_slots = 3 is out of range \[4, "):
        load_cluster(tmp_path)
    with pytest.raises(ConfigError, match="--replica-slots"):
        init_cluster(tmp_path / "x", 4, None, None, 7000, 2, replica_slots=3)


def test_init_writes_addresses_and_keys_of_the_spare_replica_slots(tmp_path):
    c = init_cluster(tmp_path, 4, None, None, 7000, 2, replica_slots=7)
    assert [r.id for r in c.replicas] == [0, 1, 2, 3] and [r.id for r in c.slots] == list(range(7))
    assert [r.port for r in c.slots] == list(range(7000, 7007))
    assert (c.cfg.n, c.genesis_cfg.n if c.genesis_cfg else None) == (4, 4)
    for i in (4, 5, 6):  # a joiner's address and keys exist before it is a member
        assert c.identity(i).public == c.slot(i).public_key == bytes(c.public.verify[i])
    with pytest.raises(ConfigError, match="no replica slot 7"):
        c.slot(7)
    text = (tmp_path / "cluster.toml").read_text()
    edit(tmp_path / "cluster.toml", "replica_slots = 7", "replica_slots = 5")
    with pytest.raises(ConfigError, match=r"7 \[\[replica\]\] entries"):
        load_cluster(tmp_path)
    (tmp_path / "cluster.toml").write_text(text.replace("id = 6\n", "id = 9\n", 1))
    with pytest.raises(ConfigError, match="replica ids must be 0..6"):
        load_cluster(tmp_path)


def test_the_membership_in_force_comes_from_epoch_json(tmp_path):
    import dataclasses
    import json

    from pbft.runtime.cluster import EPOCH_FILE, with_membership
    from pbft.state.configuration import ConfigRecord, Membership
    c = init_cluster(tmp_path, 4, None, None, 7000, 2, replica_slots=7)
    cs = ConfigRecord.decode(c.genesis_config).latest
    keys = tuple(e.public_key for e in c.slots)
    grown = dataclasses.replace(cs, epoch=1, opens_at=16, next_members=Membership(7, 2, (1,) * 7, keys, 40, 1))
    (tmp_path / EPOCH_FILE).write_text(json.dumps({**grown.describe(),
                                                   "chain": chain_hex(tmp_path, grown)}))
    now = load_cluster(tmp_path)
    assert len(now.chain) == 1
    assert (now.cfg.n, now.cfg.f, now.cfg.client_base, now.members_from, now.members_epoch) == (7, 2, 7, 40, 1)
    assert [r.id for r in now.replicas] == list(range(7)) and now.genesis_cfg.n == 4
    assert now.owner(0) == c.owner(0)  # (the data directories stay the replicas')
    assert with_membership(now, 4, 1, (1,) * 4, 80, 2).replicas == c.replicas
    with pytest.raises(ConfigError, match="no address for replica 7"):
        with_membership(now, 8, 2, (1,) * 8, 80, 2)
    # a membership beyond the slots with an address is refused
    (tmp_path / EPOCH_FILE).write_text(json.dumps(dataclasses.replace(
        grown, next_members=Membership(8, 2, (1,) * 8, keys + keys[:1], 40, 1)).describe()))
    with pytest.raises(ConfigError, match="not of this cluster"):
        load_cluster(tmp_path)


def test_a_membership_watch_reports_each_change_of_the_membership_once(tmp_path):
    import dataclasses
    import json
    import os

    from pbft.runtime.cluster import EPOCH_FILE, MembershipWatch
    from pbft.state.configuration import ConfigRecord, Membership
    c = init_cluster(tmp_path, 4, None, None, 7000, 2, replica_slots=7)
    w = MembershipWatch(load_cluster(tmp_path))
    assert w.poll() is None  # (no epoch.json: the genesis membership)
    cs = ConfigRecord.decode(c.genesis_config).latest
    keys = tuple(e.public_key for e in c.slots)
    path = tmp_path / EPOCH_FILE
    first = dataclasses.replace(cs, epoch=1, opens_at=16)  # (clients only)
    path.write_text(json.dumps({**first.describe(), "chain": chain_hex(tmp_path, first)}))
    assert w.poll() is None and w.cluster.cfg.n == 4
    grown = dataclasses.replace(cs, epoch=2, opens_at=32, next_members=Membership(7, 2, (1,) * 7, keys, 48, 2))
    path.write_text(json.dumps({**grown.describe(), "chain": chain_hex(tmp_path, first, grown)}))
    os.utime(path, (1.0, 1.0))  # (a new mtime even within the file system's time granularity)
    now = w.poll()
    assert now is not None and (now.cfg.n, now.cfg.f, now.members_from) == (7, 2, 48)
    assert w.poll() is None and w.cluster is now
    # a replica's long-term key rotated (the same membership): a running client must encrypt its
    # session keys to the new one, so the watch reports it too
    from pbft.runtime.keys import Identity
    new_key = Identity.generate(1).public
    folded = dataclasses.replace(grown.next_members, keys=(keys[0], new_key, *keys[2:]))
    rotated = dataclasses.replace(grown, epoch=3, opens_at=64, replica_keys=folded.keys, members=folded,
                                  next_members=None)
    path.write_text(json.dumps({**rotated.describe(), "chain": chain_hex(tmp_path, first, grown, rotated)}))
    os.utime(path, (2.0, 2.0))
    now = w.poll()
    assert now is not None and now.public_key_of(1) == new_key and now.cfg.n == 7
    assert w.poll() is None


def test_membership_change_arguments(tmp_path):
    from argparse import Namespace

    from pbft.tools.reconfig import _membership_change
    c = init_cluster(tmp_path, 4, None, None, 7000, 2, replica_slots=7)

    def ask(action, count=None, faults=None, weights=None):
        return _membership_change(c, Namespace(action=action, count=count, faults=faults, weights=weights))
    assert ask("add-replica", 3) == (7, 2, (1,) * 7)
    assert ask("add-replica") == (5, 1, (1,) * 5)
    assert ask("remove-replica", 3) == (1, 0, (1,))
    assert ask("set-weights", weights="2,1,1,1") == (4, 1, (2, 1, 1, 1))
    with pytest.raises(ConfigError, match="7 replica slots"):
        ask("add-replica", 4)
    with pytest.raises(ConfigError, match="needs 4 weights"):
        ask("set-weights", weights="1,1")
    with pytest.raises(ConfigError, match="at least 1"):
        ask("remove-replica", 0)
