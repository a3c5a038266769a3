"""A replica's keeper of the membership chain (runtime.chain_keeper): it gathers signed votes of
the last membership's members, appends a link at quorum weight, keeps the chain across restarts,
and drops (and names) every vote it must not count."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

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


class Loop:
    def __init__(self):
        self.later = []

    def call_later(self, delay, fn, *args):
        self.later.append((delay, fn, args))


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
