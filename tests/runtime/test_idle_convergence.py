"""An idle cluster converges by itself: real replica processes, no client traffic after the faults.

After the faults end, within 5 s and with no client request, every replica is active in the same
view and has executed the same last sequence number: a replica that timed out alone into a view
change is rejoined (the idle rejoin, docs/protocol.md), and a replica restarted near the end of a
workload catches up on what it missed although its keys changed.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from helpers.netutil import LocalCluster
from pbft import BlockingClient
from pbft.services.kv import KVClient

IDLE_BOUND_S = 5.0


def converged(lc: LocalCluster) -> dict | None:
    """The common (view, last executed) when every replica is active in one view, has executed
    the same last sequence number and holds nothing tentative; None otherwise."""
    st = [lc.status(i) for i in range(lc.n)]
    views = {(s["view"], s["view_active"]) for s in st}
    last = {(s["last_executed"], s["last_committed"]) for s in st}
    if (len(views) == 1 and st[0]["view_active"] and len(last) == 1
            and st[0]["last_executed"] == st[0]["last_committed"]):
        return {"view": st[0]["view"], "last_executed": st[0]["last_executed"]}
    return None


def wait_converged(lc: LocalCluster, since: float, what: str) -> tuple[float, dict]:
    got = lc.wait_for(lambda: converged(lc), timeout=IDLE_BOUND_S + 10.0, what=what)
    took = time.time() - since
    states = [(s["view"], s["view_active"], s["last_executed"]) for s in (lc.status(i) for i in range(lc.n))]
    assert took <= IDLE_BOUND_S, f"{what}: converged only after {took:.1f}s: {states}"
    return took, got


def write_for(lc: LocalCluster, seconds: float, tag: str, clients: int = 3) -> int:
    """Writes from ``clients`` closed-loop clients for ``seconds``; returns how many completed."""
    done = [0] * clients
    stop = time.time() + seconds

    def worker(k: int) -> None:
        with BlockingClient(lc.dir, client_id=lc.n + k) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            i = 0
            while time.time() < stop:
                kv.put(f"{tag}-{k}-{i % 8}".encode(), str(i).encode())
                done[k] += 1
                i += 1

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return sum(done)


@pytest.mark.slow
def test_idle_cluster_converges_after_a_paused_and_a_restarted_replica(tmp_path):
    lc = LocalCluster(tmp_path / "c", clients=4,
                      protocol={"checkpoint_interval_seqnos": 128, "log_window_seqnos": 256,
                                "view_change_timeout_ms": 500.0, "status_interval_ms": 100.0})
    with lc:
        lc.start_all()
        assert write_for(lc, 1.0, "warm") > 0

        # 1. a backup paused (SIGSTOP) while the others go on: when it wakes up its request timer
        # has long expired, so it may start a view change alone; then nobody sends anything
        paused = 2
        lc.signal(paused, signal.SIGSTOP)
        assert write_for(lc, 2.5, "paused") > 0
        lc.signal(paused, signal.SIGCONT)
        t0 = time.time()
        took, got = wait_converged(lc, t0, "convergence after a paused replica resumed")
        st = lc.status(paused)
        print(f"paused replica: converged in {took:.2f}s at {got}; its view changes {st['view_changes']}, "
              f"idle rejoins {[lc.status(i).get('idle_rejoins') for i in range(lc.n)]}")

        # 2. a backup killed and restarted near the end of a workload (new process, new session
        # keys: the peers' old messages and the clients' old requests no longer verify there), a
        # few dozen batches behind, within the checkpoint window: no checkpoint to fetch, it must
        # catch up from Status answers with no new writes
        victim = 3 if got["view"] % lc.n != 3 else 1

        def kill_late():
            time.sleep(1.8)
            lc.kill(victim)

        killer = threading.Thread(target=kill_late)
        killer.start()
        assert write_for(lc, 2.5, "restart") > 0
        killer.join()
        lc.start(victim)
        lc.wait_connected(timeout=15.0)
        t1 = time.time()
        before = lc.status(victim)["last_executed"]
        took, got2 = wait_converged(lc, t1, "convergence after a restarted replica came back")
        assert got2["last_executed"] >= got["last_executed"]
        st = lc.status(victim)
        print(f"restarted replica: restored at {before}, converged in {took:.2f}s at {got2}; its drops "
              f"{ {k: v for k, v in st['drops'].items() if v > 10} }")
