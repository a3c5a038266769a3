"""The server processes' CPU scheduling policy (``[runtime] scheduling``, ``runtime.sched``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.netutil import SRC
from pbft.runtime.cluster import init_cluster, load_cluster

linux_batch = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")

PROBE = """
import os, sys, threading
from pbft.runtime.sched import apply_scheduling, current_scheduling
got = apply_scheduling(sys.argv[1])
seen = []
t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
t.start(); t.join()
print(got, current_scheduling(), os.sched_getscheduler(0) == os.SCHED_BATCH, seen[0] == os.SCHED_BATCH)
"""


def _probe(policy: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, env=env,
                         timeout=30, check=True)
    return out.stdout.split()


@linux_batch
def test_batch_applies_to_the_process_and_its_later_threads():
    # in a child process: the policy would stay with the test process otherwise
    assert _probe("batch") == ["batch", "batch", "True", "True"]


@linux_batch
def test_normal_leaves_the_policy_alone():
    assert _probe("normal") == ["normal", "normal", "False", "False"]


def test_init_writes_the_default_and_load_reads_it(tmp_path):
    init_cluster(tmp_path, 4, None, None, 7000, 2)
    assert 'scheduling = "batch"' in (tmp_path / "cluster.toml").read_text()
    assert load_cluster(tmp_path).runtime.scheduling == "batch"
    init_cluster(tmp_path, 4, None, None, 7000, 2, runtime={"scheduling": "normal"}, force=True)
    assert load_cluster(tmp_path).runtime.scheduling == "normal"


@linux_batch
def test_a_replica_process_runs_under_the_configured_policy(tmp_path):
    import json
    import signal
    import time

    from helpers.netutil import free_base_port

    d = tmp_path / "c"
    init_cluster(d, 4, None, None, free_base_port(20), 1, metrics_base_port=free_base_port(20))
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "r0.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pbft.cli", "replica", str(d), "--id", "0"],
                                stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True)
    try:
        deadline = time.time() + 30
        while '"started"' not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        started = next(json.loads(line) for line in log.read_text().splitlines() if '"started"' in line)
        assert started["scheduling"] == "batch"
        assert os.sched_getscheduler(proc.pid) == os.SCHED_BATCH
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
