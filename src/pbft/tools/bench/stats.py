"""``pbft bench``'s arithmetic: the ``--op`` argument, client counts of a sweep, nearest-rank
percentiles, the summary of one measured point and the replicated/unreplicated ratios."""

from __future__ import annotations

import math

from ...config import ConfigError

KB = 1024
OP_KB_MAX = 32


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
