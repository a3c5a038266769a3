"""Helpers for services whose state the library checkpoints object by object.

A service in the *object form* declares ``n_objects`` and implements ``get_obj(i)`` /
``put_objs({i: bytes})``; before it changes object ``i`` it calls ``self.modify(i)``
(the library binds ``modify`` when the replica starts).  These helpers do that
bookkeeping, so that a service author rarely handles objects by hand:

* :class:`ObjectDict`: a mapping from bytes keys to msgpack-able values, spread over a
  fixed number of buckets by a hash of the key; each bucket is one object.
* :class:`Pages`: a byte array of fixed-size pages (the original library's form);
  ``write(offset, data)`` marks the pages it touches.
* :class:`Cell`: one small msgpack-able value as one object (counters, clocks).

Objects are canonical: two replicas with the same logical state produce the same
bytes (``ObjectDict`` sorts each bucket), which is what the partition tree compares.
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from typing import Any, Callable, Iterator, Optional, Union

import msgpack


def _noop(i: int) -> None:
    return None


def _bin_header(n: int) -> bytes:
    """msgpack's header of a ``bin`` of ``n`` bytes (what ``packb(bytes, use_bin_type=True)`` writes)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError("bytes too long for msgpack")


def _size(key: bytes, value: Any) -> int:
    """What an entry counts against its bucket's bound: ``len(packb(value)) + len(key) + 8``
    (for ``bytes``, a file's data, without encoding it)."""
    if type(value) is bytes:
        return len(value) + len(_bin_header(len(value))) + len(key) + 8
    return len(msgpack.packb(value, use_bin_type=True)) + len(key) + 8


class ObjectDict:
    """A dict of ``bytes`` keys spread over ``n_buckets`` objects numbered ``base ..``.

    ``bucket_bytes_max`` bounds one bucket's encoded size (an object must fit in a state
    transfer message): :meth:`set` raises :class:`BucketFull` beyond it.
    ``check_value`` validates values decoded by :meth:`put_obj` (raise ValueError).

    A bucket is encoded from its values every time it is read (no encoding is kept): a value
    changed in memory behind ``modify``'s back shows in the next full check (``rebuild``).
    """

    def __init__(self, n_buckets: int, base: int = 0, bucket_bytes_max: int = 1 << 20,
                 check_value: Optional[Callable[[Any], None]] = None):
        if n_buckets < 1:
            raise ValueError("n_buckets must be at least 1")
        self.n_buckets = n_buckets
        self.base = base
        self.bucket_bytes_max = bucket_bytes_max
        self.check_value = check_value
        self.buckets: list[dict[bytes, Any]] = [{} for _ in range(n_buckets)]
        self.sizes = [0] * n_buckets  # encoded size of each bucket's entries (as ``install`` counts)
        self.entry_size: dict[bytes, int] = {}
        self.modify: Callable[[int], None] = _noop

    def bucket_of(self, key: bytes) -> int:
        return zlib.crc32(key) % self.n_buckets

    # mapping interface -------------------------------------------------------
    def get(self, key: bytes, default: Any = None) -> Any:
        return self.buckets[zlib.crc32(key) % self.n_buckets].get(key, default)

    def __contains__(self, key: bytes) -> bool:
        return key in self.buckets[zlib.crc32(key) % self.n_buckets]

    def __len__(self) -> int:
        return len(self.entry_size)

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for b in self.buckets:
            yield from b.items()

    def set(self, key: bytes, value: Any) -> None:
        """Store ``value``. Its size counts against the bucket's bound as exactly what
        :meth:`install` counts for it, so a replica that fetched the bucket and one that built it
        refuse the same puts (an estimate would let the two disagree on when it is full)."""
        b = zlib.crc32(key) % self.n_buckets
        new = _size(key, value)
        grow = new - self.entry_size.get(key, 0)
        if self.sizes[b] + grow > self.bucket_bytes_max:
            raise BucketFull(f"bucket {b} would exceed {self.bucket_bytes_max} bytes")
        self.modify(self.base + b)
        self.buckets[b][key] = value
        self.sizes[b] += grow
        self.entry_size[key] = new

    def delete(self, key: bytes) -> bool:
        b = zlib.crc32(key) % self.n_buckets
        bucket = self.buckets[b]
        if key not in bucket:
            return False
        self.modify(self.base + b)
        del bucket[key]
        self.sizes[b] -= self.entry_size.pop(key)
        return True

    # object interface ---------------------------------------------------------
    def owns(self, i: int) -> bool:
        return self.base <= i < self.base + self.n_buckets

    def get_obj(self, i: int) -> bytes:
        bucket = self.buckets[i - self.base]
        if not bucket:
            return b""
        return msgpack.packb(sorted(bucket.items()), use_bin_type=True)

    def parse(self, i: int, data: bytes) -> dict[bytes, Any]:
        b = i - self.base
        if data == b"":
            return {}
        try:
            pairs = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several types
            raise ValueError(f"bucket {b}: not msgpack") from e
        if not isinstance(pairs, tuple) or not pairs:
            raise ValueError(f"bucket {b}: not a list of pairs")
        entries = {}
        prev = None
        for p in pairs:
            if not (isinstance(p, tuple) and len(p) == 2 and type(p[0]) is bytes):
                raise ValueError(f"bucket {b}: bad entry")
            k, v = p
            if prev is not None and k <= prev:
                raise ValueError(f"bucket {b}: keys not sorted")
            if zlib.crc32(k) % self.n_buckets != b:
                raise ValueError(f"bucket {b}: key in the wrong bucket")
            if self.check_value is not None:
                self.check_value(v)
            prev = k
            entries[k] = v
        return entries

    def install(self, i: int, entries: dict[bytes, Any]) -> None:
        b = i - self.base
        for k in self.buckets[b]:
            del self.entry_size[k]
        total = 0
        for k, v in entries.items():
            s = _size(k, v)
            self.entry_size[k] = s
            total += s
        self.buckets[b] = entries
        self.sizes[b] = total


class BucketFull(ValueError):
    """A value would make its bucket larger than one object may be."""


class Pages:
    """``n_pages`` pages of ``page_size`` bytes (objects ``base ..``) over one bytearray."""

    def __init__(self, n_pages: int, page_size: int = 4096, base: int = 0):
        self.n_pages = n_pages
        self.page_size = page_size
        self.base = base
        self.mem = bytearray(n_pages * page_size)
        self.modify: Callable[[int], None] = _noop

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > len(self.mem):
            raise IndexError("read outside the pages")
        return bytes(self.mem[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self.mem):
            raise IndexError("write outside the pages")
        if not data:
            return
        ps = self.page_size
        for p in range(offset // ps, (offset + len(data) - 1) // ps + 1):
            self.modify(self.base + p)
        self.mem[offset:offset + len(data)] = data

    def owns(self, i: int) -> bool:
        return self.base <= i < self.base + self.n_pages

    def get_obj(self, i: int) -> bytes:
        p = i - self.base
        ps = self.page_size
        page = bytes(self.mem[p * ps:(p + 1) * ps])
        return b"" if page.count(0) == ps else page  # an all-zero page is the empty object

    def parse(self, i: int, data: bytes) -> bytes:
        ps = self.page_size
        if data == b"":
            return bytes(ps)
        if len(data) != ps:
            raise ValueError(f"page {i - self.base}: {len(data)} bytes, expected {ps}")
        return data

    def install(self, i: int, data: bytes) -> None:
        p = i - self.base
        self.mem[p * self.page_size:(p + 1) * self.page_size] = data


class Cell:
    """One msgpack-able value as object ``index``; assign through :meth:`set`."""

    def __init__(self, index: int, value: Any, check: Optional[Callable[[Any], None]] = None):
        self.index = index
        self.value = value
        self.check = check
        self.modify: Callable[[int], None] = _noop

    def set(self, value: Any) -> None:
        if value != self.value:
            self.modify(self.index)
            self.value = value

    def owns(self, i: int) -> bool:
        return i == self.index

    def get_obj(self, i: int) -> bytes:
        return msgpack.packb(self.value, use_bin_type=True)

    def parse(self, i: int, data: bytes) -> Any:
        try:
            v = msgpack.unpackb(data, raw=False, use_list=False)
        except Exception as e:  # msgpack raises several types
            raise ValueError("cell: not msgpack") from e
        if self.check is not None:
            self.check(v)
        return v

    def install(self, i: int, value: Any) -> None:
        self.value = value


Part = Union[ObjectDict, Pages, Cell]


class ObjectSpace:
    """Several parts (ObjectDict, Pages, Cell, ...) laid out one after another as the
    objects of one service: gives ``n_objects``, ``get_obj``, ``put_objs`` and wires
    ``modify`` into every part.  Parts must be laid out with consecutive ``base``es."""

    def __init__(self, *parts: Part):
        self.parts = parts
        self.n_objects = sum(self._count(p) for p in parts)
        self.starts: list[int] = []  # each part's first object, ascending
        expect = 0
        for p in parts:
            base = p.index if isinstance(p, Cell) else p.base
            if base != expect:
                raise ValueError(f"part {type(p).__name__} starts at {base}, expected {expect}")
            self.starts.append(base)
            expect += self._count(p)

    @staticmethod
    def _count(p: Part) -> int:
        if isinstance(p, ObjectDict):
            return p.n_buckets
        if isinstance(p, Pages):
            return p.n_pages
        return 1

    def bind(self, modify: Callable[[int], None]) -> None:
        for p in self.parts:
            p.modify = modify

    def part(self, i: int) -> Part:
        if 0 <= i < self.n_objects:
            return self.parts[bisect_right(self.starts, i) - 1]
        raise IndexError(f"object {i} out of range")

    def get_obj(self, i: int) -> bytes:
        return self.part(i).get_obj(i)

    def put_objs(self, objs: dict[int, bytes]) -> None:
        # decode and check everything first, so a refused set of objects changes nothing
        parsed: list[tuple[Part, int, Any]] = []
        for i, data in objs.items():
            if type(data) is not bytes:
                raise ValueError(f"object {i}: not bytes")
            p = self.part(i)
            parsed.append((p, i, p.parse(i, data)))
        for p, i, v in parsed:
            p.install(i, v)
