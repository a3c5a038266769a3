"""Tests for the key-value linearizability checker (pbft.sim.linearizability)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pbft.sim.linearizability as lin
from pbft.sim.linearizability import KvOp, LinResult, check_kv_history

K = b"k"


@pytest.fixture(params=["prechecks", "search-only"])
def mode(request, monkeypatch):
    """Run a test both with the cheap pre-checks and with the search alone."""
    monkeypatch.setattr(lin, "_PRECHECKS", request.param == "prechecks")
    return request.param


def get(c, t0, t1, result, key=K):
    return KvOp(c, "get", key, invoke=t0, ret=t1, result=result)


def put(c, t0, t1, value, key=K, result=True):
    return KvOp(c, "put", key, value=value, invoke=t0, ret=t1,
                result=result if t1 is not None else None)


def delete(c, t0, t1, result, key=K):
    return KvOp(c, "delete", key, invoke=t0, ret=t1, result=result)


def cas(c, t0, t1, expected, value, result, key=K):
    return KvOp(c, "cas", key, value=value, expected=expected, invoke=t0, ret=t1,
                result=result)


def ok(ops, **kw) -> bool:
    r = check_kv_history(ops, **kw)
    assert isinstance(r, LinResult)
    if r.ok:
        assert r.key is None
    else:
        assert r.detail
    return r.ok


# ---------------------------------------------------------------- sequential

def test_empty_history():
    r = check_kv_history([])
    assert r.ok and r.key is None


def test_sequential_valid(mode):
    h = [
        get(0, 0, 1, None),
        put(0, 2, 3, b"a"),
        get(1, 4, 5, b"a"),
        put(1, 6, 7, b"b"),
        get(0, 8, 9, b"b"),
        delete(0, 10, 11, True),
        get(1, 12, 13, None),
        delete(1, 14, 15, False),
    ]
    assert ok(h)


def test_sequential_invalid_read(mode):
    h = [put(0, 0, 1, b"a"), put(0, 2, 3, b"b"), get(1, 4, 5, b"a")]
    r = check_kv_history(h)
    assert not r.ok
    assert r.key == K
    assert "not linearizable" in r.detail


def test_initial_state_is_absent(mode):
    assert not ok([get(0, 0, 1, b"a")])
    assert ok([get(0, 0, 1, None)])
    assert not ok([delete(0, 0, 1, True)])
    assert ok([delete(0, 0, 1, False)])


def test_read_of_deleted_key_rejected(mode):
    h = [put(0, 0, 1, b"a"), delete(0, 2, 3, True), get(0, 4, 5, b"a")]
    assert not ok(h)


# ---------------------------------------------------------------- concurrency

def test_overlapping_put_get_either_order(mode):
    # put [0, 10] overlaps get [1, 2]: the get may see the old or the new value.
    assert ok([put(0, 0, 10, b"a"), get(1, 1, 2, None)])
    assert ok([put(0, 0, 10, b"a"), get(1, 1, 2, b"a")])
    assert not ok([put(0, 0, 10, b"a"), get(1, 1, 2, b"z")])


def test_two_concurrent_puts_then_reads(mode):
    h = [put(0, 0, 5, b"a"), put(1, 0, 5, b"b")]
    assert ok(h + [get(2, 6, 7, b"a")])
    assert ok(h + [get(2, 6, 7, b"b")])
    # Two later sequential reads cannot observe different values.
    assert not ok(h + [get(2, 6, 7, b"a"), get(2, 8, 9, b"b")])
    assert ok(h + [get(2, 6, 7, b"b"), get(2, 8, 9, b"b")])


def test_stale_read_after_completed_write_rejected(mode):
    h = [put(0, 0, 1, b"a"), put(0, 2, 3, b"b"), get(1, 4, 5, b"a")]
    assert not ok(h)
    # Overlapping the second write it is fine.
    h = [put(0, 0, 1, b"a"), put(0, 2, 6, b"b"), get(1, 4, 5, b"a")]
    assert ok(h)


def test_reads_cannot_go_back_in_time(mode):
    # Concurrent with the write, the first read sees the new value, a later
    # read (which starts after the first one returned) sees the old one.
    h = [put(0, 0, 1, b"a"), put(0, 2, 10, b"b"), get(1, 3, 4, b"b"), get(2, 5, 6, b"a")]
    assert not ok(h)
    # If the two reads overlap each other, the order can be swapped.
    h = [put(0, 0, 1, b"a"), put(0, 2, 10, b"b"), get(1, 3, 6, b"b"), get(2, 5, 7, b"a")]
    assert ok(h)


def test_touching_intervals_are_concurrent(mode):
    # a.ret == b.invoke: a does not strictly precede b, so either order is fine.
    assert ok([put(0, 0, 1, b"a"), get(1, 1, 2, None)])
    # Strict precedence rejects it.
    assert not ok([put(0, 0, 1, b"a"), get(1, 1.5, 2, None)])


# ---------------------------------------------------------------- cas / delete

def test_cas_semantics(mode):
    assert ok([cas(0, 0, 1, None, b"a", True), get(0, 2, 3, b"a")])
    assert not ok([cas(0, 0, 1, None, b"a", False)])          # absent == None: must swap
    assert not ok([cas(0, 0, 1, b"x", b"a", True)])           # absent != b"x": cannot swap
    assert ok([cas(0, 0, 1, b"x", b"a", False), get(0, 2, 3, None)])
    assert not ok([cas(0, 0, 1, b"x", b"a", False), get(0, 2, 3, b"a")])  # failed cas has no effect
    h = [put(0, 0, 1, b"x"), cas(0, 2, 3, b"x", b"y", True), get(0, 4, 5, b"y"),
         cas(1, 6, 7, b"x", b"z", False), cas(1, 8, 9, None, b"z", False), get(1, 10, 11, b"y")]
    assert ok(h)
    # expected=None on a present key must fail
    assert not ok([put(0, 0, 1, b"x"), cas(0, 2, 3, None, b"y", True)])


def test_concurrent_cas_only_one_winner(mode):
    h = [cas(0, 0, 5, None, b"a", True), cas(1, 0, 5, None, b"b", True)]
    assert not ok(h)
    h = [cas(0, 0, 5, None, b"a", True), cas(1, 0, 5, None, b"b", False), get(2, 6, 7, b"a")]
    assert ok(h)
    h = [cas(0, 0, 5, None, b"a", True), cas(1, 0, 5, None, b"b", False), get(2, 6, 7, b"b")]
    assert not ok(h)
    # Chained: the second cas can only win if it is ordered after the first.
    h = [cas(0, 0, 5, None, b"a", True), cas(1, 0, 5, b"a", b"b", True), get(2, 6, 7, b"b")]
    assert ok(h)


def test_delete_result(mode):
    assert ok([put(0, 0, 1, b"a"), delete(0, 2, 3, True), delete(0, 4, 5, False)])
    assert not ok([put(0, 0, 1, b"a"), delete(0, 2, 3, False)])
    assert not ok([put(0, 0, 1, b"a"), delete(0, 2, 3, True), delete(0, 4, 5, True)])
    # Two concurrent deletes: exactly one of them saw the key.
    h = [put(0, 0, 1, b"a"), delete(0, 2, 5, True), delete(1, 2, 5, True)]
    assert not ok(h)
    h = [put(0, 0, 1, b"a"), delete(0, 2, 5, False), delete(1, 2, 5, True)]
    assert ok(h)
    # A delete result that is not a bool matches nothing.
    assert not ok([delete(0, 0, 1, None)])


def test_put_result_false_rejected(mode):
    assert not ok([put(0, 0, 1, b"a", result=False)])


# ---------------------------------------------------------------- pending ops

def test_pending_put_may_or_may_not_be_visible(mode):
    visible = [put(0, 0, None, b"a"), get(1, 5, 6, b"a"), get(1, 7, 8, b"a")]
    invisible = [put(0, 0, None, b"a"), get(1, 5, 6, None), get(1, 7, 8, None)]
    late = [put(0, 0, None, b"a"), get(1, 5, 6, None), get(1, 7, 8, b"a")]
    assert ok(visible)
    assert ok(invisible)
    assert ok(late)     # took effect between the reads
    # Once seen it cannot disappear again (only one effect, and nothing deletes).
    assert not ok([put(0, 0, None, b"a"), get(1, 5, 6, b"a"), get(1, 7, 8, None)])


def test_pending_effect_before_invocation_rejected(mode):
    # The read returned before the put was even invoked.
    h = [get(1, 0, 1, b"a"), put(0, 2, None, b"a")]
    assert not ok(h)
    # Same shape but overlapping the invocation: fine.
    h = [get(1, 0, 3, b"a"), put(0, 2, None, b"a")]
    assert ok(h)


def test_pending_result_is_unconstrained(mode):
    # A pending cas or delete carries a garbage result: ignored.
    h = [put(0, 0, 1, b"a"), KvOp(1, "cas", K, value=b"b", expected=b"a", invoke=2,
                                  ret=None, result=False), get(2, 5, 6, b"b")]
    assert ok(h)
    h = [put(0, 0, 1, b"a"), KvOp(1, "delete", K, invoke=2, ret=None, result=False),
         get(2, 5, 6, None)]
    assert ok(h)
    # A pending get constrains nothing.
    assert ok([KvOp(1, "get", K, invoke=0, ret=None, result=b"zzz")])


def test_pending_cas_effect_depends_on_state(mode):
    # The pending cas(x -> y) can only produce y when the value is x.
    h = [put(0, 0, 1, b"q"), cas(1, 2, None, b"x", b"y", None), get(2, 5, 6, b"y")]
    assert not ok(h)
    h = [put(0, 0, 1, b"x"), cas(1, 2, None, b"x", b"y", None), get(2, 5, 6, b"y")]
    assert ok(h)


def test_pending_op_takes_effect_at_most_once(mode):
    h = [put(0, 0, None, b"a"), get(1, 1, 2, b"a"), put(1, 3, 4, b"b"),
         get(1, 5, 6, b"a"), put(1, 7, 8, b"c"), get(1, 9, 10, b"a")]
    assert not ok(h)
    # Two distinct pending puts of the same value can account for two returns.
    h = [put(0, 0, None, b"a"), put(2, 0, None, b"a"), get(1, 1, 2, b"a"),
         put(1, 3, 4, b"b"), get(1, 5, 6, b"a")]
    assert ok(h)


def test_pending_cas_chain(mode):
    # Only pending put(x) followed by pending cas(x -> y) can explain the read.
    h = [put(0, 0, 1, b"z"), put(1, 2, None, b"x"), cas(2, 2, None, b"x", b"y", None),
         get(0, 5, 6, b"y")]
    assert ok(h)
    # Without the put(x) the cas cannot fire.
    assert not ok([put(0, 0, 1, b"z"), cas(2, 2, None, b"x", b"y", None), get(0, 5, 6, b"y")])


def test_pending_ops_needed_after_alternative_orders(mode):
    # Found by the brute-force cross-check: valid only if a pending delete is
    # kept for later, so the search must not prune a configuration that used
    # fewer pending ops in favour of one that used more.
    h = [
        KvOp(0, "cas", K, value=b"v0", expected=None, invoke=8, ret=11, result=True),
        KvOp(2, "get", K, invoke=1, ret=4, result=b"v0"),
        KvOp(2, "put", K, value=b"v0", invoke=0, ret=4, result=True),
        KvOp(3, "put", K, value=b"v0", invoke=2, ret=6, result=True),
        KvOp(2, "put", K, value=b"v0", invoke=0, ret=None),
        KvOp(1, "put", K, value=b"v0", invoke=7, ret=None),
        KvOp(1, "delete", K, invoke=2, ret=None),
        KvOp(2, "cas", K, value=b"v0", expected=None, invoke=4, ret=7, result=True),
    ]
    assert brute_force(h)
    assert ok(h)


# ---------------------------------------------------------------- keys

def test_keys_are_independent(mode):
    a, b = b"a", b"b"
    h = [put(0, 0, 1, b"1", key=a), get(1, 2, 3, None, key=b), get(1, 4, 5, b"1", key=a)]
    assert ok(h)
    # Value written to one key does not show up under another.
    h = [put(0, 0, 1, b"1", key=a), get(1, 2, 3, b"1", key=b)]
    r = check_kv_history(h)
    assert not r.ok and r.key == b
    # A bad key is identified even when others are fine.
    h = [put(0, 0, 1, b"1", key=a), get(0, 2, 3, b"1", key=a),
         put(1, 0, 1, b"2", key=b), put(1, 2, 3, b"3", key=b), get(1, 4, 5, b"2", key=b)]
    r = check_kv_history(h)
    assert not r.ok and r.key == b
    assert r.explored > 0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        check_kv_history([KvOp(0, "frobnicate", K, invoke=0, ret=1)])
    with pytest.raises(ValueError):
        check_kv_history([KvOp(0, "get", K, invoke=2, ret=1)])


def test_budget_exceeded_is_not_ok(mode):
    h = [put(c, 0, 100, bytes([65 + c])) for c in range(6)] + [get(9, 101, 102, b"A")]
    assert ok(h)
    r = check_kv_history(h, max_nodes=2)
    assert not r.ok
    assert r.detail.startswith("search budget exceeded")
    # invalid history, tiny budget: still never ok
    h = [put(c, 0, 100, bytes([65 + c])) for c in range(6)] + [get(9, 101, 102, b"Z")]
    assert not check_kv_history(h, max_nodes=3).ok
    assert not check_kv_history(h).ok


def test_budget_overrun_on_one_key_does_not_hide_violation_on_another(mode):
    hard = [put(c, 0, 100, bytes([65 + c])) for c in range(6)] + [get(9, 101, 102, b"A")]
    bad = [put(0, 0, 1, b"x", key=b"other"), put(0, 2, 3, b"y", key=b"other"),
           get(1, 4, 5, b"x", key=b"other")]
    r = check_kv_history(hard + bad, max_nodes=10)
    assert not r.ok and r.key == b"other"
    assert not r.detail.startswith("search budget exceeded")
    r = check_kv_history(hard + bad[:2], max_nodes=10)
    assert not r.ok and r.key == K and r.detail.startswith("search budget exceeded")


# ---------------------------------------------------------------- brute force cross-check

def _spec(state, op):
    """Sequential spec: (result, new_state)."""
    if op.kind == "get":
        return state, state
    if op.kind == "put":
        return True, op.value
    if op.kind == "delete":
        return state is not None, None
    if state == op.expected:
        return True, op.value
    return False, state


def _matches(op, res):
    if op.kind == "put":
        return op.result is not False
    if op.kind == "get":
        return op.result == res
    return op.result is res


def brute_force(ops) -> bool:
    """Exhaustive check of a small history (all keys at once)."""
    completed = [o for o in ops if o.ret is not None]
    pending = [o for o in ops if o.ret is None]

    def before(a, b):
        ar = math.inf if a.ret is None else a.ret
        return ar < b.invoke

    for r in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, r):
            sel = completed + list(chosen)
            for perm in itertools.permutations(sel):
                if any(before(perm[j], perm[i])
                       for i in range(len(perm)) for j in range(i + 1, len(perm))):
                    continue
                states = {}
                good = True
                for op in perm:
                    res, new = _spec(states.get(op.key), op)
                    if op.ret is not None and not _matches(op, res):
                        good = False
                        break
                    states[op.key] = new
                if good:
                    return True
    return False


def random_small_history(rng: random.Random, n: int, keys=(b"a", b"b")):
    """Small random histories with random results: some valid, many not."""
    vals = [None] + [b"v%d" % i for i in range(rng.choice([1, 2, 3]))]
    p_pending = rng.choice([0.0, 0.2, 0.4])
    ops = []
    for _ in range(n):
        kind = rng.choice(["get", "put", "delete", "cas", "cas"])
        key = rng.choice(keys)
        t0 = rng.randint(0, 8)
        t1 = None if rng.random() < p_pending else t0 + rng.randint(0, 4)
        c = rng.randint(0, 3)
        v = rng.choice(vals[1:])
        if kind == "get":
            ops.append(KvOp(c, kind, key, invoke=t0, ret=t1, result=rng.choice(vals)))
        elif kind == "put":
            ops.append(KvOp(c, kind, key, value=v, invoke=t0, ret=t1,
                            result=True if t1 is not None else None))
        elif kind == "delete":
            ops.append(KvOp(c, kind, key, invoke=t0, ret=t1, result=rng.random() < 0.5))
        else:
            ops.append(KvOp(c, kind, key, value=v, expected=rng.choice(vals),
                            invoke=t0, ret=t1, result=rng.random() < 0.5))
    return ops


@pytest.mark.parametrize("seed", range(1000))
def test_agrees_with_brute_force(seed, mode):
    rng = random.Random(seed)
    h = random_small_history(rng, rng.randint(1, 7), keys=(b"a",) if seed % 2 else (b"a", b"b"))
    assert check_kv_history(h).ok == brute_force(h), h


def test_brute_force_sample_has_both_outcomes():
    # Guard against the cross-check above being vacuous.
    outcomes = set()
    for seed in range(1000):
        rng = random.Random(seed)
        h = random_small_history(rng, rng.randint(1, 7), keys=(b"a",) if seed % 2 else (b"a", b"b"))
        outcomes.add(brute_force(h))
    assert outcomes == {True, False}



# ---------------------------------------------------------------- generated histories

def generate_history(rng: random.Random, n_ops: int, n_keys: int, n_clients: int,
                     n_values: int = 4, p_pending: float = 0.0, unique: bool = False):
    """A history produced by an actual sequential execution.

    Each client issues one operation at a time; every operation gets a
    linearization point inside its [invoke, ret] interval (pending ones at any
    time after invocation, or never) and the results come from executing the
    operations in linearization-point order.  Times are coarse (multiples of
    0.5) so that equal timestamps occur.  With ``unique`` every write has a
    fresh value and cas expects a recently written one (like the simulator's
    workload); otherwise values come from a small pool.
    """
    keys = [b"key%d" % i for i in range(n_keys)]
    values = [b"v%d" % i for i in range(n_values)]
    written = {k: [] for k in keys}
    clock = [rng.randint(0, 3) * 0.5 for _ in range(n_clients)]
    planned = []  # (linearization point or None, op)
    for _ in range(n_ops):
        c = rng.randrange(n_clients)
        t0 = clock[c]
        t1 = t0 + rng.randint(0, 8) * 0.5
        kind = rng.choices(["get", "put", "delete", "cas"], weights=[4, 3, 1, 2])[0]
        key = rng.choice(keys)
        op = KvOp(c, kind, key, invoke=t0, ret=t1)
        if kind in ("put", "cas"):
            if unique:
                op.value = b"u%d" % len(planned)
                op.expected = rng.choice(written[key][-3:] + [None])
            else:
                op.value = rng.choice(values)
                op.expected = rng.choice(values + [None])
            written[key].append(op.value)
            if kind == "put":
                op.expected = None
        if rng.random() < p_pending:
            op.ret = None
            lp = None if rng.random() < 0.4 else t0 + rng.uniform(0, 20)
        else:
            lp = rng.uniform(t0, t1)
        planned.append((lp, op))
        clock[c] = t1 + rng.randint(0, 4) * 0.5
    state = {}
    for _lp, op in sorted((p for p in planned if p[0] is not None), key=lambda p: p[0]):
        res, state[op.key] = _spec(state.get(op.key), op)
        if op.ret is not None:
            op.result = res
    ops = [op for _, op in planned]
    rng.shuffle(ops)  # input order must not matter
    return ops


def mutate_get(rng: random.Random, ops):
    """Change one completed get's result to a value never written."""
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.ret is not None]
    if not gets:
        return None
    i = rng.choice(gets)
    ops = list(ops)
    o = ops[i]
    ops[i] = KvOp(o.client, o.kind, o.key, invoke=o.invoke, ret=o.ret, result=b"never-written")
    return ops, o.key


def mutate_stale(rng: random.Random, ops):
    """With unique values: make a get return the value of a put p1 although a
    later put p2 (p1.ret < p2.invoke, p2.ret < get.invoke) overwrote it.
    Invalid whatever else happens, since nothing else writes that value."""
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.ret is not None]
    puts = sorted((o for o in ops if o.kind == "put" and o.ret is not None),
                  key=lambda o: o.invoke)
    rng.shuffle(gets)
    for i in gets:
        g = ops[i]
        for p1 in puts:
            if p1.key != g.key or p1.value == g.result or p1.ret >= g.invoke:
                continue
            if any(p2.key == g.key and p2.invoke > p1.ret and p2.ret < g.invoke for p2 in puts):
                bad = list(ops)
                bad[i] = KvOp(g.client, "get", g.key, invoke=g.invoke, ret=g.ret,
                              result=p1.value)
                return bad, g.key
    return None


def _rejected(ops, key):
    r = check_kv_history(ops)
    assert not r.ok
    assert r.key == key
    assert not r.detail.startswith("search budget exceeded"), r.detail


@pytest.mark.parametrize("seed", range(40))
def test_generated_histories_accepted_and_mutations_rejected(seed, monkeypatch):
    rng = random.Random(1000 + seed)
    n_ops = rng.choice([20, 80, 300])
    p_pending = 0.1 if seed % 3 == 0 else 0.0
    h = generate_history(rng, n_ops, n_keys=rng.randint(1, 4), n_clients=rng.randint(2, 8),
                         p_pending=p_pending)
    r = check_kv_history(h)
    assert r.ok, r.detail
    bad, key = mutate_get(rng, h)
    _rejected(bad, key)
    # The search alone (no pre-checks) must agree.
    monkeypatch.setattr(lin, "_PRECHECKS", False)
    assert check_kv_history(h).ok
    if p_pending == 0.0:
        _rejected(bad, key)


@pytest.mark.parametrize("seed", range(30))
def test_generated_unique_value_histories_and_stale_reads(seed, monkeypatch):
    rng = random.Random(2000 + seed)
    h = generate_history(rng, rng.choice([50, 200, 500]), n_keys=rng.randint(1, 3),
                         n_clients=rng.randint(2, 6), unique=True,
                         p_pending=0.05 if seed % 2 else 0.0)
    assert check_kv_history(h).ok
    m = mutate_stale(rng, h)
    assert m is not None
    bad, key = m
    _rejected(bad, key)
    monkeypatch.setattr(lin, "_PRECHECKS", False)
    assert check_kv_history(h).ok
    _rejected(bad, key)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False),
       n_ops=st.integers(1, 60), n_keys=st.integers(1, 3), n_clients=st.integers(1, 6),
       p_pending=st.sampled_from([0.0, 0.2]), unique=st.booleans())
def test_hypothesis_generated_histories(rng, n_ops, n_keys, n_clients, p_pending, unique):
    h = generate_history(rng, n_ops, n_keys, n_clients, n_values=3, p_pending=p_pending,
                         unique=unique)
    r = check_kv_history(h)
    assert r.ok, r.detail
    m = mutate_get(rng, h)
    if m is not None:
        bad, key = m
        r = check_kv_history(bad)
        assert not r.ok and r.key == key


@pytest.mark.parametrize("unique", [False, True])
def test_large_history_search_stays_small(unique):
    # 2000 ops, 8 keys, 6 clients with one outstanding op each. The search effort is counted
    # in explored nodes (deterministic), not seconds: a few per op, far from the budget.
    rng = random.Random(7)
    h = generate_history(rng, 2000, n_keys=8, n_clients=6, unique=unique)
    r = check_kv_history(h)
    assert r.ok, r.detail
    assert r.explored < 20_000, r.explored
    bad, key = mutate_get(rng, h)
    r = check_kv_history(bad)
    assert not r.ok and r.key == key
    assert r.explored < 20_000, r.explored


def test_long_single_key_history_no_recursion_limit():
    rng = random.Random(11)
    h = generate_history(rng, 5000, n_keys=1, n_clients=4, p_pending=0.01)
    r = check_kv_history(h)
    assert r.ok, r.detail
