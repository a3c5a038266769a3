"""The compiled hot path: use the mypyc build of the pure layers when it matches the sources.

``make native`` (``tools/build_native.py``) compiles the pure layers (messages, digests, the
codec, crypto, the replicated state and the protocol core) with mypyc, from the same source
files, into a directory of its own outside the package (``.native/`` at the top of the
repository, or ``$PBFT_NATIVE_DIR``), with a manifest of the SHA-256 of every source file the
compiled code was built from: the compiled modules themselves and every ``pbft`` module they
import, whose types the compiled code relies on.

``activate()``, called first thing by ``pbft/__init__.py``, installs an import finder that
serves exactly the compiled modules from that directory, and only if

* ``PBFT_NATIVE`` is not ``0``;
* the manifest was built for this interpreter (its extension-module suffix);
* every listed source still hashes as recorded (an edited file makes the whole build stale:
  one changed module could break what the others assumed about it).

Otherwise nothing is installed and the pure modules run. ``PBFT_NATIVE=require`` turns a
missing or stale build into an ImportError instead (benchmarks use it to be sure). What runs is
visible in ``status()``, in ``pbft native`` and in the metric
``pbft_native`` of every replica.

This module is never compiled itself and imports nothing of ``pbft``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from typing import Any, Optional

MANIFEST = "manifest.json"
FORMAT = 1
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_status: dict[str, Any] = {"active": False, "reason": "not checked", "dir": None, "modules": []}


def native_dir() -> str:
    """Where the build lives: ``$PBFT_NATIVE_DIR``, else ``.native`` beside ``src/`` (an
    editable install or a source checkout; an installed wheel has none and runs pure)."""
    d = os.environ.get("PBFT_NATIVE_DIR")
    if d:
        return os.path.abspath(d)
    return os.path.join(os.path.dirname(os.path.dirname(PACKAGE_DIR)), ".native")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class NativeFinder:
    """A meta-path finder for exactly the modules of one build (and its shared library)."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        f = self.files.get(name)
        if f is None:
            return None
        return importlib.util.spec_from_file_location(name, f)


def check(directory: Optional[str] = None) -> tuple[Optional[dict[str, str]], str]:
    """(module name -> extension file, "active") if the build in ``directory`` may run, else
    (None, the reason it may not)."""
    directory = directory or native_dir()
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            m = json.loads(f.read())
    except FileNotFoundError:
        return None, "not built"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({type(e).__name__})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, "manifest of another format"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if m.get("ext_suffix") != suffix:
        return None, f"built for another interpreter ({m.get('ext_suffix')}, this one {suffix})"
    sources, modules, lib = m.get("sources"), m.get("modules"), m.get("lib")
    if not isinstance(sources, dict) or not isinstance(modules, dict) or not isinstance(lib, str):
        return None, "malformed manifest"
    for rel, digest in sources.items():
        try:
            if file_sha256(os.path.join(PACKAGE_DIR, rel)) != digest:
                return None, f"stale: {rel} changed since the build"
        except OSError:
            return None, f"stale: {rel} missing"
    files = {}
    for name, rel in modules.items():
        p = os.path.join(directory, lib, rel)
        if not os.path.isfile(p):
            return None, f"incomplete build: {rel} missing"
        files[name] = p
    return files, "active"


def activate() -> dict[str, Any]:
    """Install the finder if the build may run (once per process); return ``status()``."""
    if _status["reason"] != "not checked":
        return status()
    mode = os.environ.get("PBFT_NATIVE", "1").strip().lower()
    directory = native_dir()
    _status["dir"] = directory
    if mode in ("0", "no", "off", "false"):
        _status["reason"] = "disabled (PBFT_NATIVE=0)"
        return status()
    try:
        files, reason = check(directory)
    except Exception as e:  # never let a broken build stop the pure modules from running
        files, reason = None, f"check failed ({type(e).__name__}: {e})"
    _status["reason"] = reason
    if files is not None:
        already = sorted(n for n in files if n in sys.modules)
        if already:  # imported pure before the finder: mixing the two would be unsafe
            _status["reason"] = f"not used: {already[0]} was imported first"
        else:
            sys.meta_path.insert(0, NativeFinder(files))
            _status["active"] = True
            _status["modules"] = sorted(n for n in files if not n.endswith("__mypyc"))
    if mode == "require" and not _status["active"]:
        raise ImportError(f"PBFT_NATIVE=require but the native build is not used: {_status['reason']}")
    return status()


def status() -> dict[str, Any]:
    """``active`` (bool), ``reason`` (``active``, or why the pure modules run), ``dir`` (the
    build directory looked at), ``modules`` (the compiled modules in use)."""
    s = dict(_status)
    s["modules"] = list(_status["modules"])
    return s


def running_native(module: Any) -> bool:
    """True if ``module`` (an imported module object) is a compiled extension."""
    f = getattr(module, "__file__", None) or ""
    return f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
