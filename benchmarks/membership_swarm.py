"""Many simulated membership changes (``pbft.sim.scenarios.membership_swarm_config``): growths and
shrinks at n = 4 and 7 under random network faults, proactive recoveries and reboots from a
damaged disk, up to f Byzantine replicas and crashes; the membership certificate chain modelled.

``python benchmarks/membership_swarm.py [--first-seed S] [--seeds K] [--replicas N] [--no-crash]
[--no-storage-faults]``

Prints one line per failing seed (violations, liveness failure, or a replica that did not switch)
and the totals: runs, failures, client operations completed, recoveries ended, replicas that
rejoined a newer membership from their chain."""

from __future__ import annotations

import argparse
import sys
import time

from pbft.sim.scenarios import MEMBERSHIP_SWARM_STORAGE, membership_swarm_config, membership_switched
from pbft.sim.simulator import ALL_FAULTS, Simulation


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--replicas", type=int, choices=(4, 7), help="n (default: 4 and 7 in turn)")
    p.add_argument("--no-crash", action="store_true", help="no random crash faults (a scripted crash still)")
    p.add_argument("--no-storage-faults", action="store_true", help="no proactive recoveries nor disk faults")
    a = p.parse_args()
    faults = tuple(x for x in ALL_FAULTS if not (a.no_crash and x == "crash"))
    storage = () if a.no_storage_faults else MEMBERSHIP_SWARM_STORAGE
    bad, ops, recoveries, rejoins, t0 = 0, 0, 0, 0, time.time()
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        n = a.replicas or (4, 7)[seed % 2]
        cfg, kind = membership_swarm_config(n, seed, faults, storage)
        sim = Simulation(cfg)
        res = sim.run()
        ops += res.ops_committed
        recoveries += sim.recoveries_done
        rejoins += len(sim.chains.rejoins) if sim.chains is not None else 0
        errs = list(res.violations) + ([f"liveness: {res.liveness_failure}"] if res.liveness_failure else [])
        if res.ok:
            errs += membership_switched(sim, res)
        if errs:
            bad += 1
            print(f"seed {seed} {kind} n={n} byzantine={cfg.byzantine} faults={sorted(cfg.faults)} "
                  f"script={cfg.script}: {errs[:3]}", flush=True)
    print(f"runs={a.seeds} failed={bad} ops={ops} recoveries={recoveries} rejoins={rejoins} "
          f"wall_seconds={time.time() - t0:.0f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
