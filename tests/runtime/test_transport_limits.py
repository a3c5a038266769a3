"""Keyless attacks on a replica's connections and on its HTTP endpoint.

Two kinds of tests:

* in-process: replicas (``ReplicaNode``) in this test's own event loop, raw sockets against
  them, and the transport's guard inspected directly (its memory account, the trust of each
  connection);
* real processes (``LocalCluster``): the connection table filled with idle sockets, slow and
  flooding HTTP clients, while a correct client still gets its requests through.

Asserted: connections closed, counters raised, round trips completed; never a rate or a size
of resident memory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import urllib.request

import pytest

from helpers.netutil import LocalCluster, free_base_port
from pbft import BlockingClient
from pbft.runtime.cluster import init_cluster, load_cluster
from pbft.runtime.node import ReplicaNode
from pbft.runtime import transport
from pbft.runtime.keys import NEWKEY_TAG, make_newkey, now_timestamp_us
from pbft.runtime.transport import AUTH_REPLICA, DEFER_ACCEPT_S, Listener, client_frame_bytes_max, frame
from pbft.services.kv import KVClient, KVService
from pbft.config import ConfigError

MAX_FRAME = 4 * 1024 * 1024
# the first bytes of a NewKey frame of a plausible length: what a connection that has not
# authenticated yet, and will not, sends to be served at all (the kernel hands a connection to the
# replica once its first bytes arrived, and the replica refuses at once one whose first bytes show
# it would be closed at its first frame anyway)
PARTIAL_NEWKEY = struct.pack(">I", 1000) + bytes([0x95, NEWKEY_TAG])


def transport_drops(node: ReplicaNode, reason: str) -> int:
    return node.counters.drops.get(reason, 0)


def make_cluster(tmp_path, runtime=None, clients: int = 2):
    return init_cluster(tmp_path / "c", 4, None, ["127.0.0.1"], free_base_port(200), clients, runtime=runtime,
                        storage={"mode": "memory"})


async def start_nodes(cluster, ids):
    nodes = []
    for i in ids:
        node = ReplicaNode(cluster, i, cluster.identity(i), KVService(), quiet=True)
        await node.start()
        nodes.append(node)
    return nodes


async def stop_nodes(nodes):
    for node in nodes:
        await node.stop()


async def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True if the other side closes the connection within ``timeout`` seconds."""
    try:
        data = await asyncio.wait_for(reader.read(1 << 16), timeout)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


# ---------------------------------------------------------------------------
# in-process: the guard of one replica's inbound connections
# ---------------------------------------------------------------------------

def test_partial_frames_on_unauthenticated_connections_are_bounded(tmp_path):
    """A frame announced above the client bound is refused at its length prefix; partial frames
    under it count against the memory bound, and the oldest holders go first past it."""
    limit = 2 * client_frame_bytes_max(make_cluster(tmp_path / "probe").cfg)
    cluster = make_cluster(tmp_path, runtime={"partial_frames_bytes_max": limit})
    near = client_frame_bytes_max(cluster.cfg) - 16  # an allowed length, not sent in full

    async def main():
        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        try:
            # 1. an almost complete maximum-size frame: refused at accept (then held unread, not
            # served), nothing buffered
            accepted = node.counters.connections_accepted
            r, w = await asyncio.open_connection(me.host, me.port)
            w.write(struct.pack(">I", MAX_FRAME) + b"\x95" * 65536)
            await wait_until(lambda: transport_drops(node, "unauthenticated-frame-too-large") == 1, 2.0,
                             "the 4 MiB frame refused")
            assert node.counters.connections_accepted == accepted, "a 4 MiB frame was accepted unauthenticated"
            assert node.guard.held == 0 and len(node.server.tarpit) == 1
            w.transport.abort()
            # 2. partial frames of allowed length from five connections: never more than the bound held
            socks = []
            for _ in range(5):
                r, w = await asyncio.open_connection(me.host, me.port)
                w.write(struct.pack(">I", near) + bytes([0x95, NEWKEY_TAG]) + b"\x95" * (near - 102))
                await w.drain()
                socks.append((r, w))
                # one at a time: the replica holds all of it before the next one sends
                await wait_until(lambda: bool(node.guard.conns) and list(node.guard.conns)[-1].held == 4 + near - 100,
                                 5.0, "the bytes")
                assert node.guard.held <= limit
            await wait_until(lambda: transport_drops(node, "partial-frame-memory") >= 3, 5.0,
                             "connections holding partial frames to be closed")
            assert node.guard.held <= limit
            # the oldest holders were closed, the newest kept (those closed first are the first three)
            closed = [await closed_by_peer(r, 1.0) for r, _ in socks[:3]]
            assert all(closed)
            assert not await closed_by_peer(socks[4][0], 0.2)
            for _, w in socks:
                w.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_idle_and_slow_unauthenticated_connections_time_out(tmp_path, monkeypatch):
    """A connection that sends nothing is held by the kernel for ``DEFER_ACCEPT_S`` (1 s here),
    then served and closed after unauthenticated_timeout_s without a byte (idle-timeout); a first
    frame trickling in is closed although bytes keep coming once it is not complete within the
    first-frame deadline (at most unauthenticated_timeout_s: first-frame-timeout); on a connection
    that authenticated, a frame trickling in for longer than frame_timeout_s is closed too
    (slow-frame-timeout)."""
    monkeypatch.setattr(transport, "DEFER_ACCEPT_S", 1)
    cluster = make_cluster(tmp_path, runtime={"unauthenticated_timeout_s": 0.6, "frame_timeout_s": 0.6})
    c = cluster.client_ids[0]

    async def trickle(r, w, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0:  # one byte every 0.1 s: never idle, never complete
            try:
                w.write(b"\x95")
                await w.drain()
            except ConnectionError:
                return
            if await closed_by_peer(r, 0.1):
                return
        raise AssertionError(f"{what} trickling in was never timed out")

    async def main():
        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        try:
            idle = [await asyncio.open_connection(me.host, me.port) for _ in range(5)]
            r, w = await asyncio.open_connection(me.host, me.port)
            w.write(PARTIAL_NEWKEY)
            await trickle(r, w, "a first frame")
            assert transport_drops(node, "first-frame-timeout") == 1
            w.close()
            r, w = await asyncio.open_connection(me.host, me.port)
            w.write(frame(make_newkey(cluster.identity(c), cluster.public, {0: os.urandom(64)}, now_timestamp_us())))
            await wait_until(lambda: node.client_conn.get(c) is not None, 5.0, "the NewKey")
            w.write(struct.pack(">I", 1000))
            await trickle(r, w, "a frame on an authenticated connection")
            assert transport_drops(node, "slow-frame-timeout") == 1
            w.close()
            for ir, _ in idle:
                assert await closed_by_peer(ir, 5.0)
            assert transport_drops(node, "idle-timeout") == 5
            await wait_until(lambda: not node.guard.conns, 2.0, "every connection gone")
            assert node.guard.held == 0
            for _, iw in idle:
                iw.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_replica_links_authenticate_and_reauthenticate_after_reconnecting(tmp_path):
    """Every replica's inbound link authenticates as a replica (frames up to the protocol's
    maximum); when a link is cut and re-established while both processes live, the NewKey sent
    on it again carries a fresh timestamp, so the new connection authenticates too (the old
    NewKey would be rejected as stale and leave it with the client bound)."""
    cluster = make_cluster(tmp_path, runtime={"unauthenticated_timeout_s": 5.0})

    async def main():
        nodes = await start_nodes(cluster, range(4))
        try:
            def all_authenticated():
                return all(len(nd.replica_conn) == 3 and all(c.auth == AUTH_REPLICA and not c.closed
                                                             for c in nd.replica_conn.values())
                           for nd in nodes)
            await wait_until(all_authenticated, 10.0, "replica links to authenticate")
            for nd in nodes:
                for c in nd.replica_conn.values():
                    assert c.max_frame == cluster.cfg.message_size_bytes_max + 1024
            n0 = nodes[0]
            old = n0.replica_conn[1]
            old.close()  # replica 0 cuts replica 1's link; replica 1 reconnects and sends its keys again
            await wait_until(lambda: n0.replica_conn.get(1) not in (None, old) and all_authenticated(), 10.0,
                             "the link to reconnect and authenticate")
            assert n0.counters.drops.get("newkey-stale", 0) == 0
            # the protocol runs over them: requests execute everywhere
            from pbft.runtime.client import ClientPool
            from pbft.services.kv import encode_op
            pool = ClientPool(cluster, [cluster.identity(cluster.client_ids[0])])
            await pool.start()
            await pool.invoke(cluster.client_ids[0], encode_op("put", b"k", b"v"), timeout=10.0)
            await pool.close()
            await wait_until(lambda: all(nd.replica.last_exec >= 1 for nd in nodes), 10.0, "execution")
            for nd in nodes:
                assert not {"unauthenticated-frame-too-large", "partial-frame-memory", "slow-frame-timeout",
                            "idle-timeout", "connection-evicted"} & set(nd.counters.drops)
        finally:
            await stop_nodes(nodes)

    asyncio.run(main())


def test_eviction_spares_replicas_and_clients_current_connections(tmp_path):
    """A full table evicts an unauthenticated connection first, then a client connection that its
    client has since replaced by a newer one (a second NewKey elsewhere); a client's current
    connection is never evicted: with nothing else left, the newcomer is refused."""
    cluster = make_cluster(tmp_path, runtime={"connections_max": 4}, clients=4)
    c4, c5, c6, c7 = cluster.client_ids

    async def main():
        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]

        async def connect_as(client, first=PARTIAL_NEWKEY):
            r, w = await asyncio.open_connection(me.host, me.port)
            if client is not None:
                nk = make_newkey(cluster.identity(client), cluster.public, {0: os.urandom(64)}, now_timestamp_us())
                w.write(frame(nk))
                await wait_until(lambda: node.client_conn.get(client) is not None
                                 and node.client_conn[client] is list(node.guard.conns)[-1], 5.0, "the NewKey")
            else:  # the start of a NewKey (``first``), not finished yet: served, not authenticated
                taken = node.counters.connections_accepted + transport_drops(node, "connection-limit")
                w.write(first)
                await wait_until(lambda: node.counters.connections_accepted
                                 + transport_drops(node, "connection-limit") > taken, 5.0, "the accept")
            return r, w

        try:
            a = await connect_as(c4)
            b = await connect_as(c4)  # c4 moves to b: a is bound to nobody now
            c = await connect_as(c5)
            d = await connect_as(c6)
            e = await connect_as(None)  # the table was full: a goes
            assert await closed_by_peer(a[0], 2.0)
            assert transport_drops(node, "connection-evicted") == 1
            nk = frame(make_newkey(cluster.identity(c7), cluster.public, {0: os.urandom(64)}, now_timestamp_us()))
            f = await connect_as(None, nk[:8])  # e, unauthenticated, goes
            assert await closed_by_peer(e[0], 2.0)
            assert transport_drops(node, "connection-evicted") == 2
            # f authenticates: every connection is a client's current one, a newcomer is refused
            f[1].write(nk[8:])
            await wait_until(lambda: c7 in node.client_conn, 5.0, "c7's NewKey")
            g = await connect_as(None)
            assert await closed_by_peer(g[0], 2.0)
            assert transport_drops(node, "connection-limit") == 1
            for r, _ in (b, c, d, f):
                assert not await closed_by_peer(r, 0.05)
            for _, w in (a, b, c, d, e, f, g):
                w.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_runtime_limits_are_validated(tmp_path):
    cluster = make_cluster(tmp_path)
    text = (cluster.dir / "cluster.toml").read_text()
    for key in ("unauthenticated_timeout_s", "idle_timeout_s", "frame_timeout_s", "partial_frames_bytes_max",
                "metrics_host", "http_connections_max", "http_request_timeout_s", "http_requests_per_s"):
        assert f"\n{key} = " in text  # pbft init writes every default
    assert all(r.metrics_host == "127.0.0.1" for r in cluster.replicas)
    bad = [("unauthenticated_timeout_s = 0", "positive"), ("partial_frames_bytes_max = 1000", "two of the largest"),
           ('metrics_host = "no such host"', "bad host"), ("metrics_host = 5", "string"),
           ("http_connections_max = -1", "positive")]
    for line, msg in bad:
        key = line.split(" ")[0]
        new = "\n".join(line if ln.startswith(key + " = ") else ln for ln in text.splitlines()) + "\n"
        (cluster.dir / "cluster.toml").write_text(new)
        with pytest.raises(ConfigError, match=msg):
            load_cluster(cluster.dir)
    # per replica: where its endpoint listens, and where ``pbft status`` then looks
    new = text.replace('metrics_host = "127.0.0.1"', 'metrics_host = "0.0.0.0"')
    new = new.replace("id = 1\n", 'id = 1\nmetrics_host = "127.0.0.2"\n', 1)
    (cluster.dir / "cluster.toml").write_text(new)
    c = load_cluster(cluster.dir)
    assert [r.metrics_host for r in c.replicas] == ["0.0.0.0", "127.0.0.2", "0.0.0.0", "0.0.0.0"]
    assert c.replicas[0].metrics_addr == c.replicas[0].host and c.replicas[1].metrics_addr == "127.0.0.2"


# ---------------------------------------------------------------------------
# real replica processes
# ---------------------------------------------------------------------------

def idle_sockets(lc: LocalCluster, per_replica: int) -> list[socket.socket]:
    socks = []
    for r in lc.cluster.replicas:
        for _ in range(per_replica):
            s = socket.create_connection((r.host, r.port), timeout=2.0)
            socks.append(s)
    return socks


def transport_metric(lc: LocalCluster, rid: int, reason: str) -> float:
    from test_runtime import metric, metrics_text
    text = metrics_text(lc, rid)
    if f'reason="{reason}"' not in text:
        return 0.0
    return metric(text, "pbft_dropped_messages_total", layer="transport", reason=reason)


def test_full_connection_table_still_admits_a_correct_client(tmp_path):
    """Every replica's table is filled with idle sockets (which would not time out during the
    test); a new client's connections evict the oldest of them and its requests complete."""
    lc = LocalCluster(tmp_path / "c", runtime={"connections_max": 16, "unauthenticated_timeout_s": 60.0})
    socks = []
    try:
        lc.start_all()
        # more than the table holds (the later ones already evict), within one address's share
        # of the accept budget (25 of 50)
        socks = idle_sockets(lc, 20)
        time.sleep(DEFER_ACCEPT_S + 1.0)  # (the kernel holds a connection that sends nothing that long)
        with BlockingClient(lc.dir, wait_s=10.0) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            for i in range(5):
                kv.put(f"k{i}".encode(), b"v")
            assert kv.get(b"k4") == b"v"
        for rid in range(4):
            assert transport_metric(lc, rid, "connection-evicted") >= (20 - 16) + 1
            st = lc.status(rid)
            assert len(st["peers_connected"]) == 3  # replica links are never evicted
    finally:
        for s in socks:
            s.close()
        lc.stop()


def test_http_endpoint_slow_clients_and_flood(tmp_path):
    """Slow HTTP clients are closed after http_request_timeout_s and cannot lock the endpoint out;
    a flood of GETs is served at its own pace while a correct client's requests complete."""
    lc = LocalCluster(tmp_path / "c", runtime={"http_request_timeout_s": 1.0, "http_connections_max": 8,
                                               "http_requests_per_s": 40.0})
    try:
        lc.start_all()
        r = lc.cluster.replicas[0]
        slow = []
        for _ in range(20):  # more than it serves at once
            s = socket.create_connection((r.metrics_addr, r.metrics_port), timeout=5.0)
            s.sendall(b"GET /status HTTP/1.1\r\n")  # ... and the rest never comes
            slow.append(s)
        # a correct request still gets its answer (the oldest slow clients make room)
        st = lc.wait_for(lambda: lc.status(0, timeout=3.0), timeout=10.0, what="/status during a slowloris")
        assert st["replica"] == 0
        deadline = time.monotonic() + 6.0
        pending = list(slow)
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not _closed(s, 0.1)]
        assert not pending, f"{len(pending)} slow HTTP connections were left open"
        for s in slow:
            s.close()

        stop = threading.Event()
        served = [0]

        def flood():
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://{r.metrics_addr}:{r.metrics_port}/metrics", timeout=2) as resp:
                        resp.read()
                    served[0] += 1
                except OSError:
                    pass

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            with BlockingClient(lc.dir, wait_s=10.0) as bc:
                kv = KVClient(bc.invoke, timeout=20.0)
                for i in range(20):
                    kv.put(f"f{i}".encode(), b"x")
                assert kv.get(b"f19") == b"x"
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        assert served[0] >= 1  # the flood was being answered meanwhile
        from test_runtime import metric, metrics_text
        text = metrics_text(lc, 0)
        assert metric(text, "pbft_dropped_messages_total", layer="http", reason="http-timeout") \
            + metric(text, "pbft_dropped_messages_total", layer="http", reason="http-evicted") >= 20
    finally:
        lc.stop()


def _closed(s: socket.socket, timeout: float) -> bool:
    """True if the other side closed ``s`` (within ``timeout`` seconds)."""
    s.settimeout(timeout)
    try:
        while True:
            if s.recv(4096) == b"":
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def test_unauthenticated_accepts_are_budgeted_and_authenticated_ones_free(tmp_path):
    """Connections that never authenticate are served at most ``unauthenticated_accepts_per_s``
    a second (a burst of 16 here); a connection that authenticates gives its credit back, so any
    number of correct clients connect one after the other without a pause.  One source address
    may take only half of the budget: past its share (with half the budget gone) its connections
    are closed at once, and connections from another address are still served; accepts, served
    or refused, are bounded too (past them the rest wait in the kernel's queue, the pause counted)."""
    cluster = make_cluster(tmp_path, runtime={"unauthenticated_accepts_per_s": 5.0}, clients=2)

    async def main():
        node, = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        c = cluster.client_ids[0]

        async def open_from(src: str, n: int) -> list:
            out = []
            for _ in range(n):
                rw = await asyncio.open_connection(me.host, me.port, local_addr=(src, 0))
                rw[1].write(PARTIAL_NEWKEY)
                out.append(rw)
            return out

        try:
            # 40 correct connections in turn, each authenticating before the next: more than the
            # burst (16), none paused or refused
            for _ in range(40):
                r, w = await asyncio.open_connection(me.host, me.port)
                nk = make_newkey(cluster.identity(c), cluster.public, {0: os.urandom(64)}, now_timestamp_us())
                w.write(frame(nk))
                await wait_until(lambda: node.client_conn.get(c) is not None
                                 and node.client_conn[c] is list(node.guard.conns)[-1], 5.0, "the NewKey")
                w.close()
            assert transport_drops(node, "accept-paused") == 0
            assert transport_drops(node, "accept-source-over-budget") == 0
            # 40 that never authenticate from one address: its share (8 of 16) is served, then
            # the rest is closed at once
            accepted0 = node.counters.connections_accepted
            t0 = time.monotonic()
            flood = await open_from("127.0.0.1", 40)
            await wait_until(lambda: node.counters.connections_accepted - accepted0
                             + transport_drops(node, "accept-source-over-budget") == 40, 5.0, "all 40 taken")
            took = node.counters.connections_accepted - accepted0
            elapsed = time.monotonic() - t0
            # (its own 8, and what the budget refilled meanwhile beyond half of it)
            assert 8 <= took <= 8 + 5 * elapsed + 1, (took, elapsed)
            refused = transport_drops(node, "accept-source-over-budget")
            closed = [await closed_by_peer(r, 0.05) for r, _ in flood]
            assert sum(closed) >= refused
            # another address is still served: 6 of its connections, and a client of it authenticates
            accepted1 = node.counters.connections_accepted
            other = await open_from("127.0.0.2", 6)
            await wait_until(lambda: node.counters.connections_accepted - accepted1 >= 6, 5.0, "the other address")
            assert not any([await closed_by_peer(r, 0.05) for r, _ in other])
            r, w = await asyncio.open_connection(me.host, me.port, local_addr=("127.0.0.2", 0))
            w.write(frame(make_newkey(cluster.identity(c), cluster.public, {0: os.urandom(64)}, now_timestamp_us())))
            await wait_until(lambda: node.client_conn.get(c) is not None
                             and node.client_conn[c] is list(node.guard.conns)[-1], 5.0, "its client's NewKey")
            # refusals are bounded too (twice the budget's rate, burst): the 40 at once ran out of
            # accepts, the replica paused and the rest waited in the kernel's queue
            assert transport_drops(node, "accept-paused") >= 1
            for _, wx in flood + other + [(r, w)]:
                wx.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_first_bytes_are_screened_at_accept(tmp_path, monkeypatch):
    """A connection whose first bytes show it would be closed at its first frame is refused when
    it is taken from the listen queue -- no transport, no connection object -- and counted as the
    first frame would have been (then held, unread, until it is closed: ``Listener.TARPIT_HOLD_S``,
    short here); a correct client is served as before, and a connection that has sent nothing
    yet (or only part of its first frame) is served and judged by its frames."""
    monkeypatch.setattr(Listener, "TARPIT_HOLD_S", 0.2)
    cluster = make_cluster(tmp_path, clients=2)
    c = cluster.client_ids[0]

    async def main():
        from pbft.codec import seal
        from pbft.crypto import KeyRing
        from pbft.messages import Prepare, Request
        from pbft.services.kv import encode_op

        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        try:
            nk = frame(make_newkey(cluster.identity(c), cluster.public, {0: os.urandom(64)}, now_timestamp_us()))
            r, w = await asyncio.open_connection(me.host, me.port)
            w.write(nk)
            await wait_until(lambda: node.client_conn.get(c) is not None, 5.0, "the NewKey")
            assert node.server.refused == 0
            accepted = node.counters.connections_accepted
            ring = KeyRing(c, cluster.cfg.n, {j: os.urandom(32) for j in range(cluster.cfg.n)}, {})
            fake = KeyRing(1, cluster.cfg.n, {j: os.urandom(32) for j in range(cluster.cfg.n)}, {})
            cases = [
                (b"GET / HTTP/1.1\r\n\r\n", "oversized-frame"),  # ("GET " as a length: 1.2 GB)
                (frame(b"\x94\x01\x02\x03\x04"), "malformed"),
                (struct.pack(">I", MAX_FRAME * 2) + b"x" * 100, "oversized-frame"),
                (struct.pack(">I", MAX_FRAME) + b"\x95" * 100, "unauthenticated-frame-too-large"),
                (frame(seal(Request(c, now_timestamp_us(), encode_op("get", b"k"), False, 0), ring)), "spoofed-client"),
                (frame(seal(Prepare(0, 1, bytes(32), 1), fake)), "spoofed-replica"),
                (frame(seal(Prepare(0, 1, bytes(32), 0), fake)), "spoofed-self"),
                (nk, "newkey-stale"),  # an exact replay of the NewKey accepted above
            ]
            for data, reason in cases:
                before = dict(node.counters.drops)
                rx, wx = await asyncio.open_connection(me.host, me.port)
                wx.write(data)
                assert await closed_by_peer(rx, 5.0), reason
                wx.close()
                if reason is not None:
                    assert node.counters.drops.get(reason, 0) == before.get(reason, 0) + 1, reason
            assert node.server.refused == len(cases)
            assert node.counters.connections_refused == len(cases)  # (exported: pbft_connections_refused)
            assert node.counters.connections_accepted == accepted  # none got a connection object
            assert transport_drops(node, "connection-closed-unauthenticated") >= 4
            assert transport_drops(node, "accept-tarpitted") == len(cases)
            assert transport_drops(node, "tarpit-expired") == len(cases) and not node.server.tarpit
            # served: a NewKey's first bytes (the rest to come), and a correct client
            rp, wp = await asyncio.open_connection(me.host, me.port)
            wp.write(PARTIAL_NEWKEY)
            await wait_until(lambda: node.counters.connections_accepted == accepted + 1, 5.0, "the partial NewKey")
            c2 = cluster.client_ids[1]
            r2, w2 = await asyncio.open_connection(me.host, me.port)
            w2.write(frame(make_newkey(cluster.identity(c2), cluster.public, {0: os.urandom(64)}, now_timestamp_us())))
            await wait_until(lambda: node.client_conn.get(c2) is not None, 5.0, "the second client's NewKey")
            assert node.server.refused == len(cases)
            for wx in (w, wp, w2):
                wx.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_refused_connections_are_held_bounded_and_never_block_correct_clients(tmp_path, monkeypatch):
    """A connection the screen refuses (here a replayed NewKey) is held open and unread: its
    peer's writes stall on flow control instead of its being closed and reconnecting.  At most
    ``TARPIT_MAX`` are held, a new one closes the oldest (``tarpit-full``), each goes after
    ``TARPIT_HOLD_S`` (``tarpit-expired``); a full tarpit takes nothing from a correct client,
    which connects and authenticates at once."""
    monkeypatch.setattr(Listener, "TARPIT_MAX", 3)
    monkeypatch.setattr(Listener, "TARPIT_HOLD_S", 3.0)
    cluster = make_cluster(tmp_path, clients=2)
    c, c2 = cluster.client_ids[:2]

    async def main():
        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        try:
            nk = frame(make_newkey(cluster.identity(c), cluster.public, {0: os.urandom(64)}, now_timestamp_us()))
            r, w = await asyncio.open_connection(me.host, me.port)
            w.write(nk)
            await wait_until(lambda: node.client_conn.get(c) is not None, 5.0, "the NewKey")
            replays = []
            for k in range(5):
                rx, wx = await asyncio.open_connection(me.host, me.port)
                wx.write(nk)  # the NewKey replayed
                replays.append((rx, wx))
                await wait_until(lambda k=k: node.server.refused == k + 1, 5.0, f"replay {k} refused")
            assert transport_drops(node, "newkey-stale") == 5
            assert transport_drops(node, "accept-tarpitted") == 5
            assert transport_drops(node, "tarpit-full") == 2 and len(node.server.tarpit) == 3
            # the two oldest were closed to make room; the three newest are held open
            assert [await closed_by_peer(rx, 2.0) for rx, _ in replays[:2]] == [True, True]
            assert [await closed_by_peer(rx, 0.1) for rx, _ in replays[2:]] == [False] * 3
            # a held connection is not read: what its peer writes stalls (8 MiB do not fit in
            # the kernel's buffers of both ends)
            _, wheld = replays[-1]
            wheld.write(bytes(8 << 20))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(wheld.drain(), 0.5)
            # a correct client connects and authenticates while the tarpit is full
            accepted = node.counters.connections_accepted
            r2, w2 = await asyncio.open_connection(me.host, me.port)
            w2.write(frame(make_newkey(cluster.identity(c2), cluster.public, {0: os.urandom(64)}, now_timestamp_us())))
            await wait_until(lambda: node.client_conn.get(c2) is not None, 5.0, "the correct client's NewKey")
            assert node.counters.connections_accepted == accepted + 1
            assert len(node.server.tarpit) == 3
            # each is held for TARPIT_HOLD_S at most
            assert [await closed_by_peer(rx, 5.0) for rx, _ in replays[2:]] == [True] * 3
            assert transport_drops(node, "tarpit-expired") == 3 and not node.server.tarpit
            for _, wx in replays:
                wx.transport.abort()
            for wx in (w, w2):
                wx.close()
        finally:
            await stop_nodes([node])

    asyncio.run(main())


def test_a_stopped_listener_closes_the_connections_it_holds(tmp_path):
    cluster = make_cluster(tmp_path, clients=1)

    async def main():
        (node,) = await start_nodes(cluster, [0])
        me = cluster.replicas[0]
        rx, wx = await asyncio.open_connection(me.host, me.port)
        try:
            wx.write(frame(b"\x94\x01\x02\x03\x04"))  # malformed: refused and held
            await wait_until(lambda: len(node.server.tarpit) == 1, 5.0, "the connection held")
            assert not await closed_by_peer(rx, 0.1)
        finally:
            await stop_nodes([node])
        assert not node.server.tarpit and node.server.tarpit_timer is None
        assert await closed_by_peer(rx, 2.0)
        wx.close()

    asyncio.run(main())


def test_token_bucket_wait_for_several_tokens():
    """An out-of-accepts listener waits for ``ACCEPTS_PER_RESUME`` tokens, never beyond the burst."""
    b = transport.TokenBucket(rate=10.0, burst=4.0)
    for _ in range(4):
        assert b.take(100.0)
    assert not b.take(100.0)
    assert b.wait_s() == pytest.approx(0.1)
    assert b.wait_s(3) == pytest.approx(0.3)
    assert b.wait_s(8) == pytest.approx(0.4)  # (the burst: 4 tokens)
    assert b.level(100.3) == pytest.approx(3.0) and b.wait_s(3) == pytest.approx(0.0)


def test_source_key_groups_ipv6_by_prefix():
    assert Listener.source_key(("192.0.2.7", 5000)) == "192.0.2.7"
    assert Listener.source_key(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    a = Listener.source_key(("2001:db8:1:2::1", 5000, 0, 0))
    assert a == Listener.source_key(("2001:db8:1:2:ffff::9", 1, 0, 0))  # the same /64
    assert a != Listener.source_key(("2001:db8:1:3::1", 5000, 0, 0))
