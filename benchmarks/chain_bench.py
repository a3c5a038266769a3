#!/usr/bin/env python3
"""Size and verification time of a configuration certificate chain (``pbft.runtime.chain``).

Builds, for a cluster of 4 replicas, the links of ``--epochs`` configuration epochs: every
``--rotate-every``-th one rotates replica 3's key (a membership link), the others rotate a
client's key (configuration-only links, which a newer one replaces), and keeps them as a replica
does (``chain.compact`` after every link). Prints the links kept, the encoded bytes, the time to
verify the chain from the genesis membership (the minimum of ``--repeat`` runs), and the time a
follower takes (``runtime.follow.newest``) for ``--replicas`` replicas serving that same chain
(verified once) and serving it with another quorum of signatures each (verified per replica).

Usage (from the repository root)::

    python benchmarks/chain_bench.py                          # 2000 epochs, a rotation every 100
    python benchmarks/chain_bench.py --epochs 1024 --rotate-every 1   # 1024 membership links
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from types import SimpleNamespace

from pbft.config import ClusterConfig
from pbft.runtime.chain import Link, compact, config_link, encode_chain, genesis_head, verify_head, verify_link
from pbft.runtime.follow import newest
from pbft.runtime.keys import Identity
from pbft.state.configuration import Configuration


def build(epochs: int, rotate_every: int, signers=(0, 1, 2)) -> tuple[list[Link], list[list[Link]]]:
    """The chain kept, and the same chain with each other quorum of signers (for ``newest``)."""
    cfg = ClusterConfig.create(4, 1, replica_slots=10)
    ids = [Identity.from_seed(i, bytes([i + 1]) * 32) for i in range(4)]
    client = Identity.from_seed(10, b"\x33" * 32)
    cs = Configuration.genesis([i.public for i in ids], {10: client.public}, [10])
    head = genesis_head(cfg, [i.public for i in ids])
    quorums = list(itertools.combinations(range(4), 3))
    links: list[Link] = []
    variants: list[list[Link]] = [[] for _ in quorums]
    for e in range(1, epochs + 1):
        new = list(ids)
        if e % rotate_every == 0:
            new[3] = Identity.from_seed(3, e.to_bytes(4, "big") * 8)
        client_key = Identity.from_seed(11, e.to_bytes(4, "big") * 8).public
        cs = dataclasses.replace(cs, epoch=e, opens_at=8 * e, replica_keys=tuple(i.public for i in new),
                                 clients={10: client.public, 11: client_key})
        lk = config_link(head.digest, cs, cfg)
        stmt = lk.statement()
        sigs = {i: ids[i].signing_key.sign(stmt).signature for i in range(4)}
        for q, out in zip(quorums, variants):
            out[:] = compact([*out, Link(lk.prev, lk.members, tuple((i, sigs[i]) for i in q), lk.config)])
        signed = Link(lk.prev, lk.members, tuple((i, sigs[i]) for i in signers), lk.config)
        head = verify_link(cfg, head, signed)
        links = compact([*links, signed])
        ids = new
    return links, variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--rotate-every", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    links, variants = build(a.epochs, a.rotate_every)
    cfg = ClusterConfig.create(4, 1, replica_slots=10)
    gkeys = [Identity.from_seed(i, bytes([i + 1]) * 32).public for i in range(4)]
    raw = encode_chain(links)

    def best(fn) -> float:
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    cluster = SimpleNamespace(genesis_cfg=cfg, cfg=cfg, slots=[SimpleNamespace(public_key=k) for k in gkeys],
                              replicas=[], chain=())
    same = {j: raw for j in range(a.replicas)}
    other = {j: encode_chain(variants[j % len(variants)]) for j in range(a.replicas)}
    t_verify = best(lambda: verify_head(cfg, gkeys, links))
    t_same = best(lambda: newest(cluster, same))
    t_other = best(lambda: newest(cluster, other))
    print(f"epochs {a.epochs}, a key rotation every {a.rotate_every}: {len(links)} links kept, {len(raw)} bytes")
    print(f"verify the chain: {t_verify * 1e3:.1f} ms")
    print(f"follower, {a.replicas} replicas serving the same chain: {t_same * 1e3:.1f} ms; "
          f"each with other signatures: {t_other * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
