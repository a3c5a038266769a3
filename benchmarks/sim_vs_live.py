"""The simulator's cost model against the live runtime, workload by workload.

``python benchmarks/sim_vs_live.py [--live FILE.json | --no-live] [--cores K] [--json]``

The workloads of ``pbft bench --report`` (memory storage, 4 replicas, closed-loop clients):
0/0 read-write at 32 clients and at 1 client, 0/0 read-only at 1 client, 4/0 and 0/4 read-write
at 32 clients. Each is run in the simulator with the calibrated cost model
(``pbft.sim.simulator.CostModel``: with ``cores`` CPUs shared by the replicas and the client
process, or one CPU per replica with ``--cores 0``), the live cluster's protocol parameters
(``runtime.cluster.PROTOCOL_DEFAULTS``) and the micro-benchmark's operations (``SimConfig.bench``:
puts and gets of the KV service with the argument's or the result's size, each client on its own
key), and live, from one ``pbft bench --report --json`` run (started here, or read from
``--live``, a file that run wrote). It prints, per workload, the predicted and the measured
throughput, p50 latency and CPU per operation (each replica, the client process, all processes)
with their ratios (predicted / measured), and how long processes waited for a CPU per operation.

The simulator's figures are deterministic (one seed); the live ones move with the machine's load:
take the live run on an idle machine, or under the measurement lock, and quote its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Optional

from pbft.runtime.cluster import PROTOCOL_DEFAULTS
from pbft.sim.cpus import CLIENT_PROC
from pbft.sim.simulator import CostModel, SimConfig, Simulation

# (report key, argument bytes, result bytes, read-only, clients)
WORKLOADS = (
    ("0/0 rw", 0, 0, False, 32),
    ("0/0 rw 1", 0, 0, False, 1),
    ("0/0 ro 1", 0, 0, True, 1),
    ("4/0 rw", 4096, 0, False, 32),
    ("0/4 rw", 0, 4096, False, 32),
)
WINDOW_MS = (300.0, 1300.0)  # measured window of simulated time (the first 300 ms warm up)
NET_MS = (0.01, 0.03)  # one-way loopback delay of a frame, outside the processes' CPU time


def simulate(arg: int, res: int, ro: bool, clients: int, cost: CostModel, seed: int = 1,
             window=WINDOW_MS, net_ms=NET_MS) -> dict:
    """One workload in the simulator: ops/s and p50 over ``window``, CPU per operation."""
    sc = SimConfig(seed, clients=clients, ops=1_000_000, think_ms=(0.0, 0.0), cost=cost, bench=(arg, res, ro),
                   net_ms=net_ms, fault_phase_ms=window[1], stop_at_heal=True, keys=1, idle_bound_ms=None,
                   quiesce_ms=200.0, cluster=dict(PROTOCOL_DEFAULTS), cpu_samples_ms=window,
                   max_events=20_000_000)
    sim = Simulation(sc)
    result = sim.run()
    lo, hi = window
    done = [k for k in sim.history if k.ret is not None and lo <= k.ret <= hi and k.client in sim.clients]
    lat = sorted(k.ret - k.invoke for k in done)
    ops = len(done)
    rep0 = sim.replicas[0]
    a, b = sim.cpu_samples[0], sim.cpu_samples[1]
    procs = set(b["used"]) | set(a["used"])

    def per_op(d: str, p: int) -> float:
        return (b[d].get(p, 0.0) - a[d].get(p, 0.0)) * 1000.0 / ops if ops else float("nan")

    replicas = [per_op("used", r) for r in range(4)]
    client = per_op("used", CLIENT_PROC) if CLIENT_PROC in procs else 0.0
    wait = sum(per_op("wait", p) for p in set(b["wait"]) | set(a["wait"]))
    wakeups = sum(b["wakeups"].get(p, 0) - a["wakeups"].get(p, 0) for p in b["wakeups"]) / ops if ops else 0.0
    return {"ops_per_s": ops / ((hi - lo) / 1000.0), "p50_ms": statistics.median(lat) if lat else None,
            "replica_us_per_op": replicas, "client_us_per_op": client, "all_us_per_op": sum(replicas) + client,
            "wait_us_per_op": wait, "wakeups_per_op": wakeups,
            "requests_per_batch": rep0.log.executed_requests / max(1, rep0.last_committed_exec), "ok": result.ok,
            "violations": result.violations, "liveness": result.liveness_failure}


def live_report(duration: float) -> dict:
    """``pbft bench --report --json`` of this tree (its load average is in the result)."""
    cmd = [sys.executable, "-c", "import sys; from pbft.tools.cli import main; sys.argv[0] = 'pbft'; "
           "sys.exit(main())", "bench", "--report", "--json", "--duration", str(duration)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    return json.loads(out)


def live_figures(point: dict) -> dict:
    cpu = point.get("cpu") or {}
    reps = [cpu.get("primary_us_per_op")] + [cpu.get("backup_avg_us_per_op")] * 3
    return {"ops_per_s": point["ops_per_s"], "p50_ms": point["p50_ms"], "replica_us_per_op": reps,
            "client_us_per_op": cpu.get("client_us_per_op"), "all_us_per_op": cpu.get("all_us_per_op"),
            "wait_us_per_op": cpu.get("wait_us_per_op")}


def _ratio(p: Optional[float], m: Optional[float]) -> Optional[float]:
    return None if p is None or not m else p / m


def _f(x: Optional[float], w: int = 8, d: int = 1) -> str:
    return f"{x:{w}.{d}f}" if x is not None else " " * (w - 3) + "n/a"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", metavar="FILE.json", help="a saved `pbft bench --report --json` result")
    ap.add_argument("--no-live", action="store_true", help="the simulator's figures only")
    ap.add_argument("--save-live", metavar="FILE.json", help="write the live run's result there")
    ap.add_argument("--duration", type=float, default=3.0, help="live: measured seconds per point")
    ap.add_argument("--cores", type=int, default=2, help="shared CPUs of the model (0: one per replica)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cost = CostModel(cores=a.cores or None)
    live: Optional[dict] = None
    if a.live:
        with open(a.live) as f:
            live = json.load(f)
    elif not a.no_live:
        live = live_report(a.duration)
        if a.save_live:
            with open(a.save_live, "w") as f:
                json.dump(live, f)
    rows = []
    for key, arg, res, ro, clients in WORKLOADS:
        sim = simulate(arg, res, ro, clients, cost, a.seed)
        meas = live_figures(live["points"][f"memory:{key}"]) if live else None
        rows.append({"workload": key, "clients": clients, "sim": sim, "live": meas})
    if a.json:
        print(json.dumps({"cost_model": cost.__dict__, "rows": rows,
                          "live_load_average": live.get("load_average") if live else None}, indent=1))
        return 0
    print(f"cost model: {cost}")
    if live:
        print(f"live: pbft bench --report, load average {live.get('load_average')}, compiled {live.get('native')}")
    print(f"\n{'workload':10s} {'':5s} {'ops/s':>8s} {'p50 ms':>8s} {'primary':>8s} {'backup':>8s} {'client':>8s}"
          f" {'all':>8s} {'wait':>8s}   (CPU and wait: µs per operation)")
    for r in rows:
        s, m = r["sim"], r["live"]
        figs = [("sim", s)] + ([("live", m)] if m else [])
        for label, x in figs:
            print(f"{r['workload'] if label == 'sim' else '':10s} {label:5s} {_f(x['ops_per_s'], 8, 0)}"
                  f" {_f(x['p50_ms'], 8, 3)} {_f(x['replica_us_per_op'][0])} {_f(x['replica_us_per_op'][1])}"
                  f" {_f(x['client_us_per_op'])} {_f(x['all_us_per_op'])} {_f(x['wait_us_per_op'])}")
        if m:
            rs = [_ratio(s[k], m[k]) for k in ("ops_per_s", "p50_ms")]
            rs += [_ratio(s["replica_us_per_op"][i], m["replica_us_per_op"][i]) for i in (0, 1)]
            rs += [_ratio(s[k], m[k]) for k in ("client_us_per_op", "all_us_per_op", "wait_us_per_op")]
            flag = "" if all(x is not None and 1 / 1.5 <= x <= 1.5 for x in rs[:2]) else "  <-- beyond 1.5x"
            print(f"{'':10s} {'ratio':5s} " + " ".join(_f(x, 8, 2) for x in rs) + flag)
        if not s["ok"]:
            print(f"{'':10s} simulated run failed: {s['violations'][:3]} {s['liveness']}")
    print("\n(ratio: simulated / live; 'wait': time the processes waited for a CPU while runnable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
