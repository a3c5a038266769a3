"""A replicated key-value store: get / put / delete / compare-and-set.

Operations and results are msgpack lists (``encode_op`` / ``decode_result``):

====================================  ==========================================
operation                             result
====================================  ==========================================
``["get", key]``                      ``["ok", value-or-None]``
``["put", key, value]``               ``["ok", True]``
``["delete", key]``                   ``["ok", existed]``
``["cas", key, expected, new]``       ``["ok", swapped]`` (expected None: absent)
``["mtime", key]``                    ``["ok", ms-or-None]`` agreed time of last write
====================================  ==========================================

Errors are ``["err", reason]``: malformed operations, and mutating operations
sent as read-only.  The agreed non-deterministic value is the primary's clock
(8 bytes, milliseconds); backups accept it within ``skew_ms`` of their own
clock, and the store keeps its clock monotonic, so ``mtime`` is identical on
every replica.
"""

from __future__ import annotations

import msgpack

from ..core.reconfig import NOT_ADMITTED_RESULT
from ..service import ObjectService
from ..state.objects import BucketFull, Cell, ObjectDict, ObjectSpace

KEY_SIZE_MAX = 1024
VALUE_SIZE_MAX = 32 * 1024
MUTATING = frozenset({"put", "delete", "cas"})


def encode_op(kind: str, key: bytes, *args) -> bytes:
    return msgpack.packb([kind, key, *args], use_bin_type=True)


def decode_result(result: bytes):
    """``("ok", value)`` or ``("err", reason)``; raises ValueError on garbage."""
    try:
        r = msgpack.unpackb(result, raw=False, use_list=False)
    except Exception as e:  # msgpack raises several types
        raise ValueError("malformed result") from e
    if not (isinstance(r, tuple) and len(r) == 2 and r[0] in ("ok", "err")):
        raise ValueError("malformed result")
    return r


def error_result(reason: str) -> bytes:
    return msgpack.packb(["err", reason])


def ok_result(value) -> bytes:
    return msgpack.packb(["ok", value], use_bin_type=True)


def decode_operation(operation: bytes, read_only: bool) -> "tuple | bytes":
    """The operation as a tuple ``(kind, key, args...)``, or the error result to return: garbage
    from a (possibly faulty) client gets an error result, never a crash. Shared by every
    implementation of the service, so that all of them refuse the same operations."""
    try:
        op = msgpack.unpackb(operation, raw=False, use_list=False, max_str_len=16,
                             max_bin_len=max(KEY_SIZE_MAX, VALUE_SIZE_MAX), max_array_len=4, max_map_len=0)
    except Exception:  # noqa: BLE001 - msgpack raises several types
        return error_result("malformed operation")
    if not isinstance(op, tuple) or len(op) < 2 or not isinstance(op[0], str) or not isinstance(op[1], bytes):
        return error_result("malformed operation")
    if len(op[1]) > KEY_SIZE_MAX:
        return error_result("key too long")
    if read_only and op[0] in MUTATING:
        return error_result("mutating operation sent as read-only")
    return op


def check_entry(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 2 and type(v[0]) is bytes and type(v[1]) is int):
        raise ValueError("bad key-value entry")


def check_clock(v) -> None:
    if type(v) is not int or v < 0:
        raise ValueError("bad clock")


class KVService(ObjectService):
    """State in the object form: object 0 is the clock, objects 1.. are ``buckets``
    buckets of keys (an ``ObjectDict``), so a checkpoint hashes only the buckets
    written since the last one and state transfer moves only buckets that differ.
    One bucket holds at most ``bucket_bytes_max`` bytes (it must fit in a message).  Many small
    buckets keep what a checkpoint writes and a transfer moves close to what changed: with the
    default 16,384, a 1 GB store has buckets of about 64 KB."""

    def __init__(self, skew_ms: float = 1000.0, buckets: int = 16384, bucket_bytes_max: int = 1 << 20):
        self.clock = Cell(0, 0, check=check_clock)
        self.data = ObjectDict(buckets, base=1, bucket_bytes_max=bucket_bytes_max, check_value=check_entry)
        self.space = ObjectSpace(self.clock, self.data)
        self.skew_ms = skew_ms

    @property
    def clock_ms(self) -> int:
        return self.clock.value

    # -- non-determinism ------------------------------------------------------
    def propose_nondet(self, now_ms: float) -> bytes:
        return max(int(now_ms), self.clock.value).to_bytes(8, "big")

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        if len(value) != 8:
            return False
        return abs(int.from_bytes(value, "big") - now_ms) <= self.skew_ms

    # -- execution ------------------------------------------------------------
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        op = decode_operation(operation, read_only)
        if isinstance(op, bytes):
            return op
        kind, key = op[0], op[1]
        if not read_only and len(nondet) == 8:
            self.clock.set(max(self.clock.value, int.from_bytes(nondet, "big")))
        if kind == "get" and len(op) == 2:
            v = self.data.get(key)
            return ok_result(v[0] if v else None)
        if kind == "mtime" and len(op) == 2:
            v = self.data.get(key)
            return ok_result(v[1] if v else None)
        if kind == "put" and len(op) == 3 and isinstance(op[2], bytes):
            return self._put(key, op[2])
        if kind == "delete" and len(op) == 2:
            return ok_result(self.data.delete(key))
        if kind == "cas" and len(op) == 4 and (op[2] is None or isinstance(op[2], bytes)) and isinstance(op[3], bytes):
            cur = self.data.get(key)
            if (cur[0] if cur else None) != op[2]:
                return ok_result(False)
            return self._put(key, op[3])
        return error_result(f"unknown or malformed operation {kind!r}")

    def _put(self, key: bytes, value: bytes) -> bytes:
        entry = (value, self.clock.value)
        try:
            # the entry's exact encoded size, what a replica that fetched the bucket counts too
            # (``ObjectDict.install``): whether a bucket is full depends on the abstract state alone
            self.data.set(key, entry)
        except BucketFull:
            return error_result("store full: the key's bucket is at its size limit")
        return ok_result(True)


class ServiceError(Exception):
    """The key-value service refused an operation (its ``["err", reason]`` result)."""


class NotAdmittedResult(ServiceError):
    """The replicas refused the request without running it: its client is not admitted by the
    cluster (the not-admitted result, ``core.reconfig.NOT_ADMITTED_RESULT``). ``pbft.Client``
    raises ``pbft.runtime.client.NotAdmittedError`` for it already; this is for an ``invoke``
    that returns results as they are."""


class KVClient:
    """Typed key-value calls over any ``invoke(op, read_only=..., timeout=...) -> bytes``.

    Works with ``pbft.BlockingClient.invoke``; for asyncio use ``AsyncKVClient``.
    """

    def __init__(self, invoke, timeout: float | None = 10.0):
        self._invoke = invoke
        self.timeout = timeout

    def _call(self, op: bytes, read_only: bool = False):
        return unwrap_result(self._invoke(op, read_only=read_only, timeout=self.timeout))

    def get(self, key: bytes, read_only: bool = True) -> bytes | None:
        return self._call(encode_op("get", key), read_only)

    def put(self, key: bytes, value: bytes) -> None:
        self._call(encode_op("put", key, value))

    def delete(self, key: bytes) -> bool:
        return self._call(encode_op("delete", key))

    def cas(self, key: bytes, expected: bytes | None, new: bytes) -> bool:
        return self._call(encode_op("cas", key, expected, new))


class AsyncKVClient:
    """The same calls over ``pbft.Client.invoke`` (asyncio)."""

    def __init__(self, client, timeout: float | None = 10.0):
        self._client = client
        self.timeout = timeout

    async def _call(self, op: bytes, read_only: bool = False):
        return unwrap_result(await self._client.invoke(op, read_only=read_only, timeout=self.timeout))

    async def get(self, key: bytes, read_only: bool = True) -> bytes | None:
        return await self._call(encode_op("get", key), read_only)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._call(encode_op("put", key, value))

    async def delete(self, key: bytes) -> bool:
        return await self._call(encode_op("delete", key))

    async def cas(self, key: bytes, expected: bytes | None, new: bytes) -> bool:
        return await self._call(encode_op("cas", key, expected, new))


def unwrap_result(result: bytes):
    """The value of an ``("ok", value)`` result; ``ServiceError`` for an error or a malformed one,
    ``NotAdmittedResult`` for the not-admitted result."""
    if result == NOT_ADMITTED_RESULT:
        raise NotAdmittedResult("the client is not admitted by the cluster (revoked or never added): "
                                "the replicas refused its request")
    try:
        status, value = decode_result(result)
    except ValueError as e:
        raise ServiceError(f"malformed result from the service: {e}") from None
    if status == "err":
        raise ServiceError(value)
    return value
