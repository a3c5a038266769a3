"""Deterministic simulation of a whole cluster in one process.

Everything comes from one seed: each subsystem (network, faults, workload,
clocks) draws from its own ``random.Random`` stream derived from the seed, so
adding a fault never changes the workload of a seed.  Time is simulated
(milliseconds); events sit in one heap ordered by (time, sequence).

A run has two phases:

1. the *fault phase*: the chosen faults act (message loss, duplication,
   reordering, delay spikes, replay of old messages and splicing of old
   batches into new pre-prepares, symmetric and one-way partitions, crashes
   and restarts of at most f replicas at a time) while clients run a mixed
   key-value workload;
2. the *healed phase*: every fault stops, crashed replicas restart; every
   client operation must then complete within ``liveness_bound_ms`` and the
   replicas must converge to one state (liveness, L1).

The oracles (``oracles.py``) watch every step; at the end the client history
is checked for linearizability and for lost acknowledged writes.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import msgpack

from ..codec import Codec
from ..config import ClusterConfig
from ..messages import Tag
from ..core.client import Client
from ..core.drops import Drop
from ..core.ready import Ready
from ..core.replica import Replica
from ..crypto import keyrings_for
from ..services.kv import KVService, decode_result, encode_op
from .linearizability import KvOp, check_kv_history
from ..storage.memory import MemStore
from .chain import CHAIN_MAGIC, ChainModel
from .membership import Administrator, slots_for
from .oracles import Oracles
from .replacement import Replacements
from .cpus import SharedCpus
from ..runtime.admission import frame_sender

ALL_FAULTS = ("crash", "loss", "dup", "reorder", "delay", "replay", "partition")
# faults of stable storage (replicas then keep their state in a simulated disk, MemStore):
# "disk": crashed replicas restart from disk, sometimes after a power loss (unsynced writes
# lost, torn writes) or with corrupted records; "powerloss": every replica loses power at
# once, once per run; "recovery": proactive recoveries in turn, some after the replica's
# state was corrupted in memory or on disk; "forge": an object forged in a replica's memory (and
# written through), with no recovery to follow: its next checkpoint disagrees with the certified
# one, and it must repair itself (a state transfer of what differs)
DISK_FAULTS = ("disk", "powerloss", "recovery", "forge")

DELIVER, WAKE, INVOKE, FAULT, CPU, CHAIN = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class CostModel:
    """Simulated CPU time per unit of work at a replica (microseconds).

    By default each replica is one CPU (with ``cores``, the replicas and the client process share
    that many: ``sim.cpus``): received messages wait in per-sender queues served by deficit round
    robin on their estimated cost (one sender cannot starve the others, whether it sends many
    messages or large ones: Aardvark's defence, by cost). A received frame costs what the runtime
    spends on it outside the core (``frame_recv_us``: the event loop's read, framing, the
    principal binding check), the core's decode and dispatch (``message_us``, more for a request:
    ``request_us``), its bytes, the MACs it made the replica compute or check, the requests it made
    it execute, the handler work it caused (``Replica.work_units``), the sequence numbers a
    checkpoint it made stable collected, and a write per frame sent per destination
    (``frame_send_us``); what it sends leaves when the handling is done.  Throughput under attack
    is then a deterministic figure.
    """

    # the compiled core (mypyc, what runs by default), measured with benchmarks/cost_model_check.py
    # on the 2-core development machine (December 2026, load average ~2.2 from other work; the
    # minimum of 6 repetitions; docs/simulation.md, "The cost model"): a small protocol message
    # ~4.5-8.5 us (one MAC included; 4.5 alone, 6.4-8.5 in a busy log), a garbage frame ~3.4 us, a
    # 0 B request ~11.7 us and a 30 KB one ~89 us (~2.7 ns/byte: decode, frame digest, parse,
    # vouch key; other messages ~1 ns/byte); a prepare that executes 4 requests ~107 us; a
    # pre-prepare of ~4 requests ~23 us; a keyed BLAKE2b MAC ~0.6 us. The pure modules
    # (PBFT_NATIVE=0) cost 1.4-3x as much at the same load. The runtime (interpreted): ~4 us per
    # frame received when many come per read, ~14 us for a frame read alone, 5.5-6.6 us per frame
    # sent (a write each)
    message_us: float = 5.0  # a frame that got as far as its MAC check: decode, dispatch
    malformed_us: float = 3.0  # instead, for one dropped before any MAC (malformed, from ourselves)
    request_us: float = 5.0  # in addition, for a request frame (parse, vouch key, bookkeeping)
    byte_us: float = 0.001
    request_byte_us: float = 0.0017  # in addition, per byte of a request frame
    mac_us: float = 0.6
    execute_us: float = 24.0
    work_us: float = 0.5  # per vouch key handled (Replica.work_units of a Vouch)
    batch_request_us: float = 3.5  # per request checked in a batch (Replica.work_units of anything else)
    collect_us: float = 4.5  # per sequence number a stable checkpoint garbage-collected
    frame_recv_us: float = 3.8  # runtime, per frame received (framing, the principal binding check)
    read_us: float = 10.0  # runtime, per read: charged to the frame that empties its sender's queue
    frame_send_us: float = 6.0  # runtime, per frame sent, per destination
    queue_per_sender_max: int = 2000
    quantum_us: float = 14.0  # deficit-round-robin quantum: a small message per turn per sender
    # shared CPUs (``sim.cpus``): None, each replica has a CPU of its own and the clients cost
    # nothing; k, the replicas' processes and one client process share k CPUs, and the terms below
    # apply. They are fitted to a live ``pbft bench --report`` (compiled modules, load average
    # ~2.5, December 2026; benchmarks/sim_vs_live.py, docs/performance.md): the wake-up to the
    # replicas' CPU per operation at one client (~320-385 us, against 49-65 us at 32 clients), the
    # byte terms to the 4/0 and 0/4 workloads; the client's per-frame terms are the core client's
    cores: Optional[int] = None
    wake_us: float = 55.0  # a process woken from idle: the poll's return, the switch, the read
    slice_us: float = 3000.0  # a process that runs this long while another waits goes to the back
    client_frame_us: float = 6.0  # the client process, per reply received (decode, match), its MAC apart
    client_byte_us: float = 0.002  # the client process, per byte of a reply received
    recv_byte_us: float = 0.006  # a replica's runtime, per byte received (besides the core's byte terms)
    send_byte_us: float = 0.0017  # per byte written, per destination
    reply_byte_us: float = 0.008  # a replica, per byte of a reply it sends (building, digest, caching)
    client_request_us: float = 6.0  # the client process, per request built (its MACs apart)

    def estimate_us(self, tag: int, nbytes: int) -> float:
        """What a queued frame is expected to cost, before handling it (deficit round robin)."""
        if tag == Tag.REQUEST:
            return (self.frame_recv_us + self.message_us + self.request_us
                    + (self.byte_us + self.request_byte_us) * nbytes)
        return self.frame_recv_us + self.message_us + self.byte_us * nbytes

    def charge_us(self, nbytes: int, macs: float, executed: float, work: float, sent: float, tag: int,
                  collected: int = 0, reads: float = 1.0) -> float:
        """The CPU time charged for one received frame, from the counters its handling moved;
        ``reads``: the reads it is charged (1: it came alone, 0: with others from its sender)."""
        if not macs:  # dropped before its MAC check (nor did it make us seal anything)
            return (self.frame_recv_us + self.read_us * reads + self.malformed_us + self.byte_us * nbytes
                    + self.frame_send_us * sent)
        return (self.estimate_us(tag, nbytes) + self.read_us * reads + self.mac_us * macs + self.execute_us * executed
                + (self.work_us if tag == Tag.VOUCH else self.batch_request_us) * work + self.collect_us * collected
                + self.frame_send_us * sent)


@dataclass
class SimConfig:
    seed: int
    replicas: int = 4
    faults: frozenset = frozenset()
    clients: int = 3
    ops: int = 30  # per client
    bugs: frozenset = frozenset()
    keys: int = 4
    value_bytes: int = 0  # writes' values padded to this size (a cas carries two: ~2x the operation)
    fault_phase_ms: Optional[float] = None  # drawn from the seed when None
    liveness_bound_ms: float = 60_000.0
    quiesce_ms: float = 1_500.0
    # idle convergence (L3): once faults have ended and clients are done, the cluster gets no client
    # requests; within this bound every correct replica must be active in one view, with the same
    # last committed execution and nothing tentative (None: not checked, only the weaker L1)
    idle_bound_ms: Optional[float] = 5_000.0
    cluster: dict = field(default_factory=dict)  # overrides for ClusterConfig
    # scripted faults, in addition to random ones: (time_ms, kind, arg) with kind
    # "crash"/"restart" (arg: replica), "block" (arg: list of (src, dst) links), "unpartition",
    # "replace" (arg: replica: its machine lost, a fresh one under its id; ``sim.replacement``),
    # "replace-in-view-change" (arg: replica: replaced when a correct replica next starts a view change),
    # "recover" (arg: replica: a proactive recovery), "corrupt-disk" (arg: replica: an object record
    # forged with a valid checksum), "damage-disk" (arg: replica: its object records damaged)
    # (they act until fault_phase_ms, when everything heals)
    script: tuple = ()
    # Byzantine replicas: ((replica, behaviour name), ...); see sim/byzantine.py
    byzantine: tuple = ()
    # a negative control may exceed f Byzantine replicas on purpose
    allow_beyond_f: bool = False
    # replicas whose clocks are off by far more than the agreed-value bound: ((replica, skew_ms), ...);
    # they count against f for liveness (they reject honest proposals) but are checked for safety
    skewed: tuple = ()
    # Byzantine clients, by behaviour name (see sim/byzantine_clients.py), in addition to `clients`
    byz_clients: tuple = ()
    # Twins: an enumerated side ("A", "B" or "AB") per correct replica for the first round
    twins_plan: tuple = ()
    cost: Optional[CostModel] = None  # simulated CPU cost; None = processing is instantaneous
    # network delay of a message, uniform between these bounds (ms)
    net_ms: tuple = (0.1, 1.0)
    # a micro-benchmark's workload instead of the mixed one: (argument bytes, result bytes,
    # read-only), every operation on the client's own key (``Simulation._bench_op``)
    bench: Optional[tuple] = None
    # times (ms) at which the CPU charged so far is sampled (``Simulation.cpu_samples``)
    cpu_samples_ms: tuple = ()
    think_ms: Optional[tuple] = None  # (lo, hi) client think time; default (0, 10)
    stop_at_heal: bool = False  # throughput runs: clients stop starting operations when faults end
    # model the runtime's principal binding (a frame is taken only on the connection of its claimed
    # sender, or of a replica, which may relay): a frame from a client's source that claims another
    # sender is dropped before the core, as ``spoofed-client``. Off by default, so that Byzantine
    # clients test the core's own rules; network replays (source -1) model an on-path attacker
    # who can inject into a genuine stream, and are never dropped by it
    bind_principals: bool = False
    max_events: int = 3_000_000  # a run exceeding this is reported (a message storm, or too long a run)
    # "durable" or "fast": replicas persist to a simulated disk (implied "durable" by DISK_FAULTS)
    storage: Optional[str] = None
    # membership changes: ((time_ms, replicas), ...): an administrator changes the membership to
    # that many replicas (the largest f, unit weights; ``sim.membership``), one at a time
    membership: tuple = ()
    # with membership changes: model the membership certificate chain (``sim.chain``); False: the
    # replicas' drivers keep none (the old thresholds count beyond a replica's window)
    chain: bool = True
    # Byzantine replicas' chain behaviours, ((replica, name), ...) (``sim.chain.CHAIN_BEHAVIOURS``;
    # by default each drawn from the seed)
    chain_byzantine: tuple = ()
    # an injected bug of the chain model (negative controls): "unchecked-signatures"
    chain_bug: str = ""


@dataclass
class RunResult:
    seed: int
    ops_committed: int
    view_changes: int
    violations: list[str]
    liveness_failure: Optional[str]
    sim_time_ms: float
    events: int
    messages: int
    log: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations and self.liveness_failure is None


class Simulation:
    def __init__(self, sc: SimConfig, log_events: bool = False, observer=None):
        self.sc = sc
        s = sc.seed
        self.rng_net = random.Random(f"{s}/net")
        self.rng_fault = random.Random(f"{s}/fault")
        self.rng_work = random.Random(f"{s}/work")
        self.rng_clock = random.Random(f"{s}/clock")
        n = sc.replicas
        extra = {"replica_slots": slots_for(n, sc.membership)} if sc.membership else {}
        cfg = ClusterConfig.create(n, clients_max=max(sc.clients + len(sc.byz_clients) + bool(sc.membership), 1),
                                   **extra, **sc.cluster)
        self.slots = cfg.client_base  # replica ids (members now, or later)
        if sc.bugs:
            cfg = cfg.with_bugs(sc.bugs)
        self.cfg = self.genesis_cfg = cfg
        self.codec = Codec(cfg)
        master = random.Random(f"{s}/keys").randbytes(32)
        rings = keyrings_for(master, self.slots, cfg.client_ids)  # (authenticators: a MAC per replica slot)
        self.rings = rings
        self.oracles = Oracles(self.codec, self.slots, cfg.log_window_seqnos, cfg.checkpoint_interval_seqnos,
                               cfg.pending_requests_max, n)
        skew_max = cfg.nondet_skew_ms_max / 4
        self.skew = [self.rng_clock.uniform(-skew_max, skew_max) for _ in range(self.slots)]
        # replicas a membership change removed: they run on (a replica that lags behind the switch
        # may need their checkpoint votes and state), but count for nothing
        self.retired: set[int] = set()
        self.admin: Optional[Administrator] = None
        genesis = b""
        if sc.membership:
            self.admin = Administrator(self, cfg.client_base + sc.clients + len(sc.byz_clients))
            genesis = self.admin.genesis
        self.genesis = genesis
        for r, sk in sc.skewed:
            self.skew[r] = sk
        self.replicas = [
            Replica(cfg, i, rings[i], KVService(skew_ms=cfg.nondet_skew_ms_max), now=self.skew[i],
                    genesis_config=genesis)
            for i in range(n)
        ]
        self.byz: dict[int, object] = {}
        byz_ids = {r for r, _ in sc.byzantine}
        if len(byz_ids) > cfg.f and not sc.allow_beyond_f:
            raise ValueError(f"{len(byz_ids)} Byzantine replicas exceed f={cfg.f}")
        self.correct = [r for r in range(n) if r not in byz_ids]
        # correct replicas that may lag without failing the run (their clocks are broken)
        self.exempt = {r for r, _ in sc.skewed}
        if len(byz_ids | self.exempt) > cfg.f and not sc.allow_beyond_f:
            raise ValueError(f"{len(byz_ids | self.exempt)} faulty or skewed replicas exceed f={cfg.f}")
        self.oracles.correct = set(self.correct)
        self.cur_src = -1
        self.client_ids = list(cfg.client_ids)[: sc.clients]
        self.clients = {c: Client(cfg, c, rings[c]) for c in self.client_ids}
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.crashed: set[int] = set()
        self.blocked: set[tuple[int, int]] = set()
        self.healed = False
        self.quiet_since = float("inf")  # when the quiet tail (no client requests) began
        self.recovery_requests_executed = 0
        self.wake_at: dict[int, float] = {}
        self.carried: dict[int, Ready] = {}  # replica -> the Ready of its restore, sent with its next step
        self.events = 0
        self.messages = 0
        self.log_events = log_events
        self.observer = observer
        self.max_events = sc.max_events
        self.inbox: dict[int, dict[int, deque]] = {r: {} for r in range(self.slots)}
        self.rr: dict[int, deque] = {r: deque() for r in range(self.slots)}
        self.deficit: dict[int, dict[int, float]] = {r: {} for r in range(self.slots)}
        self.cpu_busy: set[int] = set()
        self.cpu_free_at = [0.0] * self.slots
        self.cpu_dropped = 0
        self.cpu_used_ms = [0.0] * self.slots
        self.cpu_samples: list[dict] = []
        self.cpus: Optional[SharedCpus] = SharedCpus(self, sc.cost) if sc.cost is not None and sc.cost.cores else None
        self.log: list[str] = []
        self.history: list[KvOp] = []
        self.current: dict[int, KvOp] = {}
        self.remaining = {c: sc.ops for c in self.client_ids}
        # after its workload the first client reads every key through ordering (audit)
        self.audit = {c: ([f"k{i}".encode() for i in range(sc.keys)] if c == self.client_ids[0] else [])
                      for c in self.client_ids}
        self.acked_ordered: dict[int, int] = {}
        self.op_counter = 0
        self.known_value: dict[tuple[int, bytes], Optional[bytes]] = {}
        self.recent: list[tuple[int, bytes]] = []  # (dst, raw) for replay
        self.recent_pp: list[bytes] = []
        # fault intensities, drawn once per run
        F = sc.faults
        rf = self.rng_fault
        self.p_loss = rf.uniform(0.0, 0.15) if "loss" in F else 0.0
        self.p_dup = rf.uniform(0.0, 0.1) if "dup" in F else 0.0
        self.jitter = rf.uniform(0.0, 4.0) if "reorder" in F else 0.0
        self.p_spike = rf.uniform(0.0, 0.05) if "delay" in F else 0.0
        self.p_replay = rf.uniform(0.0, 0.04) if "replay" in F else 0.0
        self.p_splice = rf.uniform(0.0, 0.1) if "replay" in F else 0.0
        self.fault_end = sc.fault_phase_ms if sc.fault_phase_ms is not None else rf.uniform(300.0, 2500.0)
        if not F and sc.fault_phase_ms is None:
            self.fault_end = 0.0
        self.storage = sc.storage or ("durable" if set(DISK_FAULTS) & set(F) else None)
        self.stores = {}
        if self.storage is not None:
            for r in self.correct:
                self.stores[r] = MemStore(durable=self.storage == "durable")
                self.replicas[r].enable_persistence()
        self.rng_disk = random.Random(f"{s}/disk")
        self.recovering: set[int] = set()  # replicas rebooted for a recovery that has not ended
        self.corrupted: set[int] = set()  # replicas whose state was corrupted and not yet repaired
        self.repairing: set[int] = set()  # corrupted replicas repairing their state (no recovery)
        self.replacements = Replacements(self)
        self.repairs_done = 0
        self.recoveries_done = 0
        self.reboots = 0
        self.power_losses = 0
        if sc.byzantine:
            from .byzantine import make_behaviours

            self.byz = make_behaviours(self, sc.byzantine)
        self.byz_clients: dict[int, object] = {}
        if sc.byz_clients:
            from .byzantine_clients import make_byz_clients

            self.byz_clients = make_byz_clients(self, sc.byz_clients, cfg.client_base + sc.clients)
        self.chains: Optional[ChainModel] = ChainModel(self) if sc.membership and sc.chain else None
        if self.chains is not None:
            for rep in self.replicas:
                self.chains.follow(rep)

    def _on_events(self, r: int, events: list) -> None:
        for ev in events:
            self._on_event(r, ev)

    def _on_event(self, r: int, ev) -> None:
        kind = ev.kind
        if self.chains is not None and r < self.slots:
            self.chains.on_event(r, ev)
        if kind == "membership" and self.admin is not None:
            self.admin.on_switched(r, ev)
        if kind == "recovery-request" and self.correct and r == self.correct[0] and ev.replica in self.byz:
            self.recovery_requests_executed += 1  # (a Byzantine replica's, executed at one correct replica)
        self.replacements.on_event(r, ev)
        if kind == "state-repair" and r in self.corrupted and r not in self.recovering:
            self.repairing.add(r)
            self._note(f"replica {r} found its checkpoint {ev.seqno} wrong: repairing")
        elif kind == "state-transfer" and r in self.repairing:
            self.repairing.discard(r)
            if r in self.corrupted and r not in self.recovering:  # repaired: checked again from here on
                self.corrupted.discard(r)
                self.repairs_done += 1
                self._note(f"replica {r} repaired its state at checkpoint {ev.seqno}")
                self.oracles.rebase(r, self.replicas[r])
                self.oracles.correct.add(r)
        if kind == "recovered" and r in self.recovering:
            self.recovering.discard(r)
            self.recoveries_done += 1
            self._note(f"replica {r} recovered (point {ev.recovery_point}, {ev.duration_ms:.0f}ms)")
            if r in self.corrupted:  # repaired: its traces are checked again from here on
                self.corrupted.discard(r)
                self.oracles.rebase(r, self.replicas[r])
                self.oracles.correct.add(r)
        self.oracles.on_event(r, ev)
        if self.observer is not None:
            self.observer(self, r, ev)

    def _invariants(self, rep: Replica) -> None:
        """The replica's own invariants after a step: a failure is reported as a violation (I1)."""
        try:
            rep.invariants()
        except AssertionError as e:
            self.oracles.violation(f"I1 replica {rep.id} invariant broken: {e}")

    # ---- scheduling ---------------------------------------------------------
    def _push(self, t: float, kind: int, a=None, b=None, c=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))

    def _note(self, msg: str) -> None:
        if self.log_events:
            self.log.append(f"{self.now:9.1f}ms  {msg}")

    def _schedule_wake(self, node: int) -> None:
        obj = self._node(node)
        d = obj.next_deadline()
        if d is None:
            return
        if node < self.slots:
            d = d - self.skew[node] + 1e-6  # so the local clock surely reaches d despite rounding
        d = max(d, self.now)
        cur = self.wake_at.get(node)
        if cur is None or d < cur or cur < self.now:
            self.wake_at[node] = d
            self._push(d, WAKE, node)

    def _node(self, pid: int):
        if pid < self.slots:
            return self.byz.get(pid) or self.replicas[pid]
        if self.admin is not None and pid == self.admin.id:
            return self.admin.client
        return self.clients.get(pid) or self.byz_clients[pid]

    def _local(self, pid: int) -> float:
        return self.now + (self.skew[pid] if pid < self.slots else 0.0)

    # ---- network ------------------------------------------------------------
    def _flush(self, src: int, after: float = 0.0) -> None:
        if src < self.slots:
            ready = self._node(src).take_ready()
            carried = self.carried.pop(src, None)
            if carried is not None:  # (what a reboot produced: with the replica's first step)
                carried.persist.update(ready.persist)
                carried.sends.extend(ready.sends)
                # (the first step's events too: a recovery's start, a primary's view change)
                ready = Ready(carried.persist, carried.sends, ready.events, ready.refresh_keys)
            store = self.stores.get(src)
            if store is not None and ready.persist:  # group commit before the sends (``Ready``)
                store.write(ready.persist)
            sends = ready.sends
            if ready.events:
                self._on_events(src, ready.events)
        else:
            sends = self._node(src).take_sends()
        limit = self.cfg.message_size_bytes_max
        for item in sends:
            if len(item[1]) > limit and src in self.oracles.correct:
                # (bounded messages: every receiver would drop it unread, so whatever it carried is lost)
                self.oracles.violation(f"R2 replica {src} sent a message of {len(item[1])} bytes, over "
                                       f"message_size_bytes_max ({limit})")
            extra = (item[2] if len(item) > 2 else 0.0) + after
            held = self.cpus.hold(src) if self.cpus is not None else None
            for dst in item[0]:
                if held is not None:
                    held.append((src, dst, item[1], extra - after))  # (leaves with its process's turn: ``sim.cpus``)
                else:
                    self._send(src, dst, item[1], extra)

    # ---- CPU model ------------------------------------------------------------
    def _cpu_enqueue(self, r: int, raw: bytes, src: int) -> None:
        C = self.sc.cost
        assert C is not None  # the CPU model runs only with a cost model
        q = self.inbox[r].get(src)
        if q is None:
            q = self.inbox[r][src] = deque()
            self.rr[r].append(src)
        if len(q) >= C.queue_per_sender_max:
            self.cpu_dropped += 1
            return
        q.append(raw)
        if self.cpus is not None:
            self.cpus.want(r)
        elif r not in self.cpu_busy:
            self.cpu_busy.add(r)
            self._push(max(self.now, self.cpu_free_at[r]), CPU, r)

    def _cpu_run(self, r: int) -> None:
        """A CPU event of replica r with a CPU of its own: its next frame."""
        rr = self.rr[r]
        if r in self.crashed or not rr:
            self.inbox[r].clear()
            self.deficit[r].clear()
            rr.clear()
            self.cpu_busy.discard(r)
            return
        cost_ms = self._replica_step(r)
        self.cpu_free_at[r] = self.now + cost_ms
        self.cpu_used_ms[r] += cost_ms
        if rr:
            self._push(self.cpu_free_at[r], CPU, r)
        else:
            self.cpu_busy.discard(r)

    def _replica_step(self, r: int) -> float:
        """Replica r handles the frame its deficit round robin picks (it has one); the CPU time
        charged, in ms."""
        rr = self.rr[r]
        # deficit round robin over senders, by estimated cost rather than by message count: a
        # sender of 30 KB requests gets no more of the CPU than one of small messages
        C = self.sc.cost
        assert C is not None  # the CPU model runs only with a cost model
        deficit = self.deficit[r]
        inbox = self.inbox[r]
        while True:
            src = rr[0]
            q = inbox[src]
            head = q[0]
            est = C.estimate_us(head[1] if len(head) > 1 else -1, len(head))
            d = deficit.get(src, 0.0)
            if d >= est:
                break
            deficit[src] = d + C.quantum_us
            if deficit[src] >= est:
                break
            rr.rotate(-1)
        rr.popleft()
        raw = q.popleft()
        deficit[src] -= est
        # the runtime reads what a connection holds at once: frames queued behind each other share
        # a read, charged to the one that empties the sender's queue
        reads = 0.0 if q else 1.0
        if self.cpus is not None and src in self.clients and not q:
            # (the client process's clients share one connection per replica: one read for all)
            clients = self.clients
            reads = 0.0 if any(s in clients for s in inbox if s != src) else 1.0
        if q:
            rr.append(src)
        else:
            del inbox[src]
            deficit.pop(src, None)
        node = self._node(r)
        rep = self.replicas[r]
        keys = self.rings[r]
        macs0, ex0, w0, h0 = keys.mac_ops, rep.log.executed_requests, rep.work_units, rep.low_water_mark
        self.cur_src = src
        if self._spoofed(r, raw, src):
            rep.count_drop(Drop.SPOOFED_CLIENT)
        else:
            node.receive(raw, self._local(r))
        if r not in self.byz:
            self.oracles.after_step(rep)
            self._invariants(rep)
        cost_ms = C.charge_us(len(raw), keys.mac_ops - macs0, rep.log.executed_requests - ex0, rep.work_units - w0, 0,
                              raw[1] if len(raw) > 1 else -1, max(0, rep.low_water_mark - h0), reads) / 1000.0
        if self.cpus is not None:
            cost_ms += C.recv_byte_us * len(raw) / 1000.0
        # (the vouches sealed when the sends are taken count with the next frame's MACs)
        sent0 = self.messages
        self._flush(r, cost_ms)
        # a write per frame sent, per destination: the CPU is busy that much longer (the frames
        # themselves left when the handling was done)
        cost_ms += C.frame_send_us * (self.messages - sent0) / 1000.0
        self._schedule_wake(r)
        return cost_ms


    def _cpu_sample(self) -> dict:
        """The CPU charged so far per process (ms; the client process is ``CLIENT_PROC``), the time
        each waited for a CPU and the wake-ups it paid (both empty without shared CPUs)."""
        if self.cpus is None:
            return {"t": self.now, "used": dict(enumerate(self.cpu_used_ms)), "wait": {}, "wakeups": {}}
        c = self.cpus
        return {"t": self.now, "used": dict(c.used_ms), "wait": dict(c.wait_ms), "wakeups": dict(c.wakeups)}

    def _spoofed(self, r: int, raw: bytes, src: int) -> bool:
        """Whether the runtime's principal binding would drop ``raw`` from ``src`` at replica r."""
        return self.sc.bind_principals and src >= self.slots and frame_sender(raw) != src

    def _send(self, src: int, dst: int, raw: bytes, extra_delay: float = 0.0) -> None:
        self.messages += 1
        rn = self.rng_net
        faulty = not self.healed
        if src in self.crashed:
            return
        if faulty:
            if (src, dst) in self.blocked:
                return
            if self.p_loss and rn.random() < self.p_loss:
                return
        delay = rn.uniform(*self.sc.net_ms) + extra_delay
        if faulty:
            if self.jitter:
                delay += rn.uniform(0.0, self.jitter)
            if self.p_spike and rn.random() < self.p_spike:
                delay += rn.uniform(20.0, 300.0)
            if self.p_splice and raw[:2] == b"\x95\x03" and self.recent_pp and rn.random() < self.p_splice:
                raw = self._splice(raw, rn.choice(self.recent_pp))
        self._push(self.now + delay, DELIVER, dst, raw, src)
        if faulty and self.p_dup and rn.random() < self.p_dup:
            self._push(self.now + delay + rn.uniform(0.0, 20.0), DELIVER, dst, raw, src)
        if self.p_replay:
            self.recent.append((dst, raw))
            if len(self.recent) > 4000:
                del self.recent[:2000]
            if raw[:2] == b"\x95\x03":
                self.recent_pp.append(raw)
                if len(self.recent_pp) > 200:
                    del self.recent_pp[:100]
            if faulty and rn.random() < self.p_replay:
                odst, oraw = rn.choice(self.recent)
                self._push(self.now + rn.uniform(0.1, 50.0), DELIVER, odst, oraw, -1)

    @staticmethod
    def _splice(raw: bytes, donor: bytes) -> bytes:
        """A network attacker's splice: keep a pre-prepare's header and MACs, swap in an old batch."""
        try:
            t = list(msgpack.unpackb(raw))
            d = msgpack.unpackb(donor)
            t[3] = d[3]
            return msgpack.packb(t, use_bin_type=True)
        except Exception:
            return raw

    # ---- faults -------------------------------------------------------------
    def _schedule_faults(self) -> None:
        F = self.sc.faults
        rf = self.rng_fault
        end = self.fault_end
        f = self.cfg.f
        if "crash" in F and f > 0:
            t = rf.uniform(20.0, 200.0)
            while t < end:
                self._push(t, FAULT, "crash", None)
                t += rf.uniform(100.0, 900.0)
        if "partition" in F:
            t = rf.uniform(20.0, 300.0)
            while t < end:
                dur = rf.uniform(50.0, 700.0)
                self._push(t, FAULT, "partition", dur)
                t += dur + rf.uniform(50.0, 600.0)
        if "powerloss" in F:
            self._push(rf.uniform(100.0, max(150.0, end)), FAULT, "powerloss", None)
        if "recovery" in F:
            t = rf.uniform(50.0, 300.0)
            k = rf.randrange(self.sc.replicas)
            while t < end:
                r = self.correct[k % len(self.correct)] if self.correct else None
                k += 1
                if r is not None:
                    corrupt = rf.choice([None, "memory", "disk"])
                    if corrupt is not None:
                        self._push(max(0.0, t - rf.uniform(20.0, 250.0)), FAULT, "corrupt-" + corrupt, r)
                    self._push(t, FAULT, "recover", r)
                t += rf.uniform(300.0, 1200.0)
        if "forge" in F and self.correct:
            t = rf.uniform(50.0, 400.0)
            while t < end - 300.0:  # (a forgery is found at the next checkpoint: while clients still run)
                self._push(t, FAULT, "forge-memory", self.correct[rf.randrange(len(self.correct))])
                t += rf.uniform(300.0, 1200.0)
        for t, kind, arg in self.sc.script:
            self._push(t, FAULT, "crash-one" if kind == "crash" else kind, arg)
        for t, new_n in self.sc.membership:
            self._push(t, FAULT, "membership", new_n)
        for t in self.sc.cpu_samples_ms:
            self._push(t, FAULT, "cpu-sample", None)
        self._push(end, FAULT, "heal", None)

    def _faulty_now(self) -> int:
        """Replicas that count against f now: crashed, recovering, corrupted, Byzantine, skewed,
        those that came back from a damaged disk and have not yet fetched a state, and replaced
        ones not yet caught up."""
        impaired = {r for r in self.correct if self.replicas[r].needs_state}
        return len(self.crashed | self.recovering | self.corrupted | set(self.byz) | self.exempt | impaired
                   | self.replacements.faulty())

    def _budget(self) -> int:
        """The faults the run may inject at once: f, of the smallest membership in force now or
        later in a run with membership changes (a fault injected under the old f must still be
        within the new one's)."""
        return min([self.cfg.f] + [(m - 1) // 3 for _, m in self.sc.membership if m != self.cfg.n])

    def _reboot(self, r: int, power_loss: bool = False, recover: bool = False) -> None:
        """Replica r's process starts again from its disk (after losing what was not synced if
        ``power_loss``): a new Replica object restores from the store; with ``recover`` it
        begins a proactive recovery."""
        store = self.stores[r]
        rd = self.rng_disk
        self.reboots += 1
        if power_loss:
            store.power_loss(rd, torn=rd.random() < 0.5)
        # (the configuration a process starts with: the genesis one, cluster.toml's; the restored
        # checkpoint's membership replaces it, ``membership.after_restore``)
        cfg = self.genesis_cfg if self.genesis_cfg.is_replica(r) else self.replicas[r].cfg
        rep = Replica(cfg, r, self.rings[r], KVService(skew_ms=self.cfg.nondet_skew_ms_max),
                      now=self._local(r), genesis_config=self.genesis)
        rep.enable_persistence()
        records, damaged = store.load()
        self.replicas[r] = rep
        self.inbox[r].clear()
        self.deficit[r].clear()
        self.rr[r].clear()
        self.recovering.discard(r)  # a recovery under way starts again only if its marker is on disk
        self.repairing.discard(r)
        self.oracles.rebase(r, rep)
        outcome = rep.restore(records, damaged)
        if self.chains is not None:
            # (the chain file of its data directory, unreadable with a damaged store, and the
            # chains of the replicas it reaches; the membership it certifies, if it is in force)
            self.chains.follow(rep)
            self.chains.started(r, lost=bool(damaged))
            if self.chains.at_start(rep):
                outcome += ", rejoined"
        # the oracles see what restore re-executed now; its records and messages go with the
        # replica's first step (as the runtime's first event-loop turn after a start)
        ready = rep.take_ready()
        self.carried[r] = Ready(ready.persist, ready.sends)
        self._on_events(r, ready.events)
        self.oracles.rebase(r, rep)  # restore re-executed what committed after its checkpoint
        if recover or rep.recovery_marker:
            if r in self.correct:  # (a replica a membership change is removing: no member to wait for)
                self.recovering.add(r)
            self.seq += 1
            rep.begin_recovery(self._local(r), 10_000_000 + self.seq)
        self._note(f"replica {r} rebooted from disk: {outcome}{', recovering' if recover else ''}")
        self._schedule_wake(r)

    def _fault(self, kind: str, arg) -> None:
        rf = self.rng_fault
        n = self.sc.replicas
        if kind == "crash":
            if self.healed or self._faulty_now() >= self._budget():
                return
            views = sorted(r.view for r in self.replicas)
            primary = views[len(views) // 2] % n
            up = [r for r in self.correct
                  if r not in self.crashed and r not in self.exempt and r not in self.recovering]
            victim = primary if (primary in up and rf.random() < 0.5) else rf.choice(up)
            self.crashed.add(victim)
            self._note(f"crash replica {victim}")
            self._push(self.now + rf.uniform(80.0, 900.0), FAULT, "restart", victim)
        elif kind == "crash-one":
            self.crashed.add(arg)
            self._note(f"crash replica {arg}")
        elif kind == "block":  # scripted partition: arg is a list of (src, dst) links to cut
            self.blocked = set(map(tuple, arg))
            self._note(f"partition: {len(self.blocked)} links cut")
        elif kind == "restart":
            if arg in self.crashed:
                self.crashed.discard(arg)
                if "disk" in self.sc.faults and arg in self.stores:
                    rd = self.rng_disk
                    if rd.random() < 0.2 and self._faulty_now() < self._budget():
                        # a damaged object record: detected, repaired by a transfer
                        keys = [k for k in self.stores[arg].synced if k[:1] == b"o"]
                        if keys:
                            self.stores[arg].corrupt(rd.choice(sorted(keys)), rd)
                    self._reboot(arg, power_loss=rd.random() < 0.4)
                else:
                    self.replicas[arg].restart(self._local(arg))
                    if self.chains is not None:
                        self.chains.started(arg)
                    self._note(f"restart replica {arg}")
                    self._schedule_wake(arg)
        elif kind == "powerloss":
            if self.healed or not self.stores or self.sc.storage == "fast":
                return
            down = [r for r in self.correct if r not in self.crashed]
            self.crashed.update(down)
            self.power_losses += 1
            self._note(f"power loss: replicas {down} down")
            self._push(self.now + rf.uniform(50.0, 400.0), FAULT, "power-back", tuple(down))
        elif kind == "power-back":
            for r in arg:
                if r in self.crashed:
                    self.crashed.discard(r)
                    if r in self.stores:
                        self._reboot(r, power_loss=True)
                    else:  # (a replica added by a membership change keeps no simulated disk)
                        self.replicas[r].restart(self._local(r))
                        if self.chains is not None:
                            self.chains.started(r)
                        self._schedule_wake(r)
        elif kind == "damage-disk":  # (scripted: the object records damaged, found at the next reboot)
            keys = sorted(k for k in self.stores[arg].synced if k[:1] == b"o") if arg in self.stores else []
            if keys and not self.healed:
                for k in keys:
                    self.stores[arg].corrupt(k, self.rng_disk)
                self._note(f"damage-disk at replica {arg}: {len(keys)} object records")
        elif kind in ("corrupt-memory", "corrupt-disk", "forge-memory"):
            if self.healed or arg in self.crashed or arg in self.recovering or arg in self.corrupted \
                    or self._faulty_now() >= self._budget() or (kind != "forge-memory" and arg not in self.stores):
                return  # (a corruption is repaired by a recovery: a replica with no simulated disk has none)
            rep = self.replicas[arg]
            rd = self.rng_disk
            if kind == "corrupt-memory":
                # a value changed behind the library's back, then written through (modify)
                data = rep.service.data
                full = [b for b in range(data.n_buckets) if data.buckets[b]]
                if not full:
                    return
                b = rd.choice(full)
                key = min(data.buckets[b])
                data.buckets[b][key] = (b"corrupted", 0)
                rep.state.modify(rep.rs.R + data.base + b)
            elif kind == "forge-memory":
                # a key no client writes, with a forged value, written through (modify): it stays
                # until a state transfer replaces its object
                self.seq += 1
                rep.service.data.set(b"forged/%d" % self.seq, (b"forged", 0))
            else:
                keys = sorted(k for k in self.stores[arg].synced if k[:1] == b"o")
                if not keys:
                    return
                self.stores[arg].forge(rd.choice(keys), b"\xc1 forged")
            # until its recovery has repaired it, the replica is faulty: its traces go unchecked
            self.corrupted.add(arg)
            self.oracles.correct.discard(arg)
            self._note(f"{kind} at replica {arg}")
        elif kind == "recover":
            if self.healed or arg in self.crashed or arg in self.recovering or arg in self.retired \
                    or not self.cfg.is_replica(arg) or arg not in self.stores:
                return
            if arg not in self.corrupted and self._faulty_now() >= self._budget():
                return  # one replica recovering at a time, within the fault budget
            self._reboot(arg, recover=True)
        elif kind == "partition":
            if self.healed:
                return
            shape = rf.choice(["isolate", "halves", "one-way", "primary"])
            nodes = list(range(n))
            self.blocked = set()
            if shape in ("isolate", "primary"):
                if shape == "primary":
                    views = sorted(r.view for r in self.replicas)
                    x = views[len(views) // 2] % n
                else:
                    x = rf.randrange(n)
                for y in nodes:
                    if y != x:
                        self.blocked |= {(x, y), (y, x)}
            elif shape == "halves":
                rf.shuffle(nodes)
                a = set(nodes[: n // 2])
                for x in range(n):
                    for y in range(n):
                        if (x in a) != (y in a):
                            self.blocked.add((x, y))
            else:
                for _ in range(rf.randint(1, n)):
                    x, y = rf.sample(nodes, 2)
                    self.blocked.add((x, y))
            self._note(f"partition {shape}: {len(self.blocked)} links cut for {arg:.0f}ms")
            self._push(self.now + arg, FAULT, "unpartition", None)
        elif kind == "replace":
            self.replacements.replace(arg)
        elif kind == "replace-in-view-change":
            self.replacements.arm(arg)
        elif kind == "membership":
            assert self.admin is not None
            self.admin.start_change(arg)
        elif kind == "cpu-sample":
            self.cpu_samples.append(self._cpu_sample())
        elif kind == "unpartition":
            self.blocked = set()
            if self.chains is not None:
                self.chains.healed()
            self._note("partition healed")
        elif kind == "heal":
            self.healed = True
            self.blocked = set()
            if self.chains is not None:
                self.chains.healed()
            for r in sorted(self.crashed):
                self.crashed.discard(r)
                if ("disk" in self.sc.faults or "powerloss" in self.sc.faults) and r in self.stores:
                    self._reboot(r)
                else:
                    self.replicas[r].restart(self._local(r))
                    if self.chains is not None:
                        self.chains.started(r)
                    self._schedule_wake(r)
            for r in sorted(self.corrupted - self.recovering):
                self._reboot(r, recover=True)  # corrupted but not recovered yet: recover now
            self._note("network healed; all replicas up")

    # ---- workload -----------------------------------------------------------
    def _next_op(self, c: int) -> None:
        if self.sc.stop_at_heal and self.healed:
            self.remaining[c] = 0
        if self.remaining[c] <= 0 and not (self.audit[c] and self.healed):
            return
        lo, hi = self.sc.think_ms or (0.0, 10.0)
        self._push(self.now + self.rng_work.uniform(lo, hi), INVOKE, c)

    def _invoke(self, c: int, flush: bool = True) -> None:
        """Client c starts its next operation (``flush``: its request leaves now; the shared CPUs'
        client process sends it when it has paid for it)."""
        rw = self.rng_work
        if self.remaining[c] <= 0:
            key = self.audit[c].pop(0)
            kop = KvOp(c, "get", key, invoke=self.now)
            op = encode_op("get", key)
            t = self.clients[c].invoke(op, False, self.now)
            self.oracles.issued.add((c, t, op))
            self.current[c] = kop
            self.history.append(kop)
            if flush:
                self._flush(c)
                self._schedule_wake(c)
            return
        self.remaining[c] -= 1
        self.op_counter += 1
        key = f"k{rw.randrange(self.sc.keys)}".encode()
        x = rw.random()
        ro = False
        if self.sc.bench is not None:
            op, ro, kop = self._bench_op(c)
        elif x < 0.2:
            op, ro = encode_op("get", key), True
            kop = KvOp(c, "get", key)
        elif x < 0.3:
            op = encode_op("get", key)
            kop = KvOp(c, "get", key)
        elif x < 0.65:
            v = f"v{c}-{self.op_counter}".encode().ljust(self.sc.value_bytes, b".")
            op = encode_op("put", key, v)
            kop = KvOp(c, "put", key, value=v)
        elif x < 0.75:
            op = encode_op("delete", key)
            kop = KvOp(c, "delete", key)
        else:
            v = f"v{c}-{self.op_counter}".encode().ljust(self.sc.value_bytes, b".")
            exp = self.known_value.get((c, key))
            op = encode_op("cas", key, exp, v)
            kop = KvOp(c, "cas", key, value=v, expected=exp)
        kop.invoke = self.now
        cl = self.clients[c]
        t = cl.invoke(op, ro, self.now)
        # every timestamp this op may be ordered under (a read-only fallback takes the next one)
        self.oracles.issued.add((c, t, op))
        self.oracles.issued.add((c, t + 1, op))
        self.current[c] = kop
        self.history.append(kop)
        if flush:
            self._flush(c)
            self._schedule_wake(c)

    def _bench_op(self, c: int) -> tuple[bytes, bool, KvOp]:
        """The operation of a micro-benchmark (``SimConfig.bench``: argument bytes, result bytes,
        read-only), on the client's own key: a put of the argument's size, or a get (of a value of
        the result's size, put by the client's first operation)."""
        assert self.sc.bench is not None
        arg, res, ro = self.sc.bench
        key = b"b%d" % c
        if res and self.known_value.get((c, key)) is None:
            v = b"r".ljust(res, b".")
            return encode_op("put", key, v), False, KvOp(c, "put", key, value=v)
        if res or ro:
            return encode_op("get", key), ro, KvOp(c, "get", key)
        v = b"v".ljust(arg, b".")
        return encode_op("put", key, v), False, KvOp(c, "put", key, value=v)

    def _client_outcomes(self, c: int) -> None:
        cl = self.clients[c]
        for oc in cl.take_outcomes():
            kop = self.current.pop(c)
            kop.ret = self.now
            try:
                status, value = decode_result(oc.result)
            except ValueError:
                self.oracles.violation(f"client {c} accepted a malformed result")
                continue
            if status != "ok":
                self.oracles.violation(f"client {c} got an error result {value!r} for a valid operation")
            kop.result = value
            if not (cl.read_only and not oc.read_only_fallback) or oc.read_only_fallback:
                self.acked_ordered[c] = oc.timestamp
            if kop.kind == "get":
                self.known_value[(c, kop.key)] = value
            elif kop.kind == "put":
                self.known_value[(c, kop.key)] = kop.value
            elif kop.kind == "delete":
                self.known_value[(c, kop.key)] = None
            elif kop.kind == "cas" and value:
                self.known_value[(c, kop.key)] = kop.value
            self._next_op(c)

    # ---- main loop ----------------------------------------------------------
    def run(self) -> RunResult:
        n = self.sc.replicas
        self._schedule_faults()
        for r in range(n):
            self._schedule_wake(r)
        for c in self.client_ids:
            self._next_op(c)
        for c in self.byz_clients:
            self._schedule_wake(c)
        live_deadline = self.fault_end + self.sc.liveness_bound_ms
        finish_at: Optional[float] = None
        liveness: Optional[str] = None
        oracles = self.oracles
        while self.heap:
            t, _, kind, a, b, c = heapq.heappop(self.heap)
            self.now = t
            oracles.now = t
            self.events += 1
            if kind == DELIVER:
                if a in self.crashed or len(self.replicas) <= a < self.slots:
                    continue  # (nobody runs that replica id (yet): lost)
                node = self._node(a)
                if a < self.slots:
                    if not self.healed and (c, a) in self.blocked:
                        continue
                    if self.chains is not None and b[:6] == CHAIN_MAGIC:
                        self.chains.on_frame(a, b, c)
                        continue
                    if self.sc.cost is not None:
                        self._cpu_enqueue(a, b, c)
                        continue
                    self.cur_src = c
                    if self._spoofed(a, b, c):
                        node.count_drop(Drop.SPOOFED_CLIENT)
                    else:
                        node.receive(b, self._local(a))
                    if a not in self.byz:
                        oracles.after_step(node)
                        self._invariants(node)
                elif a in self.clients:
                    if self.cpus is not None:
                        self.cpus.client_frame(a, b)  # (its outcomes when the client process takes it)
                        continue
                    node.receive(b, self.now)
                    self._client_outcomes(a)
                elif self.admin is not None and a == self.admin.id:
                    node.receive(b, self.now)
                    self.admin.on_outcomes()
                else:
                    node.receive(b, self.now)
                self._flush(a)
                self._schedule_wake(a)
            elif kind == WAKE:
                if a in self.crashed or self.wake_at.get(a) != t:
                    continue
                del self.wake_at[a]
                node = self._node(a)
                node.tick(self._local(a))
                if a < self.slots:
                    if a not in self.byz:
                        oracles.after_step(node)
                        self._invariants(node)
                elif a in self.clients:
                    self._client_outcomes(a)
                elif self.admin is not None and a == self.admin.id:
                    self.admin.on_outcomes()
                self._flush(a)
                self._schedule_wake(a)
            elif kind == CPU:
                if self.cpus is not None:
                    self.cpus.step(a)
                else:
                    self._cpu_run(a)
            elif kind == CHAIN:
                assert self.chains is not None
                self.chains.on_timer(a, b)
            elif kind == INVOKE:
                if self.cpus is not None:
                    self.cpus.client_invoke(a)
                else:
                    self._invoke(a)
            elif kind == FAULT:
                self._fault(a, b)
                if a == "heal":
                    for cc in self.client_ids:
                        if cc not in self.current and self.remaining[cc] <= 0 and self.audit[cc]:
                            self._next_op(cc)
            if self.events > self.max_events:
                liveness = f"event budget of {self.max_events} exhausted at t={self.now:.0f}ms (message storm?)"
                break
            if finish_at is None:
                if all(v == 0 for v in self.remaining.values()) and not self.current and self.healed \
                        and not any(self.audit.values()):
                    # the quiet tail: no client sends anything from here on
                    self.quiet_since = self.now
                    finish_at = self.now + self.sc.quiesce_ms
                elif self.now > live_deadline:
                    busy = sorted(self.current)
                    liveness = (f"L1 {len(busy)} client operation(s) incomplete "
                                f"{self.sc.liveness_bound_ms:.0f}ms after healing")
                    break
            elif self.now >= finish_at:
                # clients are done; give a view change still in progress time to finish (its
                # timeout may have grown) before judging convergence
                idle = self.sc.idle_bound_ms
                if self._convergence() is None and (idle is None or self._idle_convergence() is None):
                    break
                if idle is not None and self.now > self.quiet_since + idle:
                    liveness = self._idle_convergence()
                    break
                if self.now > live_deadline:
                    break
                finish_at = self.now + (self.sc.quiesce_ms if idle is None else 100.0)
        if liveness is None:
            liveness = self._convergence()
        violations = list(oracles.violations)
        violations += self._final_checks()
        if self.chains is not None:
            violations += self.chains.final_checks(liveness is None)
        ops = sum(1 for k in self.history if k.ret is not None)
        return RunResult(self.sc.seed, ops, len(oracles.views_installed), violations, liveness,
                         self.now, self.events, self.messages, self.log)

    def _settled(self) -> list:
        """Replicas that should hold the final state: active in the view most replicas are in.

        A replica that timed out alone (e.g. behind a partition) waits in a higher
        view for the others to join; PBFT lets it lag until the next view change,
        so it is exempt from convergence (at most f replicas may be exempt).
        """
        good = [self.replicas[i] for i in self.correct if i not in self.exempt]
        views = [r.view for r in good if r.view_active]
        if not views:
            return []
        v = max(set(views), key=views.count)
        return [r for r in good if r.view_active and r.view == v]

    def _convergence(self) -> Optional[str]:
        """After healing and quiescence a quorum of replicas holds the same state."""
        if self.recovering:
            return f"L2 recoveries not ended: replicas {sorted(self.recovering)}"
        settled = self._settled()
        # a correct replica may wait alone in a higher view (see _settled); with f Byzantine
        # replicas that leaves f+1 settled correct ones, which must agree with each other
        needed = min(self.cfg.quorum_weight, self.cfg.weight_of(self.correct))
        if self.byz or self.exempt:
            needed = min(needed, self.cfg.weak_weight)
        if self.cfg.weight_of(r.id for r in settled) < needed:
            return (f"L1 no quorum settled in one view: views "
                    f"{[(r.view, r.view_active) for r in self.replicas]}")
        last = {r.last_committed_exec for r in settled}
        if len(last) != 1:
            return f"L1 replicas did not converge: last executed {sorted(r.last_committed_exec for r in self.replicas)}"
        return None

    def _idle_convergence(self) -> Optional[str]:
        """L3: on an idle cluster every correct replica is active in one view, has the same last
        committed execution and holds nothing tentative: none is left alone in a view change or
        behind (a cluster that stays split until the next client request has lost a replica)."""
        reps = [self.replicas[i] for i in self.correct]
        views = sorted({(r.view, r.view_active) for r in reps})
        last = sorted({(r.last_committed_exec, r.last_exec) for r in reps})
        busy = [r.id for r in reps if r.fetch_target is not None or r.needs_state or r.recovering is not None]
        if len(views) == 1 and views[0][1] and len(last) == 1 and last[0][0] == last[0][1] and not busy:
            return None
        t = self.now - self.quiet_since
        return (f"L3 idle cluster not converged {t:.0f}ms into the quiet tail: (view, active) "
                f"{[(r.view, r.view_active) for r in reps]}, last executed "
                f"{[(r.last_committed_exec, r.last_exec) for r in reps]} of replicas {[r.id for r in reps]}"
                f"{f', busy {busy}' if busy else ''}")

    def _final_checks(self) -> list[str]:
        out = []
        settled = self._settled()
        # (a replica still holding tentative executions is ahead of its committed state)
        quiet = [r for r in settled if r.last_exec == r.last_committed_exec]
        last = {r.last_committed_exec for r in quiet}
        if len(last) == 1:
            states = {r.state_digest() for r in quiet}
            if len(states) != 1:
                out.append("S1 replicas executed to the same sequence number but hold different states")
        # S6: every acknowledged ordered operation is in the reply table of every settled replica
        # (the final audit reads, checked for linearizability below, show its effect survived)
        for r in settled:
            for c, t in self.acked_ordered.items():
                got = r.last_reply.get(c, (0,))[0]
                if got < t:
                    out.append(f"S6 replica {r.id} lost acknowledged operation of client {c} timestamp {t}")
                    break
                if got > self.clients[c].timestamp:
                    out.append(f"S6 replica {r.id} holds a reply for client {c} timestamp {got} never issued")
        lin = check_kv_history(self.history)
        if not lin.ok:
            out.append(f"S5 history not linearizable for key {lin.key!r}: {lin.detail[:300]}")
        return out
