"""Learning the configuration in force from the cluster itself: the configuration certificate
chains the replicas serve (``/status``: ``membership_chain``, and the configuration its last link
certifies: ``chain.configuration``), each checked against the genesis configuration of
cluster.toml (``runtime.chain.verify_head``), whoever served it.

``learn(cluster)`` asks every replica slot with an address and returns the newest chain a
replica serves that verifies (a Byzantine replica can serve an older chain or none: the newest
valid one wins; an invalid one is ignored and reported; replicas serving the same bytes cost one
verification), with the full configuration of its last link if a replica serves one whose digest
is the link's (``chain.check_configuration``).
``follow(cluster)`` returns the cluster with that configuration when it is newer than the one it
has (``with_chain``: the membership, the replicas' current keys, and, with the full
configuration, the clients' keys and the administrators), else None: what a client with only
cluster.toml, or an old epoch.json, needs after a change (``ClientPool`` does it when it starts
and when its requests go unanswered).
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Optional

from ..config import ConfigError
from ..state.configuration import Configuration
from .chain import ChainError, Head, Link, check_configuration, compact, decode_chain, genesis_head, verify_head
from .cluster import Cluster, registry, with_membership
from .keys import PublicKeys

STATUS_BYTES_MAX = 8 << 20
FETCH_TIMEOUT_S = 1.0


@dataclass
class Learnt:
    links: tuple[Link, ...] = ()
    served_by: list[int] = field(default_factory=list)  # the replicas that served this chain
    refused: dict[int, str] = field(default_factory=dict)  # replica -> why its chain (or configuration) was refused
    unreachable: list[int] = field(default_factory=list)
    head: Optional[Head] = None  # where ``links`` end
    config: Optional[Configuration] = None  # the configuration the last link certifies, if served


def genesis_keys(cluster: Cluster) -> list[bytes]:
    g = cluster.genesis_cfg or cluster.cfg
    return [e.public_key for e in (cluster.slots or cluster.replicas)[:g.n]]


def chain_head(cluster: Cluster, links=None) -> Head:
    """Where ``links`` (default: the cluster's own chain, epoch.json's) end (raises ChainError)."""
    g = cluster.genesis_cfg or cluster.cfg
    links = cluster.chain if links is None else links
    return verify_head(g, genesis_keys(cluster), links) if links else genesis_head(g, genesis_keys(cluster))


def chain_of_status(doc) -> bytes:
    """The encoded chain a replica's ``/status`` document serves (raises ValueError)."""
    raw = doc.get("membership_chain") if isinstance(doc, dict) else None
    if not isinstance(raw, str):
        raise ValueError("no membership_chain")
    return bytes.fromhex(raw)


def config_of_status(doc) -> bytes:
    """The encoded configuration a replica's ``/status`` serves beside its chain (b"": none)."""
    ch = doc.get("chain") if isinstance(doc, dict) else None
    raw = ch.get("configuration", "") if isinstance(ch, dict) else ""
    try:
        return bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        return b""


def _fetch(host: str, port: int, timeout: float) -> tuple[bytes, bytes]:
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as r:
        body = r.read(STATUS_BYTES_MAX + 1)
    if len(body) > STATUS_BYTES_MAX:
        raise ValueError("status too large")
    doc = json.loads(body)
    return chain_of_status(doc), config_of_status(doc)


def newest(cluster: Cluster, served: dict[int, bytes], configs: Optional[dict[int, bytes]] = None) -> Learnt:
    """The newest valid chain among those replicas served (replica -> encoded chain), starting
    from the cluster's own (epoch.json's), and the configuration of its last link among those
    they served beside it (replica -> encoded configuration)."""
    g = cluster.genesis_cfg or cluster.cfg
    out = Learnt(links=tuple(cluster.chain))
    best = out.head = chain_head(cluster)
    checked: dict[bytes, tuple[list[Link], Head] | str] = {}  # (identical chains are verified once)
    for j, raw in sorted(served.items()):
        got = checked.get(raw)
        if got is None:
            try:
                links = decode_chain(raw)
                got = checked[raw] = (compact(links), verify_head(g, genesis_keys(cluster), links))
            except ChainError as e:
                got = checked[raw] = str(e)
        if isinstance(got, str):
            out.refused[j] = got
            continue
        links, head = got
        if head.order() > best.order():
            best, out.links, out.served_by, out.head = head, tuple(links), [j], head
        elif [lk.unsigned() for lk in links] == [lk.unsigned() for lk in out.links]:
            out.served_by.append(j)  # (the same links: each replica may hold another quorum of signatures)
    for j, data in sorted((configs or {}).items()):
        if out.config is not None or not best.config:
            break
        if not data:
            continue
        try:
            out.config = check_configuration(g, best, data)
        except ChainError as e:
            if j in out.served_by:  # (beside an older chain, another epoch's configuration is no fault)
                out.refused[j] = str(e)
    return out


def learn(cluster: Cluster, timeout: float = FETCH_TIMEOUT_S) -> Learnt:
    """The newest valid chain the replica slots serve (see the module docstring)."""
    slots = list(cluster.slots or cluster.replicas)
    served: dict[int, bytes] = {}
    configs: dict[int, bytes] = {}
    unreachable = []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(slots)))) as ex:
        futs = {ex.submit(_fetch, e.metrics_addr, e.metrics_port, timeout): e.id for e in slots}
        for fut in concurrent.futures.as_completed(futs):
            try:
                served[futs[fut]], configs[futs[fut]] = fut.result()
            except (OSError, urllib.error.URLError, ValueError, TypeError, AttributeError):
                unreachable.append(futs[fut])
    out = newest(cluster, served, configs)
    out.unreachable = sorted(unreachable)
    return out


def with_chain(cluster: Cluster, links: tuple[Link, ...], config: Optional[Configuration] = None) -> Cluster:
    """``cluster`` with the configuration a verified chain ends at: its members, f, weights, switch
    point and their current public keys; with ``config`` (checked against the chain's last link),
    its clients' keys, administrators and epoch too (else the other principals' keys stay)."""
    g = cluster.genesis_cfg or cluster.cfg
    head = verify_head(g, genesis_keys(cluster), links)
    m = head.members
    out = with_membership(cluster, m.n, m.f, m.weights, m.opens_at, m.epoch)
    keys = {p: bytes(vk) for p, vk in cluster.public.verify.items()}
    if config is not None:
        try:
            check_configuration(g, head, config.encode())
        except ChainError as e:
            raise ConfigError(f"configuration chain: {e}") from None
        keys = registry(config, cluster.slots or cluster.replicas)
        out = replace(out, client_keys={c: k for c, k in config.clients.items() if k},
                      admins=tuple(config.admins), epoch=config.epoch)
    keys.update(enumerate(m.keys))
    try:
        public = PublicKeys(keys)
    except ValueError as e:  # (verify_head checked the keys)
        raise ConfigError(f"membership chain: {e}") from None
    return replace(out, public=public, chain=tuple(links))


def follow(cluster: Cluster, timeout: float = FETCH_TIMEOUT_S) -> Optional[Cluster]:
    """The cluster with the newest configuration the replicas certify, if it is newer than
    ``cluster``'s; else None."""
    got = learn(cluster, timeout)
    if not got.links or got.head is None or got.head.order() <= chain_head(cluster).order():
        return None
    return with_chain(cluster, got.links, got.config)
