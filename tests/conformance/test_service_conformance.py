"""The ``Service`` contract, checked against every shipped service (``helpers.impls.SERVICES``):
deterministic execution (also across processes with different hash seeds), checkpoint /
rollback / state-transfer round trips through the library's own ``ReplicaState``, the object
form's ``get_obj`` / ``put_objs`` / ``modify`` rules (or the whole-state form's ``get_state`` /
``set_state``), malformed operations answered without raising, and read-only operations that
change nothing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from helpers.impls import SERVICES, ServiceImpl, service_impl  # noqa: F401 - service_impl: a fixture
from pbft.state.replica_state import ReplicaState

T0_MS = 1_700_000_000_000.0

each_service = pytest.mark.parametrize("impl", SERVICES, ids=[s.name for s in SERVICES])
OBJECT_FORM = [s for s in SERVICES if s.make().n_objects]
WHOLE_STATE_FORM = [s for s in SERVICES if not s.make().n_objects]
object_services = pytest.mark.parametrize("impl", OBJECT_FORM, ids=[s.name for s in OBJECT_FORM])


def snapshot(svc) -> tuple:
    """The service's whole state, as checkpoints see it."""
    if svc.n_objects:
        return tuple(svc.get_obj(i) for i in range(svc.n_objects))
    return (svc.get_state(),)


def run(svc, ops, start: int = 0) -> list[bytes]:
    """Execute ``ops`` as a replica does: each with the nondet the primary proposed at its time."""
    out = []
    for i, (op, client, ro) in enumerate(ops, start):
        now = T0_MS + 10.0 * i
        nondet = svc.propose_nondet(now)
        assert svc.check_nondet(nondet, now), "a backup must accept a correct primary's value"
        out.append(svc.execute(op, client, nondet, ro))
    return out


def malformed(impl: ServiceImpl) -> list[bytes]:
    """Garbage a faulty client could send: random bytes, msgpack of wrong shapes and types, and
    every workload operation cut short or with bytes appended."""
    rng = random.Random(5)
    junk = [b"", b"\x00", b"\xc1", b"\xff" * 9, rng.randbytes(64), rng.randbytes(2000)]
    pk = lambda x: msgpack.packb(x, use_bin_type=True)  # noqa: E731
    junk += [pk(x) for x in (None, 7, -1, 2**64 - 1, 1.5, "get", b"get", [], [None], [1, 2], ["get"],
                             ["put", 1, 2], ["put", "k", "v"], ["?" * 300, b"k"], [[["deep"]]] * 3,
                             {"op": "get"}, ["get", b"k", {"x": 1}], ["open", "a" * 10_000])]
    junk.append(msgpack.packb([b"x"] * 5000))
    for op, _, _ in impl.workload():
        junk += [op[: len(op) // 2], op[:-1], op + b"\x00"]
    return junk


def test_every_shipped_service_is_in_the_suite():
    import importlib
    import pkgutil

    import pbft.services
    from pbft.service import ObjectService, Service
    shipped = set()
    for m in pkgutil.walk_packages(pbft.services.__path__, "pbft.services."):
        try:
            mod = importlib.import_module(m.name)
        except ImportError:  # an optional dependency (pyfuse3 for the BFS mount): no service there
            continue
        shipped |= {v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Service)
                    and v.__module__ == m.name and v not in (Service, ObjectService)}
    tested = {type(impl.make()) for impl in SERVICES}
    missing = sorted(c.__name__ for c in shipped - tested)
    assert shipped and shipped <= tested, f"add {missing} to helpers.impls.SERVICES"


@each_service
def test_the_workload_exercises_the_service(impl):
    svc = impl.make()
    results = run(svc, impl.workload())
    assert all(type(r) is bytes for r in results)
    if impl.failed is not None:
        ok = sum(not impl.failed(r) for r in results)
        assert ok >= len(results) * 2 // 3, "most of the workload must succeed, or the suite tests little"


@each_service
def test_execution_is_deterministic(impl):
    a, b = impl.make(), impl.make()
    assert snapshot(a) == snapshot(b), "fresh services must start in the same state"
    ops = impl.workload()
    assert run(a, ops) == run(b, ops)
    assert snapshot(a) == snapshot(b)


@each_service
def test_execution_is_deterministic_across_hash_seeds(impl, digests_by_hash_seed):
    """Two processes with different string-hash seeds (the iteration order of sets, and of
    dicts built in hash order, differs) end in the same state with the same results."""
    runs = [by_name[impl.name] for by_name in digests_by_hash_seed]
    assert all(not r.startswith("error") for r in runs), runs
    assert runs[0] == runs[1]


_DIGESTS = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from conformance.test_service_conformance import run, snapshot
from helpers.impls import SERVICES
out = {}
for impl in SERVICES:
    try:
        svc = impl.make()
        res = run(svc, impl.workload())
        out[impl.name] = hashlib.sha256(repr((res, snapshot(svc))).encode()).hexdigest()
    except Exception as e:
        out[impl.name] = f"error {type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def digests_by_hash_seed() -> list[dict[str, str]]:
    """For hash seeds 1 and 2: a digest of every service's results and final state."""
    out = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        p = subprocess.run([sys.executable, "-c", _DIGESTS, str(Path(__file__).resolve().parents[1])],
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        out.append(json.loads(p.stdout))
    return out


@each_service
def test_state_round_trips_through_its_own_form(impl):
    svc = impl.make()
    run(svc, impl.workload())
    state = snapshot(svc)
    other = impl.make()
    if svc.n_objects:
        other.put_objs(dict(enumerate(state)))
        svc.put_objs(dict(enumerate(state)))  # putting back what get_obj returned changes nothing
    else:
        other.set_state(state[0])
        svc.set_state(state[0])
    assert snapshot(other) == state and snapshot(svc) == state
    more = impl.workload()[::-1]
    assert run(svc, more, 100) == run(other, more, 100)
    assert snapshot(svc) == snapshot(other)


@each_service
def test_invalid_state_is_refused_and_leaves_the_state_unchanged(impl):
    svc = impl.make()
    run(svc, impl.workload())
    before = snapshot(svc)
    bad = [b"\xc1", b"\xff" * 16, msgpack.packb([9, [[1, 2, 3]]]), msgpack.packb({"x": 1}), b"\x00" * 7]
    for data in bad:
        with pytest.raises(ValueError):
            if svc.n_objects:
                # one good object and one bad one: all or nothing
                svc.put_objs({0: before[0], svc.n_objects - 1: data})
            else:
                svc.set_state(data)
        assert snapshot(svc) == before


@object_services
def test_modify_is_called_before_an_object_changes(impl):
    svc = impl.make()
    seen: list[tuple[int, bytes]] = []
    svc.bind_state(lambda i: seen.append((i, svc.get_obj(i))))
    for i, op in enumerate(impl.workload()):
        before = snapshot(svc)
        seen.clear()
        run(svc, [op], i)
        after = snapshot(svc)
        changed = {j for j in range(svc.n_objects) if before[j] != after[j]}
        reported = {j for j, _ in seen}
        assert changed <= reported, f"objects {sorted(changed - reported)} changed without modify"
        for j, old in seen:  # reported *before* the change: what it saw is the old value
            if j in changed:
                assert old == before[j]


@each_service
def test_checkpoint_rollback_and_state_transfer(impl):
    """Through the library's ``ReplicaState``: a checkpoint's digest is reproduced after a
    rollback and re-execution, and a fresh replica that installs the checkpoint's objects
    reaches the same digest and then executes identically."""
    ops = impl.workload()
    half = len(ops) // 2
    svc = impl.make()
    rs = ReplicaState(svc)

    def execute(batch, start):
        for i, (op, client, ro) in enumerate(batch, start):
            rs.before_execute()
            nondet = svc.propose_nondet(T0_MS + 10.0 * i)
            rs.set_reply(client, i + 1, svc.execute(op, client, nondet, ro))

    execute(ops[:half], 0)
    d1 = rs.cs.checkpoint(1)
    at1 = snapshot(svc)
    execute(ops[half:], half)
    d2 = rs.cs.checkpoint(2)
    assert rs.cs.rebuild() == [], "objects changed without modify"
    rs.cs.rollback(1)
    assert snapshot(svc) == at1 and rs.cs.current_digest(1) == d1
    execute(ops[half:], half)
    assert rs.cs.checkpoint(2) == d2, "re-executing after a rollback must reproduce the checkpoint"

    fresh_svc = impl.make()
    fresh = ReplicaState(fresh_svc)
    fresh.put_objs({i: rs.cs.value_at(1, i) for i in range(rs.cs.n)})
    fresh.cs.rebuild()
    assert fresh.cs.current_digest(1) == d1
    assert snapshot(fresh_svc) == at1
    rs.cs.rollback(1)
    assert fresh.last_reply == rs.last_reply  # the reply table travels with the checkpoint
    tail = ops[half:]
    assert run(svc, tail, half) == run(fresh_svc, tail, half)
    assert snapshot(svc) == snapshot(fresh_svc)


@each_service
def test_malformed_operations_are_answered_without_raising(impl):
    svc, twin = impl.make(), impl.make()
    run(svc, impl.workload())
    run(twin, impl.workload())
    for i, op in enumerate(malformed(impl)):
        for ro in (False, True):
            out = svc.execute(op, 4 + i % 2, svc.propose_nondet(T0_MS + 5000 + i), ro)
            assert type(out) is bytes
            if impl.failed is not None:
                assert impl.failed(out), f"malformed operation {op[:40]!r} accepted: {out[:60]!r}"
            assert out == twin.execute(op, 4 + i % 2, twin.propose_nondet(T0_MS + 5000 + i), ro)
    assert snapshot(svc) == snapshot(twin)


@each_service
def test_read_only_operations_change_nothing(impl):
    """Every operation (valid, mutating or garbage) sent read-only leaves the state alone."""
    svc = impl.make()
    ops = impl.workload()
    run(svc, ops[: len(ops) // 2])
    before = snapshot(svc)
    for i, op in enumerate([op for op, _, _ in ops] + malformed(impl)):
        svc.execute(op, 4, svc.propose_nondet(T0_MS + 20_000 + i), True)
        assert snapshot(svc) == before, f"read-only {op[:40]!r} changed the state"
