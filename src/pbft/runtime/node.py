"""A replica process: the pure core (``pbft.core.replica.Replica``) on real sockets.

The driver does exactly what the simulator does, with a real clock and TCP:
frames in -> ``replica.receive``; deadlines -> ``replica.tick``; after each
event-loop turn, ``replica.take_sends`` -> sockets.  Sends are coalesced per
destination per turn (one write per peer), which is what makes batching and
vouching cheap under load.

Besides the core it handles what the core does not know about: session keys
(NewKey, ``runtime.keys``), the mapping from client ids to the connections
their NewKey came on, metrics, the status endpoint and structured logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from typing import Optional

from ..codec import DecodeError
from ..config import ConfigError
from ..core.replica import Replica
from ..crypto import KEY_SIZE, KeyRing
from ..service import Service
from .cluster import Cluster
from .keys import NEWKEY_TAG, Identity, accept_newkey, fresh_key, make_newkey, now_timestamp_us
from .metrics import HttpEndpoint, ReplicaMetrics
from .transport import Counters, FrameConn, OutLink, TokenBucket, frame

FIXARRAY5 = 0x95  # msgpack header of a 5-element array: every frame starts with it
LOGGED_EVENTS = frozenset({"view-change", "new-view", "stable", "state-transfer", "checkpoint-mismatch", "fetch", "rollback"})


def log(replica: int, event: str, **fields) -> None:
    """One structured (JSON) log line on stderr."""
    rec = {"ts": round(time.time(), 3), "replica": replica, "event": event}
    rec.update(fields)
    print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


class ReplicaNode:
    def __init__(self, cluster: Cluster, replica_id: int, identity: Identity, service: Service,
                 quiet: bool = False):
        self.cluster = cluster
        self.cfg = cluster.cfg
        self.id = replica_id
        self.identity = identity
        self.rt = cluster.runtime
        self.quiet = quiet
        self.loop = asyncio.get_event_loop()
        self.counters = Counters()
        n = self.cfg.n
        self.ring = KeyRing(replica_id, n, {}, {})
        self.replica = Replica(self.cfg, replica_id, self.ring, service, now=self._now(), trace=self._on_trace)
        self._sync_wall_clock()
        self.links: dict[int, OutLink] = {}
        self.client_conn: dict[int, FrameConn] = {}
        self.newkey_ts: dict[int, int] = {}
        self.my_newkey: Optional[bytes] = None
        self.inbound: set[FrameConn] = set()
        self.flush_pending = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at: Optional[float] = None
        self.req_arrival: dict[int, float] = {}
        self.view_changes = 0
        self.new_views = 0
        self.started = time.time()
        self.metrics = ReplicaMetrics(self)
        self.stopping = asyncio.Event()
        self.failed = False
        self.server: Optional[asyncio.AbstractServer] = None
        self.http: Optional[HttpEndpoint] = None
        self.newkey_bucket = TokenBucket(rate=2000.0, burst=2000.0)  # NewKeys checked, all connections

    # ---- clock and logging --------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() * 1000.0

    def _sync_wall_clock(self) -> None:
        self.replica.wall_offset_ms = time.time() * 1000.0 - self._now()

    def _on_trace(self, rid: int, ev: tuple) -> None:
        kind = ev[0]
        if kind not in LOGGED_EVENTS:
            return
        if kind == "view-change":
            self.view_changes += 1
            self._log("view-change", view=ev[1], reason=ev[2])
        elif kind == "new-view":
            self.new_views += 1
            self._log("new-view", view=ev[1], primary=ev[1] % self.cfg.n)
        elif kind == "stable":
            self.metrics.on_stable(ev[1])
        elif kind == "state-transfer":
            self._log("state-transfer", seqno=ev[1])
        elif kind == "checkpoint-mismatch":
            self._log("checkpoint-mismatch", seqno=ev[1])
        elif kind == "fetch":
            self._log("fetch-state", seqno=ev[1])
        elif kind == "rollback":
            self._log("rollback", to_seqno=ev[1])

    def _log(self, event: str, **fields) -> None:
        if not self.quiet:
            log(self.id, event, **fields)

    # ---- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        me = self.cluster.replicas[self.id]
        self._refresh_keys(broadcast=False)
        try:
            self.server = await self.loop.create_server(self._accept, me.host, me.port, reuse_address=True,
                                                        backlog=512)
        except OSError as e:
            raise ConfigError(f"replica {self.id} cannot listen on {me.host}:{me.port}: {e.strerror or e}") from None
        for r in self.cluster.replicas:
            if r.id == self.id:
                continue
            link = OutLink(r.host, r.port, self._make_conn, self._on_link_up,
                           self.rt.reconnect_min_s, self.rt.reconnect_max_s)
            self.links[r.id] = link
            link.start()
        self.http = HttpEndpoint(self.metrics)
        try:
            await self.http.start(me.host, me.metrics_port)
        except OSError as e:
            raise ConfigError(f"replica {self.id} cannot serve metrics on {me.host}:{me.metrics_port}: "
                              f"{e.strerror or e}") from None
        self.loop.call_later(self._refresh_delay(), self._periodic_refresh)
        self._rearm()
        self._log("started", host=me.host, port=me.port, metrics_port=me.metrics_port, n=self.cfg.n, f=self.cfg.f)

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        if self.server is not None:
            self.server.close()
        for c in list(self.inbound):
            c.close()
        if self.http is not None:
            self.http.close()
        if self.timer is not None:
            self.timer.cancel()
        self._log("stopped")

    # ---- connections --------------------------------------------------------
    def _make_conn(self) -> FrameConn:
        return FrameConn(self._on_frame, self.counters, self.cfg.message_size_bytes_max + 1024,
                         self.rt.receive_budget_frames, self.rt.send_queue_bytes_max, self._on_lost)

    def _accept(self) -> FrameConn:
        conn = self._make_conn()
        if len(self.inbound) >= self.rt.connections_max:
            self.counters.drop("connection-limit")
            conn.meta["reject"] = True
            self.loop.call_soon(conn.close)
        else:
            self.inbound.add(conn)
            self.counters.connections_accepted += 1
        return conn

    def _on_lost(self, conn: FrameConn) -> None:
        self.inbound.discard(conn)
        for c in conn.meta.get("clients", ()):
            if self.client_conn.get(c) is conn:
                del self.client_conn[c]

    def _on_link_up(self, link: OutLink) -> None:
        # the peer may have restarted and lost our keys: tell it again which keys to use
        if self.my_newkey is not None:
            link.conn.send(frame(self.my_newkey))

    # ---- keys ---------------------------------------------------------------
    def _refresh_delay(self) -> float:
        p = self.rt.key_refresh_s
        return p * (0.9 + 0.2 * random.random())

    def _periodic_refresh(self) -> None:
        self._refresh_keys(broadcast=True)
        self.loop.call_later(self._refresh_delay(), self._periodic_refresh)

    def _refresh_keys(self, broadcast: bool) -> None:
        """Choose fresh keys for every replica to send to us with; old ones stop working now."""
        keys = {}
        for j in range(self.cfg.n):
            if j != self.id:
                k = fresh_key()
                keys[j] = k
                self.ring.in_keys[j] = k
        self.my_newkey = make_newkey(self.identity, self.cluster.public, keys, now_timestamp_us())
        if broadcast:
            data = frame(self.my_newkey)
            for link in self.links.values():
                link.send(data, self.counters)
        self.metrics.key_refreshes += 1

    def _on_newkey(self, conn: FrameConn, raw: bytes) -> None:
        now = time.monotonic()
        # signatures cost ~40 us: bound what one connection, and all together, can make us verify
        bucket = conn.meta.get("newkey-bucket")
        if bucket is None:
            bucket = conn.meta["newkey-bucket"] = TokenBucket(rate=200.0, burst=512.0)
        if not bucket.take(now) or not self.newkey_bucket.take(now):
            self.counters.drop("newkey-rate-limited")
            return
        try:
            sender, k = accept_newkey(raw, self.identity, self.cluster.public, self.cfg.n,
                                      self.cfg.n + self.cfg.clients_max - 1, self.newkey_ts)
        except DecodeError as e:
            self.counters.drop(e.reason)
            return
        self.metrics.newkeys_accepted += 1
        if sender < self.cfg.n:
            self.ring.out_keys[sender] = k
        else:
            c = sender
            self.ring.in_keys[c] = k[:KEY_SIZE]
            self.ring.out_keys[c] = k[KEY_SIZE:]
            self.client_conn[c] = conn
            conn.meta.setdefault("clients", set()).add(c)

    # ---- the core -----------------------------------------------------------
    def _on_frame(self, conn: FrameConn, raw: bytes) -> None:
        if len(raw) < 2 or raw[0] != FIXARRAY5:
            self.counters.drop("malformed")
            return
        tag = raw[1]
        if tag == NEWKEY_TAG:
            self._on_newkey(conn, raw)
            return
        now = self._now()
        if tag == 1 and len(raw) > 5:
            # arrival of a client's request, for the request-latency metric (the msgpack-encoded
            # sender id follows the tag: a positive fixint, or uint8/uint16/uint32)
            b = raw[2]
            c = b if b < 0x80 else raw[3] if b == 0xCC else int.from_bytes(raw[3:5], "big") if b == 0xCD \
                else int.from_bytes(raw[3:7], "big") if b == 0xCE else None
            if c is not None and c not in self.req_arrival and len(self.req_arrival) < 65536:
                self.req_arrival[c] = now
        try:
            self.replica.receive(raw, now)
        except Exception as e:  # noqa: BLE001
            self._fail_stop(e)
            return
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        sends = self.replica.take_sends()
        if sends:
            n = self.cfg.n
            # one write per connection per loop turn: replies to the many clients that share a
            # connection (a client pool) go out together, as do all frames to one replica
            per: dict[object, list[bytes]] = {}
            client_conn = self.client_conn
            arrivals = self.req_arrival
            counters = self.counters
            replied = []
            for dests, raw in sends:
                fr = frame(raw)
                for d in dests:
                    if d < n:
                        key = d
                    else:
                        key = client_conn.get(d)
                        if key is None:
                            counters.drop("client-unreachable")
                            continue
                        if d in arrivals:
                            replied.append(d)
                    lst = per.get(key)
                    if lst is None:
                        per[key] = [fr]
                    else:
                        lst.append(fr)
            links = self.links
            for key, frames in per.items():
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                counters.frames_out += len(frames)
                if type(key) is int:
                    link = links.get(key)
                    if link is not None:
                        link.send(data, counters)
                else:
                    key.send(data)
            if replied:
                now = self._now()
                for d in replied:
                    t0 = arrivals.pop(d, None)
                    if t0 is not None:
                        self.metrics.observe_latency((now - t0) / 1000.0)
        self._rearm()

    def _rearm(self) -> None:
        d = self.replica.next_deadline()
        if d == self.timer_at:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = d
        if d is not None:
            self.timer = self.loop.call_later(max(0.0, d / 1000.0 - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self._sync_wall_clock()
        try:
            self.replica.tick(self._now())
        except Exception as e:  # noqa: BLE001
            self._fail_stop(e)
            return
        self._flush()

    def _fail_stop(self, e: BaseException) -> None:
        """An internal invariant broke (a bug in the core, not bad input: bad input is dropped
        and counted). Stop rather than go on in a state nobody has reasoned about; the rest of
        the cluster tolerates a stopped replica, not a confused one."""
        import traceback
        self.failed = True
        log(self.id, "internal-error", error=repr(e), traceback=traceback.format_exc())
        self.stopping.set()

    # ---- status -------------------------------------------------------------
    def status(self) -> dict:
        r = self.replica
        return {
            "replica": self.id,
            "view": r.view,
            "primary": r.primary(),
            "view_active": r.view_active,
            "last_executed": r.last_exec,
            "last_committed": r.last_committed_exec,
            "stable_checkpoint": r.h,
            "executed_requests": r.executed_requests,
            "view_changes": self.view_changes,
            "fetching_state": r.fetch_target is not None,
            "seq_assigned": r.seq_assigned,
            "requests_known": len(r.known),
            "requests_pending": len(r.pending),
            "requests_queued": len(r.queue),
            "requests_inflight": len(r.inflight),
            "clients_trusted": len(r.trusted),
            "clients_suspected": sorted(r.suspects),
            "batch_size_mean": round(r.executed_requests / r.last_exec, 2) if r.last_exec else 0.0,
            "drops": dict(sorted(r.drops.items())),
            "peers_connected": sorted(j for j, l in self.links.items() if l.conn is not None),
            "clients_connected": len(self.client_conn),
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
        }


def run_replica(cluster: Cluster, replica_id: int, service: Service, quiet: bool = False) -> None:
    """Run one replica in the foreground until SIGINT/SIGTERM."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        uvloop = None
    identity = cluster.identity(replica_id)

    async def main():
        node = ReplicaNode(cluster, replica_id, identity, service, quiet=quiet)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stopping.set)
        await node.run()
        return node.failed

    profile = os.environ.get("PBFT_PROFILE")  # e.g. /tmp/prof: writes /tmp/prof.<id> (cProfile) on exit
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        failed = uvloop.run(main()) if uvloop is not None else asyncio.run(main())
        if failed:
            raise SystemExit(70)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{profile}.{replica_id}")
