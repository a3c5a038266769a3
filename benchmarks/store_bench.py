"""The durable stores' write latency: ``LmdbStore(durable=True)`` against ``WalStore``, and what
one fdatasync costs on this disk.

    python benchmarks/store_bench.py [--writes 2000] [--batch-bytes 3000] [--checkpoint-mib 16] [--dir DIR] [--json]

Each store gets the same sequence of group commits, one at a time, in a fresh directory under
``--dir`` (default: the system's temporary directory, which should be on the disk the replicas
use): a batch record of ``--batch-bytes`` and three small log records, the shape of a
replica's group commit in the normal case.  It prints p50 / p90 / p99 of ``write()``
(``wal_growing``: a WAL whose file grows in 4 KiB steps, so that most fdatasyncs also write
the file's size); then the cost of a WAL checkpoint (its overlay into LMDB) of a full log of
``--checkpoint-mib``, and of opening the store on one (the replay, and the checkpoint of what
it replayed); then a bare ``pwrite`` + ``fdatasync`` of the same size at the end of a growing
file and into a zero-filled one, the floor of any store that syncs once per group commit.  A
replica's durable throughput is bounded by ``ops per group commit / write latency`` per
pipeline stage: ``docs/storage.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pbft.storage import LmdbStore, WalStore  # noqa: E402

OWNER = "bench/replica-0"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def summary(lat: list[float]) -> dict:
    return {"p50_us": round(pct(lat, 0.5) * 1e6), "p90_us": round(pct(lat, 0.9) * 1e6),
            "p99_us": round(pct(lat, 0.99) * 1e6)}


def workload(i: int, batch_bytes: int) -> dict[bytes, bytes | None]:
    n = i.to_bytes(8, "big")
    slot = b"\x92\x01\xc4\x20" + bytes(32)  # [view, digest]
    puts: dict[bytes, bytes | None] = {b"b" + os.urandom(16): os.urandom(batch_bytes), b"q" + n: b"\x81\xa1d\x01",
                                       b"c" + n: slot, b"k" + n: slot}
    if i >= 64:  # the log below the stable checkpoint goes
        old = (i - 64).to_bytes(8, "big")
        puts.update({b"q" + old: None, b"c" + old: None, b"k" + old: None})
    return puts


def time_store(store, writes: int, batch_bytes: int) -> list[float]:
    lat = []
    for i in range(writes):
        puts = workload(i, batch_bytes)
        t = time.perf_counter()
        store.write(puts)
        lat.append(time.perf_counter() - t)
    return lat


def bare_fdatasync(d: str, writes: int, size: int, zero_filled: bool) -> list[float]:
    path = os.path.join(d, "bare")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if zero_filled:
            os.pwrite(fd, bytes(writes * size + 4096), 0)
            os.fsync(fd)
        buf, lat, off = os.urandom(size), [], 0
        for _ in range(writes):
            t = time.perf_counter()
            os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
            off += size
        return lat
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--batch-bytes", type=int, default=3000)
    ap.add_argument("--checkpoint-mib", type=int, default=16, help="the log size whose checkpoint is timed")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict = {"writes": a.writes, "batch_bytes": a.batch_bytes, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        with LmdbStore(os.path.join(d, "lmdb"), OWNER, durable=True) as s:
            res["lmdb_durable"] = summary(time_store(s, a.writes, a.batch_bytes))
        with WalStore(os.path.join(d, "wal"), OWNER) as s:
            res["wal"] = summary(time_store(s, a.writes, a.batch_bytes))
        with WalStore(os.path.join(d, "wal-grow"), OWNER, prealloc_bytes=4096) as s:  # the file grows at most writes
            res["wal_growing"] = summary(time_store(s, a.writes, a.batch_bytes))
        # a checkpoint of a full log of --checkpoint-mib: its overlay in one synced LMDB transaction
        # and the replay of a full log at opening (a restart), which checkpoints what it replayed
        ckpt = os.path.join(d, "ckpt")
        with WalStore(ckpt, OWNER, log_limit_bytes=a.checkpoint_mib << 20) as s:
            for _ in range(2):
                while s._end < s.log_limit:
                    s.write(workload(s.stats["writes"], a.batch_bytes))
                if not res.get("wal_checkpoint_ms"):
                    t = time.perf_counter()
                    s.checkpoint()
                    res["wal_checkpoint_ms"] = round((time.perf_counter() - t) * 1e3, 1)
            res["wal_checkpoint_mib"] = a.checkpoint_mib
        t = time.perf_counter()
        with WalStore(ckpt, OWNER, log_limit_bytes=a.checkpoint_mib << 20) as s:
            res["wal_replay_ms"] = round((time.perf_counter() - t) * 1e3, 1)
            res["wal_replayed_records"] = s.stats["replayed"]
        size = a.batch_bytes + 300
        res["bare_append"] = summary(bare_fdatasync(d, a.writes, size, zero_filled=False))
        res["bare_zero_filled"] = summary(bare_fdatasync(d, a.writes, size, zero_filled=True))
    if a.json:
        print(json.dumps(res))
        return
    print(f"load {res['load']:.1f}; {a.writes} group commits of a {a.batch_bytes}-byte batch and three log records")
    for name in ("lmdb_durable", "wal", "wal_growing", "bare_append", "bare_zero_filled"):
        r = res[name]
        print(f"  {name:18s} p50 {r['p50_us']:6d} us   p90 {r['p90_us']:6d} us   p99 {r['p99_us']:6d} us")
    print(f"  wal checkpoint of a full {res['wal_checkpoint_mib']} MiB log: {res['wal_checkpoint_ms']} ms; "
          f"opening with one to replay ({res['wal_replayed_records']} records): {res['wal_replay_ms']} ms")


if __name__ == "__main__":
    main()
