"""``pbft bench-recovery``, small: a live cluster under load in which every replica recovers in
turn (the primary last, with a view change). Asserted: what cannot flake (every recovery ends,
every write reads back, the checkpoints agree, the report is complete), not the figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.netutil import ROOT, SRC


@pytest.mark.slow
def test_bench_recovery_small_run(tmp_path):
    import os

    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + ROOT)
    out = subprocess.run([sys.executable, "-m", "pbft.cli", "bench-recovery", "--keys", "150", "--clients", "2",
                          "--quiet-s", "1", "--value-bytes", "200", "--json"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["correct"] and res["replicas"] == 4 and res["default_period_s"] == 240.0
    (row,) = res["sizes"]
    assert row["keys"] == 150 and row["state_bytes"] == 150 * 200
    assert [r["replica"] for r in row["recoveries"]] == [3, 2, 1, 0]  # the watchdog's order
    for r in row["recoveries"]:
        assert r["recovery_s"] > 0 and r["protocol_s"] is not None and r["protocol_s"] <= r["recovery_s"]
    assert row["writes_checked"] > 0 and row["writes_wrong"] == 0 and row["checkpoints_agree"]
    assert row["normal_ops_s"] > 0 and row["fraction"] >= 0 and isinstance(row["pass"], bool)
    assert res["pass"] == row["pass"] == (row["fraction"] >= res["floor"])


def test_bench_recovery_refuses_bad_arguments(tmp_path):
    import os

    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + ROOT)
    for bad, what in ((["--keys", "10,x"], "--keys"), (["--keys", "0"], "--keys"), (["--replicas", "3"], "--replicas"),
                      (["--value-bytes", "10"], "--value-bytes"), (["--floor", "2"], "--floor")):
        out = subprocess.run([sys.executable, "-m", "pbft.cli", "bench-recovery", *bad], capture_output=True,
                             text=True, timeout=60, env=env, cwd=tmp_path)
        assert out.returncode == 2 and what in out.stderr, (bad, out.stderr)
