"""Helpers for tests that run real replica processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pbft.cli_net import fetch_status
from pbft.runtime.cluster import free_port_range, init_cluster

ROOT = str(Path(__file__).resolve().parents[2])  # the repository root: makes ``examples.*`` importable
SRC = str(Path(ROOT) / "src")


def free_base_port(span: int) -> int:
    return free_port_range(span)


class LocalCluster:
    def __init__(self, directory: Path, n: int = 4, clients: int = 4, protocol=None, runtime=None,
                 service: str | None = None, replica_slots: int | None = None):
        """``service``: a ``--service`` spec for every replica (``kv`` when None), e.g.
        ``examples.bank:BankService`` (the repository root is on the replicas' PYTHONPATH)."""
        self.dir = Path(directory)
        self.service = service
        base = free_base_port(200)
        self.cluster = init_cluster(self.dir, n, None, ["127.0.0.1"], base, clients,
                                    protocol=protocol, runtime=runtime, replica_slots=replica_slots)
        self.n = n
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    def start(self, rid: int, service: str | None = None) -> None:
        log = self.dir / f"replica-{rid}.log"
        self.logs[rid] = log
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + ROOT + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "pbft.cli", "replica", str(self.dir), "--id", str(rid)]
        service = service or self.service
        if service is not None:
            cmd += ["--service", service]
        fh = open(log, "ab")
        self.procs[rid] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True)
        fh.close()

    def start_all(self, wait: bool = True, service: str | None = None) -> "LocalCluster":
        for r in range(self.n):
            self.start(r, service)
        if wait:
            self.wait_connected()
        return self

    def status(self, rid: int, timeout: float = 1.0) -> dict:
        r = self.cluster.slot(rid)
        return fetch_status(r.metrics_addr, r.metrics_port, timeout)

    def wait_connected(self, ids=None, timeout: float = 15.0) -> None:
        ids = list(range(self.n)) if ids is None else ids
        deadline = time.time() + timeout
        while True:
            try:
                if all(len(self.status(i)["peers_connected"]) == self.n - 1 for i in ids):
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"replicas {ids} not connected; logs in {self.dir}")
            time.sleep(0.05)

    def wait_for(self, pred, timeout: float = 20.0, what: str = "condition"):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = pred()
                if last:
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what} (last {last!r}); logs in {self.dir}; "
                           f"replicas: {self.snapshot()}")

    def snapshot(self) -> str:
        """Each running replica's view, execution, checkpoint and drop counts, for a failure's message
        (the logs do not have them: drops are counted, not logged)."""
        out = []
        for i, p in sorted(self.procs.items()):
            if p is None or p.poll() is not None:
                out.append(f"{i}: down")
                continue
            try:
                st = self.status(i, timeout=0.5)
            except (OSError, ValueError) as e:
                out.append(f"{i}: no status ({e})")
                continue
            keys = ("view", "view_active", "last_executed", "stable_checkpoint", "needs_state", "fetching_state",
                    "recovering", "peers_connected", "internal_errors")
            counts = {k: v for k, v in {**(st.get("counts") or {}), **(st.get("drops") or {})}.items() if v}
            out.append(f"{i}: " + " ".join(f"{k}={st.get(k)}" for k in keys) + f" counts={counts}")
        return "; ".join(out)

    def signal(self, rid: int, sig: int) -> None:
        self.procs[rid].send_signal(sig)

    def kill(self, rid: int) -> None:
        p = self.procs[rid]
        p.kill()
        p.wait(5)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def log_text(self, rid: int) -> str:
        return self.logs[rid].read_text(errors="replace")

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def corrupt_store(lc, rid: int, mark: bytes, offset: int = 5) -> int:
    """Flip the byte at ``offset`` in every copy of ``mark * 4`` in replica ``rid``'s store files
    (LMDB's, and the durable mode's write-ahead log in front of it); returns how many it hit."""
    hits = 0
    for name in ("data.mdb", "wal"):
        with open(lc.cluster.storage.replica_dir(lc.dir, rid) / name, "r+b") as fh:
            data = fh.read()
            at = data.find(mark * 4)
            while at >= 0:
                fh.seek(at + offset)
                fh.write(b"#")
                hits += 1
                at = data.find(mark * 4, at + len(mark) * 64)
    return hits
