"""Linearizability checker for key-value histories.

The search is Wing & Gong's algorithm with the memoisation cache of Lowe
("Testing for linearizability", Concurrency and Computation 2017): the
history is turned into a time-ordered, doubly linked list of call and return
entries; the checker repeatedly linearizes a call entry that occurs before the
first remaining return entry (i.e. an operation that is minimal in the
real-time order among the not-yet-linearized ones), applies it to the
sequential model, and backtracks when it meets a return entry whose
operation has not been linearized yet.  Configurations
``(set of linearized ops as a bitset, model state)`` that have already been
explored are cached and never explored twice.  Operations without a response
are handled with a subsumption refinement of that cache (see below).

The history is first partitioned by key (P-compositionality: every operation
touches exactly one key, and the per-key objects are independent), so each
key is checked on its own, much smaller, sub-history.

Sequential specification of one key (initially absent):

* ``get``    -> current value, or ``None`` when absent; no change;
* ``put``    -> sets the value, returns ``True``;
* ``delete`` -> returns whether the key existed, then makes it absent;
* ``cas``    -> if the current value equals ``expected`` (``None`` means
  "absent") sets it to ``value`` and returns ``True``; else returns
  ``False`` and changes nothing.

Operations without a response (``ret is None``: pending / timed out) may have
taken effect at any point after their invocation, or never; their result is
not checked.  They are given a return time of +infinity and the search stops
successfully as soon as every *completed* operation has been linearized (any
pending operation left over is simply "never took effect", which is the same
as taking effect after everything else, since nothing observes it).

Result conventions for completed operations: ``get`` must report the value
(``bytes``) or ``None``; ``delete`` and ``cas`` must report ``True``/``False``
(anything else matches no linearization); a ``put`` matches unless its result
is ``False`` (a put always succeeds, so ``True`` or an unrecorded ``None``
are both accepted).

Before searching, two cheap necessary conditions are checked per key (a
value is observed although no write of it had been invoked; a "stale read"
of a value with a single, completed writer that a completed overwrite
separates from the reader in real time); they only ever reject histories
that the search would reject too, but with an instant, precise message.
Values that no operation observes are merged into one abstract value, which
is exact and makes, e.g., timed-out puts of never-read values interchangeable.

Standard library only; the search is iterative (explicit stack), so
sub-histories with thousands of operations are fine.  ``max_nodes`` bounds
the search steps per key; exceeding it is reported as a failure whose detail
starts with "search budget exceeded", never as success.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

__all__ = ["KvOp", "LinResult", "check_kv_history", "format_op"]


@dataclass(slots=True)
class KvOp:
    client: int
    kind: str            # "get" | "put" | "delete" | "cas"
    key: bytes
    value: bytes | None = None      # put: new value; cas: new value
    expected: bytes | None = None   # cas only: expected current value; None means "key must be absent"
    invoke: float = 0.0             # invocation time
    ret: float | None = None        # response time; None = no response (pending / timed out)
    result: object = None           # get -> bytes | None; put -> True; delete -> bool; cas -> bool


@dataclass(slots=True)
class LinResult:
    ok: bool
    key: bytes | None = None     # first key whose sub-history is not linearizable
    detail: str = ""             # human-readable explanation (ops of that key, short)
    explored: int = 0            # search nodes explored (all keys)


_GET, _PUT, _DEL, _CAS = 0, 1, 2, 3

# Run the cheap necessary-condition checks (value never written, stale read)
# before the search.  Only tests turn this off, to exercise the search alone.
_PRECHECKS = True
_KINDS = {"get": _GET, "put": _PUT, "delete": _DEL, "cas": _CAS}

# Outcome codes of _check_key.
_OK, _FAIL, _BUDGET = 0, 1, 2


def _short(v: object, limit: int = 24) -> str:
    if isinstance(v, (bytes, bytearray)):
        r = repr(bytes(v))
        if len(r) > limit:
            r = r[: limit - 3] + "..."
        return r
    return repr(v)


def format_op(op: KvOp) -> str:
    """A compact one-line rendering of an operation, for diagnostics."""
    if op.kind == "get":
        call = f"get({_short(op.key)})"
    elif op.kind == "put":
        call = f"put({_short(op.key)}, {_short(op.value)})"
    elif op.kind == "delete":
        call = f"delete({_short(op.key)})"
    elif op.kind == "cas":
        call = f"cas({_short(op.key)}, {_short(op.expected)} -> {_short(op.value)})"
    else:
        call = f"{op.kind}({_short(op.key)})"
    if op.ret is None:
        return f"c{op.client} {call} -> ? [{op.invoke:g}, pending]"
    return f"c{op.client} {call} -> {_short(op.result)} [{op.invoke:g}, {op.ret:g}]"


def _validate(op: KvOp) -> int:
    kind = _KINDS.get(op.kind)
    if kind is None:
        raise ValueError(f"unknown operation kind {op.kind!r} in {op!r}")
    if op.ret is not None and op.ret < op.invoke:
        raise ValueError(f"operation returns before it is invoked: {op!r}")
    return kind


def _precheck(ops, kinds, n, val, exp, res, pend):
    """Cheap necessary conditions; returns a failure description or None."""
    # A value (or, for delete -> True, any
    # value) can only be seen if some write of it was invoked before the
    # observing op returned.
    first_write: dict[int, float] = {}
    for i in range(n):
        if kinds[i] == _PUT or kinds[i] == _CAS:
            t = ops[i].invoke
            for v in (val[i], -5):   # -5: "any value"
                if t < first_write.get(v, math.inf):
                    first_write[v] = t
    for i in range(n):
        if pend[i]:
            continue
        k = kinds[i]
        need = None
        if k == _GET and res[i] > 0:
            need = res[i]
        elif k == _CAS and res[i] == 1 and exp[i] > 0:
            need = exp[i]
        elif k == _DEL and res[i] == 1:
            need = -5
        if need is not None and not first_write.get(need, math.inf) <= ops[i].ret:
            what = "any value" if need == -5 else "that value"
            return (f"{format_op(ops[i])} observes a value, but no write of "
                    f"{what} was invoked before it returned")

    # Second cheap necessary condition (stale read): if the value seen by a
    # completed get / successful cas has exactly one writer w, w completed,
    # and some completed overwrite c (put, delete, successful cas) lies
    # strictly between w and the observer in real time, then the value had
    # been overwritten for good before the observer started.
    writers: dict[int, list[int]] = {}
    for i in range(n):
        if kinds[i] == _PUT or kinds[i] == _CAS:
            writers.setdefault(val[i], []).append(i)
    over = sorted((ops[i].invoke, ops[i].ret, i) for i in range(n)
                  if not pend[i] and (kinds[i] == _PUT or kinds[i] == _DEL
                                      or (kinds[i] == _CAS and res[i] == 1)))
    if over:
        over_inv = [t for t, _, _ in over]
        # suffix minimum of return times (and which op attains it)
        suf = [(math.inf, -1)] * (len(over) + 1)
        for x in range(len(over) - 1, -1, -1):
            suf[x] = min(suf[x + 1], (over[x][1], over[x][2]))
        for i in range(n):
            if pend[i]:
                continue
            k = kinds[i]
            if k == _GET and res[i] > 0:
                v = res[i]
            elif k == _CAS and res[i] == 1 and exp[i] > 0:
                v = exp[i]
            else:
                continue
            ws = writers.get(v)
            if not ws or len(ws) != 1 or pend[ws[0]]:
                continue
            w = ws[0]
            # the earliest-returning overwrite invoked after w returned
            # (w itself is not among them: w.invoke <= w.ret)
            t, c = suf[bisect_right(over_inv, ops[w].ret)]
            if t < ops[i].invoke:
                return (f"stale read: {format_op(ops[i])} observes the value of "
                        f"{format_op(ops[w])}, which {format_op(ops[c])} had "
                        f"overwritten before it started")

    return None


_NB = -2        # "no block of pending ops in progress"
_NEVER = -1     # result code that matches no state


def _check_key(ops: list[KvOp], kinds: list[int], max_nodes: int):
    """Check the sub-history of one key.

    Returns ``(outcome, explored, detail)``; ``detail`` explains a ``_FAIL``.

    Completed operations live in Wing & Gong's doubly linked list of call and
    return entries.  Pending operations (whose return is at +infinity) are
    kept apart, in invocation order: one is available at a search node when
    it was invoked no later than the first remaining return entry.  Because
    a pending op has no upper time bound and no checked result, any
    linearization can be rearranged (by moving pending ops later, or dropping
    them) into a canonical one in which pending ops only occur in short
    *blocks* placed immediately before a completed op that could not have
    been linearized without them:

    * a block is followed by a completed op that does not match in the state
      before the block (otherwise the block could move past it, or be
      dropped) and that matches in the state after it;
    * every pending op in a block changes the state (else drop it);
    * only the first op of a block may be a put or delete (a put/delete
      overwrites whatever the earlier ops of the block did);
    * of several identical pending ops (same kind, value, expected), the one
      invoked first is used first (they are interchangeable once invoked).

    The search only enumerates canonical linearizations, so it stays complete
    while pending ops that never took effect cost next to nothing.
    """
    # Pending gets neither change the state nor constrain anything: drop them.
    keep = [i for i in range(len(ops)) if not (ops[i].ret is None and kinds[i] == _GET)]
    ops = [ops[i] for i in keep]
    kinds = [kinds[i] for i in keep]
    n = len(ops)
    if n == 0:
        return _OK, 0, None

    # Intern values: state 0 = absent, 1.. = distinct byte strings.
    ids: dict[bytes, int] = {}

    def vid(v) -> int:
        if v is None:
            return 0
        v = bytes(v)
        i = ids.get(v)
        if i is None:
            i = ids[v] = len(ids) + 1
        return i

    val = [0] * n   # put/cas: new value id
    exp = [0] * n   # cas: expected value id
    res = [0] * n   # coded result of completed ops (get: value id; others 1/0)
    pend = [False] * n
    for i, op in enumerate(ops):
        k = kinds[i]
        pend[i] = op.ret is None
        if k == _PUT or k == _CAS:
            val[i] = vid(op.value)
        if k == _CAS:
            exp[i] = vid(op.expected)
        if pend[i]:
            continue
        r = op.result
        if k == _GET:
            if r is None or isinstance(r, (bytes, bytearray)):
                res[i] = vid(r)
            else:
                res[i] = _NEVER
        elif k == _PUT:
            res[i] = 0 if r is False else 1
        else:  # delete / cas: a bool
            res[i] = 1 if r is True else 0 if r is False else _NEVER

    # Values that are never observed (no completed get returns them, no cas
    # expects them) are indistinguishable from each other: collapse them all
    # into one abstract "present, never observed" value.  This is exact (no
    # op can tell them apart) and makes e.g. all timed-out puts of unread
    # values interchangeable.
    observed = {exp[i] for i in range(n) if kinds[i] == _CAS}
    observed.update(res[i] for i in range(n) if kinds[i] == _GET and not pend[i])
    unobs = len(ids) + 1
    for i in range(n):
        if (kinds[i] == _PUT or kinds[i] == _CAS) and val[i] not in observed:
            val[i] = unobs

    if _PRECHECKS:
        found = _precheck(ops, kinds, n, val, exp, res, pend)
        if found is not None:
            return _FAIL, 0, found

    def matches(i: int, s: int) -> bool:
        """Does completed op i return its recorded result in state s?"""
        k = kinds[i]
        if k == _GET:
            return res[i] == s
        if k == _PUT:
            return res[i] == 1
        if k == _DEL:
            return res[i] == (1 if s else 0)
        return res[i] == (1 if s == exp[i] else 0)

    comp = [i for i in range(n) if not pend[i]]
    # Pending ops in invocation order (ties by input order).
    pops = sorted((i for i in range(n) if pend[i]), key=lambda i: ops[i].invoke)
    remaining = len(comp)
    if remaining == 0:
        return _OK, 0, None
    npend = len(pops)
    pinv = [ops[i].invoke for i in pops]

    # Entries of completed ops sorted by time; at equal times calls come
    # before returns, so that a.ret == b.invoke makes a and b concurrent
    # (real-time precedence is strict).
    events: list[tuple[float, int, int]] = []
    for i in comp:
        ret = ops[i].ret
        assert ret is not None  # the components hold completed operations only
        events.append((ops[i].invoke, 0, i))
        events.append((ret, 1, i))
    events.sort()

    # Doubly linked list over positions 1..2c, head sentinel 0, tail sentinel END.
    m = len(events)
    END = m + 1
    nxt = list(range(1, m + 2)) + [END]
    prv = [0] + list(range(0, m + 1))
    e_op = [0] * (m + 2)
    e_call = [False] * (m + 2)
    e_time = [0.0] * (m + 2)
    ret_pos = [0] * n
    for p, (t, is_ret, i) in enumerate(events, start=1):
        e_op[p] = i
        e_time[p] = t
        if is_ret:
            ret_pos[i] = p
        else:
            e_call[p] = True
    bit = [0] * n
    # Completed ops are numbered in call order, so a linearized set is a
    # prefix of ones plus a few bits near the frontier; the cache stores it
    # as (bits above the prefix, prefix length) to keep the keys small.
    c = 0
    for p in range(1, m + 1):
        if e_call[p]:
            bit[e_op[p]] = 1 << c
            c += 1

    # Pending-op bookkeeping.
    pbit = [1 << j for j in range(npend)]
    pkind = [kinds[i] for i in pops]
    pval = [val[i] for i in pops]
    pexp = [exp[i] for i in pops]
    prev_same = [-1] * npend       # previous identical pending op (symmetry)
    last_of: dict[tuple[int, int, int], int] = {}
    cas_left: dict[int, int] = {}  # unlinearized pending cas ops by expected value
    for j in range(npend):
        sig = (pkind[j], pval[j], pexp[j] if pkind[j] == _CAS else 0)
        prev_same[j] = last_of.get(sig, -1)
        last_of[sig] = j
        if pkind[j] == _CAS:
            cas_left[pexp[j]] = cas_left.get(pexp[j], 0) + 1

    state = 0
    bs = _NB      # state before the current block of pending ops, or _NB
    lin = 0       # bitset of linearized completed ops
    plin = 0      # bitset of linearized pending ops
    # Frames: (pending?, list position / pending index, state, bs, jl, needs)
    stack: list[tuple] = []
    # Lowe's cache: (completed bitset, state, block start) -> pending bitsets
    # seen.  A node whose set of linearized pending ops is a superset of one
    # already seen with the same key is dominated (the extra pending ops could
    # equally never have taken effect) and is not explored again.  Without
    # pending ops this is exactly Lowe's (bitset, state) cache.
    cache: dict[tuple[int, int, int, int], list[int]] = {}
    explored = 0
    best_depth = -1
    best_info = None

    mode = 0          # 0: scan completed calls in the list; 1: scan pending ops
    pos = nxt[0]
    j = jl = 0
    needs = None
    while True:
        if mode == 0:
            if e_call[pos]:
                i = e_op[pos]
                explored += 1
                if explored > max_nodes:
                    return _BUDGET, explored, None
                k = kinds[i]
                if k == _GET:
                    ok = res[i] == state
                    new = state
                elif k == _PUT:
                    ok = res[i] == 1
                    new = val[i]
                elif k == _DEL:
                    ok = res[i] == (1 if state else 0)
                    new = 0
                else:
                    sw = state == exp[i]
                    ok = res[i] == (1 if sw else 0)
                    new = val[i] if sw else state
                if ok and (bs == _NB or not matches(i, bs)):
                    nl = lin | bit[i]
                    f = (~nl & (nl + 1)).bit_length() - 1
                    ck = (nl >> f, f, new, _NB)
                    seen = cache.get(ck)
                    if seen is None:
                        cache[ck] = [plin]
                        fresh = True
                    elif not npend:
                        fresh = False
                    else:
                        fresh = True
                        for q in seen:
                            if q & plin == q:
                                fresh = False
                                break
                        if fresh:
                            seen[:] = [q for q in seen if q & plin != plin]
                            seen.append(plin)
                    if fresh:
                        stack.append((False, pos, state, bs, 0, None))
                        state = new
                        bs = _NB
                        lin = nl
                        # lift the call and its return out of the list
                        a = nxt[pos]
                        b = prv[pos]
                        nxt[b] = a
                        prv[a] = b
                        r = ret_pos[i]
                        a = nxt[r]
                        b = prv[r]
                        nxt[b] = a
                        prv[a] = b
                        remaining -= 1
                        if remaining == 0:
                            return _OK, explored, None
                        pos = nxt[0]
                        continue
                pos = nxt[pos]
                continue
            # Reached the first return entry: no further completed candidate.
            if len(stack) > best_depth:
                best_depth = len(stack)
                best_info = (len(stack), state, pos, [fr for fr in stack[-3:]])
            if npend:
                # Which states would let some completed candidate, failing
                # in the state before the block, be linearized?
                s0 = state if bs == _NB else bs
                eq = set()
                ne = set()
                present = False
                q = nxt[0]
                while q != pos:
                    if e_call[q]:
                        c = e_op[q]
                        if res[c] != _NEVER and not matches(c, s0):
                            k = kinds[c]
                            if k == _GET:
                                eq.add(res[c])
                            elif k == _DEL:
                                if res[c]:
                                    present = True
                                else:
                                    eq.add(0)
                            elif k == _CAS:
                                if res[c]:
                                    eq.add(exp[c])
                                else:
                                    ne.add(exp[c])
                    q = nxt[q]
                if eq or ne or present:
                    needs = (eq, ne, present)
                    jl = bisect_right(pinv, e_time[pos])
                    j = 0
                    mode = 1
                    continue
        else:
            pushed = False
            while j < jl:
                if plin & pbit[j]:
                    j += 1
                    continue
                k = pkind[j]
                if bs != _NB and k != _CAS:
                    j += 1
                    continue
                ps = prev_same[j]
                if ps >= 0 and not plin & pbit[ps]:
                    j += 1
                    continue
                if k == _PUT:
                    new = pval[j]
                elif k == _DEL:
                    new = 0
                else:
                    new = pval[j] if state == pexp[j] else state
                if new == state:
                    j += 1
                    continue
                assert needs is not None  # set by the scan of completed calls that led here
                eq, ne, present = needs
                if not (new in eq or (present and new != 0)
                        or (ne and (len(ne) > 1 or new not in ne))
                        or cas_left.get(new, 0) > 0):
                    j += 1
                    continue
                explored += 1
                if explored > max_nodes:
                    return _BUDGET, explored, None
                nbs = state if bs == _NB else bs
                npl = plin | pbit[j]
                f = (~lin & (lin + 1)).bit_length() - 1
                ck = (lin >> f, f, new, nbs)
                seen = cache.get(ck)
                if seen is None:
                    cache[ck] = [npl]
                    fresh = True
                else:
                    fresh = True
                    for q in seen:
                        if q & npl == q:
                            fresh = False
                            break
                    if fresh:
                        seen[:] = [q for q in seen if q & npl != npl]
                        seen.append(npl)
                if not fresh:
                    j += 1
                    continue
                stack.append((True, j, state, bs, jl, needs))
                state = new
                bs = nbs
                plin = npl
                if k == _CAS:
                    cas_left[pexp[j]] -= 1
                mode = 0
                pos = nxt[0]
                pushed = True
                break
            if pushed:
                continue

        # Backtrack.
        if not stack:
            break
        is_p, where, state, bs, jl, needs = stack.pop()
        if is_p:
            j = where
            plin ^= pbit[j]
            if pkind[j] == _CAS:
                cas_left[pexp[j]] += 1
            j += 1
            mode = 1
        else:
            pos = where
            i = e_op[pos]
            # unlift (reverse order of removal)
            r = ret_pos[i]
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            nxt[prv[pos]] = pos
            prv[nxt[pos]] = pos
            lin ^= bit[i]
            remaining += 1
            pos = nxt[pos]
            mode = 0

    # Not linearizable: describe the deepest partial linearization.
    assert best_info is not None  # the first step of the search sets it
    depth, st, blocked_pos, frames = best_info
    prefix = [ops[pops[fr[1]]] if fr[0] else ops[e_op[fr[1]]] for fr in frames]
    inv = {v: k for k, v in ids.items()}
    state_repr = ("absent" if st == 0 else "<a value never read>" if st == unobs
                  else _short(inv[st]))
    blocked = ops[e_op[blocked_pos]] if blocked_pos != END else None
    return _FAIL, explored, _describe_failure(depth, state_repr, blocked, prefix, ops)


def _describe_failure(depth, state_repr, blocked, prefix, ops, limit: int = 12) -> str:
    n_done = sum(1 for o in ops if o.ret is not None)
    lines = [
        f"{len(ops)} ops ({n_done} completed); longest partial linearization has "
        f"{depth} ops, leaving state {state_repr}"
    ]
    if blocked is not None:
        lines.append(f"  stuck: this op cannot be linearized before it returns: "
                     f"{format_op(blocked)}")
        lo = blocked.invoke
        hi = blocked.ret if blocked.ret is not None else math.inf
        near = [o for o in ops
                if o.invoke <= hi and (o.ret is None or o.ret >= lo)]
        if prefix:
            lines.append("  last linearized: " + "; ".join(format_op(o) for o in prefix[-3:]))
        lines.append(f"  ops overlapping it ({len(near)}):")
        for o in near[:limit]:
            lines.append("    " + format_op(o))
        if len(near) > limit:
            lines.append(f"    ... {len(near) - limit} more")
    return "\n".join(lines)


def check_kv_history(ops: list[KvOp], max_nodes: int = 2_000_000) -> LinResult:
    """Check that a key-value history is linearizable.

    Each key is checked independently (in order of first appearance).  The
    first key whose sub-history is not linearizable is reported.  If the
    search for a key takes more than ``max_nodes`` steps and no other key is
    definitely not linearizable, the result is ``ok=False`` with a detail
    starting with "search budget exceeded": a budget overrun is never
    reported as success.  ``explored`` counts search steps over all keys.

    Raises ``ValueError`` for an unknown ``kind`` or ``ret < invoke``.
    """
    by_key: dict[bytes, tuple[list[KvOp], list[int]]] = {}
    for op in ops:
        kind = _validate(op)
        entry = by_key.get(op.key)
        if entry is None:
            entry = by_key[op.key] = ([], [])
        entry[0].append(op)
        entry[1].append(kind)

    total = 0
    over_budget: tuple[bytes, int] | None = None
    for key, (kops, kinds) in by_key.items():
        outcome, explored, info = _check_key(kops, kinds, max_nodes)
        total += explored
        if outcome == _FAIL:
            return LinResult(ok=False, key=key,
                             detail=f"key {_short(key, 40)}: not linearizable: {info}",
                             explored=total)
        if outcome == _BUDGET and over_budget is None:
            # Keep going: a definite violation on another key is more useful.
            over_budget = (key, len(kops))
    if over_budget is not None:
        key, nops = over_budget
        return LinResult(
            ok=False, key=key,
            detail=(f"search budget exceeded for key {_short(key, 40)}: "
                    f"explored more than {max_nodes} nodes on {nops} ops; "
                    f"linearizability undetermined"),
            explored=total)
    return LinResult(ok=True, explored=total)
