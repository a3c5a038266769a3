"""Proactive recovery on a real 4-replica cluster (loopback): time to recover against state
size, and throughput during a recovery as a fraction of normal.

    python benchmarks/recovery_bench.py [--sizes-mb 10,50,200] [--clients 8] [--storage durable]

For each size it starts a fresh cluster of the key-value service, loads that much data (32 KB
values), runs ``--clients`` closed-loop writers, measures their throughput for a few seconds,
then makes replica 3 recover (``pbft recover``: reboot from disk, new keys, estimation,
recovery request, check of every object against the others' partition tree, null requests up
to the recovery point) and reports how long it took, what it fetched, and the writers'
throughput meanwhile.  A backup recovers (a recovering primary adds a view change: run with
``--replica 0`` to see that case).
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import uvloop  # noqa: E402

from pbft.runtime.client import ClientPool  # noqa: E402
from pbft.runtime.cluster import free_port_range, init_cluster  # noqa: E402
from pbft.services.kv import encode_op  # noqa: E402

VALUE = 32 * 1024
PROTOCOL = {"checkpoint_interval_seqnos": 128, "log_window_seqnos": 256}


def status(r) -> dict:
    with urllib.request.urlopen(f"http://{r.metrics_addr}:{r.metrics_port}/status", timeout=2) as resp:
        return json.loads(resp.read())


def wait(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = pred()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(what)


def run_size(size_mb: int, clients: int, storage: str, victim: int, workdir: Path) -> dict:
    d = workdir / f"c{size_mb}"
    base = free_port_range(200)
    cluster = init_cluster(d, 4, None, ["127.0.0.1"], base, clients + 1, protocol=PROTOCOL,
                           storage={"mode": storage}, force=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [subprocess.Popen([sys.executable, "-m", "pbft.tools.cli", "replica", str(d), "--id", str(i)],
                              stdout=subprocess.DEVNULL, stderr=open(d / f"replica-{i}.log", "ab"), env=env,
                              start_new_session=True) for i in range(4)]
    try:
        wait(lambda: all(len(status(r)["peers_connected"]) == 3 for r in cluster.replicas), 30, "cluster up")
        out = uvloop.run(_drive(cluster, size_mb, clients, d, victim, env))
        st = status(cluster.replicas[victim])
        out.update(size_mb=size_mb, fetched_objects=st["state_transfer"]["objects"],
                   fetched_bytes=st["state_transfer"]["bytes"], protocol_s=st["last_recovery_s"],
                   restored=st["restored"], objects=st["state_objects"])
        return out
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _drive(cluster, size_mb: int, clients: int, d: Path, victim: int, env) -> dict:
    ids = cluster.client_ids
    pool = ClientPool(cluster, [cluster.identity(p) for p in ids])
    await pool.start()
    # load the state: distinct keys of 32 KB
    n_keys = size_mb * 1024 * 1024 // VALUE
    loaders = ids[:clients]
    t0 = time.time()

    async def load(k0: int, p: int):
        for k in range(k0, n_keys, len(loaders)):
            await pool.invoke(p, encode_op("put", b"load-%07d" % k, os.urandom(VALUE)), timeout=30.0)

    await asyncio.gather(*(load(i, p) for i, p in enumerate(loaders)))
    load_s = time.time() - t0
    done: list[float] = []
    stop = asyncio.Event()

    async def writer(p: int):
        k = 0
        while not stop.is_set():
            await pool.invoke(p, encode_op("put", b"w-%d-%d" % (p, k % 64), b"x" * 100), timeout=30.0)
            done.append(time.time())
            k += 1

    tasks = [asyncio.ensure_future(writer(p)) for p in loaders]
    await asyncio.sleep(1.0)
    n0, t_a = len(done), time.time()
    await asyncio.sleep(4.0)
    normal = (len(done) - n0) / (time.time() - t_a)
    r = cluster.replicas[victim]
    before = status(r)["recoveries"]
    t_rec = time.time()
    subprocess.run([sys.executable, "-m", "pbft.tools.cli", "recover", str(d), "--id", str(victim)], env=env,
                   check=True, capture_output=True)
    loop = asyncio.get_running_loop()

    def ended():  # the rebooted process counts its own recoveries, from 0
        s = status(r)
        return s["recoveries"] > before and s["recovering"] is None

    await loop.run_in_executor(None, lambda: wait(ended, 300, "recovery"))
    t_end = time.time()
    during = sum(1 for t in done if t_rec <= t <= t_end) / max(1e-9, t_end - t_rec)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()
    return {"load_s": load_s, "recovery_s": t_end - t_rec, "normal_ops_s": normal, "during_ops_s": during}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,50,200")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--storage", choices=["durable", "fast"], default="durable")
    ap.add_argument("--replica", type=int, default=3, help="the replica that recovers (default 3, a backup)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", metavar="DIR", default=None, help="work in DIR and keep the clusters' logs")
    args = ap.parse_args()
    rows = []
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix="pbft-recovery-") if not args.keep
          else contextlib.nullcontext(args.keep)) as tmp:
        for mb in [int(x) for x in args.sizes_mb.split(",")]:
            rows.append(run_size(mb, args.clients, args.storage, args.replica, Path(tmp)))
            if not args.json:
                r = rows[-1]
                if len(rows) == 1:
                    print(f"recovery of replica {args.replica}, {args.storage} storage, {args.clients} writers")
                    print(f"{'state':>7} {'objects':>8} {'recover s':>9} {'protocol s':>10} {'fetched':>8} "
                          f"{'fetched B':>11} {'normal ops/s':>12} {'during ops/s':>12} {'fraction':>8}")
                print(f"{r['size_mb']:>5}MB {r['objects']:>8} {r['recovery_s']:>9.2f} {r['protocol_s']:>10.2f} "
                      f"{r['fetched_objects']:>8} {r['fetched_bytes']:>11,} {r['normal_ops_s']:>12.0f} "
                      f"{r['during_ops_s']:>12.0f} {r['during_ops_s'] / r['normal_ops_s']:>8.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
