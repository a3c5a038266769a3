#!/usr/bin/env python3
"""Per-MAC cost of the candidate MAC constructions, and of pbft's authenticators and codec.

Measures, with ``timeit`` (several repetitions, the *minimum* per-op time is
reported, since everything above it is interference from the rest of the
machine):

* HMAC-SHA256 (``hmac.digest``), HMAC-SHA256 truncated to 16 bytes, keyed
  BLAKE2b-128 and keyed BLAKE2s-128, on inputs of 32, 64, 256, 1024 and 4096
  bytes;
* a full authenticator (``pbft.crypto.KeyRing.authenticator``) and one
  ``KeyRing.verify`` for n=4 and n=7 replicas;
* ``pbft.codec.seal`` + ``Codec.open_frame`` + ``Codec.parse`` of a Prepare and
  of a Request with a 0- and a 4096-byte operation.

Usage (from the repository root)::

    python benchmarks/mac_bench.py          # readable table
    python benchmarks/mac_bench.py --json   # one JSON object

Standard library only (plus ``pbft`` itself and its msgpack dependency).
Runs in well under 20 seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import sys
import time
import timeit

try:
    import pbft  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from pbft import codec as pcodec  # noqa: E402
from pbft.config import ClusterConfig  # noqa: E402
from pbft.crypto import KeyRing, keyrings_for  # noqa: E402, F401
from pbft.messages import Prepare, Request  # noqa: E402

SIZES = (32, 64, 256, 1024, 4096)
MASTER = b"k" * 32
KEY = bytes(range(32))

# name -> (statement, extra globals); ``m`` is the input and ``k`` the 32-byte key.
MACS = {
    "HMAC-SHA256": "hd(k, m, 'sha256')",
    "HMAC-SHA256/16": "hd(k, m, 'sha256')[:16]",
    "BLAKE2b-128": "b2b(m, key=k, digest_size=16).digest()",
    "BLAKE2s-128": "b2s(m, key=k, digest_size=16).digest()",
}
MAC_GLOBALS = {"hd": hmac.digest, "b2b": hashlib.blake2b, "b2s": hashlib.blake2s, "k": KEY}


def measure(stmt: str, env: dict, repeat: int, target_s: float) -> float:
    """Minimum seconds per execution of ``stmt`` over ``repeat`` runs of ~``target_s`` each."""
    t = timeit.Timer(stmt, globals=env)
    # calibrate: grow ``number`` until one run takes at least a tenth of the target
    number = 1
    while True:
        elapsed = t.timeit(number)
        if elapsed >= target_s / 10 or number >= 1 << 24:
            break
        number *= 10 if elapsed < target_s / 100 else 2
    number = max(1, int(number * target_s / max(elapsed, 1e-9)))
    return min(t.repeat(repeat=repeat, number=number)) / number


def run(repeat: int, target_s: float) -> dict:
    us = 1e6
    res: dict = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "repeat": repeat,
        "unit": "us_per_op",
    }

    # -- raw MACs --------------------------------------------------------------
    macs: dict[str, dict[str, float]] = {name: {} for name in MACS}
    for size in SIZES:
        env = dict(MAC_GLOBALS, m=os.urandom(size))
        for name, stmt in MACS.items():
            macs[name][str(size)] = measure(stmt, env, repeat, target_s) * us
    res["mac"] = macs
    res["ratio_hmac_sha256_over_blake2b"] = {
        s: macs["HMAC-SHA256"][s] / macs["BLAKE2b-128"][s] for s in macs["HMAC-SHA256"]
    }

    # -- authenticators ------------------------------------------------------------
    auth: dict[str, dict[str, float]] = {}
    d = hashlib.blake2b(b"some frame", digest_size=32).digest()
    for n in (4, 7):
        cfg = ClusterConfig.create(n, clients_max=2)
        rings = keyrings_for(MASTER, n, cfg.client_ids)
        a = rings[0].authenticator(d)
        single = rings[0].mac_for(1, d)
        assert rings[1].verify(0, d, a, True) and rings[1].verify(0, d, single, False)
        env = {"r0": rings[0], "r1": rings[1], "rc": rings[n], "d": d, "a": a, "s": single}
        auth[f"n={n}"] = {
            "authenticator (replica, n-1 MACs)": measure("r0.authenticator(d)", env, repeat, target_s) * us,
            "authenticator (client, n MACs)": measure("rc.authenticator(d)", env, repeat, target_s) * us,
            "verify (authenticator entry)": measure("r1.verify(0, d, a, True)", env, repeat, target_s) * us,
            "verify (single MAC)": measure("r1.verify(0, d, s, False)", env, repeat, target_s) * us,
        }
    res["authenticator"] = auth

    # -- codec ---------------------------------------------------------------------
    cfg = ClusterConfig.create(4)
    rings = keyrings_for(MASTER, 4, cfg.client_ids)
    c = pcodec.Codec(cfg)
    client = cfg.n
    msgs = {
        "Prepare": (Prepare(7, 12345, d, 1), rings[1]),
        "Request op=0B": (Request(client, 1_700_000_000_000, b"", False, 0), rings[client]),
        "Request op=4096B": (Request(client, 1_700_000_000_000, os.urandom(4096), False, 0), rings[client]),
    }
    cod: dict[str, float] = {}
    for name, (msg, ring) in msgs.items():
        assert c.parse(c.open_frame(pcodec.seal(msg, ring))) == msg
        env = {"seal": pcodec.seal, "c": c, "msg": msg, "ring": ring}
        cod[name] = measure("c.parse(c.open_frame(seal(msg, ring)))", env, repeat, target_s) * us
    res["codec_seal_open_parse"] = cod

    # -- conclusion -------------------------------------------------------------------
    # pbft MACs always cover a 32-byte frame digest, so the 32-byte column decides.
    r = res["ratio_hmac_sha256_over_blake2b"]
    fastest = {s: min(MACS, key=lambda name: macs[name][s]) for s in macs["HMAC-SHA256"]}
    overall = min(MACS, key=lambda name: sum(macs[name].values()))
    h32, b32 = macs["HMAC-SHA256"]["32"], macs["BLAKE2b-128"]["32"]
    winner, loser = ("keyed BLAKE2b-128", "HMAC-SHA256") if b32 < h32 else ("HMAC-SHA256", "keyed BLAKE2b-128")
    head = (
        f"{winner} is the faster MAC for pbft's 32-byte frame digests "
        f"({min(b32, h32):.2f} us vs {max(b32, h32):.2f} us for {loser}, {max(r['32'], 1 / r['32']):.2f}x)"
    )
    crossover = [s for s in r if (r[s] > 1) != (r["32"] > 1)]
    if crossover:
        head += (f"; {loser} wins from {crossover[0]} bytes up "
                 f"(HMAC/BLAKE2b {r[crossover[-1]]:.2f}x at {crossover[-1]} B)")
    if fastest["32"] not in ("BLAKE2b-128", "HMAC-SHA256"):
        head += f"; {fastest['32']} is fastest of all four at 32 bytes"
    res["fastest_mac_per_size"] = fastest
    res["fastest_mac_overall"] = overall
    res["conclusion"] = head + "."
    return res


def render(res: dict) -> str:
    out = []
    out.append(
        f"pbft MAC benchmark: {res['implementation']} {res['python']} on {res['machine']}, "
        f"{res['openssl']}; min of {res['repeat']} repetitions, microseconds per operation"
    )
    out.append("")
    macs = res["mac"]
    sizes = list(next(iter(macs.values())))
    w = max(len(n) for n in macs) + 2
    out.append("MAC".ljust(w) + "".join(f"{s + ' B':>10}" for s in sizes))
    out.append("-" * (w + 10 * len(sizes)))
    for name, row in macs.items():
        out.append(name.ljust(w) + "".join(f"{row[s]:>10.3f}" for s in sizes))
    out.append("-" * (w + 10 * len(sizes)))
    ratio = res["ratio_hmac_sha256_over_blake2b"]
    out.append("HMAC/BLAKE2b".ljust(w) + "".join(f"{ratio[s]:>9.2f}x" for s in sizes))
    out.append("")
    rows = list(next(iter(res["authenticator"].values())))
    w2 = max(len(r) for r in rows) + 2
    ns = list(res["authenticator"])
    out.append("KeyRing (32-byte digest)".ljust(w2) + "".join(f"{n:>10}" for n in ns))
    out.append("-" * (w2 + 10 * len(ns)))
    for r in rows:
        out.append(r.ljust(w2) + "".join(f"{res['authenticator'][n][r]:>10.3f}" for n in ns))
    out.append("")
    out.append("codec seal + open_frame + parse (n=4)")
    out.append("-" * (w2 + 10))
    for name, v in res["codec_seal_open_parse"].items():
        out.append(name.ljust(w2) + f"{v:>10.3f}")
    out.append("")
    out.append("Conclusion: " + res["conclusion"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--repeat", type=int, default=5, help="timeit repetitions per measurement (default 5)")
    ap.add_argument("--target-ms", type=float, default=40.0,
                    help="approximate duration of one repetition in milliseconds (default 40)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run(max(1, args.repeat), max(1e-3, args.target_ms / 1000))
    res["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(res, sort_keys=False))
    else:
        print(render(res))
        print(f"(measured in {res['elapsed_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
