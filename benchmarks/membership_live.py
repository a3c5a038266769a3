"""Live membership changes on a local cluster: grow 4 -> 7 and shrink back, under a key-value load.

``python benchmarks/membership_live.py [--clients C] [--phase-s S] [--base-port P] [--dir D] [--json]``

Starts replica processes on loopback (a cluster with 7 replica slots, 4 members), runs ``C``
clients putting distinct keys (each follows the membership in force, epoch.json, as a restarted
``pbft kv`` would), then ``pbft reconfig DIR add-replica --count 3``, starts the added replicas
(joiners: they catch up by state transfer), and later ``remove-replica --count 3``. Prints, for
each change, the time the command took (until the continuing members of quorum weight switched),
the time until the added replicas executed what the others had, and the throughput (acknowledged
puts per second) before, during and after; at the end every acknowledged put is read back.
It measures time: run nothing else that does beside it."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pbft import BlockingClient
from pbft.runtime.client import PbftError
from pbft.runtime.cluster import MembershipWatch, init_cluster, load_cluster
from pbft.services.kv import KVClient
from pbft.tools.cli import main as pbft_main
from pbft.tools.net import fetch_status

SRC = str(Path(__file__).resolve().parent.parent / "src")


class Loader(threading.Thread):
    def __init__(self, directory: Path, client: int, stop: threading.Event, acks: list, acked: dict):
        super().__init__(daemon=True)
        self.dir, self.client, self.stop, self.acks, self.acked = directory, client, stop, acks, acked

    def run(self) -> None:
        watch = MembershipWatch(load_cluster(self.dir))
        with BlockingClient(watch.cluster, self.client) as bc:
            kv = KVClient(bc.invoke, timeout=3.0)
            i = 0
            while not self.stop.is_set():
                if (now := watch.poll()) is not None:
                    bc.set_membership(now)
                k, v = b"b%d-%06d" % (self.client, i), b"v%d" % i
                try:
                    kv.put(k, v)
                except PbftError:
                    continue
                self.acked[k] = v
                self.acks.append(time.monotonic())
                i += 1


def status(cluster, i: int) -> dict:
    r = cluster.slot(i)
    return fetch_status(r.metrics_addr, r.metrics_port, 1.0)


def wait(pred, timeout: float, what: str) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out: {what}")


def rate(acks: list, t0: float, t1: float) -> float:
    return sum(1 for t in acks if t0 <= t < t1) / max(t1 - t0, 1e-9)


def reconfig(d: Path, *args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pbft_main(["reconfig", str(d), *args, "--json"])
    if rc != 0:
        raise SystemExit(f"pbft reconfig {' '.join(args)} failed: {out.getvalue()}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--phase-s", type=float, default=5.0, help="load before and after each change")
    p.add_argument("--base-port", type=int, default=21000)
    p.add_argument("--dir", default=None, help="cluster directory (default: a temporary one, removed)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    d = Path(a.dir or tempfile.mkdtemp(prefix="pbft-membership-"))
    cluster = init_cluster(d, 4, None, ["127.0.0.1"], a.base_port, a.clients, metrics_base_port=a.base_port + 100,
                           replica_slots=7, force=True,
                           protocol={"checkpoint_interval_seqnos": 32, "log_window_seqnos": 64})
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs: dict[int, subprocess.Popen] = {}

    def start(i: int) -> None:
        with open(d / f"replica-{i}.log", "ab") as fh:
            procs[i] = subprocess.Popen([sys.executable, "-m", "pbft.cli", "replica", str(d), "--id", str(i)],
                                        stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True)

    stop = threading.Event()
    acks: list[float] = []
    acked: dict[bytes, bytes] = {}
    out: dict = {"clients": a.clients}
    try:
        for i in range(4):
            start(i)
        wait(lambda: all(len(status(cluster, i)["peers_connected"]) == 3 for i in range(4)), 30, "connected")
        loaders = [Loader(d, c, stop, acks, acked) for c in cluster.client_ids]
        for t in loaders:
            t.start()
        time.sleep(a.phase_s)
        t0 = time.monotonic()
        out["before_ops_per_s"] = round(rate(acks, t0 - a.phase_s, t0), 1)
        grow = reconfig(d, "add-replica", "--count", "3")
        t_cmd = time.monotonic()
        for i in (4, 5, 6):
            start(i)
        top = max(status(cluster, i)["last_executed"] for i in range(4))
        t_ready = wait(lambda: all(status(cluster, i)["last_executed"] >= top for i in (4, 5, 6)), 120,
                       "the added replicas executing")
        out["grow"] = {"command_s": round(t_cmd - t0, 2), "joiners_executing_s": round(t_ready - t0, 2),
                       "during_ops_per_s": round(rate(acks, t0, t_ready), 1), "members_from": grow["members_from"]}
        time.sleep(a.phase_s)
        t1 = time.monotonic()
        out["grow"]["after_ops_per_s"] = round(rate(acks, t1 - a.phase_s, t1), 1)
        shrink = reconfig(d, "remove-replica", "--count", "3")
        t_cmd2 = time.monotonic()
        out["shrink"] = {"command_s": round(t_cmd2 - t1, 2), "during_ops_per_s": round(rate(acks, t1, t_cmd2), 1),
                         "members_from": shrink["members_from"]}
        time.sleep(a.phase_s)
        t2 = time.monotonic()
        out["shrink"]["after_ops_per_s"] = round(rate(acks, t2 - a.phase_s, t2), 1)
        stop.set()
        for t in loaders:
            t.join(10)
        with BlockingClient(d, cluster.client_ids[0]) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            lost = sum(1 for k, v in acked.items() if kv.get(k, read_only=False) != v)
        out["acknowledged_puts"], out["lost_puts"] = len(acked), lost
    finally:
        stop.set()
        for pr in procs.values():
            if pr.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGTERM)  # (its own session: a replica that rebooted itself too)
        for pr in procs.values():
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 1 if out.get("lost_puts") else 0


if __name__ == "__main__":
    sys.exit(main())
