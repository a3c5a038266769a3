"""examples/bank.py: the service on its own, replicated in memory, and on a real 4-replica cluster."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.netutil import ROOT, SRC, LocalCluster

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.bank import (  # noqa: E402
    AMOUNT_MAX, BALANCE_MAX, BankClient, BankError, BankService, decode_result, encode_op,
)

ALICE, BOB = 4, 5  # client ids (the first two clients of a 4-replica cluster)


def run(svc: BankService, client: int, kind: str, *args, read_only: bool = False):
    return decode_result(svc.execute(encode_op(kind, *args), client, b"", read_only))


# ---------------------------------------------------------------------------
# the service on its own
# ---------------------------------------------------------------------------

def test_operations_and_access_control():
    b = BankService()
    assert run(b, ALICE, "open", "a") == ("ok", None)
    assert run(b, BOB, "open", "b") == ("ok", None)
    assert run(b, BOB, "open", "a") == ("err", "account exists")
    assert run(b, BOB, "deposit", "a", 100) == ("ok", 100)  # anybody may deposit
    assert run(b, ALICE, "transfer", "a", "b", 30) == ("ok", 70)
    assert run(b, BOB, "transfer", "a", "b", 1) == ("err", "not the owner")
    assert run(b, BOB, "withdraw", "a", 1) == ("err", "not the owner")
    assert run(b, BOB, "withdraw", "b", 31) == ("err", "insufficient funds")
    assert run(b, BOB, "withdraw", "b", 30) == ("ok", 0)
    assert run(b, ALICE, "transfer", "a", "a", 1) == ("err", "transfer to the same account")
    assert run(b, ALICE, "transfer", "a", "zz", 1) == ("err", "no such account")
    assert run(b, ALICE, "balance", "a", read_only=True) == ("ok", 70)
    assert run(b, ALICE, "total", read_only=True) == ("ok", (2, 70))
    assert run(b, ALICE, "deposit", "a", AMOUNT_MAX + 1) == ("err", "invalid amount")
    for _ in range(BALANCE_MAX // AMOUNT_MAX):
        assert run(b, ALICE, "deposit", "b", AMOUNT_MAX)[0] == "ok"
    assert run(b, ALICE, "deposit", "b", 1) == ("err", "balance limit")
    assert run(b, ALICE, "transfer", "a", "b", 1) == ("err", "balance limit")


def test_read_only_calls_do_not_mutate():
    b = BankService()
    run(b, ALICE, "open", "a")
    before = b.get_state()
    for kind, args in [("open", ("x",)), ("deposit", ("a", 5)), ("withdraw", ("a", 1)),
                       ("transfer", ("a", "x", 1))]:
        assert run(b, ALICE, kind, *args, read_only=True) == ("err", "mutating operation sent as read-only")
    assert b.get_state() == before


MALFORMED = [
    b"", b"\xc1", b"\x92", random.Random(1).randbytes(64), msgpack.packb({"open": "a"}), msgpack.packb("open"),
    msgpack.packb([]), msgpack.packb([1, "a"]), msgpack.packb(["open"]), msgpack.packb(["open", "a", "b"]),
    msgpack.packb(["open", ""]), msgpack.packb(["open", "x" * 65]),
    msgpack.packb(["open", b"bytes"], use_bin_type=True),
    msgpack.packb(["open", ["nested"]]), msgpack.packb(["frobnicate", "a"]), msgpack.packb(["deposit", "a", -5]),
    msgpack.packb(["deposit", "a", 0]), msgpack.packb(["deposit", "a", 1.5]), msgpack.packb(["deposit", "a", True]),
    msgpack.packb(["deposit", "a", 2**64 - 1]), msgpack.packb(["deposit", "a", None]),
    msgpack.packb(["transfer", "a", 7, 1]), b"\x92\xa4open\xa2\xff\xfe",  # invalid UTF-8 in a str
    msgpack.packb(["open", msgpack.ExtType(5, b"x")]), msgpack.packb(["open", "a"]) + b"trailing",
    msgpack.packb(["open", "a", "b", "c", "d"]),
]


@pytest.mark.parametrize("op", MALFORMED)
def test_malformed_operations_are_error_results(op):
    b = BankService()
    run(b, ALICE, "open", "a")
    before = b.get_state()
    status, reason = decode_result(b.execute(op, ALICE, b"", False))
    assert status == "err" and isinstance(reason, str)
    assert b.get_state() == before


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_never_raise(op, read_only):
    b = BankService()
    run(b, ALICE, "open", "a")
    decode_result(b.execute(op, ALICE, b"", read_only))


names = st.sampled_from(["a", "b", "c", "δ"])
amounts = st.one_of(st.integers(1, 200), st.integers(-5, 0), st.just(AMOUNT_MAX + 1))
ops = st.one_of(
    st.tuples(st.just("open"), names).map(list),
    st.tuples(st.just("deposit"), names, amounts).map(list),
    st.tuples(st.just("withdraw"), names, amounts).map(list),
    st.tuples(st.just("transfer"), names, names, amounts).map(list),
    st.tuples(st.just("balance"), names).map(list),
    st.just(["total"]),
)
calls = st.lists(st.tuples(st.sampled_from([ALICE, BOB]), ops, st.booleans()), max_size=60)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls, st.integers(0, 60))
def test_deterministic_and_state_round_trip(seq, cut):
    """Two instances fed the same operations return the same results and the same state bytes;
    a third restored from a snapshot taken part-way (what rollback and state transfer do)
    continues identically; money only enters by deposit and leaves by withdraw."""
    x, y = BankService(), BankService()
    z = None
    money = 0
    for i, (client, op, ro) in enumerate(seq):
        if i == cut:
            z = BankService()
            z.set_state(x.get_state())
            assert z.get_state() == x.get_state()
        raw = msgpack.packb(op)
        rx = x.execute(raw, client, b"", ro)
        assert y.execute(raw, client, b"", ro) == rx
        if z is not None:
            assert z.execute(raw, client, b"", ro) == rx
        status, value = decode_result(rx)
        if status == "ok" and op[0] in ("deposit", "withdraw"):
            money += op[2] if op[0] == "deposit" else -op[2]
    assert x.get_state() == y.get_state()
    if z is not None:
        assert z.get_state() == x.get_state()
    assert sum(bal for _, bal in x.accounts.values()) == money >= 0


def test_state_is_canonical_and_set_state_checks_its_input():
    x, y = BankService(), BankService()
    for n in ("b", "a", "c"):
        run(x, ALICE, "open", n)
    for n in ("c", "a", "b"):  # another insertion order: the same state
        run(y, ALICE, "open", n)
    assert x.get_state() == y.get_state()
    good = x.get_state()
    for bad in [b"", b"\xc1", msgpack.packb([2, []]), msgpack.packb([True, []]), msgpack.packb([1, [["a", 4]]]),
                msgpack.packb([1, [["b", 4, 0], ["a", 4, 0]]]),  # not sorted
                msgpack.packb([1, [["a", 4, 0], ["a", 4, 0]]]),  # duplicate
                msgpack.packb([1, [["a", 4, -1]]]), msgpack.packb([1, [["a", 4, BALANCE_MAX + 1]]]),
                msgpack.packb([1, [["", 4, 0]]]), msgpack.packb([1, {"a": 1}])]:
        z = BankService()
        z.set_state(good)
        with pytest.raises(ValueError):
            z.set_state(bad)
        assert z.get_state() == good  # a refused state leaves the old one in place


def test_replicated_in_memory_with_the_core():
    """The pure core (tests/helpers/cluster.py) with BankService: ordered and read-only calls,
    and every replica ends with the same state bytes."""
    from helpers.cluster import Cluster

    c = Cluster(service=BankService)
    ids = [cl.id for cl in c.clients]
    assert c.invoke(0, encode_op("open", "a"))[0] == ("ok", None)
    assert c.invoke(1, encode_op("open", "b"))[0] == ("ok", None)
    assert c.invoke(0, encode_op("deposit", "a", 50))[0] == ("ok", 50)
    assert c.invoke(0, encode_op("transfer", "a", "b", 20))[0] == ("ok", 30)
    assert c.invoke(1, encode_op("transfer", "a", "b", 1))[0] == ("err", "not the owner")
    assert c.invoke(1, encode_op("balance", "b"), read_only=True)[0] == ("ok", 20)
    c.advance(50)
    assert len({r.service.get_state() for r in c.replicas}) == 1
    assert {r.service.accounts["a"][0] for r in c.replicas} == {ids[0]}


# ---------------------------------------------------------------------------
# a real cluster: 4 replica processes running `pbft replica --service examples.bank:BankService`
# ---------------------------------------------------------------------------

def test_bank_on_a_real_cluster(tmp_path):
    from pbft import BlockingClient

    lc = LocalCluster(tmp_path / "c", service="examples.bank:BankService")
    lc.start_all()
    try:
        c = lc.cluster
        with BlockingClient(lc.dir, c.client_ids[0]) as ca, BlockingClient(lc.dir, c.client_ids[1]) as cb:
            alice, bob = BankClient(ca.invoke, timeout=20.0), BankClient(cb.invoke, timeout=20.0)
            alice.open("alice")
            bob.open("bob")
            with pytest.raises(BankError, match="account exists"):
                bob.open("alice")
            assert alice.deposit("alice", 500) == 500
            assert bob.deposit("bob", 500) == 500
            for i in range(20):
                alice.transfer("alice", "bob", 7 + i)
                bob.transfer("bob", "alice", 3 + 2 * i)
            with pytest.raises(BankError, match="not the owner"):
                bob.withdraw("alice", 1)
            with pytest.raises(BankError, match="insufficient funds"):
                alice.withdraw("alice", 10**6)
            sent = sum(7 + i for i in range(20)) - sum(3 + 2 * i for i in range(20))
            a, b = alice.balance("alice"), bob.balance("bob")  # read-only path
            assert (a, b) == (500 - sent, 500 + sent)
            assert alice.balance("bob", read_only=False) == b  # ordered read
            assert alice.total() == (2, 1000)  # money conserved
        # the example's own session, as docs/client.md shows it
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + ROOT)
        p = subprocess.run([sys.executable, "-m", "examples.bank", str(lc.dir)], capture_output=True, text=True,
                           timeout=30, env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "open alice: account exists" in p.stdout and "2 accounts, 1100 in total" in p.stdout
        # every replica executed everything (one may lag a moment behind the quorum that answered)
        lc.wait_for(lambda: len({(s["view"], s["last_executed"], s["executed_requests"])
                                 for s in (lc.status(i) for i in range(4))}) == 1, 10.0, "replicas to agree")
        assert lc.status(0)["executed_requests"] >= 45
        for r in range(4):
            assert "Traceback" not in lc.log_text(r)
    finally:
        lc.stop()
