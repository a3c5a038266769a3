"""The BFS part of ``pbft demo``: a 4-replica cluster running the file system, mounted with
``pbft mount``, a source tree copied in and checked, the primary killed during writes.

Runs only where FUSE can be mounted (root, ``/dev/fuse``, ``fusermount3``, pyfuse3);
elsewhere it says why and is skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

DEMO_SECTION = """
[bfs]
root_mode = 0o755

[bfs.client.default]
root = true
"""


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE for every user"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


def _digests(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_bfs_demo(out=sys.stdout) -> int | None:
    """0: OK, 1: a check failed, None: skipped (FUSE not available here)."""
    reason = why_not()
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[bfs {time.monotonic() - t0:5.1f}s] {text}", file=out, flush=True)

    if reason:
        print(f"\nBFS file system demo skipped: {reason}", file=out)
        return None
    try:
        from ...tools.net import fetch_status
    except ImportError:
        from ...cli_net import fetch_status
    from ...runtime.cluster import free_port_range, init_cluster
    from .cli import cli_module

    print("\nBFS: the replicated file system", file=out)
    tmp = Path(tempfile.mkdtemp(prefix="pbft-bfs-demo-"))
    os.chmod(tmp, 0o755)
    cdir, mnt = tmp / "cluster", tmp / "mnt"
    mnt.mkdir()
    base = free_port_range(104)
    cluster = init_cluster(cdir, 4, 1, ["127.0.0.1"], base, 4,
                           protocol={"view_change_timeout_ms": 500.0})
    with open(cdir / "cluster.toml", "a") as fh:
        fh.write(DEMO_SECTION)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3]) + os.pathsep + env.get("PYTHONPATH", "")
    procs = {}
    mounted = False
    try:
        for i in range(4):
            with open(cdir / f"replica-{i}.log", "ab") as log:
                procs[i] = subprocess.Popen([sys.executable, "-m", cli_module(), "replica", str(cdir), "--id", str(i),
                                             "--service", "bfs"], stdout=subprocess.DEVNULL, stderr=log, env=env,
                                            start_new_session=True)
        r = subprocess.run([sys.executable, "-m", cli_module(), "mount", str(cdir), str(mnt), "--wait", "30"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            say(f"pbft mount failed: {r.stderr.strip()}")
            return 1
        mounted = True
        say(f"4 replicas running BFSService; `pbft mount` on {mnt} with 4 client identities")
        src = tmp / "services"  # a snapshot of pbft.services, so that nothing changes while we copy
        shutil.copytree(Path(__file__).resolve().parents[1], src, ignore=shutil.ignore_patterns("__pycache__"))
        t = time.monotonic()
        subprocess.run(["cp", "-a", str(src), str(mnt / "services")], check=True)
        local = _digests(src)
        same = _digests(mnt / "services") == local
        say(f"cp -a of the pbft.services sources ({len(local)} files) into BFS: {time.monotonic() - t:.1f}s; "
            f"checksums {'match' if same else 'DIFFER'}")
        os.link(mnt / "services" / "__init__.py", mnt / "hardlink")
        st = os.stat(mnt / "hardlink")
        say(f"hard link: inode {st.st_ino}, {st.st_nlink} links (one replicated inode number per file)")
        rep = cluster.replicas[0]
        primary = fetch_status(rep.metrics_addr if hasattr(rep, "metrics_addr") else rep.host, rep.metrics_port,
                               2.0)["primary"]
        written = {}
        errors = []

        def writer():
            try:
                for i in range(30):
                    data = hashlib.sha256(str(i).encode()).digest() * (200 + 100 * i)
                    (mnt / f"file-{i}").write_bytes(data)
                    written[f"file-{i}"] = data
            except OSError as e:
                errors.append(e)

        th = threading.Thread(target=writer)
        th.start()
        time.sleep(0.5)
        say(f"killing the primary, replica {primary}, with SIGKILL while a process writes 30 files")
        procs[primary].kill()
        th.join(120)
        intact = not errors and len(written) == 30 and all((mnt / n).read_bytes() == d for n, d in written.items())
        say(f"the writes went on after a view change; all 30 files {'intact' if intact else 'NOT INTACT'}")
        ok = same and st.st_nlink == 2 and intact
        print(f"  BFS result              : {'OK' if ok else 'FAILED'}", file=out)
        return 0 if ok else 1
    except (OSError, subprocess.CalledProcessError, urllib.error.URLError, ValueError, KeyError) as e:
        say(f"failed: {e}")
        return 1
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", cli_module(), "umount", str(mnt)], capture_output=True, env=env)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
