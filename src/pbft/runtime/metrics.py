"""Prometheus metrics and the status endpoint of a replica.

Metrics are read from the replica's counters when Prometheus scrapes, so the
hot path pays nothing for them except the latency histogram (one bisect per
reply).  The endpoint is a tiny HTTP server in a thread of its own (``HttpEndpoint``):

* ``GET /metrics``: Prometheus text format (``pbft_*`` metrics, listed in
  docs/operations.md);
* ``GET /status``: JSON with the replica's view, primary, last executed and
  stable checkpoint (what ``pbft status`` shows);
* ``GET /chain?from=E``: the links of its membership certificate chain after epoch E
  (``runtime.chain``, docs/reconfiguration.md).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .._native import status as native_status

if TYPE_CHECKING:  # pragma: no cover
    from .node import ReplicaNode

LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
HTTP_REQUEST_MAX_BYTES = 8192
SNAPSHOT_MIN_INTERVAL_S = 0.1  # the replica's loop takes at most 10 snapshots a second for the endpoint


class ReplicaMetrics:
    def __init__(self, node: "ReplicaNode"):
        self.node = node
        self.lat_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.lat_sum = 0.0
        self.key_refreshes = 0
        self.key_refreshes_coalesced = 0  # refreshes for others' recoveries folded into another one
        self.replica_flood_holds = 0  # replica connections held for flooding (node._count_waste)
        self.newkeys_accepted = 0
        self.stable_checkpoints = 0
        self.http_drops: dict[str, int] = {}  # the endpoint's, set by HttpEndpoint
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_latency(self, seconds: float) -> None:
        self.lat_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.lat_sum += seconds

    def on_stable(self, seqno: int) -> None:
        self.stable_checkpoints += 1

    def describe(self):
        return []

    def collect(self):
        node = self.node
        r = node.replica
        lab = [str(node.id)]

        def counter(name, doc, value):
            m = CounterMetricFamily(name, doc, labels=["replica"])
            m.add_metric(lab, value)
            return m

        def gauge(name, doc, value):
            m = GaugeMetricFamily(name, doc, labels=["replica"])
            m.add_metric(lab, value)
            return m

        yield counter("pbft_requests_executed", "Client requests executed (tentatively or committed)",
                      r.log.executed_requests)
        yield gauge("pbft_last_executed_seqno", "Sequence number of the last executed batch", r.last_exec)
        yield gauge("pbft_last_committed_seqno", "Sequence number of the last committed executed batch",
                    r.last_committed_exec)
        yield gauge("pbft_stable_checkpoint_seqno", "Sequence number of the last stable checkpoint", r.low_water_mark)
        yield counter("pbft_checkpoints_stable", "Checkpoints that became stable", self.stable_checkpoints)
        yield gauge("pbft_view", "Current view", r.view)
        yield gauge("pbft_native", "1 if this process runs the compiled modules of make native (pbft native)",
                    1 if native_status()["active"] else 0)
        yield gauge("pbft_is_primary", "1 if this replica is the primary of its view", 1 if r.is_primary else 0)
        yield gauge("pbft_view_active", "1 if the view is active (not in a view change)", 1 if r.view_active else 0)
        yield counter("pbft_view_changes", "View changes started by this replica", node.view_changes)
        yield counter("pbft_new_views", "New views installed", node.new_views)
        yield counter("pbft_internal_errors", "Internal errors (exceptions out of the core), each followed by a "
                      "reboot into a proactive recovery; kept across those reboots", node.internal_errors)
        yield counter("pbft_key_refreshes", "Session-key refreshes sent (NewKey)", self.key_refreshes)
        yield counter("pbft_replica_flood_holds", "Times a replica's connection was held because the core dropped "
                      "its frames faster than a correct replica's are", self.replica_flood_holds)
        yield counter("pbft_key_refreshes_coalesced", "Key refreshes for other replicas' recoveries folded into "
                      "another (at most one per few seconds)", self.key_refreshes_coalesced)
        yield counter("pbft_idle_rejoins", "View changes started to rejoin a replica left alone in a view change "
                      "on an idle cluster", r.vc.idle_rejoins)
        yield counter("pbft_newkeys_accepted", "NewKey messages accepted from others", self.newkeys_accepted)
        ts = r.transfer_stats
        yield counter("pbft_state_transfers", "State transfers completed", ts["transfers"])
        yield counter("pbft_state_transfer_objects", "Objects fetched by state transfers", ts["objects"])
        yield counter("pbft_state_transfer_bytes", "Object bytes fetched by state transfers", ts["bytes"])
        yield gauge("pbft_state_objects", "Objects in the checkpointed state (service + reply table)", r.state.n)
        yield gauge("pbft_state_unverified", "1 while the state awaits a check against a certified checkpoint",
                    1 if r.needs_state else 0)
        if node.store is not None:
            yield counter("pbft_store_writes", "Group commits written to the store", node.store.stats["writes"])
            yield counter("pbft_store_bytes_written", "Bytes written to the store", node.store.stats["bytes_written"])
            yield counter("pbft_store_sync_seconds", "Time spent writing and syncing the store",
                          node.store.stats["sync_seconds"])
        yield gauge("pbft_recovering", "1 while a proactive recovery is under way", 1 if r.recovering else 0)
        yield counter("pbft_recoveries", "Proactive recoveries completed (since this process started)", r.recoveries)
        yield gauge("pbft_recovery_overdue", "1 if the recovery under way has taken longer than recovery.alarm_s",
                    1 if node.recovery_overdue else 0)
        if r.last_recovery_ms is not None:
            yield gauge("pbft_last_recovery_seconds", "Duration of the last proactive recovery",
                        r.last_recovery_ms / 1000)
        c = node.counters
        yield counter("pbft_frames_received", "Frames received", c.frames_in)
        yield counter("pbft_frames_sent", "Frames sent", c.frames_out)
        yield counter("pbft_bytes_received", "Bytes received", c.bytes_in)
        yield counter("pbft_bytes_sent", "Bytes sent", c.bytes_out)
        yield counter("pbft_connections_accepted", "Inbound connections accepted", c.connections_accepted)
        yield counter("pbft_connections_refused", "Inbound connections closed at accept, before any transport "
                      "(their reasons: pbft_dropped_messages, layer transport)", c.connections_refused)
        yield gauge("pbft_connections_open", "Inbound connections open", len(node.inbound))
        yield gauge("pbft_connections_tarpitted", "Inbound connections refused at accept and held open unread "
                    "(runtime.transport.Listener: TARPIT_MAX at most)",
                    len(node.server.tarpit) if node.server is not None else 0)
        yield gauge("pbft_peers_connected", "Outbound links to other replicas that are up",
                    sum(1 for lk in node.links.values() if lk.conn is not None))
        yield gauge("pbft_config_epoch", "The configuration epoch in force here (docs/reconfiguration.md)",
                    node.epochs.epoch)
        d = CounterMetricFamily("pbft_dropped_messages", "Messages dropped, by layer and reason",
                                labels=["replica", "layer", "reason"])
        for reason, k in sorted(r.drops.items()):
            d.add_metric([lab[0], "protocol", reason], k)
        for reason, k in sorted(c.drops.items()):
            d.add_metric([lab[0], "transport", reason], k)
        for reason, k in sorted(self.http_drops.items()):  # sorted() copies it in one step
            d.add_metric([lab[0], "http", reason], k)
        yield d
        e = CounterMetricFamily("pbft_protocol_counts", "What the protocol counts that is not a drop, by what",
                                labels=["replica", "what"])
        for what, k in sorted(r.counts.items()):
            e.add_metric([lab[0], what], k)
        yield e
        h = HistogramMetricFamily("pbft_request_latency_seconds",
                                  "Time from a client's request arriving to its reply leaving", labels=["replica"])
        acc = 0
        buckets = []
        for b, k in zip(LATENCY_BUCKETS_S, self.lat_counts):
            acc += k
            buckets.append((repr(b), acc))
        acc += self.lat_counts[-1]
        buckets.append(("+Inf", acc))
        h.add_metric(lab, buckets, self.lat_sum)
        yield h

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Families:
    """A registry-like holder of metric families collected earlier (what ``generate_latest`` reads)."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def _chain_answer(status: dict, query: str) -> tuple[str, str, bytes]:
    """``GET /chain?from=E``: the links of this replica's membership certificate chain that open
    memberships of epochs after E (all without ``from``), as ``{"from": E, "links": N, "chain":
    hex}`` (``runtime.chain``: verify them from the membership of epoch E held, ``verify_from``)."""
    from .chain import ChainError, decode_chain, encode_chain, links_after

    after = -1
    for kv in query.split("&") if query else []:
        k, _, v = kv.partition("=")
        if k != "from" or not v.isdigit() or len(v) > 12:
            return "400 Bad Request", "text/plain", b"the query is from=EPOCH (a number)\n"
        after = int(v)
    try:
        links = links_after(decode_chain(bytes.fromhex(status.get("membership_chain", ""))), after)
    except (ChainError, ValueError):  # (our own chain: encoded by us)
        return "500 Internal Server Error", "text/plain", b"no chain\n"
    doc = {"from": max(after, 0), "links": len(links), "chain": encode_chain(links).hex()}
    return "200 OK", "application/json", json.dumps(doc).encode() + b"\n"


class _Snapshot:
    __slots__ = ("taken", "families", "status", "metrics_body", "status_body")

    def __init__(self, taken: float, families: list, status: dict):
        self.taken = taken
        self.families = families
        self.status = status
        self.metrics_body: Optional[bytes] = None
        self.status_body: Optional[bytes] = None


class HttpEndpoint:
    """GET /metrics, GET /status and GET /chain; anything else is 404; malformed requests are closed.

    The endpoint runs in a thread of its own, with its own event loop, so that what its clients
    do costs the replica's loop at most one snapshot per ``SNAPSHOT_MIN_INTERVAL_S``: a request
    asks the replica's loop (``call_soon_threadsafe``) for a snapshot of its metric families and
    status, taken after the request arrived (answers are as fresh as before), and requests that
    arrive together share one.  The text is rendered here, in this thread.  Its own limits:

    * ``http_requests_per_s`` connections accepted per second (a token bucket: the excess waits
      in the kernel's accept queue, costing nothing here);
    * ``http_connections_max`` open at once: past it, the oldest connection still sending its
      request is closed (``http-evicted``), so slow clients cannot lock the endpoint;
    * the whole request (line and headers, at most ``HTTP_REQUEST_MAX_BYTES``) within
      ``http_request_timeout_s`` (``http-timeout``, ``http-too-large``).

    What it drops is counted under ``layer="http"`` of ``pbft_dropped_messages``.
    """

    def __init__(self, metrics: ReplicaMetrics, rt=None):
        self.metrics = metrics
        self.node = metrics.node
        self.max_conns = getattr(rt, "http_connections_max", 32)
        self.request_timeout_s = getattr(rt, "http_request_timeout_s", 5.0)
        self.rate = getattr(rt, "http_requests_per_s", 20.0)
        self.drops: dict[str, int] = {}  # written by the endpoint's thread only
        metrics.http_drops = self.drops
        self.sock: Optional[socket.socket] = None
        self.thread: Optional[threading.Thread] = None
        self.node_loop: Optional[asyncio.AbstractEventLoop] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stop_event: Optional[asyncio.Event] = None
        self.snap: Optional[_Snapshot] = None
        self.pending: Optional[asyncio.Future] = None
        self.last_asked = 0.0
        self.reading: dict[asyncio.Task, None] = {}  # connections still sending their request, oldest first
        self.active = 0
        self.tasks: set[asyncio.Task] = set()
        self.slot_free: Optional[asyncio.Event] = None

    # ---- lifecycle (replica's thread) ----------------------------------------
    def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (raises ``OSError`` if it cannot) and start serving."""
        self.node_loop = asyncio.get_event_loop()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="pbft-http", daemon=True)
        self.thread.start()
        ready.wait(5.0)

    def close(self) -> None:
        loop = self.loop
        if loop is not None and self.stop_event is not None:
            try:
                loop.call_soon_threadsafe(self.stop_event.set)
            except RuntimeError:  # its loop has already ended
                pass
        if self.thread is not None:
            self.thread.join(2.0)
        if self.sock is not None:
            self.sock.close()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        finally:
            loop.close()

    # ---- the endpoint's thread ------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    async def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        stop = self.stop_event = asyncio.Event()
        self.slot_free = asyncio.Event()
        ready.set()
        accept = loop.create_task(self._accept_loop())
        await stop.wait()
        accept.cancel()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(accept, *self.tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        slot_free, sock = self.slot_free, self.sock
        assert slot_free is not None and sock is not None  # set before this task starts
        tokens = burst = max(1.0, self.rate)
        t_prev = time.monotonic()
        while True:
            while self.active >= self.max_conns:
                # every slot busy: make room by closing the oldest still sending its request
                if self.reading:
                    oldest = next(iter(self.reading))
                    self.reading.pop(oldest)
                    oldest.cancel()
                    self._drop("http-evicted")
                    break
                slot_free.clear()
                await slot_free.wait()
            now = time.monotonic()
            tokens = min(burst, tokens + (now - t_prev) * self.rate)
            t_prev = now
            if tokens < 1.0:
                await asyncio.sleep((1.0 - tokens) / self.rate)
                continue
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError:  # out of descriptors, or a connection reset before we took it
                await asyncio.sleep(0.05)
                continue
            tokens -= 1.0
            self.active += 1
            streams: list = []
            task = loop.create_task(self._handle(conn, streams))
            self.reading[task] = None
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, conn=conn, streams=streams))

    def _done(self, task: asyncio.Task, conn: socket.socket, streams: list) -> None:
        # here, not in the handler: a handler evicted before it ran never runs its own cleanup
        self.tasks.discard(task)
        self.reading.pop(task, None)
        self.active -= 1
        assert self.slot_free is not None  # set before any connection is accepted
        self.slot_free.set()
        if streams:
            streams[0].close()
        else:
            conn.close()

    async def _handle(self, conn: socket.socket, streams: list) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=HTTP_REQUEST_MAX_BYTES)
            streams.append(writer)
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    parts = await self._read_request(reader)
            except TimeoutError:
                self._drop("http-timeout")
                return
            finally:
                self.reading.pop(task, None)
            if parts is None:
                return
            arrived = time.monotonic()
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            else:
                path, _, query = parts[1].partition("?")
                if path in ("/metrics", "/status", "/chain"):
                    snap = await self._snapshot(arrived)
                    if snap is None:
                        status, ctype, body = "503 Service Unavailable", "text/plain", b"replica busy\n"
                    elif path == "/metrics":
                        status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                        if snap.metrics_body is None:
                            snap.metrics_body = generate_latest(_Families(snap.families))
                        body = snap.metrics_body
                    elif path == "/chain":
                        status, ctype, body = _chain_answer(snap.status, query)
                    else:
                        status, ctype = "200 OK", "application/json"
                        if snap.status_body is None:
                            snap.status_body = json.dumps(snap.status).encode() + b"\n"
                        body = snap.status_body
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"try /metrics, /status or /chain\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            async with asyncio.timeout(self.request_timeout_s):
                await writer.drain()
        except TimeoutError:
            self._drop("http-timeout")
        except (asyncio.LimitOverrunError, ValueError, ConnectionError, OSError):
            self._drop("http-malformed")
        except asyncio.CancelledError:
            pass  # evicted, or the endpoint closes

    async def _read_request(self, reader: asyncio.StreamReader) -> Optional[list[str]]:
        """The request line's words, once the headers are in; None (counted) if malformed."""
        total = 0
        line = await reader.readline()
        total += len(line)
        parts = line.decode("latin-1").split()
        while True:
            h = await reader.readline()
            total += len(h)
            if total > HTTP_REQUEST_MAX_BYTES:
                self._drop("http-too-large")
                return None
            if h in (b"\r\n", b"\n"):
                return parts
            if h == b"":
                self._drop("http-malformed")
                return None

    async def _snapshot(self, after: float) -> Optional[_Snapshot]:
        """A snapshot taken by the replica's loop at or after ``after`` (None if it cannot give one
        within the request timeout)."""
        loop = asyncio.get_running_loop()
        node_loop = self.node_loop
        assert node_loop is not None  # set by start()
        deadline = after + self.request_timeout_s
        while True:
            snap = self.snap
            if snap is not None and snap.taken >= after:
                return snap
            if time.monotonic() > deadline:
                return None
            if self.pending is None:
                wait = self.last_asked + SNAPSHOT_MIN_INTERVAL_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                self.pending = fut = loop.create_future()
                self.last_asked = time.monotonic()
                try:
                    node_loop.call_soon_threadsafe(self._take, fut)
                except RuntimeError:  # the replica's loop has ended
                    self.pending = None
                    return None
            fut = self.pending
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(fut)
            except TimeoutError:
                return None

    def _take(self, fut: asyncio.Future) -> None:
        """On the replica's loop: read everything the endpoint serves, in one callback."""
        taken = time.monotonic()
        try:
            snap = _Snapshot(taken, list(self.metrics.collect()), self.node.status())
        except Exception:  # noqa: BLE001 - never let the endpoint hurt the replica
            snap = None
        assert self.loop is not None  # the endpoint's loop asked for this snapshot
        try:
            self.loop.call_soon_threadsafe(self._taken, fut, snap)
        except RuntimeError:
            pass

    def _taken(self, fut: asyncio.Future, snap: Optional[_Snapshot]) -> None:
        if snap is not None:
            self.snap = snap
        if self.pending is fut:
            self.pending = None
        if not fut.done():
            fut.set_result(snap)
