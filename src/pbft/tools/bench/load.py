"""``pbft bench``'s closed-loop load: ``Load`` (clients over one ``ClientPool``, in the bench
process and in each load worker), ``Worker`` (the bench's handle on a load-worker process: JSON
lines on its stdout, read by ``procs.JsonLines``; the start time on its stdin) and
``load_worker_main`` (the worker's side)."""

from __future__ import annotations

import array
import asyncio
import base64
import json
import queue
import sys
import time
from typing import TYPE_CHECKING, Optional

from ...config import ConfigError
from ...runtime import gctune
from ..procs import JsonLines, Procs

if TYPE_CHECKING:
    from ...runtime.client import ClientPool

INVOKE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0


class Load:
    """Closed-loop clients over one ClientPool."""

    def __init__(self, cluster, client_ids, op: bytes, read_only: bool, warmup: float, duration: float):
        self.cluster = cluster
        self.client_ids = list(client_ids)
        self.op = op
        self.read_only = read_only
        self.warmup = warmup
        self.duration = duration
        self.pool: Optional[ClientPool] = None
        self.lat = array.array("d")
        self.errors = 0
        self.done_total = 0  # operations completed so far, warm-up included (progress)

    async def connect(self) -> None:
        from ...runtime.client import ClientPool

        idents = [self.cluster.identity(c) for c in self.client_ids]
        self.pool = pool = ClientPool(self.cluster, idents)
        await pool.start(wait_s=READY_TIMEOUT_S)
        deadline = time.monotonic() + 5.0
        while len(pool.connected()) < self.cluster.n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.cluster.cfg.weight_of(pool.connected()) < self.cluster.cfg.quorum_weight:
            raise ConfigError(f"clients could not connect to a quorum of replicas (connected to "
                              f"{pool.connected()})")

    async def run(self, t_start: float) -> None:
        """Run from monotonic time ``t_start``: warm-up, then the measured window."""
        from ...runtime.client import PbftError

        t_measure = t_start + self.warmup
        t_end = t_measure + self.duration
        pool, op, ro = self.pool, self.op, self.read_only
        assert pool is not None  # connect() came first
        lat = self.lat
        clock = time.monotonic

        async def client(cid: int) -> None:
            while True:
                t0 = clock()
                if t0 >= t_end or pool.closed:
                    return
                try:
                    await pool.invoke(cid, op, ro, INVOKE_TIMEOUT_S)
                except PbftError:
                    if t_measure <= clock() < t_end and not pool.closed:
                        self.errors += 1
                    continue
                t1 = clock()
                self.done_total += 1
                if t_measure <= t1 < t_end:
                    lat.append(t1 - t0)

        delay = t_start - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks = [asyncio.ensure_future(client(c)) for c in self.client_ids]
        try:
            await asyncio.sleep(max(0.0, t_end - clock()))
            # operations still outstanding at the end are not counted; give them a moment to finish
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        finally:
            for t in tasks:
                t.cancel()
            await pool.close()


class Worker:
    """A load-worker subprocess driving some of the client identities."""

    def __init__(self, procs: Procs, cluster, client_ids, name: str, op: bytes, read_only: bool, warmup: float,
                 duration: float):
        spec = {"dir": str(cluster.dir), "clients": list(client_ids), "op": base64.b64encode(op).decode(),
                "read_only": read_only, "warmup": warmup, "duration": duration}
        self.name = name
        self.procs = procs
        self.proc = procs.start(name, ["-m", "pbft.tools.bench", "load-worker", json.dumps(spec)], pipes=True)
        self.done_total = 0
        self.lines = JsonLines(self.proc, self._on_progress)

    def _on_progress(self, msg: dict) -> None:
        self.done_total = msg["progress"]

    async def _next(self, timeout: float) -> dict:
        try:
            msg = await asyncio.get_running_loop().run_in_executor(None, self.lines.next, timeout)
        except queue.Empty:
            raise ConfigError(f"{self.name} did not answer within {timeout:g}s (log in {self.procs.logdir})") \
                from None
        if msg is None:
            self.proc.wait(2.0)
            raise ConfigError(f"{self.name} exited with status {self.proc.returncode}"
                              f"{self.procs.tail(self.proc)}")
        if "error" in msg:
            raise ConfigError(f"{self.name}: {msg['error']}")
        return msg

    async def wait_ready(self) -> None:
        await self._next(READY_TIMEOUT_S)

    def go(self, t_start: float) -> None:
        stdin = self.proc.stdin
        assert stdin is not None  # started with pipes
        stdin.write(f"{t_start!r}\n".encode())
        stdin.flush()

    async def result(self) -> tuple[array.array, int]:
        msg = await self._next(10.0)
        lat = array.array("d")
        lat.frombytes(base64.b64decode(msg["lat"]))
        return lat, msg["errors"]

    def close(self) -> None:
        self.procs.stop([self.proc])


def load_worker_main(spec_json: str) -> int:
    """``python -m pbft.tools.bench load-worker SPEC``: connect, say ready, wait for the start time on stdin,
    run, report progress and then the latencies on stdout (JSON lines)."""
    from ...runtime.cluster import load_cluster

    spec = json.loads(spec_json)
    out = sys.stdout

    def say(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    async def main():
        load = Load(load_cluster(spec["dir"]), spec["clients"], base64.b64decode(spec["op"]), spec["read_only"],
                    spec["warmup"], spec["duration"])
        try:
            await load.connect()
        except ConfigError as e:
            say({"error": str(e)})
            return
        say({"ready": True})
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        run = asyncio.ensure_future(load.run(float(line)))
        while not run.done():
            await asyncio.wait([run], timeout=0.25)
            say({"progress": load.done_total})
        run.result()
        say({"lat": base64.b64encode(load.lat.tobytes()).decode(), "errors": load.errors})

    gctune.tune()
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    return 0
