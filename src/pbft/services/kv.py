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

from ..service import Service

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


def _err(reason: str) -> bytes:
    return msgpack.packb(["err", reason])


def _ok(value) -> bytes:
    return msgpack.packb(["ok", value], use_bin_type=True)


class KVService(Service):
    def __init__(self, skew_ms: float = 1000.0):
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.clock_ms = 0
        self.skew_ms = skew_ms

    # -- non-determinism ------------------------------------------------------
    def propose_nondet(self, now_ms: float) -> bytes:
        return max(int(now_ms), self.clock_ms).to_bytes(8, "big")

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        if len(value) != 8:
            return False
        return abs(int.from_bytes(value, "big") - now_ms) <= self.skew_ms

    # -- execution ------------------------------------------------------------
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        try:
            op = msgpack.unpackb(operation, raw=False, use_list=False, max_str_len=16,
                                 max_bin_len=max(KEY_SIZE_MAX, VALUE_SIZE_MAX), max_array_len=4, max_map_len=0)
        except Exception:  # garbage from a (possibly faulty) client: an error result, never a crash
            return _err("malformed operation")
        if not isinstance(op, tuple) or len(op) < 2 or not isinstance(op[0], str) or not isinstance(op[1], bytes):
            return _err("malformed operation")
        kind, key = op[0], op[1]
        if len(key) > KEY_SIZE_MAX:
            return _err("key too long")
        if read_only and kind in MUTATING:
            return _err("mutating operation sent as read-only")
        if not read_only and len(nondet) == 8:
            self.clock_ms = max(self.clock_ms, int.from_bytes(nondet, "big"))
        if kind == "get" and len(op) == 2:
            v = self.data.get(key)
            return _ok(v[0] if v else None)
        if kind == "mtime" and len(op) == 2:
            v = self.data.get(key)
            return _ok(v[1] if v else None)
        if kind == "put" and len(op) == 3 and isinstance(op[2], bytes):
            self.data[key] = (op[2], self.clock_ms)
            return _ok(True)
        if kind == "delete" and len(op) == 2:
            return _ok(self.data.pop(key, None) is not None)
        if kind == "cas" and len(op) == 4 and (op[2] is None or isinstance(op[2], bytes)) and isinstance(op[3], bytes):
            cur = self.data.get(key)
            if (cur[0] if cur else None) != op[2]:
                return _ok(False)
            self.data[key] = (op[3], self.clock_ms)
            return _ok(True)
        return _err(f"unknown or malformed operation {kind!r}")

    # -- state ----------------------------------------------------------------
    def get_state(self) -> bytes:
        items = [[k, v, t] for k, (v, t) in sorted(self.data.items())]
        return msgpack.packb([self.clock_ms, items], use_bin_type=True)

    def set_state(self, data: bytes) -> None:
        try:
            clock, items = msgpack.unpackb(data, raw=False, use_list=False)
            new = {bytes(k): (bytes(v), int(t)) for k, v, t in items}
            clock = int(clock)
        except Exception as e:
            raise ValueError("not a key-value state") from e
        self.data = new
        self.clock_ms = clock


class ServiceError(Exception):
    """The key-value service refused an operation (its ``["err", reason]`` result)."""


class KVClient:
    """Typed key-value calls over any ``invoke(op, read_only=..., timeout=...) -> bytes``.

    Works with ``pbft.BlockingClient.invoke``; for asyncio use ``AsyncKVClient``.
    """

    def __init__(self, invoke, timeout: float | None = 10.0):
        self._invoke = invoke
        self.timeout = timeout

    def _call(self, op: bytes, read_only: bool = False):
        return _unwrap(self._invoke(op, read_only=read_only, timeout=self.timeout))

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
        return _unwrap(await self._client.invoke(op, read_only=read_only, timeout=self.timeout))

    async def get(self, key: bytes, read_only: bool = True) -> bytes | None:
        return await self._call(encode_op("get", key), read_only)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._call(encode_op("put", key, value))

    async def delete(self, key: bytes) -> bool:
        return await self._call(encode_op("delete", key))

    async def cas(self, key: bytes, expected: bytes | None, new: bytes) -> bool:
        return await self._call(encode_op("cas", key, expected, new))


def _unwrap(result: bytes):
    try:
        status, value = decode_result(result)
    except ValueError as e:
        raise ServiceError(f"malformed result from the service: {e}") from None
    if status == "err":
        raise ServiceError(value)
    return value
