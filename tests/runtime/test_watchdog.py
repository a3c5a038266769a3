"""The external watchdog (``pbft watchdog``, tools.guard): a process of its own that triggers a
replica's recovery at its turn and restarts it when it is gone; and the systemd units that run
replica, signer and watchdog as three users."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.netutil import ROOT, SRC, LocalCluster
from pbft.config import ConfigError
from pbft.runtime.cluster import init_cluster, load_cluster, recovery_phase_s
from pbft.tools.guard import next_turn, systemd_units

PROTOCOL = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
PERIOD_S = 4.0


def test_next_turn_is_the_replicas_offset():
    # replica i of n at offset (n-1-i)*period/n of every period (replica n-1 first), strictly after now
    assert next_turn(1000.0, 8.0, 1, 4) == 1004.0
    assert next_turn(1004.0, 8.0, 1, 4) == 1012.0
    assert next_turn(1003.5, 8.0, 3, 4) == 1008.0
    assert next_turn(1003.5, 8.0, 0, 4) == 1006.0
    for now in (0.0, 17.3, 1e9 + 0.25):
        t = next_turn(now, 8.0, 2, 4)
        assert now < t <= now + 8.0 and (t - 2.0) % 8.0 == pytest.approx(0.0, abs=1e-6)


def test_recovery_watchdog_setting(tmp_path):
    c = init_cluster(tmp_path / "a", 4, recovery={"period_s": 4.0, "watchdog": "external"})
    assert load_cluster(c.dir).recovery.watchdog == "external"
    assert init_cluster(tmp_path / "b", 4).recovery.watchdog == "internal"
    text = (c.dir / "cluster.toml").read_text().replace('watchdog = "external"', 'watchdog = "cron"')
    (c.dir / "cluster.toml").write_text(text)
    with pytest.raises(ConfigError, match="internal"):
        load_cluster(c.dir)


def test_systemd_units(tmp_path):
    c = init_cluster(tmp_path / "c", 4)
    pbft = str(Path(sys.executable).parent / "pbft")  # (systemd checks that it is an executable)
    units = systemd_units(c.dir, 2, "pbft", "pbft-key", "pbft-wd", pbft, "kv",
                          c.storage.replica_dir(c.dir, 2))
    assert sorted(units) == ["pbft-replica-2.service", "pbft-signer-2.service", "pbft-watchdog-2.service"]
    parsed = {}
    for name, text in units.items():
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read_string(text)
        parsed[name] = cp["Service"]
    sig, rep, wd = (parsed[f"pbft-{k}-2.service"] for k in ("signer", "replica", "watchdog"))
    assert (sig["User"], rep["User"], wd["User"]) == ("pbft-key", "pbft", "pbft-wd")
    assert sig["ExecStart"].startswith(f"{pbft} signer {c.dir.resolve()} --id 2 --socket ")
    sock = sig["ExecStart"].split("--socket ")[1].split()[0]
    assert rep["ExecStart"].endswith(f"--signer {sock}") and " replica " in rep["ExecStart"]
    assert rep["ExecStartPre"] == f"{pbft} integrity {c.dir.resolve()} --check"
    assert rep["ReadWritePaths"] == str(c.storage.replica_dir(c.dir, 2).resolve())  # not keys/ nor cluster.toml
    assert wd["ExecStart"] == f"{pbft} watchdog {c.dir.resolve()} --id 2 --restart kill"
    assert wd["AmbientCapabilities"] == "CAP_KILL"
    assert "Requires=pbft-signer-2.service" in units["pbft-replica-2.service"]
    if shutil.which("systemd-analyze"):  # systemd's own check of the files, where it is installed
        for name, text in units.items():
            (tmp_path / name).write_text(text)
            out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "pbft" not in out.stderr.replace(str(tmp_path), ""), out.stderr


def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(errors="replace").splitlines() if x.startswith("{")]


@pytest.mark.slow
def test_watchdog_recovers_at_its_turn_and_restarts(tmp_path):
    lc = LocalCluster(tmp_path / "c", 4, protocol=PROTOCOL)
    toml = lc.dir / "cluster.toml"
    toml.write_text(re.sub(r"period_s = .*", f"period_s = {PERIOD_S}", toml.read_text())
                    .replace('watchdog = "internal"', 'watchdog = "external"'))
    lc.cluster = load_cluster(lc.dir)
    assert lc.cluster.recovery.watchdog == "external" and lc.cluster.recovery.period_s == PERIOD_S
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + ROOT
    wlog = tmp_path / "watchdog.log"
    spawned = None
    started: list[int] = []
    with lc:
        lc.start_all()
        fh = open(wlog, "ab")
        wd = subprocess.Popen([sys.executable, "-m", "pbft.cli", "watchdog", str(lc.dir), "--id", "1",
                               "--check-s", "0.2", "--unresponsive-s", "2", "--log", str(tmp_path / "spawned-1.log")],
                              stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True)
        fh.close()
        try:
            lc.wait_for(lambda: any(e["event"] == "watchdog-recover" for e in _events(wlog)), timeout=PERIOD_S + 10,
                        what="the watchdog's first turn")
            ev = _events(wlog)
            i = next(k for k, e in enumerate(ev) if e["event"] == "watchdog-recover")
            rec = ev[i]
            turn = [e["next_turn"] for e in ev[:i] if "next_turn" in e][-1]  # the turn it announced last
            # when it said: replica 1's turn (offset 2/4 of the period: replica 3 goes first), within a
            # few check intervals (a loaded machine delays its checks), and the replica rebooted then
            assert turn <= rec["ts"] <= turn + 2.0, ev
            phase = recovery_phase_s(1, 4, PERIOD_S)
            assert phase == PERIOD_S / 2
            assert min((turn - phase) % PERIOD_S, PERIOD_S - (turn - phase) % PERIOD_S) < 1e-3
            assert rec["pid"] == lc.procs[1].pid
            # (the watchdog signals, then logs; the replica logs its reboot when its loop gets to it)
            lc.wait_for(lambda: any(e["event"] == "recovery-reboot" for e in _events(lc.logs[1])), timeout=10,
                        what="replica 1 rebooting")
            reboot = next(e for e in _events(lc.logs[1]) if e["event"] == "recovery-reboot")
            assert rec["ts"] - 0.1 <= reboot["ts"] <= rec["ts"] + 2.0, (rec, reboot)
            lc.wait_for(lambda: (s := lc.status(1))["recoveries"] >= 1 and s["recovering"] is None, timeout=40,
                        what="replica 1 recovered")
            lc.wait_for(lambda: any(e["event"] == "watchdog-recovered" for e in _events(wlog)), timeout=10,
                        what="the watchdog seeing the recovery")
            assert "recovery-reboot" in lc.log_text(1)
            # the in-process timer is off ("external"): replica 1's reboot is the watchdog's
            assert '"event": "watchdog"' not in lc.log_text(1)
            # gone: started again, with a recovery
            old = lc.procs[1].pid
            lc.kill(1)
            st = lc.wait_for(lambda: (s := lc.status(1))["pid"] != old and s, timeout=30,
                             what="replica 1 started again by the watchdog")
            spawned = st["pid"]
            assert any(e["event"] == "watchdog-replica-started" and e["old_pid"] == old and e["pid"] == spawned
                       for e in _events(wlog))
            lc.wait_for(lambda: '"event": "recovered"' in (tmp_path / "spawned-1.log").read_text(), timeout=40,
                        what="the restarted replica 1 recovered")
            # hung (stopped): killed and started again
            os.kill(spawned, signal.SIGSTOP)
            st = lc.wait_for(lambda: (s := lc.status(1))["pid"] != spawned and s, timeout=30,
                             what="the hung replica 1 replaced by the watchdog")
            hung = [e for e in _events(wlog) if e["event"] == "watchdog-replica-started" and e["old_pid"] == spawned]
            assert len(hung) == 1 and hung[0]["reason"] == "not answering" and hung[0]["pid"] == st["pid"]
            with pytest.raises(ProcessLookupError):  # (SIGKILL ends a stopped process)
                os.kill(spawned, 0)
            spawned = st["pid"]
        finally:
            wd.send_signal(signal.SIGTERM)
            wd.wait(10)
            started = [e["pid"] for e in _events(wlog) if e["event"] == "watchdog-replica-started"]
            for pid in started:  # (the replicas it started are not its children any more)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for pid in started:
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)
    assert any(e["event"] == "watchdog-stopped" for e in _events(wlog))
    assert len(started) == 2 and started[-1] == spawned  # one restart for the kill, one for the hang


@pytest.mark.slow
def test_recovery_asked_for_during_a_reboot_does_not_kill_the_replica(tmp_path):
    """SIGUSR1 (what `pbft recover` and the watchdog send) arriving while a replica reboots by
    exec, before the new process has its handler, would end it (the default action): it is
    ignored through the exec instead."""
    with LocalCluster(tmp_path / "c", 4, protocol=PROTOCOL) as lc:
        lc.start_all()
        p = lc.procs[1]
        deadline = time.time() + 3.0
        while time.time() < deadline:  # a recovery asked for again and again through its reboots
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.02)
            assert p.poll() is None, lc.log_text(1)[-2000:]
        lc.wait_for(lambda: (s := lc.status(1))["recoveries"] >= 1 and s["recovering"] is None, timeout=40,
                    what="replica 1 recovered")
        assert p.poll() is None and lc.log_text(1).count("recovery-reboot") >= 2
