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
