"""Durable key-value storage for replica state.

Two implementations share one interface (:class:`Store`): :class:`LmdbStore`
(a real disk, via LMDB) and :class:`MemStore` (a simulated disk for the
deterministic simulator, with fault injection).

fsync policy
  * durable mode: every :meth:`Store.write` is one group commit (one write
    transaction for all of its puts), fsynced before ``write`` returns. An
    acknowledged write survives a simultaneous power loss of every machine.
  * fast mode: commits are not fsynced (LMDB ``sync=False, metasync=False``).
    This relies on independent failures: a power loss may lose the last
    writes of that replica (never reorder or mix them: LMDB commits are still
    atomic), and the replica recovers what it lost by state transfer from
    the others. :meth:`Store.flush` forces an fsync, e.g. at shutdown.

Record framing
  Every stored value is ``checksum(8) + value``, where ``checksum =
  blake2b(len(key).to_bytes(4, "big") + key + value, digest_size=8)``. Reads
  verify it and raise :class:`CorruptRecord` on a mismatch, so a torn write or
  a flipped bit is detected instead of returning a wrong value silently;
  :meth:`Store.verify_all` checks every record (full check at recovery).
"""

from __future__ import annotations

import abc
import hashlib
import os
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import lmdb
import msgpack

MAX_KEY = 500
META_KEY = b"\x00meta"
FORMAT = 1
_SCAN_CHUNK = 1024


class StoreError(Exception):
    """The store is unusable or an operation on it failed."""


class CorruptRecord(StoreError):
    """A record's checksum does not match: a torn write or on-disk corruption."""

    def __init__(self, key: bytes, path: Optional[str] = None) -> None:
        self.key = key
        where = f" in store {path}" if path else ""
        super().__init__(f"corrupt record {key.hex()}{where}")


def frame(key: bytes, value: bytes) -> bytes:
    digest = hashlib.blake2b(len(key).to_bytes(4, "big") + key + value, digest_size=8)
    return digest.digest() + value


def intact(key: bytes, framed: bytes) -> bool:
    return len(framed) >= 8 and frame(key, framed[8:])[:8] == framed[:8]


def unframe(key: bytes, framed: bytes, path: Optional[str] = None) -> bytes:
    if not intact(key, framed):
        raise CorruptRecord(key, path)
    return framed[8:]


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes):
        raise TypeError(f"store keys are bytes, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"store key length {len(key)} not in 1..{MAX_KEY}")
    if key == META_KEY:
        raise ValueError("store key \\x00meta is reserved")
    return key


def _framed_puts(puts: Mapping[bytes, Optional[bytes]]) -> dict[bytes, Optional[bytes]]:
    """Validates keys and frames values (None = delete), keeping the puts' order."""
    return {_check_key(k): None if v is None else frame(k, bytes(v)) for k, v in puts.items()}


class Store(abc.ABC):
    """Interface: group-committed writes, checksum-verified reads."""

    path: Optional[str] = None
    stats: dict[str, int | float]

    @abc.abstractmethod
    def write(self, puts: Mapping[bytes, Optional[bytes]]) -> None:
        """Applies all puts (None = delete) atomically, as one group commit."""

    @abc.abstractmethod
    def _raw_get(self, key: bytes) -> Optional[bytes]: ...

    @abc.abstractmethod
    def _raw_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, framed value) in key order, including the metadata record."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Forces everything written so far to stable storage."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def get(self, key: bytes) -> Optional[bytes]:
        framed = self._raw_get(_check_key(key))
        return None if framed is None else unframe(key, framed, self.path)

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) for keys starting with prefix, in sorted key order."""
        for key, framed in self._raw_scan(prefix):
            if key != META_KEY:
                yield key, unframe(key, framed, self.path)

    def load(self) -> tuple[dict[bytes, bytes], frozenset[bytes]]:
        """Every intact record (metadata excluded) and the keys of the damaged ones: what a
        replica restarting from this store gets (``Replica.restore``)."""
        good: dict[bytes, bytes] = {}
        bad = set()
        for k, framed in self._raw_scan(b""):
            if k == META_KEY:
                continue
            if intact(k, framed):
                good[k] = framed[8:]
            else:
                bad.add(k)
        return good, frozenset(bad)

    def verify_all(self) -> list[bytes]:
        """Keys of all records whose checksum fails (a full scan)."""
        return [k for k, framed in self._raw_scan(b"") if not intact(k, framed)]

    def delete_prefix(self, prefix: bytes) -> dict[bytes, Optional[bytes]]:
        """Puts deleting every key with this prefix (corrupt records included)."""
        return {k: None for k, _ in self._raw_scan(prefix) if k != META_KEY}

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LmdbStore(Store):
    """A store in one LMDB environment in directory ``path``, owned by ``owner``.

    ``owner`` (e.g. ``"cluster-id/replica-3"``) is recorded when ``data.mdb``
    is created; a directory of another owner or format, or an existing
    ``data.mdb`` without that record, is refused with :class:`StoreError`.
    Damaged files and LMDB failures surface as :class:`StoreError` too.
    """

    def __init__(self, path: str | os.PathLike[str], owner: str, durable: bool = True,
                 map_size_bytes: int = 1 << 34) -> None:
        self.path = os.fspath(path)
        self.owner = owner
        self.durable = durable
        self.stats = {"writes": 0, "bytes_written": 0, "sync_seconds": 0.0}
        self._env: Optional[lmdb.Environment] = None
        try:
            if not os.path.isdir(self.path):
                os.makedirs(self.path, mode=0o700)
                os.chmod(self.path, 0o700)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.path}: {e.strerror or e}") from None
        existed = os.path.exists(os.path.join(self.path, "data.mdb"))
        try:
            self._env = lmdb.open(self.path, map_size=map_size_bytes, subdir=True, max_dbs=0,
                                  readahead=False, lock=True, sync=durable, metasync=durable,
                                  mode=0o600, create=True)
            self._check_size()
            self._check_meta(existed)
        except lmdb.Error as e:
            self.close()
            raise StoreError(f"cannot open store {self.path}: {_describe(e)}") from None
        except StoreError:
            self.close()
            raise

    def _check_size(self) -> None:
        # LMDB reads pages through mmap: a truncated data.mdb would crash the
        # process with SIGBUS on the first read, so check the size up front.
        assert self._env is not None
        needed = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        size = os.path.getsize(os.path.join(self.path, "data.mdb"))
        if size < needed:
            raise StoreError(f"store {self.path} is damaged: data.mdb truncated "
                             f"({size} bytes, needs {needed})")

    def _check_meta(self, existed: bool) -> None:
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            framed = txn.get(META_KEY)
            if framed is None and not existed:
                meta = {"format": FORMAT, "owner": self.owner}
                txn.put(META_KEY, frame(META_KEY, msgpack.packb(meta)))
        if framed is None:
            if existed:  # e.g. data.mdb truncated to 0 bytes, which LMDB re-initialises
                raise StoreError(f"store {self.path} has no metadata record (damaged, or its "
                                 "creation was interrupted); refusing to use it")
            self._env.sync(True)
            return
        try:
            meta = msgpack.unpackb(unframe(META_KEY, framed, self.path))
        except CorruptRecord:
            raise
        except Exception:
            raise StoreError(f"store {self.path}: unreadable metadata record") from None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise StoreError(f"store {self.path} has format {fmt!r}, expected {FORMAT}")
        if meta.get("owner") != self.owner:
            raise StoreError(f"store {self.path} belongs to {meta.get('owner')!r}, not {self.owner!r}")

    def _live(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError(f"store {self.path} is closed")
        return self._env

    def _fail(self, what: str, e: lmdb.Error) -> StoreError:
        if isinstance(e, lmdb.MapFullError):
            return StoreError("store full: raise map_size_bytes")
        return StoreError(f"{what} failed on store {self.path}: {_describe(e)}")

    def write(self, puts: Mapping[bytes, Optional[bytes]]) -> None:
        framed = _framed_puts(puts)
        env = self._live()
        try:
            txn = env.begin(write=True)
            try:
                for key, value in framed.items():
                    if value is None:
                        txn.delete(key)
                    else:
                        txn.put(key, value)
                start = time.perf_counter()
                txn.commit()
            except BaseException:
                txn.abort()
                raise
        except lmdb.Error as e:
            raise self._fail("write", e) from None
        self.stats["sync_seconds"] += time.perf_counter() - start
        self.stats["writes"] += 1
        self.stats["bytes_written"] += sum(len(k) + len(v or b"") for k, v in framed.items())

    def _raw_get(self, key: bytes) -> Optional[bytes]:
        try:
            with self._live().begin() as txn:
                return txn.get(key)
        except lmdb.Error as e:
            raise self._fail("read", e) from None

    def _raw_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # Each chunk is read in its own short read transaction and yielded
        # after it ends, so no transaction stays open across caller code.
        # Consistent snapshot within a chunk only (writes between chunks show).
        start = prefix
        while True:
            chunk: list[tuple[bytes, bytes]] = []
            try:
                with self._live().begin() as txn:
                    cur = txn.cursor()
                    if cur.set_range(start):
                        for key, value in cur:
                            if not key.startswith(prefix):
                                break
                            chunk.append((key, value))
                            if len(chunk) >= _SCAN_CHUNK:
                                break
            except lmdb.Error as e:
                raise self._fail("scan", e) from None
            yield from chunk
            if len(chunk) < _SCAN_CHUNK:
                return
            start = chunk[-1][0] + b"\x00"

    def flush(self) -> None:
        try:
            self._live().sync(True)
        except lmdb.Error as e:
            raise self._fail("flush", e) from None

    def close(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            env.close()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


class MemStore(Store):
    """A simulated disk: no real I/O, no clock, randomness only from passed-in rngs.

    ``synced`` holds framed values as on disk; ``unsynced`` holds pending
    (fast-mode) transactions of framed puts, which reach ``synced`` on
    :meth:`flush` or automatically every ``fast_sync_every`` writes. Reads see
    synced + unsynced, like a page cache. A process crash keeps the unsynced
    writes (the OS page cache survives: the simulator just keeps using this
    object, and :meth:`close` is a no-op); :meth:`power_loss` drops them.
    """

    def __init__(self, durable: bool = True, fast_sync_every: int = 64) -> None:
        self.durable = durable
        self.fast_sync_every = fast_sync_every
        self.synced: dict[bytes, bytes] = {}
        self.unsynced: list[dict[bytes, Optional[bytes]]] = []
        self._view: dict[bytes, bytes] = {}
        self.stats = {"writes": 0, "bytes_written": 0, "sync_seconds": 0.0}

    def write(self, puts: Mapping[bytes, Optional[bytes]]) -> None:
        txn = _framed_puts(puts)
        _apply(self._view, txn)
        if self.durable:
            _apply(self.synced, txn)
        else:
            self.unsynced.append(txn)
            if len(self.unsynced) >= self.fast_sync_every:
                self.flush()
        self.stats["writes"] += 1
        self.stats["bytes_written"] += sum(len(k) + len(v or b"") for k, v in txn.items())

    def _raw_get(self, key: bytes) -> Optional[bytes]:
        return self._view.get(key)

    def _raw_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(k for k in self._view if k.startswith(prefix))
        return iter([(k, self._view[k]) for k in keys])

    def flush(self) -> None:
        for txn in self.unsynced:
            _apply(self.synced, txn)
        self.unsynced.clear()

    def close(self) -> None:
        pass

    # -- fault injection ------------------------------------------------------

    def power_loss(self, rng: random.Random, torn: bool = False) -> int:
        """Drops unsynced txns (returns how many were pending). If ``torn``, a
        prefix of the first one's puts may reach the disk, the last of them cut
        to a random prefix of its framed bytes."""
        pending = len(self.unsynced)
        if torn and self.unsynced:
            items = list(self.unsynced[0].items())
            n = rng.randint(0, len(items))
            for i, (key, value) in enumerate(items[:n]):
                if value is None:
                    self.synced.pop(key, None)
                else:
                    self.synced[key] = value[:rng.randint(0, len(value))] if i == n - 1 else value
        self.unsynced.clear()
        self._view = dict(self.synced)
        return pending

    def _source(self, key: bytes) -> dict[bytes, Any]:
        """Where the visible copy of key lives: the newest unsynced txn writing it, or synced."""
        for txn in reversed(self.unsynced):
            if key in txn:
                if txn[key] is None:
                    break
                return txn
        else:
            if key in self.synced:
                return self.synced
        raise KeyError(key)

    def _mutate(self, key: bytes, framed: bytes) -> None:
        self._source(key)[key] = framed
        self._view[key] = framed

    def corrupt(self, key: bytes, rng: random.Random) -> None:
        """Flips one random bit of the stored framed value (KeyError if absent)."""
        framed = bytearray(self._source(key)[key])
        if framed:
            bit = rng.randrange(len(framed) * 8)
            framed[bit // 8] ^= 1 << (bit % 8)
            self._mutate(key, bytes(framed))

    def forge(self, key: bytes, value: bytes) -> None:
        """Replace a stored record by ``value`` *with a valid checksum* (an attacker who
        can write the disk): only the checkpoint digest can tell."""
        framed = frame(key, value)
        self._view[key] = framed
        self.synced[key] = framed

    def truncate(self, key: bytes, nbytes: int) -> None:
        """Cuts the stored framed value to its first nbytes (KeyError if absent)."""
        self._mutate(key, self._source(key)[key][:nbytes])

    def corrupt_random(self, rng: random.Random, count: int) -> list[bytes]:
        """Corrupts ``count`` random distinct records; returns their keys (sorted)."""
        keys = rng.sample(sorted(self._view), min(count, len(self._view)))
        for key in keys:
            self.corrupt(key, rng)
        return sorted(keys)


def _apply(target: dict[bytes, Any], txn: Mapping[bytes, Optional[bytes]]) -> None:
    for key, value in txn.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
