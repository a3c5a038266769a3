"""Replicas that write their protocol state and checkpoints to a (simulated) disk and
restart from it: whole-cluster power loss, torn writes, corrupted records."""

from __future__ import annotations

import random

import pytest

import msgpack

from helpers.cluster import Cluster
from pbft.codec import TAG, Codec
from pbft.core.durability import deferrable
from pbft.messages import Commit, PrePrepare, Prepare

CFG = dict(checkpoint_interval_seqnos=4, log_window_seqnos=8, batch_requests_max=4)


def workload(c: Cluster, prefix: bytes, count: int) -> dict[bytes, bytes]:
    return c.write_keys(prefix, count, keys=7)


def check_all(c: Cluster, acked: dict[bytes, bytes]) -> None:
    for k, v in acked.items():
        assert c.get(0, k) == ("ok", v), k


def converge(c: Cluster) -> None:
    c.advance(3000)
    tops = {r.last_committed_exec for r in c.replicas}
    assert len(tops) == 1, tops
    assert len({r.state_digest() for r in c.replicas}) == 1


def test_store_receives_log_and_checkpoints():
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 14)  # seqnos 1..14: 13 and 14 are above the last checkpoint
    records, damaged = c.stores[0].load()
    assert not damaged
    kinds = {k[:1] for k in records}
    assert {b"q", b"c", b"k", b"b", b"o", b"s"} <= kinds
    # the log below the stable checkpoint is gone
    h = c.replicas[0].low_water_mark
    assert h >= 4
    assert all(int.from_bytes(k[1:], "big") > h for k in records if k[:1] in b"qck" and len(k) == 9)


@pytest.mark.parametrize("torn", [False, True])
def test_whole_cluster_power_loss_in_durable_mode_keeps_every_acknowledged_write(torn):
    for seed in range(4):
        rng = random.Random(seed)
        c = Cluster(durable=True, **CFG)
        acked = workload(c, b"x", 10 + seed)
        outcomes = [c.restart(i, rng, power_loss=True, torn=torn) for i in range(4)]
        assert outcomes == ["restored"] * 4, outcomes
        check_all(c, acked)
        acked.update(workload(c, b"y", 6))  # and the service goes on
        check_all(c, acked)
        converge(c)


def test_deferrable_records_are_only_commits():
    k = b"k" + (5).to_bytes(8, "big")
    assert deferrable({k: b"x"})
    assert deferrable({k: b"x", b"k" + (6).to_bytes(8, "big"): b"y"})
    assert not deferrable({})
    assert not deferrable({k: None})  # a deletion (the log's garbage collection) is not deferred
    for other in (b"c", b"q", b"b", b"v", b"s", b"h", b"o", b"R", b"n"):
        assert not deferrable({k: b"x", other + (5).to_bytes(8, "big"): b"y"}), other


def test_whole_cluster_power_loss_losing_deferred_commit_records_keeps_every_acknowledged_write():
    """The runtime's durable mode writes a step's ``k`` records, when it has no other, after the
    step's sends: a crash of every replica then loses the latest of them everywhere. Every
    acknowledged write is still there, and the replicas commit the lost batches again."""
    lost = 0
    for seed in range(4):
        rng = random.Random(seed)
        c = Cluster(durable=True, defer_commits=True, **CFG)
        acked = workload(c, b"x", 10 + seed)
        lost += sum(len(d) for d in c.deferred)
        outcomes = [c.restart(i, rng, power_loss=True, torn=bool(seed % 2)) for i in range(4)]
        assert outcomes == ["restored"] * 4, outcomes
        check_all(c, acked)
        acked.update(workload(c, b"y", 6))
        check_all(c, acked)
        converge(c)
    assert lost > 0, "no commit record was deferred: the case is not exercised"


def test_every_prepare_and_commit_a_replica_sends_is_on_its_disk_as_it_leaves():
    """The rule the deferral must keep, checked at every step of every replica: as a Prepare or
    a Commit (or the primary's PrePrepare) leaves, the disk, without the records still deferred,
    holds what it rests on: the ``q`` record of its sequence number with its digest (PrePrepare,
    Prepare), the ``c`` record with its view and digest (Commit), or a stable checkpoint at or
    above it. A deferral of any record but ``k`` breaks it."""
    c = Cluster(durable=True, defer_commits=True, **CFG)
    codec = Codec(c.cfg)
    kinds = {TAG[PrePrepare]: "q", TAG[Prepare]: "q", TAG[Commit]: "c"}
    checked = {"q": 0, "c": 0, "deferred": 0}

    def record(pid, prefix, n):
        raw = c.stores[pid].get(prefix + n.to_bytes(8, "big"))
        return None if raw is None else msgpack.unpackb(raw, raw=False, strict_map_key=False)

    def check(pid, sends):
        stable = c.stores[pid].get(b"h")
        h = msgpack.unpackb(stable)[0] if stable is not None else 0
        checked["deferred"] += bool(c.deferred[pid])
        for _, raw in sends:
            fr = codec.open_frame(raw)
            kind = kinds.get(fr.tag)
            if kind is None:
                continue
            m = codec.parse(fr)
            if m.seqno <= h:
                continue
            rec = record(pid, kind.encode(), m.seqno)
            assert rec is not None, (pid, type(m).__name__, m.seqno, "not on disk as it leaves")
            if kind == "q":
                assert m.digest in rec, (pid, type(m).__name__, m.seqno)
            else:
                assert list(rec) == [m.view, m.digest], (pid, m.seqno, rec)
            checked[kind] += 1

    c.on_sends = check
    acked = workload(c, b"x", 24)
    check_all(c, acked)
    assert checked["q"] > 0 and checked["c"] > 0, checked
    assert checked["deferred"] > 0, "no step left with records deferred: the case is not exercised"


def test_restart_of_all_replicas_mid_workload_without_power_loss():
    c = Cluster(durable=False, **CFG)
    acked = workload(c, b"m", 9)
    for i in range(4):
        assert c.restart(i) == "restored"
    check_all(c, acked)
    converge(c)


def test_fast_mode_power_loss_of_one_replica_is_repaired_by_the_others():
    """Fast mode relies on independent failures: one replica losing its unsynced writes
    comes back behind (or with a state it cannot vouch for) and catches up."""
    rng = random.Random(3)
    c = Cluster(durable=False, **CFG)
    acked = workload(c, b"f", 30)
    assert c.stores[2].unsynced, "fast mode leaves recent writes unsynced"
    c.restart(2, rng, power_loss=True, torn=True)
    acked.update(workload(c, b"g", 12))
    check_all(c, acked)
    converge(c)


def test_corrupted_object_on_disk_is_detected_and_repaired_by_transfer():
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"o", 12)
    store = c.stores[3]
    victim = next(k for k in sorted(store.synced) if k[:1] == b"o")
    store.corrupt(victim, random.Random(1))
    assert c.restart(3) == "state-repair"
    r = c.replicas[3]
    assert r.needs_state
    acked.update(workload(c, b"p", 12))  # the others move on; replica 3 fetches a checkpoint
    converge(c)
    assert not c.replicas[3].needs_state
    # only what differed moved: far fewer objects than the state has
    assert 0 < r.transfer_stats["objects"] < r.state.n // 4
    check_all(c, acked)


def test_unusable_state_at_the_stable_checkpoint_is_fetched_on_an_idle_cluster():
    """A replica whose store's state is unusable comes back at its stable checkpoint, where its
    window starts, with nothing executed after it: it fetches that (certified) checkpoint at once,
    since on an idle cluster no later checkpoint comes to make it fetch one, then executes the
    batches committed after it and holds every acknowledged reply."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"i", 14)
    h = c.replicas[3].low_water_mark
    assert 0 < h < c.replicas[3].last_committed_exec  # (batches committed after the stable checkpoint)
    store = c.stores[3]
    store.corrupt(next(k for k in sorted(store.synced) if k[:1] == b"o"), random.Random(5))
    assert c.restart(3) == "state-repair"
    r = c.replicas[3]
    assert r.needs_state and r.low_water_mark == r.last_committed_exec == h
    c.advance(3000)  # no client request from here on
    assert not r.needs_state and r.fetch_target is None
    converge(c)
    assert r.last_reply == c.replicas[0].last_reply
    check_all(c, acked)


def test_object_changed_on_disk_with_a_valid_checksum_is_caught_by_the_checkpoint_digest():
    """An attacker who rewrites a record *with* a valid checksum: the state no longer
    matches the persisted checkpoint digest, so it is not used."""
    import msgpack

    c = Cluster(durable=True, **CFG)
    workload(c, b"z", 12)
    store = c.stores[1]
    R = c.replicas[1].rs.R
    victim = next(k for k, v in sorted(store.synced.items())
                  if k[:1] == b"o" and int.from_bytes(k[1:], "big") > R and len(v) > 8)
    pairs = msgpack.unpackb(store.synced[victim][8:])
    pairs[0][1][0] = b"forged"  # a valid bucket with another value, checksummed
    store.forge(victim, msgpack.packb(pairs, use_bin_type=True))
    assert c.restart(1) == "state-repair"
    workload(c, b"w", 12)
    converge(c)


def test_damaged_log_record_makes_the_replica_start_over():
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"l", 10)
    store = c.stores[0]
    victim = next(k for k in sorted(store.synced) if k[:1] == b"q")
    store.corrupt(victim, random.Random(2))
    assert c.restart(0) == "log-lost"
    acked.update(workload(c, b"n", 12))
    check_all(c, acked)
    converge(c)


def test_restore_brings_back_the_new_view_that_installed_the_view():
    """A replica restarted in an active view v > 0 holds again the NewView that installed v (its
    frame and digest, which its Status reports), so it can hand it to replicas that missed it."""
    c = Cluster(durable=True, **CFG)
    acked = workload(c, b"a", 5)
    c.down.add(0)  # the primary of view 0 is gone: the others move to view 1
    acked.update(workload(c, b"b", 3))
    before = c.replicas[2]
    assert before.view == 1 and before.view_active and before.vc.new_view is not None
    assert c.restart(2) == "restored"
    r = c.replicas[2]
    assert (r.view, r.view_active) == (1, True)
    assert r.vc.new_view is not None and r.vc.new_view.view == 1 and r.vc.new_view_raw == before.vc.new_view_raw
    assert r.vc.new_view_digest == before.vc.new_view_digest
    assert r.vc.new_view_vc_raws == before.vc.new_view_vc_raws and r.vc.deadline is None
    check_all(c, acked)


def test_restore_in_a_view_change_runs_its_timer_again():
    """A replica restarted while changing to a view that never got its NewView: the view, not
    active, and its view-change timer, running from the restart."""
    c = Cluster(durable=True, **CFG)
    workload(c, b"a", 5)
    c.drop = lambda src, dst, raw: src == 3  # nobody hears replica 3's ViewChange
    c.replicas[3]._start_view_change(1, "test")
    c.run()
    c.now += 100.0
    assert c.restart(3) == "restored"
    r = c.replicas[3]
    assert (r.view, r.view_active) == (1, False)
    assert r.vc.deadline == c.now + r.vc.timeout_ms and r.vc.new_view is None
    assert r.last_committed_exec == c.replicas[0].last_committed_exec  # its committed log re-executed


def test_restore_writes_no_field_of_another_component():
    """``durability.restore`` sets only the replica's own fields: the log, the checkpoints and the
    view change restore theirs through their own methods (no assignment to, and no mutating call
    on, a field of ``r.log``, ``r.checkpoints``, ``r.vc`` ... in ``durability.py``)."""
    import ast
    import pathlib

    import pbft

    components = {"log", "checkpoints", "checkpoint_votes", "vc", "requests", "status", "transfer", "recovery",
                  "budgets"}
    mutators = {"update", "clear", "pop", "popitem", "append", "extend", "setdefault", "add", "discard", "remove"}

    def chain(e: ast.expr) -> list[str]:
        """The names along an attribute/subscript/call chain, from its root: r.log.slot(n).x -> r log slot x."""
        out: list[str] = []
        while True:
            if isinstance(e, ast.Attribute):
                out.append(e.attr)
                e = e.value
            elif isinstance(e, (ast.Subscript, ast.Call)):
                e = e.value if isinstance(e, ast.Subscript) else e.func
            elif isinstance(e, ast.Name):
                return [e.id, *reversed(out)]
            else:
                return []

    def foreign(names: list[str]) -> bool:  # r.<component>.<anything>, or self.r.<component>.<anything>
        if names[:2] == ["self", "r"]:
            names = names[1:]
        return len(names) >= 3 and names[0] == "r" and names[1] in components

    # (the source file: with the compiled core, the module's __file__ is its extension module)
    tree = ast.parse((pathlib.Path(pbft.__file__).parent / "core" / "durability.py").read_text())
    bad = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in mutators
              and foreign(chain(node.func.value) + ["?"])):
            bad.append((node.lineno, ast.unparse(node)))
        for t in targets:
            for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if foreign(chain(e)):
                    bad.append((node.lineno, ast.unparse(e)))
    assert bad == [], bad


def test_primary_restarted_from_its_store_resends_the_preprepares_a_backup_missed():
    """Slots restored from disk have no pre-prepare frame to relay: the primary seals its own again
    when a backup's Status shows it behind (the NewView it used to send instead is nothing new to a
    backup already in the view, and an idle cluster never catches it up otherwise)."""
    c = Cluster(clients=1, durable=True)
    c.put(0, b"a", b"1")
    behind = 3
    # replica 3 gets neither the request nor its pre-prepare nor the vouches (so no request timer
    # of its own will start a view change that would carry the batch in a NewView)
    c.drop = lambda src, dst, m: dst == behind and m[1] in (1, 3, 15)
    c.put(0, b"b", b"2")
    assert c.replicas[behind].last_exec < c.replicas[0].last_exec
    for i in range(3):  # the others restart from their stores: no frame of any pre-prepare is left
        assert c.restart(i) == "restored"
    c.drop = lambda src, dst, m: False
    c.advance(2000.0)
    assert len({r.last_exec for r in c.replicas}) == 1, [r.last_exec for r in c.replicas]
    assert c.replicas[behind].last_reply[c.cfg.client_ids[0]][0] == c.replicas[0].last_reply[c.cfg.client_ids[0]][0]
