"""Transcript tests of the replica and client cores, messages moved by hand."""

import msgpack
import pytest

from pbft.codec import TAG, seal
from pbft.crypto import keyrings_for
from pbft.messages import Commit, NewView, Prepare, Request, Vouch
from pbft.services.kv import decode_result, encode_op

from helpers.cluster import Cluster
from pbft.core.events import ViewChangeStarted


def tag_of(raw: bytes) -> int:
    return msgpack.unpackb(raw)[0]


def test_normal_case_executes_everywhere_in_order():
    c = Cluster()
    assert c.put(0, b"a", b"1") == ("ok", True)
    assert c.put(1, b"a", b"2") == ("ok", True)
    assert c.get(0, b"a") == ("ok", b"2")
    c.advance(50)
    assert all(r.last_committed_exec == 3 for r in c.replicas)
    assert len({r.state_digest() for r in c.replicas}) == 1
    # every replica executed seqno 1..3 in order, each exactly once, committed
    for r in range(4):
        seqs = [ev.seqno for ev in c.of_kind("execute", r)]
        assert seqs == sorted(seqs) and set(seqs) == {1, 2, 3}


def test_digest_replies_only_designated_replier_sends_result():
    c = Cluster()
    replies = []
    client = c.clients[0].id

    def spy(src, dst, raw):
        # every frame the network delivers to client 0 (the cluster asks its ``drop`` hook about
        # each one; this one drops nothing)
        if dst == client:
            replies.append(c.codec.parse(c.codec.open_frame(raw)))
        return False

    c.drop = spy
    c.put(0, b"k", b"v")
    full = {r.replica for r in replies if r.result is not None}
    assert len(full) == 1, "exactly one replica (the designated replier) sends the full result"
    assert len({r.replica for r in replies}) >= 3


def test_exactly_once_retransmitted_request_gets_cached_reply():
    c = Cluster()
    cl = c.clients[0]
    cl.invoke(encode_op("put", b"x", b"1"), False, c.now)
    first = cl.out[0][1]
    c.run()
    c.advance(20)
    assert not cl.busy
    executed_before = len(c.of_kind("execute"))
    # a duplicate of the same frame arrives again at every replica (the network duplicated it):
    # not executed, and not answered either (the client had its answers)
    for r in c.replicas:
        r.receive(first, c.now)
    c.run()
    assert all(r.drops.get("request-late-copy", 0) >= 1 for r in c.replicas)
    # the client's own retransmission (asking every replica for the full result) is answered
    # from the reply cache, still without executing again
    from pbft.codec import seal
    from pbft.messages import ALL_REPLICAS, Request
    req = c.codec.parse(c.codec.open_frame(first))
    retx = seal(Request(req.client, req.timestamp, req.op, False, ALL_REPLICAS), c.rings[req.client])
    for r in c.replicas:
        r.receive(retx, c.now)
    c.run()
    c.advance(50)
    assert len(c.of_kind("execute")) == executed_before, "a request must not be executed twice"
    assert all(r.drops.get("request-retransmitted", 0) >= 1 for r in c.replicas)


def test_read_only_executes_without_ordering_and_refuses_mutation():
    c = Cluster()
    c.put(0, b"k", b"v")
    c.advance(50)
    seq = c.replicas[0].last_exec
    assert c.get(1, b"k", read_only=True) == ("ok", b"v")
    assert c.replicas[0].last_exec == seq, "read-only operations are not ordered"
    res, out = c.invoke(1, encode_op("put", b"k", b"w"), read_only=True)
    assert res[0] == "err"
    assert c.get(1, b"k") == ("ok", b"v")


def test_read_only_falls_back_to_ordering_when_replicas_disagree():
    c = Cluster()
    c.put(0, b"k", b"old")
    c.advance(50)
    # replica 3 stops hearing anything: it keeps the old value
    c.drop = lambda src, dst, raw: dst == 3 or src == 3
    c.put(0, b"k", b"new")
    c.drop = lambda src, dst, raw: dst == 3 and src < 4  # replica 3 hears only clients
    res, out = c.invoke(1, encode_op("get", b"k"), read_only=True)
    assert res == ("ok", b"new")


def test_garbage_and_forged_messages_are_dropped_and_counted():
    c = Cluster()
    r = c.replicas[1]
    for junk in [b"", b"\x00" * 10, msgpack.packb([1, 2, 3]), b"\xff" * 1000]:
        r.receive(junk, 0.0)
    assert sum(r.drops.values()) == 4
    # a prepare claiming to come from replica 2 but authenticated with replica 3's keys
    forged = seal(Prepare(0, 1, b"\x01" * 32, 2), c.rings[3])
    r.receive(forged, 0.0)
    assert r.drops.get("bad-mac") == 1
    # a client request whose MACs are not the client's
    bad = seal(Request(4, 1, b"op", False, 0), c.rings[5])
    c.replicas[0].receive(bad, 0.0)
    assert c.replicas[0].drops.get("bad-mac") == 1
    assert c.put(0, b"still", b"works") == ("ok", True)


def test_primary_crash_causes_view_change_and_progress():
    c = Cluster()
    c.put(0, b"a", b"1")
    c.down.add(0)
    assert c.put(1, b"a", b"2") == ("ok", True)
    assert all(r.view >= 1 for r in c.replicas[1:])
    assert c.of_kind("new-view")
    assert c.get(0, b"a") == ("ok", b"2")


def commit_in_view(raw: bytes, view: int) -> bool:
    t = msgpack.unpackb(raw)
    return t[0] == TAG[Commit] and msgpack.unpackb(t[2])[0] == view


def test_view_change_keeps_prepared_request():
    """A request prepared (not committed) before the primary dies is re-proposed in the new view."""
    c = Cluster(tentative_execution=False)
    c.put(0, b"a", b"1")
    # every Commit of view 0 is lost: the next request prepares everywhere, commits nowhere
    c.drop = lambda src, dst, raw: commit_in_view(raw, 0)
    cl = c.clients[1]
    cl.invoke(encode_op("put", b"a", b"2"), False, c.now)
    c.run()
    assert all(r.log.slots[2].prepared for r in c.replicas)
    assert not any(r.log.slots[2].committed for r in c.replicas)
    prepared_digest = c.replicas[1].log.slots[2].digest
    c.down.add(0)
    c.advance(3000)
    assert not cl.busy
    cl.take_outcomes()
    dec = c.of_kind("new-view")[0].decision
    assert dict(dec.chosen)[2] == prepared_digest, "the prepared batch survives into view 1"
    assert c.get(0, b"a") == ("ok", b"2")


def test_tentative_execution_is_rolled_back_on_view_change():
    c = Cluster(tentative_execution=True)
    c.put(0, b"a", b"1")
    # commits of view 0 are lost: replicas prepare and execute tentatively, nobody commits
    c.drop = lambda src, dst, raw: commit_in_view(raw, 0)
    res, out = c.invoke(1, encode_op("put", b"a", b"2"))
    assert res == ("ok", True), "2f+1 matching tentative replies complete the request"
    assert all(r.last_exec == 2 and r.last_committed_exec == 1 for r in c.replicas)
    c.down.add(0)
    # the next request cannot be ordered: backups time out and change view
    assert c.get(0, b"a") == ("ok", b"2")
    assert c.of_kind("rollback", 3), "tentative execution must be undone when the view changes"
    assert c.replicas[3].last_committed_exec >= 3
    assert c.get(1, b"a", read_only=True) == ("ok", b"2")


def test_checkpoints_become_stable_and_log_is_collected():
    c = Cluster(checkpoint_interval_seqnos=4, log_window_seqnos=8)
    for i in range(10):
        c.put(i % 2, b"k", str(i).encode())
    c.advance(100)
    for r in c.replicas:
        assert r.low_water_mark >= 8
        assert all(r.low_water_mark < n <= r.low_water_mark + r.log_window for n in r.log.slots)
        assert min(r.checkpoints.committed) == r.low_water_mark


def test_lagging_replica_catches_up_by_state_transfer():
    c = Cluster(checkpoint_interval_seqnos=4, log_window_seqnos=8)
    c.down.add(3)
    for i in range(20):
        c.put(i % 2, b"k", str(i).encode())
    c.down.discard(3)
    c.replicas[3].restart(c.now)
    c.advance(1000)
    assert c.of_kind("state-transfer", 3)
    assert c.replicas[3].last_committed_exec == c.replicas[0].last_committed_exec
    assert c.replicas[3].state_digest() == c.replicas[0].state_digest()


def test_lost_messages_are_repaired_by_status():
    c = Cluster()
    c.put(0, b"a", b"1")
    # replica 2 misses the whole second request's agreement
    c.drop = lambda src, dst, raw: dst == 2 and src < 4
    c.put(0, b"a", b"2")
    assert c.replicas[2].last_exec == 1
    c.drop = lambda src, dst, raw: False
    c.advance(500)
    assert c.replicas[2].last_committed_exec == 2


def test_nondeterministic_value_is_agreed_and_checked():
    c = Cluster()
    c.now = 123_456.0
    c.put(0, b"t", b"v")
    c.advance(20)
    mt = {msgpack.unpackb(r.service.execute(encode_op("mtime", b"t"), 4, b"", True))[1] for r in c.replicas}
    assert len(mt) == 1 and abs(mt.pop() - 123_456) < 1000
    # a backup whose clock is far off refuses the primary's proposal
    svc = c.replicas[1].service
    assert not svc.check_nondet((123_456).to_bytes(8, "big"), 10_000_000.0)


@pytest.mark.parametrize("n", [4, 7])
def test_client_needs_matching_replies_from_quorum(n):
    c = Cluster(n=n)
    assert c.put(0, b"q", b"1") == ("ok", True)
    assert c.get(1, b"q", read_only=True) == ("ok", b"1")


def test_read_after_tentative_write_survives_rollback():
    """Found by scenario S-08: a write acknowledged by 2f+1 tentative replies, rolled back by a view
    change, must still be visible to a read-only request issued while the view changes."""
    c = Cluster(tentative_execution=True)
    c.put(0, b"a", b"1")
    c.drop = lambda src, dst, raw: commit_in_view(raw, 0)
    assert c.invoke(1, encode_op("put", b"a", b"2"))[0] == ("ok", True)  # tentative quorum
    c.down.add(0)
    # view 0 never commits it, and the new view is held back
    c.drop = lambda src, dst, raw: commit_in_view(raw, 0) or tag_of(raw) == TAG[NewView]
    c.clients[0].invoke(encode_op("get", b"x"), False, c.now)  # its timeout starts the view change
    c.advance(3000)
    assert all(not r.view_active for r in c.replicas[1:]), "backups are changing view"
    assert c.of_kind("rollback"), "the tentative write was rolled back"
    reader = c.clients[1]
    reader.invoke(encode_op("get", b"a"), True, c.now)
    c.advance(200)
    stale = [o for o in reader.take_outcomes() if o.result == b"\x92\xa2ok\xa11"]
    assert not stale, "a read during the view change returned the rolled-back state"
    c.drop = lambda src, dst, raw: False
    c.advance(3000)
    assert not reader.busy
    (out,) = reader.take_outcomes()
    assert decode_result(out.result) == ("ok", b"2")
    assert c.get(1, b"a", read_only=True) == ("ok", b"2")


def test_cached_reply_of_a_tentative_execution_stays_tentative():
    """Found by the swarm (Twins amnesia): a retransmitted request whose execution is still
    tentative must not get a committed reply, or f+1 replies (one Byzantine) would convince
    the client of a result that a view change can undo."""
    c = Cluster()
    c.put(0, b"a", b"1")
    c.drop = lambda src, dst, raw: commit_in_view(raw, 0)
    cl = c.clients[1]
    cl.invoke(encode_op("put", b"a", b"2"), False, c.now)
    raw = cl.out[0][1]
    c.run()
    assert all(r.last_exec == 2 and r.last_committed_exec == 1 for r in c.replicas)
    from pbft.codec import seal
    from pbft.messages import ALL_REPLICAS, Request
    req = c.codec.parse(c.codec.open_frame(raw))
    raw = seal(Request(req.client, req.timestamp, req.op, False, ALL_REPLICAS), c.rings[req.client])
    for r in c.replicas:
        r.receive(raw, c.now)  # the client retransmits
    replies = [c.codec.parse(c.codec.open_frame(x)) for r in c.replicas for _, x in r.take_ready().sends]
    assert replies and all(rep.tentative for rep in replies)


def test_status_join_rule_moves_a_replica_that_slept_through_view_changes():
    """A replica with nothing pending (so no timer of its own) learns the current view once
    f+1 replicas report higher views in their Status messages, and not from one replica."""
    from pbft.codec import seal
    from pbft.messages import Status

    c = Cluster()
    r3 = c.replicas[3]
    assert r3.view == 0
    r3.receive(seal(Status(5, True, 0, 0, 1), c.rings[1]), c.now)
    assert r3.view == 0, "one replica's word must not move us"
    r3.receive(seal(Status(4, False, 0, 0, 2), c.rings[2]), c.now)
    # replicas 1 and 2 (weight f+1) are in views >= 4: join the lowest of them
    assert r3.view == 4 and not r3.view_active
    c.collect()
    assert ViewChangeStarted(4, "status-join") in c.of_kind("view-change", 3)


@pytest.mark.parametrize("supersede", [False, True])
def test_request_timer_watches_a_clients_newest_request(supersede):
    """The primary never hears from a client. With the client's request outstanding, the backups
    (which certified it) replace the primary. A client that supersedes its own request (no correct
    client does before it completes, unless it gave up waiting) makes the backups drop the older
    one: no primary could order it any more. Its newer request, never certified here (its vouches
    lost), is not timed, so nothing is blamed on the primary."""
    c = Cluster(clients=1)
    cid = c.cfg.client_ids[0]
    vouches = [True]
    c.drop = lambda src, dst, raw: dst == 0 and src >= c.cfg.n or (not vouches[0] and tag_of(raw) == TAG[Vouch])
    first = seal(Request(cid, 1, encode_op("put", b"a", b"1"), False, 0), c.rings[cid])
    for r in c.replicas[1:]:
        r.receive(first, c.now)
    c.run()
    assert all(cid in r.requests.pending for r in c.replicas[1:])
    if supersede:
        vouches[0] = False
        newer = seal(Request(cid, 2, encode_op("put", b"a", b"2"), False, 0), c.rings[cid])
        for r in c.replicas[1:]:
            r.receive(newer, c.now)
        c.run()
        assert not any(cid in r.requests.pending for r in c.replicas[1:])
    c.advance(3 * c.cfg.view_change_timeout_ms)
    timed_out = [r for r, ev in c.events if ev.kind == "view-change" and ev.reason == "request-timer"]
    if supersede:
        assert timed_out == [] and all(r.view == 0 for r in c.replicas)
    else:
        assert set(timed_out) >= {1, 2, 3} and all(r.view >= 1 for r in c.replicas)


def test_free_replica_slots_leave_the_protocol_unchanged_and_their_ids_out():
    # ids 4 and 5 are replica slots of no member: clients are 6 and 7
    c = Cluster(replica_slots=6)
    assert [cl.id for cl in c.clients] == [6, 7]
    assert c.put(0, b"a", b"1") == ("ok", True)
    assert c.get(1, b"a") == ("ok", b"1")
    outsider = keyrings_for(b"test-master-key-0123456789abcdef", 6, [])[4]
    for r in c.replicas:
        before = r.drops.get("not-a-member", 0)
        r.receive(seal(Prepare(0, 9, b"\x01" * 32, 4), outsider), c.now)
        r.receive(seal(Request(4, 1, encode_op("put", b"a", b"x"), False, 0), outsider), c.now)
        assert r.drops.get("not-a-member", 0) == before + 2
    assert c.get(0, b"a") == ("ok", b"1")
