"""The membership certificate chain (runtime.chain) in its first format (links of memberships
only, what chain files and epoch.json written by the previous version hold, still verified): a
chain verifies only link by link from the genesis membership, each link signed by quorum weight
of the membership before it. The configuration links are test_chain_config.py's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbft.config import ClusterConfig
from pbft.runtime.chain import (
    ChainError, Head, Link, decode_chain, encode_chain, genesis_head, genesis_membership, links_after,
    membership_digest, sign_link, verify_chain, verify_from,
)
from pbft.runtime.keys import Identity
from pbft.state.configuration import Membership

CFG = ClusterConfig.create(4, 1, replica_slots=10)
IDS = [Identity.from_seed(i, bytes([i + 1]) * 32) for i in range(10)]
KEYS = [i.public for i in IDS]
G = genesis_membership(CFG, KEYS[:4])


def members(n: int, f: int, opens_at: int, epoch: int) -> Membership:
    return Membership(n, f, (1,) * n, tuple(KEYS[:n]), opens_at, epoch)


def link(prev: Membership, m: Membership, signers) -> Link:
    d = membership_digest(prev)
    return Link(d, m, tuple((i, sign_link(IDS[i].signing_key, d, m)) for i in sorted(signers)))


M1 = members(7, 2, 256, 1)  # grow 4 -> 7
M2 = members(4, 1, 512, 2)  # shrink 7 -> 4
CHAIN = [link(G, M1, [0, 1, 2]), link(M1, M2, [0, 2, 3, 5, 6])]


def test_a_chain_signed_by_quorums_verifies_to_its_last_membership():
    assert verify_chain(CFG, KEYS[:4], []) == G
    assert verify_chain(CFG, KEYS[:4], CHAIN[:1]) == M1
    assert verify_chain(CFG, KEYS[:4], CHAIN) == M2
    assert decode_chain(encode_chain(CHAIN)) == CHAIN


def test_a_link_signed_by_f_plus_1_only_is_below_quorum():
    # after the growth, f=2: three old members make a quorum of 4, but 3 of 7 are only f+1
    bad = [CHAIN[0], link(M1, M2, [0, 1, 2])]
    with pytest.raises(ChainError, match="link 2 .*below quorum"):
        verify_chain(CFG, KEYS[:4], bad)
    with pytest.raises(ChainError, match="link 1 .*below quorum"):
        verify_chain(CFG, KEYS[:4], [link(G, M1, [0, 1])])


def test_a_signer_outside_the_membership_before_is_refused():
    # ids 4..6 are members of M1, not of the genesis membership that must certify M1
    with pytest.raises(ChainError, match="wrong signer"):
        verify_chain(CFG, KEYS[:4], [link(G, M1, [0, 1, 4])])
    lk = CHAIN[0]
    dup = Link(lk.prev, lk.members, lk.signatures + (lk.signatures[0],))
    with pytest.raises(ChainError, match="signs twice"):
        verify_chain(CFG, KEYS[:4], [dup])


def test_a_forged_link_does_not_verify():
    # another membership under the signatures of the true one
    lk = CHAIN[0]
    forged = Link(lk.prev, members(7, 1, 256, 1), lk.signatures)
    with pytest.raises(ChainError, match="bad signature"):
        verify_chain(CFG, KEYS[:4], [forged])
    # signed with keys that are not the members': an impostor's membership
    d = membership_digest(G)
    impostors = [Identity.from_seed(i, bytes([99 - i]) * 32) for i in range(4)]
    fake = Link(d, M1, tuple((i, sign_link(impostors[i].signing_key, d, M1)) for i in range(3)))
    with pytest.raises(ChainError, match="bad signature"):
        verify_chain(CFG, KEYS[:4], [fake])


def test_links_out_of_order_or_skipped_are_broken():
    with pytest.raises(ChainError, match="link 1 .*broken link"):
        verify_chain(CFG, KEYS[:4], CHAIN[1:])
    with pytest.raises(ChainError, match="broken link"):
        verify_chain(CFG, KEYS[:4], [CHAIN[1], CHAIN[0]])
    # a replay: a later link that re-opens an older membership (epoch not after the one before)
    back = link(M2, members(7, 2, 256, 1), [0, 1, 2])
    with pytest.raises(ChainError, match="link 3 .*broken link"):
        verify_chain(CFG, KEYS[:4], [*CHAIN, back])


def test_a_chain_against_another_genesis_does_not_verify():
    with pytest.raises(ChainError, match="broken link"):
        verify_chain(CFG, KEYS[1:5], CHAIN)


def test_an_unsafe_membership_is_refused_even_when_signed():
    bad = Membership(4, 2, (1,) * 4, tuple(KEYS[:4]), 256, 1)
    with pytest.raises(ChainError, match="bad membership"):
        verify_chain(CFG, KEYS[:4], [link(G, bad, [0, 1, 2])])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_a_chain_error_or_a_chain(data):
    try:
        links = decode_chain(data)
    except ChainError:
        return
    try:
        verify_chain(CFG, KEYS[:4], links)
    except ChainError:
        pass


@settings(max_examples=80, deadline=None)
@given(st.integers(0, len(encode_chain(CHAIN)) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(pos, x):
    raw = bytearray(encode_chain(CHAIN))
    raw[pos] ^= x
    try:
        links = decode_chain(bytes(raw))
        got = verify_chain(CFG, KEYS[:4], links)
    except ChainError:
        return
    # a flip that still verifies can only be one msgpack re-encodes the same (e.g. an id's width)
    assert got == M2


def test_the_links_after_an_epoch_verify_from_the_membership_held():
    assert links_after(CHAIN, 0) == CHAIN and links_after(CHAIN, 1) == CHAIN[1:] and links_after(CHAIN, 2) == []
    assert verify_from(CFG, Head(M1, membership_digest(M1), 1), links_after(CHAIN, 1)).members == M2
    with pytest.raises(ChainError, match="broken link"):
        verify_from(CFG, genesis_head(CFG, KEYS[:4]), links_after(CHAIN, 1))  # (not from the membership before)
