"""Checkpoint cost against state size, and state-transfer bytes against bytes changed.

    python benchmarks/state_bench.py [--sizes-mb 10,100,1000] [--writes 1000] [--checkpoints 20]

A state of 4 KB pages (``pbft.state.objects.Pages``, the original's form) of each size
receives the same write rate: ``--writes`` writes to distinct random pages between checkpoints.  For each
size it prints the mean and 90th percentile time of a checkpoint (hashing the modified pages
and their ancestors in the partition tree, and opening the copy-on-write record), and the
spread from the smallest to the largest size (the goal: within 10%).  Then it measures a state
transfer between two copies that differ in a known number of pages: bytes fetched against
bytes changed, and the number of tree nodes asked for.

Pure computation, one core: no network, no disk.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pbft.state.objects import Pages  # noqa: E402
from pbft.state.partition import CheckpointedState, Fetcher  # noqa: E402

PAGE = 4096


class PagesBackend:
    def __init__(self, pages: Pages):
        self.p = pages

    def get_obj(self, i: int) -> bytes:
        return self.p.get_obj(i)

    def put_objs(self, objs: dict[int, bytes]) -> None:
        for i, v in objs.items():
            self.p.install(i, self.p.parse(i, v))


FANOUT = 256


def make(size_mb: int, fill_seed: int = 1) -> tuple[Pages, CheckpointedState]:
    n = size_mb * 1024 * 1024 // PAGE
    pages = Pages(n, PAGE)
    rng = random.Random(fill_seed)
    chunk = rng.randbytes(PAGE * 64)
    for off in range(0, len(pages.mem), len(chunk)):  # non-empty pages everywhere
        pages.mem[off:off + len(chunk)] = chunk[: len(pages.mem) - off]
        chunk = chunk[1:] + chunk[:1]
    cs = CheckpointedState(PagesBackend(pages), n, fanout=FANOUT)
    pages.modify = cs.modify
    return pages, cs


def checkpoint_cost(size_mb: int, writes: int, checkpoints: int) -> dict:
    t0 = time.perf_counter()
    pages, cs = make(size_mb)
    build_s = time.perf_counter() - t0
    rng = random.Random(7)
    n = pages.n_pages
    cs.checkpoint(0)
    times = []
    data = rng.randbytes(64)
    seq = 0
    for k in range(checkpoints + 3):
        for p in rng.sample(range(n), writes):  # the same number of pages changed at every size
            pages.write(p * PAGE + rng.randrange(PAGE - 64), data)
        seq += 1
        gc.collect()
        gc.disable()  # a collection of the whole heap would land in whichever checkpoint it hit
        t = time.perf_counter()
        cs.checkpoint(seq)
        el = time.perf_counter() - t
        gc.enable()
        if k >= 3:  # warm-up
            times.append(el)
        cs.discard_below(max(0, seq - 2))  # keep a few, as a replica keeps its window's
    times.sort()
    out = {"size_mb": size_mb, "pages": n, "depth": cs.depth, "build_s": build_s,
           "checkpoint_ms_mean": statistics.mean(times) * 1000,
           "checkpoint_ms_p90": times[int(len(times) * 0.9) - 1] * 1000,
           "per_write_us": statistics.mean(times) / writes * 1e6}
    del pages, cs
    gc.collect()
    return out


def transfer(size_mb: int, changed_pages: int) -> dict:
    src_pages, src = make(size_mb)
    dst_pages, dst = make(size_mb)
    src.checkpoint(0)
    dst.checkpoint(0)
    rng = random.Random(3)
    n = src_pages.n_pages
    touched = set()
    for _ in range(changed_pages):
        p = rng.randrange(n)
        touched.add(p)
        src_pages.write(p * PAGE, rng.randbytes(PAGE))
    d = src.checkpoint(10)
    f = Fetcher(dst, 10, d, max_objs=FANOUT)
    requests = rounds = 0
    meta_bytes = 0
    t = time.perf_counter()
    while not f.done():
        rounds += 1  # one round trip: the window of requests in flight, answered
        for lvl, x, want in f.requests():
            requests += 1
            if want:
                err = f.on_data(lvl, x, tuple((i, src.value_at(10, i)) for i in want))
            else:
                children = src.children_at(10, lvl, x)
                meta_bytes += sum(len(c) for c in children)
                err = f.on_meta(lvl, x, children)
            assert err is None, err
    el = time.perf_counter() - t
    assert f.finish()
    return {"size_mb": size_mb, "changed_pages": len(touched), "changed_bytes": len(touched) * PAGE,
            "fetched_objects": f.fetched_objs, "fetched_bytes": f.fetched_bytes, "metadata_bytes": meta_bytes,
            "requests": requests, "rounds": rounds, "seconds": el}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,100,1000")
    ap.add_argument("--writes", type=int, default=1000, help="pages written between checkpoints")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--transfer-mb", type=int, default=100)
    ap.add_argument("--fanout", type=int, default=256, help="partition tree fanout (partition_fanout)")
    args = ap.parse_args()
    global FANOUT
    FANOUT = args.fanout
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    print(f"checkpoint cost, {args.writes} random pages written between checkpoints, 4 KB pages, "
          f"fanout {FANOUT}")
    print(f"{'state':>8} {'pages':>9} {'levels':>6} {'mean ms':>8} {'p90 ms':>8} {'us/write':>9} {'build s':>8}")
    rows = []
    for mb in sizes:
        r = checkpoint_cost(mb, args.writes, args.checkpoints)
        rows.append(r)
        print(f"{mb:>6}MB {r['pages']:>9,} {r['depth']:>6} {r['checkpoint_ms_mean']:>8.2f} "
              f"{r['checkpoint_ms_p90']:>8.2f} {r['per_write_us']:>9.2f} {r['build_s']:>8.1f}", flush=True)
    lo, hi = rows[0]["checkpoint_ms_mean"], rows[-1]["checkpoint_ms_mean"]
    print(f"largest/smallest checkpoint cost: {hi / lo:.3f} (goal: within 1.10)")
    print()
    print(f"state transfer, {args.transfer_mb} MB state, a stale copy missing some writes")
    print(f"{'changed':>8} {'changed B':>11} {'fetched B':>11} {'fetched/changed':>15} {'metadata B':>11} "
          f"{'requests':>8} {'rounds':>6} {'seconds':>8}")
    for k in (1, 10, 100, 1000):
        t = transfer(args.transfer_mb, k)
        print(f"{t['changed_pages']:>8} {t['changed_bytes']:>11,} {t['fetched_bytes']:>11,} "
              f"{t['fetched_bytes'] / t['changed_bytes']:>15.2f} {t['metadata_bytes']:>11,} {t['requests']:>8} "
              f"{t['rounds']:>6} {t['seconds']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
