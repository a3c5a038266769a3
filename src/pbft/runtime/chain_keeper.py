"""A replica process's membership certificate chain (``runtime.chain``): signing at the switch,
gathering the signatures, keeping the chain in the data directory, serving it.

* **Signing.** When a checkpoint becomes stable here (or a state transfer installs one, or at
  startup the restored one) whose state records a membership newer than the chain's last one,
  and this replica is a member of that last membership, it signs the link (last membership ->
  the new one) with its long-term key and sends its vote to every replica it has a link to. The
  change is then certain to take effect at its switch point (the old membership orders nothing
  after it, and a second change is refused before it), and every old member still takes part
  (a replica that a shrink removes may lag after the switch: the members stop talking to it).
  A replica whose key is held by a signer process (``pbft signer``) asks it for the signature
  (``runtime.signer``: its ``sign-link`` request, which signs link statements only), without
  blocking the event loop; if the signer cannot be reached or refuses, it logs
  ``chain-sign-unavailable`` (with the reason) and asks again at the next stable checkpoint.
* **Gathering.** A ``MEMBERSHIP_LINK`` frame carries one link with any number of signatures (a
  vote, or a complete link). Each signature is checked against the chain's last membership;
  bad, stale and equivocating ones are dropped and counted; at most one pending link per signer
  is kept. When the signatures of one link reach quorum weight of the last membership, the link
  is appended (log line ``chain-link``), stored, and sent on complete, so that replicas that
  missed the votes get it; our vote is resent every ``RESEND_S`` until then, and the last
  links go to every peer on (re)connecting.
* **Keeping.** ``DIR/data/replica-<i>/membership-chain`` (written atomically), verified again
  from the genesis configuration at startup: a damaged file is logged and ignored (the chain
  is then gathered again from the peers).
* **Serving.** ``/status`` has ``membership_chain`` (the encoded chain, hex), which clients and
  ``pbft reconfig`` fetch and verify (``chain_client``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import TYPE_CHECKING, Any, Optional

import msgpack
import nacl.signing

from ..core.reconfig import config_at
from ..messages import Tag
from .chain import (
    ChainError, Link, check_signature, decode_chain, decode_link, encode_chain, encode_link, genesis_membership,
    membership_digest, quorum_of, sign_link, statement, verify_chain, verify_link,
)
from .signer import SignerError
from .transport import frame

if TYPE_CHECKING:
    from ..state.configuration import Membership
    from .node import ReplicaNode

CHAIN_FILE = "membership-chain"
RESEND_S = 2.0
RESENDS_MAX = 60
LINKS_ON_CONNECT = 4  # the last links sent to a peer that (re)connects


def signing_key(ident: Any) -> Optional[nacl.signing.SigningKey]:
    """The Ed25519 private key behind a replica's identity (an ``Identity``, or the current one of
    ``runtime.epochs.RotatingIdentity``); None for a signer process's identity."""
    cur = getattr(ident, "current", ident)
    sk = getattr(cur, "signing_key", None)
    return sk if isinstance(sk, nacl.signing.SigningKey) else None


class ChainKeeper:
    def __init__(self, node: "ReplicaNode"):
        self.node = node
        cl = node.cluster
        self.gcfg = cl.genesis_cfg or cl.cfg
        self.gkeys = [e.public_key for e in (cl.slots or cl.replicas)[:self.gcfg.n]]
        self.links: list[Link] = []
        self.head: "Membership" = genesis_membership(self.gcfg, self.gkeys)
        # pending links: statement digest -> (the link without signatures, signer -> signature)
        self.votes: dict[bytes, tuple[Link, dict[int, bytes]]] = {}
        self.voted: dict[int, bytes] = {}  # signer -> the statement digest of its pending vote
        self.own: Optional[Link] = None
        self.resends = 0
        self.unsigned: tuple[int, str] = (-1, "")  # the membership we could not sign, and why (logged once)
        self.asking: Optional[asyncio.Task] = None  # a signer process asked for our signature (``_ask_signer``)
        st = cl.storage
        self.path = None if st.mode == "memory" else st.replica_dir(cl.dir, node.id) / CHAIN_FILE
        self._load()
        if len(cl.chain) > len(self.links):  # (epoch.json's, or learnt from the replicas: verified)
            try:
                self.head = verify_chain(self.gcfg, self.gkeys, cl.chain)
                self.links = list(cl.chain)
                self._save()
            except ChainError as e:
                node._log("chain-refused", error=str(e))

    # ---- the chain ------------------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            links = decode_chain(self.path.read_bytes())
            self.head = verify_chain(self.gcfg, self.gkeys, links)
            self.links = links
        except (OSError, ChainError) as e:
            self.node._log("chain-unreadable", file=str(self.path), error=str(e))

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(CHAIN_FILE + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(encode_chain(self.links))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            self.node._log("chain-write-failed", file=str(self.path), error=str(e))

    def encoded(self) -> bytes:
        return encode_chain(self.links)

    def describe(self) -> dict[str, Any]:
        h = self.head
        return {"links": len(self.links), "epoch": h.epoch, "n": h.n, "f": h.f, "opens_at": h.opens_at}

    # ---- signing ----------------------------------------------------------------------------
    def on_state(self, n: Optional[int] = None) -> None:
        """Stable checkpoint n (default: our low water mark): if its state records a membership
        newer than the chain's last one (a change, in force after its switch point for certain:
        the old membership orders nothing after it, and a second change is refused before it),
        vote for it."""
        r = self.node.replica
        n = r.low_water_mark if n is None else n
        cs = config_at(r, n)
        m = (cs.next_members or cs.members) if cs is not None else None
        if m is not None and m.opens_at > self.head.opens_at:
            self.sign(m)

    def sign(self, m: "Membership", signature: Optional[bytes] = None) -> None:
        """Vote for the link to ``m`` (``signature``: ours of it, from a signer process)."""
        node = self.node
        if node.id >= self.head.n or (self.own is not None and self.own.members == m):
            return  # (not a member of the membership that certifies it, or signed already)
        prev = membership_digest(self.head)
        if signature is None:
            sk = signing_key(node.identity)
            if sk is None:
                self._ask_signer(m, prev)  # (asynchronous: comes back here with the signature)
                return
            signature = sign_link(sk, prev, m)
        vote = Link(prev, m, ((node.id, signature),))
        self.own, self.resends = vote, 0
        self._merge(vote)
        if self.own is not None:  # (not complete by our vote alone)
            self._send_all(vote)
            node.loop.call_later(RESEND_S, self._resend)

    def _ask_signer(self, m: "Membership", prev: bytes) -> None:
        """Our signature of the link ``prev`` -> ``m`` from the signer process that holds our key
        (``SignerIdentity.sign_link``), in a task of the event loop, one request at a time. On
        success ``sign`` goes on (if the chain has not moved meanwhile); a failure is logged
        (once per membership and reason), and asked again at the next stable checkpoint."""
        node = self.node

        def unavailable(why: str) -> None:
            if self.unsigned != (m.epoch, why):  # (once, not at every checkpoint)
                self.unsigned = (m.epoch, why)
                node._log("chain-sign-unavailable", epoch=m.epoch, reason=why)

        ask = getattr(getattr(node.identity, "current", node.identity), "sign_link", None)
        if ask is None:
            unavailable("no-private-key")
            return
        if self.asking is not None:
            return

        async def run() -> None:
            try:
                sig = await ask(statement(prev, m))
            except SignerError as e:
                unavailable(e.reason)
                return
            finally:
                self.asking = None
            if not node.halted and membership_digest(self.head) == prev:
                self.sign(m, sig)

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
        m, head = link.members, self.head
        if m.opens_at <= head.opens_at:
            return "chain-link-stale" if any(lk.members == m for lk in self.links) else "chain-link-old"
        if link.prev != membership_digest(head):
            return "chain-link-unknown-prev"  # (a later link than our next one, or a forgery)
        if len(link.signatures) > head.n:
            return "chain-link-malformed"  # (more signatures than signers: checked for none of them)
        stmt = link.statement()
        key = hashlib.blake2b(stmt, digest_size=16).digest()
        entry = self.votes.get(key)
        sigs = entry[1] if entry is not None else {}
        why = ""
        for signer, sig in link.signatures:
            if sigs.get(signer) == sig:
                continue
            if self.voted.get(signer, key) != key:
                why = "chain-signer-equivocates"
                continue
            if bad := check_signature(head, signer, sig, stmt):
                why = "chain-signature-bad" if bad.startswith("bad") else "chain-signer-not-a-member"
                break  # (a correct sender sends none: one signature check per bad frame at most)
            sigs[signer] = sig
            self.voted[signer] = key
        if not sigs:
            return why or "chain-link-unsigned"
        self.votes[key] = (Link(link.prev, m, ()), sigs)
        q = quorum_of(self.gcfg, head)
        if q.weight_of(sigs) >= q.quorum_weight:
            self._complete(Link(link.prev, m, tuple(sorted(sigs.items()))))
        return why

    def _complete(self, link: Link) -> None:
        try:
            m = verify_link(self.gcfg, self.head, link)
        except ChainError as e:  # (signed by a quorum, yet not a usable membership: never by correct ones)
            self.node._log("chain-link-refused", epoch=link.members.epoch, error=str(e))
            return
        self.links.append(link)
        self.head = m
        self.votes.clear()
        self.voted.clear()
        self.own = None
        self._save()
        self.node._log("chain-link", epoch=m.epoch, n=m.n, f=m.f, opens_at=m.opens_at, signers=len(link.signatures))
        self._send_all(link)
        # a membership we hold that is newer still (a change we switched to before this link came)
        self.on_state()

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
