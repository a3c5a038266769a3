"""The ``pbft`` command: the argument parser and the ``sim`` and ``demo`` commands.

The networked commands live in ``net``, ``bench`` and ``attack`` (each adds its
subcommands to the parser built here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import KNOWN_BUGS, ConfigError


def _faults(s: str) -> frozenset:
    """``all`` (network faults), ``all+disk`` (and storage faults), or a comma list."""
    from ..sim.simulator import ALL_FAULTS, DISK_FAULTS

    if s in ("", "none"):
        return frozenset()
    if s == "all":
        return frozenset(ALL_FAULTS)
    if s == "all+disk":
        return frozenset(ALL_FAULTS + DISK_FAULTS)
    fs = frozenset(x.strip() for x in s.split(",") if x.strip())
    known = ALL_FAULTS + DISK_FAULTS
    bad = fs - set(known)
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fault(s) {', '.join(sorted(bad))}; known: {', '.join(known)}")
    return fs


def _repro(args, seed: int) -> str:
    if args.swarm:
        return f"pbft sim --swarm --seeds 1 --first-seed {seed} --replicas {args.replicas} --verbose"
    parts = ["pbft sim --seeds 1", f"--first-seed {seed}", f"--replicas {args.replicas}"]
    if args.faults:
        parts.append("--faults " + ",".join(sorted(args.faults)))
    parts += [f"--clients {args.clients}", f"--ops {args.ops}"]
    if args.inject_bug:
        parts.append(f"--inject-bug {args.inject_bug}")
    return " ".join(parts) + " --verbose"


def cmd_list_scenarios() -> int:
    from ..sim.scenarios import PENDING, SCENARIOS

    for s in SCENARIOS:
        kind = "negative control" if s.negative else "expect"
        print(f"{s.id:6} {s.name:32} {s.description}")
        print(f"{'':6} {'':32} {kind}: {s.expect}")
    for sid, desc, needs in PENDING:
        print(f"{sid:6} {'(not yet)':32} {desc} -- needs {needs}")
    return 0


def cmd_scenario(args) -> int:
    from ..sim.scenarios import find, run_scenario

    try:
        sc = find(args.scenario)
    except KeyError:
        print(f"pbft sim: unknown scenario {args.scenario!r} (see pbft sim --list-scenarios)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def on_run(seed, sim, res):
        if args.verbose:
            for line in res.log:
                print(line)
        if not res.ok and not sc.negative and not args.json:
            print(f"FAIL seed {seed}:")
            for v in res.violations[:10]:
                print(f"  violation: {v}")
            if res.liveness_failure:
                print(f"  liveness: {res.liveness_failure}")
            print(f"  reproduce: pbft sim --scenario {sc.name} --replicas {args.replicas} --seeds 1 "
                  f"--first-seed {seed} --verbose")

    try:
        window = (300.0, float(args.measure_ms)) if args.measure_ms else (300.0, 2000.0)
        r = run_scenario(sc, args.replicas, range(args.first_seed, args.first_seed + args.seeds), on_run, window)
    except ValueError as e:
        print(f"pbft sim: {e}", file=sys.stderr)
        return 2
    out = {"scenario": sc.id, "name": sc.name, "runs": r.runs, "ops_committed": r.ops_committed,
           "view_changes": r.view_changes, "violations": r.violations, "liveness_failures": r.liveness_failures,
           "expectation_failures": len(r.expectation_failures), "ok": r.ok}
    if sc.negative:
        out["detected"] = r.detected
    if sc.floor is not None:
        out["throughput_ops_per_s"] = round(r.throughput or 0.0, 1)
        out["baseline_ops_per_s"] = round(r.baseline or 0.0, 1)
        out["throughput_vs_baseline"] = round(r.ratio or 0.0, 3)
        out["floor"] = sc.floor
    if args.json:
        out["wall_seconds"] = round(time.perf_counter() - t0, 2)
        out["expectation_details"] = r.expectation_failures[:10]
        print(json.dumps(out))
    else:
        for failure in r.expectation_failures[:10]:
            print(f"  expectation failed: {failure}")
        if sc.negative:
            print(f"negative control {sc.id}: the oracles detected the break in {r.detected} of {r.runs} runs"
                  + ("" if r.detected else " -- THE HARNESS IS BLIND TO IT"))
        print(f"(wall time {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        print(f"scenario={sc.id} runs={r.runs} ops_committed={r.ops_committed} view_changes={r.view_changes} "
              f"violations={r.violations} liveness_failures={r.liveness_failures} "
              f"expectation_failures={len(r.expectation_failures)}"
              + (f" throughput_vs_baseline={r.ratio or 0.0:.3f}" if sc.floor is not None else ""))
        if sc.floor is not None:
            print(f"  throughput {r.throughput:.0f} ops/s vs {r.baseline:.0f} ops/s fault-free (simulated CPU cost "
                  f"model); floor {sc.floor:.0%}", file=sys.stderr)
    return 0 if r.ok else 1


def cmd_sim(args) -> int:
    from ..sim.simulator import SimConfig, Simulation

    if args.list_scenarios:
        return cmd_list_scenarios()
    if args.scenario:
        return cmd_scenario(args)
    if args.swarm:
        from ..sim.scenarios import swarm_config

    bugs = frozenset([args.inject_bug]) if args.inject_bug else frozenset()
    totals = {"runs": 0, "ops_committed": 0, "view_changes": 0, "violations": 0, "liveness_failures": 0}
    failed = []
    t0 = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.swarm:
            sc = swarm_config(args.replicas, seed)
        else:
            sc = SimConfig(seed=seed, replicas=args.replicas, faults=args.faults, clients=args.clients,
                           ops=args.ops, bugs=bugs)
        try:
            res = Simulation(sc, log_events=args.verbose).run()
        except ConfigError as e:
            print(f"pbft sim: {e}", file=sys.stderr)
            return 2
        totals["runs"] += 1
        totals["ops_committed"] += res.ops_committed
        totals["view_changes"] += res.view_changes
        totals["violations"] += len(res.violations)
        totals["liveness_failures"] += res.liveness_failure is not None
        if args.verbose:
            for line in res.log:
                print(line)
            print(f"seed {seed}: ops={res.ops_committed} view_changes={res.view_changes} "
                  f"sim_time={res.sim_time_ms:.0f}ms events={res.events} messages={res.messages}")
        if not res.ok:
            failed.append(seed)
            if not args.json:
                print(f"FAIL seed {seed}:")
                for v in res.violations[:10]:
                    print(f"  violation: {v}")
                if res.liveness_failure:
                    print(f"  liveness: {res.liveness_failure}")
                print(f"  reproduce: {_repro(args, seed)}")
    elapsed = time.perf_counter() - t0
    if args.json:
        out: dict[str, object] = dict(totals)
        out["failed_seeds"] = failed
        out["reproduce"] = [_repro(args, s) for s in failed[:10]]
        out["wall_seconds"] = round(elapsed, 2)
        print(json.dumps(out))
    else:
        print(f"(wall time {elapsed:.1f}s)", file=sys.stderr)
        print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return 0 if totals["violations"] == 0 and totals["liveness_failures"] == 0 else 1


def cmd_demo(args) -> int:
    if args.simulated:
        from .demo.simulated import run_demo

        return run_demo()
    from .demo.live import run_live_demo

    return run_live_demo(phase_s=args.phase_seconds, keep=args.keep)


def cmd_native(args) -> int:
    from .._native import status

    st = status()
    if args.json:
        print(json.dumps(st))
    elif st["active"]:
        print(f"native: active, {len(st['modules'])} compiled modules from {st['dir']}")
    else:
        print(f"native: not used ({st['reason']}); the pure modules run")
    return 0 if st["active"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pbft", description="Practical Byzantine Fault Tolerance")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sim", help="run seeded deterministic simulations checked by oracles")
    s.add_argument("--seeds", type=int, default=10, help="number of runs")
    s.add_argument("--first-seed", type=int, default=0)
    s.add_argument("--replicas", type=int, default=4)
    s.add_argument("--faults", type=_faults, default=frozenset(),
                   help="comma list of crash,loss,dup,reorder,delay,replay,partition (or 'all')")
    s.add_argument("--clients", type=int, default=3)
    s.add_argument("--ops", type=int, default=30, help="operations per client")
    s.add_argument("--inject-bug", choices=sorted(KNOWN_BUGS), default=None,
                   help="deliberately break the protocol to show the oracles catch it")
    s.add_argument("--scenario", default=None, help="run one catalogue scenario (id or name)")
    s.add_argument("--list-scenarios", action="store_true", help="list the scenario catalogue")
    s.add_argument("--measure-ms", type=float, default=None,
                   help="throughput scenarios: measure until this simulated time (default 2000; e.g. 60300 "
                        "for a minute)")
    s.add_argument("--swarm", action="store_true",
                   help="random subsets of network faults and up to f Byzantine replicas per seed")
    s.add_argument("--json", action="store_true")
    s.add_argument("--verbose", action="store_true", help="print the fault timeline of each run")
    s.set_defaults(func=cmd_sim)
    d = sub.add_parser("demo", help="a real 4-replica cluster on loopback: workload, primary killed, view change")
    d.add_argument("--simulated", action="store_true", help="the narrated simulation instead (no processes)")
    d.add_argument("--phase-seconds", type=float, default=4.0, help="length of each phase of the live demo")
    d.add_argument("--keep", action="store_true", help="keep the cluster directory and replica logs")
    d.set_defaults(func=cmd_demo)
    nat = sub.add_parser("native", help="whether the compiled modules of `make native` run here, and why not "
                         "(exit 1 if not)")
    nat.add_argument("--json", action="store_true")
    nat.set_defaults(func=cmd_native)
    from .net import add_commands, run_guarded

    add_commands(sub)
    from .bench import add_bench_command
    add_bench_command(sub)
    from .bench.recovery import add_bench_recovery_command
    add_bench_recovery_command(sub)
    from ..services.bfs.bench import add_bench_fs_command
    add_bench_fs_command(sub)
    from .attack import add_attack_command
    add_attack_command(sub)
    args = p.parse_args(argv)
    if args.cmd == "sim" and (args.seeds < 0 or args.replicas < 1):
        p.error("seeds must be >= 0 and replicas >= 1")
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
