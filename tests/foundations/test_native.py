"""The compiled hot path's selection (``pbft._native``): a build runs only while it matches the
sources, ``PBFT_NATIVE=0`` turns it off, ``PBFT_NATIVE=require`` makes its absence an error.

Most tests need no compiler: a fake build directory maps a module to a marked *copy* of its
source (the import finder serves whatever file the manifest names, an extension module or not),
so what is checked is the manifest, the hashes and the finder, in a fresh interpreter each time.
The last test looks at the real build of ``make native`` when there is one.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "pbft"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

PROBE = ("import json, pbft, pbft.digests as d; from pbft import _native; "
         "print(json.dumps({'marker': getattr(d, 'NATIVE_MARKER', None), 'file': d.__file__, "
         "'status': _native.status()}))")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def fake_build(tmp_path: Path, *, sources=None, suffix=SUFFIX, missing=False) -> Path:
    d = tmp_path / "native"
    lib = d / "lib-x" / "pbft"
    lib.mkdir(parents=True)
    if not missing:
        (lib / "digests.py").write_text((PKG / "digests.py").read_text() + "\nNATIVE_MARKER = 1\n")
    m = {"format": 1, "ext_suffix": suffix, "lib": "lib-x", "modules": {"pbft.digests": "pbft/digests.py"},
         "sources": sources if sources is not None else {"digests.py": sha(PKG / "digests.py"),
                                                         "messages.py": sha(PKG / "messages.py")}}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def probe(native_dir, **env):
    e = dict(os.environ, PBFT_NATIVE_DIR=str(native_dir))
    e.pop("PBFT_NATIVE", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=60)


def run_ok(native_dir, **env):
    r = probe(native_dir, **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_matching_build_is_served(tmp_path):
    out = run_ok(fake_build(tmp_path))
    assert out["marker"] == 1
    assert out["status"]["active"] is True and out["status"]["reason"] == "active"
    assert out["status"]["modules"] == ["pbft.digests"]
    assert out["file"].startswith(str(tmp_path))


def test_a_stale_source_runs_the_pure_modules(tmp_path):
    # one source of the manifest (not even the compiled one) hashes otherwise: the whole build is stale
    d = fake_build(tmp_path, sources={"digests.py": sha(PKG / "digests.py"), "messages.py": "0" * 64})
    out = run_ok(d)
    assert out["marker"] is None and out["file"] == str(PKG / "digests.py")
    assert out["status"] == {"active": False, "reason": "stale: messages.py changed since the build",
                             "dir": str(d), "modules": []}


def test_a_missing_source_is_stale(tmp_path):
    d = fake_build(tmp_path, sources={"digests.py": sha(PKG / "digests.py"), "gone.py": "0" * 64})
    out = run_ok(d)
    assert out["marker"] is None and out["status"]["reason"] == "stale: gone.py missing"


def test_pbft_native_0_runs_the_pure_modules(tmp_path):
    out = run_ok(fake_build(tmp_path), PBFT_NATIVE="0")
    assert out["marker"] is None and out["file"] == str(PKG / "digests.py")
    assert out["status"]["reason"] == "disabled (PBFT_NATIVE=0)"


@pytest.mark.parametrize("case, reason", [
    ("none", "not built"),
    ("suffix", "built for another interpreter"),
    ("missing", "incomplete build: pbft/digests.py missing"),
    ("garbage", "unreadable manifest"),
])
def test_no_usable_build_runs_the_pure_modules(tmp_path, case, reason):
    if case == "none":
        d = tmp_path / "nothing"
    elif case == "suffix":
        d = fake_build(tmp_path, suffix=".cpython-399-x86_64-linux-gnu.so")
    elif case == "missing":
        d = fake_build(tmp_path, missing=True)
    else:
        d = fake_build(tmp_path)
        (d / "manifest.json").write_bytes(b"\x00{not json")
    out = run_ok(d)
    assert out["marker"] is None and out["status"]["active"] is False
    assert out["status"]["reason"].startswith(reason)


def test_require_makes_an_unusable_build_an_error(tmp_path):
    d = fake_build(tmp_path, sources={"messages.py": "0" * 64})
    r = probe(d, PBFT_NATIVE="require")
    assert r.returncode != 0 and "PBFT_NATIVE=require" in r.stderr and "stale: messages.py" in r.stderr
    assert run_ok(fake_build(tmp_path / "ok"), PBFT_NATIVE="require")["marker"] == 1


def test_pbft_native_command(tmp_path):
    d = fake_build(tmp_path)
    e = dict(os.environ, PBFT_NATIVE_DIR=str(d))
    e.pop("PBFT_NATIVE", None)
    cmd = [sys.executable, "-m", "pbft.tools.cli", "native"]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("native: active, 1 compiled modules"), r.stdout + r.stderr
    r = subprocess.run(cmd + ["--json"], env=dict(e, PBFT_NATIVE="0"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and json.loads(r.stdout)["reason"] == "disabled (PBFT_NATIVE=0)"


def test_the_manifest_covers_what_compiled_code_imports():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_native
    finally:
        sys.path.remove(str(ROOT / "tools"))
    compiled = build_native.PURE_LAYERS + build_native.core_modules()
    closure = build_native.source_closure(compiled)
    assert set(compiled) <= set(closure)
    # interpreted modules the compiled ones rely on are hashed too
    assert {"core/events.py", "service.py", "config.py"} <= set(closure)
    assert "core/events.py" not in compiled and not any(c.endswith("__init__.py") for c in compiled)
    # nothing of the runtime: the compiled layers do not import it
    assert not any(c.startswith(("runtime/", "sim/", "tools/")) for c in closure)


def test_the_real_build_when_there_is_one():
    d = ROOT / ".native"
    if not (d / "manifest.json").exists():
        pytest.skip("no build: make native")
    probe_real = ("import json, pbft, pbft.core.replica as r, pbft.codec as c; from pbft import _native; "
                  "print(json.dumps([_native.status(), r.__file__, c.__file__]))")
    e = dict(os.environ)
    e.pop("PBFT_NATIVE_DIR", None)
    e.pop("PBFT_NATIVE", None)
    r = subprocess.run([sys.executable, "-c", probe_real], env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st, replica_file, codec_file = json.loads(r.stdout)
    if not st["active"]:
        # a build older than the sources: it must say so and run the pure modules
        assert st["reason"].startswith("stale:"), st
        assert replica_file.endswith(".py") and codec_file.endswith(".py")
    else:
        assert replica_file.endswith(SUFFIX) and codec_file.endswith(SUFFIX)
        assert "pbft.core.replica" in st["modules"] and "pbft.core.events" not in st["modules"]


def auto_build(out: Path, *args: str, **env):
    e = dict(os.environ)
    e.pop("PBFT_NATIVE", None)
    e.update(env)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "build_native.py"), "--auto", "--out", str(out), *args],
                          env=e, capture_output=True, text=True, timeout=60)


def test_install_keeps_a_matching_build(tmp_path):
    d = fake_build(tmp_path)
    before = (d / "manifest.json").read_bytes()
    r = auto_build(d)
    assert r.returncode == 0 and "match the sources" in r.stdout, r.stdout + r.stderr
    assert (d / "manifest.json").read_bytes() == before


def test_install_skips_the_build_with_pbft_native_0(tmp_path):
    r = auto_build(tmp_path / "n", PBFT_NATIVE="0")
    assert r.returncode == 0 and "PBFT_NATIVE=0" in r.stdout
    assert not (tmp_path / "n").exists()


def test_a_failed_build_does_not_fail_install(tmp_path):
    # a build that cannot finish in time: a failure like any other (no compiler, a compile error)
    r = auto_build(tmp_path / "n", "--timeout", "0.2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    if "not built:" in out:  # no compiler, headers or mypyc here: said, and nothing built
        assert "the pure modules run" in out
    else:
        assert "the build failed" in out and "the pure modules run" in out and "build.log" in out
    assert not (tmp_path / "n" / "manifest.json").exists()
