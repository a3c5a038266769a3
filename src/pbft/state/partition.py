"""Checkpointed state: objects, copy-on-write checkpoints and the partition tree.

The replicated state is an array of ``n`` *objects* (byte strings): fixed-size pages,
or abstract objects in the BASE style (each replica may implement them differently,
as long as ``get_obj`` returns the same bytes for the same logical state).  The
library never looks inside an object.  It needs three things from the state's
owner (the ``backend``):

* ``get_obj(i) -> bytes``: the current value of object ``i``;
* ``put_objs({i: bytes})``: replace objects (rollback, state transfer; raise
  ``ValueError`` on bytes ``get_obj`` could not have produced);
* a call to :meth:`CheckpointedState.modify` *before* object ``i`` first changes.

**Copy-on-write checkpoints.**  ``checkpoint(n)`` freezes the state as of sequence
number ``n``: it returns the checkpoint digest and opens a *record* for ``n``.  The
first ``modify(i)`` after that saves the old value of ``i`` into the newest record,
so a record holds, for every object changed after its checkpoint, the value it had
at the checkpoint.  The value of ``i`` at checkpoint ``c`` is the first saved copy
in the records ``>= c``, or the current value.  Several checkpoints are retained
at once (everything from the last stable one on), ``rollback(c)`` returns to any of
them (undo of tentative execution), and ``discard_below(c)`` garbage-collects.
Memory: the current state plus one copy of each object changed within the window.

**Partition tree.**  A ``fanout``-ary tree of digests covers the objects: a leaf
is ``H(i, value)`` (all-zero for an empty object); an interior node is, as in the
original, an incremental *AdHash*: the sum modulo 2^2048 of ``E(leaf)`` over every
leaf below it, ``E`` a hash expanded to 2048 bits (SHAKE-256), so that a node is the
sum of its children and a changed leaf updates each ancestor with one addition,
whatever the fanout.  The checkpoint digest is ``H(seqno, H(root))``: it binds the
sequence number.  A checkpoint hashes only the objects modified since the last one
and adds their deltas to their ancestors: its cost depends on what changed, not on
the size of the state (``benchmarks/state_bench.py``).  Forging children that add
up to a certified parent is a k-sum problem in a 2048-bit group (Wagner's algorithm
needs about 2^(2048/(1+lg k)) work, ~2^97 even for k = 2^20 leaves).  Tree nodes are
copy-on-write like objects, so every retained checkpoint's tree can be served.

**State transfer** (:class:`Fetcher`): a replica that must reach a checkpoint whose
digest it knows to be certified walks the tree of that checkpoint top-down.  Each
reply is checked against a digest already certified (the root against the
checkpoint digest, every child list against its parent), so data from a faulty
replier is rejected and never installed; only partitions whose digest differs
from the local one are descended, so only stale or corrupt objects move.  The
walk is depth-first with one child list per level on the stack: memory is
bounded by ``depth * fanout`` whatever the size of the state.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from hashlib import blake2b, shake_256
from typing import Any, Optional, Protocol, Union, cast

from ..digests import checkpoint_digest

EMPTY_LEAF = bytes(32)
SUM_BYTES = 256  # an interior node on the wire: its AdHash sum, big-endian
MASK = (1 << (8 * SUM_BYTES)) - 1
Node = Union[bytes, int]  # a leaf digest, or an interior node's sum


class Backend(Protocol):
    def get_obj(self, i: int) -> bytes: ...

    def put_objs(self, objs: dict[int, bytes]) -> None: ...


_LEAF = blake2b(digest_size=32, person=b"pbft.leaf")  # copied: cheaper than set up each time


def leaf_digest(i: int, value: bytes) -> bytes:
    if not value:
        return EMPTY_LEAF
    h = _LEAF.copy()
    h.update(i.to_bytes(8, "big"))
    h.update(value)
    return h.digest()


def expand(leaf: bytes) -> int:
    """E(leaf): a leaf digest's contribution to the sums of its ancestors (0 if empty)."""
    if leaf == EMPTY_LEAF:
        return 0
    return int.from_bytes(shake_256(b"pbft.adhash" + leaf).digest(SUM_BYTES), "big")


def sum_digest(total: int) -> bytes:
    """The 32-byte digest of an interior node's sum (the root's goes into checkpoint digests)."""
    return blake2b(total.to_bytes(SUM_BYTES, "big"), digest_size=32, person=b"pbft.root").digest()


def children_sum(children: tuple[bytes, ...], leaves: bool) -> Optional[int]:
    """The sum a parent must have for these children (wire form); None if malformed."""
    total = 0
    if leaves:
        for c in children:
            if len(c) != 32:
                return None
            total += expand(c)
    else:
        for c in children:
            if len(c) != SUM_BYTES:
                return None
            total += int.from_bytes(c, "big")
    return total & MASK


class Record:
    """What a retained checkpoint needs beyond the current state: the values, at its
    checkpoint, of the objects and tree nodes that changed after it."""

    __slots__ = ("seqno", "digest", "root", "objs", "nodes")

    def __init__(self, seqno: int, digest: bytes, root: bytes):
        self.seqno = seqno
        self.digest = digest
        self.root = root
        self.objs: dict[int, bytes] = {}
        self.nodes: dict[tuple[int, int], Node] = {}


class CheckpointedState:
    def __init__(self, backend: Backend, n_objects: int, fanout: int = 256, bind_seqno: bool = True):
        if n_objects < 1:
            raise ValueError("a state has at least one object")
        if fanout < 2:
            raise ValueError("the partition tree's fanout must be at least 2")
        self.backend = backend
        self.n = n_objects
        self.F = fanout
        self.bind_seqno = bind_seqno
        counts = [n_objects]
        while counts[0] > 1:
            counts.insert(0, -(-counts[0] // fanout))
        if len(counts) == 1:  # a single object still gets a root above it
            counts.insert(0, 1)
        self.counts = counts  # nodes per level: counts[0] == 1 (the root), counts[-1] == n_objects
        self.depth = len(counts) - 1  # the leaf level
        # levels 0..depth-1: AdHash sums (ints); level depth: leaf digests (bytes)
        self.tree: list[list[Any]] = [[0] * c for c in counts[:-1]] + [[EMPTY_LEAF] * counts[-1]]
        self.dirty: set[int] = set()
        self.unpersisted: set[int] = set()  # modified since the state was last written to disk
        self.records: list[Record] = []  # ascending seqno
        # Objects changed in two flushes running are likely to change again (counters, the reply
        # table, a directory being filled): for those, the last flush keeps the bytes it read,
        # for as long as the object stays unchanged (``modify`` takes them out: the copy a first
        # ``modify`` after a checkpoint saves, without asking the backend to encode the object
        # again), and E(leaf) of the leaf it set (a cache of a pure function: the next flush
        # subtracts it without expanding the old leaf again).  Objects changed once are not
        # kept: random writes over a large state would only hold memory.
        self.flushed: set[int] = set()  # the objects the last flush hashed
        self.clean: dict[int, bytes] = {}
        self.expanded: dict[bytes, int] = {}
        self.stats = {"checkpoints": 0, "leaves_hashed": 0, "nodes_hashed": 0, "objects_saved": 0}
        self.rebuild()

    # ------------------------------------------------------------------
    # tree maintenance
    # ------------------------------------------------------------------
    def rebuild(self) -> list[int]:
        """Recompute every leaf from the current objects (a full check of the state against
        the tree) and every interior node.  Returns the objects whose leaf digest changed:
        those modified without ``modify`` (a bug, or corruption in memory)."""
        leaves = self.tree[self.depth]
        get = self.backend.get_obj
        changed = []
        self.clean = {}
        for i in range(self.n):
            d = leaf_digest(i, get(i))
            if leaves[i] != d:
                changed.append(i)
                self._set_node(self.depth, i, d)
        self.dirty.clear()
        F = self.F
        for lvl in range(self.depth - 1, -1, -1):
            child = self.tree[lvl + 1]
            for x in range(self.counts[lvl]):
                part = child[x * F:(x + 1) * F]
                total = (sum(map(expand, part)) if lvl + 1 == self.depth else sum(part)) & MASK
                if self.tree[lvl][x] != total:
                    self._set_node(lvl, x, total)
        self.stats["leaves_hashed"] += self.n
        return changed

    def _set_node(self, lvl: int, x: int, d: Node) -> None:
        row = self.tree[lvl]
        if self.records:
            saved = self.records[-1].nodes
            if (lvl, x) not in saved:
                saved[(lvl, x)] = row[x]
        row[x] = d

    def flush(self) -> None:
        """Bring the tree up to date with the objects modified since the last flush."""
        if not self.dirty:
            return
        F = self.F
        depth = self.depth
        leaves = self.tree[depth]
        get = self.backend.get_obj
        # copy-on-write of tree nodes into the newest record (inlined: this loop is the cost
        # of a checkpoint)
        saved = self.records[-1].nodes if self.records else None
        delta: dict[int, int] = {}  # leaf-parent -> change of its sum
        clean: dict[int, bytes] = {}
        exp: dict[bytes, int] = {}
        last = self.flushed
        last_exp = self.expanded
        for i in self.dirty:
            v = get(i)
            d = leaf_digest(i, v)
            old = leaves[i]
            hot = i in last
            if hot:
                clean[i] = v
            if old != d:
                if saved is not None:
                    saved.setdefault((depth, i), old)
                leaves[i] = d
                p = i // F
                e_new = expand(d)
                if hot:
                    exp[d] = e_new
                e_old = last_exp.get(old)
                delta[p] = delta.get(p, 0) + e_new - (expand(old) if e_old is None else e_old)
            elif hot and old in last_exp:
                exp[d] = last_exp[old]
        self.clean = clean
        self.expanded = exp
        self.stats["leaves_hashed"] += len(self.dirty)
        self.flushed = self.dirty
        self.dirty = set()
        for lvl in range(depth - 1, -1, -1):
            row = self.tree[lvl]
            up: dict[int, int] = {}
            for x, dx in delta.items():
                if dx:
                    if saved is not None:
                        saved.setdefault((lvl, x), row[x])
                    row[x] = (row[x] + dx) & MASK
                    y = x // F
                    up[y] = up.get(y, 0) + dx
            self.stats["nodes_hashed"] += len(delta)
            delta = up
            if not delta:
                break

    @property
    def root(self) -> bytes:
        """Digest of the current state (the root's sum, hashed)."""
        self.flush()
        return sum_digest(self.tree[0][0])

    def current_digest(self, seqno: int) -> bytes:
        """Checkpoint digest the current state would have at ``seqno``."""
        return checkpoint_digest(seqno, self.root, bind_seqno=self.bind_seqno)

    # ------------------------------------------------------------------
    # the owner's interface
    # ------------------------------------------------------------------
    def modify(self, i: int) -> None:
        """Must be called before object ``i`` changes (at least once per change between
        checkpoints; further calls are cheap)."""
        if i in self.dirty:
            return
        if not 0 <= i < self.n:
            raise IndexError(f"object {i} out of range 0..{self.n - 1}")
        self.dirty.add(i)
        self.unpersisted.add(i)
        v = self.clean.pop(i, None)
        if self.records:
            saved = self.records[-1].objs
            if i not in saved:
                saved[i] = self.backend.get_obj(i) if v is None else v
                self.stats["objects_saved"] += 1

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def checkpoint(self, seqno: int) -> bytes:
        """Freeze the current state as checkpoint ``seqno``; returns its digest."""
        if self.records and seqno <= self.records[-1].seqno:
            raise ValueError(f"checkpoint {seqno} not above {self.records[-1].seqno}")
        d = self.current_digest(seqno)
        self.records.append(Record(seqno, d, sum_digest(self.tree[0][0])))
        self.stats["checkpoints"] += 1
        return d

    def seqnos(self) -> list[int]:
        return [r.seqno for r in self.records]

    def _record(self, seqno: int) -> Record:
        for r in self.records:
            if r.seqno == seqno:
                return r
        raise KeyError(f"no retained checkpoint {seqno}")

    def has(self, seqno: int) -> bool:
        return any(r.seqno == seqno for r in self.records)

    def digest(self, seqno: int) -> bytes:
        return self._record(seqno).digest

    def root_at(self, seqno: int) -> bytes:
        return self._record(seqno).root

    def rollback(self, seqno: int) -> None:
        """Return the state (objects and tree) to retained checkpoint ``seqno``; later
        checkpoints are forgotten."""
        keep = [r for r in self.records if r.seqno <= seqno]
        if not keep or keep[-1].seqno != seqno:
            raise KeyError(f"no retained checkpoint {seqno}")
        objs: dict[int, bytes] = {}
        nodes: dict[tuple[int, int], Node] = {}
        for r in reversed(self.records):  # newest first: older copies overwrite newer ones
            if r.seqno < seqno:
                break
            objs.update(r.objs)
            nodes.update(r.nodes)
        if objs:
            self.backend.put_objs(objs)
        for (lvl, x), d in nodes.items():
            self.tree[lvl][x] = d
        self.records = keep
        keep[-1].objs.clear()
        keep[-1].nodes.clear()
        self.dirty.clear()
        self.clean = {}  # (the objects changed behind ``modify``'s back)

    def discard_below(self, seqno: int) -> None:
        """Forget the checkpoints below ``seqno`` (garbage collection after it became stable)."""
        self.records = [r for r in self.records if r.seqno >= seqno]

    def discard_all(self) -> None:
        self.records = []

    def value_at(self, seqno: int, i: int) -> bytes:
        for r in self.records:
            if r.seqno >= seqno and i in r.objs:
                return r.objs[i]
        v = self.clean.get(i)
        return self.backend.get_obj(i) if v is None else v

    def node_at(self, seqno: int, lvl: int, x: int) -> Node:
        key = (lvl, x)
        for r in self.records:
            if r.seqno >= seqno and key in r.nodes:
                return r.nodes[key]
        node: Node = self.tree[lvl][x]
        return node

    def children_count(self, lvl: int, x: int) -> int:
        lo = x * self.F
        return max(0, min(lo + self.F, self.counts[lvl + 1]) - lo)

    def children_at(self, seqno: int, lvl: int, x: int) -> Optional[tuple[bytes, ...]]:
        """The children of node (lvl, x) at retained checkpoint ``seqno``, in wire form: leaf
        digests below the last interior level, sums (``SUM_BYTES`` each) above it."""
        if not (0 <= lvl < self.depth and 0 <= x < self.counts[lvl]):
            return None
        lo = x * self.F
        hi = min(lo + self.F, self.counts[lvl + 1])
        kids = [self.node_at(seqno, lvl + 1, c) for c in range(lo, hi)]
        if lvl + 1 == self.depth:  # leaf digests
            return tuple(cast("list[bytes]", kids))
        return tuple(k.to_bytes(SUM_BYTES, "big") for k in cast("list[int]", kids))

    def saved_bytes(self) -> int:
        """Bytes held by the records (the copies the retained checkpoints need)."""
        return sum(len(v) for r in self.records for v in r.objs.values())


class Fetcher:
    """The requesting side of a state transfer to checkpoint (seqno, digest).

    :meth:`requests` says what to ask next: up to ``window`` requests ``(level, index,
    want)`` in flight at once, where an empty ``want`` asks for the children of node
    (level, index) and a non-empty one for those leaves below a node of the last interior
    level.  Replies go to :meth:`on_meta` / :meth:`on_data`, which return ``None`` if the
    reply was accepted, else a reason to drop it (the caller then asks another replier).
    Verified objects are installed at once (``modify`` + ``put_objs``); :meth:`finish`
    checks the whole result.  The walk is depth-first, so what it holds is bounded by
    ``depth * window * fanout`` entries whatever the size of the state.
    """

    def __init__(self, state: CheckpointedState, seqno: int, digest: bytes, max_objs: int = 64, window: int = 16):
        self.st = state
        self.seqno = seqno
        self.digest = digest
        self.max_objs = max_objs
        self.window = window
        state.flush()  # our tree must describe our objects: equal subtrees are skipped
        self.root_pending = True
        # nodes still to ask about, depth-first: (level, index, certified sum)
        self.stack: list[tuple[int, int, int]] = []
        # leaf-parent -> [(object, certified leaf digest), ...] still to fetch
        self.leaves: dict[int, list[tuple[int, bytes]]] = {}
        # requests in flight: ("m", level, index) -> certified sum; ("d", parent) -> None
        self.outstanding: dict[tuple[Any, ...], Optional[int]] = {}
        self.fetched_objs = 0
        self.fetched_bytes = 0
        self.metas = 0

    # what to ask ---------------------------------------------------------
    def requests(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """New requests to send now (those already in flight are not repeated)."""
        st = self.st
        out: list[tuple[int, int, tuple[int, ...]]] = []
        if self.root_pending:
            if ("m", 0, 0) not in self.outstanding:
                self.outstanding[("m", 0, 0)] = None
                out.append((0, 0, ()))
            return out
        room = self.window - len(self.outstanding)
        for x, want in self.leaves.items():  # objects first: they free memory
            if room <= 0:
                break
            if ("d", x) not in self.outstanding:
                self.outstanding[("d", x)] = None
                out.append((st.depth - 1, x, tuple(i for i, _ in want[: self.max_objs])))
                room -= 1
        while room > 0 and self.stack:
            lvl, x, total = self.stack.pop()
            self.outstanding[("m", lvl, x)] = total
            out.append((lvl, x, ()))
            room -= 1
        return out

    def in_flight(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """Every request in flight, to send again (to another replier, after a timeout)."""
        st = self.st
        out: list[tuple[int, int, tuple[int, ...]]] = []
        for key in self.outstanding:
            if key[0] == "m":
                out.append((key[1], key[2], ()))
            else:
                out.append((st.depth - 1, key[1], tuple(i for i, _ in self.leaves[key[1]][: self.max_objs])))
        return out

    def done(self) -> bool:
        return not (self.root_pending or self.stack or self.leaves or self.outstanding)

    # replies ---------------------------------------------------------------
    def on_meta(self, lvl: int, x: int, children: tuple[bytes, ...]) -> Optional[str]:
        st = self.st
        key = ("m", lvl, x)
        if key not in self.outstanding:
            return "meta-unrequested"
        expect = st.children_count(lvl, x) if 0 <= lvl < st.depth and 0 <= x < st.counts[lvl] else -1
        if len(children) != expect:
            return "meta-bad-shape"
        leaves = lvl + 1 == st.depth
        total = children_sum(children, leaves)
        if total is None:
            return "meta-bad-shape"
        if self.root_pending:
            if checkpoint_digest(self.seqno, sum_digest(total), bind_seqno=st.bind_seqno) != self.digest:
                return "meta-digest-mismatch"
            self.root_pending = False
        elif total != self.outstanding[key]:
            return "meta-digest-mismatch"
        del self.outstanding[key]
        self.metas += 1
        base = x * st.F
        mine = st.tree[lvl + 1]
        if leaves:
            differ = [(base + k, d) for k, d in enumerate(children) if mine[base + k] != d]
            if differ:
                self.leaves[x] = differ
            return None
        sums = [int.from_bytes(c, "big") for c in children]
        for c, total in reversed([(base + k, t) for k, t in enumerate(sums) if mine[base + k] != t]):
            self.stack.append((lvl + 1, c, total))  # pop() takes the lowest index first
        return None

    def on_data(self, lvl: int, x: int, objs: tuple[tuple[int, bytes], ...]) -> Optional[str]:
        st = self.st
        if ("d", x) not in self.outstanding or lvl != st.depth - 1 or not objs:
            return "data-unrequested"
        expect = dict(self.leaves[x])
        for i, v in objs:
            if expect.get(i) != leaf_digest(i, v):
                return "data-digest-mismatch"
        got = dict(objs)
        for i in got:
            st.modify(i)
        st.backend.put_objs(got)
        self.fetched_objs += len(got)
        self.fetched_bytes += sum(len(v) for v in got.values())
        del self.outstanding[("d", x)]
        rest = [(i, d) for i, d in self.leaves[x] if i not in got]
        if rest:
            self.leaves[x] = rest
        else:
            del self.leaves[x]
        return None

    def finish(self) -> bool:
        """After the walk: whether the state now has the target digest.  (It has unless an
        installed object does not read back as the same bytes: a service whose objects are
        not canonical.  An object corrupted in memory behind the tree's back is invisible
        to the walk and to this check; ``rebuild`` finds it.)"""
        return self.st.current_digest(self.seqno) == self.digest
