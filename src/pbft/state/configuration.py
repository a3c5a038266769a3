"""The cluster's configuration as a value of the replicated state (``core.reconfig`` runs the
operations that change it; ``ReplicaState`` keeps it as one of the library's objects).

``Configuration``: one epoch's configuration (the replicas' long-term public keys, the admitted
clients, id -> public key, b"" for a revoked one, and the administrators). ``ConfigRecord``: the
object itself, the configuration in effect and the pending one. Both encode canonically (the
object's bytes are part of the checkpoint digest) and decode only what they encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import msgpack

PUBLIC_KEY_BYTES = 32
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Configuration:
    """One epoch's configuration (or, in the live state, the next epoch's, until it switches)."""

    epoch: int
    opens_at: int  # the checkpoint seqno from which this epoch is in effect (0: genesis)
    replica_keys: tuple[bytes, ...]
    clients: Mapping[int, bytes]  # client id -> public key; b"": revoked
    admins: tuple[int, ...]

    @classmethod
    def genesis(cls, replica_keys: list[bytes] | tuple[bytes, ...], clients: Mapping[int, bytes],
                admins: list[int] | tuple[int, ...]) -> "Configuration":
        return cls(0, 0, tuple(replica_keys), dict(clients), tuple(sorted(set(admins))))

    def encode(self) -> bytes:
        return msgpack.packb([_VERSION, self.epoch, self.opens_at, list(self.replica_keys),
                              [[c, self.clients[c]] for c in sorted(self.clients)], list(self.admins)],
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Configuration":
        """Raises ``ValueError`` on bytes ``encode`` could not have produced."""
        try:
            t = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several types
            raise ValueError("configuration: not msgpack") from e
        if type(t) is not tuple or len(t) != 6 or t[0] != _VERSION:
            raise ValueError("configuration: bad shape")
        _, epoch, opens_at, reps, cls_rows, admins = t
        if type(epoch) is not int or type(opens_at) is not int or epoch < 0 or opens_at < 0:
            raise ValueError("configuration: bad epoch")
        if type(reps) is not tuple or not all(type(k) is bytes and len(k) == PUBLIC_KEY_BYTES for k in reps):
            raise ValueError("configuration: bad replica keys")
        clients: dict[int, bytes] = {}
        if type(cls_rows) is not tuple:
            raise ValueError("configuration: bad clients")
        for row in cls_rows:
            if not (type(row) is tuple and len(row) == 2 and type(row[0]) is int and type(row[1]) is bytes
                    and len(row[1]) in (0, PUBLIC_KEY_BYTES) and row[0] not in clients):
                raise ValueError("configuration: bad client")
            clients[row[0]] = row[1]
        if type(admins) is not tuple or not all(type(a) is int and clients.get(a) for a in admins):
            raise ValueError("configuration: bad admins")
        out = cls(epoch, opens_at, reps, clients, admins)
        if out.encode() != data:
            raise ValueError("configuration: not canonical")
        return out

    # -- reading --------------------------------------------------------------------------
    def is_admitted(self, client: int) -> bool:
        return bool(self.clients.get(client))

    @property
    def revoked(self) -> frozenset[int]:
        return frozenset(c for c, k in self.clients.items() if not k)

    def public_keys(self) -> dict[int, bytes]:
        """Every principal that may authenticate: the replicas and the admitted clients."""
        keys = dict(enumerate(self.replica_keys))
        keys.update((c, k) for c, k in self.clients.items() if k)
        return keys

    def key_of(self, principal: int) -> Optional[bytes]:
        if 0 <= principal < len(self.replica_keys):
            return self.replica_keys[principal]
        return self.clients.get(principal) or None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view (status endpoints, the CLI)."""
        return {"epoch": self.epoch, "opens_at": self.opens_at,
                "replicas": [k.hex() for k in self.replica_keys],
                "clients": {str(c): k.hex() for c, k in sorted(self.clients.items()) if k},
                "revoked": sorted(self.revoked), "admins": list(self.admins)}


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    """The replicated object: the configuration in effect since ``active.opens_at`` and the
    pending one (opening at ``pending.opens_at``, the end of the checkpoint interval of its
    changes), if any."""

    active: Configuration
    pending: Optional[Configuration] = None

    @property
    def latest(self) -> Configuration:
        return self.pending if self.pending is not None else self.active

    def effective(self, n: int) -> Configuration:
        """The configuration in effect for sequence number n (after checkpoint n-1 ... n-1)."""
        p = self.pending
        return p if p is not None and p.opens_at < n else self.active

    def encode(self) -> bytes:
        return msgpack.packb([self.active.encode(), self.pending.encode() if self.pending else None],
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "ConfigRecord":
        """Raises ``ValueError`` on bytes ``encode`` could not have produced."""
        try:
            t = msgpack.unpackb(data, raw=False, use_list=False)
        except Exception as e:  # msgpack raises several types
            raise ValueError("configuration record: not msgpack") from e
        if type(t) is not tuple or len(t) != 2 or type(t[0]) is not bytes or not (t[1] is None or type(t[1]) is bytes):
            raise ValueError("configuration record: bad shape")
        out = cls(Configuration.decode(t[0]), Configuration.decode(t[1]) if t[1] is not None else None)
        if out.pending is not None and not (out.pending.epoch == out.active.epoch + 1
                                            and out.pending.opens_at > out.active.opens_at):
            raise ValueError("configuration record: bad pending epoch")
        return out


def genesis_record(replica_keys: list[bytes] | tuple[bytes, ...], clients: Mapping[int, bytes],
                   admins: list[int] | tuple[int, ...]) -> bytes:
    """The configuration object's initial value (what ``Replica(genesis_config=...)`` takes)."""
    return ConfigRecord(Configuration.genesis(replica_keys, clients, admins)).encode()
