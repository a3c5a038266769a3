"""Large requests travel by digest: the primary's PrePrepare carries the frame digest of a request
whose operation is over ``request_inline_op_bytes_max``, each backup uses the copy it got from the
client, and a backup that lacks it asks for the batch (FetchBatch / BatchData)."""

from __future__ import annotations

import os

import msgpack
import pytest

from helpers.cluster import Cluster
from pbft.codec import _packb, batch_digest_from_request_digests, frame_digest, header_of, seal
from pbft.crypto import MAC_SIZE
from pbft.messages import ALL_REPLICAS, REQUEST_REF, Batch, BatchData, PrePrepare, Request, Tag, request_ref
from pbft.services.kv import encode_op

BIG = b"x" * 4096


def tag_of(raw: bytes) -> int:
    return msgpack.unpackb(raw)[0]


def request_frame(c: Cluster, client: int, t: int, op: bytes, good_for=None) -> bytes:
    """A client's request frame whose MAC entries are right only for the replicas in ``good_for``
    (None: all)."""
    req = Request(client, t, op, False, ALL_REPLICAS)
    tag, sender, header, payload = header_of(req)
    d = frame_digest(tag, sender, header)
    ring = c.rings[client]
    auth = b"".join(ring.mac_for(r, d) if good_for is None or r in good_for else bytes(MAC_SIZE)
                    for r in range(c.cfg.client_base))
    return _packb([tag, sender, header, payload, auth])


def preprepares(c: Cluster) -> list[PrePrepare]:
    out = []
    for src, _dst, raw in list(c.net):
        if src < c.cfg.n and tag_of(raw) == Tag.PRE_PREPARE:
            m = c.codec.parse(c.codec.open_frame(raw))
            assert isinstance(m, PrePrepare)
            out.append(m)
    return out


def agree(c: Cluster) -> None:
    assert len({r.state_digest() for r in c.replicas}) == 1
    assert len({r.last_committed_exec for r in c.replicas}) == 1


def test_a_large_request_is_ordered_by_digest_and_a_small_one_inline():
    c = Cluster()
    seen: list[PrePrepare] = []
    fetches = []

    def spy(src, dst, raw):
        if src == 0 and tag_of(raw) == Tag.PRE_PREPARE:
            seen.append(c.codec.parse(c.codec.open_frame(raw)))
        if tag_of(raw) == Tag.FETCH_BATCH:
            fetches.append((src, dst))
        return False

    c.drop = spy
    assert c.put(0, b"big", BIG) == ("ok", True)
    assert c.put(1, b"small", b"v") == ("ok", True)
    c.advance(50)
    big, small = seen[0].batch, seen[-1].batch
    assert big is not None and small is not None
    assert len(big.requests) == 1 and big.requests[0][:1] == REQUEST_REF and len(big.requests[0]) == 33
    assert all(len(raw) < 200 for raw in big.requests)
    assert small.requests[0][:1] != REQUEST_REF
    assert not fetches, "every backup had the client's copy: nothing fetched"
    assert c.get(1, b"big") == ("ok", BIG)
    agree(c)
    # the batch each replica keeps (and executed) holds the body, under the same digest
    d = seen[0].digest
    kept = [r.log.batches[d][0] for r in c.replicas if d in r.log.batches]
    assert kept, "no replica keeps the batch any more: the check below would check nothing"
    assert all(b.requests[0][:1] != REQUEST_REF for b in kept)


def test_a_backup_without_the_clients_copy_fetches_the_batch_and_executes_it():
    c = Cluster()
    client = c.clients[0].id
    c.drop = lambda src, dst, raw: src == client and dst == 3  # replica 3 never hears the client
    assert c.put(0, b"big", BIG) == ("ok", True)
    c.advance(100)
    r3 = c.replicas[3]
    assert r3.drops.get("preprepare-bodies-missing", 0) >= 1
    assert r3.counts.get("bodies-fetched", 0) >= 1
    assert not any(r.counts.get("bodies-fetched") for r in c.replicas[:3])
    assert not r3.log.waiting and not r3.vc.batches_wanted
    assert r3.last_committed_exec == c.replicas[0].last_committed_exec >= 1
    agree(c)
    assert r3.view == 0, "no view change: the body was fetched"


def test_a_fetched_body_must_match_the_ordered_digest():
    c = Cluster()
    client = c.clients[0].id
    c.drop = lambda src, dst, raw: src == client and dst == 3 or src == 0 and tag_of(raw) == Tag.BATCH_DATA
    c.put(0, b"big", BIG)
    c.advance(20)  # (beyond request_body_wait_ms: replica 3 asked the primary for the batch)
    r3 = c.replicas[3]
    assert r3.log.waiting, "replica 3 holds the pre-prepare"
    (n,) = r3.log.waiting
    held = r3.log.slots[n].held_pp
    assert held is not None and held[0].digest in r3.vc.batches_wanted
    # a BatchData for the held digest, but another request's body in it: refused
    other = request_frame(c, client, 10**15, encode_op("put", b"big", b"forged" * 100))
    assert held[0].batch is not None
    bogus = Batch(held[0].batch.nondet, (other,))
    r3.receive(seal(BatchData(held[0].digest, 1, bogus), c.rings[1], to=3), c.now)
    assert r3.drops.get("batch-data-digest-mismatch", 0) == 1
    assert r3.log.slots[n].digest is None and r3.last_exec < n


@pytest.mark.parametrize("to_backups", [True, False])
def test_a_large_request_authenticated_only_at_the_primary_stalls_nobody(to_backups):
    c = Cluster()
    bad = c.clients[0].id
    assert c.put(0, b"warm", b"up") == ("ok", True)
    c.advance(50)
    assert bad in c.replicas[0].requests.trusted  # the client earned the primary's fast path
    t = c.replicas[0].last_reply[bad][0] + 1
    raw = request_frame(c, bad, t, encode_op("put", b"evil", BIG), good_for={0})
    for r in c.replicas if to_backups else c.replicas[:1]:
        r.receive(raw, c.now)
    c.run()
    c.advance(20)  # (a backup without the client's copy fetches the batch)
    # each backup got the body (from the client, or in the batch) and found the MAC bad for it
    assert all(r.drops.get("batch-request-unvouched", 0) == 1 for r in c.replicas[1:])
    # the other clients go on, after the view change that replaces the primary
    assert c.put(1, b"k", b"v") == ("ok", True)
    c.advance(200)
    assert all(r.view >= 1 for r in c.replicas)
    assert c.get(1, b"k") == ("ok", b"v")
    assert c.get(1, b"evil") == ("ok", None)
    agree(c)


def test_a_primary_ordering_a_digest_nobody_has_is_replaced():
    c = Cluster()
    # the primary's own pre-prepare for the client's request never leaves; it sends instead one
    # that refers to a request nobody has
    c.drop = lambda src, dst, raw: src == 0 and tag_of(raw) == Tag.PRE_PREPARE and c.replicas[0].view == 0
    cl = c.clients[1]
    cl.invoke(encode_op("put", b"k", b"v"), False, c.now)
    c.run()
    ghost = os.urandom(32)
    nondet = c.replicas[0].service.propose_nondet(c.now)
    d = batch_digest_from_request_digests(nondet, [ghost])
    forged = seal(PrePrepare(0, 1, d, 0, Batch(nondet, (request_ref(ghost),))), c.rings[0])
    for i in (1, 2, 3):
        c.replicas[i].receive(forged, c.now)
    c.run()
    assert all(c.replicas[i].log.waiting for i in (1, 2, 3))
    waited = 0.0
    while cl.busy and waited < 5 * c.cfg.view_change_timeout_ms:
        c.advance(10.0)
        waited += 10.0
    assert not cl.busy, "the client's request completes after the view change"
    assert c.replicas[0].drops.get("fetch-batch-unknown", 0) >= 1, "the backups asked for the batch"
    assert all(r.view >= 1 for r in c.replicas)
    c.advance(100)
    agree(c)
    assert all(r.log.batches.get(d) is None for r in c.replicas)


def test_a_new_view_carries_large_requests_by_digest():
    c = Cluster()
    assert c.put(0, b"big", BIG) == ("ok", True)
    c.advance(50)
    views = []

    def spy(src, dst, raw):
        if tag_of(raw) == Tag.NEW_VIEW:
            views.append(raw)
        return False

    c.drop = spy
    c.down.add(0)  # the primary crashes: the next request leads to view 1
    assert c.put(1, b"k", b"v") == ("ok", True)
    assert views, "a NewView was sent"
    nv = c.codec.parse(c.codec.open_frame(views[0]))
    assert any(e[:1] == REQUEST_REF for b in nv.batches for e in b.requests), "the 4 KB request by digest"
    assert len(views[0]) < len(BIG)
    c.advance(100)
    live = c.replicas[1:]
    assert len({r.state_digest() for r in live}) == 1 and all(r.view == 1 for r in live)
    assert c.get(1, b"big") == ("ok", BIG)


def test_a_malformed_reference_is_refused_by_the_codec():
    c = Cluster()
    nondet = c.replicas[0].service.propose_nondet(c.now)
    bad = Batch(nondet, (REQUEST_REF + b"\x01" * 31,))
    raw = seal(PrePrepare(0, 1, b"\x02" * 32, 0, bad), c.rings[0])
    c.replicas[1].receive(raw, c.now)
    assert c.replicas[1].drops.get("bad-request-ref") == 1
    assert not c.replicas[1].log.waiting and c.replicas[1].log.slots.get(1) is None


def test_a_backup_restarted_while_waiting_for_bodies_still_fetches_them():
    c = Cluster()
    client = c.clients[0].id
    c.drop = lambda src, dst, raw: src == client and dst == 3
    assert c.put(0, b"big", BIG) == ("ok", True)
    r3 = c.replicas[3]
    assert r3.log.waiting, "replica 3 holds the pre-prepare, waiting for the request's frame"
    r3.restart(c.now)  # (a crash: what it waited with was volatile; the slot holding it was not)
    c.advance(200)
    assert not r3.log.waiting
    assert r3.last_committed_exec == c.replicas[0].last_committed_exec >= 1
    agree(c)
