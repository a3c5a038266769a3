"""Prometheus metrics and the status endpoint of a replica.

Metrics are read from the replica's counters when Prometheus scrapes, so the
hot path pays nothing for them except the latency histogram (one bisect per
reply).  The endpoint is a tiny HTTP server inside the replica's event loop:

* ``GET /metrics``: Prometheus text format (``pbft_*`` metrics, listed in
  docs/operations.md);
* ``GET /status``: JSON with the replica's view, primary, last executed and
  stable checkpoint (what ``pbft status`` shows).
"""

from __future__ import annotations

import asyncio
import bisect
import json
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:  # pragma: no cover
    from .node import ReplicaNode

LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
HTTP_REQUEST_MAX_BYTES = 8192


class ReplicaMetrics:
    def __init__(self, node: "ReplicaNode"):
        self.node = node
        self.lat_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.lat_sum = 0.0
        self.key_refreshes = 0
        self.newkeys_accepted = 0
        self.stable_checkpoints = 0
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

        yield counter("pbft_requests_executed", "Client requests executed (tentatively or committed)", r.executed_requests)
        yield gauge("pbft_last_executed_seqno", "Sequence number of the last executed batch", r.last_exec)
        yield gauge("pbft_last_committed_seqno", "Sequence number of the last committed executed batch", r.last_committed_exec)
        yield gauge("pbft_stable_checkpoint_seqno", "Sequence number of the last stable checkpoint", r.h)
        yield counter("pbft_checkpoints_stable", "Checkpoints that became stable", self.stable_checkpoints)
        yield gauge("pbft_view", "Current view", r.view)
        yield gauge("pbft_is_primary", "1 if this replica is the primary of its view", 1 if r.is_primary else 0)
        yield gauge("pbft_view_active", "1 if the view is active (not in a view change)", 1 if r.view_active else 0)
        yield counter("pbft_view_changes", "View changes started by this replica", node.view_changes)
        yield counter("pbft_new_views", "New views installed", node.new_views)
        yield counter("pbft_key_refreshes", "Session-key refreshes sent (NewKey)", self.key_refreshes)
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
            yield gauge("pbft_last_recovery_seconds", "Duration of the last proactive recovery", r.last_recovery_ms / 1000)
        c = node.counters
        yield counter("pbft_frames_received", "Frames received", c.frames_in)
        yield counter("pbft_frames_sent", "Frames sent", c.frames_out)
        yield counter("pbft_bytes_received", "Bytes received", c.bytes_in)
        yield counter("pbft_bytes_sent", "Bytes sent", c.bytes_out)
        yield counter("pbft_connections_accepted", "Inbound connections accepted", c.connections_accepted)
        yield gauge("pbft_connections_open", "Inbound connections open", len(node.inbound))
        yield gauge("pbft_peers_connected", "Outbound links to other replicas that are up",
                    sum(1 for lk in node.links.values() if lk.conn is not None))
        d = CounterMetricFamily("pbft_dropped_messages", "Messages dropped, by layer and reason",
                                labels=["replica", "layer", "reason"])
        for reason, k in sorted(r.drops.items()):
            d.add_metric([lab[0], "protocol", reason], k)
        for reason, k in sorted(c.drops.items()):
            d.add_metric([lab[0], "transport", reason], k)
        yield d
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


class HttpEndpoint:
    """GET /metrics and GET /status; anything else is 404; malformed requests are closed."""

    def __init__(self, metrics: ReplicaMetrics):
        self.metrics = metrics
        self.server = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True,
                                                 limit=HTTP_REQUEST_MAX_BYTES)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            parts = line.decode("latin-1").split()
            # drain the headers (bounded by the reader's limit)
            while True:
                h = await asyncio.wait_for(reader.readline(), 5.0)
                if h in (b"\r\n", b"\n", b""):
                    break
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif parts[1].split("?")[0] == "/metrics":
                status, ctype, body = "200 OK", "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
            elif parts[1].split("?")[0] == "/status":
                status, ctype = "200 OK", "application/json"
                body = json.dumps(self.metrics.node.status()).encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /status\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()
