"""A replica connection whose frames the core keeps dropping is held (runtime.node._count_waste)."""

from types import SimpleNamespace

from pbft.runtime.node import REPLICA_HOLD_S_MAX, REPLICA_HOLD_S_MIN, REPLICA_WASTE_FRAMES_PER_S_MAX, ReplicaNode
from pbft.runtime.transport import Counters


def _node_and_conn():
    holds = []
    node = SimpleNamespace(counters=Counters(), metrics=SimpleNamespace(replica_flood_holds=0))
    conn = SimpleNamespace(meta={"replica": 3}, hold=holds.append)
    return node, conn, holds


def test_a_correct_replicas_occasional_drops_never_hold_it():
    node, conn, holds = _node_and_conn()
    t = 0.0
    for _ in range(20 * REPLICA_WASTE_FRAMES_PER_S_MAX // 2):  # half the limit, for 20 s
        ReplicaNode._count_waste(node, conn, t)
        t += 2.0 / REPLICA_WASTE_FRAMES_PER_S_MAX
    assert holds == [] and node.counters.drops == {}


def test_a_flood_is_held_longer_each_time_and_forgiven_after_it_stops():
    node, conn, holds = _node_and_conn()
    t = 0.0
    for _ in range(4):
        for _ in range(REPLICA_WASTE_FRAMES_PER_S_MAX + 1):  # the limit passed within a millisecond
            ReplicaNode._count_waste(node, conn, t)
            t += 1e-7
        t += holds[-1]  # nothing is read while it is held
    assert holds == [REPLICA_HOLD_S_MIN, 2 * REPLICA_HOLD_S_MIN, 4 * REPLICA_HOLD_S_MIN, 8 * REPLICA_HOLD_S_MIN]
    assert node.counters.drops["replica-flood-held"] == 4 and node.metrics.replica_flood_holds == 4
    # held at most REPLICA_HOLD_S_MAX at a time
    for _ in range(10):
        for _ in range(REPLICA_WASTE_FRAMES_PER_S_MAX + 1):
            ReplicaNode._count_waste(node, conn, t)
        t += holds[-1]
    assert max(holds) == REPLICA_HOLD_S_MAX
    # a second of good behaviour: the next hold is short again
    t += 1.0
    ReplicaNode._count_waste(node, conn, t)
    t += 1.0
    for _ in range(REPLICA_WASTE_FRAMES_PER_S_MAX + 1):
        ReplicaNode._count_waste(node, conn, t)
    assert holds[-1] == REPLICA_HOLD_S_MIN


def test_waste_is_weighed_by_size():
    """Large dropped frames count one unit per KiB more: a few hundred 128 KiB frames a second
    (a Vouch flood of maximum-size messages) are held; as many small ones are not."""
    node, conn, holds = _node_and_conn()
    t = 0.0
    for _ in range(300):  # 300 small frames in a second
        ReplicaNode._count_waste(node, conn, t, 1)
        t += 1.0 / 300
    assert holds == []
    for _ in range(300):  # 300 frames of 128 KiB in a second
        ReplicaNode._count_waste(node, conn, t, 1 + 128)
        if holds:
            break
        t += 1.0 / 300
    assert holds == [REPLICA_HOLD_S_MIN]


def test_a_client_connection_flooding_out_of_credits_is_held_apart_from_replica_holds():
    from pbft.runtime.node import CLIENT_DEFERRED_PER_S_MAX
    node, conn, holds = _node_and_conn()
    t = 0.0
    for _ in range(CLIENT_DEFERRED_PER_S_MAX // 2):  # a pool short of credits now and then
        ReplicaNode._count_waste(node, conn, t, 1, CLIENT_DEFERRED_PER_S_MAX, client=True)
        t += 1.0 / (CLIENT_DEFERRED_PER_S_MAX // 2)
    assert holds == []
    for _ in range(CLIENT_DEFERRED_PER_S_MAX + 1):  # a flood
        ReplicaNode._count_waste(node, conn, t, 1, CLIENT_DEFERRED_PER_S_MAX, client=True)
        t += 1e-6
    assert holds == [REPLICA_HOLD_S_MIN]
    assert node.counters.drops == {"client-flood-held": 1} and node.metrics.replica_flood_holds == 0
