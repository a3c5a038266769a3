"""pbft.tools.procs, the one child-process supervisor: start, wait until ready, stop (SIGTERM,
then SIGKILL for a child that ignores it), a child's exit with its last log line, JSON lines."""

import queue
import signal
import time

import pytest

from pbft.config import ConfigError
from pbft.tools.procs import ChildExited, JsonLines, Procs


def test_start_wait_ready_and_stop(tmp_path):
    flag = tmp_path / "ready"
    with Procs(tmp_path) as procs:
        p = procs.start("sleeper", ["-c", f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"])
        procs.wait_ready(flag.exists, 30.0, "the sleeper did not start", [p])
        assert p.poll() is None
        t0 = time.monotonic()
        procs.stop([p])
        assert p.returncode == -signal.SIGTERM and time.monotonic() - t0 < 3.0
        assert procs.procs == []


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    flag = tmp_path / "ready"
    procs = Procs(tmp_path)
    code = (f"import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(flag)!r}).touch(); time.sleep(60)")
    p = procs.start("stubborn", ["-c", code])
    procs.wait_ready(flag.exists, 30.0, "the child did not start", [p])
    t0 = time.monotonic()
    procs.stop_all(grace=0.5)
    assert p.returncode == -signal.SIGKILL
    assert 0.4 < time.monotonic() - t0 < 5.0


def test_an_exited_child_is_reported_with_its_last_log_line(tmp_path):
    procs = Procs(tmp_path)
    p = procs.start("failing", ["-c", "import sys; print('first'); sys.stderr.write('it broke\\n'); sys.exit(3)"])
    p.wait(30)
    with pytest.raises(ChildExited, match=r"failing exited with status 3 \(last log line: it broke\)"):
        procs.check_alive()
    with pytest.raises(ChildExited):  # wait_ready watches the children it is given
        procs.wait_ready(lambda: False, 30.0, "never", [p])
    assert (tmp_path / "failing.log").read_text() == "it broke\n"  # stderr only: stdout is /dev/null
    procs.stop_all()


def test_wait_ready_times_out_as_a_config_error(tmp_path):
    procs = Procs(tmp_path)

    def not_yet():
        raise OSError("connection refused")  # counts as not ready

    with pytest.raises(ConfigError, match=r"nothing listens within 0.2s \(logs in "):
        procs.wait_ready(not_yet, 0.2, "nothing listens", [])


def test_json_lines_and_one_shot_commands(tmp_path):
    procs = Procs(tmp_path)
    code = ("import json, sys\n"
            "print(json.dumps({'ready': True})); print('not json'); print('[1, 2]')\n"
            "print(json.dumps({'progress': 5})); sys.stdout.flush()\n"
            "line = sys.stdin.readline(); print(json.dumps({'echo': line.strip()}))\n")
    p = procs.start("talker", ["-c", code], pipes=True)
    seen = []
    lines = JsonLines(p, seen.append)
    assert lines.next(30.0) == {"ready": True}
    p.stdin.write(b"go\n")
    p.stdin.flush()
    assert lines.next(30.0) == {"echo": "go"}
    assert lines.next(30.0) is None  # EOF
    with pytest.raises(queue.Empty):
        lines.next(0.01)
    assert seen == [{"progress": 5}]
    procs.stop_all()
    r = procs.run(["-c", "import pbft, sys; print(pbft.__name__); sys.exit(4)"], timeout=60)
    assert (r.returncode, r.stdout) == (4, "pbft\n")
