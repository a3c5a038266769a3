"""Membership changes on a real local cluster (``pbft reconfig DIR add-replica / remove-replica``):
a cluster with 7 replica slots grows 4 -> 7 under a light key-value load (the added replicas start
as joiners and catch up by state transfer, then execute), and shrinks back 7 -> 4; every
acknowledged put is read back afterwards."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pbft import BlockingClient
from pbft.runtime.client import PbftError
from pbft.runtime.cluster import MembershipWatch, load_cluster
from pbft.services.kv import KVClient
from pbft.tools.cli import main

pytestmark = pytest.mark.slow


class Load:
    """One client putting distinct keys until stopped; it follows the membership in force
    (epoch.json) as ``pbft kv`` would at its next start. ``acked``: the puts it got a result for."""

    def __init__(self, directory, client: int):
        self.dir = directory
        self.client = client
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.times: list[float] = []  # when each put was acknowledged (monotonic)

    def run(self) -> None:
        watch = MembershipWatch(load_cluster(self.dir))
        with BlockingClient(watch.cluster, self.client) as bc:
            kv = KVClient(bc.invoke, timeout=3.0)
            i = 0
            while not self.stop.is_set():
                if (now := watch.poll()) is not None:
                    bc.set_membership(now)
                k, v = b"m%d-%05d" % (self.client, i), b"v%d" % i
                try:
                    kv.put(k, v)
                except PbftError:
                    self.failed += 1
                    continue  # (the same key again: a put is idempotent)
                self.acked[k] = v
                self.times.append(time.monotonic())
                i += 1
                time.sleep(0.01)


def members(lc, i: int) -> dict:
    return lc.status(i)["members"]


def test_grow_4_to_7_and_shrink_back_under_load(local_cluster, capsys):
    lc = local_cluster(replica_slots=7, clients=2,
                       protocol={"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16,
                                 "view_change_timeout_ms": 500.0})
    d = str(lc.dir)
    assert [r.id for r in lc.cluster.slots] == list(range(7)) and lc.cluster.cfg.n == 4
    load = Load(lc.dir, lc.cluster.client_ids[0])
    load.thread.start()
    lc.wait_for(lambda: len(load.acked) >= 20, what="the load running")

    # negative control: a spare slot is no member, its process refuses to start
    lc.start(5)
    lc.wait_for(lambda: lc.procs[5].poll() is not None, what="a spare slot's process exiting")
    assert "is not a member" in lc.log_text(5)

    assert main(["reconfig", d, "add-replica", "--count", "3", "--json"]) == 0
    out = capsys.readouterr().out
    grow = json.loads(out.strip().splitlines()[-1])
    assert grow["n"] == 7 and grow["f"] == 2
    now = load_cluster(d)
    assert now.cfg.n == 7 and now.cfg.f == 2 and now.members_from == grow["members_from"]
    for i in (4, 5, 6):
        lc.start(i)
    lc.n = 7
    s = grow["members_from"]
    lc.wait_for(lambda: all(members(lc, i)["n"] == 7 and members(lc, i)["members_from"] == s for i in range(7)),
                timeout=60, what="every replica in the membership of 7")
    # the added replicas catch up and execute what the new membership orders
    done = len(load.acked)
    lc.wait_for(lambda: len(load.acked) >= done + 30, timeout=60, what="the load going on with 7 replicas")
    top = max(lc.status(i)["last_executed"] for i in range(4))
    lc.wait_for(lambda: all(lc.status(i)["last_executed"] >= top > s for i in (4, 5, 6)), timeout=60,
                what="the added replicas executing")
    assert all(lc.status(i)["config"]["epoch"] == grow["epoch"] for i in range(7))
    assert main(["status", d]) == 0
    table = capsys.readouterr().out
    assert "membership: 7 replicas, f=2" in table and table.count(" 7/2") == 7

    assert main(["reconfig", d, "remove-replica", "--count", "3", "--json"]) == 0
    shrink = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shrink["n"] == 4 and shrink["f"] == 1
    s2 = shrink["members_from"]
    lc.wait_for(lambda: all(members(lc, i)["n"] == 4 and members(lc, i)["members_from"] == s2 for i in range(4)),
                timeout=60, what="replicas 0..3 in the membership of 4")
    done = len(load.acked)
    lc.wait_for(lambda: len(load.acked) >= done + 30, timeout=60, what="the load going on with 4 replicas")
    assert main(["status", d]) == 0
    table = capsys.readouterr().out  # (the removed replicas still run: shown retired)
    rows = {int(line.split()[0]): line for line in table.splitlines()[1:] if line.split()[0].isdigit()}
    assert "membership: 4 replicas, f=1" in table and sorted(rows) == list(range(7))
    assert all(rows[i].endswith(" 4/1") and " retired " not in rows[i] for i in range(4))
    assert all(" retired " in rows[i] for i in (4, 5, 6))
    load.stop.set()
    load.thread.join(20)
    assert not load.thread.is_alive()
    # every acknowledged put is there, read through the membership in force (epoch.json: 4)
    assert load_cluster(d).cfg.n == 4
    with BlockingClient(d, lc.cluster.client_ids[1]) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)
        missing = [k for k, v in load.acked.items() if kv.get(k, read_only=False) != v]
    assert not missing, f"{len(missing)} acknowledged puts lost, e.g. {missing[:3]}"
