"""Membership certificate chains for tests that write epoch.json by hand: each link signed by every
member of the membership before it, with the key files of the cluster directory."""

from __future__ import annotations

from pbft.runtime.chain import Link, encode_chain, genesis_membership, membership_digest, sign_link
from pbft.runtime.cluster import load_cluster, read_key_file


def chain_hex(directory, *memberships) -> str:
    """The chain genesis -> memberships[0] -> ... of the cluster in ``directory`` (hex, as in epoch.json)."""
    c = load_cluster(directory)
    g = c.genesis_cfg or c.cfg
    prev = genesis_membership(g, [e.public_key for e in c.slots[:g.n]])
    links = []
    for m in memberships:
        d = membership_digest(prev)
        sigs = tuple((i, sign_link(read_key_file(c.key_path(i), i).signing_key, d, m)) for i in range(prev.n))
        links.append(Link(d, m, sigs))
        prev = m
    return encode_chain(links).hex()
