"""What runs beside a replica and out of its reach: ``pbft signer`` (its long-term key,
``runtime.signer``). docs/recovery.md, *What a root intruder can still do*."""

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


def add_guard_commands(sub) -> None:
    s = sub.add_parser("signer", help="hold a replica's long-term key in a process of its own (docs/recovery.md)")
    s.add_argument("dir")
    s.add_argument("--id", type=int, required=True)
    s.add_argument("--socket", default=None, help="UNIX socket path (default DIR/signer-I.sock; {id}: the id)")
    s.add_argument("--mode", default="660", help="the socket's mode, octal (default 660: the signer's group)")
    s.add_argument("--allow-uid", default=None, help="comma-separated uids allowed to connect (default: any "
                   "the socket's mode lets in)")
    s.set_defaults(func=cmd_signer)
