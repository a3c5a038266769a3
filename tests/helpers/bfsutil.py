"""Helpers shared by the tests that mount BFS through FUSE (``test_bfs_mount.py``,
``test_bfs_faults.py``): the skip condition, the ``pbft`` command, tree checksums, a BFS
cluster on loopback and mounts that are always unmounted."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers.netutil import SRC, LocalCluster


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts with allow_other, and the tests switch users)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed: {e}"
    return None


BFS_SECTION = """
[bfs]
root_mode = 0o755

[bfs.client.default]
root = true
"""


def pbft(*args, timeout=60, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "pbft.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert p.returncode == 0, p.stderr + p.stdout
    return p


def tree_digest(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = (stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def bfs_cluster(directory: Path, clients: int = 8, section: str = BFS_SECTION, protocol=None) -> LocalCluster:
    """A 4-replica cluster directory with a ``[bfs]`` section (not started)."""
    lc = LocalCluster(directory, clients=clients, service="bfs",
                      protocol=protocol or {"checkpoint_interval_seqnos": 64, "log_window_seqnos": 128,
                                            "view_change_timeout_ms": 500.0})
    with open(lc.dir / "cluster.toml", "a") as fh:
        fh.write(section)
    return lc


def mount_dir() -> Path:
    """A directory for mount points that every user can reach (pytest's own are 0700)."""
    mdir = Path(tempfile.mkdtemp(prefix="pbft-bfs-", dir="/tmp"))
    os.chmod(mdir, 0o755)
    return mdir


def unmount(m: Path) -> None:
    r = pbft("umount", m, check=False)
    if r.returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True)


@contextlib.contextmanager
def mounted(lc: LocalCluster, m: Path, client_id: int, identities: int = 2, timeout: float = 30, strict=False):
    """``pbft mount`` in the background for the block, then unmounted; its log must hold no
    traceback."""
    m.mkdir(exist_ok=True)
    args = ["mount", lc.dir, m, "--client-id", client_id, "--identities", identities, "--timeout", timeout]
    if strict:
        args.append("--strict")
    pbft(*args)
    try:
        yield m
    finally:
        unmount(m)
    log = lc.dir / f"mount-{client_id}.log"
    if log.exists():
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
