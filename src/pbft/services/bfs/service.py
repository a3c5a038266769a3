"""BFSService: a POSIX file system as a deterministic pbft service in the object form.

The state (``docs/bfs.md`` has the whole picture):

* a superblock cell ``(next_ino, time_ns, inodes_used, chunks_used, queue_head, queue_tail)``:
  inode numbers come from ``next_ino`` and are never reused; ``time_ns`` is the last agreed
  time; the reclaim queue (an ``ObjectDict`` keyed by position) holds the chunk ranges still to
  be freed, a bounded number per operation;
* a usage cell ``((client, inodes, chunks), ...)`` for the per-client quotas and an orphan
  cell ``((client, ino), ...)``: inodes unlinked while that client had them open;
* inodes (an ``ObjectDict`` keyed by the 8-byte inode number); directories in three
  ``ObjectDict``s, so that no operation reads or writes a whole directory: a header per
  directory ``(next_cookie, entries, name_bytes)``, one entry per name keyed by (directory,
  name): ``(ino, cookie)``, and pages keyed by (directory, cookie // DIR_PAGE): ``((cookie,
  name), ...)`` sorted, which readdir walks (cookies are never reused); extended attributes
  (``((name, value), ...)`` sorted), and file data in chunks of ``CHUNK`` bytes keyed by
  (inode, index): ``(stamp, bytes)``, an absent chunk is a hole;
* a writers cell ``(floor, ((client, time_ns), ...))``: the last agreed time at which each of
  the ``WRITERS_MAX`` clients that changed the state most recently did, and the latest time of
  the ones that dropped out of it (``floor``). The read-only ``changes`` answers a client
  whether anyone else changed anything since a given time, so a mount can keep using what it
  cached as long as nobody else wrote.

Every operation runs against per-operation caches and writes through an undo log: an
operation either happens completely or, when it fails (an errno, a full bucket, a bug), not
at all.  ``execute`` never raises.
"""

from __future__ import annotations

import bisect
import errno as E
import logging
import stat as S
from typing import NoReturn

import msgpack

from ...service import ObjectService
from ...state.objects import BucketFull, Cell, ObjectDict, ObjectSpace
from .config import BFSConfig, parse_bfs_section
from .protocol import (ARITY, GROUPS_MAX, IO_MAX, KEEP_MAX, NAME_MAX, READ_ONLY_OPS, RENAME_EXCHANGE, RENAME_NOREPLACE,
                       ROOT_INO, SYMLINK_MAX, UPDATE_SETATTR, UPDATE_STEPS_MAX, UPDATE_WRITE, UTIME_NOW, XATTR_CREATE,
                       XATTR_NAME_MAX, XATTR_REPLACE, XATTR_TOTAL_MAX, XATTR_VALUE_MAX)

log = logging.getLogger("pbft.bfs")

CHUNK = 16 * 1024
#: work bounds of the lazy reclaim, per executed mutating operation
RECLAIM_PROBES = 2048
RECLAIM_FREES = 64
#: a truncation that drops at most this many chunk slots frees them at once
EAGER_FREE_SLOTS = 64
ZERO_RANGES_MAX = 8
NLINK_MAX = 65000
#: directory entries by cookie: cookies ``c`` with the same ``c // DIR_PAGE`` share one page
DIR_PAGE = 64
#: pages a readdir call looks at (absent ones too) before it returns where to go on
READDIR_PROBES = 1024
#: ancestor walks (search permission, rename into a subtree) stop here with ELOOP: a path of
#: PATH_MAX (4096) bytes has at most 2048 components, so no reachable directory is deeper
DEPTH_MAX = 4096
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# inode fields
(I_MODE, I_UID, I_GID, I_NLINK, I_SIZE, I_ATIME, I_MTIME, I_CTIME, I_RDEV, I_NCHUNKS, I_PARENT, I_CHARGE,
 I_TARGET, I_HOLDER, I_ZR) = range(15)
N_IFIELDS = 15
# superblock fields
SB_NEXT, SB_TIME, SB_INODES, SB_CHUNKS, SB_QHEAD, SB_QTAIL = range(6)
#: chunk slots a deletion frees at once, per operation, before it queues the rest
EAGER_FREE_BUDGET = 256

#: clients the writers cell keeps by name (older ones only raise its floor)
WRITERS_MAX = 16
#: (client, credentials claimed) pairs whose checked credentials are remembered
CRED_MEMO_MAX = 4096
#: the writer recorded for the lazy reclaim's changes (which any client's operation may make)
RECLAIMER = -1

MKNOD_TYPES = (S.S_IFREG, S.S_IFIFO, S.S_IFCHR, S.S_IFBLK, S.S_IFSOCK)


class _Err(Exception):
    def __init__(self, code: int):
        self.code = code


def _fail(code: int) -> NoReturn:
    raise _Err(code)


def _k(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def _ck(ino: int, idx: int) -> bytes:
    return ino.to_bytes(8, "big") + idx.to_bytes(8, "big")


def _ceil_chunks(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


# ---- validation of decoded objects (put_objs) -------------------------------------------

def _is_int(x, lo=0, hi=U64) -> bool:
    return type(x) is int and lo <= x <= hi


def _check_inode(v) -> None:
    if not (isinstance(v, tuple) and len(v) == N_IFIELDS and all(_is_int(v[i], -1) for i in range(12))
            and type(v[I_TARGET]) is bytes and type(v[I_HOLDER]) is int and isinstance(v[I_ZR], tuple)
            and all(isinstance(z, tuple) and len(z) == 3 and all(_is_int(x) for x in z) for z in v[I_ZR])):
        raise ValueError("bad inode")


def _check_dir(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 3 and all(_is_int(x) for x in v) and v[0] >= 1):
        raise ValueError("bad directory")


def _check_dirent(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 2 and _is_int(v[0], 1) and _is_int(v[1], 1)):
        raise ValueError("bad directory entry")


def _check_page(v) -> None:
    if not (isinstance(v, tuple) and v):
        raise ValueError("bad directory page")
    prev = 0
    for e in v:
        if not (isinstance(e, tuple) and len(e) == 2 and _is_int(e[0], 1) and type(e[1]) is bytes
                and 0 < len(e[1]) <= NAME_MAX):
            raise ValueError("bad directory page entry")
        if e[0] <= prev or e[0] // DIR_PAGE != v[0][0] // DIR_PAGE:
            raise ValueError("directory page not sorted")
        prev = e[0]


def _check_chunk(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 2 and _is_int(v[0]) and type(v[1]) is bytes and len(v[1]) <= CHUNK):
        raise ValueError("bad chunk")


def _check_xattrs(v) -> None:
    if not (isinstance(v, tuple) and all(isinstance(e, tuple) and len(e) == 2 and type(e[0]) is bytes
                                         and type(e[1]) is bytes for e in v)):
        raise ValueError("bad xattrs")


def _check_sb(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 6 and all(_is_int(x) for x in v) and v[SB_QHEAD] <= v[SB_QTAIL]):
        raise ValueError("bad superblock")


def _check_qentry(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 6 and all(_is_int(x, -1) for x in v)):
        raise ValueError("bad reclaim entry")


def _check_writers(v) -> None:
    if not (isinstance(v, tuple) and len(v) == 2 and _is_int(v[0]) and isinstance(v[1], tuple)
            and len(v[1]) <= WRITERS_MAX
            and all(isinstance(w, tuple) and len(w) == 2 and _is_int(w[0], RECLAIMER, U32) and _is_int(w[1])
                    for w in v[1])):
        raise ValueError("bfs: bad writers cell")


def _check_pairs(width):
    def check(v) -> None:
        if not (isinstance(v, tuple) and all(isinstance(e, tuple) and len(e) == width and all(_is_int(x, -1) for x in e)
                                             for e in v)):
            raise ValueError("bad table")
    return check


class BFSService(ObjectService):
    """The replicated file system.  ``config``: limits and the client policy (``[bfs]``)."""

    @classmethod
    def from_cluster(cls, cluster) -> "BFSService":
        """``cls(config)`` with the ``[bfs]`` section (or ``[service.bfs]``) of ``cluster.toml``:
        what ``--service bfs`` and ``--service module:Subclass`` build."""
        return cls(parse_bfs_section(cluster.section("bfs")))

    def __init__(self, config: BFSConfig | None = None, inode_buckets: int = 4096, dir_buckets: int = 4096,
                 data_buckets: int | None = None, xattr_buckets: int = 256):
        self.cfg = config or BFSConfig()
        if data_buckets is None:
            data_buckets = self.cfg.data_buckets
        self.sb = Cell(0, (ROOT_INO + 1, 0, 1, 0, 0, 0), check=_check_sb)
        self.usage = Cell(1, (), check=_check_pairs(3))
        self.orphans = Cell(2, (), check=_check_pairs(2))
        base = 3
        self.inodes = ObjectDict(inode_buckets, base=base, check_value=_check_inode)
        base += inode_buckets
        # a directory is a header (next cookie, entries, bytes of their names), its entries, each
        # its own key (directory, name) -> (inode, cookie), and pages (directory, cookie //
        # DIR_PAGE) -> ((cookie, name), ...) for readdir: no operation touches the whole directory
        self.dirs = ObjectDict(dir_buckets, base=base, check_value=_check_dir)
        base += dir_buckets
        self.dirents = ObjectDict(dir_buckets, base=base, check_value=_check_dirent)
        base += dir_buckets
        self.dpages = ObjectDict(dir_buckets, base=base, check_value=_check_page)
        base += dir_buckets
        self.xattrs = ObjectDict(xattr_buckets, base=base, check_value=_check_xattrs)
        base += xattr_buckets
        # the reclaim queue: entries (ino, next index, end index, cutoff time, charged client,
        # chunks left or -1) keyed by their position, from the superblock's head to its tail
        self.reclaim = ObjectDict(256, base=base, check_value=_check_qentry)
        base += 256
        self.data = ObjectDict(data_buckets, base=base, check_value=_check_chunk)
        base += data_buckets
        self.writers = Cell(base, (0, ()), check=_check_writers)
        self.space = ObjectSpace(self.sb, self.usage, self.orphans, self.inodes, self.dirs, self.dirents, self.dpages,
                                 self.xattrs, self.reclaim, self.data, self.writers)
        c = self.cfg
        root = [S.S_IFDIR | (c.root_mode & 0o7777), c.root_uid, c.root_gid, 2, 0, 0, 0, 0, 0, 0, ROOT_INO, -1, b"",
                -1, ()]
        self.inodes.set(_k(ROOT_INO), tuple(root))
        self.dirs.set(_k(ROOT_INO), (1, 0, 0))
        self.chunks_max = max(1, c.bytes_max // CHUNK)
        self._tx: list = []
        self._reset_caches()
        self.drops: dict[str, int] = {}
        self._cred_memo: dict = {}
        self._cred_cfg: BFSConfig | None = None

    # ---- non-determinism: the agreed time in nanoseconds ---------------------------------
    def propose_nondet(self, now_ms: float) -> bytes:
        ns = max(int(now_ms * 1_000_000), self.sb.value[SB_TIME] + 1)
        return min(ns, U64).to_bytes(8, "big")

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        if type(value) is not bytes or len(value) != 8:
            return False
        return abs(int.from_bytes(value, "big") - now_ms * 1_000_000) <= self.cfg.skew_ms * 1_000_000

    # ---- caches and the undo log ---------------------------------------------------------
    def _reset_caches(self) -> None:
        self._nodes: dict[int, list | None] = {}
        self._ndirty: set[int] = set()
        self._dcache: dict[int, list | None] = {}   # ino -> [next_cookie, entries, name bytes]
        self._ddirty: set[int] = set()
        self._ents: dict[bytes, list | None] = {}   # dirent key -> [ino, cookie]
        self._edirty: set[bytes] = set()
        self._pages: dict[bytes, list] = {}   # page key -> [(cookie, name), ...]
        self._pdirty: set[bytes] = set()
        self._sbc: list | None = None
        self._usec: dict | None = None
        self._orph: list | None = None
        self._eager = EAGER_FREE_BUDGET

    def _tset(self, d: ObjectDict, key: bytes, value) -> None:
        self._tx.append((d, key, d.get(key, _MISSING)))
        d.set(key, value)

    def _tdel(self, d: ObjectDict, key: bytes) -> None:
        old = d.get(key, _MISSING)
        if old is _MISSING:
            return
        self._tx.append((d, key, old))
        d.delete(key)

    def _tcell(self, c: Cell, value) -> None:
        self._tx.append((c, None, c.value))
        c.set(value)

    def _rollback(self) -> None:
        for d, key, old in reversed(self._tx):
            if key is None:
                d.set(old)
            elif old is _MISSING:
                d.delete(key)
            else:
                d.set(key, old)
        self._tx = []

    def _flush(self) -> None:
        for ino in sorted(self._ndirty):
            n = self._nodes[ino]
            if n is None:
                self._tdel(self.inodes, _k(ino))
            else:
                n[I_ZR] = tuple(sorted(n[I_ZR]))
                v = tuple(n)
                self._tset(self.inodes, _k(ino), v)
        for ino in sorted(self._ddirty):
            d = self._dcache[ino]
            if d is None:
                self._tdel(self.dirs, _k(ino))
            else:
                self._tset(self.dirs, _k(ino), tuple(d))
        for key in sorted(self._edirty):
            e = self._ents[key]
            if e is None:
                self._tdel(self.dirents, key)
            else:
                self._tset(self.dirents, key, tuple(e))
        for key in sorted(self._pdirty):
            pg = self._pages[key]
            if pg:
                self._tset(self.dpages, key, tuple(pg))
            else:
                self._tdel(self.dpages, key)
        if self._sbc is not None:
            sb = self._sbc
            v = tuple(sb)
            if v != self.sb.value:
                self._tcell(self.sb, v)
        if self._usec is not None:
            v = tuple((c, i, ch) for c, (i, ch) in sorted(self._usec.items()) if i or ch)
            if v != self.usage.value:
                self._tcell(self.usage, v)
        if self._orph is not None:
            v = tuple(sorted(self._orph))
            if v != self.orphans.value:
                self._tcell(self.orphans, v)

    # ---- cached accessors ----------------------------------------------------------------
    def _sbl(self) -> list:
        if self._sbc is None:
            v = self.sb.value
            self._sbc = list(v)
        return self._sbc

    def _use(self) -> dict:
        if self._usec is None:
            self._usec = {c: [i, ch] for c, i, ch in self.usage.value}
        return self._usec

    def _orphans(self) -> list:
        if self._orph is None:
            self._orph = [tuple(e) for e in self.orphans.value]
        return self._orph

    def _node(self, ino, missing=E.ESTALE) -> list:
        if type(ino) is not int or not 0 < ino <= U64:
            _fail(E.EINVAL)
        if ino in self._nodes:
            n = self._nodes[ino]
        else:
            v = self.inodes.get(_k(ino))
            n = list(v) if v is not None else None
            if n is not None:
                n[I_ZR] = list(n[I_ZR])
            self._nodes[ino] = n
        if n is None:
            _fail(missing)
        return n

    def _touch(self, ino: int) -> None:
        self._ndirty.add(ino)

    def _dir(self, ino: int) -> list:
        """The directory's header ``[next cookie, entries, bytes of the names]``."""
        d = self._dcache.get(ino)
        if d is None:
            v = self.dirs.get(_k(ino))
            if v is None:
                _fail(E.ENOTDIR)
            d = list(v)
            self._dcache[ino] = d
        return d

    def _dirent(self, dino: int, name: bytes):
        """``[ino, cookie]`` of the entry ``name`` of ``dino`` (None: absent), and its key."""
        key = _k(dino) + name
        if key in self._ents:
            return self._ents[key], key
        v = self.dirents.get(key)
        e = list(v) if v is not None else None
        self._ents[key] = e
        return e, key

    def _page(self, dino: int, page: int) -> tuple[list, bytes]:
        key = _k(dino) + page.to_bytes(8, "big")
        pg = self._pages.get(key)
        if pg is None:
            pg = list(self.dpages.get(key, ()))
            self._pages[key] = pg
        return pg, key

    # ---- execution -----------------------------------------------------------------------
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        try:
            op = msgpack.unpackb(operation, raw=False, use_list=False, max_str_len=64, max_bin_len=IO_MAX + 1024,
                                 max_array_len=GROUPS_MAX + 8, max_map_len=0, max_ext_len=0)
        except Exception:  # garbage from a client: an error result
            return _errb(E.EINVAL)
        if not isinstance(op, tuple) or not op or type(op[0]) is not str or ARITY.get(op[0]) != len(op) - 2:
            return _errb(E.EINVAL)
        kind = op[0]
        if read_only and kind not in READ_ONLY_OPS:
            return _errb(E.EROFS)
        cr = self._creds(op[-1], client)
        if type(cr) is int:
            return _errb(cr)
        handler = getattr(self, "op_" + kind)
        self.client = client  # (the caches and the undo log are empty: every call ends by emptying them)
        try:
            if not read_only and kind not in READ_ONLY_OPS:
                sb = self._sbl()
                t = int.from_bytes(nondet, "big") if type(nondet) is bytes and len(nondet) == 8 else 0
                sb[SB_TIME] = min(U64, max(t, sb[SB_TIME] + 1))
                self.now = sb[SB_TIME]
                value = handler(cr, *op[1:-1])
                reclaimed = self._reclaim_step()
                self._flush()
                self._wrote(RECLAIMER if reclaimed else client)
            else:
                self.now = self.sb.value[SB_TIME]
                value = handler(cr, *op[1:-1])
            out = msgpack.packb((0, value), use_bin_type=True)
        except _Err as e:
            self._rollback()
            out = _errb(e.code)
        except BucketFull:
            self._rollback()
            out = _errb(E.ENOSPC)
        except Exception:  # a bug must not stop the replica (every replica would stop)
            log.exception("bfs: %s failed", kind)
            self._rollback()
            self.drops["exception"] = self.drops.get("exception", 0) + 1
            out = _errb(E.EIO)
        self._tx = []
        self._reset_caches()
        return out

    def _creds(self, c, client: int):
        """The credentials the client claims, checked against its policy; an errno if refused.
        Remembered per (client, claim) for the configuration in use: a mount sends the same few
        claims with every request."""
        if self._cred_cfg is not self.cfg:  # (a new configuration: its policy decides again)
            self._cred_memo = {}
            self._cred_cfg = self.cfg
        if not (type(c) is tuple and len(c) == 3 and type(c[0]) is int and type(c[1]) is int
                and type(c[2]) is tuple and all(type(g) is int for g in c[2])):
            return self._check_creds(c, client)  # (not remembered: anything malformed is refused there)
        key = (client, c)
        r = self._cred_memo.get(key)
        if r is not None:
            return r
        r = self._check_creds(c, client)
        if len(self._cred_memo) >= CRED_MEMO_MAX:
            self._cred_memo.clear()
        self._cred_memo[key] = r
        return r

    def _check_creds(self, c, client: int):
        if not (isinstance(c, tuple) and len(c) == 3 and _is_int(c[0], 0, U32 - 1) and _is_int(c[1], 0, U32 - 1)
                and isinstance(c[2], tuple) and all(_is_int(g, 0, U32 - 1) for g in c[2])):
            return E.EINVAL
        uid, gid, groups = c
        p = self.cfg.policy(client)
        if uid == 0 and not p.root:
            return (p.squash_uid, p.squash_gid, ())
        if p.uids is not None and uid not in p.uids:
            return E.EPERM
        if p.gids is not None:
            if gid not in p.gids:
                return E.EPERM
            groups = tuple(g for g in groups if g in p.gids)
        return (uid, gid, tuple(sorted(set(groups))))

    # ---- permission helpers --------------------------------------------------------------
    @staticmethod
    def _in_group(cr, gid: int) -> bool:
        return cr[1] == gid or gid in cr[2]

    def _may(self, n: list, cr, mask: int) -> bool:
        mode = n[I_MODE]
        if cr[0] == 0:
            return not (mask & 1) or bool(mode & 0o111) or S.S_ISDIR(mode)
        if cr[0] == n[I_UID]:
            bits = (mode >> 6) & 7
        elif self._in_group(cr, n[I_GID]):
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        return bits & mask == mask

    def _need(self, n: list, cr, mask: int) -> None:
        if not self._may(n, cr, mask):
            _fail(E.EACCES)

    def _search(self, dino: int, cr) -> None:
        """Search permission on a directory and on each of its ancestors up to the root."""
        if cr[0] == 0:
            return
        seen = 0
        while True:
            n = self._node(dino)
            self._need(n, cr, 1)
            if dino == ROOT_INO:
                return
            dino = n[I_PARENT]
            seen += 1
            if seen > DEPTH_MAX:
                _fail(E.ELOOP)

    def _dirnode(self, dino, cr, mask: int) -> list:
        n = self._node(dino)
        if not S.S_ISDIR(n[I_MODE]):
            _fail(E.ENOTDIR)
        self._search(dino, cr)
        if mask:
            self._need(n, cr, mask)
        return n

    def _sticky_ok(self, dirn: list, child: list, cr) -> bool:
        return not (dirn[I_MODE] & S.S_ISVTX) or cr[0] == 0 or cr[0] == child[I_UID] or cr[0] == dirn[I_UID]

    @staticmethod
    def _name(name, allow_dots: bool = False) -> bytes:
        if type(name) is not bytes or not name or b"/" in name or b"\0" in name:
            _fail(E.EINVAL)
        if len(name) > NAME_MAX:
            _fail(E.ENAMETOOLONG)
        if not allow_dots and name in (b".", b".."):
            _fail(E.EINVAL)
        return name

    # ---- directory entries ---------------------------------------------------------------
    def _entry(self, dino: int, name: bytes):
        self._dir(dino)
        e = self._dirent(dino, name)[0]
        return e[0] if e is not None else None

    def _insert(self, dino: int, name: bytes, ino: int) -> None:
        d = self._dir(dino)
        if d[1] >= self.cfg.dir_entries_max:
            _fail(E.ENOSPC)
        cookie = d[0]
        d[0] += 1
        d[1] += 1
        d[2] += len(name)
        self._ddirty.add(dino)
        if d[1] * 24 + d[2] > self.cfg.dir_bytes_max:
            _fail(E.ENOSPC)
        e, key = self._dirent(dino, name)
        if e is not None:  # (callers check first)
            _fail(E.EEXIST)
        self._ents[key] = [ino, cookie]
        self._edirty.add(key)
        pg, pkey = self._page(dino, cookie // DIR_PAGE)
        pg.append((cookie, name))  # the largest cookie yet: the page stays sorted
        self._pdirty.add(pkey)

    def _remove(self, dino: int, name: bytes) -> None:
        d = self._dir(dino)
        e, key = self._dirent(dino, name)
        if e is None:
            return
        cookie = e[1]
        self._ents[key] = None
        self._edirty.add(key)
        pg, pkey = self._page(dino, cookie // DIR_PAGE)
        i = bisect.bisect_left(pg, (cookie,))
        if i < len(pg) and pg[i][0] == cookie:
            del pg[i]
            self._pdirty.add(pkey)
        d[1] -= 1
        d[2] -= len(name)
        self._ddirty.add(dino)

    def _relink(self, dino: int, name: bytes, ino: int) -> None:
        """Point the existing entry ``name`` of ``dino`` at ``ino`` (its cookie stays)."""
        e, key = self._dirent(dino, name)
        e[0] = ino
        self._edirty.add(key)

    def _stamp(self, n: list, m: bool = True, c: bool = True) -> None:
        if m:
            n[I_MTIME] = self.now
        if c:
            n[I_CTIME] = self.now

    # ---- inode life ----------------------------------------------------------------------
    def _charge(self, client: int, inodes: int, chunks: int) -> None:
        u = self._use().setdefault(client, [0, 0])
        p = self.cfg.policy(client)
        if inodes > 0 and p.inodes_max and u[0] + inodes > p.inodes_max:
            _fail(E.EDQUOT)
        if chunks > 0 and p.bytes_max and (u[1] + chunks) * CHUNK > p.bytes_max:
            _fail(E.EDQUOT)
        u[0] += inodes
        u[1] += chunks

    def _new(self, cr, pino, name, mode: int, rdev: int = 0, target: bytes = b"") -> tuple[int, list]:
        p = self._dirnode(pino, cr, 1)
        name = self._name(name)
        if self._entry(pino, name) is not None:
            _fail(E.EEXIST)
        self._need(p, cr, 2)
        sb = self._sbl()
        if sb[SB_INODES] >= self.cfg.inodes_max:
            _fail(E.ENOSPC)
        self._charge(self.client, 1, 0)
        is_dir = S.S_ISDIR(mode)
        gid = cr[1]
        if p[I_MODE] & S.S_ISGID:
            gid = p[I_GID]
            if is_dir:
                mode |= S.S_ISGID
        if not is_dir and mode & S.S_ISGID and cr[0] != 0 and not self._in_group(cr, gid):
            mode &= ~S.S_ISGID
        ino = sb[SB_NEXT]
        if ino >= U64:
            _fail(E.ENOSPC)
        sb[SB_NEXT] = ino + 1
        sb[SB_INODES] += 1
        n = [mode, cr[0], gid, 2 if is_dir else 1, len(target), self.now, self.now, self.now, rdev, 0,
             pino if is_dir else 0, self.client, target, -1, []]
        self._nodes[ino] = n
        self._touch(ino)
        if is_dir:
            self._dcache[ino] = [1, 0, 0]
            self._ddirty.add(ino)
            if p[I_NLINK] >= NLINK_MAX:
                _fail(E.EMLINK)
            p[I_NLINK] += 1
        self._insert(pino, name, ino)
        self._stamp(p)
        self._touch(pino)
        return ino, n

    def _unlinked(self, ino: int, n: list, keep) -> int:
        """``n`` lost a name: drop a link; keep the inode as an orphan of this client if asked."""
        if S.S_ISDIR(n[I_MODE]):
            n[I_NLINK] = 0
        else:
            n[I_NLINK] -= 1
        n[I_CTIME] = self.now
        self._touch(ino)
        if n[I_NLINK] > 0:
            return 0
        orph = self._orphans()
        if ((keep is True or (type(keep) is tuple and ino in keep)) and not S.S_ISDIR(n[I_MODE])
                and len(orph) < self.cfg.orphans_max):
            n[I_HOLDER] = self.client
            orph.append((self.client, ino))
            return ino
        self._free(ino, n)
        return 0

    @staticmethod
    def _keep_ok(keep) -> None:
        """``keep`` of unlink and rename: True, False, or a tuple of at most KEEP_MAX inode numbers."""
        if not (type(keep) is bool
                or (isinstance(keep, tuple) and len(keep) <= KEEP_MAX and all(_is_int(i, 1) for i in keep))):
            _fail(E.EINVAL)

    def _free(self, ino: int, n: list) -> None:
        sb = self._sbl()
        sb[SB_INODES] -= 1
        u = self._use().setdefault(n[I_CHARGE], [0, 0])
        u[0] = max(0, u[0] - 1)
        self._nodes[ino] = None
        self._touch(ino)
        if S.S_ISDIR(n[I_MODE]):
            self._dcache[ino] = None
            self._ddirty.add(ino)
        self._tdel(self.xattrs, _k(ino))
        if n[I_NCHUNKS] <= 0:
            return
        # chunks: small files at once (within this operation's budget), the rest in one queue
        # entry covering the file and its pending truncations
        hi = max([_ceil_chunks(n[I_SIZE])] + [z[1] for z in n[I_ZR]])
        if hi <= self._eager and not n[I_ZR]:
            self._eager -= hi
            for idx in range(hi):
                self._drop_chunk(ino, n, idx)
            return
        self._enqueue((ino, 0, hi, self.now + 1, n[I_CHARGE], n[I_NCHUNKS]))

    def _enqueue(self, entry: tuple) -> None:
        sb = self._sbl()
        self._tset(self.reclaim, _k(sb[SB_QTAIL]), entry)
        sb[SB_QTAIL] += 1

    # ---- chunks --------------------------------------------------------------------------
    def _chunk(self, ino: int, n: list, idx: int):
        """The effective content of chunk ``idx`` (None: a hole), hiding chunks a pending
        truncation made stale."""
        v = self.data.get(_ck(ino, idx))
        if v is None:
            return None
        for lo, hi, cutoff in n[I_ZR]:
            if lo <= idx < hi and v[0] < cutoff:
                return None
        return v[1]

    def _drop_chunk(self, ino: int, n: list, idx: int) -> None:
        key = _ck(ino, idx)
        if key in self.data:
            self._tdel(self.data, key)
            n[I_NCHUNKS] -= 1
            self._sbl()[SB_CHUNKS] -= 1
            u = self._use().setdefault(n[I_CHARGE], [0, 0])
            u[1] = max(0, u[1] - 1)

    def _put_chunk(self, ino: int, n: list, idx: int, data: bytes) -> None:
        key = _ck(ino, idx)
        if key not in self.data:
            sb = self._sbl()
            if sb[SB_CHUNKS] + 1 > self.chunks_max:
                _fail(E.ENOSPC)
            self._charge(n[I_CHARGE], 0, 1)
            sb[SB_CHUNKS] += 1
            n[I_NCHUNKS] += 1
        self._tset(self.data, key, (self.now, data))

    def _truncate(self, ino: int, n: list, size: int) -> None:
        old = n[I_SIZE]
        if size > self.cfg.file_size_max:
            _fail(E.EFBIG)
        if size < old:
            if size % CHUNK:
                idx = size // CHUNK
                cur = self._chunk(ino, n, idx)
                if cur is not None and len(cur) > size % CHUNK:
                    self._put_chunk(ino, n, idx, cur[:size % CHUNK])
            lo, hi = _ceil_chunks(size), _ceil_chunks(old)
            if hi - lo <= EAGER_FREE_SLOTS:
                for idx in range(lo, hi):
                    self._drop_chunk(ino, n, idx)
            elif n[I_NCHUNKS] > 0:
                if len(n[I_ZR]) >= ZERO_RANGES_MAX:
                    _fail(E.EAGAIN)
                n[I_ZR].append((lo, hi, self.now))
                self._enqueue((ino, lo, hi, self.now, n[I_CHARGE], -1))
        n[I_SIZE] = size

    def _wrote(self, who: int) -> None:
        """Client ``who`` changed the state at ``self.now``: the writers cell."""
        floor, ws = self.writers.value
        keep = [w for w in ws if w[0] != who]
        keep.append((who, self.now))
        if len(keep) > WRITERS_MAX:
            floor = max(floor, keep[0][1])
            del keep[0]
        self._tcell(self.writers, (floor, tuple(keep)))

    def _reclaim_step(self) -> bool:
        """Free queued chunks: at most RECLAIM_FREES deletions and RECLAIM_PROBES probes; whether
        it did anything."""
        sb = self._sbl()
        head = sb[SB_QHEAD]
        probes, frees = RECLAIM_PROBES, RECLAIM_FREES
        while sb[SB_QHEAD] < sb[SB_QTAIL] and probes > 0 and frees > 0:
            qkey = _k(sb[SB_QHEAD])
            ino, lo, hi, cutoff, charge, remaining = self.reclaim.get(qkey)
            exists = self._nodes[ino] is not None if ino in self._nodes else _k(ino) in self.inodes
            # n not None: a truncation of a file still there (remaining is then -1)
            n = self._node(ino) if exists else None
            while lo < hi and probes > 0 and frees > 0 and remaining != 0:
                probes -= 1
                key = _ck(ino, lo)
                v = self.data.get(key)
                if v is not None and v[0] < cutoff:
                    self._tdel(self.data, key)
                    frees -= 1
                    sb[SB_CHUNKS] -= 1
                    u = self._use().setdefault(charge, [0, 0])
                    u[1] = max(0, u[1] - 1)
                    if n is not None:
                        n[I_NCHUNKS] -= 1
                        self._touch(ino)
                    elif remaining > 0:
                        remaining -= 1
                lo += 1
            if lo >= hi or remaining == 0:
                self._tdel(self.reclaim, qkey)
                sb[SB_QHEAD] += 1
                if n is not None:
                    n[I_ZR] = [z for z in n[I_ZR] if z[2] != cutoff]
                    self._touch(ino)
            else:
                self._tset(self.reclaim, qkey, (ino, lo, hi, cutoff, charge, remaining))
        return probes < RECLAIM_PROBES or sb[SB_QHEAD] != head

    # ---- attributes ----------------------------------------------------------------------
    @staticmethod
    def _attr(ino: int, n: list) -> tuple:
        return (ino, n[I_MODE], n[I_NLINK], n[I_UID], n[I_GID], n[I_RDEV], n[I_SIZE], n[I_NCHUNKS] * (CHUNK // 512),
                n[I_ATIME], n[I_MTIME], n[I_CTIME])

    # ==== read-only operations ============================================================
    def op_lookup(self, cr, pino, name):
        self._dirnode(pino, cr, 1)
        name = self._name(name, allow_dots=True)
        if name == b".":
            ino = pino
        elif name == b"..":
            ino = self._node(pino)[I_PARENT]
        else:
            ino = self._entry(pino, name)
            if ino is None:
                _fail(E.ENOENT)
        return self._attr(ino, self._node(ino))

    def op_getattr(self, cr, ino):
        return self._attr(ino, self._node(ino))

    def op_open(self, cr, ino, have, max_data):
        """``getattr`` and, in the same round trip, the bytes of a small file that changed since
        the version ``have`` (size, mtime) the caller holds: what an ``open`` and the first read
        after it need."""
        n = self._node(ino)
        if not (have is None or (isinstance(have, tuple) and len(have) == 2)) or not _is_int(max_data):
            _fail(E.EINVAL)
        a = self._attr(ino, n)
        if (not S.S_ISREG(n[I_MODE]) or n[I_SIZE] > min(max_data, IO_MAX) or have == (n[I_SIZE], n[I_MTIME])
                or (cr[0] != n[I_UID] and not self._may(n, cr, 4))):
            return (a, None)
        return (a, self.op_read(cr, ino, 0, n[I_SIZE]))

    def op_readlink(self, cr, ino):
        n = self._node(ino)
        if not S.S_ISLNK(n[I_MODE]):
            _fail(E.EINVAL)
        return n[I_TARGET]

    def op_read(self, cr, ino, offset, size):
        n = self._node(ino)
        if S.S_ISDIR(n[I_MODE]):
            _fail(E.EISDIR)
        if not S.S_ISREG(n[I_MODE]):
            _fail(E.EINVAL)
        if not (_is_int(offset) and _is_int(size)):
            _fail(E.EINVAL)
        if cr[0] != n[I_UID]:
            self._need(n, cr, 4)
        size = min(size, IO_MAX)
        if offset >= n[I_SIZE] or size == 0:
            return b""
        end = min(n[I_SIZE], offset + size)
        out = bytearray()
        pos = offset
        while pos < end:
            idx, off = divmod(pos, CHUNK)
            take = min(CHUNK - off, end - pos)
            c = self._chunk(ino, n, idx) or b""
            piece = c[off:off + take]
            out += piece
            if len(piece) < take:
                out += bytes(take - len(piece))
            pos += take
        return bytes(out)

    def op_readdir(self, cr, ino, cookie, max_entries):
        self._dirnode(ino, cr, 4)
        if not (_is_int(cookie) and _is_int(max_entries)):
            _fail(E.EINVAL)
        d = self._dir(ino)
        limit = max(1, min(max_entries, 1024))
        out: list = []
        budget = IO_MAX
        page, last = (cookie + 1) // DIR_PAGE if cookie < U64 else U64, (d[0] - 1) // DIR_PAGE
        probes = READDIR_PROBES
        while page <= last:
            if probes == 0:  # a long run of emptied pages: go on from here in the next call
                return (tuple(out), False, max(cookie, page * DIR_PAGE - 1))
            probes -= 1
            for ck, name in self._page(ino, page)[0]:
                if ck <= cookie:
                    continue
                budget -= len(name) + 96
                if len(out) >= limit or (budget < 0 and out):
                    return (tuple(out), False, out[-1][1])
                child = self._dirent(ino, name)[0][0]
                out.append((name, ck, self._attr(child, self._node(child))))
            page += 1
        return (tuple(out), True, out[-1][1] if out else cookie)

    def op_changes(self, cr, mine):
        """(the last agreed time, the latest time a client not in ``mine`` changed the state)."""
        if not isinstance(mine, tuple) or not all(_is_int(c, 0, U32) for c in mine):
            _fail(E.EINVAL)
        floor, ws = self.writers.value
        return (self.sb.value[SB_TIME], max([floor, *(t for c, t in ws if c not in mine)]))

    def op_statfs(self, cr):
        sb = self.sb.value
        c = self.cfg
        blocks = c.bytes_max // 4096
        return (4096, blocks, max(0, blocks - sb[SB_CHUNKS] * (CHUNK // 4096)), c.inodes_max,
                max(0, c.inodes_max - sb[SB_INODES]), NAME_MAX)

    def _xattr_name(self, name) -> bytes:
        if type(name) is not bytes or not name or len(name) > XATTR_NAME_MAX:
            _fail(E.ERANGE if type(name) is bytes and name else E.EINVAL)
        if not name.startswith(b"user.") or len(name) == 5:
            _fail(E.EOPNOTSUPP)
        return name

    def _xget(self, ino) -> tuple:
        return self.xattrs.get(_k(ino), ())

    def op_getxattr(self, cr, ino, name):
        n = self._node(ino)
        name = self._xattr_name(name)
        self._need(n, cr, 4)
        for k, v in self._xget(ino):
            if k == name:
                return v
        _fail(E.ENODATA)

    def op_listxattr(self, cr, ino):
        n = self._node(ino)
        self._need(n, cr, 4)
        return tuple(k for k, _ in self._xget(ino))

    # ==== mutations =======================================================================
    def op_create(self, cr, pino, name, mode, exclusive):
        if not _is_int(mode, 0, 0o177777) or type(exclusive) is not bool:
            _fail(E.EINVAL)
        if S.S_IFMT(mode) not in (0, S.S_IFREG):
            _fail(E.EINVAL)
        self._dirnode(pino, cr, 1)
        existing = self._entry(pino, self._name(name))
        if existing is not None:
            if exclusive:
                _fail(E.EEXIST)
            n = self._node(existing)
            if S.S_ISDIR(n[I_MODE]):
                _fail(E.EISDIR)
            return self._attr(existing, n)
        ino, n = self._new(cr, pino, name, S.S_IFREG | (mode & 0o7777))
        return self._attr(ino, n)

    def op_mknod(self, cr, pino, name, mode, rdev):
        if not _is_int(mode, 0, 0o177777) or not _is_int(rdev):
            _fail(E.EINVAL)
        t = S.S_IFMT(mode) or S.S_IFREG
        if t not in MKNOD_TYPES:
            _fail(E.EINVAL)
        if t in (S.S_IFCHR, S.S_IFBLK) and cr[0] != 0:
            _fail(E.EPERM)
        ino, n = self._new(cr, pino, name, t | (mode & 0o7777), rdev if t in (S.S_IFCHR, S.S_IFBLK) else 0)
        return self._attr(ino, n)

    def op_mkdir(self, cr, pino, name, mode):
        if not _is_int(mode, 0, 0o177777):
            _fail(E.EINVAL)
        ino, n = self._new(cr, pino, name, S.S_IFDIR | (mode & 0o7777))
        return self._attr(ino, n)

    def op_symlink(self, cr, pino, name, target):
        if type(target) is not bytes or not target or b"\0" in target:
            _fail(E.EINVAL)
        if len(target) > SYMLINK_MAX:
            _fail(E.ENAMETOOLONG)
        ino, n = self._new(cr, pino, name, S.S_IFLNK | 0o777, target=target)
        return self._attr(ino, n)

    def op_link(self, cr, ino, pino, name):
        n = self._node(ino)
        p = self._dirnode(pino, cr, 0)
        name = self._name(name)
        if self._entry(pino, name) is not None:
            _fail(E.EEXIST)
        # as Linux with fs.protected_hardlinks: only the owner, root, or someone who may read and
        # write an ordinary file (not setuid, not setgid-executable) may link to it
        m = n[I_MODE]
        safe = S.S_ISREG(m) and not m & S.S_ISUID and not (m & S.S_ISGID and m & S.S_IXGRP) and self._may(n, cr, 6)
        if not (safe or cr[0] == 0 or cr[0] == n[I_UID]):
            _fail(E.EPERM)
        self._need(p, cr, 3)
        if S.S_ISDIR(n[I_MODE]):
            _fail(E.EPERM)
        if n[I_NLINK] == 0:
            _fail(E.ENOENT)
        if n[I_NLINK] >= NLINK_MAX:
            _fail(E.EMLINK)
        self._insert(pino, name, ino)
        n[I_NLINK] += 1
        self._stamp(n, m=False)
        self._stamp(p)
        self._touch(ino)
        self._touch(pino)
        return self._attr(ino, n)

    def op_unlink(self, cr, pino, name, keep):
        self._keep_ok(keep)
        p = self._dirnode(pino, cr, 1)
        name = self._name(name)
        ino = self._entry(pino, name)
        if ino is None:
            _fail(E.ENOENT)
        n = self._node(ino)
        self._need(p, cr, 3)
        if not self._sticky_ok(p, n, cr):
            _fail(E.EPERM)
        if S.S_ISDIR(n[I_MODE]):
            _fail(E.EISDIR)
        self._remove(pino, name)
        self._stamp(p)
        self._touch(pino)
        return (self._unlinked(ino, n, keep), self.now)  # (the directory's new mtime and ctime)

    def op_rmdir(self, cr, pino, name):
        if name == b".":
            _fail(E.EINVAL)
        if name == b"..":
            _fail(E.ENOTEMPTY)
        p = self._dirnode(pino, cr, 1)
        name = self._name(name)
        ino = self._entry(pino, name)
        if ino is None:
            _fail(E.ENOENT)
        n = self._node(ino)
        self._need(p, cr, 3)
        if not self._sticky_ok(p, n, cr):
            _fail(E.EPERM)
        if not S.S_ISDIR(n[I_MODE]):
            _fail(E.ENOTDIR)
        if self._dir(ino)[1]:
            _fail(E.ENOTEMPTY)
        self._remove(pino, name)
        p[I_NLINK] -= 1
        self._stamp(p)
        self._touch(pino)
        self._unlinked(ino, n, False)
        return 0

    def _is_ancestor(self, a: int, d: int) -> bool:
        """Whether directory ``a`` is ``d`` or one of its ancestors."""
        seen = 0
        while True:
            if d == a:
                return True
            if d == ROOT_INO:
                return False
            d = self._node(d)[I_PARENT]
            seen += 1
            if seen > DEPTH_MAX:
                _fail(E.ELOOP)

    def op_rename(self, cr, sp, sname, dp, dname, flags, keep):
        # the checks in the order Linux makes them, so that the errno is the same
        if not _is_int(flags, 0, 3) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            _fail(E.EINVAL)
        self._keep_ok(keep)
        if sname in (b".", b"..") or dname in (b".", b".."):
            _fail(E.EINVAL if sname != b".." else E.EBUSY)
        spn = self._dirnode(sp, cr, 0)
        dpn = self._dirnode(dp, cr, 0)
        sname, dname = self._name(sname), self._name(dname)
        sino = self._entry(sp, sname)
        if sino is None:
            _fail(E.ENOENT)
        dino = self._entry(dp, dname)
        if flags & RENAME_EXCHANGE and dino is None:
            _fail(E.ENOENT)
        if flags & RENAME_NOREPLACE and dino is not None:
            _fail(E.EEXIST)
        sn = self._node(sino)
        dn = self._node(dino) if dino is not None else None
        sdir = S.S_ISDIR(sn[I_MODE])
        ddir = dn is not None and S.S_ISDIR(dn[I_MODE])
        if sp != dp:
            if sdir and self._is_ancestor(sino, dp):  # into its own subtree
                _fail(E.EINVAL)
            if ddir and self._is_ancestor(dino, sp):  # onto one of its own ancestors
                _fail(E.EINVAL if flags & RENAME_EXCHANGE else E.ENOTEMPTY)
        if sino == dino:
            return 0
        self._need(spn, cr, 3)
        if not self._sticky_ok(spn, sn, cr):
            _fail(E.EPERM)
        self._need(dpn, cr, 3)
        if dn is not None:
            if not self._sticky_ok(dpn, dn, cr):
                _fail(E.EPERM)
            if not flags & RENAME_EXCHANGE:
                if sdir and not ddir:
                    _fail(E.ENOTDIR)
                if ddir and not sdir:
                    _fail(E.EISDIR)
        if sp != dp:
            if sdir:
                self._need(sn, cr, 2)  # its '..' changes
            if flags & RENAME_EXCHANGE and ddir:
                self._need(dn, cr, 2)
        if flags & RENAME_EXCHANGE:
            self._relink(sp, sname, dino)
            self._relink(dp, dname, sino)
            if sp != dp:
                if sdir:
                    sn[I_PARENT] = dp
                if ddir:
                    dn[I_PARENT] = sp
                if sdir != ddir:
                    moved_to_d = 1 if sdir else -1
                    dpn[I_NLINK] += moved_to_d
                    spn[I_NLINK] -= moved_to_d
            self._stamp(sn, m=False)
            self._stamp(dn, m=False)
            self._touch(dino)
            result = 0
        else:
            result = 0
            if dn is not None:
                if ddir and self._dir(dino)[1]:
                    _fail(E.ENOTEMPTY)
                self._remove(dp, dname)
                if ddir:
                    dpn[I_NLINK] -= 1
                result = self._unlinked(dino, dn, keep)
            self._remove(sp, sname)
            self._insert(dp, dname, sino)
            if sdir and sp != dp:
                sn[I_PARENT] = dp
                spn[I_NLINK] -= 1
                if dpn[I_NLINK] >= NLINK_MAX:
                    _fail(E.EMLINK)
                dpn[I_NLINK] += 1
            self._stamp(sn, m=False)
        self._stamp(spn)
        self._stamp(dpn)
        for i in (sino, sp, dp):
            self._touch(i)
        return result

    def op_setattr(self, cr, ino, mode, uid, gid, size, times):
        n = self._node(ino)
        root = cr[0] == 0
        owner = root or cr[0] == n[I_UID]
        if not (isinstance(times, tuple) and len(times) == 2):
            _fail(E.EINVAL)
        for t in times:
            if not (t is None or t == UTIME_NOW or _is_int(t)) or type(t) is bool:
                _fail(E.EINVAL)
        for x in (mode, uid, gid):
            if x is not None and not _is_int(x, 0, U32 - 1):
                _fail(E.EINVAL)
        if size is not None and not _is_int(size):
            _fail(E.EINVAL)
        changed = False
        if uid is not None or gid is not None:
            new_uid = n[I_UID] if uid is None else uid
            new_gid = n[I_GID] if gid is None else gid
            if not root:
                if new_uid != n[I_UID] or not owner:
                    _fail(E.EPERM)
                if new_gid != n[I_GID] and not self._in_group(cr, new_gid):
                    _fail(E.EPERM)
            n[I_UID], n[I_GID] = new_uid, new_gid
            if not root and not S.S_ISDIR(n[I_MODE]):
                self._clear_suid(n)
            changed = True
        if mode is not None:
            if not owner:
                _fail(E.EPERM)
            m = mode & 0o7777
            if not root and not S.S_ISDIR(n[I_MODE]) and not self._in_group(cr, n[I_GID]):
                m &= ~S.S_ISGID
            n[I_MODE] = S.S_IFMT(n[I_MODE]) | m
            changed = True
        if size is not None:
            if S.S_ISDIR(n[I_MODE]):
                _fail(E.EISDIR)
            if not S.S_ISREG(n[I_MODE]):
                _fail(E.EINVAL)
            if not owner:
                self._need(n, cr, 2)
            self._truncate(ino, n, size)
            if not root:
                self._clear_suid(n)
            n[I_MTIME] = self.now
            changed = True
        if times != (None, None):
            explicit = any(t is not None and t != UTIME_NOW for t in times)
            if not owner and (explicit or not self._may(n, cr, 2)):
                _fail(E.EPERM if explicit else E.EACCES)
            for field_, t in zip((I_ATIME, I_MTIME), times):
                if t is not None:
                    n[field_] = self.now if t == UTIME_NOW else t
            changed = True
        if changed:
            n[I_CTIME] = self.now
            self._touch(ino)
        return self._attr(ino, n)

    @staticmethod
    def _clear_suid(n: list) -> None:
        m = n[I_MODE] & ~S.S_ISUID
        if m & S.S_IXGRP:
            m &= ~S.S_ISGID
        n[I_MODE] = m

    def op_write(self, cr, ino, offset, data):
        n = self._node(ino)
        if S.S_ISDIR(n[I_MODE]):
            _fail(E.EISDIR)
        if not S.S_ISREG(n[I_MODE]):
            _fail(E.EINVAL)
        if not _is_int(offset) or type(data) is not bytes or len(data) > IO_MAX:
            _fail(E.EINVAL)
        if cr[0] != n[I_UID]:
            self._need(n, cr, 2)
        end = offset + len(data)
        if end > self.cfg.file_size_max:
            _fail(E.EFBIG)
        pos = offset
        while pos < end:
            idx, off = divmod(pos, CHUNK)
            take = min(CHUNK - off, end - pos)
            piece = data[pos - offset:pos - offset + take]
            cur = self._chunk(ino, n, idx)
            if cur is None and piece.count(0) == len(piece):
                pos += take  # zeros into a hole: stays a hole
                continue
            buf = bytearray(cur or b"")
            if len(buf) < off + take:
                buf += bytes(off + take - len(buf))
            buf[off:off + take] = piece
            self._put_chunk(ino, n, idx, bytes(buf))
            pos += take
        if end > n[I_SIZE]:
            n[I_SIZE] = end
        if data:
            self._stamp(n)
            if cr[0] != 0 and n[I_MODE] & (S.S_ISUID | S.S_ISGID):
                self._clear_suid(n)
        self._touch(ino)
        return self._attr(ino, n)

    def op_update(self, cr, ino, steps):
        """Writes and attribute changes of one inode, in order, as one operation: what a mount
        gathered for a file until its close (each step checked as the ``write`` or ``setattr``
        it stands for; one refused step and none happens)."""
        if not (isinstance(steps, tuple) and 0 < len(steps) <= UPDATE_STEPS_MAX
                and all(isinstance(st, tuple) and st and type(st[0]) is int for st in steps)):
            _fail(E.EINVAL)
        if sum(len(st[2]) for st in steps if st[0] == UPDATE_WRITE and len(st) == 3 and type(st[2]) is bytes) > IO_MAX:
            _fail(E.EINVAL)
        a = None
        for st in steps:
            if st[0] == UPDATE_WRITE and len(st) == 3:
                a = self.op_write(cr, ino, st[1], st[2])
            elif st[0] == UPDATE_SETATTR and len(st) == 6:
                a = self.op_setattr(cr, ino, *st[1:])
            else:
                _fail(E.EINVAL)
        return a

    def op_setxattr(self, cr, ino, name, value, flags):
        n = self._node(ino)
        name = self._xattr_name(name)
        if type(value) is not bytes or not _is_int(flags, 0, 3) or flags == 3:
            _fail(E.EINVAL)
        if len(value) > XATTR_VALUE_MAX:
            _fail(E.E2BIG)
        if not (S.S_ISREG(n[I_MODE]) or S.S_ISDIR(n[I_MODE])):
            _fail(E.EPERM)
        if (n[I_MODE] & S.S_ISVTX) and S.S_ISDIR(n[I_MODE]) and cr[0] not in (0, n[I_UID]):
            _fail(E.EPERM)
        self._need(n, cr, 2)
        cur = dict(self._xget(ino))
        if flags == XATTR_CREATE and name in cur:
            _fail(E.EEXIST)
        if flags == XATTR_REPLACE and name not in cur:
            _fail(E.ENODATA)
        cur[name] = value
        if sum(len(k) + len(v) for k, v in cur.items()) > XATTR_TOTAL_MAX:
            _fail(E.ENOSPC)
        v = tuple(sorted(cur.items()))
        self._tset(self.xattrs, _k(ino), v)
        n[I_CTIME] = self.now
        self._touch(ino)
        return 0

    def op_removexattr(self, cr, ino, name):
        n = self._node(ino)
        name = self._xattr_name(name)
        self._need(n, cr, 2)
        cur = dict(self._xget(ino))
        if name not in cur:
            _fail(E.ENODATA)
        del cur[name]
        if cur:
            v = tuple(sorted(cur.items()))
            self._tset(self.xattrs, _k(ino), v)
        else:
            self._tdel(self.xattrs, _k(ino))
        n[I_CTIME] = self.now
        self._touch(ino)
        return 0

    def op_fsync(self, cr, ino):
        self._node(ino)
        return 0

    def _release(self, ino: int) -> None:
        orph = self._orphans()
        if (self.client, ino) not in orph:
            return
        orph.remove((self.client, ino))
        n = self._node(ino)
        if n[I_NLINK] == 0:
            self._free(ino, n)
        else:
            n[I_HOLDER] = -1
            self._touch(ino)

    def op_release(self, cr, ino):
        if not _is_int(ino, 1):
            _fail(E.EINVAL)
        self._release(ino)
        return 0

    def op_release_all(self, cr):
        for c, ino in list(self._orphans()):
            if c == self.client:
                self._release(ino)
        return 0

    # ---- inspection (tests, tools) -------------------------------------------------------
    def digest(self) -> bytes:
        """A hash of every object (what the replicas' checkpoints compare, in one value)."""
        import hashlib
        h = hashlib.blake2b(digest_size=32)
        for i in range(self.n_objects):
            o = self.get_obj(i)
            if o:
                h.update(i.to_bytes(8, "big") + len(o).to_bytes(8, "big") + o)
        return h.digest()


_MISSING = object()


def _errb(code: int) -> bytes:
    return msgpack.packb((code,))
