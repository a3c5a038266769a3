"""Shared CPUs for the simulator's cost model (``CostModel.cores``).

By default each simulated replica has a CPU of its own and the clients cost nothing. With
``cores`` set, the replicas' processes and one client process (every correct client, as ``pbft
bench`` runs them in one process) share that many CPUs, as on a machine where n replicas and the
workload run on fewer cores than processes:

* a process with work and no CPU waits in one run queue (first come, first served); the time it
  waits is counted (``wait_ms``, what ``/proc/<pid>/schedstat`` reports live);
* a process that was idle (blocked in its event loop's poll) pays ``wake_us`` before its first
  frame: the poll's return, the context switch, the read; frames that arrive while it runs are
  taken in the same turn, with no wake-up;
* a process holds its CPU until it has nothing left to do, or until it has run ``slice_us`` while
  another waits (the scheduler's time slice): it then goes to the back of the queue;
* what a process sends during its turn leaves at the turn's end, one write per connection
  (``frame_send_us`` each, however many frames it carries), as the runtime flushes once per
  event-loop turn: under load a turn carries many frames, at one client one or two;
* the client process pays ``client_frame_us`` per reply it receives and ``client_request_us`` per
  request it sends, plus the MACs it computes or checks, and its turn's writes.

Timers (retransmissions, the replicas' status messages) are not charged, as in the per-replica
model.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .simulator import CostModel, Simulation

CLIENT_PROC = -2  # the process id of the client process


class SharedCpus:
    def __init__(self, sim: "Simulation", cost: "CostModel"):
        assert cost.cores is not None and cost.cores >= 1
        self.sim = sim
        self.cost = cost
        self.free = cost.cores  # cores no process holds
        self.runq: deque[int] = deque()  # processes waiting for a core
        self.queued_at: dict[int, float] = {}
        self.holding: set[int] = set()  # processes on a core
        self.turn_start: dict[int, float] = {}
        self.idle_woken: set[int] = set()  # processes woken from idle, to pay a wake-up
        self.client_q: deque[tuple] = deque()  # the client process's work: ("frame", c, raw), ("invoke", c)
        self.used_ms: dict[int, float] = {}  # CPU charged, per process
        self.wait_ms: dict[int, float] = {}  # time spent waiting for a core, per process
        self.wakeups: dict[int, int] = {}
        self.held: dict[int, list] = {}  # process -> the frames its turn sends: (src, dst, raw, extra delay)

    # ---- the run queue ------------------------------------------------------------
    def want(self, p: int) -> None:
        """Process ``p`` has work: it takes a free core, or queues for one (if it holds or awaits
        one already, the work is taken in its current turn)."""
        if p in self.holding or p in self.queued_at:
            return
        self.idle_woken.add(p)
        if self.free > 0:
            self.free -= 1
            self._grant(p)
        else:
            self.queued_at[p] = self.sim.now
            self.runq.append(p)

    def _grant(self, p: int) -> None:
        from .simulator import CPU

        sim = self.sim
        self.holding.add(p)
        self.turn_start[p] = sim.now
        start = sim.now
        if p in self.idle_woken:
            self.idle_woken.discard(p)
            w = self.cost.wake_us / 1000.0
            self.used_ms[p] = self.used_ms.get(p, 0.0) + w
            self.wakeups[p] = self.wakeups.get(p, 0) + 1
            start += w
        sim._push(start, CPU, p)

    def _release(self, p: int) -> None:
        self.holding.discard(p)
        self.turn_start.pop(p, None)
        if self.runq:
            q = self.runq.popleft()
            self.wait_ms[q] = self.wait_ms.get(q, 0.0) + self.sim.now - self.queued_at.pop(q)
            self._grant(q)
        else:
            self.free += 1

    def has_work(self, p: int) -> bool:
        sim = self.sim
        if p == CLIENT_PROC:
            return bool(self.client_q)
        if p in sim.crashed:
            sim.inbox[p].clear()
            sim.deficit[p].clear()
            sim.rr[p].clear()
            return False
        return bool(sim.rr[p])

    def step(self, p: int) -> None:
        """A CPU event of process ``p`` (which holds a core): its next piece of work, or it gives
        the core up (nothing left, or its slice is over and another process waits)."""
        from .simulator import CPU

        sim = self.sim
        work = self.has_work(p)
        over = work and bool(self.runq) and (sim.now - self.turn_start[p]) * 1000.0 >= self.cost.slice_us
        if not work or over:
            held = self.held.pop(p, None)
            if held:  # the turn ends with its writes
                cost_ms = self._write(held)
                self.used_ms[p] = self.used_ms.get(p, 0.0) + cost_ms
                sim._push(sim.now + cost_ms, CPU, p)
                return
            self._release(p)  # (hands the core to the head of the queue)
            if over:
                self.queued_at[p] = sim.now
                self.runq.append(p)
            return
        cost_ms = self._client_step() if p == CLIENT_PROC else sim._replica_step(p)
        self.used_ms[p] = self.used_ms.get(p, 0.0) + cost_ms
        sim._push(sim.now + cost_ms, CPU, p)

    # ---- a turn's writes -------------------------------------------------------------
    def hold(self, src: int) -> "list | None":
        """Where the frames ``src`` sends now wait for the end of its process's turn (None: the
        sender is not on a core, e.g. a client's retransmission timer: they leave now)."""
        p = src if src < self.sim.slots else CLIENT_PROC if src in self.sim.clients else None
        if p is None or p not in self.holding:
            return None
        return self.held.setdefault(p, [])

    def _write(self, held: list) -> float:
        """A turn's frames leave: one write per connection, each ``frame_send_us`` (the client
        process's clients share one connection with each replica); they leave when the writes are
        done. The CPU time, in ms."""
        C = self.cost
        sim = self.sim
        clients = sim.clients
        conns = {CLIENT_PROC if d in clients else d for _, d, _, _ in held}
        us = C.frame_send_us * len(conns)
        for src, dst, raw, _ in held:
            us += (C.send_byte_us + (C.reply_byte_us if src < sim.slots and dst in clients else 0.0)) * len(raw)
        cost_ms = us / 1000.0
        for src, dst, raw, extra in held:
            self.sim._send(src, dst, raw, cost_ms + extra)
        return cost_ms

    # ---- the client process ---------------------------------------------------------
    def client_frame(self, c: int, raw: bytes) -> None:
        self.client_q.append(("frame", c, raw))
        self.want(CLIENT_PROC)

    def client_invoke(self, c: int) -> None:
        self.client_q.append(("invoke", c))
        self.want(CLIENT_PROC)

    def _client_step(self) -> float:
        sim = self.sim
        C = self.cost
        item = self.client_q.popleft()
        c = item[1]
        keys = sim.rings[c]
        macs0 = keys.mac_ops
        if item[0] == "frame":
            sim.clients[c].receive(item[2], sim.now)
            sim._client_outcomes(c)
            us = C.client_frame_us + C.client_byte_us * len(item[2])
        else:
            sim._invoke(c, flush=False)
            us = C.client_request_us
        us += C.mac_us * (keys.mac_ops - macs0)
        sim._flush(c)
        sim._schedule_wake(c)
        return us / 1000.0
