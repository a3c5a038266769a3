"""The unreplicated baseline: one server running the same service on the same stack.

Same transport, same frames, same session keys (NewKey) and MACs, same
exactly-once table, same client library (a cluster of one replica, f=0), so
that ``pbft bench`` measures what replication costs and nothing else.
"""

from __future__ import annotations

import asyncio

from ..codec import Codec, DecodeError, result_digest, seal
from ..crypto import KEY_SIZE, KeyRing
from ..messages import Reply, Request
from ..service import Service
from .cluster import Cluster
from .keys import NEWKEY_TAG, Identity, accept_newkey
from .transport import AUTH_CLIENT, Counters, FrameConn, InboundGuard, InboundLimits, client_frame_bytes_max, frame


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
        self.newkey_ts: dict[int, int] = {}
        self.client_conn: dict[int, FrameConn] = {}
        self.last_reply: dict[int, tuple[int, bytes]] = {}
        self.executed = 0
        self.server = None
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
            try:
                c, k = accept_newkey(raw, self.identity, self.cluster.public, 1, self.cfg.clients_max,
                                     self.newkey_ts)
            except DecodeError as e:
                self.counters.drop(e.reason)
                return
            self.ring.in_keys[c] = k[:KEY_SIZE]
            self.ring.out_keys[c] = k[KEY_SIZE:]
            self.client_conn[c] = conn
            conn.authenticate(AUTH_CLIENT)
            return
        try:
            fr = self.codec.open_frame(raw)
            if fr.tag != 1:
                raise DecodeError("unexpected-type")
            if not self.ring.verify(fr.sender, fr.digest, fr.auth, fr.multi):
                raise DecodeError("bad-mac")
            req = self.codec.parse(fr)
        except DecodeError as e:
            self.counters.drop(e.reason)
            return
        assert isinstance(req, Request)
        last = self.last_reply.get(req.client)
        if last is not None and req.timestamp < last[0]:
            self.counters.drop("old-timestamp")
            return
        if last is not None and req.timestamp == last[0]:
            result = last[1]  # retransmission: the cached reply, executed once
        else:
            result = self.service.execute(req.op, req.client, b"", req.read_only)
            self.executed += 1
            if not req.read_only:
                self.last_reply[req.client] = (req.timestamp, result)
        rep = Reply(0, req.timestamp, req.client, 0, False, req.read_only, result_digest(result), result)
        c = self.client_conn.get(req.client)
        if c is not None:
            # replies leaving in one loop turn are written together, as the replicas do
            out = self.pending.get(c)
            if out is None:
                self.pending[c] = out = []
                if not self.flush_pending:
                    self.flush_pending = True
                    asyncio.get_event_loop().call_soon(self._flush)
            out.append(frame(seal(rep, self.ring, to=req.client)))

    def _flush(self) -> None:
        self.flush_pending = False
        pending, self.pending = self.pending, {}
        for c, frames in pending.items():
            c.send(b"".join(frames))


def run_unreplicated(cluster: Cluster, service: Service) -> None:
    import uvloop

    async def main():
        srv = UnreplicatedServer(cluster, cluster.identity(0), service)
        await srv.start()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, srv.stopping.set)
        await srv.stopping.wait()
        srv.close()

    uvloop.run(main())

