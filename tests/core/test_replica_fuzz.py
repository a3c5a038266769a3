"""A Byzantine replica sends well-formed but arbitrary messages: nothing escapes a correct replica.

Messages are authenticated with the faulty replica's real keys, so they pass the MAC check and
reach the protocol handlers; every field takes values anywhere in its legal range. Afterwards the
cluster must still order requests (f = 1, and only replica 3 misbehaves).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbft.codec import U63, seal
from pbft.messages import (
    Batch, Checkpoint, Commit, Data, Fetch, MetaData, NewView, PrePrepare, Prepare, Request, Status, ViewChange,
    ViewChangeAck,
)

from helpers.cluster import Cluster

BYZ = 3
small = st.integers(0, 40)
seqno = st.one_of(st.integers(1, 40), st.integers(1, U63))
view = st.one_of(st.integers(0, 4), st.integers(0, U63))
digest = st.one_of(st.just(b"\x00" * 32), st.binary(min_size=32, max_size=32))
rid = st.integers(0, 3)


def requests(c):
    return st.builds(lambda cl, t, op: seal(Request(cl, t, op, False, 0), c.rings[cl]),
                     st.sampled_from(list(c.cfg.client_ids)), st.integers(1, 50), st.binary(max_size=20))


def messages(c):
    batch = st.builds(lambda nd, rs: Batch(nd, tuple(rs)), st.binary(max_size=8), st.lists(requests(c), max_size=3))
    ndv = st.tuples(st.integers(1, 40), digest, st.integers(0, 3))
    return st.one_of(
        st.builds(PrePrepare, view, seqno, digest, st.just(BYZ), st.one_of(st.none(), batch)),
        st.builds(Prepare, view, seqno, digest, st.just(BYZ)),
        st.builds(Commit, view, seqno, digest, st.just(BYZ)),
        st.builds(Checkpoint, st.one_of(small.map(lambda x: x * 16), st.integers(0, U63)), digest, st.just(BYZ)),
        st.builds(Status, view, st.booleans(), st.integers(0, 100), st.integers(0, 100), st.just(BYZ)),
        st.builds(lambda v, s, cs, ps, qs: ViewChange(v, BYZ, s, tuple(cs), tuple(ps), tuple(qs)),
                  st.integers(1, 6), st.sampled_from([0, 16]),
                  st.lists(st.tuples(st.sampled_from([0, 16, 32]), digest), max_size=3),
                  st.lists(ndv, max_size=4, unique_by=lambda x: x[0]), st.lists(ndv, max_size=4)),
        st.builds(ViewChangeAck, st.integers(1, 6), st.just(BYZ), rid, digest),
        st.builds(lambda v, vcs, s, d, ch, bs: NewView(v, BYZ, tuple(vcs), s, d, tuple(ch), tuple(bs)),
                  st.sampled_from([3, 7]), st.lists(st.tuples(rid, digest), max_size=4), st.sampled_from([0, 16]),
                  digest, st.lists(st.tuples(st.integers(1, 40), digest), max_size=3), st.lists(batch, max_size=2)),
        st.builds(Fetch, st.integers(0, 64), digest, st.integers(0, 3), st.integers(0, 300),
                  st.lists(st.integers(0, 2000), max_size=4).map(tuple), st.just(BYZ)),
        st.builds(MetaData, st.integers(0, 64), st.integers(0, 3), st.integers(0, 300),
                  st.lists(digest, max_size=5).map(tuple), st.just(BYZ)),
        st.builds(Data, st.integers(0, 64), st.integers(0, 3), st.integers(0, 300),
                  st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=64)), max_size=3).map(tuple),
                  st.just(BYZ)),
    )




@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_arbitrary_messages_from_a_byzantine_replica(data):
    c = Cluster()
    c.put(0, b"k", b"before")
    msgs = data.draw(st.lists(messages(c), min_size=1, max_size=12))
    for m in msgs:
        to = data.draw(rid.filter(lambda r: r != BYZ))
        raw = seal(m, c.rings[BYZ], to=to if type(m) in (Fetch, MetaData, Data) else None)
        c.replicas[to].receive(raw, c.now)  # must not raise
        c.run()
    c.down.add(BYZ)  # and the correct replicas still make progress without it
    assert c.put(1, b"k", b"after") == ("ok", True)
    assert c.get(0, b"k") == ("ok", b"after")
