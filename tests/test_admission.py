"""Admission of requests and session keys: timestamps from the future, cached replies sent again,
suspicion, and (on a real cluster) principals bound to connections, replayed captures, forged
frames and the identity coming back after a poisoned timestamp."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import msgpack
import pytest

from cluster import Cluster
from pbft.codec import U63, batch_digest_from_request_digests, seal
from pbft.crypto import KeyRing
from pbft.messages import ALL_REPLICAS, Batch, PrePrepare, Prepare, Request
from pbft.services.kv import encode_op


def _drops(c: Cluster, reason: str) -> list[int]:
    return [r.drops.get(reason, 0) for r in c.replicas]


# ---------------------------------------------------------------------------
# the core's rules (hand-driven cluster, simulated clock starting at 0)
# ---------------------------------------------------------------------------

def test_request_timestamp_beyond_the_skew_window_is_refused_and_the_identity_comes_back():
    c = Cluster()
    limit_us = (c.now + c.cfg.timestamp_skew_ms_max) * 1000
    ring = c.rings[c.cfg.client_ids[0]]
    for t in (U63, int(limit_us) + 1):
        raw = seal(Request(c.cfg.client_ids[0], t, encode_op("put", b"k", b"evil"), False, ALL_REPLICAS), ring)
        for r in c.replicas:
            r.receive(raw, c.now)
    c.advance(200)
    assert all(r.last_exec == 0 for r in c.replicas), "nothing ordered"
    assert all(r.last_reply.get(c.cfg.client_ids[0]) is None for r in c.replicas)
    assert _drops(c, "request-future-timestamp") == [2] * 4
    assert not any(r.vouch_out for r in c.replicas), "nobody vouches for it"
    # the genuine client's ordinary timestamps (1, 2, ...) still work
    assert c.put(0, b"k", b"good") == ("ok", True)
    assert c.get(0, b"k") == ("ok", b"good")


def test_timestamp_at_the_edge_of_the_window_is_accepted():
    c = Cluster()
    c.advance(1000)
    cl = c.clients[0]
    cl.timestamp = int((c.now + c.cfg.timestamp_skew_ms_max) * 1000) - 1  # the next one is at the limit
    assert c.put(0, b"k", b"v")[0] == "ok"
    assert _drops(c, "request-future-timestamp") == [0] * 4


def test_preprepare_with_a_request_from_the_future_is_held_not_accepted():
    """A faulty primary orders a request whose timestamp is too far ahead: backups refuse it (and
    hold the pre-prepare, as for a rejected non-deterministic value); nothing executes."""
    c = Cluster()
    cid = c.cfg.client_ids[0]
    req_raw = seal(Request(cid, U63 - 5, encode_op("put", b"k", b"x"), False, 0), c.rings[cid])
    fr = c.codec.open_frame(req_raw)
    nondet = c.replicas[0].service.propose_nondet(c.now)
    d = batch_digest_from_request_digests(nondet, [fr.digest])
    pp = seal(PrePrepare(0, 1, d, 0, Batch(nondet, (req_raw,))), c.rings[0])
    for r in c.replicas[1:]:
        r.receive(pp, c.now)
    assert [r.drops.get("batch-request-future-timestamp", 0) for r in c.replicas[1:]] == [1, 1, 1]
    assert all(1 in r.held and r.slots[1].digest is None for r in c.replicas[1:])
    assert all(r.last_exec == 0 for r in c.replicas)


def test_cached_reply_is_sent_again_at_most_once_per_half_retry_timeout():
    c = Cluster()
    cl = c.clients[0]
    cl.invoke(encode_op("put", b"x", b"1"), False, c.now)
    req = cl.req
    c.run()
    c.advance(20)
    assert not cl.busy
    again = seal(Request(req.client, req.timestamp, req.op, False, ALL_REPLICAS), c.rings[req.client])
    r = c.replicas[1]
    r.take_sends()

    def replies_out():
        return sum(1 for dests, raw in r.take_sends() if dests == (req.client,))

    for _ in range(20):  # a replay storm of the same retransmission
        r.receive(again, c.now)
    assert replies_out() == 1
    assert r.drops.get("reply-resend-rate-limited", 0) == 19
    r.receive(again, c.now + c.cfg.client_retry_timeout_ms / 2)  # a client retransmits this late at the earliest
    assert replies_out() == 1
    assert len(c.of_kind("execute", 1)) == 1, "executed once"


def test_bad_mac_makes_a_client_suspect_only_when_it_came_from_the_client():
    c = Cluster()
    cid = c.cfg.client_ids[0]
    wrong = KeyRing(cid, c.cfg.n, {j: os.urandom(32) for j in range(c.cfg.n)}, {})
    forged = seal(Request(cid, 5, encode_op("put", b"k", b"v"), False, 0), wrong)
    r = c.replicas[0]
    r.receive(forged, c.now, relayed=True)  # a replica forwarded it: no evidence against the client
    assert r.drops["bad-mac"] == 1 and cid not in r.suspects
    r.receive(forged, c.now)  # from the client's own connection
    assert cid in r.suspects


def test_simulated_clients_are_never_refused_for_their_timestamps():
    """The simulator's clients count from 1 and its replicas' wall clocks from 0: the window is
    deterministic there, refuses the ts-max client's requests and never a correct client's."""
    from pbft.sim.scenarios import find
    from pbft.sim.simulator import Simulation
    sim = Simulation(find("S-16").build(4, 0))
    res = sim.run()
    assert res.ok, (res.violations[:3], res.liveness_failure)
    assert sum(r.drops.get("request-future-timestamp", 0) for r in sim.replicas) > 0
    for r in sim.replicas:  # no timestamp from beyond the window was ever executed
        assert all(t < U63 - 2 for t, _ in r.last_reply.values()), r.id
