"""A replica process: the pure core (``pbft.core.replica.Replica``) on real sockets.

The driver does exactly what the simulator does, with a real clock and TCP:
frames in -> ``replica.receive``; deadlines -> ``replica.tick``; after each
event-loop turn, ``replica.take_ready()``: its records -> the store, then its sends
-> sockets, its events -> logs and metrics.  Sends are coalesced per
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
from time import monotonic as _monotonic
from typing import Optional

from ..codec import DecodeError
from ..config import ConfigError
from ..core import membership
from ..core.durability import deferrable
from ..core.replica import Replica
from ..crypto import KEY_SIZE, KeyRing
from ..messages import Tag
from ..service import Service
from ..state.configuration import Membership
from ..storage import Store, StoreError, open_store
from . import gctune
from .cluster import CLUSTER_FILE, EPOCH_FILE, Cluster, recovery_period_in_force, recovery_turn
from .chain_keeper import ChainKeeper
from .epochs import EpochFollower
from .keys import NEWKEY_TAG, Identity, fresh_key, make_newkey, now_timestamp_us
from .metrics import HttpEndpoint, ReplicaMetrics
from .sched import apply_scheduling, current_scheduling
from .transport import (AUTH_CLIENT, AUTH_REPLICA, UNAUTHENTICATED, Counters, FrameConn, InboundGuard, InboundLimits,
                        Listener, OutLink, client_frame_bytes_max, frame, listen_socket, pack_len)
from .admission import (REQUEST_CREDITS_BURST, REQUEST_CREDITS_PER_RETRY_TIMEOUT, NewKeyGate, RequestBudget,
                        RequestSlots, first_frame_screen, frame_sender)

# a replica connection whose frames the core drops faster than this is held (``_count_waste``)
REPLICA_WASTE_FRAMES_PER_S_MAX = 5000
# a client connection whose requests arrive out of credits faster than this is held the same way
CLIENT_DEFERRED_PER_S_MAX = 1000
REPLICA_HOLD_S_MIN = 0.05
REPLICA_HOLD_S_MAX = 2.0
FIXARRAY5 = 0x95  # msgpack header of a 5-element array: every frame starts with it
FIXINT_END = 0x80  # msgpack: a byte below this is a positive fixint, the whole encoded integer
# durable mode: a turn's records that no message rests on (``k``: core.durability.deferrable) are
# written with the next write, or this much later if none comes first
DEFERRED_WRITE_S = 0.02
# the tags the frame path compares, as plain ints: reading a member of an enum class costs the
# interpreter a few hundred ns, and ``_on_frame`` runs for every frame
_TAG_NEWKEY = int(NEWKEY_TAG)
_TAG_REQUEST = int(Tag.REQUEST)
_TAG_MEMBERSHIP_LINK = int(Tag.MEMBERSHIP_LINK)
# internal errors (``ReplicaNode._fail_stop``): carried across the reboot (exec) in the environment
INTERNAL_ERRORS_ENV = "PBFT_INTERNAL_ERRORS"  # errors since the first start (the metric)
INTERNAL_ERROR_STREAK_ENV = "PBFT_INTERNAL_ERROR_STREAK"  # consecutive ones soon after a start
CRASH_LOOP_WINDOW_S = 10.0  # an error this soon after the process started continues a streak
REBOOT_BACKOFF_MAX_S = 60.0  # the wait before rebooting doubles along a streak, up to this
EX_IOERR = 74  # exit status after a failed store write
LOGGED_EVENTS = frozenset({"membership", "view-change", "new-view", "stable", "state-transfer", "checkpoint-mismatch",
                           "chain-wanted", "fetch", "rollback", "state-rebuild", "recovery-start", "recovery-estimate",
                           "recovery-point", "recovered", "recovery-request", "state-repair"})


CHAIN_LINK_LATE = frozenset({"chain-link-stale"})
# session keys are refreshed for other replicas' recoveries at most this often (seconds)
KEY_REFRESH_MIN_INTERVAL_S = 5.0
# a recovery turn that finds another replica recovering looks again this often (``_watchdog``)
RECOVERY_DEFER_STEP_S = 1.0


def log(replica: int, event: str, **fields) -> None:
    """One structured (JSON) log line on stderr."""
    rec = {"ts": round(time.time(), 3), "replica": replica, "event": event}
    rec.update(fields)
    print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


class ReplicaNode:
    def __init__(self, cluster: Cluster, replica_id: int, identity: Identity, service: Service,
                 quiet: bool = False, recover: bool = False):
        self.cluster = cluster
        # the core's configuration (cluster.toml's until a membership change: ``_on_switch``)
        self.cfg = cluster.genesis_cfg or cluster.cfg
        self.slots_n = self.cfg.client_base  # replica slots, members or not: ids below it are replicas
        self.id = replica_id
        self.identity = identity
        self.rt = cluster.runtime
        self.quiet = quiet
        self.loop = asyncio.get_event_loop()
        self.counters = Counters()
        self.ring = KeyRing(replica_id, self.cfg.client_base, {}, {})  # (a MAC per replica slot)
        self.store: Optional[Store] = None
        self.restore_outcome = "memory"
        records: dict[bytes, bytes] = {}
        damaged: frozenset[bytes] = frozenset()
        st = cluster.storage
        if st.mode != "memory":
            path = st.replica_dir(cluster.dir, replica_id)
            try:
                # durable: a write-ahead log (one fdatasync per group commit) before LMDB; fast: LMDB unsynced
                self.store = open_store(path, cluster.owner(replica_id), st.mode, map_size_bytes=st.map_size_mb << 20)
                records, damaged = self.store.load()
            except StoreError as e:
                raise ConfigError(f"replica {replica_id}: {e}") from None
        # nothing stored and a membership in force that is not cluster.toml's (epoch.json): a
        # replica starting from nothing in a later membership starts as its joiner
        # (one with a store restores its checkpoint's membership: core.membership.after_restore)
        self.joining = not records and cluster.members_from > 0
        added = not self.cfg.is_replica(replica_id)  # (no member at genesis: added by a change)
        if self.joining or added:
            if not cluster.cfg.is_replica(replica_id):
                raise ConfigError(f"replica {replica_id} is not a member: the membership in force has "
                                  f"{cluster.cfg.n} replicas ({EPOCH_FILE if cluster.members_from else CLUSTER_FILE}; "
                                  f"`pbft reconfig DIR add-replica` adds replicas)")
            self.cfg = cluster.cfg
        self.replica = Replica(self.cfg, replica_id, self.ring, service, now=self._now(),
                               genesis_config=cluster.genesis_config)
        if self.store is not None:
            self.replica.enable_persistence()
            self.restore_outcome = self.replica.restore(records, damaged)
            if damaged:
                log(replica_id, "store-damaged", records=len(damaged), outcome=self.restore_outcome)
            (path / "pid").write_text(f"{os.getpid()}\n")
        if added and self.replica.low_water_mark < cluster.members_from:
            self.joining = True  # (an added replica restarted before it got a checkpoint of its membership)
        if self.joining:
            membership.start_as_joiner(self.replica, membership.base_view(cluster.members_epoch, self.cfg.n),
                                       cluster.members_from)
        self.cfg = self.replica.cfg  # (a restored checkpoint's membership: core.membership.after_restore)
        # we keep the membership chain: a catch-up beyond the window on a weak certificate asks it first
        self.replica.chain.follows = True
        self.recovery_overdue = False
        self.recovery_deferred_s = 0.0  # how long the turn under way has waited for another recovery
        self.recovery_timer: Optional[asyncio.TimerHandle] = None  # the next turn (the internal watchdog)
        self.rebooting = False
        # durable mode: ``k`` records of turns that wrote nothing else, written with the next
        # write (or ``DEFERRED_WRITE_S`` later) instead of before their sends (``_flush``)
        self.defer_commits = self.store is not None and st.mode == "durable"
        self.deferred: dict[bytes, Optional[bytes]] = {}
        self.deferred_timer: Optional[asyncio.TimerHandle] = None
        if recover or self.replica.recovery_marker:
            # a fresh process, state reloaded from disk: now the protocol part of the recovery
            self.replica.begin_recovery(self._now(), now_timestamp_us())
        self._sync_wall_clock()
        self.links: dict[int, OutLink] = {}
        self.client_conn: dict[int, FrameConn] = {}
        self.scheduling = current_scheduling()  # the CPU policy it runs under (runtime.sched)
        self.my_newkey: Optional[bytes] = None
        self.my_keys: dict[int, bytes] = {}  # the keys my_newkey carries
        self.my_newkey_ts = 0
        self.inbound: set[FrameConn] = set()
        self.replica_conn: dict[int, FrameConn] = {}  # the inbound connection each replica authenticated
        self.client_frame_max = client_frame_bytes_max(self.cfg)
        rt = self.rt
        self.guard = InboundGuard(self.counters, InboundLimits(
            rt.unauthenticated_timeout_s, rt.idle_timeout_s, rt.frame_timeout_s, rt.partial_frames_bytes_max,
            self.client_frame_max))
        self.flush_pending = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at: Optional[float] = None
        self.req_arrival: dict[int, float] = {}
        self.view_changes = 0
        self.new_views = 0
        self.key_refresh_due = False  # a refresh for another replica's recovery is scheduled
        self.last_recovery_refresh = -KEY_REFRESH_MIN_INTERVAL_S
        self.started = time.time()
        self.metrics = ReplicaMetrics(self)
        self.stopping = asyncio.Event()
        self.failed = False
        self.internal_errors = _env_count(INTERNAL_ERRORS_ENV)  # metric, kept across reboots
        self.halted = False  # after an internal error: the core is not used any more
        self.reboot_delay_s = 0.0
        self.server: Optional[Listener] = None
        self.http: Optional[HttpEndpoint] = None
        self.newkey_gate = NewKeyGate(identity, cluster.public, self.slots_n, self.cfg.max_principal,
                                      self.cfg.timestamp_skew_ms_max, self.counters)
        # the latest NewKey timestamp accepted from each principal survives restarts and
        # recoveries (records ``N<principal>``), so a NewKey captured before is never taken again
        self.newkey_gate.restore(records)
        # the configuration in force: the key registry follows its epochs (runtime.epochs)
        self.epochs = EpochFollower(self)
        # the membership certificate chain: signed at each switch, kept, served (runtime.chain_keeper)
        self.chain = ChainKeeper(self)
        # clients' requests against per-client credits, before the core (runtime.admission)
        self.request_slots = RequestSlots(self.loop, self.counters, self._redeliver)  # requests waiting for credits
        self.request_budget = RequestBudget(
            REQUEST_CREDITS_BURST, REQUEST_CREDITS_PER_RETRY_TIMEOUT * 1000.0 / self.cfg.client_retry_timeout_ms)

    # ---- clock and logging --------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() * 1000.0

    def _sync_wall_clock(self) -> None:
        self.replica.wall_offset_ms = time.time() * 1000.0 - self._now()

    def _on_events(self, ready) -> None:
        """A step's events (logs, metrics) and its request for a key refresh."""
        for ev in ready.events:
            if ev.kind in LOGGED_EVENTS:
                self._on_event(ev)
        if ready.refresh_keys:
            # another replica recovers: as in the thesis, refresh our session keys too, so keys
            # its attacker may have learnt from it are useless
            self._refresh_keys_coalesced()

    def _on_event(self, ev) -> None:
        kind = ev.kind
        if kind == "view-change":
            self.view_changes += 1
            self._log("view-change", view=ev.view, reason=ev.reason)
        elif kind == "new-view":
            self.new_views += 1
            self._log("new-view", view=ev.view, primary=ev.view % self.cfg.n)
        elif kind == "membership":
            self._on_switch(ev)
        elif kind == "chain-wanted":
            self._log("chain-wanted", seqno=ev.seqno, chain_epoch=self.chain.head.epoch)
            self.loop.call_soon(self._answer_chain, ev.seqno)
        elif kind == "stable":
            self.metrics.on_stable(ev.seqno)
            self.epochs.on_checkpoint(ev.seqno)
            self.chain.on_state(ev.seqno)
        elif kind == "state-transfer":
            self._log("state-transfer", seqno=ev.seqno)
            self.epochs.on_checkpoint(ev.seqno)
            self.chain.on_state(ev.seqno)
        elif kind == "checkpoint-mismatch":
            self._log("checkpoint-mismatch", seqno=ev.seqno)
        elif kind == "state-repair":
            self._log("state-repair", seqno=ev.seqno)
        elif kind == "fetch":
            self._log("fetch-state", seqno=ev.seqno)
        elif kind == "rollback":
            self._log("rollback", to_seqno=ev.to_seqno)
        elif kind == "state-rebuild":
            self._log("state-rebuild", seqno=ev.seqno, objects_corrupt=ev.objects_corrupt)
        elif kind == "recovery-start":
            self._log("recovery-start", rebooted_at=ev.nonce / 1e6)
        elif kind == "recovery-estimate":
            self._log("recovery-estimate", H_M=ev.estimate)
        elif kind == "recovery-point":
            self._log("recovery-point", request_seqno=ev.request_seqno, recovery_point=ev.recovery_point)
        elif kind == "recovered":
            self.recovery_overdue = False
            ts = self.replica.transfer_stats
            self._log("recovered", recovery_point=ev.recovery_point, protocol_s=round(ev.duration_ms / 1000, 3),
                      fetched_objects=ts["objects"], fetched_bytes=ts["bytes"])
        elif kind == "recovery-request":
            self._log("recovery-request", recovering=ev.replica, seqno=ev.seqno, recovery_point=ev.recovery_point)

    def _on_switch(self, ev) -> None:
        """The core switched to a new membership (``MembershipSwitched``): links to the new
        members, none to those that left, fresh session keys with the new members. A retired
        replica keeps its links (it still answers Status and serves state) and takes part in
        nothing (the core)."""
        self.cfg = self.replica.cfg
        self._log("membership", seqno=ev.seqno, members_from=ev.members_from, n=ev.n, f=self.cfg.f, view=ev.view,
                  retired=ev.retired)
        self.chain.on_state(ev.seqno)  # (a retired replica signs too: it was a member of the one before)
        if ev.retired:
            return
        for j in [j for j in self.links if j >= self.cfg.n]:
            self.links.pop(j).stop()
        self._connect_members()
        self._refresh_keys(broadcast=True)

    def _answer_chain(self, wanted: int) -> None:
        """The core asks, before it catches up beyond its window on a weak certificate (for
        checkpoint ``wanted``), which membership our chain certifies (``core.membership.ChainView``):
        the chain's last one, if it is newer than the core's. If that membership is one we are a
        member of, that our state does not record as a pending change, and ``wanted`` is after its
        switch point (``membership.rejoin_wanted``: it is in force), we rejoin it first: we missed
        the change entirely, and our old membership's members alone may be too few to catch up."""
        if self.halted:
            return
        r, head = self.replica, self.chain.head
        m = membership.rejoin_wanted(r, head, wanted)
        if m is not None:
            self._rejoin(m, wanted)
        membership.learn_chain(r, head)  # (None there unless newer than the core's)
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _rejoin(self, m: Membership, wanted: int) -> None:
        """Enter membership ``m`` as its joiner (``membership.rejoin``), with a switch's node-side
        effects: links to its members, none to others, fresh session keys with its members."""
        membership.rejoin(self.replica, m)
        self.cfg = self.replica.cfg
        self._log("membership-rejoin", members_from=m.opens_at, n=m.n, f=self.cfg.f, view=self.replica.view,
                  chain_wanted=wanted)
        for j in [j for j in self.links if j >= self.cfg.n]:
            self.links.pop(j).stop()
        self._connect_members()
        self._refresh_keys(broadcast=True)

    def _connect_members(self) -> None:
        """An outbound link to every member but us (addresses: cluster.toml's slots)."""
        for j in range(self.cfg.n):
            if j == self.id or j in self.links:
                continue
            r = self.cluster.slot(j)
            link = OutLink(r.host, r.port, self._make_conn, self._on_link_up,
                           self.rt.reconnect_min_s, self.rt.reconnect_max_s)
            self.links[j] = link
            link.start()

    def _refresh_keys_coalesced(self) -> None:
        """Refresh our session keys for another replica's recovery, at most once per
        ``KEY_REFRESH_MIN_INTERVAL_S`` whatever gets ordered: a refresh makes every message in
        flight to us unverifiable (retransmissions, resent keys), so a replica that has recovery
        requests ordered again and again must not make us refresh each time. A request arriving
        within the interval of the last refresh is served by one refresh at the interval's end
        (never skipped: the keys the recovering replica's attacker may know still go); those
        folded into it are counted (``key_refreshes_coalesced``)."""
        if self.key_refresh_due:
            self.metrics.key_refreshes_coalesced += 1
            return
        self.key_refresh_due = True
        wait = self.last_recovery_refresh + KEY_REFRESH_MIN_INTERVAL_S - time.monotonic()

        def refresh() -> None:
            self.key_refresh_due = False
            self.last_recovery_refresh = time.monotonic()
            self._refresh_keys(True)

        if wait > 0:
            self.metrics.key_refreshes_coalesced += 1  # (deferred: joins the next refresh)
            self.loop.call_later(wait, refresh)
        else:
            self.loop.call_soon(refresh)

    def _log(self, event: str, **fields) -> None:
        if not self.quiet:
            log(self.id, event, **fields)

    # ---- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        me = self.cluster.slot(self.id)
        self._refresh_keys(broadcast=False)
        try:
            sock = listen_socket(me.host, me.port, backlog=512)
        except OSError as e:
            raise ConfigError(f"replica {self.id} cannot listen on {me.host}:{me.port}: {e.strerror or e}") from None
        rate = self.rt.unauthenticated_accepts_per_s
        # (connections whose first bytes show they would be closed at their first frame are
        # refused at accept, before any transport exists: runtime.admission.first_frame_screen)
        self.server = Listener(sock, self._accept, self.counters, rate, max(16.0, rate),
                               screen=first_frame_screen(self.newkey_gate, self.client_frame_max,
                                                         self.cfg.message_size_bytes_max + 1024))
        self.server.start()
        self._connect_members()
        self.http = HttpEndpoint(self.metrics, self.rt)
        try:
            self.http.start(me.metrics_host, me.metrics_port)
        except OSError as e:
            raise ConfigError(f"replica {self.id} cannot serve metrics on {me.metrics_host}:{me.metrics_port}: "
                              f"{e.strerror or e}") from None
        self.loop.call_later(self._refresh_delay(), self._periodic_refresh)
        self.arm_recovery_timer()
        self.loop.call_later(1.0, self._check_recovery_alarm)
        self.loop.add_signal_handler(signal.SIGUSR1, self.recover_now)
        if os.environ.get("PBFT_FAULT_INJECTION") == "1":  # tests only: SIGUSR2 corrupts memory
            self.loop.add_signal_handler(signal.SIGUSR2, self._inject_memory_corruption)
        self._rearm()
        self.chain.on_state()  # (a restored checkpoint's membership newer than our chain: our vote)
        self._log("started", host=me.host, port=me.port, metrics_host=me.metrics_host, metrics_port=me.metrics_port,
                  n=self.cfg.n, f=self.cfg.f, scheduling=self.scheduling)

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        if self.server is not None:
            self.server.close()
        self.guard.stop()
        for c in list(self.inbound):
            c.close()
        if self.http is not None:
            self.http.close()
        if self.timer is not None:
            self.timer.cancel()
        if self.deferred_timer is not None:
            self.deferred_timer.cancel()
            self.deferred_timer = None
        if self.store is not None:
            try:
                puts: dict = self.deferred
                self.deferred = {}
                puts.update(self.replica.take_ready().persist)
                puts.update(self.newkey_gate.take_records())
                if puts:
                    self.store.write(puts)
                self.store.flush()
            except StoreError as e:
                log(self.id, "store-error", error=str(e))
            self.store.close()
            self.store = None
        self._log("stopped")

    # ---- proactive recovery -------------------------------------------------
    def recovery_period_s(self) -> float:
        """The recovery period in force: the configuration's in force here, or cluster.toml's."""
        return recovery_period_in_force(self.cluster.recovery, self.epochs.active)

    def arm_recovery_timer(self) -> None:
        """(Re)arm the timer of this replica's next turn for the period in force: none when it
        is 0, or when the turns are a `pbft watchdog` process's ("external", which this one
        cannot stop). At startup, and when a configuration switch changes the period."""
        if self.recovery_timer is not None:
            self.recovery_timer.cancel()
            self.recovery_timer = None
        if self.recovery_period_s() > 0 and self.cluster.recovery.watchdog == "internal":
            self.recovery_timer = self.loop.call_later(self._next_recovery_delay(), self._watchdog)

    def _next_recovery_delay(self) -> float:
        """Seconds until this replica's next turn: one turn every period/n of the wall clock,
        replica n-1 first (``cluster.recovery_turn``), so replicas recover one at a time."""
        period = self.recovery_period_s()
        now = time.time()
        t = recovery_turn(now, period, self.id, self.cfg.n)
        if t - now < period / 2 and time.time() - self.started < period / 2:
            t += period  # just (re)started: not again right away
        return t - now

    def _watchdog(self) -> None:
        self.recovery_timer = None
        if self.recovery_period_s() <= 0:
            return  # (turned off since the timer was armed)
        if self.replica.recovering is not None:
            self.recovery_timer = self.loop.call_later(self._next_recovery_delay(), self._watchdog)
            return
        # another replica's recovery still under way here (its recovery point not yet behind a
        # stable checkpoint: a late one, clocks apart): wait for it, so that two replicas do not
        # recover at once; at most alarm_s, so that a replica sending recovery requests again and
        # again (Byzantine) delays our recovery by that much and no more
        others = sorted(j for j in self.replica.recovery.points if j != self.id)
        if others and self.recovery_deferred_s < self.cluster.recovery.alarm_s:
            if not self.recovery_deferred_s:
                self._log("watchdog", action="defer", recovering=others)
            self.recovery_deferred_s += RECOVERY_DEFER_STEP_S
            self.recovery_timer = self.loop.call_later(RECOVERY_DEFER_STEP_S, self._watchdog)
            return
        self.recovery_deferred_s = 0.0
        self._log("watchdog", action="recover")
        self.recover_now()

    def recover_now(self) -> None:
        """Start a proactive recovery: save, then reboot this process from a clean copy of the
        code (``exec``), which reloads the state from disk and sends fresh keys."""
        if self.rebooting:
            return
        self.rebooting = True
        self._log("recovery-reboot")
        # the primary hands its view over now, not once the new process is up (a second or more):
        # its ViewChange goes out, behind the records it implies, then we reboot. Not after an
        # internal error: that core is halted, and nothing more is built from its state
        if not isinstance(self.replica, HaltedCore) and self.replica.vc.hand_over(self._now()):
            self._flush()  # (written, then handed to the links: the store writes in the loop)
            self.loop.call_soon(self.stopping.set)  # (a turn for the links to write it out)
            return
        self.stopping.set()

    def _inject_memory_corruption(self) -> None:
        """Testing only (``PBFT_FAULT_INJECTION=1``, then SIGUSR2): overwrite one value of the
        service's state in memory, behind the library's back, as a memory error or an attacker
        would; the bucket is then marked modified, so the damage also reaches the disk at the
        next checkpoint.  Only a check against the other replicas finds it: that checkpoint's
        (``state-repair``), or a recovery."""
        from ..state.objects import ObjectDict
        svc = self.replica.service
        for part in getattr(getattr(svc, "space", None), "parts", ()):
            if isinstance(part, ObjectDict):
                for b, bucket in enumerate(part.buckets):
                    if bucket:
                        key = min(bucket)
                        old = bucket[key]
                        bucket[key] = (b"corrupted-in-memory",) + tuple(old[1:]) if isinstance(old, tuple) else b"x"
                        self.replica.state.modify(self.replica.rs.R + part.base + b)
                        log(self.id, "fault-injected", kind="memory", object=self.replica.rs.R + part.base + b,
                            key=key.hex())
                        return

    def _check_recovery_alarm(self) -> None:
        rec = self.replica.recovering
        if rec is not None and not self.recovery_overdue:
            took = (self._now() - rec.started) / 1000.0
            if took > self.cluster.recovery.alarm_s:
                self.recovery_overdue = True
                log(self.id, "recovery-overdue", seconds=round(took, 1), phase=rec.phase,
                    alarm_s=self.cluster.recovery.alarm_s)
        self.loop.call_later(1.0, self._check_recovery_alarm)

    # ---- connections --------------------------------------------------------
    def _make_conn(self) -> FrameConn:
        return FrameConn(self._on_frame, self.counters, self.cfg.message_size_bytes_max + 1024,
                         self.rt.receive_budget_frames, self.rt.send_queue_bytes_max, self._on_lost)

    def _accept(self) -> FrameConn:
        conn = self._make_conn()
        if len(self.inbound) >= self.rt.connections_max:
            # a full table makes room by closing its oldest connection that never authenticated
            # (idle sockets cannot lock correct clients out), else its oldest client connection
            # that no client's latest NewKey is bound to any more (frames on it would be dropped
            # anyway); a replica's, or a client's current one, is never evicted
            victim = self.guard.oldest_unauthenticated() or self._oldest_unbound_client_conn()
            if victim is None:
                self.counters.drop("connection-limit")
                conn.meta["reject"] = True
                self.loop.call_soon(conn.close)
                return conn
            self.counters.drop("connection-evicted")
            self.inbound.discard(victim)
            victim.close()
        self.inbound.add(conn)
        self.guard.add(conn)
        self.counters.connections_accepted += 1
        return conn

    def _oldest_unbound_client_conn(self) -> Optional[FrameConn]:
        client_conn = self.client_conn
        for c in self.guard.conns:
            if c.auth == AUTH_CLIENT and not c.closed and \
                    not any(client_conn.get(x) is c for x in c.meta.get("clients", ())):
                return c
        return None

    def _on_lost(self, conn: FrameConn) -> None:
        self.inbound.discard(conn)
        for j, c in list(self.replica_conn.items()):
            if c is conn:
                del self.replica_conn[j]
        for c in conn.meta.get("clients", ()):
            if self.client_conn.get(c) is conn:
                del self.client_conn[c]

    def _on_link_up(self, link: OutLink) -> None:
        # the peer may have restarted and lost our keys: tell it again which keys to use, with a
        # fresh timestamp (a NewKey it already accepted would be stale: the new connection would
        # stay unauthenticated on its side)
        j = next((r for r, lk in self.links.items() if lk is link), None)
        if j is not None and j in self.my_keys:
            try:
                nk = make_newkey(self.identity, self.cluster.public, {j: self.my_keys[j]}, self._newkey_timestamp())
            except DecodeError as e:  # a signer refused or is gone: the peer gets our next refresh
                self.counters.drop(e.reason)
                return
            if link.conn is not None:  # (it is: the link is up)
                link.conn.send(frame(nk))
                self.chain.on_link_up(link.conn)  # (after our NewKey: the peer takes it first)

    # ---- keys ---------------------------------------------------------------
    def _refresh_delay(self) -> float:
        p = self.rt.key_refresh_s
        return p * (0.9 + 0.2 * random.random())

    def _periodic_refresh(self) -> None:
        self.loop.call_later(self._refresh_delay(), self._periodic_refresh)
        self._refresh_keys(broadcast=True)

    def _refresh_keys(self, broadcast: bool) -> None:
        """Choose fresh keys for every replica to send to us with; old ones stop working now."""
        keys = {j: fresh_key() for j in range(self.cfg.n) if j != self.id}
        try:
            newkey = make_newkey(self.identity, self.cluster.public, keys, self._newkey_timestamp())
        except DecodeError as e:  # a signer process (runtime.signer) refused or is gone: keep the old keys
            self.counters.drop(e.reason)
            self._log("signer-error", reason=e.reason, action="keys-not-refreshed")
            if self.my_newkey is None:
                raise ConfigError(f"replica {self.id}: cannot sign its first NewKey ({e.reason})") from None
            return
        self.ring.in_keys.update(keys)
        self.my_keys = keys
        self.my_newkey = newkey
        if broadcast:
            data = frame(self.my_newkey)
            for link in self.links.values():
                link.send(data, self.counters)
        self.metrics.key_refreshes += 1

    def _newkey_timestamp(self) -> int:
        """Timestamps of my NewKeys grow strictly, whatever the wall clock does."""
        self.my_newkey_ts = max(now_timestamp_us(), self.my_newkey_ts + 1)
        return self.my_newkey_ts

    def _on_newkey(self, conn: FrameConn, raw: bytes) -> None:
        # cheap checks first (a replay or a timestamp from the future costs no signature check),
        # then the rate limits, then the signature (runtime.admission)
        got = self.newkey_gate.accept(conn, raw)
        if got is None:
            if self.newkey_gate.refused != "newkey-rate-limited":
                # a replay, a stale, future or badly signed NewKey; one refused only for the rate
                # limit (a burst of correct connections) leaves the connection open
                self._close_unauthenticated(conn)
            return
        sender, k = got
        self.metrics.newkeys_accepted += 1
        if sender < self.slots_n:
            self.ring.out_keys[sender] = k
            conn.meta["replica"] = sender  # frames it relays are taken on this connection too
            if conn.guard is not None:
                # one authenticated connection per replica: its older one (a link it gave up) goes
                old = self.replica_conn.get(sender)
                if old is not None and old is not conn:
                    self.counters.drop("connection-replaced")
                    old.close()
                self.replica_conn[sender] = conn
                conn.authenticate(AUTH_REPLICA)
        else:
            conn.authenticate(AUTH_CLIENT, self.client_frame_max)
            c = sender
            self.ring.in_keys[c] = k[:KEY_SIZE]
            self.ring.out_keys[c] = k[KEY_SIZE:]
            self.client_conn[c] = conn
            conn.meta.setdefault("clients", set()).add(c)

    # ---- the core -----------------------------------------------------------
    def _redeliver(self, conn: FrameConn, raw: bytes) -> None:
        """A request whose client's credit came (``RequestSlots``): handled as if it had just arrived."""
        if not self.halted:
            self._on_frame(conn, raw)

    def _close_unauthenticated(self, conn: FrameConn) -> None:
        """A frame that is not a valid NewKey on a connection that never authenticated: close it
        (a correct principal's first frame is its NewKey; it reconnects with a fresh one), so one
        accepted connection costs at most one frame's work (``Listener`` bounds the accepts)."""
        if conn.auth == UNAUTHENTICATED and conn.guard is not None and not conn.closed:
            self.counters.drop("connection-closed-unauthenticated")
            conn.close()

    def _on_frame(self, conn: FrameConn, raw: bytes) -> None:
        # (the path every frame takes: locals, int constants, the common cases inline)
        n_raw = len(raw)
        if n_raw < 2 or raw[0] != FIXARRAY5:
            self.counters.drop("malformed")
            self._close_unauthenticated(conn)
            return
        tag = raw[1]
        if tag == _TAG_NEWKEY:
            self._on_newkey(conn, raw)
            return
        # the principal binding (runtime.admission): a frame is taken only on the connection its
        # sender's latest NewKey came on, or on a replica's (replicas relay others' frames)
        s = raw[2] if n_raw >= 7 and tag < FIXINT_END and raw[2] < FIXINT_END else frame_sender(raw)  # fixint: inline
        relayed = False
        slots_n = self.slots_n
        if (self.replica_conn if s < slots_n else self.client_conn).get(s) is not conn:
            if s < 0:
                self.counters.drop("malformed")
                self._close_unauthenticated(conn)
                return
            if self.replica_conn.get(conn.meta.get("replica", -1)) is not conn:
                self.counters.drop("spoofed-self" if s == self.id else
                                   "spoofed-replica" if s < self.slots_n else "spoofed-client")
                # no NewKey was ever accepted on it: an impostor, or a correct principal whose
                # NewKey we dropped
                self._close_unauthenticated(conn)
                return
            relayed = True
        if tag == _TAG_MEMBERSHIP_LINK:
            # self-certifying (signed), so relayed ones are taken too; only replicas send them
            why = self.chain.on_frame(raw) if s < slots_n else "chain-link-from-client"
            if why:
                self.counters.drop(why)
                if why not in CHAIN_LINK_LATE:  # (a correct peer's vote after the link completed)
                    self._count_waste(conn, time.monotonic(), 1 + (len(raw) >> 10))
            return
        now = _monotonic() * 1000.0  # (``_now``, inlined: once per frame)
        if tag == _TAG_REQUEST and not relayed and s >= slots_n:
            wait = self.request_budget.take(s, now / 1000.0)
            if wait:
                # a client sending requests faster than we answer them (runtime.admission): this
                # request waits for its client's next credit, in the client's one slot; the
                # connection goes on, as it may carry other clients' requests (a client pool)
                self.request_slots.park(s, conn, raw, wait)
                self._count_waste(conn, now / 1000.0, 1, CLIENT_DEFERRED_PER_S_MAX, client=True)
                return
            if s not in self.req_arrival and len(self.req_arrival) < 65536:
                # arrival of a client's request, for the request-latency metric
                self.req_arrival[s] = now
        r = self.replica
        d0 = r.dropped_total
        try:
            r.receive(raw, now, relayed)
        except Exception as e:  # noqa: BLE001
            self._fail_stop(e)
            return
        if r.dropped_total != d0 and "replica" in conn.meta:
            self._count_waste(conn, now / 1000.0, 1 + (n_raw >> 10))
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _count_waste(self, conn: FrameConn, now_s: float, units: int = 1,
                     limit: int = REPLICA_WASTE_FRAMES_PER_S_MAX, client: bool = False) -> None:
        """A frame on a replica's connection was dropped by the core: ``units`` of waste, one
        per frame and one more per KiB (reading, copying and MAC-checking a frame costs by its
        size: a few large frames waste as much as many small ones). A correct replica's frames
        are dropped now and then (retransmissions, relays after a restart), a few hundred a
        second at worst; one that floods us with messages its keys make valid (Vouch, Status,
        QueryStable, view changes, acks...) has thousands dropped a second, each after a MAC
        check. Past ``REPLICA_WASTE_FRAMES_PER_S_MAX`` units in a second its connection is held
        (nothing read from it, so TCP makes it wait), for 50 ms doubling up to 2 s while it goes
        on, as Aardvark closes a flooding replica's network interface for a while.

        With ``client``: the same for a client connection whose requests arrive out of credits
        (``RequestSlots.park``) more than ``limit`` times a second (``client-flood-held``): a
        correct client has one request outstanding, so only a flood gets there, and TCP then
        slows the flooder instead of us reading and parking its requests."""
        key = "client-waste" if client else "waste"
        w = conn.meta.get(key)
        if w is None:
            w = conn.meta[key] = [now_s, 0, 0.0]
        if now_s - w[0] >= 1.0:
            if w[1] < limit // 4:
                w[2] = 0.0  # behaved for a second: the next hold starts short again
            w[0], w[1] = now_s, 0
        w[1] += units
        if w[1] > limit:
            w[2] = min(REPLICA_HOLD_S_MAX, max(REPLICA_HOLD_S_MIN, 2 * w[2]))
            if client:
                self.counters.drop("client-flood-held")
            else:
                self.counters.drop("replica-flood-held")
                self.metrics.replica_flood_holds += 1
            conn.hold(w[2])
            w[0], w[1] = now_s + w[2], 0

    def _flush(self) -> None:
        self.flush_pending = False
        ready = self.replica.take_ready()
        if ready.events or ready.refresh_keys:
            self._on_events(ready)
        sends = ready.sends
        if self.store is not None:
            # group commit: what this turn's messages imply reaches the disk (fdatasynced in the
            # durable mode) before any of them is sent. The write blocks the loop: the messages
            # that arrive meanwhile wait in the sockets and are handled, and written, together
            # in the next turn (a writer thread measured slower: docs/storage.md)
            puts = ready.persist
            if self.newkey_gate.dirty:
                puts = {**puts, **self.newkey_gate.take_records()}
            if puts:
                if self.defer_commits and deferrable(puts):
                    # only batches committed here: no message rests on them (core.durability.
                    # deferrable); they go with the next write, and this turn's sends go now
                    self.deferred.update(puts)
                    if self.deferred_timer is None:
                        self.deferred_timer = self.loop.call_later(DEFERRED_WRITE_S, self._write_deferred)
                elif not self._write(puts):
                    return
        self._send_out(sends)
        self._rearm()

    def _write(self, puts: dict) -> bool:
        """One group commit of ``puts``, after the deferred records; False (and the replica
        stopping) if the store failed."""
        assert self.store is not None
        if self.deferred:
            puts = {**self.deferred, **puts}  # (a later turn's puts and deletions win)
            self.deferred = {}
        if self.deferred_timer is not None:
            self.deferred_timer.cancel()
            self.deferred_timer = None
        try:
            self.store.write(puts)
        except StoreError as e:
            self._fail_stop(e)
            return False
        return True

    def _write_deferred(self) -> None:
        """No write took the deferred records within ``DEFERRED_WRITE_S``: written now (an idle
        replica keeps what it committed)."""
        self.deferred_timer = None
        if self.deferred and self.store is not None:
            self._write({})

    def _send_out(self, sends) -> None:
        if sends:
            n = self.slots_n
            # one write per connection per loop turn: replies to the many clients that share a
            # connection (a client pool) go out together, as do all frames to one replica
            per: dict[int | FrameConn, list[bytes]] = {}
            client_conn = self.client_conn
            arrivals = self.req_arrival
            counters = self.counters
            credit = self.request_budget.replied
            replied = []
            for dests, raw in sends:
                fr = pack_len(len(raw)) + raw  # (``transport.frame``, inline)
                for d in dests:
                    if d < n:
                        key = d
                    else:
                        key = client_conn.get(d)
                        if key is None:
                            counters.drop("client-unreachable")
                            continue
                        credit(d)
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
                if isinstance(key, int):
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
        """An exception out of the core (a bug, not bad input: bad input is dropped and counted),
        or a failed store write.

        The core's state is then one nobody has reasoned about, so it is thrown away, not used:
        what the failing step had produced is neither sent nor written, the core gets nothing more,
        and the replica reboots into a proactive recovery (``recover_now``: the process is replaced
        by ``exec`` with ``--recover``, reloads its state from the data directory and has it
        checked against the others, as after any crash). The cluster keeps its replica instead of
        losing it for good. Logged as ``internal-error`` with the traceback, counted in
        ``internal_errors`` (kept across the reboot). If the error comes again within
        ``CRASH_LOOP_WINDOW_S`` of the process's start, the reboot waits first, 1 s, then twice as
        long each time along the streak (up to ``REBOOT_BACKOFF_MAX_S``): a bug that strikes at
        every start cannot spin the CPU.

        A failed store write (``StoreError``) stops the process instead, with status 74
        (``EX_IOERR``): a disk that refuses writes is not repaired in-process, and a reboot would
        reload from it. A supervisor (systemd ``Restart=on-failure``) starts it again, which fails
        cleanly at start while the store stays unusable."""
        import traceback
        if self.halted:
            return  # (a later error of a replica already going down)
        self.halted = True
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        self.internal_errors += 1
        # the failing step's effects, and those of this turn, reach neither the network nor the disk
        # (as if the process had crashed before its group commit); the core is not fed again
        r = self.replica
        r.take_ready()
        self.replica = HaltedCore(r)  # type: ignore[assignment]
        if isinstance(e, StoreError):
            self.failed = True
            log(self.id, "internal-error", kind="store", error=repr(e), traceback=tb, action="stop",
                internal_errors=self.internal_errors)
            self.stopping.set()
            return
        soon = time.time() - self.started < CRASH_LOOP_WINDOW_S
        streak = _env_count(INTERNAL_ERROR_STREAK_ENV) + 1 if soon else 1
        self.reboot_delay_s = 0.0 if streak == 1 else min(REBOOT_BACKOFF_MAX_S, 2.0 ** (streak - 2))
        os.environ[INTERNAL_ERRORS_ENV] = str(self.internal_errors)
        os.environ[INTERNAL_ERROR_STREAK_ENV] = str(streak)
        log(self.id, "internal-error", kind="core", error=repr(e), traceback=tb, action="recover",
            internal_errors=self.internal_errors, streak=streak, reboot_delay_s=self.reboot_delay_s)
        self.recover_now()  # (if a reboot is already under way, it is this one, with the delay)

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
            "stable_checkpoint": r.low_water_mark,
            "stable_digest": r.checkpoints.committed.get(r.low_water_mark, b"").hex() or None,
            "executed_requests": r.log.executed_requests,
            "view_changes": self.view_changes,
            "internal_errors": self.internal_errors,
            "idle_rejoins": r.vc.idle_rejoins,
            "key_refreshes_coalesced": self.metrics.key_refreshes_coalesced,
            "fetching_state": r.fetch_target is not None,
            "recovering": r.recovering.phase if r.recovering is not None else None,
            "recovery_point": r.recovering.point if r.recovering is not None else None,
            "recoveries": r.recoveries,
            "last_recovery_s": round(r.last_recovery_ms / 1000, 3) if r.last_recovery_ms is not None else None,
            "recovery_overdue": self.recovery_overdue,
            "storage": self.cluster.storage.mode,
            "restored": self.restore_outcome,
            "needs_state": r.needs_state,
            "state_objects": r.state.n,
            "state_transfer": dict(r.transfer_stats),
            "store_writes": self.store.stats["writes"] if self.store else 0,
            "store_sync_seconds": round(self.store.stats["sync_seconds"], 3) if self.store else 0.0,
            "seq_assigned": r.log.seq_assigned,
            "requests_known": len(r.requests.known),
            "requests_pending": len(r.requests.pending),
            "requests_queued": len(r.requests.queue),
            "requests_inflight": len(r.requests.inflight),
            "clients_trusted": len(r.requests.trusted),
            "clients_suspected": sorted(r.requests.suspects),
            "batch_size_mean": round(r.log.executed_requests / r.last_exec, 2) if r.last_exec else 0.0,
            "drops": dict(sorted(r.drops.items())),
            "counts": dict(sorted(r.counts.items())),
            "peers_connected": sorted(j for j, lk in self.links.items() if lk.conn is not None),
            "clients_connected": len(self.client_conn),
            "config": self.epochs.describe(),
            "chain": self.chain.describe(),
            "membership_chain": self.chain.encoded().hex(),
            "members": {"n": r.cfg.n, "f": r.cfg.f, "weights": list(r.cfg.weights), "members_from": r.members_from,
                        "retired": r.retired},
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
        }


def run_replica(cluster: Cluster, replica_id: int, service: Service, quiet: bool = False,
                recover: bool = False, identity=None) -> None:
    """Run one replica in the foreground until SIGINT/SIGTERM. ``identity``: its long-term key
    (default: read from its key file), or a ``runtime.signer.SignerIdentity``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        uvloop = None  # type: ignore[assignment]
    if identity is None:
        identity = cluster.identity(replica_id)
    scheduling = apply_scheduling(cluster.runtime.scheduling)  # before any thread starts

    async def main():
        node = ReplicaNode(cluster, replica_id, identity, service, quiet=quiet, recover=recover)
        node.scheduling = scheduling
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stopping.set)
        await node.run()
        return node.failed, node.rebooting, node.reboot_delay_s

    profile = os.environ.get("PBFT_PROFILE")  # e.g. /tmp/prof: writes /tmp/prof.<id> (cProfile) on exit
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    gctune.tune()  # (the collector's settings for a long-running process: runtime.gctune)
    try:
        failed, rebooting, delay = uvloop.run(main()) if uvloop is not None else asyncio.run(main())
        if failed:
            raise SystemExit(EX_IOERR)  # a failed store write (``ReplicaNode._fail_stop``)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{profile}.{replica_id}")
    if rebooting:
        # a recovery asked for now (`pbft recover`, the watchdog) must not kill us: SIGUSR1 stays
        # ignored through the exec until the new process installs its handler (``start``)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if delay > 0:
            time.sleep(delay)  # internal errors soon after each start: back off (``_fail_stop``)
        reboot()


def _env_count(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


class HaltedCore:
    """The core after an internal error (``ReplicaNode._fail_stop``): fed nothing more
    (``receive`` and ``tick`` do nothing, no deadline); every other attribute is the replica's,
    read and written through (status, metrics). A wrapper rather than methods replaced on the
    replica, which a compiled core (``make native``) refuses."""

    __slots__ = ("_core",)

    def __init__(self, core: Replica):
        object.__setattr__(self, "_core", core)

    def __getattr__(self, name: str):
        return getattr(self._core, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._core, name, value)

    def receive(self, *args, **kwargs) -> None:
        return None

    def tick(self, *args, **kwargs) -> None:
        return None

    def next_deadline(self) -> None:
        return None


def reboot() -> None:
    """Replace this process by a fresh one running the same command with ``--recover``: a clean
    copy of the code, nothing kept in memory (the same pid, so supervisors see no exit)."""
    argv = list(sys.orig_argv)
    if "--recover" not in argv:
        argv.append("--recover")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
