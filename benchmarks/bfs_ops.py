"""What one BFS operation costs, against the null service's, without FUSE.

    python benchmarks/bfs_ops.py cluster [--storage memory|durable|fast] [--ops 300] [--pairs 2]
    python benchmarks/bfs_ops.py service [--ops 2000] [--profile]

``cluster``: a local 4-replica cluster of BFS and one of the null service, started in turn
(``--pairs`` times each, BFS first), each driven by one client through the client library,
sequentially: per operation kind the latency (p50 and mean) and the CPU time each replica and
the client spent per operation (from ``/proc``, in units of the kernel's clock tick: 10 ms
over ``--ops`` operations). BFS: ``fsync`` (an ordered no-op), ``create``, a 5,000-byte
``write``, a read-only ``getattr`` and ``unlink`` of ``--ops`` files; the null service: its
ordered and read-only operation (0/0).

``service``: one replica's share, in this process: ``BFSService.execute`` through the
replica's state (``ReplicaState``: the copy-on-write of each object at its first change after
a checkpoint, and a checkpoint every 16 operations that hashes the changed objects), per
operation kind in microseconds; ``--profile`` prints where the time goes (cProfile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pbft.services.bfs.bench import BENCH_SECTION, _env  # noqa: E402
from pbft.services.bfs.protocol import A_INO, creds, decode_result, encode_op  # noqa: E402

ROOT = creds(0, 0)
DATA = bytes(range(256)) * 19 + bytes(136)  # 5,000 bytes


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(cluster, svc: str, n: int, procs) -> dict:
    from pbft.runtime.client import ClientPool

    who = cluster.client_ids[0]
    pool = ClientPool(cluster, [cluster.identity(who)])
    await pool.start(30.0)
    pids = [p.pid for p in procs] + [os.getpid()]
    out: dict = {}

    async def block(kind: str, raws: list, ro: bool = False) -> list:
        c0 = [_cpu_s(p) for p in pids]
        lat, res = [], []
        for raw in raws:
            t0 = time.perf_counter()
            res.append(await pool.invoke(who, raw, ro, 60))
            lat.append(time.perf_counter() - t0)
        c1 = [_cpu_s(p) for p in pids]
        out[kind] = (lat, [(b - a) / len(raws) * 1e6 for a, b in zip(c0, c1)])
        if svc != "null":
            for r in res:
                decode_result(r)  # (raises if the service refused one: the figure would be of errors)
        return res

    try:
        if svc == "null":
            await block("warm-up", [b""] * 50)
            await block("null ordered", [b""] * n)
            await block("null read-only", [b""] * n, True)
        else:
            await block("warm-up", [encode_op("fsync", 1, ROOT)] * 50)
            await block("fsync", [encode_op("fsync", 1, ROOT)] * n)
            made = await block("create", [encode_op("create", 1, b"f%d" % i, 0o100644, True, ROOT) for i in range(n)])
            inos = [decode_result(r)[A_INO] for r in made]
            await block("write 5,000 B", [encode_op("write", ino, 0, DATA, ROOT) for ino in inos])
            await block("getattr", [encode_op("getattr", ino, ROOT) for ino in inos], True)
            await block("unlink", [encode_op("unlink", 1, b"f%d" % i, False, ROOT) for i in range(n)])
    finally:
        await pool.close()
    out.pop("warm-up")
    return out


def cluster_run(svc: str, storage: str, n: int) -> dict:
    from pbft.runtime.cluster import free_port_range, init_cluster, load_cluster

    work = Path(tempfile.mkdtemp(prefix=f"bfs-ops-{svc}-"))
    base = free_port_range(10)
    init_cluster(work, 4, None, ["127.0.0.1"], base, 4, metrics_base_port=base + 5, force=True,
                 storage={"mode": storage}, recovery={"period_s": 0.0})
    with open(work / "cluster.toml", "a") as fh:
        fh.write(BENCH_SECTION)
    service = "bfs" if svc == "bfs" else "pbft.services.null:NullService"
    procs = []
    for i in range(4):
        with open(work / f"replica-{i}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "pbft.cli", "replica", str(work), "--id", str(i),
                                           "--service", service], stdout=subprocess.DEVNULL, stderr=log,
                                          env=_env(), start_new_session=True))
    try:
        import uvloop

        from pbft.runtime import gctune

        gctune.tune()  # as the replicas and the mount do
        return uvloop.run(_drive(load_cluster(work), svc, n, procs))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def service_run(n: int, profile: bool) -> None:
    import tomllib

    from pbft.services.bfs import BFSService
    from pbft.services.bfs.config import parse_bfs_section
    from pbft.state.replica_state import ReplicaState

    svc = BFSService(parse_bfs_section(tomllib.loads(BENCH_SECTION)["bfs"]))
    rs = ReplicaState(svc)
    state = {"seq": 0, "now": time.time_ns()}

    def ex(raw: bytes, ro: bool = False) -> bytes:
        state["now"] += 1000
        out = svc.execute(raw, 100, state["now"].to_bytes(8, "big"), ro)
        if not ro:
            state["seq"] += 1
            rs.set_reply(100, state["seq"], out)
            if state["seq"] % 16 == 0:  # the replicas' checkpoint interval
                rs.cs.checkpoint(state["seq"])
                if len(rs.cs.records) > 3:
                    rs.cs.discard_below(rs.cs.records[-2].seqno)
        return out

    for s in range(10):
        ex(encode_op("mkdir", 1, b"s%d" % s, 0o755, ROOT))

    def run(tag: bytes) -> dict:
        t: dict = {}

        def blk(kind: str, raws: list, ro: bool = False) -> list:
            t0 = time.perf_counter()
            outs = [ex(r, ro) for r in raws]
            t[kind] = (time.perf_counter() - t0) / len(raws) * 1e6
            for r in outs:
                decode_result(r)  # (raises if the service refused one: the figure would be of errors)
            return outs

        blk("fsync", [encode_op("fsync", 1, ROOT)] * n)
        names = [(2 + i % 10, b"f%d-%s" % (i, tag)) for i in range(n)]
        made = blk("create", [encode_op("create", d, nm, 0o100644, True, ROOT) for d, nm in names])
        inos = [decode_result(r)[A_INO] for r in made]
        blk("write 5,000 B", [encode_op("write", ino, 0, DATA, ROOT) for ino in inos])
        blk("getattr", [encode_op("getattr", ino, ROOT) for ino in inos], True)
        blk("unlink", [encode_op("unlink", d, nm, False, ROOT) for d, nm in names])
        return t

    run(b"warm")
    rounds = [run(b"%d" % i) for i in range(3)]
    for kind in rounds[0]:
        print(f"{kind:14s} {statistics.median(r[kind] for r in rounds):7.1f} us per operation (median of 3 x {n})")
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run(b"profiled")
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cluster")
    c.add_argument("--storage", default="memory", choices=("memory", "durable", "fast"))
    c.add_argument("--ops", type=int, default=300)
    c.add_argument("--pairs", type=int, default=2)
    s = sub.add_parser("service")
    s.add_argument("--ops", type=int, default=2000)
    s.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    if a.mode == "service":
        service_run(a.ops, a.profile)
        return 0
    for _ in range(a.pairs):
        for svc in ("bfs", "null"):
            t0 = os.getloadavg()[0]
            res = cluster_run(svc, a.storage, a.ops)
            load = f"load {t0:.1f}-{os.getloadavg()[0]:.1f}"
            for kind, (lat, cpu) in res.items():
                print(f"{svc:4s} {a.storage:7s} {kind:15s} p50 {statistics.median(lat) * 1e3:6.3f} ms, mean "
                      f"{statistics.mean(lat) * 1e3:6.3f} ms; CPU per op (us) replicas "
                      f"{' '.join('%.0f' % x for x in cpu[:4])}, client {cpu[4]:.0f}; {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
