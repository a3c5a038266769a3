"""The ``[bfs]`` section of ``cluster.toml``: limits and the per-client-identity policy.

::

    [bfs]
    inodes_max = 1000000          # files, directories, ... in the whole file system
    bytes_max = 1073741824        # data bytes stored (whole chunks)
    file_size_max = 68719476736   # EFBIG beyond
    dir_entries_max = 10000       # ENOSPC beyond
    root_mode = 0o755             # the root directory, created owned by root_uid:root_gid
    root_uid = 0
    root_gid = 0

    [bfs.client.default]          # every client identity without a table of its own
    uids = "*"                    # the uids it may claim: "*" or a list
    gids = "*"                    # the gids (primary and supplementary) it may claim
    root = false                  # false: uid 0 is squashed to squash_uid:squash_gid
    inodes_max = 0                # quota of this identity (0: none)
    bytes_max = 0

    [bfs.client.5]                # client identity 5 (the id in [[client]])
    uids = [1000, 1001]
    root = true

    [bfs.client.6-9]              # client identities 6 to 9 (one mount uses several)
    uids = "*"

``[service.bfs]`` is another spelling of ``[bfs]``.  ``BFSService.from_cluster`` (the hook of
``pbft.Service``) reads it, so ``--service bfs`` and ``--service module:BFSSubclass`` get it.
Every replica must read the same section (the file is the same on every machine); a
replica with a different policy would compute different results and be outvoted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ...config import ConfigError

SQUASH_ID = 65534


@dataclass(frozen=True)
class ClientPolicy:
    uids: Optional[frozenset] = None  # None: any
    gids: Optional[frozenset] = None
    root: bool = False
    squash_uid: int = SQUASH_ID
    squash_gid: int = SQUASH_ID
    inodes_max: int = 0  # 0: no quota
    bytes_max: int = 0


@dataclass(frozen=True)
class BFSConfig:
    inodes_max: int = 1_000_000
    bytes_max: int = 1 << 30
    file_size_max: int = 1 << 36
    dir_entries_max: int = 10_000
    dir_bytes_max: int = 512 * 1024
    root_mode: int = 0o755
    root_uid: int = 0
    root_gid: int = 0
    skew_ms: float = 1000.0
    orphans_max: int = 4096
    data_buckets: int = 16384  # objects holding the file data: at least bytes_max / 256 KiB
    clients: dict = field(default_factory=dict)  # client id -> ClientPolicy
    default: ClientPolicy = ClientPolicy()

    def policy(self, client: int) -> ClientPolicy:
        return self.clients.get(client, self.default)


_LIMITS = ("inodes_max", "bytes_max", "file_size_max", "dir_entries_max", "dir_bytes_max", "orphans_max")
_LAYOUT = ("data_buckets",)
_IDS = ("root_uid", "root_gid")


def _int(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ConfigError(f"[bfs] {what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _idset(v, what: str) -> Optional[frozenset]:
    if v == "*":
        return None
    if not isinstance(v, list) or len(v) > 65536:
        raise ConfigError(f"[bfs] {what} must be \"*\" or a list of ids, got {v!r}")
    return frozenset(_int(x, what, 0, (1 << 32) - 2) for x in v)


def _client(t, what: str) -> ClientPolicy:
    if not isinstance(t, dict):
        raise ConfigError(f"[bfs] {what} must be a table")
    kw: dict[str, Any] = {}
    for k, v in t.items():
        if k in ("uids", "gids"):
            kw[k] = _idset(v, f"{what}.{k}")
        elif k == "root":
            if type(v) is not bool:
                raise ConfigError(f"[bfs] {what}.root must be true or false")
            kw[k] = v
        elif k in ("squash_uid", "squash_gid"):
            kw[k] = _int(v, f"{what}.{k}", 0, (1 << 32) - 2)
        elif k in ("inodes_max", "bytes_max"):
            kw[k] = _int(v, f"{what}.{k}", 0, 1 << 62)
        else:
            raise ConfigError(f"[bfs] unknown parameter {what}.{k}")
    return ClientPolicy(**kw)


def parse_bfs_section(t) -> BFSConfig:
    """A ``BFSConfig`` from the parsed ``[bfs]`` table (``None``: all defaults)."""
    if t is None:
        return BFSConfig()
    if not isinstance(t, dict):
        raise ConfigError("[bfs] must be a table")
    kw: dict[str, Any] = {}
    clients = {}
    for k, v in t.items():
        if k in _LIMITS:
            kw[k] = _int(v, k, 1, 1 << 62)
        elif k in _LAYOUT:
            kw[k] = _int(v, k, 1, 1 << 24)
        elif k in _IDS:
            kw[k] = _int(v, k, 0, (1 << 32) - 2)
        elif k == "root_mode":
            kw[k] = _int(v, k, 0, 0o7777)
        elif k == "skew_ms":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3_600_000:
                raise ConfigError(f"[bfs] skew_ms must be a positive number of milliseconds, got {v!r}")
            kw[k] = float(v)
        elif k == "client":
            if not isinstance(v, dict):
                raise ConfigError("[bfs.client] must be a table of tables")
            for name, ct in v.items():
                if name == "default":
                    kw["default"] = _client(ct, "client.default")
                else:
                    lo, _, hi = name.partition("-")
                    try:
                        lo_i = int(lo)
                        hi_i = int(hi) if hi else lo_i
                    except ValueError:
                        raise ConfigError(f"[bfs.client.{name}]: a client id, a range such as 5-8, "
                                          f"or 'default'") from None
                    if not 0 <= lo_i <= hi_i <= lo_i + 65536:
                        raise ConfigError(f"[bfs.client.{name}]: a bad range of client ids")
                    pol = _client(ct, f"client.{name}")
                    for cid in range(lo_i, hi_i + 1):
                        clients[cid] = pol
        else:
            raise ConfigError(f"[bfs] unknown parameter {k!r}")
    kw["clients"] = clients
    if kw.get("dir_bytes_max", 0) > 768 * 1024:
        raise ConfigError("[bfs] dir_bytes_max is at most 786432")
    if kw.get("file_size_max", 1) > 1 << 46:
        raise ConfigError("[bfs] file_size_max is at most 2**46")
    return BFSConfig(**kw)


def load_bfs_config(cluster_dir) -> BFSConfig:
    """Read the ``[bfs]`` (or ``[service.bfs]``) section of ``cluster_dir/cluster.toml``."""
    import tomllib
    from pathlib import Path

    path = Path(cluster_dir) / "cluster.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    t = doc.get("bfs")
    if t is None and isinstance(doc.get("service"), dict):
        t = doc["service"].get("bfs")
    return parse_bfs_section(t)


DEFAULT_SECTION = """
# The BFS file system (`pbft up DIR --service bfs`, `pbft mount DIR MNT`): docs/bfs.md
[bfs]
inodes_max = 1000000
bytes_max = 1073741824
file_size_max = 68719476736
dir_entries_max = 10000
root_mode = 0o1777

# what a client identity may claim: uids/gids "*" or lists; root = false squashes uid 0
[bfs.client.default]
uids = "*"
gids = "*"
root = false
"""
