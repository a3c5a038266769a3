"""The key-value service again, implemented differently: the same abstract objects, another
concrete layout (``pbft replica --service kv-alt``).

Replicas may run different implementations of one service as long as they agree on its
*abstract state*, the array of objects the library checkpoints, hashes and transfers (BASE,
docs/state.md).  ``get_obj`` is then an *abstraction function*, from the implementation's own
data structures to the abstract objects, and ``put_objs`` its inverse.  Running two
implementations side by side means a bug of one, or an attack that works on one, is not a
fault of every replica at once.

``KVService`` keeps its keys in a list of ``buckets`` dicts (``ObjectDict``).  This one keeps:

* one sorted index of ``(bucket, key)`` pairs, where ``bucket`` is the abstract object the key
  belongs to (``crc32(key) % buckets``, the abstract layout both implementations share), so an
  object's keys are one contiguous slice of the index, already in the object's order;
* the values and the modification times in two separate dicts (columns), not as pairs;
* the clock as a plain integer;
* the bytes of each abstract bucket (the size limit of one object), in a dict of non-empty
  buckets only.

Both produce, for every state, the same objects:

* object 0, the clock: ``msgpack(clock_ms)``;
* object ``1 + b``, bucket ``b``: ``b""`` if empty, else ``msgpack([(key, (value, mtime)), ...])``
  sorted by key;

and both refuse a put that would make a bucket's entries weigh more than ``bucket_bytes_max``,
an entry weighing ``len(msgpack((value, mtime))) + len(key) + 8`` bytes, a function of the
abstract state alone (so that a replica that executed its puts and one that fetched the bucket
decide alike).  Operations and results are ``pbft.services.kv``'s, answered identically.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left
from typing import Any

import msgpack

from ..service import Service
from .kv import KEY_SIZE_MAX, check_clock, check_entry, decode_operation, error_result, ok_result


def _pack(x: Any) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


class KVAltService(Service):
    """``KVService``'s operations and abstract objects over a sorted index and value columns."""

    def __init__(self, skew_ms: float = 1000.0, buckets: int = 16384, bucket_bytes_max: int = 1 << 20):
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self.skew_ms = skew_ms
        self.n_buckets = buckets
        self.bucket_bytes_max = bucket_bytes_max
        self.n_objects = 1 + buckets
        self.clock_ms = 0
        self.index: list[tuple[int, bytes]] = []  # (bucket, key), sorted
        self.values: dict[bytes, bytes] = {}
        self.mtimes: dict[bytes, int] = {}
        self.used: dict[int, int] = {}  # bucket -> bytes of its entries (non-empty buckets only)

    # -- layout -----------------------------------------------------------------------
    def _bucket(self, key: bytes) -> int:
        return zlib.crc32(key) % self.n_buckets

    def _slice(self, b: int) -> tuple[int, int]:
        """Where bucket ``b``'s keys are in the index."""
        lo = bisect_left(self.index, (b, b""))
        return lo, bisect_left(self.index, (b + 1, b""), lo)

    @staticmethod
    def _weight(key: bytes, value: bytes, mtime: int) -> int:
        return len(_pack((value, mtime))) + len(key) + 8

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        """``(value, mtime)`` of ``key``, or None."""
        if key not in self.values:
            return None
        return self.values[key], self.mtimes[key]

    # -- non-determinism ----------------------------------------------------------------
    def propose_nondet(self, now_ms: float) -> bytes:
        return max(int(now_ms), self.clock_ms).to_bytes(8, "big")

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        if len(value) != 8:
            return False
        return abs(int.from_bytes(value, "big") - now_ms) <= self.skew_ms

    # -- execution ----------------------------------------------------------------------
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        op = decode_operation(operation, read_only)
        if isinstance(op, bytes):
            return op
        kind, key, args = op[0], op[1], op[2:]
        if not read_only and len(nondet) == 8:
            t = int.from_bytes(nondet, "big")
            if t > self.clock_ms:
                self.modify(0)
                self.clock_ms = t
        if kind == "get" and not args:
            return ok_result(self.values.get(key))
        if kind == "mtime" and not args:
            return ok_result(self.mtimes.get(key))
        if kind == "put" and len(args) == 1 and isinstance(args[0], bytes):
            return self._put(key, args[0])
        if kind == "delete" and not args:
            return ok_result(self._delete(key))
        if kind == "cas" and len(args) == 2 and (args[0] is None or isinstance(args[0], bytes)) \
                and isinstance(args[1], bytes):
            if self.values.get(key) != args[0]:
                return ok_result(False)
            return self._put(key, args[1])
        return error_result(f"unknown or malformed operation {kind!r}")

    def _put(self, key: bytes, value: bytes) -> bytes:
        b = self._bucket(key)
        old = self.get(key)
        grow = self._weight(key, value, self.clock_ms) - (self._weight(key, *old) if old is not None else 0)
        if self.used.get(b, 0) + grow > self.bucket_bytes_max:
            return error_result("store full: the key's bucket is at its size limit")
        self.modify(1 + b)
        if old is None:
            self.index.insert(bisect_left(self.index, (b, key)), (b, key))
        self.values[key] = value
        self.mtimes[key] = self.clock_ms
        self.used[b] = self.used.get(b, 0) + grow
        return ok_result(True)

    def _delete(self, key: bytes) -> bool:
        old = self.get(key)
        if old is None:
            return False
        b = self._bucket(key)
        self.modify(1 + b)
        del self.index[bisect_left(self.index, (b, key))]
        del self.values[key], self.mtimes[key]
        left = self.used[b] - self._weight(key, *old)
        if left:
            self.used[b] = left
        else:
            del self.used[b]
        return True

    # -- the abstraction function and its inverse ------------------------------------------
    def get_obj(self, i: int) -> bytes:
        if i == 0:
            return _pack(self.clock_ms)
        lo, hi = self._slice(i - 1)
        if lo == hi:
            return b""
        values, mtimes = self.values, self.mtimes
        return _pack([(k, (values[k], mtimes[k])) for _, k in self.index[lo:hi]])

    def _parse(self, i: int, data: bytes) -> Any:
        """Object ``i``'s bytes as the clock or the sorted entries of its bucket; ValueError
        unless ``get_obj`` could have produced exactly these bytes."""
        if type(data) is not bytes:
            raise ValueError(f"object {i}: not bytes")
        if not 0 <= i < self.n_objects:
            raise ValueError(f"object {i} out of range")
        if i > 0 and data == b"":
            return []
        try:
            v = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several types
            raise ValueError(f"object {i}: not msgpack") from e
        if i == 0:
            check_clock(v)
        else:
            if not isinstance(v, tuple) or not v:
                raise ValueError(f"bucket {i - 1}: not a list of pairs")
            prev = None
            for p in v:
                if not (isinstance(p, tuple) and len(p) == 2 and type(p[0]) is bytes):
                    raise ValueError(f"bucket {i - 1}: bad entry")
                k, entry = p
                if prev is not None and k <= prev:
                    raise ValueError(f"bucket {i - 1}: keys not sorted")
                if len(k) > KEY_SIZE_MAX or self._bucket(k) != i - 1:
                    raise ValueError(f"bucket {i - 1}: key in the wrong bucket")
                check_entry(entry)
                prev = k
        if _pack(v) != data:
            raise ValueError(f"object {i}: not in its canonical encoding")
        return v

    def put_objs(self, objs: dict[int, bytes]) -> None:
        parsed = [(i, self._parse(i, data)) for i, data in objs.items()]  # all checked before any change
        for i, v in parsed:
            if i == 0:
                self.clock_ms = v
                continue
            b = i - 1
            lo, hi = self._slice(b)
            for _, k in self.index[lo:hi]:
                del self.values[k], self.mtimes[k]
            self.index[lo:hi] = [(b, k) for k, _ in v]
            for k, (value, mtime) in v:
                self.values[k] = value
                self.mtimes[k] = mtime
            total = sum(self._weight(k, value, mtime) for k, (value, mtime) in v)
            if total:
                self.used[b] = total
            else:
                self.used.pop(b, None)
