"""The processes ``pbft attack`` starts besides the replicas: the correct workload and the attackers.

    python -m pbft.tools.attack workload SPEC     the closed-loop kv clients whose throughput is measured
    python -m pbft.tools.attack worker NAME SPEC  one attack, for SPEC["duration"] seconds, then exits

Both talk to the supervisor with JSON lines on stdout.  A worker says
``{"started": t}`` when its attack begins (after any setup, such as a key
exchange), ``{"done": t}`` when it ends (``t``: ``time.monotonic()``, the same
clock in every process of the machine), then ``{"summary": {...}}`` with what
it sent and the results of any checks it makes afterwards.  Every attacker
sends only to the cluster's own (loopback) addresses and stops by itself.

Nothing here trusts the replicas either: an attacker reads and discards what
comes back, and counts connection errors instead of raising.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import resource
import sys
import time
from array import array
from typing import Optional

import msgpack

from ...codec import seal
from ...crypto import KEY_SIZE, KeyRing
from ...messages import (ALL_REPLICAS, RECOVERY_OP, Batch, Checkpoint, Commit, PrePrepare, Prepare, QueryStable,
                        Request, Status, ViewChange, Vouch)
from ...runtime.cluster import load_cluster
from ...runtime.keys import NEWKEY_TAG, Identity, accept_newkey, fresh_key, make_newkey, now_timestamp_us
from ...runtime.transport import Counters, FrameConn, frame, pack_len
from ...services.kv import decode_result, encode_op

U63 = (1 << 63) - 1
CONNECT_TIMEOUT_S = 2.0
WRITE_BUFFER_HIGH = 1 << 20  # an attacker stops writing to a connection while this much is queued
# what writing to a connection the replica closed raises (uvloop: RuntimeError on a closed transport)
WRITE_ERRORS = (OSError, ConnectionError, RuntimeError)
LEGIT_INTERVAL_S = 0.5  # replay: between the recorded client's operations during the attack


def say(msg: dict) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def run_loop(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)  # an ImportError from inside the attack is the attack's error, not a fallback


# ---------------------------------------------------------------------------
# the correct workload
# ---------------------------------------------------------------------------

def workload_main(spec_json: str) -> int:
    """Closed-loop kv clients: each puts ``c<id>`` = ``<id>:<seq>`` with growing ``seq`` and every
    fourth operation reads it back (read-only); a read must return a value written at or after the
    last acknowledged put (and not after the last attempted one).  Runs until a line arrives on
    stdin, then checks every client's key with an ordered get and reports everything."""
    from ...runtime.client import ClientPool, PbftError

    spec = json.loads(spec_json)
    cluster = load_cluster(spec["dir"])
    ids = spec["clients"]
    timeout = spec.get("timeout_s", 5.0)

    async def main():
        pool = ClientPool(cluster, [cluster.identity(c) for c in ids])
        await pool.start(wait_s=30.0)
        deadline = time.monotonic() + 10.0
        while len(pool.connected()) < cluster.n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        t_done = array("d")
        lat = array("d")
        err_t = array("d")
        wrong: list[str] = []
        acked = {c: 0 for c in ids}
        attempted = {c: 0 for c in ids}
        stop = asyncio.Event()
        clock = time.monotonic

        def value_seq(c: int, res: bytes):
            """The seq of the value a get returned (0: absent); None if it is not a valid result."""
            try:
                st, v = decode_result(res)
            except ValueError:
                return None
            if st != "ok":
                return None
            if v is None:
                return 0
            try:
                who, seq = bytes(v).decode().split(":")
                return int(seq) if int(who) == c else None
            except (ValueError, UnicodeDecodeError):
                return None

        def check_read(c: int, res: bytes, where: str) -> bool:
            s = value_seq(c, res)
            if s is None or not acked[c] <= s <= attempted[c]:
                wrong.append(f"client {c} {where}: read {res!r}, expected a value written between "
                             f"seq {acked[c]} (last acknowledged) and {attempted[c]} (last attempted)")
                return False
            return True

        async def client(c: int) -> None:
            key = f"c{c}".encode()
            k = 0
            while not stop.is_set():
                k += 1
                read = k % 4 == 0
                if read:
                    op = encode_op("get", key)
                else:
                    seq = attempted[c] + 1
                    attempted[c] = seq
                    op = encode_op("put", key, f"{c}:{seq}".encode())
                t0 = clock()
                try:
                    res = await pool.invoke(c, op, read, timeout)
                except PbftError:
                    if not pool.closed:
                        err_t.append(clock())
                    continue
                t1 = clock()
                t_done.append(t1)
                lat.append(t1 - t0)
                if read:
                    check_read(c, res, "read-only get")
                else:
                    try:
                        ok = decode_result(res) == ("ok", True)
                    except ValueError:
                        ok = False
                    if not ok:
                        wrong.append(f"client {c}: put seq {seq} returned {res!r}")
                    acked[c] = max(acked[c], seq)

        tasks = [asyncio.ensure_future(client(c)) for c in ids]
        say({"ready": True, "t": clock()})

        async def progress() -> None:  # for the supervisor, which waits for the cluster to recover
            while not stop.is_set():
                say({"progress": len(t_done), "t": clock()})
                await asyncio.sleep(0.25)

        prog = asyncio.ensure_future(progress())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        stop.set()
        prog.cancel()
        await asyncio.wait(tasks, timeout=timeout + 1.0)
        for t in tasks:
            t.cancel()
        # every acknowledged write reads back: an ordered get per client
        verified, unverified = 0, []
        for c in ids:
            for attempt in range(3):
                try:
                    res = await pool.invoke(c, encode_op("get", f"c{c}".encode()), False, timeout)
                except PbftError as e:
                    if attempt == 2:
                        unverified.append(f"client {c}: final get failed: {e}")
                    continue
                if check_read(c, res, "final ordered get"):
                    verified += 1
                break
        await pool.close()
        say({"result": {
            "t_done": base64.b64encode(t_done.tobytes()).decode(),
            "lat": base64.b64encode(lat.tobytes()).decode(),
            "err_t": base64.b64encode(err_t.tobytes()).decode(),
            "wrong": wrong[:20], "wrong_count": len(wrong),
            "verified": verified, "unverified": unverified, "acked_writes": sum(acked.values()),
        }})

    run_loop(main())
    return 0


# ---------------------------------------------------------------------------
# attack context and helpers
# ---------------------------------------------------------------------------

class Ctx:
    def __init__(self, spec: dict):
        self.spec = spec
        self.cluster = load_cluster(spec["dir"])
        self.cfg = self.cluster.cfg
        self.n = self.cfg.n
        self.duration = float(spec["duration"])
        self.rng = random.Random(spec.get("seed", 1))
        self.stats: dict[str, int] = {}
        self.checks: dict[str, object] = {}
        self.t_end = float("inf")
        self.started = False
        self.finished = False
        # the replica frame limit: a longer length prefix closes the connection
        self.max_frame = self.cfg.message_size_bytes_max + 1024
        byz = spec.get("byz_id")
        self.targets = [r for r in self.cluster.replicas if r.id != byz]

    def start(self) -> None:
        now = time.monotonic()
        self.t_end = now + self.duration
        self.started = True
        say({"started": now})

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.t_end = min(self.t_end, time.monotonic())
            say({"done": time.monotonic()})

    def running(self) -> bool:
        return time.monotonic() < self.t_end

    def left(self) -> float:
        return max(0.0, self.t_end - time.monotonic())

    def count(self, k: str, v: int = 1) -> None:
        self.stats[k] = self.stats.get(k, 0) + v

    def current_view(self) -> tuple[int, int]:
        """(view, last executed) as some replica reports it, (0, 0) if none answers."""
        from ..net import fetch_status
        for r in self.targets:
            try:
                s = fetch_status(getattr(r, "metrics_addr", r.host), r.metrics_port, 1.0)
                return s["view"], s["last_executed"]
            except (OSError, ValueError, KeyError):
                continue
        return 0, 0


async def connect(ctx: Ctx, host: str, port: int):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        ctx.count("connect-failed")
        return None


async def discard(reader: asyncio.StreamReader, ctx: Ctx, key: str = "bytes-received") -> None:
    """Read and throw away whatever a replica sends on this connection, until it closes."""
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            ctx.count(key, len(data))
    except (OSError, asyncio.CancelledError):
        return


async def drained(ctx: Ctx, w: asyncio.StreamWriter) -> bool:
    """Wait until ``w``'s buffer drained, or the attack ended (False): a peer that stops reading
    (flow control) keeps an attacker waiting no longer than the attack."""
    try:
        await asyncio.wait_for(w.drain(), ctx.left() + 0.01)
    except asyncio.TimeoutError:
        return False
    return True


async def pump(ctx: Ctx, host: str, port: int, make, frames_per_conn: int, tail=None) -> None:
    """Fresh connections, each carrying ``frames_per_conn`` chunks from ``make()`` (then ``tail()``
    if given, e.g. bytes that break the framing), until the attack ends."""
    while ctx.running():
        rw = await connect(ctx, host, port)
        if rw is None:
            await asyncio.sleep(0.05)
            continue
        r, w = rw
        ctx.count("connections")
        reader = asyncio.ensure_future(discard(r, ctx))
        try:
            for _ in range(frames_per_conn):
                if not ctx.running() or reader.done():
                    break
                data = make()
                w.write(data)
                ctx.count("bytes-sent", len(data))
                if not await drained(ctx, w):
                    break
            if tail is not None and ctx.running() and not reader.done():
                w.write(tail())
                await drained(ctx, w)
        except WRITE_ERRORS:
            ctx.count("connection-reset")
        finally:
            reader.cancel()
            w.close()


def random_ring(ctx: Ctx, principal: int) -> KeyRing:
    """Session keys nobody else has: everything sealed with them carries wrong MACs."""
    return KeyRing(principal, ctx.cfg.client_base, {j: os.urandom(KEY_SIZE) for j in range(ctx.n)}, {})


# ---------------------------------------------------------------------------
# keyless attackers
# ---------------------------------------------------------------------------

async def atk_garbage(ctx: Ctx) -> None:
    """Random bytes and malformed frames on many connections."""
    rng = ctx.rng
    pk = msgpack.packb

    def junk(k: int) -> bytes:
        return rng.randbytes(k)

    kinds = [
        lambda: frame(junk(rng.randrange(0, 2048))),                                  # random frame body
        lambda: frame(b"\x95" + junk(rng.randrange(1, 512))),                          # msgpack array prefix, junk
        lambda: frame(b"\x95" + bytes([rng.randrange(1, 20)]) + junk(rng.randrange(1, 512))),  # plausible tag
        lambda: frame(pk([rng.randrange(1, 20), "sender", 1.5, None, [1, 2]])),       # wrong field types
        lambda: frame(pk([rng.randrange(1, 20), 1 << 40, b"", b"", b""])),            # sender out of range
        lambda: frame(pk([4, 0, b"\xc1" * 16, b"", bytes(16 * ctx.cfg.client_base)])),  # bad header inside
        lambda: frame(b"\x95\x01" + b"\x91" * 3000),                                  # deep nesting
        lambda: frame(b"\x95\x01\xdd\xff\xff\xff\xff"),                               # array of 2^32 elements
        lambda: frame(b"\x95\x01\x00\xc6\xff\xff\xff\xf0"),                           # bin of ~4 GiB
        lambda: frame(b"\x95\x10" + junk(rng.randrange(1, 1024))),                    # NewKey tag, junk
        lambda: frame(b""),                                                           # empty frame
    ]

    def make() -> bytes:
        return b"".join(rng.choice(kinds)() for _ in range(16))

    def tail() -> bytes:
        # end some connections with bytes that break the framing: an oversized length, or raw junk
        return pack_len(0xFFFFFFF0) + junk(64) if rng.random() < 0.5 else junk(rng.randrange(1, 4096))

    ctx.start()
    conns = ctx.spec.get("conns_per_replica", 8)
    await asyncio.gather(*(pump(ctx, r.host, r.port, make, 32, tail)
                           for r in ctx.targets for _ in range(conns)))


async def atk_forged_client_mac(ctx: Ctx) -> None:
    """Well-formed requests under the workload's real client ids, with MACs under keys nobody has;
    some forged NewKeys for those ids (signed by the wrong key) too.  Fresh connections."""
    rng = ctx.rng
    victims = ctx.spec["victims"]
    fakes = [Identity.generate(c) for c in victims]
    public = ctx.cluster.public
    n = ctx.n

    def make() -> bytes:
        out = []
        for _ in range(32):
            c = rng.choice(victims)
            if rng.random() < 0.05:
                fake = fakes[victims.index(c)]
                keys = {j: os.urandom(2 * KEY_SIZE) for j in range(n)}
                out.append(frame(make_newkey(fake, public, keys, now_timestamp_us())))
                continue
            ts = now_timestamp_us() + rng.choice([0, rng.randrange(1, 10 ** 6), rng.randrange(1, 10 ** 12), 1 << 62])
            req = Request(c, ts, encode_op("put", f"c{c}".encode(), b"forged"), rng.random() < 0.2,
                          rng.choice([ALL_REPLICAS] + list(range(n))))
            out.append(frame(seal(req, random_ring(ctx, c))))
        return b"".join(out)

    ctx.start()
    conns = ctx.spec.get("conns_per_replica", 4)
    await asyncio.gather(*(pump(ctx, r.host, r.port, make, 16) for r in ctx.targets for _ in range(conns)))


async def atk_forged_replica_mac(ctx: Ctx) -> None:
    """Prepares, commits, checkpoints, statuses, view changes and pre-prepares claiming every replica id
    (the receiver's own included), with MACs under keys nobody has."""
    rng = ctx.rng
    n = ctx.n
    view, last = ctx.current_view()

    def msg(s: int):
        d = rng.randbytes(32)
        seq = max(1, last + rng.randrange(-8, 64))
        k = rng.randrange(6)
        if k == 0:
            return Prepare(view, seq, d, s)
        if k == 1:
            return Commit(view, seq, d, s)
        if k == 2:
            return Checkpoint(seq, d, s)
        if k == 3:
            return Status(view + rng.choice([0, 1, 1000]), rng.random() < 0.5, seq, seq + 8, s,
                          rng.choice([b"", d]))
        if k == 4:
            return ViewChange(view + 1 + rng.randrange(4), s, 0, ((0, d),), (), ())
        return PrePrepare(view, seq, d, s, Batch(b"", ()))

    def make_for(target: int):
        def make() -> bytes:
            out = []
            for _ in range(32):
                s = target if rng.random() < 0.25 else rng.randrange(n)
                out.append(frame(seal(msg(s), random_ring(ctx, s))))
            return b"".join(out)
        return make

    ctx.start()
    conns = ctx.spec.get("conns_per_replica", 4)
    await asyncio.gather(*(pump(ctx, r.host, r.port, make_for(r.id), 16) for r in ctx.targets for _ in range(conns)))


class _RecordingConn(FrameConn):
    """A client connection that also records every chunk it sends (``meta["log"]``)."""

    __slots__ = ()

    def send(self, data: bytes) -> bool:
        log = self.meta.get("log")
        if log is not None and self.peer is not None:
            log.setdefault(self.peer[1], []).append(bytes(data))
        return FrameConn.send(self, data)


async def atk_replay(ctx: Ctx) -> None:
    """A legitimate client (spare id) whose sends are recorded -- NewKeys included; the recording is
    then replayed at high rate on new connections while the client goes on working."""
    from ...runtime.client import ClientPool, PbftError

    cid = ctx.spec["replay_id"]
    pool = ClientPool(ctx.cluster, [ctx.cluster.identity(cid)])
    log: dict[int, list[bytes]] = {}
    make_conn = pool._make_conn
    capturing = [True]

    def recording():
        c = make_conn()
        c.__class__ = _RecordingConn
        c.meta["log"] = log if capturing[0] else None
        return c

    pool._make_conn = recording  # type: ignore[method-assign]
    await pool.start(wait_s=10.0)
    key = f"replay{cid}".encode()
    legit = {"ok": 0, "errors": 0}

    async def invoke(i: int) -> None:
        try:
            await pool.invoke(cid, encode_op("put", key, str(i).encode()), False, 5.0)
            legit["ok"] += 1
        except PbftError:
            legit["errors"] += 1

    t_cap = time.monotonic() + min(1.0, max(0.3, ctx.duration / 4))
    i = 0
    while time.monotonic() < t_cap or i < 10:
        i += 1
        await invoke(i)
        if i > 200:
            break
    captured = {port: b"".join(chunks) for port, chunks in log.items()}
    ctx.checks["captured_bytes"] = sum(len(b) for b in captured.values())
    ctx.checks["captured_ops"] = legit["ok"]
    capturing[0] = False
    for lk in pool.links.values():
        if lk.conn is not None:
            lk.conn.meta["log"] = None
    ctx.start()

    async def legit_loop() -> None:
        # (two operations a second: enough to show the session still works during the replay,
        # little enough that its own work does not count against the workload's throughput)
        j = i
        while ctx.running():
            j += 1
            await invoke(j)
            await asyncio.sleep(LEGIT_INTERVAL_S)

    conns = ctx.spec.get("conns_per_replica", 4)
    blobs = [(r, captured.get(r.port)) for r in ctx.targets]
    tasks = [pump(ctx, r.host, r.port, (lambda b=b: b), 1 << 30) for r, b in blobs if b for _ in range(conns)]
    await asyncio.gather(legit_loop(), *tasks)
    ctx.finish()
    # afterwards the legitimate client still works
    ok = False
    for _k in range(3):
        try:
            await pool.invoke(cid, encode_op("get", key), False, 5.0)
            ok = True
            break
        except PbftError:
            continue
    ctx.checks["client_works_after"] = ok
    ctx.checks["legit_ops_during"] = legit["ok"]
    ctx.checks["legit_errors_during"] = legit["errors"]
    await pool.close()


async def atk_conn_flood(ctx: Ctx) -> None:
    """Connections to every replica up to and beyond its ``connections_max``, held idle; whatever the
    replica closes is opened again."""
    extra = ctx.spec.get("extra_conns", 128)
    want = ctx.cluster.runtime.connections_max + extra

    async def holder(host: str, port: int, delay: float) -> None:
        await asyncio.sleep(delay)
        while ctx.running():
            rw = await connect(ctx, host, port)
            if rw is None:
                await asyncio.sleep(0.2)
                continue
            r, w = rw
            ctx.count("connections")
            try:
                data = await asyncio.wait_for(r.read(1), ctx.left() + 0.01)
                if not data:
                    ctx.count("closed-by-replica")
            except asyncio.TimeoutError:
                pass
            except WRITE_ERRORS:
                ctx.count("closed-by-replica")
            finally:
                w.close()
            await asyncio.sleep(0.1)

    ctx.start()
    # opened at about 1000 per second per replica, so the listen backlog is not the limit
    await asyncio.gather(*(holder(r.host, r.port, k / 1000.0) for r in ctx.targets for k in range(want)))


async def atk_slow_frames(ctx: Ctx) -> None:
    """Connections that send the length header of a maximum-size frame, then trickle its body: some
    one byte a second (holding a connection and a partial frame each), others fast enough to reach
    90% of the frame by the end (what buffered partial frames cost in memory)."""
    slow = ctx.spec.get("slow_conns", 128)
    fill = ctx.spec.get("fill_conns", 144)
    max_frame = ctx.max_frame
    ticks = max(1, int(ctx.duration * 10))
    chunk = bytes(max(1, int(0.9 * max_frame / ticks)))

    async def conn(host: str, port: int, fast: bool, delay: float) -> None:
        await asyncio.sleep(delay)
        while ctx.running():
            rw = await connect(ctx, host, port)
            if rw is None:
                await asyncio.sleep(0.2)
                continue
            r, w = rw
            ctx.count("connections")
            reader = asyncio.ensure_future(discard(r, ctx))
            sent = 0
            try:
                w.write(pack_len(max_frame) + b"\x95")
                while ctx.running() and not reader.done() and sent + len(chunk) < max_frame - 1:
                    await asyncio.sleep(0.1 if fast else 1.0)
                    data = chunk if fast else b"\x00"
                    w.write(data)
                    sent += len(data)
                    ctx.count("bytes-sent", len(data))
                    if not await drained(ctx, w):
                        break
                if reader.done():
                    ctx.count("closed-by-replica")
            except WRITE_ERRORS:
                ctx.count("closed-by-replica")
            finally:
                reader.cancel()
                w.close()

    ctx.start()
    await asyncio.gather(*(conn(r.host, r.port, False, k / 500.0) for r in ctx.targets for k in range(slow)),
                         *(conn(r.host, r.port, True, k / 500.0) for r in ctx.targets for k in range(fill)))


async def atk_http_flood(ctx: Ctx) -> None:
    """GET /metrics and /status as fast as possible, from several connections per replica."""
    conns = ctx.spec.get("conns_per_replica", 4)

    async def loop(host: str, port: int, k: int) -> None:
        path = "/metrics" if k % 2 == 0 else "/status"
        req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        while ctx.running():
            rw = await connect(ctx, host, port)
            if rw is None:
                await asyncio.sleep(0.05)
                continue
            r, w = rw
            try:
                w.write(req)
                await w.drain()
                body = await asyncio.wait_for(r.read(), max(0.1, ctx.left() + 1.0))
                ctx.count("responses" if body.startswith(b"HTTP/1.1 200") else "bad-responses")
                ctx.count("bytes-received", len(body))
            except (*WRITE_ERRORS, asyncio.TimeoutError):
                ctx.count("connection-reset")
            finally:
                w.close()

    ctx.start()
    await asyncio.gather(*(loop(getattr(r, "metrics_addr", r.host), r.metrics_port, k)
                           for r in ctx.targets for k in range(conns)))


async def atk_http_slow(ctx: Ctx) -> None:
    """Many connections to the metrics endpoint sending a request slowly: half one byte every half
    second, half a complete header line every 3 s forever (each line within the server's per-line
    timeout, the request never ending)."""
    conns = ctx.spec.get("conns_per_replica", 128)
    line = b"GET /metrics HTTP/1.1\r\n"

    async def conn(host: str, port: int, k: int) -> None:
        await asyncio.sleep(k / 500.0)
        by_byte = k % 2 == 0
        while ctx.running():
            rw = await connect(ctx, host, port)
            if rw is None:
                await asyncio.sleep(0.2)
                continue
            r, w = rw
            ctx.count("connections")
            reader = asyncio.ensure_future(discard(r, ctx))
            try:
                if by_byte:
                    for b in line * 1000:
                        if not ctx.running() or reader.done():
                            break
                        w.write(bytes([b]))
                        await w.drain()
                        await asyncio.sleep(0.5)
                else:
                    w.write(line)
                    while ctx.running() and not reader.done():
                        await asyncio.sleep(3.0)
                        w.write(b"X-Slow: a\r\n")
                        await w.drain()
                if reader.done():
                    ctx.count("closed-by-replica")
            except WRITE_ERRORS:
                ctx.count("closed-by-replica")
            finally:
                reader.cancel()
                w.close()

    ctx.start()
    await asyncio.gather(*(conn(getattr(r, "metrics_addr", r.host), r.metrics_port, k)
                           for r in ctx.targets for k in range(conns)))


async def check_identity(ctx: Ctx, cid: int, what: str) -> None:
    """A genuine client with identity ``cid`` completes a request (records ``ctx.checks[what]``)."""
    from ...runtime.client import ClientPool, PbftError

    pool = ClientPool(ctx.cluster, [ctx.cluster.identity(cid)])
    await pool.start(wait_s=10.0)
    ok, err = False, None
    for _attempt in range(2):
        try:
            await pool.invoke(cid, encode_op("get", b"identity-check"), False, 5.0)
            ok = True
            break
        except PbftError as e:
            err = str(e)
    await pool.close()
    ctx.checks[what] = ok
    if not ok:
        ctx.checks[what + "_error"] = err


async def atk_big_timestamp(ctx: Ctx) -> None:
    """An authenticated client hurting itself: a NewKey and a request with timestamp 2^63-1 under a
    spare client id whose keys the attacker has.  Afterwards a genuine request from that identity
    must still complete (``checks["identity_works_after"]``)."""
    cid = ctx.spec["bigts_id"]
    ident = ctx.cluster.identity(cid)
    ring = KeyRing(cid, ctx.cfg.client_base, {}, {})  # (a MAC per replica slot)
    keys = {}
    for r in ctx.cluster.replicas:
        k_out, k_in = fresh_key(), fresh_key()
        ring.out_keys[r.id] = k_out
        ring.in_keys[r.id] = k_in
        keys[r.id] = k_out + k_in
    # a NewKey at the largest timestamp (which, accepted, would lock the identity's key changes
    # out), and a valid NewKey now carrying the same keys, so that the request at the largest
    # timestamp (which, executed, would make every later request of the identity "old") carries
    # a valid MAC either way
    nk = frame(make_newkey(ident, ctx.cluster.public, keys, U63)) + \
        frame(make_newkey(ident, ctx.cluster.public, keys, now_timestamp_us()))
    req = frame(seal(Request(cid, U63, encode_op("put", b"big-timestamp", b"1"), False, ALL_REPLICAS), ring))
    ctx.start()
    held = []
    for r in ctx.cluster.replicas:
        rw = await connect(ctx, r.host, r.port)
        if rw is None:
            continue
        rd, w = rw
        try:
            w.write(nk + req)
        except WRITE_ERRORS:
            ctx.count("connection-reset")
            continue
        ctx.count("frames-sent", 3)
        held.append((asyncio.ensure_future(discard(rd, ctx, "reply-bytes")), w))
    await asyncio.sleep(ctx.left())
    for t, w in held:
        t.cancel()
        w.close()
    ctx.finish()
    await check_identity(ctx, cid, "identity_works_after")


# ---------------------------------------------------------------------------
# an authenticated client
# ---------------------------------------------------------------------------

async def atk_client_flood(ctx: Ctx) -> None:
    """Clients with valid keys (the spare ids) sending valid requests -- growing timestamps, no
    waiting for replies -- as fast as the connections take them."""
    ids = ctx.spec["flood_ids"]
    rng = ctx.rng
    n = ctx.n
    rings, newkeys = {}, []
    for cid in ids:
        ring = KeyRing(cid, ctx.cfg.client_base, {}, {})  # (a MAC per replica slot)
        keys = {}
        for j in range(n):
            k_out, k_in = fresh_key(), fresh_key()
            ring.out_keys[j] = k_out
            ring.in_keys[j] = k_in
            keys[j] = k_out + k_in
        rings[cid] = ring
        newkeys.append(frame(make_newkey(ctx.cluster.identity(cid), ctx.cluster.public, keys, now_timestamp_us())))
    conns = []
    for r in ctx.targets:
        rw = await connect(ctx, r.host, r.port)
        if rw is not None:
            rd, w = rw
            try:
                w.write(b"".join(newkeys))
            except WRITE_ERRORS:
                continue
            conns.append((asyncio.ensure_future(discard(rd, ctx, "reply-bytes")), w))
    await asyncio.sleep(0.2)
    ts = {cid: now_timestamp_us() for cid in ids}
    ops = {cid: encode_op("put", f"flood{cid}".encode(), b"v" * 16) for cid in ids}
    ctx.start()
    while ctx.running() and conns:
        out = []
        for cid in ids:
            ts[cid] += 1
            req = Request(cid, ts[cid], ops[cid], False, rng.randrange(n))
            out.append(frame(seal(req, rings[cid])))
        data = b"".join(out)
        ctx.count("requests-sent", len(out))
        for t, w in list(conns):
            if t.done() or w.is_closing():
                conns.remove((t, w))
                continue
            try:
                w.write(data)
            except WRITE_ERRORS:
                conns.remove((t, w))
        try:
            # (a replica that paces our requests stops reading: TCP then makes us wait, up to the end)
            await asyncio.wait_for(asyncio.gather(*(w.drain() for _, w in conns)), max(0.05, ctx.left()))
        except asyncio.TimeoutError:
            ctx.count("drain-timeout")
            break
        except WRITE_ERRORS:
            ctx.count("connection-reset")
    for t, w in conns:
        t.cancel()
        w.transport.abort()  # what was not sent yet is discarded


# ---------------------------------------------------------------------------
# a Byzantine replica
# ---------------------------------------------------------------------------

class ByzReplica:
    """Replica ``byz_id``'s identity and keys in an attacker's hands: it listens on that replica's
    port, takes the others' NewKeys (so it knows the keys to MAC with), sends its own, and then
    sends whatever the attack wants, with valid authenticators.  With ``lie``, it also answers the
    clients' requests with wrong results (``_lie``)."""

    def __init__(self, ctx: Ctx, lie: bool = False):
        from ...codec import Codec
        self.ctx = ctx
        self.lie = lie
        self.codec = Codec(ctx.cfg)
        self.view = 0
        c = ctx.cluster
        self.me = ctx.spec["byz_id"]
        self.ident = c.identity(self.me)
        self.ring = KeyRing(self.me, ctx.cfg.client_base, {}, {})  # (a MAC per replica slot)
        self.counters = Counters()
        self.newkey_ts: dict[int, int] = {}
        self.out: dict[int, FrameConn] = {}
        self.server: Optional[asyncio.Server] = None
        self.max_principal = ctx.cfg.max_principal

    def _conn(self) -> FrameConn:
        return FrameConn(self._on_frame, self.counters, self.ctx.max_frame, 1 << 30, 64 << 20)

    def _on_frame(self, conn: FrameConn, raw: bytes) -> None:
        from ...codec import DecodeError
        if len(raw) >= 2 and raw[1] == 1 and self.lie:
            self._lie(conn, raw)
            return
        if len(raw) < 2 or raw[1] != NEWKEY_TAG:
            self.ctx.count("frames-ignored")
            return
        try:
            sender, k = accept_newkey(raw, self.ident, self.ctx.cluster.public, self.ctx.n, self.max_principal,
                                      self.newkey_ts)
        except DecodeError:
            self.ctx.count("newkeys-rejected")
            return
        if sender < self.ctx.n:
            self.ring.out_keys[sender] = k
            self.ctx.count("newkeys-from-replicas")
        else:  # a client: the keys both ways, as a replica keeps them
            self.ring.in_keys[sender] = k[:KEY_SIZE]
            self.ring.out_keys[sender] = k[KEY_SIZE:]

    def _lie(self, conn: FrameConn, raw: bytes) -> None:
        """Answer a client's request with a committed reply, valid MAC, wrong result: a value the
        client never wrote for a get, a refusal for a put.  The client must not accept it (it
        needs f+1 matching committed replies), so the workload sees no wrong result."""
        from ...codec import DecodeError, result_digest
        from ...messages import Reply
        try:
            _, req = self.codec.open_authenticated(raw, None)  # a liar: it need not check the MAC
        except DecodeError:
            return
        if (not isinstance(req, Request) or req.client not in self.ring.out_keys
                or not self.ctx.cfg.is_client(req.client)):
            return
        try:
            op = msgpack.unpackb(req.op, raw=False)
            kind, key = op[0], op[1]
        except (ValueError, TypeError, IndexError, msgpack.UnpackException):
            return
        if kind == "get":
            who = bytes(key).decode(errors="replace").lstrip("c")
            res = msgpack.packb(["ok", f"{who}:999999999".encode()], use_bin_type=True)
        else:
            res = msgpack.packb(["ok", False], use_bin_type=True)
        view = getattr(self, "view", 0)
        rep = Reply(view, req.timestamp, req.client, self.me, False, req.read_only, result_digest(res), res)
        conn.send(frame(seal(rep, self.ring, to=req.client)))
        self.ctx.count("lying-replies")

    async def setup(self, timeout: float = 20.0) -> bool:
        ctx = self.ctx
        self.view = ctx.current_view()[0]
        loop = asyncio.get_running_loop()
        me = ctx.cluster.replicas[self.me]
        self.server = await loop.create_server(self._conn, me.host, me.port, reuse_address=True, backlog=512)
        for j in range(ctx.n):
            if j != self.me:
                self.ring.in_keys[j] = fresh_key()
        nk = frame(make_newkey(self.ident, ctx.cluster.public, dict(self.ring.in_keys), now_timestamp_us()))
        deadline = time.monotonic() + timeout
        for r in ctx.targets:
            while r.id not in self.out and time.monotonic() < deadline:
                try:
                    _, conn = await asyncio.wait_for(loop.create_connection(self._conn, r.host, r.port),
                                                     CONNECT_TIMEOUT_S)
                    conn.send(nk)
                    self.out[r.id] = conn
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.1)
        while time.monotonic() < deadline and not all(r.id in self.ring.out_keys for r in ctx.targets):
            await asyncio.sleep(0.05)
        ok = all(r.id in self.ring.out_keys for r in ctx.targets)
        ctx.checks["keys_exchanged"] = ok
        return ok

    async def flood(self, make) -> None:
        """Until the attack ends: ``make()`` -> frames (already framed) to every other replica."""
        ctx = self.ctx
        while ctx.running():
            data = make()
            busy = True
            for _j, conn in self.out.items():
                t = conn.transport
                if conn.closed or t is None or t.is_closing():
                    continue
                if t.get_write_buffer_size() < WRITE_BUFFER_HIGH:
                    t.write(data)
                    ctx.count("bytes-sent", len(data))
                    busy = False
            await asyncio.sleep(0.002 if busy else 0)

    def close(self) -> None:
        for c in self.out.values():
            c.close()
        if self.server is not None:
            self.server.close()


async def _byz(ctx: Ctx, build) -> None:
    b = ByzReplica(ctx)
    try:
        if not await b.setup():
            ctx.count("setup-failed")
        make = build(b)
        ctx.start()
        await b.flood(make)
    finally:
        b.close()


async def atk_replica_vouch_flood(ctx: Ctx) -> None:
    """Vouch messages for many random request keys (up to the codec's limit per message)."""
    def build(b: ByzReplica):
        def make() -> bytes:
            blob = os.urandom(32 * 4096)
            keys = tuple(blob[i:i + 32] for i in range(0, len(blob), 32))
            ctx.count("messages", 1)
            return frame(seal(Vouch(b.me, keys), b.ring))
        return make
    await _byz(ctx, build)


async def atk_replica_status_flood(ctx: Ctx) -> None:
    """Status messages, as fast as possible: plausible, future views, inactive views, far-off seqnos."""
    view, last = ctx.current_view()
    rng = ctx.rng

    def build(b: ByzReplica):
        def make() -> bytes:
            out = []
            for _ in range(64):
                v = view + rng.choice([0, 0, 1, rng.randrange(2, 1 << 20)])
                stable = max(0, last + rng.choice([0, -128, 128, rng.randrange(1 << 30)]))
                out.append(frame(seal(Status(v, rng.random() < 0.7, stable, stable + rng.randrange(256), b.me,
                                             rng.choice([b"", rng.randbytes(32)])), b.ring)))
            ctx.count("messages", len(out))
            return b"".join(out)
        return make
    await _byz(ctx, build)


async def atk_replica_recovery_flood(ctx: Ctx) -> None:
    """What a recovering replica sends, again and again: QueryStable with fresh nonces and recovery
    requests with growing timestamps (each one executed makes every replica refresh its keys)."""
    rng = ctx.rng
    _, last = ctx.current_view()

    def build(b: ByzReplica):
        ts = [now_timestamp_us()]

        def make() -> bytes:
            out = []
            for _ in range(16):
                out.append(frame(seal(QueryStable(b.me, rng.getrandbits(62)), b.ring)))
            ts[0] += 1
            h_m = last + rng.randrange(0, 1024)
            req = Request(b.me, ts[0], RECOVERY_OP + msgpack.packb(h_m), False, ALL_REPLICAS)
            out.append(frame(seal(req, b.ring)))
            ctx.count("messages", len(out))
            return b"".join(out)
        return make
    await _byz(ctx, build)


async def atk_replica_viewchange_flood(ctx: Ctx) -> None:
    """View-change messages for ever higher views."""
    view, _ = ctx.current_view()
    rng = ctx.rng

    def build(b: ByzReplica):
        nxt = [view + 1]

        def make() -> bytes:
            out = []
            for _ in range(32):
                ck = () if rng.random() < 0.5 else ((0, rng.randbytes(32)),)
                out.append(frame(seal(ViewChange(nxt[0], b.me, 0, ck, (), ()), b.ring)))
                nxt[0] += 1
            ctx.count("messages", len(out))
            return b"".join(out)
        return make
    await _byz(ctx, build)
    ctx.checks["highest_view_sent"] = view  # the start; the attack went on from there


async def atk_replica_wrong_replies(ctx: Ctx) -> None:
    """Replica 3 takes no part in the protocol but answers every client request it gets with a
    committed reply, valid MAC, wrong result."""
    b = ByzReplica(ctx, lie=True)
    try:
        if not await b.setup():
            ctx.count("setup-failed")
        ctx.start()
        await asyncio.sleep(ctx.left())
    finally:
        b.close()


ATTACKERS = {
    "garbage": atk_garbage,
    "forged-client-mac": atk_forged_client_mac,
    "forged-replica-mac": atk_forged_replica_mac,
    "replay": atk_replay,
    "conn-flood": atk_conn_flood,
    "slow-frames": atk_slow_frames,
    "http-flood": atk_http_flood,
    "http-slow": atk_http_slow,
    "big-timestamp": atk_big_timestamp,
    "client-flood": atk_client_flood,
    "replica-vouch-flood": atk_replica_vouch_flood,
    "replica-status-flood": atk_replica_status_flood,
    "replica-recovery-flood": atk_replica_recovery_flood,
    "replica-viewchange-flood": atk_replica_viewchange_flood,
    "replica-wrong-replies": atk_replica_wrong_replies,
}


def worker_main(name: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("nice"):
        os.nice(int(spec["nice"]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = Ctx(spec)
    fn = ATTACKERS[name]

    async def main():
        try:
            await fn(ctx)
        finally:
            if not ctx.started:
                ctx.start()
            ctx.finish()

    error = None
    try:
        run_loop(main())
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which shows it
        error = f"{type(e).__name__}: {e}"
        if not ctx.started:
            ctx.start()
        ctx.finish()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    say({"summary": {"sent": ctx.stats, "checks": ctx.checks, "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                     "error": error}})
    return 0
