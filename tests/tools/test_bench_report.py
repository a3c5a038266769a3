"""`pbft bench --report`: the targets' table (ratios, met or not), CPU accounting from /proc (a
fake /proc and a fake reader), the printed table, and one short real run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbft.tools.bench.report import print_targets
from pbft.tools.bench.targets import (CpuMeter, build_rows, cpu_per_op, met, proc_cpu_s, proc_wait_s, runs_native,
                                      targets)

SRC = str(Path(__file__).resolve().parents[2] / "src")
TCK = os.sysconf("SC_CLK_TCK")


def bench(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pbft.tools.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def point(ops_per_s, p50_ms, cpu_us=None, clients=32, op="0/0", ro=False):
    p = {"ops_per_s": ops_per_s, "p50_ms": p50_ms, "clients": clients, "op": op, "read_only": ro, "ops": 100,
         "p99_ms": p50_ms * 2, "errors": 0}
    if cpu_us is not None:
        p["cpu"] = {"all_us_per_op": cpu_us}
    return p


def all_points():
    return {
        "memory:0/0 rw": point(6000.0, 5.0, cpu_us=300.0),
        "memory:0/0 rw 1": point(1000.0, 0.9, clients=1),
        "memory:0/0 ro 1": point(4000.0, 0.26, clients=1, ro=True),
        "memory:4/0 rw": point(4500.0, 6.0, op="4/0"),
        "memory:0/4 rw": point(5000.0, 5.5, op="0/4"),
        "durable:0/0 rw": point(4800.0, 6.0, cpu_us=400.0),
        "unreplicated:0/0 rw": point(24000.0, 1.2, cpu_us=30.0),
        "unreplicated:0/0 rw 1": point(6000.0, 0.3, clients=1),
        "unreplicated:0/0 ro 1": point(6000.0, 0.2, clients=1, ro=True),
        "unreplicated:4/0 rw": point(10000.0, 2.0, op="4/0"),
        "unreplicated:0/4 rw": point(10000.0, 2.0, op="0/4"),
    }


def test_rows_ratios_and_verdicts():
    rows = {r["key"]: r for r in build_rows(all_points(), 32)}
    assert list(rows) == [t.key for t in targets(32)] == ["rw", "durable", "rw1", "ro1", "4/0", "0/4", "cpu"]
    r = rows["rw"]
    assert (r["replicated"], r["baseline"], r["ratio"], r["met"]) == (6000.0, 24000.0, 0.25, False)
    # durable against the memory-storage cluster, not against the unreplicated server
    r = rows["durable"]
    assert (r["baseline"], r["ratio"], r["met"]) == (6000.0, 0.8, True)  # exactly the bound is met
    assert rows["rw1"]["ratio"] == 3.0 and rows["rw1"]["met"] is True  # <= 3.0
    assert rows["ro1"]["ratio"] == 1.3 and rows["ro1"]["met"] is True
    assert rows["4/0"]["ratio"] == 0.45 and rows["4/0"]["met"] is True
    assert rows["0/4"]["ratio"] == 0.5 and rows["0/4"]["met"] is True
    # the CPU target applies to the replicated figure itself; the ratio is only shown
    r = rows["cpu"]
    assert (r["replicated"], r["baseline"], r["ratio"], r["target_on"], r["met"]) == (300.0, 30.0, 10.0, "value", False)
    assert "32 clients" in rows["rw"]["measure"] and "4 clients" in build_rows(all_points(), 4)[0]["measure"]


def test_rows_just_past_the_bounds_and_missing_points():
    pts = all_points()
    pts["memory:0/0 rw 1"]["p50_ms"] = 0.9003  # ratio 3.001
    pts["memory:0/0 rw"]["cpu"]["all_us_per_op"] = 140.0
    pts["durable:0/0 rw"]["ops_per_s"] = 4799.0  # ratio 0.7998
    del pts["unreplicated:0/4 rw"]
    del pts["unreplicated:0/0 rw"]["cpu"]
    rows = {r["key"]: r for r in build_rows(pts, 32)}
    assert rows["rw1"]["met"] is False
    assert rows["cpu"]["met"] is True and rows["cpu"]["baseline"] is None and rows["cpu"]["ratio"] is None
    assert rows["durable"]["ratio"] == 0.7998 and rows["durable"]["met"] is False
    assert rows["0/4"]["baseline"] is None and rows["0/4"]["ratio"] is None and rows["0/4"]["met"] is None
    assert met(None, ">=", 1.0) is None and met(2.0, ">=", 1.0) and not met(2.0, "<=", 1.0)
    # a zero baseline gives no ratio rather than a division by zero
    pts["unreplicated:4/0 rw"]["ops_per_s"] = 0.0
    assert {r["key"]: r for r in build_rows(pts, 32)}["4/0"]["ratio"] is None


def test_proc_cpu_s_reads_user_and_system_time(tmp_path):
    # a command name with spaces and parentheses, as Linux writes it in field 2
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", str(3 * TCK), str(TCK // 2 or 1), "7", "8"]
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (py (x) y) " + " ".join(fields) + "\n")
    assert proc_cpu_s(42, str(tmp_path)) == pytest.approx(3 + (TCK // 2 or 1) / TCK)
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "stat").write_text("43 (short) S 1 1\n")
    with pytest.raises(ValueError):
        proc_cpu_s(43, str(tmp_path))
    with pytest.raises(OSError):
        proc_cpu_s(44, str(tmp_path))
    assert proc_cpu_s(os.getpid()) > 0  # this process, from the real /proc
    (tmp_path / "42" / "schedstat").write_text("123456789 2500000000 77\n")
    assert proc_wait_s(42, str(tmp_path)) == 2.5
    (tmp_path / "43" / "schedstat").write_text("garbage\n")
    assert proc_wait_s(43, str(tmp_path)) is None and proc_wait_s(44, str(tmp_path)) is None
    (tmp_path / "42" / "maps").write_text("7f00-7f01 r-xp 0 fd:01 5 /x/lib-1/pbft_native__mypyc.cpython-311.so\n")
    (tmp_path / "43" / "maps").write_text("7f00-7f01 r-xp 0 fd:01 5 /usr/lib/libc.so.6\n")
    assert runs_native(42, str(tmp_path)) is True and runs_native(43, str(tmp_path)) is False
    assert runs_native(44, str(tmp_path)) is None


def test_cpu_accounting_per_kind_from_a_fake_reader():
    clock = {101: 1.0, 102: 2.0, 103: 2.0, 104: 2.0, 200: 5.0}
    waits = {101: 0.5, 102: 0.5, 103: 0.5, 104: 0.5, 200: 0.5}
    gone: set[int] = set()

    def reader(pid):
        if pid in gone:
            raise OSError("gone")
        return clock[pid], waits.get(pid)

    kinds = {101: "primary", 102: "backup", 103: "backup", 104: "backup", 200: "client"}
    meter = CpuMeter(kinds, reader)
    before = meter.sample()
    for pid, used in {101: 0.40, 102: 0.30, 103: 0.32, 104: 0.28, 200: 0.25}.items():
        clock[pid] += used
        waits[pid] += used / 10
    after = meter.sample()
    c = cpu_per_op(meter.kinds, before, after, ops=1000.0, seconds=1.0)
    assert c is not None
    assert c["all_us_per_op"] == pytest.approx(1550.0)  # 1.55 CPU seconds over 1,000 operations
    assert c["primary_us_per_op"] == pytest.approx(400.0)
    assert c["backup_us_per_op"] == pytest.approx(900.0) and c["backup_avg_us_per_op"] == pytest.approx(300.0)
    assert c["client_us_per_op"] == pytest.approx(250.0)
    assert c["cores_busy"] == pytest.approx(1.55) and c["missing"] == 0
    assert c["wait_us_per_op"] == pytest.approx(155.0)
    assert c["processes"] == {"primary": 1, "backup": 3, "client": 1}
    # a process gone before the second sample is left out of the sums and counted
    gone.add(104)
    c = cpu_per_op(meter.kinds, before, meter.sample(), ops=1000.0, seconds=1.0)
    assert c["missing"] == 1 and c["processes"]["backup"] == 2
    assert c["all_us_per_op"] == pytest.approx(1270.0) and c["backup_avg_us_per_op"] == pytest.approx(310.0)
    # a process whose run-queue wait is not known: no total wait rather than a partial one
    del waits[101]
    c = cpu_per_op(meter.kinds, before, meter.sample(), ops=1000.0, seconds=1.0)
    assert c["wait_us_per_op"] is None and c["primary_us_per_op"] == pytest.approx(400.0)
    assert cpu_per_op(kinds, before, after, ops=0, seconds=1.0) is None
    assert cpu_per_op(kinds, before, after, ops=10, seconds=0.0) is None


def test_printed_table(capsys):
    pts = all_points()
    pts["memory:0/0 rw"]["cpu"] = {"all_us_per_op": 300.0, "primary_us_per_op": 80.0, "backup_avg_us_per_op": 60.0,
                                   "client_us_per_op": 40.0, "processes": {"primary": 1, "backup": 3, "client": 1},
                                   "cores_busy": 1.8, "window_s": 3.0, "missing": 0}
    res = {"report": build_rows(pts, 32), "points": pts, "replicas": 4, "faults": 1, "clients": 32,
           "client_procs": 1, "duration_s": 3.0, "warmup_s": 1.0,
           "load_average": {"before": [0.5, 1.0, 1.5], "after": [2.0, 1.25, 1.5]},
           "native": {"memory": True, "durable": False, "unreplicated": True}}
    print_targets(res)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "load average (1, 5, 15 min) before 0.5 1 1.5, after 2 1.25 1.5"
    assert out[2] == ("compiled modules: NOT in use by every process of durable (pure modules: slower; make native, "
                      "pbft native)")
    assert out[3].startswith("measure")
    table = out[4:11]
    assert [ln.split()[-1] for ln in table] == ["NO", "yes", "yes", "yes", "yes", "yes", "NO"]
    assert table[0].startswith("0/0 rw, 32 clients, memory: throughput") and "0.25" in table[0].split()
    assert table[1].startswith("0/0 rw, 32 clients: durable / memory throughput") and "0.80" in table[1].split()
    assert table[6].split()[-9:] == ["300.0", "µs", "30.0", "µs", "10.00", "<=", "140", "µs", "NO"]
    assert out[11].startswith("targets met: 5 of 7")
    assert any("primary 80.0, backups 60.0 each (3), client 40.0; all 300.0 µs/op" in ln for ln in out)
    assert sum(ln.startswith(("replicated ", "unreplicated ")) for ln in out) == 11


def test_report_refuses_sweep_and_plot():
    for extra in (["--sweep"], ["--plot", "x.png"]):
        p = bench("--report", *extra, timeout=30)
        assert p.returncode == 2 and p.stdout == ""
        assert "--report measures its own points" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_report_end_to_end_json():
    p = bench("--report", "--duration", "0.4", "--warmup", "0.2", "--clients", "4", "--client-procs", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    pts = out["points"]
    assert len(pts) == 11 and out["clients"] == 4
    for key, s in pts.items():
        assert s["ops"] > 0 and s["errors"] == 0, (key, s)
        cpu = s["cpu"]
        assert cpu is not None and cpu["missing"] == 0 and cpu["all_us_per_op"] > 0, (key, cpu)
        if key.startswith("unreplicated"):
            # the bench process and a load worker (one client process for the points of one client)
            assert cpu["processes"] == {"server": 1, "client": min(2, s["clients"])}
            kinds = cpu["server_us_per_op"] + cpu["client_us_per_op"]
        else:
            assert cpu["processes"] == {"primary": 1, "backup": 3, "client": min(2, s["clients"])}
            kinds = cpu["primary_us_per_op"] + cpu["backup_us_per_op"] + cpu["client_us_per_op"]
        assert kinds == pytest.approx(cpu["all_us_per_op"], abs=0.2)
        if os.path.exists("/proc/self/schedstat"):  # (kernels without CONFIG_SCHEDSTATS: None, said so)
            assert cpu["wait_us_per_op"] is not None and cpu["wait_us_per_op"] >= 0
    assert pts["memory:0/0 ro 1"]["read_only"] is True and pts["memory:4/0 rw"]["op"] == "4/0"
    assert pts["memory:0/0 rw 1"]["clients"] == 1 and pts["durable:0/0 rw"]["clients"] == 4
    assert len(out["load_average"]["before"]) == 3 and len(out["load_average"]["after"]) == 3
    assert set(out["native"]) == {"memory", "durable", "unreplicated"}
    assert all(v in (True, False) for v in out["native"].values())
    rows = out["report"]
    assert [r["key"] for r in rows] == ["rw", "durable", "rw1", "ro1", "4/0", "0/4", "cpu"]
    for r in rows:
        assert r["replicated"] > 0 and r["baseline"] > 0
        # (the ratio is rounded to 4 decimal places)
        assert r["ratio"] == pytest.approx(r["replicated"] / r["baseline"], rel=1e-3, abs=5e-5)
        v = r["ratio"] if r["target_on"] == "ratio" else r["replicated"]
        op, bound = r["target"].split()
        assert r["met"] is (v >= float(bound) if op == ">=" else v <= float(bound))
    assert rows[0]["replicated"] == pts["memory:0/0 rw"]["ops_per_s"]
    assert rows[1]["replicated"] == pts["durable:0/0 rw"]["ops_per_s"]
    assert rows[6]["replicated"] == pts["memory:0/0 rw"]["cpu"]["all_us_per_op"]
