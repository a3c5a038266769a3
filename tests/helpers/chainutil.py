"""Configuration certificate chains for tests that write epoch.json by hand: a link per
configuration given, each signed by every member of the link before it that a key is held for
(the key files of the cluster directory, and ``extra`` identities: e.g. a rotated replica's new
key, which signs from the link after its rotation on)."""

from __future__ import annotations

from pbft.runtime.chain import Link, config_link, encode_chain, genesis_head, verify_link
from pbft.runtime.cluster import load_cluster, read_key_file


def chain_links(directory, *configs, extra=()) -> list[Link]:
    """The links genesis -> configs[0] -> ... of the cluster in ``directory``."""
    c = load_cluster(directory)
    g = c.genesis_cfg or c.cfg
    held = {}
    for e in c.slots:
        ident = read_key_file(c.key_path(e.id), e.id)
        held[ident.public] = ident.signing_key
    for ident in extra:
        held[ident.public] = ident.signing_key
    head = genesis_head(g, [e.public_key for e in c.slots[:g.n]])
    links = []
    for cs in configs:
        lk = config_link(head.digest, cs, g)
        stmt = lk.statement()
        sigs = tuple((i, held[k].sign(stmt).signature) for i, k in enumerate(head.members.keys) if k in held)
        lk = Link(lk.prev, lk.members, sigs, lk.config)
        head = verify_link(g, head, lk)
        links.append(lk)
    return links


def chain_hex(directory, *configs, extra=()) -> str:
    """``chain_links`` encoded (hex, as in epoch.json)."""
    return encode_chain(chain_links(directory, *configs, extra=extra)).hex()


class Loop:
    """A fake event loop for a chain keeper driven by hand: it keeps what is scheduled."""

    def __init__(self):
        self.later = []

    def call_later(self, delay, fn, *args):
        self.later.append((delay, fn, args))
