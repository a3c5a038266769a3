"""A hand-driven cluster for transcript tests: messages move FIFO, time moves when told.

``drop`` is a predicate ``(src, dst, raw) -> bool`` deciding which messages the
network loses, so a test can cut links, isolate a replica, or lose one
message type.
"""

from __future__ import annotations

from collections import deque

from pbft.codec import Codec
from pbft.config import ClusterConfig
from pbft.core.client import Client
from pbft.core.durability import deferrable
from pbft.core.events import Event
from pbft.core.replica import Replica
from pbft.crypto import keyrings_for
from pbft.services.kv import KVService, decode_result, encode_op
from pbft.storage.memory import MemStore


class Cluster:
    def __init__(self, n: int = 4, clients: int = 2, service=KVService, durable: bool | None = None,
                 genesis_config: bytes = b"", defer_commits: bool = False, **cfg_kw):
        """``service``: what builds each replica's service, or a list of n of them (replica i runs
        the i-th: replicas of different implementations). ``durable``: None keeps replicas in
        memory only; True/False gives each a simulated disk (``MemStore``) in the durable or fast
        mode, written before every send. ``genesis_config``: the configuration object's initial
        value (``pbft.core.reconfig.genesis_record``). ``defer_commits``: as the runtime's durable
        mode, a step's records that are only ``k`` records (``core.durability.deferrable``) are
        kept in the process (``deferred``) and written with its next write, not before the
        step's sends; a restart loses them."""
        self.genesis_config = genesis_config
        self.cfg = ClusterConfig.create(n, clients_max=clients, **cfg_kw)
        self.rings = keyrings_for(b"test-master-key-0123456789abcdef", self.cfg.client_base, self.cfg.client_ids)
        self.now = 0.0
        self.events: list[tuple[int, Event]] = []  # (replica, event) from every Ready
        self.services = list(service) if isinstance(service, (list, tuple)) else [service] * n
        assert len(self.services) == n, "one service per replica"
        self.service = self.services[0]
        self.replicas = [Replica(self.cfg, i, self.rings[i], self.services[i](), genesis_config=genesis_config)
                         for i in range(n)]
        self.stores = [MemStore(durable=durable) for _ in range(n)] if durable is not None else None
        self.defer_commits = defer_commits
        self.deferred: list[dict] = [{} for _ in range(n)]
        self.on_sends = None  # a test's check of each replica step's sends (pid, sends), after its write
        if self.stores:
            for r in self.replicas:
                r.enable_persistence()
        self.clients = [Client(self.cfg, c, self.rings[c]) for c in self.cfg.client_ids]
        self.codec = Codec(self.cfg)
        self.net: deque = deque()
        self.down: set[int] = set()
        self.drop = lambda src, dst, raw: False
        self.delivered = 0

    def node(self, pid):
        return self.replicas[pid] if pid < self.cfg.n else self.clients[pid - self.cfg.client_base]

    def restart(self, i: int, rng=None, power_loss: bool = False, torn: bool = False, recover: bool = False) -> str:
        """Replica i's process dies and starts again from its store (after losing its
        unsynced writes if ``power_loss``), and with ``recover`` begins a proactive
        recovery; returns what ``restore`` said."""
        store = self.stores[i]
        self.deferred[i] = {}  # (in the dead process's memory)
        if power_loss:
            store.power_loss(rng, torn=torn)
        r = Replica(self.cfg, i, self.rings[i], self.services[i](), now=self.now, genesis_config=self.genesis_config)
        r.enable_persistence()
        records, damaged = store.load()
        outcome = r.restore(records, damaged)
        self.replicas[i] = r
        self.net = type(self.net)((s, d, raw) for s, d, raw in self.net if d != i and s != i)
        if recover or r.recovery_marker:
            self.recovery_nonce = getattr(self, "recovery_nonce", 1_000_000) + 1
            r.begin_recovery(self.now, self.recovery_nonce)
        return outcome

    def collect(self):
        n = self.cfg.n
        for pid in list(range(n)) + [c.id for c in self.clients]:
            if pid < n:
                ready = self.replicas[pid].take_ready()
                if self.stores and ready.persist:
                    if self.defer_commits and deferrable(ready.persist):
                        self.deferred[pid].update(ready.persist)  # (the step's sends go now)
                    else:
                        self.stores[pid].write({**self.deferred[pid], **ready.persist})  # (before the sends)
                        self.deferred[pid] = {}
                sends = ready.sends
                if self.on_sends is not None:  # (what is on disk now, as the sends leave)
                    self.on_sends(pid, sends)
                self.events.extend((pid, ev) for ev in ready.events)
            else:
                sends = self.node(pid).take_sends()
            for dests, raw in sends:
                for d in dests:
                    self.net.append((pid, d, raw))

    def run(self, max_steps: int = 100_000):
        """Deliver messages until the network is empty (time does not move)."""
        self.collect()
        steps = 0
        while self.net and steps < max_steps:
            src, dst, raw = self.net.popleft()
            steps += 1
            if dst in self.down or src in self.down or self.drop(src, dst, raw):
                continue
            self.delivered += 1
            node = self.node(dst)
            node.receive(raw, self.now)
            if dst < self.cfg.n:
                node.invariants()
            self.collect()
        assert not self.net, "message storm: the network never drained"

    def advance(self, ms: float, step: float = 5.0):
        """Move time forward, firing timers and delivering what they send."""
        end = self.now + ms
        while self.now < end:
            self.now = min(end, self.now + step)
            for pid in list(range(self.cfg.n)) + [c.id for c in self.clients]:
                if pid in self.down:
                    continue
                node = self.node(pid)
                d = node.next_deadline()
                if d is not None and d <= self.now:
                    node.tick(self.now)
                    if pid < self.cfg.n:
                        node.invariants()
            self.run()

    def invoke(self, client: int, op: bytes, read_only: bool = False, max_ms: float = 20_000.0):
        """Run one operation to completion; returns the decoded result."""
        cl = self.clients[client]
        cl.invoke(op, read_only, self.now)
        self.run()
        waited = 0.0
        while cl.busy and waited < max_ms:
            self.advance(10.0)
            waited += 10.0
        assert not cl.busy, f"operation did not complete within {max_ms}ms"
        (out,) = cl.take_outcomes()
        return decode_result(out.result), out

    def write_keys(self, prefix: bytes, count: int, keys: int = 7) -> dict[bytes, bytes]:
        """``count`` puts from two clients in turn over ``keys`` keys; returns the last value
        acknowledged for each key."""
        acked = {}
        for i in range(count):
            k, v = prefix + b"%d" % (i % keys), b"v%d-%s" % (i, prefix)
            assert self.put(i % 2, k, v) == ("ok", True)
            acked[k] = v
        return acked

    def put(self, client, key: bytes, value: bytes):
        return self.invoke(client, encode_op("put", key, value))[0]

    def get(self, client, key: bytes, read_only=False):
        return self.invoke(client, encode_op("get", key), read_only)[0]

    def of_kind(self, kind, replica=None):
        return [ev for r, ev in self.events if ev.kind == kind and (replica is None or r == replica)]
