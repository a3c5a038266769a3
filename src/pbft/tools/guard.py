"""What runs beside a replica and out of its reach: ``pbft signer`` (its long-term key,
``runtime.signer``), ``pbft watchdog`` (its recovery turns and its liveness), ``pbft
systemd-units`` (the three as services of different users) and ``pbft integrity`` (the hash of
the code, ``runtime.integrity``). docs/recovery.md, *What a root intruder can still do*."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Optional

from ..config import ConfigError


def _log(replica: int, event: str, **fields) -> None:
    rec = {"ts": round(time.time(), 3), "watchdog": replica, "event": event}
    rec.update(fields)
    print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


def _cluster_and_id(args):
    from ..runtime.cluster import load_cluster

    cluster = load_cluster(args.dir)
    if not 0 <= args.id < cluster.n:
        raise ConfigError(f"--id must be a replica id 0..{cluster.n - 1}, got {args.id}")
    return cluster


# ---- signer -------------------------------------------------------------------

def cmd_signer(args) -> int:
    from ..runtime.signer import default_socket, run_signer, socket_path

    cluster = _cluster_and_id(args)
    path = socket_path(args.socket, cluster.dir, args.id) if args.socket else default_socket(cluster.dir, args.id)
    uids = {int(u) for u in args.allow_uid.split(",")} if args.allow_uid else None
    run_signer(cluster, args.id, path, int(args.mode, 8), uids)
    return 0


def signer_spec(directory: Path, replica_id: int, option: Optional[str]) -> Optional[Path]:
    """The signer socket of ``pbft replica --signer PATH``, else of ``[keys] signer`` in
    ``cluster.toml``, else None (the replica reads its key file)."""
    import tomllib

    from ..runtime.signer import socket_path

    if option:
        return socket_path(option, directory, replica_id)
    path = Path(directory) / "cluster.toml"
    try:
        keys = tomllib.loads(path.read_text()).get("keys")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if keys is None:
        return None
    if not isinstance(keys, dict) or set(keys) - {"signer"} or not isinstance(keys.get("signer", ""), str):
        raise ConfigError(f'{path}: [keys] holds only signer = "unix:PATH" ({{id}}: the replica id)')
    spec = keys.get("signer")
    return socket_path(spec, directory, replica_id) if spec else None


# ---- watchdog -------------------------------------------------------------------

def next_turn(now: float, period: float, replica_id: int, n: int) -> float:
    """The wall-clock time of replica ``replica_id``'s next recovery after ``now``: its offset
    in every period (``runtime.cluster.recovery_turn``), as the replica's own timer
    (``ReplicaNode._next_recovery_delay``)."""
    from ..runtime.cluster import recovery_turn

    return recovery_turn(now, period, replica_id, n)


class Watchdog:
    """``pbft watchdog``: every ``check_s``, the replica's ``/status``; at each of its turns, a
    recovery (SIGUSR1, as ``pbft recover``); a replica whose process is gone or that has not
    answered for ``unresponsive_s`` is killed (SIGKILL) and, with ``restart="spawn"``, started
    again with ``--recover`` (``restart="kill"``: a supervisor such as systemd starts it)."""

    def __init__(self, cluster, replica_id: int, period_s: float, restart: str, replica_cmd: list[str],
                 check_s: float = 1.0, unresponsive_s: float = 60.0, log_path: Optional[Path] = None):
        self.c = cluster
        self.id = replica_id
        self.period = period_s
        self.restart = restart
        self.replica_cmd = replica_cmd
        self.check_s = check_s
        self.unresponsive_s = unresponsive_s
        self.log_path = log_path
        self.child: Optional[subprocess.Popen] = None
        self.turn = next_turn(time.time(), period_s, replica_id, cluster.n) if period_s > 0 else float("inf")
        self.last_ok = time.monotonic()
        self.triggered: Optional[tuple[float, int]] = None  # (when, recoveries before)
        self.stop = False

    def pid(self, status: Optional[dict]) -> Optional[int]:
        if status is not None and isinstance(status.get("pid"), int):
            return status["pid"]
        if self.child is not None and self.child.poll() is None:
            return self.child.pid  # the replica we started (its pid file may still be its predecessor's)
        if self.c.storage.mode != "memory":
            try:
                return int((self.c.storage.replica_dir(self.c.dir, self.id) / "pid").read_text().strip())
            except (OSError, ValueError):
                return None
        return None

    def alive(self, pid: Optional[int]) -> bool:
        if self.child is not None and self.child.pid == pid:
            return self.child.poll() is None  # (our own child: a zombie is not alive)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def status(self) -> Optional[dict]:
        from .net import fetch_status

        r = self.c.replicas[self.id]
        try:
            return fetch_status(r.metrics_addr, r.metrics_port, min(2.0, self.check_s * 2))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def follow_period(self, st: dict, now: float) -> None:
        """The period in force the replica reports (``config.recovery_period_s``: a
        ``set-recovery-period`` change, or cluster.toml's): the turns follow it from then on."""
        cfg = st.get("config")
        period = cfg.get("recovery_period_s") if isinstance(cfg, dict) else None
        if isinstance(period, bool) or not isinstance(period, (int, float)) or not 0 <= period < math.inf \
                or period == self.period:
            return
        self.period = float(period)
        self.turn = next_turn(now, self.period, self.id, self.c.n) if self.period > 0 else float("inf")
        _log(self.id, "watchdog-period", period_s=self.period,
             next_turn=round(self.turn, 3) if self.period > 0 else None)

    def step(self) -> None:
        st = self.status()
        now = time.time()
        if st is not None:
            self.last_ok = time.monotonic()
            self.follow_period(st, now)
            if self.triggered is not None and st.get("recoveries", 0) > self.triggered[1] \
                    and st.get("recovering") is None:
                _log(self.id, "watchdog-recovered", seconds=round(now - self.triggered[0], 2),
                     recoveries=st.get("recoveries"))
                self.triggered = None
            elif self.triggered is not None and now - self.triggered[0] > self.c.recovery.alarm_s:
                _log(self.id, "watchdog-recovery-overdue", seconds=round(now - self.triggered[0], 1))
                self.triggered = (now, self.triggered[1])  # (said once per alarm_s)
        if now >= self.turn:
            self.turn = next_turn(now, self.period, self.id, self.c.n)
            pid = self.pid(st)
            if st is None or pid is None:
                _log(self.id, "watchdog-turn-missed", reason="replica not answering", next_turn=round(self.turn, 3))
            elif st.get("recovering") is not None:
                _log(self.id, "watchdog-turn-skipped", reason="recovering", next_turn=round(self.turn, 3))
            else:
                try:
                    os.kill(pid, signal.SIGUSR1)
                    self.triggered = (now, int(st.get("recoveries", 0)))
                    _log(self.id, "watchdog-recover", pid=pid, next_turn=round(self.turn, 3))
                except (ProcessLookupError, PermissionError) as e:
                    _log(self.id, "watchdog-turn-missed", reason=type(e).__name__, pid=pid)
        if st is None:
            pid = self.pid(None)
            gone = not self.alive(pid)
            hung = time.monotonic() - self.last_ok > self.unresponsive_s
            if gone or hung:
                self._restart(pid, "gone" if gone else "not answering")

    def _restart(self, pid: Optional[int], why: str) -> None:
        if pid is not None and self.alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.child is not None and self.child.pid == pid:
            try:
                self.child.wait(5)  # (reaped: ours)
            except subprocess.TimeoutExpired:
                pass
        if self.restart == "none":
            _log(self.id, "watchdog-replica-down", reason=why, pid=pid)
        elif self.restart == "kill":
            _log(self.id, "watchdog-replica-killed", reason=why, pid=pid)
        else:
            cmd = self.replica_cmd + ["--recover"]
            out = open(self.log_path, "ab") if self.log_path is not None else None
            try:
                self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=out if out is not None else subprocess.DEVNULL,
                                              start_new_session=True)
            finally:
                if out is not None:
                    out.close()
            _log(self.id, "watchdog-replica-started", reason=why, old_pid=pid, pid=self.child.pid,
                 command=shlex.join(cmd))
        self.last_ok = time.monotonic()  # (the new process gets unresponsive_s to answer)

    def run(self) -> None:
        _log(self.id, "watchdog-started", period_s=self.period, restart=self.restart,
             next_turn=round(self.turn, 3) if self.period > 0 else None)
        while not self.stop:
            self.step()
            time.sleep(self.check_s)
        _log(self.id, "watchdog-stopped")


def replica_command(directory, replica_id: int, extra: str) -> list[str]:
    return [sys.executable, "-m", "pbft.tools.cli", "replica", str(directory), "--id", str(replica_id)] \
        + shlex.split(extra or "")


def cmd_watchdog(args) -> int:
    cluster = _cluster_and_id(args)
    period = cluster.recovery.period_s
    if period <= 0 and args.restart == "none":
        raise ConfigError(f"{cluster.dir / 'cluster.toml'}: [recovery] period_s is 0 and --restart none: "
                          f"nothing to watch")
    if period > 0 and cluster.recovery.watchdog != "external":
        print("pbft watchdog: warning: [recovery] watchdog is not \"external\": the replica's own timer "
              "recovers it too", file=sys.stderr)
    log = Path(args.log) if args.log else None
    wd = Watchdog(cluster, args.id, period, args.restart, replica_command(cluster.dir, args.id, args.replica_args),
                  args.check_s, args.unresponsive_s, log)

    def on_signal(signum, frame):
        wd.stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    wd.run()
    return 0


# ---- systemd units ---------------------------------------------------------------

def systemd_units(directory: Path, replica_id: int, user: str, signer_user: str, watchdog_user: str,
                  pbft: str, service: str, data_dir: Path) -> dict[str, str]:
    """The unit files (name -> text) of replica ``replica_id``: its signer, itself and its
    watchdog, each as its own user. The replica may write only its data directory."""
    d = str(Path(directory).resolve())
    sock = f"{d}/signer-{replica_id}.sock"
    q = shlex.quote
    common = "[Install]\nWantedBy=multi-user.target\n"
    signer = f"""[Unit]
Description=pbft signer of replica {replica_id} (holds its long-term key; docs/recovery.md)
After=network.target

[Service]
User={signer_user}
Group={signer_user}
UMask=0007
ExecStart={pbft} signer {q(d)} --id {replica_id} --socket {q(sock)} --mode 660
Restart=always
RestartSec=1
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={q(d)}
PrivateTmp=yes

{common}"""
    replica = f"""[Unit]
Description=pbft replica {replica_id}
After=network.target pbft-signer-{replica_id}.service
Requires=pbft-signer-{replica_id}.service

[Service]
User={user}
# the replica's user is in the signer's group (to reach its socket) but cannot read keys/
SupplementaryGroups={signer_user}
ExecStartPre={pbft} integrity {q(d)} --check
ExecStart={pbft} replica {q(d)} --id {replica_id} --service {q(service)} --signer {q(sock)}
Restart=always
RestartSec=1
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={q(str(Path(data_dir).resolve()))}
PrivateTmp=yes

{common}"""
    watchdog = f"""[Unit]
Description=pbft watchdog of replica {replica_id}: its recovery turns and liveness (not stoppable by {user})
After=pbft-replica-{replica_id}.service

[Service]
User={watchdog_user}
# to signal (SIGUSR1: recover; SIGKILL: hung) a process of another user
AmbientCapabilities=CAP_KILL
CapabilityBoundingSet=CAP_KILL
ExecStart={pbft} watchdog {q(d)} --id {replica_id} --restart kill
Restart=always
RestartSec=1
NoNewPrivileges=yes
ProtectSystem=strict
PrivateTmp=yes

{common}"""
    return {f"pbft-signer-{replica_id}.service": signer, f"pbft-replica-{replica_id}.service": replica,
            f"pbft-watchdog-{replica_id}.service": watchdog}


def cmd_systemd_units(args) -> int:
    from .net import replica_service

    cluster = _cluster_and_id(args)
    users = {args.user, args.signer_user, args.watchdog_user}
    if len(users) != 3:
        raise ConfigError("--user, --signer-user and --watchdog-user must be three different users: a user "
                          "can stop (or read) what runs as itself")
    out = Path(args.out) if args.out else cluster.dir / "systemd"
    out.mkdir(parents=True, exist_ok=True)
    pbft = args.pbft or shlex.quote(str(Path(sys.executable).parent / "pbft"))
    for name, text in systemd_units(cluster.dir, args.id, args.user, args.signer_user, args.watchdog_user,
                                    pbft, replica_service(cluster, args.id, args.service),
                                    cluster.storage.replica_dir(cluster.dir, args.id)).items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    print(f"set [recovery] watchdog = \"external\" in {cluster.dir / 'cluster.toml'}; keys/ owned by "
          f"{args.signer_user} (mode 0700), data/ by {args.user}; then: systemctl enable --now "
          f"pbft-signer-{args.id} pbft-replica-{args.id} pbft-watchdog-{args.id}")
    return 0


# ---- integrity -----------------------------------------------------------------

def cmd_integrity(args) -> int:
    from ..runtime import integrity

    d = Path(args.dir)
    if args.update:
        v = integrity.record(d)
        print(f"{d / 'cluster.toml'}: [integrity] package_sha256 = {v} ({integrity.package_dir()})")
        return 0
    got = integrity.check(d)
    if got is None:
        print(f"{d / 'cluster.toml'} records no package hash: nothing checked "
              f"(`pbft integrity {d} --update` records it)")
        return 1 if args.check else 0
    print(f"ok: {integrity.package_dir()} hashes to {got}, as recorded")
    return 0


def add_guard_commands(sub) -> None:
    s = sub.add_parser("signer", help="hold a replica's long-term key in a process of its own (docs/recovery.md)")
    s.add_argument("dir")
    s.add_argument("--id", type=int, required=True)
    s.add_argument("--socket", default=None, help="UNIX socket path (default DIR/signer-I.sock; {id}: the id)")
    s.add_argument("--mode", default="660", help="the socket's mode, octal (default 660: the signer's group)")
    s.add_argument("--allow-uid", default=None, help="comma-separated uids allowed to connect (default: any "
                   "the socket's mode lets in)")
    s.set_defaults(func=cmd_signer)

    w = sub.add_parser("watchdog", help="a replica's recovery turns and liveness, from a process of its own")
    w.add_argument("dir")
    w.add_argument("--id", type=int, required=True)
    w.add_argument("--restart", choices=["spawn", "kill", "none"], default="spawn",
                   help="a replica gone or hung: kill it and start it again with --recover (spawn), only "
                        "kill it for a supervisor to restart (kill), or only log (none)")
    w.add_argument("--replica-args", default="", help="more arguments of the replica it starts, e.g. "
                   "'--signer PATH --service kv'")
    w.add_argument("--log", default=None, help="where a replica it starts writes its log (appended)")
    w.add_argument("--check-s", type=float, default=1.0, help="how often it asks the replica's /status")
    w.add_argument("--unresponsive-s", type=float, default=60.0,
                   help="a replica that has not answered for this long is restarted (more than a start, "
                        "a recovery reboot included, takes with its state)")
    w.set_defaults(func=cmd_watchdog)

    u = sub.add_parser("systemd-units", help="systemd units for a replica, its signer and its watchdog")
    u.add_argument("dir")
    u.add_argument("--id", type=int, required=True)
    u.add_argument("--user", default="pbft", help="the replica's user")
    u.add_argument("--signer-user", default="pbft-key", help="the signer's user (owns keys/)")
    u.add_argument("--watchdog-user", default="pbft-watchdog", help="the watchdog's user")
    u.add_argument("--service", default=None, help="the replica's --service (default: its service in cluster.toml, "
                   "else kv)")
    u.add_argument("--pbft", default=None, help="the pbft command (default: the one next to this Python)")
    u.add_argument("--out", default=None, help="where to write them (default DIR/systemd)")
    u.set_defaults(func=cmd_systemd_units)

    g = sub.add_parser("integrity", help="check (or --update) the hash of the pbft package in cluster.toml")
    g.add_argument("dir")
    g.add_argument("--update", action="store_true", help="record the running package's hash")
    g.add_argument("--check", action="store_true", help="exit 1 also when no hash is recorded")
    g.set_defaults(func=cmd_integrity)
