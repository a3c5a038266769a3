"""``pbft bench --report``'s arithmetic: the points it measures, CPU time per operation from
``/proc/<pid>/stat`` and the table of the project's performance targets (figure, baseline,
ratio, target, met or not).

The points (all on the null service, closed-loop clients; ``C`` is ``--clients``, 32 by default):

* the replicated cluster with ``memory`` storage and the unreplicated server: 0/0 read-write at C
  clients and at 1 client, 0/0 read-only at 1 client, 4/0 and 0/4 read-write at C clients;
* the replicated cluster with ``durable`` storage: 0/0 read-write at C clients.

CPU per operation of a point: the user and system CPU time of every process of the system
(each replica or the unreplicated server, and the client process or processes) between two
samples inside the measured window, divided by the operations the clients completed between
the same two samples; and how long their main threads waited for a CPU while runnable (the
scheduler's run-queue wait, ``/proc/<pid>/schedstat``), per operation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

# (key, op, read-only, clients: None = --clients)
PointSpec = tuple[str, str, bool, Optional[int]]
MEMORY_POINTS: tuple[PointSpec, ...] = (
    ("0/0 rw", "0/0", False, None),
    ("0/0 rw 1", "0/0", False, 1),
    ("0/0 ro 1", "0/0", True, 1),
    ("4/0 rw", "4/0", False, None),
    ("0/4 rw", "0/4", False, None),
)
DURABLE_POINTS: tuple[PointSpec, ...] = (("0/0 rw", "0/0", False, None),)

CPU_TARGET_US = 140.0


@dataclass(frozen=True)
class Target:
    """One row of the table: ``figure`` of the system measured against ``baseline``; the target
    applies to their ratio (``on="ratio"``) or to the figure itself (``on="value"``)."""
    key: str
    measure: str
    figure: str    # "ops_per_s", "p50_ms" or "cpu_us_per_op"
    system: str    # (phase, point key) of the figure
    baseline: str  # (phase, point key) of the baseline
    op: str        # ">=" or "<="
    bound: float
    on: str = "ratio"


def targets(clients: int) -> list[Target]:
    c = f"{clients} client{'s' if clients != 1 else ''}"
    return [
        Target("rw", f"0/0 rw, {c}, memory: throughput", "ops_per_s",
               "memory:0/0 rw", "unreplicated:0/0 rw", ">=", 0.50),
        Target("durable", f"0/0 rw, {c}: durable / memory throughput", "ops_per_s",
               "durable:0/0 rw", "memory:0/0 rw", ">=", 0.80),
        Target("rw1", "0/0 rw, 1 client: p50 latency", "p50_ms",
               "memory:0/0 rw 1", "unreplicated:0/0 rw 1", "<=", 3.0),
        Target("ro1", "0/0 ro, 1 client: p50 latency", "p50_ms",
               "memory:0/0 ro 1", "unreplicated:0/0 ro 1", "<=", 1.3),
        Target("4/0", f"4/0 rw, {c}: throughput", "ops_per_s",
               "memory:4/0 rw", "unreplicated:4/0 rw", ">=", 0.45),
        Target("0/4", f"0/4 rw, {c}: throughput", "ops_per_s",
               "memory:0/4 rw", "unreplicated:0/4 rw", ">=", 0.45),
        Target("cpu", f"0/0 rw, {c}: CPU per operation, all processes",
               "cpu_us_per_op", "memory:0/0 rw", "unreplicated:0/0 rw", "<=", CPU_TARGET_US, on="value"),
    ]


def _figure(points: Mapping[str, dict], where: str, figure: str) -> Optional[float]:
    p = points.get(where)
    if p is None:
        return None
    if figure == "cpu_us_per_op":
        cpu = p.get("cpu")
        return None if cpu is None else cpu.get("all_us_per_op")
    v = p.get(figure)
    return None if v is None else float(v)


def met(value: Optional[float], op: str, bound: float) -> Optional[bool]:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def build_rows(points: Mapping[str, dict], clients: int) -> list[dict]:
    """The table: one row per target, from ``points`` ({"phase:key": a point's summary, with its
    "cpu" if measured}). A figure that is missing (a point not measured) leaves the row's ratio and
    ``met`` None."""
    rows = []
    for t in targets(clients):
        fig = _figure(points, t.system, t.figure)
        base = _figure(points, t.baseline, t.figure)
        ratio = round(fig / base, 4) if fig is not None and base else None
        rows.append({"key": t.key, "measure": t.measure, "figure": t.figure, "system": t.system,
                     "baseline_of": t.baseline, "replicated": fig, "baseline": base, "ratio": ratio,
                     "target": f"{t.op} {t.bound:g}", "target_on": t.on,
                     "met": met(ratio if t.on == "ratio" else fig, t.op, t.bound)})
    return rows


# ---- CPU time ----------------------------------------------------------------------------------

# pid -> (CPU seconds so far, seconds its main thread waited for a CPU so far or None)
CpuReader = Callable[[int], tuple[float, Optional[float]]]


def proc_cpu_s(pid: int, root: str = "/proc") -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (``/proc/<pid>/stat``,
    fields 14 and 15). OSError if it does not exist; ValueError if the file is not as Linux writes it."""
    with open(f"{root}/{pid}/stat") as f:
        text = f.read()
    # (the command name, field 2, is in parentheses and may itself hold spaces and parentheses)
    fields = text.rsplit(")", 1)[1].split()
    if len(fields) < 13:
        raise ValueError(f"{root}/{pid}/stat: {len(fields) + 2} fields")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_wait_s(pid: int, root: str = "/proc") -> Optional[float]:
    """Seconds the main thread of ``pid`` spent runnable but waiting for a CPU so far
    (``/proc/<pid>/schedstat``, its second field, in ns); None where the kernel does not keep it."""
    try:
        with open(f"{root}/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


NATIVE_LIB = "pbft_native__mypyc"


def runs_native(pid: int, root: str = "/proc") -> Optional[bool]:
    """Whether process ``pid`` has mapped the compiled modules' library (``make native``), from
    ``/proc/<pid>/maps``; None if that cannot be read."""
    try:
        with open(f"{root}/{pid}/maps") as f:
            return NATIVE_LIB in f.read()
    except OSError:
        return None


def proc_times(pid: int, root: str = "/proc") -> tuple[float, Optional[float]]:
    return proc_cpu_s(pid, root), proc_wait_s(pid, root)


class CpuMeter:
    """CPU seconds of a set of processes, each of a kind ("primary", "backup", "server", "client"),
    sampled at the two ends of a window."""

    def __init__(self, kinds: Mapping[int, str], reader: CpuReader = proc_times):
        self.kinds = dict(kinds)
        self.reader = reader

    def sample(self) -> dict[int, tuple[float, Optional[float]]]:
        out = {}
        for pid in self.kinds:
            try:
                out[pid] = self.reader(pid)
            except (OSError, ValueError):
                pass  # (gone: left out of the window's sums, and counted as missing)
        return out


def cpu_per_op(kinds: Mapping[int, str], before: Mapping[int, tuple[float, Optional[float]]],
               after: Mapping[int, tuple[float, Optional[float]]], ops: float, seconds: float) -> Optional[dict]:
    """CPU per operation over a window of ``seconds`` in which ``ops`` operations completed: all
    processes and per kind (µs). A kind with several processes gives their sum
    (``<kind>_us_per_op``) and, for backups, the average per process (``backup_avg_us_per_op``).
    ``wait_us_per_op``: how long the processes' main threads waited for a CPU while runnable, per
    operation, all together (a machine shared with other work shows there). None when no
    operation completed or the window is empty."""
    if ops <= 0 or seconds <= 0:
        return None
    per_kind: dict[str, float] = {}
    count: dict[str, int] = {}
    missing = 0
    wait: Optional[float] = 0.0
    for pid, kind in kinds.items():
        if pid not in before or pid not in after:
            missing += 1
            continue
        (c0, w0), (c1, w1) = before[pid], after[pid]
        per_kind[kind] = per_kind.get(kind, 0.0) + max(0.0, c1 - c0)
        count[kind] = count.get(kind, 0) + 1
        if wait is not None and w0 is not None and w1 is not None:
            wait += max(0.0, w1 - w0)
        else:
            wait = None
    total = sum(per_kind.values())
    out: dict = {"ops": round(ops, 1), "window_s": round(seconds, 3), "cpu_s": round(total, 3),
                 "cores_busy": round(total / seconds, 3), "all_us_per_op": round(total / ops * 1e6, 1),
                 "wait_us_per_op": None if wait is None else round(wait / ops * 1e6, 1),
                 "processes": dict(count), "missing": missing}
    for kind, cpu in sorted(per_kind.items()):
        out[f"{kind}_us_per_op"] = round(cpu / ops * 1e6, 1)
    if count.get("backup"):
        out["backup_avg_us_per_op"] = round(per_kind["backup"] / count["backup"] / ops * 1e6, 1)
    return out
