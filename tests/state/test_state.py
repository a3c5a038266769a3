"""Checkpointed state: copy-on-write checkpoints, the partition tree, and tree-walk state transfer."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbft.codec import checkpoint_digest
from pbft.service import ObjectService
from pbft.services.kv import KVService, encode_op
from pbft.state.objects import BucketFull, Cell, ObjectDict, ObjectSpace, Pages
from pbft.state.partition import (
    EMPTY_LEAF, MASK, CheckpointedState, Fetcher, children_sum, expand, leaf_digest, sum_digest,
)
from pbft.state.replica_state import ReplicaState


class Mem:
    """A plain backend: a list of objects, for testing the state machinery alone."""

    def __init__(self, n: int):
        self.objs = [b""] * n

    def get_obj(self, i):
        return self.objs[i]

    def put_objs(self, objs):
        for i, v in objs.items():
            self.objs[i] = v


def write(cs: CheckpointedState, mem: Mem, i: int, v: bytes) -> None:
    cs.modify(i)
    mem.objs[i] = v


def full_digest(cs: CheckpointedState, mem: Mem, seqno: int) -> bytes:
    """The checkpoint digest computed from scratch (no incremental state)."""
    total = sum(expand(leaf_digest(i, v)) for i, v in enumerate(mem.objs)) & MASK  # sums are additive
    return checkpoint_digest(seqno, sum_digest(total))


def test_tree_shape_and_empty_leaves():
    mem = Mem(1000)
    cs = CheckpointedState(mem, 1000, fanout=16)
    assert cs.counts == [1, 4, 63, 1000] and cs.depth == 3
    assert cs.tree[3][0] == EMPTY_LEAF
    one = CheckpointedState(Mem(1), 1, fanout=16)
    assert one.counts == [1, 1]


ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 199), st.binary(max_size=6)),
    st.tuples(st.just("ckpt")),
    st.tuples(st.just("rollback"), st.integers(0, 5)),
    st.tuples(st.just("discard"), st.integers(0, 5)),
), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops)
def test_incremental_checkpoints_match_full_snapshots(script):
    """Against a model that copies the whole state at every checkpoint: digests, values at
    every retained checkpoint, and rollback all agree."""
    mem = Mem(200)
    cs = CheckpointedState(mem, 200, fanout=8)
    seq = 0
    snaps = {0: list(mem.objs)}
    assert cs.checkpoint(0) == full_digest(cs, mem, 0)
    for op in script:
        if op[0] == "w":
            write(cs, mem, op[1], op[2])
        elif op[0] == "ckpt":
            seq += 1
            d = cs.checkpoint(seq)
            assert d == full_digest(cs, mem, seq)
            snaps[seq] = list(mem.objs)
        elif op[0] == "rollback":
            kept = cs.seqnos()
            target = kept[op[1] % len(kept)]
            cs.rollback(target)
            assert mem.objs == snaps[target]
            seq = target
            snaps = {s: v for s, v in snaps.items() if s <= target}
            assert cs.current_digest(target) == cs.digest(target) == full_digest(cs, mem, target)
        else:
            kept = cs.seqnos()
            cs.discard_below(kept[op[1] % len(kept)])
            snaps = {s: v for s, v in snaps.items() if s in cs.seqnos()}
        for s in cs.seqnos():  # every retained checkpoint can still be served exactly
            for i in range(0, 200, 17):
                assert cs.value_at(s, i) == snaps[s][i]
            assert sum_digest(children_sum(cs.children_at(s, 0, 0), cs.depth == 1)) == cs.root_at(s)


def test_checkpoint_cost_follows_changes_not_size():
    """The work of a checkpoint (objects hashed) is the number of objects modified."""
    for n in (1_000, 100_000):
        mem = Mem(n)
        cs = CheckpointedState(mem, n, fanout=256)
        cs.checkpoint(0)
        before = dict(cs.stats)
        for i in range(0, 50 * 97, 97):
            write(cs, mem, i % n, b"x%d" % i)
        cs.checkpoint(1)
        assert cs.stats["leaves_hashed"] - before["leaves_hashed"] == 50
        assert cs.stats["nodes_hashed"] - before["nodes_hashed"] <= 50 * cs.depth


def test_rebuild_finds_objects_changed_behind_the_trees_back():
    mem = Mem(64)
    cs = CheckpointedState(mem, 64, fanout=4)
    write(cs, mem, 5, b"good")
    d = cs.checkpoint(1)
    mem.objs[9] = b"corrupted in memory"  # no modify: the tree does not know
    assert cs.current_digest(1) == d
    assert cs.rebuild() == [9]
    assert cs.current_digest(1) != d


def pair(n=600, fanout=8, changes=25, seed=1):
    """A source at checkpoint 10 and a stale copy that missed ``changes`` writes."""
    rng = random.Random(seed)
    src_mem, dst_mem = Mem(n), Mem(n)
    for i in range(n):
        v = rng.randbytes(rng.randrange(0, 20))
        src_mem.objs[i] = dst_mem.objs[i] = v
    src = CheckpointedState(src_mem, n, fanout)
    dst = CheckpointedState(dst_mem, n, fanout)
    src.checkpoint(0)
    dst.checkpoint(0)
    changed = set()
    for _ in range(changes):
        i = rng.randrange(n)
        write(src, src_mem, i, rng.randbytes(12))
        changed.add(i)
    d = src.checkpoint(10)
    # the source moves on after the checkpoint: the transfer must serve checkpoint 10
    for _ in range(30):
        write(src, src_mem, rng.randrange(n), b"later")
    src.checkpoint(20)
    return src, src_mem, dst, dst_mem, d, changed


def serve(src: CheckpointedState, seqno: int, req):
    lvl, x, want = req
    if not want:
        return "meta", src.children_at(seqno, lvl, x)
    return "data", tuple((i, src.value_at(seqno, i)) for i in want)


def run_transfer(f: Fetcher, src, seqno, corrupt=None):
    """Answer the fetcher's requests (a window of them at a time) from ``src``."""
    rounds = 0
    while not f.done():
        reqs = f.requests() or f.in_flight()
        rounds += 1
        for req in reqs:
            kind, body = serve(src, seqno, req)
            if corrupt is not None:
                body = corrupt(kind, body)
            err = f.on_meta(req[0], req[1], body) if kind == "meta" else f.on_data(req[0], req[1], body)
            if err is not None:
                return err, rounds
        assert len(f.stack) <= src.depth * f.window * src.F and len(f.outstanding) <= f.window
    return None, rounds


def test_transfer_moves_only_what_changed():
    src, src_mem, dst, dst_mem, d, changed = pair()
    f = Fetcher(dst, 10, d)
    err, _ = run_transfer(f, src, 10)
    assert err is None and f.finish()
    assert f.fetched_objs == len(changed)
    assert dst_mem.objs == [src.value_at(10, i) for i in range(600)]


def test_transfer_rejects_corrupt_metadata_and_objects():
    src, _, dst, dst_mem, d, _ = pair()
    before = list(dst_mem.objs)

    def bad_meta(kind, body):
        if kind == "meta":
            return body[:-1] + (bytes(len(body[-1])),)
        return body

    f = Fetcher(dst, 10, d)
    err, _ = run_transfer(f, src, 10, bad_meta)
    assert err == "meta-digest-mismatch" and dst_mem.objs == before

    def bad_obj(kind, body):
        if kind == "data":
            i, v = body[0]
            return ((i, v + b"!"),) + body[1:]
        return body

    f = Fetcher(dst, 10, d)
    err, _ = run_transfer(f, src, 10, bad_obj)
    assert err == "data-digest-mismatch" and dst_mem.objs == before
    # and after the faulty replier, a correct one completes the same walk
    err, _ = run_transfer(f, src, 10)
    assert err is None and f.finish()


def test_transfer_wrong_shape_and_unrequested_replies():
    src, _, dst, _, d, _ = pair()
    f = Fetcher(dst, 10, d)
    assert f.on_meta(0, 0, src.children_at(10, 0, 0)) == "meta-unrequested"  # not asked yet
    assert f.requests() == [(0, 0, ())]
    assert f.on_meta(0, 0, (bytes(32),)) == "meta-bad-shape"
    assert f.on_data(0, 0, ((0, b"x"),)) == "data-unrequested"
    assert f.on_meta(1, 0, src.children_at(10, 1, 0)) == "meta-unrequested"


def test_transfer_keeps_a_window_of_requests_in_flight():
    src, _, dst, dst_mem, d, changed = pair(n=4000, fanout=8, changes=300)
    f = Fetcher(dst, 10, d, window=16)
    err, rounds = run_transfer(f, src, 10)
    assert err is None and f.finish()
    # a node at a time would need one round per node asked for; the window needs far fewer
    assert rounds * 4 < f.metas + len(changed)


def test_transfer_after_memory_corruption_needs_rebuild():
    """An object corrupted without the tree knowing looks up to date to the walk (its leaf
    digest is stale, not its value): only a full check (``rebuild``, what a proactive
    recovery does) finds it, and a walk after that repairs it."""
    src, src_mem, dst, dst_mem, d, changed = pair()
    victim = next(i for i in range(600) if i not in changed)
    dst_mem.objs[victim] = b"garbage"
    f = Fetcher(dst, 10, d)
    assert run_transfer(f, src, 10)[0] is None and f.finish()
    assert dst_mem.objs[victim] == b"garbage"
    assert dst.rebuild() == [victim]
    assert dst.current_digest(10) != d
    f = Fetcher(dst, 10, d)
    assert run_transfer(f, src, 10)[0] is None and f.finish()
    assert f.fetched_objs == 1 and dst_mem.objs[victim] == src.value_at(10, victim)


# ---------------------------------------------------------------------------
# helpers for services
# ---------------------------------------------------------------------------

def test_object_dict_canonical_and_validated():
    a, b = ObjectDict(8), ObjectDict(8)
    keys = [b"k%d" % i for i in range(40)]
    for k in keys:
        a.set(k, (k, 1))
    for k in reversed(keys):
        b.set(k, (k, 1))
    assert [a.get_obj(i) for i in range(8)] == [b.get_obj(i) for i in range(8)]
    c = ObjectDict(8)
    for i in range(8):
        c.install(i, c.parse(i, a.get_obj(i)))
    assert dict(c.items()) == dict(a.items())
    wrong = msgpack.packb([[k, 1] for k in sorted(keys) if a.bucket_of(k) != 0][:1], use_bin_type=True)
    with pytest.raises(ValueError, match="wrong bucket"):
        c.parse(0, wrong)
    with pytest.raises(ValueError):
        c.parse(0, b"\xc1garbage")
    small = ObjectDict(1, bucket_bytes_max=100)
    small.set(b"a", b"x" * 40)  # 42 bytes encoded + the key + 8: 51
    with pytest.raises(BucketFull):
        small.set(b"b", b"y" * 40)
    small.set(b"a", b"z" * 45)  # replacing a value counts only the difference


def test_object_dict_counts_a_bucket_as_a_replica_that_fetched_it_does():
    """A bucket built by puts and the same bucket installed from a state transfer have the same
    size, so both replicas refuse the same next put (values of every msgpack size class)."""
    for n in (1, 200, 300, 70_000):
        built = ObjectDict(1, bucket_bytes_max=2 * n + 100)
        built.set(b"a", b"v" * n)
        fetched = ObjectDict(1, bucket_bytes_max=2 * n + 100)
        fetched.install(0, fetched.parse(0, built.get_obj(0)))
        assert fetched.sizes == built.sizes
        room = built.bucket_bytes_max - built.sizes[0]
        decisions = set()
        for m in range(room - 16, room):  # around the largest value that still fits
            outcome = []
            for d in (built, fetched):
                try:
                    d.set(b"b", b"w" * m)
                    d.delete(b"b")
                    outcome.append(True)
                except BucketFull:
                    outcome.append(False)
            assert outcome[0] == outcome[1], m
            decisions.add(outcome[0])
        assert decisions == {True, False}


def test_object_space_put_is_all_or_nothing():
    space = ObjectSpace(Cell(0, 5), ObjectDict(4, base=1), Pages(2, page_size=16, base=5))
    assert space.n_objects == 7
    with pytest.raises(ValueError):
        space.put_objs({0: msgpack.packb(9), 6: b"short"})
    assert space.parts[0].value == 5
    with pytest.raises(ValueError, match="starts at"):
        ObjectSpace(Cell(0, 1), ObjectDict(2, base=2))


def test_pages_modify_every_page_a_write_touches():
    touched = []
    p = Pages(4, page_size=8)
    p.modify = touched.append
    p.write(6, b"abcdef")
    assert touched == [0, 1]
    assert p.read(6, 6) == b"abcdef"
    assert p.get_obj(3) == b""  # all-zero page: the empty object
    with pytest.raises(IndexError):
        p.write(30, b"xyz")


class Counter(ObjectService):
    """A service on the helpers: the minimal example of docs/state.md."""

    def __init__(self):
        self.total = Cell(0, 0)
        self.space = ObjectSpace(self.total)

    def execute(self, op, client, nondet, read_only):
        if not read_only:
            self.total.set(self.total.value + 1)
        return str(self.total.value).encode()


def test_replica_state_rolls_back_service_and_reply_table():
    kv = KVService()
    rs = ReplicaState(kv)
    cs = rs.cs
    put = lambda k, v: kv.execute(encode_op("put", k, v), 9, (7).to_bytes(8, "big"), False)  # noqa: E731
    put(b"a", b"1")
    rs.set_reply(9, 1, b"r1")
    d1 = cs.checkpoint(1)
    put(b"a", b"2")
    put(b"b", b"3")
    rs.set_reply(9, 2, b"r2")
    cs.checkpoint(2)
    cs.rollback(1)
    assert kv.data.get(b"a")[0] == b"1" and b"b" not in kv.data
    assert rs.last_reply == {9: (1, b"r1")}
    assert cs.current_digest(1) == d1
    other = ReplicaState(KVService())  # a fresh replica installs checkpoint 1 object by object
    other.put_objs({i: cs.value_at(1, i) for i in range(cs.n)})
    assert other.cs.rebuild() and other.cs.current_digest(1) == d1
    assert other.last_reply == {9: (1, b"r1")}
    with pytest.raises(ValueError):
        other.put_objs({0: msgpack.packb([[1, 1, b"x"]])})  # client 1 is not in bucket 0


def test_whole_state_form_still_works():
    import sys
    from helpers.netutil import ROOT
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from examples.bank import BankService, encode_op as bank_op  # the whole-state form
    b = BankService()
    rs = ReplicaState(b)
    assert rs.whole and rs.cs.n == rs.R + 1
    d0 = rs.cs.checkpoint(0)
    rs.before_execute()
    b.execute(bank_op("deposit", "alice", 10), 5, b"", False)
    assert rs.cs.checkpoint(1) != d0
    rs.cs.rollback(0)
    assert rs.cs.current_digest(0) == d0


def test_object_service_counter():
    c = Counter()
    rs = ReplicaState(c)
    rs.cs.checkpoint(0)
    c.execute(b"", 1, b"", False)
    assert rs.cs.dirty == {rs.R}
    rs.cs.checkpoint(1)
    c.execute(b"", 1, b"", False)
    rs.cs.rollback(1)
    assert c.total.value == 1
