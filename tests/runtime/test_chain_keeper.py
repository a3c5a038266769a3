"""A replica's keeper of the membership chain (runtime.chain_keeper): it gathers signed votes of
the last membership's members, appends a link at quorum weight, keeps the chain across restarts,
and drops (and names) every vote it must not count."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from helpers.chainutil import Loop

from pbft.messages import Tag
from pbft.runtime.chain import Link, config_link, encode_link, genesis_head, genesis_membership, verify_link
from pbft.runtime import chain_keeper
from pbft.runtime.chain_keeper import CHAIN_FILE, ChainKeeper
from pbft.runtime.cluster import StorageParams
from pbft.runtime.keys import Identity
from pbft.config import ClusterConfig
from pbft.state.configuration import Configuration, Membership

CFG = ClusterConfig.create(4, 1, replica_slots=7)
IDS = [Identity.from_seed(i, bytes([i + 7]) * 32) for i in range(7)]
KEYS = [i.public for i in IDS]
G = genesis_membership(CFG, KEYS[:4])
GH = genesis_head(CFG, KEYS[:4])
M1 = Membership(7, 2, (1,) * 7, tuple(KEYS), 16, 1)
# configuration epoch 1 (from checkpoint 8 on) records the growth to M1 (the 7 order after 16)
CS1 = Configuration(1, 8, tuple(KEYS[:4]), {}, (), None, M1)


@pytest.fixture(autouse=True)
def no_core_state(monkeypatch):
    """The fake node has no core replica: its checkpoints record no membership change."""
    monkeypatch.setattr(chain_keeper, "config_at", lambda r, n: None)


def node(tmp: Path, me: int = 0, memory: bool = False):
    (tmp / "data" / f"replica-{me}").mkdir(parents=True, exist_ok=True)
    cluster = SimpleNamespace(genesis_cfg=CFG, cfg=CFG, slots=[SimpleNamespace(public_key=k) for k in KEYS],
                              replicas=[], dir=tmp, chain=(),
                              storage=StorageParams(mode="memory" if memory else "durable"))
    logs: list = []
    n = SimpleNamespace(cluster=cluster, id=me, identity=IDS[me], loop=Loop(), links={}, halted=False,
                        replica=SimpleNamespace(low_water_mark=0),
                        _log=lambda ev, **kw: logs.append((ev, kw)))
    n.logs = logs
    return n


def vote(signer: int, cs: Configuration = CS1, prev=GH, ident=None) -> Link:
    lk = config_link(prev.digest, cs, CFG)
    return Link(lk.prev, lk.members, ((signer, (ident or IDS[signer]).signing_key.sign(lk.statement()).signature),),
                lk.config)


def frame_of(link: Link) -> bytes:
    return msgpack.packb([int(Tag.MEMBERSHIP_LINK), 1, encode_link(link), b"", b""], use_bin_type=True)


def test_votes_of_quorum_weight_make_a_link_that_survives_a_restart(tmp_path):
    n = node(tmp_path)
    k = ChainKeeper(n)
    assert k.head == G and k.links == []
    assert k.on_frame(frame_of(vote(1))) == ""
    assert k.on_frame(frame_of(vote(2))) == ""
    assert k.links == []  # two of four: below quorum (3)
    assert k.on_frame(frame_of(vote(3))) == ""
    assert k.head == M1 and len(k.links) == 1 and {s for s, _ in k.links[0].signatures} == {1, 2, 3}
    assert ("chain-link", {"epoch": 1, "n": 7, "f": 2, "opens_at": 16, "signers": 3, "config_epoch": 1,
                           "config_opens_at": 8}) in n.logs
    assert k.tip.epoch == 1 and k.tip.opens_at == 8
    again = ChainKeeper(node(tmp_path))  # a restart: the chain is read back (and verified)
    assert again.head == M1 and again.links == k.links
    assert again.on_frame(frame_of(vote(0))) == "chain-link-stale"


def test_votes_that_must_not_count_are_dropped_and_named(tmp_path):
    k = ChainKeeper(node(tmp_path, memory=True))
    assert k.on_frame(b"\x95\x14\x01") == "chain-link-malformed"
    assert k.on_frame(msgpack.packb([20, 1, b"\x00" * 40, b"", b""])) == "chain-link-malformed"
    impostor = Identity.from_seed(1, b"\x55" * 32)
    assert k.on_frame(frame_of(vote(1, ident=impostor))) == "chain-signature-bad"
    assert k.on_frame(frame_of(vote(5))) == "chain-signer-not-a-member"  # (a member of M1, not of G)
    lk1 = vote(0)
    h1 = verify_link(CFG, GH, Link(lk1.prev, lk1.members, tuple(vote(i).signatures[0] for i in range(3)), lk1.config))
    shrunk = Configuration(2, 24, tuple(KEYS), {}, (), M1, Membership(4, 1, (1,) * 4, tuple(KEYS[:4]), 32, 2))
    assert k.on_frame(frame_of(vote(2, cs=shrunk, prev=h1))) == "chain-link-unknown-prev"
    # a format 1 link (a membership only) is read from old files, never taken as a vote
    assert k.on_frame(frame_of(Link(GH.digest, M1, vote(1).signatures))) == "chain-link-old-format"
    assert k.on_frame(frame_of(vote(1))) == ""
    other = Configuration(1, 8, tuple(KEYS[:4]), {}, (), None, Membership(7, 1, (1,) * 7, tuple(KEYS), 16, 1))
    assert k.on_frame(frame_of(vote(1, cs=other))) == "chain-signer-equivocates"  # (epoch 1 twice)
    assert k.on_frame(frame_of(vote(2, cs=other))) == ""  # (another signer's first vote is kept)
    assert len(k.votes) == 2 and k.links == []  # (at most one pending vote per signer)
    assert k.path is None


def test_a_damaged_chain_file_is_ignored_and_named(tmp_path):
    n = node(tmp_path)
    ChainKeeper(n)
    path = tmp_path / "data" / "replica-0" / CHAIN_FILE
    k = ChainKeeper(n)
    for v in (1, 2, 3):
        k.on_frame(frame_of(vote(v)))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    n2 = node(tmp_path)
    k2 = ChainKeeper(n2)
    assert k2.head == G and k2.links == []
    assert n2.logs and n2.logs[0][0] == "chain-unreadable"


def test_our_own_vote_is_signed_against_the_last_link_and_resent(tmp_path):
    n = node(tmp_path, me=2)
    k = ChainKeeper(n)
    k.sign(CS1)
    assert k.own is not None and k.own.signatures[0][0] == 2 and k.links == []
    assert n.loop.later and n.loop.later[0][1] == k._resend
    n5 = node(tmp_path, me=5)  # not a member of the genesis membership: it does not sign its link
    k5 = ChainKeeper(n5)
    k5.sign(CS1)
    assert k5.own is None


def test_a_vote_with_more_signatures_than_signers_is_not_checked(tmp_path):
    k = ChainKeeper(node(tmp_path, memory=True))
    v = vote(1)
    many = Link(v.prev, v.members, tuple((i, v.signatures[0][1]) for i in range(5)), v.config)
    assert k.on_frame(frame_of(many)) == "chain-link-malformed" and not k.votes
    # a bad signature stops the checks of the frame: the good one after it is not taken either
    bad = Link(v.prev, v.members, ((0, b"\x00" * 64), v.signatures[0]), v.config)
    assert k.on_frame(frame_of(bad)) == "chain-signature-bad" and not k.votes


class FakeSigner:
    """A signer process's identity (``runtime.signer.SignerIdentity``): ``sign_link`` only, a
    coroutine that fails while ``down``."""

    def __init__(self, ident: Identity):
        self.ident, self.principal, self.public = ident, ident.principal, ident.public
        self.down = True
        self.calls = 0

    async def sign_link(self, stmt: bytes) -> bytes:
        from pbft.runtime.signer import SignerError
        self.calls += 1
        if self.down:
            raise SignerError("signer-unavailable")
        return self.ident.signing_key.sign(stmt).signature


def test_a_vote_signed_by_a_signer_process_without_blocking_and_asked_again_after_a_failure(tmp_path):
    import asyncio
    from pbft.runtime.chain import check_signature

    loop = asyncio.new_event_loop()
    try:
        n = node(tmp_path, me=1, memory=True)
        n.loop = loop
        n.identity = SimpleNamespace(current=FakeSigner(IDS[1]))  # (as runtime.epochs wraps it)
        k = ChainKeeper(n)
        k.sign(CS1)
        k.sign(CS1)  # (a request under way: not asked twice)
        assert k.own is None and k.asking is not None
        loop.run_until_complete(k.asking)
        fake = n.identity.current
        assert fake.calls == 1 and k.own is None and k.asking is None
        assert ("chain-sign-unavailable", {"epoch": 1, "reason": "signer-unavailable"}) in n.logs
        fake.down = False
        k.sign(CS1)  # (the next stable checkpoint)
        loop.run_until_complete(k.asking)
        assert k.own is not None and k.own.signatures[0][0] == 1 and k.own.config is not None
        assert check_signature(G, 1, k.own.signatures[0][1], config_link(GH.digest, CS1, CFG).statement()) == ""
        assert len(k.votes) == 1 and k.voted == {1: (1, next(iter(k.votes)))}
        assert [e for e, _ in n.logs].count("chain-sign-unavailable") == 1
        # the chain moved on while the signer was asked: that signature is not used
        k2 = ChainKeeper(node(tmp_path, me=1, memory=True))
        k2.node.loop, k2.node.identity = loop, n.identity
        k2.sign(CS1)
        for v in (0, 2, 3):
            k2.on_frame(frame_of(vote(v)))
        assert k2.head == M1
        loop.run_until_complete(k2.asking)
        assert k2.own is None and k2.votes == {}  # (no vote for a link after M1 made of it)
        assert [s for s, _ in k2.links[0].signatures] == [0, 2, 3]
        # an identity with neither a private key nor a signer: named, once, and not tried again
        n3 = node(tmp_path, me=2, memory=True)
        n3.identity = SimpleNamespace(principal=2)
        k3 = ChainKeeper(n3)
        k3.sign(CS1)
        k3.sign(CS1)
        assert ("chain-sign-unavailable", {"epoch": 1, "reason": "no-private-key"}) in n3.logs
        assert [e for e, _ in n3.logs].count("chain-sign-unavailable") == 1 and k3.asking is None
    finally:
        loop.close()


def test_a_rotation_of_a_signer_held_key_is_signed_by_the_signer_while_it_holds_the_old_key(tmp_path):
    """The rotation's link is signed with the key the link before has: the signer's (the retired
    identity of ``RotatingIdentity``), not the new key file's; a signer restarted with the new
    key only answers with a signature that is not of the link before's key: not voted, named."""
    import asyncio
    from pbft.runtime.chain import check_signature
    from pbft.runtime.epochs import RotatingIdentity

    new1 = Identity.from_seed(1, b"\x66" * 32)
    rotated = Configuration(1, 8, (KEYS[0], new1.public, KEYS[2], KEYS[3]), {}, (), None, None)
    loop = asyncio.new_event_loop()
    try:
        n = node(tmp_path, me=1, memory=True)
        n.loop = loop
        old = FakeSigner(IDS[1])
        old.down = False
        n.identity = RotatingIdentity(new1, [old], retired=[old])  # (the new key read from the .next file)
        k = ChainKeeper(n)
        assert k.sign_statement(b"x") is None  # (the new key is not the one the link before has)
        k.sign(rotated)
        loop.run_until_complete(k.asking)
        assert old.calls == 1 and k.own is not None
        stmt = config_link(GH.digest, rotated, CFG).statement()
        assert check_signature(G, 1, k.own.signatures[0][1], stmt) == ""
        assert k.own.members.keys[1] == new1.public  # (the link records the new key)
        # the signer restarted with the new key: its signature does not verify with the old key
        n2 = node(tmp_path, me=1, memory=True)
        n2.loop = loop
        wrong = FakeSigner(new1)
        wrong.down, wrong.public = False, KEYS[1]  # (the public key it announced when the replica started)
        n2.identity = wrong
        k2 = ChainKeeper(n2)
        k2.sign(rotated)
        loop.run_until_complete(k2.asking)
        assert k2.own is None and k2.votes == {}
        assert ("chain-sign-unavailable", {"epoch": 1, "reason": "signer-wrong-key"}) in n2.logs
        k2.sign(rotated)  # (not asked again for that epoch)
        assert wrong.calls == 1 and k2.asking is None
        # a signer that holds another key than the link before's is not asked at all
        n3 = node(tmp_path, me=1, memory=True)
        n3.identity = FakeSigner(new1)
        ChainKeeper(n3).sign(rotated)
        assert ("chain-sign-unavailable", {"epoch": 1, "reason": "no-private-key"}) in n3.logs
        assert n3.identity.calls == 0
    finally:
        loop.close()
