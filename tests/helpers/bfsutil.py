"""Helpers shared by the tests that mount BFS through FUSE (``test_bfs_mount.py``,
``test_bfs_faults.py``): the skip condition, the ``pbft`` command, tree checksums, a BFS
cluster on loopback and mounts that are always unmounted."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
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


class Counters:
    """The counters of a background mount (process ``pid``, logging to ``log``): on SIGUSR1 it
    writes them to its log (``docs/bfs.md``, *Mounting*)."""

    def __init__(self, log: Path, pid: int):
        self.log = log
        self.pid = pid

    def read(self, timeout: float = 15.0) -> tuple[dict, dict]:
        """``({op: requests sent}, {kind: FUSE requests handled})`` as of now."""
        last = "waited for an identity"  # (the last of the three lines)
        seen = self.log.read_text(errors="replace").count(last)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")
            if text.count(last) > seen:
                break
            assert time.monotonic() < deadline, f"the mount wrote no counters: {text[-2000:]}"
            time.sleep(0.05)
        sent = ast.literal_eval(text.rsplit("bfs mount: calls ", 1)[1].split("; errors", 1)[0])
        fuse = ast.literal_eval(text.rsplit("bfs mount: FUSE requests ", 1)[1].split("; mount cache", 1)[0])
        return {op: v[0] for op, v in sent.items()}, fuse

    def sent(self) -> dict:
        return self.read()[0]


def delta(before: dict, after: dict) -> dict:
    """The counts that changed from ``before`` to ``after``."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


@contextlib.contextmanager
def counted_mount(lc: LocalCluster, m: Path, client_id: int, *options, identities: int = 1, timeout: float = 30):
    """``pbft mount`` with ``options`` in the background for the block: yields the mount point and
    its ``Counters``; then unmounted, and its log must hold no traceback."""
    m.mkdir(exist_ok=True)
    log = lc.dir / f"counted-mount-{client_id}.log"  # (its own log: others parse mount-N.log)
    p = pbft("mount", lc.dir, m, "--client-id", client_id, "--identities", identities, "--timeout", timeout,
             "--log", log, *options)
    pid = re.search(r"\(pid (\d+)", p.stdout)
    assert pid is not None, p.stdout
    try:
        yield m, Counters(log, int(pid.group(1)))
    finally:
        unmount(m)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
