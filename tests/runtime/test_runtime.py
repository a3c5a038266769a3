"""The networked runtime on loopback: real replica processes, real sockets, real keys."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest

from helpers.metrics import metric, metrics_text  # noqa: F401 - also imported from here by other tests
from helpers.netutil import SRC, LocalCluster
from pbft import BlockingClient, NoQuorumError
from pbft.runtime.keys import Identity, make_newkey, now_timestamp_us
from pbft.services.kv import KVClient, ServiceError


def kv_of(bc: BlockingClient) -> KVClient:
    return KVClient(bc.invoke, timeout=20.0)


@pytest.fixture
def cluster(local_cluster):
    return local_cluster(protocol={"checkpoint_interval_seqnos": 16, "log_window_seqnos": 32,
                                   "view_change_timeout_ms": 500.0})


def test_put_get_read_only_and_status(cluster):
    with BlockingClient(cluster.dir) as bc:
        kv = kv_of(bc)
        for i in range(40):
            kv.put(f"k{i}".encode(), f"v{i}".encode())
        assert kv.get(b"k7") == b"v7"  # read-only path
        assert kv.get(b"k8", read_only=False) == b"v8"  # ordered read
        assert kv.cas(b"k1", b"v1", b"w1") is True
        assert kv.cas(b"k1", b"v1", b"x1") is False
        assert kv.delete(b"k2") is True and kv.get(b"k2") is None
        with pytest.raises(ServiceError, match="unknown or malformed"):
            kv._call(msgpack.packb(["frobnicate", b"k"]))
    st = [cluster.status(i) for i in range(4)]
    assert {s["view"] for s in st} == {0}
    assert all(s["last_executed"] >= 1 for s in st)
    # checkpoints every 16 batches became stable: garbage collection works on the real runtime
    assert max(s["stable_checkpoint"] for s in st) >= 16 or max(s["last_executed"] for s in st) < 32
    text = metrics_text(cluster, 1)
    assert metric(text, "pbft_requests_executed_total") >= 44
    assert metric(text, "pbft_view") == 0
    assert metric(text, "pbft_request_latency_seconds_count") >= 1


def test_primary_crash_view_change_and_progress(cluster):
    """Four closed-loop clients; the primary is killed: the view changes and every client's
    outstanding request completes (no client gives up), then the killed replica restarts
    without its state, finds the current view (f+1 Status join rule) and catches up."""
    import asyncio

    import uvloop

    from pbft.runtime.client import ClientPool
    from pbft.services.kv import encode_op

    c = cluster.cluster
    counts = {p: 0 for p in c.client_ids}
    errors = []

    async def main():
        pool = ClientPool(c, [c.identity(p) for p in c.client_ids])
        await pool.start()
        stop = asyncio.Event()

        async def worker(p):
            k = 0
            while not stop.is_set():
                try:
                    await pool.invoke(p, encode_op("put", f"{p}-{k % 8}".encode(), str(k).encode()), timeout=8.0)
                    counts[p] += 1
                except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                    errors.append(repr(e))
                k += 1

        tasks = [asyncio.ensure_future(worker(p)) for p in c.client_ids]
        await asyncio.sleep(1.0)
        cluster.kill(0)  # the primary of view 0
        before = dict(counts)
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        while not all(counts[p] > before[p] + 5 for p in c.client_ids):
            assert time.monotonic() - t0 < 8.0, f"clients stalled after the primary died: {before} -> {counts}"
            await asyncio.sleep(0.05)
        resumed = time.monotonic() - t0
        cluster.start(0)  # back, with no memory of anything
        t1 = time.monotonic()
        while True:
            try:
                st = await loop.run_in_executor(None, lambda: [cluster.status(i) for i in range(4)])
            except OSError:  # the restarted replica is not listening yet
                st = None
            if st and st[0]["view"] == st[1]["view"] and st[0]["view_active"] and \
                    st[0]["last_executed"] >= st[1]["last_executed"] - 16:
                break
            assert time.monotonic() - t1 < 20.0, f"restarted replica did not catch up: {st}"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()
        return resumed

    resumed = uvloop.run(main())
    assert errors == []
    assert resumed < 5.0
    st = [cluster.status(i) for i in range(4)]
    assert all(s["view"] >= 1 and s["view_active"] for s in st) and len({s["view"] for s in st}) == 1, st
    assert "view-change" in cluster.log_text(1) and "new-view" in cluster.log_text(1)
    assert "status-join" in cluster.log_text(0) or "certified-new-view" in cluster.log_text(0)


def test_session_keys_refresh_while_serving(tmp_path):
    lc = LocalCluster(tmp_path / "c", runtime={"key_refresh_s": 0.3})
    lc.start_all()
    try:
        with BlockingClient(lc.dir) as bc:
            kv = kv_of(bc)
            t_end = time.time() + 2.5
            i = 0
            while time.time() < t_end:
                kv.put(f"k{i}".encode(), b"x")
                i += 1
            assert kv.get(f"k{i - 1}".encode()) == b"x"
        text = metrics_text(lc, 2)
        assert metric(text, "pbft_key_refreshes_total") >= 4  # ~2.5 s / 0.3 s, plus the first
        # replicas and the client kept accepting each other's fresh keys
        assert metric(text, "pbft_newkeys_accepted_total") >= 3 * 4
    finally:
        lc.stop()


# ---------------------------------------------------------------------------
# bad input at a live replica
# ---------------------------------------------------------------------------

def _frame(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _send_and_close(addr, data: bytes) -> None:
    try:
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(data)
            time.sleep(0.02)
    except OSError:
        pass


def test_bad_input_is_dropped_and_counted_and_correct_clients_are_served(cluster):
    r1 = cluster.cluster.replicas[1]
    addr = (r1.host, r1.port)
    c = cluster.cluster
    client_id = c.client_ids[0]
    # garbage, truncated frames, oversized length prefixes, valid msgpack of the wrong shape
    _send_and_close(addr, os.urandom(5000))
    _send_and_close(addr, _frame(b"\x95\x01") + b"\x00\x00")
    _send_and_close(addr, struct.pack(">I", 1 << 31) + b"x" * 100)
    _send_and_close(addr, b"".join(_frame(msgpack.packb(x)) for x in
                                   ([1, 2, 3, 4, 5], [99, 0, b"", b"", b""], [1, client_id, b"\xc1", b"", b"\0" * 64],
                                    {"a": 1}, [2, 0, msgpack.packb([0] * 7), b"", b"\0" * 16])))
    # NewKey from an impostor (right id, wrong long-term key) and a replayed genuine NewKey
    impostor = Identity.generate(client_id)
    bad_nk = make_newkey(impostor, c.public, {1: os.urandom(64)}, now_timestamp_us())
    genuine = make_newkey(c.identity(client_id), c.public, {1: os.urandom(64)}, now_timestamp_us())
    # (a refused NewKey closes a connection that never authenticated: the impostor's goes alone)
    _send_and_close(addr, _frame(bad_nk))
    _send_and_close(addr, _frame(genuine) + _frame(genuine))
    # requests authenticated with a key nobody agreed to, on a connection their client never
    # authenticated: dropped before any MAC check (spoofed-client)
    from pbft.codec import seal
    from pbft.crypto import KeyRing
    from pbft.messages import Request
    ring = KeyRing(client_id + 1, c.n, {j: os.urandom(32) for j in range(c.n)}, {})
    _send_and_close(addr, b"".join(
        _frame(seal(Request(client_id + 1, 10**15 + i, b"\x92\xa3get\xc4\x01k", False, 1), ring)) for i in range(50)))
    # a connection flood: many idle connections held open while a correct client works
    flood = []
    for _ in range(200):
        try:
            flood.append(socket.create_connection(addr, timeout=2))
        except OSError:
            break
    try:
        with BlockingClient(cluster.dir, c.client_ids[1]) as bc:
            kv = kv_of(bc)
            for i in range(20):
                kv.put(f"after{i}".encode(), b"ok")
            assert kv.get(b"after19") == b"ok"
        assert cluster.status(1)["last_executed"] >= 1
    finally:
        for s in flood:
            s.close()
    assert cluster.procs[1].poll() is None, "replica 1 died"
    text = metrics_text(cluster, 1)
    for layer, reason in [("transport", "oversized-frame"), ("transport", "newkey-bad-signature"),
                          ("transport", "newkey-stale"), ("transport", "spoofed-client")]:
        assert metric(text, "pbft_dropped_messages_total", layer=layer, reason=reason) >= 1, (layer, reason)
    assert metric(text, "pbft_dropped_messages_total", layer="protocol") + \
        metric(text, "pbft_dropped_messages_total", layer="transport") >= 10
    assert "Traceback" not in cluster.log_text(1)


def test_client_reports_no_quorum_clearly(tmp_path):
    lc = LocalCluster(tmp_path / "c")
    lc.start(0)
    lc.start(1)
    try:
        with BlockingClient(lc.dir, wait_s=0.5) as bc:
            with pytest.raises(NoQuorumError, match=r"connected to \d of 4 replicas"):
                bc.invoke(msgpack.packb(["get", b"k"]), timeout=1.0)
    finally:
        lc.stop()


# ---------------------------------------------------------------------------
# the command line on a real cluster
# ---------------------------------------------------------------------------

def pbft(*args, timeout=30, check=False):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "pbft.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.slow
def test_kv_and_status_commands(cluster):
    assert pbft("kv", cluster.dir, "put", "colour", "blue", check=True).stdout.strip() == "ok"
    assert pbft("kv", cluster.dir, "get", "colour", check=True).stdout.strip() == "blue"
    p = pbft("kv", cluster.dir, "cas", "colour", "red", "green")
    assert p.returncode == 1 and "not swapped" in p.stdout
    assert pbft("kv", cluster.dir, "cas", "colour", "blue", "green", check=True).stdout.strip() == "swapped"
    assert pbft("kv", cluster.dir, "get", "missing").returncode == 1
    cluster.kill(3)
    p = pbft("status", cluster.dir)
    assert p.returncode == 0, p.stderr  # a quorum is up
    lines = p.stdout.splitlines()
    assert "UNREACHABLE" in lines[4] and "active" in lines[1]
    rows = json.loads(pbft("status", cluster.dir, "--json", check=True).stdout)
    assert [r["reachable"] for r in rows] == [True, True, True, False]
    assert rows[0]["primary"] == 0 and rows[0]["last_executed"] >= 1


@pytest.mark.slow
def test_up_restarts_a_killed_replica_and_stops_the_cluster_cleanly(tmp_path):
    from helpers.netutil import free_base_port
    d = tmp_path / "c"
    pbft("init", d, "--replicas", 4, "--base-port", free_base_port(200), check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    up = subprocess.Popen([sys.executable, "-m", "pbft.cli", "up", str(d), "--quiet"], stderr=subprocess.PIPE,
                          text=True, env=env)
    try:
        deadline = time.time() + 20
        while True:
            p = pbft("kv", d, "put", "x", "1", "--timeout", "3")
            if p.returncode == 0:
                break
            assert time.time() < deadline, p.stderr
        # a replica killed under `pbft up` is started again while the others go on
        from pbft.runtime.cluster import load_cluster
        pidfile = load_cluster(d).storage.replica_dir(d, 2) / "pid"
        victim = int(pidfile.read_text())
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 20
        while True:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                pid = victim
            if pid != victim and pbft("status", d, "--json", "--timeout", "1").returncode == 0:
                rows = json.loads(pbft("status", d, "--json", "--timeout", "1").stdout)
                if all(r["reachable"] for r in rows):
                    break
            assert time.time() < deadline, "replica 2 was not restarted"
            time.sleep(0.3)
        assert up.poll() is None
        assert pbft("kv", d, "get", "x", "--timeout", "5", check=True).stdout.strip() == "1"
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=15)
        assert up.returncode == 0, err
        assert "replica 2 exited with status -9" in err and "replica 2 restarted" in err
        assert "1 restart(s)" in err and "stopped" in err
        assert "Traceback" not in err
    finally:
        if up.poll() is None:
            up.kill()
    # nothing is left listening
    p = pbft("status", d, "--timeout", "0.3")
    assert p.returncode == 1 and p.stdout.count("UNREACHABLE") == 4


def test_service_exception_gives_every_replica_the_same_error_result(tmp_path):
    lc = LocalCluster(tmp_path / "c", service="tests_support_boom:BoomService")
    (tmp_path / "tests_support_boom.py").write_text(
        "from pbft.services.kv import KVService\n"
        "class BoomService(KVService):\n"
        "    def execute(self, op, client, nondet, read_only):\n"
        "        if b'boom' in op:\n"
        "            raise RuntimeError('service bug')\n"
        "        return super().execute(op, client, nondet, read_only)\n")
    os.environ["PYTHONPATH"] = str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        lc.start_all()
        with BlockingClient(lc.dir) as bc:
            kv = kv_of(bc)
            kv.put(b"a", b"1")
            from pbft.core.normal_case import SERVICE_ERROR_RESULT
            from pbft.services.kv import encode_op
            assert bc.invoke(encode_op("put", b"boom", b"x"), timeout=10) == SERVICE_ERROR_RESULT
            kv.put(b"b", b"2")  # the cluster goes on
            assert kv.get(b"a") == b"1" and kv.get(b"b") == b"2"
        st = [lc.status(i) for i in range(4)]
        assert {s["view"] for s in st} == {0}, "no view change: every replica answered the same way"
        assert all(s["counts"].get("service-exception") == 1 for s in st), st
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
        lc.stop()


def test_port_in_use_and_bad_client_id_are_one_line_errors(cluster, tmp_path):
    # replica 1 is already running: a second one cannot open its store (locked) ...
    p = pbft("replica", cluster.dir, "--id", 1)
    assert p.returncode == 2 and "is in use by another process" in p.stderr and "Traceback" not in p.stderr
    # ... and one with a store of its own (a copy of the cluster's files without its data)
    # cannot bind the port
    other = tmp_path / "copy"
    shutil.copytree(cluster.dir, other, ignore=shutil.ignore_patterns("data"))
    p = pbft("replica", other, "--id", 1)
    assert p.returncode == 2 and "cannot listen on" in p.stderr and "Traceback" not in p.stderr
    p = pbft("kv", cluster.dir, "get", "x", "--client", 0)
    assert p.returncode == 2 and "is not a client id" in p.stderr and "Traceback" not in p.stderr
