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
    assert H >= r.L  # the estimate H_M = L_M + L
    assert c.replicas[0].h >= H  # the null requests carried the sequence to a checkpoint past H
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
    """Corruption in memory behind the tree's back (no ``modify``): the replica goes on
    with a wrong object, persists it at its next checkpoint, disagrees with the others'
    checkpoints; its next recovery fetches the objects that differ."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"m", 8)
    r = c.replicas[3]
    kv = r.service
    b = next(i for i in range(kv.data.n_buckets) if kv.data.buckets[i])
    key = next(iter(kv.data.buckets[b]))
    kv.data.buckets[b][key] = (b"corrupt", 0)  # behind the library's back
    r.state.modify(r.rs.R + 1 + b)  # ... and then legitimately rewritten: now it is on disk too
    acked.update(workload(c, b"n", 8))
    assert c.of_kind("checkpoint-mismatch", 3) or \
        r.state_digest() != c.replicas[0].state_digest()
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


def test_a_replica_cannot_order_anything_but_its_recovery_request():
    from pbft.codec import seal
    from pbft.messages import Request
    c = Cluster(durable=True, **CFG)
    raw = seal(Request(2, 5, b"anything", False, 0), c.rings[2])
    c.replicas[0].receive(raw, c.now)
    assert c.replicas[0].drops.get("replica-request-not-recovery") == 1
