"""``LmdbStore``: a :class:`~pbft.storage.store.Store` on a real disk, one LMDB environment per
replica directory (durable mode: fsync per group commit; fast mode: none, see ``store``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Optional

import lmdb
import msgpack

from .store import FORMAT, META_KEY, CorruptRecord, Store, StoreError, frame, framed_puts, unframe

_SCAN_CHUNK = 1024


class LmdbStore(Store):
    """A store in one LMDB environment in directory ``path``, owned by ``owner``.

    ``owner`` (e.g. ``"cluster-id/replica-3"``) is recorded when ``data.mdb``
    is created; a directory of another owner or format, or an existing
    ``data.mdb`` without that record, is refused with :class:`StoreError`.
    Damaged files and LMDB failures surface as :class:`StoreError` too.
    """

    def __init__(self, path: str | os.PathLike[str], owner: str, durable: bool = True,
                 map_size_bytes: int = 1 << 34) -> None:
        self.path: str = os.fspath(path)
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
        self._commit(framed_puts(puts))

    def _commit(self, framed: Mapping[bytes, Optional[bytes]], meta: Optional[dict] = None) -> None:
        """One write transaction of already framed puts (None = delete), and, with ``meta``, these
        fields merged into the metadata record in the same transaction (``WalStore``'s checkpoint)."""
        env = self._live()
        try:
            txn = env.begin(write=True)
            try:
                for key, value in framed.items():
                    if value is None:
                        txn.delete(key)
                    else:
                        txn.put(key, value)
                if meta:
                    txn.put(META_KEY, frame(META_KEY, msgpack.packb({**self._meta(txn), **meta})))
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

    def _meta(self, txn: Optional[lmdb.Transaction] = None) -> dict:
        """The metadata record (checked at open: it is there and intact)."""
        if txn is None:
            with self._live().begin() as t:
                return self._meta(t)
        framed = txn.get(META_KEY)
        meta = msgpack.unpackb(unframe(META_KEY, framed, self.path)) if framed is not None else None
        if not isinstance(meta, dict):
            raise StoreError(f"store {self.path}: unreadable metadata record")
        return meta

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
