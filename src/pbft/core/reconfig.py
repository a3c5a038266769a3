"""Configuration epochs: the cluster's configuration as part of the replicated state.

The configuration (``state.configuration.Configuration``) is one of the library's objects in the checkpointed state
(``state.replica_state.ReplicaState``, beside the last-reply table), so checkpoints, state transfer,
durability and proactive recovery carry it like any other object. It holds the epoch, the
replicas' long-term public keys, the admitted clients (id -> public key; revoked ones keep their id
with an empty key, and an id is never reused), and the administrators (client ids). Membership
(n, f, weights) is fixed in this version.

A change is an ordered request of an administrator whose operation starts with
``CONFIG_OP_PREFIX`` (``encode_request``); every request of an administrator is handled here and
never reaches the service, and a request with the prefix from anybody else is refused here too
(``not-admin``). ``execute`` validates it deterministically (unknown principal, duplicate, a key
already used, revoking the last administrator ...): a refusal is a result with the reason and
changes nothing. An accepted change is recorded in the object when it executes, and takes effect
at the next checkpoint at or after its sequence number, ``switch_seqno``. The object
(``ConfigRecord``) holds the configuration in effect and the pending one (the changes of the
current checkpoint interval, which open the next epoch at its end): the configuration in effect
from checkpoint c on is the latest one in checkpoint c's state (every change executed at or before
c is in it, every later one is not). Execution uses the one in effect at each sequence number (a
request of a client not admitted there is refused: ``NOT_ADMITTED_RESULT``); drivers apply the
one of checkpoint c (their key registries) once c is stable (``config_at``), so a tentative
execution rolled back never took effect, and every correct replica switches at the same sequence
number. The epoch grows by one at every checkpoint that switches: the changes of one checkpoint
interval open the same epoch, which the result tells the admin.

Pure and deterministic: no clock, no I/O; the key check is an Ed25519 point decoding.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

import msgpack
import nacl.exceptions
import nacl.signing

from . import membership
from ..state.configuration import PUBLIC_KEY_BYTES, RECOVERY_PERIOD_MS_MAX, ConfigRecord, Configuration, genesis_record

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from .replica import Replica

CONFIG_OP_PREFIX = b"\xffpbft:config\x00"
# what a client not admitted in the configuration in effect gets instead of an execution
NOT_ADMITTED_RESULT = b"\xffpbft:not-admitted"
OPS = ("add-client", "revoke-client", "rotate-key", "set-membership", "set-recovery-period", "show")
# the shortest recovery period per replica ``set-recovery-period`` takes: one turn every period/n
# must leave a recovery time to end before the next replica's turn (recoveries take seconds:
# docs/recovery.md), so a period below n times this is a mistake, refused
RECOVERY_TURN_MIN_S = 10.0
__all__ = ["CONFIG_OP_PREFIX", "NOT_ADMITTED_RESULT", "RECOVERY_TURN_MIN_S", "ConfigRecord", "Configuration",
           "check_recovery_period", "config_at", "decode_result",
           "encode_request", "execute", "genesis_record", "handles", "is_config_op", "switch_seqno"]


# ---- requests and results ---------------------------------------------------------------
def encode_request(kind: str, *args: Any) -> bytes:
    """A configuration operation: ``add-client`` (id, pubkey), ``revoke-client`` (id),
    ``rotate-key`` (principal, pubkey), ``set-membership`` (n, f, weights, [[id, pubkey] ...] of the
    added replica ids: ``core.membership``), ``set-recovery-period`` (seconds, 0: off:
    ``check_recovery_period``), ``show`` ()."""
    return CONFIG_OP_PREFIX + msgpack.packb([kind, *args], use_bin_type=True)


def is_config_op(op: bytes) -> bool:
    return op.startswith(CONFIG_OP_PREFIX)


def decode_result(result: bytes) -> dict[str, Any]:
    """A configuration result as a dict: ``{"ok": True, "epoch": e, "switch_seqno": s}``,
    ``{"ok": False, "reason": ...}`` or ``{"ok": True, "config": Configuration, "latest":
    Configuration}`` (``show``: the configuration in effect, and the latest one recorded).
    Raises ``ValueError`` on anything else."""
    try:
        t = msgpack.unpackb(result, raw=False, use_list=False)
    except Exception as e:  # msgpack raises several types
        raise ValueError("not a configuration result") from e
    if type(t) is tuple and len(t) == 3 and t[0] == "ok" and type(t[1]) is int and type(t[2]) is int:
        return {"ok": True, "epoch": t[1], "switch_seqno": t[2]}
    if type(t) is tuple and len(t) == 4 and t[0] == "ok" and all(type(x) is int for x in t[1:]):
        return {"ok": True, "epoch": t[1], "switch_seqno": t[2], "members_at": t[3]}
    if type(t) is tuple and len(t) == 2 and t[0] == "refused" and type(t[1]) is str:
        return {"ok": False, "reason": t[1]}
    if type(t) is tuple and len(t) == 3 and t[0] == "config" and type(t[1]) is bytes and type(t[2]) is bytes:
        return {"ok": True, "config": Configuration.decode(t[1]), "latest": Configuration.decode(t[2])}
    raise ValueError("not a configuration result")


def _refused(reason: str) -> bytes:
    return msgpack.packb(["refused", reason], use_bin_type=True)


def _show(rec: ConfigRecord, n: int) -> bytes:
    """The configuration in effect at n, and the latest (with the changes still to take effect)."""
    return msgpack.packb(["config", rec.effective(n).encode(), rec.latest.encode()], use_bin_type=True)


def switch_seqno(n: int, interval: int) -> int:
    """The checkpoint at which a change executed at sequence number n takes effect."""
    return -(-n // interval) * interval


def check_recovery_period(seconds: Any, n: int) -> tuple[str, Optional[int]]:
    """("", the period in milliseconds) for ``set-recovery-period`` with ``n`` replicas, or (the
    reason of a refusal, None): not a finite number, negative, below ``n`` turns of
    ``RECOVERY_TURN_MIN_S`` (0 is off) or above ``RECOVERY_PERIOD_MS_MAX``."""
    if type(seconds) not in (int, float) or not math.isfinite(seconds):
        return f"bad-period: {seconds!r} is not a finite number of seconds", None
    if seconds < 0:
        return f"bad-period: {seconds!r} is negative (0 turns proactive recovery off)", None
    floor = n * RECOVERY_TURN_MIN_S
    if 0 < seconds < floor:
        return (f"period-too-short: {seconds:g} s is below {floor:g} s ({n} replicas x {RECOVERY_TURN_MIN_S:g} s: "
                "one turn every period/n must leave a recovery time to end; 0 turns recovery off)"), None
    if seconds > RECOVERY_PERIOD_MS_MAX // 1000:
        return f"period-too-long: {seconds:g} s is above {RECOVERY_PERIOD_MS_MAX // 1000} s (0 turns it off)", None
    return "", int(round(seconds * 1000))


def valid_public_key(k: Any) -> bool:
    if type(k) is not bytes or len(k) != PUBLIC_KEY_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(k).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


# ---- execution --------------------------------------------------------------------------
def execute(rec: Optional[ConfigRecord], client: int, op: bytes, n: int, cfg: "ClusterConfig",
            read_only: bool = False) -> tuple[Optional[ConfigRecord], bytes]:
    """Run configuration operation ``op`` of ``client`` at sequence number ``n`` (ordered; for a
    read-only one, the next to execute): ``(the new record or None if nothing changed, the
    result)``. Authorisation follows the configuration in effect at n, validation the latest."""
    if rec is None:
        return None, _refused("no-configuration: this cluster has no configuration object")
    if not is_config_op(op):
        return None, _refused("not-a-configuration-operation: an administrator's requests are "
                              "configuration operations only")
    try:
        t = msgpack.unpackb(op[len(CONFIG_OP_PREFIX):], raw=False, use_list=False, max_bin_len=1024,
                            max_str_len=64, max_array_len=max(8, cfg.client_base), max_map_len=0)
    except Exception:  # msgpack raises several types
        t = None
    if type(t) is not tuple or not t or t[0] not in OPS:
        return None, _refused("malformed: not a known configuration operation")
    kind, args = t[0], t[1:]
    cs = membership.fold(rec.latest, n)  # (a membership change whose switch point is behind: in force)
    if kind == "show":
        return None, _show(rec, n)
    if client not in rec.effective(n).admins:
        return None, _refused(f"not-admin: client {client} is not an administrator")
    if read_only:
        return None, _refused("read-only: a change must be ordered")
    if kind == "set-membership":
        why, new = membership.set_membership(cs, args, cfg, n, _keys_in_use(cs), valid_public_key)
    else:
        why, new = _change(cs, kind, args, cfg, n)
    if new is None:
        return None, _refused(why)
    at = switch_seqno(n, cfg.checkpoint_interval_seqnos)
    active = rec.effective(n)  # (the pending one, if its checkpoint has passed: in effect now)
    new = replace(new, epoch=active.epoch + 1, opens_at=at)
    if kind == "set-membership":
        assert new.next_members is not None
        s = membership.members_switch_seqno(at, cfg)
        new = replace(new, next_members=replace(new.next_members, opens_at=s, epoch=new.epoch))
        return ConfigRecord(active, new), msgpack.packb(["ok", new.epoch, at, s], use_bin_type=True)
    return ConfigRecord(active, new), msgpack.packb(["ok", new.epoch, at], use_bin_type=True)


def _keys_in_use(cs: Configuration) -> set[bytes]:
    """Every public key of a principal, the replicas of a recorded membership change included."""
    keys = set(cs.replica_keys) | {k for k in cs.clients.values() if k}
    if cs.next_members is not None:
        keys.update(cs.next_members.keys)
    return keys


def _change(cs: Configuration, kind: str, args: tuple[Any, ...],
            cfg: "ClusterConfig", n: int) -> tuple[str, Optional[Configuration]]:
    """(the reason of a refusal, None) or ("", the configuration with the change)."""
    if kind == "set-recovery-period":
        if len(args) != 1:
            return f"malformed: wrong arguments for {kind}", None
        nxt = cs.next_members
        why, ms = check_recovery_period(args[0], (nxt or membership.current(cs, cfg)).n)
        return why, None if ms is None else replace(cs, recovery_period_ms=ms)
    if len(args) != 2 - (kind == "revoke-client") or type(args[0]) is not int:
        return f"malformed: wrong arguments for {kind}", None
    who = args[0]
    if kind == "revoke-client":
        if not cfg.is_client(who) or who not in cs.clients:
            return f"unknown-client: {who} is not an admitted client", None
        if not cs.clients[who]:
            return f"already-revoked: client {who} is already revoked", None
        if cs.admins == (who,):
            return f"last-admin: client {who} is the only administrator", None
        clients = dict(cs.clients)
        clients[who] = b""
        return "", replace(cs, clients=clients, admins=tuple(a for a in cs.admins if a != who))
    key = args[1]
    if not valid_public_key(key):
        return f"bad-key: not an Ed25519 public key of {PUBLIC_KEY_BYTES} bytes", None
    if key in _keys_in_use(cs):
        return "key-in-use: another principal has this key", None
    if kind == "add-client":
        if not cfg.is_client(who):
            return (f"not-a-client-slot: client ids are {cfg.client_base}..{cfg.max_principal} "
                    f"(membership of the client range is fixed)"), None
        if who in cs.clients:
            state = "already admitted" if cs.clients[who] else "revoked (ids are not reused)"
            return f"duplicate: client {who} is {state}", None
        clients = dict(cs.clients)
        clients[who] = key
        return "", replace(cs, clients=clients)
    if 0 <= who < len(cs.replica_keys) and cs.next_members is not None and cs.next_members.opens_at >= n:
        return (f"membership-change-pending: a membership change opens at {cs.next_members.opens_at}; "
                "rotate replica keys after it"), None
    if 0 <= who < len(cs.replica_keys):  # rotate-key of a replica
        reps = list(cs.replica_keys)
        reps[who] = key
        members = replace(cs.members, keys=tuple(reps)) if cs.members is not None else None
        return "", replace(cs, replica_keys=tuple(reps), members=members)
    if not cs.clients.get(who):
        return f"unknown-principal: {who} is neither a replica nor an admitted client", None
    clients = dict(cs.clients)
    clients[who] = key
    return "", replace(cs, clients=clients)


def handles(rec: Optional[ConfigRecord], client: int, op: bytes, n: int) -> bool:
    """Whether a request executing at sequence number n is the library's (a configuration
    operation, or refused: its client is not admitted), not the service's."""
    if is_config_op(op):
        return True
    if rec is None:
        return False
    eff = rec.effective(n)
    return client in eff.admins or not eff.is_admitted(client)


def execute_ordered(r: "Replica", client: int, op: bytes, n: int, read_only: bool = False) -> bytes:
    """Replica ``r`` runs a request that ``handles`` said is the library's, at sequence number n,
    recording a change (ordered) in its state."""
    rec = r.rs.config
    if rec is not None and not rec.effective(n).is_admitted(client):
        return NOT_ADMITTED_RESULT
    new, result = execute(rec, client, op, n, r.cfg, read_only)
    if new is not None:
        assert not read_only  # (``execute`` changes nothing read-only)
        r.rs.set_config(new)
    return result


# ---- what drivers read --------------------------------------------------------------------
def config_at(r: "Replica", n: int) -> Optional[Configuration]:
    """The configuration in effect from checkpoint n on, if replica r holds checkpoint n (and a
    usable state); None otherwise (no configuration object, or no such checkpoint here)."""
    st = r.state
    if r.needs_state or not st.has(n):
        return None
    data = st.value_at(n, r.rs.config_object)
    if not data:
        return None
    try:
        return ConfigRecord.decode(data).latest
    except ValueError:
        return None
