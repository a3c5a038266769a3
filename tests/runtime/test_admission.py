"""Admission of requests and session keys: timestamps from the future, cached replies sent again,
suspicion, and (on a real cluster) principals bound to connections, replayed captures, forged
frames and the identity coming back after a poisoned timestamp."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import msgpack
import pytest

from helpers.cluster import Cluster
from pbft.codec import U63, batch_digest_from_request_digests, seal
from pbft.crypto import KeyRing
from pbft.messages import ALL_REPLICAS, Batch, PrePrepare, Prepare, Request
from pbft.services.kv import encode_op


def _drops(c: Cluster, reason: str) -> list[int]:
    return [r.drops.get(reason, 0) for r in c.replicas]


# ---------------------------------------------------------------------------
# the core's rules (hand-driven cluster, simulated clock starting at 0)
# ---------------------------------------------------------------------------

def test_request_timestamp_beyond_the_skew_window_is_refused_and_the_identity_comes_back():
    c = Cluster()
    limit_us = (c.now + c.cfg.timestamp_skew_ms_max) * 1000
    ring = c.rings[c.cfg.client_ids[0]]
    for t in (U63, int(limit_us) + 1):
        raw = seal(Request(c.cfg.client_ids[0], t, encode_op("put", b"k", b"evil"), False, ALL_REPLICAS), ring)
        for r in c.replicas:
            r.receive(raw, c.now)
    c.advance(200)
    assert all(r.last_exec == 0 for r in c.replicas), "nothing ordered"
    assert all(r.last_reply.get(c.cfg.client_ids[0]) is None for r in c.replicas)
    assert _drops(c, "request-future-timestamp") == [2] * 4
    assert not any(r.requests.vouch_out for r in c.replicas), "nobody vouches for it"
    # the genuine client's ordinary timestamps (1, 2, ...) still work
    assert c.put(0, b"k", b"good") == ("ok", True)
    assert c.get(0, b"k") == ("ok", b"good")


def test_timestamp_at_the_edge_of_the_window_is_accepted():
    c = Cluster()
    c.advance(1000)
    cl = c.clients[0]
    cl.timestamp = int((c.now + c.cfg.timestamp_skew_ms_max) * 1000) - 1  # the next one is at the limit
    assert c.put(0, b"k", b"v")[0] == "ok"
    assert _drops(c, "request-future-timestamp") == [0] * 4


def test_preprepare_with_a_request_from_the_future_is_held_not_accepted():
    """A faulty primary orders a request whose timestamp is too far ahead: backups refuse it (and
    hold the pre-prepare, as for a rejected non-deterministic value); nothing executes."""
    c = Cluster()
    cid = c.cfg.client_ids[0]
    req_raw = seal(Request(cid, U63 - 5, encode_op("put", b"k", b"x"), False, 0), c.rings[cid])
    fr = c.codec.open_frame(req_raw)
    nondet = c.replicas[0].service.propose_nondet(c.now)
    d = batch_digest_from_request_digests(nondet, [fr.digest])
    pp = seal(PrePrepare(0, 1, d, 0, Batch(nondet, (req_raw,))), c.rings[0])
    for r in c.replicas[1:]:
        r.receive(pp, c.now)
    assert [r.drops.get("batch-request-future-timestamp", 0) for r in c.replicas[1:]] == [1, 1, 1]
    assert all(1 in r.log.held and r.log.slots[1].digest is None for r in c.replicas[1:])
    assert all(r.last_exec == 0 for r in c.replicas)


def test_cached_reply_is_sent_again_at_most_once_per_half_retry_timeout():
    c = Cluster()
    cl = c.clients[0]
    cl.invoke(encode_op("put", b"x", b"1"), False, c.now)
    req = cl.req
    c.run()
    c.advance(20)
    assert not cl.busy
    again = seal(Request(req.client, req.timestamp, req.op, False, ALL_REPLICAS), c.rings[req.client])
    r = c.replicas[1]
    r.take_ready()  # what it had to send so far: not counted below

    def replies_out():
        return sum(1 for dests, raw in r.take_ready().sends if dests == (req.client,))

    for _ in range(20):  # a replay storm of the same retransmission
        r.receive(again, c.now)
    assert replies_out() == 1
    assert r.drops.get("reply-resend-rate-limited", 0) == 19
    r.receive(again, c.now + c.cfg.client_retry_timeout_ms / 2)  # a client retransmits this late at the earliest
    assert replies_out() == 1
    assert len(c.of_kind("execute", 1)) == 1, "executed once"


def test_bad_mac_makes_a_client_suspect_only_when_it_came_from_the_client():
    c = Cluster()
    cid = c.cfg.client_ids[0]
    wrong = KeyRing(cid, c.cfg.n, {j: os.urandom(32) for j in range(c.cfg.n)}, {})
    forged = seal(Request(cid, 5, encode_op("put", b"k", b"v"), False, 0), wrong)
    r = c.replicas[0]
    r.receive(forged, c.now, relayed=True)  # a replica forwarded it: no evidence against the client
    assert r.drops["bad-mac"] == 1 and cid not in r.requests.suspects
    r.receive(forged, c.now)  # from the client's own connection
    assert cid in r.requests.suspects


def test_simulated_clients_are_never_refused_for_their_timestamps():
    """The simulator's clients count from 1 and its replicas' wall clocks from 0: the window is
    deterministic there, refuses the ts-max client's requests and never a correct client's."""
    from pbft.sim.scenarios import find
    from pbft.sim.simulator import Simulation
    sim = Simulation(find("S-16").build(4, 0))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)
    assert sum(r.drops.get("request-future-timestamp", 0) for r in sim.replicas) > 0
    for r in sim.replicas:  # no timestamp from beyond the window was ever executed
        assert all(t < U63 - 2 for t, _ in r.last_reply.values()), r.id


# ---------------------------------------------------------------------------
# NewKey admission and the frame-sender parse (in-process)
# ---------------------------------------------------------------------------

class _Conn:
    def __init__(self):
        self.meta = {}


def _gate(monkeypatch):
    from pbft.runtime import admission
    from pbft.runtime.keys import Identity, PublicKeys
    from pbft.runtime.transport import Counters
    ids = {p: Identity.generate(p) for p in range(6)}  # replicas 0..3, clients 4, 5
    pub = PublicKeys({p: i.public for p, i in ids.items()})
    gate = admission.NewKeyGate(ids[0], pub, 4, 5, 600_000.0, Counters())
    checked = []
    real = admission.finish_newkey

    def counting(*a):
        checked.append(1)
        return real(*a)
    monkeypatch.setattr(admission, "finish_newkey", counting)
    return gate, ids, pub, checked


def test_newkey_replays_and_future_timestamps_are_refused_before_the_signature(monkeypatch):
    from pbft.runtime.keys import make_newkey
    gate, ids, pub, checked = _gate(monkeypatch)
    conn = _Conn()
    keys = {j: os.urandom(64) for j in range(4)}
    old = make_newkey(ids[4], pub, keys, now_us() - 10)
    nk = make_newkey(ids[4], pub, keys, now_us())
    assert gate.accept(conn, nk) is not None and len(checked) == 1
    assert gate.accept(conn, nk) is None  # exact replay
    assert gate.accept(_Conn(), old) is None  # an older capture, on another connection
    far = make_newkey(ids[4], pub, keys, now_us() + 601_000_000)
    top = make_newkey(ids[5], pub, keys, U63)
    assert gate.accept(conn, far) is None and gate.accept(conn, top) is None
    assert len(checked) == 1, "none of them cost a signature check"
    assert gate.counters.drops == {"newkey-stale": 2, "newkey-future-timestamp": 2}
    assert gate.last_ts[4] == msgpack.unpackb(msgpack.unpackb(nk)[2])[0]
    near = make_newkey(ids[5], pub, keys, now_us() + 1_000_000)  # a clock a second ahead: fine
    assert gate.accept(conn, near) is not None


def test_a_connection_that_never_authenticated_may_fail_the_signature_check_only_a_few_times(monkeypatch):
    from pbft.runtime.admission import UNAUTHENTICATED_NEWKEY_FAILURES_MAX
    from pbft.runtime.keys import Identity, make_newkey
    gate, ids, pub, checked = _gate(monkeypatch)
    impostor = Identity.generate(4)
    conn = _Conn()
    for i in range(10):
        assert gate.accept(conn, make_newkey(impostor, pub, {0: os.urandom(64)}, now_us() + i)) is None
    assert len(checked) == UNAUTHENTICATED_NEWKEY_FAILURES_MAX
    assert gate.counters.drops["newkey-bad-signature"] == UNAUTHENTICATED_NEWKEY_FAILURES_MAX
    assert gate.counters.drops["newkey-unauthenticated-limit"] == 10 - UNAUTHENTICATED_NEWKEY_FAILURES_MAX
    # a connection that authenticated keeps the ordinary rate limits only
    good = _Conn()
    assert gate.accept(good, make_newkey(ids[5], pub, {0: os.urandom(64)}, now_us())) is not None
    for i in range(6):
        gate.accept(good, make_newkey(impostor, pub, {0: os.urandom(64)}, now_us() + 100 + i))
    assert gate.counters.drops["newkey-bad-signature"] == UNAUTHENTICATED_NEWKEY_FAILURES_MAX + 6


class _Peeked:
    """A socket whose kernel buffer holds ``data``: ``recv(k, MSG_PEEK...)`` gives its first k bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def recv(self, k: int, flags: int = 0) -> bytes:
        return self.data[:k]


def test_first_frame_screen_names_what_the_first_frame_would_be_closed_for(monkeypatch):
    """The accept-time screen says, from a connection's first bytes, the reasons its first frame
    would be dropped under (and, but for a length, connection-closed-unauthenticated), and None
    while there is nothing to say yet or the frame may be a NewKey that passes the cheap checks;
    it changes nothing (the same NewKey is accepted afterwards)."""
    from pbft.runtime.admission import first_frame_screen
    from pbft.runtime.keys import make_newkey
    from pbft.runtime.transport import Listener, frame
    gate, ids, pub, checked = _gate(monkeypatch)
    screen = first_frame_screen(gate, 1000, 100_000)
    cc = "connection-closed-unauthenticated"

    def judge(data: bytes):
        return screen(_Peeked(data), data[:Listener.SCREEN_PEEK_BYTES])

    keys = {j: os.urandom(64) for j in range(4)}
    nk = frame(make_newkey(ids[4], pub, keys, now_us()))
    fake = KeyRing(1, 4, {j: os.urandom(32) for j in range(4)}, {})
    req = frame(seal(Request(4, now_us(), encode_op("get", b"k"), False, ALL_REPLICAS), fake))
    assert judge(b"") is None and judge(b"\x00\x00") is None  # too little to say
    assert judge(struct.pack(">I", 100_001)) == ("oversized-frame",)
    assert judge(struct.pack(">I", 1001)) == ("unauthenticated-frame-too-large",)
    assert judge(struct.pack(">I", 1000)) is None  # an allowed length, nothing else yet
    assert judge(struct.pack(">I", 1) + b"\x95") == ("malformed", cc)  # a complete 1-byte frame
    assert judge(struct.pack(">I", 900) + b"\x94") == ("malformed", cc)  # not a 5-element list
    assert judge(req) == ("spoofed-client", cc)
    assert judge(req[:8]) is None  # its sender not there yet
    assert judge(frame(seal(Prepare(0, 1, bytes(32), 1), fake))) == ("spoofed-replica", cc)
    assert judge(frame(seal(Prepare(0, 1, bytes(32), 0), fake))) == ("spoofed-self", cc)
    assert judge(nk[:200]) is None  # a NewKey not all there yet
    assert judge(nk) is None  # fresh: it goes on to its signature check
    assert not checked and not gate.counters.drops  # the screen checked no signature, counted nothing
    assert gate.accept(_Conn(), nk[4:]) is not None
    assert judge(nk) == ("newkey-stale", cc)  # now an exact replay
    assert judge(frame(make_newkey(ids[4], pub, keys, now_us() - 10_000_000))) == ("newkey-stale", cc)
    assert judge(frame(make_newkey(ids[5], pub, keys, U63))) == ("newkey-future-timestamp", cc)


@pytest.mark.parametrize("sender", [0, 3, 4, 127, 128, 255, 256, 65535, 65536, (1 << 31) - 1])
def test_frame_sender_reads_the_sender_as_msgpack_does(sender):
    from pbft.runtime.admission import frame_sender
    raw = msgpack.packb([1, sender, b"h", b"", bytes(64)])
    assert frame_sender(raw) == sender == msgpack.unpackb(raw)[1]


@pytest.mark.parametrize("raw", [
    msgpack.packb([1, -1, b"h", b"", bytes(64)]),  # negative
    b"\x95\x01\xd1\x00\x05" + msgpack.packb(b"h") + msgpack.packb(b"") + msgpack.packb(bytes(64)),  # int16 5
    b"\x95\x01\xcf" + (5).to_bytes(8, "big") + msgpack.packb(b"h") + msgpack.packb(b"") + msgpack.packb(bytes(64)),
    b"\x95\xcc\x01\x05" + msgpack.packb(b"h") + msgpack.packb(b"") + msgpack.packb(bytes(64)),  # tag as uint8
    b"\x95\x01",
])
def test_frame_sender_refuses_encodings_no_correct_principal_writes(raw):
    from pbft.runtime.admission import frame_sender
    assert frame_sender(raw) == -1


# ---------------------------------------------------------------------------
# a real cluster: principals bound to connections
# ---------------------------------------------------------------------------

def _frame(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _send_on_new_connection(addr, data: bytes) -> None:
    try:
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(data)
            time.sleep(0.05)
    except OSError:
        pass


def _transport_drop(lc, rid: int, reason: str) -> float:
    import urllib.request
    r = lc.cluster.replicas[rid]
    with urllib.request.urlopen(f"http://{getattr(r, 'metrics_addr', r.host)}:{r.metrics_port}/metrics",
                                timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("pbft_dropped_messages_total{") and 'layer="transport"' in line \
                and f'reason="{reason}"' in line:
            total += float(line.rpartition(" ")[2])
    return total


@pytest.fixture
def live(local_cluster):
    return local_cluster(protocol={"view_change_timeout_ms": 500.0})


def _run(coro):
    import uvloop
    return uvloop.run(coro)


def test_replayed_captures_and_forged_frames_on_new_connections_are_dropped_as_spoofed(live):
    from pbft.runtime.client import ClientPool
    c = live.cluster
    victim = c.client_ids[0]
    r1 = c.replicas[1]
    addr = (r1.host, r1.port)
    captured: list[bytes] = []  # what the victim's pool wrote to replica 1 (framed)
    out = {}

    async def main():
        loop = asyncio.get_running_loop()
        pool = ClientPool(c, [c.identity(victim)])
        await pool.start()
        link = pool.links[1]
        orig = link.send

        def record(data, counters):
            captured.append(data)
            return orig(data, counters)
        link.send = record
        pool.refresh_keys(pool.p[victim])  # a NewKey on the recorded path too
        for i in range(5):
            await pool.invoke(victim, encode_op("put", b"k%d" % i, b"v%d" % i), timeout=10)
        await asyncio.sleep(0.3)  # the last replies are in
        link.send = orig
        def watched():
            d = live.status(1)["drops"]
            return pool.counters.bytes_in, d.get("request-retransmitted", 0), d.get("bad-mac", 0)
        before = await loop.run_in_executor(None, watched)
        # the capture replayed: all of it on one new connection, and each write on one of its own
        await loop.run_in_executor(None, _send_on_new_connection, addr, b"".join(captured))
        for data in captured:
            await loop.run_in_executor(None, _send_on_new_connection, addr, data)
        # requests under the victim's id with MACs from keys nobody agreed to (no keys needed)
        ring = KeyRing(victim, c.n, {j: os.urandom(32) for j in range(c.n)}, {})
        forged = b"".join(_frame(seal(Request(victim, now_us() + i, encode_op("put", b"k0", b"evil"), False,
                                              ALL_REPLICAS), ring)) for i in range(50))
        await loop.run_in_executor(None, _send_on_new_connection, addr, forged)
        # protocol messages claiming another replica's id and the receiver's own
        fake = KeyRing(0, c.n, {j: os.urandom(32) for j in range(c.n)}, {})
        await loop.run_in_executor(None, _send_on_new_connection, addr, _frame(seal(Prepare(0, 1, bytes(32), 2), fake)))
        await loop.run_in_executor(None, _send_on_new_connection, addr, _frame(seal(Prepare(0, 1, bytes(32), 1), fake)))
        await asyncio.sleep(0.5)
        out["after"] = await loop.run_in_executor(None, watched)
        out["before"] = before
        # the genuine client is served as before
        assert await pool.invoke(victim, encode_op("get", b"k0"), timeout=10) is not None
        await pool.close()

    _run(main())
    assert len(captured) >= 5  # five requests, the NewKey travelling with the first
    # no reply traffic went to the victim, nothing was answered again, no forged frame reached a MAC check
    assert out["after"] == out["before"]
    # each replayed connection is closed at its first frame: a stale NewKey, or a request it may not carry
    assert _transport_drop(live, 1, "spoofed-client") + _transport_drop(live, 1, "newkey-stale") >= len(captured) + 2
    assert _transport_drop(live, 1, "spoofed-client") >= 2
    assert _transport_drop(live, 1, "newkey-stale") >= 1
    assert _transport_drop(live, 1, "spoofed-replica") >= 1
    assert _transport_drop(live, 1, "spoofed-self") >= 1
    assert _transport_drop(live, 1, "connection-closed-unauthenticated") >= len(captured) + 4
    st = live.status(1)
    assert victim not in st["clients_suspected"]
    assert st["view_changes"] == 0


def now_us() -> int:
    return time.time_ns() // 1000


def test_timestamps_from_the_future_do_not_make_an_identity_unusable(live):
    from pbft import NoQuorumError
    from pbft.runtime.client import ClientPool
    from pbft.runtime.keys import make_newkey
    c = live.cluster
    victim = c.client_ids[1]
    ident = c.identity(victim)
    # a NewKey signed with the identity's own key (a stolen key, or a clock gone wild), timestamp 2^63-1
    nk = make_newkey(ident, c.public, {j: os.urandom(64) for j in range(c.n)}, U63)
    for r in c.replicas:
        _send_on_new_connection((r.host, r.port), _frame(nk))

    async def main():
        pool = ClientPool(c, [ident])
        await pool.start()
        await pool.invoke(victim, encode_op("put", b"f", b"before"), timeout=10)
        pool.p[victim].core.timestamp = U63 - 1  # its next request has timestamp 2^63-1
        with pytest.raises(NoQuorumError):
            await pool.invoke(victim, encode_op("put", b"f", b"poison"), timeout=1.5)
        await pool.close()
        # the genuine client, started again (timestamps from its clock): served at once
        pool = ClientPool(c, [ident])
        await pool.start()
        await pool.invoke(victim, encode_op("put", b"f", b"after"), timeout=10)
        got = await pool.invoke(victim, encode_op("get", b"f"), timeout=10)
        await pool.close()
        return got

    got = _run(main())
    from pbft.services.kv import decode_result
    assert decode_result(got) == ("ok", b"after")
    for i in range(c.n):
        assert _transport_drop(live, i, "newkey-future-timestamp") >= 1
    assert sum(live.status(i)["drops"].get("request-future-timestamp", 0) for i in range(c.n)) >= 3


def test_binding_follows_client_reconnects_and_a_replica_restart(live):
    from pbft.runtime.client import ClientPool
    c = live.cluster
    me = c.client_ids[2]
    replies: set[tuple[int, int]] = set()  # (replica, timestamp) of every reply received

    async def main():
        loop = asyncio.get_running_loop()
        pool = ClientPool(c, [c.identity(me)])
        orig = pool._on_frame

        def spy(conn, raw):
            try:
                fr = pool.codec.open_frame(raw)
                replies.add((fr.sender, pool.codec.parse(fr).timestamp))
            except Exception:  # noqa: BLE001 - the pool counts it
                pass
            orig(conn, raw)
        pool._on_frame = spy  # the connections are made after this
        await pool.start()

        async def op_answered_by(j, key):
            await pool.invoke(me, encode_op("put", key, b"x"), timeout=10)
            t = pool.p[me].core.timestamp
            deadline = time.monotonic() + 10
            while (j, t) not in replies:
                assert time.monotonic() < deadline, f"no reply from replica {j} for timestamp {t}"
                await asyncio.sleep(0.02)

        await op_answered_by(1, b"a")
        # the client's connection to replica 1 breaks and comes back (a fresh NewKey on it)
        link = pool.links[1]
        for k in range(3):
            link.conn.close()
            deadline = time.monotonic() + 10
            while link.connects < k + 2 or link.conn is None:
                assert time.monotonic() < deadline, "no reconnection"
                await asyncio.sleep(0.02)
            await op_answered_by(1, b"b%d" % k)
        # replica 2 restarts (a new process: new keys, new connections both ways)
        await loop.run_in_executor(None, live.kill, 2)
        await pool.invoke(me, encode_op("put", b"c", b"y"), timeout=10)
        await loop.run_in_executor(None, live.start, 2)
        await loop.run_in_executor(None, live.wait_connected)
        await op_answered_by(2, b"d")
        await op_answered_by(2, b"e")
        await pool.close()

    _run(main())
    st = [live.status(i) for i in range(c.n)]
    assert {s["view"] for s in st} == {0}
    for i in range(c.n):
        assert _transport_drop(live, i, "spoofed-client") == 0, i
        assert _transport_drop(live, i, "spoofed-replica") == 0, i


def test_unreplicated_server_makes_the_same_front_end_checks(tmp_path):
    """The baseline of ``pbft bench`` gets the replicas' checks: spoofed frames on a new
    connection, timestamps from the future, cached replies sent again."""
    from helpers.netutil import free_base_port
    from pbft import NoQuorumError
    from pbft.runtime.client import ClientPool
    from pbft.runtime.cluster import init_cluster
    from pbft.runtime.unreplicated import UnreplicatedServer
    from pbft.services.kv import KVService, decode_result
    cl = init_cluster(tmp_path / "u", 1, 0, ["127.0.0.1"], free_base_port(10), 2)
    cid = cl.client_ids[0]
    addr = (cl.replicas[0].host, cl.replicas[0].port)

    async def main():
        loop = asyncio.get_running_loop()
        srv = UnreplicatedServer(cl, cl.identity(0), KVService())
        await srv.start()
        pool = ClientPool(cl, [cl.identity(cid)])
        await pool.start()
        await pool.invoke(cid, encode_op("put", b"k", b"v"), timeout=5)
        p = pool.p[cid]
        again = seal(Request(cid, p.core.timestamp, encode_op("put", b"k", b"v"), False, ALL_REPLICAS), p.ring)
        link = pool.links[0]
        for _ in range(10):  # the client's own retransmission, ten times at once
            link.send(_frame(again), pool.counters)
        ring = KeyRing(cid, 1, {0: os.urandom(32)}, {})
        forged = seal(Request(cid, now_us(), encode_op("put", b"k", b"evil"), False, 0), ring)
        await loop.run_in_executor(None, _send_on_new_connection, addr, _frame(again) + _frame(forged))
        p.core.timestamp = U63 - 1
        with pytest.raises(NoQuorumError):
            await pool.invoke(cid, encode_op("put", b"k", b"poison"), timeout=0.5)
        await pool.close()
        pool = ClientPool(cl, [cl.identity(cid)])
        await pool.start()
        got = await pool.invoke(cid, encode_op("get", b"k"), timeout=5)
        await pool.close()
        srv.close()
        return got, dict(srv.counters.drops), srv.executed

    got, drops, executed = _run(main())
    assert decode_result(got) == ("ok", b"v")
    assert executed == 2, "the put and the get; nothing spoofed or from the future"
    assert drops.get("reply-resend-rate-limited", 0) >= 8
    assert drops.get("spoofed-client", 0) == 1 and drops.get("connection-closed-unauthenticated", 0) == 1
    assert drops.get("request-future-timestamp", 0) >= 1


def test_a_client_pool_refreshes_its_identities_keys_in_chunks(tmp_path):
    """Each identity once per key_refresh_s, at most 64 at a time (a replica checks a bounded
    number of NewKeys per connection at once)."""
    from helpers.netutil import free_base_port
    from pbft.runtime.client import REFRESH_CHUNK, ClientPool
    from pbft.runtime.cluster import init_cluster
    cl = init_cluster(tmp_path / "p", 4, None, ["127.0.0.1"], free_base_port(20), 150)

    async def main():
        pool = ClientPool(cl, [cl.identity(c) for c in cl.client_ids])
        done = []
        pool.refresh_keys = lambda p: done.append(p.ident.principal)
        for _ in range(3):
            pool._periodic_refresh()
        when = pool.refresh_handle.when() - asyncio.get_running_loop().time()
        pool.refresh_handle.cancel()
        return done, when

    done, when = _run(main())
    assert len(done) == 150 and sorted(done) == cl.client_ids  # one full round, nobody twice
    assert REFRESH_CHUNK == 64 and when <= cl.runtime.key_refresh_s / 3 + 0.1


# ---------------------------------------------------------------------------
# request credits (runtime.admission.RequestBudget) and paced connections (FrameConn.defer)
# ---------------------------------------------------------------------------

def test_request_credits_never_run_out_for_a_closed_loop_client_and_pace_a_flooder():
    from pbft.runtime.admission import RequestBudget
    b = RequestBudget(burst=16, rate=20.0)
    # a correct client: a request, our reply (at a replica that lags, up to 12 requests late),
    # the next request; now and then a retransmission (a retry timeout later) nobody answers
    t, owed = 0.0, 0
    for i in range(10_000):
        assert b.take(4, t) == 0.0
        if i % 50 == 0:
            t += 0.06
            assert b.take(4, t) == 0.0  # its retransmission
        owed += 1
        if owed > (i // 1000) % 13:
            b.replied(4)
            owed -= 1
        t += 0.0001
    # a flooder, never answered: the burst, then one request per 1/rate seconds
    taken, t = 0, 0.0
    while t < 1.0:
        w = b.take(5, t)
        if w == 0.0:
            taken += 1
        else:
            assert 0.0 < w <= 1.0 / 20.0 + 1e-9
            t += w  # a connection deferred for w is read again then
            continue
        t += 0.0001
    assert 16 + 18 <= taken <= 16 + 21
    # replies give credits back, up to the burst: the flooder gets one request per reply more
    for _ in range(100):
        b.replied(5)
    assert sum(b.take(5, t) == 0.0 for _ in range(40)) == 16


def test_a_request_out_of_credits_waits_in_its_clients_slot_and_the_newest_is_handed_on():
    """``RequestSlots``: a parked request is handed on after its wait; a newer one of the same
    client takes the slot (the older is counted superseded and never handed on); other clients
    have slots of their own; a request whose connection closed meanwhile is dropped."""
    from pbft.runtime.admission import RequestSlots
    from pbft.runtime.transport import Counters

    class Conn:
        def __init__(self):
            self.closed = False

    async def main():
        loop = asyncio.get_running_loop()
        got = []
        counters = Counters()
        slots = RequestSlots(loop, counters, lambda conn, raw: got.append((conn, raw, loop.time())))
        a, b = Conn(), Conn()
        t0 = loop.time()
        slots.park(7, a, b"r1", 0.02)
        slots.park(7, a, b"r2", 0.02)  # newer, same client: takes the slot
        slots.park(8, a, b"s1", 0.01)  # another client: its own slot
        slots.park(9, b, b"x1", 0.01)
        b.closed = True  # x1's connection goes before its credit comes
        for _ in range(100):
            await asyncio.sleep(0.005)
            if len(got) == 2 and not slots.waiting:
                break
        assert [(c, r) for c, r, _ in got] == [(a, b"s1"), (a, b"r2")]
        assert got[1][2] - t0 >= 0.02 - 1e-3
        assert counters.drops == {"client-request-deferred": 4, "client-request-superseded": 1, "peer-down": 1}
        assert slots.waiting == {}

    asyncio.run(main())


def test_a_client_flooding_valid_requests_is_paced_and_a_correct_client_still_completes(live):
    """An identity with valid keys sends valid requests with growing timestamps, never waiting:
    the replicas defer its requests (its connection waits for credits) instead of handling them
    all, and a correct client on its own connection keeps completing requests meanwhile."""
    from pbft.runtime.client import ClientPool
    from pbft.runtime.keys import fresh_key, make_newkey, now_timestamp_us
    from pbft.runtime.transport import frame
    from pbft.services.kv import decode_result
    c = live.cluster
    good, bad = c.client_ids[0], c.client_ids[1]
    n = c.n

    async def main():
        ring = KeyRing(bad, n, {}, {})
        keys = {}
        for j in range(n):
            k_out, k_in = fresh_key(), fresh_key()
            ring.out_keys[j], ring.in_keys[j] = k_out, k_in
            keys[j] = k_out + k_in
        nk = frame(make_newkey(c.identity(bad), c.public, keys, now_timestamp_us()))
        writers = []
        for r in c.replicas:
            rd, w = await asyncio.open_connection(r.host, r.port)
            w.write(nk)
            writers.append((rd, w))
        await asyncio.sleep(0.2)
        stop = asyncio.Event()
        sent = [0]

        async def flood():
            ts = now_timestamp_us()
            op = encode_op("put", b"flood", b"v" * 16)
            while not stop.is_set():
                out = []
                for _ in range(32):
                    ts += 1
                    out.append(frame(seal(Request(bad, ts, op, False, 0), ring)))
                data = b"".join(out)
                for _, w in writers:
                    w.write(data)
                sent[0] += len(out)
                try:
                    await asyncio.wait_for(asyncio.gather(*(w.drain() for _, w in writers)), 0.2)
                except asyncio.TimeoutError:
                    pass

        async def drain_replies(rd):
            while not stop.is_set():
                if not await rd.read(1 << 16):
                    return

        tasks = [asyncio.ensure_future(flood())] + [asyncio.ensure_future(drain_replies(rd)) for rd, _ in writers]
        pool = ClientPool(c, [c.identity(good)])
        await pool.start()
        done = 0
        try:
            for i in range(30):
                res = await pool.invoke(good, encode_op("put", b"k", b"%d" % i), timeout=10)
                assert decode_result(res)[0] == "ok"
                done += 1
        finally:
            stop.set()
            await pool.close()
            for t in tasks:
                t.cancel()
            for _, w in writers:
                w.transport.abort()
        return done, sent[0]

    done, sent = _run(main())
    assert done == 30
    deferred = [_transport_drop(live, i, "client-request-deferred") for i in range(c.n)]
    assert sum(deferred) > 0, deferred
    for i in range(c.n):
        assert live.status(i)["executed_requests"] >= 30


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_a_newkey_captured_before_a_restart_is_refused_after_it(tmp_path, how):
    """The latest NewKey timestamp accepted from each principal is kept in the store: the same
    NewKey replayed after the replica restarted (gracefully, or killed once the turn that took it
    was written) is refused as stale, and a fresh one still authenticates."""
    import signal as _signal
    from helpers.netutil import LocalCluster
    from pbft.runtime.keys import make_newkey, now_timestamp_us
    from pbft.runtime.transport import frame as _f

    lc = LocalCluster(tmp_path / "c")  # durable storage, the default
    c = lc.cluster
    client = c.client_ids[0]
    r1 = c.replicas[1]
    addr = (r1.host, r1.port)
    try:
        lc.start_all()
        captured = _f(make_newkey(c.identity(client), c.public, {1: os.urandom(64)}, now_timestamp_us()))
        before = _transport_counter(lc, 1, "pbft_newkeys_accepted_total")
        _send_on_new_connection(addr, captured)
        lc.wait_for(lambda: _transport_counter(lc, 1, "pbft_newkeys_accepted_total") >= before + 1,
                    what="the NewKey accepted")
        time.sleep(1.0)  # the replicas' own traffic makes a turn that writes it
        if how == "restart":
            lc.signal(1, _signal.SIGTERM)
            lc.procs[1].wait(10)
        else:
            lc.kill(1)
        lc.start(1)
        lc.wait_connected([1])
        lc.wait_for(lambda: _transport_counter(lc, 1, "pbft_newkeys_accepted_total") >= 3,
                    what="the replicas' NewKeys after the restart")
        time.sleep(0.5)
        before = _transport_counter(lc, 1, "pbft_newkeys_accepted_total")
        _send_on_new_connection(addr, captured)
        lc.wait_for(lambda: _transport_drop(lc, 1, "newkey-stale") >= 1, what="the replay refused as stale")
        assert _transport_counter(lc, 1, "pbft_newkeys_accepted_total") == before
        fresh = _f(make_newkey(c.identity(client), c.public, {1: os.urandom(64)}, now_timestamp_us()))
        _send_on_new_connection(addr, fresh)
        lc.wait_for(lambda: _transport_counter(lc, 1, "pbft_newkeys_accepted_total") >= before + 1,
                    what="a fresh NewKey")
    finally:
        lc.stop()


def _transport_counter(lc, rid: int, name: str) -> float:
    import urllib.request
    r = lc.cluster.replicas[rid]
    with urllib.request.urlopen(f"http://{r.metrics_addr}:{r.metrics_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"metric {name} not exported")


def test_an_identity_out_of_credits_does_not_stall_the_other_identities_of_its_pool(live):
    """Two identities on one client pool, so on the same connections: one sends valid requests
    faster than its credits allow, though not so fast as to be held as a flood (a few hundred a
    second: its requests wait for credits in its one slot, the newer taking the place of the
    older), and the other's requests are not held behind them and keep completing."""
    from pbft.runtime.client import ClientPool
    from pbft.runtime.keys import now_timestamp_us
    from pbft.runtime.transport import frame
    from pbft.services.kv import decode_result
    c = live.cluster
    good, bad = c.client_ids[2], c.client_ids[3]

    async def main():
        pool = ClientPool(c, [c.identity(good), c.identity(bad)])
        await pool.start()
        ring = pool.p[bad].ring
        stop = asyncio.Event()

        async def flood():
            ts = now_timestamp_us() + 10 ** 6
            op = encode_op("put", b"flood", b"v" * 16)
            while not stop.is_set():
                out = []
                for _ in range(32):
                    ts += 1
                    out.append(frame(seal(Request(bad, ts, op, False, 0), ring)))
                data = b"".join(out)
                for link in pool.links.values():
                    link.send(data, pool.counters)
                await asyncio.sleep(0.1)  # ~320 requests a second: past the credits, under the flood hold

        task = asyncio.ensure_future(flood())
        worst = 0.0
        try:
            await asyncio.sleep(0.5)  # the flooder's credits are gone everywhere
            for i in range(20):
                t0 = time.monotonic()
                res = await pool.invoke(good, encode_op("put", b"g", b"%d" % i), timeout=10)
                worst = max(worst, time.monotonic() - t0)
                assert decode_result(res)[0] == "ok"
        finally:
            stop.set()
            task.cancel()
            await pool.close()
        return worst

    worst = _run(main())
    deferred = [_transport_drop(live, i, "client-request-deferred") for i in range(c.n)]
    superseded = [_transport_drop(live, i, "client-request-superseded") for i in range(c.n)]
    assert sum(deferred) > 0 and sum(superseded) > 0, (deferred, superseded)
    assert sum(_transport_drop(live, i, "client-flood-held") for i in range(c.n)) == 0
    # the correct identity's requests were not held behind the flooder's (when its connection
    # was held for the flooder's credits, it got no reply within 10 s)
    assert worst < 2.0, worst
