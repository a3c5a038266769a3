"""The storage interface of replica state: :class:`Store`, its errors and its record framing.

Two implementations share it: ``pbft.storage.lmdb.LmdbStore`` (a real disk, via
LMDB) and ``pbft.storage.memory.MemStore`` (a simulated disk for the
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
from collections.abc import Iterator, Mapping
from typing import Any, Optional

MAX_KEY = 500
META_KEY = b"\x00meta"
FORMAT = 1


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


def check_key(key: object) -> bytes:
    """``key`` if it is a valid store key (bytes of 1..MAX_KEY, not the metadata key)."""
    if not isinstance(key, bytes):
        raise TypeError(f"store keys are bytes, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"store key length {len(key)} not in 1..{MAX_KEY}")
    if key == META_KEY:
        raise ValueError("store key \\x00meta is reserved")
    return key


def framed_puts(puts: Mapping[bytes, Optional[bytes]]) -> dict[bytes, Optional[bytes]]:
    """Validates keys and frames values (None = delete), keeping the puts' order."""
    return {check_key(k): None if v is None else frame(k, bytes(v)) for k, v in puts.items()}


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
        framed = self._raw_get(check_key(key))
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

