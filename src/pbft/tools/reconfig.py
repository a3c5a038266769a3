"""``pbft reconfig DIR add-client | revoke-client | rotate-key | set-recovery-period | show | status``:
configuration changes on a live cluster, through the protocol (docs/reconfiguration.md).
``status`` sends nothing: it prints the configuration the replicas' certificate chains certify.

A change is an ordered request of the administrator (``[admin] clients`` in cluster.toml, its key
in ``keys/``): the replicas validate it (``pbft.core.reconfig``) and record it, and it takes effect
at the next checkpoint at or after its sequence number. This command sends it, prints the result
(the epoch it opens, or the reason it was refused), and then, unless ``--no-wait``, moves the
cluster to that checkpoint with ordered no-op requests (``show``) until replicas of quorum weight
report the new epoch on their status endpoints; then it writes what the cluster reports as the
configuration in effect, with the configuration certificate chain whose last link certifies it
(``runtime.chain``), into ``DIR/epoch.json``, which clients and tools of this directory use
for the keys from then on (``show`` writes it too: what the cluster reports in force).

Keys: ``add-client`` generates the new client's key pair and writes ``keys/client-<id>.key``;
``rotate-key`` writes the principal's new private key to ``<its key file>.next`` before sending
the change (a replica loads it at the switch), and after the switch moves it over the key file
(the old one kept as ``.old``). On separate machines, copy the ``.next`` file to the replica's
machine before the change (``--key-file`` takes a key generated there).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError
from ..core.reconfig import check_recovery_period, decode_result, encode_request
from ..runtime.cluster import EPOCH_FILE, Cluster, load_cluster, next_key_path, read_key_file
from ..runtime.keys import Identity

SWITCH_TIMEOUT_S = 60.0
CHAIN_TIMEOUT_S = 15.0  # for the replicas to gather a membership link after the switch


def _write_key(path: Path, seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(seed.hex() + "\n")


def _admin(cluster: Cluster, chosen: Optional[int]) -> int:
    if chosen is not None:
        if chosen not in cluster.admins:
            print(f"pbft reconfig: warning: {chosen} is not an administrator in the configuration known here "
                  f"({list(cluster.admins)}); the replicas decide", file=sys.stderr)
        return chosen
    if not cluster.admins:
        raise ConfigError(f"{cluster.dir}: no administrator ([admin] clients in cluster.toml)")
    return cluster.admins[0]


def replica_epochs(cluster: Cluster, timeout: float = 1.0) -> dict[int, int]:
    """The epoch each reachable replica reports in force (its status endpoint)."""
    from .net import fetch_status

    out = {}
    for r in cluster.replicas:
        try:
            s = fetch_status(r.metrics_addr, r.metrics_port, timeout)
        except (OSError, urllib.error.URLError, ValueError):
            continue
        out[r.id] = int(s.get("config", {}).get("epoch", 0))
    return out


def wait_for_epoch(cluster: Cluster, bc, epoch: int, timeout_s: float = SWITCH_TIMEOUT_S) -> dict[int, int]:
    """Drive the cluster (ordered no-op requests) until replicas of quorum weight report ``epoch``."""
    cfg = cluster.cfg
    end = time.monotonic() + timeout_s
    noop = encode_request("show")
    while True:
        epochs = replica_epochs(cluster)
        if cfg.weight_of([r for r, e in epochs.items() if e >= epoch]) >= cfg.quorum_weight:
            return epochs
        if time.monotonic() > end:
            raise ConfigError(f"epoch {epoch} not in force at a quorum after {timeout_s:.0f} s (replicas report "
                              f"{epochs})")
        for _ in range(8):
            bc.invoke(noop, read_only=False, timeout=10.0)


def write_epoch_file(cluster: Cluster, bc) -> dict:
    """What the cluster reports in force (a certified reply) into DIR/epoch.json."""
    res = decode_result(bc.invoke(encode_request("show"), read_only=False, timeout=10.0))
    return _write_epoch_doc(cluster, res["config"].describe())


def certifying_chain(cluster: Cluster, doc: dict, timeout_s: float = CHAIN_TIMEOUT_S) -> tuple[str, dict]:
    """The configuration certificate chain (hex) whose last link certifies configuration ``doc``
    (its digest), fetched from the replicas and verified (``runtime.follow``), and ``doc``; "" for
    the genesis configuration. The replicas gather the link's signatures once its checkpoint is
    stable: waits for it. If a newer configuration is certified meanwhile (a configuration-only
    link replaces the one of ``doc``), that chain and the newer configuration's document (when a
    replica serves the configuration)."""
    from ..runtime.chain import config_digest, encode_chain
    from ..runtime.cluster import configuration_from_json
    from ..runtime.follow import learn

    cs = configuration_from_json(doc)
    if cs.epoch == 0:
        return "", doc
    want = config_digest(cs.encode())
    end = time.monotonic() + timeout_s
    while True:
        got = learn(cluster)
        for k in range(len(got.links), 0, -1):
            ref = got.links[k - 1].config
            if ref is not None and ref.epoch == cs.epoch and ref.digest == want:
                return encode_chain(got.links[:k]).hex(), doc
        if got.head is not None and got.head.epoch > cs.epoch and got.config is not None:
            return encode_chain(got.links).hex(), got.config.describe()
        if time.monotonic() > end:
            raise ConfigError(f"no replica serves a configuration certificate chain that certifies the configuration "
                              f"of epoch {cs.epoch} within {timeout_s:.0f} s (refused: {got.refused or 'none'}; "
                              f"unreachable: {sorted(got.unreachable) or 'none'}); {EPOCH_FILE} not written")
        time.sleep(0.1)


def _write_epoch_doc(cluster: Cluster, doc: dict) -> dict:
    chain, doc = certifying_chain(cluster, dict(doc))
    if chain:
        doc["chain"] = chain
    tmp = cluster.dir / (EPOCH_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, cluster.dir / EPOCH_FILE)
    return doc


MEMBERSHIP_ACTIONS = ("add-replica", "remove-replica", "replace-replica", "set-weights")


def replica_members(cluster: Cluster, timeout: float = 1.0) -> dict[int, dict]:
    """The membership each reachable replica slot reports (``members`` of its status endpoint)."""
    from .net import fetch_status

    out = {}
    for r in cluster.slots or cluster.replicas:
        try:
            s = fetch_status(r.metrics_addr, r.metrics_port, timeout)
        except (OSError, urllib.error.URLError, ValueError):
            continue
        if isinstance(s.get("members"), dict):
            out[r.id] = s["members"]
    return out


def _membership_change(cluster: Cluster, args) -> tuple[int, int, tuple[int, ...]]:
    """The n, f and weights ``args`` asks for (f: the largest for unit weights unless --faults)."""
    old = cluster.cfg
    if args.action == "set-weights":
        weights = tuple(int(w) for w in (args.weights or "").split(",") if w.strip())
        if len(weights) != old.n:
            raise ConfigError(f"set-weights needs {old.n} weights (one per replica), e.g. --weights "
                              f"{','.join(['1'] * old.n)}")
        return old.n, old.f if args.faults is None else args.faults, weights
    count = 1 if args.count is None else args.count
    if count < 1:
        raise ConfigError("--count must be at least 1")
    n = old.n + count if args.action == "add-replica" else old.n - count
    slots = len(cluster.slots or cluster.replicas)
    if not 1 <= n <= slots:
        raise ConfigError(f"{n} replicas: {cluster.dir}/cluster.toml has {slots} replica slots (pbft init "
                          f"--replica-slots) and the cluster {old.n} members")
    return n, (n - 1) // 3 if args.faults is None else args.faults, (1,) * n


def wait_for_switch(cluster: Cluster, bc, new: Cluster, epoch: int, timeout_s: float) -> dict[int, dict]:
    """Until the continuing members of quorum weight (of the smaller membership) report the new
    membership (``members_from``): ordered no-ops move the cluster to the checkpoint where the
    change takes effect; then the primary fills up to the switch point with null batches."""
    from ..runtime.client import PbftError

    small = new.cfg if new.cfg.n <= cluster.cfg.n else cluster.cfg
    end = time.monotonic() + timeout_s
    noop = encode_request("show")
    while True:
        seen = replica_members(cluster if cluster.cfg.n >= new.cfg.n else new)
        done = [r for r, m in seen.items() if m.get("members_from") == new.members_from and r < small.n]
        if small.weight_of(done) >= small.quorum_weight:
            return seen
        if time.monotonic() > end:
            raise ConfigError(f"the membership of epoch {epoch} not in force at a quorum after {timeout_s:.0f} s "
                              f"(replicas report {seen})")
        epochs = replica_epochs(cluster)
        if cluster.cfg.weight_of([r for r, e in epochs.items() if e >= epoch]) < cluster.cfg.quorum_weight:
            try:
                bc.invoke(noop, read_only=False, timeout=2.0)
            except PbftError:
                pass
        else:
            time.sleep(0.1)


def cmd_membership(args, cluster: Cluster, admin: int) -> int:
    """``add-replica``, ``remove-replica``, ``replace-replica``, ``set-weights`` (see the module notes)."""
    from ..runtime.client import BlockingClient, PbftError
    from ..runtime.cluster import with_membership

    if args.action == "replace-replica":
        return _replace_replica(args, cluster, admin)
    n, f, weights = _membership_change(cluster, args)
    added = [[i, cluster.slot(i).public_key] for i in range(cluster.cfg.n, n)]
    op = encode_request("set-membership", n, f, list(weights), added)
    t0 = time.monotonic()
    try:
        with BlockingClient(cluster, admin) as bc:
            # the configuration recorded before the change: the new one is it with the change, which
            # cannot be read from the cluster once it has switched (after a growth, the new membership
            # orders nothing before the added replicas run, and they start from epoch.json)
            before = _show(bc, args.timeout)["latest"]
            res = decode_result(bc.invoke(op, read_only=False, timeout=args.timeout))
            if not res["ok"]:
                print(f"pbft reconfig: refused: {res['reason']}", file=sys.stderr)
                return 1
            print(f"recorded: {args.action} {cluster.cfg.n} -> {n} replicas (f={f}) opens epoch {res['epoch']} "
                  f"at checkpoint {res['switch_seqno']}; the new membership orders after {res['members_at']}")
            latest = _with_change(before, cluster, n, f, weights, added, res).describe()
            if args.no_wait:
                return 0
            new = with_membership(cluster, n, f, weights, res["members_at"], res["epoch"])
            wait_for_switch(cluster, bc, new, res["epoch"], args.switch_timeout)
            took = time.monotonic() - t0
            print(f"membership of {n} replicas in force after {res['members_at']} ({took:.1f} s)")
            wrote = _write_epoch_doc(cluster, latest)  # (a newer one if certified meanwhile)
            print(f"wrote {cluster.dir / EPOCH_FILE} (epoch {wrote['epoch']}, {n} replicas)")
            if n > cluster.cfg.n:
                ids = " ".join(str(i) for i in range(cluster.cfg.n, n))
                print(f"start the added replicas (pbft up {cluster.dir} starts them by itself): "
                      + "; ".join(f"pbft replica {cluster.dir} --id {i}" for i in ids.split()))
            if args.json:
                print(json.dumps({"action": args.action, "n": n, "f": f, "epoch": res["epoch"],
                                  "members_from": res["members_at"], "switch_s": round(took, 3)}))
    except PbftError as e:
        print(f"pbft reconfig: {e}", file=sys.stderr)
        return 1
    return 0


def _show(bc, timeout: float) -> dict:
    """``show``, read-only (ordered if the read-only replies do not match)."""
    from ..runtime.client import PbftError

    try:
        return decode_result(bc.invoke(encode_request("show"), read_only=True, timeout=timeout))
    except PbftError:
        return decode_result(bc.invoke(encode_request("show"), read_only=False, timeout=timeout))


def _with_change(cs, cluster: Cluster, n: int, f: int, weights: tuple[int, ...], added: list, res: dict):
    """Configuration ``cs`` (recorded before the change) with the change ``res`` recorded, as the
    replicas record it (``core.membership.set_membership``): a change recorded earlier whose switch
    point has passed folded in, then the new membership, in force after ``res["members_at"]``."""
    from dataclasses import replace

    from ..core.membership import current, fold
    from ..state.configuration import Membership

    cs = fold(cs, res["members_at"])
    old = current(cs, cluster.genesis_cfg or cluster.cfg)
    keys = tuple(old.keys[:min(old.n, n)]) + tuple(k for _, k in added)
    nxt = Membership(n, f, tuple(weights), keys, res["members_at"], res["epoch"])
    return replace(cs, epoch=res["epoch"], opens_at=res["switch_seqno"], next_members=nxt)


def _replace_replica(args, cluster: Cluster, admin: int) -> int:
    """``replace-replica ID``: a new key pair for that id (``rotate-key``), and the replica to be
    started again with a fresh data directory (it catches up by state transfer)."""
    rid = args.principal
    if rid is None or not cluster.cfg.is_replica(rid):
        raise ConfigError(f"replace-replica needs a member id 0..{cluster.cfg.n - 1}")
    args.action = "rotate-key"
    rc = cmd_reconfig(args)
    if rc == 0 and not args.no_wait:
        d = cluster.storage.replica_dir(cluster.dir, rid)
        print(f"replica {rid} has a new key; stop it, remove {d}, and start it again (pbft replica {cluster.dir} "
              f"--id {rid}): it catches up by state transfer")
    return rc


def cmd_reconfig(args) -> int:
    from ..runtime.client import BlockingClient, PbftError

    try:
        cluster = load_cluster(args.dir)
    except ConfigError as e:
        if args.action not in ("show", "status") or not str(e).startswith(str(Path(args.dir) / EPOCH_FILE)):
            raise
        # (a refused epoch.json, e.g. one written by the previous version: `show` writes it again
        # from what the replicas certify, `status` says what that is)
        print(f"pbft reconfig: {e}; reading the configuration from the replicas instead", file=sys.stderr)
        cluster = load_cluster(args.dir, epoch_file=False)
    if args.action == "status":
        return cmd_chain_status(cluster, args.json)
    from ..runtime.follow import follow

    # the configuration in force as the replicas certify it, if newer than the directory's (no
    # epoch.json here, or an older one): a change is computed from it
    learnt = follow(cluster)
    if learnt is not None:
        cluster = learnt
    admin = _admin(cluster, args.admin)
    if args.action in MEMBERSHIP_ACTIONS:
        return cmd_membership(args, cluster, admin)
    written: Optional[Path] = None
    if args.action == "show":
        op = encode_request("show")
    elif args.action == "set-recovery-period":
        period_op = _recovery_period_op(cluster, args.seconds)
        if period_op is None:
            return 1
        op = period_op
    elif args.action == "revoke-client":
        op = encode_request("revoke-client", args.principal)
    else:
        if args.key_file:
            ident = read_key_file(Path(args.key_file), args.principal or 0)
        else:
            ident = Identity.generate(args.principal or 0)
        if args.action == "add-client":
            if args.principal is None:
                used = set(cluster.client_keys) | _revoked(cluster)
                free = [c for c in cluster.cfg.client_ids if c not in used]
                if not free:
                    raise ConfigError(f"no free client id (client_slots in {cluster.dir}/cluster.toml)")
                args.principal = free[0]
            if not cluster.cfg.is_client(args.principal):
                raise ConfigError(f"{args.principal} is not a client id: client ids are {cluster.cfg.client_base}.."
                                  f"{cluster.cfg.max_principal} (client_slots in cluster.toml)")
            written = cluster.key_path(args.principal)
            if written.exists():
                raise ConfigError(f"{written} exists: client {args.principal} was admitted before")
        else:
            written = next_key_path(cluster.key_path(args.principal))
        if not args.key_file:
            _write_key(written, ident.seed)
        op = encode_request(args.action, args.principal, ident.public)
    try:
        with BlockingClient(cluster, admin) as bc:
            res = decode_result(bc.invoke(op, read_only=args.action == "show", timeout=args.timeout))
            if args.action == "show":
                print(json.dumps({"in_force": res["config"].describe(), "latest": res["latest"].describe()},
                                 indent=1))
                if res["config"].epoch:
                    wrote = _write_epoch_doc(cluster, res["config"].describe())
                    print(f"wrote {cluster.dir / EPOCH_FILE} (epoch {wrote['epoch']})", file=sys.stderr)
                return 0
            if not res["ok"]:
                print(f"pbft reconfig: refused: {res['reason']}", file=sys.stderr)
                if written is not None and not args.key_file:
                    written.unlink(missing_ok=True)
                return 1
            what = f"{args.seconds:g} s" if args.action == "set-recovery-period" else \
                (args.principal if args.principal is not None else '')
            print(f"recorded: {args.action} {what} opens epoch "
                  f"{res['epoch']} at checkpoint {res['switch_seqno']}")
            if args.no_wait:
                return 0
            epochs = wait_for_epoch(cluster, bc, res["epoch"], args.switch_timeout)
            print(f"epoch {res['epoch']} in force (replica: epoch {epochs})")
            if args.action == "rotate-key" and written is not None and not args.key_file:
                key = cluster.key_path(args.principal)
                if key.exists():
                    os.replace(key, key.with_name(key.name + ".old"))
                os.replace(written, key)
                print(f"{key} now holds the new key (the old one: {key.name}.old)")
            doc = write_epoch_file(cluster, bc)
            print(f"wrote {cluster.dir / EPOCH_FILE} (epoch {doc['epoch']})")
    except PbftError as e:
        print(f"pbft reconfig: {e}", file=sys.stderr)
        return 1
    return 0


def _recovery_period_op(cluster: Cluster, seconds: float) -> Optional[bytes]:
    """The ``set-recovery-period`` request, or None (said why) for a period the replicas would
    refuse (the same check, with the membership known here)."""
    why, _ = check_recovery_period(seconds, cluster.cfg.n)
    if why:
        print(f"pbft reconfig: refused: {why}", file=sys.stderr)
        return None
    floor = cluster.cfg.n * cluster.recovery.alarm_s
    if 0 < seconds < floor:
        print(f"pbft reconfig: warning: {seconds:g} s is below {cluster.cfg.n} replicas x alarm_s "
              f"({floor:g} s): a recovery that takes up to alarm_s may still run at the next replica's turn "
              f"(docs/recovery.md)", file=sys.stderr)
    return encode_request("set-recovery-period", seconds)


def _revoked(cluster: Cluster) -> set[int]:
    path = cluster.dir / EPOCH_FILE
    try:
        return {int(c) for c in json.loads(path.read_text()).get("revoked", [])}
    except (OSError, ValueError, TypeError):
        return set()


def cmd_chain_status(cluster: Cluster, as_json: bool = False) -> int:
    """``status``: the configuration the replicas' certificate chains certify (no request, no
    administrator): the newest chain that verifies against cluster.toml, who serves it, the
    membership and replica keys of its last link, and the full configuration if a replica serves
    the one of its digest. 1 if no replica answered."""
    from ..runtime.follow import genesis_keys, learn

    got = learn(cluster)
    h = got.head
    assert h is not None  # (learn starts from the directory's own chain)
    toml_keys = genesis_keys(cluster)
    m = h.members
    cs = got.config
    rotated = [i for i, k in enumerate(m.keys) if i < len(toml_keys) and k != toml_keys[i]]
    epoch_file = cluster.epoch if (cluster.dir / EPOCH_FILE).exists() else None
    doc: dict[str, Any] = {"epoch": h.epoch, "opens_at": h.opens_at if h.config else None, "links": len(got.links),
           "served_by": got.served_by, "refused": {str(j): why for j, why in sorted(got.refused.items())},
           "unreachable": got.unreachable, "config_digest": h.config.hex(),
           "members": {"n": m.n, "f": m.f, "weights": list(m.weights), "opens_at": m.opens_at, "epoch": m.epoch,
                       "keys": [k.hex() for k in m.keys]},
           "rotated": rotated, "configuration": cs.describe() if cs is not None else None,
           "epoch_file": epoch_file}
    if as_json:
        print(json.dumps(doc, indent=1))
    else:
        where = (f"certified by a chain of {len(got.links)} link{'s' if len(got.links) > 1 else ''} served by "
                 f"replicas {got.served_by}"
                 if got.links else "the genesis configuration (no replica serves a link)")
        print(f"configuration epoch {h.epoch}" + (f" (in force from checkpoint {h.opens_at})" if h.config else "")
              + f": {where}")
        print(f"membership: {m.n} replicas, f={m.f}" + (f", weights {list(m.weights)}" if set(m.weights) != {1} else "")
              + (f" (epoch {m.epoch}, after seqno {m.opens_at})" if m.opens_at else " (cluster.toml's)"))
        for i, k in enumerate(m.keys):
            note = f" (rotated: cluster.toml has {toml_keys[i].hex()[:16]}...)" if i in rotated else ""
            print(f"  replica {i}: key {k.hex()}{note}")
        if cs is not None:
            print(f"clients: {len(cs.clients) - len(cs.revoked)} admitted, revoked {sorted(cs.revoked)}; "
                  f"administrators {list(cs.admins)} (the full configuration, checked against the link's digest)")
        elif h.config:
            print(f"the full configuration was not served (digest {h.config.hex()[:16]}...)")
        if epoch_file is not None:
            print(f"{cluster.dir / EPOCH_FILE}: epoch {epoch_file}"
                  + (" (older: `pbft reconfig DIR show` writes it again)" if epoch_file < h.epoch else ""))
        for j, why in sorted(got.refused.items()):
            print(f"refused: replica {j}: {why}")
        if got.unreachable:
            print(f"unreachable: replicas {got.unreachable}")
    slots = cluster.slots or cluster.replicas
    return 1 if len(got.unreachable) == len(slots) else 0


def add_reconfig_commands(sub) -> None:
    p = sub.add_parser("reconfig", help="change the configuration of a live cluster: admit or revoke clients, "
                       "set the recovery period, rotate long-term keys (docs/reconfiguration.md)")
    p.add_argument("dir")
    p.add_argument("action", choices=["add-client", "revoke-client", "rotate-key", "set-recovery-period", "show",
                                      "status", *MEMBERSHIP_ACTIONS])
    p.add_argument("principal", nargs="?", default=None,
                   help="the client (add-client: default the first free id; revoke-client) or the replica or "
                        "client whose key to rotate; set-recovery-period: the period in seconds (0: off)")
    p.add_argument("--key-file", default=None, help="add-client, rotate-key: use this private key (hex seed) "
                   "instead of generating one here")
    p.add_argument("--admin", type=int, default=None, help="the administrator to send as (default: the first)")
    p.add_argument("--no-wait", action="store_true", help="return once the change is recorded, without "
                   "moving the cluster to the checkpoint where it takes effect")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--switch-timeout", type=float, default=SWITCH_TIMEOUT_S)
    p.add_argument("--count", type=int, default=None, help="add-replica, remove-replica: how many (default 1)")
    p.add_argument("--faults", type=int, default=None, help="membership changes: the f of the new membership "
                   "(default: the largest for its size)")
    p.add_argument("--weights", default=None, help="set-weights: one weight per replica, comma-separated")
    p.add_argument("--json", action="store_true", help="membership changes: also print the figures as JSON; "
                   "status: print it as JSON")
    p.set_defaults(func=_checked)


def _checked(args) -> int:
    if args.action == "set-recovery-period":
        try:
            args.seconds = float(args.principal)
        except (TypeError, ValueError):
            raise ConfigError("set-recovery-period needs a period in seconds (0: off)") from None
        args.principal = None
    elif args.principal is not None:
        try:
            args.principal = int(args.principal)
        except ValueError:
            raise ConfigError(f"{args.action}: {args.principal!r} is not a principal id") from None
    if args.action in ("revoke-client", "rotate-key", "replace-replica") and args.principal is None:
        raise ConfigError(f"{args.action} needs a principal id")
    return cmd_reconfig(args)
