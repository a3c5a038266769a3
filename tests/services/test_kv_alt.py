"""A second implementation of the key-value service (``services.kv_alt``: a sorted index and
value columns instead of ``ObjectDict``'s buckets) with the same abstract objects: differential
tests against ``KVService``, the size limit decided by the abstract state alone, and clusters
mixing both implementations through checkpoints, state transfer and proactive recovery."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time

import msgpack
import pytest

from helpers.cluster import Cluster
from pbft.services.kv import KVService, encode_op
from pbft.services.kv_alt import KVAltService

T0_MS = 1_700_000_000_000
CFG = dict(checkpoint_interval_seqnos=4, log_window_seqnos=8, batch_requests_max=4)


def objects(svc) -> list[bytes]:
    return [svc.get_obj(i) for i in range(svc.n_objects)]


def random_op(rng: random.Random, values: dict[bytes, bytes]) -> bytes:
    key = rng.choice([b"k%d" % rng.randrange(40), b"", b"\xff" * 3, b"x" * rng.randrange(1020, 1030)])
    value = rng.choice([b"", b"v", rng.randbytes(rng.randrange(0, 900))])
    kind = rng.choice(["get", "mtime", "put", "put", "put", "delete", "cas", "cas", "garbage"])
    if kind == "put":
        return encode_op("put", key, value)
    if kind == "cas":
        return encode_op("cas", key, rng.choice([None, b"", b"v", values.get(key)]), value)
    if kind == "garbage":
        return rng.choice([b"", b"\xc1", rng.randbytes(12), msgpack.packb(["put", key]), msgpack.packb(["put", 1, 2]),
                           msgpack.packb(["get", key, 1]), msgpack.packb(["x" * 20, key]),
                           msgpack.packb(["cas", key, 3, b"v"]), msgpack.packb({"get": key})])
    return encode_op(kind, key)


@pytest.mark.parametrize("seed", range(12))
def test_both_implementations_answer_alike_and_have_the_same_objects(seed):
    """Random operations (valid and not, read-only or not, buckets filling up) on both: the same
    results, the same ``modify`` calls before any change, the same objects; and the state moved
    from one to the other (``get_obj`` -> ``put_objs``) carries on identically."""
    rng = random.Random(seed)
    buckets, limit = rng.choice([(1, 4000), (3, 2500), (16, 1 << 20)])
    kv, alt = KVService(buckets=buckets, bucket_bytes_max=limit), KVAltService(buckets=buckets, bucket_bytes_max=limit)
    seen: dict[str, list[tuple[int, bytes]]] = {"kv": [], "alt": []}

    def bind(svc, name):
        svc.bind_state(lambda i: seen[name].append((i, svc.get_obj(i))))

    bind(kv, "kv")
    bind(alt, "alt")
    assert objects(kv) == objects(alt), "fresh services must start in the same state"
    now, full = T0_MS, 0
    for step in range(500):
        now += rng.randrange(-5, 30)  # (the clock stays monotonic in both)
        op = random_op(rng, {k: v[0] for k, v in kv.data.items()})
        ro = rng.random() < 0.2
        nd_kv, nd_alt = kv.propose_nondet(now), alt.propose_nondet(now)
        assert nd_kv == nd_alt and alt.check_nondet(nd_kv, now) == kv.check_nondet(nd_kv, now)
        a, b = kv.execute(op, 4, nd_kv, ro), alt.execute(op, 4, nd_kv, ro)
        assert a == b, (step, op[:60])
        full += b"store full" in a
        assert seen["kv"] == seen["alt"], (step, op[:60])  # same objects announced, same old values
        seen["kv"].clear()
        seen["alt"].clear()
        if step % 100 == 99:
            assert objects(kv) == objects(alt)
            # state transfer both ways, each install checked against the other implementation
            other = KVAltService(buckets=buckets, bucket_bytes_max=limit)
            other.put_objs(dict(enumerate(objects(kv))))
            back = KVService(buckets=buckets, bucket_bytes_max=limit)
            back.put_objs(dict(enumerate(objects(alt))))
            assert objects(other) == objects(kv) == objects(back)
            alt = other
            bind(alt, "alt")
    assert objects(kv) == objects(alt)
    if limit < 1 << 20:
        assert full, "the workload should fill a bucket"


def test_only_a_partial_state_transfer_changes_only_those_objects():
    kv, alt = KVService(buckets=64), KVAltService(buckets=64)
    for svc in (kv, alt):
        for i in range(40):
            svc.execute(encode_op("put", b"k%d" % i, b"v%d" % i), 4, (T0_MS + i).to_bytes(8, "big"), False)
    newer = KVService(buckets=64)
    newer.put_objs(dict(enumerate(objects(kv))))
    for i in range(40, 43):
        newer.execute(encode_op("put", b"k%d" % i, b"w"), 4, (T0_MS + 100).to_bytes(8, "big"), False)
    newer.execute(encode_op("delete", b"k3"), 4, (T0_MS + 100).to_bytes(8, "big"), False)
    changed = {i: o for i, o in enumerate(objects(newer)) if o != kv.get_obj(i)}
    assert 1 < len(changed) < newer.n_objects
    alt.put_objs(changed)
    assert objects(alt) == objects(newer)
    assert alt.get(b"k3") is None and alt.get(b"k41") == (b"w", T0_MS + 100) and len(alt) == 42


def test_objects_not_in_the_canonical_form_are_refused():
    alt = KVAltService(buckets=4)
    alt.execute(encode_op("put", b"a", b"1"), 4, T0_MS.to_bytes(8, "big"), False)
    before = objects(alt)
    b = alt._bucket(b"a")
    pk = lambda x: msgpack.packb(x, use_bin_type=True)  # noqa: E731
    wrong_bucket = next(k for k in (b"k%d" % i for i in range(50)) if alt._bucket(k) != b)
    bad = {
        0: [pk(-1), pk("12"), pk(True), b"\xcf" + (5).to_bytes(8, "big")],  # (5 as a uint64: not canonical)
        1 + b: [pk([]), pk([(b"a", (b"1",))]), pk([(b"a", (b"1", 1)), (b"a", (b"2", 1))]),
                pk([(wrong_bucket, (b"1", 1))]), pk([(b"a", ("1", 1))]), pk([["a", [b"1", 1]]]), b"\x91",
                pk([(b"a" * 1025, (b"1", 1))])],
    }
    for i, datas in bad.items():
        for data in datas:
            with pytest.raises(ValueError):
                alt.put_objs({1 + (b + 1) % 4: b"", i: data})  # one good object, one bad: all or nothing
            assert objects(alt) == before
    with pytest.raises(ValueError):
        alt.put_objs({alt.n_objects: b""})


def test_a_full_bucket_is_decided_by_the_abstract_state_alone():
    """A replica that executed the puts and one that installed the bucket by state transfer must
    refuse the same put, wherever the limit falls (with values of more than 255 bytes, an entry's
    size counted as ``len(value) + 12`` was a byte short of what an installed bucket counts)."""
    nd = T0_MS.to_bytes(8, "big")
    fills = set()
    for limit in range(6_000, 9_000, 41):  # (an entry weighs 324 bytes: every offset within one)
        executed = KVService(buckets=1, bucket_bytes_max=limit)
        for i in range(18):
            executed.execute(encode_op("put", b"k%02d" % i, b"x" * 300), 4, nd, False)
        fetched = [KVService(buckets=1, bucket_bytes_max=limit), KVAltService(buckets=1, bucket_bytes_max=limit)]
        for svc in fetched:
            svc.put_objs(dict(enumerate(objects(executed))))
        for i in range(18, 30):
            op = encode_op("put", b"k%02d" % i, b"x" * 300)
            results = {svc.execute(op, 4, nd, False) for svc in [executed, *fetched]}
            assert len(results) == 1, (limit, i)
            if b"store full" in results.pop():
                fills.add(limit)
                break
        assert objects(executed) == objects(fetched[0]) == objects(fetched[1])
    assert len(fills) > 40  # (most limits are reached within the 12 puts)


def test_the_replica_command_builds_it(tmp_path):
    """``--service kv-alt``, or ``service = "kv-alt"`` in the replica's ``[[replica]]`` entry."""
    from pbft.config import ConfigError
    from pbft.runtime.cluster import CLUSTER_FILE, init_cluster, load_cluster
    from pbft.tools.net import load_service, replica_service

    c = init_cluster(tmp_path / "c", 4, protocol={"nondet_skew_ms_max": 250.0})
    svc = load_service("kv-alt", c)
    assert type(svc) is KVAltService and svc.skew_ms == 250.0
    assert objects(svc) == objects(load_service("kv", c))
    path = c.dir / CLUSTER_FILE
    text = path.read_text()
    path.write_text(text.replace("[[replica]]\nid = 1\n", '[[replica]]\nid = 1\nservice = "kv-alt"\n'))
    c = load_cluster(c.dir)
    assert [replica_service(c, i, None) for i in range(4)] == ["kv", "kv-alt", "kv", "kv"]
    assert replica_service(c, 1, "kv") == "kv"  # --service wins
    assert type(load_service(replica_service(c, 1, None), c)) is KVAltService
    # the systemd unit of replica 1 runs its service from cluster.toml
    out = subprocess.run([sys.executable, "-m", "pbft.cli", "systemd-units", str(c.dir), "--id", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--service kv-alt " in (c.dir / "systemd" / "pbft-replica-1.service").read_text()
    path.write_text(text.replace("[[replica]]\nid = 1\n", "[[replica]]\nid = 1\nservice = 3\n"))
    with pytest.raises(ConfigError, match="service"):
        load_cluster(c.dir)


# ---------------------------------------------------------------------------
# clusters mixing both implementations
# ---------------------------------------------------------------------------

MIXED = [KVService, KVService, KVAltService, KVAltService]


def tag_of(raw: bytes) -> int:
    return msgpack.unpackb(raw)[0]


def wait(c: Cluster, pred, ms: float = 10_000.0) -> None:
    waited = 0.0
    while not pred() and waited < ms:
        c.advance(50)
        waited += 50
    assert pred()


def agree(c: Cluster) -> None:
    c.advance(500)
    assert len({r.last_committed_exec for r in c.replicas}) == 1
    assert len({r.state_digest() for r in c.replicas}) == 1
    assert objects(c.replicas[0].service) == objects(c.replicas[3].service)


def test_a_cluster_of_both_implementations_agrees_through_transfer_and_recovery():
    from pbft.messages import Tag

    c = Cluster(service=MIXED, durable=True, **CFG)
    assert [type(r.service) for r in c.replicas] == MIXED
    acked = c.write_keys(b"a", 12, keys=9)
    agree(c)
    assert c.of_kind("stable") and not c.of_kind("checkpoint-mismatch")

    # an alternative replica falls behind the log and fetches from a KVService replica (the
    # first holder of the checkpoint, replica 0)
    c.down.add(3)
    acked.update(c.write_keys(b"b", 24, keys=11))
    c.down.discard(3)
    acked.update(c.write_keys(b"c", 6, keys=5))
    wait(c, lambda: c.replicas[3].last_exec == c.replicas[0].last_exec and c.replicas[3].fetch_target is None)
    assert c.replicas[3].transfer_stats["objects"] >= 1
    agree(c)

    # a KVService replica fetches from an alternative one: its Fetch requests to replica 0 are
    # lost, so it asks the next holders, replica 2 or 3
    served_by: list[int] = []
    c.down.add(1)
    acked.update(c.write_keys(b"d", 24, keys=11))
    c.down.discard(1)

    def drop(src, dst, raw):
        if src == 1 and tag_of(raw) == Tag.FETCH:
            if dst == 0:
                return True
            served_by.append(dst)
        return False

    c.drop = drop
    acked.update(c.write_keys(b"e", 6, keys=5))
    wait(c, lambda: c.replicas[1].last_exec == c.replicas[0].last_exec and c.replicas[1].fetch_target is None)
    c.drop = lambda src, dst, raw: False
    assert set(served_by) & {2, 3}
    agree(c)

    # proactive recovery of one replica of each implementation, one after the other
    for i in (2, 1):
        before = len(c.of_kind("recovered", i))
        c.restart(i, recover=True)
        acked.update(c.write_keys(b"r%d" % i, 6, keys=5))
        wait(c, lambda i=i, before=before: len(c.of_kind("recovered", i)) > before)
        agree(c)
    assert type(c.replicas[2].service) is KVAltService  # (restarted with its own implementation)
    for k, v in acked.items():
        assert c.get(0, k) == ("ok", v)
    agree(c)


@pytest.mark.slow
def test_real_replicas_of_both_implementations_agree(local_cluster):
    """Replicas 2 and 3 run ``--service kv-alt`` on a real cluster: a state transfer to one of
    them, then a proactive recovery of each implementation; the stable checkpoints' digests
    agree and every write reads back."""
    from pbft.runtime.client import BlockingClient
    from pbft.services.kv import KVClient

    from pbft.runtime.cluster import CLUSTER_FILE, load_cluster

    lc = local_cluster(start=False, protocol={"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16,
                                              "view_change_timeout_ms": 500.0})
    path = lc.dir / CLUSTER_FILE  # replicas 2 and 3 run the other implementation: [[replica]] service
    path.write_text(re.sub(r"(\[\[replica\]\]\nid = [23]\n)", r'\1service = "kv-alt"\n', path.read_text()))
    assert [r.service for r in load_cluster(lc.dir).replicas] == ["", "", "kv-alt", "kv-alt"]
    lc.start_all()  # (no --service: each replica's own)
    acked = {}
    with BlockingClient(lc.dir) as bc:
        kv = KVClient(bc.invoke, timeout=20.0)

        def write(prefix: bytes, count: int) -> None:
            for j in range(count):
                k, v = prefix + b"%d" % (j % 13), b"%s-%d" % (prefix, j)
                kv.put(k, v)
                acked[k] = v

        write(b"a", 30)
        lc.kill(3)
        write(b"b", 60)  # several log windows: replica 3 must fetch
        lc.start(3)
        lc.wait_connected([3])
        write(b"c", 20)
        lc.wait_for(lambda: lc.status(3)["state_transfer"]["objects"] >= 1, what="replica 3's state transfer")
        for i in (2, 1):
            t0 = time.time()
            lc.signal(i, signal.SIGUSR1)
            write(b"r%d" % i, 20)

            def recovered(i=i, t0=t0):
                s = lc.status(i)
                return s["uptime_s"] < time.time() - t0 + 1 and s["recoveries"] >= 1 and s["recovering"] is None

            lc.wait_for(recovered, timeout=60, what=f"replica {i}'s recovery")
        write(b"z", 20)
        for k, v in acked.items():
            assert kv.get(k) == v

    def digests_agree():
        rows = [lc.status(i) for i in range(4)]
        return len({s["stable_checkpoint"] for s in rows}) == 1 and len({s["stable_digest"] for s in rows}) == 1

    lc.wait_for(digests_agree, what="the same stable checkpoint everywhere")
