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
_VERSION_MEMBERS = 2  # (a configuration with a membership recorded: two more fields)
_VERSION_RECOVERY = 3  # (and a recovery period set: one more, after them)
# the recovery period a configuration may hold, in milliseconds (0: off); ``core.reconfig`` refuses
# one below what recoveries need, this bound only keeps a decoded value sane
RECOVERY_PERIOD_MS_MAX = 366 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Membership:
    """The replicas: ids 0..n-1, the faults tolerated, their weights and public keys, in force
    for the sequence numbers after ``opens_at`` (0: from genesis on), from the configuration
    ``epoch`` that opened it on (its first view: ``core.membership.base_view``)."""

    n: int
    f: int
    weights: tuple[int, ...]
    keys: tuple[bytes, ...]
    opens_at: int
    epoch: int = 0

    def encode_fields(self) -> list[Any]:
        return [self.n, self.f, list(self.weights), list(self.keys), self.opens_at, self.epoch]

    @classmethod
    def decode_fields(cls, t: Any) -> "Membership":
        if type(t) is not tuple or len(t) != 6:
            raise ValueError("membership: bad shape")
        n, f, weights, keys, opens_at, epoch = t
        if not (type(n) is int and n >= 1 and type(f) is int and f >= 0 and type(opens_at) is int
                and opens_at >= 0 and type(epoch) is int and epoch >= 0):
            raise ValueError("membership: bad numbers")
        if type(weights) is not tuple or len(weights) != n or not all(type(w) is int and w >= 1 for w in weights):
            raise ValueError("membership: bad weights")
        if type(keys) is not tuple or len(keys) != n or not all(
                type(k) is bytes and len(k) == PUBLIC_KEY_BYTES for k in keys):
            raise ValueError("membership: bad keys")
        return cls(n, f, weights, keys, opens_at, epoch)


@dataclass(frozen=True, slots=True)
class Configuration:
    """One epoch's configuration (or, in the live state, the next epoch's, until it switches)."""

    epoch: int
    opens_at: int  # the checkpoint seqno from which this epoch is in effect (0: genesis)
    replica_keys: tuple[bytes, ...]
    clients: Mapping[int, bytes]  # client id -> public key; b"": revoked
    admins: tuple[int, ...]
    # the membership in force (None: the genesis one, cluster.toml's), and a change of it recorded
    # and not yet folded in (in force after its ``opens_at``: ``members_at``)
    members: Optional[Membership] = None
    next_members: Optional[Membership] = None
    # the proactive-recovery period in milliseconds (0: off; None: the one cluster.toml's
    # ``[recovery] period_s`` gives, as in a configuration recorded before it could be set)
    recovery_period_ms: Optional[int] = None

    @classmethod
    def genesis(cls, replica_keys: list[bytes] | tuple[bytes, ...], clients: Mapping[int, bytes],
                admins: list[int] | tuple[int, ...]) -> "Configuration":
        return cls(0, 0, tuple(replica_keys), dict(clients), tuple(sorted(set(admins))))

    def encode(self) -> bytes:
        fields = [_VERSION, self.epoch, self.opens_at, list(self.replica_keys),
                  [[c, self.clients[c]] for c in sorted(self.clients)], list(self.admins)]
        if self.members is not None or self.next_members is not None or self.recovery_period_ms is not None:
            fields[0] = _VERSION_MEMBERS
            fields += [m.encode_fields() if m is not None else None for m in (self.members, self.next_members)]
        if self.recovery_period_ms is not None:
            fields[0] = _VERSION_RECOVERY
            fields.append(self.recovery_period_ms)
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Configuration":
        """Raises ``ValueError`` on bytes ``encode`` could not have produced."""
        try:
            t = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several types
            raise ValueError("configuration: not msgpack") from e
        shapes = ((6, _VERSION), (8, _VERSION_MEMBERS), (9, _VERSION_RECOVERY))
        if type(t) is not tuple or not t or (len(t), t[0]) not in shapes:
            raise ValueError("configuration: bad shape")
        epoch, opens_at, reps, cls_rows, admins = t[1:6]
        members, nxt = (Membership.decode_fields(m) if m is not None else None for m in (t[6:8] or (None, None)))
        period = t[8] if len(t) == 9 else None
        if period is not None and not (type(period) is int and 0 <= period <= RECOVERY_PERIOD_MS_MAX):
            raise ValueError("configuration: bad recovery period")
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
        if members is not None and members.keys != reps:
            raise ValueError("configuration: members' keys are not the replica keys")
        out = cls(epoch, opens_at, reps, clients, admins, members, nxt, period)
        if out.encode() != data:
            raise ValueError("configuration: not canonical")
        return out

    # -- reading --------------------------------------------------------------------------
    def members_at(self, n: int) -> Optional[Membership]:
        """The membership in force for sequence number n (None: the genesis one)."""
        nxt = self.next_members
        return nxt if nxt is not None and nxt.opens_at < n else self.members

    @property
    def recovery_period_s(self) -> Optional[float]:
        """The recovery period set by a change (0.0: off), or None: cluster.toml's."""
        return None if self.recovery_period_ms is None else self.recovery_period_ms / 1000.0

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
                "revoked": sorted(self.revoked), "admins": list(self.admins),
                **{name: {"n": m.n, "f": m.f, "weights": list(m.weights), "opens_at": m.opens_at,
                          "epoch": m.epoch, "keys": [k.hex() for k in m.keys]}
                   for name, m in (("members", self.members), ("next_members", self.next_members))
                   if m is not None},
                **({"recovery_period_s": self.recovery_period_s} if self.recovery_period_ms is not None else {})}


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
