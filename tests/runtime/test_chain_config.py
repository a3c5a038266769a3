"""Configuration links (runtime.chain, format 2): a link per configuration epoch, with the
membership's current replica keys and the digest of the full configuration, signed by quorum
weight of the link before's membership with the keys that link has. A key rotation is chained:
the rotated replica's new key counts from the next link on, never for the link that brings it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from helpers.chainutil import chain_hex, chain_links, Loop
from pbft.config import ClusterConfig, ConfigError
from pbft.messages import Tag
from pbft.runtime import chain_keeper
from pbft.runtime.chain import (
    ChainError, Link, check_configuration, config_link, decode_chain, encode_chain, encode_link, genesis_head,
    genesis_membership, links_after, membership_digest, sign_link, verify_head, verify_link,
)
from pbft.runtime.chain_keeper import ChainKeeper
from pbft.runtime.cluster import EPOCH_FILE, StorageParams, init_cluster, load_cluster
from pbft.runtime.epochs import RotatingIdentity
from pbft.runtime.follow import newest, with_chain
from pbft.runtime.keys import Identity
from pbft.state.configuration import ConfigRecord, Configuration, Membership

CFG = ClusterConfig.create(4, 1, replica_slots=10)
IDS = [Identity.from_seed(i, bytes([i + 1]) * 32) for i in range(10)]
KEYS = [i.public for i in IDS]
NEW1 = Identity.from_seed(1, b"\x77" * 32)  # replica 1's key after the rotation
CLIENT = Identity.from_seed(10, b"\x33" * 32)
GH = genesis_head(CFG, KEYS[:4])
CS0 = Configuration.genesis(KEYS[:4], {10: CLIENT.public}, [10])
CS1 = dataclasses.replace(CS0, epoch=1, opens_at=8, replica_keys=(KEYS[0], NEW1.public, KEYS[2], KEYS[3]))
CS2 = dataclasses.replace(CS1, epoch=2, opens_at=16, clients={10: CLIENT.public, 11: KEYS[9]})


def signed(prev, cs: Configuration, signers: dict[int, Identity]) -> Link:
    lk = config_link(prev.digest, cs, CFG)
    stmt = lk.statement()
    return Link(lk.prev, lk.members, tuple((i, signers[i].signing_key.sign(stmt).signature)
                                           for i in sorted(signers)), lk.config)


L1 = signed(GH, CS1, {0: IDS[0], 1: IDS[1], 2: IDS[2]})  # replica 1 signs its rotation with its old key
H1 = verify_link(CFG, GH, L1)
L2 = signed(H1, CS2, {1: NEW1, 2: IDS[2], 3: IDS[3]})  # from then on, with its new key


def test_a_rotation_link_verifies_and_the_new_key_counts_from_the_next_link():
    h = verify_head(CFG, KEYS[:4], [L1])
    assert h.members.keys[1] == NEW1.public and h.epoch == 1 and h.opens_at == 8
    assert h.members.epoch == 0 and h.members.opens_at == 0  # (the same membership: only a key changed)
    assert check_configuration(CFG, h, CS1.encode()) == CS1
    h2 = verify_head(CFG, KEYS[:4], [L1, L2])
    assert (h2.epoch, h2.opens_at) == (2, 16) and check_configuration(CFG, h2, CS2.encode()).clients[11] == KEYS[9]
    assert decode_chain(encode_chain([L1, L2])) == [L1, L2]
    assert links_after([L1, L2], 1) == [L2]


def test_a_link_signed_with_the_rotated_key_only_does_not_verify():
    # the rotation's own link, signed with the new key it brings: a link cannot vouch for itself
    with pytest.raises(ChainError, match="link 1 .*bad signature: of replica 1"):
        verify_head(CFG, KEYS[:4], [signed(GH, CS1, {0: IDS[0], 1: NEW1, 2: IDS[2]})])
    # an attacker's configuration with its own keys for three replicas, signed with those keys
    evil = [Identity.from_seed(i, bytes([200 + i]) * 32) for i in range(3)]
    forged = dataclasses.replace(CS0, epoch=1, opens_at=8, replica_keys=(*[e.public for e in evil], KEYS[3]))
    with pytest.raises(ChainError, match="bad signature"):
        verify_head(CFG, KEYS[:4], [signed(GH, forged, dict(enumerate(evil)))])
    # after the rotation, replica 1's old key no longer counts
    with pytest.raises(ChainError, match="link 2 .*bad signature: of replica 1"):
        verify_head(CFG, KEYS[:4], [L1, signed(H1, CS2, {1: IDS[1], 2: IDS[2], 3: IDS[3]})])


def test_a_link_below_quorum_of_the_membership_before_does_not_verify():
    with pytest.raises(ChainError, match="below quorum"):
        verify_head(CFG, KEYS[:4], [signed(GH, CS1, {0: IDS[0], 2: IDS[2]})])
    with pytest.raises(ChainError, match="wrong signer"):  # (a slot beyond the genesis members)
        verify_head(CFG, KEYS[:4], [signed(GH, CS1, {0: IDS[0], 2: IDS[2], 5: IDS[5]})])


def test_a_tampered_configuration_digest_or_epoch_does_not_verify():
    other = dataclasses.replace(CS1, clients={10: KEYS[8]})  # (a client's key swapped)
    ref = config_link(GH.digest, other, CFG).config
    with pytest.raises(ChainError, match="bad signature"):
        verify_head(CFG, KEYS[:4], [dataclasses.replace(L1, config=ref)])
    with pytest.raises(ChainError, match="bad signature"):
        verify_head(CFG, KEYS[:4], [dataclasses.replace(L1, config=dataclasses.replace(L1.config, epoch=5))])
    # epochs go forward: the same epoch again, or an earlier checkpoint, is a broken link
    again = signed(H1, dataclasses.replace(CS2, epoch=1), {1: NEW1, 2: IDS[2], 3: IDS[3]})
    with pytest.raises(ChainError, match="link 2 .*broken link"):
        verify_head(CFG, KEYS[:4], [L1, again])
    with pytest.raises(ChainError, match="broken link"):
        verify_head(CFG, KEYS[:4], [L1, signed(GH, CS2, {0: IDS[0], 2: IDS[2], 3: IDS[3]})])  # (skips L1's prev)


def test_a_full_configuration_that_is_not_the_heads_is_refused():
    with pytest.raises(ChainError, match="not the one the chain certifies"):
        check_configuration(CFG, H1, dataclasses.replace(CS1, clients={10: KEYS[8]}).encode())
    with pytest.raises(ChainError, match="not the one the chain certifies"):
        check_configuration(CFG, H1, CS2.encode())
    with pytest.raises(ChainError, match="certifies no configuration"):
        check_configuration(CFG, GH, CS0.encode())
    # what followers do with what replicas serve: the matching one is taken, a wrong one is named
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], chain=())
    raw = encode_chain([L1])
    got = newest(cluster, {0: raw, 1: raw}, {0: CS2.encode(), 1: CS1.encode()})
    assert got.config == CS1 and got.head.epoch == 1 and got.served_by == [0, 1]
    assert "not the one the chain certifies" in got.refused[0]


def test_format_1_links_verify_as_a_prefix_only():
    g = genesis_membership(CFG, KEYS[:4])
    m1 = Membership(7, 2, (1,) * 7, tuple(KEYS[:7]), 256, 1)
    d = membership_digest(g)
    v1 = Link(d, m1, tuple((i, sign_link(IDS[i].signing_key, d, m1)) for i in range(3)))
    h = verify_head(CFG, KEYS[:4], [v1])
    assert h.config == b"" and h.epoch == 1
    cs = Configuration(2, 300, tuple(KEYS[:7]), {10: CLIENT.public}, (10,), m1)
    v2 = signed(h, cs, {i: IDS[i] for i in range(5)})
    assert verify_head(CFG, KEYS[:4], [v1, v2]).epoch == 2
    # after an upgrade, the configuration of the format 1 link's own epoch may be certified (once)
    same = Configuration(1, 128, tuple(KEYS[:4]), {10: CLIENT.public}, (10,), None, m1)
    v2same = signed(h, same, {i: IDS[i] for i in range(5)})
    hs = verify_head(CFG, KEYS[:4], [v1, v2same])
    assert (hs.epoch, hs.opens_at) == (1, 128) and hs.order() > h.order()
    assert check_configuration(CFG, hs, same.encode()) == same
    again = signed(hs, dataclasses.replace(same, opens_at=136), {i: IDS[i] for i in range(5)})
    with pytest.raises(ChainError, match="link 3 .*broken link"):
        verify_head(CFG, KEYS[:4], [v1, v2same, again])
    # ... but not with another membership than the format 1 link's
    other = Configuration(1, 128, tuple(KEYS[:4]), {}, (), None, Membership(7, 2, (1,) * 7, tuple(KEYS[:7]), 264, 1))
    with pytest.raises(ChainError, match="broken link"):
        verify_head(CFG, KEYS[:4], [v1, signed(h, other, {i: IDS[i] for i in range(5)})])
    # a format 1 link after a configuration link is refused
    late = Link(H1.digest, m1, tuple((i, sign_link(k.signing_key, H1.digest, m1))
                                   for i, k in ((0, IDS[0]), (1, NEW1), (2, IDS[2]))))
    with pytest.raises(ChainError, match="format 1 link .*after a configuration link"):
        verify_head(CFG, KEYS[:4], [L1, late])


def rotated_cluster(directory, hosts=None, port=7000):
    """A cluster directory of 4 replicas, and its genesis configuration with replica 1's key
    rotated (epoch 1, from checkpoint 8 on): (the cluster, the new identity, that configuration)."""
    c = init_cluster(directory, 4, None, hosts, port, 2)
    cs0 = ConfigRecord.decode(c.genesis_config).latest
    new1 = Identity.from_seed(1, b"\x99" * 32)
    return c, new1, dataclasses.replace(cs0, epoch=1, opens_at=8,
                                        replica_keys=(cs0.replica_keys[0], new1.public, *cs0.replica_keys[2:]))


def test_epoch_json_with_a_tampered_key_is_refused(tmp_path):
    _, new1, rotated = rotated_cluster(tmp_path)
    path = tmp_path / EPOCH_FILE
    good = {**rotated.describe(), "chain": chain_hex(tmp_path, rotated)}
    path.write_text(json.dumps(good))
    now = load_cluster(tmp_path)
    assert now.public_key_of(1) == new1.public and now.epoch == 1 and len(now.chain) == 1
    # a replica key changed in the file (its chain untouched): refused
    bad = dict(good, replicas=[*good["replicas"][:2], Identity.from_seed(2, b"\x98" * 32).public.hex(),
                               good["replicas"][3]])
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="is not the one its certificate chain ends at"):
        load_cluster(tmp_path)
    # a client key changed: refused too (the link has the whole configuration's digest)
    client = next(iter(good["clients"]))
    path.write_text(json.dumps(dict(good, clients={**good["clients"], client: KEYS[9].hex()})))
    with pytest.raises(ConfigError, match="is not the one its certificate chain ends at"):
        load_cluster(tmp_path)
    # a file of a later epoch without its chain (e.g. written by the previous version): refused
    path.write_text(json.dumps(rotated.describe()))
    with pytest.raises(ConfigError, match="certifies no configuration"):
        load_cluster(tmp_path)
    path.write_text(json.dumps(good))
    assert load_cluster(tmp_path).public_key_of(1) == new1.public


def test_a_follower_takes_the_rotated_key_from_the_chain(tmp_path):
    _, new1, rotated = rotated_cluster(tmp_path)
    links = tuple(chain_links(tmp_path, rotated))
    fresh = load_cluster(tmp_path)  # (cluster.toml only)
    assert fresh.public_key_of(1) != new1.public
    got = with_chain(fresh, links)
    assert got.public_key_of(1) == new1.public and got.cfg.n == 4 and got.members_from == 0
    assert with_chain(fresh, links, rotated).epoch == 1
    with pytest.raises(ConfigError, match="not the one the chain certifies"):
        with_chain(fresh, links, dataclasses.replace(rotated, admins=()))


# ---- the keeper --------------------------------------------------------------------------------
@pytest.fixture
def no_core_state(monkeypatch):
    monkeypatch.setattr(chain_keeper, "config_at", lambda r, n: None)


def node(tmp: Path, me: int, identity) -> SimpleNamespace:
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], dir=tmp, chain=(), storage=StorageParams(mode="memory"))
    logs: list = []
    return SimpleNamespace(cluster=cluster, id=me, identity=identity, loop=Loop(), links={}, halted=False,
                           replica=SimpleNamespace(low_water_mark=0), logs=logs,
                           _log=lambda ev, **kw: logs.append((ev, kw)))


def frame_of(link: Link) -> bytes:
    return msgpack.packb([int(Tag.MEMBERSHIP_LINK), 1, encode_link(link), b"", b""], use_bin_type=True)


def test_a_rotated_replica_signs_its_rotation_with_its_old_key(tmp_path, no_core_state):
    # after the switch, replica 1 signs with its new key; the old one is kept for the chain
    ident = RotatingIdentity(NEW1, [], 0.0, [IDS[1]])
    n = node(tmp_path, 1, ident)
    k = ChainKeeper(n)
    k.sign(CS1)
    assert k.own is not None and k.own.signatures[0][0] == 1
    others = signed(GH, CS1, {0: IDS[0], 2: IDS[2]}).signatures
    verify_link(CFG, GH, dataclasses.replace(k.own, signatures=(others[0], k.own.signatures[0], others[1])))
    for v in (0, 2):
        assert k.on_frame(frame_of(signed(GH, CS1, {v: IDS[v]}))) == ""
    assert k.tip.epoch == 1 and k.head.keys[1] == NEW1.public and k.config == CS1.encode()
    # the next link: signed with its new key (the one the link before has for it)
    k.sign(CS2)
    assert k.own is not None
    others = signed(k.tip, CS2, {2: IDS[2], 3: IDS[3]}).signatures
    assert verify_link(CFG, k.tip, dataclasses.replace(k.own, signatures=(k.own.signatures[0], *others))).epoch == 2
    # a replica without the key the chain has for it does not sign, and says so once
    n3 = node(tmp_path, 3, Identity.from_seed(3, b"\x01" * 32))
    k3 = ChainKeeper(n3)
    k3.sign(CS1)
    k3.sign(CS1)
    assert k3.own is None and [e for e, _ in n3.logs] == ["chain-sign-unavailable"]


def test_a_signer_moves_its_vote_to_a_newer_epoch_not_back(tmp_path, no_core_state):
    k = ChainKeeper(node(tmp_path, 0, IDS[0]))
    cs2 = dataclasses.replace(CS0, epoch=2, opens_at=16, clients={10: CLIENT.public, 11: KEYS[9]})
    assert k.on_frame(frame_of(signed(GH, CS1, {2: IDS[2]}))) == ""
    assert k.on_frame(frame_of(signed(GH, cs2, {2: IDS[2]}))) == ""  # (its stable checkpoint moved on)
    assert len(k.votes) == 1  # (its older vote is gone)
    assert k.on_frame(frame_of(signed(GH, CS1, {2: IDS[2]}))) == "chain-vote-superseded"
    assert k.on_frame(frame_of(signed(GH, cs2, {1: IDS[1], 3: IDS[3]}))) == ""
    assert k.tip.epoch == 2 and len(k.links) == 1  # (epoch 1 skipped: the link certifies the latest)
    assert k.on_frame(frame_of(signed(GH, CS1, {0: IDS[0]}))) == "chain-link-old"


def test_the_certified_configuration_is_kept_beside_the_chain_and_checked_when_read(tmp_path, no_core_state):
    (tmp_path / "data" / "replica-0").mkdir(parents=True)
    n = node(tmp_path, 0, IDS[0])
    n.cluster.storage = StorageParams(mode="durable")
    k = ChainKeeper(n)
    k.sign(CS1)
    for v in (2, 3):
        k.on_frame(frame_of(signed(GH, CS1, {v: IDS[v]})))
    assert k.tip.epoch == 1 and k.describe()["configuration"] == CS1.encode().hex()
    again = ChainKeeper(n)  # a restart
    assert again.tip == k.tip and again.config == CS1.encode()
    cpath = tmp_path / "data" / "replica-0" / chain_keeper.CONFIG_FILE
    cpath.write_bytes(CS2.encode())  # (not the one the link certifies)
    n.logs.clear()
    third = ChainKeeper(n)
    assert third.tip == k.tip and third.config == b"" and [e for e, _ in n.logs] == ["chain-config-unreadable"]


def test_a_chain_file_of_the_previous_format_is_kept_and_extended(tmp_path, no_core_state):
    (tmp_path / "data" / "replica-0").mkdir(parents=True)
    grown = Membership(7, 2, (1,) * 7, tuple(KEYS[:7]), 256, 1)
    d = membership_digest(genesis_membership(CFG, KEYS[:4]))
    v1 = Link(d, grown, tuple((i, sign_link(IDS[i].signing_key, d, grown)) for i in range(3)))
    (tmp_path / "data" / "replica-0" / chain_keeper.CHAIN_FILE).write_bytes(encode_chain([v1]))
    n = node(tmp_path, 0, IDS[0])
    n.cluster.storage = StorageParams(mode="durable")
    k = ChainKeeper(n)
    assert k.links == [v1] and k.tip.config == b"" and not n.logs
    # the configuration of the epoch in force (the one that opened the format 1 link's membership)
    cs = Configuration(1, 128, tuple(KEYS[:4]), {10: CLIENT.public}, (10,), None, grown)
    k.sign(cs)
    assert k.own is not None and k.own.config is not None and k.own.config.epoch == 1
    for v in (1, 2, 3, 4):
        k.on_frame(frame_of(signed(k.tip, cs, {v: IDS[v]})))
    assert len(k.links) == 2 and k.tip.epoch == 1 and k.tip.config and k.config == cs.encode()



def test_a_running_client_takes_a_rotated_replica_key_and_seals_fresh_session_keys_to_it(tmp_path, monkeypatch):
    """``ClientPool._follow`` given a chain that rotates replica 1's key (the same membership):
    the pool's registry has the new key, and every identity's next NewKey, queued for every
    replica, seals its session keys for replica 1 to it (opened with the new private key only)."""
    import asyncio

    from pbft.runtime import client as client_mod
    from pbft.runtime.client import ClientPool
    from pbft.runtime.cluster import free_port_range
    from pbft.runtime.keys import accept_newkey
    from pbft.runtime.transport import _LEN

    c, new1, rotated = rotated_cluster(tmp_path / "c", ["127.0.0.1"], free_port_range(20))
    learnt = with_chain(c, tuple(chain_links(c.dir, rotated)), rotated)
    monkeypatch.setattr(client_mod, "follow", lambda cluster, timeout: learnt)

    async def main():
        pool = ClientPool(c, [c.identity(c.client_ids[0])])
        pool.links = {j: SimpleNamespace(stop=lambda: None) for j in range(4)}  # (links made, not connected)
        await pool._follow()
        assert bytes(pool.cluster.public.verify[1]) == new1.public
        assert (pool.configs_followed, pool.memberships_followed) == (1, 0)
        fr = pool.newkeys_out[1][0]
        raw = fr[_LEN.size:]
        sender, keys = accept_newkey(raw, new1, pool.cluster.public, 4, c.cfg.max_principal, {})
        assert sender == c.client_ids[0] and len(keys) == 64
        with pytest.raises(Exception, match="newkey-undecryptable"):  # (not sealed to the old key)
            accept_newkey(raw, c.identity(1), pool.cluster.public, 4, c.cfg.max_principal, {})
        pool.links = {}
        await pool.close()

    asyncio.run(main())


def test_a_replica_starting_alone_takes_a_rotation_from_the_chain_it_holds(tmp_path):
    """``pbft replica`` with no peer up and no epoch.json: the chain in its data directory
    (``tools.net.held_chain``) counts when it ends at a key rotation (same ids, f, weights and switch
    point as cluster.toml's), and the configuration kept beside it gives the clients' keys; an older
    or equal chain, or a configuration file that is not the chain's, does not."""
    from pbft.runtime.chain import encode_chain
    from pbft.runtime.chain_keeper import CHAIN_FILE, CONFIG_FILE
    from pbft.tools.net import held_chain

    c, new1, rotated = rotated_cluster(tmp_path)
    assert c.storage.mode != "memory"
    d = c.storage.replica_dir(c.dir, 2)
    d.mkdir(parents=True, exist_ok=True)
    assert held_chain(c, 2) is None  # (nothing held)
    (d / CHAIN_FILE).write_bytes(encode_chain(chain_links(tmp_path, rotated)))
    (d / CONFIG_FILE).write_bytes(rotated.encode())
    got = held_chain(c, 2)
    assert got is not None and got.public_key_of(1) == new1.public and got.epoch == 1
    assert held_chain(got, 2) is None  # (not newer than what the cluster has)
    (d / CONFIG_FILE).write_bytes(dataclasses.replace(rotated, admins=()).encode())
    got = held_chain(c, 2)  # the chain still counts, the foreign configuration does not
    assert got is not None and got.public_key_of(1) == new1.public and got.epoch == 0
