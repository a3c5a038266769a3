"""Every implementation of the library's two pluggable parts, for the conformance suites.

``STORES`` lists every ``Store`` (the durable key-value storage of a replica) and ``SERVICES``
every shipped ``Service`` (the replicated application) with a workload that exercises it.
``tests/conformance/`` runs one suite against each entry: a new implementation is one more
line here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import msgpack

ROOT = str(Path(__file__).resolve().parents[2])  # the repository root: makes ``examples.*`` importable
if ROOT not in sys.path:
    sys.path.append(ROOT)

from pbft.storage import META_KEY, LmdbStore, MemStore, Store, WalStore  # noqa: E402, F401 - Store: the interface
from pbft.storage.store import MAX_KEY  # noqa: E402, F401 - the conformance suites read it here


# ---------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreImpl:
    """``open(directory)`` opens the store kept in ``directory`` (created if need be); the
    same call again after ``close()`` reopens it with its contents. A store without a
    directory (``persistent=False``) keeps its contents only in the object, and ``reopen``
    hands back the same object (what a process crash leaves of a simulated disk)."""

    name: str
    open: Callable[[Path], object]
    persistent: bool

    def reopen(self, store, directory: Path):
        if not self.persistent:
            return store
        store.close()
        return self.open(directory)


class _MemFactory:
    """A fresh simulated disk (the directory is not used)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, directory: Path):
        return MemStore(**self.kw)


STORES: list[StoreImpl] = [
    StoreImpl("memory-durable", _MemFactory(durable=True), persistent=False),
    StoreImpl("memory-fast", _MemFactory(durable=False, fast_sync_every=3), persistent=False),
    StoreImpl("lmdb-durable", lambda d: LmdbStore(d / "db", owner="conformance/replica-0", durable=True,
                                                   map_size_bytes=1 << 26), persistent=True),
    StoreImpl("lmdb-fast", lambda d: LmdbStore(d / "db", owner="conformance/replica-0", durable=False,
                                                map_size_bytes=1 << 26), persistent=True),
    StoreImpl("wal", lambda d: WalStore(d / "db", owner="conformance/replica-0", map_size_bytes=1 << 26),
              persistent=True),
    # a log bound of a few records: the suite's writes go through checkpoints and reuse of the file
    StoreImpl("wal-rotating", lambda d: WalStore(d / "db", owner="conformance/replica-0", map_size_bytes=1 << 26,
                                                 log_limit_bytes=2000, prealloc_bytes=4096), persistent=True),
]


# ---------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------

Op = tuple[bytes, int, bool]  # operation, client id, read_only

CLIENTS = (4, 5)  # the client ids of a 4-replica cluster with two clients


@dataclass(frozen=True)
class ServiceImpl:
    """``make()`` builds a fresh service as every replica would; ``workload()`` is a list of
    operations that exercises it (valid ones, mostly succeeding, from two clients, some
    read-only); ``failed(result)`` says whether a result is the service's error result (None:
    the service has no error results, every byte string being a valid operation)."""

    name: str
    make: Callable[[], object]
    workload: Callable[[], list[Op]]
    failed: Optional[Callable[[bytes], bool]]


def _kv():
    from pbft.services.kv import KVService
    return KVService(buckets=64)


def _kv_workload() -> list[Op]:
    from pbft.services.kv import encode_op as op
    a, b = CLIENTS
    out: list[Op] = []
    for i in range(12):
        out.append((op("put", b"k%d" % (i % 5), b"v%d" % i), a if i % 2 else b, False))
    out += [
        (op("get", b"k1"), a, True), (op("get", b"k2"), b, False), (op("mtime", b"k3"), a, True),
        (op("cas", b"k1", b"v11", b"w1"), a, False), (op("cas", b"k1", b"nope", b"w2"), b, False),
        (op("cas", b"fresh", None, b"new"), b, False), (op("delete", b"k0"), a, False),
        (op("delete", b"absent"), b, False), (op("get", b"k0"), a, True), (op("put", b"big", b"x" * 4000), a, False),
    ]
    return out


def _kv_failed(result: bytes) -> bool:
    return msgpack.unpackb(result, raw=False)[0] == "err"


def _kv_alt():
    from pbft.services.kv_alt import KVAltService
    return KVAltService(buckets=64)


def _null():
    from pbft.services.null import NullService
    return NullService()


def _null_workload() -> list[Op]:
    from pbft.services.null import make_op
    a, b = CLIENTS
    return [(make_op(0, 0), a, False), (make_op(4096, 0), b, False), (make_op(0, 4096), a, False),
            (make_op(8, 16), b, True), (make_op(100, 1), a, False), (make_op(0, 0), b, True)]


def _bank():
    from examples.bank import BankService
    return BankService()


def _bank_workload() -> list[Op]:
    from examples.bank import encode_op as op
    a, b = CLIENTS
    return [
        (op("open", "alice"), a, False), (op("open", "bob"), b, False), (op("deposit", "alice", 100), b, False),
        (op("deposit", "bob", 7), b, False), (op("transfer", "alice", "bob", 30), a, False),
        (op("withdraw", "bob", 5), b, False), (op("balance", "alice"), b, True), (op("total"), a, True),
        (op("withdraw", "alice", 1), b, False),  # not the owner: refused
        (op("transfer", "alice", "carol", 1), a, False),  # no such account: refused
        (op("open", "carol"), a, False), (op("deposit", "carol", 10**12), a, False), (op("total"), b, False),
    ]


def _bank_failed(result: bytes) -> bool:
    return msgpack.unpackb(result, raw=False)[0] == "err"


def _bfs():
    from pbft.services.bfs import BFSConfig, BFSService, ClientPolicy
    return BFSService(BFSConfig(default=ClientPolicy(root=True)), inode_buckets=32, dir_buckets=32,
                      data_buckets=64, xattr_buckets=8)


def _bfs_workload() -> list[Op]:
    from pbft.services.bfs.protocol import ROOT_INO, creds, encode_op as op
    a, b = CLIENTS
    root, alice = creds(0, 0), creds(1000, 1000, (1000,))
    # inode numbers are allocated in order from ROOT_INO + 1, the same on every replica
    d, f, g = ROOT_INO + 1, ROOT_INO + 2, ROOT_INO + 3
    return [
        (op("mkdir", ROOT_INO, b"dir", 0o777, root), a, False),
        (op("create", d, b"file", 0o644, True, alice), b, False),
        (op("write", f, 0, b"hello world" * 300, alice), b, False),
        (op("read", f, 0, 64, alice), b, True),
        (op("lookup", ROOT_INO, b"dir", root), a, True),
        (op("symlink", d, b"link", b"file", alice), b, False),
        (op("readdir", d, 0, 100, alice), a, True),
        (op("setxattr", f, b"user.tag", b"v", 0, alice), b, False),
        (op("write", f, 5000, b"tail", alice), b, False),
        (op("getattr", f, root), a, False),
        (op("rename", d, b"file", ROOT_INO, b"moved", 0, False, root), a, False),
        (op("create", d, b"other", 0o600, True, alice), b, False),
        (op("unlink", d, b"link", False, alice), b, False),
        (op("statfs", root), a, True),
        (op("getattr", g, root), a, True),
    ]


def _bfs_failed(result: bytes) -> bool:
    return msgpack.unpackb(result, raw=False)[0] != 0


SERVICES: list[ServiceImpl] = [
    ServiceImpl("kv", _kv, _kv_workload, _kv_failed),
    ServiceImpl("kv-alt", _kv_alt, _kv_workload, _kv_failed),  # the same service, another implementation
    ServiceImpl("null", _null, _null_workload, None),
    ServiceImpl("bank", _bank, _bank_workload, _bank_failed),
    ServiceImpl("bfs", _bfs, _bfs_workload, _bfs_failed),
]


def service_impl(name: str) -> ServiceImpl:
    return next(s for s in SERVICES if s.name == name)
