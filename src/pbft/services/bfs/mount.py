"""The BFS mount: a FUSE file system (pyfuse3, low-level API) whose every operation is a
request to the replicated ``BFSService``.

    kernel VFS -- FUSE -- this process (pyfuse3 in asyncio mode) -- pbft ClientPool -- replicas

* The replicated inode numbers are the kernel's node ids (the root is 1 on both sides), so
  hard links share one id and nothing is renumbered.
* One asyncio loop runs both pyfuse3 (``pyfuse3.asyncio.enable()``) and the pbft client
  pool: no threads.  The mount holds several client identities; each FUSE request takes a
  free one for each call, so independent requests proceed in parallel (one identity has at
  most one request outstanding).
* Every handler is wrapped: the only exception that leaves it is ``FUSEError`` (an errno
  from the service as it is; no certified reply within ``timeout_s`` is ETIMEDOUT; other
  library errors EIO; anything unexpected is logged and becomes EIO), so a bug cannot take
  the mount down.
* Caching (``docs/bfs.md``): by default attributes, entries and absent names are cached for
  ``cache_s`` (1 s) and file data in the page cache until the next open (close-to-open:
  ``open`` fetches fresh attributes and keeps the cached pages only if the file did not
  change; an open for reading fetches a small file's bytes with its attributes, in one
  read-only ``open``, and answers the first reads from them); writes are gathered in the mount
  (write-behind), with the writer's changes of mode and times after them, and sent at the
  latest at close or fsync (one ordered ``update`` when they fit in a request); a
  directory's attributes after the mount's own create, mkdir... come from its result (never
  later than ``cache_s`` after they were fetched); ``strict``: no kernel caching at all
  (timeouts 0, direct I/O), every write sent at once and every read an ordered operation.
* The mount cache: entries, absent names, attributes and whole listings the mount fetched or
  learnt from its own changes answer the kernel again after the kernel's own timeouts ran out,
  for as long as the replicas say that no client but this mount's identities changed anything
  since (the read-only ``changes``, at most one per ``cache_s`` for all of them): what another
  client changed still shows within ``cache_s``. ``open`` always fetches (close-to-open).
* Credentials: the caller's uid, gid and supplementary groups (from ``/proc/PID/status``)
  go with every request; reads and writes through an open file use the opener's.
* Ordered requests left out where their effect is had anyway: an unlink or rename names the
  files open here, so the replicas hold only one of those (no ``release`` after it for another
  file); an fsync that sent the file's writes sends no ordered no-op after them.
* Counters (requests sent, FUSE requests handled, the mount cache's): in the log at the end,
  and on SIGUSR1.
"""

from __future__ import annotations

import asyncio
import errno as E
import logging
import os
import stat as S
import time
from typing import Optional

import pyfuse3
import pyfuse3.asyncio

from ...runtime.client import ClientPool, NoQuorumError, PbftError
from .protocol import (A_ATIME, A_BLOCKS, A_CTIME, A_GID, A_INO, A_MODE, A_MTIME, A_NLINK, A_RDEV, A_SIZE, A_UID,
                       GROUPS_MAX, IO_MAX, KEEP_MAX, UPDATE_SETATTR, UPDATE_STEPS_MAX, UPDATE_WRITE, UTIME_NOW,
                       BFSError, decode_result, encode_op)

log = logging.getLogger("pbft.bfs.mount")

#: a time within this of the mount's clock in a setattr is taken as "now" (UTIME_NOW)
NOW_WINDOW_NS = 200_000_000
EAGAIN_RETRIES = 100
#: writes gathered per inode before they are sent (write-behind)
WRITE_BEHIND_MAX = 1 << 20
#: the mount cache: entries and attributes kept at most, directories listed whole at most, the
#: largest listing kept (entries), absent names looked up in a directory before it is listed
MCACHE_MAX = 200_000
MLISTS_MAX = 2_000
MLIST_ENTRIES_MAX = 2_048
MLIST_AFTER = 2
#: identities named in a ``changes`` request (a mount with more sees its other ones' changes as others')
MINE_MAX = 32


def _groups_of(pid: int, gid: int) -> tuple:
    """The supplementary groups of process ``pid`` but ``gid`` (one read of its status, done
    for every request: a third less time than reading it line by line)."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
        try:
            data = os.read(fd, 16384)
        finally:
            os.close(fd)
        i = data.find(b"\nGroups:")
        if i < 0:
            return ()
        j = data.find(b"\n", i + 8)
        gs = sorted({int(x) for x in data[i + 8:j if j >= 0 else len(data)].split()} - {gid})
        return tuple(gs[:GROUPS_MAX])
    except (OSError, ValueError):
        return ()


class _Handle:
    __slots__ = ("ino", "cred", "is_dir", "opened_ns", "pre")

    def __init__(self, ino: int, cred: tuple, is_dir: bool = False):
        self.ino = ino
        self.cred = cred
        self.is_dir = is_dir
        self.opened_ns = time.time_ns()
        self.pre: Optional[tuple] = None  # (the file's bytes fetched with the open, the change they reflect)


def _merge(ext: list, off: int, data, cred) -> list:
    """Extents ``[(offset, bytearray, cred)]`` (sorted, disjoint, not touching) with ``data``
    written at ``off`` over them: overlapping and adjacent ones become one."""
    end = off + len(data)
    keep: list = []
    joined: list = []
    for e in ext:
        (joined if e[0] <= end and e[0] + len(e[1]) >= off else keep).append(e)
    if joined:
        lo = min(off, joined[0][0])
        hi = max(end, max(e[0] + len(e[1]) for e in joined))
        buf = bytearray(hi - lo)
        for o, b, _ in joined:
            buf[o - lo:o - lo + len(b)] = b
        buf[off - lo:end - lo] = data
        off = lo
    else:
        buf = bytearray(data)
    keep.append((off, buf, cred))
    keep.sort(key=lambda e: e[0])
    return keep


def _guard(fn):
    """Only FUSEError may leave a pyfuse3 handler."""
    name = fn.__name__

    async def wrapper(self, *args):
        self.fuse[name] = self.fuse.get(name, 0) + 1
        t0 = time.monotonic()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except BFSError as e:
            raise pyfuse3.FUSEError(e.errno or E.EIO) from None
        except NoQuorumError as e:
            self.errors["timeout"] = self.errors.get("timeout", 0) + 1
            log.warning("bfs %s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(E.ETIMEDOUT) from None
        except (PbftError, ValueError) as e:
            self.errors["library"] = self.errors.get("library", 0) + 1
            log.warning("bfs %s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(E.EIO) from None
        except Exception:
            self.errors["unexpected"] = self.errors.get("unexpected", 0) + 1
            log.exception("bfs %s failed", fn.__name__)
            raise pyfuse3.FUSEError(E.EIO) from None
        finally:
            self.fuse_s[name] = self.fuse_s.get(name, 0.0) + time.monotonic() - t0
    wrapper.__name__ = fn.__name__
    return wrapper


class BFSOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, pool: ClientPool, identities: list[int], strict: bool = False, timeout_s: float = 60.0,
                 cache_s: float = 1.0, writeback: bool = False, keep_cache: bool = True,
                 negative_cache: bool = True, write_behind: bool = True, mount_cache: bool = True,
                 prefetch: bool = True, gather_attrs: bool = True, exact_holds: bool = True,
                 fsync_fold: bool = True):
        super().__init__()
        self.pool = pool
        self.ids = list(identities)
        self.free: asyncio.Queue = asyncio.Queue()
        for i in self.ids:
            self.free.put_nowait(i)
        self.strict = strict
        self.timeout_s = timeout_s
        self.cache_s = 0.0 if strict else cache_s
        # kernel caching within the documented consistency (docs/bfs.md), none in strict mode:
        # the writeback cache (writes gathered in the page cache, sent at the latest on close or
        # fsync), the page cache kept at an open when the file did not change, negative entries
        self.enable_writeback_cache = writeback and not strict
        self.keep_cache = keep_cache and not strict
        self.negative_cache = negative_cache and not strict
        self.handles: dict[int, _Handle] = {}
        self.next_fh = 1
        self.open_count: dict[int, int] = {}
        self.orphans: dict[int, int] = {}  # inode kept by the service for us -> the identity holding it
        # an unlink or rename asks the replicas to hold the inode it removes only if it is open
        # here (or being opened): they are named, so no ``release`` follows for another one
        self.exact_holds = exact_holds
        self.opening: dict[int, int] = {}  # inode -> opens of it under way
        self.creating = 0  # creates under way (their inodes are not known yet)
        self.known: dict[int, tuple] = {}  # inode -> (size, mtime) the kernel was last told
        # directory -> (attributes, when fetched): the kernel drops a directory's attributes at
        # each of our changes in it and asks for them again (for its permission check) before
        # the next lookup there; after a create, mkdir... of ours they are known from the result
        # (the new entry's ctime is the directory's new mtime), so they are answered here, never
        # beyond cache_s after they were fetched from the replicas
        self.dattr: dict[int, tuple] = {}
        self.dgen: dict[int, int] = {}  # directory -> changes of ours begun (a concurrent one voids)
        self.depoch = 0  # changes that void them all (rename, rmdir)
        self.pages: dict[int, tuple] = {}  # inode -> (size, mtime) its cached pages reflect
        self.wrote: dict[int, int] = {}  # inode written through the writeback cache -> when it was opened (ns)
        self.kernel_mtime: dict[int, int] = {}  # inode -> the mtime the kernel last handed back after writes
        self.write_behind = write_behind and not strict and not self.enable_writeback_cache
        self.dirty: dict[int, list] = {}  # inode -> [(offset, bytearray, cred)] written, not yet sent
        # inode -> [(mode|None, (atime, mtime) as sent, (atime, mtime) here, when)]: changes of mode
        # and times after the gathered writes of the file, by its writer, sent after them (one
        # ``update`` with the writes when they fit)
        self.pattrs: dict[int, list] = {}
        self.gather_attrs = gather_attrs
        self.fsync_fold = fsync_fold  # an fsync that sent the file's writes sends no ordered no-op after them
        self.flushing: dict[int, asyncio.Lock] = {}
        self.write_errors: dict[int, int] = {}  # inode -> errno of a gathered write the replicas refused
        # a small file's bytes come with the open's attributes (one read-only ``open``) and answer
        # the first reads through that descriptor until this mount changes the file's data
        self.prefetch = prefetch and not strict
        self.cgen: dict[int, int] = {}  # inode -> the last change of its data (size) this mount sent
        # inodes whose cached pages the kernel read whole through this mount (its pages after
        # writes may be partial, so an open asks for the bytes then)
        self.pread: set = set()
        self.cnext = 1
        self.errors: dict[str, int] = {}
        self.fuse: dict[str, int] = {}  # FUSE requests handled, by kind
        self.fuse_s: dict[str, float] = {}  # seconds spent in the handlers, by kind
        self.stats: dict[str, list] = {}  # op -> [calls, seconds]
        self.wait_s = 0.0  # seconds calls waited for a free client identity
        self.max_io = min(IO_MAX, pool.cfg.request_size_bytes_max - 512)
        # the mount cache (module docstring): everything in it carries the epoch it was fetched
        # in; a check that finds another client's change starts a new epoch, voiding it all
        self.mcache = mount_cache and self.cache_s > 0
        self.ve = 0
        self.vlast: Optional[int] = None  # the agreed time of the last check
        self.vuntil = 0.0  # monotonic: answers from the cache are fresh until then
        self.vcheck: Optional[asyncio.Future] = None
        self.mgen = 0  # our changes begun and ended: a fetch that overlaps one is not kept
        self.minflight = 0
        self.cattr: dict[int, tuple] = {}  # ino -> (attributes, epoch)
        self.cent: dict[tuple, tuple] = {}  # (directory, name) -> (ino, or 0: absent; epoch)
        self.clist: dict[int, tuple] = {}  # directory -> (all its names, epoch)
        self.cneg: dict[int, int] = {}  # directory -> absent names fetched there (it is listed after MLIST_AFTER)
        self.mstats = {"checks": 0, "voided": 0, "hits": 0, "lists": 0}

    def log_counters(self, level: int = logging.INFO) -> None:
        """The requests sent (count, mean ms), the FUSE requests handled and the mount cache's
        counters, in three lines of the log: at the end, and on SIGUSR1 at any time."""
        log.log(level, "bfs mount: calls %s; errors %s", {k: (v[0], round(v[1] / max(1, v[0]) * 1000, 2))
                                                          for k, v in sorted(self.stats.items())}, self.errors)
        log.log(level, "bfs mount: FUSE requests %s; mount cache %s", dict(sorted(self.fuse.items())), self.mstats)
        log.log(level, "bfs mount: FUSE handlers (count, mean ms) %s; waited for an identity %.3f s",
                {k: (n, round(self.fuse_s.get(k, 0.0) / max(1, n) * 1000, 3)) for k, n in sorted(self.fuse.items())},
                self.wait_s)

    # ---- calling the cluster ---------------------------------------------------------------
    async def call(self, op: str, *args, cred: tuple, read_only: bool = False, ident: Optional[int] = None):
        raw = encode_op(op, *args, cred)
        if len(raw) > self.pool.cfg.request_size_bytes_max:
            raise pyfuse3.FUSEError(E.E2BIG)
        ro = read_only and not self.strict
        t0 = time.monotonic()
        if not read_only:
            self.mgen += 1
            self.minflight += 1
            if op in ("write", "update", "setattr"):  # (bytes fetched with an open before it are stale)
                if len(self.cgen) > 200_000:
                    self.cgen.clear()
                    for h in self.handles.values():
                        h.pre = None
                self.cgen[args[0]] = self.cnext
                self.cnext += 1
        try:
            return await self._call(op, raw, ro, ident)
        except BFSError as e:
            if not read_only and e.errno in (E.EEXIST, E.ENOENT, E.ESTALE):
                self._vvoid()  # another client's change that the mount cache may not know yet
            raise
        except BaseException:
            if not read_only:
                self._vvoid()  # a change of ours that may or may not have happened
            raise
        finally:
            if not read_only:
                self.mgen += 1
                self.minflight -= 1
            st = self.stats.setdefault(op, [0, 0.0])
            st[0] += 1
            st[1] += time.monotonic() - t0

    async def _call(self, op: str, raw: bytes, ro: bool, ident: Optional[int]):
        for attempt in range(EAGAIN_RETRIES):
            if ident is None:
                t0 = time.monotonic()
                who = await self.free.get()
                self.wait_s += time.monotonic() - t0
                try:
                    res = await self.pool.invoke(who, raw, ro, self.timeout_s)
                finally:
                    self.free.put_nowait(who)
            else:
                res = await self.pool.invoke(ident, raw, ro, self.timeout_s)
            try:
                return decode_result(res)
            except BFSError as e:
                if e.errno != E.EAGAIN or attempt == EAGAIN_RETRIES - 1:
                    raise
            await asyncio.sleep(0.01)

    async def call_as(self, op: str, *args, cred: tuple):
        """An ordered call on an identity of our choice; returns (value, identity)."""
        who = await self.free.get()
        try:
            return await self.call(op, *args, cred=cred, ident=who), who
        finally:
            self.free.put_nowait(who)

    @staticmethod
    def cred(ctx) -> tuple:
        return (ctx.uid, ctx.gid, _groups_of(ctx.pid, ctx.gid))

    def entry(self, a, attr_timeout: Optional[float] = None, entry_timeout: Optional[float] = None
              ) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a[A_INO]
        e.generation = 0
        e.entry_timeout = self.cache_s if entry_timeout is None else entry_timeout
        e.attr_timeout = self.cache_s if attr_timeout is None else attr_timeout
        e.st_mode = a[A_MODE]
        e.st_nlink = a[A_NLINK]
        e.st_uid = a[A_UID]
        e.st_gid = a[A_GID]
        e.st_rdev = a[A_RDEV]
        e.st_size = a[A_SIZE]
        e.st_blksize = 4096
        e.st_blocks = a[A_BLOCKS]
        e.st_atime_ns = a[A_ATIME]
        e.st_mtime_ns = a[A_MTIME]
        e.st_ctime_ns = a[A_CTIME]
        if len(self.known) > 200_000:
            self.known.clear()
        self.known[a[A_INO]] = (a[A_SIZE], a[A_MTIME])
        return e

    def _fh(self, h: _Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    def _handle(self, fh: int) -> _Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(E.EBADF)
        return h

    async def _kept(self, ino: int, who: int) -> None:
        """The service kept ``ino`` (unlinked while we had it open) for identity ``who``."""
        if not ino:
            return
        if self.open_count.get(ino) or self.opening.get(ino):
            self.orphans[ino] = who
        else:
            await self.call("release", ino, cred=(0, 0, ()), ident=who)

    def _keep(self):
        """The ``keep`` of an unlink or rename: the inodes open here or being opened (True: hold
        whatever it removes, when they are too many, a create is under way or ``exact_holds`` is
        off; False: none is open)."""
        if not self.open_count and not self.opening and not self.creating:
            return False
        ids = set(self.open_count) | set(self.opening)
        if not self.exact_holds or self.creating or len(ids) > KEEP_MAX:
            return True
        return tuple(sorted(ids))

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Drop the holds a previous incarnation of this mount (same identities) left."""
        saved, self.timeout_s = self.timeout_s, min(self.timeout_s, 15.0)
        try:
            for i in self.ids:
                await self.call("release_all", cred=(0, 0, ()), ident=i)
            if self.exact_holds:
                await self._probe_holds()
        finally:
            self.timeout_s = saved

    async def _probe_holds(self) -> None:
        """Replicas that take ``keep`` only as True or False would free an open file named in a
        tuple: ask them first. An unlink in a directory that cannot exist, with a ``keep`` they
        refuse (EINVAL) if they know tuples, changes nothing either way."""
        try:
            await self.call("unlink", 1 << 63, b"x", (0,), cred=(0, 0, ()))
        except BFSError as e:
            if e.errno == E.EINVAL:
                return
        log.warning("bfs mount: the replicas do not take open files in `keep`: every unlink or rename while "
                    "files are open holds what it removes")
        self.exact_holds = False

    # ---- metadata ------------------------------------------------------------------------------
    def _absent(self, timeout: float) -> pyfuse3.EntryAttributes:
        if not self.negative_cache:
            raise pyfuse3.FUSEError(E.ENOENT)
        # a negative entry: the kernel remembers the name is absent for cache_s (a create
        # through this mount replaces it at once; another client's within cache_s)
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = timeout
        return neg

    @_guard
    async def lookup(self, parent_inode, name, ctx):
        p, nm = parent_inode, bytes(name)
        cacheable = self.mcache and nm not in (b".", b"..")
        if cacheable and ((p, nm) in self.cent or p in self.clist):
            left = await self._fresh()
            if left:
                hit = self._cached_entry(p, nm, left)
                if hit is not None:
                    return hit
        g, ep = self._snap(), self.ve
        cred = self.cred(ctx)
        try:
            a = await self.call("lookup", p, nm, cred=cred, read_only=True)
        except BFSError as e:
            if e.errno != E.ENOENT:
                raise
            if cacheable and self._quiet(g, ep):
                self._put_entry(p, nm, 0, ep)
                n = self.cneg[p] = self.cneg.get(p, 0) + 1
                if n >= MLIST_AFTER and p not in self.clist:
                    await self._list(p, cred)
            return self._absent(self.cache_s)
        if cacheable and self._quiet(g, ep):
            self._put_entry(p, nm, a[A_INO], ep)
            self._put_attr(a, ep)
        return self.entry(self._with_dirty(a))

    # ---- the mount cache -------------------------------------------------------------------
    def _snap(self) -> Optional[int]:
        """Before a fetch: what ``_quiet`` compares (None: a change of ours is under way)."""
        return None if self.minflight else self.mgen

    def _quiet(self, g: Optional[int], ep: int, own: int = 0) -> bool:
        """No change of ours overlapped the fetch (or our ``own`` changes) begun at ``g``, and the
        epoch is still ``ep``: what it returned may go into the cache."""
        return self.mcache and g is not None and self.mgen == g + 2 * own and self.ve == ep

    def _put_attr(self, a, ep: int) -> None:
        if len(self.cattr) >= MCACHE_MAX:
            self.cattr.clear()
        self.cattr[a[A_INO]] = (a, ep)

    def _put_entry(self, p: int, nm: bytes, ino: int, ep: int) -> None:
        if len(self.cent) >= MCACHE_MAX:
            self.cent.clear()
        self.cent[(p, nm)] = (ino, ep)
        lst = self.clist.get(p)
        if lst is not None:
            if ino:
                lst[0].add(nm)
            else:
                lst[0].discard(nm)

    def _cached_entry(self, p: int, nm: bytes, left: float):
        c = self.cent.get((p, nm))
        if c is not None and c[1] == self.ve:
            if not c[0]:
                self.mstats["hits"] += 1
                return self._absent(left)
            a = self.cattr.get(c[0])
            if a is not None and a[1] == self.ve:
                self.mstats["hits"] += 1
                return self.entry(self._with_dirty(a[0]), left, left)
            return None
        lst = self.clist.get(p)
        if lst is not None and lst[1] == self.ve and nm not in lst[0]:
            self.mstats["hits"] += 1
            return self._absent(left)
        return None

    def _vvoid(self) -> None:
        """Nothing cached so far may be used again."""
        self.ve += 1
        self.cattr.clear()
        self.cent.clear()
        self.clist.clear()
        self.cneg.clear()

    async def _fresh(self) -> float:
        """How long answers from the mount cache may be cached by the kernel (0: not usable): a
        check is made when less than a quarter of ``cache_s`` is left since the last one."""
        left = self.vuntil - time.monotonic()
        if left > self.cache_s / 4:
            return left
        if self.vcheck is None:
            self.vcheck = asyncio.ensure_future(self._check())
        try:
            await asyncio.shield(self.vcheck)
        except Exception:
            return 0.0
        left = self.vuntil - time.monotonic()
        return left if left > 0.01 else 0.0

    async def _check(self) -> None:
        """Ask the replicas whether a client other than ours changed anything since the last check."""
        try:
            sent = time.monotonic()
            self.mstats["checks"] += 1
            try:
                now, latest = await self.call("changes", tuple(self.ids[:MINE_MAX]), cred=(0, 0, ()),
                                              read_only=True)
            except BFSError as e:
                if e.errno == E.EINVAL:  # replicas without it: no mount cache
                    log.warning("bfs mount: the replicas do not answer `changes`: no mount cache")
                    self.mcache = False
                self._vvoid()
                self.vuntil = 0.0
                return
            except Exception:
                self._vvoid()
                self.vuntil = 0.0
                raise
            if type(now) is not int or type(latest) is not int or self.vlast is None or latest > self.vlast:
                self.mstats["voided"] += 1
                self._vvoid()
            self.vlast = now if type(now) is int else None
            self.vuntil = sent + self.cache_s
        finally:
            self.vcheck = None

    async def _list(self, d: int, cred: tuple) -> None:
        """Fetch the names of directory ``d`` (a small one), so that absent ones are answered here."""
        g, ep = self._snap(), self.ve
        names: set = set()
        cookie = 0
        try:
            while len(names) <= MLIST_ENTRIES_MAX:
                ents, eof, resume = await self.call("readdir", d, cookie, 256, cred=cred, read_only=True)
                names.update(name for name, _ck, _a in ents)
                if eof:
                    break
                if type(resume) is not int or resume <= cookie:
                    return
                cookie = resume
            else:
                return
        except (BFSError, PbftError, ValueError):
            return
        self.mstats["lists"] += 1
        if self._quiet(g, ep):
            if len(self.clist) >= MLISTS_MAX:
                self.clist.clear()
            self.clist[d] = (names, ep)

    def _own_new(self, g: Optional[int], p: int, nm: bytes, a, is_dir: bool = False) -> None:
        """Our create, mkdir, mknod, symlink or link of ``nm`` in ``p`` returned ``a``."""
        ep = self.ve
        if self._quiet(g, ep, 1):
            self._put_entry(p, nm, a[A_INO], ep)
            self._put_attr(a, ep)
            if is_dir:
                if len(self.clist) >= MLISTS_MAX:
                    self.clist.clear()
                self.clist[a[A_INO]] = (set(), ep)
        else:
            self.cent.pop((p, nm), None)
            self.cattr.pop(a[A_INO], None)
            self.clist.pop(p, None)

    def _own_attr(self, g: Optional[int], a, own: int = 1) -> None:
        """Our change of an inode returned its attributes ``a``."""
        if self._quiet(g, self.ve, own):
            self._put_attr(a, self.ve)
        else:
            self.cattr.pop(a[A_INO], None)

    @_guard
    async def getattr(self, inode, ctx):
        c = self.dattr.get(inode)
        if c is not None:
            left = c[1] + self.cache_s - time.monotonic()
            if left > 0.01:
                return self.entry(c[0], left)
            del self.dattr[inode]
        if self.mcache:
            c = self.cattr.get(inode)
            if c is not None and c[1] == self.ve:
                left = await self._fresh()
                c = self.cattr.get(inode)
                if left and c is not None and c[1] == self.ve:
                    self.mstats["hits"] += 1
                    return self.entry(self._with_dirty(c[0]), left)
        g, t0 = self._dgen(inode), time.monotonic()
        mg, ep = self._snap(), self.ve
        a = await self.call("getattr", inode, cred=self.cred(ctx), read_only=True)
        if self._quiet(mg, ep):
            self._put_attr(a, ep)
        if self.cache_s > 0 and S.S_ISDIR(a[A_MODE]) and self._dgen(inode) == g:
            if len(self.dattr) > 100_000:
                self._dvoid()
            self.dattr[inode] = (a, t0)
        return self.entry(self._with_dirty(a))

    # ---- directory attributes after our own changes ------------------------------------------
    def _dgen(self, d: int) -> tuple:
        return (self.depoch, self.dgen.get(d, 0))

    def _dchange(self, d: int):
        """A change of ours in directory ``d`` begins: its cached attributes go; returns them
        (or None) and the generation that ``_dchanged`` checks."""
        self.dgen[d] = self.dgen.get(d, 0) + 1
        c = self.cattr.pop(d, None)
        cep = c[1] if c is not None and c[1] == self.ve and self.mcache else None
        base = self.dattr.pop(d, None)
        if base is not None:
            base = (base[0], base[1], cep)
        elif c is not None and cep is not None:
            base = (c[0], None, cep)  # (known from the mount cache only: it goes back there only)
        return base, self._dgen(d)

    def _dchanged(self, d: int, base, g: tuple, when: int, nlink: int = 0) -> None:
        """It succeeded at the agreed time ``when`` (a new entry's ctime, an unlink's time): ``d``'s
        new mtime and ctime."""
        if base is None or self._dgen(d) != g or type(when) is not int:
            return
        a = list(base[0])
        a[A_MTIME] = a[A_CTIME] = when
        a[A_NLINK] += nlink
        if base[2] is not None and base[2] == self.ve:
            self._put_attr(tuple(a), base[2])
        if base[1] is not None:
            self.dattr[d] = (tuple(a), base[1])

    def _dvoid(self) -> None:
        self.dattr.clear()
        self.dgen.clear()
        self.depoch += 1
        self._vvoid()

    def _with_dirty(self, a):
        """The attributes ``a`` with the size our gathered writes give the file and the mode and
        times gathered after them (sent at close)."""
        ext = self.dirty.get(a[A_INO])
        if not ext:
            return a
        end = max(o + len(b) for o, b, _ in ext)
        pend = self.pattrs.get(a[A_INO])
        if end <= a[A_SIZE] and not pend:
            return a
        a = list(a)
        a[A_SIZE] = max(end, a[A_SIZE])
        for mode, _t, (at, mt), when in pend or ():
            if mode is not None:
                a[A_MODE] = S.S_IFMT(a[A_MODE]) | mode
            if at is not None:
                a[A_ATIME] = at
            if mt is not None:
                a[A_MTIME] = mt
            a[A_CTIME] = max(a[A_CTIME], when)
        return tuple(a)

    def _gather_setattr(self, inode: int, attr, fields, cred: tuple):
        """A change of mode or times of a file with gathered writes, by their writer, is gathered
        too (sent after them, in order, at the latest at close): the attributes to answer, or
        None when it has to be sent now."""
        ext = self.dirty.get(inode)
        base = self.cattr.get(inode)
        pend = self.pattrs.get(inode, [])
        if (not self.gather_attrs or not ext or ext[0][2] != cred or base is None or base[1] != self.ve
                or fields.update_size or fields.update_uid or fields.update_gid
                or not (fields.update_mode or fields.update_atime or fields.update_mtime)
                or len(ext) + len(pend) >= UPDATE_STEPS_MAX):
            return None
        now = time.time_ns()
        wire: list[Optional[int]] = []
        here: list[Optional[int]] = []
        for update, ns in ((fields.update_atime, attr.st_atime_ns), (fields.update_mtime, attr.st_mtime_ns)):
            if not update:
                wire.append(None)
                here.append(None)
            elif abs(ns - now) < NOW_WINDOW_NS:
                wire.append(UTIME_NOW)
                here.append(now)
            elif ns < 0:
                return None  # (before 1970: the replicas' EINVAL, now)
            else:
                wire.append(ns)
                here.append(ns)
        mode = (attr.st_mode & 0o7777) if fields.update_mode else None
        pend.append((mode, tuple(wire), tuple(here), now))
        self.pattrs[inode] = pend
        return self._with_dirty(base[0])

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        cred = self.cred(ctx)
        if inode in self.dirty:
            gathered = self._gather_setattr(inode, attr, fields, cred)
            if gathered is not None:
                return self.entry(gathered)
            await self._flush_writes(inode)
        opened = self.wrote.pop(inode, None)
        if (fields.update_mtime and fields.update_ctime
                and not (fields.update_atime or fields.update_mode or fields.update_uid or fields.update_gid
                         or fields.update_size)
                and ((opened is not None
                      and opened - NOW_WINDOW_NS <= attr.st_mtime_ns <= time.time_ns() + NOW_WINDOW_NS)
                     or self.kernel_mtime.get(inode) == attr.st_mtime_ns)):
            # the writeback cache handing back the mtime the kernel kept for writes it sent since
            # the file was opened (or the same value again): each of those writes set the agreed
            # mtime in the replicas already, so nothing is ordered
            if len(self.kernel_mtime) > 100_000:
                self.kernel_mtime.clear()
            self.kernel_mtime[inode] = attr.st_mtime_ns
            return self.entry(await self.call("getattr", inode, cred=cred, read_only=True))
        self.kernel_mtime.pop(inode, None)
        if fh is not None and fh in self.handles and fields.update_size:
            cred = self.handles[fh].cred
        now = time.time_ns()

        def t(update, ns):
            if not update:
                return None
            return UTIME_NOW if abs(ns - now) < NOW_WINDOW_NS else ns  # before 1970: EINVAL from the service

        self._dchange(inode)
        g = self._snap()
        a = await self.call("setattr", inode,
                            (attr.st_mode & 0o7777) if fields.update_mode else None,
                            attr.st_uid if fields.update_uid else None,
                            attr.st_gid if fields.update_gid else None,
                            attr.st_size if fields.update_size else None,
                            (t(fields.update_atime, attr.st_atime_ns), t(fields.update_mtime, attr.st_mtime_ns)),
                            cred=cred)
        self._own_attr(g, a)
        if inode in self.pages:  # our own change: the cached pages (truncated by the kernel) stay right
            self._pages(inode, (a[A_SIZE], a[A_MTIME]))
        return self.entry(a)

    @_guard
    async def readlink(self, inode, ctx):
        return await self.call("readlink", inode, cred=self.cred(ctx), read_only=True)

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        base, g = self._dchange(parent_inode)
        mg = self._snap()
        a = await self.call("mknod", parent_inode, bytes(name), mode, rdev, cred=self.cred(ctx))
        self._own_new(mg, parent_inode, bytes(name), a)
        self._dchanged(parent_inode, base, g, a[A_CTIME])
        return self.entry(a)

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        base, g = self._dchange(parent_inode)
        mg = self._snap()
        a = await self.call("mkdir", parent_inode, bytes(name), mode, cred=self.cred(ctx))
        self._own_new(mg, parent_inode, bytes(name), a, is_dir=True)
        self._dchanged(parent_inode, base, g, a[A_CTIME], nlink=1)
        return self.entry(a)

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        base, g = self._dchange(parent_inode)
        mg = self._snap()
        a = await self.call("symlink", parent_inode, bytes(name), bytes(target), cred=self.cred(ctx))
        self._own_new(mg, parent_inode, bytes(name), a)
        self._dchanged(parent_inode, base, g, a[A_CTIME])
        return self.entry(a)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        if inode in self.dirty:
            await self._flush_writes(inode)
        base, g = self._dchange(new_parent_inode)
        self.cattr.pop(inode, None)
        mg = self._snap()
        a = await self.call("link", inode, new_parent_inode, bytes(new_name), cred=self.cred(ctx))
        self._own_new(mg, new_parent_inode, bytes(new_name), a)
        self._dchanged(new_parent_inode, base, g, a[A_CTIME])
        return self.entry(a)

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        await self._flush_all()
        base, g = self._dchange(parent_inode)
        nm = bytes(name)
        c = self.cent.pop((parent_inode, nm), None)
        mg, ep = self._snap(), self.ve
        try:
            (kept, when), who = await self.call_as("unlink", parent_inode, nm, self._keep(),
                                                   cred=self.cred(ctx))
        finally:
            # the unlinked inode's link count and ctime changed: if which one it was is not
            # known, no attributes in the mount cache can be trusted
            if c is not None and c[1] == ep and c[0]:
                self.cattr.pop(c[0], None)
            else:
                self.cattr.clear()
        if self._quiet(mg, ep, 1):
            self._put_entry(parent_inode, nm, 0, ep)
        else:
            self.clist.pop(parent_inode, None)
        self._dchanged(parent_inode, base, g, when)
        await self._kept(kept, who)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        self._dvoid()  # (the removed directory too)
        await self.call("rmdir", parent_inode, bytes(name), cred=self.cred(ctx))

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._flush_all()
        self._dvoid()  # (a moved directory's ctime and '..' change too)
        kept, who = await self.call_as("rename", parent_inode_old, bytes(name_old), parent_inode_new,
                                       bytes(name_new), flags, self._keep(), cred=self.cred(ctx))
        await self._kept(kept, who)

    @_guard
    async def statfs(self, ctx):
        bsize, blocks, bfree, files, ffree, namemax = await self.call("statfs", cred=self.cred(ctx), read_only=True)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks = blocks
        s.f_bfree = s.f_bavail = bfree
        s.f_files = files
        s.f_ffree = s.f_favail = ffree
        s.f_namemax = namemax
        return s

    # ---- xattrs --------------------------------------------------------------------------------
    @_guard
    async def getxattr(self, inode, name, ctx):
        if not bytes(name).startswith(b"user."):  # e.g. security.capability, asked before every write
            raise pyfuse3.FUSEError(E.ENODATA)
        return await self.call("getxattr", inode, bytes(name), cred=self.cred(ctx), read_only=True)

    @_guard
    async def listxattr(self, inode, ctx):
        return list(await self.call("listxattr", inode, cred=self.cred(ctx), read_only=True))

    @_guard
    async def setxattr(self, inode, name, value, ctx):
        if not bytes(name).startswith(b"user."):  # only user.* is stored (docs/bfs.md)
            raise pyfuse3.FUSEError(E.EOPNOTSUPP)
        self._dchange(inode)
        await self.call("setxattr", inode, bytes(name), bytes(value), 0, cred=self.cred(ctx))

    @_guard
    async def removexattr(self, inode, name, ctx):
        self._dchange(inode)
        await self.call("removexattr", inode, bytes(name), cred=self.cred(ctx))

    # ---- files ---------------------------------------------------------------------------------
    def _file_info(self, fh: int, keep: bool = False) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=fh)
        fi.direct_io = self.strict
        # close-to-open: an open drops the cached pages unless the file is unchanged since
        # the kernel last saw it (same size and mtime from the replicas)
        fi.keep_cache = keep
        return fi

    def _pages(self, ino: int, version: tuple) -> None:
        if self.keep_cache:
            if len(self.pages) > 200_000:
                self.pages.clear()
            self.pages[ino] = version

    def _opened(self, ino: int) -> None:
        self.open_count[ino] = self.open_count.get(ino, 0) + 1

    @_guard
    async def open(self, inode, flags, ctx):
        self.opening[inode] = self.opening.get(inode, 0) + 1  # (an unlink meanwhile holds it: _keep)
        opened = False
        try:
            fi = await self._open(inode, flags, ctx)
            opened = True
            return fi
        finally:
            c = self.opening.pop(inode) - 1
            if c:
                self.opening[inode] = c
            elif not opened and not self.open_count.get(inode) and inode in self.orphans:
                try:  # (held for this open, which failed)
                    await self.call("release", inode, cred=(0, 0, ()), ident=self.orphans.pop(inode))
                except (BFSError, PbftError, ValueError):
                    pass  # (the next mount's release_all drops it)

    async def _open(self, inode, flags, ctx):
        cred = self.cred(ctx)
        if inode in self.dirty:
            await self._flush_writes(inode)
        g, ep = self._snap(), self.ve
        data = None
        if flags & os.O_TRUNC:  # libfuse asks for atomic O_TRUNC: the truncation is ours to do
            self.cattr.pop(inode, None)
            a = await self.call("setattr", inode, None, None, None, 0, (None, None), cred=cred)
            self._own_attr(g, a)
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                pass
        else:  # (always fetched, never from the mount cache: close-to-open)
            if self.prefetch and flags & os.O_ACCMODE != os.O_WRONLY:
                a, data = await self._open_call(inode, cred)
            else:
                a = await self.call("getattr", inode, cred=cred, read_only=True)
            if self._quiet(g, ep):
                self._put_attr(a, ep)
        seen = self.known.get(inode)
        now_is = (a[A_SIZE], a[A_MTIME])
        if not self.strict and seen is not None and seen != now_is:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                pass
        self.entry(a)
        self._opened(inode)
        keep = self.keep_cache and self.pages.get(inode) == now_is and not flags & os.O_TRUNC
        self._pages(inode, now_is)
        h = _Handle(inode, cred)
        if data is not None and len(data) == a[A_SIZE]:
            h.pre = (data, self.cgen.get(inode, 0))
        return self._file_info(self._fh(h), keep)

    async def _open_call(self, inode: int, cred: tuple):
        """The attributes and, if the file is small, readable and not as its cached pages are,
        its bytes (one read-only ``open``; a ``getattr`` from replicas without it)."""
        have = self.pages.get(inode) if self.keep_cache and inode in self.pread else None
        try:
            a, data = await self.call("open", inode, have, self.max_io, cred=cred, read_only=True)
        except BFSError as e:
            if e.errno != E.EINVAL:
                raise
            log.warning("bfs mount: the replicas do not answer `open`: no prefetch at open")
            self.prefetch = False
            return await self.call("getattr", inode, cred=cred, read_only=True), None
        if type(data) is not bytes:
            data = None
        return a, data

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        cred = self.cred(ctx)
        base, g = self._dchange(parent_inode)
        # exclusive first: the kernel asks only for a name it found absent, and the result then
        # says the entry is new (so the directory's new attributes are known); if another client
        # made it meanwhile, a plain create opens it, as it would have at once
        nm = bytes(name)
        mg = self._snap()
        self.creating += 1  # (an unlink meanwhile holds what it removes: _keep)
        try:
            return await self._create(parent_inode, nm, mode, flags, cred, base, g, mg)
        finally:
            self.creating -= 1

    async def _create(self, parent_inode, nm, mode, flags, cred, base, g, mg):
        try:
            a = await self.call("create", parent_inode, nm, mode, True, cred=cred)
            self._own_new(mg, parent_inode, nm, a)
            self._dchanged(parent_inode, base, g, a[A_CTIME])
        except BFSError as e:
            if e.errno != E.EEXIST or flags & os.O_EXCL:
                raise
            self._vvoid()  # another client made it: what else did it change?
            a = await self.call("create", parent_inode, nm, mode, False, cred=cred)
        if flags & os.O_TRUNC and a[A_SIZE] > 0:  # it existed after all (another client made it)
            a = await self.call("setattr", a[A_INO], None, None, None, 0, (None, None), cred=cred)
        self._opened(a[A_INO])
        self._pages(a[A_INO], (a[A_SIZE], a[A_MTIME]))
        return self._file_info(self._fh(_Handle(a[A_INO], cred))), self.entry(a)

    @_guard
    async def read(self, fh, off, size):
        h = self._handle(fh)
        pre = h.pre
        if pre is not None:
            if pre[1] == self.cgen.get(h.ino, 0):
                if off + size >= len(pre[0]):  # read to its end: the kernel has the pages now
                    h.pre = None
                    self._read_whole(h.ino)
                return self._overlay(h.ino, off, size, pre[0][off:off + size])
            h.pre = None
        data = self._overlay(h.ino, off, size, await self._read(h, off, size))
        if off == 0 and len(data) < size:
            self._read_whole(h.ino)
        return data

    def _read_whole(self, ino: int) -> None:
        if len(self.pread) > 200_000:
            self.pread.clear()
        self.pread.add(ino)

    def _overlay(self, ino: int, off: int, size: int, data: bytes) -> bytes:
        """``data`` read from the replicas at ``off`` with our gathered writes laid over it, in order."""
        ext = self.dirty.get(ino)
        if not ext:
            return data
        end = max(off + len(data), min(off + size, max(o + len(b) for o, b, _ in ext)))
        buf = bytearray(data)
        buf.extend(bytes(end - off - len(data)))  # past the replicas' end of file: a hole until ours
        for o, b, _ in ext:
            lo, hi = max(o, off), min(o + len(b), end)
            if lo < hi:
                buf[lo - off:hi - off] = b[lo - o:hi - o]
        return bytes(buf)

    async def _read(self, h: _Handle, off: int, size: int) -> bytes:
        spans = [(o, min(self.max_io, off + size - o)) for o in range(off, off + size, self.max_io)]
        # the pieces of one large read go out together, on different identities
        pieces = await asyncio.gather(*(self.call("read", h.ino, o, n, cred=h.cred, read_only=True)
                                        for o, n in spans))
        out = []
        for (_o, n), piece in zip(spans, pieces):
            out.append(piece)
            if len(piece) < n:  # end of file
                break
        return b"".join(out)

    @_guard
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if not len(buf):
            return 0
        if self.write_behind:
            # write-behind: contiguous writes through one descriptor gather here and are sent
            # at the latest at close (flush) or fsync, or before anything that looks at the
            # inode (getattr, read, setattr, lookup, readdir, open, link, unlink, rename)
            ext = self.dirty.get(h.ino)
            if ext and (ext[0][2] != h.cred or sum(len(e[1]) for e in ext) + len(buf) > WRITE_BEHIND_MAX
                        or h.ino in self.pattrs):  # (a write after a gathered setattr: in order)
                await self._flush_writes(h.ino)
            self.dirty[h.ino] = _merge(self.dirty.get(h.ino, []), off, buf, h.cred)
            return len(buf)
        await self._send_writes(h.ino, [(off, bytes(buf), h.cred)], h.opened_ns)
        return len(buf)

    async def _flush_writes(self, ino: int) -> bool:
        """Send the writes gathered for ``ino`` (in order): whether there were any (they are agreed
        when it returns); an error is raised here and again at the next flush or fsync of the file."""
        sent = False
        lock = self.flushing.get(ino)
        if ino in self.dirty or lock is not None:
            if lock is None:
                lock = self.flushing[ino] = asyncio.Lock()
            async with lock:  # one flush of an inode at a time, so that writes land in order
                ext = self.dirty.pop(ino, None)
                pend = self.pattrs.pop(ino, ())
                if ext:
                    try:
                        await self._send_writes(ino, [(o, bytes(b), c) for o, b, c in ext], None,
                                                [(m, t) for m, t, _lt, _w in pend])
                        sent = True
                    except BFSError as e:
                        self.write_errors[ino] = e.errno or E.EIO
                        raise
                    except (PbftError, ValueError):
                        self.write_errors[ino] = E.EIO
                        raise
        err = self.write_errors.pop(ino, None)
        if err:
            raise BFSError(err, os.strerror(err))
        return sent

    async def _flush_all(self) -> None:
        for ino in list(self.dirty):
            await self._flush_writes(ino)

    async def _send_writes(self, ino: int, extents, opened_ns, pattrs=()) -> None:
        """Send writes (``[(offset, data, cred)]``) and then the changes of mode and times
        ``[(mode|None, (atime, mtime))]`` gathered after them: one ``update`` when they fit in a
        request, or each write (a large one in pieces, independent, sent together) and then the
        attribute changes."""
        parts = [(o + d, b[d:d + self.max_io], c) for o, b, c in extents for d in range(0, len(b), self.max_io)]
        self.cattr.pop(ino, None)
        self.pread.discard(ino)
        g = self._snap()
        steps = [(UPDATE_WRITE, o, piece) for o, piece, _c in parts] \
            + [(UPDATE_SETATTR, m, None, None, None, t) for m, t in pattrs]
        sent = 0
        a = None
        if (len(steps) > 1 and len(steps) <= UPDATE_STEPS_MAX and len({c for _o, _p, c in parts}) == 1
                and sum(len(p) for _o, p, _c in parts) <= self.max_io - 1024):
            try:
                sent += 1
                a = await self.call("update", ino, tuple(steps), cred=parts[0][2])
            except BFSError:  # nothing happened: one by one, so that the writes a refused step
                pass  # came after still land (and replicas without ``update`` get what they know)
        if a is None:
            sent += len(parts)
            attrs = await asyncio.gather(*(self.call("write", ino, o, piece, cred=c) for o, piece, c in parts))
            a = max(attrs, key=lambda x: (x[A_CTIME], x[A_SIZE]))
            for m, t in pattrs:
                sent += 1
                a = await self.call("setattr", ino, m, None, None, None, t, cred=parts[-1][2])
        self._own_attr(g, a, sent)
        self.known[ino] = (a[A_SIZE], a[A_MTIME])
        if self.enable_writeback_cache and opened_ns is not None:
            if len(self.wrote) > 100_000:
                self.wrote.clear()
            self.wrote.setdefault(ino, opened_ns)
        if ino in self.pages:  # the pages hold what we wrote (a concurrent writer elsewhere: docs/bfs.md)
            self._pages(ino, self.known[ino])

    @_guard
    async def flush(self, fh):
        h = self.handles.get(fh)
        if h is not None:  # close: the gathered writes are sent and agreed before close returns
            await self._flush_writes(h.ino)

    @_guard
    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        # writes sent here, once agreed, are ordered after everything done before this fsync
        # began: they are the point the ordered no-op would be, and it is left out
        if not await self._flush_writes(h.ino) or not self.fsync_fold:
            await self.call("fsync", h.ino, cred=h.cred)

    @_guard
    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        c = self.open_count.get(h.ino, 0) - 1
        if c > 0:
            self.open_count[h.ino] = c
            return
        self.open_count.pop(h.ino, None)
        try:
            await self._flush_writes(h.ino)  # (flush came first; in case it did not)
        except (BFSError, PbftError, ValueError):
            pass
        lock = self.flushing.get(h.ino)
        if lock is not None and not lock.locked() and h.ino not in self.dirty:
            del self.flushing[h.ino]
        who = self.orphans.pop(h.ino, None)
        if who is not None:
            await self.call("release", h.ino, cred=h.cred, ident=who)

    # ---- directories ---------------------------------------------------------------------------
    @_guard
    async def opendir(self, inode, ctx):
        cred = self.cred(ctx)
        a = await self.call("getattr", inode, cred=cred, read_only=True)
        if not a[A_MODE] & 0o040000:
            raise pyfuse3.FUSEError(E.ENOTDIR)
        return self._fh(_Handle(inode, cred, True))

    @_guard
    async def readdir(self, fh, start_id, token):
        h = self._handle(fh)
        if self.dirty:  # the listing's attributes include our own writes
            await self._flush_all()
        # offsets 1 and 2 are "." and ".."; the service's cookies (from 1) follow, shifted by 2
        if start_id < 2:
            a = self.entry(await self.call("getattr", h.ino, cred=h.cred, read_only=True))
            if start_id < 1 and not pyfuse3.readdir_reply(token, b".", a, 1):
                return
            if not pyfuse3.readdir_reply(token, b"..", a, 2):
                return
            start_id = 2
        cookie = start_id - 2
        while True:
            g, ep = self._snap(), self.ve
            ents, eof, resume = await self.call("readdir", h.ino, cookie, 256, cred=h.cred, read_only=True)
            if self._quiet(g, ep):
                for name, _ck, a in ents:
                    self._put_entry(h.ino, name, a[A_INO], ep)
                    self._put_attr(a, ep)
            for name, ck, a in ents:
                if not pyfuse3.readdir_reply(token, name, self.entry(a), ck + 2):
                    return
            if eof or type(resume) is not int or resume <= cookie:
                return
            cookie = resume

    @_guard
    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    @_guard
    async def fsyncdir(self, fh, datasync):
        h = self._handle(fh)
        await self.call("fsync", h.ino, cred=h.cred)

    @_guard
    async def forget(self, inode_list):
        return None  # inode numbers are never reused: nothing to track

    @_guard
    async def access(self, inode, mode, ctx):
        return True  # default_permissions: the kernel checks, and the replicas check again


async def run_mount(cluster, identities: list[int], mountpoint: str, strict: bool = False, timeout_s: float = 60.0,
                    cache_s: float = 1.0, debug: bool = False, ready=None, **caching) -> None:
    """Mount and serve until unmounted (``fusermount3 -u``) or SIGTERM/SIGINT."""
    import signal

    pool = ClientPool(cluster, [cluster.identity(i) for i in identities])
    await pool.start(5.0)
    ops = BFSOperations(pool, identities, strict=strict, timeout_s=timeout_s, cache_s=cache_s, **caching)
    try:
        await ops.start()
        opts = set(pyfuse3.default_options)
        opts |= {"fsname=pbft-bfs", "subtype=bfs", "noatime"}
        if os.geteuid() == 0:
            opts.add("allow_other")
        if debug:
            opts.add("debug")
        pyfuse3.init(ops, mountpoint, opts)
    except BaseException:
        await pool.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    loop.add_signal_handler(signal.SIGUSR1, ops.log_counters, logging.WARNING)  # (asked for: at any log level)
    if ready is not None:
        ready()
    try:
        await pyfuse3.main()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        try:
            await ops._flush_all()  # writes still gathered (files left open at a SIGTERM)
        except Exception:
            log.warning("bfs mount: writes to %d files could not be sent at the end", len(ops.dirty))
        try:
            for ino, who in list(ops.orphans.items()):
                await ops.call("release", ino, cred=(0, 0, ()), ident=who)
        except Exception:  # the cluster may be gone: a later mount's release_all drops them
            pass
        pyfuse3.close(unmount=True)
        await pool.close()
        ops.log_counters()


def mount_main(cluster, identities: list[int], mountpoint: str, **kw) -> None:
    pyfuse3.asyncio.enable()
    try:  # the replicas' event loop: less CPU per request than asyncio's own
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        asyncio.run(run_mount(cluster, identities, mountpoint, **kw))
    else:
        uvloop.run(run_mount(cluster, identities, mountpoint, **kw))
