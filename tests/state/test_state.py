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


# ---------------------------------------------------------------------------
# what a checkpoint keeps, and sizes without encoding: the same bytes, digests and copies
# ---------------------------------------------------------------------------

def reference_obj(d: ObjectDict, i: int) -> bytes:
    """A bucket encoded from its entries by msgpack itself (the canonical form, from scratch)."""
    bucket = d.buckets[i - d.base]
    return msgpack.packb(sorted(bucket.items()), use_bin_type=True) if bucket else b""


values = st.one_of(
    st.binary(max_size=20), st.sampled_from([b"x" * 255, b"y" * 256, b"z" * 65_535, b"w" * 65_536]),
    st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=40), st.none(), st.booleans(),
    st.tuples(st.integers(0, 1 << 40), st.binary(max_size=300),
              st.tuples(st.integers(-(1 << 63), 1 << 63), st.text(max_size=5))),
    st.lists(st.integers(0, 99), max_size=20).map(tuple),
)
dict_ops = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 60), values),
    st.tuples(st.just("del"), st.integers(0, 60)),
    st.tuples(st.just("ckpt")),
    st.tuples(st.just("rollback"), st.integers(0, 3)),
), max_size=80)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(dict_ops)
def test_object_dict_and_kept_copies_match_encoding_from_scratch(script):
    """Sets, deletes, checkpoints and rollbacks (which install old buckets) on an ObjectDict of
    few buckets (some with 16 entries and more): every bucket reads as msgpack encodes its sorted
    entries, sizes are what ``install`` counts, every retained checkpoint serves the bytes the
    bucket had then, and the digest is that of a fresh dict built from the final contents."""
    d = ObjectDict(3, base=1, bucket_bytes_max=1 << 22)
    space = ObjectSpace(Cell(0, 0), d)
    svc = type("S", (), {"get_obj": space.get_obj, "put_objs": space.put_objs})()
    cs = CheckpointedState(svc, space.n_objects, fanout=2)
    space.bind(cs.modify)
    seq = 0
    snaps = {0: [reference_obj(d, i) for i in range(1, 4)]}
    cs.checkpoint(0)
    for op in script:
        if op[0] == "set":
            d.set(b"k%d" % op[1], op[2])
        elif op[0] == "del":
            d.delete(b"k%d" % op[1])
        elif op[0] == "ckpt":
            seq += 1
            cs.checkpoint(seq)
            snaps[seq] = [reference_obj(d, i) for i in range(1, 4)]
        else:
            kept = cs.seqnos()
            seq = kept[op[1] % len(kept)]
            cs.rollback(seq)
            snaps = {s: v for s, v in snaps.items() if s <= seq}
            cs.discard_below(cs.seqnos()[-1])
            snaps = {seq: snaps[seq]}
        for i in range(1, 4):
            assert d.get_obj(i) == reference_obj(d, i)
            for s in cs.seqnos():
                assert cs.value_at(s, i) == snaps[s][i - 1]
        fetched = ObjectDict(3, base=1, bucket_bytes_max=1 << 22)
        for i in range(1, 4):
            fetched.install(i, fetched.parse(i, d.get_obj(i)))
        assert fetched.sizes == d.sizes
    fresh = ObjectDict(3, base=1)
    items = sorted(d.items())
    random.Random(len(items)).shuffle(items)
    for k, v in items:
        fresh.set(k, v)
    fresh_space = ObjectSpace(Cell(0, 0), fresh)
    other = CheckpointedState(fresh_space, fresh_space.n_objects, fanout=2)
    assert other.current_digest(seq) == cs.current_digest(seq)
    assert cs.rebuild() == []  # the tree built change by change is the one built from scratch


def test_msgpack_headers_of_every_size_class():
    from pbft.state.objects import _bin_header
    for n in (0, 1, 15, 16, 255, 256, 65_535, 65_536, 70_000):
        assert _bin_header(n) == msgpack.packb(bytes(n), use_bin_type=True)[: len(_bin_header(n))]


def test_bfs_state_step_by_step_digests_as_installed_from_scratch():
    """A file system's workload through the replica's state, a checkpoint every 16 operations:
    the tree kept change by change matches a full recompute, every retained checkpoint serves
    what the objects were then, and a fresh replica that installs the final objects has the same
    digest and reads back the same bytes."""
    from pbft.services.bfs import BFSService
    from pbft.services.bfs.config import parse_bfs_section
    from pbft.services.bfs.protocol import A_INO, creds, decode_result
    from pbft.services.bfs.protocol import encode_op as fs_op

    root = creds(0, 0)

    cfg = parse_bfs_section({"root_mode": 0o755, "client": {"default": {"root": True}}})

    def replica():
        svc = BFSService(cfg, inode_buckets=64, dir_buckets=64, data_buckets=128, xattr_buckets=8)
        return svc, ReplicaState(svc)

    svc, rs = replica()
    cs = rs.cs
    cs.checkpoint(0)
    seq = 0
    snaps: dict[int, list[bytes]] = {0: [rs.get_obj(i) for i in range(cs.n)]}
    rng = random.Random(5)
    inos: list[tuple[int, bytes]] = []

    def ex(raw: bytes) -> tuple:
        nonlocal seq
        seq += 1
        out = svc.execute(raw, 100, (10**18 + seq).to_bytes(8, "big"), False)
        rs.set_reply(100, seq, out)
        if seq % 16 == 0:
            cs.checkpoint(seq)
            snaps[seq] = [rs.get_obj(i) for i in range(cs.n)]
            if len(cs.records) > 3:
                cs.discard_below(cs.records[-2].seqno)
                for s in [s for s in snaps if s not in cs.seqnos()]:
                    del snaps[s]
        return decode_result(out)

    for k in range(200):
        r = rng.random()
        if r < 0.4 or not inos:
            inos.append((ex(fs_op("create", 1, b"f%d" % k, 0o100644, True, root))[A_INO], b"f%d" % k))
        elif r < 0.8:
            ino = rng.choice(inos)[0]
            ex(fs_op("write", ino, rng.randrange(40_000), rng.randbytes(rng.randrange(1, 6000)), root))
        else:
            ino, name = inos.pop(rng.randrange(len(inos)))
            ex(fs_op("unlink", 1, name, False, root))
    for s in cs.seqnos():
        for i in range(cs.n):
            assert cs.value_at(s, i) == snaps[s][i]
    d = cs.current_digest(seq)
    assert cs.rebuild() == [] and cs.current_digest(seq) == d
    _, other = replica()
    other.put_objs({i: rs.get_obj(i) for i in range(cs.n)})
    other.cs.rebuild()
    assert other.cs.current_digest(seq) == d
    assert all(other.get_obj(i) == rs.get_obj(i) for i in range(cs.n))


def test_a_value_changed_behind_modify_shows_in_rebuild():
    """Nothing kept hides memory corruption from the full check: a bucket changed every interval
    (its bytes kept by the checkpoint), then one of its values replaced behind ``modify``'s back."""
    d = ObjectDict(4, base=1)
    space = ObjectSpace(Cell(0, 0), d)
    cs = CheckpointedState(space, space.n_objects, fanout=2)
    space.bind(cs.modify)
    for s in range(4):
        d.set(b"k", (s, b"v"))
        cs.checkpoint(s)
    i = d.base + d.bucket_of(b"k")
    assert i in cs.clean
    d.buckets[i - d.base][b"k"] = (99, b"corrupt")
    assert cs.rebuild() == [i]
