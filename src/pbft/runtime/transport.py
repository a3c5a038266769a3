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
  everybody else but no more (per-peer receive budget); its owner can also
  stop reading a connection for a while (``hold``: a replica does for a
  flooding replica or client connection, see ``runtime.node``);
* sends never block: a connection whose write buffer exceeds
  ``send_queue_bytes_max`` drops new frames (``send-queue-full``) until the
  peer drains it; frames to a peer that is not connected are dropped
  (``peer-down``) and the protocol's retransmission recovers;
* a server guards its inbound connections with an ``InboundGuard``
  (``InboundLimits``): a connection starts *unauthenticated* and its owner
  raises it with ``FrameConn.authenticate`` once a valid NewKey arrived on it.
  Until then it may not announce a frame above the client bound (counted
  ``unauthenticated-frame-too-large``), and it is closed after
  ``unauthenticated_timeout_s`` without a byte or with a frame still
  incomplete (``idle-timeout``, ``slow-frame-timeout``); authenticated
  connections get ``idle_timeout_s`` and ``frame_timeout_s``.  The bytes
  that all guarded connections hold in buffers are bounded
  (``partial_frames_bytes_max``): past it the least-trusted holders are
  closed first (``partial-frame-memory``); a replica's connection is never
  closed for it (there is at most one per replica, each bounded by the frame
  limit).  A full connection table makes room by closing its oldest
  unauthenticated connection (``connection-evicted``), never an
  authenticated one;
* outbound links reconnect with exponential backoff; a connection attempt
  that gets no answer is abandoned after ``CONNECT_TIMEOUT_S`` and retried
  (a SYN dropped by a partition is otherwise retransmitted by the kernel at
  1, 3, 7, 15, 31, 63 s: the link would stay down that long after it heals).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from ..crypto import MAC_SIZE
from .keys import NEWKEY_MAX_BYTES

CONNECT_TIMEOUT_S = 2.0

# how far a connection is trusted (``FrameConn.auth``)
UNAUTHENTICATED = 0
AUTH_CLIENT = 1  # a client's NewKey was accepted on it
AUTH_REPLICA = 2  # a replica's NewKey was accepted on it

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
        self.connections_refused = 0  # closed at accept, before any transport (Listener._refuse)

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

    def level(self, now: float) -> float:
        """The tokens there now (refilled, none taken)."""
        if self.time is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.time) * self.rate)
        self.time = now
        return self.tokens

    def give_back(self) -> None:
        """Return a token taken for work that turned out to be legitimate."""
        self.tokens = min(self.burst, self.tokens + 1.0)

    def wait_s(self, k: float = 1.0) -> float:
        """Seconds until ``k`` tokens are there (at most ``burst``; 0 if they are; after a refused
        ``take``)."""
        k = min(k, self.burst)
        return max(0.0, (k - self.tokens) / self.rate) if self.rate > 0 else 1.0


# the kernel's receive buffer of a connection that has not authenticated (inherited from the
# listening socket; the kernel doubles it): room for a correct peer's first frames (a NewKey and
# a request), not for the megabytes an attacker would have the kernel buffer, and the replica
# free, on each connection it closes; ``AUTHENTICATED_RCVBUF`` once it authenticates
UNAUTHENTICATED_RCVBUF = 128 << 10
AUTHENTICATED_RCVBUF = 4 << 20


# seconds the kernel holds a new connection back from the listen queue until its first bytes
# arrive (``TCP_DEFER_ACCEPT``, where there is one): correct peers send their NewKey at once, so
# they are not delayed, and what ``Listener`` accepts can be screened by its first bytes; a
# connection that sends nothing is held by the kernel that long, not by this process
DEFER_ACCEPT_S = 3


def listen_socket(host: str, port: int, backlog: int = 512) -> socket.socket:
    """A bound, listening TCP socket (address reuse on, a small receive buffer for the
    connections it accepts until they authenticate, accept deferred until the first bytes
    arrive), for a ``Listener``."""
    fam, typ, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(fam, typ, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNAUTHENTICATED_RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """A listening socket whose connections are accepted under a budget (``[runtime]``
    ``unauthenticated_accepts_per_s``): each connection served takes a credit, which comes back
    when it authenticates (``FrameConn.on_auth``), so correct clients and replicas connect
    freely while connections that never authenticate -- replays, idle sockets, each closed or
    evicted soon -- are served at most ``rate`` per second (``burst`` at once).  Past the
    budget nothing is accepted: connections wait in the kernel's listen queue (and past that,
    the kernel refuses them), costing this process nothing; the listener looks again when the
    next credit is due, or, when it ran out of accepts (below), once ``ACCEPTS_PER_RESUME`` of
    them are, so that a flood of refused connections wakes it a few times a second and not at
    every accept (``accept-paused``, once per pause).

    Two refinements keep an attacker's connections cheap and its share bounded:

    * **the first bytes are screened before a transport exists.**  The kernel holds a connection
      back until its first bytes arrive (``listen_socket``: ``TCP_DEFER_ACCEPT``), so when it is
      accepted they are there; ``screen(sock, head)`` (given the first ``SCREEN_PEEK_BYTES``,
      peeked with ``MSG_PEEK``) names a reason to refuse it, or None.  A refused connection is
      closed at once -- no event-loop transport, protocol object, buffer or task -- and takes no
      credit.  Refusals are bounded on their own: every accept, served or refused, takes one of
      ``ACCEPTS_PER_CREDIT`` times as many accept tokens (``accepts``; an authenticated
      connection gives its accept token back too).  A connection with
      nothing to read yet, or only part of its first frame, is served and every rule applies.
    * **per-source-address shares.**  Each source address (an IPv6 address by its /64) has its
      own bucket of ``SOURCE_SHARE`` of the credits, taken by its connections that are served
      (those the screen refuses take none); an address past its share is refused
      (closed at once, ``accept-source-over-budget``) whenever less than that share of the
      budget is left, so one address -- an attacker's -- cannot take the whole budget, and
      connections from other addresses are still served (when the budget is fuller, a busy
      address may borrow: a burst of correct connections from one host is not refused).  An
      authenticated connection gives its address's credit back too.  The table of addresses is
      bounded (``SOURCES_MAX``; the least recently seen go first).

    **What the screen refuses is held, not closed (a tarpit).**  Closing a refused connection
    tells its peer at once to open the next one: a peer replaying captured bytes reconnects as
    fast as it is refused, and every round costs this process a wake-up, the accept and the
    reset, and the kernel the bytes it had queued for it.  So a connection the screen refuses
    is kept open instead, never read (no event-loop reader, its kernel receive buffer set to
    ``TARPIT_RCVBUF``): its peer's writes stall on TCP flow control.  At most ``TARPIT_MAX``
    are held (a new one closes the oldest, ``tarpit-full``), each for at most ``TARPIT_HOLD_S``
    (``tarpit-expired``), so they cost a bounded number of descriptors and of kernel buffers; a
    peer with more connections open at once than that is refused at the rate it was before,
    within the accepts' bound.  Only the screen's refusals are held (``accept-tarpitted``): a
    connection past its address's share, or already closed by its peer, is closed at once.  A
    held connection takes no credit and no slot of the connection table, so correct peers
    connect and authenticate as before."""

    ACCEPTS_PER_WAKEUP = 64  # then yield to the loop's other work
    ACCEPTS_PER_RESUME = 8  # out of accepts, look again once this many are due (not one at a time)
    SCREEN_PEEK_BYTES = 11  # the length prefix and a frame's header up to its sender (msgpack array, tag, id)
    ACCEPTS_PER_CREDIT = 2  # accepts (served or refused at once) per credit of the budget
    SOURCE_SHARE = 0.5  # of the budget (rate and burst) that is one source address's own
    SOURCES_MAX = 4096
    TARPIT_MAX = 32  # refused connections held open at once (``tarpit``)
    TARPIT_HOLD_S = 10.0  # how long one is held at most
    TARPIT_RCVBUF = 4096  # the kernel receive buffer of a held connection

    def __init__(self, sock: socket.socket, factory, counters: Counters, rate: float, burst: float,
                 screen: Optional[Callable[[socket.socket, bytes], Optional[tuple[str, ...]]]] = None):
        self.sock = sock
        self.factory = factory  # () -> FrameConn; the new connection's on_auth is set to give its credit back
        self.counters = counters
        self.budget = TokenBucket(rate, burst)
        self.accepts = TokenBucket(rate * self.ACCEPTS_PER_CREDIT, burst * self.ACCEPTS_PER_CREDIT)
        self.source_rate = rate * self.SOURCE_SHARE
        self.source_burst = max(1.0, burst * self.SOURCE_SHARE)
        self.sources: dict[str, TokenBucket] = {}  # in order of last use: the first is the stalest
        self.screen = screen
        self.loop = asyncio.get_event_loop()
        self.reading = False
        self.resume: Optional[asyncio.TimerHandle] = None
        self.closed = False
        self.refused = 0  # connections refused at accept (screen or source share)
        self.tarpit: dict[socket.socket, float] = {}  # held refused sockets -> when to close; oldest first
        self.tarpit_timer: Optional[asyncio.TimerHandle] = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._read(True)

    def _read(self, on: bool) -> None:
        if on and not self.reading and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._readable)
            self.reading = True
        elif not on and self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False

    @staticmethod
    def source_key(addr) -> str:
        """The share key of a peer address: the IPv4 address, or an IPv6 address's /64."""
        host = addr[0] if isinstance(addr, tuple) and addr else str(addr)
        if ":" in host:
            try:
                packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
            except (OSError, ValueError):
                return host
            if packed[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: the IPv4 address
                return socket.inet_ntop(socket.AF_INET, packed[12:])
            return packed[:8].hex()
        return host

    def _source(self, key: str) -> TokenBucket:
        sources = self.sources
        b = sources.pop(key, None)
        if b is None:
            b = TokenBucket(self.source_rate, self.source_burst)
            if len(sources) >= self.SOURCES_MAX:
                del sources[next(iter(sources))]
        sources[key] = b  # (now the most recently used)
        return b

    def _readable(self) -> None:
        budget, accepts = self.budget, self.accepts
        for _ in range(self.ACCEPTS_PER_WAKEUP):
            if self.closed:
                return
            now = self.loop.time()
            if budget.level(now) < 1.0 or not accepts.take(now):
                self.counters.drop("accept-paused")
                self._pause(max(budget.wait_s(), accepts.wait_s(self.ACCEPTS_PER_RESUME)))
                return
            try:
                s, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                accepts.give_back()
                return
            except OSError:  # out of descriptors, or a connection reset before we took it
                accepts.give_back()
                self.counters.drop("accept-failed")
                self._pause(0.05)
                return
            if self.screen is not None:
                reasons = self._screen(s)
                if reasons is not None:
                    self._refuse(s, *reasons, hold=reasons[0] not in self.CLOSE_AT_ONCE)
                    continue
            # to be served: within its address's share, or borrowing while the budget is fuller
            source: Optional[TokenBucket] = self._source(self.source_key(addr))
            assert source is not None
            if not source.take(now):
                if budget.tokens < budget.burst * self.SOURCE_SHARE + 1.0:
                    self._refuse(s, "accept-source-over-budget")
                    continue
                source = None  # borrowed from the budget: nothing of the address's to give back
            budget.take(now)
            s.setblocking(False)
            self.loop.create_task(self._connect(s, source))

    def _screen(self, s: socket.socket) -> Optional[tuple[str, ...]]:
        try:
            head = s.recv(self.SCREEN_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None  # nothing sent yet: the transport's rules apply
        except OSError:
            return ("accept-failed",)  # reset meanwhile
        if not head:
            return ("closed-before-frame",)  # the peer already closed: nothing to serve
        assert self.screen is not None
        return self.screen(s, head)

    CLOSE_AT_ONCE = ("closed-before-frame", "accept-failed")  # screen results not worth holding

    def _refuse(self, s: socket.socket, *reasons: str, hold: bool = False) -> None:
        for r in reasons:
            self.counters.drop(r)
        self.refused += 1
        self.counters.connections_refused += 1
        if hold and self.TARPIT_MAX > 0 and not self.closed:
            self._hold(s)
        else:
            s.close()

    def _hold(self, s: socket.socket) -> None:
        """Keep a refused socket open and unread (the tarpit), closing the oldest held if full."""
        tarpit = self.tarpit
        while len(tarpit) >= self.TARPIT_MAX:
            old = next(iter(tarpit))
            del tarpit[old]
            self.counters.drop("tarpit-full")
            old.close()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.TARPIT_RCVBUF)
        except OSError:
            pass
        self.counters.drop("accept-tarpitted")
        tarpit[s] = self.loop.time() + self.TARPIT_HOLD_S
        if self.tarpit_timer is None:
            self.tarpit_timer = self.loop.call_later(self.TARPIT_HOLD_S, self._expire)

    def _expire(self) -> None:
        """Close the held sockets whose time is up; look again when the next one's is."""
        self.tarpit_timer = None
        tarpit = self.tarpit
        now = self.loop.time()
        while tarpit:
            s, until = next(iter(tarpit.items()))
            if until > now:
                self.tarpit_timer = self.loop.call_later(until - now, self._expire)
                return
            del tarpit[s]
            self.counters.drop("tarpit-expired")
            s.close()

    def _pause(self, wait: float) -> None:
        self._read(False)
        if self.resume is None and not self.closed:
            self.resume = self.loop.call_later(max(0.001, wait), self._resume)

    def _resume(self) -> None:
        self.resume = None
        self._read(True)

    async def _connect(self, s: socket.socket, source: Optional[TokenBucket]) -> None:
        conn = None

        def authenticated() -> None:
            self.budget.give_back()
            self.accepts.give_back()
            if source is not None:
                source.give_back()
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, AUTHENTICATED_RCVBUF)
            except OSError:
                pass

        def make():
            nonlocal conn
            conn = self.factory()
            conn.on_auth = authenticated
            return conn
        try:
            await self.loop.connect_accepted_socket(make, s)
        except OSError:
            s.close()

    def close(self) -> None:
        self.closed = True
        self._read(False)
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        if self.tarpit_timer is not None:
            self.tarpit_timer.cancel()
            self.tarpit_timer = None
        for s in self.tarpit:
            s.close()
        self.tarpit.clear()
        self.sock.close()


def peek_first_frame(s: socket.socket, head: bytes, limit: int) -> Optional[bytes]:
    """The first frame of an accepted socket, read with ``MSG_PEEK`` (nothing consumed), if its
    length prefix (in ``head``) is at most ``limit`` and all of it is already in the kernel;
    None otherwise."""
    if len(head) < 4:
        return None
    (n,) = _LEN.unpack_from(head, 0)
    if n > limit:
        return None
    try:
        data = s.recv(4 + n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    return data[4:] if len(data) == 4 + n else None


def client_frame_bytes_max(cfg) -> int:
    """The largest frame a correct client sends: a NewKey, or a request (its operation, an
    authenticator of one MAC per replica, and at most 45 bytes of msgpack framing, rounded up)."""
    return max(NEWKEY_MAX_BYTES, cfg.request_size_bytes_max + MAC_SIZE * cfg.client_base + 256)


@dataclass(frozen=True)
class InboundLimits:
    """What a server's inbound connections may hold and for how long (``[runtime]`` keys of the
    same names; ``unauthenticated_frame_bytes_max`` is ``client_frame_bytes_max``)."""

    unauthenticated_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    frame_timeout_s: float = 30.0
    partial_frames_bytes_max: int = 64 << 20
    unauthenticated_frame_bytes_max: int = 64 << 10
    # a connection's first frame (a correct peer's NewKey, sent at once) must be complete this
    # long after it was accepted (at most ``unauthenticated_timeout_s``): a slowloris connection
    # trickling a frame that is small enough goes after a few wakeups, not after the full timeout
    first_frame_timeout_s: float = 3.0


class InboundGuard:
    """Timeouts and memory bounds of a server's inbound connections (see the module notes).

    ``add`` a connection when it is accepted; it leaves the guard when it closes.  A timer
    sweeps the connections a few times per timeout; a sweep that runs late (the event loop was
    busy) credits the delay to every connection, so a stall of the process itself closes
    nothing."""

    def __init__(self, counters: Counters, limits: InboundLimits):
        self.counters = counters
        self.limits = limits
        self.conns: dict["FrameConn", None] = {}  # in order of arrival: the first is the oldest
        self.held = 0  # bytes buffered by all guarded connections
        self.loop = asyncio.get_event_loop()
        self.period = min(1.0, max(0.02, min(limits.unauthenticated_timeout_s, limits.idle_timeout_s,
                                             limits.frame_timeout_s, limits.first_frame_timeout_s) / 4))
        self.first_frame_s = min(limits.first_frame_timeout_s, limits.unauthenticated_timeout_s)
        self.last_sweep = self.loop.time()
        self.timer: Optional[asyncio.TimerHandle] = None
        self.stopped = False

    def add(self, conn: "FrameConn") -> None:
        now = self.loop.time()
        conn.guard = self
        conn.auth = UNAUTHENTICATED
        conn.full_max_frame = conn.max_frame
        conn.max_frame = min(conn.max_frame, self.limits.unauthenticated_frame_bytes_max)
        conn.rx_at = now
        conn.added_at = now
        self.conns[conn] = None
        if self.timer is None and not self.stopped:
            self.last_sweep = now
            self.timer = self.loop.call_later(self.period, self._sweep)

    def release(self, conn: "FrameConn") -> None:
        """``conn`` closed: forget it and the bytes it held."""
        self.held -= conn.held
        conn.held = 0
        self.conns.pop(conn, None)

    def oldest_unauthenticated(self) -> Optional["FrameConn"]:
        for c in self.conns:
            if c.auth == UNAUTHENTICATED and not c.closed:
                return c
        return None

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def account(self, conn: "FrameConn") -> None:
        """After ``conn`` received or handled bytes: its clock, its partial frame, the memory."""
        now = self.loop.time()
        conn.rx_at = now
        held = len(conn.buf) - conn.off
        if held == 0:
            conn.frame_at = None
        elif conn.frame_at is None or conn.frame_mark != conn.nframes:
            conn.frame_at = now  # a new frame began
            conn.frame_mark = conn.nframes
        delta = held - conn.held
        conn.held = held
        self.held += delta
        if delta > 0 and self.held > self.limits.partial_frames_bytes_max:
            self._over(conn)

    def _over(self, conn: "FrameConn") -> None:
        # free memory from the connections less trusted than ``conn`` (unauthenticated ones also
        # from each other), oldest first: a correct client's frames complete at once and rarely
        # hold anything, what has been held longest is the likeliest attack.  A replica's connection
        # is bounded on its own and keeps its bytes; anybody else closes if that was not enough
        limit = self.limits.partial_frames_bytes_max
        for level in range(UNAUTHENTICATED, max(conn.auth, UNAUTHENTICATED + 1)):
            for c in [c for c in self.conns if c.auth == level and c.held > 0 and c is not conn]:
                self.counters.drop("partial-frame-memory")
                c.close()
                if self.held <= limit:
                    return
        if conn.auth < AUTH_REPLICA:
            self.counters.drop("partial-frame-memory")
            conn.close()

    def _sweep(self) -> None:
        self.timer = None
        if self.stopped:
            return
        now = self.loop.time()
        stall = now - self.last_sweep - self.period
        self.last_sweep = now
        lim = self.limits
        victims = []
        for c in self.conns:
            if c.closed:
                continue
            if stall > 0.1:  # the loop could not run: nobody could send us anything meanwhile
                c.rx_at += stall
                c.added_at += stall
                if c.frame_at is not None:
                    c.frame_at += stall
            if c.auth == UNAUTHENTICATED:
                idle, slow = lim.unauthenticated_timeout_s, lim.unauthenticated_timeout_s
                if c.nframes == 0 and c.frame_at is not None and now - c.added_at > self.first_frame_s:
                    victims.append((c, "first-frame-timeout"))
                    continue
            else:
                idle, slow = lim.idle_timeout_s, lim.frame_timeout_s
            if now - c.rx_at > idle:
                victims.append((c, "idle-timeout"))
            elif c.frame_at is not None and now - c.frame_at > slow:
                victims.append((c, "slow-frame-timeout"))
        for c, reason in victims:
            self.counters.drop(reason)
            c.close()
        if self.conns or victims:
            self.timer = self.loop.call_later(self.period, self._sweep)


class FrameConn(asyncio.Protocol):
    """One TCP connection.  ``on_frame(conn, raw)`` is called for every complete frame."""

    __slots__ = ("on_frame", "on_lost", "counters", "max_frame", "budget", "send_max", "transport",
                 "buf", "off", "closed", "paused", "holding", "peer", "loop", "meta",
                 "guard", "auth", "full_max_frame", "held", "rx_at", "frame_at", "frame_mark", "nframes",
                 "on_auth", "added_at")

    def __init__(self, on_frame: Callable, counters: Counters, max_frame: int, budget: int, send_max: int,
                 on_lost: Optional[Callable] = None):
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.counters = counters
        self.max_frame = max_frame
        self.budget = budget
        self.send_max = send_max
        self.transport: Optional[asyncio.Transport] = None
        self.buf: bytes | bytearray = b""  # what was read and not handled yet, from ``off``
        self.off = 0
        self.closed = False
        self.paused = False
        self.holding = False  # reading stopped for a while by the owner (``hold``)
        self.peer = None
        self.loop = asyncio.get_event_loop()
        self.meta: dict = {}  # owner's per-connection data
        self.guard: Optional[InboundGuard] = None
        self.auth = UNAUTHENTICATED
        self.full_max_frame = max_frame
        self.held = 0
        self.rx_at = 0.0
        self.added_at = 0.0  # when an ``InboundGuard`` took it
        self.frame_at: Optional[float] = None
        self.frame_mark = 0
        self.nframes = 0
        self.on_auth: Optional[Callable[[], None]] = None  # called once, when it first authenticates

    def authenticate(self, level: int, max_frame: Optional[int] = None) -> None:
        """The owner checked a NewKey that came on this connection: trust it at ``level``
        (``AUTH_CLIENT`` or ``AUTH_REPLICA``; never lowered) and accept frames up to
        ``max_frame`` (by default the limit the connection was made with)."""
        if level > self.auth:
            if self.auth == UNAUTHENTICATED and self.on_auth is not None:
                self.on_auth()
                self.on_auth = None
            self.auth = level
        cap = self.full_max_frame if max_frame is None else min(max_frame, self.full_max_frame)
        if cap > self.max_frame:
            self.max_frame = cap

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
        if self.closed:  # closed by its owner before the loop got round to this (a refused connection)
            transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.buf = bytearray()
        self.off = 0
        if self.guard is not None:
            self.guard.release(self)
        if self.on_lost is not None:
            self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        c = self.counters
        c.bytes_in += len(data)
        buf = self.buf
        if self.off == len(buf):
            # nothing held: the frames are sliced out of what was read, each copied once
            self.buf = data if type(data) is bytes else bytes(data)
            self.off = 0
        elif type(buf) is bytes:
            # the rest of an earlier read (part of a frame, or frames left for a later turn) and
            # this one: accumulated in a bytearray, so a large frame's pieces are not copied over
            # and over
            acc = bytearray(memoryview(buf)[self.off:])
            acc += data
            self.buf = acc
            self.off = 0
        else:
            buf += data
        if not self.paused:
            self._drain()
        guard = self.guard
        if guard is not None and not self.closed:
            if self.held == 0 and self.off == len(self.buf):
                # (the common case, ``InboundGuard.account`` inline: nothing held before or now)
                self.rx_at = self.loop.time()
                self.frame_at = None
            else:
                guard.account(self)

    # ---- frames -------------------------------------------------------------
    def _drain(self) -> None:
        buf = self.buf
        whole = type(buf) is bytes  # a slice of it is the frame; of a bytearray, a copy to convert
        off = self.off
        end = len(buf)
        handled = 0
        budget = self.budget
        on_frame = self.on_frame
        unpack_len = _LEN.unpack_from
        while end - off >= 4:
            (n,) = unpack_len(buf, off)
            if n > self.max_frame:
                self.counters.drop("oversized-frame" if n > self.full_max_frame else
                                   "unauthenticated-frame-too-large" if self.auth == UNAUTHENTICATED else
                                   "client-frame-too-large")
                self.close()
                return
            if end - off - 4 < n:
                break
            if handled >= budget:
                self.counters.frames_in += handled
                self.nframes += handled
                # yield to other connections; resume on the next loop turn
                self.off = off
                if not self.paused and self.transport is not None:
                    self.paused = True
                    self.transport.pause_reading()
                self.loop.call_soon(self._resume)
                return
            raw = buf[off + 4: off + 4 + n] if whole else bytes(memoryview(buf)[off + 4: off + 4 + n])
            off += 4 + n
            handled += 1
            on_frame(self, raw)
            if self.closed:
                return
            if self.holding:  # the owner stopped reading (``hold``): the rest waits in the buffer
                self.counters.frames_in += handled
                self.nframes += handled
                self.off = off
                return
        self.counters.frames_in += handled
        self.nframes += handled
        if off == end:
            self.buf = b""
            self.off = 0
        else:
            self.off = off
            if not whole and off > 1 << 20:
                del self.buf[:off]  # type: ignore[union-attr]  # (a bytearray)
                self.off = 0

    def _resume(self) -> None:
        if self.closed or self.holding:
            return
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._drain()
        if self.guard is not None and not self.closed:
            self.guard.account(self)

    def hold(self, seconds: float) -> None:
        """Stop reading from the peer for ``seconds``, frames already buffered included (the
        owner throttles a peer whose frames it keeps refusing; TCP's flow control then makes
        the peer wait too, instead of us reading and refusing). Sends are not affected."""
        if self.closed or self.holding or self.transport is None:
            return
        self.holding = True
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.loop.call_later(seconds, self._unhold)

    def _unhold(self) -> None:
        self.holding = False
        self._resume()

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
            if self.guard is not None:
                # the buffered bytes go now, not when the loop gets round to connection_lost
                self.buf = bytearray()
                self.off = 0
                self.guard.release(self)
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
