"""BFS without FUSE: the service's POSIX semantics, access control, limits, bounded reclaim,
determinism, hostile input, and a stateful comparison against the local file system."""

from __future__ import annotations

import ctypes
import errno as E
import os
import pickle
import random
import stat as S
import tempfile

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pbft.config import ConfigError
from pbft.services.bfs import BFSConfig, BFSService, ClientPolicy, parse_bfs_section
from pbft.services.bfs.protocol import (A_ATIME, A_BLOCKS, A_CTIME, A_GID, A_INO, A_MODE, A_MTIME, A_NLINK, A_SIZE,
                                        A_UID, IO_MAX, KEEP_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, UTIME_NOW,
                                        BFSError, UPDATE_SETATTR, UPDATE_STEPS_MAX, UPDATE_WRITE, creds, decode_result,
                                        encode_op)
from pbft.services.bfs.service import CHUNK, CRED_MEMO_MAX, RECLAIM_FREES, WRITERS_MAX

ROOT = creds(0, 0)
ALICE = creds(1000, 1000, (1000,))
BOB = creds(1001, 1001, (1001, 2000))
CAROL = creds(1002, 1002)
OPEN = BFSConfig(default=ClientPolicy(root=True))


class FS:
    """A service instance with an agreed clock that advances 1 ms per call."""

    def __init__(self, cfg: BFSConfig = OPEN, client: int = 4, **kw):
        self.s = BFSService(cfg, inode_buckets=64, dir_buckets=64, data_buckets=256, xattr_buckets=16, **kw)
        self.t = 1_000_000_000
        self.client = client
        self.default_cr = ROOT

    def raw(self, op: str, *args, cr=None, ro: bool = False, client=None) -> bytes:
        cr = self.default_cr if cr is None else cr
        self.t += 1_000_000
        return self.s.execute(encode_op(op, *args, cr), self.client if client is None else client,
                              self.t.to_bytes(8, "big"), ro)

    def __call__(self, op: str, *args, cr=None, ro: bool = False, client=None):
        return decode_result(self.raw(op, *args, cr=cr, ro=ro, client=client))

    def err(self, op: str, *args, cr=None, client=None) -> int:
        with pytest.raises(BFSError) as ei:
            self(op, *args, cr=cr, client=client)
        return ei.value.errno

    # conveniences
    def create(self, parent, name, mode=0o644, cr=None):
        return self("create", parent, name, mode, True, cr=cr)[A_INO]

    def mkdir(self, parent, name, mode=0o755, cr=None):
        return self("mkdir", parent, name, mode, cr=cr)[A_INO]

    def write(self, ino, off, data, cr=None):
        return self("write", ino, off, data, cr=cr)

    def read(self, ino, off=0, n=IO_MAX, cr=None):
        return self("read", ino, off, n, cr=cr, ro=True)

    def stat(self, ino):
        return self("getattr", ino, ro=True)

    def lookup(self, parent, name, cr=None):
        return self("lookup", parent, name, cr=cr, ro=True)

    def names(self, ino):
        out, cookie = [], 0
        while True:
            ents, eof, cookie = self("readdir", ino, cookie, 100, ro=True)
            out += [e[0] for e in ents]
            if eof:
                return out

    def setattr(self, ino, mode=None, uid=None, gid=None, size=None, times=(None, None), cr=None):
        return self("setattr", ino, mode, uid, gid, size, times, cr=cr)

    def truncate(self, ino, size, cr=None):
        return self.setattr(ino, size=size, cr=cr)


def test_create_write_read_holes_and_sizes():
    fs = FS()
    f = fs.create(ROOT_INO, b"f")
    assert fs.err("create", ROOT_INO, b"f", 0o644, True) == E.EEXIST
    assert fs("create", ROOT_INO, b"f", 0o644, False)[A_INO] == f  # O_CREAT without O_EXCL opens it
    fs.write(f, 0, b"hello")
    fs.write(f, 3 * CHUNK + 10, b"world")  # a hole in between
    a = fs.stat(f)
    assert a[A_SIZE] == 3 * CHUNK + 15
    assert a[A_BLOCKS] == 2 * CHUNK // 512  # two chunks stored, the hole costs nothing
    assert fs.read(f, 0, 5) == b"hello"
    assert fs.read(f, 5, 100) == bytes(100)
    assert fs.read(f, 3 * CHUNK + 8, 100) == b"\0\0world"
    assert fs.read(f, 10 * CHUNK, 10) == b""
    fs.write(f, CHUNK, bytes(CHUNK))  # zeros into a hole stay a hole
    assert fs.stat(f)[A_BLOCKS] == 2 * CHUNK // 512
    big = bytes(random.Random(1).randrange(256) for _ in range(IO_MAX))
    fs.write(f, CHUNK - 7, big)  # spans chunk boundaries
    assert fs.read(f, CHUNK - 7, IO_MAX) == big
    assert fs.err("write", f, 0, bytes(IO_MAX + 1)) == E.EINVAL
    d = fs.mkdir(ROOT_INO, b"d")
    assert fs.err("write", d, 0, b"x") == E.EISDIR
    assert fs.err("read", d, 0, 1) == E.EISDIR


def test_sparse_file_beyond_4gib_and_file_size_limit():
    fs = FS(BFSConfig(default=ClientPolicy(root=True), file_size_max=1 << 40))
    f = fs.create(ROOT_INO, b"sparse")
    fs.write(f, (5 << 30) + 3, b"far")
    a = fs.stat(f)
    assert a[A_SIZE] == (5 << 30) + 6 and a[A_BLOCKS] == CHUNK // 512
    assert fs.read(f, 5 << 30, 6) == b"\0\0\0far"
    assert fs.err("write", f, (1 << 40) - 1, b"xy") == E.EFBIG
    assert fs.err("setattr", f, None, None, None, (1 << 40) + 1, (None, None)) == E.EFBIG
    fs.truncate(f, 1 << 40)
    assert fs.stat(f)[A_SIZE] == 1 << 40


def test_readdir_is_sorted_paginated_and_stable_under_inserts_and_deletes():
    fs = FS()
    names = [f"n{i:03d}".encode() for i in range(50)]
    for n in names:
        fs.create(ROOT_INO, n)
    ents, eof, resume = fs("readdir", ROOT_INO, 0, 20, ro=True)
    assert len(ents) == 20 and not eof and resume == ents[-1][1]
    seen = [e[0] for e in ents]
    cookie = ents[-1][1]
    # concurrent changes: delete one already listed and one not yet listed, add new ones
    fs("unlink", ROOT_INO, names[0], False)
    fs("unlink", ROOT_INO, names[30], False)
    fs.create(ROOT_INO, b"a-new")
    while True:
        ents, eof, cookie = fs("readdir", ROOT_INO, cookie, 20, ro=True)
        seen += [e[0] for e in ents]
        if eof:
            break
    # every entry present throughout is listed exactly once; the deleted unlisted one is not
    assert len(seen) == len(set(seen))
    assert set(names) - {names[0], names[30]} <= set(seen)
    assert names[30] not in seen
    # attributes come with the entries
    ents, _, _ = fs("readdir", ROOT_INO, 0, 1, ro=True)
    assert ents[0][2][A_MODE] & S.S_IFREG


def test_lookup_dot_dotdot_and_errors():
    fs = FS()
    d = fs.mkdir(ROOT_INO, b"d")
    assert fs.lookup(d, b".")[A_INO] == d
    assert fs.lookup(d, b"..")[A_INO] == ROOT_INO
    assert fs.err("lookup", d, b"nope") == E.ENOENT
    f = fs.create(d, b"f")
    assert fs.err("lookup", f, b"x") == E.ENOTDIR
    assert fs.err("lookup", d, b"x" * 256) == E.ENAMETOOLONG
    assert fs.err("lookup", d, b"a/b") == E.EINVAL
    assert fs.err("getattr", 999) == E.ESTALE


def test_unlink_rmdir_and_nlink_of_directories():
    fs = FS()
    d = fs.mkdir(ROOT_INO, b"d")
    assert fs.stat(ROOT_INO)[A_NLINK] == 3
    sub = fs.mkdir(d, b"sub")
    fs.create(sub, b"f")
    assert fs.stat(d)[A_NLINK] == 3
    assert fs.err("rmdir", d, b"sub") == E.ENOTEMPTY
    assert fs.err("unlink", d, b"sub", False) == E.EISDIR
    assert fs.err("rmdir", sub, b"f") == E.ENOTDIR
    fs("unlink", sub, b"f", False)
    fs("rmdir", d, b"sub")
    assert fs.stat(d)[A_NLINK] == 2
    assert fs.err("getattr", sub) == E.ESTALE
    assert fs.err("rmdir", d, b".") == E.EINVAL
    assert fs.err("rmdir", ROOT_INO, b"nope") == E.ENOENT


def test_hard_links_symlinks_and_special_files():
    fs = FS()
    f = fs.create(ROOT_INO, b"f")
    d = fs.mkdir(ROOT_INO, b"d")
    a = fs("link", f, d, b"g")
    assert a[A_INO] == f and a[A_NLINK] == 2
    assert fs.lookup(d, b"g")[A_INO] == f
    assert fs.err("link", d, ROOT_INO, b"dl") == E.EPERM
    assert fs.err("link", f, d, b"g") == E.EEXIST
    fs("unlink", ROOT_INO, b"f", False)
    assert fs.stat(f)[A_NLINK] == 1
    s = fs("symlink", ROOT_INO, b"s", b"d/g")
    assert s[A_MODE] == S.S_IFLNK | 0o777 and s[A_SIZE] == 3
    assert fs("readlink", s[A_INO], ro=True) == b"d/g"
    assert fs.err("readlink", f) == E.EINVAL
    fifo = fs("mknod", ROOT_INO, b"p", S.S_IFIFO | 0o600, 0)
    assert S.S_ISFIFO(fifo[A_MODE])
    dev = fs("mknod", ROOT_INO, b"c", S.S_IFCHR | 0o600, 0x0103)
    assert S.S_ISCHR(dev[A_MODE]) and dev[5] == 0x0103
    fs.setattr(ROOT_INO, mode=0o777)
    assert fs.err("mknod", ROOT_INO, b"c2", S.S_IFBLK | 0o600, 1, cr=ALICE) == E.EPERM
    assert fs.err("mknod", ROOT_INO, b"x", S.S_IFDIR | 0o600, 0) == E.EINVAL


def test_rename_semantics():
    fs = FS()
    a = fs.mkdir(ROOT_INO, b"a")
    b = fs.mkdir(ROOT_INO, b"b")
    f = fs.create(a, b"f")
    g = fs.create(b, b"g")
    # replace a file atomically; the replaced inode is freed
    fs("rename", a, b"f", b, b"g", 0, False)
    assert fs.lookup(b, b"g")[A_INO] == f and fs.err("lookup", a, b"f") == E.ENOENT
    assert fs.err("getattr", g) == E.ESTALE
    # move a directory: '..' and both parents' link counts follow
    sub = fs.mkdir(a, b"sub")
    fs("rename", a, b"sub", b, b"sub", 0, False)
    assert fs.lookup(sub, b"..")[A_INO] == b
    assert fs.stat(a)[A_NLINK] == 2 and fs.stat(b)[A_NLINK] == 3
    # into its own subtree
    deep = fs.mkdir(sub, b"deep")
    assert fs.err("rename", b, b"sub", deep, b"x", 0, False) == E.EINVAL
    assert fs.err("rename", b, b"sub", sub, b"x", 0, False) == E.EINVAL
    # file over directory and back, non-empty and empty directory targets
    assert fs.err("rename", b, b"g", b, b"sub", 0, False) == E.EISDIR
    assert fs.err("rename", b, b"sub", b, b"g", 0, False) == E.ENOTDIR
    empty = fs.mkdir(ROOT_INO, b"empty")
    assert fs.err("rename", ROOT_INO, b"empty", b, b"sub", 0, False) == E.ENOTEMPTY
    fs("rename", b, b"sub", ROOT_INO, b"empty", 0, False)
    assert fs.err("getattr", empty) == E.ESTALE
    assert fs.stat(ROOT_INO)[A_NLINK] == 5 and fs.stat(b)[A_NLINK] == 2  # a, b, empty(=sub)
    # NOREPLACE, EXCHANGE
    h = fs.create(a, b"h")
    assert fs.err("rename", a, b"h", b, b"g", RENAME_NOREPLACE, False) == E.EEXIST
    assert fs.err("rename", a, b"h", b, b"nope", RENAME_EXCHANGE, False) == E.ENOENT
    fs("rename", a, b"h", ROOT_INO, b"empty", RENAME_EXCHANGE, False)  # a file and a directory swap
    assert fs.lookup(a, b"h")[A_INO] == sub and fs.lookup(ROOT_INO, b"empty")[A_INO] == h
    assert fs.lookup(sub, b"..")[A_INO] == a
    assert fs.stat(a)[A_NLINK] == 3 and fs.stat(ROOT_INO)[A_NLINK] == 4
    assert fs.err("rename", a, b"h", b, b"g", 3, False) == E.EINVAL
    # hard links to the same inode: nothing happens
    fs("link", f, a, b"f2")
    fs("rename", a, b"f2", b, b"g", 0, False)
    assert fs.lookup(a, b"f2")[A_INO] == f and fs.stat(f)[A_NLINK] == 2
    assert fs.err("rename", a, b"missing", b, b"x", 0, False) == E.ENOENT


def test_posix_times():
    fs = FS()
    t0 = fs.stat(ROOT_INO)[A_MTIME]
    f = fs.create(ROOT_INO, b"f")
    a = fs.stat(f)
    r = fs.stat(ROOT_INO)
    assert r[A_MTIME] == r[A_CTIME] == a[A_MTIME] == a[A_CTIME] == a[A_ATIME] > t0
    fs.write(f, 0, b"x")
    b = fs.stat(f)
    assert b[A_MTIME] == b[A_CTIME] > a[A_MTIME] and b[A_ATIME] == a[A_ATIME]
    fs.read(f)
    assert fs.stat(f) == b  # no atime on reads
    fs.setattr(f, mode=0o600)
    c = fs.stat(f)
    assert c[A_CTIME] > b[A_CTIME] and c[A_MTIME] == b[A_MTIME]
    fs("link", f, ROOT_INO, b"g")
    d = fs.stat(f)
    assert d[A_CTIME] > c[A_CTIME] and d[A_MTIME] == c[A_MTIME]
    fs("rename", ROOT_INO, b"g", ROOT_INO, b"h", 0, False)
    e = fs.stat(f)
    assert e[A_CTIME] > d[A_CTIME] and fs.stat(ROOT_INO)[A_MTIME] == e[A_CTIME]
    # explicit times with nanoseconds, UTIME_NOW and UTIME_OMIT (None)
    fs.setattr(f, times=(123456789, None))
    g = fs.stat(f)
    assert g[A_ATIME] == 123456789 and g[A_MTIME] == e[A_MTIME] and g[A_CTIME] > e[A_CTIME]
    fs.setattr(f, times=(None, UTIME_NOW))
    h = fs.stat(f)
    assert h[A_MTIME] == h[A_CTIME] > g[A_CTIME] and h[A_ATIME] == 123456789
    # truncate changes mtime and ctime
    fs.truncate(f, 0)
    i = fs.stat(f)
    assert i[A_MTIME] == i[A_CTIME] > h[A_CTIME]


def test_agreed_time_is_monotonic_and_checked():
    s = BFSService(OPEN, inode_buckets=4, dir_buckets=4, data_buckets=4, xattr_buckets=4)
    op = encode_op("mkdir", ROOT_INO, b"d", 0o755, ROOT)
    s.execute(op, 4, (5_000_000_000).to_bytes(8, "big"), False)
    # a proposal behind the last agreed time: the service still moves forward
    s.execute(encode_op("mkdir", ROOT_INO, b"e", 0o755, ROOT), 4, (1_000).to_bytes(8, "big"), False)
    d = decode_result(s.execute(encode_op("lookup", ROOT_INO, b"d", ROOT), 4, b"", True))
    e = decode_result(s.execute(encode_op("lookup", ROOT_INO, b"e", ROOT), 4, b"", True))
    assert e[A_CTIME] == d[A_CTIME] + 1
    assert int.from_bytes(s.propose_nondet(1.0), "big") == d[A_CTIME] + 2  # never behind the last time
    assert len(s.propose_nondet(7000.0)) == 8
    assert s.check_nondet((7_000_000_000).to_bytes(8, "big"), 7000.0)
    assert s.check_nondet((7_900_000_000).to_bytes(8, "big"), 7000.0)
    assert not s.check_nondet((9_000_000_000).to_bytes(8, "big"), 7000.0)
    assert not s.check_nondet(b"", 7000.0) and not s.check_nondet(b"123", 7000.0)


def test_permissions_in_the_replicas():
    fs = FS()
    fs.setattr(ROOT_INO, mode=0o755)
    home = fs.mkdir(ROOT_INO, b"home", 0o755)
    fs.setattr(home, uid=1000, gid=1000)
    priv = fs.mkdir(home, b"priv", 0o700, cr=ALICE)
    f = fs.create(priv, b"f", 0o644, cr=ALICE)
    fs.write(f, 0, b"secret", cr=ALICE)
    # no search permission on a path component: bob cannot even look inside
    assert fs.err("lookup", priv, b"f", cr=BOB) == E.EACCES
    # no write permission on the parent
    assert fs.err("create", home, b"x", 0o644, True, cr=BOB) == E.EACCES
    assert fs.err("unlink", priv, b"f", False, cr=BOB) == E.EACCES
    assert fs.err("mkdir", ROOT_INO, b"x", 0o755, cr=BOB) == E.EACCES
    # search permission on every ancestor, not only the parent
    inner = fs.mkdir(priv, b"inner", 0o777, cr=ALICE)
    assert fs.err("lookup", inner, b"x", cr=BOB) == E.EACCES
    # reading and writing need permission (or ownership)
    pub = fs.create(home, b"pub", 0o640, cr=ALICE)
    assert fs.err("read", pub, 0, 10, cr=BOB) == E.EACCES
    assert fs.err("write", pub, 0, b"x", cr=BOB) == E.EACCES
    fs.setattr(pub, mode=0o444, cr=ALICE)
    fs.write(pub, 0, b"mine", cr=ALICE)  # the owner could chmod anyway: allowed, as NFS servers do
    assert fs.read(pub, cr=CAROL) == b"mine"
    # chmod: owner or root
    assert fs.err("setattr", pub, 0o777, None, None, None, (None, None), cr=BOB) == E.EPERM
    # chown: root only; chgrp: the owner, to a group it is in
    assert fs.err("setattr", pub, None, 1001, None, None, (None, None), cr=ALICE) == E.EPERM
    assert fs.err("setattr", pub, None, None, 2000, None, (None, None), cr=ALICE) == E.EPERM
    fs.setattr(pub, uid=1001)
    fs.setattr(pub, gid=2000, cr=BOB)
    assert fs.stat(pub)[A_UID] == 1001 and fs.stat(pub)[A_GID] == 2000
    # explicit times: owner or root; "now": also anyone who may write
    assert fs.err("setattr", pub, None, None, None, None, (5, 5), cr=CAROL) == E.EPERM
    assert fs.err("setattr", pub, None, None, None, None, (UTIME_NOW, UTIME_NOW), cr=CAROL) == E.EACCES
    fs.setattr(pub, mode=0o666, cr=BOB)
    fs.setattr(pub, times=(UTIME_NOW, UTIME_NOW), cr=CAROL)
    # group permissions through supplementary groups
    g = fs.create(home, b"g", 0o060, cr=ALICE)
    fs.setattr(g, gid=2000)
    fs.write(g, 0, b"group", cr=BOB)
    assert fs.err("read", g, 0, 10, cr=CAROL) == E.EACCES


def test_sticky_directory():
    fs = FS()
    tmp = fs.mkdir(ROOT_INO, b"tmp", 0o1777)
    fs.create(tmp, b"a", cr=ALICE)
    fs.create(tmp, b"b", cr=BOB)
    assert fs.err("unlink", tmp, b"a", False, cr=BOB) == E.EPERM
    assert fs.err("rename", tmp, b"a", tmp, b"c", 0, False, cr=BOB) == E.EPERM
    assert fs.err("rename", tmp, b"b", tmp, b"a", 0, False, cr=BOB) == E.EPERM  # may not replace alice's
    fs("rename", tmp, b"b", tmp, b"c", 0, False, cr=BOB)
    fs("unlink", tmp, b"a", False, cr=ALICE)
    fs("unlink", tmp, b"c", False)  # root may


def test_suid_sgid_clearing_and_setgid_directories():
    fs = FS()
    fs.setattr(ROOT_INO, mode=0o777)
    f = fs.create(ROOT_INO, b"f", 0o755, cr=ALICE)
    fs.setattr(f, mode=0o6755, cr=ALICE)
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o6755
    fs.write(f, 0, b"x", cr=ALICE)
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o755  # write by non-root clears both (group-exec set)
    fs.setattr(f, mode=0o6755, cr=ALICE)
    fs.truncate(f, 0, cr=ALICE)
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o755
    fs.setattr(f, mode=0o6755, cr=ALICE)
    fs.setattr(f, gid=1000, cr=ALICE)  # chown/chgrp by non-root
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o755
    fs.setattr(f, mode=0o6755)
    fs.write(f, 0, b"y")  # root keeps them
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o6755
    # chmod g+s by someone not in the file's group: the bit is dropped
    fs.setattr(f, gid=3000)
    fs.setattr(f, mode=0o2755, cr=ALICE)
    assert fs.stat(f)[A_MODE] & 0o7777 == 0o755
    # setgid directory: new entries get its group, subdirectories inherit the bit
    d = fs.mkdir(ROOT_INO, b"shared", 0o2777)
    fs.setattr(d, gid=2000)
    x = fs("create", d, b"x", 0o644, True, cr=ALICE)
    assert x[A_GID] == 2000
    y = fs("mkdir", d, b"y", 0o755, cr=ALICE)
    assert y[A_GID] == 2000 and y[A_MODE] & S.S_ISGID


def test_xattrs():
    fs = FS()
    f = fs.create(ROOT_INO, b"f")
    fs("setxattr", f, b"user.a", b"1", 0)
    fs("setxattr", f, b"user.b", b"2", 0)
    assert fs("getxattr", f, b"user.a", ro=True) == b"1"
    assert fs("listxattr", f, ro=True) == (b"user.a", b"user.b")
    assert fs.err("setxattr", f, b"user.a", b"x", 1) == E.EEXIST
    assert fs.err("setxattr", f, b"user.c", b"x", 2) == E.ENODATA
    assert fs.err("setxattr", f, b"trusted.a", b"x", 0) == E.EOPNOTSUPP
    assert fs.err("getxattr", f, b"user.zz") == E.ENODATA
    fs("removexattr", f, b"user.a")
    assert fs("listxattr", f, ro=True) == (b"user.b",)
    assert fs.err("removexattr", f, b"user.a") == E.ENODATA
    fs.setattr(f, mode=0o600)
    assert fs.err("getxattr", f, b"user.b", cr=ALICE) == E.EACCES
    assert fs.err("setxattr", f, b"user.b", b"x", 0, cr=ALICE) == E.EACCES


def test_limits():
    cfg = BFSConfig(default=ClientPolicy(root=True), inodes_max=6, bytes_max=4 * CHUNK, file_size_max=10 * CHUNK,
                    dir_entries_max=3)
    fs = FS(cfg)
    assert fs.err("create", ROOT_INO, b"x" * 256, 0o644, True) == E.ENAMETOOLONG
    fs.create(ROOT_INO, b"x" * 255)
    d = fs.mkdir(ROOT_INO, b"d")
    fs.create(ROOT_INO, b"c")
    assert fs.err("create", ROOT_INO, b"e", 0o644, True) == E.ENOSPC  # 3 entries per directory
    fs.create(d, b"1")
    f = fs.create(d, b"2")
    assert fs.err("create", d, b"3", 0o644, True) == E.ENOSPC  # 6 inodes, the root included
    assert fs("statfs", ro=True)[4] == 0
    for i in range(4):
        fs.write(f, i * CHUNK, b"z")
    assert fs.err("write", f, 4 * CHUNK, b"z") == E.ENOSPC
    assert fs.stat(f)[A_SIZE] == 3 * CHUNK + 1  # the refused write changed nothing
    assert fs.err("write", f, 10 * CHUNK, b"z") == E.EFBIG
    assert fs.err("symlink", d, b"s", b"x" * 4096) == E.ENAMETOOLONG


def _op_cost(fs, op, *args):
    """(objects modified, values written or deleted, largest value written in bytes) of one call."""
    modified, writes = set(), []
    svc = fs.s
    tset, tdel = svc._tset, svc._tdel
    svc._tset = lambda d, key, value: (writes.append(len(msgpack.packb(value, use_bin_type=True))),
                                       tset(d, key, value))[1]
    svc._tdel = lambda d, key: (writes.append(0), tdel(d, key))[1]
    svc.space.bind(modified.add)
    try:
        fs(op, *args)
    finally:
        svc._tset, svc._tdel = tset, tdel
        svc.space.bind(lambda i: None)
    return len(modified), len(writes), max(writes, default=0)


def test_a_large_directory_works_and_costs_no_more_per_operation_than_a_small_one():
    cfg = BFSConfig(default=ClientPolicy(root=True), dir_entries_max=5001)
    fs = FS(cfg)
    big, small = fs.mkdir(ROOT_INO, b"big"), fs.mkdir(ROOT_INO, b"small")
    names = [b"entry-%05d" % i for i in range(5000)]
    inos = {n: fs.create(big, n) for n in names}
    for i in range(10):
        fs.create(small, b"other-%05d" % i)
    assert fs.stat(big)[A_NLINK] == 2 and len(set(inos.values())) == 5000
    assert sorted(fs.names(big)) == names
    assert all(fs.lookup(big, n)[A_INO] == inos[n] for n in names[::97])
    # the same operation costs the same number of objects and writes in both, and no written
    # value holds the directory: the work is independent of its size
    for op, bargs, sargs in [("create", (big, b"zz-new-00001", 0o644, True), (small, b"zz-new-00001", 0o644, True)),
                             ("rename", (big, b"zz-new-00001", big, b"zz-new-00002", 0, False),
                              (small, b"zz-new-00001", small, b"zz-new-00002", 0, False)),
                             ("unlink", (big, b"zz-new-00002", False), (small, b"zz-new-00002", False))]:
        cb, cs = _op_cost(fs, op, *bargs), _op_cost(fs, op, *sargs)
        assert cb[:2] == cs[:2] and cb[1] <= 8, (op, cb, cs)
        assert cb[2] <= 200, (op, cb)  # (the old layout rewrote all 5,000 entries: > 100 KB)
    fs.create(big, b"one-too-many")  # 5,001 allowed
    assert fs.err("create", big, b"two-too-many", 0o644, True) == E.ENOSPC
    fs("unlink", big, b"one-too-many", False)
    # renames out, in and over; an exchange keeps both entries' cookies
    fs("rename", big, names[0], small, b"moved", 0, False)
    fs("rename", small, b"other-00000", big, names[1], 0, False)  # replaces names[1]
    fs("rename", big, names[2], small, b"other-00001", RENAME_EXCHANGE, False)
    assert fs.lookup(small, b"moved")[A_INO] == inos[names[0]]
    assert fs.lookup(big, names[2])[A_INO] != inos[names[2]] == fs.lookup(small, b"other-00001")[A_INO]
    assert fs.err("lookup", big, names[0]) == E.ENOENT
    # unlink most, from the front: readdir skips the emptied pages and lists the rest once
    for n in names[3:4900]:
        fs("unlink", big, n, False)
    want = sorted([names[1], names[2]] + names[4900:])
    assert sorted(fs.names(big)) == want
    # a transferred copy is identical and continues identically
    c = FS(cfg)
    c.s.put_objs({j: fs.s.get_obj(j) for j in range(fs.s.n_objects)})
    assert c.s.digest() == fs.s.digest() and sorted(c.names(big)) == want
    c.t = fs.t  # (every call moves the clock)
    for x in (fs, c):
        x("unlink", big, names[4999], False)
        x.create(big, b"late")
    assert c.s.digest() == fs.s.digest()
    for n in want[:-1]:
        fs("unlink", big, n, False)
    fs("unlink", big, b"late", False)
    assert fs.names(big) == [] and fs.stat(big)[A_NLINK] == 2
    fs("rmdir", ROOT_INO, b"big")


def test_readdir_goes_on_across_many_emptied_pages(monkeypatch):
    import pbft.services.bfs.service as svc
    fs = FS()
    names = [b"n%04d" % i for i in range(svc.DIR_PAGE * 6)]
    for n in names:
        fs.create(ROOT_INO, n)
    for n in names[:svc.DIR_PAGE * 5]:
        fs("unlink", ROOT_INO, n, False)
    monkeypatch.setattr(svc, "READDIR_PROBES", 2)
    ents, eof, resume = fs("readdir", ROOT_INO, 0, 100, ro=True)
    assert ents == () and not eof and resume == 2 * svc.DIR_PAGE - 1  # looked at two pages
    assert fs.names(ROOT_INO) == names[svc.DIR_PAGE * 5:]  # (in cookie order)
    fs.create(ROOT_INO, b"new")
    assert fs.names(ROOT_INO)[-1] == b"new"


def test_put_objs_refuses_bad_directory_objects():
    fs = FS()
    d = fs.mkdir(ROOT_INO, b"d")
    fs.create(d, b"f")
    before = fs.s.digest()
    key = d.to_bytes(8, "big")
    for part, bad in [(fs.s.dirs, (1, 2)), (fs.s.dirs, (0, 0, 0)), (fs.s.dirents, (0, 1)),
                      (fs.s.dirents, (3, b"x")), (fs.s.dpages, ()), (fs.s.dpages, ((2, b"b"), (1, b"a"))),
                      (fs.s.dpages, ((1, b"a"), (70, b"b"))), (fs.s.dpages, ((1, b""),))]:
        i = part.base + part.bucket_of(key)
        with pytest.raises(ValueError):
            fs.s.put_objs({i: msgpack.packb([[key, bad]], use_bin_type=True)})
    assert fs.s.digest() == before


def test_per_client_quota_and_policy():
    cfg = BFSConfig(clients={5: ClientPolicy(uids=frozenset({1000}), gids=frozenset({1000}), inodes_max=2,
                                             bytes_max=2 * CHUNK),
                             6: ClientPolicy(root=True)},
                    default=ClientPolicy(), root_mode=0o777)
    fs = FS(cfg)
    # client 5 may claim uid 1000 only; another uid is refused; root is squashed
    assert fs.err("mkdir", ROOT_INO, b"x", 0o755, cr=BOB, client=5) == E.EPERM
    a = fs("mkdir", ROOT_INO, b"sq", 0o755, client=5)
    assert (a[A_UID], a[A_GID]) == (65534, 65534)
    # client 6 may be root
    assert fs("mkdir", ROOT_INO, b"r", 0o755, client=6)[A_UID] == 0
    # groups a client may not claim are dropped
    g = fs("create", ROOT_INO, b"g", 0o640, True, client=6)[A_INO]
    fs("setattr", g, None, None, 2000, None, (None, None), client=6)
    assert fs.err("read", g, 0, 1, cr=creds(1000, 1000, (2000,)), client=5) == E.EACCES
    # quota: inodes and bytes of client 5
    f = fs("create", ROOT_INO, b"f", 0o644, True, cr=ALICE, client=5)[A_INO]
    assert fs.err("create", ROOT_INO, b"f2", 0o644, True, cr=ALICE, client=5) == E.EDQUOT
    fs("write", f, 0, b"a", cr=ALICE, client=5)
    fs("write", f, CHUNK, b"b", cr=ALICE, client=5)
    assert fs.err("write", f, 2 * CHUNK, b"c", cr=ALICE, client=5) == E.EDQUOT
    fs("unlink", ROOT_INO, b"f", False, cr=ALICE, client=5)
    fs("create", ROOT_INO, b"f3", 0o644, True, cr=ALICE, client=5)  # freed again
    assert fs.err("getattr", 1, cr=(1, 2)) == E.EINVAL


def test_remembered_credentials_follow_the_policy():
    """The service remembers each (client, claim)'s checked credentials: a claim repeated gets the
    same answer as the first time, a new configuration decides again, and malformed claims are
    refused every time."""
    strict = BFSConfig(clients={5: ClientPolicy(uids=frozenset({1000}), gids=frozenset({1000}))},
                       default=ClientPolicy(), root_mode=0o777)
    fs = FS(strict)
    for _ in range(3):  # (the second and third answers come from what it remembered)
        assert fs.err("mkdir", ROOT_INO, b"x", 0o755, cr=BOB, client=5) == E.EPERM
        assert fs("getattr", ROOT_INO, cr=creds(1000, 1000, (2000, 1000)), client=5, ro=True)[A_INO] == ROOT_INO
    assert fs.s._creds(creds(1000, 1000, (2000, 1000)), 5) == (1000, 1000, (1000,))  # 2000 dropped
    assert fs.s._creds(creds(1001, 1000), 5) == E.EPERM  # a uid client 5 may not claim
    assert fs.s._creds(ROOT, 6) == (65534, 65534, ())  # squashed
    fs.s.cfg = OPEN  # a new policy: what was remembered no longer counts
    assert fs.s._creds(BOB, 5) == BOB
    assert fs.s._creds(ROOT, 6) == ROOT
    a = fs("mkdir", ROOT_INO, b"x", 0o755, cr=BOB, client=5)
    assert (a[A_UID], a[A_GID]) == (1001, 1001)
    for bad in ((1, 2), (-1, 0, ()), (0, 2 ** 32, ()), (0, 0, (True,)), (0, 0, ((1,),)), (True, 0, ()),
                (0, 0, [1]), [0, 0, ()], (0, 0, (-5,)), None, b"x"):
        for _ in range(2):
            assert fs.s._creds(bad, 5) == E.EINVAL, bad
    fs.s._cred_memo.clear()
    for c in range(CRED_MEMO_MAX + 10):  # bounded: many claims do not grow it without end
        fs.s._creds(creds(1000 + c % 7, 1000, (c,)), 4)
    assert len(fs.s._cred_memo) <= CRED_MEMO_MAX


def test_bfs_section_parsing():
    import tomllib
    doc = tomllib.loads("""
[bfs]
inodes_max = 100
root_mode = 0o1777
[bfs.client.default]
uids = [1000, 1001]
root = false
[bfs.client.5]
uids = "*"
root = true
bytes_max = 1048576
[bfs.client.8-9]
root = true
""")
    cfg = parse_bfs_section(doc["bfs"])
    assert cfg.inodes_max == 100 and cfg.root_mode == 0o1777
    assert cfg.policy(5).root and cfg.policy(5).bytes_max == 1 << 20 and cfg.policy(5).uids is None
    assert cfg.policy(7).uids == frozenset({1000, 1001}) and not cfg.policy(7).root
    assert cfg.policy(8).root and cfg.policy(9).root and not cfg.policy(10).root
    for bad in ({"inodes_max": 0}, {"nope": 1}, {"client": {"x": {}}}, {"client": {"5": {"root": 1}}},
                {"client": {"5": {"uids": "some"}}}, {"root_mode": 0o17777},
                {"client": {"9-5": {}}}):
        with pytest.raises(ConfigError):
            parse_bfs_section(bad)
    from pbft.services.bfs.config import DEFAULT_SECTION
    assert parse_bfs_section(tomllib.loads(DEFAULT_SECTION)["bfs"]).root_mode == 0o1777


def test_open_after_unlink_keeps_the_inode_until_released():
    fs = FS()
    f = fs.create(ROOT_INO, b"f")
    fs.write(f, 0, b"still here")
    kept, when = fs("unlink", ROOT_INO, b"f", True)
    assert kept == f  # kept: this client has it open
    assert when == fs.stat(ROOT_INO)[A_MTIME] == fs.stat(ROOT_INO)[A_CTIME]  # the directory's new times
    assert fs.read(f) == b"still here"
    assert fs.stat(f)[A_NLINK] == 0
    fs.write(f, 0, b"STILL")
    assert fs.err("link", f, ROOT_INO, b"back") == E.ENOENT
    fs("release", f, client=5)  # another client's release does nothing
    assert fs.read(f) == b"STILL here"
    fs("release", f)
    assert fs.err("getattr", f) == E.ESTALE
    used = fs("statfs", ro=True)
    # a rename that replaces a kept file, then release_all (a mount starting again)
    g = fs.create(ROOT_INO, b"g")
    h = fs.create(ROOT_INO, b"h")
    assert fs("rename", ROOT_INO, b"g", ROOT_INO, b"h", 0, True) == h
    assert fs.stat(h)[A_NLINK] == 0
    fs("release_all")
    assert fs.err("getattr", h) == E.ESTALE
    assert fs.stat(g)[A_NLINK] == 1
    assert fs("statfs", ro=True)[4] == used[4] - 1
    # without keep the inode goes at once
    fs("unlink", ROOT_INO, b"h", False)
    assert fs.err("getattr", g) == E.ESTALE


def test_unlink_and_rename_hold_only_an_inode_the_caller_names_as_open():
    """``keep`` as the inodes the caller has open: the removed inode is held only if it is one of
    them (so a mount with other files open needs no ``release`` after); anything else is EINVAL."""
    fs = FS()
    f, g, h = (fs.create(ROOT_INO, n) for n in (b"f", b"g", b"h"))
    assert fs("unlink", ROOT_INO, b"f", (g, h)) == (0, fs.stat(ROOT_INO)[A_MTIME])  # not open: freed at once
    assert fs.err("getattr", f) == E.ESTALE
    kept, _when = fs("unlink", ROOT_INO, b"g", (h, g))
    assert kept == g and fs.stat(g)[A_NLINK] == 0  # open: held for this client
    fs("release", g)
    assert fs.err("getattr", g) == E.ESTALE
    k = fs.create(ROOT_INO, b"k")
    assert fs("rename", ROOT_INO, b"k", ROOT_INO, b"h", 0, (k,)) == 0  # h replaced, not named: freed
    assert fs.err("getattr", h) == E.ESTALE
    m = fs.create(ROOT_INO, b"m")
    assert fs("rename", ROOT_INO, b"m", ROOT_INO, b"h", 0, (k,)) == k  # k replaced, named: held
    fs("release_all")
    assert fs.err("getattr", k) == E.ESTALE and fs.stat(m)[A_NLINK] == 1
    before = fs.s.digest()
    for bad in (5, None, b"x", (0,), (-1,), ("a",), (1.0,), ((m,),), tuple(range(1, KEEP_MAX + 2))):
        assert fs.err("unlink", ROOT_INO, b"h", bad) == E.EINVAL, bad
        assert fs.err("rename", ROOT_INO, b"h", ROOT_INO, b"n", 0, bad) == E.EINVAL, bad
    assert fs.s.digest() == before and fs.stat(m)[A_NLINK] == 1
    assert fs("unlink", ROOT_INO, b"h", tuple(range(1, KEEP_MAX + 1))) == (m, fs.stat(ROOT_INO)[A_MTIME])
    # what a mount asks first (replicas that know only True and False say ESTALE: no such directory)
    assert fs.err("unlink", 1 << 63, b"x", (0,)) == E.EINVAL


def test_lazy_reclaim_is_bounded_and_truncated_data_never_reappears():
    fs = FS()
    f = fs.create(ROOT_INO, b"big")
    block = bytes([7]) * (3 * CHUNK)
    n_chunks = 600
    for i in range(0, n_chunks, 3):
        fs.write(f, i * CHUNK, block)
    sb = fs.s.sb.value
    assert sb[3] == n_chunks
    # truncate down: the dropped chunks are freed a bounded number per operation
    fs.truncate(f, 10)
    assert fs.s.sb.value[3] >= n_chunks - RECLAIM_FREES - 1
    # extend again at once: the stale chunks must read as zeros, not as the old data
    fs.truncate(f, 300 * CHUNK)
    fs.write(f, 200 * CHUNK + 5, b"new")
    assert fs.read(f, 100 * CHUNK, 100) == bytes(100)
    assert fs.read(f, 200 * CHUNK, 8) == b"\0" * 5 + b"new"
    assert fs.read(f, 0, 12) == bytes([7]) * 10 + b"\0\0"
    prev = fs.s.sb.value[3]
    steps = 0
    while fs.s.sb.value[4] < fs.s.sb.value[5]:  # the reclaim queue is not empty
        fs("fsync", f)
        now = fs.s.sb.value[3]
        assert prev - now <= RECLAIM_FREES
        prev = now
        steps += 1
        assert steps < 100
    assert fs.s.sb.value[3] == 2  # chunk 0 and the one rewritten at 200
    assert fs.read(f, 200 * CHUNK, 8) == b"\0" * 5 + b"new"
    assert fs.stat(f)[A_BLOCKS] == 2 * CHUNK // 512
    # unlink of a big file: likewise lazy, and everything is reclaimed in the end
    g = fs.create(ROOT_INO, b"g")
    for i in range(0, 300, 3):
        fs.write(g, i * CHUNK, block)
    fs("unlink", ROOT_INO, b"g", False)
    while fs.s.sb.value[4] < fs.s.sb.value[5]:  # the reclaim queue is not empty
        fs("fsync", f)
    assert fs.s.sb.value[3] == 2 and fs.s.usage.value == ((4, 1, 2),)  # client 4: one inode (big), two chunks


def test_read_only_flag_on_a_mutation_is_refused_and_read_only_changes_nothing():
    fs = FS()
    f = fs.create(ROOT_INO, b"f")
    before = fs.s.digest()
    for op, args in [("write", (f, 0, b"x")), ("mkdir", (ROOT_INO, b"d", 0o755)), ("unlink", (ROOT_INO, b"f", False)),
                     ("fsync", (f,)), ("release_all", ())]:
        r = msgpack.unpackb(fs.raw(op, *args, ro=True))
        assert r == [E.EROFS]
    for op, args in [("getattr", (f,)), ("lookup", (ROOT_INO, b"f")), ("readdir", (ROOT_INO, 0, 10)),
                     ("statfs", ()), ("read", (f, 0, 10)), ("listxattr", (f,))]:
        fs(op, *args, ro=True)
    assert fs.s.digest() == before


HOSTILE = [
    b"", b"\xc1", b"\x00garbage", msgpack.packb(None), msgpack.packb([]), msgpack.packb({"a": 1}),
    msgpack.packb(["nope", ROOT]), msgpack.packb(["getattr"]), msgpack.packb(["getattr", 1, (0, 0)]),
    msgpack.packb(["getattr", 1, (0, 0, (1, "x"))]), msgpack.packb(["getattr", "1", ROOT]),
    msgpack.packb(["getattr", -1, ROOT]), msgpack.packb(["getattr", True, ROOT]),
    msgpack.packb(["getattr", 2 ** 64 - 1, ROOT]), msgpack.packb(["read", 1, 0, 2 ** 64 - 1, ROOT]),
    msgpack.packb(["write", 2, -5, b"x", ROOT]), msgpack.packb(["write", 2, 2 ** 64 - 1, b"x", ROOT]),
    msgpack.packb(["write", 2, 0, "text", ROOT]), msgpack.packb(["readdir", 1, -1, 10, ROOT]),
    msgpack.packb(["create", 1, "str", 0o644, True, ROOT]),
    msgpack.packb(["create", 1, b"\0", 0o644, True, ROOT]), msgpack.packb(["create", 1, b"x", 0o644, 1, ROOT]),
    msgpack.packb(["create", 1, b"x", -1, True, ROOT]), msgpack.packb(["mkdir", 1, b".", 0o755, ROOT]),
    msgpack.packb(["mkdir", 1, b"..", 0o755, ROOT]), msgpack.packb(["rename", 1, b"..", 1, b"x", 0, False, ROOT]),
    msgpack.packb(["rename", 1, b"f", 1, b"x", 99, False, ROOT]),
    msgpack.packb(["setattr", 2, 1.5, None, None, None, (None, None), ROOT]),
    msgpack.packb(["setattr", 2, None, None, None, None, (None,), ROOT]),
    msgpack.packb(["setattr", 2, None, None, None, None, (b"x", None), ROOT]),
    msgpack.packb(["setattr", 2, None, None, None, 2 ** 64 - 1, (None, None), ROOT]),
    msgpack.packb(["setxattr", 2, b"user.x", b"v" * 40000, 0, ROOT]),
    msgpack.packb(["setxattr", 2, b"user.x", b"v", 7, ROOT]), msgpack.packb(["link", 2, 2, b"x", ROOT]),
    msgpack.packb(["symlink", 1, b"s", b"", ROOT]), msgpack.packb(["mknod", 1, b"m", 0o170000, 0, ROOT]),
    msgpack.packb(["release", 0, ROOT]), msgpack.packb(["lookup", 1, b"x", (0, 0, tuple(range(100)))]),
    msgpack.packb(["write", 2, 0, b"x" * (1 << 20), ROOT]),
]


def test_hostile_inputs_give_errors_and_never_diverge():
    a, b = FS(), FS()
    for fs in (a, b):
        fs.create(ROOT_INO, b"f")
    for op in HOSTILE:
        ra = a.s.execute(op, 4, a.t.to_bytes(8, "big"), False)
        rb = b.s.execute(op, 4, b.t.to_bytes(8, "big"), False)
        assert ra == rb
        r = msgpack.unpackb(ra)
        assert isinstance(r, list) and r[0] != 0, (op, r)
    assert a.s.drops.get("exception", 0) == 0  # refused by the checks, not by luck
    # huge counts are capped, not honoured
    ents, eof, _ = a("readdir", ROOT_INO, 0, 2 ** 63, ro=True)
    assert len(ents) == 1 and eof
    assert a("read", 2, 0, 2 ** 64 - 1, ro=True) == b""
    assert a.s.digest() == b.s.digest()
    a.write(2, 0, b"fine")  # and the service still works
    assert a.read(2) == b"fine"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_are_refused(data, ro):
    fs = _HOSTILE_FS
    r = msgpack.unpackb(fs.s.execute(data, 4, b"", ro))
    assert isinstance(r, list)


_HOSTILE_FS = FS()


def _random_ops(rng: random.Random, n: int):
    names = [b"a", b"b", b"c", b"d"]
    inos = [1, 2, 3, 4, 5, 6, 7, 8]
    ops = []
    for _ in range(n):
        k = rng.randrange(10)
        p, q = rng.choice(inos), rng.choice(inos)
        x, y = rng.choice(names), rng.choice(names)
        if k == 0:
            ops.append(("create", p, x, 0o644, rng.random() < 0.5))
        elif k == 1:
            ops.append(("mkdir", p, x, 0o755))
        elif k == 2:
            ops.append(("write", p, rng.randrange(4 * CHUNK), bytes([rng.randrange(256)]) * rng.randrange(1, 3000)))
        elif k == 3:
            ops.append(("setattr", p, None, None, None, rng.randrange(5 * CHUNK), (None, None)))
        elif k == 4:
            ops.append(("unlink", p, x, rng.random() < 0.3))
        elif k == 5:
            ops.append(("rename", p, x, q, y, rng.randrange(3), False))
        elif k == 6:
            ops.append(("link", p, q, y))
        elif k == 7:
            ops.append(("rmdir", p, x))
        elif k == 8:
            ops.append(("setxattr", p, b"user." + x, y * 10, 0))
        else:
            ops.append(("release_all",))
    return ops


def test_two_instances_reach_the_same_digest_and_a_transferred_copy_continues_identically():
    rng = random.Random(7)
    ops = _random_ops(rng, 600)
    a, b = FS(), FS()
    results_a, results_b = [], []
    for i, op in enumerate(ops):
        results_a.append(a.raw(*op))
        results_b.append(b.raw(*op))
        if i == 300:
            # a state transfer: every object of a into a fresh instance
            c = FS()
            c.s.put_objs({j: a.s.get_obj(j) for j in range(a.s.n_objects)})
            c.t = a.t
            assert c.s.digest() == a.s.digest()
    assert results_a == results_b
    assert a.s.digest() == b.s.digest()
    assert sum(1 for r in results_a if msgpack.unpackb(r)[0] == 0) > 100  # most did something
    for op in ops[301:]:
        c.raw(*op)
    assert c.s.digest() == a.s.digest()


def test_put_objs_refuses_invalid_objects_and_keeps_the_state():
    fs = FS()
    fs.create(ROOT_INO, b"f")
    before = fs.s.digest()
    base = 3  # first inode bucket
    for bad in (b"\xc1", msgpack.packb([[b"\0" * 8, [1, 2]]]), msgpack.packb(5)):
        with pytest.raises(ValueError):
            fs.s.put_objs({base: bad})
    with pytest.raises(ValueError):
        fs.s.put_objs({0: msgpack.packb([1, 2])})
    assert fs.s.digest() == before


# ---- a stateful comparison against the local file system -------------------------------------

_LIBC = []


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


PATHS = ["a", "b", "c", "a/a", "a/b", "b/a", "b/b", "a/a/a", "a/b/c"]


class AgainstLocalFS(RuleBasedStateMachine):
    """The same POSIX calls on the service (as root) and on a temporary directory."""

    @initialize()
    def setup(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = self.tmp.name
        self.fs = FS()
        self.umask = os.umask(0)
        os.umask(self.umask)

    def teardown(self):
        self.tmp.cleanup()

    # path resolution in the service; None when the local path crosses a symlink
    def _real(self, p):
        return os.path.join(self.root, p)

    def _crosses_symlink(self, p) -> bool:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if os.path.islink(self._real("/".join(parts[:i]))):
                return True
        return False

    def _parent(self, p):
        parts = p.split("/")
        ino = ROOT_INO
        for comp in parts[:-1]:
            a = self.fs.lookup(ino, comp.encode())
            if not S.S_ISDIR(a[A_MODE]):  # as the kernel's path walk
                raise BFSError(E.ENOTDIR, "not a directory")
            ino = a[A_INO]
        return ino, parts[-1].encode()

    def _local(self, fn):
        return fn()

    def _both(self, local, remote, override=None):
        """Run both; they must succeed together or fail with the same errno.  ``override``: a
        path whose owner the service lets read or write without the permission bits (the
        owner could chmod anyway), where the kernel refuses: then the local call is redone
        as root."""
        try:
            lv = self._local(local)
            lerr = None
        except OSError as e:
            lv, lerr = None, e.errno
        try:
            rv = remote()
            rerr = None
        except BFSError as e:
            rv, rerr = None, e.errno
        if (override is not None and lerr == E.EACCES and rerr is None
                and os.lstat(self._real(override)).st_uid == self.fs.default_cr[0]):
            lv, lerr = local(), None
        assert lerr == rerr, (lerr, rerr)
        return lv, rv, lerr

    def _ino(self, p):
        par, name = self._parent(p)
        return self.fs.lookup(par, name)[A_INO]

    @rule(p=st.sampled_from(PATHS), mode=st.sampled_from([0o644, 0o600, 0o755]))
    def create(self, p, mode):
        if self._crosses_symlink(p):
            return
        def local():
            os.close(os.open(self._real(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        def remote():
            par, name = self._parent(p)
            self.fs("create", par, name, mode & ~self.umask, True)
        self._both(local, remote)

    @rule(p=st.sampled_from(PATHS))
    def mkdir(self, p):
        if self._crosses_symlink(p):
            return
        def remote():
            par, name = self._parent(p)
            self.fs("mkdir", par, name, 0o755 & ~self.umask)
        self._both(lambda: os.mkdir(self._real(p), 0o755), remote)

    @rule(p=st.sampled_from(PATHS), off=st.integers(0, 3 * CHUNK), data=st.binary(min_size=1, max_size=2000))
    def write(self, p, off, data):
        if self._crosses_symlink(p) or os.path.islink(self._real(p)):
            return
        def local():
            fd = os.open(self._real(p), os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self._both(local, lambda: self.fs.write(self._ino(p), off, data), override=p)

    @rule(p=st.sampled_from(PATHS), off=st.integers(0, 3 * CHUNK), n=st.integers(0, 5000))
    def read(self, p, off, n):
        if self._crosses_symlink(p) or os.path.islink(self._real(p)) or os.path.isdir(self._real(p)):
            return
        def local():
            fd = os.open(self._real(p), os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        lv, rv, err = self._both(local, lambda: self.fs.read(self._ino(p), off, n), override=p)
        assert lv == rv

    @rule(p=st.sampled_from(PATHS), size=st.integers(0, 4 * CHUNK))
    def truncate(self, p, size):
        if self._crosses_symlink(p) or os.path.islink(self._real(p)) or os.path.isdir(self._real(p)):
            return
        self._both(lambda: os.truncate(self._real(p), size), lambda: self.fs.truncate(self._ino(p), size),
                   override=p)

    @rule(p=st.sampled_from(PATHS))
    def unlink(self, p):
        if self._crosses_symlink(p):
            return
        def remote():
            par, name = self._parent(p)
            self.fs("unlink", par, name, False)
        self._both(lambda: os.unlink(self._real(p)), remote)

    @rule(p=st.sampled_from(PATHS))
    def rmdir(self, p):
        if self._crosses_symlink(p):
            return
        def remote():
            par, name = self._parent(p)
            self.fs("rmdir", par, name)
        self._both(lambda: os.rmdir(self._real(p)), remote)

    @rule(p=st.sampled_from(PATHS), q=st.sampled_from(PATHS))
    def rename(self, p, q):
        if self._crosses_symlink(p) or self._crosses_symlink(q):
            return
        def remote():
            sp, sn = self._parent(p)
            dp, dn = self._parent(q)
            self.fs("rename", sp, sn, dp, dn, 0, False)
        self._both(lambda: os.rename(self._real(p), self._real(q)), remote)

    @rule(p=st.sampled_from(PATHS), q=st.sampled_from(PATHS), flags=st.sampled_from([RENAME_NOREPLACE,
                                                                                      RENAME_EXCHANGE]))
    def rename2(self, p, q, flags):
        if self._crosses_symlink(p) or self._crosses_symlink(q):
            return
        def local():
            if _libc().renameat2(-100, self._real(p).encode(), -100, self._real(q).encode(), flags) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        def remote():
            sp, sn = self._parent(p)
            dp, dn = self._parent(q)
            self.fs("rename", sp, sn, dp, dn, flags, False)
        self._both(local, remote)

    @rule(p=st.sampled_from(PATHS), at=st.integers(0, 2 ** 40), mt=st.integers(0, 2 ** 62))
    def utime(self, p, at, mt):
        if self._crosses_symlink(p) or os.path.islink(self._real(p)):
            return
        _, _, err = self._both(lambda: os.utime(self._real(p), ns=(at, mt)),
                               lambda: self.fs.setattr(self._ino(p), times=(at, mt)))
        if err is None:
            st_ = os.lstat(self._real(p))
            a = self.fs.stat(self._ino(p))
            assert (a[A_ATIME], a[A_MTIME]) == (st_.st_atime_ns, st_.st_mtime_ns)

    @rule(p=st.sampled_from(PATHS), q=st.sampled_from(PATHS))
    def link(self, p, q):
        if self._crosses_symlink(p) or self._crosses_symlink(q) or os.path.islink(self._real(p)):
            return
        def remote():
            ino = self._ino(p)
            dp, dn = self._parent(q)
            self.fs("link", ino, dp, dn)
        self._both(lambda: os.link(self._real(p), self._real(q), follow_symlinks=False), remote)

    @rule(p=st.sampled_from(PATHS), tgt=st.sampled_from(["x", "zz/y", "../a"]))
    def symlink(self, p, tgt):
        if self._crosses_symlink(p):
            return
        def remote():
            par, name = self._parent(p)
            self.fs("symlink", par, name, tgt.encode())
        self._both(lambda: os.symlink(tgt, self._real(p)), remote)

    @rule(p=st.sampled_from(PATHS), mode=st.sampled_from([0o700, 0o644, 0o4755, 0o2755, 0o1777, 0o000, 0o777]))
    def chmod(self, p, mode):
        if self._crosses_symlink(p) or os.path.islink(self._real(p)):
            return
        self._both(lambda: os.chmod(self._real(p), mode), lambda: self.fs.setattr(self._ino(p), mode=mode))

    @rule(p=st.sampled_from(["", "a", "b", "a/a"]))
    def readdir(self, p):
        if p and (self._crosses_symlink(p) or os.path.islink(self._real(p))):
            return
        lv, rv, err = self._both(lambda: sorted(os.listdir(self._real(p) if p else self.root)),
                                 lambda: sorted(n.decode() for n in self.fs.names(self._ino(p) if p else ROOT_INO)))
        assert lv == rv

    @invariant()
    def stats_agree(self):
        if not hasattr(self, "fs"):
            return
        saved, self.fs.default_cr = self.fs.default_cr, ROOT
        try:
            self._stats_agree()
        finally:
            self.fs.default_cr = saved

    def _stats_agree(self):
        for p in PATHS:
            if self._crosses_symlink(p):
                continue
            try:
                st_ = os.lstat(self._real(p))
            except OSError as e:
                with pytest.raises(BFSError) as ei:
                    self._ino(p)
                assert ei.value.errno == e.errno
                continue
            a = self.fs.stat(self._ino(p))
            assert a[A_MODE] == st_.st_mode, p
            assert a[A_NLINK] == st_.st_nlink, p
            assert (a[A_UID], a[A_GID]) == (st_.st_uid, st_.st_gid), p
            if not S.S_ISDIR(st_.st_mode):
                assert a[A_SIZE] == st_.st_size, p


AgainstLocalFS.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                            suppress_health_check=list(HealthCheck))
TestAgainstLocalFS = pytest.mark.slow(AgainstLocalFS.TestCase)

USERS = [ROOT, creds(1000, 1000, (1000,)), creds(1001, 1001, (1001, 1000))]


class AgainstLocalFSAsUsers(AgainstLocalFS):
    """The same comparison with calls made by root and two ordinary users (the local calls
    in a child process with those credentials): permission checks, the sticky bit, setgid
    directories, SUID/SGID clearing and protected hard links, errno for errno."""

    @initialize()
    def setup(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = self.tmp.name
        os.chmod(self.root, 0o777)
        self.fs = FS(BFSConfig(default=ClientPolicy(root=True), root_mode=0o777))
        self.umask = os.umask(0)
        os.umask(self.umask)

    @rule(u=st.sampled_from(range(len(USERS))))
    def become(self, u):
        self.fs.default_cr = USERS[u]

    def _local(self, fn):
        uid, gid, groups = self.fs.default_cr
        if uid == 0:
            return fn()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to the user, make the call, report
            res = ("crash", None)
            try:
                os.close(r)
                os.setgroups(list(groups))
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                try:
                    res = ("ok", fn())
                except OSError as e:
                    res = ("err", e.errno)
            finally:
                os.write(w, pickle.dumps(res))
                os._exit(0)
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        os.waitpid(pid, 0)
        kind, value = pickle.loads(b"".join(chunks))
        assert kind != "crash"
        if kind == "err":
            raise OSError(value, os.strerror(value))
        return value


AgainstLocalFSAsUsers.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                                   suppress_health_check=list(HealthCheck))
TestAgainstLocalFSAsUsers = pytest.mark.slow(pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")(
    AgainstLocalFSAsUsers.TestCase))


def test_init_with_service_bfs_writes_a_bfs_section_and_load_service_reads_it(tmp_path):
    import subprocess
    import sys

    from pbft.cli_net import load_service
    from pbft.runtime.cluster import load_cluster
    from pbft.services.bfs import load_bfs_config

    d = tmp_path / "fs"
    p = subprocess.run([sys.executable, "-m", "pbft.cli", "init", str(d), "--replicas", "4", "--service", "bfs",
                        "--base-port", "23000"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    c = load_cluster(d)
    assert len(c.client_ids) == 8
    cfg = load_bfs_config(d)
    assert cfg.root_mode == 0o1777 and not cfg.policy(4).root
    with open(d / "cluster.toml", "a") as fh:
        fh.write("\n[bfs.client.4-5]\nroot = true\ninodes_max = 7\n")
    s = load_service("bfs", load_cluster(d))  # the cluster as a replica loads it when it starts
    assert isinstance(s, BFSService) and s.cfg.policy(5).inodes_max == 7 and s.cfg.policy(6).inodes_max == 0
    with open(d / "cluster.toml", "a") as fh:
        fh.write("\n[bfs.client.9]\nnonsense = 1\n")
    with pytest.raises(ConfigError):
        load_service("bfs", load_cluster(d))
    p = subprocess.run([sys.executable, "-m", "pbft.cli", "up", str(d), "--service", "bfs"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "nonsense" in p.stderr and "Traceback" not in p.stderr


def test_ancestor_walks_are_bounded():
    from pbft.services.bfs.service import DEPTH_MAX
    fs = FS()
    d = ROOT_INO
    for _i in range(DEPTH_MAX + 2):  # root makes the chain (root needs no walk)
        d = fs.mkdir(d, b"d")
    # an ordinary user's search-permission walk from that deep stops with ELOOP, bounded
    assert fs.err("lookup", d, b"x", cr=ALICE) == E.ELOOP
    assert fs.err("lookup", d, b"x") == E.ENOENT  # root needs no walk


def test_replicated_in_memory_by_the_core_with_a_primary_crash():
    """BFSService under the pure replica core (tests/helpers/cluster.py): agreed time, ordered and
    read-only calls, a view change, and every replica with the same objects in the end."""
    from helpers.cluster import Cluster

    def svc():
        return BFSService(OPEN, inode_buckets=16, dir_buckets=16, data_buckets=32, xattr_buckets=4)

    c = Cluster(service=svc, checkpoint_interval_seqnos=8, log_window_seqnos=16)

    def call(client, op, *args, ro=False, max_ms=60_000.0):
        cl = c.clients[client]
        cl.invoke(encode_op(op, *args, ROOT), ro, c.now)
        c.run()
        waited = 0.0
        while cl.busy and waited < max_ms:
            c.advance(10.0)
            waited += 10.0
        assert not cl.busy
        (out,) = cl.take_outcomes()
        return decode_result(out.result)

    assert call(0, "mkdir", ROOT_INO, b"d", 0o755)[A_INO] == 2
    for i in range(12):
        ino = call(i % 2, "create", 2, b"f%d" % i, 0o644, True)[A_INO]
        assert call(i % 2, "write", ino, 0, b"x" * (100 * i + 1))[A_SIZE] == 100 * i + 1
    assert call(1, "getattr", 2, ro=True)[A_NLINK] == 2
    c.down.add(0)  # the primary stops: a view change
    assert call(1, "rename", 2, b"f0", ROOT_INO, b"moved", 0, False) == 0
    assert call(0, "unlink", 2, b"f1", False)[0] == 0
    c.down.discard(0)
    c.advance(2000)
    live = [r for i, r in enumerate(c.replicas) if i != 0]
    assert all(r.view >= 1 for r in live)
    digests = {r.service.digest() for r in live}
    assert len(digests) == 1
    s = live[0].service
    names = decode_result(s.execute(encode_op("readdir", 2, 0, 100, ROOT), 4, b"", True))[0]
    assert sorted(e[0] for e in names) == sorted(b"f%d" % i for i in range(2, 12))
    times = sorted(e[2][A_MTIME] for e in names)
    assert times[0] > 0 and len(set(times)) == len(times)  # agreed, distinct times


def test_mount_identities_leave_out_the_administrators(tmp_path):
    # an administrator's requests are configuration changes: a mount never sends file operations as one
    from pbft.config import ConfigError
    from pbft.runtime.cluster import init_cluster
    from pbft.services.bfs.cli import _identities

    c = init_cluster(tmp_path, 4, None, None, 7000, 8)
    assert c.admins and all(a in c.client_keys for a in c.admins)
    got = _identities(c, None, 100)
    assert got == c.client_ids and not set(got) & set(c.admins)
    with pytest.raises(ConfigError, match="not a client"):
        _identities(c, c.admins[0], 1)


def test_changes_tells_a_client_whether_anyone_else_changed_anything():
    fs = FS(client=4)
    d = fs.mkdir(ROOT_INO, b"d")
    now, latest = fs("changes", (4,), ro=True)
    assert latest < now  # only client 4 wrote: nothing newer by anyone else (the start's floor)
    assert fs("changes", (5,), ro=True) == (now, now)  # for client 5, client 4's mkdir is the latest
    fs("create", d, b"f", 0o644, True, client=5)
    t5 = fs("changes", (4,), ro=True)[0]
    assert fs("changes", (4,), ro=True)[1] == t5 > now
    assert fs("changes", (4, 5), ro=True)[1] < now  # a mount naming both of its identities
    # a refused change changes nothing and is not counted; reads are not counted either
    assert fs.err("mkdir", d, b"f", 0o755, client=6) == E.EEXIST
    fs.lookup(d, b"f")
    assert fs("changes", (4, 5), ro=True)[1] < now
    # only the last WRITERS_MAX writers are kept by name: older ones raise the floor, so the
    # answer is never "nothing new" when something changed
    for c in range(10, 10 + WRITERS_MAX + 3):
        fs("fsync", d, client=c)
    last = fs("changes", (), ro=True)[0]
    assert fs("changes", (4, 5), ro=True)[1] == last
    floor, writers = fs.s.writers.value
    assert len(writers) == WRITERS_MAX and floor > t5
    assert fs("changes", tuple(range(10, 10 + WRITERS_MAX + 3)), ro=True)[1] == floor
    # hostile arguments: an errno
    for bad in [None, 5, b"x", (-1,), (1 << 40,), ("a",), ((1,),)]:
        assert fs.err("changes", bad) == E.EINVAL


def test_update_applies_writes_and_attribute_changes_in_order_all_or_none():
    fs = FS()
    f = fs.create(ROOT_INO, b"f", 0o600)
    fs.setattr(f, uid=1000, gid=1000)
    # a write, explicit times after it, then a mode: as the separate operations would, in order
    a = fs("update", f, ((UPDATE_WRITE, 0, b"hello"), (UPDATE_WRITE, 10, b"world"),
                         (UPDATE_SETATTR, None, None, None, None, (111, 222)),
                         (UPDATE_SETATTR, 0o644, None, None, None, (None, None))), cr=ALICE)
    assert a == fs.stat(f)
    assert a[A_SIZE] == 15 and a[A_ATIME] == 111 and a[A_MTIME] == 222 and S.S_IMODE(a[A_MODE]) == 0o644
    assert fs.read(f) == b"hello\0\0\0\0\0world"
    # one refused step (bob may not change alice's mode) and nothing happens, the write before it neither
    fs.setattr(f, mode=0o666, cr=ALICE)
    before = fs.stat(f)
    assert fs.err("update", f, ((UPDATE_WRITE, 0, b"HELLO"), (UPDATE_SETATTR, 0o777, None, None, None, (None, None))),
                  cr=BOB) == E.EPERM
    assert fs.stat(f) == before and fs.read(f) == b"hello\0\0\0\0\0world"
    # malformed steps: EINVAL, nothing changed
    too_many = tuple((UPDATE_WRITE, i, b"x") for i in range(UPDATE_STEPS_MAX + 1))
    too_much = ((UPDATE_WRITE, 0, bytes(IO_MAX)), (UPDATE_WRITE, IO_MAX, b"x"))
    for steps in ((), too_many, too_much, ((2, 0, b"x"),), ((True, 0, b"x"),), ((UPDATE_WRITE, 0),),
                  ((UPDATE_SETATTR, None, None),), (b"x",), 5):
        assert fs.err("update", f, steps, cr=ALICE) == E.EINVAL, steps
    assert fs.stat(f) == before
    # a read-only update is refused
    with pytest.raises(BFSError) as ei:
        fs("update", f, ((UPDATE_WRITE, 0, b"x"),), cr=ALICE, ro=True)
    assert ei.value.errno == E.EROFS


def test_open_returns_the_attributes_and_a_small_changed_file_readable_by_the_caller():
    fs = FS()
    f = fs.create(ROOT_INO, b"f", 0o600)
    fs.setattr(f, uid=1000, gid=1000)
    fs.write(f, 0, b"contents")
    a = fs.stat(f)
    assert fs("open", f, None, IO_MAX, cr=ALICE, ro=True) == (a, b"contents")
    # unchanged since the version the caller holds: no bytes
    assert fs("open", f, (a[A_SIZE], a[A_MTIME]), IO_MAX, cr=ALICE, ro=True) == (a, None)
    assert fs("open", f, (a[A_SIZE], a[A_MTIME] - 1), IO_MAX, cr=ALICE, ro=True) == (a, b"contents")
    # larger than asked for, a directory, or not readable by the caller: attributes only
    assert fs("open", f, None, 7, cr=ALICE, ro=True) == (a, None)
    assert fs("open", ROOT_INO, None, IO_MAX, cr=ALICE, ro=True) == (fs.stat(ROOT_INO), None)
    assert fs("open", f, None, IO_MAX, cr=BOB, ro=True) == (a, None)
    fs.setattr(f, mode=0o644, cr=ALICE)
    assert fs("open", f, None, IO_MAX, cr=BOB, ro=True)[1] == b"contents"
    # a hole reads as zeros; bad arguments are EINVAL; an unknown inode ESTALE
    fs.write(f, 20, b"end")
    assert fs("open", f, None, IO_MAX, cr=ALICE, ro=True)[1] == b"contents" + bytes(12) + b"end"
    for have, mx in (((1,), IO_MAX), (5, IO_MAX), (None, -1), (None, b"x")):
        assert fs.err("open", f, have, mx, cr=ALICE) == E.EINVAL
    assert fs.err("open", 999, None, IO_MAX) == E.ESTALE
