"""CPU cost of the pure core per request, without sockets: 4 replicas and C closed-loop
clients in one process, messages moved by a FIFO queue, each replica's and client's CPU time
measured separately.  ``python benchmarks/core_bench.py [--clients C] [--ops N] [--profile]``

``--op a/b`` runs the micro-benchmark operations of ``pbft bench`` instead of key-value puts: the
null service, an argument of a KB and a result of b KB, ``pbft bench``'s cluster configuration, the
replicas' timers driven every turn. Under ``valgrind --tool=callgrind`` it counts instructions,
which a busy machine does not disturb: the difference between two runs of different ``--ops``,
divided by the difference in operations, is the instructions per operation (docs/performance.md).

The networked runtime adds framing, syscalls and the event loop on top of these figures;
comparing the two says where the time goes.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from pbft.config import ClusterConfig
from pbft.core.client import Client
from pbft.core.replica import Replica
from pbft.crypto import keyrings_for
from pbft.services.kv import KVService, encode_op
from pbft.services.null import NullService, make_op


def run(n_clients: int, ops: int, read_only: bool = False, null_op: str = "") -> dict:
    if null_op:  # (pbft bench's configuration and service)
        cfg = ClusterConfig.create(4, clients_max=n_clients)
    else:
        cfg = ClusterConfig.create(4, clients_max=n_clients, checkpoint_interval_seqnos=128, log_window_seqnos=256,
                                   batch_requests_max=64, batches_in_flight_max=4)
    rings = keyrings_for(b"bench-master-key-0123456789abcdef", 4, cfg.client_ids)
    replicas = [Replica(cfg, i, rings[i], NullService() if null_op else KVService()) for i in range(4)]
    clients = [Client(cfg, c, rings[c]) for c in cfg.client_ids]
    nodes = {i: r for i, r in enumerate(replicas)}
    nodes.update({c.id: c for c in clients})
    cpu = {p: 0.0 for p in nodes}
    net: deque = deque()
    now = 0.0
    op_put = encode_op("put", b"k", b"v")
    op_get = encode_op("get", b"k")
    if null_op:
        a, b = (int(x) for x in null_op.split("/"))
        op_put = op_get = make_op(a * 1024, b * 1024)
    done = 0
    pc = time.process_time

    def collect(pid):
        for dests, raw in nodes[pid].take_ready().sends:
            for d in dests:
                net.append((d, raw))

    for c in clients:
        t = pc()
        c.invoke(op_get if read_only else op_put, read_only, now)
        cpu[c.id] += pc() - t
        collect(c.id)
    while done < ops:
        # one "turn": every node handles what is queued for it, then flushes (as the runtime does)
        batch = list(net)
        net.clear()
        touched = set()
        for d, raw in batch:
            node = nodes[d]
            t = pc()
            node.receive(raw, now)
            if d >= 4:
                for _ in node.take_outcomes():
                    done += 1
                    node.invoke(op_get if read_only else op_put, read_only, now)
            cpu[d] += pc() - t
            touched.add(d)
        for d in touched:
            t = pc()
            collect(d)
            cpu[d] += pc() - t
        if null_op:
            for rep in replicas:
                t = pc()
                rep.tick(now)
                collect(rep.id)
                cpu[rep.id] += pc() - t
        now += 0.05
        if not batch:
            raise RuntimeError("stalled")
    rep = sum(cpu[i] for i in range(4)) / 4
    cli = sum(cpu[c.id] for c in clients)
    return {"ops": done, "replica_us_per_op": rep / done * 1e6, "client_us_per_op": cli / done * 1e6,
            "batches": replicas[0].last_exec, "requests_per_batch": done / max(1, replicas[0].last_exec)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--op", default="", help="a/b: pbft bench's null-service operation instead of key-value puts")
    a = ap.parse_args()
    if a.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        r = run(a.clients, a.ops, a.read_only, a.op)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    else:
        r = run(a.clients, a.ops, a.read_only, a.op)
    print(f"{r['ops']} ops, {r['requests_per_batch']:.1f} requests/batch: per operation, each replica "
          f"{r['replica_us_per_op']:.1f} us CPU, all clients {r['client_us_per_op']:.1f} us CPU")


if __name__ == "__main__":
    main()
