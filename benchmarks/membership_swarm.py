"""Many simulated membership changes (``pbft.sim.scenarios.membership_swarm_config``): growths and
shrinks at n = 4 and 7 under random network faults, up to f Byzantine replicas and crashes.

``python benchmarks/membership_swarm.py [--first-seed S] [--seeds K] [--no-crash]``

Prints one line per failing seed (violations, liveness failure, or a replica that did not switch)
and the totals."""

from __future__ import annotations

import argparse
import sys
import time

from pbft.sim.scenarios import membership_swarm_config, membership_switched
from pbft.sim.simulator import ALL_FAULTS, Simulation


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--no-crash", action="store_true", help="no random crash faults (a scripted crash still)")
    a = p.parse_args()
    faults = tuple(x for x in ALL_FAULTS if not (a.no_crash and x == "crash"))
    bad, t0 = 0, time.time()
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        n = (4, 7)[seed % 2]
        cfg, kind = membership_swarm_config(n, seed, faults)
        sim = Simulation(cfg)
        res = sim.run()
        errs = list(res.violations) + ([f"liveness: {res.liveness_failure}"] if res.liveness_failure else [])
        if res.ok:
            errs += membership_switched(sim, res)
        if errs:
            bad += 1
            print(f"seed {seed} {kind} n={n} byzantine={cfg.byzantine} faults={sorted(cfg.faults)} "
                  f"script={cfg.script}: {errs[:3]}", flush=True)
    print(f"runs={a.seeds} failed={bad} wall_seconds={time.time() - t0:.0f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
