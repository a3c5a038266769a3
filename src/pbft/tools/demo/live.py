"""``pbft demo``: a real 4-replica cluster on loopback, a workload, a primary killed.

What it does, narrated as it happens:

1. writes a cluster directory (keys, ``cluster.toml``) in a temporary folder and
   starts four replica processes on 127.0.0.1;
2. runs a key-value workload from 8 closed-loop clients, with a live progress line
   (operations, throughput, each replica's view and progress);
3. kills the primary with SIGKILL: the backups' request timers expire, they
   change view (no signatures), the new primary takes over and the workload
   continues;
4. restarts the old primary, which reloads its state from its data directory
   and fetches from the others only what it missed (state transfer);
5. makes another replica recover proactively: it reboots, sends new keys,
   has every object of its state checked against the others' partition tree,
   while the workload goes on;
6. reads back every key the clients wrote and checks it holds the last value
   acknowledged, then prints a summary;
7. where FUSE can be mounted (root, /dev/fuse, pyfuse3), starts a second cluster running
   the BFS file system, mounts it with ``pbft mount``, copies a source tree in, checks it,
   and kills that cluster's primary while a process writes files
   (``pbft.services.bfs.demo``).

``pbft demo --simulated`` runs the older, fully simulated narration instead.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...runtime.cluster import free_port_range, init_cluster
from ...runtime.client import ClientPool, PbftError
from ...services.kv import encode_op, unwrap_result
from ..procs import Procs

CLIENTS = 8
KEYS_PER_CLIENT = 16


class Demo:
    def __init__(self, workdir: Path, out, phase_s: float):
        self.dir = workdir
        self.out = out
        self.phase_s = phase_s
        self.children = Procs(workdir)  # replica logs in the cluster directory
        self.procs: dict[int, subprocess.Popen] = {}
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.t0 = time.monotonic()
        self.ops = 0
        self.status: dict[int, dict | None] = {}
        self.written: dict[bytes, bytes] = {}
        self.errors = 0
        self.stop = False
        self.timeline: list[tuple[float, int]] = []
        self.keep = False

    # ---- output -------------------------------------------------------------
    def say(self, text: str) -> None:
        self._clear()
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", file=self.out, flush=True)

    def _clear(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.out)

    def progress(self) -> None:
        now = time.monotonic()
        self.timeline.append((now, self.ops))
        recent = [x for x in self.timeline if x[0] >= now - 1.0]
        rate = (recent[-1][1] - recent[0][1]) / max(1e-3, recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0
        reps = []
        for i in range(4):
            s = self.status.get(i)
            if s is None:
                reps.append(f"r{i}:down")
            else:
                mark = "*" if s["primary"] == i and s["view_active"] else ""
                vc = "" if s["view_active"] else "(vc)"
                reps.append(f"r{i}{mark}:v{s['view']}{vc}@{s['last_executed']}")
        line = f"[{now - self.t0:5.1f}s] ops {self.ops:6d}  {rate:6.0f} ops/s  " + "  ".join(reps)
        if self.tty:
            print("\r\033[K" + line, end="", file=self.out, flush=True)
        elif int((now - self.t0) * 4) % 4 == 0:  # once a second when not a terminal
            print(line, file=self.out, flush=True)

    # ---- processes ----------------------------------------------------------
    def start_replica(self, i: int) -> None:
        self.procs[i] = self.children.start_replica(self.dir, i)

    def kill_all(self) -> None:
        self.children.stop_all(grace=5.0)

    async def poll_status(self) -> None:
        loop = asyncio.get_running_loop()
        from ..net import fetch_status

        def one(i):
            r = self.cluster.replicas[i]
            try:
                return fetch_status(r.metrics_addr, r.metrics_port, 0.3)
            except (OSError, ValueError):
                return None

        while not self.stop:
            res = await asyncio.gather(*(loop.run_in_executor(None, one, i) for i in range(4)))
            self.status = dict(enumerate(res))
            self.progress()
            await asyncio.sleep(0.25)

    # ---- workload -----------------------------------------------------------
    async def client(self, pool: ClientPool, pid: int) -> None:
        k = 0
        while not self.stop:
            key = f"c{pid}-k{k % KEYS_PER_CLIENT}".encode()
            val = f"v{k}".encode()
            try:
                unwrap_result(await pool.invoke(pid, encode_op("put", key, val), timeout=10.0))
                self.written[key] = val
                self.ops += 1
            except PbftError:
                self.errors += 1
            k += 1

    async def main(self) -> int:
        base = free_port_range(104, prefer=7000)  # replicas at base.., metrics at base+100..
        self.cluster = init_cluster(self.dir, 4, 1, ["127.0.0.1"], base, CLIENTS,
                                    protocol={"checkpoint_interval_seqnos": 64, "log_window_seqnos": 128,
                                              "view_change_timeout_ms": 500.0})
        self.say(f"cluster directory {self.dir}: 4 replicas (f=1) on 127.0.0.1:{base}-{base + 3}, "
                 f"{CLIENTS} client identities, Ed25519 key pairs")
        for i in range(4):
            self.start_replica(i)
        self.say("started 4 replica processes; they exchange session keys (signed NewKey messages)")
        pool = ClientPool(self.cluster, [self.cluster.identity(c) for c in self.cluster.client_ids])
        await pool.start(10.0)
        self.say(f"{CLIENTS} clients connected; workload: closed-loop puts, each acknowledged by a quorum")
        t_start = time.monotonic()
        poller = asyncio.ensure_future(self.poll_status())
        workers = [asyncio.ensure_future(self.client(pool, c)) for c in self.cluster.client_ids]
        await asyncio.sleep(self.phase_s)
        ops_before, t_before = self.ops, time.monotonic() - t_start
        primary = next((s["primary"] for s in self.status.values() if s), 0)
        self.say(f"killing the primary, replica {primary}, with SIGKILL")
        t_kill = time.monotonic()
        self.children.kill(self.procs[primary])
        new_view_at = None
        while time.monotonic() - t_kill < 20:
            live = [s for i, s in self.status.items() if s and i != primary]
            if len(live) >= 3 and all(s["view"] >= 1 and s["view_active"] for s in live):
                new_view_at = time.monotonic()
                break
            await asyncio.sleep(0.05)
        if new_view_at is None:
            self.say("the backups did not complete a view change within 20 s")
        else:
            s = next(s for i, s in self.status.items() if s and i != primary)
            self.say(f"view change complete: view {s['view']}, new primary replica {s['primary']} "
                     f"({(new_view_at - t_kill) * 1000:.0f} ms after the kill); the workload continues")
        ops_at_vc = self.ops
        await asyncio.sleep(self.phase_s)
        self.say(f"restarting replica {primary}: it reloads its state from its data directory and fetches "
                 f"what it missed")
        self.start_replica(primary)
        t_restart = time.monotonic()
        caught_up = None
        rejoined: dict = {}
        while time.monotonic() - t_restart < 20:
            s0 = self.status.get(primary)
            others = [s for i, s in self.status.items() if s and i != primary]
            if s0 and others and s0["view"] == others[0]["view"] and \
                    s0["last_executed"] >= min(o["last_executed"] for o in others) - 8:
                caught_up, rejoined = time.monotonic(), s0
                break
            await asyncio.sleep(0.05)
        if caught_up is None:
            self.say(f"replica {primary} has not caught up after 20 s")
        else:
            self.say(f"replica {primary} rejoined in view {rejoined['view']} and caught up "
                     f"({(caught_up - t_restart) * 1000:.0f} ms)")
        # a proactive recovery of a backup, under load
        victim = (primary + 2) % 4
        self.say(f"proactive recovery of replica {victim}: reboot, new session keys, its state checked "
                 f"object by object against the others")
        t_rec = time.monotonic()
        ops_rec = self.ops
        self.procs[victim].send_signal(signal.SIGUSR1)
        recovered = None
        done: dict = {}
        while time.monotonic() - t_rec < 30:
            sv = self.status.get(victim)
            if sv and sv.get("recoveries", 0) >= 1 and sv.get("recovering") is None:
                recovered, done = time.monotonic(), sv
                break
            await asyncio.sleep(0.05)
        if recovered is None:
            self.say(f"replica {victim} has not recovered after 30 s")
        else:
            st = done["state_transfer"]
            self.say(f"replica {victim} recovered in {(recovered - t_rec) * 1000:.0f} ms (reboot included); "
                     f"it fetched {st['objects']} objects that differed; {self.ops - ops_rec} operations "
                     f"completed meanwhile")
        await asyncio.sleep(min(2.0, self.phase_s))
        self.stop = True
        await asyncio.gather(*workers)
        await poller
        self._clear()
        t_end = time.monotonic() - self.t0
        # read back what was acknowledged
        mismatches = 0
        for key, val in sorted(self.written.items()):
            got = unwrap_result(await pool.invoke(self.cluster.client_ids[0], encode_op("get", key), read_only=True))
            mismatches += got != val
        await pool.close()
        self.say(f"read back {len(self.written)} keys with read-only requests: "
                 f"{'all hold their last acknowledged value' if not mismatches else f'{mismatches} MISMATCHES'}")
        print("\nsummary", file=self.out)
        print(f"  operations acknowledged : {self.ops} in {t_end:.1f}s ({self.errors} client timeouts)", file=self.out)
        print(f"  throughput before kill  : {ops_before / t_before:.0f} ops/s", file=self.out)
        if new_view_at:
            print(f"  view change             : {(new_view_at - t_kill) * 1000:.0f} ms "
                  f"(request timer {self.cluster.cfg.view_change_timeout_ms:.0f} ms + ViewChange/NewView)",
                  file=self.out)
            print(f"  ops during the new view : {self.ops - ops_at_vc}", file=self.out)
        print(f"  old primary caught up   : {'yes' if caught_up else 'NO'}", file=self.out)
        print(f"  proactive recovery      : "
              f"{f'{(recovered - t_rec) * 1000:.0f} ms' if recovered else 'NOT COMPLETED'}", file=self.out)
        if self.keep:
            print(f"  replica logs            : {self.dir}/replica-*.log", file=self.out)
        ok = (new_view_at is not None and caught_up is not None and recovered is not None and mismatches == 0
              and self.ops > 0)
        print(f"  result                  : {'OK' if ok else 'FAILED'}", file=self.out)
        return 0 if ok else 1


def run_live_demo(out=sys.stdout, phase_s: float = 4.0, keep: bool = False) -> int:
    import uvloop

    tmp = tempfile.mkdtemp(prefix="pbft-demo-")
    demo = Demo(Path(tmp), out, phase_s)
    demo.keep = keep
    try:
        rc = uvloop.run(demo.main())
        demo.kill_all()
        from ...services.bfs.demo import run_bfs_demo
        return rc or (run_bfs_demo(out) or 0)
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop = True
        demo.kill_all()
        if not keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
