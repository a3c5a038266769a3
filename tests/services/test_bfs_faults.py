"""BFS under faults, through real FUSE mounts on a 4-replica loopback cluster: the whole
cluster restarted under a mount, a proactive recovery under file load, a replica whose stored
state was corrupted, a Byzantine replica lying in its replies, and a client sending hostile
operations.  Needs root, /dev/fuse and pyfuse3 (as tests/services/test_bfs_mount.py)."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from helpers.bfsutil import BFS_SECTION, bfs_cluster, mount_dir, mounted, sha, tree_digest, why_not
from helpers.netutil import SRC, corrupt_store
from pbft import BlockingClient
from pbft.services.bfs.protocol import A_INO, A_SIZE, BFSError, creds, decode_result, encode_op

pytestmark = [pytest.mark.skipif(why_not() is not None, reason=why_not() or ""), pytest.mark.slow]

#: small checkpoint interval, so that recoveries and digest comparisons come quickly
PROTOCOL = {"checkpoint_interval_seqnos": 16, "log_window_seqnos": 32, "view_change_timeout_ms": 500.0}


@pytest.fixture
def mdir():
    d = mount_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def payload(i: int, rng: random.Random) -> bytes:
    """Up to ~100 KB: several chunks and several write requests for the bigger ones."""
    return rng.randbytes(rng.choice((1, 700, 16 * 1024, 16 * 1024 + 1, 50_000, 100_000)) + i)


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_files(root: Path, expect: dict) -> None:
    for name, digest in expect.items():
        assert sha((root / name).read_bytes()) == digest, name


def retry_until_ok(fn, timeout: float = 30.0):
    """``fn()`` until it stops raising OSError; the errnos seen meanwhile are returned too."""
    seen = []
    deadline = time.time() + timeout
    while True:
        try:
            return fn(), seen
        except OSError as e:
            seen.append(e.errno)
            assert time.time() < deadline, f"still failing after {timeout}s: {seen}"
            time.sleep(0.3)


def recover(lc, rid: int) -> None:
    out = subprocess.run([sys.executable, "-m", "pbft.cli", "recover", str(lc.dir), "--id", str(rid)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=30)
    assert out.returncode == 0, out.stderr


def wait_recovered(lc, rid: int, before: int = 0) -> dict:
    return lc.wait_for(lambda: (s := lc.status(rid))["recoveries"] > before and s["recovering"] is None and s,
                       timeout=40.0, what=f"replica {rid} recovered")


def digests_agree(lc, ids=(0, 1, 2, 3)) -> bool:
    st = [lc.status(i) for i in ids]
    return (len({s["stable_checkpoint"] for s in st}) == 1 and st[0]["stable_checkpoint"] > 0
            and len({s["stable_digest"] for s in st}) == 1)


def wait_digests_agree(lc, m: Path, ids=(0, 1, 2, 3), timeout: float = 30.0) -> None:
    """Operations through ``m`` until every replica in ``ids`` holds the same stable checkpoint
    with the same digest (a checkpoint comes every 16 operations)."""
    deadline = time.time() + timeout
    k = 0
    while True:
        try:
            if digests_agree(lc, ids):
                return
        except OSError:
            pass
        assert time.time() < deadline, [lc.status(i) for i in ids]
        (m / f".tick{k % 4}").write_bytes(b"%d" % k)
        k += 1
        time.sleep(0.05)


def alive(lc) -> None:
    for r, p in lc.procs.items():
        assert p.poll() is None, f"replica {r} exited: {lc.log_text(r)[-2000:]}"
        lc.status(r)  # answers


# ---- 1. the whole cluster restarted under a mount ---------------------------------------

def test_whole_cluster_restart_under_the_mount(tmp_path, mdir):
    sig = signal.SIGKILL  # SIGTERM passes too (a clean stop); SIGKILL is the harder case
    lc = bfs_cluster(tmp_path / "c", protocol=PROTOCOL)
    try:
        lc.start_all()
        with mounted(lc, mdir / "m1", 4, identities=4, timeout=3) as m:
            rng = random.Random(1)
            (m / "d").mkdir()
            expect = {}
            for i in range(12):
                data = payload(i, rng)
                write_synced(m / "d" / f"f{i}", data)
                expect[f"d/f{i}"] = sha(data)
            os.symlink("f0", m / "d" / "link")
            held = os.open(m / "d" / "held", os.O_CREAT | os.O_RDWR, 0o644)  # open across the restart
            os.write(held, b"before|")
            (m / "w").mkdir()
            w = FileWriter(m / "w", 9, retry_s=60)  # writing when the cluster goes down, and after
            time.sleep(1.0)
            for r in range(lc.n):
                os.kill(lc.procs[r].pid, sig)
            for r in range(lc.n):
                lc.procs[r].wait(10)
            # no replica: an ordered operation fails with ETIMEDOUT (or EIO), and does not hang
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                write_synced(m / "d" / "during", b"x")
            assert ei.value.errno in (errno.ETIMEDOUT, errno.EIO), ei.value
            assert time.monotonic() - t0 < 30
            # a writer that keeps trying through the restart
            got = {}

            def writer():
                got["result"] = retry_until_ok(lambda: write_synced(m / "d" / "after", b"after the restart"), 60)

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(1.0)
            lc.start_all()
            t.join(70)
            assert not t.is_alive() and "result" in got
            time.sleep(1.0)
            written = w.finish()
            assert w.errors == [] and w.retried, (w.errors, w.retried)
            assert set(w.retried) <= {errno.ETIMEDOUT, errno.EIO}, w.retried
            expect.update({f"w/{k}": v for k, v in written.items()})
            assert all(lc.status(r)["restored"] == "restored" for r in range(lc.n)), \
                [lc.status(r)["restored"] for r in range(lc.n)]
            # a descriptor opened before the restart still works
            os.write(held, b"after")
            os.fsync(held)
            assert os.pread(held, 100, 0) == b"before|after"
            os.close(held)
            expect["d/held"] = sha(b"before|after")
            # every file written and fsynced before the restart, through this mount and a new one
            check_files(m, expect)
            assert os.readlink(m / "d" / "link") == "f0"
            with mounted(lc, mdir / "m2", 8, strict=True) as m2:
                check_files(m2, expect)
                assert (m2 / "d" / "after").read_bytes() == b"after the restart"
                assert sorted(os.listdir(m2 / "w")) == sorted(written)
                assert sorted(os.listdir(m2 / "d")) == sorted([f"f{i}" for i in range(12)] + ["after", "held", "link"]
                                                              + (["during"] if (m2 / "d" / "during").exists() else []))
                (m / "d" / "again").write_bytes(b"and again")
                assert (m2 / "d" / "again").read_bytes() == b"and again"
                wait_digests_agree(lc, m2)
    finally:
        lc.stop()


# ---- 2. a proactive recovery under file load --------------------------------------------

class FileWriter:
    """Copies files into the mount in the background, remembering each one's checksum."""

    def __init__(self, root: Path, seed: int, retry_s: float = 0.0):
        """``retry_s``: a failed file is written again, whole, for that long before giving up
        (the errnos seen are in ``.retried``)."""
        self.root = root
        self.rng = random.Random(seed)
        self.retry_s = retry_s
        self.expect: dict[str, str] = {}
        self.errors: list[str] = []
        self.retried: list[int] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        i = 0
        while not self.stop.is_set():
            name = f"w{i}"
            data = payload(i, self.rng)
            try:
                # _do calls each lambda before it returns: the loop variables cannot move under it
                self._do(lambda: write_synced(self.root / name, data))  # noqa: B023
                if i % 5 == 4:  # renames and deletions too
                    self._do(lambda: os.rename(self.root / name, self.root / f"r{i}"))  # noqa: B023
                    name = f"r{i}"
                    self._do(lambda: os.unlink(self.root / f"w{i - 1}"))  # noqa: B023
                    del self.expect[f"w{i - 1}"]
            except (OSError, AssertionError) as e:
                self.errors.append(f"{name}: {e!r}")
                return
            self.expect[name] = sha(data)
            i += 1

    def _do(self, fn) -> None:
        deadline = time.time() + self.retry_s
        failed = False
        while True:
            try:
                return fn()
            except OSError as e:
                if not self.retry_s or time.time() > deadline:
                    raise
                if e.errno == errno.ENOENT and failed:
                    return  # a rename or unlink that timed out had been executed
                failed = True
                self.retried.append(e.errno)
                time.sleep(0.3)

    def finish(self) -> dict:
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive()
        return self.expect


@pytest.mark.parametrize("rid", [2, 0], ids=["backup", "primary"])
def test_proactive_recovery_under_file_load(tmp_path, mdir, rid):
    lc = bfs_cluster(tmp_path / "c", protocol=PROTOCOL)
    try:
        lc.start_all()
        with mounted(lc, mdir / "m1", 4, identities=4) as m, mounted(lc, mdir / "m2", 8, strict=True) as m2:
            (m / "load").mkdir()
            w = FileWriter(m / "load", 2)
            time.sleep(1.5)
            n_before = len(w.expect)
            recover(lc, rid)
            lc.wait_for(lambda: lc.status(rid)["recovering"] is not None or lc.status(rid)["recoveries"] >= 1,
                        what=f"replica {rid} recovering")
            st = wait_recovered(lc, rid)
            time.sleep(1.0)
            expect = w.finish()
            assert w.errors == [], w.errors
            assert len(expect) > n_before, (n_before, len(expect))  # writes went on during the recovery
            assert "recovered" in lc.log_text(rid)
            assert st["recovery_overdue"] is False
            check_files(m / "load", expect)
            check_files(m2 / "load", expect)
            assert sorted(os.listdir(m2 / "load")) == sorted(expect)
            wait_digests_agree(lc, m2)
            out = subprocess.run([sys.executable, "-m", "pbft.cli", "status", str(lc.dir)], capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=30)
            assert out.returncode == 0 and "recovering" not in out.stdout, out.stdout + out.stderr
    finally:
        lc.stop()


# ---- 3. a replica whose state was corrupted, repaired --------------------------------

MARK = b"BFS-VICTIM-BYTES"  # 16 bytes


def test_replica_with_corrupted_stored_file_data_is_repaired(tmp_path, mdir):
    lc = bfs_cluster(tmp_path / "c", protocol=PROTOCOL)
    try:
        lc.start_all()
        with mounted(lc, mdir / "m1", 4, identities=4) as m, mounted(lc, mdir / "m2", 8, strict=True) as m2:
            victim = MARK * 2048  # 32 KiB: two chunks
            write_synced(m / "victim", victim)
            rng = random.Random(3)
            expect = {"victim": sha(victim)}
            for i in range(20):
                data = payload(i, rng)
                write_synced(m / f"f{i}", data)
                expect[f"f{i}"] = sha(data)
            wait_digests_agree(lc, m2)
            lc.procs[2].send_signal(signal.SIGTERM)
            lc.procs[2].wait(10)
            assert corrupt_store(lc, 2, MARK) >= 1
            lc.start(2)
            lc.wait_connected()
            # the damaged replica runs: what clients read is still right (reads need 2f+1
            # matching replies on the read-only path, f+1 when ordered)
            for _ in range(3):
                check_files(m, expect)
                check_files(m2, expect)
            w = FileWriter(m, 4)
            recover(lc, 2)
            st = wait_recovered(lc, 2)
            time.sleep(0.5)
            more = w.finish()
            assert w.errors == [], w.errors
            assert st["state_transfer"]["objects"] >= 1, st["state_transfer"]
            assert "store-damaged" in lc.log_text(2)  # the damage was found when the store was loaded
            wait_digests_agree(lc, m2)
            check_files(m2, {**expect, **more})
    finally:
        lc.stop()


def test_replica_with_state_corrupted_in_memory_is_repaired(tmp_path, mdir, monkeypatch):
    monkeypatch.setenv("PBFT_FAULT_INJECTION", "1")
    lc = bfs_cluster(tmp_path / "c", protocol=PROTOCOL)
    try:
        lc.start_all()
        with mounted(lc, mdir / "m1", 4, identities=4) as m, mounted(lc, mdir / "m2", 8, strict=True) as m2:
            rng = random.Random(5)
            expect = {}
            (m / "d").mkdir()
            for i in range(10):
                data = payload(i, rng)
                write_synced(m / "d" / f"f{i}", data)
                expect[f"d/f{i}"] = sha(data)
            lc.signal(1, signal.SIGUSR2)  # one inode of replica 1 overwritten behind the service's back
            lc.wait_for(lambda: "fault-injected" in lc.log_text(1), what="the fault injected")
            # more checkpoints: replica 1's next one disagrees with the certified one, and it
            # repairs itself at once, without a recovery (it fetches the objects that differ)
            deadline = time.time() + 30
            k = 0
            while "state-repair" not in lc.log_text(1):
                assert time.time() < deadline, lc.status(1)
                (m / f"t{k % 3}").write_bytes(b"%d" % k)
                k += 1
            for _ in range(3):
                check_files(m2, expect)
                assert sorted(os.listdir(m2 / "d")) == sorted(p.split("/")[1] for p in expect)
            wait_digests_agree(lc, m2)
            st = lc.status(1)
            assert st["recoveries"] == 0 and st["counts"].get("state-repair", 0) >= 1, st["counts"]
            assert st["state_transfer"]["objects"] >= 1, st["state_transfer"]
            check_files(m, expect)
            check_files(m2, expect)
    finally:
        lc.stop()


# ---- 4. a Byzantine replica lying in its replies -------------------------------------

def designated(bc) -> int:
    """The replica the next request of ``bc`` designates to send the full result (the core
    client's rule; read between requests, while the client's loop is idle)."""
    core = bc._client._pool.p[bc.id].core
    live = core.responsive or core.replicas
    return live[(core.id + core.timestamp + 1) % len(live)]


@pytest.mark.parametrize("liar", [3, 0], ids=["backup", "primary"])
def test_a_lying_replica_changes_nothing_a_client_sees(tmp_path, mdir, liar):
    lc = bfs_cluster(tmp_path / "c", protocol=PROTOCOL)
    try:
        for r in range(lc.n):
            lc.start(r, service="tests.helpers.bfs_liar:LyingBFS" if r == liar else None)
        lc.wait_connected()
        with mounted(lc, mdir / "m1", 4, identities=4) as m, mounted(lc, mdir / "m2", 8, strict=True) as m2:
            rng = random.Random(7)
            (m / "d").mkdir()
            truth = {}
            for i in range(12):
                data = payload(i, rng)
                write_synced(m / "d" / f"f{i}", data)
                truth[f"d/f{i}"] = data
            names = sorted(p.split("/")[1] for p in truth)
            for _ in range(4):  # through both mounts: the read-only path and ordered reads
                for mm in (m, m2):
                    assert sorted(os.listdir(mm / "d")) == names
                    for p, data in truth.items():
                        assert os.stat(mm / p).st_size == len(data), p
                        assert (mm / p).read_bytes() == data, p
            # a client of its own, so that the liar is seen as designated replier
            with BlockingClient(lc.dir, 10) as bc:
                cr = creds(0, 0)
                ino = decode_result(bc.invoke(encode_op("lookup", 1, b"d", cr), read_only=True))[A_INO]
                fino = decode_result(bc.invoke(encode_op("lookup", ino, b"f5", cr), read_only=True))[A_INO]
                ops = {"getattr": (("getattr", fino), len(truth["d/f5"])),
                       "read": (("read", fino, 100, 20000), truth["d/f5"][100:20100]),
                       "readdir": (("readdir", ino, 0, 1000), names)}
                # getattrs (a third of them lied to) until the liar is the designated replier, then a
                # read or a readdir it lies to: three times on each path
                lied_designated = {True: 0, False: 0}
                # (clients stop designating a replica caught lying until it answers right again, so
                # the liar's turns come rarely: allow many requests, stopping at three per path)
                for k in range(3000):
                    if min(lied_designated.values()) >= 3:
                        break
                    read_only = lied_designated[True] <= lied_designated[False]
                    kind = "getattr"
                    if designated(bc) == liar:
                        kind = ("read", "readdir")[k % 2]
                        lied_designated[read_only] += 1
                    op, want = ops[kind]
                    res = decode_result(bc.invoke(encode_op(*op, cr), read_only=read_only, timeout=20))
                    got = (res[A_SIZE] if kind == "getattr" else
                           sorted(e[0].decode() for e in res[0]) if kind == "readdir" else res)
                    assert got == want, (k, kind, read_only)
                assert min(lied_designated.values()) >= 3, lied_designated
            text = lc.log_text(liar)
            assert "bfs-liar: lie" in text and "read_only=True" in text and "read_only=False" in text
            # the correct replicas agree.  (The liar's checkpoints may not: the library's last-reply
            # table, part of the checkpointed state, holds its lies to ordered requests.)
            wait_digests_agree(lc, m2, ids=tuple(r for r in range(lc.n) if r != liar))
    finally:
        lc.stop()


# ---- 5. a hostile client -----------------------------------------------------------------

HOSTILE = 11
HOSTILE_SECTION = BFS_SECTION + """
[bfs.client.11]
uids = [1000]
gids = [1000]
"""


def test_hostile_client_operations_get_errors_and_change_nothing(tmp_path, mdir):
    lc = bfs_cluster(tmp_path / "c", section=HOSTILE_SECTION, protocol=PROTOCOL)
    try:
        lc.start_all()
        with mounted(lc, mdir / "m1", 4, identities=4) as m, mounted(lc, mdir / "m2", 8, strict=True) as m2:
            (m / "d").mkdir()
            (m / "d" / "secret").write_bytes(b"root's data" * 100)
            os.chmod(m / "d" / "secret", 0o600)
            (m / "pub").mkdir()
            os.chmod(m / "pub", 0o1777)
            before = tree_digest(m)
            dino, sino, pino = (os.stat(m / p).st_ino for p in ("d", "d/secret", "pub"))
            me = creds(1000, 1000)
            with BlockingClient(lc.dir, HOSTILE) as bc:
                def call(raw: bytes, read_only=False):
                    return bc.invoke(raw, read_only=read_only, timeout=20)

                def err(raw: bytes, read_only=False) -> int:
                    with pytest.raises(BFSError) as ei:
                        decode_result(call(raw, read_only))
                    return ei.value.errno

                # not an operation at all
                for raw in (b"", b"\xc1", b"\xff" * 100, msgpack.packb(7), msgpack.packb({"a": 1}),
                            msgpack.packb([]), msgpack.packb(["nosuchop", me]), msgpack.packb([b"read", 1, 0, 1, me]),
                            msgpack.packb(["read", 1, 0, me]), msgpack.packb(["read", 1, 0, 1, 2, me]),
                            b"\x91" * 100_00 + b"\xc0", msgpack.packb(["statfs", list(range(100))])):
                    assert err(raw) == errno.EINVAL, raw[:20]
                # credentials it may not claim, or malformed
                for c in ((5, 1000, ()), (1000, 0, ()), ("root", 0, ()), (1000, 1000), (1000, 1000, (2 ** 40,)),
                          (-1, 1000, ())):
                    assert err(encode_op("getattr", 1, c)) in (errno.EPERM, errno.EINVAL), c
                # uid 0 is squashed to nobody: no root powers
                assert err(encode_op("read", sino, 0, 10, creds(0, 0))) == errno.EACCES
                # wrong types and huge numbers
                assert err(encode_op("getattr", "1", me)) == errno.EINVAL
                assert err(encode_op("getattr", 2 ** 64 - 1, me)) == errno.ESTALE
                assert err(encode_op("getattr", 0, me)) == errno.EINVAL
                assert err(encode_op("getattr", True, me)) == errno.EINVAL
                assert err(encode_op("getattr", 1.0, me)) == errno.EINVAL
                assert err(encode_op("read", sino, 2 ** 64 - 1, 2 ** 64 - 1, me)) == errno.EACCES
                assert err(encode_op("readdir", 1, -1, 10, me)) == errno.EINVAL
                fd = os.open(m / "pub" / "mine", os.O_CREAT | os.O_WRONLY, 0o666)
                os.close(fd)
                os.chmod(m / "pub" / "mine", 0o666)
                mine = os.stat(m / "pub" / "mine").st_ino
                assert err(encode_op("write", mine, 2 ** 64 - 1, b"x", me)) == errno.EFBIG
                assert err(encode_op("write", mine, -(2 ** 63), b"x", me)) == errno.EINVAL
                assert err(encode_op("write", mine, -5, b"x", me)) == errno.EINVAL
                assert err(encode_op("write", mine, 0, "text", me)) == errno.EINVAL
                assert err(encode_op("write", mine, 0, b"z" * (49 * 1024), me)) == errno.EINVAL  # > 48 KiB
                assert err(encode_op("write", mine, 0, b"z" * (60 * 1024), me)) == errno.EINVAL  # not decoded
                assert err(encode_op("setattr", mine, None, None, None, 2 ** 60, (None, None), me)) == errno.EFBIG
                assert err(encode_op("setattr", mine, None, None, None, None, (1.5, None), me)) == errno.EINVAL
                assert err(encode_op("setattr", mine, None, None, None, None, (None,), me)) == errno.EINVAL
                # mutations flagged read-only
                for op in (("mkdir", pino, b"x", 0o755), ("write", mine, 0, b"x"), ("unlink", pino, b"mine", False),
                           ("setattr", mine, 0o777, None, None, None, (None, None)), ("release_all",)):
                    assert err(encode_op(*op, me), read_only=True) == errno.EROFS, op
                # names: traversal, separators, NUL, too long, empty
                for name, code in ((b"..", errno.EINVAL), (b".", errno.EINVAL), (b"/", errno.EINVAL),
                                   (b"a/b", errno.EINVAL), (b"../d", errno.EINVAL), (b"a\0b", errno.EINVAL),
                                   (b"", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG), ("str", errno.EINVAL)):
                    assert err(encode_op("create", pino, name, 0o644, True, me)) == code, name
                    assert err(encode_op("mkdir", pino, name, 0o755, me)) == code, name
                    assert err(encode_op("rename", pino, b"mine", pino, name, 0, False, me)) == code, name
                    assert err(encode_op("link", mine, pino, name, me)) == code, name
                assert err(encode_op("lookup", pino, b"a/b", me)) == errno.EINVAL
                assert err(encode_op("unlink", pino, b"..", False, me)) == errno.EINVAL
                # a rename of a directory into itself, '..' of the root is the root
                assert err(encode_op("rename", 1, b"pub", pino, b"x", 0, False, me)) in (errno.EACCES, errno.EINVAL)
                assert decode_result(call(encode_op("lookup", 1, b"..", me), True))[A_INO] == 1
                # foreign files: no chmod, chown, truncate, times, xattrs, reads, unlink, links
                for op, code in ((("setattr", sino, 0o777, None, None, None, (None, None)), errno.EPERM),
                                 (("setattr", sino, None, 1000, None, None, (None, None)), errno.EPERM),
                                 (("setattr", dino, None, None, 1000, None, (None, None)), errno.EPERM),
                                 (("setattr", sino, None, None, None, 0, (None, None)), errno.EACCES),
                                 (("setattr", sino, None, None, None, None, (1, 1)), errno.EPERM),
                                 (("setattr", sino, None, None, None, None, (-1, -1)), errno.EACCES),
                                 (("setxattr", sino, b"user.k", b"v", 0), errno.EACCES),
                                 (("read", sino, 0, 10), errno.EACCES),
                                 (("write", sino, 0, b"x"), errno.EACCES),
                                 (("unlink", dino, b"secret", False), errno.EACCES),
                                 (("link", sino, pino, b"l"), errno.EPERM),
                                 (("mknod", pino, b"dev", 0o20666, 259), errno.EPERM)):
                    assert err(encode_op(*op, me)) == code, op
                # every operation with every argument replaced by hostile values: a result each
                # (the same on every replica, or no quorum would certify it), never a bug
                from pbft.services.bfs.protocol import ARITY
                bad = (None, -1, 2 ** 64 - 1, -(2 ** 63), "s", b"", b"..", b"x" * 256, (1, 2), [[[]]], 1.5, True,
                       0, 1, pino, mine)
                ok = 0
                for op, arity in sorted(ARITY.items()):
                    base = {"read": [mine, 0, 10], "write": [mine, 0, b"y"], "readdir": [pino, 0, 10],
                            "setattr": [mine, None, None, None, None, (None, None)],
                            "rename": [pino, b"mine", pino, b"mine2", 0, False]}.get(op, [pino] + [b"n"] * (arity - 1))
                    for i in range(arity):
                        for v in bad:
                            args = list(base)
                            args[i] = v
                            raw = encode_op(op, *args, me)
                            try:
                                decode_result(call(raw, read_only=op in ("read", "getattr", "lookup")))
                                ok += 1
                            except BFSError:
                                continue
                            if op == "rename":  # put it back
                                try:
                                    decode_result(call(encode_op("rename", pino, b"mine2", pino, b"mine", 0, False,
                                                                 me)))
                                except BFSError:
                                    pass
                print(f"\nhostile values accepted as valid arguments: {ok}")
                assert ok > 0
            # no replica stopped or misbehaved; the service met no bug
            alive(lc)
            for r in range(lc.n):
                text = lc.log_text(r)
                assert "Traceback" not in text and not re.search(r"bfs: \w+ failed", text), text[-3000:]
            # the mounts work and see the same, unchanged data
            (m / "after").write_bytes(b"still here")
            assert (m2 / "after").read_bytes() == b"still here"
            now = tree_digest(m)
            assert {k: v for k, v in now.items() if k in before} == before
            assert tree_digest(m2) == now
            wait_digests_agree(lc, m2)
    finally:
        lc.stop()
