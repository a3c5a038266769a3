"""The supervisor of ``pbft attack``: a local cluster, a correct workload, one attack at a time.

Timeline of one run::

    start 4 replicas (kv service) and the workload process; warm-up
    quiet window Q0
    attack 1 (an attacker process, which stops by itself)   quiet window Q1
    attack 2                                                quiet window Q2
    ...
    (before the first Byzantine-replica attack: replica 3 is stopped and a quiet window runs
     with the three others; after the last: replica 3 is started again from its data directory)
    stop the workload; it reads back every client's key (ordered gets)

Attack i is compared with the quiet windows on either side of it (Q_{i-1} and Q_i): its
throughput fraction is the workload's throughput while the attacker runs divided by the
mean of the two.  Meanwhile every replica's VmRSS is sampled every half second from /proc,
and its /status and /metrics are read before and after each attack, for the counters that
rose and the view changes.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from array import array
from pathlib import Path
from typing import Optional

from ..bench import targets
from ..bench.stats import percentile
from ..procs import ChildExited, JsonLines, Procs, log_tail, sigterm_as_interrupt
from ...config import ConfigError
from ...runtime.cluster import Cluster, free_port_range, init_cluster

# name, class, what it does
ATTACKS = [
    ("garbage", "keyless", "random bytes and malformed frames on many connections"),
    ("forged-client-mac", "keyless", "well-formed requests under real client ids, wrong MACs, fresh connections"),
    ("forged-replica-mac", "keyless", "protocol messages claiming replica ids (the receiver's too), wrong MACs"),
    ("replay", "keyless", "a legitimate client's recorded frames (NewKeys included) replayed at high rate"),
    ("conn-flood", "keyless", "idle connections up to and beyond connections_max, reopened when closed"),
    ("slow-frames", "keyless", "headers of maximum-size frames, bodies trickled (slowly, or to 90%)"),
    ("http-flood", "keyless", "GET /metrics and /status as fast as possible"),
    ("http-slow", "keyless", "metrics requests sent byte by byte, or a header line every 3 s"),
    ("big-timestamp", "keyless", "a client's NewKey and request at timestamp 2^63-1; its identity must still work"),
    ("client-flood", "client", "clients with valid keys sending valid requests without waiting for replies"),
    ("replica-vouch-flood", "replica", "replica 3 (attacker, valid keys): Vouches for many random keys"),
    ("replica-status-flood", "replica", "replica 3 (attacker, valid keys): Status messages as fast as possible"),
    ("replica-recovery-flood", "replica", "replica 3 (attacker, valid keys): QueryStable and recovery requests"),
    ("replica-viewchange-flood", "replica", "replica 3 (attacker, valid keys): view changes for ever higher views"),
    ("replica-wrong-replies", "replica", "replica 3 (attacker, valid keys): wrong results to every client request"),
]
NAMES = [a[0] for a in ATTACKS]
CLASS_OF = {a[0]: a[1] for a in ATTACKS}
DESCRIPTION = {a[0]: a[2] for a in ATTACKS}
FLOORS = {"keyless": 0.90, "client": 0.70, "replica": 0.50}
RSS_LIMIT_MIB = 512
REPLICAS = 4
FLOOD_IDS = 16
SERVICE = "kv"
READY_TIMEOUT_S = 30.0
SAMPLE_PERIOD_S = 0.5
RECOVERED = 0.5  # a quiet window counts once the workload is back to half its usual quiet rate


def cpu_placement(spec: str) -> Optional[tuple[list[int], list[int]]]:
    """``(cluster CPUs, attacker CPUs)`` for ``--attacker-cpus``, or None to share every CPU.

    ``auto``: with at least two usable CPUs, the last one is the attacker's (and this
    supervisor's), the rest the cluster's (replicas and the correct workload), as if the attacker
    ran on a machine of its own; with one CPU, shared.  ``shared``: no placement.  A comma list
    (``1`` or ``2,3``): those CPUs are the attacker's, the others the cluster's."""
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = list(range(os.cpu_count() or 1))
    if spec == "shared":
        return None
    if spec == "auto":
        if len(usable) < 2:
            return None
        return usable[:-1], usable[-1:]
    try:
        atk = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--attacker-cpus must be auto, shared or a comma list of CPU numbers, "
                          f"got {spec!r}") from None
    bad = [c for c in atk if c not in usable]
    if bad or not atk:
        raise ConfigError(f"--attacker-cpus {spec!r}: CPUs {bad or atk} are not among the usable CPUs {usable}")
    rest = [c for c in usable if c not in atk]
    if not rest:
        raise ConfigError(f"--attacker-cpus {spec!r} leaves no CPU for the cluster (usable: {usable})")
    return rest, atk


def pin(pid: int, cpus: Optional[list[int]]) -> None:
    """Restrict a process (started a moment ago, so still single-threaded: its threads inherit
    the mask) to ``cpus``; nothing when ``cpus`` is None."""
    if cpus is not None:
        try:
            os.sched_setaffinity(pid, cpus)
        except (ProcessLookupError, OSError):
            pass


def parse_attacks(s: str) -> list[str]:
    """``all``, or a comma list of attack names and class names (keyless, client, replica); the
    attacks run in the canonical order whatever the order given."""
    if s.strip() in ("", "all"):
        return list(NAMES)
    want: set[str] = set()
    for x in (p.strip() for p in s.split(",")):
        if not x:
            continue
        if x in FLOORS:
            want.update(n for n in NAMES if CLASS_OF[n] == x)
        elif x in CLASS_OF:
            want.add(x)
        else:
            raise ConfigError(f"unknown attack {x!r}; known: {', '.join(NAMES)} (or a class: "
                              f"{', '.join(FLOORS)}, or all)")
    return [n for n in NAMES if n in want]


# ---------------------------------------------------------------------------
# measuring the replicas
# ---------------------------------------------------------------------------

def proc_memory_kib(pid: int) -> tuple[Optional[int], Optional[int]]:
    """(VmRSS, VmHWM) of a process in KiB, or (None, None) if it is gone."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None, None
    return rss, hwm


def proc_cpu_s(pid: int) -> Optional[float]:
    """The process's CPU seconds so far (``bench.targets.proc_cpu_s``), None when it is gone."""
    try:
        return targets.proc_cpu_s(pid)
    except (OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """VmRSS and VmHWM of every replica process every ``period`` seconds."""

    def __init__(self, period: float = SAMPLE_PERIOD_S):
        super().__init__(name="rss-sampler", daemon=True)
        self.period = period
        self.pids: dict[int, int] = {}  # replica id -> pid being watched
        self.samples: list[tuple[float, int, int, int]] = []  # (t, replica, rss KiB, hwm KiB)
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()

    def watch(self, rid: int, pid: Optional[int]) -> None:
        with self.lock:
            if pid is None:
                self.pids.pop(rid, None)
            else:
                self.pids[rid] = pid

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.sample()
            self.stop_ev.wait(self.period)

    def sample(self) -> None:
        with self.lock:
            pids = dict(self.pids)
        now = time.monotonic()
        for rid, pid in pids.items():
            rss, hwm = proc_memory_kib(pid)
            if rss is not None and hwm is not None:
                with self.lock:
                    self.samples.append((now, rid, rss, hwm))

    def peaks(self, t0: float, t1: float) -> dict[int, dict]:
        """Per replica: the highest RSS sampled in [t0, t1] and the last VmHWM, in MiB."""
        out: dict[int, dict] = {}
        with self.lock:
            xs = [s for s in self.samples if t0 <= s[0] <= t1]
        for _t, rid, rss, hwm in xs:
            e = out.setdefault(rid, {"rss_peak_mib": 0.0, "hwm_mib": 0.0})
            e["rss_peak_mib"] = max(e["rss_peak_mib"], round(rss / 1024, 1))
            e["hwm_mib"] = max(e["hwm_mib"], round(hwm / 1024, 1))
        return out

    def stop(self) -> None:
        self.stop_ev.set()


_METRIC = re.compile(r'^(pbft_[a-z_]+)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_metrics(text: str) -> dict[str, float]:
    """The counters of a replica's /metrics: ``drop:<layer>:<reason>`` for dropped messages, the
    metric name (without ``_total``) for the other counters."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m is None or not m.group(1).endswith("_total"):
            continue
        name = m.group(1)[:-len("_total")]
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if name == "pbft_dropped_messages":
            out[f"drop:{labels.get('layer', '?')}:{labels.get('reason', '?')}"] = v
        elif set(labels) <= {"replica"}:
            out[name] = v
    return out


def counter_deltas(s0: dict, s1: dict) -> dict[str, float]:
    """Counter increases from snapshot ``s0`` to ``s1``, summed over the replicas answering both."""
    out: dict[str, float] = {}
    for i, e in s1["r"].items():
        m1 = e["metrics"]
        m0 = (s0["r"].get(i) or {}).get("metrics")
        if m1 is None or m0 is None:
            continue
        for k, v in m1.items():
            dv = v - m0.get(k, 0.0)
            if dv > 0:
                out[k] = out.get(k, 0.0) + dv
    return out


def metrics_addr(r) -> str:
    """Where a replica's HTTP endpoint answers."""
    return getattr(r, "metrics_addr", r.host)


def http_get(host: str, port: int, path: str, timeout: float) -> bytes:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
        return r.read()


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

class Supervisor:
    def __init__(self, args, names: list[str], workdir: Path):
        self.args = args
        self.names = names
        self.workdir = workdir
        self.children = Procs(workdir)
        self.sampler = Sampler()
        self.procs: dict[int, subprocess.Popen] = {}
        self.byz = False  # replica 3 is the attacker's (or down between attacks) from now on
        self.byz_id = REPLICAS - 1
        self.died: list[str] = []
        self.quiet: list[dict] = []  # the quiet windows so far (``quiet_window``)
        self.cluster: Cluster = None  # type: ignore[assignment]  # set by start_cluster, before anything else
        self.workload: Optional[subprocess.Popen] = None
        self.workload_lines: Optional[JsonLines] = None
        self.progress: list[tuple[float, int]] = []  # the workload's progress reports: (time, operations done)
        placement = cpu_placement(args.attacker_cpus)
        self.cluster_cpus: Optional[list[int]] = placement[0] if placement else None
        self.attacker_cpus: Optional[list[int]] = placement[1] if placement else None

    def note(self, text: str) -> None:
        print(f"pbft attack: {text}", file=sys.stderr, flush=True)

    # ---- cluster ------------------------------------------------------------
    def start_replica(self, i: int) -> subprocess.Popen:
        p = self.children.start_replica(self.cluster.dir, i, SERVICE, quiet=True)
        pin(p.pid, self.cluster_cpus)
        self.procs[i] = p
        self.sampler.watch(i, p.pid)
        return p

    def start_cluster(self) -> None:
        from ..net import fetch_status

        a = self.args
        clients = a.clients + 2 + FLOOD_IDS
        for attempt in range(3):
            base = free_port_range(2 * REPLICAS)
            self.cluster = init_cluster(self.workdir / "cluster", REPLICAS, None, ["127.0.0.1"], base, clients,
                                        metrics_base_port=base + REPLICAS, force=True, storage={"mode": a.storage},
                                        recovery={"period_s": 0.0})  # (no recovery turn inside a measurement)
            for i in range(REPLICAS):
                self.start_replica(i)
            deadline = time.monotonic() + READY_TIMEOUT_S
            try:
                while True:
                    self.children.check_alive(list(self.procs.values()))
                    try:
                        if all(len(fetch_status(metrics_addr(r), r.metrics_port, 1.0)["peers_connected"])
                               == REPLICAS - 1 for r in self.cluster.replicas):
                            return
                    except (OSError, ValueError):
                        pass
                    if time.monotonic() > deadline:
                        raise ConfigError(f"the replicas did not connect to each other within {READY_TIMEOUT_S:g}s")
                    time.sleep(0.05)
            except ChildExited:
                self.children.stop(list(self.procs.values()))
                if attempt == 2:
                    raise

    def ids(self) -> dict:
        c = self.cluster.client_ids
        k = self.args.clients
        return {"victims": c[:k], "replay_id": c[k], "bigts_id": c[k + 1], "flood_ids": c[k + 2:k + 2 + FLOOD_IDS]}

    def live_ids(self) -> list[int]:
        return [i for i in range(REPLICAS) if not (self.byz and i == self.byz_id)]

    def check_processes(self) -> None:
        for i in self.live_ids():
            p = self.procs[i]
            if p.poll() is not None:
                msg = f"replica {i} exited with status {p.returncode}{log_tail(self.workdir / f'replica-{i}.log')}"
                if msg not in self.died:
                    self.died.append(msg)
                    self.note(msg)

    def snapshot(self) -> dict:
        """``{"t": time, "r": {replica: {"status", "metrics", "cpu_s"}}}`` for the live replicas
        (None where a replica did not answer)."""
        out = {}
        for i in self.live_ids():
            r = self.cluster.replicas[i]
            st = mt = None
            for _attempt in range(3):
                try:
                    st = json.loads(http_get(metrics_addr(r), r.metrics_port, "/status", 2.0))
                    mt = parse_metrics(http_get(metrics_addr(r), r.metrics_port, "/metrics", 2.0).decode())
                    break
                except (OSError, ValueError, urllib.error.URLError):
                    time.sleep(0.2)
            out[i] = {"status": st, "metrics": mt, "cpu_s": proc_cpu_s(self.procs[i].pid)}
        return {"t": time.monotonic(), "r": out}

    def _on_progress(self, msg: dict) -> None:
        self.progress.append((msg["t"], msg["progress"]))

    def rate(self, t0: float, t1: float) -> Optional[float]:
        """The workload's operations per second between t0 and t1, from its progress reports."""
        pr = list(self.progress)
        ts = [t for t, _ in pr]
        i, j = bisect.bisect_left(ts, t0), bisect.bisect_right(ts, t1) - 1
        if j <= i or ts[j] <= ts[i]:
            return None
        return (pr[j][1] - pr[i][1]) / (ts[j] - ts[i])

    def quiet_window(self, snap_start: Optional[dict] = None) -> dict:
        """No attacker runs for ``--quiet-s``, and longer, up to ``--settle-max-s``, until the
        workload is back to at least half the usual quiet rate (the median of this phase's quiet
        windows so far), so that the next attack starts from a recovered cluster.  The window
        measured is the last ``--quiet-s`` seconds.  ``{"w": (t0, t1), "settle_s", "recovered",
        "rate", "snaps": (snapshot at the start, at the end)}``."""
        a = self.args
        s0 = snap_start or self.snapshot()
        t0 = time.monotonic()
        end = t0 + a.quiet_s
        while time.monotonic() < end:
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))
            self.check_processes()
        rates = sorted(q["rate"] for q in self.quiet if q["byz"] == self.byz and q["rate"] is not None)
        if not rates:
            # the first window of a phase (replica 3 just stopped: maybe a view change under way)
            # waits too, for half the earlier phase's usual rate, so no round is compared with a
            # window of the cluster still recovering from the stop
            rates = sorted(q["rate"] for q in self.quiet if q["rate"] is not None)
        ref = rates[len(rates) // 2] if rates else None
        recovered = True
        while ref:
            now = time.monotonic()
            r = self.rate(now - a.quiet_s, now)
            if r is not None and r >= RECOVERED * ref:
                break
            if now - t0 >= a.quiet_s + a.settle_max_s:
                recovered = False
                break
            time.sleep(0.25)
            self.check_processes()
        t1 = time.monotonic()
        w = (max(t0, t1 - a.quiet_s), t1)
        q = {"w": w, "settle_s": round(w[0] - t0, 2), "recovered": recovered, "rate": self.rate(*w),
             "byz": self.byz, "snaps": (s0, self.snapshot())}
        self.quiet.append(q)
        return q

    # ---- the workload -------------------------------------------------------
    def start_workload(self) -> None:
        spec = {"dir": str(self.cluster.dir), "clients": self.ids()["victims"], "timeout_s": 5.0}
        self.workload = w = self.children.start("workload", ["-m", "pbft.tools.attack", "workload",
                                                             json.dumps(spec)], pipes=True)
        pin(w.pid, self.cluster_cpus)
        self.workload_lines = lines = JsonLines(w, self._on_progress)
        try:
            msg = lines.next(READY_TIMEOUT_S)
        except queue.Empty:
            raise ConfigError(f"the workload did not start within {READY_TIMEOUT_S:g}s") from None
        if not msg or not msg.get("ready"):
            raise ConfigError(f"the workload failed to start{log_tail(self.workdir / 'workload.log')}")

    def stop_workload(self) -> dict:
        w, lines = self.workload, self.workload_lines
        assert w is not None and w.stdin is not None and lines is not None  # start_workload came first
        try:
            w.stdin.write(b"stop\n")
            w.stdin.flush()
        except OSError:
            pass
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            try:
                msg = lines.next(1.0)
            except queue.Empty:
                continue
            if msg is None:
                break
            if "result" in msg:
                return msg["result"]
        raise ConfigError(f"the workload gave no result{log_tail(self.workdir / 'workload.log')}")

    # ---- one attack ---------------------------------------------------------
    def run_attack(self, name: str, index: int) -> dict:
        a = self.args
        spec = dict(self.ids())
        spec.update({"dir": str(self.cluster.dir), "duration": a.duration_s, "seed": 1000 + index,
                     "nice": a.attacker_nice})
        if CLASS_OF[name] == "replica":
            spec["byz_id"] = self.byz_id
        snap0 = self.quiet[-1]["snaps"][1]
        t_spawn = time.monotonic()
        p = self.children.start(f"attack-{name}", ["-m", "pbft.tools.attack", "worker", name, json.dumps(spec)],
                                pipes=True)
        pin(p.pid, self.attacker_cpus)
        lines = JsonLines(p)
        rec: dict = {"attack": name, "class": CLASS_OF[name], "floor": FLOORS[CLASS_OF[name]], "t_spawn": t_spawn,
                     "t_start": None, "t_end": None, "summary": None, "error": None}
        deadline = time.monotonic() + 60.0 + a.duration_s * 2
        while True:
            self.check_processes()
            try:
                msg = lines.next(0.25)
            except queue.Empty:
                if time.monotonic() > deadline:
                    rec["error"] = "attacker did not finish in time (killed)"
                    break
                continue
            if msg is None:
                break
            if "started" in msg:
                rec["t_start"] = msg["started"]
            elif "done" in msg:
                rec["t_end"] = msg["done"]
            elif "summary" in msg:
                rec["summary"] = msg["summary"]
        self.children.stop([p])
        t_exit = time.monotonic()
        if rec["t_start"] is None or rec["t_end"] is None:
            rec["error"] = rec["error"] or f"attacker exited early (status {p.returncode})" \
                f"{log_tail(self.workdir / f'attack-{name}.log')}"
            rec["t_start"] = rec["t_start"] or t_spawn
            rec["t_end"] = rec["t_end"] or t_exit
        if rec["summary"] and rec["summary"].get("error"):
            rec["error"] = rec["summary"]["error"]
        self.check_processes()
        rec["alive"] = [i for i in self.live_ids() if self.procs[i].poll() is None]
        snap1 = self.snapshot()
        rec["t_exit"] = t_exit
        rec["snap"] = (snap0, snap1)
        return rec

    # ---- the whole run ------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        self.note(f"starting {REPLICAS} replicas ({a.storage} storage) in {self.workdir}")
        if self.attacker_cpus is not None:
            self.note(f"CPUs {self.cluster_cpus} for the replicas and the workload, {self.attacker_cpus} for the "
                      f"attackers and this supervisor")
            pin(0, self.attacker_cpus)
        self.start_cluster()
        self.sampler.start()
        self.start_workload()
        time.sleep(a.warmup_s)
        self.quiet_window()
        records = []
        for k, name in enumerate(self.names):
            if CLASS_OF[name] == "replica" and not self.byz:
                self.note(f"stopping replica {self.byz_id}: the Byzantine-replica attacks run in its place")
                self.children.stop([self.procs[self.byz_id]])
                self.sampler.watch(self.byz_id, None)
                self.byz = True
                self.quiet_window()
            rounds = []
            for j in range(a.rounds):
                self.note(f"attack {k + 1}/{len(self.names)}: {name}, round {j + 1}/{a.rounds} ({a.duration_s:g} s)")
                rec = self.run_attack(name, 100 * k + j)
                rec["before"] = self.quiet[-1]
                rec["after"] = self.quiet_window(rec["snap"][1])
                rounds.append(rec)
            records.append(rounds)
        if self.byz:
            self.note(f"starting replica {self.byz_id} again")
            self.start_replica(self.byz_id)
            self.byz = False
            self.wait_answering(self.byz_id, READY_TIMEOUT_S)
        result = self.stop_workload()
        final = self.snapshot()["r"]
        self.check_processes()
        self.sampler.stop()
        return self.report(records, result, final)

    def cpu_note(self) -> str:
        a = self.args
        nice = f"; attackers run at nice {a.attacker_nice}" if a.attacker_nice else ""
        if self.attacker_cpus is not None:
            return (f"the replicas and the workload's clients run on CPUs {self.cluster_cpus}, the attackers and "
                    f"this supervisor on CPUs {self.attacker_cpus}, as if the attacker had a machine of its own "
                    f"(the kernel's loopback work for a sender's frames mostly runs on the sender's CPU){nice}")
        return (f"the replicas, the workload's clients, the attacker process and this supervisor share "
                f"the machine's {os.cpu_count()} cores (with anything else running): attackers and "
                f"clients take CPU from the replicas, so fractions are lower bounds for replicas "
                f"with cores of their own{nice}")

    def wait_answering(self, rid: int, timeout: float) -> bool:
        r = self.cluster.replicas[rid]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                http_get(metrics_addr(r), r.metrics_port, "/status", 1.0)
                return True
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        return False

    # ---- figures ------------------------------------------------------------
    def report(self, records: list[list[dict]], wl: dict, final: dict) -> dict:
        a = self.args
        t_done = array("d")
        t_done.frombytes(base64.b64decode(wl["t_done"]))
        lat = array("d")
        lat.frombytes(base64.b64decode(wl["lat"]))
        err_t = sorted(array("d", base64.b64decode(wl["err_t"])))
        pairs = sorted(zip(t_done, lat))
        ts = [p[0] for p in pairs]

        def window(w: tuple[float, float]) -> dict:
            i, j = bisect.bisect_left(ts, w[0]), bisect.bisect_right(ts, w[1])
            xs = sorted(p[1] for p in pairs[i:j])
            d = w[1] - w[0]
            errs = bisect.bisect_right(err_t, w[1]) - bisect.bisect_left(err_t, w[0])
            return {"ops": len(xs), "seconds": round(d, 2), "ops_per_s": round(len(xs) / d, 1) if d > 0 else 0.0,
                    "p99_ms": None if not xs else round(percentile(xs, 99) * 1000, 2), "timeouts": errs}

        def windows(ws: list[tuple[float, float]]) -> dict:
            """``window`` over several windows together (ops/s over their total length)."""
            parts = [window(w) for w in ws]
            xs = sorted(p[1] for w in ws for p in pairs[bisect.bisect_left(ts, w[0]):bisect.bisect_right(ts, w[1])])
            d = sum(x["seconds"] for x in parts)
            ops = sum(x["ops"] for x in parts)
            return {"ops": ops, "seconds": round(d, 2), "ops_per_s": round(ops / d, 1) if d > 0 else 0.0,
                    "p99_ms": None if not xs else round(percentile(xs, 99) * 1000, 2),
                    "timeouts": sum(x["timeouts"] for x in parts)}

        out_attacks = []
        for rounds in records:
            first, last = rounds[0], rounds[-1]
            name = first["attack"]
            # each round against the quiet windows on either side of it; the verdict on the median
            fracs = []
            for rec in rounds:
                d_r = window((rec["t_start"], rec["t_end"]))
                base_r = (window(rec["before"]["w"])["ops_per_s"] + window(rec["after"]["w"])["ops_per_s"]) / 2
                fracs.append(round(d_r["ops_per_s"] / base_r, 3) if base_r > 0 else None)
            known = sorted(f for f in fracs if f is not None)
            frac = None if len(known) < len(fracs) or not known else round(_median(known), 3)
            during = windows([(rec["t_start"], rec["t_end"]) for rec in rounds])
            quiet_ws = [first["before"]] + [rec["after"] for rec in rounds]
            quiet_rates = [window(q["w"])["ops_per_s"] for q in quiet_ws]
            before, after = window(first["before"]["w"]), window(last["after"]["w"])
            mem = self.sampler.peaks(first["t_spawn"], last["t_exit"] + 1.0)
            snap0, snap1 = first["snap"][0]["r"], last["snap"][1]["r"]
            alive = min((rec["alive"] for rec in rounds), key=len)
            answering = min(([i for i in rec["snap"][1]["r"] if rec["snap"][1]["r"][i]["status"] is not None]
                             for rec in rounds), key=len)
            raw: dict[str, float] = {}
            span = 0.0
            cpu: dict[int, float] = {}
            vc = 0
            for rec in rounds:
                s0, s1 = rec["snap"]
                for k, v in counter_deltas(s0, s1).items():
                    raw[k] = raw.get(k, 0.0) + v
                span += s1["t"] - s0["t"]
                for i in s1["r"]:
                    c0, c1 = (s0["r"].get(i) or {}).get("cpu_s"), s1["r"][i]["cpu_s"]
                    if c0 is not None and c1 is not None:
                        cpu[i] = round(cpu.get(i, 0.0) + c1 - c0, 2)
                vc += sum(x["status"]["view_changes"] for x in s1["r"].values() if x["status"]) - \
                    sum(x["status"]["view_changes"] for x in s0["r"].values() if x["status"])
            q0, q1 = first["before"]["snaps"]
            quiet_rate = {k: v / max(1e-3, q1["t"] - q0["t"]) for k, v in counter_deltas(q0, q1).items()}
            # what rose beyond what the same counter does anyway at the quiet window's rate
            # (a counter that moves in quiet windows too counts only if it rose clearly faster)
            excess = {k: int(v - quiet_rate.get(k, 0.0) * span) for k, v in raw.items()
                      if v > 1.5 * quiet_rate.get(k, 0.0) * span + 10 or quiet_rate.get(k, 0.0) == 0}
            drops = {k[5:]: v for k, v in sorted(excess.items(), key=lambda kv: -kv[1])
                     if k.startswith("drop:") and v > 0}
            drops_raw = {k[5:]: int(v) for k, v in sorted(raw.items(), key=lambda kv: -kv[1]) if k.startswith("drop:")}
            deltas = {k: int(v) for k, v in sorted(raw.items(), key=lambda kv: -kv[1]) if not k.startswith("drop:")}
            views0 = [x["status"]["view"] for x in snap0.values() if x["status"]]
            views1 = [x["status"]["view"] for x in snap1.values() if x["status"]]
            sent: dict[str, int] = {}
            checks: dict = {}
            atk_cpu: Optional[float] = 0.0
            error = None
            for rec in rounds:
                summary = rec["summary"] or {}
                for k, v in summary.get("sent", {}).items():
                    sent[k] = sent.get(k, 0) + v
                for k, v in summary.get("checks", {}).items():
                    if isinstance(v, bool):  # a check holds if it held in every round
                        checks[k] = checks.get(k, True) and v
                    elif isinstance(v, (int, float)):
                        checks[k] = checks.get(k, 0) + v
                    else:
                        checks.setdefault(k, v)
                if summary.get("cpu_s") is None or atk_cpu is None:
                    atk_cpu = None
                else:
                    atk_cpu += summary["cpu_s"]
                error = error or rec["error"]
            atk_time = sum(rec["t_exit"] - rec["t_spawn"] for rec in rounds)
            rss_max = max((e["rss_peak_mib"] for e in mem.values()), default=None)
            fails = []
            if error:
                fails.append("attacker-error")
            if frac is None or frac < first["floor"]:
                fails.append("throughput")
            if rss_max is None or rss_max >= RSS_LIMIT_MIB:
                fails.append("memory")
            if len(alive) < len(snap1):
                fails.append("replica-died")
            if len(answering) < len(snap1):
                fails.append("status-unanswered")
            for k, v in checks.items():
                if k.endswith("_after") and v is False:
                    fails.append(k)
            if checks.get("keys_exchanged") is False:
                fails.append("attacker-keys")
            out_attacks.append({
                "attack": name, "class": first["class"], "description": DESCRIPTION[name], "floor": first["floor"],
                # the median over the rounds of (ops/s during the round / mean of the quiet windows around it)
                "throughput_fraction": frac, "rounds": len(rounds), "round_fractions": fracs,
                "spread": [known[0], known[-1]] if known else None,
                "during": during, "quiet_before": before, "quiet_after": after, "quiet_ops_per_s": quiet_rates,
                # the last quiet window after as a fraction of the first one before
                "after_vs_before": round(after["ops_per_s"] / before["ops_per_s"], 3) if before["ops_per_s"] else None,
                # how long after a round the workload took (at most) to get back to half its rate
                "settle_s": max(rec["after"]["settle_s"] for rec in rounds),
                "recovered": all(rec["after"]["recovered"] for rec in rounds),
                "p99_ms": during["p99_ms"], "replicas_alive": len(alive), "replicas_answering": len(answering),
                "replicas_expected": len(snap1),
                "memory": {str(i): v for i, v in sorted(mem.items())}, "rss_peak_mib": rss_max,
                "drops": drops, "drops_raw": drops_raw, "counters": deltas,
                "views_advanced": (max(views1) - max(views0)) if views0 and views1 else None,
                "view_changes": vc,
                "replica_cpu_s": {str(i): v for i, v in cpu.items()},
                "attacker": {"sent": sent, "checks": checks, "cpu_s": None if atk_cpu is None else round(atk_cpu, 2)},
                "attacker_core_share": round(atk_cpu / max(1e-3, atk_time), 3) if atk_cpu is not None else None,
                "error": error,
                "verdict": "ERROR" if error else ("PASS" if not fails else "FAIL"),
                "failed": fails,
            })
        final_alive = [i for i in range(REPLICAS) if self.procs[i].poll() is None]
        final_answering = [i for i in final if final[i]["status"] is not None]
        ok = not self.died and wl["wrong_count"] == 0 and not wl["unverified"] \
            and len(final_alive) == REPLICAS
        return {
            "replicas": REPLICAS, "faults": (REPLICAS - 1) // 3, "storage": a.storage, "service": SERVICE,
            "clients": a.clients, "duration_s": a.duration_s, "rounds": a.rounds, "quiet_s": a.quiet_s,
            "cpus": os.cpu_count(),
            "rss_limit_mib": RSS_LIMIT_MIB, "floors": FLOORS,
            "cpu_note": self.cpu_note(),
            "cpu_placement": None if self.attacker_cpus is None else
            {"cluster": self.cluster_cpus, "attacker": self.attacker_cpus},
            "attacker_nice": a.attacker_nice,
            "attacks": out_attacks,
            "workload": {"ops": len(ts), "acknowledged_writes": wl["acked_writes"], "verified_clients": wl["verified"],
                         "unverified": wl["unverified"], "wrong_results": wl["wrong_count"], "wrong": wl["wrong"],
                         "timeouts": len(err_t)},
            "replicas_alive_at_end": len(final_alive), "replicas_answering_at_end": len(final_answering),
            # every sample of the whole run, quiet windows and restarts included
            "memory_overall": {str(i): v for i, v in sorted(self.sampler.peaks(0.0, float("inf")).items())},
            "replica_exits": self.died,
            "ok": ok,
            "all_pass": all(x["verdict"] == "PASS" for x in out_attacks),
        }


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    """The median of a sorted, non-empty list."""
    k = len(xs)
    return xs[k // 2] if k % 2 else (xs[k // 2 - 1] + xs[k // 2]) / 2


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x, nd=0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def print_report(res: dict, top: int = 3) -> None:
    print(f"pbft attack: {res['replicas']} replicas (f={res['faults']}, {res['storage']} storage, {res['service']} "
          f"service) on loopback, {res['clients']} closed-loop clients; each attack {res.get('rounds', 1)} rounds "
          f"of {res['duration_s']:g} s, each between quiet windows of {res['quiet_s']:g} s; "
          f"RSS limit {res['rss_limit_mib']} MiB")
    print(f"CPU: {res['cpu_note']}.")
    print("throughput = median over the rounds of (ops/s during the round / mean ops/s of the quiet windows "
          "before and after it), with the lowest and highest round (spread); "
          "floors: " + ", ".join(f"{k} {v:.0%}" for k, v in res["floors"].items()))
    print()
    head = (f"{'attack':26} {'class':8} {'floor':>5} {'tput':>5} {'spread':>9} {'verdict':7} {'ops/s':>7} "
            f"{'quiet':>11} {'p99 ms':>7} {'alive':>5} {'RSS MiB':>7} {'views':>5} {'atk CPU':>7}  counters that rose")
    print(head)
    for x in res["attacks"]:
        qs = x.get("quiet_ops_per_s") or [x["quiet_before"]["ops_per_s"], x["quiet_after"]["ops_per_s"]]
        quiet = f"{_num(min(qs))}-{_num(max(qs))}" if qs else "-"
        sp = x.get("spread")
        spread = f"{100 * sp[0]:.0f}-{100 * sp[1]:.0f}%" if sp else "-"
        rose = " ".join(f"{k}+{v}" for k, v in list(x["drops"].items())[:top]) or "-"
        verdict = x["verdict"] + ("" if x["verdict"] == "PASS" else "")
        print(f"{x['attack']:26} {x['class']:8} {_pct(x['floor']):>5} {_pct(x['throughput_fraction']):>5} "
              f"{spread:>9} {verdict:7} {_num(x['during']['ops_per_s']):>7} {quiet:>11} {_num(x['p99_ms'], 1):>7} "
              f"{x['replicas_alive']}/{x['replicas_expected']:<3} {_num(x['rss_peak_mib']):>7} "
              f"{_num(x['views_advanced']):>5} {_pct(x['attacker_core_share']):>7}  {rose}")
        notes = []
        if x["failed"] and x["verdict"] != "PASS":
            notes.append("failed: " + ", ".join(x["failed"]))
        if x["error"]:
            notes.append(f"error: {x['error']}")
        checks = {k: v for k, v in x["attacker"]["checks"].items() if isinstance(v, bool)}
        if checks:
            notes.append(" ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()))
        if not x["recovered"]:
            notes.append(f"lasting harm: the workload was not back to half its quiet rate "
                         f"{x['settle_s'] + res['quiet_s']:g} s after the attack")
        elif x["settle_s"] > 0:
            notes.append(f"lasting harm: the workload needed {x['settle_s']:g} s more than the quiet window "
                         f"to get back to half its quiet rate")
        if x["during"]["timeouts"]:
            notes.append(f"{x['during']['timeouts']} client timeouts")
        if notes:
            print(f"{'':26} " + "; ".join(notes))
    w = res["workload"]
    print()
    print(f"workload: {w['ops']:,} operations, {w['acknowledged_writes']:,} acknowledged writes, "
          f"{w['verified_clients']}/{res['clients']} clients' keys read back correctly, "
          f"{w['wrong_results']} wrong results, {w['timeouts']} timeouts")
    for x in w["wrong"][:5]:
        print(f"  WRONG: {x}")
    for x in w["unverified"][:5]:
        print(f"  UNVERIFIED: {x}")
    for x in res["replica_exits"]:
        print(f"  REPLICA EXITED: {x}")
    peaks = res.get("memory_overall") or {}
    if peaks:
        print("peak RSS over the whole run (MiB, per replica): "
              + ", ".join(f"{i}: {v['rss_peak_mib']:.0f} (VmHWM {v['hwm_mib']:.0f})" for i, v in peaks.items())
              + f"; limit {res['rss_limit_mib']}")
    print(f"replicas alive at the end: {res['replicas_alive_at_end']}/{res['replicas']}; "
          f"{'no replica died and every result was right' if res['ok'] else 'FAILED'}; "
          f"{sum(x['verdict'] == 'PASS' for x in res['attacks'])}/{len(res['attacks'])} attacks PASS")


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------

def add_attack_command(sub) -> None:
    p = sub.add_parser("attack", help="an attack suite against a local cluster, one attack at a time",
                       description="Start a local 4-replica cluster (kv service, loopback), run a correct "
                                   "closed-loop workload, apply each attack for --duration-s between quiet "
                                   "windows, and print per attack: the workload's throughput during it as a "
                                   "fraction of the quiet windows', p99 latency, replicas alive, peak RSS, the "
                                   "drop counters that rose and view changes; PASS/FAIL against the floor of "
                                   "its class. Exits non-zero if a replica died or a result was wrong (and, "
                                   "with --enforce-floors, if an attack did not PASS).")
    p.add_argument("--attacks", default="all",
                   help="comma list of attacks or classes (keyless, client, replica); default all: "
                        + ", ".join(NAMES))
    p.add_argument("--duration-s", type=float, default=5.0, help="seconds per round of an attack (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per attack, each between two quiet windows; the throughput fraction is the "
                        "median of the rounds' (default 3)")
    p.add_argument("--quiet-s", type=float, default=3.0, help="seconds of each quiet window (default 3)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before the first quiet window")
    p.add_argument("--settle-max-s", type=float, default=30.0,
                   help="after an attack, wait up to this much longer than --quiet-s for the workload to get back "
                        "to half its quiet rate (default 30)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients of the workload (default 8)")
    p.add_argument("--storage", choices=["durable", "fast", "memory"], default="fast",
                   help="the replicas' storage mode (default fast)")
    p.add_argument("--attacker-nice", type=int, default=0, choices=range(0, 20), metavar="0-19",
                   help="run each attacker process at this nice level (default 0). On a machine the attacker "
                        "shares with the cluster, 19 gives it only the CPU the cluster leaves idle: what "
                        "remains of the loss is the replicas' own, as with an attacker on a machine of its own")
    p.add_argument("--attacker-cpus", default="auto", metavar="auto|shared|LIST",
                   help="where the attackers run: auto (default) gives them (and this supervisor) the last CPU "
                        "and the cluster the others when there are at least two, as if the attacker had a "
                        "machine of its own; shared puts everything on every CPU; a comma list names the "
                        "attackers' CPUs")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--enforce-floors", action="store_true",
                   help="also exit non-zero if an attack misses its floor, the memory limit or a check")
    p.add_argument("--keep", action="store_true", help="keep the cluster directory and logs")
    p.add_argument("--list", action="store_true", help="list the attacks and their floors")
    p.set_defaults(func=cmd_attack)


def cmd_attack(args) -> int:
    if args.list:
        for name, klass, desc in ATTACKS:
            print(f"{name:26} {klass:8} floor {FLOORS[klass]:.0%}  {desc}")
        return 0
    names = parse_attacks(args.attacks)
    cpu_placement(args.attacker_cpus)  # a bad --attacker-cpus fails here, before any process starts
    if not names:
        raise ConfigError("--attacks selects no attack")
    for what, v, lo in (("--duration-s", args.duration_s, 0.0), ("--quiet-s", args.quiet_s, 0.0)):
        if not (v > lo and math.isfinite(v)):
            raise ConfigError(f"{what} must be a positive number of seconds, got {v:g}")
    for what, v in (("--warmup-s", args.warmup_s), ("--settle-max-s", args.settle_max_s)):
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{what} must be >= 0 seconds, got {v:g}")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if args.clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {args.clients}")
    workdir = Path(tempfile.mkdtemp(prefix="pbft-attack-"))
    old_term = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    sup = Supervisor(args, names, workdir)
    keep = True
    try:
        res = sup.run()
        keep = args.keep or not res["ok"]
    except KeyboardInterrupt:
        print("pbft attack: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        raise ConfigError(f"attack: {e} (logs in {workdir})") from None
    finally:
        sup.sampler.stop()
        sup.children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep:
        res["workdir"] = str(workdir)
    if args.json:
        print(json.dumps(res))
    else:
        print_report(res)
        if keep:
            print(f"logs in {workdir}")
    return exit_status(res, args.enforce_floors)


def exit_status(res: dict, enforce_floors: bool) -> int:
    """1 if a replica died or a result was wrong; with ``enforce_floors`` also if an attack is not PASS."""
    if not res["ok"]:
        return 1
    if enforce_floors and not res["all_pass"]:
        return 1
    return 0
