"""The code's integrity at every start (runtime.integrity): ``pbft init`` records the hash of the
pbft package, and a replica run from a changed copy refuses to start, at a recovery reboot too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.netutil import SRC, free_base_port
from pbft import _native
from pbft.config import ConfigError
from pbft.runtime import integrity


def copy_package(dst: Path) -> Path:
    shutil.copytree(Path(SRC) / "pbft", dst / "pbft", ignore=shutil.ignore_patterns("__pycache__"))
    return dst / "pbft"


def copy_env(src: Path) -> dict:
    """The environment of a ``pbft`` run from the copy in ``src``: its package first on the path,
    and this tree's ``make native`` build (the copy has none of its own), which the copy uses only
    while its sources hash as the build recorded (``pbft._native``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env.setdefault("PBFT_NATIVE_DIR", _native.native_dir())
    return env


def pbft(src: Path, *args, **kw):
    env = copy_env(src)
    return subprocess.run([sys.executable, "-m", "pbft.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60, **kw)


def test_package_hash(tmp_path):
    pkg = copy_package(tmp_path / "a")
    h = integrity.package_sha256(pkg)
    assert h == integrity.package_sha256(Path(SRC) / "pbft") and len(h) == 64
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "x.py").write_text("ignored")
    assert integrity.package_sha256(pkg) == h
    f = pkg / "runtime" / "keys.py"
    f.write_text(f.read_text() + "\n# changed\n")
    assert integrity.package_sha256(pkg) != h
    f.write_text(f.read_text().removesuffix("\n# changed\n"))
    assert integrity.package_sha256(pkg) == h
    (pkg / "runtime" / "extra.py").write_text("")  # a file added counts
    assert integrity.package_sha256(pkg) != h
    (pkg / "runtime" / "extra.py").rename(pkg / "runtime" / "extra2.py")  # and its name
    h2 = integrity.package_sha256(pkg)
    (pkg / "runtime" / "extra2.py").rename(pkg / "runtime" / "extra.py")
    assert integrity.package_sha256(pkg) != h2


def test_recorded_section(tmp_path):
    d = tmp_path / "c"
    src = tmp_path / "src"
    copy_package(src)
    assert pbft(src, "init", d, "--replicas", 4).returncode == 0
    want = integrity.package_sha256(src / "pbft")
    assert integrity.recorded(d) == want
    assert f'[integrity]\npackage_sha256 = "{want}"' in (d / "cluster.toml").read_text()
    assert integrity.record(d, "0" * 64) == "0" * 64 and integrity.recorded(d) == "0" * 64
    assert (d / "cluster.toml").read_text().count("[integrity]") == 1
    text = (d / "cluster.toml").read_text()
    (d / "cluster.toml").write_text(text.replace("0" * 64, "xyz"))
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        integrity.recorded(d)
    e = tmp_path / "e"
    assert pbft(src, "init", e, "--replicas", 4, "--no-integrity").returncode == 0
    assert integrity.recorded(e) is None and integrity.check(e) is None


@pytest.mark.slow
def test_replica_refuses_changed_code(tmp_path):
    src = tmp_path / "src"
    pkg = copy_package(src)
    d = tmp_path / "c"
    assert pbft(src, "init", d, "--replicas", 4, "--base-port", free_base_port(200)).returncode == 0
    assert pbft(src, "integrity", d, "--check").returncode == 0
    node = pkg / "runtime" / "node.py"
    original = node.read_text()
    node.write_text(original.replace("def recover_now(self) -> None:",
                                     "def recover_now(self) -> None:  # an intruder's change"))
    p = pbft(src, "replica", d, "--id", 0)
    assert p.returncode == 2 and "refusing to start" in p.stderr and "pbft integrity" in p.stderr, p.stderr
    assert pbft(src, "integrity", d, "--check").returncode == 2
    # put back: it starts; changed while it runs: its recovery reboot refuses
    node.write_text(original)
    env = copy_env(src)
    log = open(tmp_path / "r0.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pbft.cli", "replica", str(d), "--id", "0"],
                            stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    log.close()
    try:
        deadline = time.time() + 30
        while '"started"' not in (tmp_path / "r0.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "r0.log").read_text()
            time.sleep(0.05)
        node.write_text(original + "\n# changed while it ran\n")
        proc.send_signal(signal.SIGUSR1)  # a proactive recovery: the reboot (exec) runs the check again
        assert proc.wait(30) == 2
        text = (tmp_path / "r0.log").read_text()
        assert "recovery-reboot" in text and "refusing to start" in text, text
        # a deliberate upgrade: recorded again, it starts
        assert pbft(src, "integrity", d, "--update").returncode == 0
        assert pbft(src, "integrity", d, "--check").returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
