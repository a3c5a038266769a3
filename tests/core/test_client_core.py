"""The client core's choice of designated replier, against lying and silent replicas.

A lying replica answers every request with a full, committed, validly authenticated reply
carrying a wrong result; the correct replicas answer with digests, except the designated
replier (or all of them once asked for the full result). The client must never accept the
lie, must ask everybody for the full result as soon as the designated replier's result turns
out not to be the certified one, and must not designate the liar again: one lying replica
costs a client one retransmission, not one per request.
"""

from __future__ import annotations

from helpers.keys import cluster_keys
from pbft.codec import Codec, result_digest, seal
from pbft.core.client import Client
from pbft.messages import ALL_REPLICAS, Reply

N = 4


def setup():
    k = cluster_keys(N, clients=2)
    cid = k.cfg.client_ids[0]
    return k.cfg, k.rings, Client(k.cfg, cid, k.rings[cid])


def sent_requests(cfg, client):
    codec = Codec(cfg)
    out = []
    for dests, raw in client.take_sends():
        out.append((dests, codec.parse(codec.open_frame(raw))))
    return out


def reply(rings, cid, r, req, result, full, tentative=False, view=0):
    rep = Reply(view, req.timestamp, cid, r, tentative, req.read_only, result_digest(result),
                result if full else None)
    return seal(rep, rings[r], to=cid)


def answer(client, rings, req, right, liar=None, silent=(), order=None, now=0.0):
    """Every replica answers ``req`` as a correct one would (full result iff designated or
    asked for it), except ``liar`` (always a full wrong result) and those in ``silent``."""
    for r in order or range(N):
        if r in silent or client.req is None:
            continue
        if r == liar:
            raw = reply(rings, client.id, r, req, b"lie:" + right, True)
        else:
            raw = reply(rings, client.id, r, req, right, req.replier in (r, ALL_REPLICAS))
        client.receive(raw, now)


def run_request(cfg, rings, client, i, liar=None, silent=(), now=0.0):
    """One operation to completion; returns (designated replier, retransmissions it took)."""
    before = client.retransmissions
    client.invoke(b"op%d" % i, False, now)
    ((dests, req),) = sent_requests(cfg, client)
    assert dests == tuple(range(N))
    designated = req.replier
    right = b"result%d" % i
    answer(client, rings, req, right, liar, silent, now=now)
    t = now
    while client.busy:
        for _, again in sent_requests(cfg, client):
            assert again.timestamp == req.timestamp and again.replier == ALL_REPLICAS
            answer(client, rings, again, right, liar, silent, now=t)
        if client.busy:
            t = client.next_deadline()
            assert t is not None
            client.tick(t)
    (o,) = client.take_outcomes()
    assert o.result == right  # never the lie
    return designated, client.retransmissions - before


def test_lying_designated_replier_costs_one_retransmission_not_one_per_request():
    cfg, rings, client = setup()
    # find the liar the first request designates: make that replica lie from the start
    client.invoke(b"probe", False, 0.0)
    ((_, req),) = sent_requests(cfg, client)
    liar = req.replier
    answer(client, rings, req, b"probe-result", liar)
    # a certificate of digests formed, the designated replier's full result is not the certified
    # one: every replica is asked for the full result at once (no timer to wait for)
    ((dests, again),) = sent_requests(cfg, client)
    assert again.replier == ALL_REPLICAS and again.timestamp == req.timestamp
    assert client.retransmissions == 1
    answer(client, rings, again, b"probe-result", liar)
    (o,) = client.take_outcomes()
    assert o.result == b"probe-result"
    assert liar not in client.responsive
    # from now on the liar is never designated, and no request needs a retransmission
    designated = set()
    for i in range(40):
        d, retx = run_request(cfg, rings, client, i, liar=liar)
        designated.add(d)
        assert retx == 0
    assert liar not in designated
    assert len(designated) >= 2  # the replier still rotates among the others
    assert client.retransmissions == 1


def test_liar_whose_reply_arrives_after_the_certificate_still_costs_no_grace():
    cfg, rings, client = setup()
    client.invoke(b"op", False, 0.0)
    ((_, req),) = sent_requests(cfg, client)
    liar = req.replier
    others = [r for r in range(N) if r != liar]
    # two committed digest replies first (a weak certificate), then the liar's full lie
    answer(client, rings, req, b"right", liar, order=others + [liar])
    ((_, again),) = sent_requests(cfg, client)
    assert again.replier == ALL_REPLICAS
    assert client.retransmissions == 1


def test_full_result_from_any_replica_completes_at_once():
    cfg, rings, client = setup()
    client.invoke(b"op", False, 0.0)
    ((_, req),) = sent_requests(cfg, client)
    others = [r for r in range(N) if r != req.replier]
    # the designated replier is silent; a correct non-designated replica sends the full result
    # (it answered from its cache a retransmission, say): that settles it with the digests
    client.receive(reply(rings, client.id, others[0], req, b"right", True), 0.0)
    client.receive(reply(rings, client.id, others[1], req, b"right", False), 0.0)
    (o,) = client.take_outcomes()
    assert o.result == b"right"
    assert client.retransmissions == 0
    assert req.replier not in client.responsive


def test_silent_replier_is_not_designated_again():
    cfg, rings, client = setup()
    client.invoke(b"probe", False, 0.0)
    ((_, req),) = sent_requests(cfg, client)
    silent = req.replier
    answer(client, rings, req, b"p", silent=(silent,))
    # certified without the full result: a short grace, then everybody is asked
    assert client.busy and not client.take_sends()
    t = client.next_deadline()
    assert t < cfg.client_retry_timeout_ms
    client.tick(t)
    ((_, again),) = sent_requests(cfg, client)
    assert again.replier == ALL_REPLICAS
    answer(client, rings, again, b"p", silent=(silent,), now=t)
    assert client.take_outcomes()
    for i in range(20):
        d, retx = run_request(cfg, rings, client, i, silent=(silent,), now=t)
        assert d != silent and retx == 0


def test_a_replica_that_stops_lying_is_designated_again():
    cfg, rings, client = setup()
    client.invoke(b"probe", False, 0.0)
    ((_, req),) = sent_requests(cfg, client)
    liar = req.replier
    answer(client, rings, req, b"p", liar)
    for _, again in sent_requests(cfg, client):
        answer(client, rings, again, b"p", liar)
    assert client.take_outcomes() and liar not in client.responsive
    # it answers the next requests correctly (with digests: it is not designated): it matched
    # the certified result, so it is among the candidates again
    run_request(cfg, rings, client, 1)
    assert liar in client.responsive
    designated = {run_request(cfg, rings, client, i)[0] for i in range(2, 30)}
    assert liar in designated
