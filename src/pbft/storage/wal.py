"""``WalStore``: the durable mode's store, an append-only write-ahead log in front of an LMDB
store, with **one fdatasync per group commit** (an LMDB commit with sync costs two).

Layout, in the store directory: LMDB's ``data.mdb`` holds the state as of the last log
checkpoint (every LMDB commit of this store is a synced one, so it is always a consistent
snapshot), and ``wal`` holds every group commit since, in order.  An in-memory overlay of the
log's puts (None = deleted) answers reads in front of LMDB.

``write(puts)`` frames the puts (the checksum of ``store``), appends them to the log as one
record and fdatasyncs the log once: when it returns, the puts survive a power loss.  A
**checkpoint** (when the log exceeds ``log_limit_bytes``; at ``checkpoint``; at opening, of
what the replay found; not at ``flush``, which has nothing to do) writes the overlay
into LMDB in one synced transaction that also records the log's generation as applied; the
next records start over at the beginning of the same file, under the next generation.  The
log is never dropped before LMDB holds it: a crash between the two replays an old generation's
records over a state that has them (harmless: replaying puts is idempotent), and a record of an
old generation is never taken for one of the current generation.

Log file: a 16-byte header (``PBFTWAL1`` and 8 zero bytes), then records

    tag (8) | seq (8, big-endian) | length (4) | digest (8) | payload (length bytes)

``tag`` = BLAKE2b(generation, key=the store's log key, 8 bytes): records of other generations
or of another store do not match; ``seq`` counts records from 0 in a generation; ``digest`` =
BLAKE2b keyed with the log key over the first 20 bytes and the payload.  The log key is 32
random bytes in LMDB's metadata record, created with the log: a client's request inside a
batch inside a payload can never pass for a record.  ``payload`` is msgpack of
``[key, framed value or None, ...]``.  The file grows in zero-filled steps of
``prealloc_bytes`` and is reused, so most fdatasyncs write data only, no metadata (size
``log_limit_bytes`` + the largest batch, rounded up to a step; cut back at a checkpoint when
one huge batch made it more than twice that).

Opening replays the log of the current generation in order:

* the first record that is missing, short or fails its digest ends the log **if no later
  record of the generation is intact**: a torn tail, the one write the crash interrupted,
  never acknowledged: discarded;
* if a later record is intact, the bad stretch is **corruption** of acknowledged writes: the
  records after it are replayed, the bad record's own puts are kept as they are, so that the
  ones whose framing fails are reported as damaged keys by ``load`` and raise
  ``CorruptRecord`` on ``get`` (as a damaged LMDB record does), and if some of its content
  cannot be read (its length or its encoding damaged, or a deletion, which has no checksum of
  its own) the keys of ``UNREADABLE`` are reported damaged as well: for a replica, its view
  and checkpoint records, so that it neither trusts its log nor executes before a state
  transfer (``core.durability.restore``).

Then the replayed overlay is checkpointed and a new generation begins.  A directory written
by ``LmdbStore`` (no log, no log key) opens as a WAL store with nothing to replay.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Optional

import msgpack

from .lmdb import LmdbStore
from .store import MAX_KEY, META_KEY, Store, StoreError, framed_puts

LOG_NAME = "wal"
FILE_HEADER = b"PBFTWAL1" + bytes(8)
HEAD = struct.Struct(">8sQI8s")  # tag, seq, length, digest
LOG_LIMIT = 64 << 20
PREALLOC = 1 << 20
MAX_RECORD = (1 << 32) - 1
# reported damaged when a damaged log record cannot be read whole: the replica's view record
# (its log is then discarded) and its checkpoint record (its state is fetched before it executes)
UNREADABLE = (b"v", b"s")
_MISSING = object()


class WalStore(Store):
    """A durable store in directory ``path`` owned by ``owner`` (see the module's docstring).

    The same interface and guarantees as ``LmdbStore(durable=True)``: ``write`` is atomic and
    survives a power loss once it returns; reads verify each record's checksum.  A failed
    append (e.g. ENOSPC) raises :class:`StoreError` and leaves the store usable, the write
    undone; a failed fdatasync leaves the log's state unknown, so the store refuses every later
    write (reopen it: the replay decides).  Not thread-safe: one caller at a time.
    """

    def __init__(self, path: str | os.PathLike[str], owner: str, map_size_bytes: int = 1 << 34,
                 log_limit_bytes: int = LOG_LIMIT, prealloc_bytes: int = PREALLOC) -> None:
        self.path: str = os.fspath(path)
        self.owner = owner
        self.durable = True
        self.log_limit = log_limit_bytes
        self.prealloc = max(4096, prealloc_bytes)
        self.stats = {"writes": 0, "bytes_written": 0, "sync_seconds": 0.0, "checkpoints": 0,
                      "checkpoint_seconds": 0.0, "replayed": 0, "torn_tail": 0, "corrupt_records": 0}
        self._fd: Optional[int] = None
        self._broken: Optional[str] = None
        self._overlay: dict[bytes, Optional[bytes]] = {}
        self._db: Optional[LmdbStore] = None
        try:
            self._lock_log()  # before LMDB: a second opener must not touch the environment
            self._db = LmdbStore(path, owner, durable=True, map_size_bytes=map_size_bytes)
            self._open_log()
        except OSError as e:
            self.close()
            raise StoreError(f"cannot open the log of store {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    # -- opening and replay ---------------------------------------------------

    def _lock_log(self) -> None:
        if not os.path.isdir(self.path):
            os.makedirs(self.path, mode=0o700)
            os.chmod(self.path, 0o700)
        log_path = os.path.join(self.path, LOG_NAME)
        self._created = not os.path.exists(log_path)
        self._fd = fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"store {self.path} is in use by another process") from None

    def _open_log(self) -> None:
        db = self._base()
        meta = db._meta()
        key, gen = meta.get("wal_key"), meta.get("wal_gen", 0)
        if not isinstance(key, bytes) or len(key) != 32 or not isinstance(gen, int) or gen < 0:
            if key is not None:
                raise StoreError(f"store {self.path}: unreadable log fields in its metadata record")
            key, gen = os.urandom(32), 0  # a new store, or one written by LmdbStore: no log yet
            db._commit({}, {"wal_key": key, "wal_gen": gen})
        self._key = key
        self._set_gen(gen + 1)  # the generation the log holds now (``wal_gen`` is in LMDB)
        fd = self._fd
        assert fd is not None
        data = _read_all(fd)
        if len(data) < len(FILE_HEADER) or data[:len(FILE_HEADER)] == bytes(len(FILE_HEADER)):
            # new, or its creation was interrupted before the header reached the disk
            _pwrite_all(fd, FILE_HEADER, 0)
            os.fsync(fd)
            if self._created or not data:
                _fsync_dir(self.path)
            data = FILE_HEADER + data[len(FILE_HEADER):]  # records carry their own tags: still replayed
        elif data[:len(FILE_HEADER)] != FILE_HEADER:
            raise StoreError(f"store {self.path}: {LOG_NAME} is not a write-ahead log of this format")
        self._alloc = len(data)
        self._end = len(FILE_HEADER)
        self._seq = 0
        if self._replay(data):
            self._checkpoint()  # the replayed records into LMDB; the next records: a new generation

    def _replay(self, data: bytes) -> bool:
        """Replays the current generation's records into the overlay; whether there were any
        (intact, damaged or torn)."""
        off, seq, seen = len(FILE_HEADER), 0, False
        while True:
            rec = self._record_at(data, off, seq)
            if rec is not None:
                payload, nxt = rec
                entries = _decode(payload)
                if entries is None:  # digest right, content wrong: a bug of the writer, never written so
                    raise StoreError(f"store {self.path}: log record {seq} has a valid digest but no valid content")
                self._overlay.update(entries)
                self.stats["replayed"] += 1
                off, seq, seen = nxt, seq + 1, True
                continue
            later = self._next_intact(data, off + 1, seq)
            if later is None:
                if data[off:off + 8] == self._tag:
                    self.stats["torn_tail"] += 1
                    seen = True
                return seen
            pos, later_seq = later
            self.stats["corrupt_records"] += later_seq - seq
            self._salvage(data, off, pos, seq, later_seq)
            off, seq, seen = pos, later_seq, True

    def _record_at(self, data: bytes, off: int, seq: int) -> Optional[tuple[bytes, int]]:
        """(payload, next offset) of the intact record ``seq`` at ``off``, else None."""
        if off + HEAD.size > len(data):
            return None
        tag, s, length, digest = HEAD.unpack_from(data, off)
        end = off + HEAD.size + length
        if tag != self._tag or s != seq or end > len(data):
            return None
        payload = data[off + HEAD.size:end]
        if self._digest(data[off:off + 20], payload) != digest:
            return None
        return payload, end

    def _next_intact(self, data: bytes, start: int, seq: int) -> Optional[tuple[int, int]]:
        """(offset, seq) of the first intact record of this generation after ``start`` numbered
        above ``seq``, else None."""
        pos = data.find(self._tag, start)
        while pos != -1:
            if pos + HEAD.size <= len(data):
                s = HEAD.unpack_from(data, pos)[1]
                if s > seq and self._record_at(data, pos, s) is not None:
                    return pos, s
            pos = data.find(self._tag, pos + 1)
        return None

    def _salvage(self, data: bytes, off: int, pos: int, seq: int, later_seq: int) -> None:
        """The damaged records ``seq`` .. ``later_seq - 1`` in ``data[off:pos]``: one record whose
        header and encoding survived keeps its puts (damaged values stay damaged: reported);
        anything else also marks ``UNREADABLE`` damaged."""
        entries = None
        if later_seq == seq + 1 and off + HEAD.size <= pos:
            length = HEAD.unpack_from(data, off)[2]
            if off + HEAD.size + length == pos:
                entries = _decode(data[off + HEAD.size:pos])
        if entries is not None:
            self._overlay.update(entries)
        if entries is None or any(v is None for v in entries.values()):
            for key in UNREADABLE:
                self._overlay[key] = b""  # shorter than a checksum: never intact

    # -- writing --------------------------------------------------------------

    def write(self, puts: Mapping[bytes, Optional[bytes]]) -> None:
        framed = framed_puts(puts)  # invalid keys refuse the whole write, before anything
        fd = self._usable()
        if not framed:
            return  # nothing to append, and every earlier write is already durable: no fdatasync
        if self._end - len(FILE_HEADER) >= self.log_limit:
            self._checkpoint()  # first: if it fails, this write has not happened
        payload = msgpack.packb([x for item in framed.items() for x in item], use_bin_type=True)
        if len(payload) > MAX_RECORD:
            raise StoreError(f"write of {len(payload)} bytes to store {self.path}: more than a log record holds")
        head = HEAD.pack(self._tag, self._seq, len(payload), b"")[:20]
        record = head + self._digest(head, payload) + payload
        end = self._end + len(record)
        try:
            if end > self._alloc:
                self._grow(end)
            _pwrite_all(fd, record, self._end)
        except OSError as e:
            # nothing acknowledged: the next record overwrites these bytes; a crash now leaves them
            # as a torn tail, which the replay discards
            raise StoreError(f"write failed on store {self.path}: {e.strerror or e}") from None
        start = time.perf_counter()
        try:
            os.fdatasync(fd)
        except OSError as e:
            self._broken = f"fdatasync of its log failed ({e.strerror or e})"
            raise StoreError(f"write failed on store {self.path}: {self._broken}") from None
        self.stats["sync_seconds"] += time.perf_counter() - start
        self._overlay.update(framed)
        self._end, self._seq = end, self._seq + 1
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(record)

    def _grow(self, end: int) -> None:
        """Zero-fills the file up to ``end`` rounded up to a step: the records then overwrite
        allocated blocks, and their fdatasync has no file size or extent to write."""
        assert self._fd is not None
        target = -(-end // self.prealloc) * self.prealloc
        zeros = bytes(min(target - self._alloc, 1 << 20))
        at = self._alloc
        while at < target:
            at += os.pwrite(self._fd, zeros[:target - at], at)
        self._alloc = target

    def _checkpoint(self) -> None:
        """The overlay into LMDB with the generation it completes, in one synced transaction;
        then the log starts over under the next generation."""
        start = time.perf_counter()
        try:
            self._base()._commit(self._overlay, {"wal_gen": self._gen})
        except StoreError as e:
            if "store full" not in str(e):
                self._broken = f"a checkpoint of its log failed ({e})"
            raise
        self._overlay = {}
        self._set_gen(self._gen + 1)
        self._end, self._seq = len(FILE_HEADER), 0
        keep = -(-(self.log_limit + len(FILE_HEADER)) // self.prealloc) * self.prealloc + self.prealloc
        if self._alloc > 2 * keep:  # one huge group commit grew the file: give the space back
            assert self._fd is not None
            try:
                os.ftruncate(self._fd, keep)
                self._alloc = keep
            except OSError:
                pass  # the file stays as large as it was: still a valid log
        self.stats["checkpoints"] += 1
        self.stats["checkpoint_seconds"] += time.perf_counter() - start

    def flush(self) -> None:
        """Nothing to do: every write is on stable storage when it returns.  A clean stop (the
        runtime flushes, then closes) leaves the log as it is: the next start replays it from the
        disk, as after a crash, so a recovery reboot reloads what is on disk, not this process's
        memory.  Refused after a failed fdatasync (the last write's fate is unknown)."""
        self._usable()

    def checkpoint(self) -> None:
        """The log's writes into LMDB now (synced), and the log starts over."""
        self._usable()
        if self._overlay or self._seq:
            self._checkpoint()

    # -- reading --------------------------------------------------------------

    def _raw_get(self, key: bytes) -> Optional[bytes]:
        db = self._base()
        value = self._overlay.get(key, _MISSING)
        if value is _MISSING:
            return db._raw_get(key)
        return value  # type: ignore[return-value]  # bytes or None (deleted)

    def _raw_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        over = sorted((k, v) for k, v in self._overlay.items() if k.startswith(prefix))
        i = 0
        for key, framed in self._base()._raw_scan(prefix):
            while i < len(over) and over[i][0] < key:
                if over[i][1] is not None:
                    yield over[i]  # type: ignore[misc]
                i += 1
            if i < len(over) and over[i][0] == key:
                if over[i][1] is not None:
                    yield over[i]  # type: ignore[misc]
                i += 1
            else:
                yield key, framed
        for k, v in over[i:]:
            if v is not None:
                yield k, v

    # -- plumbing -------------------------------------------------------------

    def _base(self) -> LmdbStore:
        if self._db is None:
            raise StoreError(f"store {self.path} is closed")
        return self._db

    def _usable(self) -> int:
        self._base()
        if self._broken is not None:
            raise StoreError(f"store {self.path} refuses writes: {self._broken}; reopen it")
        assert self._fd is not None
        return self._fd

    def _set_gen(self, gen: int) -> None:
        self._gen = gen
        self._tag = hashlib.blake2b(gen.to_bytes(8, "big"), key=self._key, digest_size=8).digest()

    def _digest(self, head: bytes, payload: bytes) -> bytes:
        h = hashlib.blake2b(head, key=self._key, digest_size=8)
        h.update(payload)
        return h.digest()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


def open_store(path: str | os.PathLike[str], owner: str, mode: str, map_size_bytes: int = 1 << 34) -> Store:
    """The store of a storage mode: ``durable`` a :class:`WalStore`, ``fast`` an unsynced
    :class:`LmdbStore`; a fast store opened on a directory with a log first checkpoints it (the
    writes it holds are in LMDB) and removes it."""
    if mode == "durable":
        return WalStore(path, owner, map_size_bytes=map_size_bytes)
    if mode != "fast":
        raise ValueError(f"no store for storage mode {mode!r}")
    log_path = os.path.join(os.fspath(path), LOG_NAME)
    if os.path.exists(log_path):
        wal = WalStore(path, owner, map_size_bytes=map_size_bytes)
        try:
            wal.checkpoint()
            os.unlink(log_path)
        except OSError as e:
            raise StoreError(f"cannot remove the log of store {wal.path}: {e.strerror or e}") from None
        finally:
            wal.close()
    return LmdbStore(path, owner, durable=False, map_size_bytes=map_size_bytes)


def _decode(payload: bytes) -> Optional[dict[bytes, Optional[bytes]]]:
    """The puts of a record's payload, or None if it is not a valid one."""
    try:
        items = msgpack.unpackb(payload, use_list=True, raw=True)
    except Exception:  # noqa: BLE001 - damaged bytes: any decoding error
        return None
    if not isinstance(items, list) or len(items) % 2:
        return None
    out: dict[bytes, Optional[bytes]] = {}
    for i in range(0, len(items), 2):
        k, v = items[i], items[i + 1]
        if not isinstance(k, bytes) or not 0 < len(k) <= MAX_KEY or k == META_KEY:
            return None
        if v is not None and not isinstance(v, bytes):
            return None
        out[k] = v
    return out


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, at = [], 0
    while at < size:
        chunk = os.pread(fd, min(size - at, 16 << 20), at)
        if not chunk:
            break
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, "short write")  # ENOSPC
        view, offset = view[n:], offset + n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
