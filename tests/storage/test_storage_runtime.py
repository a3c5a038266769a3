"""Durable state on the real runtime: every replica SIGKILLed at once (the durable mode's
write-ahead log replayed at the restart), a replica away for many checkpoints, a data directory
from somewhere else."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import uvloop

from helpers.netutil import SRC, LocalCluster
from pbft import BlockingClient
from pbft.runtime.client import ClientPool
from pbft.services.kv import KVClient, encode_op

PROTOCOL = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}


def write_load(lc: LocalCluster, seconds: float, prefix: str, kill_at_end=None) -> dict[bytes, bytes]:
    """Closed-loop writers of distinct keys; returns every acknowledged (key, value).  With
    ``kill_at_end``, it is called while writes are still in flight."""
    c = lc.cluster
    acked: dict[bytes, bytes] = {}

    async def main():
        pool = ClientPool(c, [c.identity(p) for p in c.client_ids])
        await pool.start()
        stop = asyncio.Event()

        async def worker(p):
            k = 0
            while not stop.is_set():
                key, val = f"{prefix}-{p}-{k}".encode(), f"v{k}".encode() * 20
                try:
                    await pool.invoke(p, encode_op("put", key, val), timeout=3.0)
                except Exception:  # noqa: BLE001 - not acknowledged: no promise made
                    return
                acked[key] = val
                k += 1

        tasks = [asyncio.ensure_future(worker(p)) for p in c.client_ids]
        await asyncio.sleep(seconds)
        if kill_at_end is not None:
            kill_at_end()
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()

    uvloop.run(main())
    return acked


@pytest.mark.slow
def test_sigkill_of_every_replica_in_durable_mode_loses_no_acknowledged_write(tmp_path):
    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        assert lc.cluster.storage.mode == "durable"
        lc.start_all()

        def kill_everyone():
            for p in lc.procs.values():
                p.kill()  # SIGKILL, all at once, with writes in flight
            for p in lc.procs.values():
                p.wait(5)

        acked = write_load(lc, 2.0, "a", kill_at_end=kill_everyone)
        assert len(acked) > 50, "the workload should have made progress before the crash"
        for i in range(4):  # the durable mode's store: the write-ahead log, replayed at the restart
            assert (lc.cluster.storage.replica_dir(lc.dir, i) / "wal").stat().st_size > 0
        lc.start_all()
        restored = [lc.status(i)["restored"] for i in range(4)]
        assert restored == ["restored"] * 4, restored
        with BlockingClient(lc.dir) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            for k, v in acked.items():
                assert kv.get(k, read_only=False) == v, k
            kv.put(b"after", b"restart")  # and the service continues
            assert kv.get(b"after") == b"restart"


@pytest.mark.slow
def test_replica_away_for_many_checkpoints_fetches_only_what_changed(tmp_path):
    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        lc.start_all()
        with BlockingClient(lc.dir) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            for j in range(1500):  # about 1.5 MB of state
                kv.put(b"k%05d" % j, bytes([j % 251]) * 1000)
            lc.wait_for(lambda: lc.status(3)["last_committed"] >= lc.status(0)["last_committed"] - 8,
                        what="replica 3 up to date")
            lc.kill(3)
            changed = 0
            for j in range(40):  # 40 keys rewritten over many checkpoint intervals
                kv.put(b"k%05d" % (j * 37), b"new" * 300)
                changed += 900
            top = lc.status(0)["last_committed"]
            assert top - lc.status(1)["stable_checkpoint"] < 16
        lc.start(3)
        st = lc.wait_for(lambda: (s := lc.status(3))["last_committed"] >= top - 8 and s["state_transfer"]["transfers"]
                         and s, what="replica 3 caught up by state transfer")
        assert st["restored"] == "restored"
        fetched = st["state_transfer"]["bytes"]
        # the buckets holding the 40 rewritten keys (each bucket holds a few keys), not 1.5 MB
        assert 0 < fetched < 200_000, st["state_transfer"]


def test_data_directory_of_another_cluster_is_refused(tmp_path):
    with LocalCluster(tmp_path / "a", protocol=PROTOCOL) as a:
        a.start(0)
        a.wait_for(lambda: a.status(0), what="replica 0 up")
    b = LocalCluster(tmp_path / "b", protocol=PROTOCOL)
    (tmp_path / "b" / "data").symlink_to(tmp_path / "a" / "data")
    out = subprocess.run([sys.executable, "-m", "pbft.tools.cli", "replica", str(tmp_path / "b"), "--id", "0"],
                         capture_output=True, text=True, env={"PYTHONPATH": SRC}, timeout=30)
    assert out.returncode == 2
    assert "belongs to" in out.stderr or "owner" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    del b
