"""Byzantine replicas for the simulator: small named strategies, pluggable per replica.

A Byzantine replica wraps the real ``Replica`` of its identity (so it holds the
real keys and a plausible state) and deviates in what it sends, what it
accepts, or both.  The simulator drives a behaviour exactly like a replica
(``receive``/``tick``/``next_deadline``/``take_ready``); the sends of its
``Ready`` may be ``(destinations, bytes, extra_delay_ms)``.  Messages a behaviour
forges are sealed with the Byzantine replica's own keys, so they pass MAC
checks: the protocol itself must reject them.

Byzantine replicas' traces are not checked by the oracles; the correct
replicas' are, as always.

Behaviours (``BEHAVIOURS``):

======================  =====================================================
``silent``              sends nothing (a crash that never restarts)
``slow``                delays everything it sends to just under the view-change
                        timeout; as primary, batches of one request
``equivocate``          as primary, sends pre-prepares with different batches to
                        different backups
``mutate``              ByzzFuzz small-scope mutations of single messages: view
                        +-1, sequence number +-1, altered digest or request,
                        omission, an earlier message repeated, reply result altered
``replay``              also re-sends its genuine old messages, across views and
                        checkpoints
``forge-view-change``   fabricated and per-receiver inconsistent ViewChange
                        messages; as new primary, NewView messages whose decision
                        does not follow from the view changes
``seq-abuse``           as primary, sequence numbers above the high water mark,
                        near 2^63, skipped and reused
``censor``              as primary, ignores every request of one client
``flood``               sends junk bytes and valid but useless messages to all
``vouch-flood``         Vouch messages full of random keys, and its own repeated
``recovery-flood``      recovery requests with ever new timestamps, vouched by itself
``recovery-ts-ahead``   while compromised, recovery requests under its identity with
                        timestamps far ahead (2^63-1, ten minutes, just inside the
                        replicas' clock bound); then evicted: a genuine recovery
``claim-stuck``         claims for ever to be alone in a view change (Status and
                        ViewChange for the view above the cluster's)
``lure-checkpoint``     otherwise correct, sends every replica that lags beyond its window
                        checkpoint votes for a bogus digest just beyond that window
``corrupt-state``       serves corrupt state to replicas fetching a checkpoint and
                        announces wrong checkpoint digests
``wrong-results``       replies to clients with altered results
``view-storm``          pushes view changes for ever higher views
``hold-and-silent``     sends its commits to one replica only, then goes silent (S-18)
``twins``               two correct copies under one identity, each talking to a
                        different part of the cluster, changing every round
``twins-amnesia``       twins, and one twin restarts with an empty log mid-run
======================  =====================================================
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Optional

from ..codec import TAG, U63, DecodeError, result_digest, seal
from ..core.ready import Ready
from ..core.replica import Replica
from ..messages import (
    Batch, Checkpoint, Commit, Data, Fetch, MetaData, NewView, PrePrepare, Prepare, Reply, Request, Status,
    ViewChange, ViewChangeAck, Vouch,
)
from ..services.kv import KVService


class Behaviour:
    """An honest replica; subclasses deviate by overriding the hooks."""

    name = "honest"

    def __init__(self, sim, rid: int, rng: random.Random):
        self.sim = sim
        self.rid = rid
        self.rng = rng
        self.node: Replica = sim.replicas[rid]
        self.keys = sim.rings[rid]
        self.codec = sim.codec
        self.cfg = sim.cfg
        self.history: list[bytes] = []
        self.extra: list[tuple] = []

    # -- driver interface -------------------------------------------------
    def receive(self, raw: bytes, now: float) -> None:
        if self.accept(raw):
            self.node.receive(raw, now)

    def tick(self, now: float) -> None:
        self.node.tick(now)
        self.on_tick(now)

    def next_deadline(self) -> Optional[float]:
        return self.node.next_deadline()

    def restart(self, now: float) -> None:
        self.node.restart(now)

    def take_ready(self) -> Ready:
        ready = self.node.take_ready()
        out = []
        for dests, raw in ready.sends:
            if len(self.history) < 2000:
                self.history.append(raw)
            out.extend(self.transform(dests, raw))
        out.extend(self.extra)
        self.extra = []
        return Ready(ready.persist, out, ready.events, ready.refresh_keys)

    # -- hooks ------------------------------------------------------------
    def accept(self, raw: bytes) -> bool:
        return True

    def transform(self, dests: tuple, raw: bytes) -> list[tuple]:
        return [(dests, raw)]

    def on_tick(self, now: float) -> None:
        pass

    # -- helpers ----------------------------------------------------------
    def parse(self, raw: bytes):
        try:
            return self.codec.parse(self.codec.open_frame(raw))
        except DecodeError:
            return None

    def seal(self, msg, to: Optional[int] = None) -> bytes:
        return seal(msg, self.keys, to=to)

    @property
    def others(self) -> tuple:
        return self.node.others

    def is_primary(self) -> bool:
        return self.node.is_primary


class Silent(Behaviour):
    name = "silent"

    def transform(self, dests, raw):
        return []


class Slow(Behaviour):
    name = "slow"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.node.cfg = replace(self.node.cfg, batch_requests_max=1, batches_in_flight_max=1)

    def transform(self, dests, raw):
        delay = self.cfg.view_change_timeout_ms * self.rng.uniform(0.6, 0.9)
        return [(dests, raw, delay)]


def _alt_batch(b: Batch, rng: random.Random) -> Batch:
    """A different batch built from the same genuine requests."""
    reqs = list(b.requests)
    if len(reqs) > 1 and rng.random() < 0.5:
        rng.shuffle(reqs)
        if tuple(reqs) == b.requests:
            reqs = reqs[1:]
    elif reqs:
        reqs = reqs[:-1]
    nondet = b.nondet if rng.random() < 0.7 or len(b.nondet) != 8 else \
        (int.from_bytes(b.nondet, "big") + 1).to_bytes(8, "big")
    return Batch(nondet, tuple(reqs))


class Equivocate(Behaviour):
    name = "equivocate"

    def transform(self, dests, raw):
        if raw[:2] != b"\x95\x03":
            return [(dests, raw)]
        pp = self.parse(raw)
        if pp is None or pp.batch is None:
            return [(dests, raw)]
        alt = _alt_batch(pp.batch, self.rng)
        try:
            d2 = self.codec.batch_digest(alt)
        except DecodeError:
            return [(dests, raw)]
        raw2 = self.seal(replace(pp, digest=d2, batch=alt))
        ds = list(dests)
        self.rng.shuffle(ds)
        half = len(ds) // 2
        return [(tuple(ds[:half]), raw), (tuple(ds[half:]), raw2)]


class Mutate(Behaviour):
    """Small-scope mutations (ByzzFuzz): one field of one message, per receiver."""

    name = "mutate"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.p = rng.uniform(0.05, 0.4)

    def transform(self, dests, raw):
        if self.rng.random() >= self.p:
            return [(dests, raw)]
        out = []
        for d in dests:
            m = self.mutate(raw, d)
            if m is not None:
                out.append(((d,), m))
        return out

    KINDS = ("view", "seqno", "digest", "request", "omit", "repeat", "result")

    def mutate(self, raw: bytes, dest: int, kind: Optional[str] = None) -> Optional[bytes]:
        rng = self.rng
        msg = self.parse(raw)
        if msg is None:
            return raw
        kind = kind or rng.choice(self.KINDS)
        if kind == "omit":
            return None
        if kind == "repeat" and self.history:
            return rng.choice(self.history)
        to = dest if type(msg) in (Reply, Fetch, MetaData, Data) else None
        delta = rng.choice([-1, 1])
        try:
            if kind == "view" and hasattr(msg, "view"):
                msg = replace(msg, view=max(0, msg.view + delta))
            elif kind == "seqno" and hasattr(msg, "seqno"):
                msg = replace(msg, seqno=max(1, msg.seqno + delta))
            elif kind == "digest" and hasattr(msg, "digest"):
                msg = replace(msg, digest=rng.randbytes(32))
            elif kind == "request" and isinstance(msg, PrePrepare) and msg.batch is not None:
                alt = _alt_batch(msg.batch, rng)
                msg = replace(msg, batch=alt, digest=self.codec.batch_digest(alt))
            elif kind == "request" and isinstance(msg, ViewChange):
                msg = replace(msg, prepared=msg.prepared[1:], preprepared=msg.preprepared[1:])
            elif kind == "result" and isinstance(msg, Reply):
                res = (msg.result or b"") + b"\x01"
                msg = replace(msg, result=res, result_digest=result_digest(res))
            elif kind == "digest" and isinstance(msg, Reply):
                msg = replace(msg, result_digest=rng.randbytes(32), result=None)
            else:
                return raw
            return self.seal(msg, to=to)
        except (DecodeError, ValueError, KeyError):
            return raw


class MutateOne(Mutate):
    """Exactly one small-scope mutation (ByzzFuzz): the first message of one type sent after a
    chosen round gets one mutation. Type and mutation are enumerated from the seed, so seeds
    0..69 cover every (message type, mutation) pair; the round is drawn from the seed."""

    name = "mutate-one"
    TYPES = (PrePrepare, Prepare, Commit, Checkpoint, ViewChange, ViewChangeAck, NewView, Reply, Status, Vouch)

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        seed = sim.sc.seed
        self.target = self.TYPES[seed % len(self.TYPES)]
        self.kind = self.KINDS[(seed // len(self.TYPES)) % len(self.KINDS)]
        self.at = rng.uniform(5.0, max(10.0, min(sim.fault_end, 800.0)))
        self.done = False

    def transform(self, dests, raw):
        if self.done or self.node.now < self.at:
            return [(dests, raw)]
        msg = self.parse(raw)
        if type(msg) is not self.target:
            return [(dests, raw)]
        self.done = True
        self.sim._note(f"replica {self.rid}: one {self.kind} mutation of a {self.target.__name__}")
        out = []
        for d in dests:
            m = self.mutate(raw, d, self.kind)
            if m is not None:
                out.append(((d,), m))
        return out


class Replay(Behaviour):
    name = "replay"

    def on_tick(self, now):
        if self.history and self.rng.random() < 0.5:
            raw = self.rng.choice(self.history)
            self.extra.append((self.others, raw))

    def transform(self, dests, raw):
        out = [(dests, raw)]
        if self.history and self.rng.random() < 0.2:
            out.append((dests, self.rng.choice(self.history), self.rng.uniform(0, 200)))
        return out


class ForgeViewChange(Behaviour):
    name = "forge-view-change"

    def transform(self, dests, raw):
        msg = self.parse(raw)
        rng = self.rng
        if isinstance(msg, ViewChange):
            out = []
            for d in dests:  # a different story for every receiver
                h = msg.stable_seqno
                fake = tuple(sorted({(h + rng.randint(1, self.cfg.log_window_seqnos), rng.randbytes(32),
                                      rng.randrange(max(1, msg.view))) for _ in range(rng.randint(0, 3))},
                                    key=lambda x: x[0]))
                seen = set()
                fake = tuple(x for x in fake if not (x[0] in seen or seen.add(x[0])))
                vc = replace(msg, prepared=fake, preprepared=fake + msg.preprepared[:2])
                out.append(((d,), self.seal(vc)))
            return out
        if isinstance(msg, NewView):
            out = []
            for d in dests:
                chosen = list(msg.chosen)
                if chosen and rng.random() < 0.5:
                    i = rng.randrange(len(chosen))
                    chosen[i] = (chosen[i][0], rng.randbytes(32))
                else:
                    chosen.append((msg.checkpoint_seqno + self.cfg.log_window_seqnos // 2, rng.randbytes(32)))
                out.append(((d,), self.seal(replace(msg, chosen=tuple(chosen)))))
            return out
        return [(dests, raw)]

    def on_tick(self, now):
        if self.rng.random() < 0.02:
            self.node._start_view_change(self.node.view + 1, "byzantine")


class SeqAbuse(Behaviour):
    name = "seq-abuse"

    def transform(self, dests, raw):
        msg = self.parse(raw)
        if not isinstance(msg, PrePrepare) or msg.batch is None:
            return [(dests, raw)]
        rng = self.rng
        h, L = self.node.low_water_mark, self.cfg.log_window_seqnos
        choice = rng.choice(["above-H", "near-2^63", "skip", "reuse", "keep"])
        if choice == "keep":
            return [(dests, raw)]
        if choice == "above-H":
            n = h + L + rng.randint(1, 10)
        elif choice == "near-2^63":
            n = U63 - rng.randint(0, 3)
        elif choice == "skip":
            n = msg.seqno + rng.randint(2, 5)
        else:
            alt = _alt_batch(msg.batch, rng)
            return [(dests, raw), (dests, self.seal(replace(msg, seqno=max(1, msg.seqno - 1), batch=alt,
                                                            digest=self.codec.batch_digest(alt))))]
        return [(dests, self.seal(replace(msg, seqno=n)))]


class Censor(Behaviour):
    name = "censor"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.victim = sim.client_ids[0]

    def accept(self, raw):
        try:
            fr = self.codec.open_frame(raw)
        except DecodeError:
            return True
        return not (fr.tag == TAG[Request] and fr.sender == self.victim)


class Flood(Behaviour):
    name = "flood"

    def next_deadline(self):
        d = self.node.next_deadline()
        nxt = self.node.now + 2.0
        return nxt if d is None else min(d, nxt)

    def on_tick(self, now):
        rng = self.rng
        node = self.node
        for _ in range(3):
            k = rng.randrange(6)
            if k == 0:
                raw = rng.randbytes(rng.randint(1, 300))
            elif k == 1:
                raw = self.seal(Status(node.view, rng.random() < 0.5, rng.randrange(100), rng.randrange(100), self.rid))
            elif k == 2:
                at = node.low_water_mark + self.cfg.checkpoint_interval_seqnos * rng.randint(1, 1000)
                raw = self.seal(Checkpoint(at, rng.randbytes(32), self.rid))
            elif k == 3:
                raw = self.seal(Prepare(node.view, max(1, node.low_water_mark + rng.randint(-5, 5)), rng.randbytes(32),
                                        self.rid))
            elif k == 4:
                raw = self.seal(ViewChangeAck(node.view + rng.randint(1, 3), self.rid, rng.randrange(self.cfg.n),
                                              rng.randbytes(32)))
            else:
                raw = rng.choice(self.history) if self.history else rng.randbytes(10)
            self.extra.append((self.others, raw))


class VouchFlood(Behaviour):
    """Vouch messages, valid MACs, as fast as it can: each full of random keys (vouches for
    requests nobody sent), and its genuine vouches repeated. Against a replica whose vouch table
    is shared by all senders, the random keys evict the correct replicas' vouches (requests are
    never certified, view changes follow); against one that re-checks every held pre-prepare per
    Vouch, the work grows with the log."""

    name = "vouch-flood"
    keys_per_message = 1024

    def next_deadline(self):
        d = self.node.next_deadline()
        nxt = self.node.now + 1.0
        return nxt if d is None else min(d, nxt)

    def on_tick(self, now):
        rng = self.rng
        for _ in range(2):
            keys = tuple(rng.randbytes(32) for _ in range(self.keys_per_message))
            self.extra.append((self.others, self.seal(Vouch(self.rid, keys))))
        mine = [raw for raw in self.history[-50:] if raw[:2] == b"\x95\x0f"]
        if mine:
            self.extra.append((self.others, rng.choice(mine)))


class RecoveryFlood(Behaviour):
    """Recovery requests (a replica's only request: valid MACs, a plausible recovery point, each
    with a new timestamp) as fast as it can, with its own vouches for them. Unchecked, each one is
    ordered and executed, and in the runtime every correct replica refreshes its session keys on
    each."""

    name = "recovery-flood"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.nonce = 1_000
        self.sent = 0

    def next_deadline(self):
        d = self.node.next_deadline()
        nxt = self.node.now + 2.0
        return nxt if d is None else min(d, nxt)

    def on_tick(self, now):
        import msgpack

        from ..codec import vouch_key
        from ..messages import ALL_REPLICAS, RECOVERY_OP

        node = self.node
        self.nonce += 1
        self.sent += 1
        point = node.low_water_mark + self.cfg.log_window_seqnos
        req = Request(self.rid, self.nonce, RECOVERY_OP + msgpack.packb(point), False, ALL_REPLICAS)
        self.extra.append((self.others, self.seal(req)))
        self.extra.append((self.others, self.seal(Vouch(self.rid, (vouch_key(req),)))))


class RecoveryTimestampAhead(Behaviour):
    """An intruder in the replica has recovery requests ordered under its identity with timestamps
    as far ahead as it can (ten minutes ahead of the clocks, then 2^63-1 and just inside the
    replicas' clock bound), vouched by itself, so that the replica's later genuine recovery request
    looks old; then the intruder is evicted: the replica begins a genuine recovery (its log
    distrusted, as after a reboot) and behaves honestly from there on. That recovery must end (the
    scenario's check): requests beyond the replicas' clock bound are refused, and the recovering
    replica timestamps its request again from its clock until it passes the one the intruder had
    ordered."""

    name = "recovery-ts-ahead"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        t = rng.uniform(50.0, 150.0)
        # (apart by more than the admission interval, half a view-change timeout)
        gap = sim.cfg.view_change_timeout_ms * 0.6
        self.at = (t, t + gap, t + gap + rng.uniform(20.0, 200.0))
        self.phase = 0  # 0, 1: sending the requests, 2: recovering (honest again)

    def next_deadline(self):
        d = self.node.next_deadline()
        if self.phase > 2:
            return d
        nxt = self.at[self.phase] + self.sim.skew[self.rid]  # (our local clock)
        return nxt if d is None else min(d, nxt)

    def _send(self, timestamps) -> None:
        import msgpack

        from ..codec import vouch_key
        from ..messages import ALL_REPLICAS, RECOVERY_OP

        node, cfg = self.node, self.cfg
        for ts in timestamps:
            req = Request(self.rid, ts, RECOVERY_OP + msgpack.packb(node.low_water_mark + cfg.log_window_seqnos), False,
                          ALL_REPLICAS)
            self.extra.append((self.others, self.seal(req)))
            self.extra.append((self.others, self.seal(Vouch(self.rid, (vouch_key(req),)))))

    def on_tick(self, now):
        if self.phase > 2 or self.sim.now < self.at[self.phase]:
            return
        cfg = self.cfg
        # the slowest clock among the replicas: each timestamp just inside its bound everywhere
        clock_us = int((self.sim.now + min(self.sim.skew) + self.node.wall_offset_ms) * 1000)
        if self.phase == 0:
            self._send((clock_us + int(cfg.timestamp_skew_ms_max * 1000) - 1000,))
        elif self.phase == 1:
            self._send((U63, clock_us + int(cfg.nondet_skew_ms_max * 1000) - 1000))
        else:
            self.sim.seq += 1
            self.node.begin_recovery(now, 10_000_000 + self.sim.seq)
            self.sim._note(f"replica {self.rid}: the intruder is evicted, a genuine recovery begins")
        self.phase += 1


class ClaimStuck(Behaviour):
    """Claims for ever to be alone in a view change: its Status says it is changing to the view
    above the cluster's, and it sends a genuine-looking ViewChange for that view, again and again
    (the idle-rejoin rule must bound the view changes this buys it)."""

    name = "claim-stuck"

    def transform(self, dests, raw):
        if raw[:2] == b"\x95\x07":  # its honest Status is replaced by the claim
            return []
        return [(dests, raw)]

    def on_tick(self, now):
        node = self.node
        v = max(node.view, max((self.sim.replicas[r].view for r in self.sim.correct), default=0)) + 1
        ck, lwm = node.checkpoints.committed, node.low_water_mark
        self.extra.append((self.others, self.seal(Status(v, False, lwm, node.last_committed_exec, self.rid, b""))))
        vc = ViewChange(v, self.rid, lwm, ((lwm, ck[lwm]),) if lwm in ck else (), (), ())
        self.extra.append((self.others, self.seal(vc)))


LURE_DIGEST = b"\x66" * 32


class LureCheckpoint(Behaviour):
    """Otherwise correct; to every replica whose low water mark is a log window or more behind
    its own, a checkpoint vote for a bogus digest at the first checkpoint beyond that replica's
    window: with as many accomplices as the lagging replica's f + 1 (a membership change it
    missed may have made them that many), a weak certificate of the thresholds it knows."""

    name = "lure-checkpoint"

    def _lagging(self, j: int) -> bool:
        sim = self.sim
        return j != self.rid and j not in sim.crashed and j < len(sim.replicas) \
            and self.node.low_water_mark - sim.replicas[j].low_water_mark >= sim.genesis_cfg.log_window_seqnos

    lured = 0  # votes sent

    def _lure(self, j: int) -> tuple:
        self.lured += 1
        g = self.sim.genesis_cfg
        far = self.sim.replicas[j].low_water_mark + g.log_window_seqnos + g.checkpoint_interval_seqnos
        return ((j,), self.seal(Checkpoint(far, LURE_DIGEST, self.rid)))

    def transform(self, dests, raw):
        if raw[:2] != b"\x95\x06":
            return [(dests, raw)]
        lag = [j for j in dests if self._lagging(j)]  # (its genuine votes: to the others only)
        rest = tuple(j for j in dests if j not in lag)
        return ([(rest, raw)] if rest else []) + [self._lure(j) for j in lag]

    def on_tick(self, now):
        self.extra.extend(self._lure(j) for j in range(len(self.sim.replicas)) if self._lagging(j))


class CorruptState(Behaviour):
    name = "corrupt-state"

    def transform(self, dests, raw):
        msg = self.parse(raw)
        if isinstance(msg, Data) and msg.objs:
            k = self.rng.randrange(len(msg.objs))
            i, v = msg.objs[k]
            v = bytearray(v or b"\x00")
            v[self.rng.randrange(len(v))] ^= 0xFF
            objs = msg.objs[:k] + ((i, bytes(v)),) + msg.objs[k + 1:]
            return [(dests, self.seal(replace(msg, objs=objs), to=dests[0]))]
        if isinstance(msg, MetaData) and msg.children:
            k = self.rng.randrange(len(msg.children))
            children = msg.children[:k] + (self.rng.randbytes(32),) + msg.children[k + 1:]
            return [(dests, self.seal(replace(msg, children=children), to=dests[0]))]
        if isinstance(msg, Checkpoint):
            return [(dests, self.seal(replace(msg, digest=self.rng.randbytes(32))))]
        return [(dests, raw)]

    def receive(self, raw, now):
        msg = self.parse(raw)
        if isinstance(msg, Fetch):
            # serve something for any checkpoint asked for: made-up digests or corrupt objects
            if msg.want:
                objs = tuple((i, self.rng.randbytes(self.rng.randrange(1, 64))) for i in msg.want)
                reply = Data(msg.seqno, msg.level, msg.index, objs, self.rid)
            else:
                width = self.rng.randrange(1, 8)
                reply = MetaData(msg.seqno, msg.level, msg.index, tuple(self.rng.randbytes(32) for _ in range(width)),
                                 self.rid)
            self.extra.append(((msg.replica,), self.seal(reply, to=msg.replica)))
            return
        self.node.receive(raw, now)


class WrongResults(Behaviour):
    name = "wrong-results"

    def transform(self, dests, raw):
        msg = self.parse(raw)
        if isinstance(msg, Reply):
            res = b"\x92\xa2ok\xc4\x05WRONG"
            return [(dests, self.seal(replace(msg, result=res, result_digest=result_digest(res)), to=dests[0]))]
        return [(dests, raw)]


class ViewStorm(Behaviour):
    name = "view-storm"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.v = 0

    def on_tick(self, now):
        if self.rng.random() < 0.3:
            node = self.node
            self.v = max(self.v, node.view) + self.rng.randint(1, 1000)
            ck, lwm = node.checkpoints.committed, node.low_water_mark
            vc = ViewChange(self.v, self.rid, lwm, ((lwm, ck[lwm]),) if lwm in ck else (), (), ())
            self.extra.append((self.others, self.seal(vc)))


class HoldAndSilent(Behaviour):
    name = "hold-and-silent"

    def __init__(self, sim, rid, rng):
        super().__init__(sim, rid, rng)
        self.silent_at = rng.uniform(100.0, max(150.0, sim.fault_end))
        self.friend = rng.choice(sim.correct)

    def transform(self, dests, raw):
        if self.node.now >= self.silent_at:
            return []
        if raw[:2] == b"\x95\x05":  # commits go to one replica only
            return [((self.friend,), raw)]
        return [(dests, raw)]


class TwinsGroup:
    """Twins: every Byzantine identity runs as two honest replicas, A and B.

    Each round (a random 30-200 ms) every correct replica is put on side A, side
    B, or both; twin X talks only to replicas on its side, and a client's
    message reaches one twin chosen at random, so the twins build different
    batches.  With f twins this is the equivocation of Twins (Diem); with f+1 it
    is the negative control that must break agreement.
    """

    def __init__(self, sim, ids: list[int], rng: random.Random, amnesia: bool = False):
        self.sim = sim
        self.ids = ids
        self.rng = rng
        self.amnesia = amnesia
        self.twins: dict[int, list[Replica]] = {}
        for t in ids:
            b = Replica(sim.cfg, t, sim.rings[t], KVService(skew_ms=sim.cfg.nondet_skew_ms_max), now=0.0)
            self.twins[t] = [sim.replicas[t], b]
        self.sides: dict[int, str] = {}
        self.round_end = 0.0
        self.amnesia_at = rng.uniform(100.0, max(120.0, sim.fault_end)) if amnesia else None
        self.side_of_raw: dict[bytes, int] = {}
        self.nodes = {t: _TwinNode(self, t) for t in ids}

    def _new_round(self, now: float) -> None:
        rng = self.rng
        plan = self.sim.sc.twins_plan
        if plan and not self.sim.healed:
            # an enumerated schedule: round 1 uses the plan's sides, then every correct replica
            # hears both twins (maximal equivocation) until the network heals
            if self.round_end == 0.0:
                self.sides = dict(zip(self.sim.correct, plan))
                self.round_end = now + 200.0
            else:
                self.sides = {r: "AB" for r in self.sim.correct}
                self.round_end = float("inf") if not self.sim.healed else self.round_end
            return
        if self.sim.healed:
            # after healing twin B falls silent: the identity behaves like one (possibly odd) replica
            self.sides = {r: "A" for r in self.sim.correct}
            self.round_end = float("inf")
            return
        self.sides = {r: rng.choice("AB") if rng.random() < 0.8 else "AB" for r in self.sim.correct}
        self.round_end = now + rng.uniform(30.0, 200.0)

    def _check_round(self) -> None:
        now = self.sim.now
        if now >= self.round_end or (self.sim.healed and self.round_end != float("inf")):
            self._new_round(now)
        if self.amnesia_at is not None and now >= self.amnesia_at:
            self.amnesia_at = None
            for t in self.ids:  # twin B loses everything it knew
                self.twins[t][1] = Replica(self.sim.cfg, t, self.sim.rings[t],
                                           KVService(skew_ms=self.sim.cfg.nondet_skew_ms_max), now=now)
            self.sim._note("twins: twin B restarts with an empty log")


class _TwinNode:
    """The simulator's view of one twinned identity."""

    def __init__(self, group: TwinsGroup, t: int):
        self.g = group
        self.t = t

    def _local(self) -> float:
        return self.g.sim._local(self.t)

    def receive(self, raw: bytes, now: float) -> None:
        g = self.g
        g._check_round()
        src = g.sim.cur_src
        a, b = g.twins[self.t]
        if src >= g.sim.cfg.n:  # a client: one twin at random
            (a if g.rng.random() < 0.5 else b).receive(raw, now)
        elif src in g.twins:  # another twinned identity: the twin on the sender's side
            side = g.side_of_raw.get(raw, 0)
            (a, b)[side].receive(raw, now)
        else:
            sides = g.sides.get(src, "A")
            if "A" in sides:
                a.receive(raw, now)
            if "B" in sides and not g.sim.healed:
                b.receive(raw, now)

    def tick(self, now: float) -> None:
        self.g._check_round()
        for x in self.g.twins[self.t]:
            d = x.next_deadline()
            if d is not None and d <= now:
                x.tick(now)

    def next_deadline(self) -> Optional[float]:
        ds = [d for d in (x.next_deadline() for x in self.g.twins[self.t]) if d is not None]
        return min(ds) if ds else None

    def restart(self, now: float) -> None:
        for x in self.g.twins[self.t]:
            x.restart(now)

    def take_ready(self) -> Ready:
        g = self.g
        g._check_round()
        out = []
        events: list = []
        for side_i, x in enumerate(g.twins[self.t]):
            side = "AB"[side_i]
            ready = x.take_ready()
            if side_i == 0:
                events = ready.events  # (twin A is the simulator's replica: its events, as before)
            for dests, raw in ready.sends:
                if side == "B" and g.sim.healed:
                    continue
                ds = []
                for d in dests:
                    if d >= g.sim.cfg.n:
                        ds.append(d)
                    elif d in g.twins:
                        g.side_of_raw[raw] = side_i
                        ds.append(d)
                    elif side in g.sides.get(d, "A"):
                        ds.append(d)
                if ds:
                    out.append((tuple(ds), raw))
        if len(g.side_of_raw) > 5000:
            g.side_of_raw.clear()
        return Ready(sends=out, events=events)


BEHAVIOURS = {cls.name: cls for cls in (
    Behaviour, Silent, Slow, Equivocate, Mutate, MutateOne, Replay, ForgeViewChange, SeqAbuse, Censor, Flood,
    CorruptState, WrongResults, ViewStorm, HoldAndSilent, VouchFlood, RecoveryFlood, RecoveryTimestampAhead,
    ClaimStuck, LureCheckpoint)}
BEHAVIOUR_NAMES = sorted(set(BEHAVIOURS) | {"twins", "twins-amnesia"})


def make_behaviours(sim, specs) -> dict:
    """Simulator nodes for the Byzantine replicas of ``specs``: ((replica, name), ...)."""
    nodes: dict[int, object] = {}
    twins: dict[str, list[int]] = {}
    for rid, name in specs:
        rng = random.Random(f"{sim.sc.seed}/byz/{rid}")
        if name in ("twins", "twins-amnesia"):
            twins.setdefault(name, []).append(rid)
        elif name in BEHAVIOURS:
            nodes[rid] = BEHAVIOURS[name](sim, rid, rng)
        else:
            raise ValueError(f"unknown Byzantine behaviour {name!r}; known: {', '.join(BEHAVIOUR_NAMES)}")
    for name, ids in twins.items():
        group = TwinsGroup(sim, ids, random.Random(f"{sim.sc.seed}/twins"), amnesia=name == "twins-amnesia")
        nodes.update(group.nodes)
    return nodes
