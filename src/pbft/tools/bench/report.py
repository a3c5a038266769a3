"""``pbft bench``'s output: the progress line on stderr, the table of a run and the
latency-vs-throughput plot."""

from __future__ import annotations

import sys
from typing import Optional


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
            print(f"pbft bench: {label}: {s['ops_per_s']:,.0f} ops/s, p50 {fmt(s['p50_ms'])} ms, "
                  f"p99 {fmt(s['p99_ms'])} ms", file=sys.stderr, flush=True)


def fmt(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"

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
        return (f"{s['ops_per_s']:>10,.0f} " + " ".join(f"{fmt(s[k]):>8}" for k in cols[1:])
                + (f"  ({s['errors']} timed out)" if s.get("errors") else ""))

    def rrow(r: dict) -> str:
        return " ".join(f"{fmt(r[k], 3 if k == 'ops_per_s' else 2):>{10 if k == 'ops_per_s' else 8}}" for k in cols)

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


def _fig(x, figure: str) -> str:
    if x is None:
        return "-"
    if figure == "ops_per_s":
        return f"{x:,.0f} ops/s"
    if figure == "p50_ms":
        return f"{x:.3f} ms"
    return f"{x:,.1f} µs"


def _cpu_line(cpu: Optional[dict]) -> str:
    if not cpu:
        return "not sampled"
    parts = []
    if "primary_us_per_op" in cpu:
        parts.append(f"primary {cpu['primary_us_per_op']:,.1f}")
    if "backup_avg_us_per_op" in cpu:
        parts.append(f"backups {cpu['backup_avg_us_per_op']:,.1f} each ({cpu.get('processes', {}).get('backup', 0)})")
    if "server_us_per_op" in cpu:
        parts.append(f"server {cpu['server_us_per_op']:,.1f}")
    if "client_us_per_op" in cpu:
        n = cpu.get("processes", {}).get("client", 0)
        parts.append(f"client{'s' if n != 1 else ''} {cpu['client_us_per_op']:,.1f}")
    missing = f"; {cpu['missing']} process(es) not sampled" if cpu.get("missing") else ""
    busy = f" ({cpu['cores_busy']:.2f} cores busy over {cpu['window_s']:g} s)" if "cores_busy" in cpu else ""
    if cpu.get("wait_us_per_op") is not None:
        busy += f"; waited for a CPU {cpu['wait_us_per_op']:,.1f} µs/op"
    head = ", ".join(parts)
    return f"{head + '; ' if head else ''}all {cpu['all_us_per_op']:,.1f} µs/op{busy}{missing}"


def print_targets(res: dict) -> None:
    """``pbft bench --report``: the targets' table, CPU per operation by process and every point."""
    reps = f"{res['replicas']} replica{'s' if res['replicas'] != 1 else ''}"
    print(f"pbft bench --report: {reps} (f={res['faults']}) vs unreplicated, null service, loopback; "
          f"{res['duration_s']:g} s measured after {res['warmup_s']:g} s warm-up per point, "
          f"clients in {res['client_procs']} process(es)")
    la = res.get("load_average")
    if la:
        print(f"load average (1, 5, 15 min) before {' '.join(f'{x:g}' for x in la['before'])}, "
              f"after {' '.join(f'{x:g}' for x in la['after'])}")
    nat = res.get("native")
    if nat:
        if all(v is True for v in nat.values()):
            print("compiled modules: in use by every process")
        else:
            print("compiled modules: NOT in use by every process of "
                  + ", ".join(k for k, v in nat.items() if v is not True)
                  + " (pure modules: slower; make native, pbft native)")
    rows = res["report"]
    w = max(len(r["measure"]) for r in rows)
    print(f"{'measure':<{w}}  {'figure':>14}  {'baseline':>14}  {'ratio':>7}  {'target':>14}  met")
    for r in rows:
        on = "" if r["target_on"] == "ratio" else " µs"
        verdict = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['measure']:<{w}}  {_fig(r['replicated'], r['figure']):>14}  {_fig(r['baseline'], r['figure']):>14}"
              f"  {fmt(r['ratio'], 2):>7}  {r['target'] + on:>14}  {verdict}")
    met = [r["met"] for r in rows if r["met"] is not None]
    print(f"targets met: {sum(met)} of {len(rows)}.  figure: the replicated cluster (durable storage in the durable "
          f"row); baseline: the unreplicated server (the memory-storage cluster in the durable row); ratio: "
          f"figure / baseline; the CPU target applies to the figure itself")
    pts = res["points"]
    print()
    print("CPU per operation by process (µs), 0/0 rw:")
    for key, name in (("memory", "replicated, memory"), ("durable", "replicated, durable"),
                      ("unreplicated", "unreplicated")):
        p = pts.get(f"{key}:0/0 rw")
        if p is not None:
            print(f"  {name + ',':21} {p['clients']:>3} clients: {_cpu_line(p.get('cpu'))}")
    print()
    print(f"{'point':<34} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'µs/op':>8}")
    for key, p in pts.items():
        phase = key.partition(":")[0]
        name = (f"{'replicated ' + phase if phase != 'unreplicated' else phase} {p['op']} "
                f"{'ro' if p['read_only'] else 'rw'}, {p['clients']} client{'s' if p['clients'] != 1 else ''}")
        cpu = p.get("cpu")
        print(f"{name:<34} {p['ops_per_s']:>10,.0f} {fmt(p['p50_ms']):>8} {fmt(p['p99_ms']):>8} "
              f"{fmt(cpu['all_us_per_op'] if cpu else None, 1):>8}"
              + (f"  ({p['errors']} timed out)" if p.get("errors") else ""))
