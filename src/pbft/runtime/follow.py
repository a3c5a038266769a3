"""Learning the membership in force from the cluster itself: the membership certificate chains
the replicas serve (``/status``: ``membership_chain``), each checked against the genesis
configuration of cluster.toml (``runtime.chain.verify_chain``), whoever served it.

``learn(cluster)`` asks every replica slot with an address and returns the newest membership a
valid chain certifies (a Byzantine replica can serve an older chain or none: the newest valid
one wins; an invalid one is ignored and reported). ``follow(cluster)`` returns the cluster with
that membership when it is newer than the one it has (``with_chain``), else None: what a client
with only cluster.toml, or an old epoch.json, needs after a change (``ClientPool`` does it when
it starts and when its requests go unanswered).
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Optional

from ..config import ConfigError
from .chain import ChainError, Link, decode_chain, genesis_membership, verify_chain
from .cluster import Cluster, with_membership
from .keys import PublicKeys

STATUS_BYTES_MAX = 8 << 20
FETCH_TIMEOUT_S = 1.0


@dataclass
class Learnt:
    links: tuple[Link, ...] = ()
    served_by: list[int] = field(default_factory=list)  # the replicas that served this chain
    refused: dict[int, str] = field(default_factory=dict)  # replica -> why its chain was refused
    unreachable: list[int] = field(default_factory=list)


def genesis_keys(cluster: Cluster) -> list[bytes]:
    g = cluster.genesis_cfg or cluster.cfg
    return [e.public_key for e in (cluster.slots or cluster.replicas)[:g.n]]


def chain_of_status(doc) -> bytes:
    """The encoded chain a replica's ``/status`` document serves (raises ValueError)."""
    raw = doc.get("membership_chain") if isinstance(doc, dict) else None
    if not isinstance(raw, str):
        raise ValueError("no membership_chain")
    return bytes.fromhex(raw)


def _fetch(host: str, port: int, timeout: float) -> bytes:
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as r:
        body = r.read(STATUS_BYTES_MAX + 1)
    if len(body) > STATUS_BYTES_MAX:
        raise ValueError("status too large")
    return chain_of_status(json.loads(body))


def newest(cluster: Cluster, served: dict[int, bytes]) -> Learnt:
    """The newest valid chain among those replicas served (replica -> encoded chain), starting
    from the cluster's own (epoch.json's)."""
    g = cluster.genesis_cfg or cluster.cfg
    keys = genesis_keys(cluster)
    out = Learnt(links=tuple(cluster.chain))
    best = verify_chain(g, keys, cluster.chain) if cluster.chain else genesis_membership(g, keys)
    for j, raw in sorted(served.items()):
        try:
            links = decode_chain(raw)
            head = verify_chain(g, keys, links)
        except ChainError as e:
            out.refused[j] = str(e)
            continue
        if (head.epoch, head.opens_at) > (best.epoch, best.opens_at):
            best, out.links, out.served_by = head, tuple(links), [j]
        elif tuple(links) == out.links:
            out.served_by.append(j)
    return out


def learn(cluster: Cluster, timeout: float = FETCH_TIMEOUT_S) -> Learnt:
    """The newest valid chain the replica slots serve (see the module docstring)."""
    slots = list(cluster.slots or cluster.replicas)
    served: dict[int, bytes] = {}
    unreachable = []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(slots)))) as ex:
        futs = {ex.submit(_fetch, e.metrics_addr, e.metrics_port, timeout): e.id for e in slots}
        for fut in concurrent.futures.as_completed(futs):
            try:
                served[futs[fut]] = fut.result()
            except (OSError, urllib.error.URLError, ValueError, TypeError):
                unreachable.append(futs[fut])
    out = newest(cluster, served)
    out.unreachable = sorted(unreachable)
    return out


def with_chain(cluster: Cluster, links: tuple[Link, ...]) -> Cluster:
    """``cluster`` with the membership a verified chain ends at: its members, f, weights, switch
    point and their public keys (the key registry of the other principals stays)."""
    g = cluster.genesis_cfg or cluster.cfg
    m = verify_chain(g, genesis_keys(cluster), links)
    out = with_membership(cluster, m.n, m.f, m.weights, m.opens_at, m.epoch)
    keys = {p: bytes(vk) for p, vk in cluster.public.verify.items()}
    keys.update(enumerate(m.keys))
    try:
        public = PublicKeys(keys)
    except ValueError as e:  # (verify_chain checked the keys)
        raise ConfigError(f"membership chain: {e}") from None
    return replace(out, public=public, chain=tuple(links))


def follow(cluster: Cluster, timeout: float = FETCH_TIMEOUT_S) -> Optional[Cluster]:
    """The cluster with the newest membership the replicas certify, if it is newer than
    ``cluster``'s; else None."""
    got = learn(cluster, timeout)
    if not got.links:
        return None
    m = got.links[-1].members
    if (m.epoch, m.opens_at) <= (cluster.members_epoch, cluster.members_from):
        return None
    return with_chain(cluster, got.links)
