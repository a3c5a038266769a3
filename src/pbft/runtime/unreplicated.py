"""The unreplicated baseline: one server running the same service on the same stack.

Same transport, same frames, same session keys (NewKey) and MACs, same
exactly-once table, same client library (a cluster of one replica, f=0), and
the same front-end checks (``runtime.admission``: principals bound to
connections, NewKey admission, request credits, request timestamps bounded,
cached replies sent again at most once per half retry timeout), so that ``pbft bench`` measures
what replication costs and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from ..codec import Codec, DecodeError, result_digest, seal
from ..crypto import KEY_SIZE, KeyRing
from ..messages import Reply, Request, Tag
from ..service import Service
from . import gctune
from .cluster import Cluster
from .admission import (REQUEST_CREDITS_BURST, REQUEST_CREDITS_PER_RETRY_TIMEOUT, NewKeyGate, RequestBudget,
                        RequestSlots, frame_sender)
from .keys import NEWKEY_TAG, Identity
from .transport import (AUTH_CLIENT, UNAUTHENTICATED, Counters, FrameConn, InboundGuard, InboundLimits,
                        client_frame_bytes_max, frame)


_TAG_REQUEST = int(Tag.REQUEST)  # (read once, as the replicas' frame path does)


class UnreplicatedServer:
    def __init__(self, cluster: Cluster, identity: Identity, service: Service):
        assert cluster.cfg.n == 1
        self.cluster = cluster
        self.cfg = cluster.cfg
        self.identity = identity
        self.service = service
        self.codec = Codec(self.cfg)
        self.ring = KeyRing(0, 1, {}, {})
        self.counters = Counters()
        self.newkey_gate = NewKeyGate(identity, cluster.public, 1, self.cfg.max_principal,
                                      self.cfg.timestamp_skew_ms_max, self.counters)
        self.skew_us = int(self.cfg.timestamp_skew_ms_max * 1000)
        self.request_budget = RequestBudget(
            REQUEST_CREDITS_BURST, REQUEST_CREDITS_PER_RETRY_TIMEOUT * 1000.0 / self.cfg.client_retry_timeout_ms)
        self.request_slots = RequestSlots(asyncio.get_event_loop(), self.counters, self._on_frame)
        self.reply_resent: dict[int, tuple[int, float]] = {}
        self.client_conn: dict[int, FrameConn] = {}
        self.last_reply: dict[int, tuple[int, bytes]] = {}
        self.executed = 0
        self.server: Optional[asyncio.Server] = None
        self.pending: dict[FrameConn, list[bytes]] = {}
        self.flush_pending = False
        self.stopping = asyncio.Event()
        rt = cluster.runtime
        self.client_frame_max = client_frame_bytes_max(self.cfg)
        # the replicas' limits on inbound connections (the server has clients only)
        self.guard = InboundGuard(self.counters, InboundLimits(
            rt.unauthenticated_timeout_s, rt.idle_timeout_s, rt.frame_timeout_s, rt.partial_frames_bytes_max,
            self.client_frame_max))

    async def start(self) -> None:
        me = self.cluster.replicas[0]
        self.server = await asyncio.get_event_loop().create_server(self._make_conn, me.host, me.port,
                                                                   reuse_address=True, backlog=512)

    def close(self) -> None:
        self.guard.stop()
        if self.server is not None:
            self.server.close()

    def _make_conn(self) -> FrameConn:
        conn = FrameConn(self._on_frame, self.counters, self.client_frame_max,
                         64, self.cluster.runtime.send_queue_bytes_max)
        self.guard.add(conn)
        return conn

    def _on_frame(self, conn: FrameConn, raw: bytes) -> None:
        if len(raw) > 1 and raw[1] == NEWKEY_TAG:
            got = self.newkey_gate.accept(conn, raw)
            if got is None:
                return
            c, k = got
            self.ring.in_keys[c] = k[:KEY_SIZE]
            self.ring.out_keys[c] = k[KEY_SIZE:]
            self.client_conn[c] = conn
            conn.authenticate(AUTH_CLIENT)
            return
        # the replicas' front-end checks (runtime.admission): the principal binding first
        s = frame_sender(raw)
        if self.client_conn.get(s) is not conn:
            self.counters.drop("malformed" if s < 0 else "spoofed-self" if s == 0 else "spoofed-client")
            if conn.auth == UNAUTHENTICATED and not conn.closed:
                self.counters.drop("connection-closed-unauthenticated")
                conn.close()
            return
        wait = self.request_budget.take(s, time.monotonic())
        if wait:  # (paced as the replicas pace a client's requests)
            self.request_slots.park(s, conn, raw, wait)
            return
        try:
            _, req = self.codec.open_authenticated(raw, self.ring, _TAG_REQUEST)
        except DecodeError as e:
            self.counters.drop(e.reason)
            return
        assert isinstance(req, Request)
        if not req.read_only and req.timestamp > time.time_ns() // 1000 + self.skew_us:
            self.counters.drop("request-future-timestamp")
            return
        last = self.last_reply.get(req.client)
        if last is not None and req.timestamp < last[0]:
            self.counters.drop("old-timestamp")
            return
        if last is not None and req.timestamp == last[0]:
            # retransmission: the cached reply, executed once, and sent again at most once per
            # half retry timeout (as the replicas do)
            now = time.monotonic()
            sent = self.reply_resent.get(req.client)
            if sent is not None and sent[0] == req.timestamp and \
                    now - sent[1] < self.cfg.client_retry_timeout_ms / 2000.0:
                self.counters.drop("reply-resend-rate-limited")
                return
            self.reply_resent[req.client] = (req.timestamp, now)
            result = last[1]
        else:
            result = self.service.execute(req.op, req.client, b"", req.read_only)
            self.executed += 1
            if not req.read_only:
                self.last_reply[req.client] = (req.timestamp, result)
        rep = Reply(0, req.timestamp, req.client, 0, False, req.read_only, result_digest(result), result)
        dest = self.client_conn.get(req.client)
        if dest is not None:
            # replies leaving in one loop turn are written together, as the replicas do
            out = self.pending.get(dest)
            if out is None:
                self.pending[dest] = out = []
                if not self.flush_pending:
                    self.flush_pending = True
                    asyncio.get_event_loop().call_soon(self._flush)
            out.append(frame(seal(rep, self.ring, to=req.client)))
            self.request_budget.replied(req.client)

    def _flush(self) -> None:
        self.flush_pending = False
        pending, self.pending = self.pending, {}
        for c, frames in pending.items():
            c.send(b"".join(frames))


def run_unreplicated(cluster: Cluster, service: Service) -> None:
    import uvloop

    from .sched import apply_scheduling

    apply_scheduling(cluster.runtime.scheduling)  # the same stack as a replica's, policy included

    async def main():
        srv = UnreplicatedServer(cluster, cluster.identity(0), service)
        await srv.start()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, srv.stopping.set)
        await srv.stopping.wait()
        srv.close()

    gctune.tune()  # as a replica's (runtime.gctune)
    uvloop.run(main())

