"""What runs beside a replica and out of its reach: ``pbft signer`` (its long-term key,
``runtime.signer``) and ``pbft integrity`` (the hash of the code, ``runtime.integrity``).
docs/recovery.md, *What a root intruder can still do*."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ConfigError


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

    g = sub.add_parser("integrity", help="check (or --update) the hash of the pbft package in cluster.toml")
    g.add_argument("dir")
    g.add_argument("--update", action="store_true", help="record the running package's hash")
    g.add_argument("--check", action="store_true", help="exit 1 also when no hash is recorded")
    g.set_defaults(func=cmd_integrity)
