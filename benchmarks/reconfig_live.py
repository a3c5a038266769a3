"""Live reconfiguration figures on a local cluster, under a key-value load: the time to add a
replica as a function of the state it must fetch, and the throughput while every replica's
long-term key is rotated and a client is revoked.

``python benchmarks/reconfig_live.py sizes [--mb 0,4,16] [--clients C] [--base-port P] [--json]``
    For each state size: a fresh cluster (4 members, a spare slot), ``MB`` megabytes of 4 KB
    values put first, then ``pbft reconfig DIR add-replica`` under the load of ``C`` clients and
    the added replica started; prints the time until the switch, until the added replica executes
    what the others had, and the puts per second before and during.
``python benchmarks/reconfig_live.py keys [--clients C] [--phase-s S] [--base-port P] [--json]``
    One cluster under load: ``rotate-key`` of every replica in turn, then ``revoke-client`` of a
    client that was putting too (its requests must fail from then on); prints each change's time
    and the puts per second before, during and after it, and the revoked client's puts before and
    after its revocation: acknowledged, refused as not admitted (``NotAdmittedError``), service errors,
    unanswered (no certified result in time) and failed, each counted while it goes on putting.
    Every acknowledged put is read back.

The clients follow what ``pbft reconfig`` writes into ``DIR/epoch.json`` (``MembershipWatch``),
as a restarted ``pbft kv`` would. It measures time: run nothing else that does beside it.
"""

from __future__ import annotations

import argparse
import contextlib
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

from membership_live import SRC, Loader, rate, status, wait

from pbft import BlockingClient
from pbft.runtime.client import NoQuorumError, NotAdmittedError, PbftError
from pbft.runtime.cluster import init_cluster, load_cluster
from pbft.services.kv import KVClient, ServiceError, encode_op, unwrap_result

VALUE = 4096
PRELOADERS = 4


class Cluster:
    """Replica processes of a cluster directory, stopped (their process groups) on exit."""

    def __init__(self, d: Path, members: int, slots: int, clients: int, base_port: int):
        self.d = d
        self.cluster = init_cluster(d, members, None, ["127.0.0.1"], base_port, clients,
                                    metrics_base_port=base_port + 100, replica_slots=slots, force=True,
                                    protocol={"checkpoint_interval_seqnos": 32, "log_window_seqnos": 64})
        self.env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, i: int) -> None:
        with open(self.d / f"replica-{i}.log", "ab") as fh:
            self.procs[i] = subprocess.Popen([sys.executable, "-m", "pbft.cli", "replica", str(self.d), "--id", str(i)],
                                             stdout=subprocess.DEVNULL, stderr=fh, env=self.env,
                                             start_new_session=True)

    def up(self, n: int) -> None:
        for i in range(n):
            self.start(i)
        wait(lambda: all(len(status(self.cluster, i)["peers_connected"]) == n - 1 for i in range(n)), 30,
             "connected")

    def stop(self) -> None:
        for pr in self.procs.values():
            if pr.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGTERM)
        for pr in self.procs.values():
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()


def preload(c: Cluster, mb: float, clients: list[int]) -> int:
    """Put ``mb`` megabytes of distinct 4 KB values, one thread per client id of ``clients``."""
    count = int(mb * 1e6 // VALUE)

    def put_every(k: int, client: int) -> None:
        with BlockingClient(c.cluster, client) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            for i in range(k, count, len(clients)):
                kv.put(b"state-%07d" % i, bytes([i % 251]) * VALUE)

    ts = [threading.Thread(target=put_every, args=(k, cl)) for k, cl in enumerate(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return count


def change(c: Cluster, *args: str) -> str:
    """``pbft reconfig DIR ARGS`` in a process of its own, as an operator runs it (in this one, its
    CPU would be taken from the load's threads); waits for the switch; its output."""
    p = subprocess.run([sys.executable, "-m", "pbft.cli", "reconfig", str(c.d), *args], env=c.env,
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"pbft reconfig {' '.join(args)} failed: {p.stdout}{p.stderr}")
    return p.stdout


def read_back(c: Cluster, acked: dict, client: int) -> int:
    with BlockingClient(load_cluster(c.d), client) as bc:  # (the directory now: epoch.json's keys)
        kv = KVClient(bc.invoke, timeout=20.0)
        return sum(1 for k, v in acked.items() if kv.get(k, read_only=False) != v)


def loaders_for(c: Cluster, ids: list[int]):
    stop = threading.Event()
    acks: list[float] = []
    acked: dict[bytes, bytes] = {}
    ts = [Loader(c.d, i, stop, acks, acked) for i in ids]
    for t in ts:
        t.start()
    return stop, ts, acks, acked


def one_size(mb: float, a) -> dict:
    d = Path(tempfile.mkdtemp(prefix="pbft-reconfig-"))
    c = Cluster(d, 4, 5, a.clients + PRELOADERS, a.base_port)
    ids, extra = c.cluster.client_ids[:a.clients], c.cluster.client_ids[a.clients:]
    out: dict = {"state_mb": mb}
    try:
        c.up(4)
        t = time.monotonic()
        out["preloaded_values"] = preload(c, mb, extra)
        out["preload_s"] = round(time.monotonic() - t, 1)
        stop, ts, acks, acked = loaders_for(c, ids)
        time.sleep(a.phase_s)
        t0 = time.monotonic()
        out["before_ops_per_s"] = round(rate(acks, t0 - a.phase_s, t0), 1)
        change(c, "add-replica", "--count", "1")
        t_cmd = time.monotonic()
        c.start(4)
        top = max(status(c.cluster, i)["last_executed"] for i in range(4))
        t_ready = wait(lambda: status(c.cluster, 4)["last_executed"] >= top, 300, "the added replica executing")
        out.update(command_s=round(t_cmd - t0, 2), joiner_executing_s=round(t_ready - t0, 2),
                   during_ops_per_s=round(rate(acks, t0, t_ready), 1),
                   joiner_fetched_mb=round(status(c.cluster, 4)["state_transfer"]["bytes"] / 1e6, 2),
                   joiner_transfer=status(c.cluster, 4)["state_transfer"])
        time.sleep(2.0)
        sts = [status(c.cluster, i) for i in range(5)]
        out["stable"] = [(s_["stable_checkpoint"], (s_["stable_digest"] or "")[:12], s_["state_objects"]) for s_ in sts]
        stop.set()
        for th in ts:
            th.join(10)
        out["acknowledged_puts"], out["lost_puts"] = len(acked), read_back(c, acked, extra[0])
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)
    return out


def sizes(a) -> list[dict]:
    return [one_size(float(x), a) for x in a.mb.split(",")]


def keys(a) -> dict:
    d = Path(tempfile.mkdtemp(prefix="pbft-reconfig-"))
    c = Cluster(d, 4, 4, a.clients + 2, a.base_port)
    ids = c.cluster.client_ids
    victim, reader = ids[-2], ids[-1]
    out: dict = {"clients": a.clients, "changes": []}
    try:
        c.up(4)
        stop, ts, acks, acked = loaders_for(c, ids[:-2])
        # per phase (before / after the revocation, when the call ends): acknowledged puts, puts
        # refused as not admitted (NotAdmittedError: the replicas' not-admitted result, or the
        # configuration their chain certifies without the client), other service errors, calls
        # without a certified result in time (NoQuorumError) and other client errors
        kinds = ("acked", "refused", "errors", "unanswered", "failed")
        victim_res: dict = {f"{k}{p}": 0 for p in ("", "_after") for k in kinds}
        revoked = threading.Event()

        def victim_loop() -> None:
            with BlockingClient(c.cluster, victim) as bc:
                i = 0
                while not stop.is_set():
                    try:
                        unwrap_result(bc.invoke(encode_op("put", b"victim-%06d" % i, b"v"), timeout=3.0))
                        what = "acked"
                    except NotAdmittedError:
                        what = "refused"
                        time.sleep(0.05)  # (refused at once once known: do not spin)
                    except ServiceError:
                        what = "errors"
                    except NoQuorumError:
                        what = "unanswered"
                    except PbftError:
                        what = "failed"
                    victim_res[what + ("_after" if revoked.is_set() else "")] += 1
                    i += 1

        vt = threading.Thread(target=victim_loop, daemon=True)
        vt.start()
        time.sleep(a.phase_s)
        t_prev = time.monotonic()
        out["before_ops_per_s"] = round(rate(acks, t_prev - a.phase_s, t_prev), 1)
        changes = [("rotate-key", str(i)) for i in range(4)] + [("revoke-client", str(victim))]
        for action, who in changes:
            t0 = time.monotonic()
            change(c, action, who)
            t1 = time.monotonic()
            if action == "revoke-client":
                revoked.set()
            time.sleep(a.phase_s)
            t2 = time.monotonic()
            out["changes"].append({"change": f"{action} {who}", "command_s": round(t1 - t0, 2),
                                   "during_ops_per_s": round(rate(acks, t0, t1), 1),
                                   "after_ops_per_s": round(rate(acks, t1, t2), 1)})
        stop.set()
        for th in [*ts, vt]:
            th.join(10)
        out["victim"] = victim_res
        out["acknowledged_puts"], out["lost_puts"] = len(acked), read_back(c, acked, reader)
    finally:
        stop.set()
        c.stop()
        shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["sizes", "keys"])
    p.add_argument("--mb", default="0,4,16", help="sizes: state sizes in MB, comma-separated")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--phase-s", type=float, default=4.0, help="load before and after each change")
    p.add_argument("--base-port", type=int, default=21500)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = sizes(a) if a.mode == "sizes" else keys(a)
    if a.json:
        print(json.dumps(res))
    elif a.mode == "sizes":
        print(f"{'state MB':>8} {'preload s':>9} {'switch s':>8} {'joiner executing s':>18} "
              f"{'fetched MB':>10} {'puts/s before':>13} {'during':>7} {'lost':>4}")
        for r in res:
            print(f"{r['state_mb']:>8g} {r['preload_s']:>9} {r['command_s']:>8} {r['joiner_executing_s']:>18} "
                  f"{r['joiner_fetched_mb']:>10} {r['before_ops_per_s']:>13} {r['during_ops_per_s']:>7} "
                  f"{r['lost_puts']:>4}")
    else:
        print(f"puts/s before: {res['before_ops_per_s']} ({res['clients']} clients)")
        for ch in res["changes"]:
            print(f"{ch['change']:<18} {ch['command_s']:>6} s   puts/s during {ch['during_ops_per_s']:>7}"
                  f"   after {ch['after_ops_per_s']:>7}")
        v = res["victim"]
        print(f"revoked client: before, {v['acked']} puts acknowledged ({v['refused']} refused, "
              f"{v['errors']} errors, {v['unanswered']} unanswered, {v['failed']} failed); after, "
              f"{v['acked_after']} acknowledged, {v['refused_after']} refused as not admitted, "
              f"{v['errors_after']} errors, {v['unanswered_after']} unanswered, {v['failed_after']} failed; "
              f"{res['acknowledged_puts']} acknowledged puts of the others, {res['lost_puts']} lost")
    lost = res["lost_puts"] if isinstance(res, dict) else sum(r["lost_puts"] for r in res)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
