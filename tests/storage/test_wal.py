"""WalStore's log: replay after a crash, a torn tail at every byte of the last record, corruption
in the middle of the log, checkpoints and the reuse of the file, migration from and to
LmdbStore, and the error paths of the append (ENOSPC, short writes, a failed fdatasync)."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

from pbft.storage import CorruptRecord, LmdbStore, StoreError, WalStore, open_store
from pbft.storage import wal as wal_mod
from pbft.storage.wal import FILE_HEADER, HEAD, LOG_NAME, UNREADABLE

OWNER = "cluster-a/replica-0"


def open_wal(path, **kw):
    return WalStore(path, OWNER, map_size_bytes=1 << 26, **kw)


def crash(store: WalStore) -> None:
    """What a process crash leaves: the log as written (each record fdatasynced), no checkpoint."""
    assert store._fd is not None and store._db is not None
    os.close(store._fd)
    store._db.close()
    store._fd = store._db = None


def write_all(store, batches):
    """Writes each batch; returns the log offsets [start of record 0, end of 0 = start of 1, ...]."""
    offsets = [store._end]
    for puts in batches:
        store.write(puts)
        offsets.append(store._end)
    return offsets


def apply(model, batches):
    for puts in batches:
        for k, v in puts.items():
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    return model


BATCHES = [{b"a": b"1", b"b": b"2" * 50}, {b"a": None, b"c": b"3", b"o1": b"object" * 10}, {b"d": b"4"}]


def test_replay_after_a_crash_restores_every_write(tmp_path):
    s = open_wal(tmp_path / "db")
    write_all(s, BATCHES)
    crash(s)
    with open_wal(tmp_path / "db") as s:
        assert s.stats["replayed"] == 3 and s.stats["checkpoints"] == 1  # replayed into LMDB at once
        assert s.load() == (apply({}, BATCHES), frozenset())
        s.write({b"e": b"5"})
        crash(s)
    with open_wal(tmp_path / "db") as s:
        assert s.stats["replayed"] == 1  # the earlier records are an old generation: not replayed again
        assert s.load() == (apply({b"e": b"5"}, BATCHES), frozenset())


def _torn_copy(src, dst, cut, end, how):
    shutil.copytree(src, dst)
    log = dst / LOG_NAME
    if how == "truncate":  # the file grew only up to the cut
        os.truncate(log, cut)
    else:  # the record's blocks: zeros (preallocated, never written) or garbage from the cut on
        data = bytearray(log.read_bytes())
        fill = bytes(end - cut) if how == "zeros" else random.Random(cut).randbytes(end - cut)
        data[cut:end] = fill
        log.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "zeros", "garbage"])
def test_a_torn_last_record_is_discarded_at_every_byte_offset(tmp_path, how):
    s = open_wal(tmp_path / "db")
    offsets = write_all(s, BATCHES)
    crash(s)
    start, end = offsets[-2], offsets[-1]
    before = apply({}, BATCHES[:-1])
    cuts = range(start, end) if how != "garbage" else range(start, end, 7)
    for cut in cuts:
        dst = tmp_path / f"cut{cut}"
        _torn_copy(tmp_path / "db", dst, cut, end, how)
        with open_wal(dst) as t:
            assert t.load() == (before, frozenset()), cut
            assert t.stats["replayed"] == 2 and t.stats["corrupt_records"] == 0, cut
            t.write({b"after": b"x"})  # and the log goes on
        with open_wal(dst) as t:
            assert t.load() == ({**before, b"after": b"x"}, frozenset()), cut
        shutil.rmtree(dst)


def _flip(path, offset):
    data = bytearray((path / LOG_NAME).read_bytes())
    data[offset] ^= 0x10
    (path / LOG_NAME).write_bytes(bytes(data))


def test_a_damaged_value_in_the_middle_of_the_log_is_reported_and_the_rest_replayed(tmp_path):
    s = open_wal(tmp_path / "db")
    batches = [{b"a": b"1"}, {b"o1": b"object-one" * 20, b"o2": b"object-two" * 20}, {b"z": b"9"}]
    offsets = write_all(s, batches)
    crash(s)
    data = (tmp_path / "db" / LOG_NAME).read_bytes()
    _flip(tmp_path / "db", data.index(b"object-two", offsets[1]) + 5)
    for _ in range(2):  # the damage is kept (in LMDB, after the checkpoint at open) until rewritten
        with open_wal(tmp_path / "db") as t:
            good, bad = t.load()
            assert bad == {b"o2"}
            assert good == {b"a": b"1", b"o1": b"object-one" * 20, b"z": b"9"}  # the records after it too
            with pytest.raises(CorruptRecord):
                t.get(b"o2")
            assert t.verify_all() == [b"o2"]
    with open_wal(tmp_path / "db") as t:
        t.write({b"o2": b"repaired"})
        assert t.load()[1] == frozenset()


@pytest.mark.parametrize("where", ["length", "encoding", "deletion", "tag"])
def test_an_unreadable_record_in_the_middle_marks_the_log_and_checkpoint_damaged(tmp_path, where):
    """A damaged length, encoding, or a record with a deletion (no checksum of its own) cannot be
    trusted whole: ``UNREADABLE`` is reported.  A damaged header field alone (the tag) leaves
    puts whose every frame checks: kept, nothing reported."""
    s = open_wal(tmp_path / "db")
    middle = {b"o1": b"object-one" * 20, b"gone": None} if where == "deletion" else {b"o1": b"object-one" * 20}
    batches = [{b"a": b"1", b"gone": b"x"}, middle, {b"z": b"9"}, {b"y": b"8"}]
    offsets = write_all(s, batches)
    crash(s)
    at = {"length": offsets[1] + 16, "tag": offsets[1], "encoding": offsets[1] + HEAD.size,
          "deletion": offsets[1] + HEAD.size + 20}[where]
    _flip(tmp_path / "db", at)
    with open_wal(tmp_path / "db") as t:
        good, bad = t.load()
        assert t.stats["corrupt_records"] == 1
        assert good[b"z"] == b"9" and good[b"y"] == b"8" and good[b"a"] == b"1"  # before and after it
        if where == "tag":
            assert bad == frozenset() and good == apply({}, batches)
        else:
            assert set(UNREADABLE) <= bad


def test_checkpoints_reuse_the_file_and_keep_everything(tmp_path):
    rng = random.Random(5)
    s = open_wal(tmp_path / "db", log_limit_bytes=3000, prealloc_bytes=4096)
    model: dict[bytes, bytes] = {}
    for step in range(300):
        puts = {b"k%d" % rng.randrange(40): (None if rng.random() < 0.25 else rng.randbytes(rng.randrange(200)))
                for _ in range(rng.randint(1, 4))}
        s.write(puts)
        apply(model, [puts])
        if step in (100, 200):
            crash(s)  # crash mid-generation, stale records of older generations in the file
            s = open_wal(tmp_path / "db", log_limit_bytes=3000, prealloc_bytes=4096)
            assert s.load() == (model, frozenset())
    assert s.stats["checkpoints"] > 5
    size = os.path.getsize(tmp_path / "db" / LOG_NAME)
    assert size <= 3000 + 4096 + 2 * 4096  # reused, not grown: the bound plus a record, in steps
    crash(s)
    with open_wal(tmp_path / "db") as t:
        assert t.load() == (model, frozenset())


def test_an_empty_group_commit_costs_no_record_and_no_sync(tmp_path, monkeypatch):
    s = open_wal(tmp_path / "db")
    s.write({b"a": b"1"})
    end, synced = s._end, s.stats["sync_seconds"]
    monkeypatch.setattr(wal_mod.os, "fdatasync", lambda fd: pytest.fail("fdatasync of an empty write"))
    s.write({})
    assert s._end == end and s.stats["sync_seconds"] == synced
    s.close()


def test_records_of_an_old_generation_never_return(tmp_path):
    s = open_wal(tmp_path / "db")
    s.write({b"k": b"old" * 100, b"j": b"1"})
    s.write({b"k": b"older" * 100})
    s.flush()  # nothing to do: already durable
    assert s.stats["checkpoints"] == 0
    s.checkpoint()
    assert s.stats["checkpoints"] == 1
    s.write({b"k": None})  # shorter than the stale records after it
    crash(s)
    with open_wal(tmp_path / "db") as t:
        assert t.load() == ({b"j": b"1"}, frozenset())


def test_a_directory_of_lmdb_store_opens_and_a_fast_store_takes_over_the_log(tmp_path):
    path = tmp_path / "db"
    with LmdbStore(path, OWNER, durable=True) as old:  # written before the log existed
        old.write({b"a": b"1", b"b": b"2"})
    assert not (path / LOG_NAME).exists()
    s = open_wal(path)
    assert s.load() == ({b"a": b"1", b"b": b"2"}, frozenset())
    s.write({b"b": None, b"c": b"3"})
    crash(s)
    with open_store(path, OWNER, "fast") as fast:  # the log's writes move into LMDB, the log goes
        assert isinstance(fast, LmdbStore) and not (path / LOG_NAME).exists()
        assert fast.load() == ({b"a": b"1", b"c": b"3"}, frozenset())
        fast.write({b"d": b"4"})
    with open_store(path, OWNER, "durable") as s:
        assert isinstance(s, WalStore)
        assert s.load() == ({b"a": b"1", b"c": b"3", b"d": b"4"}, frozenset())


def test_another_owner_a_foreign_log_file_and_a_second_opener_are_refused(tmp_path):
    path = tmp_path / "db"
    with open_wal(path) as s:
        s.write({b"a": b"1"})
        with pytest.raises(StoreError, match="in use"):
            open_wal(path)
        s.checkpoint()
    with pytest.raises(StoreError, match="belongs to"):
        WalStore(path, "cluster-b/replica-0")
    (path / LOG_NAME).write_bytes(b"not a log at all" * 10)
    with pytest.raises(StoreError, match="not a write-ahead log"):
        open_wal(path)
    (path / LOG_NAME).write_bytes(b"")  # created, header never written: a new log
    with open_wal(path) as s:
        assert s.get(b"a") == b"1"


def test_a_log_from_another_store_is_not_replayed(tmp_path):
    a, b = open_wal(tmp_path / "a"), open_wal(tmp_path / "b")
    a.write({b"x": b"from a"})
    b.write({b"y": b"from b"})
    crash(a)
    crash(b)
    shutil.copy(tmp_path / "a" / LOG_NAME, tmp_path / "b" / LOG_NAME)  # same owner, another store's key
    with open_wal(tmp_path / "b") as t:
        assert t.load() == ({}, frozenset())


def test_enospc_and_short_writes(tmp_path, monkeypatch):
    s = open_wal(tmp_path / "db", prealloc_bytes=4096)
    s.write({b"a": b"1"})
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(wal_mod.os, "pwrite", full)
    with pytest.raises(StoreError, match="No space left"):
        s.write({b"a": b"2", b"big": b"x" * 10000})  # needs the file to grow
    with pytest.raises(StoreError, match="No space left"):
        s.write({b"a": b"3"})
    assert s.load() == ({b"a": b"1"}, frozenset())  # undone, the store still usable

    def short(fd, data, offset):
        return real(fd, bytes(data)[:3], offset)  # 3 bytes per call
    monkeypatch.setattr(wal_mod.os, "pwrite", short)
    s.write({b"a": b"4", b"b": b"5" * 100})
    monkeypatch.setattr(wal_mod.os, "pwrite", real)
    s.write({b"c": b"6"})
    crash(s)
    with open_wal(tmp_path / "db") as t:
        assert t.load() == ({b"a": b"4", b"b": b"5" * 100, b"c": b"6"}, frozenset())


def test_a_failed_fdatasync_refuses_every_later_write(tmp_path, monkeypatch):
    s = open_wal(tmp_path / "db")
    s.write({b"a": b"1"})

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(wal_mod.os, "fdatasync", eio)
    with pytest.raises(StoreError, match="Input/output error"):
        s.write({b"a": b"2"})
    monkeypatch.undo()
    with pytest.raises(StoreError, match="refuses writes"):
        s.write({b"b": b"3"})
    with pytest.raises(StoreError, match="refuses writes"):
        s.flush()
    with pytest.raises(StoreError, match="refuses writes"):
        s.checkpoint()
    assert s.get(b"a") == b"1"  # reads go on
    crash(s)
    with open_wal(tmp_path / "db") as t:  # the record may or may not have reached the disk: whole or not at all
        assert t.load() in (({b"a": b"1"}, frozenset()), ({b"a": b"2"}, frozenset()))


def test_store_full_at_a_checkpoint_leaves_the_write_undone(tmp_path):
    s = WalStore(tmp_path / "db", OWNER, map_size_bytes=1 << 16, log_limit_bytes=1000)
    s.write({b"k%d" % i: b"x" * 3000 for i in range(40)})  # in the log: LMDB sees it at the checkpoint
    with pytest.raises(StoreError, match="store full"):
        s.write({b"late": b"1"})
    assert s.get(b"late") is None and s.get(b"k0") == b"x" * 3000
    s.close()


def test_the_file_header_is_checked_and_records_start_after_it(tmp_path):
    with open_wal(tmp_path / "db") as s:
        assert s._end == len(FILE_HEADER)
        s.write({b"a": b"1"})
    assert (tmp_path / "db" / LOG_NAME).read_bytes()[:len(FILE_HEADER)] == FILE_HEADER


def test_one_huge_group_commit_does_not_keep_the_file_large(tmp_path):
    s = open_wal(tmp_path / "db", log_limit_bytes=8192, prealloc_bytes=4096)
    s.write({b"big": b"x" * 200_000})
    assert os.path.getsize(tmp_path / "db" / LOG_NAME) > 200_000
    s.write({b"small": b"1"})  # past the bound: a checkpoint first, which gives the space back
    assert os.path.getsize(tmp_path / "db" / LOG_NAME) <= 4 * 8192
    crash(s)
    with open_wal(tmp_path / "db") as t:
        assert t.load() == ({b"big": b"x" * 200_000, b"small": b"1"}, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_random_crashes_and_tears_lose_only_the_interrupted_write(tmp_path, seed):
    """Random group commits through checkpoints and crashes; at each crash the last record is
    torn at a random byte (cut, zeros or garbage) or left whole: what reopens is the model
    without that last write, or with it when it is whole, never anything else."""
    rng = random.Random(seed)
    path = tmp_path / "db"
    model: dict[bytes, bytes] = {}
    for _ in range(4):
        s = open_wal(path, log_limit_bytes=rng.choice([600, 3000, 1 << 20]), prealloc_bytes=4096)
        assert s.load() == (model, frozenset())
        for _ in range(rng.randint(1, 25)):
            puts = {b"k%d" % rng.randrange(20): (None if rng.random() < 0.2 else rng.randbytes(rng.randrange(120)))
                    for _ in range(rng.randint(1, 4))}
            # past the bound, a checkpoint comes first and the record starts right after the header
            start = s._end if s._end - len(FILE_HEADER) < s.log_limit else len(FILE_HEADER)
            before = dict(model)
            s.write(puts)
            end = s._end
            apply(model, [puts])
        crash(s)
        how = rng.choice(["whole", "truncate", "zeros", "garbage"])
        if how != "whole":
            data = bytearray((path / LOG_NAME).read_bytes())
            cut = rng.randrange(start, end)
            if how == "truncate":
                del data[cut:]
            else:
                data[cut:end] = bytes(end - cut) if how == "zeros" else rng.randbytes(end - cut)
            (path / LOG_NAME).write_bytes(bytes(data))
            model = before
    with open_wal(path) as t:
        assert t.load() == (model, frozenset())
