"""Restarting and recovering across a membership change, on a real local cluster: a cluster of 4
with 5 replica slots grows to 5 (``pbft reconfig DIR add-replica``), then

* a replica restarts after the switch with a damaged store (a value's bytes overwritten on
  disk: its state is unusable, ``state-repair``), and
* a replica whose proactive recovery spans the switch (its process paused before the change,
  the recovery asked for meanwhile: it reboots from a checkpoint before the switch),

and each comes back in the membership in force (``/status`` ``members``: 5 replicas) and executes
the requests issued after it came back, its last executed sequence number advancing with the
others'."""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers.netutil import LocalCluster
from pbft import BlockingClient
from pbft.runtime.cluster import load_cluster
from pbft.services.kv import KVClient
from pbft.tools.cli import main

pytestmark = pytest.mark.slow

PROTOCOL = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
MARK = b"SWITCH-VICTIM!"


def grown(local_cluster, capsys) -> tuple[LocalCluster, dict]:
    """A cluster of 4 replicas (5 slots), grown to 5 by ``pbft reconfig add-replica``, every
    replica in the membership of 5, with a value written before the change."""
    lc = local_cluster(n=4, clients=2, protocol=PROTOCOL, replica_slots=5)
    with BlockingClient(lc.dir) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        kv.put(b"victim", MARK * 100)
        for j in range(12):
            kv.put(b"k%d" % j, b"before-%d" % j)
    capsys.readouterr()
    assert main(["reconfig", str(lc.dir), "add-replica", "--json"]) == 0
    grow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert grow["n"] == 5
    lc.start(4)
    lc.n = 5
    s = grow["members_from"]
    lc.wait_for(lambda: all(in_membership(lc, i, s) for i in range(5)), timeout=40,
                what="every replica in the membership of 5")
    return lc, grow


def in_membership(lc: LocalCluster, rid: int, members_from: int) -> bool:
    m = lc.status(rid)["members"]
    return m["n"] == 5 and m["members_from"] == members_from and not m["retired"]


def put_after(lc: LocalCluster, tag: bytes, count: int) -> None:
    """Requests issued now, through the membership in force (epoch.json)."""
    with BlockingClient(load_cluster(lc.dir)) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        for j in range(count):
            kv.put(b"%s-%d" % (tag, j), b"after-%d" % j)


def executes_with_the_others(lc: LocalCluster, rid: int, tag: bytes) -> None:
    """``rid`` executes requests issued after it came back: its last execution reaches the
    others' and moves on with them."""
    put_after(lc, tag + b"-a", 12)
    top = max(lc.status(i)["last_executed"] for i in range(5) if i != rid)
    lc.wait_for(lambda: lc.status(rid)["last_executed"] >= top, timeout=30,
                what=f"replica {rid} executing what the others executed ({top})")
    put_after(lc, tag + b"-b", 12)
    top2 = max(lc.status(i)["last_executed"] for i in range(5) if i != rid)
    assert top2 > top
    lc.wait_for(lambda: lc.status(rid)["last_executed"] >= top2, timeout=30,
                what=f"replica {rid} executing new requests ({top2})")


def damage(lc: LocalCluster, rid: int) -> int:
    hits = 0
    for name in ("data.mdb", "wal"):
        with open(lc.cluster.storage.replica_dir(lc.dir, rid) / name, "r+b") as fh:
            data = fh.read()
            at = data.find(MARK * 4)
            while at >= 0:
                fh.seek(at + 20)
                fh.write(b"#")
                hits += 1
                at = data.find(MARK * 4, at + len(MARK) * 100)
    return hits


def test_a_replica_restarted_with_a_damaged_store_after_a_growth_rejoins(local_cluster, capsys):
    lc, grow = grown(local_cluster, capsys)
    s = grow["members_from"]
    put_after(lc, b"x", 20)  # checkpoints after the switch, in every replica's store
    lc.wait_for(lambda: lc.status(2)["stable_checkpoint"] > s, what="a checkpoint after the switch at 2")
    lc.signal(2, signal.SIGTERM)
    lc.procs[2].wait(10)
    assert damage(lc, 2) >= 1
    lc.start(2)
    lc.wait_for(lambda: lc.status(2)["restored"] == "state-repair", timeout=30, what="replica 2 up, damage found")
    lc.wait_for(lambda: in_membership(lc, 2, s), timeout=30, what="replica 2 in the membership of 5")
    executes_with_the_others(lc, 2, b"d")
    assert "store-damaged" in lc.log_text(2)
    with BlockingClient(load_cluster(lc.dir)) as bc:
        assert KVClient(bc.invoke, timeout=20.0).get(b"victim", read_only=False) == MARK * 100


def started_lines(lc: LocalCluster, rid: int) -> list[dict]:
    out = []
    for line in lc.log_text(rid).splitlines():
        if line.startswith("{") and '"started"' in line:
            out.append(json.loads(line))
    return out


def test_a_proactive_recovery_spanning_a_growth_comes_back_in_the_new_membership(local_cluster, capsys):
    """Replica 3's recovery is asked for (SIGUSR1: ``recover_now``); its process is paused as soon
    as the old one has stopped, before the rebooted one reads its store; the cluster grows
    meanwhile; then the rebooted process runs on, from a checkpoint of before the switch."""
    lc = local_cluster(n=4, clients=2, protocol=PROTOCOL, replica_slots=5)
    put_after(lc, b"pre", 12)
    lc.signal(3, signal.SIGUSR1)
    deadline = time.time() + 20
    while lc.log_text(3).count('"stopped"') < 1:  # (the old process's last line, then the exec)
        assert time.time() < deadline, "replica 3 did not reboot"
        time.sleep(0.005)
    lc.signal(3, signal.SIGSTOP)  # the rebooted process waits ...
    try:
        assert main(["reconfig", str(lc.dir), "add-replica", "--json"]) == 0  # ... while the cluster grows
        grow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        s = grow["members_from"]
        lc.start(4)
        lc.n = 5
        lc.wait_for(lambda: all(in_membership(lc, i, s) for i in (0, 1, 2, 4)), timeout=40,
                    what="replicas 0, 1, 2, 4 in the membership of 5")
        put_after(lc, b"mid", 12)
    finally:
        lc.signal(3, signal.SIGCONT)
    lc.wait_for(lambda: (st := lc.status(3))["recoveries"] >= 1 and st["recovering"] is None, timeout=40,
                what="replica 3 recovered")
    lc.wait_for(lambda: in_membership(lc, 3, s), timeout=30, what="replica 3 in the membership of 5")
    executes_with_the_others(lc, 3, b"r")
    starts = started_lines(lc, 3)
    assert len(starts) == 2 and starts[1]["n"] == 4, starts  # rebooted from a store of before the switch
    assert "recovery-reboot" in lc.log_text(3)
