"""Configuration epochs (``pbft.core.reconfig``): validation of configuration operations, the
switch point (the checkpoint at or after a change's sequence number), tentative rollback, state
transfer and restarts carrying the configuration, and requests of revoked clients refused."""

from __future__ import annotations

import nacl.signing
import pytest

from pbft.config import ClusterConfig
from pbft.core import reconfig
from pbft.core.reconfig import (
    NOT_ADMITTED_RESULT, ConfigRecord, config_at, decode_result, encode_request, genesis_record,
)
from pbft.messages import Tag
from pbft.services.kv import decode_result as decode_kv
from pbft.services.kv import encode_op
from tests.helpers.cluster import Cluster


def key(i: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([i]) * 32).verify_key)


N, ADMIN, FREE = 4, 6, 7  # clients 4, 5 (workload), 6 (the administrator), 7 (a free slot)
GENESIS = genesis_record([key(i) for i in range(N)], {4: key(4), 5: key(5), ADMIN: key(ADMIN)}, [ADMIN])
CFG = ClusterConfig.create(N, clients_max=4, checkpoint_interval_seqnos=4, log_window_seqnos=8)


def genesis() -> ConfigRecord:
    return ConfigRecord.decode(GENESIS)


def run(op: bytes, client: int = ADMIN, n: int = 1, rec: ConfigRecord | None = None, read_only: bool = False):
    new, result = reconfig.execute(rec or genesis(), client, op, n, CFG, read_only)
    return new, decode_result(result)


# ---- validation ---------------------------------------------------------------------------------
def test_encoding_roundtrip_and_canonical():
    rec = genesis()
    assert ConfigRecord.decode(rec.encode()) == rec and rec.encode() == GENESIS
    assert rec.active.epoch == 0 and rec.pending is None and rec.latest.admins == (ADMIN,)
    for bad in (b"", b"\x90", GENESIS[:-1], GENESIS + b"\x00"):
        with pytest.raises(ValueError):
            ConfigRecord.decode(bad)


@pytest.mark.parametrize("op, client, reason", [
    (encode_request("add-client", FREE, key(FREE)), 4, "not-admin"),
    (encode_request("add-client", 5, key(50)), ADMIN, "duplicate"),
    (encode_request("add-client", 8, key(50)), ADMIN, "not-a-client-slot"),
    (encode_request("add-client", 2, key(50)), ADMIN, "not-a-client-slot"),
    (encode_request("add-client", FREE, key(2)), ADMIN, "key-in-use"),
    (encode_request("add-client", FREE, b"\x01" * 31), ADMIN, "bad-key"),
    (encode_request("add-client", FREE, b"\x02" * 32), ADMIN, "bad-key"),  # not a point of the curve
    (encode_request("add-client", FREE), ADMIN, "malformed"),
    (encode_request("revoke-client", FREE), ADMIN, "unknown-client"),
    (encode_request("revoke-client", 1), ADMIN, "unknown-client"),
    (encode_request("revoke-client", ADMIN), ADMIN, "last-admin"),
    (encode_request("rotate-key", FREE, key(50)), ADMIN, "unknown-principal"),
    (encode_request("rotate-key", 1, key(1)), ADMIN, "key-in-use"),
    (encode_request("frobnicate", 1), ADMIN, "malformed"),
    (reconfig.CONFIG_OP_PREFIX + b"\xc1", ADMIN, "malformed"),
    (encode_op("put", b"k", b"v"), ADMIN, "not-a-configuration-operation"),
])
def test_refusals_change_nothing(op, client, reason):
    new, res = run(op, client)
    assert new is None and res["ok"] is False and res["reason"].startswith(reason), res


def test_a_change_must_be_ordered():
    new, res = run(encode_request("add-client", FREE, key(FREE)), read_only=True)
    assert new is None and res["reason"].startswith("read-only")
    new, res = run(encode_request("show"), client=4, read_only=True)
    assert new is None and res["config"] == res["latest"] == genesis().latest


def test_epochs_open_at_the_next_checkpoint():
    rec, res = run(encode_request("add-client", FREE, key(FREE)), n=5)
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 8}
    assert rec.effective(8) == rec.active and rec.effective(9) == rec.pending and rec.latest.is_admitted(FREE)
    _, shown = run(encode_request("show"), client=4, n=6, rec=rec)
    assert shown["config"] == rec.active and shown["latest"] == rec.pending  # in force / still to come
    rec2, res = run(encode_request("revoke-client", 5), n=8, rec=rec)  # same interval: same epoch
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 8} and rec2.active == rec.active
    assert rec2.latest.revoked == {5} and rec2.latest.is_admitted(FREE)
    rec3, res = run(encode_request("rotate-key", 4, key(40)), n=9, rec=rec2)  # the next one: epoch 2
    assert res == {"ok": True, "epoch": 2, "switch_seqno": 12}
    assert rec3.active == rec2.latest and rec3.latest.key_of(4) == key(40)
    _, res = run(encode_request("add-client", 5, key(55)), n=13, rec=rec3)
    assert res["reason"].startswith("duplicate")  # a revoked id is not reused
    _, res = run(encode_request("rotate-key", 5, key(55)), n=13, rec=rec3)
    assert res["reason"].startswith("unknown-principal")


@pytest.mark.parametrize("seconds, reason", [
    (-1, "bad-period"), (-0.5, "bad-period"), (float("nan"), "bad-period"), (float("inf"), "bad-period"),
    ("240", "bad-period"), (True, "bad-period"), (None, "bad-period"), (b"\x01", "bad-period"),
    (1, "period-too-short"), (N * reconfig.RECOVERY_TURN_MIN_S - 0.001, "period-too-short"),
    (1e300, "period-too-long"), (2 ** 63 - 1, "period-too-long"),
])
def test_a_bad_recovery_period_is_refused_with_the_reason(seconds, reason):
    new, res = run(encode_request("set-recovery-period", seconds), n=5)
    assert new is None and res["ok"] is False and res["reason"].startswith(reason), res
    new, res = run(encode_request("set-recovery-period", 300, 1), n=5)
    assert new is None and res["reason"].startswith("malformed")
    new, res = run(encode_request("set-recovery-period", 300), client=4, n=5)
    assert new is None and res["reason"].startswith("not-admin")


def test_the_recovery_period_opens_an_epoch_and_round_trips():
    assert genesis().latest.recovery_period_s is None  # (cluster.toml's)
    rec, res = run(encode_request("set-recovery-period", 600), n=5)
    assert res == {"ok": True, "epoch": 1, "switch_seqno": 8}
    assert rec.effective(8).recovery_period_s is None and rec.effective(9).recovery_period_s == 600.0
    assert ConfigRecord.decode(rec.encode()) == rec
    rec2, res = run(encode_request("set-recovery-period", 0), n=9, rec=rec)  # 0: off
    assert res["epoch"] == 2 and rec2.latest.recovery_period_ms == 0 and rec2.active.recovery_period_ms == 600_000
    rec3, _ = run(encode_request("set-recovery-period", N * reconfig.RECOVERY_TURN_MIN_S + 0.25), n=13, rec=rec2)
    assert rec3.latest.recovery_period_ms == int(N * reconfig.RECOVERY_TURN_MIN_S * 1000) + 250
    # other changes keep it; the describe() view shows it, and epoch.json's reading gives it back
    rec4, _ = run(encode_request("add-client", FREE, key(FREE)), n=17, rec=rec3)
    assert rec4.latest.recovery_period_ms == rec3.latest.recovery_period_ms
    from pbft.runtime.cluster import configuration_from_json
    assert configuration_from_json(rec4.latest.describe()) == rec4.latest
    assert "recovery_period_s" not in genesis().latest.describe()


def test_a_recorded_recovery_period_decodes_only_within_bounds():
    import msgpack
    from dataclasses import replace as dc_replace

    from pbft.state.configuration import RECOVERY_PERIOD_MS_MAX, Configuration
    cs = genesis().latest
    for ok in (0, 60_000, RECOVERY_PERIOD_MS_MAX):
        c2 = dc_replace(cs, recovery_period_ms=ok)
        assert Configuration.decode(c2.encode()) == c2
    good = msgpack.unpackb(dc_replace(cs, recovery_period_ms=60_000).encode(), use_list=True)
    for bad in (-1, RECOVERY_PERIOD_MS_MAX + 1, 60.0, "60000", True):
        with pytest.raises(ValueError):
            Configuration.decode(msgpack.packb(good[:8] + [bad], use_bin_type=True))
    with pytest.raises(ValueError):  # version 3 needs the period; the older shapes do not hold one
        Configuration.decode(msgpack.packb(good[:8] + [None], use_bin_type=True))
    assert Configuration.decode(cs.encode()).recovery_period_ms is None  # a record from before: cluster.toml's


# ---- in a cluster ---------------------------------------------------------------------------------
def cluster(**kw) -> Cluster:
    return Cluster(N, clients=4, genesis_config=GENESIS, checkpoint_interval_seqnos=4, log_window_seqnos=8, **kw)


def admin(c: Cluster, kind: str, *args) -> dict:
    cl = c.clients[ADMIN - N]
    cl.invoke(encode_request(kind, *args), False, c.now)
    c.run()
    while cl.busy:
        c.advance(10.0)
    (out,) = cl.take_outcomes()
    return decode_result(out.result)


def raw_invoke(c: Cluster, client: int, op: bytes, read_only: bool = False) -> bytes:
    cl = c.clients[client - N]
    cl.invoke(op, read_only, c.now)
    c.run()
    while cl.busy:
        c.advance(10.0)
    (out,) = cl.take_outcomes()
    return out.result


def fill_to(c: Cluster, seqno: int) -> None:
    """Ordered puts until every replica executed ``seqno`` and the checkpoint there is stable."""
    i = 0
    while min(r.low_water_mark for r in c.replicas if r.id not in c.down) < seqno:
        assert c.put(0, b"fill%d" % (i % 3), b"x") == ("ok", True)
        i += 1
        assert i < 100


def test_switch_at_the_same_checkpoint_everywhere_and_revoked_requests_refused():
    c = cluster()
    assert raw_invoke(c, FREE, encode_op("put", b"a", b"1")) == NOT_ADMITTED_RESULT  # not admitted yet
    res = admin(c, "add-client", FREE, key(FREE))
    assert res["ok"] and res["epoch"] == 1
    at = res["switch_seqno"]
    for r in c.replicas:
        assert r.rs.config.latest.is_admitted(FREE) and config_at(r, r.low_water_mark).epoch == 0
    fill_to(c, at)
    assert {config_at(r, at).epoch for r in c.replicas} == {1}  # the checkpoint of the switch, on all
    assert decode_kv(raw_invoke(c, FREE, encode_op("put", b"a", b"1"))) == ("ok", True)
    assert admin(c, "revoke-client", 5)["ok"]
    nonadmin = decode_result(raw_invoke(c, 4, encode_request("revoke-client", FREE)))
    assert nonadmin["ok"] is False and nonadmin["reason"].startswith("not-admin")  # negative control
    assert decode_kv(raw_invoke(c, 5, encode_op("put", b"b", b"1"))) == ("ok", True)  # not yet in effect
    fill_to(c, c.replicas[0].rs.config.latest.opens_at)
    assert {config_at(r, r.low_water_mark).epoch for r in c.replicas} == {2}
    assert raw_invoke(c, 5, encode_op("put", b"b", b"2")) == NOT_ADMITTED_RESULT
    assert raw_invoke(c, 5, encode_op("get", b"b"), read_only=True) == NOT_ADMITTED_RESULT
    assert c.get(0, b"b") == ("ok", b"1")  # the refused put did not execute
    shown = decode_result(raw_invoke(c, 4, encode_request("show"), read_only=True))
    assert shown["config"] == shown["latest"]
    assert shown["config"].epoch == 2 and shown["config"].revoked == {5} and shown["config"].is_admitted(FREE)


def test_tentative_change_rolled_back_never_took_effect():
    c = cluster()
    c.drop = lambda src, dst, raw: c.codec.open_frame(raw).tag == Tag.COMMIT
    res = admin(c, "add-client", FREE, key(FREE))  # completes on tentative replies (no commit arrives)
    assert res["ok"]
    for r in c.replicas:
        assert r.log.last_exec > r.log.last_committed_exec and r.rs.config.pending is not None
        r.log.rollback()
        assert r.rs.config == genesis() and config_at(r, r.low_water_mark).epoch == 0


def test_state_transfer_carries_the_configuration():
    c = cluster()
    c.down.add(3)
    assert admin(c, "add-client", FREE, key(FREE))["ok"]
    assert admin(c, "revoke-client", 5)["ok"]
    fill_to(c, 24)  # far past replica 3's window
    c.down.discard(3)
    c.advance(3000.0)
    fill_to(c, 32)
    r3 = c.replicas[3]
    assert c.of_kind("state-transfer", 3)
    assert r3.rs.config == c.replicas[0].rs.config and config_at(r3, r3.low_water_mark).revoked == {5}


@pytest.mark.parametrize("durable", [True, False])
def test_restart_from_disk_keeps_the_epoch(durable):
    c = cluster(durable=durable)
    assert admin(c, "rotate-key", 4, key(40))["ok"]
    fill_to(c, 8)
    before = c.replicas[2].rs.config
    assert before.latest.epoch == 1
    c.genesis_config = genesis_record([key(i) for i in range(N)], {4: key(4), ADMIN: key(ADMIN)}, [ADMIN])
    outcome = c.restart(2)  # with another (an old) genesis: the state's configuration wins
    assert outcome == "restored"
    r = c.replicas[2]
    assert r.rs.config == before and config_at(r, r.low_water_mark).key_of(4) == key(40)
    assert c.put(0, b"after", b"restart") == ("ok", True)
