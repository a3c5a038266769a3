"""`pbft bench`: short real runs (replica processes on loopback) and its argument errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbft.tools.bench import parse_op, percentile, ratios, summarize, sweep_counts
from pbft.config import ConfigError
from pbft.services.null import NullService, make_op

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENTRY_KEYS = {"ops_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "ops", "errors", "clients"}


def bench(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pbft.tools.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def check_result(out: dict, clients: int) -> None:
    for key in ("replicated", "unreplicated"):
        e = out[key]
        assert ENTRY_KEYS <= e.keys(), e
        assert e["clients"] == clients
        assert e["ops"] > 0 and e["ops_per_s"] > 0
        assert 0 < e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["max_ms"]
        assert e["errors"] == 0
    r = out["ratio"]
    for k in ("ops_per_s", "p50_ms", "p99_ms"):
        want = out["replicated"][k] / out["unreplicated"][k]
        # (ratios are rounded to 4 decimal places)
        assert r[k] == pytest.approx(want, rel=2e-3, abs=5e-5), (k, r, out)


@pytest.mark.slow
def test_bench_json_read_write():
    p = bench("--duration", "1.5", "--clients", "4", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # stdout holds exactly one JSON object
    assert out["op"] == "0/0" and out["read_only"] is False and out["replicas"] == 4 and out["faults"] == 1
    check_result(out, 4)
    assert "sweep" not in out


@pytest.mark.slow
def test_bench_read_only_two_client_processes():
    p = bench("--read-only", "--op", "0/4", "--duration", "1", "--clients", "4", "--client-procs", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["read_only"] is True and out["op"] == "0/4" and out["client_procs"] == 2
    check_result(out, 4)


@pytest.mark.slow
def test_bench_sweep_writes_plot(tmp_path):
    png = tmp_path / "lat.png"
    p = bench("--sweep", "--clients", "4", "--duration", "0.4", "--warmup", "0.2", "--op", "4/0", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = p.stdout.splitlines()
    assert lines[0].startswith("pbft bench: op 4/0 (read-write), 4 replicas (f=1, durable storage)")
    # one group of three rows (replicated, unreplicated, ratio) per client count 1, 2, 4
    assert [int(x.split()[0]) for x in lines if x.split() and x.split()[0].isdigit()] == [1, 2, 4]
    assert sum("replicated/unreplicated" in x for x in lines) == 3
    assert f"plot written to {png}" in p.stdout


@pytest.mark.parametrize("argv, words", [
    (["--op", "3"], "--op must be a/b"),
    (["--op", "0/x"], "--op must be a/b"),
    (["--op", "1/2/3"], "--op must be a/b"),
    (["--op", "0/64"], "between 0 and 32"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--duration", "0"], "--duration"),
    (["--plot", "out.svg"], ".png"),
])
def test_bench_bad_arguments_are_one_line_errors(argv, words):
    p = bench(*argv, timeout=30)
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr and "Traceback" not in p.stderr


def test_null_service_and_helpers():
    s = NullService()
    assert s.execute(make_op(0, 0), 5, b"", False) == b""
    assert s.execute(make_op(0, 4096), 5, b"", True) == bytes(4096)
    op = make_op(4096, 0)
    assert len(op) == 4096 and s.execute(op, 5, b"", False) == b""
    assert s.execute(b"\xff\xff\xff\xff", 5, b"", False) == b""  # oversized result refused
    state = s.get_state()
    assert int.from_bytes(state, "big") == 3  # read-write operations counted, the read-only one not
    t = NullService()
    t.set_state(state)
    assert t.get_state() == state
    with pytest.raises(ValueError):
        t.set_state(b"x")
    assert parse_op("0/4") == (0, 4096) and parse_op("4/0") == (4096, 0)
    with pytest.raises(ConfigError):
        parse_op("-1/0")
    assert sweep_counts(32) == [1, 2, 4, 8, 16, 32] and sweep_counts(20) == [1, 2, 4, 8, 16, 20]
    assert sweep_counts(1) == [1]
    xs = sorted(range(1, 101))
    assert percentile(xs, 50) == 50 and percentile(xs, 99) == 99 and percentile(xs, 100) == 100
    a = summarize([0.001, 0.002, 0.003, 0.004], 0, 2.0, 4)
    assert a["ops_per_s"] == 2.0 and a["p50_ms"] == 2.0 and a["p99_ms"] == 4.0
    b = summarize([0.001] * 8, 0, 2.0, 4)
    assert ratios(a, b)["ops_per_s"] == 0.5 and ratios(a, b)["p50_ms"] == 2.0
