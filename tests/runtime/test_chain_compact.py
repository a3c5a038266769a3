"""Configuration-only links (runtime.chain): a link whose membership is the one of the link before
(the same replicas, keys, weights, f and switch point) only certifies a newer configuration; it
follows the last membership link, so a newer one replaces it and a chain holds the membership
links plus at most one trailing configuration-only link, whatever the number of epochs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from pbft.config import ClusterConfig
from pbft.messages import Tag
from pbft.runtime import chain_keeper, follow
from pbft.runtime.chain import (
    ChainError, Link, check_configuration, compact, config_link, encode_chain, encode_link, genesis_head,
    link_digest, verify_head, verify_link,
)
from pbft.runtime.chain_keeper import ChainKeeper
from pbft.runtime.cluster import StorageParams
from pbft.runtime.follow import newest
from pbft.runtime.keys import Identity
from pbft.state.configuration import Configuration

CFG = ClusterConfig.create(4, 1, replica_slots=10)
IDS = [Identity.from_seed(i, bytes([i + 1]) * 32) for i in range(10)]
KEYS = [i.public for i in IDS]
CLIENT = Identity.from_seed(10, b"\x33" * 32)
GH = genesis_head(CFG, KEYS[:4])
CS0 = Configuration.genesis(KEYS[:4], {10: CLIENT.public}, [10])


def cs_at(epoch: int, keys=tuple(KEYS[:4])) -> Configuration:
    """The configuration of ``epoch``: client 11's key rotated (a configuration-only change)."""
    return dataclasses.replace(CS0, epoch=epoch, opens_at=8 * epoch, replica_keys=tuple(keys),
                               clients={10: CLIENT.public, 11: KEYS[4 + epoch % 5]})


def signed(prev, cs: Configuration, signers: dict[int, Identity]) -> Link:
    lk = config_link(prev.digest, cs, CFG)
    stmt = lk.statement()
    return Link(lk.prev, lk.members, tuple((i, signers[i].signing_key.sign(stmt).signature)
                                           for i in sorted(signers)), lk.config)


def quorum(keys: list[Identity]) -> dict[int, Identity]:
    return {i: keys[i] for i in (0, 2, 3)}


T3 = signed(GH, cs_at(3), quorum(IDS))
T5 = signed(GH, cs_at(5), quorum(IDS))


def test_a_configuration_only_link_follows_the_membership_link_and_a_newer_one_replaces_it():
    h3 = verify_head(CFG, KEYS[:4], [T3])
    assert h3.digest == GH.digest and (h3.epoch, h3.opens_at) == (3, 24)  # (the next link follows the genesis)
    # both follow the genesis: the chain of either verifies, and the newer is kept
    assert verify_head(CFG, KEYS[:4], [T3, T5]) == verify_head(CFG, KEYS[:4], [T5])
    assert compact([T3, T5]) == [T5]
    assert check_configuration(CFG, verify_head(CFG, KEYS[:4], [T5]), cs_at(5).encode()) == cs_at(5)
    # ... but not backwards: an older configuration after a newer one is a broken link
    with pytest.raises(ChainError, match="link 2 .*broken link: configuration epoch 3"):
        verify_head(CFG, KEYS[:4], [T5, T3])


def test_a_replayed_older_trailing_link_loses_to_the_newer():
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], chain=())
    old, new = encode_chain([T3]), encode_chain([T5])
    for served in ({0: old, 1: new, 2: old}, {0: new, 1: old, 2: old}):
        got = newest(cluster, served, {j: cs_at(5).encode() for j in served})
        assert got.head is not None and got.head.epoch == 5 and list(got.links) == [T5]
        assert got.config == cs_at(5) and not got.refused
    # a keeper holding the newer one drops the older; one holding the older takes the newer
    k = ChainKeeper(node(0))
    assert k.on_frame(frame_of(T5)) == "" and k.links == [T5]
    assert k.on_frame(frame_of(T3)) == "chain-link-old" and k.links == [T5] and k.tip.epoch == 5
    k3 = ChainKeeper(node(1))
    assert k3.on_frame(frame_of(T3)) == "" and k3.on_frame(frame_of(T5)) == "" and k3.links == [T5]


def test_a_trailing_link_signed_by_the_wrong_membership_does_not_verify():
    new1 = Identity.from_seed(1, b"\x77" * 32)
    rot = signed(GH, cs_at(1, (KEYS[0], new1.public, *KEYS[2:4])), {0: IDS[0], 1: IDS[1], 2: IDS[2]})
    hr = verify_head(CFG, KEYS[:4], [rot])
    assert hr.digest == link_digest(rot)  # (a key rotation is a membership link)
    keys = (KEYS[0], new1.public, *KEYS[2:4])
    ok = signed(hr, cs_at(2, keys), {1: new1, 2: IDS[2], 3: IDS[3]})
    assert verify_head(CFG, KEYS[:4], [rot, ok]).epoch == 2 and compact([rot, ok]) == [rot, ok]
    # signed with replica 1's key before its rotation: not a key of the membership it follows
    with pytest.raises(ChainError, match="link 2 .*bad signature: of replica 1"):
        verify_head(CFG, KEYS[:4], [rot, signed(hr, cs_at(2, keys), {1: IDS[1], 2: IDS[2], 3: IDS[3]})])
    # a configuration-only link of the genesis membership, signed by it, after the rotation
    with pytest.raises(ChainError, match="link 2 .*broken link: it does not follow"):
        verify_head(CFG, KEYS[:4], [rot, T3])
    # the same after the rotation's prev: a membership link with other keys, not replaced by T3
    with pytest.raises(ChainError, match="link 2 .*bad signature"):
        verify_head(CFG, KEYS[:4], [rot, dataclasses.replace(T3, prev=hr.digest)])


def test_a_membership_link_after_configuration_only_ones_verifies_and_carries_the_newest_digest():
    grown = Configuration(6, 48, tuple(KEYS[:4]), {10: CLIENT.public, 11: KEYS[9], 12: KEYS[8]}, (10,))
    new2 = Identity.from_seed(2, b"\x55" * 32)
    rotated = dataclasses.replace(grown, replica_keys=(KEYS[0], KEYS[1], new2.public, KEYS[3]))
    m6 = signed(GH, rotated, quorum(IDS))  # (replica 2 signs its rotation with its old key)
    h = verify_head(CFG, KEYS[:4], [T3, T5, m6])
    assert h == verify_head(CFG, KEYS[:4], compact([T3, T5, m6])) and compact([T3, T5, m6]) == [m6]
    assert h.digest == link_digest(m6) and h.members.keys[2] == new2.public
    assert check_configuration(CFG, h, rotated.encode()).clients[12] == KEYS[8]  # (every change before it)
    # a membership link of an older epoch than the trailing link's does not verify
    m4 = signed(GH, dataclasses.replace(rotated, epoch=4, opens_at=32), quorum(IDS))
    with pytest.raises(ChainError, match="link 2 .*broken link: configuration epoch 4 at 32 does not come after "
                                         "epoch 5 at 40"):
        verify_head(CFG, KEYS[:4], [T5, m4])
    # the next configuration-only link follows it, with the new key
    ids = [IDS[0], IDS[1], new2, IDS[3]]
    t7 = signed(h, dataclasses.replace(rotated, epoch=7, opens_at=56), quorum(ids))
    assert t7.prev == link_digest(m6) and verify_head(CFG, KEYS[:4], [m6, t7]).epoch == 7


def test_replicas_holding_other_trailing_links_sign_the_same_statement():
    a, b = ChainKeeper(node(0)), ChainKeeper(node(2))
    a.on_frame(frame_of(T3))
    b.on_frame(frame_of(T5))
    a.sign(cs_at(7))
    b.sign(cs_at(7))
    assert a.own is not None and b.own is not None and a.own.statement() == b.own.statement()
    assert a.on_frame(frame_of(b.own)) == "" and a.on_frame(frame_of(signed(GH, cs_at(7), {3: IDS[3]}))) == ""
    assert a.links == [a.links[0]] and a.tip.epoch == 7 and verify_head(CFG, KEYS[:4], a.links).epoch == 7


# ---- keepers ---------------------------------------------------------------------------------------
class Loop:
    def call_later(self, delay, fn, *args):
        pass


def node(me: int, tmp: Path | None = None) -> SimpleNamespace:
    storage = StorageParams(mode="memory") if tmp is None else StorageParams(mode="durable")
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], dir=tmp, chain=(), storage=storage)
    logs: list = []
    return SimpleNamespace(cluster=cluster, id=me, identity=IDS[me], loop=Loop(), links={}, halted=False,
                           replica=SimpleNamespace(low_water_mark=0), logs=logs,
                           _log=lambda ev, **kw: logs.append((ev, kw)))


def frame_of(link: Link) -> bytes:
    return msgpack.packb([int(Tag.MEMBERSHIP_LINK), 1, encode_link(link), b"", b""], use_bin_type=True)


@pytest.fixture(autouse=True)
def no_core_state(monkeypatch):
    monkeypatch.setattr(chain_keeper, "config_at", lambda r, n: None)


def test_2000_configuration_only_epochs_keep_the_chain_at_its_membership_links_plus_one():
    k = ChainKeeper(node(0))
    ids, keys, rotations = list(IDS[:4]), list(KEYS[:4]), 0
    for e in range(1, 2001):
        if e in (700, 1400):  # (replica 3's key rotated: a membership link)
            ids[3] = Identity.from_seed(3, bytes([e % 251]) * 32)
            keys[3], rotations = ids[3].public, rotations + 1
            signers = {0: IDS[0], 1: IDS[1], 2: IDS[2]}  # (replica 3 would sign with its old key)
        else:
            signers = {i: ids[i] for i in (1, 2, 3)}
        lk = signed(k.tip, cs_at(e, keys), signers)
        assert k.on_frame(frame_of(lk)) == "", e
        assert len(k.links) == rotations + (e not in (700, 1400))  # (+ the trailing configuration-only link)
    assert k.tip.epoch == 2000 and [lk.epoch for lk in k.links] == [700, 1400, 2000]
    assert verify_head(CFG, KEYS[:4], k.links) == k.tip
    assert check_configuration(CFG, k.tip, cs_at(2000, keys).encode()) == cs_at(2000, keys)
    assert len(k.encoded()) < 3 * 600


def test_the_chain_file_holds_the_membership_links_and_the_newest_configuration_only_link(tmp_path):
    (tmp_path / "data" / "replica-0").mkdir(parents=True)
    n = node(0, tmp_path)
    k = ChainKeeper(n)
    for e in range(1, 21):
        k.on_frame(frame_of(signed(k.tip, cs_at(e), quorum(IDS))))
    path = tmp_path / "data" / "replica-0" / chain_keeper.CHAIN_FILE
    assert k.tip.epoch == 20 and path.read_bytes() == encode_chain(k.links) and len(k.links) == 1
    again = ChainKeeper(n)  # a restart
    assert again.tip == k.tip and again.links == k.links
    # a file of a chain that still has the configuration-only links later ones replace: compacted
    ts, h = [], GH
    for e in range(1, 6):
        ts.append(signed(h, cs_at(e), quorum(IDS)))
        h = verify_link(CFG, h, ts[-1])
    path.write_bytes(encode_chain(ts))
    n.logs.clear()
    third = ChainKeeper(n)
    assert third.links == [ts[-1]] and third.tip.epoch == 5 and not n.logs


def test_a_follower_verifies_each_distinct_chain_once(monkeypatch):
    calls = []
    real = follow.verify_head
    monkeypatch.setattr(follow, "verify_head", lambda g, keys, links: calls.append(len(links)) or real(g, keys, links))
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], chain=())
    new, bad = encode_chain([T5]), encode_chain([dataclasses.replace(T5, signatures=T5.signatures[:2])])
    got = newest(cluster, {0: new, 1: new, 2: bad, 3: new, 4: bad})
    assert len(calls) == 2 and got.served_by == [0, 1, 3] and sorted(got.refused) == [2, 4]
    assert "below quorum" in got.refused[4]


def test_an_epoch_file_of_a_configuration_a_newer_one_replaced_takes_the_newer(tmp_path, monkeypatch):
    """``pbft reconfig`` writes epoch.json with the chain that certifies the configuration in force;
    when a newer configuration-only link has replaced that one's, it writes the newer one."""
    from helpers.chainutil import chain_links
    from pbft.runtime.cluster import init_cluster, load_cluster
    from pbft.state.configuration import ConfigRecord
    from pbft.tools import reconfig

    c = init_cluster(tmp_path, 4, None, None, 27100, 2)
    cs0 = ConfigRecord.decode(c.genesis_config).latest
    cs1 = dataclasses.replace(cs0, epoch=1, opens_at=8, admins=())
    cs2 = dataclasses.replace(cs1, epoch=2, opens_at=16, recovery_period_ms=3_600_000)
    links = compact(chain_links(tmp_path, cs1, cs2))
    assert len(links) == 1
    head = verify_head(c.cfg, [e.public_key for e in c.slots[:4]], links)
    served = follow.Learnt(links=tuple(links), head=head, config=cs2)
    monkeypatch.setattr(follow, "learn", lambda cluster: served)
    chain, doc = reconfig.certifying_chain(c, cs1.describe(), timeout_s=0.0)
    assert chain == encode_chain(links).hex() and doc == cs2.describe()
    assert reconfig._write_epoch_doc(c, cs1.describe())["epoch"] == 2
    assert load_cluster(tmp_path).epoch == 2
    # without the newer configuration served, it cannot: it says so
    monkeypatch.setattr(follow, "learn", lambda cluster: dataclasses.replace(served, config=None))
    with pytest.raises(reconfig.ConfigError, match="no replica serves a configuration certificate chain"):
        reconfig.certifying_chain(c, cs1.describe(), timeout_s=0.0)
