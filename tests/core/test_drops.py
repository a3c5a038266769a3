"""Drop reasons are a closed set (pbft.core.drops.Drop), and successes are not drops."""

import os

from pbft.codec import seal
from pbft.core.drops import Count, Drop
from pbft.messages import Checkpoint, Commit, Prepare, Status

from helpers.cluster import Cluster


def test_drop_values_are_the_metric_labels():
    assert Drop.BAD_MAC == "bad-mac" and {Drop.BAD_MAC: 1}.get("bad-mac") == 1
    assert len({d.value for d in Drop}) == len(Drop)
    assert not {c.value for c in Count} & {d.value for d in Drop}  # a success is never a drop


def test_every_reason_counted_is_a_drop_or_the_codecs():
    c = Cluster()
    c.put(0, b"k", b"v")
    r0, ring3 = c.replicas[0], c.rings[3]
    junk = [os.urandom(40), seal(Prepare(0, 1, bytes(32), 0), ring3), seal(Commit(7, 1, bytes(32), 3), ring3),
            seal(Checkpoint(3, bytes(32), 3), ring3), seal(Status(0, True, 0, 0, 3), ring3),
            seal(Prepare(0, 1, bytes(32), 3), c.rings[0])]
    for raw in junk:
        r0.receive(raw, c.now)
        r0.invariants()
    c.collect()
    c.run()
    assert c.put(1, b"k", b"w") == ("ok", True)
    for r in c.replicas:
        for why in r.drops:
            assert isinstance(why, Drop) or why in {"malformed", "bad-frame", "bad-tag", "oversized"} \
                or why.startswith("bad-"), why
        assert not set(r.drops) & {x.value for x in Count}
    assert {Drop.WRONG_VIEW, Drop.CHECKPOINT_OFF_INTERVAL, Drop.FROM_SELF} <= set(r0.drops)
