"""A replica process's configuration certificate chain (``runtime.chain``): signing at each
configuration epoch, gathering the signatures, keeping the chain in the data directory, serving
it with the configuration it certifies.

* **Signing.** When a checkpoint becomes stable here (or a state transfer installs one, or at
  startup the restored one) whose state records a configuration of a newer epoch than the
  chain's last link, and this replica is a member of that link's membership, it signs the link
  (last link -> the new configuration: its membership with the current replica keys, its epoch,
  checkpoint and digest) with the key the last link has for it, and sends its vote to every
  replica it has a link to. A replica whose own key the new configuration rotates signs with
  its old key (``RotatingIdentity`` keeps it; after a restart, the key file's ``.old`` or the
  key file itself): the new key counts from the next link on. A replica whose key is held by a
  signer process (``pbft signer``) asks it for the signature (``runtime.signer``: its
  ``sign-link`` request, which signs configuration link statements only), without blocking the
  event loop, if that signer holds the key the last link has for it (after a rotation of a
  signer-held key: the signer still holding the old key); if the signer cannot be reached or
  refuses, it logs ``chain-sign-unavailable`` (with the reason) and asks again at the next
  stable checkpoint. A replica that holds no such key here nor in its signer
  (``chain-sign-unavailable``, ``reason=no-private-key``: an old key deleted, or a signer that
  now holds the new key only) does not sign that link; the others' signatures are enough while
  it is one of the f. A membership
  change is then certain to take effect at its switch point (the old membership orders nothing
  after it, and a second change is refused before it), and every old member still takes part
  (a replica that a shrink removes may lag after the switch: the members stop talking to it).
* **Gathering.** A ``MEMBERSHIP_LINK`` frame carries one link with any number of signatures (a
  vote, or a complete link). Each signature is checked against the chain's last link; bad,
  stale and equivocating ones (two configurations of one epoch) are dropped and counted; one
  pending vote per signer is kept, a vote for a newer epoch replacing its older one (a replica
  whose stable checkpoint moved on). When the signatures of one link reach quorum weight of the
  last link's membership, the link is appended (log line ``chain-link``), stored, and sent on
  complete, so that replicas that missed the votes get it; our vote is resent every
  ``RESEND_S`` until then, and the last links go to every peer on (re)connecting.
* **Keeping.** The membership links and the newest configuration-only link (``chain.compact``:
  a configuration-only link appended replaces the one before it, and a membership link the
  trailing one), so the file stays bounded by the number of membership changes and replica key
  rotations; ``DIR/data/replica-<i>/membership-chain`` (written atomically), verified again
  from the genesis configuration at startup: a damaged file is logged and ignored (the chain
  is then gathered again from the peers); ``membership-chain.config`` beside it holds the
  configuration the last link certifies (checked against its digest when read).
* **Serving.** ``/status`` has ``membership_chain`` (the encoded chain, hex) and, in ``chain``,
  ``configuration`` (the encoded configuration of the last link, hex, when known here), which
  clients and ``pbft reconfig`` fetch and verify (``runtime.follow``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import msgpack
import nacl.signing

from ..config import ConfigError
from ..core.reconfig import config_at
from ..messages import Tag
from .chain import (
    ChainError, Head, Link, check_configuration, check_signature, compact, config_link, decode_chain, decode_link,
    encode_chain, encode_link, genesis_head, quorum_of, verify_head, verify_link,
)
from .signer import SignerError
from .transport import frame

if TYPE_CHECKING:
    from ..state.configuration import Configuration, Membership
    from .node import ReplicaNode

CHAIN_FILE = "membership-chain"
CONFIG_FILE = CHAIN_FILE + ".config"
RESEND_S = 2.0
RESENDS_MAX = 60
LINKS_ON_CONNECT = 4  # the last links sent to a peer that (re)connects


def signing_key(ident: Any) -> Optional[nacl.signing.SigningKey]:
    """The Ed25519 private key behind a replica's identity (an ``Identity``, or the current one of
    ``runtime.epochs.RotatingIdentity``); None for a signer process's identity."""
    cur = getattr(ident, "current", ident)
    sk = getattr(cur, "signing_key", None)
    return sk if isinstance(sk, nacl.signing.SigningKey) else None


def own_signing_keys(node: Any) -> Iterator[nacl.signing.SigningKey]:
    """Every private key this replica holds for itself: its identity's current one, the ones a
    rotation left (``RotatingIdentity``), then its key files (the key file, ``.next``, ``.old``)."""
    ident = node.identity
    for o in (ident, *getattr(ident, "others", ()), *getattr(ident, "retired", ())):
        if (sk := signing_key(o)) is not None:
            yield sk
    key_path = getattr(node.cluster, "key_path", None)
    if key_path is None or signing_key(ident) is None:
        return  # (a signer process's key: the key files are not read)
    from .cluster import read_key_file

    path = Path(key_path(node.id))
    for p in (path, path.with_name(path.name + ".old"), path.with_name(path.name + ".next")):
        try:
            if p.exists():
                yield read_key_file(p, node.id).signing_key
        except (ConfigError, OSError):
            continue


class ChainKeeper:
    def __init__(self, node: "ReplicaNode"):
        self.node = node
        cl = node.cluster
        self.gcfg = cl.genesis_cfg or cl.cfg
        self.gkeys = [e.public_key for e in (cl.slots or cl.replicas)[:self.gcfg.n]]
        self.links: list[Link] = []
        self.tip: Head = genesis_head(self.gcfg, self.gkeys)
        self.config = b""  # the encoded configuration the last link certifies (b"": not known here)
        # pending links: statement digest -> (the link without signatures, signer -> signature)
        self.votes: dict[bytes, tuple[Link, dict[int, bytes]]] = {}
        self.voted: dict[int, tuple[int, bytes]] = {}  # signer -> (epoch, statement digest) of its pending vote
        self.known: dict[bytes, bytes] = {}  # configuration digest -> encoding, of the ones we voted for
        self.own: Optional[Link] = None
        self.resends = 0
        self.unsigned = -1  # the epoch of a configuration we hold no key to sign (not tried again)
        self.logged: tuple[int, str] = (-1, "")  # the epoch we could not sign, and why (logged once)
        self.asking: Optional[asyncio.Task] = None  # a signer process asked for our signature (``_ask_signer``)
        st = cl.storage
        self.path = None if st.mode == "memory" else st.replica_dir(cl.dir, node.id) / CHAIN_FILE
        self._load()
        if cl.chain:  # (epoch.json's, or learnt from the replicas: verified)
            try:
                tip = verify_head(self.gcfg, self.gkeys, cl.chain)
                if tip.order() > self.tip.order():
                    self.tip, self.links, self.config = tip, compact(cl.chain), b""
                    self._save()
            except ChainError as e:
                node._log("chain-refused", error=str(e))

    @property
    def head(self) -> "Membership":
        """The membership the chain ends at."""
        return self.tip.members

    # ---- the chain ------------------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            links = decode_chain(self.path.read_bytes())
            self.tip = verify_head(self.gcfg, self.gkeys, links)
            self.links = compact(links)  # (written compacted; one that holds replaced links verifies too)
        except (OSError, ChainError) as e:
            self.node._log("chain-unreadable", file=str(self.path), error=str(e))
            return
        cpath = self.path.with_name(CONFIG_FILE)
        if self.tip.config and cpath.exists():
            try:
                data = cpath.read_bytes()
                check_configuration(self.gcfg, self.tip, data)
                self.config = data
            except (OSError, ChainError) as e:
                self.node._log("chain-config-unreadable", file=str(cpath), error=str(e))

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            self.node._log("chain-write-failed", file=str(path), error=str(e))

    def _save(self) -> None:
        if self.path is None:
            return
        self._write(self.path, encode_chain(self.links))
        cpath = self.path.with_name(CONFIG_FILE)
        if self.config:
            self._write(cpath, self.config)
        elif cpath.exists():
            try:
                cpath.unlink()
            except OSError as e:
                self.node._log("chain-write-failed", file=str(cpath), error=str(e))

    def encoded(self) -> bytes:
        return encode_chain(self.links)

    def describe(self) -> dict[str, Any]:
        t, h = self.tip, self.tip.members
        return {"links": len(self.links), "epoch": h.epoch, "n": h.n, "f": h.f, "opens_at": h.opens_at,
                "config_epoch": t.epoch, "config_opens_at": t.opens_at, "config_digest": t.config.hex(),
                "configuration": self.config.hex()}

    # ---- signing ----------------------------------------------------------------------------
    def on_state(self, n: Optional[int] = None) -> None:
        """Stable checkpoint n (default: our low water mark): if its state records a configuration
        of a newer epoch than the chain's last link (a change, in force from its checkpoint on for
        certain: a membership change's old membership orders nothing after its switch point, and
        a second one is refused before it), vote for it."""
        r = self.node.replica
        n = r.low_water_mark if n is None else n
        cs = config_at(r, n)
        if cs is None:
            return
        if self.tip.before(cs.epoch):
            self.sign(cs)
        elif not self.config and self.tip.config and cs.epoch == self.tip.epoch:
            self._learn_config(cs)

    def sign(self, cs: "Configuration", signature: Optional[bytes] = None) -> None:
        """Vote for the link to configuration ``cs`` (``signature``: ours of it, from a signer process)."""
        node = self.node
        if node.id >= self.head.n or self.unsigned == cs.epoch or not self.tip.before(cs.epoch):
            return  # (not a member of the membership that certifies it, or could not, or the chain has it)
        link = config_link(self.tip.digest, cs, self.gcfg)
        if self.own is not None and self.own.unsigned() == link:
            return  # (signed already)
        sig = signature if signature is not None else self.sign_statement(link.statement())
        if sig is None:
            self._ask_signer(cs, link)  # (asynchronous: comes back here with the signature)
            return
        assert link.config is not None
        self.known = {link.config.digest: cs.encode()}
        vote = Link(link.prev, link.members, ((node.id, sig),), link.config)
        self.own, self.resends = vote, 0
        self._merge(vote)
        if self.own is not None:  # (not complete by our vote alone)
            self._send_all(vote)
            node.loop.call_later(RESEND_S, self._resend)

    def sign_statement(self, stmt: bytes) -> Optional[bytes]:
        """Our signature of a link's statement, with a private key held here that the chain's last
        link has for us (a rotation of our key is signed with the old one); None if we hold none
        here (``ask_signer``: a signer process may hold it)."""
        want = self.head.keys[self.node.id]
        for sk in own_signing_keys(self.node):
            if bytes(sk.verify_key) == want:
                return sk.sign(stmt).signature
        return None

    def ask_signer(self) -> Any:
        """The ``sign_link`` coroutine function of the signer process that holds the key the chain's
        last link has for us (``runtime.signer.SignerIdentity``: our identity, or the one a rotation
        of our key retired), or None."""
        want = self.head.keys[self.node.id]
        ident = self.node.identity
        for o in (ident, *getattr(ident, "others", ()), *getattr(ident, "retired", ())):
            o = getattr(o, "current", o)
            ask = getattr(o, "sign_link", None)
            if ask is not None and bytes(getattr(o, "public", b"")) == want:
                return ask
        return None

    def _unavailable(self, epoch: int, why: str) -> None:
        if self.logged != (epoch, why):  # (once, not at every checkpoint)
            self.logged = (epoch, why)
            self.node._log("chain-sign-unavailable", epoch=epoch, reason=why)

    def _ask_signer(self, cs: "Configuration", link: Link) -> None:
        """Our signature of ``link`` from the signer process that holds our key (``ask_signer``), in
        a task of the event loop, one request at a time. On success ``sign`` goes on (if the chain
        has not moved meanwhile); a failure is logged (once per epoch and reason) and asked again
        at the next stable checkpoint. Without such a signer, this configuration is not signed."""
        node = self.node
        ask = self.ask_signer()
        if ask is None:
            self.unsigned = cs.epoch
            self._unavailable(cs.epoch, "no-private-key")
            return
        if self.asking is not None:
            return

        async def run() -> None:
            try:
                sig = await ask(link.statement())
            except SignerError as e:
                self._unavailable(cs.epoch, e.reason)
                return
            finally:
                self.asking = None
            if node.halted or self.tip.digest != link.prev:
                return  # (the chain moved meanwhile)
            if check_signature(self.head, node.id, sig, link.statement()):
                self.unsigned = cs.epoch  # (a signer restarted with another key: not the link before's)
                self._unavailable(cs.epoch, "signer-wrong-key")
                return
            self.sign(cs, sig)

        self.asking = node.loop.create_task(run())

    def _resend(self) -> None:
        own = self.own
        if own is None or self.node.halted or self.resends >= RESENDS_MAX:
            return
        self.resends += 1
        self._send_all(own)
        self.node.loop.call_later(RESEND_S, self._resend)

    # ---- gathering ----------------------------------------------------------------------------
    def on_frame(self, raw: bytes) -> str:
        """A MEMBERSHIP_LINK frame: "" if it was taken, else the reason it was dropped."""
        try:
            t = msgpack.unpackb(raw, raw=False, use_list=False, max_array_len=5, max_map_len=0)
            if type(t) is not tuple or len(t) != 5 or type(t[2]) is not bytes:
                raise ChainError("bad frame")
            link = decode_link(t[2])
        except (ChainError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return "chain-link-malformed"
        except Exception:  # noqa: BLE001 - msgpack raises several types
            return "chain-link-malformed"
        return self._merge(link)

    def _merge(self, link: Link) -> str:
        head, c = self.tip, link.config
        if c is None:
            return "chain-link-old-format"  # (format 1 links are only read from files written before)
        if not head.before(c.epoch):
            held = any(lk.unsigned() == link.unsigned() for lk in self.links)
            return "chain-link-stale" if held else "chain-link-old"
        if link.prev != head.digest:
            return "chain-link-unknown-prev"  # (a later link than our next one, or a forgery)
        if len(link.signatures) > head.members.n:
            return "chain-link-malformed"  # (more signatures than signers: checked for none of them)
        stmt = link.statement()
        key = hashlib.blake2b(stmt, digest_size=16).digest()
        entry = self.votes.get(key)
        sigs = entry[1] if entry is not None else {}
        why = ""
        for signer, sig in link.signatures:
            if sigs.get(signer) == sig:
                continue
            before = self.voted.get(signer)
            if before is not None and before[1] != key and before[0] >= c.epoch:
                why = "chain-signer-equivocates" if before[0] == c.epoch else "chain-vote-superseded"
                continue
            if bad := check_signature(head.members, signer, sig, stmt):
                why = "chain-signature-bad" if bad.startswith("bad") else "chain-signer-not-a-member"
                break  # (a correct sender sends none: one signature check per bad frame at most)
            if before is not None and before[1] != key:  # (its vote for an older epoch: replaced)
                self._forget_vote(signer, before[1])
            sigs[signer] = sig
            self.voted[signer] = (c.epoch, key)
        if not sigs:
            return why or "chain-link-unsigned"
        self.votes[key] = (link.unsigned(), sigs)
        q = quorum_of(self.gcfg, head.members)
        if q.weight_of(sigs) >= q.quorum_weight:
            lk = link.unsigned()
            self._complete(Link(lk.prev, lk.members, tuple(sorted(sigs.items())), lk.config))
        return why

    def _forget_vote(self, signer: int, key: bytes) -> None:
        entry = self.votes.get(key)
        if entry is None:
            return
        entry[1].pop(signer, None)
        if not entry[1]:
            del self.votes[key]

    def _complete(self, link: Link) -> None:
        try:
            tip = verify_link(self.gcfg, self.tip, link)
        except ChainError as e:  # (signed by a quorum, yet not a usable link: never by correct ones)
            self.node._log("chain-link-refused", epoch=link.epoch, error=str(e))
            return
        self.links = compact([*self.links, link])  # (a configuration-only link before it: replaced)
        self.tip = tip
        self.config = self.known.get(tip.config, b"")
        self.votes.clear()
        self.voted.clear()
        self.known.clear()
        self.own = None
        if not self.config:
            cs = config_at(self.node.replica, self.node.replica.low_water_mark)
            if cs is not None and cs.epoch == tip.epoch:
                self._learn_config(cs, save=False)
        self._save()
        m = tip.members
        self.node._log("chain-link", epoch=m.epoch, n=m.n, f=m.f, opens_at=m.opens_at, signers=len(link.signatures),
                       config_epoch=tip.epoch, config_opens_at=tip.opens_at)
        self._send_all(link)
        # a configuration we hold that is newer still (a change we switched to before this link came)
        self.on_state()

    def _learn_config(self, cs: "Configuration", save: bool = True) -> None:
        """The configuration of the chain's last link, from our own state (if it is that one)."""
        data = cs.encode()
        try:
            check_configuration(self.gcfg, self.tip, data)
        except ChainError:
            return
        self.config = data
        if save:
            self._save()

    # ---- sending ------------------------------------------------------------------------------
    def _frame(self, link: Link) -> bytes:
        return frame(msgpack.packb([int(Tag.MEMBERSHIP_LINK), self.node.id, encode_link(link), b"", b""],
                                   use_bin_type=True))

    def _send_all(self, link: Link) -> None:
        data = self._frame(link)
        node = self.node
        for lk in node.links.values():
            if lk.conn is not None:
                lk.send(data, node.counters)

    def on_link_up(self, conn: Any) -> None:
        out = [self._frame(lk) for lk in self.links[-LINKS_ON_CONNECT:]]
        if self.own is not None:
            out.append(self._frame(self.own))
        if out:
            conn.send(b"".join(out))
