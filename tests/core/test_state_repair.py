"""A replica whose state diverged repairs it at the next stable checkpoint: its checkpoint
disagrees with the certified one, it goes back to its own checkpoint and fetches the objects that
differ (the partition tree's walk), without a recovery."""

from __future__ import annotations

from helpers.cluster import Cluster

CFG = dict(checkpoint_interval_seqnos=4, log_window_seqnos=8, batch_requests_max=4)


def forge(c: Cluster, i: int) -> bytes:
    """A key nobody wrote, with a forged value, put into replica i's state behind the protocol (as
    memory corruption or an intruder would; written through, so it reaches the tree and the disk)."""
    key = b"forged-key"
    c.replicas[i].service.data.set(key, (b"forged", 0))
    return key


def forge_existing(c: Cluster, i: int) -> bytes:
    """An existing key's value replaced at replica i, behind the protocol."""
    kv = c.replicas[i].service
    b = next(b for b in range(kv.data.n_buckets) if kv.data.buckets[b])
    key = min(kv.data.buckets[b])
    kv.data.buckets[b][key] = (b"corrupt", 0)
    c.replicas[i].state.modify(c.replicas[i].rs.R + kv.data.base + b)
    return key


def agree(c: Cluster) -> None:
    c.advance(300)
    assert len({r.last_committed_exec for r in c.replicas}) == 1
    assert len({r.state_digest() for r in c.replicas}) == 1


def test_a_forged_object_is_repaired_at_the_next_stable_checkpoint():
    c = Cluster(durable=True, **CFG)
    acked = c.write_keys(b"a", 8, keys=9)
    key = forge(c, 3)
    acked.update(c.write_keys(b"b", 6, keys=9))
    r = c.replicas[3]
    (mismatch,) = c.of_kind("checkpoint-mismatch", 3)
    (repair,) = c.of_kind("state-repair", 3)
    assert (repair.seqno, repair.ours, repair.certified) == (mismatch.seqno, mismatch.ours, mismatch.certified)
    assert r.counts.get("state-repair") == 1
    assert [ev.seqno for ev in c.of_kind("state-transfer", 3)] == [repair.seqno]
    assert 1 <= r.transfer_stats["objects"] <= 2  # the forged bucket, not the state
    assert not c.of_kind("recovery-start")
    assert r.service.data.get(key) is None
    agree(c)
    for k, v in acked.items():
        assert r.service.data.get(k)[0] == v


def test_the_repaired_primary_catches_up_and_the_cluster_goes_on():
    c = Cluster(durable=True, **CFG)
    acked = c.write_keys(b"a", 8, keys=9)
    key = forge_existing(c, 0)  # the primary of view 0
    acked.update(c.write_keys(b"b", 8, keys=9))
    assert c.of_kind("state-repair", 0)
    agree(c)
    assert c.replicas[0].service.data.get(key)[0] == acked[key]
    for k, v in acked.items():
        assert c.get(1, k) == ("ok", v)


def test_a_repair_found_late_survives_a_restart_from_disk():
    """The certificate for checkpoint n reaches the replica only after it has written its own
    (wrong) checkpoints n and n + K to disk: the repaired state is written to disk, and a
    restart comes back with it, not with the forged one."""
    from pbft.messages import Tag
    c = Cluster(durable=True, **CFG)
    c.write_keys(b"a", 8, keys=9)
    key = forge(c, 2)
    late = [True]
    c.drop = lambda src, dst, raw: late[0] and dst == 2 and src < c.cfg.n and \
        c.codec.open_frame(raw).tag == Tag.CHECKPOINT
    acked = c.write_keys(b"b", 10, keys=9)
    assert c.replicas[2].disk.persisted_ckpt > c.replicas[0].low_water_mark - c.cfg.checkpoint_interval_seqnos
    late[0] = False
    c.advance(500)
    assert c.of_kind("state-repair", 2)
    agree(c)
    assert c.restart(2) == "restored"
    agree(c)
    assert c.replicas[2].service.data.get(key) is None
    for k, v in acked.items():
        assert c.replicas[2].service.data.get(k)[0] == v


def test_reads_are_refused_while_the_repair_fetches():
    from pbft.messages import Tag
    from pbft.services.kv import encode_op
    c = Cluster(durable=True, **CFG)
    c.write_keys(b"a", 8, keys=9)
    forge(c, 3)
    stall = [True]  # the repair's fetch gets no answer for a while
    c.drop = lambda src, dst, raw: stall[0] and dst == 3 and c.codec.open_frame(raw).tag in (Tag.META_DATA, Tag.DATA)
    c.write_keys(b"b", 6, keys=9)
    r = c.replicas[3]
    assert r.needs_state and r.fetch_target is not None
    cl = c.clients[0]
    cl.invoke(encode_op("get", b"forged-key"), True, c.now)
    c.run()
    assert r.drops.get("read-only-state-unverified") == 1
    stall[0] = False
    c.advance(1000)
    assert not r.needs_state and r.fetch_target is None
    agree(c)


def test_what_a_transfer_fetched_counts_when_it_moves_on_to_a_newer_checkpoint():
    """A replica that falls further behind while fetching starts over towards the newer checkpoint
    (the objects already fetched stay in its state); what the first walk fetched is in its
    statistics too, as when a recovery abandons a walk."""
    c = Cluster(**CFG)
    c.write_keys(b"a", 8, keys=9)
    t = c.replicas[3].transfer
    t.start(1000, b"\x01" * 32)
    assert t.fetcher is not None
    t.fetcher.fetched_objs, t.fetcher.fetched_bytes, t.fetcher.metas = 3, 300, 2  # (its walk so far)
    t.start(2000, b"\x02" * 32)
    assert (t.stats["objects"], t.stats["bytes"], t.stats["metadata"], t.stats["transfers"]) == (3, 300, 2, 0)
    t.fetcher.fetched_objs = 1
    t.abandon()
    assert t.stats["objects"] == 4 and t.fetcher is None and t.target is None
    t.abandon()  # (nothing under way: nothing counted twice)
    assert t.stats["objects"] == 4
