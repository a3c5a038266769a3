"""The null service of the micro-benchmarks (``pbft bench``): operations that do nothing.

Castro & Liskov measure the cost of replication with operations a/b: an
argument of a KB and a result of b KB, doing no work (0/0, 0/4, 4/0).  Here
an operation is::

    4-byte big-endian result size  +  argument padding (ignored)

and its result is that many zero bytes.  An operation shorter than 4 bytes
(in particular the empty operation of 0/0) has an empty result.  Results
larger than ``RESULT_SIZE_MAX`` are refused with an empty result, so a
(possibly faulty) client cannot make replicas build huge replies.

The state is a counter of the read-write operations executed (8 bytes), so
checkpoints and state transfer cost nothing; read-only operations leave it
alone.  Everything is deterministic.  Use it as
``pbft replica DIR --id I --service pbft.services.null:NullService``.
"""

from __future__ import annotations

import struct

from ..service import Service

RESULT_SIZE_MAX = 32 * 1024
_HEADER = struct.Struct(">I")


def make_op(arg_bytes: int = 0, result_bytes: int = 0) -> bytes:
    """An operation of ``arg_bytes`` bytes in total (at least 4 unless both sizes are 0) whose result
    has ``result_bytes`` bytes."""
    if arg_bytes < 0 or not 0 <= result_bytes <= RESULT_SIZE_MAX:
        raise ValueError("bad operation sizes")
    if arg_bytes == 0 and result_bytes == 0:
        return b""
    return _HEADER.pack(result_bytes) + bytes(max(0, arg_bytes - _HEADER.size))


class NullService(Service):
    def __init__(self):
        self.count = 0

    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        if not read_only:
            self.count += 1
        if len(operation) < _HEADER.size:
            return b""
        (size,) = _HEADER.unpack_from(operation)
        if size > RESULT_SIZE_MAX:
            return b""
        return bytes(size)

    def get_state(self) -> bytes:
        return self.count.to_bytes(8, "big")

    def set_state(self, data: bytes) -> None:
        if len(data) != 8:
            raise ValueError("not a null-service state")
        self.count = int.from_bytes(data, "big")
