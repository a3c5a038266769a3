"""A real cluster on five hosts: network namespaces on a Linux bridge.

Replicas 0..3 each run in a namespace of their own (``pbft replica``), a
client runs in a fifth; every host has its own address on a bridge, so the
replicas talk over veth pairs, not loopback.  The test then checks, in order:

1. a workload completes (puts, then reads them back);
2. cutting the primary off (a packet filter in its namespace dropping all but
   loopback) makes the others change view, and writes go on; after the cut is
   lifted the old primary rejoins;
3. a backup killed with SIGKILL and restarted (no durable state: it catches up
   by state transfer of a stable checkpoint) reaches the others' progress and is
   active in their view again;
4. a backup stopped with SIGSTOP for several seconds of writes, then SIGCONT,
   catches up;
5. a backup's host is lost and replaced by a fresh one (a new namespace with its
   address, nothing stored): ``pbft reconfig replace-replica`` gives its id a new
   key, the new host joins by state transfer and takes part in the quorums;
   finally every key written is read back.

Needs root, ``ip`` (iproute2) and ``iptables`` or ``nft``
(``scripts/ensure-system-deps.sh``, run by ``make install``, installs them);
skips, saying why, where it cannot run.  Namespaces are named
``pbft<pid>-...``; the bridge ``pbr<pid>`` has a host-side address so the
test can query the replicas' /status endpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from pbft.cli_net import fetch_status
from pbft.runtime.cluster import init_cluster, load_cluster

SRC = str(Path(__file__).resolve().parents[2] / "src")
N = 4
CLIENT_ID = N  # the first client identity
SYS_PATH = os.pathsep.join([d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
                           + ["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
PROTOCOL = {"checkpoint_interval_seqnos": 16, "log_window_seqnos": 32}
OP_TIMEOUT_S = 20.0  # one client operation
STEP_TIMEOUT_S = 30.0  # waiting for a replica to reach a state

CLIENT_SCRIPT = r'''
import json, sys, time
from pbft import BlockingClient
from pbft.services.kv import KVClient

cdir, cid, mode, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
start, count, min_seconds, op_timeout = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])
t0 = time.monotonic()
lat_max = 0.0
bad = []
i = start
with BlockingClient(cdir, cid, wait_s=10.0) as bc:
    kv = KVClient(bc.invoke, timeout=op_timeout)
    if mode == "put":
        while i < start + count or time.monotonic() - t0 < min_seconds:
            t = time.monotonic()
            kv.put(f"{prefix}{i}".encode(), f"value-{prefix}{i}".encode())
            lat_max = max(lat_max, time.monotonic() - t)
            i += 1
    else:
        for i in range(start, start + count):
            t = time.monotonic()
            v = kv.get(f"{prefix}{i}".encode())
            lat_max = max(lat_max, time.monotonic() - t)
            if v != f"value-{prefix}{i}".encode():
                bad.append([i, None if v is None else v.decode("utf-8", "replace")])
        i = start + count
print(json.dumps({"mode": mode, "done": i - start, "end": i, "bad": bad[:20], "bad_count": len(bad),
                  "lat_max_s": round(lat_max, 3), "seconds": round(time.monotonic() - t0, 3)}))
'''


def _which(name: str):
    return shutil.which(name, path=SYS_PATH)


def _run(cmd, check=True, timeout=20.0) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


class Hosts:
    """Five namespaces on a bridge; ``ns[0..3]`` for the replicas, ``ns[4]`` for the client."""

    def __init__(self):
        self.ip = _which("ip")
        pid = os.getpid()
        self.tag = f"pbft{pid}"
        self.bridge = f"pbr{pid}"
        self.ns = [f"{self.tag}-r{i}" for i in range(N)] + [f"{self.tag}-cl"]
        self.veth_host = [f"pv{pid}h{i}" for i in range(N + 1)]
        self.veth_ns = [f"pv{pid}n{i}" for i in range(N + 1)]
        self.prefix = ""
        self.addr: list[str] = []
        self.host_addr = ""
        self.made_ns: list[str] = []
        self.made_links: list[str] = []
        self.fw = None  # "iptables" or "nft": the tool that works inside a namespace
        self.fw_path = None

    def _pick_prefix(self) -> str:
        used = _run([self.ip, "-4", "-o", "addr"]).stdout + _run([self.ip, "-4", "route"]).stdout
        pid = os.getpid()
        for k in range(200):
            p = f"10.213.{(pid + k) % 200 + 20}."
            if p not in used:
                return p
        raise RuntimeError("no free 10.213.x.0/24 subnet")

    def setup(self) -> None:
        ip = self.ip
        self.prefix = self._pick_prefix()
        self.addr = [f"{self.prefix}{i + 1}" for i in range(N)] + [f"{self.prefix}10"]
        self.host_addr = f"{self.prefix}254"
        _run([ip, "link", "add", self.bridge, "type", "bridge"])
        self.made_links.append(self.bridge)
        _run([ip, "link", "set", self.bridge, "up"])
        _run([ip, "addr", "add", f"{self.host_addr}/24", "dev", self.bridge])
        for i in range(len(self.ns)):
            self._add_host(i)
        # a packet filter that works inside a namespace
        for tool, probe in (("iptables", ["-w", "-S"]), ("nft", ["list", "ruleset"])):
            path = _which(tool)
            if path and self.exec(self.ns[0], [path, *probe], check=False).returncode == 0:
                self.fw, self.fw_path = tool, path
                break

    def _add_host(self, i: int) -> None:
        ip, ns = self.ip, self.ns[i]
        _run([ip, "netns", "add", ns])
        self.made_ns.append(ns)
        _run([ip, "link", "add", self.veth_host[i], "type", "veth", "peer", "name", self.veth_ns[i]])
        self.made_links.append(self.veth_host[i])
        _run([ip, "link", "set", self.veth_host[i], "master", self.bridge, "up"])
        _run([ip, "link", "set", self.veth_ns[i], "netns", ns])
        _run([ip, "-n", ns, "link", "set", "lo", "up"])
        _run([ip, "-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", self.veth_ns[i]])
        _run([ip, "-n", ns, "link", "set", self.veth_ns[i], "up"])

    def replace(self, i: int) -> None:
        """Host ``i`` is gone (its namespace and link deleted); a fresh one takes its address."""
        _run([self.ip, "link", "del", self.veth_host[i]])
        _run([self.ip, "netns", "del", self.ns[i]])
        self.made_links.remove(self.veth_host[i])
        self.made_ns.remove(self.ns[i])
        self._add_host(i)

    def exec(self, ns: str, cmd, check=True, timeout=20.0) -> subprocess.CompletedProcess:
        return _run([self.ip, "netns", "exec", ns, *cmd], check=check, timeout=timeout)

    def cut(self, i: int) -> None:
        """Drop every packet of host ``i`` except on loopback."""
        ns = self.ns[i]
        if self.fw == "iptables":
            self.exec(ns, [self.fw_path, "-w", "-I", "INPUT", "!", "-i", "lo", "-j", "DROP"])
            self.exec(ns, [self.fw_path, "-w", "-I", "OUTPUT", "!", "-o", "lo", "-j", "DROP"])
        else:
            rules = ("table inet pbft_cut {\n"
                     " chain in { type filter hook input priority -10; policy drop; iif lo accept; }\n"
                     " chain out { type filter hook output priority -10; policy drop; oif lo accept; }\n}\n")
            p = subprocess.run([self.ip, "netns", "exec", ns, self.fw_path, "-f", "-"], input=rules,
                               capture_output=True, text=True, timeout=20)
            if p.returncode != 0:
                raise RuntimeError(f"nft failed: {p.stderr}")

    def restore(self, i: int) -> None:
        ns = self.ns[i]
        if self.fw == "iptables":
            self.exec(ns, [self.fw_path, "-w", "-D", "INPUT", "!", "-i", "lo", "-j", "DROP"])
            self.exec(ns, [self.fw_path, "-w", "-D", "OUTPUT", "!", "-o", "lo", "-j", "DROP"])
        else:
            self.exec(ns, [self.fw_path, "delete", "table", "inet", "pbft_cut"])

    def cleanup(self) -> None:
        for link in reversed(self.made_links):  # veths first (deleting one end deletes the pair), then the bridge
            _run([self.ip, "link", "del", link], check=False)
        for ns in reversed(self.made_ns):
            _run([self.ip, "netns", "del", ns], check=False)
        self.made_links.clear()
        self.made_ns.clear()


@pytest.fixture
def hosts():
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces need Linux")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if _which("ip") is None:
        pytest.skip("`ip` (iproute2) is missing: run scripts/ensure-system-deps.sh")
    if _which("iptables") is None and _which("nft") is None:
        pytest.skip("neither `iptables` nor `nft` is installed: run scripts/ensure-system-deps.sh")
    h = Hosts()
    try:
        h.setup()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        h.cleanup()
        pytest.skip(f"cannot build network namespaces on a bridge here: {e}")
    if h.fw is None:
        h.cleanup()
        pytest.skip("neither iptables nor nft works inside a network namespace here")
    try:
        yield h
    finally:
        h.cleanup()


class Cluster:
    """Replica processes in the namespaces, a client in the last one, logs in the cluster directory."""

    def __init__(self, hosts: Hosts, directory: Path, runtime=None):
        self.h = hosts
        self.dir = directory
        # the test reaches the replicas' /status from outside their namespaces: listen on every interface
        runtime = {"metrics_host": "0.0.0.0", **(runtime or {})}
        # (no recovery turns: the test schedules its own faults, and a turn inside one would exceed f)
        self.cluster = init_cluster(directory, N, None, hosts.addr[:N], 7000, 4, protocol=PROTOCOL, runtime=runtime,
                                    recovery={"period_s": 0.0})
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs = {i: directory / f"replica-{i}.log" for i in range(N)}
        self.script = directory / "kvclient.py"
        self.script.write_text(CLIENT_SCRIPT)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = SRC + os.pathsep + self.env.get("PYTHONPATH", "")
        self.client_runs: list[str] = []

    def start(self, i: int) -> None:
        with open(self.logs[i], "ab") as fh:
            fh.write(f"---- test: starting replica {i} at {time.time():.3f}\n".encode())
            fh.flush()
            self.procs[i] = subprocess.Popen(
                [self.h.ip, "netns", "exec", self.h.ns[i], sys.executable, "-m", "pbft.cli", "replica",
                 str(self.dir), "--id", str(i)],
                stdout=subprocess.DEVNULL, stderr=fh, env=self.env, start_new_session=True)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    # ---- observation -------------------------------------------------------
    def status(self, i: int, timeout: float = 1.0):
        """The replica's /status, or None if it does not answer."""
        r = self.cluster.replicas[i]
        try:
            return fetch_status(r.metrics_addr, r.metrics_port, timeout)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def statuses(self, ids) -> dict:
        return {i: self.status(i) for i in ids}

    def describe(self) -> str:
        """Everything useful for a failure message: statuses, client runs, the tail of every log."""
        out = ["statuses:"]
        for i in range(N):
            p = self.procs.get(i)
            state = "not started" if p is None else ("running" if p.poll() is None else f"exited {p.returncode}")
            out.append(f"  replica {i} ({state}): {json.dumps(self.status(i, 0.5))}")
        out.append("client runs:")
        out += [f"  {c}" for c in self.client_runs[-6:]]
        for i in range(N):
            try:
                lines = self.logs[i].read_text(errors="replace").splitlines()
            except OSError:
                lines = ["(no log)"]
            out.append(f"---- {self.logs[i]} (last 30 lines of {len(lines)})")
            out += lines[-30:]
        return "\n".join(out)

    def wait_for(self, pred, what: str, timeout: float = STEP_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(0.1)
        pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{self.describe()}")

    def wait_connected(self, ids) -> None:
        def ok():
            st = self.statuses(ids)
            return all(s is not None and len(s["peers_connected"]) == N - 1 for s in st.values())
        self.wait_for(ok, f"replicas {ids} to answer /status and be connected to all peers")

    def current_view(self, ids) -> tuple[int, int]:
        """(view, primary) of the replicas ``ids``, which must all be active in the same view."""
        def agreed():
            st = self.statuses(ids)
            if all(s is not None and s["view_active"] for s in st.values()) and \
                    len({(s["view"], s["primary"]) for s in st.values()}) == 1:
                return next(iter(st.values()))
            return None
        s = self.wait_for(agreed, f"replicas {list(ids)} to be active in one view")
        return s["view"], s["primary"]

    def max_executed(self, ids) -> int:
        """The highest last_executed among the replicas ``ids`` (all must answer)."""
        def answered():
            st = self.statuses(ids)
            return all(s is not None for s in st.values()) and st
        return max(s["last_executed"] for s in self.wait_for(answered, f"replicas {list(ids)} to answer").values())

    # ---- the client -------------------------------------------------------
    def client(self, mode: str, prefix: str, start: int, count: int, min_seconds: float = 0.0,
               timeout: float = 90.0) -> dict:
        """Run the client script in the client namespace; returns its JSON summary (fails the test on error)."""
        cmd = [self.h.ip, "netns", "exec", self.h.ns[N], sys.executable, str(self.script), str(self.dir),
               str(CLIENT_ID), mode, prefix, str(start), str(count), str(min_seconds), str(OP_TIMEOUT_S)]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as e:
            self.client_runs.append(f"{mode} {prefix}{start}+{count}: TIMEOUT after {timeout:g}s")
            pytest.fail(f"client {mode} {prefix}{start}+{count} did not finish in {timeout:g}s; "
                        f"stderr: {e.stderr}\n{self.describe()}")
        self.client_runs.append(f"{mode} {prefix}{start}+{count}: rc={p.returncode} {time.monotonic() - t0:.1f}s "
                                f"{p.stdout.strip()} {p.stderr.strip()[-300:]}")
        assert p.returncode == 0, (f"client {mode} {prefix}{start}+{count} failed (rc {p.returncode}):\n"
                                   f"{p.stderr[-3000:]}\n{self.describe()}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def put(self, prefix: str, start: int, count: int, min_seconds: float = 0.0) -> int:
        r = self.client("put", prefix, start, count, min_seconds)
        assert r["done"] >= count, f"{r}\n{self.describe()}"
        return r["end"]

    def check_reads(self, prefix: str, start: int, count: int) -> None:
        r = self.client("get", prefix, start, count)
        assert r["bad_count"] == 0, f"{r['bad_count']} keys read back wrong, e.g. {r['bad']}\n{self.describe()}"
        assert r["done"] == count, f"{r}\n{self.describe()}"


@pytest.fixture
def cluster(hosts, tmp_path):
    c = Cluster(hosts, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.mark.slow
def test_cluster_on_network_namespaces(hosts, cluster):
    c = cluster
    others = lambda i: [j for j in range(N) if j != i]  # noqa: E731
    for i in range(N):
        c.start(i)
    c.wait_connected(list(range(N)))
    for i, s in c.statuses(range(N)).items():  # signals go to the replica itself (`ip netns exec` execs)
        assert s is not None and s["pid"] == c.procs[i].pid, c.describe()

    # 1. a workload completes: 50 puts, read back -------------------------------------------------
    end_a = c.put("a", 0, 50)
    c.check_reads("a", 0, end_a)
    st = c.statuses(range(N))
    assert all(s is not None and s["view"] == 0 and s["view_active"] for s in st.values()), c.describe()
    assert all(s["last_executed"] >= 50 for s in st.values()), c.describe()

    # 2. cut the primary off: the others change view and writes go on ---------------------------
    old_primary = st[0]["primary"]
    assert old_primary == 0, c.describe()
    c.h.cut(old_primary)
    assert c.status(old_primary, 1.0) is None, \
        f"the cut primary still answers /status: the packet filter is not working\n{c.describe()}"
    end_b = c.put("b", 0, 10)
    rest = others(old_primary)

    def new_view_everywhere():
        st = c.statuses(rest)
        ok = all(s is not None and s["view"] >= 1 and s["view_active"] and s["primary"] != old_primary
                 for s in st.values())
        return st if ok else None
    st = c.wait_for(new_view_everywhere, f"replicas {rest} to be active in a view >= 1 without replica {old_primary}")
    views = {s["view"] for s in st.values()}
    assert len(views) == 1, f"replicas {rest} disagree on the view: {st}\n{c.describe()}"
    c.check_reads("b", 0, end_b)

    # ... lift the cut: the old primary rejoins (same view, catches up)
    c.h.restore(old_primary)
    target = c.max_executed(rest)
    end_b = c.put("b", end_b, 5)

    def rejoined():
        s = c.status(old_primary)
        ref = c.statuses(rest)
        return (s is not None and s["view_active"]
                and all(r is not None and s["view"] == r["view"] for r in ref.values())
                and s["last_executed"] >= target and len(s["peers_connected"]) == N - 1)
    c.wait_for(rejoined, f"replica {old_primary} to rejoin (view of the others, last_executed >= {target})")

    # 3. SIGKILL a backup, restart it: it catches up by state transfer ----------------------------
    view, primary = c.current_view(range(N))
    victim = next(i for i in range(N - 1, -1, -1) if i not in (primary, old_primary))
    c.kill(victim)
    end_c = c.put("c", 0, 20)  # the others go on without it
    target = c.max_executed(others(victim))
    c.start(victim)
    c.wait_connected(list(range(N)))
    end_c = c.put("c", end_c, 40)  # more than two checkpoint intervals

    def caught_up():
        s = c.status(victim)
        return s is not None and not s["fetching_state"] and s["last_executed"] >= target and s
    s = c.wait_for(caught_up, f"restarted replica {victim} to reach last_executed >= {target}")
    assert s["stable_checkpoint"] > 0, c.describe()
    log = c.logs[victim].read_text(errors="replace").split(f"starting replica {victim}")[-1]
    assert "state-transfer" in log, f"replica {victim} caught up without a state transfer?\n{c.describe()}"

    # ... and it is back in the protocol: active in the others' view (it cannot check the MACs of
    # the view-change messages sent before it restarted, so this takes more than a relay)
    def in_view():
        s = c.status(victim)
        ref = c.statuses(others(victim))
        return (s is not None and s["view_active"]
                and all(r is not None and r["view"] == s["view"] for r in ref.values()))
    c.wait_for(in_view, f"restarted replica {victim} to be active in the view of the others")

    # 4. SIGSTOP another backup for several seconds of writes, then SIGCONT ------------------------
    # (writes need 2f+1 = 3 replicas: the restarted one must take part now)
    view, primary = c.current_view(range(N))
    sleeper = next(i for i in range(N) if i not in (primary, victim))
    c.procs[sleeper].send_signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    end_d = c.put("d", 0, 40, min_seconds=5.0)
    stopped_for = time.monotonic() - t_stop
    target = c.max_executed(others(sleeper))
    c.procs[sleeper].send_signal(signal.SIGCONT)
    assert stopped_for >= 5.0

    def woke_up():
        s = c.status(sleeper)
        ref = c.statuses(others(sleeper))
        return (s is not None and s["last_executed"] >= target and s["view_active"]
                and all(r is not None and r["view"] == s["view"] for r in ref.values()))
    c.wait_for(woke_up, f"replica {sleeper}, stopped for {stopped_for:.1f}s, to rejoin the view of the others "
               f"and reach last_executed >= {target}")

    # 5. a backup's machine is lost: the operator replaces it with a fresh one ---------------------
    # (`pbft reconfig replace-replica`: a new key pair for its id, ordered by the others; a new
    # namespace with the same address, nothing stored, the new key file: it joins by state transfer)
    view, primary = c.current_view(range(N))
    lost = next(i for i in range(N - 1, -1, -1) if i != primary)
    c.kill(lost)
    c.h.replace(lost)
    old_key = c.cluster.replicas[lost].public_key
    p = subprocess.run([sys.executable, "-m", "pbft.cli", "reconfig", str(c.dir), "replace-replica", str(lost)],
                       capture_output=True, text=True, timeout=90, env=c.env)
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{c.describe()}"
    now = load_cluster(c.dir)
    assert now.public_key_of(lost) != old_key and now.identity(lost).public == now.public_key_of(lost)
    shutil.rmtree(now.storage.replica_dir(now.dir, lost))
    end_e = c.put("e", 0, 20)  # the others go on without it
    target = c.max_executed(others(lost))
    c.start(lost)
    c.wait_connected(list(range(N)))
    end_e = c.put("e", end_e, 40)
    c.wait_for(lambda: (s := c.status(lost)) is not None and s["last_executed"] >= target and s["view_active"]
               and s["restored"] == "fresh", f"the replacement of replica {lost} to catch up to {target}")
    # it takes part: with another backup stopped, writes need it
    view, primary = c.current_view(range(N))
    paused = next(i for i in range(N) if i not in (primary, lost))
    c.procs[paused].send_signal(signal.SIGSTOP)
    try:
        end_e = c.put("e", end_e, 10)
    finally:
        c.procs[paused].send_signal(signal.SIGCONT)

    # everything written is still there; every replica is alive and active in one view
    for prefix, end in (("a", end_a), ("b", end_b), ("c", end_c), ("d", end_d), ("e", end_e)):
        c.check_reads(prefix, 0, end)
    c.current_view(range(N))
    assert all(p.poll() is None for p in c.procs.values()), c.describe()

