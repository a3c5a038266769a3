"""The cluster directory: ``cluster.toml`` plus one private key file per principal.

``pbft init DIR`` writes it; every other command loads it with
``load_cluster``, which turns every problem into a one-line ``ConfigError``.

Layout::

    DIR/cluster.toml          membership, addresses, public keys, parameters
    DIR/keys/replica-<i>.key  private key of replica i (hex Ed25519 seed, mode 0600)
    DIR/keys/client-<c>.key   private key of client c
    DIR/epoch.json            the configuration the cluster reported last (``pbft reconfig``;
                              clients and tools use its keys: docs/reconfiguration.md)

Replicas are principals ``0..replica_slots-1`` (the members: ``0..n-1``; the spare slots, with
an address and a key pair each, are for membership changes); clients are
``replica_slots..`` (the ids the protocol uses).  Copy the whole directory to every machine, or better,
give each machine only ``cluster.toml`` and its own key file.
"""

from __future__ import annotations

import dataclasses
import math
import hashlib
import json
import ipaddress
import os
import random
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..config import ClusterConfig, ConfigError
from ..core.membership import cluster_config
from ..state.configuration import ConfigRecord, Configuration, Membership, genesis_record
from .keys import PUBLIC_KEY_SIZE, Identity, PublicKeys
from .transport import client_frame_bytes_max

CLUSTER_FILE = "cluster.toml"
KEY_DIR = "keys"
EPOCH_FILE = "epoch.json"  # written by `pbft reconfig` (tools.reconfig)
EPOCH_FILE_BYTES_MAX = 16 << 20
SPARE_CLIENT_SLOTS = 4  # client ids `pbft init` leaves free for `pbft reconfig DIR add-client`

# protocol parameters a cluster file may set (ClusterConfig fields), with network-friendly defaults
PROTOCOL_DEFAULTS: dict[str, float | int | bool] = {
    "checkpoint_interval_seqnos": 128,
    "log_window_seqnos": 256,
    "batch_requests_max": 64,
    "batches_in_flight_max": 4,
    "view_change_timeout_ms": 1000.0,
    "view_change_timeout_max_ms": 30_000.0,
    "status_interval_ms": 100.0,
    "state_fetch_timeout_ms": 500.0,
    "client_retry_timeout_ms": 500.0,
    "client_retry_timeout_max_ms": 4_000.0,
    "nondet_skew_ms_max": 1_000.0,
    "timestamp_skew_ms_max": 600_000.0,
    "tentative_execution": True,
    "request_size_bytes_max": 64 * 1024,
    "reply_size_bytes_max": 64 * 1024,
    "message_size_bytes_max": 4 * 1024 * 1024,
    "state_size_bytes_max": 3 * 1024 * 1024,
    "pending_requests_max": 1024,
    "status_resend_seqnos_max": 16,
    "vouch_delay_ms": 2.0,
    "request_inline_op_bytes_max": 255,
    "request_body_wait_ms": 10.0,
}


@dataclass(frozen=True)
class RuntimeParams:
    """Knobs of the networked runtime (section ``[runtime]``)."""

    key_refresh_s: float = 120.0  # how often every principal sends fresh session keys
    send_queue_bytes_max: int = 16 * 1024 * 1024  # per connection; beyond it frames are dropped
    receive_budget_frames: int = 64  # frames handled per connection before yielding to others
    connections_max: int = 1024  # inbound connections per replica
    # inbound connections served per second that do not authenticate (runtime.transport.Listener:
    # a connection's credit comes back when it authenticates; the excess waits in the kernel; one
    # source address gets half; twice as many may be refused at once from their first bytes)
    unauthenticated_accepts_per_s: float = 50.0
    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0
    # inbound connections (runtime.transport.InboundGuard): one that has not authenticated (no valid
    # NewKey yet) is closed after this long without a byte or with a frame still incomplete
    unauthenticated_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0  # authenticated connections without a byte (clients refresh keys every key_refresh_s)
    frame_timeout_s: float = 30.0  # a frame begun on an authenticated connection must be complete by then
    partial_frames_bytes_max: int = 64 * 1024 * 1024  # bytes buffered by all inbound connections together
    # the HTTP endpoint (/metrics, /status; runtime.metrics), served by a thread of its own
    metrics_host: str = "127.0.0.1"  # address it listens on ("0.0.0.0": every interface); per replica too
    http_connections_max: int = 32  # open at once; past it the oldest one still sending its request goes
    http_request_timeout_s: float = 5.0  # to send the whole request
    http_requests_per_s: float = 20.0  # connections accepted per second (the excess waits in the kernel)
    # the replica's CPU scheduling policy (runtime.sched): "batch" (Linux SCHED_BATCH: a replica
    # woken by a message does not preempt the process that sent it, so a multicast leaves whole
    # before its receivers run) or "normal" (the system's default)
    scheduling: str = "batch"


RUNTIME_FIELDS = {f.name: f.type for f in dataclasses.fields(RuntimeParams)}
SCHEDULING_POLICIES = ("batch", "normal")

STORAGE_MODES = ("durable", "fast", "memory")


@dataclass(frozen=True)
class StorageParams:
    """Where and how replicas keep their state (section ``[storage]``, docs/storage.md).

    ``mode``: ``durable`` (default: every group commit is fsynced before anything it
    implies is sent; acknowledged operations survive the loss of power of every
    replica at once), ``fast`` (written, not fsynced: relies on independent failures,
    as the original did) or ``memory`` (nothing on disk: a restarted replica comes back
    empty and catches up by state transfer).  ``data_dir``: relative to the cluster
    directory unless absolute; replica i uses ``<data_dir>/replica-<i>``.
    """

    mode: str = "durable"
    data_dir: str = "data"
    map_size_mb: int = 16384  # the store's address space (not disk space) ceiling

    def replica_dir(self, cluster_dir: Path, replica_id: int) -> Path:
        base = Path(self.data_dir)
        if not base.is_absolute():
            base = cluster_dir / base
        return base / f"replica-{replica_id}"


@dataclass(frozen=True)
class RecoveryParams:
    """Proactive recovery (section ``[recovery]``, docs/recovery.md).

    Every replica recovers once every ``period_s`` seconds, in turn (``recovery_turn``: one
    turn every ``period_s / n``); 0 turns the watchdog off (``pbft recover`` still works). A
    cluster file without ``period_s`` gets ``default_period_s``, which ``pbft init`` writes.
    A recovery that has not ended after ``alarm_s`` raises an alarm (metric and log).
    ``watchdog``: ``internal``, a timer in the replica process, or ``external``, the turns
    left to a ``pbft watchdog`` process (``tools.guard``) the replica's user cannot stop.
    """

    period_s: float = 0.0  # (a Cluster built by hand; load_cluster and init_cluster derive it)
    alarm_s: float = 60.0
    watchdog: str = "internal"


def default_period_s(n: int, alarm_s: float = RecoveryParams.alarm_s) -> float:
    """The default recovery period: ``n`` turns of ``alarm_s`` each.  ``alarm_s`` is the time a
    recovery is given before it counts as overdue, so when recoveries end within it, a replica's
    turn comes only after the previous replica's recovery ended: one replica recovers at a time
    (a recovering replica counts as one of the f faulty ones).  With the defaults (n = 4,
    ``alarm_s`` = 60 s): 240 s, which is also twice the key-refresh period, the other term of the
    window of vulnerability (docs/recovery.md)."""
    return float(n) * alarm_s


def recovery_period_in_force(params: RecoveryParams, cs: Optional[Configuration]) -> float:
    """The recovery period in force: the one the configuration in force set (``pbft reconfig DIR
    set-recovery-period``), or cluster.toml's ``[recovery] period_s`` if none did."""
    period = cs.recovery_period_s if cs is not None else None
    return params.period_s if period is None else period


def recovery_phase_s(replica_id: int, n: int, period_s: float) -> float:
    """Where in every period replica ``replica_id``'s turn is: replica n-1 first, replica 0
    last.  A recovering primary costs a view change (to the next replica, the next primary);
    in this order the next primary's turn has just passed, so recoveries cost about one view
    change per period (n every n-1 periods), not one at every turn, as in the order 0, 1, ..."""
    return (n - 1 - replica_id) * period_s / n


def recovery_turn(now: float, period_s: float, replica_id: int, n: int) -> float:
    """The wall-clock time of replica ``replica_id``'s next recovery turn after ``now``."""
    phase = recovery_phase_s(replica_id, n, period_s)
    return now - (now - phase) % period_s + period_s


@dataclass(frozen=True)
class ReplicaEntry:
    id: int
    host: str
    port: int
    metrics_port: int
    public_key: bytes
    metrics_host: str = "127.0.0.1"  # where its HTTP endpoint listens
    # the service it runs when `pbft replica` / `pbft up` get no --service ("" : kv); replicas may run
    # different implementations of one service, e.g. "kv-alt" (docs/state.md)
    service: str = ""

    @property
    def metrics_addr(self) -> str:
        """The host to reach its HTTP endpoint at (its own host if it listens on every interface)."""
        return self.host if self.metrics_host in ("0.0.0.0", "::", "") else self.metrics_host


@dataclass
class Cluster:
    dir: Path
    cfg: ClusterConfig
    replicas: list[ReplicaEntry]
    client_keys: dict[int, bytes]
    runtime: RuntimeParams
    public: PublicKeys = field(repr=False)
    storage: StorageParams = StorageParams()
    recovery: RecoveryParams = RecoveryParams()
    # the services' own tables, [service.NAME] (and BFS's [bfs]): pbft.service.ServiceCluster
    service_sections: dict = field(default_factory=dict, repr=False)
    admins: tuple[int, ...] = ()  # [admin] clients: the administrators (docs/reconfiguration.md)
    # the configuration object's initial value (``core.reconfig``), from cluster.toml alone
    genesis_config: bytes = field(default=b"", repr=False)
    epoch: int = 0  # of the configuration whose keys ``public`` holds (epoch.json; 0: cluster.toml's)
    # every replica slot with an address (0..n-1 of cluster.toml, then its spare slots): ``replicas``
    # are the members in force of these, ``cfg`` their configuration (epoch.json's membership)
    slots: list[ReplicaEntry] = field(default_factory=list, repr=False)
    genesis_cfg: Optional[ClusterConfig] = field(default=None, repr=False)  # cluster.toml's
    members_from: int = 0  # the membership in force orders the seqnos after this one (0: genesis)
    members_epoch: int = 0  # the configuration epoch that opened it (its first view: base_view)
    # the membership certificate chain that certifies this membership (runtime.chain; () : genesis)
    chain: tuple = field(default=(), repr=False)

    def owner(self, replica_id: int) -> str:
        """Who a replica's data directory belongs to: this cluster (its keys) and this replica."""
        h = hashlib.blake2b(digest_size=8)
        for e in (self.slots[:self.genesis_cfg.n] if self.genesis_cfg is not None else self.replicas):
            h.update(e.public_key)
        return f"pbft-{h.hexdigest()}/replica-{replica_id}"

    @property
    def n(self) -> int:
        return self.cfg.n

    def slot(self, replica_id: int) -> ReplicaEntry:
        """The address entry of a replica slot, member or not."""
        for e in self.slots or self.replicas:
            if e.id == replica_id:
                return e
        raise ConfigError(f"no replica slot {replica_id} in {self.dir / CLUSTER_FILE} (slots: "
                          f"0..{len(self.slots or self.replicas) - 1})")

    @property
    def client_ids(self) -> list[int]:
        """The clients a workload may use (administrators excluded)."""
        return sorted(c for c in self.client_keys if c not in self.admins)

    def key_path(self, principal: int) -> Path:
        kind = "replica" if principal < self.cfg.client_base else "client"
        return self.dir / KEY_DIR / f"{kind}-{principal}.key"

    def identity(self, principal: int) -> Identity:
        """Load and check the private key of ``principal``."""
        if principal < 0 or (principal >= self.cfg.client_base and principal not in self.client_keys) \
                or (principal < self.cfg.client_base and principal not in self.public.verify):
            raise ConfigError(f"no principal {principal} in {self.dir / CLUSTER_FILE}")
        expected = self.public_key_of(principal)
        for ident in self.key_candidates(principal):
            if ident.public == expected:
                return ident
        raise ConfigError(f"key file {self.key_path(principal)} does not match the public key of principal "
                          f"{principal} in {EPOCH_FILE if self.epoch else CLUSTER_FILE}")

    def public_key_of(self, principal: int) -> bytes:
        """Its public key in the configuration the cluster reported last (epoch.json), or else
        in cluster.toml."""
        if principal >= self.cfg.client_base:
            return self.client_keys[principal]
        return bytes(self.public.verify[principal])

    def key_candidates(self, principal: int) -> list[Identity]:
        """The private keys held for ``principal``: its key file, and the new key of a rotation
        (``<key file>.next``, written by ``pbft reconfig DIR rotate-key``) if there is one."""
        path = self.key_path(principal)
        out = [read_key_file(path, principal)]
        nxt = next_key_path(path)
        if nxt.exists():
            out.append(read_key_file(nxt, principal))
        return out


def next_key_path(path: Path) -> Path:
    """Where ``pbft reconfig DIR rotate-key`` writes a principal's new private key."""
    return path.with_name(path.name + ".next")


def read_key_file(path: Path, principal: int) -> Identity:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"key file {path} is not a hex key") from None
    if len(seed) != 32:
        raise ConfigError(f"key file {path} holds {len(seed)} bytes, expected 32")
    return Identity.from_seed(principal, seed)


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------

def init_cluster(
    directory: str | os.PathLike,
    replicas: int,
    faults: Optional[int] = None,
    hosts: Optional[list[str]] = None,
    base_port: int = 7000,
    clients: int = 4,
    metrics_base_port: Optional[int] = None,
    protocol: Optional[dict] = None,
    runtime: Optional[dict] = None,
    force: bool = False,
    storage: Optional[dict] = None,
    recovery: Optional[dict] = None,
    admins: int = 1,
    spare_clients: int = SPARE_CLIENT_SLOTS,
    replica_slots: Optional[int] = None,
) -> Cluster:
    """Write a cluster directory. ``clients`` workload clients get ids ``replicas..``, then
    ``admins`` administrators (``[admin]``), then ``spare_clients`` ids are left free for
    clients admitted later (``pbft reconfig DIR add-client``; ``[cluster] client_slots``).
    ``replica_slots`` (default ``replicas``): the replica ids reserved, members or not; client ids
    start after them (``[cluster] replica_slots``, docs/reconfiguration.md)."""
    d = Path(directory)
    if faults is None:
        faults = (replicas - 1) // 3
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    if faults < 0:
        raise ConfigError(f"--faults must be >= 0, got {faults}")
    if replicas < 3 * faults + 1:
        raise ConfigError(f"{replicas} replicas cannot tolerate {faults} Byzantine faults: "
                          f"need at least 3f+1 = {3 * faults + 1}")
    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}")
    if admins < 0 or spare_clients < 0:
        raise ConfigError("--admins and --spare-clients must be >= 0")
    if replica_slots is None:
        replica_slots = replicas
    if replica_slots < replicas:
        raise ConfigError(f"--replica-slots ({replica_slots}) must be at least --replicas ({replicas})")
    base = replica_slots  # the first client id
    hosts = hosts or ["127.0.0.1"]
    for h in hosts:
        _check_host(h)
    if metrics_base_port is None:
        metrics_base_port = base_port + 100
    if not (1 <= base_port and base_port + replica_slots <= 65535 and metrics_base_port + replica_slots <= 65535):
        raise ConfigError(f"--base-port {base_port} leaves no room for {replica_slots} replica slots")
    if (d / CLUSTER_FILE).exists() and not force:
        raise ConfigError(f"{d / CLUSTER_FILE} already exists (use --force to overwrite)")
    params = dict(PROTOCOL_DEFAULTS)
    params.update(protocol or {})
    (d / KEY_DIR).mkdir(parents=True, exist_ok=True)
    os.chmod(d / KEY_DIR, 0o700)
    lines = [
        "# pbft cluster file, written by `pbft init`.  See docs/deploy.md.",
        "[cluster]",
        f"replicas = {replicas}",
        f"faults = {faults}",
        "# replica ids are 0 .. replica_slots - 1 (members: 0 .. replicas - 1); client ids are",
        "# replica_slots .. replica_slots + client_slots - 1 ([[client]] entries, then free ids for",
        "# `pbft reconfig DIR add-client`: docs/reconfiguration.md)",
        f"replica_slots = {replica_slots}",
        f"client_slots = {clients + admins + spare_clients}",
        "",
        "[protocol]",
    ]
    for k, v in params.items():
        lines.append(f"{k} = {_toml_value(v)}")
    lines += ["", "[runtime]"]
    rt = dataclasses.asdict(RuntimeParams(**(runtime or {})))
    for k, v in rt.items():
        lines.append(f"{k} = {_toml_value(v)}")
    lines += ["", "# durable | fast | memory: see docs/storage.md", "[storage]"]
    for k, v in dataclasses.asdict(StorageParams(**(storage or {}))).items():
        lines.append(f"{k} = {_toml_value(v)}")
    rec = dict(recovery or {})
    if "period_s" not in rec:
        rec["period_s"] = default_period_s(replicas, rec.get("alarm_s", RecoveryParams.alarm_s))
    lines += ["", "# period_s: every replica recovers once per period, in turn (default: replicas x alarm_s);",
              "# 0: only on `pbft recover`. The window of vulnerability: docs/recovery.md", "[recovery]"]
    for k, v in dataclasses.asdict(RecoveryParams(**rec)).items():
        lines.append(f"{k} = {_toml_value(v)}")
    for i in range(replica_slots):
        ident = Identity.generate(i)
        _write_key(d / KEY_DIR / f"replica-{i}.key", ident.seed)
        host = hosts[i % len(hosts)]
        if i == replicas:
            lines += ["", "# spare replica slots: no members at genesis; `pbft reconfig DIR add-replica` adds them"]
        lines += ["", "[[replica]]", f"id = {i}", f'host = "{host}"', f"port = {base_port + i}",
                  f"metrics_port = {metrics_base_port + i}", "weight = 1", f'public_key = "{ident.public.hex()}"']
    for c in range(base, base + clients + admins):
        ident = Identity.generate(c)
        _write_key(d / KEY_DIR / f"client-{c}.key", ident.seed)
        lines += ["", "[[client]]", f"id = {c}", f'public_key = "{ident.public.hex()}"']
    if admins:
        ids = ", ".join(str(c) for c in range(base + clients, base + clients + admins))
        lines += ["", "# administrators: clients whose requests change the configuration (`pbft reconfig`)",
                  "[admin]", f"clients = [{ids}]"]
    (d / CLUSTER_FILE).write_text("\n".join(lines) + "\n")
    return load_cluster(d)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _write_key(path: Path, seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(seed.hex() + "\n")
    os.chmod(path, 0o600)


def _check_host(h: str) -> None:
    if not h or any(c.isspace() for c in h) or '"' in h:
        raise ConfigError(f"bad host name {h!r}")
    try:
        ipaddress.ip_address(h)
    except ValueError:
        if not all(part and (part.isalnum() or "-" in part) for part in h.split(".")):
            raise ConfigError(f"bad host name {h!r}") from None


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------

def load_cluster(directory: str | os.PathLike, epoch_file: bool = True) -> Cluster:
    """The cluster of ``directory`` (cluster.toml, and epoch.json unless ``epoch_file`` is False:
    cluster.toml's genesis configuration then, as for `pbft reconfig DIR show` rewriting a refused
    epoch.json from what the replicas certify); raises ``ConfigError`` saying what is wrong."""
    d = Path(directory)
    path = d / CLUSTER_FILE
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e} (create one with `pbft init {d}`)") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    where = str(path)
    c = _table(doc.get("cluster"), f"{where}: [cluster]")
    n = _int_field(c, "replicas", where, lo=1)
    f = _int_field(c, "faults", where, lo=0)
    slots = _int_field(c, "client_slots", where, lo=0, hi=1 << 16) if "client_slots" in c else None
    base = _int_field(c, "replica_slots", where, lo=n, hi=1 << 16) if "replica_slots" in c else n
    reps = doc.get("replica")
    if not isinstance(reps, list) or not reps:
        raise ConfigError(f"{where}: no [[replica]] entries")
    if not n <= len(reps) <= base:
        raise ConfigError(f"{where}: replicas = {n} but {len(reps)} [[replica]] entries (one per member, "
                          f"then at most one per spare slot below replica_slots = {base})")
    entries: list[Optional[ReplicaEntry]] = [None] * len(reps)
    weights = [1] * len(reps)
    seen_addr: dict[tuple[str, int], int] = {}
    for r in reps:
        r = _table(r, f"{where}: [[replica]]")
        i = _int_field(r, "id", where, lo=0)
        ctx = f"{where}: replica {i}"
        if i >= len(reps):
            raise ConfigError(f"{ctx}: replica ids must be 0..{len(reps) - 1} (members 0..{n - 1}, then spare slots)")
        if entries[i] is not None:
            raise ConfigError(f"{where}: replica id {i} appears twice")
        host = r.get("host")
        if not isinstance(host, str):
            raise ConfigError(f"{ctx}: host must be a string")
        _check_host(host)
        port = _int_field(r, "port", ctx, lo=1, hi=65535)
        mport = _int_field(r, "metrics_port", ctx, lo=1, hi=65535)
        for a in ((host, port), (host, mport)):
            if a in seen_addr:
                raise ConfigError(f"{ctx}: address {a[0]}:{a[1]} is already used by replica {seen_addr[a]}")
            seen_addr[a] = i
        weights[i] = _int_field(r, "weight", ctx, lo=1) if "weight" in r else 1
        mhost = r.get("metrics_host", "")
        if not isinstance(mhost, str):
            raise ConfigError(f"{ctx}: metrics_host must be a string")
        if mhost:
            _check_host(mhost)
        svc = r.get("service", "")
        if not isinstance(svc, str) or any(c.isspace() for c in svc):
            raise ConfigError(f"{ctx}: service must be a service name such as \"kv-alt\" or module:Class, got {svc!r}")
        entries[i] = ReplicaEntry(i, host, port, mport, _pubkey(r, ctx), mhost, svc)
    clients: dict[int, bytes] = {}
    for cl in doc.get("client", []) or []:
        cl = _table(cl, f"{where}: [[client]]")
        cid = _int_field(cl, "id", where, lo=0)
        ctx = f"{where}: client {cid}"
        if cid < base:
            raise ConfigError(f"{ctx}: client ids start at {base} (after the replica slots)")
        if cid in clients:
            raise ConfigError(f"{where}: client id {cid} appears twice")
        clients[cid] = _pubkey(cl, ctx)
    if clients and sorted(clients) != list(range(base, base + len(clients))):
        raise ConfigError(f"{where}: client ids must be {base}..{base + len(clients) - 1} without gaps")
    if slots is None:
        slots = len(clients)
    if slots < len(clients):
        raise ConfigError(f"{where}: client_slots = {slots} is below the {len(clients)} [[client]] entries")
    admins = _admins(doc, where, clients)
    params = dict(PROTOCOL_DEFAULTS)
    proto = _table(doc.get("protocol", {}), f"{where}: [protocol]")
    for k, v in proto.items():
        if k not in PROTOCOL_DEFAULTS:
            raise ConfigError(f"{where}: unknown protocol parameter {k!r}")
        want = type(PROTOCOL_DEFAULTS[k])
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not want:
            raise ConfigError(f"{where}: protocol parameter {k} must be {want.__name__}, got {v!r}")
        params[k] = v
    rt_kw: dict[str, Any] = {}
    rt = _table(doc.get("runtime", {}), f"{where}: [runtime]")
    defaults = RuntimeParams()
    for k, v in rt.items():
        if k not in RUNTIME_FIELDS:
            raise ConfigError(f"{where}: unknown runtime parameter {k!r}")
        want = type(getattr(defaults, k))
        if want is str:
            if not isinstance(v, str):
                raise ConfigError(f"{where}: runtime parameter {k} must be a string, got {v!r}")
            if k == "scheduling":
                if v not in SCHEDULING_POLICIES:
                    raise ConfigError(f"{where}: runtime parameter scheduling must be one of "
                                      f"{', '.join(SCHEDULING_POLICIES)}, got {v!r}")
            else:
                _check_host(v)
            rt_kw[k] = v
            continue
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not want or not v > 0 or (want is float and not math.isfinite(v)):
            raise ConfigError(f"{where}: runtime parameter {k} must be a positive {want.__name__}, got {v!r}")
        rt_kw[k] = v
    storage = _storage(_table(doc.get("storage", {}), f"{where}: [storage]"), where)
    recovery = _recovery(_table(doc.get("recovery", {}), f"{where}: [recovery]"), where, n)
    sections = _service_sections(doc, where)
    try:
        cfg = ClusterConfig.create(n, f, weights=tuple(weights[:n]), clients_max=slots, replica_slots=base, **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    runtime = RuntimeParams(**rt_kw)
    if runtime.partial_frames_bytes_max < 2 * client_frame_bytes_max(cfg):
        raise ConfigError(f"{where}: runtime parameter partial_frames_bytes_max ({runtime.partial_frames_bytes_max}) "
                          f"must hold at least two of the largest client frames ({2 * client_frame_bytes_max(cfg)})")
    placed = [replace(e, metrics_host=e.metrics_host or runtime.metrics_host) for e in entries if e is not None]
    assert len(placed) == len(reps)  # entries with distinct ids 0..len-1
    genesis = genesis_record([e.public_key for e in placed[:n]], clients, admins)
    if epoch_file:
        epoch, current, chain = _epoch_file(d, len(placed), cfg, genesis, [e.public_key for e in placed[:n]])
    else:
        epoch, current, chain = 0, ConfigRecord.decode(genesis).active, ()
    try:
        public = PublicKeys(registry(current, placed))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    client_keys = {c: k for c, k in current.public_keys().items() if c >= base}
    now, members_from, members_epoch = cfg, 0, 0
    m = current.next_members or current.members  # (epoch.json is written after the switch)
    if m is not None:
        now = cluster_config(cfg, m)
        members_from, members_epoch = m.opens_at, m.epoch
    return Cluster(d, now, placed[:now.n], client_keys, runtime, public, storage, recovery, sections,
                   admins=tuple(current.admins), genesis_config=genesis, epoch=epoch, slots=placed,
                   genesis_cfg=cfg, members_from=members_from, members_epoch=members_epoch, chain=chain)


def registry(cs: Configuration, slots: list[ReplicaEntry]) -> dict[int, bytes]:
    """The public keys a cluster directory's principals authenticate with: configuration ``cs``'s
    (its replicas and admitted clients), and, for the replica slots beyond its members, the keys of
    cluster.toml's spare slots (a replica about to join sends NewKeys before it is a member; the
    members drop its protocol frames until it is one)."""
    keys = {e.id: e.public_key for e in slots if e.id >= len(cs.replica_keys)}
    keys.update(cs.public_keys())
    return keys


def _admins(doc: dict, where: str, clients: dict[int, bytes]) -> list[int]:
    t = _table(doc.get("admin", {}), f"{where}: [admin]")
    for k in t:
        if k != "clients":
            raise ConfigError(f"{where}: unknown admin parameter {k!r}")
    ids = t.get("clients", [])
    if not isinstance(ids, list) or not all(type(c) is int for c in ids):
        raise ConfigError(f"{where}: [admin] clients must be a list of client ids, got {ids!r}")
    for c in ids:
        if c not in clients:
            raise ConfigError(f"{where}: administrator {c} is not a [[client]]")
    return sorted(set(ids))


def _epoch_file(d: Path, n: int, cfg: ClusterConfig, genesis: bytes,
                genesis_keys: list[bytes]) -> tuple[int, Configuration, tuple]:
    """The configuration the cluster reported last (``EPOCH_FILE``, written by ``pbft reconfig``),
    or cluster.toml's (epoch 0), and the configuration certificate chain that certifies it
    (``chain``, checked from cluster.toml's genesis membership: a configuration whose every field
    and key is not the one the chain's last link certifies, by its digest, is refused; so is a
    file of a later epoch without such a chain, e.g. one written by an earlier version)."""
    from .chain import ChainError, check_configuration, decode_chain, verify_head

    base = ConfigRecord.decode(genesis).active
    path = d / EPOCH_FILE
    if not path.exists():
        return 0, base, ()
    try:
        if path.stat().st_size > EPOCH_FILE_BYTES_MAX:
            raise ValueError(f"more than {EPOCH_FILE_BYTES_MAX} bytes")
        doc = json.loads(path.read_text())
        current = configuration_from_json(doc)
        raw = doc.get("chain", "")
        if type(raw) is not str:
            raise ValueError("chain: not a hex string")
        links = decode_chain(bytes.fromhex(raw)) if raw else []
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ChainError) as e:
        raise ConfigError(f"{path}: not a configuration written by `pbft reconfig` ({e})") from None
    m = current.next_members or current.members
    if not 1 <= len(current.replica_keys) <= n or (m is not None and m.n > n) \
            or not all(cfg.is_client(c) for c in current.clients):
        raise ConfigError(f"{path}: its configuration is not of this cluster's {n} replica slots with an "
                          f"address and its client slots")
    try:
        head = verify_head(cfg, genesis_keys, links)
    except ChainError as e:
        raise ConfigError(f"{path}: its membership certificate chain does not verify against "
                          f"{CLUSTER_FILE}: {e}") from None
    if current.epoch == 0 and not links and current.encode() == base.encode():
        return 0, current, ()
    again = "refused (`pbft reconfig DIR show` writes it again from the cluster)"
    if not head.config:
        raise ConfigError(f"{path}: its configuration (epoch {current.epoch}) is not the one its certificate chain "
                          f"ends at (the chain certifies no configuration: {len(links)} links, none of this "
                          f"version's configuration links): {again}")
    try:
        check_configuration(cfg, head, current.encode())
    except ChainError as e:
        raise ConfigError(f"{path}: its configuration (epoch {current.epoch}, {m.n if m else cfg.n} replicas, "
                          f"f={m.f if m else cfg.f}) is not the one its certificate chain ends at ({e}): "
                          f"{again}") from None
    return current.epoch, current, tuple(links)


def configuration_from_json(doc: dict) -> Configuration:
    """``Configuration.describe()`` read back (``EPOCH_FILE``; raises ValueError, TypeError...)."""
    clients = {int(c): bytes.fromhex(k) for c, k in doc["clients"].items()}
    clients.update((int(c), b"") for c in doc["revoked"])
    keys = tuple(bytes.fromhex(k) for k in doc["replicas"])
    ms: list[Optional[Membership]] = []
    for name in ("members", "next_members"):
        m = doc.get(name)
        if m is None:
            ms.append(None)
            continue
        mk = tuple(bytes.fromhex(k) for k in m["keys"]) if "keys" in m else keys
        ms.append(Membership(int(m["n"]), int(m["f"]), tuple(int(w) for w in m["weights"]), mk,
                             int(m["opens_at"]), int(m.get("epoch", doc["epoch"]))))
    period = doc.get("recovery_period_s")
    if period is not None and (isinstance(period, bool) or not isinstance(period, (int, float))):
        raise ValueError("recovery_period_s: not a number")
    cs = Configuration(int(doc["epoch"]), int(doc["opens_at"]), keys, clients, tuple(int(a) for a in doc["admins"]),
                       ms[0], ms[1], None if period is None else int(round(float(period) * 1000)))
    return Configuration.decode(cs.encode())  # (its checks)


def _service_sections(doc: dict, where: str) -> dict:
    """The tables ``[service.NAME]``, which the services interpret (``Service.from_cluster``);
    ``[bfs]``, what ``pbft init --service bfs`` writes, is another spelling of ``[service.bfs]``."""
    svc = doc.get("service", {})
    if not isinstance(svc, dict):
        raise ConfigError(f"{where}: [service] must hold tables [service.NAME], got {svc!r}")
    out = {}
    for name, t in svc.items():
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: [service.{name}] must be a table, got {t!r}")
        out[name] = t
    if "bfs" in doc:
        if "bfs" in out:
            raise ConfigError(f"{where}: both [bfs] and [service.bfs]: keep one")
        out["bfs"] = doc["bfs"]  # BFS itself checks that it is a table
    return out


def _storage(t: dict, where: str) -> StorageParams:
    kw = {}
    for k, v in t.items():
        if k == "mode":
            if v not in STORAGE_MODES:
                raise ConfigError(f"{where}: storage mode must be one of {', '.join(STORAGE_MODES)}, got {v!r}")
        elif k == "data_dir":
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{where}: storage data_dir must be a non-empty string, got {v!r}")
        elif k == "map_size_mb":
            if type(v) is not int or not 16 <= v <= 1 << 24:
                raise ConfigError(f"{where}: storage map_size_mb must be an integer in [16, {1 << 24}], got {v!r}")
        else:
            raise ConfigError(f"{where}: unknown storage parameter {k!r}")
        kw[k] = v
    return StorageParams(**kw)


def _recovery(t: dict, where: str, n: int) -> RecoveryParams:
    kw: dict[str, Any] = {}
    for k, v in t.items():
        if k == "watchdog":
            if v not in ("internal", "external"):
                raise ConfigError(f"{where}: recovery watchdog must be \"internal\" or \"external\", got {v!r}")
            kw[k] = v
            continue
        if k not in ("period_s", "alarm_s"):
            raise ConfigError(f"{where}: unknown recovery parameter {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf \
                or (k == "alarm_s" and v <= 0):
            sign = "positive" if k == "alarm_s" else "non-negative"
            raise ConfigError(f"{where}: recovery parameter {k} must be a {sign} number, got {v!r}")
        kw[k] = float(v)
    if "period_s" not in kw:  # (0 stays 0: off)
        kw["period_s"] = default_period_s(n, kw.get("alarm_s", RecoveryParams.alarm_s))
    return RecoveryParams(**kw)


def with_membership(cluster: Cluster, n: int, f: int, weights: tuple[int, ...], members_from: int,
                    epoch: int) -> Cluster:
    """A copy whose members are replicas ``0..n-1`` (tolerating f, with these weights), the
    membership opened by configuration ``epoch`` after ``members_from`` (``pbft reconfig`` before it
    writes epoch.json; the slots' addresses and the registry stay)."""
    slots = cluster.slots or cluster.replicas
    if n > len(slots):
        raise ConfigError(f"no address for replica {len(slots)}: {cluster.dir / CLUSTER_FILE} has "
                          f"{len(slots)} replica slots")
    cfg = replace(cluster.cfg, n=n, f=f, weights=tuple(weights))
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"membership of {n} replicas (f={f}, weights {list(weights)}): {e}") from None
    return replace(cluster, cfg=cfg, replicas=list(slots[:n]), members_from=members_from, members_epoch=epoch)


def with_protocol(cluster: Cluster, **kw) -> Cluster:
    """A copy with some protocol parameters changed (tests, benchmarks)."""
    return replace(cluster, cfg=replace(cluster.cfg, **kw))


def _table(x, what: str) -> dict:
    if not isinstance(x, dict):
        raise ConfigError(f"{what} is missing or not a table")
    return x


def _int_field(t: dict, key: str, ctx: str, lo: int = 0, hi: int = (1 << 31)) -> int:
    v = t.get(key)
    if type(v) is not int:
        raise ConfigError(f"{ctx}: {key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{ctx}: {key} = {v} is out of range [{lo}, {hi}]")
    return v


def _pubkey(t: dict, ctx: str) -> bytes:
    v = t.get("public_key")
    try:
        k = bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        k = None
    if k is None or len(k) != PUBLIC_KEY_SIZE:
        raise ConfigError(f"{ctx}: public_key must be {PUBLIC_KEY_SIZE} bytes in hex")
    return k


def free_port_range(span: int, prefer: Optional[int] = None) -> int:
    """A base port such that base..base+span-1 are all free on 127.0.0.1 right now (``prefer`` if it
    is; otherwise below the ephemeral range when possible, so that outgoing connections cannot take
    them before the servers bind)."""
    hi = 60000
    try:
        lo_eph = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if lo_eph - 15000 > 10 * span:
            hi = lo_eph
    except (OSError, ValueError, IndexError):
        pass
    for attempt in range(200):
        base = prefer if (attempt == 0 and prefer is not None) else random.randrange(15000, hi - span)
        socks = []
        try:
            for p in range(base, base + span):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ConfigError("found no free range of loopback ports")


def _replica_keys(c: Cluster) -> dict[int, bytes]:
    return {p: bytes(k) for p, k in c.public.verify.items() if p < c.cfg.client_base}


class MembershipWatch:
    """Follows the membership in force that ``pbft reconfig`` writes into ``DIR/epoch.json``, for
    a client process that keeps running across a change: ``poll()`` re-reads the directory when
    the file changed and returns the new cluster when its membership (members, ``f``, weights,
    the switch point or a replica's public key) differs from the one last seen, else None. Hand it to
    ``BlockingClient.set_membership`` / ``ClientPool.set_membership``."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._mtime: Optional[float] = None
        self._poll_stat()

    def _poll_stat(self) -> bool:
        p = self.cluster.dir / EPOCH_FILE
        try:
            m = p.stat().st_mtime
        except OSError:
            m = 0.0
        changed, self._mtime = m != self._mtime, m
        return changed

    def poll(self) -> Optional[Cluster]:
        if not self._poll_stat():
            return None
        now = load_cluster(self.cluster.dir)
        old = self.cluster
        if (now.cfg.n, now.cfg.f, now.cfg.weights, now.members_from, _replica_keys(now)) == (
                old.cfg.n, old.cfg.f, old.cfg.weights, old.members_from, _replica_keys(old)):
            return None
        self.cluster = now
        return now
