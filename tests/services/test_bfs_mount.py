"""BFS through a real FUSE mount: a 4-replica cluster on loopback running BFSService, mounted
with ``pbft mount``, used with ordinary tools.  Needs root, /dev/fuse and pyfuse3."""

from __future__ import annotations

import ast
import asyncio
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

from helpers.bfsutil import BFS_SECTION, counted_mount, delta, pbft, tree_digest, why_not
from pbft.services.bfs import BFSConfig, BFSService, ClientPolicy
from pbft.services.bfs.protocol import READ_ONLY_OPS
from helpers.netutil import LocalCluster

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(why_not() is not None, reason=why_not() or "")


@pytest.fixture(scope="module")
def bfs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bfs")
    lc = LocalCluster(tmp / "c", clients=8, service="bfs",
                      protocol={"checkpoint_interval_seqnos": 64, "log_window_seqnos": 128,
                                "view_change_timeout_ms": 500.0})
    with open(lc.dir / "cluster.toml", "a") as fh:
        fh.write(BFS_SECTION)
    lc.start_all()
    # mount points that every user can reach (pytest's own temporary directories are 0700)
    mdir = Path(tempfile.mkdtemp(prefix="pbft-bfs-", dir="/tmp"))
    os.chmod(mdir, 0o755)
    m1, m2 = mdir / "m1", mdir / "m2"
    m1.mkdir()
    m2.mkdir()
    mounts = []
    try:
        pbft("mount", lc.dir, m1, "--client-id", 4, "--identities", 4, "--timeout", 30)
        mounts.append(m1)
        pbft("mount", lc.dir, m2, "--client-id", 8, "--identities", 2, "--strict", "--timeout", 30)
        mounts.append(m2)
        yield lc, m1, m2
    finally:
        for m in mounts:
            r = pbft("umount", m, check=False)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True)
        lc.stop()
        shutil.rmtree(mdir, ignore_errors=True)
        for log in lc.dir.glob("mount-*.log"):
            text = log.read_text(errors="replace")
            assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_cp_tar_mv_and_checksums(bfs, tmp_path):
    lc, m1, m2 = bfs
    src = REPO / "src" / "pbft" / "services"
    local = tmp_path / "tree"
    shutil.copytree(src, local, ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink("kv.py", local / "kv-link")
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", str(local), str(m1 / "tree")], check=True)
    t_bfs = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", str(local), str(tmp_path / "tree2")], check=True)
    t_local = time.perf_counter() - t0
    print(f"\ncp -a of {len(tree_digest(local))} files: BFS {t_bfs:.2f}s, local {t_local:.3f}s")
    assert tree_digest(m1 / "tree") == tree_digest(local)
    # tar out of the mount and back into it
    subprocess.run(["tar", "-C", str(m1), "-cf", str(tmp_path / "t.tar"), "tree"], check=True)
    (m1 / "untar").mkdir()
    subprocess.run(["tar", "-C", str(m1 / "untar"), "-xf", str(tmp_path / "t.tar")], check=True)
    assert tree_digest(m1 / "untar" / "tree") == tree_digest(local)
    # mv of a directory: atomic, and the other mount sees it at once (strict: no caching)
    subprocess.run(["mv", str(m1 / "untar" / "tree"), str(m1 / "moved")], check=True)
    assert not (m1 / "untar" / "tree").exists()
    assert tree_digest(m2 / "moved") == tree_digest(local)
    subprocess.run(["rm", "-rf", str(m1 / "moved"), str(m1 / "untar")], check=True)
    assert not (m2 / "moved").exists()


def test_links_chmod_find_and_special_files(bfs):
    lc, m1, m2 = bfs
    d = m1 / "links"
    d.mkdir()
    (d / "f").write_text("data\n")
    subprocess.run(["ln", str(d / "f"), str(d / "hard")], check=True)
    a, b = os.stat(d / "f"), os.stat(d / "hard")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    subprocess.run(["ln", "-s", "f", str(d / "soft")], check=True)
    assert os.readlink(d / "soft") == "f" and (d / "soft").read_text() == "data\n"
    subprocess.run(["chmod", "600", str(d / "f")], check=True)
    assert stat.S_IMODE(os.stat(d / "hard").st_mode) == 0o600
    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert os.lstat(d / "null").st_rdev == os.makedev(1, 3)
    out = subprocess.run(["find", str(d), "-type", "f"], check=True, capture_output=True, text=True).stdout.split()
    assert sorted(Path(p).name for p in out) == ["f", "hard"]
    os.setxattr(d / "f", "user.k", b"v")
    assert os.getxattr(d / "f", "user.k") == b"v" and "user.k" in os.listxattr(d / "f")
    # open, unlink, still readable through the open file
    with open(d / "f", "rb") as fh:
        os.unlink(d / "f")
        os.unlink(d / "hard")
        assert fh.read() == b"data\n"
    assert not (d / "f").exists()
    # a sparse file beyond 4 GiB
    with open(d / "sparse", "wb") as fh:
        fh.seek(5 << 30)
        fh.write(b"end")
    st = os.stat(d / "sparse")
    assert st.st_size == (5 << 30) + 3 and st.st_blocks * 512 < 1 << 20
    with open(d / "sparse", "rb") as fh:
        fh.seek((5 << 30) - 2)
        assert fh.read() == b"\0\0end"
    statvfs = os.statvfs(m1)
    assert statvfs.f_namemax == 255 and statvfs.f_files > 0


@pytest.mark.slow
def test_git_and_make(bfs):
    lc, m1, m2 = bfs
    if shutil.which("git") is None or shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("git, make or cc missing")
    repo = m1 / "repo"
    repo.mkdir()
    (repo / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hello from bfs");return 0;}\n')
    (repo / "Makefile").write_text("hello: hello.c\n\tcc -o hello hello.c\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", HOME=str(repo))
    for cmd in (["git", "init", "-q", "--template="], ["git", "add", "."], ["git", "commit", "-qm", "first"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, check=True, env=env, capture_output=True, text=True)
    assert "first" in log.stdout
    subprocess.run(["git", "fsck", "--strict"], cwd=repo, check=True, env=env, capture_output=True)
    subprocess.run(["make", "-s"], cwd=repo, check=True, capture_output=True)
    out = subprocess.run([str(repo / "hello")], check=True, capture_output=True, text=True).stdout
    assert out == "hello from bfs\n"
    # the strict mount of another identity sees the repository
    log2 = subprocess.run(["git", "-c", f"safe.directory={m2 / 'repo'}", "log", "--oneline"], cwd=m2 / "repo",
                          check=True, env=env, capture_output=True, text=True)
    assert log2.stdout == log.stdout


def test_unprivileged_user_gets_permission_errors(bfs):
    lc, m1, m2 = bfs
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    (m1 / "rootonly").mkdir(mode=0o755)
    (m1 / "rootonly" / "secret").write_text("x")
    os.chmod(m1 / "rootonly" / "secret", 0o600)
    (m1 / "public").mkdir()
    os.chmod(m1 / "public", 0o1777)

    def as_nobody(script: str):
        return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "sh", "-c", script],
                              capture_output=True, text=True)

    r = as_nobody(f"echo x > {m1}/rootonly/new")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody(f"cat {m1}/rootonly/secret")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody(f"echo mine > {m1}/public/n && cat {m1}/public/n")
    assert r.returncode == 0 and r.stdout == "mine\n", r.stderr
    assert os.stat(m1 / "public" / "n").st_uid == 65534
    r = as_nobody(f"chmod 777 {m1}/rootonly")
    assert r.returncode != 0


def test_second_identity_sees_changes_close_to_open(bfs):
    lc, m1, m2 = bfs
    (m1 / "shared.txt").write_text("one\n")
    assert (m2 / "shared.txt").read_text() == "one\n"  # a new name is looked up, not cached negative
    (m2 / "shared.txt").write_text("two, longer\n")
    # the default mount: an open after the change sees it (fresh attributes, no cached pages)
    assert (m1 / "shared.txt").read_text() == "two, longer\n"
    with open(m1 / "shared.txt", "a") as fh:
        fh.write("three\n")
    assert (m2 / "shared.txt").read_text() == "two, longer\nthree\n"
    (m2 / "shared.txt").write_text("4\n")  # O_TRUNC: shorter than before
    assert (m1 / "shared.txt").read_text() == "4\n"
    (m1 / "shared.txt").write_text("5\n")
    assert (m2 / "shared.txt").read_text() == "5\n"
    os.rename(m2 / "shared.txt", m2 / "renamed.txt")
    assert (m2 / "renamed.txt").exists() and not (m2 / "shared.txt").exists()
    # exclusive create across mounts: exactly one wins
    results = []

    def excl(m):
        try:
            fd = os.open(m / "race", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            results.append("won")
        except FileExistsError:
            results.append("lost")

    ts = [threading.Thread(target=excl, args=(m,)) for m in (m1, m2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == ["lost", "won"]


def test_a_directorys_attributes_follow_this_mounts_changes_at_once(bfs):
    """The mount answers the kernel's getattr of a directory after its own create, mkdir... from
    the result: the same as the replicas say (the strict mount asks them every time)."""
    lc, m1, m2 = bfs
    d1, d2 = m1 / "attrs", m2 / "attrs"
    d1.mkdir()

    def same():
        a, b = os.stat(d1), os.stat(d2)
        assert (a.st_mtime_ns, a.st_ctime_ns, a.st_nlink, a.st_mode) == (b.st_mtime_ns, b.st_ctime_ns, b.st_nlink,
                                                                          b.st_mode)
        return a

    before = same()
    open(d1 / "f", "wb").close()  # O_CREAT without O_EXCL
    after = same()
    assert after.st_mtime_ns == after.st_ctime_ns == os.stat(d1 / "f").st_ctime_ns > before.st_mtime_ns
    os.mkdir(d1 / "sub")
    assert same().st_nlink == 3
    fd = os.open(d1 / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.symlink("f", d1 / "l")
    os.link(d1 / "f", d1 / "h")
    os.chmod(d1, 0o751)
    assert same().st_mode & 0o777 == 0o751
    t = same().st_mtime_ns
    os.unlink(d1 / "h")
    assert same().st_mtime_ns > t
    os.rename(d1 / "g", d1 / "sub" / "g")
    same()
    # a name this mount saw absent, then made by the other mount: the create opens it
    assert not (d1 / "late").exists()
    (d2 / "late").write_bytes(b"theirs ")
    with open(d1 / "late", "ab") as fh:
        fh.write(b"and ours")
    assert (d2 / "late").read_bytes() == b"theirs and ours"
    same()


def test_mode_and_times_set_after_gathered_writes_land_with_them_in_order(bfs, tmp_path):
    """A file's mode and times changed before its close, after writes the mount gathered (what
    ``cp -a`` does): this mount answers with them at once, every mount sees them after the close,
    and a write after them still comes after them (its mtime)."""
    lc, m1, m2 = bfs
    d1, d2 = m1 / "gather", m2 / "gather"
    d1.mkdir()
    fd = os.open(d1 / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"data " * 100)
        os.utime(fd, ns=(1_000_000_000_123, 2_000_000_000_456))
        os.fchmod(fd, 0o640)
        st = os.fstat(fd)
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == \
            (500, 0o640, 1_000_000_000_123, 2_000_000_000_456)
    finally:
        os.close(fd)
    b = os.stat(d2 / "f")  # the strict mount asks the replicas
    assert (b.st_size, stat.S_IMODE(b.st_mode), b.st_atime_ns, b.st_mtime_ns) == \
        (500, 0o640, 1_000_000_000_123, 2_000_000_000_456)
    assert (d2 / "f").read_bytes() == b"data " * 100
    # a write after the change of times: the agreed mtime is the write's, not the one set
    fd = os.open(d1 / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"a")
        os.utime(fd, ns=(5_000_000_000, 5_000_000_000))
        os.write(fd, b"b")
    finally:
        os.close(fd)
    g = os.stat(d2 / "g")
    assert (d2 / "g").read_bytes() == b"ab" and g.st_mtime_ns > 5_000_000_000 and g.st_atime_ns == 5_000_000_000
    assert os.stat(d1 / "g").st_mtime_ns == g.st_mtime_ns
    # cp -a of a tree keeps every file's mode, times and bytes
    src = tmp_path / "src"
    src.mkdir()
    for i, mode in enumerate((0o600, 0o644, 0o755, 0o640)):
        p = src / f"f{i}"
        p.write_bytes(bytes([i]) * (1000 * i + 1))
        os.chmod(p, mode)
        os.utime(p, ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    subprocess.run(["cp", "-a", str(src), str(d1 / "copy")], check=True)
    for p in sorted(src.iterdir()):
        a, c = os.stat(p), os.stat(d2 / "copy" / p.name)
        assert (stat.S_IMODE(c.st_mode), c.st_mtime_ns, c.st_size) == (stat.S_IMODE(a.st_mode), a.st_mtime_ns,
                                                                        a.st_size), p.name
        assert (d2 / "copy" / p.name).read_bytes() == p.read_bytes()


def test_reads_answered_with_the_bytes_fetched_at_open_stay_right(bfs):
    """A small file's bytes come with the open: reads through it give them, this mount's own later
    changes of the file (another descriptor's writes, a truncate) show at once, and another
    mount's change shows at the next open (close-to-open)."""
    lc, m1, m2 = bfs
    d1, d2 = m1 / "prefetch", m2 / "prefetch"
    d1.mkdir()
    for name in ("f", "empty", "big"):  # (names made here: another mount's show within --cache)
        (d1 / name).write_bytes(b"x")
    (d2 / "f").write_bytes(b"0123456789" * 100)
    assert (d1 / "f").read_bytes() == b"0123456789" * 100
    (d2 / "f").write_bytes(b"other mount")
    with open(d1 / "f", "rb", buffering=0) as r:
        with open(d1 / "f", "r+b") as w:  # this mount's change through another descriptor
            w.write(b"OTHER")
        os.truncate(d1 / "f", 8)
        os.posix_fadvise(r.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # (the kernel's pages go: reads reach the mount)
        assert r.read() == b"OTHER mo"
    with open(d1 / "f", "rb", buffering=0) as r:
        assert r.read(5) == b"OTHER"
    with open(d1 / "f", "r+b", buffering=0) as rw:  # its own gathered write laid over the bytes fetched at open
        rw.seek(2)
        rw.write(b"--")
        rw.flush()
        rw.seek(0)
        assert rw.read() == b"OT--R mo"
    assert (d2 / "f").read_bytes() == b"OT--R mo"
    empty = d2 / "empty"
    empty.write_bytes(b"")
    assert (d1 / "empty").read_bytes() == b""
    big = os.urandom(200_000)  # larger than one request: read as before
    (d2 / "big").write_bytes(big)
    assert (d1 / "big").read_bytes() == big


def _ordered(sent: dict) -> dict:
    return {op: n for op, n in sent.items() if op not in READ_ONLY_OPS}


@pytest.mark.parametrize("gather", [True, False], ids=["update", "no-gather-attrs"])
def test_a_file_written_and_chmod_ed_before_close_costs_a_create_and_one_update(bfs, gather):
    """What ``cp -a`` does to each file: created, written, its mode and times set, closed. The
    mount sends the create and one ``update`` (the writes, then the mode and times) and nothing
    else ordered; with ``--no-gather-attrs`` the write and each change go on their own."""
    lc, m1, m2 = bfs
    times = (1_234_000_000_567, 2_345_000_000_678)
    with counted_mount(lc, m1.parent / "counted", 10, *(() if gather else ("--no-gather-attrs",))) as (m, counters):
        d = m / f"cost-{'update' if gather else 'apart'}"
        d.mkdir()
        before = counters.sent()
        fd = os.open(d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"abc" * 1000)
            os.write(fd, b"def" * 1000)
            os.fchmod(fd, 0o640)
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
        sent = delta(before, counters.sent())
    want = {"create": 1, "update": 1} if gather else {"create": 1, "write": 1, "setattr": 2}
    assert _ordered(sent) == want, sent
    st = os.stat(m2 / d.name / "f")  # the strict mount asks the replicas
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (6000, 0o640, *times)
    assert (m2 / d.name / "f").read_bytes() == b"abc" * 1000 + b"def" * 1000


@pytest.mark.parametrize("prefetch", [True, False], ids=["open-prefetch", "no-open-prefetch"])
def test_a_small_file_read_after_open_costs_one_request(bfs, prefetch):
    """Opening and reading a small file that another client wrote: one read-only ``open`` that
    brings its bytes, no ``read``; with ``--no-open-prefetch`` a ``getattr`` and a ``read``. A
    file larger than one request is read as before."""
    lc, m1, m2 = bfs
    tag = "pre" if prefetch else "nopre"
    small, large = os.urandom(3000), os.urandom(60_000)
    (m2 / f"{tag}-small").write_bytes(small)  # (written elsewhere: this mount's kernel has no pages of it)
    (m2 / f"{tag}-large").write_bytes(large)
    with counted_mount(lc, m1.parent / "counted", 11, *(() if prefetch else ("--no-open-prefetch",))) as (m, counters):
        before = counters.sent()
        with open(m / f"{tag}-small", "rb", buffering=0) as fh:
            assert fh.read() == small
        mid = counters.sent()
        with open(m / f"{tag}-large", "rb", buffering=0) as fh:
            assert fh.read() == large
        after = counters.sent()
    first, second = delta(before, mid), delta(mid, after)
    assert not _ordered(first) and not _ordered(second), (first, second)
    if prefetch:
        assert first.get("open") == 1 and "read" not in first and "getattr" not in first, first
    else:
        assert "open" not in first and first.get("getattr") == 1 and first.get("read", 0) >= 1, first
    assert second.get("read", 0) >= 1, second


@pytest.mark.parametrize("exact", [True, False], ids=["exact-holds", "no-exact-holds"])
def test_an_unlink_while_another_file_is_open_costs_one_request(bfs, exact):
    """With a file open on the mount, removing another file (unlink, or a rename over it) is one
    ordered request: the mount names its open files, so the replicas do not hold the removed one
    (with ``--no-exact-holds`` they do, and a ``release`` follows). The open file itself, removed,
    stays readable until it is closed."""
    lc, m1, m2 = bfs
    with counted_mount(lc, m1.parent / "counted", 10, *(() if exact else ("--no-exact-holds",))) as (m, counters):
        d = m / f"holds-{'exact' if exact else 'any'}"
        d.mkdir()
        for name in ("open", "a", "b", "c"):
            (d / name).write_bytes(name.encode() * 100)
        with open(d / "open", "rb", buffering=0) as held:
            before = counters.sent()
            os.unlink(d / "a")
            os.rename(d / "b", d / "c")  # (replaces c)
            sent = delta(before, counters.sent())
            os.unlink(d / "open")
            assert held.read() == b"open" * 100  # (held for this mount: still readable)
            mid = counters.sent()
        deadline = time.monotonic() + 10  # (the kernel sends the release after close returns)
        while "release" not in (end := delta(mid, counters.sent())) and time.monotonic() < deadline:
            time.sleep(0.1)
    ordered = _ordered(sent)
    assert ordered == ({"unlink": 1, "rename": 1} if exact else {"unlink": 1, "rename": 1, "release": 2}), sent
    assert _ordered(end) == {"release": 1}, end  # (the close of the removed open file drops its hold)
    assert sorted(os.listdir(m2 / d.name)) == ["c"] and (m2 / d.name / "c").read_bytes() == b"b" * 100


@pytest.mark.parametrize("fold", [True, False], ids=["fsync-fold", "no-fsync-fold"])
def test_an_fsync_that_sends_the_writes_costs_no_more_requests(bfs, fold):
    """A file written, fsynced and closed: the fsync sends the gathered write, and its agreement
    is the fsync (no ordered no-op after it; with ``--no-fsync-fold`` one follows). An fsync with
    nothing gathered is the ordered no-op either way."""
    lc, m1, m2 = bfs
    with counted_mount(lc, m1.parent / "counted", 11, *(() if fold else ("--no-fsync-fold",))) as (m, counters):
        d = m / f"fsync-{'fold' if fold else 'noop'}"
        d.mkdir()
        before = counters.sent()
        fd = os.open(d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"durable " * 100)
            os.fsync(fd)
            mid = counters.sent()
            os.fsync(fd)  # (nothing gathered)
        finally:
            os.close(fd)
        first, second = delta(before, mid), delta(mid, counters.sent())
        assert (m2 / d.name / "f").read_bytes() == b"durable " * 100
    assert _ordered(first) == ({"create": 1, "write": 1} if fold else {"create": 1, "write": 1, "fsync": 1}), first
    assert _ordered(second) == {"fsync": 1}, second


class _InProcess:
    """A client pool whose replicas are one service in this process."""

    def __init__(self, service):
        self.service = service
        self.cfg = types.SimpleNamespace(request_size_bytes_max=65536)
        self.t = 10 ** 18

    async def invoke(self, who, raw, read_only, timeout):
        self.t += 1_000_000
        return self.service.execute(raw, who, self.t.to_bytes(8, "big"), read_only)


class _KeepOnlyBool(BFSService):
    """Replicas of before open files could be named in ``keep``: anything but True is False."""

    def op_unlink(self, cr, pino, name, keep):
        return super().op_unlink(cr, pino, name, keep is True)

    def op_rename(self, cr, sp, sname, dp, dname, flags, keep):
        return super().op_rename(cr, sp, sname, dp, dname, flags, keep is True)


def test_a_mount_names_its_open_files_only_to_replicas_that_take_them():
    from pbft.services.bfs.mount import BFSOperations

    cfg = BFSConfig(default=ClientPolicy(root=True))
    for service, exact in ((BFSService(cfg), True), (_KeepOnlyBool(cfg), False)):
        ops = BFSOperations(_InProcess(service), [4])  # type: ignore[arg-type]
        asyncio.run(ops.start())
        assert ops.exact_holds is exact
        ops.open_count[7] = 1
        assert ops._keep() == ((7,) if exact else True)


@pytest.mark.slow
def test_a_replica_killed_during_writes(bfs):
    lc, m1, m2 = bfs
    d = m1 / "crash"
    d.mkdir()
    expect = {}
    errors = []

    def writer():
        try:
            for i in range(40):
                data = hashlib.sha256(str(i).encode()).digest() * (100 + 50 * i)
                (d / f"f{i}").write_bytes(data)
                expect[f"f{i}"] = data
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.0)
    victim = lc.status(1)["primary"]
    os.kill(lc.procs[victim].pid, signal.SIGKILL)
    t.join(90)
    assert not t.is_alive() and not errors, errors
    for name, data in expect.items():
        assert (m1 / "crash" / name).read_bytes() == data
        assert (m2 / "crash" / name).read_bytes() == data
    assert len(os.listdir(m2 / "crash")) == 40
    # the replica comes back and catches up; the file system is still usable
    lc.start(victim)
    (m1 / "after").write_text("ok")
    assert (m2 / "after").read_text() == "ok"


def test_no_quorum_gives_etimedout_and_the_mount_survives(bfs):
    lc, m1, m2 = bfs
    m3 = m1.parent / "m3"
    m3.mkdir()
    pbft("mount", lc.dir, m3, "--client-id", 10, "--identities", 2, "--timeout", 2, "--strict")
    try:
        (m3 / "before").write_text("x")
        stopped = [2, 3]
        for r in stopped:
            os.kill(lc.procs[r].pid, signal.SIGSTOP)
        try:
            with pytest.raises(OSError) as ei:
                (m3 / "during").write_text("y")
            assert ei.value.errno == errno.ETIMEDOUT
        finally:
            for r in stopped:
                os.kill(lc.procs[r].pid, signal.SIGCONT)
        # the same mount works again once a quorum is back
        deadline = time.time() + 30
        while True:
            try:
                (m3 / "after").write_text("z")
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.5)
        assert (m1 / "after").read_text() == "z" and (m3 / "before").read_text() == "x"
    finally:
        pbft("umount", m3, check=False)


def test_random_posix_calls_agree_with_the_local_file_system(bfs, tmp_path):
    """The same random sequence of POSIX calls through the mount and on a local directory:
    the same results, the same errnos, the same tree in the end."""
    import random

    lc, m1, m2 = bfs
    roots = [m1 / "cmp", tmp_path / "cmp"]
    for r in roots:
        r.mkdir()
    paths = ["a", "b", "c", "a/x", "a/y", "b/x", "a/x/z"]
    rng = random.Random(11)

    def do(root: Path, k: int, p: str, q: str, n: int, data: bytes):
        P, Q = root / p, root / q
        if k == 0:
            fd = os.open(P, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        elif k == 1:
            os.mkdir(P, 0o755)
        elif k == 2:
            fd = os.open(P, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        elif k == 3:
            fd = os.open(P, os.O_RDWR | os.O_TRUNC)
            try:
                os.write(fd, data[: n % 50])
            finally:
                os.close(fd)
        elif k == 4:
            fd = os.open(P, os.O_WRONLY)
            try:
                os.pwrite(fd, data, n)
            finally:
                os.close(fd)
        elif k == 5:
            os.truncate(P, n)
        elif k == 6:
            os.rename(P, Q)
        elif k == 7:
            os.link(P, Q)
        elif k == 8:
            os.unlink(P)
        elif k == 9:
            os.rmdir(P)
        elif k == 10:
            os.symlink("target", P)
        elif k == 11:
            os.chmod(P, 0o600 if n % 2 else 0o755)
        elif k == 12:
            with open(P, "rb") as fh:
                fh.seek(n)
                return fh.read(300)
        else:
            return sorted(os.listdir(P))

    for step in range(250):
        k = rng.randrange(14)
        p, q = rng.choice(paths), rng.choice(paths)
        n = rng.randrange(40000)
        data = bytes([rng.randrange(256)]) * rng.randrange(1, 70000)
        out = []
        for r in roots:
            try:
                out.append(("ok", do(r, k, p, q, n, data)))
            except OSError as e:
                out.append(("err", e.errno))
        assert out[0] == out[1], (step, k, p, q, n, out)

    def snapshot(root: Path):
        snap = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                st = os.lstat(full)
                body = None
                if stat.S_ISREG(st.st_mode):
                    body = hashlib.sha256(full.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    body = os.readlink(full)
                size = None if stat.S_ISDIR(st.st_mode) else st.st_size
                snap[str(full.relative_to(root))] = (st.st_mode, st.st_nlink, size, body)
        return snap

    assert snapshot(roots[0]) == snapshot(roots[1])
    assert snapshot(m2 / "cmp") == snapshot(roots[1])


def test_mount_command_errors_are_one_line(bfs, tmp_path):
    lc, m1, m2 = bfs
    for args, text in [((lc.dir, tmp_path / "missing"), "not a directory"),
                       ((lc.dir, m1), "already a mount point"),
                       ((lc.dir, tmp_path, "--client-id", 99), "not a client"),
                       ((tmp_path / "nocluster", tmp_path), "cannot read")]:
        p = pbft("mount", *args, check=False)
        assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    p = pbft("umount", tmp_path, check=False)
    assert p.returncode == 2 and "not mounted" in p.stderr


def test_the_mount_cache_answers_again_until_another_client_changes_something(bfs):
    """After the kernel's own timeouts, the mount answers lookups, absent names and getattrs
    itself while the replicas say nobody else wrote; another client's changes show within
    --cache, this mount's own at once."""
    lc, m1, m2 = bfs
    m3 = m1.parent / "m3"
    m3.mkdir(exist_ok=True)
    pbft("mount", lc.dir, m3, "--client-id", 10, "--identities", 1, "--timeout", 30, "--cache", "0.5",
         "--verbose")
    try:
        d3, d2 = m3 / "mc", m2 / "mc"
        d3.mkdir()
        for i in range(6):
            (d3 / f"f{i}").write_bytes(b"x" * i)
        for _ in range(3):  # past the kernel's timeouts: from the mount cache
            time.sleep(0.6)
            assert [os.stat(d3 / f"f{i}").st_size for i in range(6)] == list(range(6))
            assert not (d3 / "absent").exists()
        # this mount's own changes: at once
        os.unlink(d3 / "f0")
        os.chmod(d3 / "f1", 0o600)
        (d3 / "f2").write_bytes(b"longer now")
        (d3 / "new").write_bytes(b"n")
        assert not (d3 / "f0").exists() and (d3 / "new").exists()
        assert stat.S_IMODE(os.stat(d3 / "f1").st_mode) == 0o600 and os.stat(d3 / "f2").st_size == 10
        # another client's (the strict mount): within --cache
        os.unlink(d2 / "f3")
        os.chmod(d2 / "f4", 0o640)
        (d2 / "theirs").write_bytes(b"t")
        with open(d2 / "f5", "ab") as fh:
            fh.write(b"+")
        time.sleep(0.6)
        assert not (d3 / "f3").exists() and (d3 / "theirs").read_bytes() == b"t"
        assert stat.S_IMODE(os.stat(d3 / "f4").st_mode) == 0o640 and os.stat(d3 / "f5").st_size == 6
        assert sorted(os.listdir(d3)) == ["f1", "f2", "f4", "f5", "new", "theirs"]
    finally:
        unmount_log = lc.dir / "mount-10.log"
        r = pbft("umount", m3, check=False)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(m3)], capture_output=True)
    deadline = time.monotonic() + 10
    while "mount cache" not in unmount_log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    text = unmount_log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    stats = ast.literal_eval(text.split("mount cache ", 1)[1].splitlines()[0])
    sent = ast.literal_eval(text.split("bfs mount: calls ", 1)[1].split("; errors", 1)[0])
    fuse = ast.literal_eval(text.split("FUSE requests ", 1)[1].split("; mount cache", 1)[0])
    assert stats["hits"] >= 18 and stats["voided"] >= 1, stats  # (the first check voids too)
    assert sent["lookup"][0] < fuse["lookup"], (sent, fuse)
