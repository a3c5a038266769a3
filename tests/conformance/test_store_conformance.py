"""The ``Store`` contract, checked against every implementation (``helpers.impls.STORES``,
through the ``store`` fixture): group-committed writes (None deletes), checksum-verified reads,
ordered prefix scans, ``load`` / ``verify_all`` / ``delete_prefix``, key validation that rejects
a whole write, and contents that survive ``flush`` and a reopen."""

from __future__ import annotations

import random

import pytest

from helpers.impls import MAX_KEY, META_KEY, STORES, Store


def contents(store) -> dict[bytes, bytes]:
    return dict(store.scan(b""))


def test_every_store_of_the_library_is_in_the_suite(tmp_path):
    import pbft.storage  # noqa: F401 - imports every implementation
    def subclasses(c):
        return {c, *(s for d in c.__subclasses__() for s in subclasses(d))}
    library = {c for c in subclasses(Store) if c.__module__.startswith("pbft.")} - {Store}
    tested = set()
    for impl in STORES:
        s = impl.open(tmp_path / impl.name)
        tested.add(type(s))
        s.close()
    assert library <= tested, f"add {sorted(c.__name__ for c in library - tested)} to helpers.impls.STORES"


def test_missing_key_reads_none(store):
    assert store.get(b"nothing") is None
    assert list(store.scan(b"")) == []
    assert store.load() == ({}, frozenset())


def test_write_get_overwrite_delete(store):
    store.write({b"a": b"1", b"b": b"", b"c": b"3" * 1000})
    assert (store.get(b"a"), store.get(b"b"), store.get(b"c")) == (b"1", b"", b"3" * 1000)
    store.write({b"a": b"2", b"c": None, b"d": bytearray(b"4")})
    assert contents(store) == {b"a": b"2", b"b": b"", b"d": b"4"}
    store.write({b"absent": None})  # deleting what is not there is no error
    assert contents(store) == {b"a": b"2", b"b": b"", b"d": b"4"}


def test_scan_is_ordered_by_key_and_limited_to_the_prefix(store):
    keys = [bytes([p]) + b"%04d" % i for p in (1, 2, 3) for i in range(700)]  # > one LMDB scan chunk
    random.Random(3).shuffle(keys)
    store.write({k: k[::-1] for k in keys})
    assert [k for k, _ in store.scan(b"\x02")] == sorted(k for k in keys if k[0] == 2)
    assert all(v == k[::-1] for k, v in store.scan(b"\x02"))
    everything = [k for k, _ in store.scan()]
    assert everything == sorted(keys) and META_KEY not in everything
    assert list(store.scan(b"\x09")) == []


def test_load_verify_all_and_delete_prefix(store):
    store.write({b"p/1": b"x", b"p/2": b"y", b"q/1": b"z"})
    assert store.load() == ({b"p/1": b"x", b"p/2": b"y", b"q/1": b"z"}, frozenset())
    assert store.verify_all() == []
    puts = store.delete_prefix(b"p/")
    assert puts == {b"p/1": None, b"p/2": None}
    assert contents(store) == {b"p/1": b"x", b"p/2": b"y", b"q/1": b"z"}  # only puts, not applied
    store.write(puts)
    assert contents(store) == {b"q/1": b"z"}


@pytest.mark.parametrize("bad, error", [
    ("text", TypeError), (b"", ValueError), (b"k" * (MAX_KEY + 1), ValueError), (META_KEY, ValueError),
])
def test_bad_keys_are_refused_and_refuse_the_whole_write(store, bad, error):
    store.write({b"keep": b"1"})
    with pytest.raises(error):
        store.write({b"first": b"2", bad: b"3"})
    with pytest.raises(error):
        store.get(bad)
    assert contents(store) == {b"keep": b"1"}
    store.write({b"k" * MAX_KEY: b"longest"})  # the limit itself is allowed
    assert store.get(b"k" * MAX_KEY) == b"longest"


def test_writes_are_counted(store):
    before = store.stats["writes"]
    store.write({b"a": b"1"})
    store.write({b"a": None, b"b": b"2"})
    assert store.stats["writes"] == before + 2
    assert store.stats["bytes_written"] > 0


def test_contents_survive_flush_and_reopen(store_impl, tmp_path):
    s = store_impl.open(tmp_path)
    try:
        s.write({b"a": b"1", b"b": b"2"})
        s.write({b"b": None, b"c": b"3"})
        s.flush()
        assert contents(s) == {b"a": b"1", b"c": b"3"}
        s = store_impl.reopen(s, tmp_path)
        assert contents(s) == {b"a": b"1", b"c": b"3"}
        assert s.load() == ({b"a": b"1", b"c": b"3"}, frozenset())
    finally:
        s.close()


def test_random_operations_match_a_dict(store):
    """A seeded random mix of group writes, deletes and scans, against a dict as the model."""
    rng = random.Random(11)
    model: dict[bytes, bytes] = {}
    for step in range(150):
        puts = {}
        for _ in range(rng.randint(1, 6)):
            k = b"%c%d" % (rng.choice(b"abc"), rng.randrange(30))
            puts[k] = None if rng.random() < 0.3 else rng.randbytes(rng.randrange(0, 300))
        store.write(puts)
        for k, v in puts.items():
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
        if step % 10 == 0:
            flush = rng.random() < 0.5
            if flush:
                store.flush()
            prefix = rng.choice([b"", b"a", b"b1", b"c"])
            assert list(store.scan(prefix)) == sorted((k, v) for k, v in model.items() if k.startswith(prefix))
    assert store.load() == (model, frozenset())
    assert all(store.get(k) == v for k, v in model.items())


def test_context_manager_closes(store_impl, tmp_path):
    with store_impl.open(tmp_path) as s:
        s.write({b"a": b"1"})
    if store_impl.persistent:
        with store_impl.open(tmp_path) as s:
            assert s.get(b"a") == b"1"
