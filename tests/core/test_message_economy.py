"""What one request costs in messages in the normal case: the floor of a request's latency on a
live cluster is a chain of message hops, and each message a replica sends or receives costs it a
MAC, a decode and, on a live cluster, a write or a wake-up. These tests pin the normal case's
count, so that a change which adds a message to every request (a Vouch that no longer waits for
the pre-prepare, a Status answer resending what is in flight, a second reply) shows here."""

from collections import Counter

import msgpack

from pbft.messages import Tag
from pbft.services.kv import encode_op

from helpers.cluster import Cluster


def _spy(c: Cluster) -> list[tuple[int, int, int]]:
    seen: list[tuple[int, int, int]] = []

    def drop(src, dst, raw):
        seen.append((src, dst, msgpack.unpackb(raw)[0]))
        return False

    c.drop = drop
    return seen


def _one_request(c: Cluster, i: int) -> list[tuple[int, int, int]]:
    seen = _spy(c)
    assert c.put(0, b"k%d" % i, b"v") == ("ok", True)
    return seen


def test_a_request_ordered_at_once_costs_the_normal_case_messages_and_no_more():
    c = Cluster(clients=1)
    n = c.cfg.n
    client = c.clients[0].id
    _one_request(c, 0)  # (the client's first request: it may wait for vouches before it is trusted)
    c.advance(20)
    for i in range(1, 4):
        seen = _one_request(c, i)
        by = Counter((src == 0, src == client, tag) for src, _, tag in seen)
        primary = {tag: k for (p, _, tag), k in by.items() if p}
        backups = {tag: k for (p, cl, tag), k in by.items() if not p and not cl}
        from_client = {tag: k for (p, cl, tag), k in by.items() if cl}
        # the client sends its request to every replica, once
        assert from_client == {Tag.REQUEST: n}
        # the primary: its pre-prepare and its commit to each backup, one reply
        assert primary == {Tag.PRE_PREPARE: n - 1, Tag.COMMIT: n - 1, Tag.REPLY: 1}
        # each backup: its prepare and commit to each other replica, one reply; no Vouch (the
        # pre-prepare came before the vouch's wait ended), no Status, no relays
        assert backups == {Tag.PREPARE: (n - 1) * (n - 1), Tag.COMMIT: (n - 1) * (n - 1), Tag.REPLY: n - 1}
        # every reply went to the client
        assert all(dst == client for _, dst, tag in seen if tag == Tag.REPLY)


def test_a_read_only_request_costs_one_message_each_way_per_replica():
    c = Cluster(clients=1)
    n = c.cfg.n
    client = c.clients[0].id
    _one_request(c, 0)
    c.advance(20)
    seen = _spy(c)
    assert c.invoke(0, encode_op("get", b"k0"), read_only=True)[0] == ("ok", b"v")
    by = Counter((src == client, tag) for src, _, tag in seen)
    assert by == {(True, Tag.REQUEST): n, (False, Tag.REPLY): n}
