"""``pbft bench`` itself: its arguments, the two systems (a local cluster and the unreplicated
server, never at the same time), one measured point and the whole run."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import ConfigError
from ...runtime import gctune
from ...runtime.cluster import free_port_range
from ..procs import ChildExited, Procs, sigterm_as_interrupt
from .load import READY_TIMEOUT_S, Load, Worker
from .report import Progress, print_report, print_targets, write_plot
from .stats import parse_op, ratios, summarize, sweep_counts
from .targets import DURABLE_POINTS, MEMORY_POINTS, CpuMeter, build_rows, cpu_per_op, runs_native

SERVICE = "pbft.services.null:NullService"
DURATION_S = 10.0
REPORT_DURATION_S = 3.0


def add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="micro-benchmarks: a local cluster vs an unreplicated server",
                       description="Start a local cluster and an unreplicated server of the null service on "
                                   "loopback, drive each with closed-loop clients, and print throughput, latency "
                                   "percentiles and their ratios (replicated / unreplicated).")
    b.add_argument("--op", default="0/0",
                   help="a/b: argument of a KB, result of b KB (the paper's 0/0, 0/4, 4/0; default 0/0)")
    b.add_argument("--read-only", action="store_true", help="send read-only requests")
    b.add_argument("--storage", choices=["durable", "fast", "memory"], default="durable",
                   help="the replicas' storage mode (default durable, as a cluster file's default)")
    b.add_argument("--replicas", type=int, default=4, help="replicas of the cluster (default 4)")
    b.add_argument("--clients", type=int, default=32, help="closed-loop clients (default 32)")
    b.add_argument("--duration", type=float, default=None,
                   help=f"measured seconds per point (default {DURATION_S:g}; {REPORT_DURATION_S:g} with --report)")
    b.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point (default 1)")
    b.add_argument("--sweep", action="store_true", help="measure at 1, 2, 4, ... clients up to --clients")
    b.add_argument("--report", action="store_true",
                   help="measure every row of the performance targets (memory and durable storage, 0/0 rw and ro, "
                        "1 and --clients clients, 4/0, 0/4, CPU per operation) and print the table; --op, --read-only "
                        "and --storage do not apply to it")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")
    b.add_argument("--plot", metavar="FILE.png", default=None, help="write a latency-vs-throughput plot")
    b.add_argument("--client-procs", type=int, default=1,
                   help="processes the clients are spread over (default 1: the bench process itself)")
    b.set_defaults(func=cmd_bench)


class Bench:
    def __init__(self, args, op: bytes, workdir: Path):
        self.args = args
        self.op = op
        self.workdir = workdir
        self.children = Procs(workdir)
        self.progress = Progress()

    # ---- systems ------------------------------------------------------------
    def start(self, fn):
        """``fn()`` -> (cluster, procs); retried on fresh ports if a server exits while starting (a port
        taken in the meantime by another program)."""
        for attempt in range(3):
            try:
                return fn()
            except ChildExited:
                self.children.stop_all()
                if attempt == 2:
                    raise

    def start_replicated(self, storage: Optional[str] = None):
        from ..net import fetch_status
        from ...runtime.cluster import init_cluster

        a = self.args
        storage = storage or a.storage
        d = self.workdir / ("replicated" if storage == a.storage else f"replicated-{storage}")
        base = free_port_range(2 * a.replicas)
        # (no proactive recovery in the measured window: `pbft bench-recovery` measures its cost)
        cluster = init_cluster(d, a.replicas, None, ["127.0.0.1"], base, a.clients, metrics_base_port=base + a.replicas,
                               force=True, storage={"mode": storage}, recovery={"period_s": 0.0})
        self.progress.note(f"starting {a.replicas} replica{'s' if a.replicas != 1 else ''} ({storage} storage)...")
        procs = [self.children.start_replica(d, i, SERVICE, quiet=True) for i in range(a.replicas)]

        def connected() -> bool:
            return all(len(fetch_status(r.metrics_addr, r.metrics_port, 1.0)["peers_connected"]) == cluster.n - 1
                       for r in cluster.replicas)

        self.children.wait_ready(connected, READY_TIMEOUT_S, "the replicas did not connect to each other", procs)
        return cluster, procs

    def start_unreplicated(self):
        from ...runtime.cluster import init_cluster

        a = self.args
        d = self.workdir / "unreplicated"
        base = free_port_range(2)
        cluster = init_cluster(d, 1, 0, ["127.0.0.1"], base, a.clients, metrics_base_port=base + 1, force=True)
        self.progress.note("starting the unreplicated server...")
        p = self.children.start("unreplicated", ["-m", "pbft.tools.bench", "serve-unreplicated", str(d),
                                                 "--service", SERVICE])
        r = cluster.replicas[0]

        def listening() -> bool:
            socket.create_connection((r.host, r.port), 0.5).close()
            return True

        self.children.wait_ready(listening, READY_TIMEOUT_S, "the unreplicated server did not listen", [p])
        return cluster, [p]

    # ---- one point ----------------------------------------------------------
    def measure(self, label: str, cluster, clients: int, watch, op: Optional[bytes] = None,
                read_only: Optional[bool] = None, cpu_kinds: Optional[dict[int, str]] = None) -> dict:
        """One point: ``clients`` closed-loop clients of ``op`` (default ``--op``, ``--read-only``).
        With ``cpu_kinds`` ({pid: kind} of the servers), the summary also has ``cpu``: CPU per
        operation of those processes and of the client processes over the measured window."""
        from ...runtime.client import PbftError

        run: Callable[..., Any]
        try:
            import uvloop
            run = uvloop.run
        except ImportError:  # pragma: no cover
            run = asyncio.run
        gctune.tune()  # the clients' process, as the servers' (runtime.gctune)
        op = self.op if op is None else op
        ro = self.args.read_only if read_only is None else read_only
        try:
            return run(self._measure(label, cluster, clients, watch, op, ro, cpu_kinds))
        except PbftError as e:
            raise ConfigError(f"{label}: {e}") from None

    async def _measure(self, label: str, cluster, clients: int, watch, op: bytes, ro: bool,
                       cpu_kinds: Optional[dict[int, str]]) -> dict:
        a = self.args
        ids = cluster.client_ids[:clients]
        k = max(1, min(a.client_procs, len(ids)))
        shares = [ids[i::k] for i in range(k)]
        local = Load(cluster, shares[0], op, ro, a.warmup, a.duration)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)  # (names a log file: "0/0" must not make a directory)
        workers = [Worker(self.children, cluster, share, f"{name}-worker-{i + 1}", op, ro, a.warmup,
                          a.duration) for i, share in enumerate(shares[1:])]
        meter = None
        if cpu_kinds is not None:
            kinds = dict(cpu_kinds)
            kinds[os.getpid()] = "client"
            for w in workers:
                kinds[w.proc.pid] = "client"
            meter = CpuMeter(kinds)
        cpu_a: Optional[tuple[float, dict[int, tuple[float, Optional[float]]]]] = None
        cpu_b: Optional[tuple[float, dict[int, tuple[float, Optional[float]]]]] = None
        try:
            await local.connect()
            for w in workers:
                await w.wait_ready()
            t_start = time.monotonic() + 0.05
            for w in workers:
                w.go(t_start)
            total = a.warmup + a.duration
            t_measure, t_end = t_start + a.warmup, t_start + total
            run = asyncio.ensure_future(local.run(t_start))
            mark: Optional[tuple[float, int]] = None
            rate = None
            while not run.done():
                # (woken at the ends of the measured window when CPU time is sampled there)
                edge = t_measure if cpu_a is None else t_end
                wait = 0.25 if meter is None or cpu_b is not None else min(0.25, max(0.0, edge - time.monotonic()))
                await asyncio.wait([run], timeout=wait)
                now = time.monotonic()
                if meter is not None and cpu_b is None and now >= edge:
                    if cpu_a is None:
                        cpu_a = (now, meter.sample())
                    else:
                        cpu_b = (now, meter.sample())
                self.children.check_alive(watch)
                ops = local.done_total + sum(w.done_total for w in workers)
                if now - t_start >= a.warmup:
                    if mark is None:
                        mark = (now, ops)
                    elif now > mark[0]:
                        rate = (ops - mark[1]) / (now - mark[0])
                self.progress.bar(f"{label} {clients:>3} clients", now - t_start, total, a.warmup, ops, rate)
            run.result()
            lat = local.lat
            errors = local.errors
            for w in workers:
                wl, we = await w.result()
                lat.extend(wl)
                errors += we
        finally:
            for w in workers:
                w.close()
        s = summarize(lat, errors, a.duration, clients)
        self.progress.done(f"{label}, {clients} client{'s' if clients != 1 else ''}", s)
        if not s["ops"]:
            raise ConfigError(f"{label}: no operation completed in the measured window "
                              f"({errors} timed out; logs in {self.workdir})")
        if meter is not None and cpu_a is not None and cpu_b is not None:
            # (the operations of the sampled window: the measured window's rate over its length)
            gap = cpu_b[0] - cpu_a[0]
            s["cpu"] = cpu_per_op(meter.kinds, cpu_a[1], cpu_b[1], s["ops_per_s"] * gap, gap)
        return s

    # ---- the whole run ------------------------------------------------------
    def run(self) -> dict:
        return self.run_report() if self.args.report else self.run_points()

    def run_points(self) -> dict:
        a = self.args
        counts = sweep_counts(a.clients) if a.sweep else [a.clients]
        rep: list[dict] = []
        unrep: list[dict] = []
        cluster, procs = self.start(self.start_replicated)
        kinds = self._replica_kinds(cluster, procs)
        for c in counts:
            rep.append(self.measure("replicated", cluster, c, procs, cpu_kinds=kinds))
        self.children.stop(procs)
        cluster, procs = self.start(self.start_unreplicated)
        for c in counts:
            unrep.append(self.measure("unreplicated", cluster, c, procs, cpu_kinds={procs[0].pid: "server"}))
        self.children.stop(procs)
        self.progress.clear()
        points = [{"clients": c, "replicated": r, "unreplicated": u, "ratio": ratios(r, u)}
                  for c, r, u in zip(counts, rep, unrep)]
        top = points[-1]
        out = {
            "op": a.op,
            "read_only": a.read_only,
            "storage": a.storage,
            **self._setup(),
            "replicated": top["replicated"],
            "unreplicated": top["unreplicated"],
            "ratio": top["ratio"],
            "ratio_is": "replicated / unreplicated",
        }
        if a.sweep:
            out["sweep"] = points
        return out


    def run_report(self) -> dict:
        """Every point of ``targets`` (the replicated cluster with memory storage, then with durable
        storage, then the unreplicated server), CPU time sampled at each, and the table."""
        a = self.args
        load_before = [round(x, 2) for x in os.getloadavg()]
        points: dict[str, dict] = {}
        native: dict[str, Optional[bool]] = {}
        phases = (("memory", MEMORY_POINTS), ("durable", DURABLE_POINTS), ("unreplicated", MEMORY_POINTS))
        for phase, specs in phases:
            if phase == "unreplicated":
                cluster, procs = self.start(self.start_unreplicated)
                kinds = {procs[0].pid: "server"}
            else:
                cluster, procs = self.start(lambda st=phase: self.start_replicated(st))
                kinds = self._replica_kinds(cluster, procs)
            for key, op_s, ro, clients in specs:
                c = a.clients if clients is None else clients
                label = f"{'replicated ' + phase if phase != 'unreplicated' else phase} {op_s} {'ro' if ro else 'rw'}"
                s = self.measure(label, cluster, c, procs, make_null_op(op_s), ro, kinds)
                s.update(op=op_s, read_only=ro)
                points[f"{phase}:{key}"] = s
            # (the compiled modules change every figure: whether each process of the phase used them)
            maps = [runs_native(pid) for pid in [*kinds, os.getpid()]]
            native[phase] = None if None in maps else all(maps)
            self.children.stop(procs)
        self.progress.clear()
        return {
            "report": build_rows(points, a.clients),
            "points": points,
            **self._setup(),
            # (1, 5 and 15 minute load averages: figures on a machine shared with other work move with it)
            "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
            "native": native,
        }

    def _setup(self) -> dict:
        """What every result says of the run's setup."""
        a = self.args
        return {"replicas": a.replicas, "faults": (a.replicas - 1) // 3, "clients": a.clients,
                "client_procs": max(1, min(a.client_procs, a.clients)), "duration_s": a.duration,
                "warmup_s": a.warmup, "service": SERVICE}

    def _replica_kinds(self, cluster, procs) -> dict[int, str]:
        """{pid: "primary" or "backup"}: the primary as the replicas' status says (the first that answers)."""
        from ..net import fetch_status

        primary = 0
        for r in cluster.replicas:
            try:
                primary = int(fetch_status(r.metrics_addr, r.metrics_port, 1.0)["primary"])
                break
            except (OSError, ValueError, KeyError):
                continue
        return {p.pid: ("primary" if i == primary else "backup") for i, p in enumerate(procs)}


def make_null_op(op_s: str) -> bytes:
    from ...services.null import make_op

    return make_op(*parse_op(op_s))


def _check_args(a) -> bytes:
    from ...services.null import make_op

    if a.duration is None:
        a.duration = REPORT_DURATION_S if a.report else DURATION_S
    if a.report and (a.sweep or a.plot):
        raise ConfigError("--report measures its own points: it takes neither --sweep nor --plot")
    arg_bytes, result_bytes = parse_op(a.op)
    if a.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {a.replicas}")
    if a.clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {a.clients}")
    if not a.duration > 0 or not math.isfinite(a.duration):
        raise ConfigError(f"--duration must be a positive number of seconds, got {a.duration:g}")
    if not a.warmup >= 0 or not math.isfinite(a.warmup):
        raise ConfigError(f"--warmup must be >= 0 seconds, got {a.warmup:g}")
    if a.client_procs < 1:
        raise ConfigError(f"--client-procs must be at least 1, got {a.client_procs}")
    if a.plot is not None:
        if not a.plot.lower().endswith(".png"):
            raise ConfigError(f"--plot writes a PNG file: give a name ending in .png, got {a.plot!r}")
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib, which is not installed (pip install 'pbft[plot]')")
        parent = Path(a.plot).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--plot: directory {parent} does not exist")
    return make_op(arg_bytes, result_bytes)


def cmd_bench(args) -> int:
    op = _check_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="pbft-bench-"))
    old_term = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    bench = Bench(args, op, workdir)
    keep = True  # the logs, after a failure
    try:
        res = bench.run()
        keep = False
    except KeyboardInterrupt:
        keep = False
        bench.progress.clear()
        print("pbft bench: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        bench.progress.clear()
        raise ConfigError(f"bench: {e} (logs in {workdir})" if str(workdir) not in str(e) else f"bench: {e}") \
            from None
    finally:
        bench.children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    elif args.report:
        print_targets(res)
    else:
        print_report(res)
    if args.plot:
        write_plot(res, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
