"""The state a replica checkpoints: the service's objects plus the library's own.

Objects ``0 .. R-1`` are the library's: the table of each client's last reply
(timestamp and result), bucketed by client id (objects ``0 .. buckets-1``), which must be part
of every checkpoint (exactly-once execution survives state transfer), and the cluster's
configuration (object ``buckets``, ``config_object``: ``core.reconfig``; empty when the
replica was built without one).  Objects ``R ..`` are the service's: its ``n_objects``
objects, or, for a service in the whole-state form, one object holding ``get_state()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import msgpack

from .configuration import ConfigRecord
from .partition import CheckpointedState

if TYPE_CHECKING:
    from ..service import Service

REPLY_BUCKETS = 64


class ReplicaState:
    def __init__(self, service: Service, fanout: int = 256, bind_seqno: bool = True,
                 reply_buckets: int = REPLY_BUCKETS, genesis_config: bytes = b""):
        self.service = service
        self.buckets = reply_buckets
        self.config_object = reply_buckets  # the configuration's object
        self.R = reply_buckets + 1  # the library's objects
        # the configuration in the current state (changes are recorded when executed; they take
        # effect at a checkpoint: ``core.reconfig``)
        self.config: Optional[ConfigRecord] = ConfigRecord.decode(genesis_config) if genesis_config else None
        self.last_reply: dict[int, tuple[int, bytes]] = {}  # client -> (timestamp, result)
        self.members: list[set[int]] = [set() for _ in range(reply_buckets)]
        n_svc = int(getattr(service, "n_objects", 0) or 0)
        self.whole = n_svc <= 0
        self.cs = CheckpointedState(self, self.R + (1 if self.whole else n_svc), fanout, bind_seqno)
        if not self.whole:
            R = self.R
            modify = self.cs.modify
            service.bind_state(lambda i: modify(R + i))

    # -- the replica's interface -------------------------------------------------
    def set_reply(self, client: int, timestamp: int, result: bytes) -> None:
        b = client % self.buckets
        self.cs.modify(b)
        self.members[b].add(client)
        self.last_reply[client] = (timestamp, result)

    def set_config(self, config: ConfigRecord) -> None:
        self.cs.modify(self.config_object)
        self.config = config

    def before_execute(self) -> None:
        """Whole-state form: the service's one object may change now."""
        if self.whole:
            self.cs.modify(self.R)

    # -- backend -------------------------------------------------------------------
    def get_obj(self, i: int) -> bytes:
        R = self.R
        if i == self.config_object:
            return self.config.encode() if self.config is not None else b""
        if i < R:
            m = self.members[i]
            if not m:
                return b""
            lr = self.last_reply
            return msgpack.packb([[c, *lr[c]] for c in sorted(m)], use_bin_type=True)
        if self.whole:
            return self.service.get_state()
        return self.service.get_obj(i - R)

    def _parse_replies(self, b: int, data: bytes) -> dict[int, tuple[int, bytes]]:
        if data == b"":
            return {}
        try:
            rows = msgpack.unpackb(data, raw=False, use_list=False)
        except Exception as e:  # msgpack raises several types
            raise ValueError("reply table: not msgpack") from e
        out = {}
        if not isinstance(rows, tuple):
            raise ValueError("reply table: not a list")
        for row in rows:
            if not (isinstance(row, tuple) and len(row) == 3):
                raise ValueError("reply table: bad row")
            c, t, r = row
            if type(c) is not int or type(t) is not int or type(r) is not bytes or c < 0 or c % self.buckets != b:
                raise ValueError("reply table: bad row")
            out[c] = (t, r)
        return out

    def put_objs(self, objs: dict[int, bytes]) -> None:
        R = self.R
        replies: dict[int, dict[int, tuple[int, bytes]]] = {}
        svc: dict[int, bytes] = {}
        whole: Optional[bytes] = None
        config: Optional[bytes] = None
        for i, data in objs.items():
            if i == self.config_object:
                config = data
            elif i < R:
                replies[i] = self._parse_replies(i, data)
            elif self.whole:
                whole = data
            else:
                svc[i - R] = data
        if config is not None:  # (before anything changes: a bad one raises ValueError)
            self.config = ConfigRecord.decode(config) if config else None
        if whole is not None:
            self.service.set_state(whole)
        if svc:
            self.service.put_objs(svc)
        lr = self.last_reply
        for b, rows in replies.items():
            for c in self.members[b]:
                del lr[c]
            self.members[b] = set(rows)
            lr.update(rows)
