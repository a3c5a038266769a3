"""TCP transport: length-prefixed frames over asyncio (uvloop) connections.

Why TCP: measured here, uvloop TCP and UDP both carry ~160k small messages/s,
and TCP also carries the large frames (new-view messages, state transfer)
without a fragmentation layer of our own.  Loss and reordering then only come
from reconnections, which the protocol's retransmission already covers.

Every frame is ``4-byte big-endian length`` + ``bytes``.  The rules that keep
one bad or slow peer from hurting the others:

* a length above ``max_frame`` closes the connection (there is no way to
  resynchronise a byte stream), counted as ``oversized-frame``;
* each connection handles at most ``budget`` frames per event-loop turn, then
  pauses reading and yields, so a flooding connection gets its turn like
  everybody else but no more (per-peer receive budget);
* sends never block: a connection whose write buffer exceeds
  ``send_queue_bytes_max`` drops new frames (``send-queue-full``) until the
  peer drains it; frames to a peer that is not connected are dropped
  (``peer-down``) and the protocol's retransmission recovers;
* outbound links reconnect with exponential backoff; a connection attempt
  that gets no answer is abandoned after ``CONNECT_TIMEOUT_S`` and retried
  (a SYN dropped by a partition is otherwise retransmitted by the kernel at
  1, 3, 7, 15, 31, 63 s: the link would stay down that long after it heals).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Callable, Optional

CONNECT_TIMEOUT_S = 2.0

_LEN = struct.Struct(">I")
pack_len = _LEN.pack


def frame(raw: bytes) -> bytes:
    return pack_len(len(raw)) + raw


class Counters:
    """Named counters of the transport (exported as metrics)."""

    def __init__(self):
        self.drops: dict[str, int] = {}
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.connections_accepted = 0

    def drop(self, reason: str, k: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + k


class TokenBucket:
    """At most ``rate`` events per second on average, ``burst`` at once (for expensive work
    that untrusted input can ask for, such as checking signatures)."""

    __slots__ = ("rate", "burst", "tokens", "time")

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.time: Optional[float] = None

    def take(self, now: float) -> bool:
        if self.time is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.time) * self.rate)
        self.time = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class FrameConn(asyncio.Protocol):
    """One TCP connection.  ``on_frame(conn, raw)`` is called for every complete frame."""

    __slots__ = ("on_frame", "on_lost", "counters", "max_frame", "budget", "send_max", "transport",
                 "buf", "off", "closed", "paused", "peer", "loop", "meta")

    def __init__(self, on_frame: Callable, counters: Counters, max_frame: int, budget: int, send_max: int,
                 on_lost: Optional[Callable] = None):
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.counters = counters
        self.max_frame = max_frame
        self.budget = budget
        self.send_max = send_max
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.off = 0
        self.closed = False
        self.paused = False
        self.peer = None
        self.loop = asyncio.get_event_loop()
        self.meta: dict = {}  # owner's per-connection data

    # ---- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.peer = transport.get_extra_info("peername")

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.buf = bytearray()
        self.off = 0
        if self.on_lost is not None:
            self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        c = self.counters
        c.bytes_in += len(data)
        if self.off == len(self.buf):
            self.buf = bytearray(data)
            self.off = 0
        else:
            self.buf += data
        if not self.paused:
            self._drain()

    # ---- frames -------------------------------------------------------------
    def _drain(self) -> None:
        buf = self.buf
        off = self.off
        end = len(buf)
        handled = 0
        budget = self.budget
        on_frame = self.on_frame
        while end - off >= 4:
            (n,) = _LEN.unpack_from(buf, off)
            if n > self.max_frame:
                self.counters.drop("oversized-frame")
                self.close()
                return
            if end - off - 4 < n:
                break
            if handled >= budget:
                self.counters.frames_in += handled
                # yield to other connections; resume on the next loop turn
                self.off = off
                if not self.paused:
                    self.paused = True
                    self.transport.pause_reading()
                self.loop.call_soon(self._resume)
                return
            raw = bytes(buf[off + 4: off + 4 + n])
            off += 4 + n
            handled += 1
            on_frame(self, raw)
            if self.closed:
                return
        self.counters.frames_in += handled
        if off == end:
            self.buf = bytearray()
            self.off = 0
        else:
            self.off = off
            if off > 1 << 20:
                del self.buf[:off]
                self.off = 0

    def _resume(self) -> None:
        if self.closed:
            return
        self.paused = False
        self.transport.resume_reading()
        self._drain()

    def send(self, data: bytes) -> bool:
        """Queue already-framed bytes; False (and counted) if dropped."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            self.counters.drop("peer-down")
            return False
        if t.get_write_buffer_size() > self.send_max:
            self.counters.drop("send-queue-full")
            return False
        t.write(data)
        self.counters.bytes_out += len(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class OutLink:
    """An outbound connection to one address, re-established with exponential backoff."""

    def __init__(self, host: str, port: int, make_conn: Callable[[], FrameConn],
                 on_up: Callable[["OutLink"], None], min_s: float, max_s: float):
        self.host = host
        self.port = port
        self.make_conn = make_conn
        self.on_up = on_up
        self.min_s = min_s
        self.max_s = max_s
        self.conn: Optional[FrameConn] = None
        self.task: Optional[asyncio.Task] = None
        self.stopped = False
        self.up_event = asyncio.Event()
        self.connects = 0

    def start(self) -> None:
        self.task = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_event_loop()
        delay = self.min_s
        while not self.stopped:
            lost = loop.create_future()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(self._factory(lost), self.host, self.port), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_s)
                continue
            delay = self.min_s
            self.conn = conn
            self.connects += 1
            self.up_event.set()
            self.on_up(self)
            await lost
            self.up_event.clear()
            self.conn = None
            if not self.stopped:
                await asyncio.sleep(self.min_s)

    def _factory(self, lost: asyncio.Future):
        def make():
            conn = self.make_conn()
            prev = conn.on_lost

            def on_lost(c):
                if prev is not None:
                    prev(c)
                if not lost.done():
                    lost.set_result(None)
            conn.on_lost = on_lost
            return conn
        return make

    def send(self, data: bytes, counters: Counters) -> bool:
        c = self.conn
        if c is None:
            counters.drop("peer-down")
            return False
        return c.send(data)

    def stop(self) -> None:
        self.stopped = True
        if self.conn is not None:
            self.conn.close()
        if self.task is not None:
            self.task.cancel()
