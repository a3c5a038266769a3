"""The new-view decision procedure (view_change.decide), case by case."""

from pbft.codec import NULL_BATCH_DIGEST
from pbft.config import ClusterConfig
from pbft.core.quorum import Quorums
from pbft.core.view_change import decide
from pbft.messages import ViewChange

CFG = ClusterConfig.create(4)
D0 = b"\x00" * 32  # checkpoint digest at 0
A = b"\xaa" * 32
B = b"\xbb" * 32


def vc(r, prepared=(), preprepared=(), stable=0, ckpts=((0, D0),), view=5):
    return ViewChange(view, r, stable, tuple(ckpts), tuple(prepared), tuple(preprepared))


def run(vcs):
    return decide(vcs, Quorums.of(CFG), CFG.log_window_seqnos)


def test_nothing_prepared_gives_empty_new_view():
    d = run([vc(0), vc(1), vc(2)])
    assert d.checkpoint_seqno == 0 and d.chosen == ()


def test_fewer_than_a_quorum_decides_nothing():
    assert run([vc(0), vc(1)]) is None


def test_prepared_request_is_chosen():
    p = [(1, A, 2)]
    d = run([vc(0, p, p), vc(1, (), p), vc(2)])
    assert d.chosen == ((1, A),)


def test_gap_becomes_null_request():
    p = [(2, A, 2)]
    d = run([vc(0, p, p), vc(1, (), p), vc(2)])
    assert d.chosen == ((1, NULL_BATCH_DIGEST), (2, A))


def test_later_view_wins_over_earlier_prepared():
    # A prepared in view 1 at replica 0; B prepared in view 3 at replicas 1, 2
    d = run([vc(0, [(1, A, 1)], [(1, A, 1)]), vc(1, [(1, B, 3)], [(1, B, 3)]), vc(2, [(1, B, 3)], [(1, B, 3)])])
    assert d.chosen == ((1, B),)


def test_prepared_claim_without_weak_preprepare_support_waits():
    # only one replica claims A pre-prepared (A2 needs f+1 = 2), the others prepared nothing
    # but replica 0's claim blocks the null choice (B needs 3 without an entry): undecided
    d = run([vc(0, [(1, A, 2)], [(1, A, 2)]), vc(1), vc(2)])
    assert d is None
    # a fourth message without an entry lets the null request be chosen
    d = run([vc(0, [(1, A, 2)], [(1, A, 2)]), vc(1), vc(2), vc(3)])
    assert d.chosen == ((1, NULL_BATCH_DIGEST),)


def test_highest_checkpoint_with_weak_support_and_quorum_below():
    c16 = (16, b"\x16" * 32)
    d = run([vc(0, stable=16, ckpts=[c16]), vc(1, stable=16, ckpts=[c16]), vc(2)])
    # a quorum (3) has stable <= 16 and two (f+1) hold it
    assert d.checkpoint_seqno == 16 and d.checkpoint_digest == c16[1]


def test_checkpoint_held_by_one_replica_is_not_chosen():
    c16 = (16, b"\x16" * 32)
    # checkpoint 0 has two holders but only two messages with stable <= 0: undecided
    assert run([vc(0, stable=16, ckpts=[c16]), vc(1), vc(2)]) is None
    d = run([vc(0, stable=16, ckpts=[c16]), vc(1), vc(2), vc(3)])
    assert d.checkpoint_seqno == 0


def test_decision_ignores_message_order():
    p = [(1, A, 2)]
    a = [vc(0, p, p), vc(1, (), p), vc(2), vc(3)]
    assert run(a) == run(list(reversed(a)))
