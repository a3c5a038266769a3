"""The `pbft sim` command line, as later checks call it."""

import json
import re
import subprocess
import sys

import pytest

SUMMARY = re.compile(r"^runs=(\d+) ops_committed=(\d+) view_changes=(\d+) violations=(\d+) liveness_failures=(\d+)$")


def pbft(*args):
    return subprocess.run([sys.executable, "-m", "pbft.tools.cli", *args], capture_output=True, text=True, timeout=300)


def test_sim_summary_line_and_exit_code():
    p = pbft("sim", "--seeds", "3", "--replicas", "4", "--faults", "crash,loss,dup,reorder,delay,replay,partition")
    assert p.returncode == 0, p.stdout + p.stderr
    m = SUMMARY.match(p.stdout.strip().splitlines()[-1])
    assert m and m.group(1) == "3" and int(m.group(2)) > 0 and m.group(4) == "0"


def test_sim_json():
    p = pbft("sim", "--seeds", "2", "--first-seed", "7", "--replicas", "7", "--clients", "2", "--ops", "10", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert {"runs", "ops_committed", "view_changes", "violations", "liveness_failures"} <= out.keys()
    assert out["runs"] == 2 and out["violations"] == 0


@pytest.mark.slow
def test_injected_bug_fails_with_reproduction_command():
    p = pbft("sim", "--seeds", "20", "--faults", "all", "--inject-bug", "no-timestamp-check")
    assert p.returncode == 1
    assert "FAIL seed" in p.stdout
    repro = [line for line in p.stdout.splitlines() if "reproduce:" in line][0].split("reproduce: ")[1]
    assert "--inject-bug no-timestamp-check" in repro and "--first-seed" in repro


def test_bad_arguments_are_one_line_errors():
    p = pbft("sim", "--faults", "meteor")
    assert p.returncode == 2 and "unknown fault" in p.stderr and "Traceback" not in p.stderr
    p = pbft("sim", "--seeds", "1", "--replicas", "0")
    assert p.returncode == 2 and "replicas" in p.stderr and "Traceback" not in p.stderr


def test_simulated_demo_runs():
    p = pbft("demo", "--simulated")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "view change" in p.stdout and "replicas agree" in p.stdout


@pytest.mark.slow
def test_live_demo_runs_a_real_cluster_through_a_primary_crash_and_a_recovery():
    p = pbft("demo", "--phase-seconds", "1.5")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "killing the primary, replica 0, with SIGKILL" in out
    assert "view change complete: view 1, new primary replica 1" in out
    assert "rejoined in view" in out and "caught up" in out
    assert "proactive recovery of replica 2" in out and "replica 2 recovered in" in out
    assert "all hold their last acknowledged value" in out
    assert "  result                  : OK" in out
    from pbft.services.bfs.demo import why_not
    if why_not() is None:  # the file system part runs where FUSE can be mounted
        assert "checksums match" in out and "all 30 files intact" in out
        assert out.rstrip().endswith("BFS result              : OK")
    else:
        assert "BFS file system demo skipped" in out
