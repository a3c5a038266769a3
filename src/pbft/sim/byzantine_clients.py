"""Byzantine clients for the simulator.

Each holds a real client identity (its keys) and abuses it.  They write only
to their own keys (``b"x..."``) so the correct clients' history stays
checkable for linearizability; what they may break is everything else:
exactly-once execution, liveness, the view, memory bounds.

============================  ==================================================
``bad-auth-primary``          authenticators valid only at the current primary
``bad-auth-all``              authenticators valid nowhere
``ts-reuse``                  a timestamp reused with another operation
``ts-reset``                  timestamps restart from 1 now and then
``ts-max``                    the largest timestamp there is
``shared-id``                 two processes share one client id and its keys
``flood``                     100x the request rate, oversized requests, and
                              requests under ids with no valid key
``spoof-correct-ids``         as fast as it can, requests under the correct
                              clients' own ids, timestamps just ahead of theirs
                              (and far ahead), authenticators under keys nobody has
``replay-correct-frames``     as fast as it can, replays of the correct
                              clients' genuine request frames (valid MACs),
                              those still waiting to execute above all
============================  ==================================================

They act during the fault phase only; after healing they fall silent so that
liveness can be judged.
"""

from __future__ import annotations

import random
from typing import Optional

from ..codec import U63, frame_digest, header_of, packb
from ..crypto import MAC_SIZE
from ..messages import ALL_REPLICAS, Request
from ..services.kv import encode_op


class ByzClient:
    name = "byzantine-client"
    interval_ms = 5.0

    def __init__(self, sim, cid: int, rng: random.Random):
        self.sim = sim
        self.id = cid
        self.rng = rng
        self.keys = sim.rings[cid]
        self.n = sim.cfg.n
        self.t = 0
        self.out: list[tuple] = []
        self.next_at = rng.uniform(0.0, 20.0)
        self.sent = 0

    # driver interface
    def receive(self, raw: bytes, now: float) -> None:
        pass  # replies are ignored: the attack does not care

    def next_deadline(self) -> Optional[float]:
        if self.sim.healed:
            return None
        return self.next_at

    def tick(self, now: float) -> None:
        if self.sim.healed or now < self.next_at:
            return
        self.next_at = now + self.interval_ms
        self.act(now)

    def take_sends(self) -> list[tuple]:
        out, self.out = self.out, []
        return out

    def restart(self, now: float) -> None:
        pass

    # helpers
    def op(self) -> bytes:
        key = f"x{self.id}-{self.rng.randrange(3)}".encode()
        return encode_op("put", key, self.rng.randbytes(8))

    def frame(self, req: Request, auth_ok=lambda r: True) -> bytes:
        """A request frame whose MAC entry for replica r is valid iff auth_ok(r)."""
        tag, sender, header, payload = header_of(req)
        d = frame_digest(tag, sender, header)
        auth = b"".join(self.keys.mac_for(r, d) if auth_ok(r) else bytes(MAC_SIZE) for r in range(self.n))
        self.sim.oracles.issued.add((req.client, req.timestamp, req.op))
        return packb([tag, sender, header, payload, auth])

    def send_all(self, raw: bytes) -> None:
        self.out.append((tuple(range(self.n)), raw))
        self.sent += 1

    def primary(self) -> int:
        views = sorted(self.sim.replicas[r].view for r in self.sim.correct)
        return views[len(views) // 2] % self.n

    def act(self, now: float) -> None:
        raise NotImplementedError


class BadAuthPrimary(ByzClient):
    name = "bad-auth-primary"

    def act(self, now):
        self.t += 1
        p = self.primary()
        self.send_all(self.frame(Request(self.id, self.t, self.op(), False, 0), lambda r: r == p))


class BadAuthAll(ByzClient):
    name = "bad-auth-all"

    def act(self, now):
        self.t += 1
        self.send_all(self.frame(Request(self.id, self.t, self.op(), False, 0), lambda r: False))


class TsReuse(ByzClient):
    name = "ts-reuse"

    def act(self, now):
        if self.t == 0 or self.rng.random() < 0.5:
            self.t += 1
        self.send_all(self.frame(Request(self.id, self.t, self.op(), False, self.rng.randrange(self.n))))


class TsReset(ByzClient):
    name = "ts-reset"

    def act(self, now):
        self.t = 1 if self.rng.random() < 0.2 else self.t + 1
        self.send_all(self.frame(Request(self.id, self.t, self.op(), False, ALL_REPLICAS)))


class TsMax(ByzClient):
    name = "ts-max"

    def act(self, now):
        t = U63 if self.rng.random() < 0.5 else U63 - self.rng.randrange(3)
        self.send_all(self.frame(Request(self.id, t, self.op(), False, 0)))


class SharedId(ByzClient):
    """Two processes with one identity: each keeps its own timestamp counter."""

    name = "shared-id"

    def __init__(self, sim, cid, rng):
        super().__init__(sim, cid, rng)
        self.t2 = 0

    def act(self, now):
        if self.rng.random() < 0.5:
            self.t += 1
            t = self.t
        else:
            self.t2 += 1
            t = self.t2
        self.send_all(self.frame(Request(self.id, t, self.op(), False, ALL_REPLICAS)))


class Flood(ByzClient):
    name = "flood"
    interval_ms = 0.5  # ~100x a correct client's rate

    def act(self, now):
        rng = self.rng
        k = rng.randrange(3)
        self.t += 1
        if k == 0:  # a valid request, at a rate no correct client would use
            self.send_all(self.frame(Request(self.id, self.t, self.op(), False, 0)))
        elif k == 1:  # oversized: at the request size limit
            big = encode_op("put", f"x{self.id}-big".encode(),
                            rng.randbytes(min(30_000, self.sim.cfg.request_size_bytes_max - 64)))
            self.send_all(self.frame(Request(self.id, self.t, big, False, 0)))
        else:  # requests under ids this process has no key for: its MACs cannot be right
            fake = rng.choice(list(self.sim.cfg.client_ids))
            req = Request(fake, rng.randint(1, 1000), self.op(), False, 0)
            tag, sender, header, payload = header_of(req)
            self.send_all(packb([tag, sender, header, payload, rng.randbytes(MAC_SIZE * self.n)]))


class SpoofCorrectIds(ByzClient):
    """What a keyless attacker on the network does to the clients it sees: requests under a
    *correct* client's id, with a timestamp just ahead of the one it uses (so they look new) or far
    ahead, and random authenticators. The simulator has no connections, so nothing binds a
    principal to where its frames come from (the runtime's defence): the core's own rules must
    keep them from costing more than their handling."""

    name = "spoof-correct-ids"
    interval_ms = 0.25
    burst = 2

    def act(self, now):
        rng = self.rng
        ids = list(self.sim.clients)
        if not ids:
            return
        for _ in range(self.burst):
            c = rng.choice(ids)
            ts = self.sim.clients[c].timestamp
            t = ts + (rng.randint(1, 3) if rng.random() < 0.8 else rng.randint(1_000, 1_000_000))
            op = encode_op("put", f"x{self.id}-spoof".encode(), rng.randbytes(8))
            tag, sender, header, payload = header_of(Request(c, t, op, False, rng.randrange(self.n)))
            self.send_all(packb([tag, sender, header, payload, rng.randbytes(MAC_SIZE * self.n)]))


class ReplayCorrectFrames(ByzClient):
    """Replays what it captured of the correct clients' traffic: their genuine request frames
    (valid MACs), most of them requests still waiting to be executed (a replica holds them in
    ``known``, as a sniffer would have them), the rest older ones. Nothing it sends was not sent
    by a correct client first, so the oracles' validity check holds whatever is executed."""

    name = "replay-correct-frames"
    interval_ms = 0.25
    burst = 2

    def __init__(self, sim, cid, rng):
        super().__init__(sim, cid, rng)
        self.captured: list[bytes] = []

    def act(self, now):
        rng = self.rng
        sim = self.sim
        src = sim.replicas[sim.correct[0]] if sim.correct else None
        if src is None:
            return
        pending = [ri.raw for c, ri in src.requests.known.items() if c in sim.clients and ri.verified]
        if pending and rng.random() < 0.1:
            self.captured.append(rng.choice(pending))
            if len(self.captured) > 512:
                del self.captured[:256]
        for _ in range(self.burst):
            if pending and (rng.random() < 0.7 or not self.captured):
                raw = rng.choice(pending)
            elif self.captured:
                raw = rng.choice(self.captured)
            else:
                return
            self.send_all(raw)


CLIENT_BEHAVIOURS = {c.name: c for c in (BadAuthPrimary, BadAuthAll, TsReuse, TsReset, TsMax, SharedId, Flood,
                                         SpoofCorrectIds, ReplayCorrectFrames)}


def make_byz_clients(sim, specs, first_id: int) -> dict:
    out = {}
    for i, name in enumerate(specs):
        cid = first_id + i
        cls = CLIENT_BEHAVIOURS.get(name)
        if cls is None:
            raise ValueError(f"unknown Byzantine client {name!r}; known: {', '.join(sorted(CLIENT_BEHAVIOURS))}")
        out[cid] = cls(sim, cid, random.Random(f"{sim.sc.seed}/byzclient/{cid}"))
    return out
