"""The quorum helper (pbft.core.quorum): thresholds, the join rule, certificates that fire once."""

from pbft.config import ClusterConfig
from pbft.core.quorum import Certificate, Quorums, Reached


def test_unit_weights_thresholds():
    q = Quorums.of(ClusterConfig.create(4))
    assert (q.quorum, q.weak) == (3, 2)
    assert q.reached([0]) is Reached.NONE
    assert q.reached({0: b"", 1: b""}) is Reached.WEAK
    assert q.reached((0, 1, 2)) is Reached.QUORUM
    assert q.is_quorum_but_one([0, 1]) and not q.is_quorum_but_one([0])
    assert q.is_weak_but_one([3]) and not q.is_weak_but_one([])


def test_weights_count_not_heads():
    q = Quorums.of(ClusterConfig.create(5, weights=(2, 2, 1, 1, 1)))
    assert (q.quorum, q.weak) == (5, 3)
    assert q.weight([0, 1]) == 4 and not q.is_quorum([0, 1])
    assert q.is_quorum([0, 1, 4]) and q.is_weak([0, 2]) and not q.is_weak([2, 3])


def test_join_view_needs_a_weak_certificate_above_ours():
    q = Quorums.of(ClusterConfig.create(4))
    assert q.join_view({1: 5}, 0) is None  # one replica's word does not move us
    assert q.join_view({1: 5, 2: 4}, 0) == 4  # replicas of weight f+1 are in views >= 4
    assert q.join_view({1: 5, 2: 7, 3: 9}, 0) == 7  # the highest view a correct replica surely reached
    assert q.join_view({1: 5, 2: 4}, 4) is None  # (views at or below ours do not count)


def test_certificate_fires_exactly_once_and_only_for_matching_votes():
    q = Quorums.of(ClusterConfig.create(4))
    c = Certificate(q, q.quorum)
    assert c.add(0, b"a") is None and c.add(1, b"b") is None and c.add(2, b"a") is None
    assert c.add(1, b"a") == b"a"  # replica 1's latest vote replaces its earlier one
    assert c.add(3, b"a") is None and c.value == b"a"  # reached once: never again
    w = Certificate(q, q.weak)
    w.add(0, b"x")
    w.discard(0)
    assert w.add(1, b"x") is None and w.add(2, b"x") == b"x"
