"""The durable store: LmdbStore on a real disk, MemStore with injected faults."""

import os
import random
import shutil
import stat
import tempfile

import lmdb
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from pbft.storage import META_KEY, CorruptRecord, LmdbStore, MemStore, StoreError, frame

OWNER = "cluster-a/replica-0"


def open_store(path, owner=OWNER, **kw):
    return LmdbStore(str(path), owner, **kw)


# -- LmdbStore ---------------------------------------------------------------


def test_lmdb_round_trip_and_directory_mode(tmp_path):
    path = tmp_path / "db"
    with open_store(path) as s:
        assert s.get(b"k") is None
        s.write({b"k": b"v", b"empty": b""})
        assert s.get(b"k") == b"v" and s.get(b"empty") == b""
        s.write({b"k": None})
        assert s.get(b"k") is None
        assert s.verify_all() == []
        assert s.stats["writes"] == 2 and s.stats["bytes_written"] > 0 and s.stats["sync_seconds"] > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_lmdb_group_commit(tmp_path):
    with open_store(tmp_path / "db") as s:
        s.write({b"n%04d" % i: b"v%d" % i for i in range(500)})
        assert s.stats["writes"] == 1
        puts = {b"n%04d" % i: None for i in range(0, 500, 2)}
        puts.update({b"m%04d" % i: b"new" for i in range(100)})
        s.write(puts)
        assert s.stats["writes"] == 2
        assert s.get(b"n0000") is None and s.get(b"n0001") == b"v1" and s.get(b"m0099") == b"new"
        assert len(list(s.scan(b"n"))) == 250
        assert s.delete_prefix(b"m") == {b"m%04d" % i: None for i in range(100)}


def test_lmdb_scan_prefix_in_order(tmp_path):
    with open_store(tmp_path / "db") as s:
        keys = [b"a", b"ab", b"ab\x00", b"ab\xff", b"abc", b"b", b"\x00x", b"aa"]
        s.write({k: k * 2 for k in reversed(keys)})
        assert list(s.scan(b"ab")) == [(k, k * 2) for k in sorted(keys) if k.startswith(b"ab")]
        assert [k for k, _ in s.scan()] == sorted(keys)  # metadata record hidden
        assert list(s.scan(b"zz")) == []


def test_lmdb_scan_spans_chunks(tmp_path):
    with open_store(tmp_path / "db", durable=False) as s:
        s.write({b"p%05d" % i: b"%d" % i for i in range(2500)})
        s.write({b"q": b"after", b"o": b"before"})
        got = list(s.scan(b"p"))
        assert [k for k, _ in got] == [b"p%05d" % i for i in range(2500)]


def test_lmdb_reopen_keeps_data(tmp_path):
    path = tmp_path / "db"
    with open_store(path) as s:
        s.write({b"a": b"1", b"b": b"2"})
    with open_store(path) as s:
        assert list(s.scan()) == [(b"a", b"1"), (b"b", b"2")]
        s.write({b"c": b"3"})
    with open_store(path, durable=False) as s:
        assert s.get(b"c") == b"3"
        s.write({b"d": b"4"})
        s.flush()
    with open_store(path) as s:
        assert s.get(b"d") == b"4"


def test_lmdb_owner_mismatch_refused(tmp_path):
    path = tmp_path / "db"
    with open_store(path) as s:
        s.write({b"a": b"1"})
    with pytest.raises(StoreError, match="belongs to"):
        open_store(path, owner="cluster-b/replica-0")
    with open_store(path) as s:  # the refused open changed nothing
        assert s.get(b"a") == b"1"


def test_key_validation(tmp_path):
    for s in (open_store(tmp_path / "db"), MemStore()):
        with s:
            s.write({b"k" * 500: b"ok"})
            with pytest.raises(ValueError):
                s.write({b"k" * 501: b"v"})
            with pytest.raises(ValueError):
                s.get(b"k" * 501)
            with pytest.raises(ValueError):
                s.write({b"": b"v"})
            with pytest.raises(ValueError):
                s.write({b"\x00meta": b"v"})
            with pytest.raises(TypeError):
                s.write({"str": b"v"})
            assert s.get(b"k" * 500) == b"ok"


def test_lmdb_corrupted_value_on_disk_detected(tmp_path):
    path = tmp_path / "db"
    with open_store(path) as s:
        s.write({b"before": b"x", b"victim": b"PAGE" * 1000, b"zafter": b"y"})
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    at = raw.find(b"PAGE" * 1000)
    assert at >= 0
    raw[at + 2000] ^= 0x01
    data.write_bytes(bytes(raw))
    with open_store(path) as s:
        with pytest.raises(CorruptRecord, match=b"victim".hex()) as info:
            s.get(b"victim")
        assert info.value.key == b"victim"
        assert s.get(b"before") == b"x" and s.get(b"zafter") == b"y"
        assert s.verify_all() == [b"victim"]
        with pytest.raises(CorruptRecord):
            list(s.scan())
        s.write(s.delete_prefix(b"victim"))  # recovery can drop the bad record
        assert s.verify_all() == []


def _fill(path):
    with open_store(path) as s:
        for i in range(10):
            s.write({b"r%03d" % (i * 5 + j): b"PAGE" * 1000 for j in range(5)})


def _open_and_read(path):
    with open_store(path) as s:
        s.get(b"r049")
        list(s.scan())


@pytest.mark.parametrize("size", [0, 100, 5000, "half", "minus-page"])
def test_lmdb_truncated_file_gives_store_error(tmp_path, size):
    path = tmp_path / "db"
    _fill(path)
    data = path / "data.mdb"
    full = data.stat().st_size
    cut = {"half": full // 2, "minus-page": full - 4096}.get(size, size)
    os.truncate(data, cut)
    with pytest.raises(StoreError) as info:
        _open_and_read(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_lmdb_garbage_file_gives_store_error(tmp_path):
    path = tmp_path / "db"
    path.mkdir(mode=0o700)
    (path / "data.mdb").write_bytes(b"\xde\xad\xbe\xef" * 5000)
    with pytest.raises(StoreError, match="cannot open store") as info:
        open_store(path)
    assert str(path) in str(info.value)


def test_lmdb_path_is_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StoreError):
        open_store(tmp_path / "f")


def test_lmdb_map_full_and_closed(tmp_path):
    s = open_store(tmp_path / "db", map_size_bytes=1 << 16)
    with pytest.raises(StoreError, match="store full: raise map_size_bytes"):
        s.write({b"k%d" % i: b"x" * 3000 for i in range(100)})
    s.write({b"a": b"1"})  # the failed group commit left the store usable
    assert s.get(b"a") == b"1" and s.get(b"k0") is None
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get(b"a")


# -- MemStore ----------------------------------------------------------------


def test_mem_durable_survives_power_loss():
    s = MemStore(durable=True)
    s.write({b"a": b"1", b"b": b"2"})
    s.write({b"a": None})
    assert s.power_loss(random.Random(1), torn=True) == 0
    assert list(s.scan()) == [(b"b", b"2")]


def test_mem_fast_mode_loses_unsynced_until_flush():
    s = MemStore(durable=False)
    s.write({b"a": b"1"})
    s.flush()
    s.write({b"a": b"2", b"b": b"x"})
    s.close()  # a process crash/restart keeps the page cache
    assert s.get(b"a") == b"2" and s.get(b"b") == b"x"
    assert s.power_loss(random.Random(1)) == 1
    assert s.get(b"a") == b"1" and s.get(b"b") is None
    s.write({b"c": b"3"})
    s.flush()
    s.power_loss(random.Random(2))
    assert s.get(b"c") == b"3"


def test_mem_fast_mode_auto_sync():
    s = MemStore(durable=False, fast_sync_every=4)
    for i in range(10):
        s.write({b"k%d" % i: b"v"})
    s.power_loss(random.Random(0))
    assert [k for k, _ in s.scan()] == [b"k%d" % i for i in range(8)]


def test_mem_torn_writes_never_return_wrong_values():
    outcomes = set()
    for seed in range(200):
        rng = random.Random(seed)
        s = MemStore(durable=False, fast_sync_every=1000)
        keys = [b"k%d" % i for i in range(6)]
        written = {k: set() for k in keys}
        for _ in range(rng.randint(0, 3)):
            puts = {k: rng.randbytes(rng.randint(0, 30)) for k in rng.sample(keys, 3)}
            s.write(puts)
            for k, v in puts.items():
                written[k].add(v)
        if rng.random() < 0.7:
            s.flush()
        for _ in range(rng.randint(1, 4)):
            puts = {k: (None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 30)))
                    for k in rng.sample(keys, rng.randint(1, 6))}
            s.write(puts)
            for k, v in puts.items():
                if v is not None:
                    written[k].add(v)
        s.power_loss(rng, torn=True)
        bad = set(s.verify_all())
        for k in keys:
            try:
                v = s.get(k)
            except CorruptRecord:
                assert k in bad
                outcomes.add("corrupt")
                continue
            assert k not in bad
            assert v is None or v in written[k], (seed, k, v)
            outcomes.add("absent" if v is None else "value")
    assert outcomes == {"corrupt", "absent", "value"}


def test_mem_corruption_detected():
    rng = random.Random(7)
    s = MemStore(durable=False)
    s.write({b"a": b"1" * 20, b"b": b"2", b"c": b"3"})
    s.flush()
    s.write({b"c": b"33"})  # the visible copy of c is still unsynced
    s.corrupt(b"a", rng)
    with pytest.raises(CorruptRecord, match=b"a".hex()):
        s.get(b"a")
    s.truncate(b"b", 3)
    s.corrupt(b"c", rng)
    assert s.verify_all() == [b"a", b"b", b"c"]
    s.power_loss(rng)  # the corrupted unsynced copy of c is lost, the synced one is intact
    assert s.verify_all() == [b"a", b"b"] and s.get(b"c") == b"3"
    with pytest.raises(KeyError):
        s.corrupt(b"zzz", rng)
    s2 = MemStore()
    s2.write({b"k%d" % i: b"v" for i in range(20)})
    hit = s2.corrupt_random(random.Random(3), 5)
    assert len(hit) == 5 and s2.verify_all() == hit
    assert hit == MemStore.corrupt_random(_filled(20), random.Random(3), 5)  # deterministic


def _filled(n):
    s = MemStore()
    s.write({b"k%d" % i: b"v" for i in range(n)})
    return s


# -- LmdbStore and MemStore agree ----------------------------------------------

_keys = st.lists(st.sampled_from([b"a", b"b", b"\x00", b"\xff"]), min_size=1, max_size=4).map(b"".join)
_batches = st.lists(st.dictionaries(_keys, st.none() | st.binary(max_size=40), max_size=8),
                    min_size=1, max_size=8)


@settings(max_examples=30, deadline=None)
@given(_batches)
def test_lmdb_and_mem_agree(batches):
    tmp = tempfile.mkdtemp()
    try:
        with open_store(os.path.join(tmp, "db")) as disk:
            mem = MemStore(durable=True)
            touched = set()
            for puts in batches:
                disk.write(puts)
                mem.write(puts)
                touched.update(puts)
                for k in sorted(touched):
                    assert disk.get(k) == mem.get(k)
                for prefix in (b"", b"a", b"\x00", b"\xff", b"ab"):
                    assert list(disk.scan(prefix)) == list(mem.scan(prefix))
            assert disk.verify_all() == mem.verify_all() == []
    finally:
        shutil.rmtree(tmp)


def test_lmdb_foreign_or_unmarked_environment_refused(tmp_path):
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"a", b"1")
    env.close()
    with pytest.raises(StoreError, match="no metadata record"):
        open_store(foreign)
    other = tmp_path / "other-format"
    open_store(other).close()
    env = lmdb.open(str(other))
    with env.begin(write=True) as txn:
        txn.put(META_KEY, frame(META_KEY, msgpack.packb({"format": 2, "owner": OWNER})))
    env.close()
    with pytest.raises(StoreError, match="format 2"):
        open_store(other)
