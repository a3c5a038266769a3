"""``pbft bench``: the micro-benchmarks of Castro & Liskov, replicated vs unreplicated.

    pbft bench [--op 0/0|0/4|4/0] [--read-only] [--replicas N] [--clients C] [--duration S]
               [--warmup S] [--sweep] [--json] [--plot FILE.png] [--client-procs K]

What one run does:

1. writes two cluster directories in a temporary directory, on free loopback
   ports: a cluster of ``--replicas`` replicas (f = (n-1)//3) and a cluster
   of one (n=1, f=0) for the unreplicated baseline, each with C client
   identities;
2. starts the replicas (``pbft replica DIR --id I --service
   pbft.services.null:NullService --quiet``, one process each), waits until
   they are all connected to each other, and measures them; then stops them,
   starts the unreplicated server (``python -m pbft.bench serve-unreplicated
   DIR``: ``pbft.runtime.unreplicated``, the same service, transport, frames,
   session keys and MACs, and the same client library) and measures it.  The
   two never run at the same time, so they do not compete for the CPU;
3. prints throughput and latency percentiles of both and their ratios
   (replicated / unreplicated): a throughput ratio below 1 and latency ratios
   above 1 are the cost of replication.

The operations are the paper's: a/b means an argument of a KB and a result
of b KB (``pbft.services.null``; 0/0 is the empty operation).  ``--read-only``
sends them as read-only requests (PBFT's read-only optimisation: no
ordering, 2f+1 matching replies).

Measurement: C closed-loop clients (each its own client identity, at most one
request outstanding, no think time) run for ``--warmup`` seconds (default 1,
not measured) and then ``--duration`` seconds.  Throughput is the number of
operations completed inside the measured window divided by its length;
latencies are those of the same operations, from ``invoke`` to the certified
result, measured in the client.  ``--sweep`` measures each system at 1, 2, 4,
... clients up to C (a new warm-up for every point) and ``--plot`` draws
latency against throughput (matplotlib, imported only then).

How the clients run: every client identity is driven by
``pbft.runtime.client.ClientPool``, which multiplexes any number of
identities over one TCP connection per replica.  By default all C clients
run in one process, the ``pbft bench`` process itself (one uvloop event
loop), for both systems.  ``--client-procs K`` spreads them over K processes
(the bench process plus K-1 ``python -m pbft.bench load-worker``
subprocesses that start together and report their counts and latencies back).

Why one process by default -- CPU time per operation measured on the 2-core
development machine (0/0, 32 clients): read-write, each of the 4 replicas
~58 us and the client ~57 us (it MACs the request for 4 replicas and checks 4
replies); read-only, each replica ~14 us and the client ~55 us; unreplicated,
the server ~10 us and the client ~21 us.  Splitting the clients over two
processes costs ~15-25% more client CPU per operation (less coalescing per
connection).  So on 2 idle cores the replicated runs are bound by the CPU of
the whole machine, or (read-only) evenly by the client process and the
replicas, and one client process is the cheapest way to drive them; only the
unreplicated server is limited by a single client process (the server then
uses about half a core), and ``--client-procs 2`` lifts that bound by about a
fifth there.  When other work competes for the cores, more client processes
also win the clients a larger share of the CPU, which inflates both systems'
figures; keep K the same when comparing runs.  Clients share the machine with
the servers (in the paper they had machines of their own), so absolute
figures here are lower bounds; the ratios compare two systems driven
identically.

Processes: replicas, the unreplicated server and load workers are started in
their own sessions (a Ctrl-C in the terminal reaches only ``pbft bench``),
with Linux's parent-death signal set so that they get SIGTERM if ``pbft
bench`` dies, and are stopped (SIGTERM, then SIGKILL) when it exits for any
reason, including Ctrl-C, SIGTERM and errors.  Their logs go to the
temporary directory, which is removed at the end unless the run failed
(then the error message names it).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .runtime.cluster import free_port_range

SERVICE = "pbft.services.null:NullService"
KB = 1024
OP_KB_MAX = 32
INVOKE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
_SRC = str(Path(__file__).resolve().parents[1])  # the directory holding the pbft package


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------

def parse_op(s: str) -> tuple[int, int]:
    """``a/b`` -> (argument bytes, result bytes); a and b in KB."""
    parts = s.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"--op must be a/b (argument KB / result KB, e.g. 0/0, 0/4, 4/0), got {s!r}") from None
    if not (0 <= a <= OP_KB_MAX and 0 <= b <= OP_KB_MAX):
        raise ConfigError(f"--op sizes must be between 0 and {OP_KB_MAX} KB, got {s!r}")
    return a * KB, b * KB


def sweep_counts(clients: int) -> list[int]:
    out, c = [], 1
    while c < clients:
        out.append(c)
        c *= 2
    return out + [clients]


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
    b.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    b.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point (default 1)")
    b.add_argument("--sweep", action="store_true", help="measure at 1, 2, 4, ... clients up to --clients")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")
    b.add_argument("--plot", metavar="FILE.png", default=None, help="write a latency-vs-throughput plot")
    b.add_argument("--client-procs", type=int, default=1,
                   help="processes the clients are spread over (default 1: the bench process itself)")
    b.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def percentile(sorted_xs, q: float) -> float:
    """Nearest-rank percentile of a sorted sequence."""
    if not sorted_xs:
        return math.nan
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def summarize(lat_s, errors: int, duration: float, clients: int) -> dict:
    xs = sorted(lat_s)
    ms = 1000.0

    def r(x):
        return None if math.isnan(x) else round(x * ms, 3)

    return {
        "clients": clients,
        "ops": len(xs),
        "errors": errors,
        "duration_s": round(duration, 3),
        "ops_per_s": round(len(xs) / duration, 1) if duration > 0 else 0.0,
        "p50_ms": r(percentile(xs, 50)),
        "p90_ms": r(percentile(xs, 90)),
        "p99_ms": r(percentile(xs, 99)),
        "mean_ms": r(sum(xs) / len(xs)) if xs else None,
        "max_ms": r(xs[-1]) if xs else None,
    }


RATIO_KEYS = ("ops_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms")


def ratios(rep: dict, unrep: dict) -> dict:
    """replicated / unreplicated for throughput and each latency figure (same key names)."""
    out = {}
    for k in RATIO_KEYS:
        a, b = rep.get(k), unrep.get(k)
        out[k] = round(a / b, 4) if a is not None and b else None
    return out


# ---------------------------------------------------------------------------
# closed-loop load (runs in the bench process and in load workers)
# ---------------------------------------------------------------------------

class Load:
    """Closed-loop clients over one ClientPool."""

    def __init__(self, cluster, client_ids, op: bytes, read_only: bool, warmup: float, duration: float):
        self.cluster = cluster
        self.client_ids = list(client_ids)
        self.op = op
        self.read_only = read_only
        self.warmup = warmup
        self.duration = duration
        self.pool = None
        self.lat = array.array("d")
        self.errors = 0
        self.done_total = 0  # operations completed so far, warm-up included (progress)

    async def connect(self) -> None:
        from .runtime.client import ClientPool

        idents = [self.cluster.identity(c) for c in self.client_ids]
        self.pool = ClientPool(self.cluster, idents)
        await self.pool.start(wait_s=READY_TIMEOUT_S)
        deadline = time.monotonic() + 5.0
        while len(self.pool.connected()) < self.cluster.n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.cluster.cfg.weight_of(self.pool.connected()) < self.cluster.cfg.quorum_weight:
            raise ConfigError(f"clients could not connect to a quorum of replicas (connected to "
                              f"{self.pool.connected()})")

    async def run(self, t_start: float) -> None:
        """Run from monotonic time ``t_start``: warm-up, then the measured window."""
        from .runtime.client import PbftError

        t_measure = t_start + self.warmup
        t_end = t_measure + self.duration
        pool, op, ro = self.pool, self.op, self.read_only
        lat = self.lat
        clock = time.monotonic

        async def client(cid: int) -> None:
            while True:
                t0 = clock()
                if t0 >= t_end or pool.closed:
                    return
                try:
                    await pool.invoke(cid, op, ro, INVOKE_TIMEOUT_S)
                except PbftError:
                    if t_measure <= clock() < t_end and not pool.closed:
                        self.errors += 1
                    continue
                t1 = clock()
                self.done_total += 1
                if t_measure <= t1 < t_end:
                    lat.append(t1 - t0)

        delay = t_start - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks = [asyncio.ensure_future(client(c)) for c in self.client_ids]
        try:
            await asyncio.sleep(max(0.0, t_end - clock()))
            # operations still outstanding at the end are not counted; give them a moment to finish
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        finally:
            for t in tasks:
                t.cancel()
            await self.pool.close()


# ---------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------

def _pdeathsig():
    """A preexec_fn making the child receive SIGTERM when this process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def fn():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return fn


class ChildExited(ConfigError):
    """A process pbft bench started has exited."""


class Children:
    """Every process ``pbft bench`` starts; ``stop_all`` ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen, Optional[Path]]] = []
        self.preexec = _pdeathsig()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = _SRC + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")

    def spawn(self, name: str, args: list[str], pipes: bool = False) -> subprocess.Popen:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as fh:
            p = subprocess.Popen([sys.executable, *args], env=self.env, start_new_session=True,
                                 preexec_fn=self.preexec, stderr=fh,
                                 stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if pipes else subprocess.DEVNULL)
        self.procs.append((name, p, log))
        return p

    def check_alive(self, subset=None) -> None:
        for name, p, log in self.procs:
            if (subset is None or p in subset) and p.poll() is not None:
                raise ChildExited(f"{name} exited with status {p.returncode}{_log_tail(log)}")

    def stop(self, subset) -> None:
        subset = list(subset)
        for p in subset:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3.0
        for p in subset:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            for s in (p.stdin, p.stdout):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
        self.procs = [x for x in self.procs if x[1] not in subset]

    def stop_all(self) -> None:
        self.stop([p for _, p, _ in self.procs])


def _log_tail(log: Optional[Path]) -> str:
    if log is None:
        return ""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return f" (last log line: {lines[-1][:300]})" if lines else ""


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr when it is a terminal; otherwise one line per finished point."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.shown = False

    def bar(self, label: str, elapsed: float, total: float, warmup: float, ops: int, rate: Optional[float]) -> None:
        if not self.tty:
            return
        width = 24
        frac = min(1.0, max(0.0, elapsed / total)) if total > 0 else 1.0
        fill = int(frac * width)
        phase = "warm-up" if elapsed < warmup else (f"{rate:,.0f} ops/s" if rate is not None else "")
        sys.stderr.write(f"\r\033[K{label} [{'#' * fill}{'.' * (width - fill)}] "
                         f"{min(elapsed, total):4.1f}/{total:.1f}s {ops:,} ops {phase}")
        sys.stderr.flush()
        self.shown = True

    def note(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K{text}")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False

    def done(self, label: str, s: dict) -> None:
        self.clear()
        if not self.tty:
            print(f"pbft bench: {label}: {s['ops_per_s']:,.0f} ops/s, p50 {_fmt(s['p50_ms'])} ms, "
                  f"p99 {_fmt(s['p99_ms'])} ms", file=sys.stderr, flush=True)


def _fmt(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


class Bench:
    def __init__(self, args, op: bytes, workdir: Path):
        self.args = args
        self.op = op
        self.workdir = workdir
        self.children = Children(workdir)
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

    def start_replicated(self):
        from .cli_net import fetch_status
        from .runtime.cluster import init_cluster

        a = self.args
        d = self.workdir / "replicated"
        base = free_port_range(2 * a.replicas)
        cluster = init_cluster(d, a.replicas, None, ["127.0.0.1"], base, a.clients, metrics_base_port=base + a.replicas,
                               force=True, storage={"mode": a.storage})
        self.progress.note(f"starting {a.replicas} replica{'s' if a.replicas != 1 else ''}...")
        procs = [self.children.spawn(f"replica-{i}", ["-m", "pbft.cli", "replica", str(d), "--id", str(i),
                                                       "--service", SERVICE, "--quiet"])
                 for i in range(a.replicas)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.children.check_alive(procs)
            try:
                if all(len(fetch_status(r.metrics_addr, r.metrics_port, 1.0)["peers_connected"]) == cluster.n - 1
                       for r in cluster.replicas):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"the replicas did not connect to each other within {READY_TIMEOUT_S:g}s "
                                  f"(logs in {self.workdir})")
            time.sleep(0.05)
        return cluster, procs

    def start_unreplicated(self):
        from .runtime.cluster import init_cluster

        a = self.args
        d = self.workdir / "unreplicated"
        base = free_port_range(2)
        cluster = init_cluster(d, 1, 0, ["127.0.0.1"], base, a.clients, metrics_base_port=base + 1, force=True)
        self.progress.note("starting the unreplicated server...")
        p = self.children.spawn("unreplicated", ["-m", "pbft.bench", "serve-unreplicated", str(d),
                                                 "--service", SERVICE])
        r = cluster.replicas[0]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.children.check_alive([p])
            try:
                socket.create_connection((r.host, r.port), 0.5).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"the unreplicated server did not listen within {READY_TIMEOUT_S:g}s "
                                  f"(log in {self.workdir})")
            time.sleep(0.05)
        return cluster, [p]

    # ---- one point ----------------------------------------------------------
    def measure(self, label: str, cluster, clients: int, watch) -> dict:
        from .runtime.client import PbftError

        try:
            import uvloop
            run = uvloop.run
        except ImportError:  # pragma: no cover
            run = asyncio.run
        try:
            return run(self._measure(label, cluster, clients, watch))
        except PbftError as e:
            raise ConfigError(f"{label}: {e}") from None

    async def _measure(self, label: str, cluster, clients: int, watch) -> dict:
        a = self.args
        ids = cluster.client_ids[:clients]
        k = max(1, min(a.client_procs, len(ids)))
        shares = [ids[i::k] for i in range(k)]
        local = Load(cluster, shares[0], self.op, a.read_only, a.warmup, a.duration)
        workers = [Worker(self, cluster, share, f"{label}-worker-{i + 1}") for i, share in enumerate(shares[1:])]
        try:
            await local.connect()
            for w in workers:
                await w.wait_ready()
            t_start = time.monotonic() + 0.05
            for w in workers:
                w.go(t_start)
            total = a.warmup + a.duration
            run = asyncio.ensure_future(local.run(t_start))
            mark: Optional[tuple[float, int]] = None
            rate = None
            while not run.done():
                await asyncio.wait([run], timeout=0.25)
                self.children.check_alive(watch)
                now = time.monotonic()
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
        self.progress.done(f"{label}, {clients} clients", s)
        if not s["ops"]:
            raise ConfigError(f"{label}: no operation completed in the measured window "
                              f"({errors} timed out; logs in {self.workdir})")
        return s

    # ---- the whole run ------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        counts = sweep_counts(a.clients) if a.sweep else [a.clients]
        rep: list[dict] = []
        unrep: list[dict] = []
        cluster, procs = self.start(self.start_replicated)
        for c in counts:
            rep.append(self.measure("replicated", cluster, c, procs))
        self.children.stop(procs)
        cluster, procs = self.start(self.start_unreplicated)
        for c in counts:
            unrep.append(self.measure("unreplicated", cluster, c, procs))
        self.children.stop(procs)
        self.progress.clear()
        points = [{"clients": c, "replicated": r, "unreplicated": u, "ratio": ratios(r, u)}
                  for c, r, u in zip(counts, rep, unrep)]
        top = points[-1]
        out = {
            "op": a.op,
            "read_only": a.read_only,
            "storage": a.storage,
            "replicas": a.replicas,
            "faults": (a.replicas - 1) // 3,
            "clients": a.clients,
            "client_procs": max(1, min(a.client_procs, a.clients)),
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "service": SERVICE,
            "replicated": top["replicated"],
            "unreplicated": top["unreplicated"],
            "ratio": top["ratio"],
            "ratio_is": "replicated / unreplicated",
        }
        if a.sweep:
            out["sweep"] = points
        return out


class Worker:
    """A load-worker subprocess driving some of the client identities."""

    def __init__(self, bench: Bench, cluster, client_ids, name: str):
        a = bench.args
        spec = {"dir": str(cluster.dir), "clients": list(client_ids), "op": base64.b64encode(bench.op).decode(),
                "read_only": a.read_only, "warmup": a.warmup, "duration": a.duration}
        self.name = name
        self.children = bench.children
        self.proc = bench.children.spawn(name, ["-m", "pbft.bench", "load-worker", json.dumps(spec)], pipes=True)
        self.lines: asyncio.Queue = asyncio.Queue()
        self.done_total = 0
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        os.set_blocking(self.proc.stdout.fileno(), False)
        loop.add_reader(self.proc.stdout.fileno(), self._readable)
        self.loop = loop

    def _readable(self) -> None:
        try:
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(self.proc.stdout.fileno())
            self.lines.put_nowait(None)
            return
        self.buf += data
        if b"\n" not in data:
            return
        *lines, rest = self.buf.split(b"\n")
        self.buf = bytearray(rest)
        for line in lines:
            msg = json.loads(line)
            if msg.get("progress") is not None:
                self.done_total = msg["progress"]
            else:
                self.lines.put_nowait(msg)

    async def _next(self, timeout: float) -> dict:
        try:
            msg = await asyncio.wait_for(self.lines.get(), timeout)
        except asyncio.TimeoutError:
            raise ConfigError(f"{self.name} did not answer within {timeout:g}s (log in {self.children.logdir})") \
                from None
        if msg is None:
            self.proc.wait(2.0)
            raise ConfigError(f"{self.name} exited with status {self.proc.returncode}"
                              f"{_log_tail(self.children.logdir / (self.name + '.log'))}")
        if "error" in msg:
            raise ConfigError(f"{self.name}: {msg['error']}")
        return msg

    async def wait_ready(self) -> None:
        await self._next(READY_TIMEOUT_S)

    def go(self, t_start: float) -> None:
        self.proc.stdin.write(f"{t_start!r}\n".encode())
        self.proc.stdin.flush()

    async def result(self) -> tuple[array.array, int]:
        msg = await self._next(10.0)
        lat = array.array("d")
        lat.frombytes(base64.b64decode(msg["lat"]))
        return lat, msg["errors"]

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.proc.stdout.fileno())
        except (ValueError, OSError):
            pass
        self.children.stop([self.proc])


def _load_worker(spec_json: str) -> int:
    """``python -m pbft.bench load-worker SPEC``: connect, say ready, wait for the start time on stdin,
    run, report progress and then the latencies on stdout (JSON lines)."""
    from .runtime.cluster import load_cluster

    spec = json.loads(spec_json)
    out = sys.stdout

    def say(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    async def main():
        load = Load(load_cluster(spec["dir"]), spec["clients"], base64.b64decode(spec["op"]), spec["read_only"],
                    spec["warmup"], spec["duration"])
        try:
            await load.connect()
        except ConfigError as e:
            say({"error": str(e)})
            return
        say({"ready": True})
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        run = asyncio.ensure_future(load.run(float(line)))
        while not run.done():
            await asyncio.wait([run], timeout=0.25)
            say({"progress": load.done_total})
        run.result()
        say({"lat": base64.b64encode(load.lat.tobytes()).decode(), "errors": load.errors})

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    return 0


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def print_report(res: dict) -> None:
    a_ro = "read-only" if res["read_only"] else "read-write"
    reps = f"{res['replicas']} replica{'s' if res['replicas'] != 1 else ''}"
    print(f"pbft bench: op {res['op']} ({a_ro}), {reps} (f={res['faults']}, {res.get('storage', 'memory')} storage) "
          f"vs unreplicated, null service, "
          f"loopback; {res['duration_s']:g} s measured after {res['warmup_s']:g} s warm-up, "
          f"clients in {res['client_procs']} process(es)")
    cols = ("ops_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms")
    head = f"{'ops/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}"

    def row(s: dict) -> str:
        return (f"{s['ops_per_s']:>10,.0f} " + " ".join(f"{_fmt(s[k]):>8}" for k in cols[1:])
                + (f"  ({s['errors']} timed out)" if s.get("errors") else ""))

    def rrow(r: dict) -> str:
        return " ".join(f"{_fmt(r[k], 3 if k == 'ops_per_s' else 2):>{10 if k == 'ops_per_s' else 8}}" for k in cols)

    points = res.get("sweep") or [{"clients": res["clients"], "replicated": res["replicated"],
                                   "unreplicated": res["unreplicated"], "ratio": res["ratio"]}]
    print(f"{'clients':>7}  {'':22} {head}")
    for p in points:
        print(f"{p['clients']:>7}  {'replicated':22} {row(p['replicated'])}")
        print(f"{'':>7}  {'unreplicated':22} {row(p['unreplicated'])}")
        print(f"{'':>7}  {'replicated/unreplicated':22} {rrow(p['ratio'])}")


def write_plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = res.get("sweep") or [{"clients": res["clients"], "replicated": res["replicated"],
                                   "unreplicated": res["unreplicated"]}]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("replicated", f"PBFT, {res['replicas']} replicas", "o-"),
                              ("unreplicated", "unreplicated", "s--")):
        xs = [p[key]["ops_per_s"] for p in points]
        ys = [p[key]["p50_ms"] for p in points]
        up = [max(0.0, p[key]["p99_ms"] - y) for y, p in zip(ys, points)]
        ax.errorbar(xs, ys, yerr=[[0.0] * len(ys), up], fmt=style, capsize=3, label=label)
        for x, y, p in zip(xs, ys, points):
            ax.annotate(str(p["clients"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("throughput (operations/s)")
    ax.set_ylabel("latency (ms): median, bar up to p99")
    ax.set_title(f"op {res['op']} {'read-only' if res['read_only'] else 'read-write'}: "
                 f"latency vs throughput (labels: clients)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------

def _check_args(a) -> bytes:
    from .services.null import make_op

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


def _on_sigterm(signum, frame):
    """SIGTERM does what Ctrl-C does: inside an event loop, asyncio's SIGINT handler cancels the main task
    (so every ``finally`` runs); outside one, KeyboardInterrupt."""
    h = signal.getsignal(signal.SIGINT)
    if callable(h) and h is not _on_sigterm:
        h(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def cmd_bench(args) -> int:
    op = _check_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="pbft-bench-"))
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
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
    else:
        print_report(res)
    if args.plot:
        write_plot(res, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


# ---------------------------------------------------------------------------
# internal entry points (python -m pbft.bench ...)
# ---------------------------------------------------------------------------

def _serve_unreplicated(argv: list[str]) -> int:
    from .cli_net import load_service
    from .runtime.cluster import load_cluster
    from .runtime.unreplicated import run_unreplicated

    p = argparse.ArgumentParser(prog="python -m pbft.bench serve-unreplicated",
                                description="the unreplicated baseline server (internal to pbft bench)")
    p.add_argument("dir", help="a cluster directory of one replica (n=1, f=0)")
    p.add_argument("--service", default=SERVICE, help="'kv' or module:Class")
    a = p.parse_args(argv)
    cluster = load_cluster(a.dir)
    if cluster.n != 1:
        raise ConfigError(f"{a.dir} has {cluster.n} replicas; the unreplicated server needs a cluster of one")
    run_unreplicated(cluster, load_service(a.service, cluster))
    return 0


def _internal_main(argv: list[str]) -> int:
    cmds = {"serve-unreplicated": _serve_unreplicated, "load-worker": lambda rest: _load_worker(rest[0])}
    if not argv or argv[0] not in cmds or (argv[0] == "load-worker" and len(argv) != 2):
        print("usage: python -m pbft.bench serve-unreplicated DIR [--service SPEC] | load-worker SPEC "
              "(internal commands of pbft bench)", file=sys.stderr)
        return 2
    try:
        return cmds[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"pbft bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_internal_main(sys.argv[1:]))
