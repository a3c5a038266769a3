"""The scenario catalogue (docs/adversaries.md), as named, runnable simulations with asserted outcomes.

Each scenario builds a ``SimConfig`` for a replica count and a seed, and adds
its own expectations to the oracles' (which always apply): a bound on view
changes, that a partitioned minority commits nothing, that a censored client
is served, and so on.  A *negative control* expects the oracles to find a
violation: it passes only if they do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dataclasses import replace as _replace

from .simulator import ALL_FAULTS, DISK_FAULTS, CostModel, RunResult, SimConfig, Simulation

NET = frozenset({"loss", "dup", "reorder", "delay", "replay"})


@dataclass
class Scenario:
    id: str
    name: str
    description: str
    expect: str
    build: Callable[[int, int], SimConfig]  # (replicas, seed) -> config
    check: Optional[Callable[[Simulation, RunResult], list[str]]] = None
    negative: bool = False  # the oracles must detect a violation
    observer: Optional[Callable] = None
    needs: str = ""  # why it is not run yet, if empty it runs
    floor: Optional[float] = None  # throughput vs the fault-free run of the same seed, cost model on


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: int = 0
    ops_committed: int = 0
    view_changes: int = 0
    violations: int = 0
    liveness_failures: int = 0
    expectation_failures: list[str] = field(default_factory=list)
    detected: int = 0  # negative controls: runs in which the oracles caught the break
    throughput: Optional[float] = None  # correct clients' ops/s under the scenario (simulated time)
    baseline: Optional[float] = None  # ... in the fault-free run of the same seeds

    @property
    def ratio(self) -> Optional[float]:
        if self.throughput is None or not self.baseline:
            return None
        return self.throughput / self.baseline

    @property
    def ok(self) -> bool:
        if self.scenario.floor is not None and (self.ratio is None or self.ratio < self.scenario.floor):
            return False
        if self.scenario.negative:
            return self.detected > 0 and not self.expectation_failures
        return self.violations == 0 and self.liveness_failures == 0 and not self.expectation_failures


def f_of(n: int) -> int:
    return (n - 1) // 3


def _max_correct_view(sim: Simulation) -> int:
    return max(sim.replicas[r].view for r in sim.correct)


def _views_at_most(bound: Callable[[int], int]):
    def check(sim: Simulation, res: RunResult) -> list[str]:
        v = _max_correct_view(sim)
        b = bound(sim.cfg.f)
        return [] if v <= b else [f"correct replicas reached view {v}, expected at most {b}"]
    return check


def _isolate(x: int, n: int) -> list[tuple[int, int]]:
    return [(x, y) for y in range(n) if y != x] + [(y, x) for y in range(n) if y != x]


def _halves(n: int) -> list[tuple[int, int]]:
    a = set(range(n // 2))
    return [(x, y) for x in range(n) for y in range(n) if (x in a) != (y in a)]


def _ring(n: int) -> list[tuple[int, int]]:
    """Each replica hears only its two ring neighbours."""
    return [(x, y) for x in range(n) for y in range(n)
            if x != y and (y - x) % n not in (1, n - 1)]


def _byz(n: int, name: str, first: int = 0) -> tuple:
    return tuple(((first + i) % n, name) for i in range(f_of(n)))


def _cfg(**kw):
    def build(n: int, seed: int) -> SimConfig:
        d = dict(kw)
        d.setdefault("fault_phase_ms", 1500.0)
        byz = d.pop("byz", None)
        if byz is not None:
            d["byzantine"] = byz(n, seed) if callable(byz) else byz
        skewed = d.pop("skewed_fn", None)
        if skewed is not None:
            d["skewed"] = skewed(n, seed)
        plan = d.pop("plan_fn", None)
        if plan is not None:
            d["twins_plan"] = plan(n, seed)
        script = d.pop("script_fn", None)
        if script is not None:
            d["script"] = script(n, seed)
        return SimConfig(seed=seed, replicas=n, **d)
    return build


def _power_loss_happened(sim: Simulation, res: RunResult) -> list[str]:
    out = []
    if sim.power_losses < 1:
        out.append("no power loss happened")
    if sim.reboots < sim.sc.replicas:
        out.append(f"only {sim.reboots} reboots from disk")
    return out


def _recoveries_repaired(sim: Simulation, res: RunResult) -> list[str]:
    out = []
    if sim.recoveries_done < 1:
        out.append("no recovery ended")
    if sim.corrupted:
        out.append(f"replicas {sorted(sim.corrupted)} still corrupted")
    return out


def _repaired_without_recovery(sim: Simulation, res: RunResult) -> list[str]:
    out = []
    if sim.repairs_done < 1:
        out.append("no forged object was repaired by a state transfer")
    if sim.recoveries_done:
        out.append(f"{sim.recoveries_done} recoveries: the repair must not need one")
    if sim.corrupted:
        out.append(f"replicas {sorted(sim.corrupted)} still corrupted")
    return out


def _recovered_after_timestamp_abuse(sim: Simulation, res: RunResult) -> list[str]:
    from .byzantine import Behaviour

    out = []
    for r, _ in sim.sc.byzantine:
        b = sim.byz[r]
        assert isinstance(b, Behaviour)
        node = b.node
        if node.recoveries < 1:
            out.append(f"replica {r}'s genuine recovery did not end: {node.recovering}")
    if not any(sim.replicas[r].drops.get("request-future-timestamp") for r in sim.correct):
        out.append("no correct replica refused a recovery request from the future")
    return out


class _MinorityWatch:
    """No sequence number commits while no side of a partition holds a quorum."""

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end
        self.bad: list[str] = []

    def __call__(self, sim, r, ev):
        if ev.kind == "committed" and self.start + 5.0 < sim.now < self.end:
            self.bad.append(f"replica {r} committed seqno {ev.seqno} at t={sim.now:.0f}ms with no quorum connected")


def _partition_no_quorum_check(sim: Simulation, res: RunResult) -> list[str]:
    watch = sim.observer
    return list(watch.bad[:3]) if watch is not None else []


def _censor_check(sim: Simulation, res: RunResult) -> list[str]:
    victim = sim.client_ids[0]
    done = [k for k in sim.history if k.client == victim and k.ret is not None]
    out = []
    if len(done) < sim.sc.ops:
        out.append(f"censored client completed {len(done)} of {sim.sc.ops} operations")
    out += _views_at_most(lambda f: f + 1)(sim, res)
    return out


def _no_wrong_results(sim: Simulation, res: RunResult) -> list[str]:
    bad = [k for k in sim.history if k.ret is not None and k.result == b"WRONG"]
    return [f"client accepted a wrong result: {bad[0]}"] if bad else []


def _lagging_check(sim: Simulation, res: RunResult) -> list[str]:
    lag = sim.replicas[sim.correct[-1]]
    settled = sim._settled()
    out = []
    if lag not in settled:
        out.append("the lagging replica did not rejoin")
    elif lag.drops.get("data-digest-mismatch", 0) == 0 and lag.drops.get("data-unrequested", 0) == 0:
        pass  # it may have fetched from a correct replica first
    return out


def _recovery_flood_check(sim: Simulation, res: RunResult) -> list[str]:
    """The flooders' recovery requests: each correct replica admits at most one per half base
    view-change timeout per flooder, so at most about (correct replicas) per interval are ordered."""
    byz = {r for r, _ in sim.sc.byzantine}
    count = sim.recovery_requests_executed
    interval = sim.cfg.view_change_timeout_ms / 2
    bound = len(byz) * (len(sim.correct) * (sim.now / interval + 1) + 2)
    out = []
    if count == 0:
        out.append("no flooded recovery request was ever executed (the adversary does not reach the protocol)")
    if count > bound:
        out.append(f"{count} flooded recovery requests executed in {sim.now:.0f}ms, more than {bound:.0f}")
    sent = sum(getattr(sim.byz[r], "sent", 0) for r in byz)
    if sent < 100:
        out.append(f"the flooders sent only {sent} recovery requests")
    return out


def _vouch_flood_check(sim: Simulation, res: RunResult) -> list[str]:
    out = _views_at_most(lambda f: 0)(sim, res)
    dropped = sum(sim.replicas[r].drops.get("vouch-unknown-dropped", 0) for r in sim.correct)
    if dropped == 0:
        out.append("no unknown vouch was ever dropped: the flood did not reach the per-replica bound")
    for r in sim.correct:
        rep = sim.replicas[r]
        per = max((len(x) for x in rep.requests.vouch_unknown.values()), default=0)
        if per > rep.requests.vouch_unknown_max:
            out.append(f"replica {r} keeps {per} unknown vouches of one replica")
    return out


def _claim_stuck_check(sim: Simulation, res: RunResult) -> list[str]:
    """Idle rejoins are the only view changes one claimer can buy, and they back off."""
    v = _max_correct_view(sim)
    idle = sim.now - min(sim.quiet_since, sim.now)
    base = sim.cfg.view_change_timeout_ms
    # a rejoin needs base ms of idleness; the intervals then double: base, 2 base, 4 base, ...
    k, t = 0, base
    while t <= idle + base:
        k += 1
        t += base * 2 ** k
    bound = (k + 1) * 2  # (a rejoin may land on a faulty primary's view: one more view change each)
    # a faulty primary may also leave its own view at once (its ViewChange for the next view: the
    # backups join it, ``primary-left``): one more view change for each view a faulty replica leads
    rep = sim.replicas[sim.correct[0]]
    bound += sum(1 for u in range(1, v + 1) if rep.primary(u) in sim.byz)
    return [] if v <= bound else [f"correct replicas reached view {v} in {idle:.0f}ms idle, expected <= {bound}"]


def _storm_check(sim: Simulation, res: RunResult) -> list[str]:
    v = _max_correct_view(sim)
    return [] if v == 0 else [f"a single replica moved correct replicas to view {v}"]


def _twins_plan(n: int, seed: int) -> tuple:
    k = seed // n
    sides = []
    for _ in range(n - 1):
        sides.append(("A", "B", "AB")[k % 3])
        k //= 3
    return tuple(sides)


def _lag_script(n: int, seed: int):
    return ((5.0, "crash", n - 1),)


def _large_requests_script(n: int, seed: int):
    # the last replica is cut off just before the primary crashes, and back once the others are
    # changing views: it lacks the batches of the last few sequence numbers the NewView re-proposes
    return ((8.0, "block", _isolate(n - 1, n)), (15.0, "crash", 0), (600.0, "unpartition", None))


def _large_requests_check(sim: Simulation, res: RunResult) -> list[str]:
    out = _views_at_most(lambda f: 1)(sim, res)
    late = sim.replicas[sim.sc.replicas - 1]
    if not late.counts.get("new-view-waiting-for-batches"):
        out.append("the replica cut off never waited for a batch: the NewView carried every batch")
    if any(r.drops.get("new-view-missing-batch") for r in sim.replicas):
        out.append("a NewView was rejected for a missing batch")
    return out


def _large_by_digest_check(sim: Simulation, res: RunResult) -> list[str]:
    out = _views_at_most(lambda f: 1)(sim, res)
    if any(r.drops.get("new-view-missing-batch") for r in sim.replicas):
        out.append("a NewView was rejected for a missing batch")
    return out


SCENARIOS: list[Scenario] = [
    Scenario("S-01", "no-faults", "no faults, mixed read/write workload, many clients",
             "oracles hold; every operation completes; no view change",
             _cfg(clients=8, ops=25), _views_at_most(lambda f: 0)),
    Scenario("S-02", "primary-crash", "the primary crashes mid-batch",
             "progress within one view change; nothing acknowledged lost",
             _cfg(script=((25.0, "crash", 0),)), _views_at_most(lambda f: 1)),
    Scenario("S-02b", "large-requests-primary-crash", "operations of ~64,000 bytes (within request_size_bytes_max) "
             "from 32 clients with no think time, a checkpoint interval of 64, a 2 MiB message size: a "
             "window of prepared batches several times the message size; the primary crashes while a "
             "backup is cut off",
             "progress within one view change; every message within message_size_bytes_max (R2); the "
             "NewView carries batch bodies up to its budget and the backup fetches the others",
             # (requests inline, as the scenario is about batch bodies: by digest, the NewView is small)
             _cfg(clients=32, ops=8, value_bytes=31_900, keys=8, think_ms=(0.0, 0.0), script_fn=_large_requests_script,
                  cluster=dict(checkpoint_interval_seqnos=64, log_window_seqnos=128, message_size_bytes_max=2 << 20,
                               state_size_bytes_max=1 << 20, request_inline_op_bytes_max=1 << 16)),
             _large_requests_check),
    Scenario("S-02c", "large-requests-by-digest-primary-crash", "S-02b with the large requests ordered by "
             "digest (the default): pre-prepares and the NewView carry their digests only",
             "progress within one view change; every message within message_size_bytes_max (R2); no "
             "NewView rejected for a missing batch",
             _cfg(clients=32, ops=8, value_bytes=31_900, keys=8, think_ms=(0.0, 0.0), script_fn=_large_requests_script,
                  cluster=dict(checkpoint_interval_seqnos=64, log_window_seqnos=128,
                               message_size_bytes_max=2 << 20, state_size_bytes_max=1 << 20)),
             _large_by_digest_check),
    Scenario("S-03", "consecutive-primaries-crash", "the primaries of views 0..f-1 crash",
             "progress within f+1 view changes",
             _cfg(script_fn=lambda n, s: tuple((25.0, "crash", i) for i in range(f_of(n))), fault_phase_ms=4000.0),
             _views_at_most(lambda f: f + 1)),
    Scenario("S-04", "power-loss", "crash/restart from a simulated disk (lost unsynced writes, torn writes, "
             "corrupted records on <= f replicas) and a power loss of every replica at once, durable mode",
             "nothing acknowledged lost; no double vote after restart",
             _cfg(faults=frozenset({"disk", "powerloss", "crash", "loss"})), _power_loss_happened),
    Scenario("S-27", "proactive-recovery", "replicas recover proactively in turn; before some recoveries the "
             "replica's state is corrupted in memory (behind the library's back) or on disk",
             "every recovery ends; corrupted state detected and repaired; oracles hold",
             _cfg(faults=frozenset({"recovery", "loss", "reorder"}), fault_phase_ms=3000.0), _recoveries_repaired),
    Scenario("S-27b", "forged-object-repair", "objects forged in a replica's memory (and written through), "
             "no recovery: its next checkpoint disagrees with the certified one",
             "it repairs itself at once (a state transfer of the objects that differ); oracles hold",
             _cfg(faults=frozenset({"forge", "reorder"}), fault_phase_ms=2000.0, clients=3, ops=100_000, keys=32,
                  stop_at_heal=True, cluster=dict(checkpoint_interval_seqnos=4, log_window_seqnos=8)),
             _repaired_without_recovery),
    Scenario("S-27c", "recovery-after-timestamp-abuse", "an intruder in f replicas has recovery requests ordered "
             "under their identities with timestamps far ahead (2^63-1, ten minutes, just inside the clock "
             "bound); then it is evicted and each replica recovers",
             "the requests beyond the replicas' clock bound are refused; every genuine recovery ends",
             _cfg(byz=lambda n, s: _byz(n, "recovery-ts-ahead", first=1 + s % (n - 1)), fault_phase_ms=3000.0,
                  cluster=dict(checkpoint_interval_seqnos=4, log_window_seqnos=8)),
             _recovered_after_timestamp_abuse),
    Scenario("S-05a", "partition-halves", "the cluster splits in halves, then heals",
             "no side commits anything; progress after heal",
             _cfg(script_fn=lambda n, s: ((100.0, "block", _halves(n)), (700.0, "unpartition", None)),
                  fault_phase_ms=800.0),
             _partition_no_quorum_check, observer=lambda: _MinorityWatch(100.0, 700.0)),
    Scenario("S-05b", "partition-ring", "each replica hears only its ring neighbours, then heals",
             "safety; progress after heal",
             _cfg(script_fn=lambda n, s: ((100.0, "block", _ring(n)), (900.0, "unpartition", None)),
                  fault_phase_ms=1000.0)),
    Scenario("S-05c", "partition-primary", "the primary is isolated, then the network heals",
             "the others change view and progress; progress after heal",
             _cfg(script_fn=lambda n, s: ((50.0, "block", _isolate(0, n)),), fault_phase_ms=2000.0)),
    Scenario("S-05d", "partition-random", "random partitions (single node, halves, primary, one-way) repeatedly",
             "safety; progress after heal", _cfg(faults=frozenset({"partition"}))),
    Scenario("S-06", "one-way-partition", "the primary can receive but not send",
             "safety; bounded spurious view changes",
             _cfg(script_fn=lambda n, s: ((50.0, "block", [(0, y) for y in range(1, n)]),)),
             _views_at_most(lambda f: 3)),
    Scenario("S-07", "lossy-network", "loss up to 15%, duplication, reordering, delay spikes, replay",
             "safety; liveness", _cfg(faults=NET)),
    Scenario("S-08", "clock-skew", "f replicas' clocks far beyond the agreed-value bound, all network faults",
             "safety never depends on clocks",
             _cfg(faults=frozenset(ALL_FAULTS) - {"crash"},
                  skewed_fn=lambda n, s: tuple((n - 1 - i, 5_000.0 * (-1) ** i) for i in range(f_of(n))))),
    Scenario("S-09", "twins-equivocating-primary", "Twins: the primary runs as two copies talking to "
             "different parts of the cluster, changing every round",
             "safety in every run", _cfg(byz=lambda n, s: _byz(n, "twins"))),
    Scenario("S-10", "twins-double-voting-backups", "Twins: f backups run as two copies each",
             "no certificate mixes digests", _cfg(byz=lambda n, s: _byz(n, "twins", first=1))),
    Scenario("S-11", "twins-amnesia", "Twins where one twin restarts with an empty log mid-run",
             "prepared requests survive into new views", _cfg(byz=lambda n, s: _byz(n, "twins-amnesia"),
                                                              faults=frozenset({"crash", "loss"}))),
    Scenario("S-12", "small-scope-mutations", "f replicas mutate single messages (view/seqno +-1, digest, "
             "request, omission, repeat, reply result)", "no agreement/validity/integrity violation",
             _cfg(byz=lambda n, s: _byz(n, "mutate", first=s % n), faults=frozenset({"loss", "reorder"}))),
    Scenario("S-12b", "single-message-mutation", "one Byzantine replica mutates exactly one message: seeds "
             "0..69 enumerate every (message type, mutation) pair, the round comes from the seed",
             "no agreement/validity/integrity violation", _cfg(byz=lambda n, s: (((s // 70) % n, "mutate-one"),))),
    Scenario("S-09b", "twins-enumerated", "Twins of one replica; seeds enumerate which replica is twinned "
             "(primary or backup) x the first round's partition of the correct replicas into sides A, B, "
             "both (3^(n-1) x n: 108 seeds cover n=4 exhaustively), then both twins talk to everyone",
             "safety in every run",
             _cfg(byz=lambda n, s: ((s % n, "twins"),), plan_fn=lambda n, s: _twins_plan(n, s))),
    Scenario("S-13", "forged-view-changes", "f replicas send fabricated, per-receiver inconsistent ViewChange "
             "and wrong NewView messages and start view changes", "bad ones rejected; progress",
             _cfg(byz=lambda n, s: _byz(n, "forge-view-change", first=s % n), faults=frozenset({"crash"}))),
    Scenario("S-14", "sequence-number-abuse", "a primary using sequence numbers above H, near 2^63, "
             "skipped and reused", "rejected; view change; memory bounded",
             _cfg(byz=lambda n, s: _byz(n, "seq-abuse"))),
    Scenario("S-15", "replay", "f replicas re-send their genuine old messages across views and checkpoints, "
             "and the network replays old packets", "ignored; nothing executed twice",
             _cfg(byz=lambda n, s: _byz(n, "replay", first=s % n), faults=frozenset({"replay", "crash"}))),
    Scenario("S-16", "client-timestamp-abuse", "Byzantine clients reuse a timestamp with another operation, "
             "reset timestamps, use the maximum timestamp, and share one identity between two processes",
             "exactly-once (the S3 oracle); cached replies on duplicates; no view change",
             _cfg(byz_clients=("ts-reuse", "ts-reset", "ts-max", "shared-id")), _views_at_most(lambda f: 0)),
    Scenario("S-19", "bad-authenticator-clients", "a client whose authenticators are valid only at the "
             "current primary, and one whose authenticators are valid nowhere",
             "no view change caused; correct clients served",
             _cfg(byz_clients=("bad-auth-primary", "bad-auth-all")), _views_at_most(lambda f: 0), floor=0.9),
    Scenario("S-20", "client-flooding", "a client sending ~100x a correct client's rate, requests at the size "
             "limit, and requests under identities it has no key for",
             "queues bounded (R1); correct clients served; no view change",
             _cfg(byz_clients=("flood",)), _views_at_most(lambda f: 0), floor=0.7),
    Scenario("S-23", "replica-flooding", "f backups send junk bytes and valid but useless messages "
             "(status, far-future checkpoints, stray prepares, acks, replays) as fast as they can",
             "correct clients keep >= 50% of the fault-free throughput (cost model)",
             _cfg(byz=lambda n, s: _byz(n, "flood", first=1)), floor=0.5),
    Scenario("S-23b", "vouch-flooding", "f backups send Vouch messages full of random keys (and their own "
             "vouches again) as fast as they can",
             "unknown vouches bounded per replica; no view change; correct clients keep >= 50% of the fault-free "
             "throughput (cost model)",
             _cfg(byz=lambda n, s: _byz(n, "vouch-flood", first=1)), _vouch_flood_check, floor=0.5),
    Scenario("S-23c", "recovery-request-flooding", "f backups send recovery requests with ever new timestamps, "
             "vouched by themselves, as fast as they can",
             "at most one flooded recovery request per half view-change timeout per correct replica is ordered; "
             "correct clients keep >= 50% of the fault-free throughput (cost model)",
             _cfg(byz=lambda n, s: _byz(n, "recovery-flood", first=1)), _recovery_flood_check, floor=0.5),
    Scenario("S-25b", "claims-to-be-stuck", "f replicas claim for ever to be alone in a view change (Status "
             "and ViewChange for the view above the cluster's)",
             "no view change while clients are served; on the idle cluster, idle rejoins back off",
             _cfg(byz=lambda n, s: _byz(n, "claim-stuck", first=1)), _claim_stuck_check),
    Scenario("S-17", "lagging-replica-corrupt-state", "a replica misses > 3 checkpoint windows while f "
             "replicas serve corrupt state and announce wrong checkpoint digests",
             "only certified state accepted; the replica rejoins",
             _cfg(byz=lambda n, s: _byz(n, "corrupt-state"), script_fn=_lag_script, ops=40,
                  cluster=dict(checkpoint_interval_seqnos=4, log_window_seqnos=8), fault_phase_ms=1200.0),
             _lagging_check),
    Scenario("S-18", "hold-certificate-then-silent", "f replicas send their commits to one replica only, "
             "then go silent", "no permanent stall", _cfg(byz=lambda n, s: _byz(n, "hold-and-silent"))),
    Scenario("S-22", "censoring-primary", "the primary drops every request of one client",
             "the censored client's requests execute within f+1 view changes",
             _cfg(byz=lambda n, s: _byz(n, "censor")), _censor_check),
    Scenario("S-24", "wrong-results", "f replicas reply to clients with wrong results",
             "clients never accept a wrong result", _cfg(byz=lambda n, s: _byz(n, "wrong-results", first=1)),
             _no_wrong_results),
    Scenario("S-25", "view-change-storm", "f replicas push view changes for ever higher views",
             "one replica cannot move the cluster; no view change",
             _cfg(byz=lambda n, s: _byz(n, "view-storm", first=1)), _storm_check),
    Scenario("S-21", "slow-primary", "the primary delays everything it sends to just under the view-change "
             "timeout and orders one request at a time",
             "detected (replaced); correct clients keep >= 60% of the fault-free throughput (cost model)",
             _cfg(byz=lambda n, s: ((0, "slow"),)), floor=0.6),
    Scenario("S-21a", "slow-backups", "f backups delay everything they send to just under the timeout",
             "safety; liveness", _cfg(byz=lambda n, s: _byz(n, "slow", first=1))),
    Scenario("S-28a", "twins-beyond-threshold", "negative control: f+1 replicas run as Twins",
             "the oracles MUST detect broken agreement",
             _cfg(byz=lambda n, s: tuple((i, "twins") for i in range(f_of(n) + 1)), allow_beyond_f=True),
             negative=True),
    Scenario("S-28b", "silent-beyond-threshold", "negative control: f+1 replicas silent",
             "the oracles MUST report the lost liveness",
             _cfg(byz=lambda n, s: tuple((i, "silent") for i in range(1, f_of(n) + 2)), allow_beyond_f=True,
                  liveness_bound_ms=5_000.0),
             negative=True),
]

PENDING = [
    ("S-21", "slow primary detected, throughput >= 60% over a minute", "the cost model and slow-primary detection"),
    ("S-19d", "spoofed correct client ids, the core's rules alone: >= 90% (85.7% at n=4)",
     "a spoofed bad MAC not to make a correct client a suspect without principal binding, and cheaper rejection "
     "(docs/adversaries.md)"),
    ("S-19e", "replayed correct client frames, the core's rules alone: >= 90% (84.9% at n=4)",
     "a replayed duplicate of a pending request not to be vouched for again (and forwarded) at once each time, and "
     "cheaper handling of replayed frames (docs/adversaries.md)"),
]

_SPOOF = ("a keyless attacker sends requests under the correct clients' own ids, timestamps just ahead of "
          "theirs (and far ahead), with authenticators under keys nobody has, as fast as it can")
_REPLAY = ("an attacker replays the correct clients' genuine request frames, those still waiting to execute "
           "above all, as fast as it can")
_SPOOF_EXPECT = ("no forged request executed (S2); no view change; correct clients keep >= 90% of the "
                 "fault-free throughput (cost model)")
_REPLAY_EXPECT = ("nothing executed twice (S3); no view change; correct clients keep >= 90% of the fault-free "
                  "throughput (cost model)")

def _switched(sim: Simulation, res: RunResult) -> list[str]:
    """Every correct replica is in the new membership (or retired from it), and the joiners took
    part: they hold the final state like the others (the oracles' convergence counts them)."""
    target = sim.sc.membership[-1][1]
    out = []
    for r in sim.replicas:
        if r.id in sim.byz:
            continue
        if r.id < target and (r.cfg.n != target or r.members_from == 0):
            out.append(f"replica {r.id} did not switch to {target} replicas (n={r.cfg.n})")
        # (a leaving replica that lagged at the switch may never learn it: the members do not talk
        # to it any more; it must not take part in the new membership)
        if r.id >= target and not r.retired and r.cfg.n == target:
            out.append(f"replica {r.id} switched without retiring")
    if sim.cfg.n != target:
        out.append(f"the clients did not move to {target} replicas")
    return out


def _grow(n: int, seed: int, **kw) -> SimConfig:
    d: dict[str, Any] = dict(clients=4, ops=30, fault_phase_ms=1500.0, membership=((100.0, n + 3),))
    d.update(kw)
    return SimConfig(seed=seed, replicas=n, **d)


def _shrink(n: int, seed: int, **kw) -> SimConfig:
    d: dict[str, Any] = dict(clients=4, ops=30, fault_phase_ms=1500.0, membership=((100.0, n),))
    d.update(kw)
    return SimConfig(seed=seed, replicas=n + 3, **d)


# membership changes (docs/reconfiguration.md): the administrator's set-membership under load
SCENARIOS += [
    Scenario("S-40", "membership-grow", "the administrator adds 3 replicas (n -> n+3, f the largest) while "
             "clients run, with loss, duplication and reordering",
             "the old membership orders up to the switch point, the new one after it (M1); the joiners "
             "fetch a certified checkpoint and take part; every oracle holds across the epochs",
             lambda n, s: _grow(n, s, faults=frozenset({"loss", "dup", "reorder"})), _switched),
    Scenario("S-41", "membership-shrink", "the administrator removes the 3 highest replicas (n+3 -> n) while "
             "clients run, with loss, duplication and reordering",
             "the removed replicas retire at the switch point; the others go on with the new quorums",
             lambda n, s: _shrink(n, s, faults=frozenset({"loss", "dup", "reorder"})), _switched),
    Scenario("S-42", "membership-grow-byzantine", "a growth (n -> n+3) with f Byzantine replicas of the old "
             "membership equivocating around the switch point",
             "safety across the epochs; the switch and the joiners' catch-up despite them",
             lambda n, s: _grow(n, s, byzantine=_byz(n, "equivocate", first=1)), _switched),
    Scenario("S-43", "membership-view-change-straddle", "the primary crashes just after the membership change "
             "executed (n -> n+3): the old membership changes view and fills up to the switch point; the "
             "new epoch's first primary (replica 0) is down too",
             "a view change in each epoch; safety and liveness",
             lambda n, s: _grow(n, s, script=((102.5, "crash", 0),)), _switched),
    Scenario("S-44", "membership-order-beyond-switch-point", "negative control: the injected bug "
             "order-beyond-switch-point lets the old membership order beyond the switch point, under a "
             "closed-loop load",
             "the oracles MUST detect it (M1, and the diverging batches it causes)",
             lambda n, s: _grow(n, s, clients=16, ops=20, think_ms=(0.0, 0.0), membership=((30.0, n + 3),),
                                bugs=frozenset({"order-beyond-switch-point"})),
             negative=True),
]

def _replace_script(n: int, seed: int) -> tuple:
    """The primary (replica 0) crashes; replaced when the backups change view; at f >= 2 a backup too."""
    armed = [0] + ([f_of(n) + 1] if f_of(n) >= 2 else [])
    return ((400.0, "crash", 0),) + tuple((400.0, "replace-in-view-change", r) for r in armed)


def _replaced_caught_up(sim: Simulation, res: RunResult) -> list[str]:
    """Every replacement came during a view change; the fresh replica fetched a certified
    checkpoint (the others had one: they no longer hold the log from the start), caught up
    (checked by the oracles again) and executed afterwards."""
    want = 1 + (sim.genesis_cfg.f >= 2)
    done = sim.replacements.done
    out = [] if len(done) == want else [f"{len(done)} replacements, not {want}"]
    for d in done:
        if not d.in_view_change:
            out.append(f"replica {d.replica} was replaced outside a view change")
        if d.others_stable == 0:
            out.append(f"replica {d.replica} was replaced before any checkpoint was stable")
        elif d.fetches == 0:
            out.append(f"replaced replica {d.replica} fetched no checkpoint")
        if d.caught_up_at is None:
            out.append(f"replaced replica {d.replica} never caught up (the lost one had touched seqno {d.bound})")
        elif d.executed_checked == 0:
            out.append(f"replaced replica {d.replica} executed nothing after it caught up")
    return out


# a replica's machine lost and replaced (``sim.replacement``; docs/reconfiguration.md)
SCENARIOS += [
    Scenario("S-45", "replace-during-view-change", "the primary's machine is lost while clients run (it "
             "crashes), the backups change view, and before the new view is installed its id comes back "
             "as a fresh replica with nothing stored (at f >= 2 a backup is replaced in the same view "
             "change); loss, duplication and reordering",
             "safety (every oracle) and liveness; each fresh replica fetches a certified checkpoint, "
             "catches up (checked again) and executes afterwards",
             _cfg(clients=4, ops=80, faults=frozenset({"loss", "dup", "reorder"}), script_fn=_replace_script),
             _replaced_caught_up),
]

class _RecoveryAcrossSwitch:
    """Replica 1's recoveries: the membership it was in when each started, when each ended; when
    the first replica switched."""

    def __init__(self):
        self.first_switch: Optional[float] = None
        self.started: Optional[tuple[float, int]] = None
        self.recoveries: list[tuple[float, int, float]] = []  # (start, members_from then, end)

    def __call__(self, sim, r, ev):
        if ev.kind == "membership" and self.first_switch is None:
            self.first_switch = sim.now
        elif r == 1 and ev.kind == "recovery-start":
            self.started = (sim.now, sim.replicas[1].members_from)
        elif r == 1 and ev.kind == "recovered" and self.started is not None:
            self.recoveries.append(self.started + (sim.now,))
            self.started = None


def _recovery_script(n: int, seed: int) -> tuple:
    """Replica 1 is cut off from just before the change until the others have switched, then
    recovers proactively: it reboots from its store of before the change, in the old membership."""
    return ((90.0, "block", _isolate(1, n + 3)), (800.0, "unpartition", None), (800.0, "recover", 1))


def _recovered_across_the_switch(sim: Simulation, res: RunResult) -> list[str]:
    """Replica 1's recovery began in the old membership and ended after the switch, and replica 1
    is a member of the new one holding the final state."""
    out = _switched(sim, res)
    watch = sim.observer
    assert isinstance(watch, _RecoveryAcrossSwitch)
    fs = watch.first_switch
    if not any(m == 0 and fs is not None and end > fs for _, m, end in watch.recoveries):
        out.append(f"replica 1's recovery did not span the switch (at {fs}): {watch.recoveries}")
    if 1 not in {r.id for r in sim._settled()}:
        out.append("replica 1 does not hold the final state")
    return out


def _damaged_script(n: int, seed: int) -> tuple:
    """After the switch the object records of replica 1's store are damaged, and it recovers
    proactively: it reboots from it."""
    return ((600.0, "damage-disk", 1), (620.0, "recover", 1))


def _rejoined_from_damaged_store(sim: Simulation, res: RunResult) -> list[str]:
    """Replica 1 came back from its damaged store in the membership its chain certifies (it had
    switched: its restored view is of the new epoch, its checkpoint's state unusable), fetched a
    checkpoint and holds the final state, repaired."""
    out = _switched(sim, res)
    assert sim.chains is not None
    if not any(r == 1 and why == "start" for r, _, why in sim.chains.rejoins):
        out.append(f"replica 1 did not rejoin at its reboot from a damaged store: {sim.chains.rejoins}")
    if sim.corrupted:
        out.append(f"replicas {sorted(sim.corrupted)} still corrupted")
    if 1 not in {r.id for r in sim._settled()}:
        out.append("replica 1 does not hold the final state")
    return out


def _missed_change_config(n: int, seed: int, chain: bool = True) -> SimConfig:
    """Replica n-1 is down from before a growth n -> n+3 until long after the switch; f+1 replicas
    of the old membership (beyond its f, within the new one's), otherwise correct (and voting
    for the chain's link), send it checkpoint votes for a bogus digest beyond its window."""
    byz = tuple((1 + i, "lure-checkpoint") for i in range(f_of(n) + 1))
    return _grow(n, seed, ops=40, faults=frozenset({"loss", "dup", "reorder"}), membership=((30.0, n + 3),),
                 script=((5.0, "crash", n - 1), (1200.0, "restart", n - 1)), byzantine=byz, allow_beyond_f=True,
                 chain=chain, chain_byzantine=tuple((i, "honest") for i, _ in byz))


def _not_lured(sim: Simulation, res: RunResult) -> list[str]:
    """The bogus votes reached the replica that missed the change; it did not set out to fetch
    them (S7, an oracle) but came to the new membership (it asked its chain and rejoined, or it
    still found the old membership's last checkpoint certified within its window and switched
    there) and caught up with the others."""
    from .byzantine import LureCheckpoint

    out = _switched(sim, res)
    v = sim.sc.replicas - 1
    if not all(isinstance(b, LureCheckpoint) and b.lured > 0 for b in sim.byz.values()):
        out.append("a lurer sent no bogus vote")
    if v not in {r.id for r in sim._settled()}:
        out.append(f"replica {v} does not hold the final state")
    return out


# membership changes with recoveries, and the membership certificate chain (``sim.chain``)
SCENARIOS += [
    Scenario("S-46", "membership-recovery-across-switch", "replica 1 is cut off from just before a growth "
             "(n -> n+3) executes until the others have switched, then recovers proactively: it reboots from its "
             "store of before the change, in the old membership; loss, duplication and reordering",
             "it learns the newer membership from its chain, rejoins it and its recovery ends; every oracle "
             "(the chain's too) and liveness hold",
             lambda n, s: _grow(n, s, ops=40, faults=frozenset({"loss", "dup", "reorder"}), storage="durable",
                                script=_recovery_script(n, s)),
             _recovered_across_the_switch, observer=_RecoveryAcrossSwitch),
    Scenario("S-46b", "membership-shrink-recovery-across-switch", "S-46 for a shrink (n+3 -> n)", "as S-46",
             lambda n, s: _shrink(n, s, ops=40, faults=frozenset({"loss", "dup", "reorder"}), storage="durable",
                                  script=_recovery_script(n, s)),
             _recovered_across_the_switch, observer=_RecoveryAcrossSwitch),
    Scenario("S-47", "membership-damaged-store-after-switch", "after a growth (n -> n+3) replica 1's store is "
             "damaged and it crashes and reboots from it; f replicas of the old membership serve corrupt "
             "state and announce wrong checkpoint digests; loss, duplication and reordering",
             "it comes back in the membership its chain certifies (not its cluster configuration's), fetches "
             "a checkpoint and holds the final state; every oracle and liveness hold",
             lambda n, s: _grow(n, s, ops=40, faults=frozenset({"loss", "dup", "reorder", "disk"}),
                                byzantine=_byz(n, "corrupt-state", first=2), script=_damaged_script(n, s)),
             _rejoined_from_damaged_store),
    Scenario("S-48", "membership-missed-change-lure", "replica n-1 misses a growth n -> n+3 entirely (down "
             "from before it); f+1 replicas of the old membership, within the new f, send it checkpoint "
             "votes for a bogus digest beyond its window (a weak certificate of the old thresholds)",
             "it asks its chain, counts with the new membership's thresholds and rejoins it: it never sets "
             "out to fetch the bogus checkpoint (S7), catches up, and every oracle and liveness hold",
             _missed_change_config, _not_lured),
    Scenario("S-48n", "membership-missed-change-lure-no-chain", "negative control: S-48 with drivers that keep "
             "no membership chain",
             "the oracles MUST detect it: the replica sets out to fetch the bogus checkpoint (S7)",
             lambda n, s: _missed_change_config(n, s, chain=False), negative=True),
    Scenario("S-49n", "membership-chain-unchecked-signatures", "negative control: a growth with f replicas "
             "forging links (naming correct replicas as the signers of a bogus membership), and the injected "
             "chain bug unchecked-signatures (a link frame's signers taken unchecked)",
             "the chain oracles MUST detect it (C2, C3)",
             lambda n, s: _grow(n, s, byzantine=_byz(n, "equivocate", first=1),
                                chain_byzantine=tuple((i, "forge") for i, _ in _byz(n, "equivocate", first=1)),
                                chain_bug="unchecked-signatures"), negative=True),
]

# the same attacks against the runtime's defences: principals bound to connections, so the attacker's
# frames under other principals' ids are dropped before the core (``SimConfig.bind_principals``)
SCENARIOS += [
    Scenario("S-19b", "spoofed-correct-client-ids", _SPOOF + " (principals bound to connections, as the "
             "runtime does)", _SPOOF_EXPECT,
             _cfg(byz_clients=("spoof-correct-ids",), bind_principals=True), _views_at_most(lambda f: 0), floor=0.9),
    Scenario("S-19c", "replayed-correct-client-frames", _REPLAY + " (principals bound to connections, as the "
             "runtime does)", _REPLAY_EXPECT,
             _cfg(byz_clients=("replay-correct-frames",), bind_principals=True), _views_at_most(lambda f: 0),
             floor=0.9),
]

# scenarios whose floor is not met yet (see PENDING): runnable by id (``pbft sim --scenario S-19d``),
# not part of the catalogue the test suite holds to
OPEN: list[Scenario] = [
    Scenario("S-19d", "spoofed-correct-client-ids-core", _SPOOF + " (no principal binding: the core's rules "
             "alone)", _SPOOF_EXPECT,
             _cfg(byz_clients=("spoof-correct-ids",)), _views_at_most(lambda f: 0), floor=0.9),
    Scenario("S-19e", "replayed-correct-client-frames-core", _REPLAY + " (no principal binding: the core's "
             "rules alone)", _REPLAY_EXPECT,
             _cfg(byz_clients=("replay-correct-frames",)), _views_at_most(lambda f: 0), floor=0.9),
]

BY_NAME = {s.name: s for s in SCENARIOS + OPEN} | {s.id: s for s in SCENARIOS + OPEN}


def find(name: str) -> Scenario:
    s = BY_NAME.get(name) or BY_NAME.get(name.upper())
    if s is None:
        raise KeyError(name)
    return s


THROUGHPUT_WINDOW_MS = (300.0, 2000.0)
THROUGHPUT_CLIENTS = 32


def throughput_config(cfg: SimConfig, window=THROUGHPUT_WINDOW_MS) -> SimConfig:
    """The same scenario as a saturating benchmark: CPU cost model, 32 closed-loop clients with no
    think time (enough to saturate the replicas), the attack lasting the whole 2 s measurement, then
    healing."""
    # many keys keep each key's history small enough for the linearizability search
    return _replace(cfg, cost=CostModel(), clients=THROUGHPUT_CLIENTS, ops=1_000_000, think_ms=(0.0, 0.0),
                    stop_at_heal=True, fault_phase_ms=window[1], keys=64,
                    max_events=max(3_000_000, int(window[1] * 2_000)))


def baseline_config(cfg: SimConfig) -> SimConfig:
    return _replace(cfg, faults=frozenset(), byzantine=(), byz_clients=(), script=(), skewed=())


def ops_in_window(sim: Simulation, window=THROUGHPUT_WINDOW_MS) -> int:
    lo, hi = window
    return sum(1 for k in sim.history if k.ret is not None and lo <= k.ret <= hi and k.client in sim.clients)


def run_scenario(sc: Scenario, replicas: int, seeds: range, on_run=None,
                 window=THROUGHPUT_WINDOW_MS) -> ScenarioResult:
    out = ScenarioResult(sc)
    if sc.floor is not None:
        out.throughput = out.baseline = 0.0
    for seed in seeds:
        cfg = sc.build(replicas, seed)
        if sc.floor is not None:
            cfg = throughput_config(cfg, window)
            base = Simulation(baseline_config(cfg))
            base.run()
            secs = (window[1] - window[0]) / 1000.0
            out.baseline += ops_in_window(base, window) / secs / len(seeds)
        sim = Simulation(cfg, observer=sc.observer() if sc.observer else None)
        res = sim.run()
        out.runs += 1
        out.ops_committed += res.ops_committed
        out.view_changes += res.view_changes
        out.violations += len(res.violations)
        out.liveness_failures += res.liveness_failure is not None
        if sc.negative:
            out.detected += (not res.ok)
        elif sc.check is not None and res.ok:
            for e in sc.check(sim, res):
                out.expectation_failures.append(f"seed {seed}: {e}")
        if sc.floor is not None:
            out.throughput += ops_in_window(sim, window) / secs / len(seeds)
        if on_run is not None:
            on_run(seed, sim, res)
    return out


# ---- swarm --------------------------------------------------------------------------------

SWARM_FLOODS = ["flood", "vouch-flood", "recovery-flood", "claim-stuck"]
SWARM_CLIENTS = ["bad-auth-primary", "bad-auth-all", "ts-reuse", "ts-reset", "ts-max", "shared-id"]
SWARM_BEHAVIOURS = ["silent", "slow", "equivocate", "mutate", "replay", "forge-view-change", "seq-abuse",
                    "censor", "flood", "corrupt-state", "wrong-results", "view-storm", "hold-and-silent",
                    "twins", "twins-amnesia"]


def swarm_config(replicas: int, seed: int) -> SimConfig:
    """A random subset of network faults and up to f Byzantine replicas, at random intensities."""
    rng = random.Random(f"{seed}/swarm")
    f = f_of(replicas)
    faults = frozenset(x for x in ALL_FAULTS if rng.random() < 0.5)
    k = rng.randint(0, f)
    ids = rng.sample(range(replicas), k)
    twins_kind = rng.choice(["twins", "twins-amnesia"])
    byz = []
    # the flooding kinds from their own stream, so that the draws above stay what they were
    floods = random.Random(f"{seed}/swarm-flood")
    for i in ids:
        b = rng.choice(SWARM_BEHAVIOURS)
        if b.startswith("twins"):
            b = twins_kind  # one Twins group per run
        elif b == "flood":
            b = floods.choice(SWARM_FLOODS)
        byz.append((i, b))
    # an intruder that had recovery requests ordered far ahead, then evicted by a genuine recovery:
    # from a stream of its own too
    recov = random.Random(f"{seed}/swarm-recovery")
    byz = [(i, "recovery-ts-ahead") if not b.startswith("twins") and recov.random() < 0.1 else (i, b)
           for i, b in byz]
    byz_clients = tuple(rng.sample(SWARM_CLIENTS, rng.randint(0, 2))) if rng.random() < 0.4 else ()
    # storage faults from their own stream, so that the draws above stay what they were
    disk = random.Random(f"{seed}/swarm-disk")
    faults |= frozenset(x for x in DISK_FAULTS if disk.random() < 0.3)
    return SimConfig(seed=seed, replicas=replicas, faults=faults, byzantine=tuple(byz), byz_clients=byz_clients,
                     clients=rng.randint(1, 5), ops=rng.randint(5, 30))


# ---- membership swarm ---------------------------------------------------------------------------

MEMBERSHIP_SWARM_BEHAVIOURS = ["silent", "slow", "equivocate", "mutate", "replay", "forge-view-change",
                               "seq-abuse", "corrupt-state", "wrong-results", "view-storm"]


MEMBERSHIP_SWARM_STORAGE = ("recovery", "disk")


def membership_swarm_config(replicas: int, seed: int, faults: tuple[str, ...] = ALL_FAULTS,
                            storage: tuple[str, ...] = MEMBERSHIP_SWARM_STORAGE) -> tuple[SimConfig, str]:
    """A growth ``replicas -> replicas+3`` or a shrink ``replicas+3 -> replicas`` (which one: the
    second item), at a random time, under a random subset of ``faults`` and of the storage faults
    ``storage`` (proactive recoveries, reboots from a damaged disk: drawn from a stream of their
    own, so that the other draws of a seed stay what they were), with up to f(replicas)
    Byzantine replicas among the ids of both memberships (1..replicas-1), and sometimes a crash."""
    rng = random.Random(f"{seed}/membership-swarm")
    kind = rng.choice(["grow", "shrink"])
    f = f_of(replicas)
    chosen = frozenset(x for x in faults if rng.random() < 0.4)
    k = rng.randint(0, f)
    byz = tuple((i, rng.choice(MEMBERSHIP_SWARM_BEHAVIOURS)) for i in rng.sample(range(1, replicas), k))
    kw: dict[str, Any] = dict(faults=chosen, byzantine=byz, clients=rng.randint(1, 5), ops=rng.randint(10, 30),
                              membership=((rng.uniform(20.0, 300.0), replicas + 3 if kind == "grow" else replicas),))
    if rng.random() < 0.3 and k < f:
        kw["script"] = ((rng.uniform(20.0, 400.0), "crash", rng.randrange(replicas)),)
    disk = random.Random(f"{seed}/membership-swarm-storage")
    kw["faults"] = chosen | frozenset(x for x in storage if disk.random() < 0.5)
    return (_grow if kind == "grow" else _shrink)(replicas, seed, **kw), kind


def membership_switched(sim: Simulation, res: RunResult) -> list[str]:
    """What a membership run must end with besides the oracles: every correct replica switched."""
    return _switched(sim, res)
