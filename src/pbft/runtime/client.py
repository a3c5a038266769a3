"""The client library: ``pbft.Client`` (asyncio), ``pbft.BlockingClient``, and ``ClientPool``.

    async with await pbft.Client.connect("cluster-dir") as c:
        result = await c.invoke(b"operation bytes")
        result = await c.invoke(b"query", read_only=True)

A client identity (``client_id``, its key file in ``DIR/keys``) has at most
one request outstanding, as in the protocol; ``invoke`` calls on one client
are queued.  For concurrency, use several identities: ``ClientPool`` drives
any number of them over one connection per replica (the benchmark does).

What can go wrong, and what you get:

* ``NoQuorumError`` (a ``TimeoutError``): no certified result within the
  timeout; the message says how many replicas were connected and which
  answered.  The operation may or may not have executed: retry it with the
  same client and it is executed at most once only if it is idempotent at the
  service level (the protocol deduplicates only the same request).
* ``NotAdmittedError``: the cluster does not admit this client identity (revoked by ``pbft
  reconfig DIR revoke-client ID``, or never added): the replicas answered a request of it with
  the not-admitted result (``core.reconfig.NOT_ADMITTED_RESULT``, for every service), or the
  configuration certified by the replicas' chain (``runtime.follow``; or one set with
  ``set_membership``) no longer has the identity. The second is what tells a revoked client fast:
  once the switch is in force the replicas refuse its NewKeys and its requests go unanswered, so
  when a request is due to be retransmitted the client looks at the chain (at most every
  ``FOLLOW_INTERVAL_S``) and, if its id is gone, fails the call at once instead of waiting out
  the timeout. A revocation is final (ids are not reused): later calls fail at once too.
* ``ConfigError``: the cluster directory or key file is unusable.
* Service-level errors are results, not exceptions; ``pbft.services.kv.KVClient``
  turns the key-value service's errors into ``ServiceError``.

Session keys: on connecting to a replica the client sends it a NewKey with
fresh keys for both directions; it refreshes them every ``key_refresh_s``
and when it has to retransmit (a replica may have recovered and discarded its
client keys).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from ..codec import Codec, DecodeError
from ..core.client import Client as CoreClient
from ..core.membership import base_view, view_epoch
from ..core.reconfig import NOT_ADMITTED_RESULT
from ..crypto import KeyRing
from ..config import ConfigError
from ..messages import Reply, Tag
from .cluster import EPOCH_FILE, Cluster, load_cluster
from .follow import FETCH_TIMEOUT_S, follow
from .keys import Identity, fresh_key, make_newkey, now_timestamp_us
from .transport import Counters, FrameConn, OutLink, frame

DEFAULT_TIMEOUT_S = 30.0
NEWKEY_ON_RETRY_MIN_INTERVAL_S = 1.0
REFRESH_CHUNK = 64  # identities of a pool whose keys are refreshed together
FOLLOW_INTERVAL_S = 2.0  # at most one look at the replicas' membership chains per interval
# (read once: a member of an enum class costs the interpreter a few hundred ns at every reply)
_TAG_REPLY = int(Tag.REPLY)


class PbftError(Exception):
    """Base class of the client library's errors."""


class NoQuorumError(PbftError, TimeoutError):
    """No certified result in time."""


class NotAdmittedError(PbftError):
    """The cluster does not admit this client identity (revoked, or never added): ``client``."""

    def __init__(self, client: Optional[int], how: str = ""):
        who = "this client" if client is None else f"client {client}"
        super().__init__(f"{who} is not admitted by the cluster (revoked or never added)" + (f": {how}" if how else ""))
        self.client = client


class _Principal:
    __slots__ = ("ident", "ring", "core", "lock", "fut", "give_up_at", "timer", "timer_at", "last_newkey",
                 "newkey_ts", "revoked")

    def __init__(self, ident: Identity, ring: KeyRing, core: CoreClient):
        self.ident = ident
        self.ring = ring
        self.core = core
        self.lock = asyncio.Lock()
        self.fut: Optional[asyncio.Future] = None
        self.give_up_at: Optional[float] = None  # (monotonic s) when ``invoke`` stops waiting for ``fut``
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at: Optional[float] = None  # (monotonic s) when ``timer`` fires
        self.last_newkey = 0.0
        self.newkey_ts = 0  # timestamp of our last NewKey: they grow strictly, whatever the clock does
        self.revoked = ""  # why the cluster's certified configuration no longer admits it ("" while it does)


class _GiveUp(Exception):
    """``invoke``'s timeout passed (set on its future by the principal's timer)."""


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class ClientPool:
    """Many client identities sharing one TCP connection per replica."""

    def __init__(self, cluster: Cluster, identities: Sequence[Identity], follow_chain: bool = True):
        self.cluster = cluster
        # learn the membership in force from the replicas' certificate chains (runtime.follow): when
        # starting, and when requests go unanswered (at most every FOLLOW_INTERVAL_S)
        self.follow_chain = follow_chain
        self.following: Optional[asyncio.Task] = None
        self.followed_at = -FOLLOW_INTERVAL_S
        self.memberships_followed = 0
        self.configs_followed = 0  # newer configurations of the same membership (e.g. a key rotation)
        self.follow_error = ""
        self.cfg = cluster.cfg
        self.codec = Codec(self.cfg)
        self.counters = Counters()
        self.loop = asyncio.get_event_loop()
        self.p: dict[int, _Principal] = {}
        for ident in identities:
            if ident.principal not in cluster.client_keys:
                raise ConfigError(f"{ident.principal} is not a client id of this cluster")
            ring = KeyRing(ident.principal, self.cfg.client_base, {}, {})  # (a MAC per replica slot)
            core = CoreClient(self.cfg, ident.principal, ring, now=_now_ms())
            core.timestamp = now_timestamp_us()  # timestamps keep growing across client restarts
            if cluster.members_from:  # (a later membership, epoch.json's: its first view)
                core.set_membership(self.cfg, base_view(cluster.members_epoch, self.cfg.n))
            self.p[ident.principal] = _Principal(ident, ring, core)
        self.links: dict[int, OutLink] = {}
        self.dirty: set[int] = set()
        self.newkeys_out: dict[int, list[bytes]] = {}  # replica -> NewKey frames to send before anything else
        self.flush_pending = False
        self.closed = False
        self.refresh_handle: Optional[asyncio.TimerHandle] = None
        self.refresh_next = 0  # index of the identity the next periodic refresh starts at

    # ---- lifecycle ----------------------------------------------------------
    async def start(self, wait_s: float = 5.0) -> None:
        """Connect to every replica; waits until a quorum is connected (or ``wait_s`` passes)."""
        if self.follow_chain:
            await self._follow()
        rt = self.cluster.runtime
        for r in self.cluster.replicas:
            if r.id in self.links:  # (links made by a membership followed meanwhile)
                continue
            link = OutLink(r.host, r.port, self._make_conn, self._on_link_up, rt.reconnect_min_s, rt.reconnect_max_s)
            self.links[r.id] = link
            link.start()
        self.refresh_handle = self.loop.call_later(rt.key_refresh_s / (-(-len(self.p) // REFRESH_CHUNK) or 1),
                                                   self._periodic_refresh)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.cfg.weight_of(self.connected()) >= self.cfg.quorum_weight:
                return
            await asyncio.sleep(0.01)

    def connected(self) -> list[int]:
        return [j for j, lk in self.links.items() if lk.conn is not None]

    def set_membership(self, cluster: Cluster) -> None:
        """Follow a membership change (``cluster``: the directory loaded again after ``pbft
        reconfig`` wrote the new membership into epoch.json, or ``with_membership``): links to the
        new members (a NewKey for each, on connecting), none to those that left, and every
        identity's core client counts the new members' replies from the new epoch's first view on
        (an operation under way is retransmitted to them). A membership older than the one it
        follows (``members_epoch``, ``members_from``) is ignored."""
        if cluster.cfg.client_base != self.cfg.client_base:
            raise ConfigError("a membership change cannot move the client ids (replica_slots)")
        if (cluster.members_epoch, cluster.members_from) < (self.cluster.members_epoch, self.cluster.members_from):
            # an older membership than the one followed already (e.g. an epoch.json written before
            # the replicas' chain moved us on): memberships only move forward
            self.counters.drop("membership-older-ignored")
            return
        view = base_view(cluster.members_epoch, cluster.cfg.n) if cluster.members_from else 0
        self.cluster, self.cfg, self.codec = cluster, cluster.cfg, Codec(cluster.cfg)
        for j in [j for j in self.links if j >= self.cfg.n]:
            self.links.pop(j).stop()
            self.newkeys_out.pop(j, None)
        rt = cluster.runtime
        for r in cluster.replicas:
            if r.id not in self.links:
                link = OutLink(r.host, r.port, self._make_conn, self._on_link_up, rt.reconnect_min_s,
                               rt.reconnect_max_s)
                self.links[r.id] = link
                link.start()
        for p in self.p.values():
            p.core.set_membership(self.cfg, view)
            self._after(p)

    async def _follow(self) -> None:
        """Ask the replicas for their membership certificate chains; follow a newer membership that
        one of them certifies (``runtime.follow``)."""
        try:
            now = await self.loop.run_in_executor(None, follow, self.cluster, FETCH_TIMEOUT_S)
        except (ConfigError, OSError, ValueError) as e:
            self.counters.drop("chain-follow-failed")
            self.follow_error = str(e)
            now = None
        finally:
            self.followed_at = time.monotonic()
        if self.closed:
            return
        if now is None:  # (nothing newer: the configuration set already, e.g. epoch.json's, is checked)
            self._check_admitted(self.cluster)
            return
        if (now.members_epoch, now.members_from) > (self.cluster.members_epoch, self.cluster.members_from):
            self.memberships_followed += 1
            self.set_membership(now)
        elif (now.members_epoch, now.members_from) == (self.cluster.members_epoch, self.cluster.members_from):
            # a newer configuration of the same membership: its keys (a replica's key rotated: our
            # session keys sealed to the new one, as a replica forgets its old key after a while)
            old = self.cluster.public.verify
            rotated = any(bytes(now.public.verify[j]) != bytes(old[j]) for j in range(self.cfg.n))
            self.cluster = now
            self.configs_followed += 1
            if rotated and self.links:  # (before the links are up, their first NewKeys are sealed so)
                for p in self.p.values():
                    self.refresh_keys(p)
        self._check_admitted(self.cluster)

    def _check_admitted(self, now: Cluster) -> None:
        """Fail the calls of the identities that the configuration followed no longer admits (one
        ``follow`` verified, or one set by ``set_membership``: a directory ``load_cluster`` checked
        against its chain). Every identity of the pool was a client of the cluster it started with,
        and ids are not reused, so one missing from a later certified configuration was revoked.
        (Without the full configuration, ``with_chain`` keeps the clients it had: nothing is
        concluded.)"""
        epoch = now.epoch
        for pid, p in self.p.items():
            if pid in now.client_keys or p.revoked:
                continue
            p.revoked = f"revoked in configuration epoch {epoch} (certified by the configuration chain)"
            self.counters.drop("client-not-admitted")
            if p.fut is not None and not p.fut.done():
                p.core.cancel()
                p.fut.set_exception(NotAdmittedError(pid, p.revoked))

    def _maybe_follow(self) -> None:
        if (self.follow_chain and not self.closed and (self.following is None or self.following.done())
                and time.monotonic() - self.followed_at >= FOLLOW_INTERVAL_S):
            self.following = self.loop.create_task(self._follow())

    async def close(self) -> None:
        self.closed = True
        if self.following is not None:
            self.following.cancel()
        for lk in self.links.values():
            lk.stop()
        if self.refresh_handle is not None:
            self.refresh_handle.cancel()
        for p in self.p.values():
            if p.timer is not None:
                p.timer.cancel()
            if p.fut is not None and not p.fut.done():
                p.fut.set_exception(PbftError("client closed"))
        await asyncio.sleep(0)

    # ---- keys ---------------------------------------------------------------
    def _make_conn(self) -> FrameConn:
        return FrameConn(self._on_frame, self.counters, self.cfg.message_size_bytes_max + 1024, 1 << 30, 64 << 20)

    def _on_link_up(self, link: OutLink) -> None:
        j = next(r for r, lk in self.links.items() if lk is link)
        # the replica may be new or have restarted: fresh keys for it, for every identity
        frames = [frame(self._newkey(p, (j,))) for p in self.p.values()]
        assert link.conn is not None  # the link is up
        link.conn.send(b"".join(frames))

    def _newkey(self, p: _Principal, replicas: Sequence[int]) -> bytes:
        keys = {}
        for j in replicas:
            k_out, k_in = fresh_key(), fresh_key()
            p.ring.out_keys[j] = k_out
            p.ring.in_keys[j] = k_in
            keys[j] = k_out + k_in
        p.last_newkey = time.monotonic()
        # a fresh timestamp on every NewKey, on a reconnection too: a replica binds an identity to
        # the connection its latest NewKey came on, and refuses one not newer than the last
        p.newkey_ts = max(now_timestamp_us(), p.newkey_ts + 1)
        return make_newkey(p.ident, self.cluster.public, keys, p.newkey_ts)

    def refresh_keys(self, p: _Principal) -> None:
        """New session keys with every replica for one identity (sent before its next frames)."""
        nk = frame(self._newkey(p, range(self.cfg.n)))
        for j in range(self.cfg.n):
            self.newkeys_out.setdefault(j, []).append(nk)
        self._schedule_flush()

    def _periodic_refresh(self) -> None:
        # every identity once per key_refresh_s, at most REFRESH_CHUNK at a time: a replica checks
        # a bounded number of NewKeys per connection at once (runtime.admission); one it drops
        # would leave that identity's requests failing their MAC there until it retransmits
        ps = list(self.p.values())
        steps = -(-len(ps) // REFRESH_CHUNK) or 1
        start = self.refresh_next % len(ps) if ps else 0
        for p in ps[start:start + REFRESH_CHUNK]:
            self.refresh_keys(p)
        self.refresh_next = start + REFRESH_CHUNK
        self.refresh_handle = self.loop.call_later(self.cluster.runtime.key_refresh_s / steps, self._periodic_refresh)

    # ---- requests -----------------------------------------------------------
    async def invoke(self, principal: int, op: bytes, read_only: bool = False,
                     timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> bytes:
        p = self.p[principal]
        # (acquire and release rather than ``async with``: two coroutines less per request)
        await p.lock.acquire()
        try:
            if self.closed:
                raise PbftError("client closed")
            if p.revoked:
                raise NotAdmittedError(principal, p.revoked)
            fut = self.loop.create_future()
            p.fut = fut
            # the timeout is kept by the principal's one timer (``_arm``), not by a timer of its own
            # per request (``asyncio.wait_for``): most requests complete long before either is due
            p.give_up_at = None if timeout is None else time.monotonic() + timeout
            p.core.invoke(op, read_only, _now_ms())
            self._after(p)
            try:
                return await fut
            except _GiveUp:
                p.core.cancel()
                self._after(p)
                conn = self.connected()
                answered = sorted(p.core.replies)
                raise NoQuorumError(
                    f"no certified result within {timeout:g}s: connected to {len(conn)} of {self.cfg.n} replicas "
                    f"{conn}, replies from {answered or 'none'} (a result needs matching replies of weight "
                    f"{self.cfg.quorum_weight}, or committed ones of weight {self.cfg.weak_weight})") from None
            finally:
                p.fut = None
                p.give_up_at = None
        finally:
            p.lock.release()

    def _after(self, p: _Principal) -> None:
        """After the core client of ``p`` handled an event: outcomes, sends, timer."""
        core = p.core
        if core.done:
            for o in core.take_outcomes():
                if p.fut is not None and not p.fut.done():
                    if o.result == NOT_ADMITTED_RESULT:  # (certified like any result: a quorum's)
                        p.fut.set_exception(NotAdmittedError(p.ident.principal, "the replicas refused its request"))
                    else:
                        p.fut.set_result(o.result)
        if core.out:
            self.dirty.add(p.ident.principal)
            self._schedule_flush()
        self._arm(p)

    def _arm(self, p: _Principal) -> None:
        """Have ``p``'s timer fire by its next deadline: the core client's (a retransmission) or
        its ``invoke``'s timeout, whichever comes first. A timer already due no later is kept
        (it re-arms itself when it fires early), so a request that completes in time costs no
        timer: the one armed for an earlier request's deadlines serves the next ones."""
        d = p.core.deadline
        at = p.give_up_at
        if d is not None and (at is None or d / 1000.0 < at):
            at = d / 1000.0
        if at is None or (p.timer is not None and p.timer_at is not None and p.timer_at <= at):
            return
        if p.timer is not None:
            p.timer.cancel()
        p.timer_at = at
        p.timer = self.loop.call_later(max(0.0, at - time.monotonic()), self._on_timer, p)

    def _on_timer(self, p: _Principal) -> None:
        p.timer = None
        p.timer_at = None
        mono = time.monotonic()
        fut = p.fut
        if fut is not None and p.give_up_at is not None and mono >= p.give_up_at and not fut.done():
            fut.set_exception(_GiveUp())
            return  # (``invoke`` cancels the request, then its timer is armed again as needed)
        core = p.core
        now = mono * 1000.0
        if core.req is not None and core.deadline is not None and now >= core.deadline:
            if not core.asked_full and mono - p.last_newkey >= NEWKEY_ON_RETRY_MIN_INTERVAL_S:
                # about to retransmit: a replica that recovered (or restarted) may no longer know our
                # keys. Refresh them first, so that the retransmission is sealed with the new keys
                # (the NewKey goes out before it on every connection). Not when the result is
                # certified and only its full copy is missing (``asked_full``): the replicas that
                # answered know our keys, and new ones would void the replies still in flight
                self.refresh_keys(p)
            self._maybe_follow()  # (unanswered: the membership may have changed)
            core.tick(now)
        self._after(p)

    def _schedule_flush(self) -> None:
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        per: dict[int, list[bytes]] = self.newkeys_out
        self.newkeys_out = {}
        for pid in self.dirty:
            for dests, raw in self.p[pid].core.take_sends():
                fr = frame(raw)
                for d in dests:
                    per.setdefault(d, []).append(fr)
        self.dirty.clear()
        for d, frames in per.items():
            link = self.links.get(d)
            if link is not None:
                link.send(frames[0] if len(frames) == 1 else b"".join(frames), self.counters)

    def _on_frame(self, conn: FrameConn, raw: bytes) -> None:
        try:
            # the MAC is checked by the client the reply is for (``receive_parsed``)
            fr, rep = self.codec.open_authenticated(raw, None, _TAG_REPLY, "client-expects-replies")
        except DecodeError as e:
            self.counters.drop(e.reason)
            return
        if not isinstance(rep, Reply):  # (a Tag.REPLY frame parses to a Reply)
            self.counters.drop("client-expects-replies")
            return
        p = self.p.get(rep.client)
        if p is None:
            self.counters.drop("reply-for-unknown-client")
            return
        epoch = view_epoch(rep.view)
        if epoch < self.cluster.members_epoch:
            # a view of the membership before ours: we learnt of the change (its chain link is signed
            # when the change is recorded in a stable checkpoint) before this replica reached the
            # switch point; only the new membership's replies count (we retransmit to it)
            self.counters.drop("reply-from-earlier-membership")
            return
        if epoch > self.cluster.members_epoch:
            # a view of a later membership (core.membership.base_view): the replica switched and we
            # have not; its reply is not counted with the thresholds we know. Learn the membership
            # (the retransmission goes to the new members, counted with theirs)
            self.counters.drop("reply-from-later-membership")
            self._maybe_follow()
            return
        p.core.receive_parsed(fr, rep, _now_ms())
        self._after(p)


def _revoked_in_epoch_file(cluster: Cluster) -> list[int]:
    """The clients revoked in the configuration of the directory's epoch.json (which
    ``load_cluster`` checked against its certificate chain); [] without one."""
    if not cluster.epoch:
        return []
    try:
        revoked = json.loads((cluster.dir / EPOCH_FILE).read_text())["revoked"]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    return [c for c in revoked if type(c) is int] if isinstance(revoked, list) else []


class Client:
    """An asyncio client of a cluster (one client identity)."""

    def __init__(self, pool: ClientPool, principal: int):
        self._pool = pool
        self.id = principal

    @classmethod
    async def connect(cls, cluster: "str | Path | Cluster", client_id: Optional[int] = None,
                      wait_s: float = 5.0) -> "Client":
        """Connect as ``client_id`` (default: the first client of the cluster file)."""
        if not isinstance(cluster, Cluster):
            cluster = load_cluster(cluster)
        if client_id is None:
            if not cluster.client_ids:
                raise PbftError("the cluster file has no [[client]] entries")
            client_id = cluster.client_ids[0]
        if client_id not in cluster.client_keys:
            if client_id in _revoked_in_epoch_file(cluster):
                raise NotAdmittedError(client_id, f"revoked in configuration epoch {cluster.epoch} ({EPOCH_FILE})")
            raise ConfigError(f"{client_id} is not a client id of this cluster "
                              f"(clients are {cluster.client_ids[0]}..{cluster.client_ids[-1]})")
        ident = cluster.identity(client_id)
        pool = ClientPool(cluster, [ident])
        await pool.start(wait_s)
        return cls(pool, client_id)

    async def invoke(self, op: bytes, read_only: bool = False, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> bytes:
        """Run ``op`` on the replicated service and return its result."""
        if not isinstance(op, (bytes, bytearray)):
            raise TypeError("op must be bytes")
        if len(op) > self._pool.cfg.request_size_bytes_max:
            raise ValueError(f"operation of {len(op)} bytes exceeds request_size_bytes_max "
                             f"({self._pool.cfg.request_size_bytes_max})")
        return await self._pool.invoke(self.id, bytes(op), read_only, timeout)

    def connected_replicas(self) -> list[int]:
        return self._pool.connected()

    def set_membership(self, cluster: Cluster) -> None:
        """See ``ClientPool.set_membership``."""
        self._pool.set_membership(cluster)

    @property
    def cluster(self) -> Cluster:
        """The cluster as the client sees it now: the membership it follows (``cluster.cfg.n``,
        ``members_from``), learnt from the replicas' certificate chains or set."""
        return self._pool.cluster

    @property
    def memberships_followed(self) -> int:
        """How many newer memberships it learnt from the replicas' certificate chains."""
        return self._pool.memberships_followed

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class BlockingClient:
    """The same client for code without asyncio: runs a private event loop in a thread."""

    def __init__(self, cluster: "str | Path | Cluster", client_id: Optional[int] = None, wait_s: float = 5.0):
        self._loop: asyncio.AbstractEventLoop
        try:
            import uvloop
            self._loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pbft-client", daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._call(Client.connect(cluster, client_id, wait_s))
        except BaseException:
            self._stop_loop()
            raise
        self.id = self._client.id

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def invoke(self, op: bytes, read_only: bool = False, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> bytes:
        return self._call(self._client.invoke(op, read_only, timeout))

    def connected_replicas(self) -> list[int]:
        return self._client.connected_replicas()

    def set_membership(self, cluster: Cluster) -> None:
        """See ``ClientPool.set_membership``."""
        self._loop.call_soon_threadsafe(self._client.set_membership, cluster)

    @property
    def cluster(self) -> Cluster:
        """See ``Client.cluster``."""
        return self._client.cluster

    @property
    def memberships_followed(self) -> int:
        return self._client.memberships_followed

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
