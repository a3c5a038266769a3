#!/usr/bin/env python3
"""Compile pbft's pure layers with mypyc into ``.native/`` (``make native``).

    .venv/bin/python tools/build_native.py [--out DIR] [--pure-only] [--jobs N] [--check]

The same source files, compiled: messages, digests, the codec, crypto, the replicated state
(``state/``) and the protocol core (``core/``, but ``core/events.py`` and the packages'
``__init__`` files, which stay interpreted). The result goes into a directory outside the
source tree (default ``.native/`` at the top of the repository, which ``pbft`` looks at; any
other needs ``PBFT_NATIVE_DIR``)::

    .native/manifest.json         what was built, from which sources (SHA-256 of each)
    .native/lib-<stamp>/pbft/...  the extension modules and the group's shared library
                                  (``pbft_native__mypyc``: a fixed name, served by pbft's
                                  import finder like the modules, never on sys.path)
    .native/build/                C sources, objects, mypy cache (kept for faster rebuilds)

A new build is written beside the old one and made current by replacing the manifest in one
step; running processes keep the files they mapped. ``pbft`` uses the build only while every
source in the manifest hashes as recorded (``src/pbft/_native.py``); ``--check`` prints
whether it would.

``--auto`` is what ``make install`` runs: nothing if the current build is used (or
``PBFT_NATIVE=0``), else a build in a child process whose output goes to ``.native/build.log``;
whatever goes wrong (no C compiler, no Python headers, no mypyc, a compile error, a build that
takes longer than ``--timeout``) is said in one line and exits 0: pbft then runs the pure modules.

This script does not import ``pbft`` (importing it would consult the build being replaced).
It runs mypy with a configuration of its own: the repository's (``warn_unused_configs`` with a
section for the untyped ``lmdb``) makes mypyc stop with only a note.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
PKG = os.path.join(SRC, "pbft")
GROUP = "pbft_native"  # the shared library is the top-level module pbft_native__mypyc

PURE_LAYERS = ["messages.py", "digests.py", "codec.py", "crypto.py",
               "state/objects.py", "state/partition.py", "state/replica_state.py"]
# core/events.py stays interpreted: compiled, its dataclasses fail at import ("non-default
# argument follows default argument": mypyc hands dataclass the annotation of ``kind:
# ClassVar[str] = ...`` as a plain ``str``, so ``kind`` becomes a defaulted field). A property
# ``kind`` per class compiles, but the dataclass __init__ stays interpreted: nothing measurable
# to gain (docs/performance.md).
CORE_EXCLUDED = {"__init__.py", "events.py"}

MYPY_INI = """\
[mypy]
python_version = 3.11
mypy_path = {src}
cache_dir = {cache}
ignore_missing_imports = True
disable_error_code = annotation-unchecked
"""


def core_modules() -> list[str]:
    return sorted(f"core/{f}" for f in os.listdir(os.path.join(PKG, "core"))
                  if f.endswith(".py") and f not in CORE_EXCLUDED)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def module_of(rel: str) -> str:
    """'core/replica.py' -> 'pbft.core.replica'."""
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["pbft", *parts])


def file_of(module: str) -> str | None:
    """'pbft.core.replica' -> 'core/replica.py' (or the package's __init__), None if not ours."""
    parts = module.split(".")
    if parts[0] != "pbft":
        return None
    rel = "/".join(parts[1:])
    for cand in (f"{rel}.py", f"{rel}/__init__.py" if rel else "__init__.py"):
        if os.path.isfile(os.path.join(PKG, cand)):
            return cand
    return None


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of a module body outside functions and classes (into if/try blocks, so
    ``if TYPE_CHECKING:`` imports count)."""
    out: list[ast.stmt] = []
    for st in body:
        out.append(st)
        if isinstance(st, (ast.If, ast.Try)):
            for part in (st.body, st.orelse, getattr(st, "handlers", []), getattr(st, "finalbody", [])):
                for x in part:
                    out.extend(_top_level(x.body) if isinstance(x, ast.ExceptHandler) else _top_level([x]))
    return out


def imports_of(rel: str, everywhere: bool) -> set[str]:
    """The modules a source file imports: anywhere in it for a compiled file, at its top level
    only for one that stays interpreted (only the types of what it defines matter then)."""
    with open(os.path.join(PKG, rel), "rb") as f:
        tree = ast.parse(f.read(), rel)
    me = module_of(rel).split(".")
    pkg = me if rel.endswith("__init__.py") else me[:-1]
    nodes = list(ast.walk(tree)) if everywhere else _top_level(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            for a in node.names:  # `from . import x` names a module, `from .m import x` a name in m
                found.add(f"{mod}.{a.name}" if file_of(f"{mod}.{a.name}") else mod)
    return found


def source_closure(compiled: list[str]) -> list[str]:
    """The compiled files and every pbft source whose types they may rely on: what they import,
    transitively."""
    seen: set[str] = set()
    todo = list(compiled)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for m in imports_of(rel, rel in compiled):
            f = file_of(m)
            if f is not None and f not in seen:
                todo.append(f)
    return sorted(seen)


def parallel_compile(jobs: int) -> None:
    """Compile the C files of one extension in ``jobs`` threads (distutils does them one by
    one; the group's library has one file per module with ``multi_file``)."""
    if jobs <= 1:
        return
    from setuptools._distutils import ccompiler

    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            src, ext = build[obj]
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with ThreadPoolExecutor(jobs) as ex:
            list(ex.map(one, [o for o in objects if o in build]))
        return objects

    ccompiler.CCompiler.compile = compile


def build(out: str, rels: list[str], jobs: int, multi_file: bool, verbose: bool) -> dict:
    from mypyc.build import mypycify
    from setuptools import setup

    work = os.path.join(out, "build")
    os.makedirs(work, exist_ok=True)
    ini = os.path.join(work, "mypy.ini")
    with open(ini, "w") as f:
        f.write(MYPY_INI.format(src=SRC, cache=os.path.join(work, "mypy_cache")))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    lib = f"lib-{stamp}"
    libdir = os.path.join(out, lib)
    closure = source_closure(rels)
    before = {r: sha256(os.path.join(PKG, r)) for r in closure}
    t0 = time.monotonic()
    cwd = os.getcwd()
    os.chdir(work)  # mypyc writes its C files relative to the current directory
    try:
        parallel_compile(jobs)
        exts = mypycify(["--config-file", ini, *[os.path.join(PKG, r) for r in rels]],
                        opt_level="3", debug_level="1", group_name=GROUP, multi_file=multi_file,
                        target_dir=os.path.join(work, "c"))
        args = ["build_ext", "--build-lib", libdir, "--build-temp", os.path.join(work, "obj")]
        if jobs > 1:
            args += ["--parallel", str(jobs)]
        setup(name="pbft-native", ext_modules=exts, script_args=args + ([] if verbose else ["-q"]))
    finally:
        os.chdir(cwd)
    seconds = time.monotonic() - t0
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    modules = {module_of(r): f"pbft/{r[:-3]}{suffix}" for r in rels}
    modules[GROUP + "__mypyc"] = GROUP + "__mypyc" + suffix
    for name, rel in modules.items():
        if not os.path.isfile(os.path.join(libdir, rel)):
            raise SystemExit(f"build_native: {name} was not built ({rel} missing)")
    import mypy.version

    after = {r: sha256(os.path.join(PKG, r)) for r in source_closure(rels)}
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        shutil.rmtree(libdir, ignore_errors=True)
        raise SystemExit(f"build_native: sources changed during the build ({changed[0][0]}): run it again")
    return {
        "format": 1,
        "ext_suffix": suffix,
        "python": sys.version.split()[0],
        "mypy": mypy.version.__version__,
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "compile_seconds": round(seconds, 1),
        "jobs": jobs,
        "lib": lib,
        "modules": modules,
        "sources": before,
    }


def install(out: str, manifest: dict) -> None:
    tmp = os.path.join(out, f".manifest-{os.getpid()}.json")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "manifest.json"))
    for d in os.listdir(out):  # older builds: a process still running one keeps its mapped files
        if d.startswith("lib-") and d != manifest["lib"]:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def current(out: str) -> tuple[bool, str]:
    """(whether the build in ``out`` would be used, the reason), without importing pbft."""
    sys.path.insert(0, PKG)  # _native.py alone, without importing the package
    try:
        import _native  # type: ignore[import-not-found]
    finally:
        sys.path.remove(PKG)
    files, reason = _native.check(out)
    return files is not None, reason


def missing_prerequisite() -> str | None:
    """What a build would need and this machine lacks, or None."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy, the test extra)"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h)"
    return None


def auto(out: str, jobs: int, timeout: float) -> int:
    """Build unless the current build is used; never fail (``make install``)."""
    if os.environ.get("PBFT_NATIVE", "1").strip().lower() in ("0", "no", "off", "false"):
        print("native: not built (PBFT_NATIVE=0); the pure modules run")
        return 0
    ok, reason = current(out)
    if ok:
        print(f"native: the compiled modules in {out} match the sources")
        return 0
    lack = missing_prerequisite()
    if lack is not None:
        print(f"native: not built: {lack}; the pure modules run (make native to retry)")
        return 0
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "build.log")
    with open(os.path.join(out, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time into one directory
        ok, _ = current(out)  # (another one may just have built it)
        if ok:
            print(f"native: the compiled modules in {out} match the sources")
            return 0
        print(f"native: compiling the core and the codec with mypyc ({reason}; about a minute on "
              f"2 cores; PBFT_NATIVE=0 make install skips it)", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--jobs", str(jobs)]
        try:
            with open(log, "w") as f:
                r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            code: int | str = r.returncode
        except subprocess.TimeoutExpired:
            code = f"no result after {timeout:.0f} s"
        except OSError as e:
            code = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - t0
    ok, reason = current(out)
    if code == 0 and ok:
        print(f"native: built in {seconds:.0f} s; pbft runs the compiled modules (pbft native)")
        return 0
    with open(log, errors="replace") as f:
        tail = [ln.rstrip() for ln in f.readlines()[-5:]] or ["(nothing)"]
    print("native: the build failed " + (f"(exit {code})" if isinstance(code, int) else f"({code})") +
          f"; the pure modules run; its output is in {log}, ending:", *tail, sep="\n  ")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_native.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, ".native"), help="build directory (default .native/)")
    p.add_argument("--pure-only", action="store_true", help="compile the pure layers only, not core/")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel C compilations")
    p.add_argument("--single-file", action="store_true",
                   help="the group's library as one C file (slower to build, no parallel compilation)")
    p.add_argument("--check", action="store_true", help="only say whether the current build would be used")
    p.add_argument("--auto", action="store_true",
                   help="build only if the current build is not used, and never fail (make install)")
    p.add_argument("--timeout", type=float, default=1800.0, help="with --auto: give up after this many seconds")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    if a.check:
        ok, reason = current(out)
        print(reason)
        return 0 if ok else 1
    if a.auto:
        return auto(out, max(1, a.jobs), a.timeout)
    rels = PURE_LAYERS + ([] if a.pure_only else core_modules())
    os.makedirs(out, exist_ok=True)
    manifest = build(out, rels, max(1, a.jobs), not a.single_file, a.verbose)
    install(out, manifest)
    print(f"build_native: {len(rels)} modules compiled in {manifest['compile_seconds']} s "
          f"({a.jobs} jobs) into {os.path.join(out, manifest['lib'])}; "
          f"{len(manifest['sources'])} sources in the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
