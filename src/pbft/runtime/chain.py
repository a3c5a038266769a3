"""The configuration certificate chain: the configurations a cluster went through, each certified
by the membership before it, so that anyone holding the genesis configuration (cluster.toml) can
learn the configuration in force (its membership, the replicas' current keys, and the digest of
the whole configuration) from whoever hands the chain over.

A **link** (``Link`` with ``config``: format 2) says "configuration epoch ``e``, in force from
checkpoint ``opens_at`` on, records membership ``m`` (ids ``0..n-1``, their *current* public keys,
weights, ``f``, its switch point and the epoch that opened it: a membership change recorded and
not yet in force is the one recorded) and its full canonical encoding
(``Configuration.encode()``) has digest ``d``; it follows the link whose digest is ``prev``".
There is a link per configuration epoch a replica signs (every change: a replica's or a client's
key rotated, a client admitted or revoked, the recovery period, the membership: see
*configuration-only links* below for the ones a newer link replaces); epochs whose
checkpoint no correct replica signed before the next one are skipped (a link certifies the
latest configuration: the one after it follows it). Replicas of the membership of the *previous*
link sign it with their long-term Ed25519 keys, checked against the keys the previous link has
for them (never the new link's own: a forged link cannot vouch for itself), when a checkpoint
whose state records it is stable; a link holds signatures of quorum weight of that membership
(the 2f+1 rule with its weights). So a link with quorum weight contains a signature of a correct
replica of that membership, which signs only a configuration its stable checkpoint's state
records. A Byzantine holder can only withhold links: a forged, truncated or reordered link, a
chain signed by ``f+1`` only, or a replayed older chain (it ends at an older configuration:
callers take the newest valid chain they are given) does not verify.

The full configuration (the clients' keys are not in the links, to keep them small) is served
by the replicas beside the chain; ``check_configuration`` accepts it only if its digest is the
one of the chain's last link.

**Configuration-only links.** A link whose membership is the one of the link before (the same
``n``, ``f``, weights, keys, switch point and opening epoch: a client admitted, revoked or its key
rotated, the recovery period) changes nothing of who signs the next link; it only certifies a
newer configuration digest. So it does not extend the chain: its ``prev`` is the digest of the
last *membership* link (a link that changes the membership or a replica's key; the genesis
membership's digest before the first one), it is signed by that membership (which it repeats),
and the next link, of either kind, follows that membership link too (``Head.digest`` stays the
membership link's), with a configuration epoch after it. A newer configuration-only link thus
replaces an older one: a chain as kept and served (``compact``) is the membership links, each
following the one before, and at most one trailing configuration-only link, so its length counts
membership changes and replica key rotations only, not configuration epochs. A membership link
certifies the digest of its own configuration, which holds every change before it, so nothing
is lost with the configuration-only links it replaces. Soundness is unchanged: each link, of
either kind, carries signatures of quorum weight of the membership that ``prev`` names, so a
correct replica of it signed it, which it does only for the configuration its stable checkpoint
records, with that membership; a Byzantine holder can serve an older trailing link (a chain that
ends at an older configuration epoch: the newest valid one wins) or none, never one of a
membership a later membership link replaced (``prev`` names the link, not only the membership:
a configuration-only link of the genesis membership does not follow a rotation's link), nor a
membership link of an epoch before the trailing link's (a broken link). Verification accepts a
chain that still holds replaced links (each follows the same membership link); keepers drop them.

Format 1 links (``config`` None: a membership only, what the previous version signed) still
verify, as a prefix of a chain (a chain file or an epoch.json written before): a format 1 link
after a format 2 one does not.

``verify_chain(genesis_cfg, genesis_keys, links)`` checks a chain link by link and returns the
membership it ends at (``verify_head``: the ``Head``, with the configuration epoch and digest;
``ChainError``: which link, and why). Chains travel as bytes (``encode_chain`` /
``decode_chain``, bounded: at most ``CHAIN_LINKS_MAX`` links of at most ``LINK_SIGNATURES_MAX``
signatures, ``CHAIN_BYTES_MAX`` bytes); every input is untrusted.

What the signatures cover is a context string and msgpack of the fields, so a signature of a
link is never the signature of a NewKey (``runtime.keys``: its own context).
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
from ..state.configuration import Configuration, Membership

LINK_CONTEXT = b"pbft.membership-link.v1"
CONFIG_LINK_CONTEXT = b"pbft.configuration-link.v2"
DIGEST_CONTEXT = b"pbft.membership.v1"
CONFIG_DIGEST_CONTEXT = b"pbft.configuration.v1"
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
CHAIN_LINKS_MAX = 1024
LINK_SIGNATURES_MAX = 1024
CHAIN_BYTES_MAX = 4 << 20
LINK_BYTES_MAX = 256 << 10
CONFIG_BYTES_MAX = 4 << 20  # a configuration served beside the chain


class ChainError(ValueError):
    """A chain (or a link) that does not verify, or bytes that are not one."""


@dataclass(frozen=True)
class ConfigRef:
    """What a format 2 link certifies of a configuration besides its membership."""

    epoch: int
    opens_at: int  # the checkpoint from which it is in effect
    digest: bytes  # config_digest of its Configuration.encode()

    def encode_fields(self) -> list:
        return [self.epoch, self.opens_at, self.digest]


@dataclass(frozen=True)
class Link:
    prev: bytes  # the digest of the chain before (``Head.digest``)
    members: Membership
    signatures: tuple[tuple[int, bytes], ...]  # (signer id in the membership before, signature), ids ascending
    config: Optional[ConfigRef] = None  # None: a format 1 link (a membership only)

    def statement(self) -> bytes:
        return statement(self.prev, self.members, self.config)

    @property
    def epoch(self) -> int:
        """The configuration epoch it certifies (a format 1 link: its membership's)."""
        return self.config.epoch if self.config is not None else self.members.epoch

    def unsigned(self) -> "Link":
        return Link(self.prev, self.members, (), self.config)

    def encode_fields(self) -> list:
        out = [self.prev, self.members.encode_fields(), [list(s) for s in self.signatures]]
        if self.config is not None:
            out.append(self.config.encode_fields())
        return out


@dataclass(frozen=True)
class Head:
    """Where a verified chain ends: the membership, the digest the next link follows (the last
    membership link's: a configuration-only link keeps it), and the configuration epoch
    (``opens_at`` -1 and ``config`` b"" when not known: the genesis or a format 1 link's)."""

    members: Membership
    digest: bytes
    epoch: int
    opens_at: int = -1
    config: bytes = b""

    def order(self) -> tuple[int, bool, int, int]:
        """Newer chains order after older ones (configuration epoch first; of one epoch, the one
        that certifies its configuration after a format 1 link's)."""
        return (self.epoch, bool(self.config), self.members.epoch, self.members.opens_at)

    def before(self, epoch: int) -> bool:
        """Whether a link of configuration ``epoch`` may follow: a later epoch, or the epoch of a
        format 1 link (a chain written by the previous version), certified with its configuration."""
        return epoch > self.epoch or (epoch == self.epoch and epoch > 0 and not self.config)


def membership_digest(m: Membership) -> bytes:
    return hashlib.blake2b(msgpack.packb([DIGEST_CONTEXT, m.encode_fields()], use_bin_type=True),
                           digest_size=DIGEST_BYTES).digest()


def config_digest(encoded: bytes) -> bytes:
    """The digest a link carries of a configuration's canonical encoding."""
    return hashlib.blake2b(CONFIG_DIGEST_CONTEXT + encoded, digest_size=DIGEST_BYTES).digest()


def statement(prev: bytes, m: Membership, config: Optional[ConfigRef] = None) -> bytes:
    """What a link's signatures sign."""
    if config is None:
        return LINK_CONTEXT + msgpack.packb([prev, m.encode_fields()], use_bin_type=True)
    return CONFIG_LINK_CONTEXT + msgpack.packb([prev, m.encode_fields(), config.encode_fields()], use_bin_type=True)


def link_digest(link: Link) -> bytes:
    """What the link after ``link`` follows (``prev``)."""
    if link.config is None:
        return membership_digest(link.members)
    return hashlib.blake2b(link.statement(), digest_size=DIGEST_BYTES).digest()


def genesis_membership(cfg: ClusterConfig, keys: Sequence[bytes]) -> Membership:
    """The genesis membership of cluster.toml (``cfg`` its configuration, ``keys`` its members')."""
    if len(keys) != cfg.n:
        raise ChainError(f"genesis: {len(keys)} keys for {cfg.n} replicas")
    return Membership(cfg.n, cfg.f, tuple(cfg.weights) or (1,) * cfg.n, tuple(bytes(k) for k in keys), 0, 0)


def genesis_head(cfg: ClusterConfig, keys: Sequence[bytes]) -> Head:
    m = genesis_membership(cfg, keys)
    return Head(m, membership_digest(m), 0, 0)


def link_membership(cs: Configuration, genesis_cfg: ClusterConfig) -> Membership:
    """The membership a link of configuration ``cs`` records: a change recorded (in force or not
    yet), else the genesis membership, with the configuration's current replica keys."""
    if cs.next_members is not None:
        return cs.next_members
    if cs.members is not None:
        return cs.members
    n = len(cs.replica_keys)
    return Membership(n, genesis_cfg.f, tuple(genesis_cfg.weights) or (1,) * n, tuple(cs.replica_keys), 0, 0)


def config_link(prev: bytes, cs: Configuration, genesis_cfg: ClusterConfig) -> Link:
    """The unsigned link of configuration ``cs`` after the chain of digest ``prev``."""
    ref = ConfigRef(cs.epoch, cs.opens_at, config_digest(cs.encode()))
    return Link(prev, link_membership(cs, genesis_cfg), (), ref)


def sign_link(signing_key: nacl.signing.SigningKey, prev: bytes, m: Membership,
              config: Optional[ConfigRef] = None) -> bytes:
    return signing_key.sign(statement(prev, m, config)).signature


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


def same_ids(a: Membership, b: Membership) -> bool:
    """The same membership but for its keys (a key rotation keeps the rest)."""
    return (a.n, a.f, tuple(a.weights), a.opens_at, a.epoch) == (b.n, b.f, tuple(b.weights), b.opens_at, b.epoch)


def _check_order(head: Head, link: Link) -> None:
    m, prev_m, c = link.members, head.members, link.config
    if c is None:
        if head.config:
            raise ChainError("broken link: a format 1 link (a membership only) after a configuration link")
        if m.epoch <= prev_m.epoch or m.opens_at <= prev_m.opens_at:
            raise ChainError(f"broken link: epoch {m.epoch} after {m.opens_at} does not come after epoch "
                             f"{prev_m.epoch} after {prev_m.opens_at}")
        return
    if not head.before(c.epoch) or c.opens_at <= head.opens_at:
        raise ChainError(f"broken link: configuration epoch {c.epoch} at {c.opens_at} does not come after epoch "
                         f"{head.epoch}" + (f" at {head.opens_at}" if head.opens_at >= 0 else ""))
    if same_ids(m, prev_m):
        return
    if not (prev_m.epoch < m.epoch <= c.epoch and head.epoch < m.epoch and m.opens_at > prev_m.opens_at):
        raise ChainError(f"broken link: a membership of epoch {m.epoch} after {m.opens_at} in configuration epoch "
                         f"{c.epoch}, after epoch {head.epoch} with one after {prev_m.opens_at}")


def verify_link(genesis_cfg: ClusterConfig, head: Head, link: Link) -> Head:
    """Where the chain ends with ``link`` if it follows ``head`` and carries signatures of
    quorum weight of ``head``'s members, valid for their keys there (raises ``ChainError``)."""
    m, prev_m = link.members, head.members
    if link.prev != head.digest:
        raise ChainError("broken link: it does not follow the link before")
    _check_order(head, link)
    if m.n > genesis_cfg.client_base:
        raise ChainError(f"bad membership: {m.n} replicas, beyond the {genesis_cfg.client_base} replica slots")
    if len(set(m.keys)) != m.n:
        raise ChainError("bad membership: two replicas with the same key")
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
    c = link.config
    if c is None:
        return Head(m, link_digest(link), m.epoch)
    if m == prev_m:  # (a configuration-only link: the next link follows the membership link before)
        return Head(m, head.digest, c.epoch, c.opens_at, c.digest)
    return Head(m, link_digest(link), c.epoch, c.opens_at, c.digest)


def verify_head(genesis_cfg: ClusterConfig, genesis_keys: Sequence[bytes], links: Sequence[Link]) -> Head:
    """Where a chain ends, checked link by link from the genesis membership (``genesis_cfg``:
    cluster.toml's configuration, ``genesis_keys``: its members' public keys); raises
    ``ChainError`` naming the first link that does not verify."""
    return verify_from(genesis_cfg, genesis_head(genesis_cfg, genesis_keys), links)


def verify_chain(genesis_cfg: ClusterConfig, genesis_keys: Sequence[bytes], links: Sequence[Link]) -> Membership:
    """The membership a chain ends at (``verify_head``)."""
    return verify_head(genesis_cfg, genesis_keys, links).members


def verify_from(genesis_cfg: ClusterConfig, start: Head, links: Sequence[Link]) -> Head:
    """``verify_head`` from a head already verified (``start``: the end of a chain held), for
    the links after it (what a replica's ``/chain?from=E`` serves)."""
    h = start
    if len(links) > CHAIN_LINKS_MAX:
        raise ChainError(f"chain of {len(links)} links (at most {CHAIN_LINKS_MAX})")
    for i, link in enumerate(links):
        try:
            h = verify_link(genesis_cfg, h, link)
        except ChainError as e:
            raise ChainError(f"link {i + 1} (epoch {link.epoch}): {e}") from None
    return h


def compact(links: Sequence[Link]) -> list[Link]:
    """A verified chain without the configuration-only links a later link replaces: the membership
    links, and the last link if it is a configuration-only one (it verifies as the chain did, and
    ends where it ends). Each link follows the last link kept whose digest is its ``prev``."""
    out: list[Link] = []
    for lk in links:
        while out and link_digest(out[-1]) != lk.prev:
            out.pop()  # (a configuration-only link: ``lk`` follows the membership link before it)
        out.append(lk)
    return out


def links_after(links: Sequence[Link], epoch: int) -> list[Link]:
    """The links of a chain that certify configuration epochs after ``epoch``."""
    return [lk for lk in links if lk.epoch > epoch]


def check_configuration(genesis_cfg: ClusterConfig, head: Head, data: bytes) -> Configuration:
    """The configuration ``data`` encodes if it is the one ``head`` certifies (its digest, and so
    its epoch, its checkpoint, its membership and every key); raises ``ChainError``."""
    if not head.config:
        raise ChainError("the chain certifies no configuration digest (the genesis, or format 1 links only)")
    if type(data) is not bytes or len(data) > CONFIG_BYTES_MAX:
        raise ChainError(f"configuration: not bytes, or more than {CONFIG_BYTES_MAX}")
    if config_digest(data) != head.config:
        raise ChainError(f"configuration: not the one the chain certifies (its last link, of epoch {head.epoch}, has "
                         f"another digest: a key or a field differs)")
    try:
        cs = Configuration.decode(data)
    except ValueError as e:
        raise ChainError(f"configuration: {e}") from None
    if (cs.epoch, cs.opens_at) != (head.epoch, head.opens_at) or link_membership(cs, genesis_cfg) != head.members:
        # (a link so signed is never one of correct replicas)
        raise ChainError("configuration: its epoch or membership is not the link's")
    return cs


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


def decode_config_ref(t) -> ConfigRef:
    """A format 2 link's configuration reference from its msgpack fields (raises ``ChainError``)."""
    if not (type(t) is tuple and len(t) == 3 and type(t[0]) is int and t[0] >= 1 and type(t[1]) is int
            and t[1] >= 1 and type(t[2]) is bytes and len(t[2]) == DIGEST_BYTES):
        raise ChainError("link: bad configuration reference")
    return ConfigRef(t[0], t[1], t[2])


def link_from_fields(t) -> Link:
    if type(t) is not tuple or len(t) not in (3, 4):
        raise ChainError("link: bad shape")
    prev, fields, sigs = t[:3]
    if type(prev) is not bytes or len(prev) != DIGEST_BYTES:
        raise ChainError("link: bad digest")
    try:
        m = Membership.decode_fields(fields)
    except ValueError as e:
        raise ChainError(f"link: {e}") from None
    if type(sigs) is not tuple or len(sigs) > LINK_SIGNATURES_MAX or not all(
            type(s) is tuple and len(s) == 2 and type(s[0]) is int and type(s[1]) is bytes for s in sigs):
        raise ChainError("link: bad signatures")
    return Link(prev, m, tuple(sorted(sigs)), decode_config_ref(t[3]) if len(t) == 4 else None)


def decode_link(data: bytes) -> Link:
    return link_from_fields(_unpack(data, LINK_BYTES_MAX))


def decode_chain(data: bytes) -> list[Link]:
    """Raises ``ChainError`` on bytes ``encode_chain`` could not have produced (shape only: the
    signatures are ``verify_chain``'s)."""
    t = _unpack(data, CHAIN_BYTES_MAX)
    if type(t) is not tuple or len(t) > CHAIN_LINKS_MAX:
        raise ChainError("chain: bad shape")
    return [link_from_fields(x) for x in t]

