"""The membership certificate chain: the memberships a cluster went through, each certified by
the one before it, so that anyone holding the genesis configuration (cluster.toml) can learn the
membership in force from whoever hands the chain over.

A **link** says "after sequence number ``opens_at``, membership ``m`` (ids ``0..n-1``, their
public keys, weights, ``f``, the configuration epoch that opened it) is in force, and it follows
the membership whose digest is ``prev``". Replicas of the *previous* membership sign it with
their long-term Ed25519 keys when they switch (``MembershipSwitched``: checkpoint ``opens_at`` is
stable, certified by that membership's quorum); a link holds signatures of quorum weight of the
previous membership (the 2f+1 rule with its weights). So a link with quorum weight contains a
signature of a correct replica of that membership, which signs only the membership its stable
checkpoint's state records. A Byzantine holder can only withhold links: a forged, truncated or
reordered link, a chain signed by ``f+1`` only, or a replayed older chain (it ends at an older
membership: callers take the newest valid chain they are given) does not verify.

``verify_chain(genesis_cfg, genesis_keys, links)`` checks a chain link by link and returns the
membership it ends at (``ChainError``: which link, and why). Chains travel as bytes
(``encode_chain`` / ``decode_chain``, bounded: at most ``CHAIN_LINKS_MAX`` links of at most
``LINK_SIGNATURES_MAX`` signatures, ``CHAIN_BYTES_MAX`` bytes); every input is untrusted.

What the signatures cover is a context string and msgpack ``[prev, membership fields]``, so a
signature of a link is never the signature of a NewKey (``runtime.keys``: its own context).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import msgpack
import nacl.exceptions
import nacl.signing

from ..config import ClusterConfig, ConfigError
from ..core.membership import cluster_config
from ..state.configuration import Membership

LINK_CONTEXT = b"pbft.membership-link.v1"
DIGEST_CONTEXT = b"pbft.membership.v1"
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
CHAIN_LINKS_MAX = 1024
LINK_SIGNATURES_MAX = 1024
CHAIN_BYTES_MAX = 4 << 20
LINK_BYTES_MAX = 256 << 10


class ChainError(ValueError):
    """A chain (or a link) that does not verify, or bytes that are not one."""


@dataclass(frozen=True)
class Link:
    prev: bytes  # membership_digest of the membership before
    members: Membership
    signatures: tuple[tuple[int, bytes], ...]  # (signer id in the membership before, signature), ids ascending

    def statement(self) -> bytes:
        return statement(self.prev, self.members)

    def encode_fields(self) -> list:
        return [self.prev, self.members.encode_fields(), [list(s) for s in self.signatures]]


def membership_digest(m: Membership) -> bytes:
    return hashlib.blake2b(msgpack.packb([DIGEST_CONTEXT, m.encode_fields()], use_bin_type=True),
                           digest_size=DIGEST_BYTES).digest()


def statement(prev: bytes, m: Membership) -> bytes:
    """What a link's signatures sign."""
    return LINK_CONTEXT + msgpack.packb([prev, m.encode_fields()], use_bin_type=True)


def genesis_membership(cfg: ClusterConfig, keys: Sequence[bytes]) -> Membership:
    """The genesis membership of cluster.toml (``cfg`` its configuration, ``keys`` its members')."""
    if len(keys) != cfg.n:
        raise ChainError(f"genesis: {len(keys)} keys for {cfg.n} replicas")
    return Membership(cfg.n, cfg.f, tuple(cfg.weights) or (1,) * cfg.n, tuple(bytes(k) for k in keys), 0, 0)


def sign_link(signing_key: nacl.signing.SigningKey, prev: bytes, m: Membership) -> bytes:
    return signing_key.sign(statement(prev, m)).signature


def check_signature(prev_m: Membership, signer: int, sig: bytes, stmt: bytes) -> str:
    """Why ``sig`` is not ``signer``'s signature of ``stmt`` as a member of ``prev_m`` ("" if it is)."""
    if type(signer) is not int or not 0 <= signer < prev_m.n:
        return f"wrong signer: {signer!r} is no member of the membership before ({prev_m.n} replicas)"
    if type(sig) is not bytes or len(sig) != SIGNATURE_BYTES:
        return f"bad signature: of replica {signer}, not {SIGNATURE_BYTES} bytes"
    try:
        nacl.signing.VerifyKey(prev_m.keys[signer]).verify(stmt, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return f"bad signature: of replica {signer}"
    return ""


def quorum_of(genesis_cfg: ClusterConfig, m: Membership) -> ClusterConfig:
    return cluster_config(genesis_cfg, m)


def verify_link(genesis_cfg: ClusterConfig, prev_m: Membership, link: Link) -> Membership:
    """``link``'s membership if it follows ``prev_m`` and carries signatures of quorum weight of
    ``prev_m``'s members, all valid (raises ``ChainError``)."""
    m = link.members
    if link.prev != membership_digest(prev_m):
        raise ChainError("broken link: it does not follow the membership before")
    if m.epoch <= prev_m.epoch or m.opens_at <= prev_m.opens_at:
        raise ChainError(f"broken link: epoch {m.epoch} after {m.opens_at} does not come after epoch "
                         f"{prev_m.epoch} after {prev_m.opens_at}")
    if m.n > genesis_cfg.client_base:
        raise ChainError(f"bad membership: {m.n} replicas, beyond the {genesis_cfg.client_base} replica slots")
    try:
        quorum_of(genesis_cfg, m).validate()
        for k in m.keys:
            nacl.signing.VerifyKey(k).to_curve25519_public_key()
    except (ConfigError, ValueError, nacl.exceptions.CryptoError) as e:
        raise ChainError(f"bad membership: {e}") from None
    stmt = link.statement()
    seen: set[int] = set()
    for signer, sig in link.signatures:
        if signer in seen:
            raise ChainError(f"wrong signer: replica {signer} signs twice")
        seen.add(signer)
        if why := check_signature(prev_m, signer, sig, stmt):
            raise ChainError(why)
    q = quorum_of(genesis_cfg, prev_m)
    if q.weight_of(seen) < q.quorum_weight:
        raise ChainError(f"below quorum: signatures of weight {q.weight_of(seen)}, the membership before needs "
                         f"{q.quorum_weight}")
    return m


def verify_chain(genesis_cfg: ClusterConfig, genesis_keys: Sequence[bytes], links: Sequence[Link]) -> Membership:
    """The membership a chain ends at, checked link by link from the genesis membership
    (``genesis_cfg``: cluster.toml's configuration, ``genesis_keys``: its members' public keys);
    raises ``ChainError`` naming the first link that does not verify."""
    return verify_from(genesis_cfg, genesis_membership(genesis_cfg, genesis_keys), links)


def verify_from(genesis_cfg: ClusterConfig, start: Membership, links: Sequence[Link]) -> Membership:
    """``verify_chain`` from a membership already verified (``start``: the end of a chain held),
    for the links after it (what a replica's ``/chain?from=E`` serves)."""
    m = start
    if len(links) > CHAIN_LINKS_MAX:
        raise ChainError(f"chain of {len(links)} links (at most {CHAIN_LINKS_MAX})")
    for i, link in enumerate(links):
        try:
            m = verify_link(genesis_cfg, m, link)
        except ChainError as e:
            raise ChainError(f"link {i + 1} (epoch {link.members.epoch}): {e}") from None
    return m


def links_after(links: Sequence[Link], epoch: int) -> list[Link]:
    """The links of a chain that open memberships of epochs after ``epoch``."""
    return [lk for lk in links if lk.members.epoch > epoch]


# ---- bytes ----------------------------------------------------------------------------------
def encode_chain(links: Sequence[Link]) -> bytes:
    return msgpack.packb([lk.encode_fields() for lk in links], use_bin_type=True)


def encode_link(link: Link) -> bytes:
    return msgpack.packb(link.encode_fields(), use_bin_type=True)


def _unpack(data: bytes, limit: int):
    if type(data) is not bytes or len(data) > limit:
        raise ChainError(f"more than {limit} bytes")
    try:
        return msgpack.unpackb(data, raw=False, use_list=False, max_map_len=0, max_ext_len=0,
                               max_array_len=max(CHAIN_LINKS_MAX, LINK_SIGNATURES_MAX))
    except Exception as e:  # msgpack raises several types
        raise ChainError("not msgpack") from e


def link_from_fields(t) -> Link:
    if type(t) is not tuple or len(t) != 3:
        raise ChainError("link: bad shape")
    prev, fields, sigs = t
    if type(prev) is not bytes or len(prev) != DIGEST_BYTES:
        raise ChainError("link: bad digest")
    try:
        m = Membership.decode_fields(fields)
    except ValueError as e:
        raise ChainError(f"link: {e}") from None
    if type(sigs) is not tuple or len(sigs) > LINK_SIGNATURES_MAX or not all(
            type(s) is tuple and len(s) == 2 and type(s[0]) is int and type(s[1]) is bytes for s in sigs):
        raise ChainError("link: bad signatures")
    return Link(prev, m, tuple(sorted(sigs)))


def decode_link(data: bytes) -> Link:
    return link_from_fields(_unpack(data, LINK_BYTES_MAX))


def decode_chain(data: bytes) -> list[Link]:
    """Raises ``ChainError`` on bytes ``encode_chain`` could not have produced (shape only: the
    signatures are ``verify_chain``'s)."""
    t = _unpack(data, CHAIN_BYTES_MAX)
    if type(t) is not tuple or len(t) > CHAIN_LINKS_MAX:
        raise ChainError("chain: bad shape")
    return [link_from_fields(x) for x in t]


def same_membership(a: Optional[Membership], b: Optional[Membership]) -> bool:
    """Whether two memberships agree on what a client needs: ids, f, weights, the switch point
    and the epoch that opened it (replica keys rotated since are not chained)."""
    if a is None or b is None:
        return a is b
    return (a.n, a.f, tuple(a.weights), a.opens_at, a.epoch) == (b.n, b.f, tuple(b.weights), b.opens_at, b.epoch)
