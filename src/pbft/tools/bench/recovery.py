"""``pbft bench-recovery``: what proactive recovery costs, on a live local cluster.

    pbft bench-recovery [--keys 1000,10000,100000] [--value-bytes 1024] [--clients 8]
                        [--quiet-s 5] [--storage durable] [--floor 0.8] [--json]

For each state size (a number of keys of ``--value-bytes`` bytes each):

1. a fresh cluster of the key-value service (``--replicas``, default 4) on loopback ports, its
   own watchdog off (the bench makes the turns);
2. the state is loaded through the protocol (puts from every client identity);
3. ``--clients`` closed-loop writers start, each rewriting its own share of the keys (so that the
   last acknowledged value of every key is known) and never stop until the end;
4. a quiet window of ``--quiet-s`` seconds, then every replica recovers in turn, in the
   watchdog's order (replica n-1 first, replica 0 last: ``runtime.cluster.recovery_phase_s``),
   each followed by another quiet window. A recovery is SIGUSR1 to the replica's process, what
   ``pbft recover`` and the watchdog do (reboot from disk, new keys, estimation, recovery
   request, check of every object, fetch of what differs); it has ended when the new process
   reports no recovery under way and one completed;
5. the writers stop; every key the writers wrote is read back and compared with its last
   acknowledged value, and the replicas' stable checkpoints must agree.

Throughput *during recoveries* is the writers' operations completed while some replica was
recovering, divided by the time recoveries took; *normal* is the same in the quiet windows. Their
ratio is compared with ``--floor`` (PASS/FAIL). Also printed: each recovery's time (trigger to
end, the reboot included), the protocol part the replica reports, what it fetched, and the
throughput averaged over a whole default recovery period (``default_period_s``: what recovery
costs a cluster that runs it continuously). The cluster's first primary recovers last: a
recovering primary costs a view change (it hands its view to the next replica at once, without
waiting for a timeout: ``docs/recovery.md``).

Results are only as quiet as the machine: the load average before each size is reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import ConfigError
from ..procs import Procs, sigterm_as_interrupt
from .load import READY_TIMEOUT_S

INVOKE_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 300.0


def add_bench_recovery_command(sub) -> None:
    b = sub.add_parser("bench-recovery", help="the cost of proactive recovery on a local cluster",
                       description="Start a local cluster of the key-value service, load a state, run closed-loop "
                                   "writers and make every replica recover in turn; print the throughput during "
                                   "recoveries as a fraction of normal and the recovery time, for each state size.")
    b.add_argument("--keys", default="1000,10000,100000", help="state sizes in keys, comma-separated "
                   "(default 1000,10000,100000)")
    b.add_argument("--value-bytes", type=int, default=1024, help="bytes per value (default 1024)")
    b.add_argument("--replicas", type=int, default=4, help="replicas (default 4)")
    b.add_argument("--clients", type=int, default=8, help="closed-loop writers (default 8)")
    b.add_argument("--quiet-s", type=float, default=5.0,
                   help="seconds of normal operation before the first recovery and after each (default 5)")
    b.add_argument("--storage", choices=["durable", "fast"], default="durable",
                   help="the replicas' storage mode (default durable)")
    b.add_argument("--floor", type=float, default=0.8,
                   help="the least throughput during recoveries, as a fraction of normal, that passes (default 0.8)")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")
    b.add_argument("--keep", action="store_true", help="keep the cluster directories and the replicas' logs")
    b.add_argument("--timeline", metavar="FILE.json", default=None,
                   help="write the writers' completion times and the recovery windows (seconds) to FILE.json")
    b.set_defaults(func=cmd_bench_recovery)


def _note(msg: str) -> None:
    print(f"bench-recovery: {msg}", file=sys.stderr, flush=True)


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class RecoveryBench:
    def __init__(self, args, workdir: Path):
        self.a = args
        self.workdir = workdir
        self.children = Procs(workdir)

    # ---- one state size --------------------------------------------------------------
    def run_size(self, n_keys: int) -> dict:
        from ...runtime.cluster import free_port_range, init_cluster
        from ..net import fetch_status

        a = self.a
        d = self.workdir / f"keys-{n_keys}"
        base = free_port_range(2 * a.replicas)
        load_before = _loadavg()
        cluster = init_cluster(d, a.replicas, None, ["127.0.0.1"], base, max(a.clients, 16),
                               metrics_base_port=base + a.replicas, force=True, storage={"mode": a.storage},
                               recovery={"period_s": 0.0})
        procs = [self.children.start_replica(d, i, "kv", name=f"{d.name}-replica-{i}") for i in range(a.replicas)]

        def connected() -> bool:
            return all(len(fetch_status(r.metrics_addr, r.metrics_port, 1.0)["peers_connected"]) == cluster.n - 1
                       for r in cluster.replicas)

        try:
            self.children.wait_ready(connected, READY_TIMEOUT_S, "the replicas did not connect to each other", procs)
            run: Callable[..., Any]
            try:
                import uvloop
                run = uvloop.run
            except ImportError:  # pragma: no cover - uvloop is a dependency
                run = asyncio.run
            out = run(self._drive(cluster, n_keys, procs))
        finally:
            self.children.stop(procs)
        out.update(keys=n_keys, value_bytes=a.value_bytes, state_bytes=n_keys * a.value_bytes,
                   load_average_before=load_before, load_average_after=_loadavg())
        return out

    def _status(self, cluster, i: int, timeout: float = 1.0) -> dict:
        from ..net import fetch_status

        r = cluster.replicas[i]
        return fetch_status(r.metrics_addr, r.metrics_port, timeout)

    async def _drive(self, cluster, n_keys: int, procs) -> dict:
        from ...runtime.client import ClientPool, PbftError
        from ...services.kv import encode_op, unwrap_result

        a = self.a
        loop = asyncio.get_running_loop()
        ids = cluster.client_ids
        writers = ids[: a.clients]
        pool = ClientPool(cluster, [cluster.identity(p) for p in ids])
        await pool.start(wait_s=READY_TIMEOUT_S)
        rng = random.Random(n_keys)
        value = rng.randbytes(a.value_bytes)
        key = [b"key-%08d" % k for k in range(n_keys)]

        # 1. the state, through the protocol
        t0 = time.monotonic()

        async def load(j: int, p: int) -> None:
            for k in range(j, n_keys, len(ids)):
                unwrap_result(await pool.invoke(p, encode_op("put", key[k], value), timeout=INVOKE_TIMEOUT_S))

        await asyncio.gather(*(load(j, p) for j, p in enumerate(ids)))
        load_s = time.monotonic() - t0
        _note(f"{n_keys} keys loaded in {load_s:.1f} s")

        # 2. the writers: writer w owns the keys k = w mod clients, so the last value acknowledged
        # for each key is known
        done: list[float] = []
        errors = [0]
        acked: dict[bytes, bytes] = {}
        stop = asyncio.Event()

        async def writer(w: int, p: int) -> None:
            mine = range(w, n_keys, a.clients)
            r = random.Random(w)
            seq = 0
            while not stop.is_set():
                k = key[mine[r.randrange(len(mine))]] if mine else key[0]
                v = b"%d-%d-" % (p, seq) + value[: max(0, a.value_bytes - 24)]
                seq += 1
                try:
                    unwrap_result(await pool.invoke(p, encode_op("put", k, v), timeout=INVOKE_TIMEOUT_S))
                except PbftError:
                    errors[0] += 1
                    continue
                acked[k] = v
                done.append(time.monotonic())

        tasks = [asyncio.ensure_future(writer(w, p)) for w, p in enumerate(writers)]
        await asyncio.sleep(1.0)  # warm-up
        quiet: list[tuple[float, float]] = []
        recoveries: list[dict[str, Any]] = []
        order = sorted(range(cluster.n), key=lambda i: -i)  # the watchdog's order: n-1 first
        try:
            for i in order:
                t_q = time.monotonic()
                await asyncio.sleep(a.quiet_s)
                quiet.append((t_q, time.monotonic()))
                self.children.check_alive(procs)
                recoveries.append(await loop.run_in_executor(None, self._recover, cluster, i))
                _note(f"replica {i} recovered in {recoveries[-1]['recovery_s']:.2f} s")
            t_q = time.monotonic()
            await asyncio.sleep(a.quiet_s)
            quiet.append((t_q, time.monotonic()))
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        if a.timeline:
            t_base = done[0] if done else 0.0
            with open(f"{a.timeline}.{n_keys}", "w") as fh:
                json.dump({"done": [round(t - t_base, 4) for t in done],
                           "recoveries": [(r["replica"], round(r["t0"] - t_base, 4), round(r["t1"] - t_base, 4))
                                          for r in recoveries]}, fh)

        def ops_in(t_a: float, t_b: float) -> int:
            return sum(1 for t in done if t_a <= t < t_b)

        normal_s = sum(b - a_ for a_, b in quiet)
        normal = sum(ops_in(a_, b) for a_, b in quiet) / normal_s
        def rate(rs: list[dict]) -> Optional[float]:
            t = sum(r["recovery_s"] for r in rs)
            return sum(ops_in(r["t0"], r["t1"]) for r in rs) / t if t else None

        rec_s = sum(r["recovery_s"] for r in recoveries)
        during = rate(recoveries) or 0.0
        backups = rate([r for r in recoveries if not r["was_primary"]])
        primary = rate([r for r in recoveries if r["was_primary"]])
        for r in recoveries:
            r["ops_s"] = round(ops_in(r["t0"], r["t1"]) / max(1e-9, r["recovery_s"]), 1)
            r["fraction"] = round(r["ops_s"] / normal, 3) if normal else 0.0

        # 3. correctness: every key written reads back its last acknowledged value, and the
        # replicas agree on their stable checkpoint
        wrong = [0]
        written = sorted(acked)

        async def check(j: int, p: int) -> None:
            for k in written[j::len(ids)]:
                got = unwrap_result(await pool.invoke(p, encode_op("get", k), read_only=True,
                                                      timeout=INVOKE_TIMEOUT_S))
                wrong[0] += got != acked[k]

        await asyncio.gather(*(check(j, p) for j, p in enumerate(ids)))
        agree = await loop.run_in_executor(None, self._checkpoints_agree, cluster)
        await pool.close()
        from ...runtime.cluster import default_period_s

        period = default_period_s(cluster.n)
        lost = sum(max(0.0, normal - r["ops_s"]) * r["recovery_s"] for r in recoveries) / cluster.n
        return {
            "load_s": round(load_s, 2),
            "normal_ops_s": round(normal, 1),
            "during_recovery_ops_s": round(during, 1),
            "fraction": round(during / normal, 3) if normal else 0.0,
            # the same for the backups' recoveries alone, and for the primary's (a view change)
            "fraction_backups": round(backups / normal, 3) if normal and backups is not None else None,
            "fraction_primary": round(primary / normal, 3) if normal and primary is not None else None,
            "floor": a.floor,
            "pass": bool(normal) and during / normal >= a.floor,
            "recoveries": [{k: v for k, v in r.items() if k not in ("t0", "t1")} for r in recoveries],
            "recovery_s_mean": round(rec_s / len(recoveries), 3),
            "recovery_s_max": round(max(r["recovery_s"] for r in recoveries), 3),
            # averaged over a default period, in which each replica recovers once: the operations a
            # recovery loses (against normal), per recovery on average, spread over period/n
            "default_period_s": period,
            "fraction_over_default_period": round(1.0 - lost / (normal * period / cluster.n), 4) if normal else 0.0,
            "writes_checked": len(acked),
            "writes_wrong": wrong[0],
            "write_errors": errors[0],
            "checkpoints_agree": agree,
        }

    def _recover(self, cluster, i: int) -> dict:
        """Make replica ``i`` recover (SIGUSR1, as ``pbft recover``) and wait until it has."""
        st = self._status(cluster, i)
        pid = int(st["pid"])
        view0 = max(self._view(cluster, j) for j in range(cluster.n) if j != i)
        primary = st["primary"] == i
        t0 = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        deadline = t0 + RECOVERY_TIMEOUT_S
        while True:
            time.sleep(0.02)
            now = time.monotonic()
            try:
                s = self._status(cluster, i, 0.5)
                # the new process (uptime shorter than the time since the trigger) has recovered
                if s["uptime_s"] < now - t0 + 0.5 and s["recovering"] is None and s["recoveries"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if now > deadline:
                raise ConfigError(f"replica {i} did not recover within {RECOVERY_TIMEOUT_S:g} s "
                                  f"(logs in {self.workdir})")
        t1 = time.monotonic()
        view1 = max(self._view(cluster, j) for j in range(cluster.n) if j != i)
        return {"replica": i, "was_primary": primary, "view_changes": view1 - view0, "t0": t0, "t1": t1,
                "recovery_s": round(t1 - t0, 3), "protocol_s": s["last_recovery_s"],
                "fetched_objects": s["state_transfer"]["objects"], "fetched_bytes": s["state_transfer"]["bytes"]}

    def _view(self, cluster, j: int) -> int:
        try:
            return int(self._status(cluster, j)["view"])
        except (OSError, ValueError, KeyError):
            return 0

    def _checkpoints_agree(self, cluster) -> bool:
        """Whether every replica reaches the same stable checkpoint with the same digest (the
        writers have stopped: the last checkpoints come within a few seconds, or never if the last
        interval is not full, in which case replicas at the same checkpoint must agree)."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                rows = [self._status(cluster, j) for j in range(cluster.n)]
            except (OSError, ValueError):
                rows = []
            if rows:
                by_seq: dict[int, set] = {}
                for s in rows:
                    by_seq.setdefault(s["stable_checkpoint"], set()).add(s["stable_digest"])
                if any(len(d) > 1 for d in by_seq.values()):
                    return False
                if len(by_seq) == 1 or time.monotonic() > deadline:
                    return True
            elif time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _sizes(spec: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--keys takes numbers of keys separated by commas, got {spec!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--keys: every size must be at least 1 key, got {spec!r}")
    return sizes


def _check_args(a) -> list[int]:
    from ...services.kv import VALUE_SIZE_MAX

    sizes = _sizes(a.keys)
    if a.replicas < 4:
        raise ConfigError(f"--replicas must be at least 4 (a recovering replica counts as faulty), got {a.replicas}")
    if a.clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {a.clients}")
    if not 24 <= a.value_bytes <= VALUE_SIZE_MAX:
        raise ConfigError(f"--value-bytes must be between 24 and {VALUE_SIZE_MAX}, got {a.value_bytes}")
    if not 0.5 <= a.quiet_s <= 3600:
        raise ConfigError(f"--quiet-s must be between 0.5 and 3600 seconds, got {a.quiet_s:g}")
    if not 0 <= a.floor <= 1:
        raise ConfigError(f"--floor is a fraction between 0 and 1, got {a.floor:g}")
    return sizes


def print_recovery_report(res: dict) -> None:
    print(f"proactive recovery, {res['replicas']} replicas, {res['clients']} closed-loop writers, "
          f"{res['storage']} storage, values of {res['value_bytes']} bytes")
    print(f"{'keys':>8} {'state':>9} {'normal':>9} {'during':>9} {'fraction':>8} {'':4} {'recovery mean':>13} "
          f"{'max':>7} {'over a period':>13}")
    for r in res["sizes"]:
        mb = r["state_bytes"] / 1e6
        print(f"{r['keys']:>8} {mb:>7.1f}MB {r['normal_ops_s']:>7.0f}/s {r['during_recovery_ops_s']:>7.0f}/s "
              f"{r['fraction']:>8.2f} {'PASS' if r['pass'] else 'FAIL':4} {r['recovery_s_mean']:>11.2f} s "
              f"{r['recovery_s_max']:>5.2f} s {r['fraction_over_default_period']:>13.3f}")
        for x in r["recoveries"]:
            print(f"{'':8}   replica {x['replica']}{' (primary)' if x['was_primary'] else '':10} "
                  f"{x['recovery_s']:6.2f} s (protocol {x['protocol_s']} s), fetched {x['fetched_objects']} objects "
                  f"/ {x['fetched_bytes'] / 1e3:.0f} KB, {x['ops_s']:.0f} ops/s ({x['fraction']:.2f}), "
                  f"{x['view_changes']} view change(s)")
        parts = [f"{name} {r[k]:.2f}" for name, k in (("backups", "fraction_backups"), ("primary", "fraction_primary"))
                 if r[k] is not None]
        print(f"{'':8}   during recoveries / normal: {', '.join(parts)}")
        checks = "correct" if not r["writes_wrong"] and r["checkpoints_agree"] else "WRONG"
        print(f"{'':8}   {r['writes_checked']} keys read back: {checks} ({r['writes_wrong']} wrong, checkpoints "
              f"{'agree' if r['checkpoints_agree'] else 'DISAGREE'}); load average {r['load_average_before']} "
              f"before, {r['load_average_after']} after")
    print(f"floor {res['floor']:.2f} (throughput during recoveries / normal): {'PASS' if res['pass'] else 'FAIL'}; "
          f"'over a period': the throughput averaged over the default period ({res['default_period_s']:g} s), "
          f"each replica recovering once")


def cmd_bench_recovery(args) -> int:
    sizes = _check_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="pbft-bench-recovery-"))
    old_term = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    bench = RecoveryBench(args, workdir)
    keep = True
    try:
        rows = []
        for n_keys in sizes:
            _note(f"{n_keys} keys: starting {args.replicas} replicas (load average {_loadavg()})")
            rows.append(bench.run_size(n_keys))
        keep = args.keep
    except KeyboardInterrupt:
        keep = args.keep
        print("pbft bench-recovery: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        raise ConfigError(f"bench-recovery: {e}" if str(workdir) in str(e) else
                          f"bench-recovery: {e} (logs in {workdir})") from None
    finally:
        bench.children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    from ...runtime.cluster import default_period_s

    correct = all(not r["writes_wrong"] and r["checkpoints_agree"] for r in rows)
    res = {"replicas": args.replicas, "clients": args.clients, "storage": args.storage,
           "value_bytes": args.value_bytes, "quiet_s": args.quiet_s, "floor": args.floor,
           "default_period_s": default_period_s(args.replicas),
           "pass": all(r["pass"] for r in rows), "correct": correct, "sizes": rows}
    if args.keep:
        res["workdir"] = str(workdir)
    if args.json:
        print(json.dumps(res))
    else:
        print_recovery_report(res)
    return 0 if correct else 1
