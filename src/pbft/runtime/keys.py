"""Long-term key pairs and NewKey session-key messages (as in the original).

Every principal (replica or client) has one long-term Ed25519 key pair; its
X25519 form encrypts session keys to it.  Session keys are symmetric and used
only for MACs (``pbft.crypto``); public-key operations happen only here, never
per request.

A NewKey message from principal ``i`` carries, for each receiver ``j`` it is
meant for, fresh session keys sealed to ``j``'s public key:

* from a replica: ``k(j->i)``, the key ``j`` must use to authenticate what it
  sends to ``i`` (each replica chooses the keys it *receives* with, so a
  replica that refreshes its keys immediately stops accepting anything
  authenticated with keys an attacker may have learnt);
* from a client: both ``k(c->j)`` and ``k(j->c)``.

The message is signed with ``i``'s long-term key and carries a timestamp
(microseconds of wall-clock time) that must grow: a receiver rejects a NewKey
whose timestamp is not larger than the last one it accepted from ``i``, so a
replayed NewKey cannot bring old keys back, and one more than a skew window
ahead of its own clock, so that nobody can lock ``i``'s later NewKeys out.
Both are checked before the signature (``precheck_newkey``): a replay costs a
parse and a comparison, not a public-key operation.

Wire frame: the codec's ``[tag=16, sender, header, b"", signature]`` with
``header = msgpack([timestamp, [[receiver, sealed_box], ...]])``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import msgpack
import nacl.exceptions
import nacl.public
import nacl.signing

from ..codec import DecodeError
from ..crypto import KEY_SIZE
from ..messages import Tag

NEWKEY_TAG = Tag.NEW_KEY
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
SEALED_OVERHEAD = 48  # X25519 ephemeral key + Poly1305 tag
NEWKEY_MAX_BYTES = 64 * 1024
_SIG_CONTEXT = b"pbft.newkey.v1"


@dataclass(frozen=True)
class Identity:
    """A principal's long-term key pair."""

    principal: int
    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls, principal: int) -> "Identity":
        return cls(principal, nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, principal: int, seed: bytes) -> "Identity":
        return cls(principal, nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def box(self) -> nacl.public.SealedBox:
        return nacl.public.SealedBox(self.signing_key.to_curve25519_private_key())

    # the only two operations on the private key; ``runtime.signer.SignerIdentity`` has the same
    # two, answered by a signer process that holds the key instead of this one
    def sign_newkey(self, header: bytes) -> bytes:
        """The signature of a NewKey of ours with this header (``newkey_message``)."""
        return self.signing_key.sign(newkey_message(self.principal, header)).signature

    def open_sealed(self, sealed: bytes) -> bytes:
        """A sealed box addressed to us, opened (raises ``nacl.exceptions.CryptoError``)."""
        return self.box().decrypt(sealed)


class PublicKeys:
    """The long-term public keys of every principal of a cluster."""

    def __init__(self, keys: dict[int, bytes]):
        self.verify: dict[int, nacl.signing.VerifyKey] = {}
        self.seal_to: dict[int, nacl.public.SealedBox] = {}
        for p, k in keys.items():
            if len(k) != PUBLIC_KEY_SIZE:
                raise ValueError(f"public key of principal {p} has {len(k)} bytes, expected {PUBLIC_KEY_SIZE}")
            vk = nacl.signing.VerifyKey(k)
            self.verify[p] = vk
            try:
                self.seal_to[p] = nacl.public.SealedBox(vk.to_curve25519_public_key())
            except nacl.exceptions.CryptoError as e:
                raise ValueError(f"public key of principal {p} is not a valid Ed25519 key") from e


def fresh_key() -> bytes:
    return os.urandom(KEY_SIZE)


def now_timestamp_us() -> int:
    return time.time_ns() // 1000


def newkey_message(principal: int, header: bytes) -> bytes:
    """What a NewKey's signature covers: a context string, the tag, the sender and the header."""
    return _SIG_CONTEXT + msgpack.packb([NEWKEY_TAG, principal, header], use_bin_type=True)


def make_newkey(me: Identity, public: PublicKeys, keys: dict[int, bytes], timestamp: int) -> bytes:
    """A signed NewKey frame carrying ``keys[j]`` (bytes) sealed to each receiver ``j``. ``me``
    may be a ``runtime.signer.SignerIdentity`` (its ``sign_newkey`` raises ``DecodeError``)."""
    entries = [[j, public.seal_to[j].encrypt(k)] for j, k in sorted(keys.items())]
    header = msgpack.packb([timestamp, entries], use_bin_type=True)
    sig = me.sign_newkey(header)
    return msgpack.packb([NEWKEY_TAG, me.principal, header, b"", sig], use_bin_type=True)


@dataclass(slots=True)
class NewKey:
    sender: int
    timestamp: int
    entry: Optional[bytes]  # the sealed keys for us, or None if the message has none for us
    header: bytes = b""
    signature: bytes = b""


def parse_newkey(raw: bytes, me: int, max_principal: int) -> NewKey:
    """Check a NewKey frame's shape; return its fields, signature NOT checked (``check_signature``).

    Cheap (two bounded msgpack unpacks): what a receiver can decide without a signature check
    (a stale timestamp, a replay, a timestamp from the future, nothing for us) is decided on
    this. Raises ``DecodeError`` with a short reason on anything wrong."""
    if len(raw) > NEWKEY_MAX_BYTES:
        raise DecodeError("newkey-oversized")
    t = _unpack(raw)
    if type(t) is not tuple or len(t) != 5:
        raise DecodeError("newkey-malformed")
    tag, sender, header, payload, sig = t
    if tag != NEWKEY_TAG or type(sender) is not int or not 0 <= sender <= max_principal:
        raise DecodeError("newkey-bad-sender")
    if type(header) is not bytes or payload != b"" or type(sig) is not bytes or len(sig) != SIGNATURE_SIZE:
        raise DecodeError("newkey-malformed")
    h = _unpack(header)
    if type(h) is not tuple or len(h) != 2:
        raise DecodeError("newkey-malformed")
    ts, entries = h
    if type(ts) is not int or not 0 < ts < (1 << 63) or type(entries) is not tuple:
        raise DecodeError("newkey-malformed")
    mine = None
    for e in entries:
        if type(e) is not tuple or len(e) != 2 or type(e[0]) is not int or type(e[1]) is not bytes:
            raise DecodeError("newkey-malformed")
        if e[0] == me:
            mine = e[1]
    return NewKey(sender, ts, mine, header, sig)


def check_signature(nk: NewKey, public: PublicKeys) -> None:
    """Raises ``DecodeError`` unless ``nk`` is signed by the long-term key of its sender."""
    vk = public.verify.get(nk.sender)
    if vk is None:
        raise DecodeError("newkey-unknown-sender")
    body = msgpack.packb([NEWKEY_TAG, nk.sender, nk.header], use_bin_type=True)
    try:
        vk.verify(_SIG_CONTEXT + body, nk.signature)
    except nacl.exceptions.BadSignatureError as e:
        raise DecodeError("newkey-bad-signature") from e


def open_newkey(raw: bytes, me: int, public: PublicKeys, max_principal: int) -> NewKey:
    """Check a NewKey frame's shape and signature; return the (still sealed) entry for ``me``.

    Raises ``DecodeError`` with a short reason on anything wrong.
    """
    nk = parse_newkey(raw, me, max_principal)
    check_signature(nk, public)
    return nk


def _unpack(data: bytes):
    try:
        return msgpack.unpackb(data, use_list=False, raw=False, max_str_len=0, max_map_len=0,
                               max_ext_len=0, max_bin_len=NEWKEY_MAX_BYTES, max_array_len=1024)
    except (ValueError, msgpack.UnpackException) as e:
        raise DecodeError("newkey-malformed") from e


def precheck_newkey(raw: bytes, me: Identity, public: PublicKeys, max_principal: int, last_ts: dict[int, int],
                    now_us: Optional[int] = None, skew_us: Optional[int] = None) -> NewKey:
    """Everything about a NewKey that costs no public-key operation, in this order: its shape,
    a sender in the cluster other than us, a timestamp newer than the last one accepted from
    that sender (``newkey-stale``: an exact replay is refused here) and at most ``skew_us`` ahead
    of ``now_us`` (``newkey-future-timestamp``: a timestamp far in the future, once accepted,
    would lock the sender's genuine NewKeys out; for good at 2^63-1), an entry for us. Changes
    nothing; raises ``DecodeError``."""
    nk = parse_newkey(raw, me.principal, max_principal)
    if nk.sender == me.principal:
        raise DecodeError("newkey-from-self")
    if nk.sender not in public.verify:
        raise DecodeError("newkey-unknown-sender")
    if nk.timestamp <= last_ts.get(nk.sender, 0):
        raise DecodeError("newkey-stale")
    if now_us is not None and skew_us is not None and nk.timestamp > now_us + skew_us:
        raise DecodeError("newkey-future-timestamp")
    if nk.entry is None:
        raise DecodeError("newkey-no-entry")
    return nk


def finish_newkey(nk: NewKey, me: Identity, public: PublicKeys, n_replicas: int,
                  last_ts: dict[int, int]) -> bytes:
    """The public-key part, after ``precheck_newkey``: the signature, then our keys unsealed.
    Records the timestamp in ``last_ts`` and returns the keys (see ``accept_newkey``)."""
    check_signature(nk, public)
    assert nk.entry is not None  # precheck_newkey refused a NewKey without our entry
    k = unseal(me, nk.entry, KEY_SIZE if nk.sender < n_replicas else 2 * KEY_SIZE)
    last_ts[nk.sender] = nk.timestamp
    return k


def accept_newkey(raw: bytes, me: Identity, public: PublicKeys, n_replicas: int, max_principal: int,
                  last_ts: dict[int, int], now_us: Optional[int] = None,
                  skew_us: Optional[int] = None) -> tuple[int, bytes]:
    """Check a NewKey for ``me`` and return ``(sender, keys)``: 32 bytes ``k(me->sender)`` from a
    replica, 64 bytes ``k(sender->me) + k(me->sender)`` from a client. Records its timestamp in
    ``last_ts``; raises ``DecodeError`` (stale, replayed, from the future, forged, not for us...).
    The cheap checks come first (``precheck_newkey``), the signature last."""
    nk = precheck_newkey(raw, me, public, max_principal, last_ts, now_us, skew_us)
    return nk.sender, finish_newkey(nk, me, public, n_replicas, last_ts)


def unseal(me: Identity, sealed: bytes, size: int) -> bytes:
    try:
        k = me.open_sealed(sealed)  # (a signer's refusal or absence: DecodeError, passed on)
    except nacl.exceptions.CryptoError as e:
        raise DecodeError("newkey-undecryptable") from e
    if len(k) != size:
        raise DecodeError("newkey-bad-key-size")
    return k


def split_keys(k: bytes, parts: int) -> Iterable[bytes]:
    return (k[i * KEY_SIZE:(i + 1) * KEY_SIZE] for i in range(parts))
