"""Proactive recovery on the real runtime: a replica whose store was corrupted on disk is
rebooted, checked against the others and repaired, and one whose memory was corrupted repairs
itself at its next checkpoint, while clients keep being served."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.netutil import SRC, LocalCluster
from pbft import BlockingClient
from pbft.services.kv import KVClient

PROTOCOL = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
MARK = b"VICTIM-PAGE!"


class Writer:
    """A client writing in the background, counting what it got done and what failed."""

    def __init__(self, lc: LocalCluster, client: int):
        self.lc, self.client = lc, client
        self.done = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        with BlockingClient(self.lc.dir, self.lc.cluster.client_ids[self.client]) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            while not self.stop.is_set():
                try:
                    kv.put(b"bg-%d" % (self.done % 50), b"%d" % self.done)
                    self.done += 1
                except Exception as e:  # noqa: BLE001 - asserted on by the test
                    self.errors.append(repr(e))
                    return

    def finish(self):
        self.stop.set()
        self.t.join(30)


def recover(lc: LocalCluster, rid: int) -> None:
    out = subprocess.run([sys.executable, "-m", "pbft.cli", "recover", str(lc.dir), "--id", str(rid)],
                         capture_output=True, text=True, env={"PYTHONPATH": SRC}, timeout=30)
    assert out.returncode == 0, out.stderr


def wait_recovered(lc: LocalCluster, rid: int) -> dict:
    return lc.wait_for(lambda: (s := lc.status(rid))["recoveries"] >= 1 and s["recovering"] is None and s,
                       timeout=40.0, what=f"replica {rid} recovered")


def digests_agree(lc: LocalCluster, rid: int, other: int) -> bool:
    a, b = lc.status(rid), lc.status(other)
    return a["stable_checkpoint"] == b["stable_checkpoint"] and a["stable_digest"] == b["stable_digest"]


@pytest.mark.slow
def test_recovery_repairs_bytes_corrupted_in_the_store_on_disk(tmp_path):
    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        lc.start_all()
        with BlockingClient(lc.dir) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            kv.put(b"victim", MARK * 200)
            for j in range(100):
                kv.put(b"k%d" % j, b"x" * 100)
        lc.wait_for(lambda: lc.status(2)["stable_checkpoint"] >= 96, what="checkpoints written")
        hits = 0
        for name in ("data.mdb", "wal"):  # LMDB, and the durable mode's log in front of it
            with open(lc.cluster.storage.replica_dir(lc.dir, 2) / name, "r+b") as fh:
                data = fh.read()
                at = data.find(MARK * 4)
                while at >= 0:  # every copy the store holds of the value
                    fh.seek(at + 20)
                    fh.write(b"#")
                    hits += 1
                    at = data.find(MARK * 4, at + len(MARK) * 200)
        assert hits >= 1
        w = Writer(lc, 1)
        time.sleep(0.5)
        before = w.done
        recover(lc, 2)
        st = wait_recovered(lc, 2)
        time.sleep(0.5)
        w.finish()
        assert w.errors == [] and w.done > before + 10, (w.errors, before, w.done)
        assert st["restored"] == "state-repair", st["restored"]  # the damage was detected on load
        assert 1 <= st["state_transfer"]["objects"] < st["state_objects"] // 4, st["state_transfer"]
        lc.wait_for(lambda: digests_agree(lc, 2, 0), what="replica 2's checkpoints agree with replica 0's")
        assert "recovered" in lc.log_text(2) and "store-damaged" in lc.log_text(2)
        with BlockingClient(lc.dir) as bc:
            assert KVClient(bc.invoke, timeout=20.0).get(b"victim", read_only=False) == MARK * 200


def _view_changes(text: str) -> list[tuple[int, str]]:
    import json
    out = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("event") == "view-change":
            out.append((d["view"], d["reason"]))
    return out


def test_a_recovering_primary_hands_its_view_over_before_it_reboots(tmp_path):
    """The primary's recovery, while a client writes: it sends its ViewChange for view 1 when the
    recovery is asked for, before its process reboots, and the backups change view on that
    (``primary-left``), not on their request timers; restored in view 1, it finds the new view
    there (it does not move on alone to view 2) and recovers."""
    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        lc.start_all()
        w = Writer(lc, 0)
        lc.wait_for(lambda: w.done >= 20, what="the writer under way")
        recover(lc, 0)
        wait_recovered(lc, 0)
        lc.wait_for(lambda: (s := lc.status(0))["view"] == 1 and s["view_active"], what="replica 0 in view 1")
        before = w.done
        lc.wait_for(lambda: w.done >= before + 20, what="writes in view 1")
        w.finish()
        assert w.errors == [], w.errors
        assert _view_changes(lc.log_text(0)) == [(1, "primary-recovering")]
        for i in (1, 2, 3):
            assert _view_changes(lc.log_text(i)) == [(1, "primary-left")], (i, _view_changes(lc.log_text(i)))


def test_state_corrupted_in_memory_is_repaired_at_the_next_checkpoint(tmp_path, monkeypatch):
    """A value overwritten in replica 1's memory behind the library's back (then written through):
    its next checkpoint disagrees with the certified one, and it repairs itself at once, without
    a recovery: it fetches the objects that differ and says so (log line ``state-repair``, the
    ``state-repair`` count), while clients keep being served."""
    monkeypatch.setenv("PBFT_FAULT_INJECTION", "1")
    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        lc.start_all()
        with BlockingClient(lc.dir) as bc:
            kv = KVClient(bc.invoke, timeout=20.0)
            for j in range(40):
                kv.put(b"k%d" % j, b"value-%d" % j)
            lc.signal(1, signal.SIGUSR2)  # corrupt one value in replica 1's memory
            lc.wait_for(lambda: "fault-injected" in lc.log_text(1), what="the corruption")
            w = Writer(lc, 2)
            for j in range(40):  # more checkpoints: replica 1's next one disagrees with the others'
                kv.put(b"m%d" % j, b"more-%d" % j)
            lc.wait_for(lambda: "state-repair" in lc.log_text(1), what="replica 1 to repair its state")
            lc.wait_for(lambda: digests_agree(lc, 1, 0), what="replica 1's checkpoints agree again")
            w.finish()
            assert w.errors == [], w.errors
            st = lc.status(1)
            assert st["recoveries"] == 0 and st["counts"].get("state-repair", 0) >= 1, st["counts"]
            assert 1 <= st["state_transfer"]["objects"] < st["state_objects"] // 4, st["state_transfer"]
            assert "checkpoint-mismatch" in lc.log_text(1)
            for j in range(40):  # read-only: every replica's answer counts, replica 1's included
                assert kv.get(b"k%d" % j, read_only=True) == b"value-%d" % j


@pytest.mark.slow
def test_watchdog_recovers_replicas_in_turn_while_clients_are_served(tmp_path):
    """[recovery] period_s: every replica recovers once per period, at its own offset."""
    import re

    from pbft.runtime.cluster import CLUSTER_FILE

    with LocalCluster(tmp_path / "c", protocol=PROTOCOL) as lc:
        path = lc.dir / CLUSTER_FILE
        path.write_text(re.sub(r"period_s = .*", "period_s = 12.0", path.read_text()))
        lc.start_all()
        w = Writer(lc, 0)
        deadline = time.time() + 40
        done = set()
        while time.time() < deadline and len(done) < 2:
            for i in range(4):
                try:
                    if lc.status(i, timeout=0.5)["recoveries"] >= 1:
                        done.add(i)
                except OSError:
                    pass  # rebooting
            time.sleep(0.3)
        w.finish()
        assert len(done) >= 2, f"only replicas {sorted(done)} recovered"
        assert w.errors == [] and w.done > 50, (w.errors, w.done)
        for i in done:
            assert "watchdog" in lc.log_text(i)
