"""The networked commands of ``pbft``: init, replica, up, recover, kv, status; and what other
tools share with them: ``load_service`` (the ``--service`` spec), ``fetch_status`` (a replica's
``/status``) and ``run_guarded`` (configuration errors as one line)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from ..config import ConfigError


def load_service(spec: str, cluster=None):
    """The service of ``--service SPEC`` for ``cluster`` (a loaded ``Cluster``, or ``None``):
    ``kv``, ``kv-alt`` (the same service implemented differently, ``services.kv_alt``), ``bfs`` or
    ``module:Class``, a ``pbft.Service`` subclass built with
    ``Class.from_cluster(ServiceCluster.of(cluster))`` (by default ``Class()``), which reads
    its section ``[service.NAME]`` of ``cluster.toml`` and the client ids if it needs them
    (docs/client.md, *Per-client policy*).  BFS reads ``[bfs]`` (docs/bfs.md)."""
    from ..service import Service, ServiceCluster

    view = ServiceCluster.of(cluster) if cluster is not None else ServiceCluster()
    obj: Any
    if spec == "kv":
        from ..services.kv import KVService
        return KVService(skew_ms=cluster.cfg.nondet_skew_ms_max) if cluster is not None else KVService()
    if spec == "kv-alt":  # the same service and abstract state, another implementation (services.kv_alt)
        from ..services.kv_alt import KVAltService
        return KVAltService(skew_ms=cluster.cfg.nondet_skew_ms_max) if cluster is not None else KVAltService()
    if spec == "bfs":
        from ..services.bfs import BFSService
        obj = BFSService
    elif ":" not in spec:
        raise ConfigError(f"unknown service {spec!r}: use 'kv', 'kv-alt', 'bfs' or 'module:Class'")
    else:
        mod, _, name = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load service {spec!r}: {e}") from None
    build = obj.from_cluster if isinstance(obj, type) and hasattr(obj, "from_cluster") else obj
    try:
        service = build(view) if build is not obj else obj()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"cannot build service {spec!r} from {view.path}: {type(e).__name__}: {e}") from None
    if not isinstance(service, Service):
        raise ConfigError(f"{spec} is not a pbft.Service")
    return service


# ---- init -------------------------------------------------------------------

def cmd_init(args) -> int:
    from ..runtime.cluster import init_cluster

    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts else None
    service = getattr(args, "service", None)
    clients = args.clients if args.clients is not None else (8 if service == "bfs" else 4)
    period = getattr(args, "recovery_period", None)
    if period is not None and not 0 <= period < float("inf"):
        raise ConfigError(f"--recovery-period must be a non-negative number of seconds, got {period:g}")
    c = init_cluster(args.dir, args.replicas, args.faults, hosts, args.base_port, clients, force=args.force,
                     recovery=None if period is None else {"period_s": period},
                     admins=getattr(args, "admins", 1), spare_clients=getattr(args, "spare_clients", 4),
                     replica_slots=getattr(args, "replica_slots", None))
    if service == "bfs":
        from ..services.bfs.config import DEFAULT_SECTION
        with open(c.dir / "cluster.toml", "a") as fh:
            fh.write(DEFAULT_SECTION)
        print(f"added a [bfs] section (limits, client policy) to {c.dir / 'cluster.toml'}: see docs/bfs.md")
    if not getattr(args, "no_integrity", False):
        from ..runtime.integrity import record
        record(c.dir)  # replicas refuse to start from other code (runtime.integrity)
    print(f"wrote {c.dir / 'cluster.toml'}: {c.n} replicas (f={c.cfg.f}), {len(c.client_ids)} clients "
          f"(ids {c.client_ids[0]}..{c.client_ids[-1]}); private keys in {c.dir / 'keys'} (mode 0600)")
    if c.admins:
        print(f"  administrator{'s' if len(c.admins) > 1 else ''} (pbft reconfig): client "
              f"{', '.join(map(str, c.admins))}; {c.cfg.clients_max - len(c.client_keys)} free client ids "
              "(docs/reconfiguration.md)")
    p = c.recovery.period_s
    print(f"  proactive recovery: every replica every {p:g} s, one every {p / c.n:g} s (docs/recovery.md)" if p else
          "  proactive recovery: off (--recovery-period 0); `pbft recover` still works")
    for r in c.replicas:
        where = " (on its machine)" if r.metrics_addr != r.host and r.metrics_addr == "127.0.0.1" else ""
        print(f"  replica {r.id}: {r.host}:{r.port}  metrics http://{r.metrics_addr}:{r.metrics_port}/metrics{where}")
    return 0


# ---- replica / up -------------------------------------------------------------

def cmd_replica(args) -> int:
    from ..runtime.cluster import load_cluster
    from ..runtime.node import run_replica

    from ..runtime.integrity import check
    from .guard import signer_spec

    cluster = load_cluster(args.dir)
    slots = len(cluster.slots or cluster.replicas)
    if not 0 <= args.id < slots:
        raise ConfigError(f"--id must be a replica id 0..{slots - 1}, got {args.id}")
    check(cluster.dir)  # the code we run is the code cluster.toml names (at every start: every reboot)
    # the membership in force as the replicas certify it (their membership certificate chains,
    # verified against cluster.toml), which may be newer than epoch.json's, or there may be no
    # epoch.json on this machine: what an added replica joins, and what a replica that starts from
    # nothing stored after a change joins (one with a store restores its checkpoint's membership)
    from ..runtime.follow import follow

    learnt = follow(cluster)
    if learnt is not None:
        print(f"pbft replica: the replicas certify a membership of {learnt.cfg.n} replicas (f={learnt.cfg.f}) "
              f"after {learnt.members_from}, epoch {learnt.members_epoch} (configuration epoch "
              f"{learnt.chain[-1].epoch if learnt.chain else 0})", file=sys.stderr)
        cluster = learnt
    held = held_chain(cluster, args.id)  # (the peers may be down too: a whole cluster restarting)
    if held is not None:
        print(f"pbft replica: the chain replica {args.id} holds certifies a membership of {held.cfg.n} replicas "
              f"(f={held.cfg.f}) after {held.members_from}, epoch {held.members_epoch}", file=sys.stderr)
        cluster = held
    identity = None
    sock = signer_spec(cluster.dir, args.id, getattr(args, "signer", None))
    if sock is not None:  # the key stays in a signer process; we never read the key file
        from ..runtime.signer import SignerIdentity
        identity = SignerIdentity(args.id, sock, cluster.slot(args.id).public_key)
    service = load_service(replica_service(cluster, args.id, args.service), cluster)
    run_replica(cluster, args.id, service, quiet=args.quiet, recover=args.recover, identity=identity)
    return 0


def held_chain(cluster, replica_id: int):
    """The cluster with the configuration the chain replica ``replica_id`` keeps in its data
    directory certifies (``runtime.chain_keeper``: ``membership-chain`` and, beside it, the
    configuration it ends at; verified against cluster.toml), if that chain is newer than
    ``cluster``'s (a key rotation or a client change included); else None (none kept, or one that
    does not verify: the replica's own start logs it, ``chain-unreadable``)."""
    from ..runtime.chain import CHAIN_BYTES_MAX, CONFIG_BYTES_MAX, ChainError, check_configuration, decode_chain
    from ..runtime.chain_keeper import CHAIN_FILE, CONFIG_FILE
    from ..runtime.follow import chain_head, with_chain

    st = cluster.storage
    if st.mode == "memory":
        return None
    path = st.replica_dir(cluster.dir, replica_id) / CHAIN_FILE
    try:
        with open(path, "rb") as fh:
            links = tuple(decode_chain(fh.read(CHAIN_BYTES_MAX + 1)))
        if not links:
            return None
        head = chain_head(cluster, links)
        if head.order() <= chain_head(cluster).order():
            return None
        config = None
        if head.config:
            try:
                with open(path.with_name(CONFIG_FILE), "rb") as fh:
                    config = check_configuration(cluster.genesis_cfg or cluster.cfg, head,
                                                 fh.read(CONFIG_BYTES_MAX + 1))
            except (OSError, ChainError):
                config = None  # (the chain's members and keys still count; the clients' stay)
        return with_chain(cluster, links, config)
    except (OSError, ChainError, ConfigError):
        return None


def replica_service(cluster, replica_id: int, option) -> str:
    """The ``--service`` spec replica ``replica_id`` runs: the option, else its ``service`` in
    ``cluster.toml`` (replicas may run different implementations), else ``kv``."""
    return option or cluster.slot(replica_id).service or "kv"


def cmd_up(args) -> int:
    """Run every replica of the cluster file here. A replica that exits is restarted (after a
    back-off that grows while it keeps exiting soon after its start) and the others go on, as a
    BFT cluster should; ``--on-exit stop`` stops them all instead. Ctrl-C or SIGTERM stops them."""
    from ..runtime.cluster import load_cluster
    from .procs import Procs

    cluster = load_cluster(args.dir)
    for spec in sorted({replica_service(cluster, r.id, args.service) for r in cluster.replicas}):
        load_service(spec, cluster)  # fail here, once, rather than in every child
    children = Procs()  # the replicas' stderr is ours
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rc = 0
    try:
        procs = {r.id: children.start_replica(args.dir, r.id, args.service, args.quiet) for r in cluster.replicas}
        how = "a replica that exits is restarted" if args.on_exit == "restart" else "one that exits stops all"
        print(f"pbft up: {len(procs)} replicas running (pids {', '.join(str(p.pid) for p in procs.values())}); "
              f"{how}; Ctrl-C stops them", file=sys.stderr)
        rc = _supervise(args, children, procs, stop)
    finally:
        children.stop_all(grace=5.0)
        print("pbft up: stopped", file=sys.stderr)
    return rc


UP_RESTART_MIN_S = 1.0
UP_RESTART_MAX_S = 30.0
UP_STABLE_S = 30.0  # a replica that ran this long before exiting starts again after the minimum
UP_MEMBERSHIP_POLL_S = 1.0  # how often `pbft up` reads the membership in force


def _members_in_force(directory, known: set[int]) -> set[int]:
    """The replica ids of the membership in force in DIR (``known`` if DIR cannot be read now)."""
    from ..runtime.cluster import load_cluster

    try:
        return {r.id for r in load_cluster(directory).replicas}
    except ConfigError:
        return known


def _supervise(args, children, procs: dict, stop: dict) -> int:
    """``pbft up``'s watch loop: the replicas in ``procs`` (id -> process) until ``stop``."""
    started = {rid: time.monotonic() for rid in procs}
    quick_exits = {rid: 0 for rid in procs}
    due: dict[int, float] = {}  # replica id -> when to start it again
    restarts = 0
    members, looked = set(procs), 0.0
    while not stop["flag"]:
        now = time.monotonic()
        if now - looked >= UP_MEMBERSHIP_POLL_S:
            # the membership in force (epoch.json, written by `pbft reconfig`): added replicas start
            # (as joiners), replicas that left are not restarted when they exit
            looked = now
            members = _members_in_force(args.dir, members)
            for rid in sorted(members - set(procs)):
                procs[rid] = children.start_replica(args.dir, rid, args.service, args.quiet)
                started[rid], quick_exits[rid] = now, 0
                print(f"pbft up: replica {rid} started, a member of the membership in force (pid "
                      f"{procs[rid].pid})", file=sys.stderr)
        for rid, p in list(procs.items()):
            if p is None or p.poll() is None:
                continue
            ran = now - started[rid]
            print(f"pbft up: replica {rid} exited with status {p.returncode} after {ran:.1f} s"
                  f"{children.tail(p)}", file=sys.stderr)
            children.stop([p])  # reaped and forgotten
            procs[rid] = None
            if args.on_exit == "stop":
                return 1
            if rid not in members:
                print(f"pbft up: replica {rid} is not a member any more: not restarted", file=sys.stderr)
                del procs[rid]
                continue
            quick_exits[rid] = 0 if ran >= UP_STABLE_S else quick_exits[rid] + 1
            wait = min(UP_RESTART_MAX_S, UP_RESTART_MIN_S * 2 ** max(0, quick_exits[rid] - 1))
            due[rid] = now + wait
            print(f"pbft up: restarting replica {rid} in {wait:.0f} s; the others go on", file=sys.stderr)
        for rid, at in list(due.items()):
            if rid not in members:
                del due[rid]
                procs.pop(rid, None)
                continue
            if now >= at:
                del due[rid]
                procs[rid] = children.start_replica(args.dir, rid, args.service, args.quiet)
                started[rid] = now
                restarts += 1
                print(f"pbft up: replica {rid} restarted (pid {procs[rid].pid})", file=sys.stderr)
        time.sleep(0.2)
    if restarts:
        print(f"pbft up: {restarts} restart(s) in this run", file=sys.stderr)
    return 0


# ---- recover -------------------------------------------------------------------

def cmd_recover(args) -> int:
    """Make replica I start a proactive recovery now (SIGUSR1 to its process, found through
    the pid file in its data directory, or its /status in the memory mode)."""
    from ..runtime.cluster import load_cluster

    cluster = load_cluster(args.dir)
    if not 0 <= args.id < cluster.n:
        raise ConfigError(f"--id must be a replica id 0..{cluster.n - 1}, got {args.id}")
    pid = None
    pidfile = cluster.storage.replica_dir(cluster.dir, args.id) / "pid"
    if cluster.storage.mode != "memory":
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = None
    if pid is None:
        r = cluster.replicas[args.id]
        try:
            pid = int(fetch_status(r.metrics_addr, r.metrics_port, 2.0)["pid"])
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            raise ConfigError(f"replica {args.id} is not running here ({pidfile}: no pid; /status: "
                              f"{getattr(e, 'reason', e)})") from None
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise ConfigError(f"replica {args.id} is not running (pid {pid} from {pidfile} is gone)") from None
    except PermissionError:
        raise ConfigError(f"not allowed to signal replica {args.id} (pid {pid}): run as its user") from None
    print(f"replica {args.id} (pid {pid}): recovery started; `pbft status {args.dir}` shows its progress")
    return 0


# ---- kv ------------------------------------------------------------------------

def cmd_kv(args) -> int:
    from ..runtime.client import BlockingClient, PbftError
    from ..services.kv import KVClient, ServiceError

    def b(s: str) -> bytes:
        return s.encode("utf-8")

    try:
        with BlockingClient(args.dir, args.client) as bc:
            kv = KVClient(bc.invoke, timeout=args.timeout)
            if args.op == "get":
                v = kv.get(b(args.key), read_only=not args.ordered)
                if v is None:
                    print("(absent)", file=sys.stderr)
                    return 1
                sys.stdout.write(v.decode("utf-8", "backslashreplace") + "\n")
            elif args.op == "put":
                if args.value is None:
                    raise ConfigError("put needs KEY VALUE")
                kv.put(b(args.key), b(args.value))
                print("ok")
            elif args.op == "delete":
                print("deleted" if kv.delete(b(args.key)) else "(absent)")
            elif args.op == "cas":
                if args.value is None or args.new is None:
                    raise ConfigError("cas needs KEY EXPECTED NEW (EXPECTED '-' means absent)")
                exp = None if args.value == "-" else b(args.value)
                ok = kv.cas(b(args.key), exp, b(args.new))
                print("swapped" if ok else "not swapped (value differs)")
                return 0 if ok else 1
    except ServiceError as e:
        print(f"pbft kv: the service refused: {e}", file=sys.stderr)
        return 1
    except PbftError as e:
        print(f"pbft kv: {e}", file=sys.stderr)
        return 1
    return 0


# ---- status --------------------------------------------------------------------

def fetch_status(host: str, port: int, timeout: float = 1.0) -> dict:
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as r:
        return json.loads(r.read())


def status_notes(cluster, rows: list[dict]) -> list[str]:
    """Replicas that are behind or alone in a view change, as lines for ``pbft status``; each
    reachable row also gets ``behind`` (sequence numbers below the most advanced replica) and
    ``alone_in_view_change`` (it changes view while replicas of quorum weight are active in a
    lower view: nothing but the idle rejoin or the next view change brings it back)."""
    cfg = cluster.cfg
    up = [s for s in rows if s["reachable"]]
    if not up:
        return []
    top = max(s["last_executed"] for s in up)
    # (under load replicas differ by the batches in flight; more than twice that is behind)
    slack = max(2 * cfg.batches_in_flight_max, 8)
    notes = []
    for s in up:
        s["behind"] = top - s["last_executed"]
        active_below = [o["replica"] for o in up if o["view_active"] and o["view"] < s["view"]]
        s["alone_in_view_change"] = (not s["view_active"] and cfg.weight_of(active_below) >= cfg.quorum_weight)
        if s["alone_in_view_change"]:
            views = sorted({o["view"] for o in up if o["replica"] in active_below})
            notes.append(f"replica {s['replica']} is alone in a view change to view {s['view']}: replicas "
                         f"{active_below} are active in view {'/'.join(map(str, views))}")
        if s["behind"] > slack:
            notes.append(f"replica {s['replica']} is behind: executed {s['last_executed']}, the most advanced "
                         f"replica {top} ({s['behind']} sequence numbers)")
    return notes


def cmd_status(args) -> int:
    from ..runtime.cluster import load_cluster
    from ..runtime.follow import chain_of_status, config_of_status, newest, with_chain

    cluster = load_cluster(args.dir)
    got: dict = {}
    for r in cluster.slots or cluster.replicas:
        try:
            got[r.id] = fetch_status(r.metrics_addr, r.metrics_port, args.timeout)
        except (OSError, urllib.error.URLError, ValueError) as e:
            got[r.id] = e
    # the membership in force as the replicas certify it (their chains), if newer than the directory's
    served, configs = {}, {}
    for j, s in got.items():
        try:
            served[j] = chain_of_status(s)
            configs[j] = config_of_status(s)
        except (ValueError, AttributeError):
            continue
    learnt = newest(cluster, served, configs)
    certified = ""
    if learnt.links and learnt.links != tuple(cluster.chain):
        cluster = with_chain(cluster, learnt.links, learnt.config)
        certified = f"certified by the chain replicas {learnt.served_by} serve"
    rows = []
    members = {r.id for r in cluster.replicas}
    for r in cluster.slots or cluster.replicas:
        s = got[r.id]
        if isinstance(s, dict):
            s["reachable"] = True
        else:
            if r.id not in members:
                continue  # (a spare slot, or a replica removed and stopped)
            s = {"replica": r.id, "reachable": False, "error": str(getattr(s, "reason", s))}
            if r.metrics_addr in ("127.0.0.1", "::1", "localhost") and r.host != r.metrics_addr:
                s["error"] += f"; its endpoint listens on {r.metrics_addr} only: run this on its machine, " \
                              "or set metrics_host in cluster.toml"
        s["address"] = f"{r.host}:{r.port}"
        rows.append(s)
    notes = status_notes(cluster, [s for s in rows if s["replica"] in members])
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'replica':>7} {'address':21} {'state':11} {'view':>5} {'primary':>7} {'executed':>9} "
              f"{'stable':>7} {'requests':>9} {'peers':>7} {'epoch':>5} {'n/f':>5}")
        for s in rows:
            if not s["reachable"]:
                print(f"{s['replica']:>7} {s['address']:21} {'UNREACHABLE':11} ({s['error']})")
                continue
            state = "active" if s["view_active"] else "view-change"
            if s.get("fetching_state"):
                state = "catching-up"
            if s.get("recovering"):
                state = "OVERDUE" if s.get("recovery_overdue") else "recovering"
            m = s.get("members") or {}
            if m.get("retired") or s["replica"] not in members:
                state = "retired"
            peers = f"{len(s['peers_connected'])}/{cluster.n - 1}"
            epoch = s.get("config", {}).get("epoch", "-")
            nf = f"{m['n']}/{m['f']}" if "n" in m else "-"
            print(f"{s['replica']:>7} {s['address']:21} {state:11} {s['view']:>5} {s['primary']:>7} "
                  f"{s['last_executed']:>9} {s['stable_checkpoint']:>7} {s['executed_requests']:>9} {peers:>7} "
                  f"{epoch:>5} {nf:>5}")
        print(f"membership: {cluster.cfg.n} replicas, f={cluster.cfg.f}"
              + (f", weights {list(cluster.cfg.weights)}" if set(cluster.cfg.weights) != {1} else "")
              + (f" (epoch {cluster.members_epoch}, after seqno {cluster.members_from}; "
                 f"{certified or f'{cluster.dir}/epoch.json'})"
                 if cluster.members_from else " (cluster.toml)"))
        if learnt.refused:
            print(f"membership chains refused (they do not verify against {cluster.dir}/cluster.toml): "
                  + "; ".join(f"replica {j}: {why}" for j, why in sorted(learnt.refused.items())))
        for line in notes:
            print(line)
    reachable = [s["replica"] for s in rows if s["reachable"] and s["replica"] in members]
    return 0 if cluster.cfg.weight_of(reachable) >= cluster.cfg.quorum_weight or len(reachable) == cluster.n else 1


def add_commands(sub) -> None:
    i = sub.add_parser("init", help="write a cluster directory: cluster.toml and key files")
    i.add_argument("dir")
    i.add_argument("--replicas", type=int, required=True)
    i.add_argument("--faults", type=int, default=None, help="f (default: the largest (n-1)//3)")
    i.add_argument("--hosts", default=None,
                   help="comma list of hosts, assigned to replicas in turn (default 127.0.0.1)")
    i.add_argument("--base-port", type=int, default=7000, help="replica i listens on base+i, metrics on base+100+i")
    i.add_argument("--clients", type=int, default=None,
                   help="client identities to create (default 4; 8 with --service bfs)")
    i.add_argument("--force", action="store_true", help="overwrite an existing cluster.toml")
    i.add_argument("--admins", type=int, default=1, help="administrator identities ([admin], `pbft reconfig`; "
                   "default 1)")
    i.add_argument("--spare-clients", type=int, default=4, help="client ids left free for `pbft reconfig DIR "
                   "add-client` (default 4)")
    i.add_argument("--replica-slots", type=int, default=None, metavar="N",
                   help="replica ids to reserve, members or not (default: --replicas); client ids start at N, "
                        "so that membership changes can add replicas (docs/reconfiguration.md)")
    i.add_argument("--no-integrity", action="store_true", help="record no [integrity] package_sha256 (replicas "
                   "then run whatever code is installed; docs/recovery.md)")
    i.add_argument("--recovery-period", type=float, default=None, metavar="S",
                   help="[recovery] period_s: every replica recovers once every S seconds, in turn (default: "
                        "the number of replicas times alarm_s, 240 for 4; 0: off). docs/recovery.md")
    i.add_argument("--service", default=None, choices=["bfs"],
                   help="bfs: also write the file system's [bfs] section (docs/bfs.md)")
    i.set_defaults(func=cmd_init)

    r = sub.add_parser("replica", help="run one replica in the foreground")
    r.add_argument("dir")
    r.add_argument("--id", type=int, required=True)
    r.add_argument("--service", default=None, help="'kv', 'kv-alt', 'bfs' or module:Class (default: the "
                   "replica's service in cluster.toml, else kv)")
    r.add_argument("--quiet", action="store_true", help="no log lines")
    r.add_argument("--recover", action="store_true",
                   help="start with a proactive recovery (what a reboot by the watchdog or `pbft recover` does)")
    r.add_argument("--signer", default=None, help="the UNIX socket of a `pbft signer` holding this replica's "
                   "key (default: [keys] signer in cluster.toml, else the key file is read)")
    r.set_defaults(func=cmd_replica)

    rc = sub.add_parser("recover", help="make a replica start a proactive recovery now")
    rc.add_argument("dir")
    rc.add_argument("--id", type=int, required=True)
    rc.set_defaults(func=cmd_recover)

    u = sub.add_parser("up", help="run every replica of the cluster file on this machine (Ctrl-C stops)")
    u.add_argument("dir")
    u.add_argument("--service", default=None, help="'kv', 'kv-alt', 'bfs' or module:Class, for every "
                   "replica (default: each replica's service in cluster.toml, else kv)")
    u.add_argument("--quiet", action="store_true")
    u.add_argument("--on-exit", choices=["restart", "stop"], default="restart",
                   help="when a replica exits: restart it after a back-off (1 s, doubling while it keeps "
                        "exiting within 30 s of its start, at most 30 s) while the others go on (default), "
                        "or stop them all and exit with status 1")
    u.set_defaults(func=cmd_up)

    from ..services.bfs.cli import add_bfs_commands
    add_bfs_commands(sub)
    from .guard import add_guard_commands
    add_guard_commands(sub)
    from .reconfig import add_reconfig_commands
    add_reconfig_commands(sub)

    k = sub.add_parser("kv", help="a client of the key-value service")
    k.add_argument("dir")
    k.add_argument("op", choices=["get", "put", "delete", "cas"])
    k.add_argument("key")
    k.add_argument("value", nargs="?", default=None, help="put: the value; cas: the expected value ('-' = absent)")
    k.add_argument("new", nargs="?", default=None, help="cas: the new value")
    k.add_argument("--client", type=int, default=None, help="client id (default: the first in the cluster file)")
    k.add_argument("--timeout", type=float, default=10.0)
    k.add_argument("--ordered", action="store_true", help="get: order the read instead of the read-only path")
    k.set_defaults(func=cmd_kv)

    s = sub.add_parser("status", help="view, primary, progress and reachability of every replica")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=1.0)
    s.set_defaults(func=cmd_status)


def run_guarded(func, args) -> int:
    """Run a command; configuration errors are one line, not a traceback."""
    try:
        return func(args)
    except ConfigError as e:
        print(f"pbft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

