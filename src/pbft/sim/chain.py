"""The membership certificate chain in the simulator: the runtime's rules (``runtime.chain``,
``runtime.chain_keeper``) carried by the simulator's authenticated messages.

Each replica id (a *node*: the replica slot, across its reboots and replacements) keeps a chain
of links, each "membership ``m`` follows membership ``prev``" with the members of ``prev`` that
signed it. A signature here is an entry of the simulation's registry of signed statements
(``ChainModel.signed``): a correct replica signs only the membership its stable checkpoint's
state records, a Byzantine one signs anything, but as itself only; a link frame naming a signer
that did not sign its statement is dropped and counted (``chain-signature-bad``), as a bad
Ed25519 signature is by the runtime. Link frames are simulated messages: loss, duplication,
delay, partitions and replays act on them.

* **Voting.** When a checkpoint becomes stable at a correct replica (or a state transfer
  installs one, or it switches, or it starts) and that checkpoint's state records a membership
  newer than its chain's last one (``core.reconfig.config_at``: the change, in force after its
  switch point for certain), it votes for the link if it is a member of the chain's last
  membership, and sends the vote to every replica; the vote is resent every ``RESEND_MS`` until
  the link is complete here.
* **Gathering.** A link is complete at signatures of quorum weight of the previous membership;
  one pending vote per signer is kept (a second, different one is ``chain-signer-equivocates``).
  A complete link is appended and sent to every replica; a vote for a link a node holds already
  is answered with the complete link (what the runtime's reconnection hands over); at every
  (re)start and at the end of a partition the nodes exchange their last ``LINKS_ON_CONNECT``
  links and pending votes, as the runtime does when its links (re)connect.
* **Keeping.** A node's links survive its crashes and reboots (the runtime's data-directory
  file), except when its store comes back damaged (the file is then taken as unreadable too);
  a replaced machine has none. At every start a node also takes the longest chain of the
  replicas it can reach, checked link by link from the genesis membership (the runtime's start
  asks the replica slots for theirs and takes the newest that verifies).
* **The core.** Every correct replica follows the chain (``ChainView.follows``); a
  ``ChainWanted`` is answered with the chain's last membership (``membership.learn_chain``).
* **Rejoining.** A replica whose chain certifies a membership newer than its own, that its state
  does not record as a pending change, and that it is a member of, becomes that membership's
  joiner (``membership.rejoin``) when it has evidence that the membership is in force: at a
  start, its restored view is in that membership's epoch (it had switched, but its store did not
  keep a checkpoint of it) or its store is unusable; later, a ``ChainWanted`` for a checkpoint
  after that membership's switch point (f + 1 of its old members vote for one). Otherwise it
  stays a member of its own membership: the old membership may still need it to reach the
  switch point.

Byzantine replicas' chain behaviours (drawn per replica from the seed, ``CHAIN_BEHAVIOURS``):
``withhold`` (no votes), ``honest`` (genuine votes only), ``bogus`` (votes for a membership no
correct replica records), ``equivocate`` (the bogus vote to some replicas, the genuine one to
the others), ``forge`` (a bogus link naming correct replicas as its signers).

The chain oracles: C1 no two nodes' chains differ at a link both hold; C2 every complete link's
membership is one a correct replica's stable checkpoint recorded (and, in a converged run, one
the correct replicas switched to); C3 a link completes only with genuine signatures of quorum
weight of the previous membership.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import msgpack

from ..core import membership
from ..core.reconfig import config_at
from ..runtime.chain import membership_digest
from ..state.configuration import Membership

if TYPE_CHECKING:
    from ..core.replica import Replica
    from .simulator import Simulation

CHAIN_MAGIC = b"\xc1chain"  # (0xc1 is no msgpack byte: the codec would drop such a frame as undecodable)
RESEND_MS = 250.0
RESENDS_MAX = 200
LINKS_ON_CONNECT = 4
CHAIN_BEHAVIOURS = ("withhold", "honest", "bogus", "equivocate", "forge")


@dataclass(frozen=True)
class SimLink:
    prev: bytes  # membership_digest of the membership before
    members: Membership
    signers: tuple[int, ...]  # ids of the membership before, ascending


@dataclass
class NodeChain:
    head: Membership
    links: list[SimLink] = field(default_factory=list)
    votes: dict[bytes, tuple[SimLink, set[int]]] = field(default_factory=dict)  # statement -> signers
    voted: dict[int, bytes] = field(default_factory=dict)  # signer -> the statement of its pending vote
    own: Optional[SimLink] = None
    resends: int = 0
    timer: bool = False
    drops: dict[str, int] = field(default_factory=dict)


def statement(prev: bytes, m: Membership) -> bytes:
    return hashlib.blake2b(prev + membership_digest(m), digest_size=16).digest()


def encode(link: SimLink) -> bytes:
    return CHAIN_MAGIC + msgpack.packb([link.prev, link.members.encode_fields(), list(link.signers)],
                                       use_bin_type=True)


def decode(raw: bytes) -> Optional[SimLink]:
    try:
        t = msgpack.unpackb(raw[len(CHAIN_MAGIC):], raw=False, use_list=False)
        prev, fields, signers = t
        m = Membership.decode_fields(fields)
        if type(prev) is not bytes or type(signers) is not tuple or not all(type(s) is int for s in signers):
            return None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    return SimLink(prev, m, tuple(sorted(set(signers))))


def bogus(m: Membership) -> Membership:
    """A membership no correct replica records: ``m`` with another weight for replica 0."""
    return replace(m, weights=(m.weights[0] + 1,) + tuple(m.weights[1:]))


class ChainModel:
    def __init__(self, sim: "Simulation"):
        self.sim = sim
        g = sim.genesis_cfg
        assert sim.admin is not None  # (the chain is modelled in runs with membership changes)
        keys = tuple(sim.admin.public[i] for i in range(g.n))
        self.genesis = Membership(g.n, g.f, tuple(g.weights) or (1,) * g.n, keys, 0, 0)
        self.signed: set[tuple[int, bytes]] = set()
        self.nodes = {i: NodeChain(self.genesis) for i in range(sim.slots)}
        self.behaviour = {r: random.Random(f"{sim.sc.seed}/chain/{r}").choice(CHAIN_BEHAVIOURS) for r in sim.byz}
        self.behaviour.update(dict(sim.sc.chain_byzantine))
        # (an injected bug, for the chain oracles' negative control: the signers a link frame
        # names are taken without checking their signatures)
        self.unchecked = sim.sc.chain_bug == "unchecked-signatures"
        self.agreed: list[Membership] = []  # the i-th link's membership, as first completed anywhere
        self.recorded: set[Membership] = set()  # memberships correct replicas' stable checkpoints recorded
        self.switched: set[tuple[int, int]] = set()  # (opens_at, n) correct replicas switched to
        self.bogus_signed: set[Membership] = set()
        self.completed = 0
        self.rejoins: list[tuple[int, float, str]] = []  # (replica, when, why)
        self.wanted: dict[int, int] = {}  # replica -> the checkpoint of its ChainWanted

    # ---- the core's events ----------------------------------------------------------------
    def follow(self, rep: "Replica") -> None:
        if rep.id not in self.sim.byz:
            rep.chain.follows = True

    def on_event(self, r: int, ev) -> None:
        kind = ev.kind
        if kind == "execute" and r in self.sim.byz:
            # (a Byzantine replica signs what it likes when it likes: as soon as it executed a change)
            rec = self.sim.replicas[r].rs.config
            m = rec.latest.next_members if rec is not None else None
            if m is not None and m.opens_at > self.nodes[r].head.opens_at:
                self._byzantine(r, m)
        elif kind in ("stable", "state-transfer", "membership"):
            if kind == "membership" and not ev.retired and r not in self.sim.byz:
                self.switched.add((ev.members_from, ev.n))
            self.on_state(r, ev.seqno)
        elif kind == "chain-wanted" and r not in self.sim.byz:
            self.wanted[r] = ev.seqno
            from .simulator import CHAIN

            self.sim._push(self.sim.now, CHAIN, r, "answer")

    def _recorded(self, r: int, n: Optional[int] = None) -> Optional[Membership]:
        rep = self.sim.replicas[r]
        cs = config_at(rep, rep.low_water_mark if n is None else n)
        return (cs.next_members or cs.members) if cs is not None else None

    def on_state(self, r: int, n: Optional[int] = None) -> None:
        node = self.nodes[r]
        m = self._recorded(r, n)
        if m is None or m.opens_at <= node.head.opens_at:
            return
        if r not in self.sim.byz:
            self.recorded.add(m)
            self._sign(r, m)
            return
        self._byzantine(r, m)

    # ---- voting -------------------------------------------------------------------------------
    def _sign(self, r: int, m: Membership, to: Optional[list[int]] = None) -> Optional[SimLink]:
        node = self.nodes[r]
        if r >= node.head.n or (node.own is not None and node.own.members == m):
            return None  # (not a member of the membership that certifies it, or signed already)
        prev = membership_digest(node.head)
        self.signed.add((r, statement(prev, m)))
        vote = SimLink(prev, m, (r,))
        node.own, node.resends = vote, 0
        if r not in self.sim.byz:
            self._merge(r, vote)
        if node.own is not None:
            self._send_all(r, vote, to)
            self._arm(r)
        return vote

    def _byzantine(self, r: int, m: Membership) -> None:
        node, how = self.nodes[r], self.behaviour[r]
        if how == "withhold" or r >= node.head.n or (node.own is not None and node.own.members in (m, bogus(m))):
            return
        if how == "honest":
            self._sign(r, m)
            return
        b = bogus(m)
        self.bogus_signed.add(b)
        peers = [j for j in range(len(self.sim.replicas)) if j != r]
        if how == "equivocate":
            half = peers[: len(peers) // 2]
            self._sign(r, b, half)
            node.own = None
            self._sign(r, m, peers[len(peers) // 2:])
            node.own = SimLink(membership_digest(node.head), b, (r,))  # (what it resends: the bogus one)
            return
        vote = self._sign(r, b)
        if how == "forge" and vote is not None:
            forged = SimLink(vote.prev, b, tuple(range(node.head.n)))  # (signatures it cannot make)
            self._send_all(r, forged)

    def _arm(self, r: int) -> None:
        node = self.nodes[r]
        if not node.timer:
            from .simulator import CHAIN

            node.timer = True
            self.sim._push(self.sim.now + RESEND_MS, CHAIN, r, "resend")

    def on_timer(self, r: int, what: str) -> None:
        if what == "answer":
            self.answer(r)
            return
        node = self.nodes[r]
        node.timer = False
        if r in self.sim.crashed or node.own is None or node.resends >= RESENDS_MAX:
            return
        node.resends += 1
        self._send_all(r, node.own)
        self._arm(r)

    # ---- gathering -------------------------------------------------------------------------------
    def on_frame(self, r: int, raw: bytes, src: int) -> None:
        if r in self.sim.byz:
            return
        node = self.nodes[r]
        link = decode(raw)
        why = "chain-link-malformed" if link is None else self._merge(r, link, src)
        if why:
            node.drops[why] = node.drops.get(why, 0) + 1

    def _merge(self, r: int, link: SimLink, src: int = -1) -> str:
        node = self.nodes[r]
        m, head = link.members, node.head
        if m.opens_at <= head.opens_at:
            held = [lk for lk in node.links if lk.members == m]
            if held and len(link.signers) == 1 and 0 <= src < len(self.sim.replicas) and src != r:
                self.sim._send(r, src, encode(held[0]))  # (a voter that lacks the link: hand it over)
            return "chain-link-stale" if held else "chain-link-old"
        if link.prev != membership_digest(head):
            return "chain-link-unknown-prev"
        if len(link.signers) > head.n:
            return "chain-link-malformed"
        key = statement(link.prev, m)
        entry = node.votes.get(key)
        sigs = entry[1] if entry is not None else set()
        why = ""
        for s in link.signers:
            if s in sigs:
                continue
            if node.voted.get(s, key) != key:
                why = "chain-signer-equivocates"
                continue
            if not 0 <= s < head.n:
                why = "chain-signer-not-a-member"
                break
            if (s, key) not in self.signed and not self.unchecked:
                why = "chain-signature-bad"
                break
            sigs.add(s)
            node.voted[s] = key
        if not sigs:
            return why or "chain-link-unsigned"
        node.votes[key] = (SimLink(link.prev, m, ()), sigs)
        q = membership.cluster_config(self.sim.genesis_cfg, head)
        if q.weight_of(sigs) >= q.quorum_weight:
            self._complete(r, SimLink(link.prev, m, tuple(sorted(sigs))))
        return why

    def _complete(self, r: int, link: SimLink) -> None:
        node = self.nodes[r]
        self._check_link(r, node, link)
        node.links.append(link)
        node.head = link.members
        node.votes.clear()
        node.voted.clear()
        node.own = None
        self.completed += 1
        self._send_all(r, link)
        self.on_state(r)  # (a membership we hold that is newer still)

    def _check_link(self, r: int, node: NodeChain, link: SimLink) -> None:
        """The chain oracles at a link's completion (C1, C2, C3)."""
        ora = self.sim.oracles
        i, m = len(node.links), link.members
        key = statement(link.prev, m)
        genuine = [s for s in link.signers if (s, key) in self.signed and s < node.head.n]
        q = membership.cluster_config(self.sim.genesis_cfg, node.head)
        if q.weight_of(genuine) < q.quorum_weight:
            ora.violation(f"C3 node {r} completed link {i + 1} with genuine signatures of weight "
                          f"{q.weight_of(genuine)} < {q.quorum_weight}")
        if i < len(self.agreed) and self.agreed[i] != m:
            ora.violation(f"C1 node {r}'s chain link {i + 1} differs from another node's")
        elif i == len(self.agreed):
            self.agreed.append(m)
        if m in self.bogus_signed or m not in self.recorded:
            ora.violation(f"C2 node {r} completed a link to a membership no correct replica recorded "
                          f"(n={m.n}, f={m.f}, after {m.opens_at})")

    def final_checks(self, converged: bool) -> list[str]:
        out = []
        for r, node in self.nodes.items():
            if r in self.sim.byz:
                continue
            for i, lk in enumerate(node.links):
                if i >= len(self.agreed) or self.agreed[i] != lk.members:
                    out.append(f"C1 node {r}'s chain link {i + 1} differs from another node's")
                elif converged and (lk.members.opens_at, lk.members.n) not in self.switched:
                    out.append(f"C2 node {r}'s link {i + 1} (n={lk.members.n} after {lk.members.opens_at}): "
                               f"no correct replica switched to it")
        return out[:5]

    # ---- sending ------------------------------------------------------------------------------
    def _send_all(self, r: int, link: SimLink, to: Optional[list[int]] = None) -> None:
        raw = encode(link)
        for j in (range(len(self.sim.replicas)) if to is None else to):
            if j != r:
                self.sim._send(r, j, raw)

    def exchange(self, r: int, peers: Optional[list[int]] = None) -> None:
        """Node r's (re)connection to ``peers`` (default: every replica): each side sends the
        other its last links and its pending vote."""
        sim = self.sim
        for j in (range(len(sim.replicas)) if peers is None else peers):
            if j == r or j in sim.crashed:
                continue
            for a, b in ((r, j), (j, r)):
                if a in sim.byz:
                    continue
                na = self.nodes[a]
                for lk in na.links[-LINKS_ON_CONNECT:] + ([na.own] if na.own is not None else []):
                    sim._send(a, b, encode(lk))

    def healed(self) -> None:
        """The end of a partition: connections cut by it are made again."""
        for r in range(len(self.sim.replicas)):
            if r not in self.sim.byz and r not in self.sim.crashed:
                self.exchange(r, list(range(r + 1, len(self.sim.replicas))))

    # ---- starts ------------------------------------------------------------------------------
    def started(self, r: int, lost: bool = False) -> Membership:
        """Node r's process starts (a restart, a reboot, a fresh machine with ``lost``): the
        pending votes are gone, the links kept unless ``lost``; the longest chain of the replicas
        it reaches is taken if it verifies; returns the chain's last membership."""
        sim = self.sim
        node = self.nodes[r]
        node.votes.clear()
        node.voted.clear()
        node.own, node.resends = None, 0
        if lost:
            node.links, node.head = [], self.genesis
        best = node.links
        for j in range(len(sim.replicas)):
            if j == r or j in sim.byz or j in sim.crashed or not self._reachable(r, j):
                continue
            if len(self.nodes[j].links) > len(best):
                best = self.nodes[j].links
        if best is not node.links and self._verifies(best):
            node.links = list(best)
            node.head = best[-1].members
        self.exchange(r)
        return node.head

    def _reachable(self, a: int, b: int) -> bool:
        sim = self.sim
        return sim.healed or ((a, b) not in sim.blocked and (b, a) not in sim.blocked)

    def _verifies(self, links: list[SimLink]) -> bool:
        head = self.genesis
        for lk in links:
            q = membership.cluster_config(self.sim.genesis_cfg, head)
            key = statement(lk.prev, lk.members)
            ok = [s for s in lk.signers if s < head.n and (s, key) in self.signed]
            if lk.prev != membership_digest(head) or lk.members.opens_at <= head.opens_at \
                    or len(ok) != len(lk.signers) or q.weight_of(ok) < q.quorum_weight:
                return False
            head = lk.members
        return True

    # ---- the driver's answers -------------------------------------------------------------------
    def newer(self, rep: "Replica") -> Optional[Membership]:
        """The chain's last membership, if r should take it (``membership.chain_newer``)."""
        return membership.chain_newer(rep, self.nodes[rep.id].head)

    def at_start(self, rep: "Replica") -> bool:
        """After a reboot's restore: rejoin if the restored view is in the chain's last
        membership's epoch or the store was unusable (whether the chain's membership is in force
        for certain); returns whether it did."""
        m = self.newer(rep)
        if m is None or not (rep.needs_state or rep.view >= membership.base_view(m.epoch, m.n)):
            return False
        self._rejoin(rep, m, "start")
        return True

    def answer(self, r: int) -> None:
        """A ChainWanted of replica r (``ChainView``): the chain's last membership; r rejoins it
        if the checkpoint wanted is after its switch point."""
        sim = self.sim
        if r in sim.crashed:
            return
        rep = sim.replicas[r]
        n = self.wanted.pop(r, 0)
        m = membership.rejoin_wanted(rep, self.nodes[r].head, n)
        if m is not None:
            self._rejoin(rep, m, f"chain-wanted {n}")
        membership.learn_chain(rep, self.nodes[r].head)
        sim._flush(r)
        if r in sim.oracles.correct:
            sim.oracles.after_step(rep)
        sim._invariants(rep)
        sim._schedule_wake(r)

    def _rejoin(self, rep: "Replica", m: Membership, why: str) -> None:
        membership.rejoin(rep, m)
        self.rejoins.append((rep.id, self.sim.now, why))
        self.sim.oracles.view[rep.id] = max(self.sim.oracles.view[rep.id], rep.view)
        self.sim._note(f"replica {rep.id} rejoins as a member of the {m.n} replicas after {m.opens_at} ({why})")
