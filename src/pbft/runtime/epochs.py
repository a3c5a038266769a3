"""Configuration epochs in a replica process: the key registry follows the replicated configuration.

The configuration (``core.reconfig``) is part of the replicated state; a change takes effect at the
checkpoint at or after the sequence number it executed at. ``EpochFollower`` watches this replica's
stable checkpoints (and completed state transfers) and, when the configuration of the latest one
has a newer epoch than the one in force here, switches to it (``switch``):

* the public keys NewKeys are checked against and sealed to are the new configuration's (the
  ``NewKeyGate``'s and the node's ``cluster.public``): a revoked client's NewKeys are refused
  (``newkey-revoked-client``), one signed with a key rotated away is refused
  (``newkey-rotated-key``), a newly admitted client can authenticate;
* the sessions of revoked clients and of clients whose key changed end (their session keys are
  forgotten, their connections closed when no other client uses them: counted
  ``client-session-revoked`` and ``client-session-rotated``); a rotated client reconnects with a
  NewKey signed with its new key;
* if this replica's own key was rotated, it signs with the new private key from then on: the key
  file's ``.next`` (``pbft reconfig DIR rotate-key`` writes it), loaded at startup or at the
  switch; the old key still opens sealed session keys for ``OLD_KEY_GRACE_S`` (peers and clients
  that have not switched yet seal to it), then is used only to sign the rotation's link of the
  configuration chain (``runtime.chain_keeper``: links are checked against the keys of the link
  before);
* if any replica's key changed, this replica refreshes its session keys at the switch and twice
  more (``RESEND_AFTER_S``), so that replicas that switch a little later get a NewKey they can
  check;
* if the recovery period in force changed (``set-recovery-period``), the timer of this replica's
  next recovery turn is armed again for the new one (``ReplicaNode.arm_recovery_timer``; the
  period in force is the configuration's, or cluster.toml's if none set one).

At startup the configuration in force is the one of the checkpoint restored from disk, or
cluster.toml's (a replica restarted with an old cluster.toml uses the state's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Optional, cast

from ..config import ConfigError
from ..core.reconfig import Configuration, config_at
from ..state.configuration import ConfigRecord
from .cluster import next_key_path, read_key_file, recovery_period_in_force, registry
from .keys import Identity, PublicKeys

if TYPE_CHECKING:
    from .node import ReplicaNode

OLD_KEY_GRACE_S = 30.0
RESEND_AFTER_S = (2.0, 8.0)


class RotatingIdentity:
    """A replica's long-term identity across a key rotation: it signs with ``current`` and opens
    sealed boxes with ``current`` or, until ``others_until`` (time.monotonic), with ``others``.
    ``retired``: the keys rotated away, kept for signing the configuration link of the rotation
    (``runtime.chain_keeper``: it is checked against the key the link before has for us)."""

    def __init__(self, current: Any, others: list[Any], others_until: float = float("inf"),
                 retired: Optional[list[Any]] = None):
        self.current = current
        self.others = others
        self.others_until = others_until
        self.retired = list(retired or [])

    @property
    def principal(self) -> int:
        return int(self.current.principal)

    @property
    def public(self) -> bytes:
        return bytes(self.current.public)

    def sign_newkey(self, header: bytes) -> bytes:
        return bytes(self.current.sign_newkey(header))

    def open_sealed(self, sealed: bytes) -> bytes:
        try:
            return bytes(self.current.open_sealed(sealed))
        except Exception:
            if time.monotonic() >= self.others_until:
                self.others = []
            for o in self.others:
                try:
                    return bytes(o.open_sealed(sealed))
                except Exception:  # noqa: BLE001 - the next one, or the first error
                    continue
            raise


def public_keys(cs: Configuration) -> PublicKeys:
    """The key registry of a configuration (``core.reconfig`` admitted only valid keys)."""
    return PublicKeys(cs.public_keys())


class EpochFollower:
    """The configuration in force at one replica process (see the module docstring)."""

    def __init__(self, node: "ReplicaNode"):
        self.node = node
        r = node.replica
        cur = config_at(r, r.low_water_mark)
        genesis = node.cluster.genesis_config
        if cur is None:
            cur = ConfigRecord.decode(genesis).latest if genesis else None
        self.active: Optional[Configuration] = cur
        self.switched_at = r.low_water_mark if cur is not None and cur.epoch else 0
        self.switches = 0
        ident = node.identity
        extra: list[Any] = []
        if isinstance(ident, Identity):
            path = next_key_path(node.cluster.key_path(node.id))
            if path.exists():
                try:
                    extra.append(read_key_file(path, node.id))
                except ConfigError as e:
                    node._log("key-next-unreadable", error=str(e))
        self.rotating = RotatingIdentity(ident, extra)
        if cur is not None:
            self._choose_own_key(cur)
            self._install_registry(cur)

    @property
    def epoch(self) -> int:
        return self.active.epoch if self.active is not None else 0

    def on_checkpoint(self, n: int) -> None:
        """Checkpoint n is stable here, or a state transfer to it completed."""
        cs = config_at(self.node.replica, n)
        if cs is not None and (self.active is None or cs.epoch > self.active.epoch):
            self.switch(cs, n)

    def switch(self, cs: Configuration, n: int) -> None:
        node, old = self.node, self.active
        self.active, self.switched_at = cs, n
        self.switches += 1
        own_rotated = old is not None and old.key_of(node.id) != cs.key_of(node.id)
        if own_rotated:
            self._choose_own_key(cs)
        self._install_registry(cs)
        ended = self._end_sessions(old, cs) if old is not None else {}
        replica_keys_changed = old is not None and old.replica_keys != cs.replica_keys
        period = recovery_period_in_force(node.cluster.recovery, cs)
        if period != recovery_period_in_force(node.cluster.recovery, old):
            node._log("recovery-period", period_s=period, epoch=cs.epoch)
            node.arm_recovery_timer()  # (the next turn: the new period's)
        node._log("epoch", epoch=cs.epoch, seqno=n, revoked=sorted(cs.revoked),
                  sessions_ended=ended, own_key_rotated=own_rotated)
        if replica_keys_changed and node.my_newkey is not None:
            node._refresh_keys(broadcast=True)
            for delay in RESEND_AFTER_S:
                node.loop.call_later(delay, self._resend)

    def _resend(self) -> None:
        node = self.node
        if not node.halted and node.my_newkey is not None:
            node._refresh_keys(broadcast=True)

    def _choose_own_key(self, cs: Configuration) -> None:
        """Sign with the private key whose public key ``cs`` has for us (the old one kept for
        opening sealed keys a while)."""
        want = cs.key_of(self.node.id)
        rot = self.rotating
        if rot.public == want:
            return
        for o in rot.others:
            if o.public == want:
                rest = [x for x in [rot.current, *rot.others] if x is not o]
                self.rotating = RotatingIdentity(o, rest, time.monotonic() + OLD_KEY_GRACE_S,
                                                 [*rot.retired, rot.current])
                break
        else:
            path = next_key_path(self.node.cluster.key_path(self.node.id))
            try:
                nxt = read_key_file(path, self.node.id)
            except ConfigError as e:
                self.node._log("own-key-missing", error=str(e), want=want.hex() if want else None)
                return
            if nxt.public != want:
                self.node._log("own-key-missing", file=str(path), want=want.hex() if want else None)
                return
            self.rotating = RotatingIdentity(nxt, [rot.current], time.monotonic() + OLD_KEY_GRACE_S,
                                             [*rot.retired, rot.current])
        self.node.identity = self.node.newkey_gate.me = self.as_identity()

    def as_identity(self) -> Identity:
        """The rotating identity where an ``Identity`` is used (it has the same four members, as
        ``runtime.signer.SignerIdentity`` does)."""
        return cast(Identity, self.rotating)

    def _install_registry(self, cs: Configuration) -> None:
        node = self.node
        try:
            public = PublicKeys(registry(cs, node.cluster.slots))
        except ValueError as e:  # (core.reconfig admits only valid keys)
            node._log("epoch-keys-invalid", epoch=cs.epoch, error=str(e))
            return
        gate = node.newkey_gate
        old = gate.public
        gate.retired.update((p, vk) for p, vk in old.verify.items()
                            if p in public.verify and bytes(public.verify[p]) != bytes(vk))
        gate.public = public
        gate.revoked = frozenset(cs.revoked)
        node.identity = gate.me = self.as_identity()
        node.cluster = dataclasses.replace(node.cluster, public=public, admins=tuple(cs.admins), epoch=cs.epoch,
                                           client_keys={c: k for c, k in cs.clients.items() if k})

    def _end_sessions(self, old: Configuration, cs: Configuration) -> dict[str, int]:
        """Forget the session keys of clients revoked or rotated by the switch (and close their
        connections where no other client is served)."""
        node = self.node
        ended = {"revoked": 0, "rotated": 0}
        for c, k in old.clients.items():
            new = cs.clients.get(c, b"")
            if not k or new == k:
                continue
            why = "revoked" if not new else "rotated"
            ended[why] += 1
            node.ring.in_keys.pop(c, None)
            node.ring.out_keys.pop(c, None)
            conn = node.client_conn.pop(c, None)
            if conn is None:
                continue
            node.counters.drop(f"client-session-{why}")
            clients = conn.meta.get("clients", set())
            clients.discard(c)
            if not clients and not conn.closed:
                conn.close()
        return ended

    def describe(self) -> dict[str, Any]:
        cs = self.active
        period = cs.recovery_period_s if cs is not None else None
        return {"epoch": self.epoch, "switched_at": self.switched_at,
                "recovery_period_s": recovery_period_in_force(self.node.cluster.recovery, cs),
                "recovery_period_from": "cluster.toml" if period is None else "configuration",
                "revoked": sorted(cs.revoked) if cs is not None else [],
                "admins": list(cs.admins) if cs is not None else []}
