"""Proactive recovery in the deterministic harness: estimation, the recovery request,
null requests on an idle system, and repair of state corrupted on disk or in memory."""

from __future__ import annotations

import msgpack

from helpers.cluster import Cluster

CFG = dict(checkpoint_interval_seqnos=4, log_window_seqnos=8, batch_requests_max=4)


def workload(c: Cluster, prefix: bytes, count: int) -> dict[bytes, bytes]:
    return c.write_keys(prefix, count, keys=9)


def recovered(c: Cluster, i: int) -> bool:
    return bool(c.of_kind("recovered", i))


def wait_recovered(c: Cluster, i: int, ms: float = 10_000) -> None:
    waited = 0.0
    while not recovered(c, i) and waited < ms:
        c.advance(50)
        waited += 50
    assert recovered(c, i), f"replica {i} did not recover: {c.replicas[i].recovering}"


def same_state(c: Cluster) -> None:
    c.advance(500)
    assert len({r.last_committed_exec for r in c.replicas}) == 1
    assert len({r.state_digest() for r in c.replicas}) == 1


def test_recovery_on_an_idle_system_ends_thanks_to_null_requests():
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 6)
    before = c.replicas[0].last_exec
    c.restart(2, recover=True)
    r = c.replicas[2]
    assert r.recovering is not None and r.needs_state
    wait_recovered(c, 2)
    (start,) = c.of_kind("recovery-point", 2)
    n_R, H = start.request_seqno, start.recovery_point
    assert n_R > before and H >= n_R
    assert H >= r.log_window  # the estimate H_M = L_M + L
    assert c.replicas[0].low_water_mark >= H  # the null requests carried the sequence to a checkpoint past H
    assert c.of_kind("recovery-request")  # every replica executed it
    assert r.recovering is None and not r.needs_state and r.recoveries == 1
    assert all(not x.recovery_points for x in c.replicas)
    same_state(c)
    assert workload(c, b"b", 4)  # and it takes part again


def test_recovery_repairs_a_forged_object_on_disk():
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"d", 12)
    store = c.stores[1]
    R = c.replicas[1].rs.R
    victim = next(k for k, v in sorted(store.synced.items())
                  if k[:1] == b"o" and int.from_bytes(k[1:], "big") > R and len(v) > 8)
    pairs = msgpack.unpackb(store.synced[victim][8:])
    pairs[0][1][0] = b"forged"
    store.forge(victim, msgpack.packb(pairs, use_bin_type=True))
    store.forge(b"s", store.get(b"s"))  # even with a marker that still looks valid
    c.restart(1, recover=True)
    wait_recovered(c, 1)
    r = c.replicas[1]
    assert 1 <= r.transfer_stats["objects"] < r.state.n // 4  # the forged bucket, not the whole state
    same_state(c)
    key = pairs[0][0]
    assert c.replicas[1].service.data.get(key)[0] == acked[key]


def test_recovery_repairs_state_corrupted_in_memory():
    """Corruption in memory behind the tree's back (no ``modify``), then written through: the
    replica's next checkpoint disagrees with the certified one, and it repairs itself at once
    (``test_state_repair``), before any recovery; the recovery afterwards finds it sound."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"m", 8)
    r = c.replicas[3]
    kv = r.service
    b = next(i for i in range(kv.data.n_buckets) if kv.data.buckets[i])
    key = next(iter(kv.data.buckets[b]))
    kv.data.buckets[b][key] = (b"corrupt", 0)  # behind the library's back
    r.state.modify(r.rs.R + 1 + b)  # ... and then legitimately rewritten: now it is on disk too
    acked.update(workload(c, b"n", 8))
    assert c.of_kind("checkpoint-mismatch", 3) and c.of_kind("state-repair", 3)
    assert r.service.data.get(key)[0] == acked[key]
    c.restart(3, recover=True)
    wait_recovered(c, 3)
    same_state(c)
    assert c.replicas[3].service.data.get(key)[0] == acked[key]


def test_recovery_of_the_primary_under_load():
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"p", 6)
    c.restart(0, recover=True)  # the primary of view 0
    acked.update(workload(c, b"q", 10))  # the others change view and go on
    wait_recovered(c, 0)
    assert max(r.view for r in c.replicas) >= 1
    acked.update(workload(c, b"r", 4))
    same_state(c)
    for k, v in acked.items():
        assert c.get(0, k) == ("ok", v)


# ---- a recovering primary hands its view over at once -------------------------------------------

def _view_changes_since(c: Cluster, mark: int) -> list[tuple[int, int, str]]:
    return [(r, ev.view, ev.reason) for r, ev in c.events[mark:] if ev.kind == "view-change"]


def test_a_recovering_primary_hands_its_view_over_without_any_timer():
    """The primary of view 0 reboots and begins its recovery: it sends ViewChange(1) at once (with
    what its log prepared and pre-prepared), the backups join it on that message alone, and view 1
    is installed while no time passes at all (no request or view-change timer could have fired).
    The recovery then ends in view 1, and the cluster goes on."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"p", 6)
    old = c.replicas[0]
    prepared = {n for n in old.log.prepared if n > old.low_water_mark}
    assert old.is_primary and prepared  # (the test needs a log to carry over)
    mark, t0 = len(c.events), c.now
    c.restart(0, recover=True)
    c.run()  # messages only: time does not move
    assert c.now == t0
    assert all(r.view == 1 and r.view_active for r in c.replicas), [(r.view, r.view_active) for r in c.replicas]
    assert _view_changes_since(c, mark) == [(0, 1, "primary-recovering"), (1, 1, "primary-left"),
                                            (2, 1, "primary-left"), (3, 1, "primary-left")]
    vc0 = c.replicas[1].vc.view_changes[(1, 0)].msg  # the recovering primary's ViewChange
    assert {n for n, _, _ in vc0.prepared} == prepared
    wait_recovered(c, 0)  # (here it ends within the same exchange of messages, time still)
    assert all(r.view == 1 for r in c.replicas)  # no further view change was needed
    acked.update(workload(c, b"q", 6))
    same_state(c)
    for k, v in acked.items():
        assert c.get(1, k) == ("ok", v)


def test_a_primary_hands_its_view_over_before_its_reboot_and_finds_the_new_view_after_it():
    """The runtime's order (``ViewChanges.hand_over``): the primary leaves view 0 when its watchdog
    fires, and the backups install view 1 while it reboots. Restored in view 1, not active and
    without its ViewChange, and off the network for longer than a base timeout (a slow start),
    it does not move on alone to view 2: it finds view 1 through the others' Status, and
    recovers there."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"p", 6)
    mark = len(c.events)
    assert not c.replicas[1].vc.hand_over(c.now)  # (a backup has no view to hand over)
    assert c.replicas[0].vc.hand_over(c.now)
    c.drop = lambda src, dst, m: dst == 0  # its ViewChange goes out; then it stops, and reboots
    c.run()  # no time passes
    assert all(r.view == 1 and r.view_active for r in c.replicas[1:])
    c.restart(0, recover=True)
    r0 = c.replicas[0]
    assert r0.view == 1 and not r0.view_active and r0.recovering is not None
    c.drop = lambda src, dst, m: 0 in (src, dst)  # (a slow start: off the network for a while)
    c.advance(1.5 * c.cfg.view_change_timeout_ms)
    assert r0.view == 1 and not r0.view_active
    c.drop = lambda src, dst, m: False
    wait_recovered(c, 0)
    c.advance(2 * c.cfg.status_interval_ms)
    assert all(r.view == 1 and r.view_active for r in c.replicas)
    assert _view_changes_since(c, mark) == [(0, 1, "primary-recovering"), (1, 1, "primary-left"),
                                            (2, 1, "primary-left"), (3, 1, "primary-left")]
    acked.update(workload(c, b"q", 6))
    same_state(c)
    for k, v in acked.items():
        assert c.get(1, k) == ("ok", v)


def _forged_view_change(c: Cluster, view: int, sender: int) -> bytes:
    from pbft.codec import seal
    from pbft.messages import ViewChange
    r0 = c.replicas[0]
    return seal(ViewChange(view, sender, 0, ((0, r0.checkpoints.committed[0]),), (), ()), c.rings[sender])


def test_a_backups_view_change_alone_does_not_make_the_others_join():
    """A backup's ViewChange(v+1) is one replica's word: the others stay in view 0 (only the
    primary's own abandons its view); a second backup's makes f+1, and the join rule moves them."""
    c = Cluster(clients=1)
    c.put(0, b"a", b"1")
    raw = _forged_view_change(c, 1, 3)
    for i in (0, 1, 2):
        c.replicas[i].receive(raw, c.now)
    c.run()
    assert all(r.view == 0 and r.view_active for r in c.replicas[:3])
    assert c.put(0, b"a", b"2") == ("ok", True)
    raw = _forged_view_change(c, 1, 2)
    for i in (0, 1):
        c.replicas[i].receive(raw, c.now)
    assert all(r.view == 1 for r in c.replicas[:2])
    c.run()
    assert [ev.reason for i in (0, 1) for ev in c.of_kind("view-change", i)] == ["join", "join"]


def test_the_primarys_view_change_for_a_later_view_does_not_make_the_others_join():
    """Only ViewChange(v+1) from the primary of an active view v is followed at once: the
    primary's ViewChange(v+2) is not, nor the ViewChange(v+1) of view v's primary at a replica
    whose view v is not active."""
    c = Cluster(clients=1)
    c.put(0, b"a", b"1")
    raw = _forged_view_change(c, 2, 0)  # the primary of view 0, for view 2
    for i in (1, 2, 3):
        c.replicas[i].receive(raw, c.now)
    c.run()
    assert all(r.view == 0 and r.view_active for r in c.replicas)
    assert c.put(0, b"a", b"2") == ("ok", True)
    assert not c.of_kind("view-change")
    # replica 3 changing to view 1 (not active: f+1 view changes), then view 1's primary leaves
    # for view 2
    c = Cluster(clients=1)
    r3 = c.replicas[3]
    for j in (1, 2):
        r3.receive(_forged_view_change(c, 1, j), c.now)
    assert r3.view == 1 and not r3.view_active
    r3.receive(_forged_view_change(c, 2, 1), c.now)
    assert r3.view == 1
    c.collect()
    assert [ev.reason for ev in c.of_kind("view-change", 3)] == ["join"]


def test_a_replica_cannot_order_anything_but_its_recovery_request():
    from pbft.codec import seal
    from pbft.messages import Request
    c = Cluster(durable=True, **CFG)
    raw = seal(Request(2, 5, b"anything", False, 0), c.rings[2])
    c.replicas[0].receive(raw, c.now)
    assert c.replicas[0].drops.get("replica-request-not-recovery") == 1


# ---- what an intruder leaves behind: timestamps, votes, reads ------------------------------------

def _order_recovery_request(c: Cluster, j: int, timestamp: int) -> None:
    """Replica j, compromised, has a recovery request with ``timestamp`` ordered (its own keys, its
    own vouch): what an intruder in it could do before the reboot."""
    from pbft.codec import seal, vouch_key
    from pbft.messages import ALL_REPLICAS, RECOVERY_OP, Request, Vouch
    point = c.replicas[0].low_water_mark + c.cfg.log_window_seqnos
    req = Request(j, timestamp, RECOVERY_OP + msgpack.packb(point), False, ALL_REPLICAS)
    for raw in (seal(req, c.rings[j]), seal(Vouch(j, (vouch_key(req),)), c.rings[j])):
        for k in range(c.cfg.n):
            if k != j:
                c.net.append((j, k, raw))
    c.run()
    c.advance(100)


def test_a_recovery_request_ordered_far_ahead_cannot_block_the_next_recovery():
    """An intruder in replica 2 has a recovery request ordered with a timestamp ten minutes ahead
    (within the bound of client timestamps): every later genuine one would look old and the
    recovery would hang for good. A replica's timestamps are bounded by the replicas' clock skew."""
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 4)
    _order_recovery_request(c, 2, int((c.now + c.cfg.timestamp_skew_ms_max) * 1000) - 1000)
    assert all(c.replicas[k].drops.get("request-future-timestamp") == 1 for k in (0, 1, 3))
    assert not c.of_kind("recovery-request")
    c.restart(2, recover=True)
    wait_recovered(c, 2)
    assert c.of_kind("recovery-request") and not any(r.drops.get("request-old-timestamp") for r in c.replicas)
    same_state(c)


def test_a_recovery_request_ordered_just_inside_the_clock_bound_delays_the_next_recovery_only_briefly():
    """The largest timestamp the replicas take from a replica, ordered by an intruder just before the
    reboot: the genuine request (the recovering replica's clock) looks old at first; the others
    answer with the newer one's cached reply, the replica timestamps its request again from its
    clock, and gets through once its clock has passed the intruder's timestamp."""
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 4)
    _order_recovery_request(c, 2, int((c.now + c.cfg.nondet_skew_ms_max) * 1000) - 1000)
    assert len(c.of_kind("recovery-request")) == c.cfg.n  # ordered and executed
    c.restart(2, recover=True)
    started = c.now
    wait_recovered(c, 2)
    assert any(r.drops.get("request-old-timestamp") for r in c.replicas)  # the first one looked old
    assert c.now - started <= 2 * c.cfg.nondet_skew_ms_max + 2_000
    same_state(c)


def test_a_recovery_request_from_the_future_does_not_lift_the_admission_interval():
    """A recovery request beyond the clock bound is dropped before it counts as admitted: admitted,
    2^63-1 would make every later request of that replica look older than the admitted one, which
    the admission interval does not limit."""
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 2)
    admitted = c.replicas[0].recovery.admitted
    _order_recovery_request(c, 2, (1 << 63) - 1)
    assert 2 not in admitted
    _order_recovery_request(c, 2, int(c.now * 1000))
    assert admitted[2][0] == int((c.now - 100) * 1000)


def test_the_recovery_point_is_the_high_water_mark_when_the_request_executed():
    """H = max(H_M, floor(n_R/K)*K + L): the replica (or an intruder with its keys) may have sent
    messages for sequence numbers up to the high water mark at n_R before its request, and it is
    recovered only once a stable checkpoint has taken the log past them. Its request is held up
    here while the others order more, so that n_R is well past the estimate's checkpoint."""
    from pbft.messages import Tag
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 6)
    hold = [True]
    c.drop = lambda src, dst, raw: hold[0] and src == 2 and dst < c.cfg.n and \
        c.codec.open_frame(raw).tag == Tag.REQUEST
    c.restart(2, recover=True)
    c.run()
    workload(c, b"b", 10)
    hold[0] = False
    wait_recovered(c, 2)
    (est,) = c.of_kind("recovery-estimate", 2)
    (point,) = c.of_kind("recovery-point", 2)
    K, L = c.cfg.checkpoint_interval_seqnos, c.cfg.log_window_seqnos
    n_R, H = point.request_seqno, point.recovery_point
    assert H == max(est.estimate, n_R // K * K + L) > max(est.estimate, n_R)
    assert all(ev.recovery_point == H for ev in c.of_kind("recovery-request"))
    stable = [ev.seqno for ev in c.of_kind("stable", 2)]
    assert max(stable) >= H and c.replicas[2].low_water_mark >= H


def test_votes_a_replica_sent_before_its_recovery_are_stale_after_its_recovery_request():
    """An intruder in replica 2 votes for a far-future checkpoint with a made-up digest. After
    replica 2's recovery it counts as correct again: if its old vote were still live, one more
    faulty replica's vote would make f+1, enough to send correct replicas fetching that checkpoint
    (a correct replica is past our window, they would conclude). The recovery request marks it stale."""
    from pbft.codec import seal
    from pbft.messages import Checkpoint
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 6)
    far = c.replicas[0].low_water_mark + 5 * c.cfg.log_window_seqnos
    bogus = b"\x42" * 32
    raw = seal(Checkpoint(far, bogus, 2), c.rings[2])
    for k in (0, 1, 3):
        c.net.append((2, k, raw))
    c.run()
    assert all(2 in c.replicas[k].checkpoint_votes.voters(far, bogus) for k in (0, 1, 3))
    c.restart(2, recover=True)
    wait_recovered(c, 2)
    assert all(2 not in c.replicas[k].checkpoint_votes.voters(far, bogus) for k in (0, 1, 3))
    assert all(c.replicas[k].counts.get("stale-messages", 0) >= 1 for k in (0, 1, 3))
    assert len(c.of_kind("stale-marked")) == 3
    raw = seal(Checkpoint(far, bogus, 3), c.rings[3])  # replica 3 is the faulty one now
    for k in (0, 1, 2):
        c.net.append((3, k, raw))
    c.run()
    assert not [ev for ev in c.of_kind("fetch") if ev.seqno == far]
    assert workload(c, b"b", 4)


def test_a_restarted_replica_refuses_reads_until_its_state_is_checked():
    """A replica restarted for recovery with an object forged on its disk must not answer a
    read-only request from that state: it refuses reads (``read-only-state-unverified``) until a
    state transfer has checked its objects; the client gets the genuine value from the others."""
    from pbft.messages import Reply
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"d", 12)
    store = c.stores[1]
    R = c.replicas[1].rs.R
    victim = next(k for k, v in sorted(store.synced.items())
                  if k[:1] == b"o" and int.from_bytes(k[1:], "big") > R and len(v) > 8)
    pairs = msgpack.unpackb(store.synced[victim][8:])
    key = pairs[0][0]
    pairs[0][1][0] = b"forged"
    store.forge(victim, msgpack.packb(pairs, use_bin_type=True))
    store.forge(b"s", store.get(b"s"))  # even with a marker that still looks valid
    answered_unverified = []

    def watch(src, dst, raw):
        if src == 1 and dst >= c.cfg.n:
            m = c.codec.parse(c.codec.open_frame(raw))
            if isinstance(m, Reply) and m.read_only and c.replicas[1].needs_state:
                answered_unverified.append(m)
        return False
    c.drop = watch
    c.restart(1, recover=True)
    assert c.replicas[1].needs_state and c.replicas[1].service.data.get(key)[0] == b"forged"
    assert c.get(0, key, read_only=True) == ("ok", acked[key])
    assert answered_unverified == []
    assert c.replicas[1].drops.get("read-only-state-unverified", 0) >= 1
    wait_recovered(c, 1)
    assert c.replicas[1].service.data.get(key)[0] == acked[key]
    same_state(c)
