"""Membership changes (``pbft.core.membership``): the ``set-membership`` operation's validation,
its switch point, the configuration it records, and the fence that keeps the old membership
from ordering beyond the switch point."""

from __future__ import annotations

import nacl.signing
import pytest

from pbft.config import ClusterConfig
from pbft.core import membership, reconfig
from pbft.core.reconfig import ConfigRecord, decode_result, encode_request, genesis_record
from pbft.state.configuration import Configuration, Membership


def key(i: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([i]) * 32).verify_key)


N, SLOTS, ADMIN = 4, 7, 9  # replica slots 0..6, members 0..3; clients 7, 8, the administrator 9
GENESIS = genesis_record([key(i) for i in range(N)], {7: key(7), 8: key(8), ADMIN: key(ADMIN)}, [ADMIN])
CFG = ClusterConfig.create(N, clients_max=4, replica_slots=SLOTS, checkpoint_interval_seqnos=4, log_window_seqnos=8)


def run(op: bytes, n: int = 1, rec: ConfigRecord | None = None, client: int = ADMIN):
    new, result = reconfig.execute(rec or ConfigRecord.decode(GENESIS), client, op, n, CFG)
    return new, decode_result(result)


def grow(n: int = 7, f: int = 2, added=None, weights=None) -> bytes:
    added = [[i, key(i)] for i in range(N, n)] if added is None else added
    return encode_request("set-membership", n, f, weights or [1] * n, added)


def test_grow_records_the_membership_and_its_switch_point():
    rec, res = run(grow(), n=5)
    # executed at 5: checkpoint c = 8, switch point S = c - CI + L = 8 - 4 + 8 = 12
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 8, "members_at": 12}
    nxt = rec.latest.next_members
    assert nxt == Membership(7, 2, (1,) * 7, tuple(key(i) for i in range(7)), 12, 1)
    assert rec.latest.replica_keys == tuple(key(i) for i in range(N))  # the old members order up to S
    assert rec.latest.members_at(12) is None and rec.latest.members_at(13) == nxt
    assert ConfigRecord.decode(rec.encode()) == rec
    assert membership.members_switch_seqno(8, CFG) == 12
    # with the defaults 16/32 a change in the interval ending at c opens at c + 16
    assert membership.members_switch_seqno(128, ClusterConfig.create(4)) == 144


def test_genesis_encoding_is_unchanged_without_a_membership():
    cs = ConfigRecord.decode(GENESIS).active
    assert cs.members is None and cs.next_members is None and cs.encode()[0] == 0x96  # (six fields)


@pytest.mark.parametrize("op, reason", [
    (grow(8, 2), "beyond-replica-slots"),
    (grow(0, 0, added=[]), "beyond-replica-slots"),
    (grow(5, 2), "unsafe-quorum"),
    (grow(7, 2, weights=[9, 1, 1, 1, 1, 1, 1]), "unsafe-quorum"),
    (grow(4, 1, added=[]), "unchanged"),
    (grow(7, 2, added=[[4, key(4)], [6, key(6)], [5, key(5)]]), "not-contiguous"),
    (grow(7, 2, added=[[4, key(4)], [5, key(5)]]), "not-contiguous"),
    (grow(3, 0, added=[[3, key(3)]]), "not-contiguous"),
    (grow(5, 1, added=[[4, key(1)]]), "key-in-use"),
    (grow(5, 1, added=[[4, key(8)]]), "key-in-use"),
    (grow(6, 1, added=[[4, key(40)], [5, key(40)]]), "key-in-use"),
    (grow(5, 1, added=[[4, b"\x02" * 32]]), "bad-key"),
    (grow(5, 1, added=[[4, b"\x01" * 31]]), "bad-key"),
    (encode_request("set-membership", 5, 1, [1] * 5), "malformed"),
    (encode_request("set-membership", 5, 1, 5, []), "malformed"),
    (encode_request("set-membership", "5", 1, [1] * 5, []), "malformed"),
])
def test_refusals(op, reason):
    new, res = run(op, n=2)
    assert new is None and res["ok"] is False and res["reason"].startswith(reason), res


def test_weights_or_f_only_is_the_same_operation():
    rec, res = run(grow(4, 0, added=[], weights=[1, 1, 1, 1]), n=2)
    assert res["ok"] and rec.latest.next_members.f == 0 and rec.latest.next_members.n == 4
    rec, res = run(grow(4, 1, added=[], weights=[2, 2, 2, 2]), n=2)
    assert res["ok"] and rec.latest.next_members.weights == (2, 2, 2, 2)
    assert rec.latest.next_members.keys == rec.latest.replica_keys


def test_not_admin_and_read_only_refused():
    _, res = run(grow(), client=7)
    assert res["reason"].startswith("not-admin")
    new, result = reconfig.execute(ConfigRecord.decode(GENESIS), ADMIN, grow(), 1, CFG, read_only=True)
    assert new is None and decode_result(result)["reason"].startswith("read-only")


def test_one_change_at_a_time_and_replica_keys_frozen_until_the_switch():
    rec, _ = run(grow(), n=5)  # S = 12
    for k in (5, 9, 12):
        _, res = run(grow(5, 1), n=k, rec=rec)
        assert res["reason"].startswith("membership-change-pending"), (k, res)
        _, res = run(encode_request("rotate-key", 1, key(41)), n=k, rec=rec)
        assert res["reason"].startswith("membership-change-pending")
        _, res = run(encode_request("add-client", 10, key(5)), n=k, rec=rec)
        assert res["reason"].startswith("key-in-use")  # (a joiner's key)
    # a client change inside the window keeps the recorded membership change
    rec2, res = run(encode_request("add-client", 10, key(10)), n=9, rec=rec)
    assert res == {"ok": True, "epoch": 2, "switch_seqno": 12}
    assert rec2.latest.next_members == rec.latest.next_members
    # after S the change is in force: it is folded in, and the next change counts from it
    rec3, res = run(grow(4, 1, added=[]), n=13, rec=rec2)  # shrink back 7 -> 4
    assert res == {"ok": True, "epoch": 3, "switch_seqno": 16, "members_at": 20}
    cs = rec3.latest
    assert cs.members == Membership(7, 2, (1,) * 7, tuple(key(i) for i in range(7)), 12, 1)
    assert cs.replica_keys == cs.members.keys
    assert cs.next_members == Membership(4, 1, (1,) * 4, tuple(key(i) for i in range(4)), 20, 3)
    assert ConfigRecord.decode(rec3.encode()) == rec3
    # after 20 replica 6 is no member; rotating a member's key changes the members' keys too
    _, res = run(encode_request("rotate-key", 6, key(60)), n=21, rec=rec3)
    assert res["reason"].startswith("unknown-principal")
    rec4, res = run(encode_request("rotate-key", 3, key(60)), n=21, rec=rec3)
    assert res["ok"] and rec4.latest.replica_keys == rec4.latest.members.keys
    assert rec4.latest.members.n == 4 and rec4.latest.replica_keys[3] == key(60)
    assert ConfigRecord.decode(rec4.encode()) == rec4


def test_cluster_config_follows_the_membership():
    rec, _ = run(grow(), n=5)
    m = rec.latest.next_members
    c7 = membership.cluster_config(CFG, m)
    assert (c7.n, c7.f, c7.quorum_weight, c7.client_base) == (7, 2, 5, SLOTS)
    assert list(c7.client_ids) == list(CFG.client_ids)
    assert membership.cluster_config(CFG, None) is CFG


def test_decoding_refuses_inconsistent_memberships():
    cs = ConfigRecord.decode(GENESIS).active
    bad = Configuration(cs.epoch, cs.opens_at, cs.replica_keys, cs.clients, cs.admins,
                        Membership(4, 1, (1,) * 4, tuple(key(i + 20) for i in range(4)), 0))
    with pytest.raises(ValueError, match="members' keys"):
        Configuration.decode(bad.encode())
    wrong = Configuration(cs.epoch, cs.opens_at, cs.replica_keys, cs.clients, cs.admins, None,
                          Membership(5, 1, (1,) * 4, tuple(key(i) for i in range(5)), 12))
    with pytest.raises(ValueError, match="membership: bad weights"):
        Configuration.decode(wrong.encode())


# ---- in a hand-driven cluster ---------------------------------------------------------------------
MASTER = b"test-master-key-0123456789abcdef"
KV_ADMIN = 7  # (the cluster below: replica slots 0..6, clients 7 (administrator), 8, 9, 10)


def grow_cluster():
    from pbft.core.client import Client
    from pbft.core.replica import Replica
    from pbft.crypto import keyrings_for
    from pbft.services.kv import KVService
    from tests.helpers.cluster import Cluster

    gen = genesis_record([key(i) for i in range(N)], {c: key(c) for c in range(7, 11)}, [KV_ADMIN])
    c = Cluster(N, clients=4, genesis_config=gen, replica_slots=SLOTS, checkpoint_interval_seqnos=4,
                log_window_seqnos=8)
    # MAC keys for every replica slot (a joiner's too): authenticators have a MAC per slot
    c.rings = keyrings_for(MASTER, SLOTS, c.cfg.client_ids)
    c.replicas = [Replica(c.cfg, i, c.rings[i], KVService(), genesis_config=gen) for i in range(N)]
    c.clients = [Client(c.cfg, i, c.rings[i]) for i in c.cfg.client_ids]
    c.gen = gen
    return c


def admin(c, op: bytes) -> dict:
    cl = c.clients[0]
    cl.invoke(op, False, c.now)
    c.run()
    while cl.busy:
        c.advance(10.0)
    (out,) = cl.take_outcomes()
    return decode_result(out.result)


def switch_cluster(c, res: dict, new_n: int) -> None:
    """What a driver does for a membership change: start the joiners in the new epoch, and move
    the clients to the new members once the replicas switched."""
    from pbft.core.replica import Replica
    from pbft.services.kv import KVService

    s, new_cfg = res["members_at"], membership.cluster_config(c.cfg, c.replicas[0].rs.config.latest.next_members)
    view = membership.base_view(res["epoch"], new_n)
    for i in range(c.cfg.n, new_n):
        j = Replica(new_cfg, i, c.rings[i], KVService(), now=c.now, genesis_config=c.gen)
        membership.start_as_joiner(j, view, s)
        c.replicas.append(j)
    c.new_cfg, c.new_view = new_cfg, view


def test_grow_4_to_7_switches_at_the_switch_point_and_joiners_catch_up():
    c = grow_cluster()
    assert c.put(1, b"a", b"1") == ("ok", True)  # seqno 1
    res = admin(c, grow())  # seqno 2: c = 4, S = 8
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 4, "members_at": 8}
    switch_cluster(c, res, 7)
    # idle: the primary fills with null batches up to S, and nothing beyond S is ordered by the
    # old membership; checkpoint 8 becomes stable and the members switch
    c.advance(200)
    switched = [(r, ev) for r, ev in c.events if ev.kind == "membership"]
    assert sorted(r for r, _ in switched) == [0, 1, 2, 3], switched
    base = membership.base_view(1, 7)
    assert base >= 1 << 32 and base % 7 == 0
    assert {(ev.seqno, ev.members_from, ev.n, ev.view) for _, ev in switched} == {(8, 8, 7, base)}
    for r in c.replicas[:4]:
        assert r.cfg.n == 7 and r.cfg.f == 2 and r.view == base and r.view_active and r.low_water_mark == 8
        assert r.log.last_exec == 8 and r.primary() == 0
    old_exec = [ev.seqno for r, ev in c.events if ev.kind == "execute" and ev.seqno > 8]
    assert old_exec == []
    c.cfg = c.new_cfg  # (the harness drives 7 replicas from now on)
    for cl in c.clients:
        cl.set_membership(c.new_cfg, c.new_view)
    assert c.put(1, b"a", b"2") == ("ok", True)
    assert c.get(2, b"a") == ("ok", b"2")
    for i in range(12):
        assert c.put(1 + i % 3, b"k%d" % (i % 4), b"v%d" % i) == ("ok", True)
    c.advance(300)
    # the joiners fetched a certified checkpoint and take part: everybody agrees
    assert all(r.cfg.n == 7 for r in c.replicas)
    assert min(r.log.last_committed_exec for r in c.replicas) >= 16
    assert len({(r.log.last_exec, r.state_digest()) for r in c.replicas}) == 1, [
        (r.id, r.log.last_exec, r.low_water_mark) for r in c.replicas]
    assert [ev for r, ev in c.events if ev.kind == "state-transfer" and r >= 4]


def shrink_cluster():
    from tests.helpers.cluster import Cluster

    gen = genesis_record([key(i) for i in range(7)], {c: key(c) for c in range(7, 11)}, [KV_ADMIN])
    c = Cluster(7, clients=4, genesis_config=gen, checkpoint_interval_seqnos=4, log_window_seqnos=8)
    c.gen = gen
    return c


def test_shrink_7_to_4_retires_the_highest_ids():
    c = shrink_cluster()
    assert c.cfg.client_base == 7
    for i in range(3):
        assert c.put(1 + i % 2, b"b%d" % i, b"x") == ("ok", True)
    res = admin(c, encode_request("set-membership", 4, 1, [1] * 4, []))  # seqno 4
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 4, "members_at": 8}
    c.advance(200)  # (the primary fills up to 8 with null batches: the clients switch afterwards)
    switched = {r: ev for r, ev in c.events if ev.kind == "membership"}
    assert sorted(switched) == list(range(7))
    assert [switched[r].retired for r in range(7)] == [False] * 4 + [True] * 3
    assert all(ev.seqno == 8 and ev.n == 4 for ev in switched.values())
    new_cfg = c.replicas[0].cfg
    assert (new_cfg.n, new_cfg.f, new_cfg.client_base) == (4, 1, 7)
    for r in c.replicas[4:]:
        assert r.retired and r.others == (0, 1, 2, 3) and not r.view_active
    c.down |= {4, 5, 6}
    c.cfg = new_cfg
    for cl in c.clients:
        cl.set_membership(new_cfg, c.replicas[0].view)
    for i in range(10):
        assert c.put(1 + i % 3, b"k%d" % (i % 4), b"v%d" % i) == ("ok", True)
    assert c.get(3, b"k1") == ("ok", b"v9")
    c.advance(200)
    assert len({(r.log.last_exec, r.state_digest()) for r in c.replicas[:4]}) == 1
    assert min(r.low_water_mark for r in c.replicas[:4]) >= 16
    # a retired replica's frames are not a member's any more
    from pbft.codec import seal
    from pbft.messages import Prepare

    before = c.replicas[0].drops.get("not-a-member", 0)
    c.replicas[0].receive(seal(Prepare(c.replicas[0].view, 17, b"\x01" * 32, 5), c.rings[5]), c.now)
    assert c.replicas[0].drops.get("not-a-member", 0) == before + 1


def test_view_change_straddling_the_switch():
    # the primary crashes right after the change executed: the old membership changes view and
    # the new primary fills up to S; the new epoch starts in its base view, whose primary (0) is
    # down, and changes view again to make progress
    c = grow_cluster()
    c.drop = lambda src, dst, raw: src == 0 and c.replicas[0].log.last_exec >= 1  # (0 fails after k = 1)
    res = admin(c, grow())
    assert res["members_at"] == 8
    switch_cluster(c, res, 7)
    c.down.add(0)
    assert [r.log.last_exec for r in c.replicas[1:4]] == [1, 1, 1]  # (no null batch got out)
    assert c.put(1, b"a", b"1") == ("ok", True)  # (ordered by the old membership, view 1)
    c.advance(1500)
    assert all(r.members_from == 8 for r in c.replicas[1:4])
    assert [ev for r, ev in c.events if ev.kind == "new-view" and ev.view < c.new_view]
    c.cfg = c.new_cfg
    for cl in c.clients:
        cl.set_membership(c.new_cfg, c.new_view)
    assert c.put(2, b"a", b"2") == ("ok", True)
    assert c.get(3, b"a") == ("ok", b"2")
    live = [r for r in c.replicas if r.id != 0]
    assert min(r.view for r in live) > c.new_view  # (a view change in the new epoch)
    c.advance(300)
    assert len({(r.log.last_exec, r.state_digest()) for r in live}) == 1


@pytest.mark.parametrize("recover", [False, True])
def test_restart_after_the_switch_restores_the_membership(recover):
    from tests.helpers.cluster import Cluster

    gen = genesis_record([key(i) for i in range(7)], {c: key(c) for c in range(7, 11)}, [KV_ADMIN])
    c = Cluster(7, clients=4, genesis_config=gen, durable=True, checkpoint_interval_seqnos=4, log_window_seqnos=8)
    genesis_cfg = c.cfg
    assert c.put(1, b"a", b"1") == ("ok", True)
    res = admin(c, encode_request("set-membership", 4, 1, [1] * 4, []))
    assert res["members_at"] == 8
    c.advance(200)
    new_cfg, view = c.replicas[0].cfg, c.replicas[0].view
    assert new_cfg.n == 4 and all(r.members_from == 8 for r in c.replicas)
    c.down |= {4, 5, 6}
    # replica 2 restarts from its store with the genesis configuration (what cluster.toml says)
    c.cfg = genesis_cfg
    c.restart(2, recover=recover)
    r2 = c.replicas[2]
    assert (r2.cfg.n, r2.cfg.f, r2.members_from, r2.retired) == (4, 1, 8, False) and r2.view >= view
    c.cfg = new_cfg
    for cl in c.clients:
        cl.set_membership(new_cfg, view)
    for i in range(8):
        assert c.put(1 + i % 3, b"k%d" % (i % 3), b"v%d" % i) == ("ok", True)
    c.advance(500)
    live = c.replicas[:4]
    assert len({(r.log.last_exec, r.state_digest()) for r in live}) == 1
    if recover:
        assert [ev for r, ev in c.events if r == 2 and ev.kind == "recovered"]


def test_removed_replicas_checkpoint_votes_never_count_with_the_new_thresholds():
    """A replica that executed a shrink 7 -> 4 (f 2 -> 1) but has not switched counts checkpoints
    after the switch point with the new thresholds (weak 2, quorum 3): votes of the removed ids
    4..6 (two of them Byzantine is within the old f) must not make it fetch or adopt a checkpoint."""
    from pbft.codec import seal
    from pbft.messages import Checkpoint

    c = shrink_cluster()
    assert c.put(1, b"b", b"x") == ("ok", True)
    r = c.replicas[1]
    c.drop = lambda src, dst, raw: dst == 1 and membership.fence(r) is not None  # (it lags from the change on)
    res = admin(c, encode_request("set-membership", 4, 1, [1] * 4, []))
    s = res["members_at"]
    assert r.members_from == 0 and membership.fence(r) == s and r.low_water_mark < s
    bogus, far = b"\x66" * 32, s + 3 * c.cfg.checkpoint_interval_seqnos
    for j in (5, 6):  # a weak certificate of the new membership, were they members
        r.receive(seal(Checkpoint(far, bogus, j), c.rings[j]), c.now)
    assert r.fetch_target is None and r.low_water_mark < s
    r.receive(seal(Checkpoint(far, bogus, 4), c.rings[4]), c.now)  # (a quorum of 3, were they members)
    assert r.fetch_target is None and r.low_water_mark < s
    r.invariants()


def test_a_replica_that_missed_the_change_is_not_led_beyond_its_window_by_old_ids():
    """Grow 4 -> 7 (f 1 -> 2) while replica 3 is cut off before the change: after the switch two
    Byzantine replicas among 0..3 are within the new f, and their two votes are a weak certificate
    of the old membership, the only one replica 3 knows. With a driver that keeps the membership
    certificate chain (``ChainView.follows``), replica 3 asks it before it catches up beyond its
    window, and counts the votes beyond the switch point with the thresholds of the membership
    the chain certifies: two votes fetch nothing, f_new + 1 = 3 do."""
    from pbft.codec import seal
    from pbft.core.events import ChainWanted
    from pbft.messages import Checkpoint

    c = grow_cluster()
    c.down.add(3)
    res = admin(c, grow())
    switch_cluster(c, res, 7)
    c.advance(200)
    assert all(r.members_from == res["members_at"] for r in c.replicas[:3])
    r = c.replicas[3]
    r.chain.follows = True  # (the runtime's replicas keep the chain: runtime.chain_keeper)
    assert r.low_water_mark == 0 and membership.fence(r) is None  # (it knows nothing of the change)
    far = r.low_water_mark + c.cfg.log_window_seqnos + c.cfg.checkpoint_interval_seqnos
    assert far > res["members_at"]
    r.take_ready()
    for j in (1, 2):
        r.receive(seal(Checkpoint(far, b"\x66" * 32, j), c.rings[j]), c.now)
    assert r.fetch_target is None
    assert [ev for ev in r.take_ready().events if isinstance(ev, ChainWanted)] == [ChainWanted(far)]
    # the driver's answer: the membership of 7 its chain certifies (the one the others switched to)
    new = c.replicas[0].rs.config.latest.members_at(res["members_at"] + 1)
    assert new is not None and new.n == 7 and new.f == 2
    membership.learn_chain(r, new)
    assert r.fetch_target is None  # two votes are below the weak weight of f = 2
    r.receive(seal(Checkpoint(far, b"\x66" * 32, 0), c.rings[0]), c.now)
    assert r.fetch_target is not None and r.fetch_target[0] == far  # three are a weak certificate of the 7
    # the negative control: without a chain (a driver that keeps none) the old thresholds count,
    # and the same two votes make the replica fetch (the gap docs/reconfiguration.md names)
    c2 = grow_cluster()
    c2.down.add(3)
    switch_cluster(c2, admin(c2, grow()), 7)
    c2.advance(200)
    r2 = c2.replicas[3]
    for j in (1, 2):
        r2.receive(seal(Checkpoint(far, b"\x66" * 32, j), c2.rings[j]), c2.now)
    assert r2.fetch_target is not None


def test_a_joiner_takes_no_part_in_agreement_at_or_below_its_switch_point():
    """A joiner starts from nothing (low water mark 0) in the new epoch's base view: a Byzantine
    primary of that view (replica 0) must not get it to prepare (and, with the other joiners and
    f Byzantine members, commit and execute on the genesis state) sequence numbers up to S,
    which the old membership ordered."""
    from pbft.codec import NULL_BATCH_DIGEST, seal
    from pbft.messages import NULL_BATCH, PrePrepare

    c = grow_cluster()
    res = admin(c, grow())
    switch_cluster(c, res, 7)
    j = c.replicas[4]
    assert j.view == c.new_view and j.view_active and j.low_water_mark == 0 < res["members_at"]
    j.receive(seal(PrePrepare(c.new_view, 1, NULL_BATCH_DIGEST, 0, NULL_BATCH), c.rings[0]), c.now)
    ready = j.take_ready()
    assert 1 not in j.log.slots and not ready.sends
    assert j.drops.get("out-of-window", 0) == 1
    j.invariants()


def test_a_replica_fetching_past_the_change_prepares_nothing_beyond_the_switch_point():
    """Replica 3 missed a growth executed at 1 (S = 8) and learns that checkpoint 4 is stable:
    its low water mark is 4 while it fetches, but its state (the one recording the change) is
    not there yet. A Byzantine primary of the old view must not get it to prepare seqno 9: the
    sequence numbers after S are the new membership's (a change in checkpoint n's state opens
    at most at n - CI + L)."""
    from pbft.codec import NULL_BATCH_DIGEST, seal
    from pbft.messages import NULL_BATCH, Checkpoint, PrePrepare

    c = grow_cluster()
    c.drop = lambda src, dst, raw: dst == 3
    res = admin(c, grow())
    assert (res["switch_seqno"], res["members_at"]) == (4, 8)
    r = c.replicas[3]
    assert r.low_water_mark == 0 and r.view == 0 and r.view_active
    d4 = c.replicas[0].checkpoints.committed.get(4) or c.replicas[0].state_digest()
    for j in (0, 1, 2):
        r.receive(seal(Checkpoint(4, d4, j), c.rings[j]), c.now)
    assert r.low_water_mark == 4 and r.fetch_target is not None
    r.take_ready()
    r.receive(seal(PrePrepare(0, 9, NULL_BATCH_DIGEST, 0, NULL_BATCH), c.rings[0]), c.now)
    assert 9 not in r.log.slots and not r.take_ready().sends
    r.invariants()


def test_the_drivers_rejoin_only_a_newer_membership_in_force_that_they_are_members_of():
    """``membership.rejoin_wanted``, the rule both drivers (the runtime's, the simulator's) apply
    at a ``ChainWanted``: a replica that missed a growth 4 -> 7 rejoins the 7 its chain certifies
    for a checkpoint after the switch point, not for one at or before it (the old membership may
    still need it there); a replica whose state records the change as pending, one in the 7
    already, one the chain's membership has no place for, and an older chain head: none."""
    from dataclasses import replace

    c = grow_cluster()
    c.down.add(3)
    res = admin(c, grow())
    s = res["members_at"]
    pending = c.replicas[0]  # (executed the change: it switches at the switch point by itself)
    new = pending.rs.config.latest.next_members
    assert new is not None and new.opens_at == s and new.n == 7
    r = c.replicas[3]
    assert r.members_from == 0 and r.rs.config.latest.next_members is None
    assert membership.rejoin_wanted(r, new, s + 1) == new == membership.chain_newer(r, new)
    assert membership.rejoin_wanted(r, new, s) is None
    assert membership.rejoin_wanted(pending, new, s + 8) is None and membership.chain_newer(pending, new) is None
    genesis = replace(new, n=4, f=1, weights=(1,) * 4, keys=new.keys[:4], opens_at=0, epoch=0)
    assert membership.rejoin_wanted(r, genesis, s + 8) is None
    small = replace(new, n=3, weights=(1,) * 3, keys=new.keys[:3])  # (no place for replica 3)
    assert membership.rejoin_wanted(r, small, s + 8) is None
    switch_cluster(c, res, 7)
    c.advance(200)
    assert c.replicas[0].members_from == s
    assert membership.rejoin_wanted(c.replicas[0], new, s + 8) is None  # (switched: in the 7 already)


def test_a_replica_told_by_its_chain_rejoins_the_membership_in_force():
    """Replica 3 missed a growth 4 -> 7 entirely (down from before it until the others are beyond
    its window); its driver's chain certifies the 7 (``membership.rejoin``): it becomes the new
    membership's joiner (thresholds, peers, views; no part in the sequence numbers up to the
    switch point, which the old membership ordered), and catches up by a certified checkpoint."""
    from pbft.codec import NULL_BATCH_DIGEST, seal
    from pbft.messages import NULL_BATCH, PrePrepare

    c = grow_cluster()
    c.down.add(3)
    res = admin(c, grow())
    s = res["members_at"]
    switch_cluster(c, res, 7)
    c.advance(200)
    c.cfg = c.new_cfg
    for cl in c.clients:
        cl.set_membership(c.new_cfg, c.new_view)
    for i in range(12):
        assert c.put(1 + i % 3, b"k%d" % (i % 4), b"v%d" % i) == ("ok", True)
    r = c.replicas[3]
    assert (r.cfg.n, r.members_from, r.low_water_mark) == (4, 0, 0)
    assert c.replicas[0].low_water_mark > r.low_water_mark + c.cfg.log_window_seqnos
    new = c.replicas[0].rs.config.latest.members_at(s + 1)
    membership.rejoin(r, new)
    assert (r.cfg.n, r.cfg.f, r.members_from, r.view, r.view_active) == (7, 2, s, c.new_view, True)
    assert r.others == (0, 1, 2, 4, 5, 6) and r.primary() == 0 and not r.retired
    r.take_ready()
    r.receive(seal(PrePrepare(c.new_view, s, NULL_BATCH_DIGEST, 0, NULL_BATCH), c.rings[0]), c.now)
    assert s not in r.log.slots and not r.take_ready().sends  # (the old membership's seqno)
    r.invariants()
    c.down.discard(3)
    for i in range(4):
        assert c.put(1 + i % 3, b"k%d" % i, b"w%d" % i) == ("ok", True)
    c.advance(300)
    assert [ev for j, ev in c.events if j == 3 and ev.kind == "state-transfer"]
    assert len({(x.log.last_exec, x.state_digest()) for x in c.replicas}) == 1
