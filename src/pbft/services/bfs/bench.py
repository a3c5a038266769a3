"""``pbft bench-fs``: BFS against an unreplicated BFS, sshfs over loopback and a local directory.

One run starts every target, runs the same workloads on each (interleaved run by run, so that
a change in the machine's load hits every target alike), checks what the workloads wrote, and
prints one table of times and ratios:

* ``bfs``: a local 4-replica cluster running ``BFSService`` (the default ``cluster.toml``:
  durable storage), mounted with ``pbft mount`` (default mount options);
* ``bfs-nr``: the same service and mount over the unreplicated server of the same stack
  (``pbft.runtime.unreplicated``: same transport, MACs, client library; no agreement, the
  state in memory);
* ``sshfs``: sshfs over loopback with default sshfs options, against an sshd started for the
  run (its own port, configuration and throwaway keys);
* ``local``: a directory on the same disk, the floor.

Workloads (``docs/bfs.md``, *Performance*):

* **Andrew-like**, ``--scale`` copies of a generated C source tree (44 C files and headers in
  6 directories): *mkdir* the directory tree, *copy* the files into it (``cp -a``), *stat*
  every entry, *read* every byte, *compile* every file with gcc and link the program (then
  run it: its output is known in advance);
* **PostMark-like** small-file transactions, seeded: a pool of ``--files`` files of 0.5 to
  10 KB in 10 directories (*create*), ``--transactions`` transactions, each a read or an
  append and a create or a delete (*transactions*), then every file deleted (*delete*).
  Before the delete the contents of every file are compared with a model kept in memory.

Each phase is timed; min and median of ``--runs`` runs are reported.
``python -m pbft.services.bfs.bench serve-unreplicated DIR`` is the unreplicated server
(internal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ...config import ConfigError
from .cli import cli_module, is_mounted

TARGETS = ("bfs", "bfs-nr", "sshfs", "local")
LABELS = {"bfs": "BFS", "bfs-nr": "BFS-nr", "sshfs": "sshfs", "local": "local", "bfs-strict": "BFS-strict"}
ANDREW_PHASES = ("mkdir", "copy", "stat", "read", "compile")
POSTMARK_PHASES = ("create", "transactions", "delete")
#: ratios printed: (numerator, denominator)
RATIOS = (("bfs", "sshfs"), ("bfs", "bfs-nr"), ("bfs", "local"), ("bfs-strict", "sshfs"), ("sshfs", "local"))

BENCH_SECTION = """
[bfs]
root_mode = 0o755

[bfs.client.default]
root = true
"""




def _env() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def why_not(targets) -> Optional[str]:
    """Why the given targets cannot run here (``None``: they can)."""
    if any(t.startswith("bfs") or t == "sshfs" for t in targets):
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing: FUSE is not available here"
        if shutil.which("fusermount3") is None:
            return "fusermount3 is missing (apt-get install fuse3)"
    if any(t.startswith("bfs") for t in targets):
        try:
            import pyfuse3  # noqa: F401
        except ImportError as e:
            return f"pyfuse3 is not installed: {e}"
    if "sshfs" in targets:
        for tool in ("sshfs", "ssh-keygen"):
            if shutil.which(tool) is None:
                return f"{tool} is missing (apt-get install sshfs openssh-server; scripts/ensure-system-deps.sh)"
        if _sshd() is None:
            return "sshd is missing (apt-get install openssh-server)"
    if shutil.which("gcc") is None:
        return "gcc is missing (the compile phase)"
    return None


def _sshd() -> Optional[str]:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/sbin/sshd") if os.access(p, os.X_OK)), None)


def _is_mounted(mp) -> bool:
    return is_mounted(mp)


def _unmount(mp: Path) -> None:
    if not _is_mounted(mp):
        return
    tool = shutil.which("fusermount3") or "fusermount"
    r = subprocess.run([tool, "-u", str(mp)], capture_output=True)
    if r.returncode != 0:
        subprocess.run([tool, "-uz", str(mp)], capture_output=True)
    deadline = time.monotonic() + 10
    while _is_mounted(mp) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_mounted(mp: Path, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not _is_mounted(mp):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            raise ConfigError(f"{what}: exited with status {proc.returncode}: " + " | ".join(tail))
        if time.monotonic() > deadline:
            raise ConfigError(f"{what}: not mounted within {timeout:g}s (log {log})")
        time.sleep(0.05)


def _stop(p: subprocess.Popen, grace: float = 5.0) -> None:
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
    except ProcessLookupError:
        pass


# ---- targets --------------------------------------------------------------------------------

class Target:
    name = "?"

    def __init__(self, work: Path):
        self.work = work
        self.root: Optional[Path] = None
        self.procs: list[subprocess.Popen] = []

    def setup(self) -> Path:
        raise NotImplementedError

    def teardown(self) -> None:
        for p in reversed(self.procs):
            _stop(p)
        self.procs = []


class LocalTarget(Target):
    name = "local"

    def setup(self) -> Path:
        self.root = self.work / "local"
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root


class BFSTarget(Target):
    """A BFS cluster (``replicated``: 4 replicas; otherwise the unreplicated server) and a mount."""

    def __init__(self, work: Path, name: str, replicated: bool, mount_args=(), storage: str = "durable",
                 host: Optional["BFSTarget"] = None, slot: int = 0):
        super().__init__(work)
        self.storage = storage
        self.host = host  # another target whose cluster this one mounts (a variant)
        self.slot = slot  # which 8 client identities of the cluster the mount uses
        self.name = name
        self.replicated = replicated
        self.mount_args = list(mount_args)
        self.dir = work / name
        self.mp = work / f"{name}-mnt"

    def setup(self) -> Path:
        if self.host is not None:
            self.dir = self.host.dir
            return self._mount(cli_module(), _env())
        from ...runtime.cluster import free_port_range, init_cluster

        n = 4 if self.replicated else 1
        base = free_port_range(2 * n + 2, _prefer(2 * n + 2))
        init_cluster(self.dir, n, None if self.replicated else 0, ["127.0.0.1"], base, 8 * SLOTS,
                     metrics_base_port=base + n + 1, force=True, storage={"mode": self.storage},
                     recovery={"period_s": 0.0})  # (no recovery turn inside a measurement)
        with open(self.dir / "cluster.toml", "a") as fh:
            fh.write(BENCH_SECTION)
        env = _env()
        mod = cli_module()
        if self.replicated:
            for i in range(n):
                log = open(self.dir / f"replica-{i}.log", "ab")
                self.procs.append(subprocess.Popen([sys.executable, "-m", mod, "replica", str(self.dir), "--id", str(i),
                                                    "--service", "bfs"], stdout=subprocess.DEVNULL, stderr=log,
                                                   env=env, start_new_session=True))
                log.close()
        else:
            log = open(self.dir / "server.log", "ab")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "pbft.services.bfs.bench", "serve-unreplicated",
                                                str(self.dir)], stdout=subprocess.DEVNULL, stderr=log, env=env,
                                               start_new_session=True))
            log.close()
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", base), 0.5).close()
                    break
                except OSError:
                    if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                        raise ConfigError(f"the unreplicated BFS server did not start "
                                          f"(log {self.dir / 'server.log'})") from None
                    time.sleep(0.05)
        return self._mount(mod, env)

    def _mount(self, mod: str, env: dict) -> Path:
        self.mp.mkdir(exist_ok=True)
        mlog = self.dir / f"mount-{self.name}.log"
        from ...runtime.cluster import load_cluster
        first = load_cluster(self.dir).client_ids[8 * self.slot]  # this mount's 8 client identities
        with open(mlog, "ab") as fh:
            self.mount = subprocess.Popen([sys.executable, "-m", mod, "mount", str(self.dir), str(self.mp),
                                           "--foreground", "--verbose", "--client-id", str(first), *self.mount_args],
                                          stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, env=env,
                                          start_new_session=True)
        self.procs.append(self.mount)
        _wait_mounted(self.mp, self.mount, mlog, f"pbft mount ({self.name})")
        self.root = self.mp
        return self.mp

    def teardown(self) -> None:
        _unmount(self.mp)
        if getattr(self, "mount", None) is not None:
            try:
                self.mount.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.host is None:
            super().teardown()

    def calls(self, what: str = "bfs mount: calls ", end: str = "; errors") -> dict:
        """``{op: [count, mean ms]}`` the mount sent, from its log (after teardown); with
        ``what="bfs mount: FUSE handlers (count, mean ms) "`` the FUSE requests it handled."""
        import ast

        try:
            text = (self.dir / f"mount-{self.name}.log").read_text(errors="replace")
        except OSError:
            return {}
        for line in reversed(text.splitlines()):
            if what in line:
                try:
                    return {k: list(v) for k, v in ast.literal_eval(line.split(what, 1)[1].split(end, 1)[0]).items()}
                except (ValueError, SyntaxError):
                    return {}
        return {}


class SshfsTarget(Target):
    """sshd on a free loopback port with throwaway keys, and sshfs with its default options."""

    name = "sshfs"

    def setup(self) -> Path:
        from ...runtime.cluster import free_port_range

        d = self.work / "sshfs"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        exported = d / "export"
        exported.mkdir(exist_ok=True)
        self.mp = d / "mnt"
        self.mp.mkdir(exist_ok=True)
        for key in ("host_key", "client_key"):
            if not (d / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True,
                               capture_output=True)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        port = free_port_range(1, _prefer(1))
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                 "/usr/libexec/sftp-server") if os.access(p, os.X_OK)), "internal-sftp")
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nAllowUsers {user}\n"
            f"Subsystem sftp {sftp}\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        log = d / "sshd.log"
        sshd = _sshd()
        assert sshd is not None  # (checked by the preflight)
        with open(log, "ab") as fh:
            self.procs.append(subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                                               stdout=fh, stderr=fh, start_new_session=True))
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"sshd did not start (log {log})") from None
                time.sleep(0.05)
        mlog = d / "sshfs.log"
        with open(mlog, "ab") as fh:
            ssh_opts = ["-o", f"IdentityFile={d / 'client_key'}", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
            self.sshfs = subprocess.Popen(["sshfs", f"{user}@127.0.0.1:{exported}", str(self.mp), "-f", "-p", str(port),
                                           *ssh_opts], stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                          start_new_session=True)
        self.procs.append(self.sshfs)
        _wait_mounted(self.mp, self.sshfs, mlog, "sshfs", 30)
        self.root = self.mp
        return self.root

    def teardown(self) -> None:
        if getattr(self, "mp", None) is not None:
            _unmount(self.mp)
        super().teardown()


FUSE_LINE = "bfs mount: FUSE handlers (count, mean ms) "
SLOTS = 8  # mounts one BFS cluster can carry (variants), 8 client identities each
#: ``--port-base``: the first of the loopback ports the targets try first (None: any free ones)
PORT_BASE: Optional[int] = None
_ports_taken = 0


def _prefer(span: int) -> Optional[int]:
    """The next ``span`` ports from ``PORT_BASE`` on (None without it)."""
    global _ports_taken
    if PORT_BASE is None:
        return None
    base = PORT_BASE + _ports_taken
    _ports_taken += span
    return base


def make_target(name: str, work: Path, mount_args=(), storage: str = "durable", variants=None, made=None) -> Target:
    variants = variants or {}
    if name in variants:
        host = (made or {}).get("bfs")
        if host is None:
            raise ConfigError(f"variant {name!r} needs the bfs target (listed before it)")
        slot = 1 + list(variants).index(name)
        if slot >= SLOTS:
            raise ConfigError(f"at most {SLOTS - 1} variants")
        return BFSTarget(work, name, True, [*variants[name], *mount_args], storage, host=host, slot=slot)
    if name == "local":
        return LocalTarget(work)
    if name == "sshfs":
        return SshfsTarget(work)
    if name == "bfs":
        return BFSTarget(work, "bfs", True, mount_args, storage)
    if name == "bfs-strict":
        return BFSTarget(work, "bfs-strict", True, ["--strict", *mount_args], storage)
    if name == "bfs-nr":
        return BFSTarget(work, "bfs-nr", False, mount_args)
    raise ConfigError(f"unknown target {name!r}: choose from {', '.join(TARGETS + ('bfs-strict',))}")


# ---- the generated C source tree -----------------------------------------------------------

MODULES = ("core", "util", "io", "net", "math")
FILES_PER_MODULE = 8
FUNCS_PER_FILE = 12
MOD = 1_000_003


def _c_tree(seed: int = 7, per_module: int = FILES_PER_MODULE) -> tuple[dict, int]:
    """``{relative path: bytes}`` of a C program (``per_module`` C files in each of 5 directories,
    a header each, ``main.c``) and the number it prints."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    total = 0
    calls = []
    for m in MODULES:
        decls = []
        for j in range(per_module):
            fname = f"{m}_{j}"
            lines = [f"/* {m}/{fname}.c: generated by pbft bench-fs */", f'#include "{m}.h"', ""]
            body = []
            value = 0
            x = j + 1
            for k in range(FUNCS_PER_FILE):
                a, b = rng.randrange(1, 1000), rng.randrange(0, 1000)
                comment = " ".join(rng.choice(("the", "file", "system", "replica", "quorum", "view", "order",
                                               "client", "request", "reply", "digest", "checkpoint"))
                                   for _ in range(rng.randrange(8, 30)))
                lines += [f"/* {comment} */", f"static long {fname}_f{k}(long x)", "{",
                          f"    long r = (x * {a} + {b}) % {MOD};", "    if (r < 0) r += 1;", "    return r;", "}", ""]
                body.append(f"    s = (s + {fname}_f{k}(x)) % {MOD};")
                value = (value + (x * a + b) % MOD) % MOD
            lines += [f"long {fname}(long x)", "{", "    long s = 0;", *body, "    return s;", "}", ""]
            files[f"{m}/{fname}.c"] = "\n".join(lines).encode()
            decls.append(f"long {fname}(long x);")
            calls.append(f"    t = (t + {fname}({x})) % {MOD};")
            total = (total + value) % MOD
        files[f"include/{m}.h"] = ("\n".join([f"#ifndef PBFT_BENCH_{m.upper()}_H", f"#define PBFT_BENCH_{m.upper()}_H",
                                              *decls, "#endif", ""])).encode()
    incs = "\n".join(f'#include "{m}.h"' for m in MODULES)
    files["main.c"] = (f"#include <stdio.h>\n{incs}\n\nint main(void)\n{{\n    long t = 0;\n" + "\n".join(calls)
                       + '\n    printf("%ld\\n", t);\n    return 0;\n}\n').encode()
    files["Makefile"] = b"# the bench compiles each .c with gcc -c and links them\n"
    return files, total


def write_source(dest: Path, per_module: int = FILES_PER_MODULE) -> tuple[dict, int]:
    files, total = _c_tree(per_module=per_module)
    for rel, data in files.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files, total


# ---- workloads ------------------------------------------------------------------------------

class Timer:
    def __init__(self):
        self.phases: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], object]):
        t = time.perf_counter()
        out = fn()
        self.phases[name] = time.perf_counter() - t
        return out


def andrew(root: Path, src: Path, scale: int, expected: tuple[dict, int]) -> tuple[dict, list]:
    """The five phases on ``scale`` copies of the tree ``src`` under ``root``; (times, problems)."""
    files, answer = expected
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
    trees = [root / f"tree-{i:02d}" for i in range(scale)]
    problems: list[str] = []
    t = Timer()

    def mkdirs():
        for tr in trees:
            tr.mkdir()
            for d in dirs:
                (tr / d).mkdir()
            (tr / "obj").mkdir()

    def copy():
        for tr in trees:
            subprocess.run(["cp", "-a", f"{src}/.", str(tr)], check=True)

    def stat_all():
        n = 0
        for tr in trees:
            for dirpath, dirnames, filenames in os.walk(tr):
                for name in dirnames + filenames:
                    os.lstat(os.path.join(dirpath, name))
                    n += 1
        return n

    def read_all():
        out = {}
        for tr in trees:
            for rel in files:
                with open(tr / rel, "rb") as fh:
                    out[(tr.name, rel)] = hashlib.sha256(fh.read()).hexdigest()
        return out

    def compile_all():
        outs = []
        for tr in trees:
            objs = []
            for rel in sorted(files):
                if rel.endswith(".c"):
                    o = tr / "obj" / (Path(rel).stem + ".o")
                    subprocess.run(["gcc", "-O1", "-c", "-I", str(tr / "include"), "-o", str(o), str(tr / rel)],
                                   check=True)
                    objs.append(str(o))
            subprocess.run(["gcc", "-o", str(tr / "prog"), *objs], check=True)
            outs.append(subprocess.run([str(tr / "prog")], capture_output=True, text=True, check=True).stdout.strip())
        return outs

    t.run("mkdir", mkdirs)
    t.run("copy", copy)
    n = t.run("stat", stat_all)
    digests = t.run("read", read_all)
    outs = t.run("compile", compile_all)
    want = {(tr.name, rel): hashlib.sha256(data).hexdigest() for tr in trees for rel, data in files.items()}
    if digests != want:
        bad = sorted(k for k in want if digests.get(k) != want[k])
        problems.append(f"andrew: {len(bad)} files read back wrong, e.g. {bad[:3]}")
    if n != scale * (len(files) + len(dirs) + 1):
        problems.append(f"andrew: stat saw {n} entries, expected {scale * (len(files) + len(dirs) + 1)}")
    if outs != [str(answer)] * scale:
        problems.append(f"andrew: the compiled program printed {outs[:3]}, expected {answer}")
    return t.phases, problems


def postmark(root: Path, nfiles: int, ntrans: int, seed: int, subdirs: int = 10) -> tuple[dict, list]:
    """PostMark-like: create a pool, run transactions, check every file, delete all."""
    rng = random.Random(seed)
    lo, hi = 512, 10 * 1024
    model: dict[str, bytes] = {}
    next_id = 0
    problems: list[str] = []
    t = Timer()
    base = root / "pm"
    base.mkdir()
    for s in range(subdirs):
        (base / f"s{s}").mkdir()

    def new_name():
        nonlocal next_id
        next_id += 1
        return f"s{rng.randrange(subdirs)}/f{next_id}"

    def create_one():
        name = new_name()
        data = rng.randbytes(rng.randint(lo, hi))
        with open(base / name, "wb") as fh:
            fh.write(data)
        model[name] = data

    def create_pool():
        for _ in range(nfiles):
            create_one()

    def transactions():
        names = list(model)
        for _ in range(ntrans):
            if names:
                name = names[rng.randrange(len(names))]
                if rng.random() < 0.5:
                    with open(base / name, "rb") as fh:
                        if fh.read() != model[name]:
                            problems.append(f"postmark: {name} read back wrong during the transactions")
                else:
                    extra = rng.randbytes(rng.randint(lo, 4096))
                    with open(base / name, "ab") as fh:
                        fh.write(extra)
                    model[name] += extra
            if rng.random() < 0.5 or not names:
                create_one()
                names.append(next(reversed(model)))
            else:
                name = names.pop(rng.randrange(len(names)))
                os.unlink(base / name)
                del model[name]

    def delete_all():
        for name in list(model):
            os.unlink(base / name)
        for s in range(subdirs):
            os.rmdir(base / f"s{s}")

    t.run("create", create_pool)
    t.run("transactions", transactions)
    on_disk = {f"s{s}/{f}" for s in range(subdirs) for f in os.listdir(base / f"s{s}")}
    if on_disk != set(model):
        problems.append(f"postmark: {len(on_disk ^ set(model))} names differ from the model")
    wrong = [n for n in model if (base / n).read_bytes() != model[n]]
    if wrong:
        problems.append(f"postmark: {len(wrong)} files with wrong contents, e.g. {wrong[:3]}")
    t.run("delete", delete_all)
    return t.phases, problems


# ---- the run ----------------------------------------------------------------------------------

def _summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "runs": xs}


def run_bench(targets, scales, runs: int, files: int, transactions: int, seed: int, workdir: Optional[Path],
              mount_args=(), out=sys.stdout, keep: bool = False, storage: str = "durable",
              workloads=("andrew", "postmark"), variants=None, per_module: int = FILES_PER_MODULE,
              hold_open: bool = False) -> dict:
    """Run every workload on every target; returns the report (``"results"``, ``"problems"``).
    ``hold_open``: one file stays open in each target's root meanwhile (as a log file would)."""
    variants = dict(variants or {})
    if "bfs-strict" in targets and "bfs" in targets:
        variants.setdefault("bfs-strict", ["--strict"])  # a mount of the same cluster
    targets = list(targets) + [v for v in variants if v not in targets]
    reason = why_not(targets)
    if reason:
        raise ConfigError(f"pbft bench-fs: {reason}")
    work = Path(tempfile.mkdtemp(prefix="pbft-bench-fs-", dir=workdir))
    os.chmod(work, 0o755)
    src = work / "source"
    expected = write_source(src, per_module)
    objs: dict[str, Target] = {}
    raw: dict[str, dict[str, dict[str, list]]] = {}
    problems: dict[str, list] = {}
    workloads = ([f"andrew-{s}" for s in scales] if "andrew" in workloads else []) \
        + (["postmark"] if "postmark" in workloads else [])
    calls: dict[str, dict] = {}
    handled: dict[str, dict] = {}
    held: list = []

    def note(text):
        print(text, file=out, flush=True)

    try:
        for name in sorted(targets, key=lambda t: t in variants):
            note(f"starting {LABELS.get(name, name)}...")
            objs[name] = make_target(name, work, mount_args, storage, variants, objs)
            objs[name].setup()
            if hold_open:
                root = objs[name].root
                assert root is not None
                held.append(open(root / f"held-open-{name}", "ab"))
        for r in range(runs):
            for name, tg in objs.items():
                assert tg.root is not None  # set by setup()
                run_dir = tg.root / f"run-{r}"
                run_dir.mkdir()
                for wl in workloads:
                    d = run_dir / wl
                    d.mkdir()
                    if wl == "postmark":
                        ph, bad = postmark(d, files, transactions, seed + r)
                    else:
                        ph, bad = andrew(d, src, int(wl.split("-")[1]), expected)
                    ph["total"] = sum(ph.values())
                    for p, v in ph.items():
                        raw.setdefault(wl, {}).setdefault(p, {}).setdefault(name, []).append(v)
                    problems.setdefault(name, []).extend(f"run {r}: {b}" for b in bad)
                    note(f"  run {r + 1}/{runs} {LABELS.get(name, name):>10} {wl:<10} "
                         + " ".join(f"{p} {v:.3f}" for p, v in ph.items()) + ("  PROBLEMS" if bad else ""))
                if not keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        for fh in held:
            fh.close()
        for tg in sorted(objs.values(), key=lambda t: getattr(t, "host", None) is None):  # variants first
            try:
                tg.teardown()
                if isinstance(tg, BFSTarget):
                    calls[tg.name] = tg.calls()
                    handled[tg.name] = tg.calls(FUSE_LINE, "; waited")
            except Exception as e:  # keep tearing the others down
                note(f"teardown of {tg.name}: {e}")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    results = {wl: {p: {t: _summary(v) for t, v in per.items()} for p, per in phases.items()}
               for wl, phases in raw.items()}
    ratios: dict[str, dict] = {}
    for wl, phases in results.items():
        for p, per in phases.items():
            for a, b in RATIOS + tuple((v, "bfs") for v in variants if v != "bfs-strict"):
                if a in per and b in per and per[b]["median"] > 0:
                    ratios.setdefault(wl, {}).setdefault(p, {})[f"{a}/{b}"] = per[a]["median"] / per[b]["median"]
    return {"targets": list(targets), "scales": list(scales), "runs": runs, "files": files,
            "transactions": transactions, "seed": seed, "mount_args": list(mount_args), "storage": storage,
            "results": results, "ratios": ratios, "problems": {k: v for k, v in problems.items()},
            "mount_calls": calls, "fuse_requests": handled, "variants": variants, "hold_open": hold_open}


def format_table(rep: dict) -> str:
    tg = rep["targets"]
    ratio_keys = [f"{a}/{b}" for a, b in RATIOS if a in tg and b in tg] \
        + [f"{v}/bfs" for v in rep.get("variants", {}) if v != "bfs-strict"]
    head = f"{'workload':<10} {'phase':<13}" + "".join(f"{LABELS.get(t, t):>17}" for t in tg) \
        + "".join(f"{k.replace('bfs-nr', 'nr'):>15}" for k in ratio_keys)
    lines = [f"times in seconds, median (min) of {rep['runs']} runs; ratios of medians", head, "-" * len(head)]
    for wl, phases in rep["results"].items():
        for p, per in phases.items():
            cells = "".join(f"{per[t]['median']:>9.3f} ({per[t]['min']:.3f})".rjust(17) if t in per else " " * 17
                            for t in tg)
            rs = rep["ratios"].get(wl, {}).get(p, {})
            lines.append(f"{wl:<10} {p:<13}{cells}" + "".join(f"{rs[k]:>15.2f}" if k in rs else " " * 15
                                                            for k in ratio_keys))
    bad = {t: v for t, v in rep["problems"].items() if v}
    for t, c in rep.get("mount_calls", {}).items():
        if c:
            lines.append(f"{LABELS.get(t, t)} requests (count, mean ms): "
                         + ", ".join(f"{op} {n} {ms:g}" for op, (n, ms) in sorted(c.items(), key=lambda kv: -kv[1][0])))
    for t, c in rep.get("fuse_requests", {}).items():
        if c:
            lines.append(f"{LABELS.get(t, t)} FUSE requests (count, mean ms in the mount): "
                         + ", ".join(f"{op} {n} {ms:g}" for op, (n, ms) in sorted(c.items(), key=lambda kv: -kv[1][0])))
    lines.append("contents checked: " + ("all correct" if not bad else
                                         "; ".join(f"{t}: {v[0]} (+{len(v) - 1})" for t, v in bad.items())))
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(rep["results"])
    fig, axes = plt.subplots(1, len(wls), figsize=(5 * len(wls), 4.2), squeeze=False)
    tg = rep["targets"]
    width = 0.8 / len(tg)
    for ax, wl in zip(axes[0], wls):
        phases = [p for p in rep["results"][wl] if p != "total"] + ["total"]
        for i, t in enumerate(tg):
            ys = [rep["results"][wl][p].get(t, {}).get("median", 0) for p in phases]
            ax.bar([x + i * width for x in range(len(phases))], ys, width, label=LABELS.get(t, t))
        ax.set_xticks([x + width * (len(tg) - 1) / 2 for x in range(len(phases))], phases, rotation=30)
        ax.set_yscale("log")
        ax.set_title(wl)
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_bench_fs_command(sub) -> None:
    b = sub.add_parser("bench-fs", help="BFS against unreplicated BFS, sshfs over loopback and a local directory",
                       description="Start a 4-replica BFS cluster and mount, the same over the unreplicated server, "
                                   "sshfs over loopback (its own sshd) and a local directory; run an Andrew-like "
                                   "and a PostMark-like workload on each; print times and ratios.")
    b.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated, from {', '.join(TARGETS)}, bfs-strict (default: the four)")
    b.add_argument("--scale", default="1,10", help="Andrew scales, comma-separated (default 1,10)")
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--workloads", default="andrew,postmark", help="andrew, postmark or both (default)")
    b.add_argument("--files", type=int, default=1000, help="PostMark pool size (default 1000)")
    b.add_argument("--transactions", type=int, default=1000, help="PostMark transactions (default 1000)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--mount-args", default="", help="extra `pbft mount` options for the BFS targets, e.g. "
                                                    "'--identities 1'")
    b.add_argument("--storage", default="durable", choices=("durable", "fast", "memory"),
                   help="the replicas' [storage] mode (default durable, as `pbft init`; docs/storage.md)")
    b.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="one more mount of the bfs cluster with other `pbft mount` options, as its own target "
                        "(e.g. 'no-wb=--no-writeback'); repeatable")
    b.add_argument("--hold-open", action="store_true",
                   help="keep one file open in each target while the workloads run (as a log file would)")
    b.add_argument("--port-base", type=int, default=None,
                   help="try the loopback ports from this one on first (default: any free ones)")
    b.add_argument("--workdir", default=None, help="where the temporary directories go (default: the system's)")
    b.add_argument("--keep", action="store_true", help="keep the work directory (logs, trees)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="a bar chart per phase and target")
    b.set_defaults(func=cmd_bench_fs)


def cmd_bench_fs(args) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        scales = [int(s) for s in args.scale.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--scale: integers, comma-separated, got {args.scale!r}") from None
    if not targets or not scales or min(scales) < 1 or args.runs < 1 or args.files < 1 or args.transactions < 0:
        raise ConfigError("bench-fs: needs targets, scales >= 1, --runs >= 1, --files >= 1")
    global PORT_BASE
    if args.port_base is not None:
        if not 1024 <= args.port_base <= 65000:
            raise ConfigError(f"--port-base: a port from 1024 to 65000, got {args.port_base}")
        PORT_BASE = args.port_base
    variants = {}
    for v in args.variant:
        name, sep, rest = v.partition("=")
        if not sep or not name or name in TARGETS or name == "bfs-strict":
            raise ConfigError(f"--variant {v!r}: NAME=ARGS with a new name")
        variants[name] = rest.split()
    if variants and "bfs" not in targets:
        raise ConfigError("--variant needs the bfs target")
    rep = run_bench(targets, scales, args.runs, args.files, args.transactions, args.seed, args.workdir,
                    args.mount_args.split(), out=sys.stderr if args.json else sys.stdout, keep=args.keep,
                    storage=args.storage, workloads=[w.strip() for w in args.workloads.split(",")],
                    variants=variants, hold_open=args.hold_open)
    if args.plot:
        plot(rep, args.plot)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_table(rep))
    return 1 if any(rep["problems"].values()) else 0


def _serve_unreplicated(argv) -> int:
    from ...runtime.cluster import load_cluster
    from ...runtime.unreplicated import run_unreplicated
    from ...service import ServiceCluster
    from .service import BFSService

    p = argparse.ArgumentParser(prog="python -m pbft.services.bfs.bench serve-unreplicated")
    p.add_argument("dir")
    a = p.parse_args(argv)
    cluster = load_cluster(a.dir)
    if cluster.n != 1:
        raise ConfigError(f"{a.dir} has {cluster.n} replicas; the unreplicated server needs one")
    run_unreplicated(cluster, BFSService.from_cluster(ServiceCluster.of(cluster)))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-unreplicated"]:
        return _serve_unreplicated(argv[1:])
    p = argparse.ArgumentParser(prog="pbft bench-fs")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_bench_fs_command(sub)
    args = p.parse_args(["bench-fs", *argv])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
