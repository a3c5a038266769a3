"""Restarting and recovering across a membership change, on a real local cluster: a growth
4 -> 7 and a shrink 7 -> 4 (``pbft reconfig DIR add-replica / remove-replica``; the removed
replicas stopped once the continuing members switched), and then

* a replica restarts after the switch with a damaged store (a value's bytes overwritten on
  disk: its state is unusable, ``state-repair``), after the others moved on beyond its log window
  (it comes up with cluster.toml's membership, fetches a certified checkpoint, whose state
  records the new one, and switches), or
* a replica's proactive recovery spans the switch (asked for with SIGUSR1, the rebooted process
  paused as soon as the old one stopped, while the membership changes: it restores a checkpoint of
  before the switch, and catches up beyond its window through the membership its chain
  certifies),

* a replica down from before a growth until the others are beyond its window after the switch
  restarts with its store (no change recorded): it rejoins the membership its chain certifies
  (``membership-rejoin``), with one of its old membership's members down,

and each comes back in the membership in force (``/status`` ``members``) and executes the
requests issued after it came back, its last executed sequence number reaching the others'.
Last, an added replica restarted alone (no peer up, no epoch.json) takes the membership of the
chain kept in its data directory."""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers.netutil import LocalCluster, corrupt_store
from pbft import BlockingClient
from pbft.runtime.cluster import load_cluster
from pbft.services.kv import KVClient
from pbft.tools.cli import main

pytestmark = pytest.mark.slow

PROTOCOL = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
MARK = b"SWITCH-VICTIM!"


CHANGES = {"grow-4-7": (4, 7), "shrink-7-4": (7, 4)}


def changed(local_cluster, capsys, change: str) -> tuple[LocalCluster, dict]:
    """A cluster of ``CHANGES[change][0]`` replicas changed to ``[1]`` (``change_membership``),
    every replica in the new membership, with a value written before the change."""
    n0, n1 = CHANGES[change]
    lc = local_cluster(n=n0, clients=2, protocol=PROTOCOL, replica_slots=max(n0, n1))
    with BlockingClient(lc.dir) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        kv.put(b"victim", MARK * 100)
        for j in range(12):
            kv.put(b"k%d" % j, b"before-%d" % j)
    got = change_membership(lc, capsys, n1)
    lc.wait_for(lambda: all(in_membership(lc, i, got) for i in range(n1)), timeout=40,
                what=f"every replica in the membership of {n1}")
    return lc, got


def change_membership(lc: LocalCluster, capsys, n: int, absent: tuple[int, ...] = ()) -> dict:
    """``pbft reconfig DIR add-replica`` or ``remove-replica`` to ``n`` replicas: the added
    replicas started; the removed ones stopped once the members but ``absent`` switched."""
    capsys.readouterr()
    action = "add-replica" if n > lc.n else "remove-replica"
    assert main(["reconfig", str(lc.dir), action, "--count", str(abs(n - lc.n)), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["n"] == n
    for i in range(lc.n, n):
        lc.start(i)
    if n < lc.n:
        lc.wait_for(lambda: all(in_membership(lc, i, got) for i in range(n) if i not in absent), timeout=40,
                    what="the continuing members switched")
        for i in range(n, lc.n):
            lc.kill(i)
    lc.n = n
    return got


def in_membership(lc: LocalCluster, rid: int, target: dict) -> bool:
    """Whether ``rid``'s ``/status`` shows the membership ``pbft reconfig`` reported."""
    m = lc.status(rid)["members"]
    t = target
    return (m["n"], m["f"], m["members_from"], m["retired"]) == (t["n"], t["f"], t["members_from"], False)


def put_after(lc: LocalCluster, tag: bytes, count: int) -> None:
    """Requests issued now, through the membership in force (epoch.json)."""
    with BlockingClient(load_cluster(lc.dir)) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        for j in range(count):
            kv.put(b"%s-%d" % (tag, j), b"after-%d" % j)


def executes_with_the_others(lc: LocalCluster, rid: int, tag: bytes, down: tuple[int, ...] = ()) -> None:
    """``rid`` executes requests issued after it came back: its last execution reaches the
    others' (but ``down``'s) and moves on with them."""
    put_after(lc, tag + b"-a", 12)
    top = max(lc.status(i)["last_executed"] for i in range(lc.n) if i != rid and i not in down)
    lc.wait_for(lambda: lc.status(rid)["last_executed"] >= top, timeout=30,
                what=f"replica {rid} executing what the others executed ({top})")
    put_after(lc, tag + b"-b", 12)
    top2 = max(lc.status(i)["last_executed"] for i in range(lc.n) if i != rid and i not in down)
    assert top2 > top
    lc.wait_for(lambda: lc.status(rid)["last_executed"] >= top2, timeout=30,
                what=f"replica {rid} executing new requests ({top2})")


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_replica_restarted_with_a_damaged_store_after_a_change_rejoins(local_cluster, capsys, change):
    lc, target = changed(local_cluster, capsys, change)
    s = target["members_from"]
    put_after(lc, b"x", 20)  # checkpoints after the switch, in every replica's store
    lc.wait_for(lambda: lc.status(2)["stable_checkpoint"] > s, what="a checkpoint after the switch at 2")
    lc.signal(2, signal.SIGTERM)
    lc.procs[2].wait(10)
    assert corrupt_store(lc, 2, MARK, offset=20) >= 1
    put_after(lc, b"while-down", 40)  # the others move on, beyond its log window
    lc.start(2)
    lc.wait_for(lambda: lc.status(2)["restored"] == "state-repair", timeout=30, what="replica 2 up, damage found")
    lc.wait_for(lambda: in_membership(lc, 2, target), timeout=30, what="replica 2 in the new membership")
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


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_proactive_recovery_spanning_a_change_comes_back_in_the_new_membership(local_cluster, capsys, change):
    """Replica 3's recovery is asked for (SIGUSR1: ``recover_now``); its process is paused as soon
    as the old one has stopped (the rebooted one starts then, from the store of before the
    change); the membership changes meanwhile; then the rebooted process runs on."""
    n0, n1 = CHANGES[change]
    lc = local_cluster(n=n0, clients=2, protocol=PROTOCOL, replica_slots=max(n0, n1))
    put_after(lc, b"pre", 12)
    lc.signal(3, signal.SIGUSR1)
    deadline = time.time() + 20
    while lc.log_text(3).count('"stopped"') < 1:  # (the old process's last line, then the exec)
        assert time.time() < deadline, "replica 3 did not reboot"
        time.sleep(0.005)
    lc.signal(3, signal.SIGSTOP)  # the rebooted process waits ...
    try:
        target = change_membership(lc, capsys, n1, absent=(3,))  # ... while the membership changes
        lc.wait_for(lambda: all(in_membership(lc, i, target) for i in range(lc.n) if i != 3), timeout=40,
                    what="the others in the new membership")
        put_after(lc, b"mid", 12)
    finally:
        lc.signal(3, signal.SIGCONT)
    lc.wait_for(lambda: (st := lc.status(3))["recoveries"] >= 1 and st["recovering"] is None, timeout=40,
                what="replica 3 recovered")
    lc.wait_for(lambda: in_membership(lc, 3, target), timeout=30, what="replica 3 in the new membership")
    executes_with_the_others(lc, 3, b"r")
    starts = started_lines(lc, 3)
    assert len(starts) == 2 and starts[1]["n"] == n0, starts  # rebooted from a store of before the switch
    assert "recovery-reboot" in lc.log_text(3)


def test_an_added_replica_restarted_alone_takes_the_membership_of_the_chain_it_holds(local_cluster, capsys):
    """After a growth 4 -> 5 every replica stops and epoch.json is gone (a machine with only
    cluster.toml): the added replica 4, started first with no peer to ask, takes the membership
    its stored chain certifies (not cluster.toml's, where it is no member) and restores; the
    others start, and it executes new requests with them."""
    from pbft.runtime.cluster import EPOCH_FILE

    lc = local_cluster(n=4, clients=2, protocol=PROTOCOL, replica_slots=5)
    put_after(lc, b"pre", 12)
    target = change_membership(lc, capsys, 5)
    lc.wait_for(lambda: all(in_membership(lc, i, target) for i in range(5)), timeout=40,
                what="every replica in the membership of 5")
    put_after(lc, b"mid", 20)
    lc.wait_for(lambda: lc.status(4)["stable_checkpoint"] > target["members_from"], what="a checkpoint at 4")
    for i in range(5):
        lc.signal(i, signal.SIGTERM)
    for i in range(5):
        lc.procs[i].wait(10)
    (lc.dir / EPOCH_FILE).unlink()
    lc.start(4)
    lc.wait_for(lambda: in_membership(lc, 4, target), timeout=20, what="replica 4 up in the membership of 5")
    assert lc.status(4)["restored"] == "restored"
    for i in range(4):
        lc.start(i)
    executes_with_the_others(lc, 4, b"h")
    assert "the chain replica 4 holds certifies a membership of 5 replicas" in lc.log_text(4)


def test_a_replica_down_across_a_growth_rejoins_the_membership_its_chain_certifies(local_cluster, capsys):
    """Replica 3 stops (SIGTERM), the others move on beyond its log window, the membership grows
    4 -> 7, the others switch and move on again; replica 3 restarts with its store: its state
    records no change (executed beyond its window), so it asks its chain before catching up
    (``chain-wanted``), for a checkpoint after the switch point, and rejoins the membership of 7
    the chain certifies (``membership-rejoin``); then it executes new requests with the others.
    Replica 1 is stopped before replica 3 restarts: of its old membership, replica 3 then hears
    only replicas 0 and 2 (the added replicas' frames are not a member's to it), f + 1 of the old
    thresholds but fewer than f + 1 of the new ones; without the rejoin it could not catch up."""
    lc = local_cluster(n=4, clients=2, protocol=PROTOCOL, replica_slots=7)
    put_after(lc, b"pre", 12)
    lc.signal(3, signal.SIGTERM)
    lc.procs[3].wait(10)
    put_after(lc, b"gone", 40)  # the change executes beyond its window: its state will not record it
    target = change_membership(lc, capsys, 7, absent=(3,))
    s = target["members_from"]
    lc.wait_for(lambda: all(in_membership(lc, i, target) for i in range(7) if i != 3), timeout=40,
                what="the others in the membership of 7")
    put_after(lc, b"mid", 40)
    lc.wait_for(lambda: lc.status(0)["stable_checkpoint"] > s + PROTOCOL["log_window_seqnos"], timeout=30,
                what="the others beyond replica 3's window after the switch")
    lc.signal(1, signal.SIGTERM)
    lc.procs[1].wait(10)
    lc.start(3)
    lc.wait_for(lambda: in_membership(lc, 3, target), timeout=30, what="replica 3 in the membership of 7")
    executes_with_the_others(lc, 3, b"j", down=(1,))
    starts = started_lines(lc, 3)
    assert len(starts) == 2 and starts[1]["n"] == 4, starts  # restarted from a store of before the change
    rejoin = [json.loads(line) for line in lc.log_text(3).splitlines()
              if line.startswith("{") and '"membership-rejoin"' in line]
    assert len(rejoin) == 1 and rejoin[0]["n"] == 7 and rejoin[0]["members_from"] == s, rejoin
    assert rejoin[0]["chain_wanted"] > s
