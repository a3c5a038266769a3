"""Transcript tests of the core: commands in, events out, over the hand driver ``tests/helpers/cluster.py``.

A transcript file (``tests/core/transcripts/*.txt``) is a sequence of blocks, each a command, a line
``----`` and the output the command must produce, ended by a blank line; lines starting with
``#`` between blocks are comments (the format of etcd raft's interaction tests)::

    # a client writes one key
    request c=0 put k1 v1
    ----
    c4 -> r0: Request c=4 t=1

``run_transcript`` replays the commands and returns the file as it would be with the actual
outputs; the runner test compares, and regenerates the files with ``--rewrite``.

Commands (replicas are ``r0 ..``, clients ``c0 ..`` by index, printed by their ids):

* ``cluster n=4 clients=2 durable=false KEY=VALUE...``: a new cluster (``ClusterConfig`` fields);
* ``request c=I put|get|delete KEY [VALUE] [ro]``: client ``I`` invokes a key-value operation
  (``ro``: read-only); nothing is delivered;
* ``deliver-msgs [from=r0] [to=r1,r2] [type=Prepare,Commit] [drop]``: delivers (with ``drop``:
  loses) every message now in flight that matches; what the deliveries send stays in flight;
* ``stabilize``: delivers until nothing is in flight (time does not move);
* ``tick ms=N``: moves time by N ms and fires the timers due, delivering nothing;
* ``advance ms=N``: moves time by N ms in 5 ms steps, delivering everything after each step;
* ``crash r1``: the replica stops (its in-flight messages are lost; nothing reaches it);
  ``restart r1``: it starts again from its store (``durable=`` must be set);
* ``isolate r0`` / ``heal``: cut every link of a replica / restore every link;
* ``msgs``: the messages in flight; ``status``: every replica's view, low water mark and last
  executed sequence number.

``Replica.invariants()`` runs after every step of a replica (a delivery, a timer).

Every output line comes from ``format_event`` (replica events, client results) or
``format_message`` (messages): when the events' representation changes, only ``format_event``
changes, and ``--rewrite`` regenerates the files (the diff must then be formatting only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pbft.messages import Batch

SEPARATOR = "----"


# ---------------------------------------------------------------------------
# formatting: the only place that knows how events and messages look
# ---------------------------------------------------------------------------

def format_value(x: Any) -> str:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x[:4]).hex() if x else "-"
    if isinstance(x, Batch):
        return f"{len(x.requests)}req"
    if isinstance(x, bool) or x is None:
        return str(x).lower()
    if isinstance(x, (tuple, list)):
        return "(" + " ".join(format_value(v) for v in x) + ")"
    if isinstance(x, float):
        return f"{x:g}"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return "{" + format_event(x) + "}"
    return str(x)


def format_event(ev: Any) -> str:
    """One line for one event: a trace tuple ``(kind, *values)`` or a typed event (a
    dataclass with a ``kind``)."""
    if isinstance(ev, tuple):
        kind, values = ev[0], ev[1:]
        return " ".join([str(kind), *(format_value(v) for v in values)])
    kind = getattr(ev, "kind", "") or type(ev).__name__
    fields = [f"{f.name}={format_value(getattr(ev, f.name))}" for f in dataclasses.fields(ev)]
    return " ".join([kind, *fields])


MESSAGE_FIELDS = (("view", "v"), ("seqno", "n"), ("stable_seqno", "h"), ("client", "c"), ("timestamp", "t"),
                  ("checkpoint_seqno", "cp"))


def format_message(msg: Any, sender: int) -> str:
    """The message's type and its view, sequence number, client and timestamp (those it has);
    ``by rX`` when its author is not the replica that sent it (a relayed message)."""
    parts = [type(msg).__name__]
    for name, short in MESSAGE_FIELDS:
        if hasattr(msg, name):
            parts.append(f"{short}={format_value(getattr(msg, name))}")
    author = getattr(msg, "replica", sender)
    if type(author) is int and author != sender and not hasattr(msg, "client"):
        parts.append(f"by r{author}")
    return " ".join(parts)


# ---------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------

class TranscriptError(Exception):
    pass


def _parse_args(words: list[str]) -> tuple[list[str], dict[str, str]]:
    pos, kw = [], {}
    for w in words:
        if "=" in w:
            k, _, v = w.partition("=")
            kw[k] = v
        else:
            pos.append(w)
    return pos, kw


def _number(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return float(v)


class Driver:
    def __init__(self):
        self.c = None
        self.seen = 0  # events of ``self.c.events`` already printed
        self.cut: set[int] = set()

    # -- naming -------------------------------------------------------------------
    def name(self, pid: int) -> str:
        return f"r{pid}" if pid < self.c.cfg.n else f"c{pid}"

    def replica(self, word: str) -> int:
        if not (word.startswith("r") and word[1:].isdigit() and int(word[1:]) < self.c.cfg.n):
            raise TranscriptError(f"not a replica: {word!r}")
        return int(word[1:])

    def pids(self, spec: str) -> set[int]:
        out = set()
        for w in spec.split(","):
            if w.startswith("c") and w[1:].isdigit():
                out.add(self.c.clients[int(w[1:])].id)
            else:
                out.add(self.replica(w))
        return out

    # -- output ---------------------------------------------------------------------
    def new_events(self) -> list[str]:
        out = []
        events = self.c.events
        for pid, ev in events[self.seen:]:
            out.append(f"{self.name(pid)}: {format_event(ev)}")
        self.seen = len(events)
        for cl in self.c.clients:
            for o in cl.take_outcomes():
                out.append(f"{self.name(cl.id)}: {format_result(o)}")
        return out

    def describe(self, raw: bytes, sender: int = -1) -> str:
        try:
            return format_message(self.c.codec.parse(self.c.codec.open_frame(raw)), sender)
        except Exception as e:  # noqa: BLE001 - a transcript may show garbage too
            return f"undecodable ({type(e).__name__})"

    def message_lines(self, msgs) -> list[str]:
        """One line per message sent once to several destinations."""
        out: list[tuple[int, bytes, list[int]]] = []
        for src, dst, raw in msgs:
            if out and out[-1][0] == src and out[-1][1] == raw:
                out[-1][2].append(dst)
            else:
                out.append((src, raw, [dst]))
        return [f"{self.name(s)} -> {' '.join(self.name(d) for d in ds)}: {self.describe(raw, s)}"
                for s, raw, ds in out]

    # -- network ----------------------------------------------------------------------
    def lost(self, src: int, dst: int) -> bool:
        c = self.c
        return src in c.down or dst in c.down or (src in self.cut) != (dst in self.cut)

    def deliver_one(self, src: int, dst: int, raw: bytes) -> bool:
        c = self.c
        if self.lost(src, dst):
            return False
        c.delivered += 1
        c.node(dst).receive(raw, c.now)
        self.checked(dst)
        c.collect()
        return True

    def checked(self, pid: int) -> None:
        """After every step of a replica: its invariants (an AssertionError fails the test)."""
        if pid < self.c.cfg.n:
            self.c.replicas[pid].invariants()

    # -- commands -----------------------------------------------------------------------
    def do(self, line: str) -> list[str]:
        words = line.split()
        cmd, (pos, kw) = words[0], _parse_args(words[1:])
        if cmd != "cluster" and self.c is None:
            raise TranscriptError("the first command must be 'cluster'")
        handler = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if handler is None:
            raise TranscriptError(f"unknown command {cmd!r}")
        out = handler(pos, kw)
        return out if out else ["ok"]

    def cmd_cluster(self, pos, kw):
        from helpers.cluster import Cluster
        args = {k: _number(v) for k, v in kw.items()}
        durable = args.pop("durable", None)
        self.c = Cluster(args.pop("n", 4), args.pop("clients", 2), durable=durable, **args)
        self.seen = 0
        self.cut = set()
        self.c.collect()
        return self.new_events()

    def cmd_request(self, pos, kw):
        from pbft.services.kv import encode_op
        cl = self.c.clients[int(kw["c"])]
        ro = "ro" in pos
        pos = [p for p in pos if p != "ro"]
        kind, args = pos[0], [p.encode() for p in pos[1:]]
        before = len(self.c.net)
        cl.invoke(encode_op(kind, *args), ro, self.c.now)
        self.c.collect()
        return self.message_lines(list(self.c.net)[before:]) + self.new_events()

    def cmd_deliver_msgs(self, pos, kw):
        c = self.c
        src = self.pids(kw["from"]) if "from" in kw else None
        dst = self.pids(kw["to"]) if "to" in kw else None
        types = set(kw["type"].split(",")) if "type" in kw else None
        drop = "drop" in pos
        now = list(c.net)
        c.net.clear()
        chosen, keep = [], []
        for m in now:
            s, d, raw = m
            ok = ((src is None or s in src) and (dst is None or d in dst)
                  and (types is None or self.describe(raw).split()[0] in types))
            (chosen if ok else keep).append(m)
        c.net.extend(keep)
        out = [("drop " if drop else "") + line for line in self.message_lines(chosen)]
        if not drop:
            for s, d, raw in chosen:
                self.deliver_one(s, d, raw)
        return out + self.new_events()

    def drain(self) -> int:
        """Delivers until nothing is in flight; returns how many messages arrived."""
        c = self.c
        c.collect()
        steps = delivered = 0
        while c.net:
            s, d, raw = c.net.popleft()
            delivered += self.deliver_one(s, d, raw)
            steps += 1
            if steps > 100_000:
                raise TranscriptError("message storm: the network never drained")
        return delivered

    def cmd_stabilize(self, pos, kw):
        delivered = self.drain()
        return self.new_events() + [f"delivered {delivered}"]

    def cmd_tick(self, pos, kw):
        c = self.c
        c.now += float(kw["ms"])
        before = len(c.net)
        for _ in range(8):  # timers that set new deadlines already due fire again
            fired = False
            for pid in list(range(c.cfg.n)) + [cl.id for cl in c.clients]:
                node = c.node(pid)
                d = node.next_deadline()
                if pid not in c.down and d is not None and d <= c.now:
                    node.tick(c.now)
                    self.checked(pid)
                    fired = True
            c.collect()
            if not fired:
                break
        return self.message_lines(list(c.net)[before:]) + self.new_events()

    def cmd_advance(self, pos, kw):
        c = self.c
        end = c.now + float(kw["ms"])
        while c.now < end:
            c.now = min(end, c.now + 5.0)
            for pid in list(range(c.cfg.n)) + [cl.id for cl in c.clients]:
                node = c.node(pid)
                d = node.next_deadline()
                if pid not in c.down and d is not None and d <= c.now:
                    node.tick(c.now)
                    self.checked(pid)
            c.collect()
            self.drain()
        return self.new_events()

    def cmd_crash(self, pos, kw):
        i = self.replica(pos[0])
        self.c.down.add(i)
        self.c.net = type(self.c.net)(m for m in self.c.net if i not in (m[0], m[1]))
        return []

    def cmd_restart(self, pos, kw):
        i = self.replica(pos[0])
        if self.c.stores is None:
            raise TranscriptError("restart needs a cluster with durable=true or durable=false")
        outcome = self.c.restart(i)
        self.c.down.discard(i)
        self.c.collect()
        return self.new_events() or [f"{pos[0]}: {outcome}"]

    def cmd_isolate(self, pos, kw):
        self.cut.add(self.replica(pos[0]))
        return []

    def cmd_heal(self, pos, kw):
        self.cut.clear()
        return []

    def cmd_msgs(self, pos, kw):
        return self.message_lines(list(self.c.net)) or ["none in flight"]

    def cmd_status(self, pos, kw):
        return [f"{self.name(r.id)}: {format_status(r)}" for r in self.c.replicas]


def format_result(o) -> str:
    from pbft.services.kv import decode_result
    try:
        status, value = decode_result(o.result)
        printable = isinstance(value, bytes) and value.isascii() and value.decode().isprintable()
        res = f"{status} {value.decode() if printable else format_value(value)}"
    except ValueError:
        res = f"undecodable {format_value(o.result)}"
    return f"result t={o.timestamp} {res}" + (" (read-only fell back)" if o.read_only_fallback else "")


def format_status(r) -> str:
    return f"view={r.view}{'' if r.view_active else ' (changing)'} h={r.low_water_mark} executed={r.last_exec}"


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

def parse(text: str) -> list[tuple[list[str], str, list[str]]]:
    """Blocks of ``(comment lines before, command, expected output lines)``."""
    blocks = []
    lines = text.splitlines()
    i, comments = 0, []
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            if comments and comments[-1] != "":
                comments.append("")
            i += 1
            continue
        if line.startswith("#"):
            comments.append(line)
            i += 1
            continue
        cmd = line
        i += 1
        if i >= len(lines) or lines[i] != SEPARATOR:
            raise TranscriptError(f"line {i}: expected {SEPARATOR!r} after the command {cmd!r}")
        i += 1
        out = []
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        while comments and comments[-1] == "":
            comments.pop()
        blocks.append((comments, cmd, out))
        comments = []
    return blocks


def run_transcript(path: Path) -> tuple[str, str]:
    """Replays the file's commands; returns ``(expected, actual)`` texts of the whole file."""
    text = path.read_text()
    driver = Driver()
    parts = []
    for comments, cmd, _ in parse(text):
        try:
            out = driver.do(cmd)
        except TranscriptError as e:
            out = [f"error: {e}"]
        block = "\n".join(comments + [cmd, SEPARATOR, *out])
        parts.append(block)
    return text, "\n\n".join(parts) + "\n"
