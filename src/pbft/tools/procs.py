"""The one child-process supervisor of the ``pbft`` tools.

Every process a tool starts (replicas, the unreplicated server, load workers,
attackers, ``pbft up``'s replicas, the demo's cluster) goes through ``Procs``:

- ``start`` runs a command (by default ``python -m ...`` with this package on
  ``PYTHONPATH``) in a session of its own, so a Ctrl-C in the terminal reaches
  only the tool, and on Linux with the parent-death signal set, so it gets
  SIGTERM if the tool dies; its stderr goes to ``LOGDIR/NAME.log`` (appended,
  so a restarted child keeps one log), its stdin/stdout are pipes or
  ``/dev/null``;
- ``wait_ready`` polls a readiness check while watching the children it
  depends on (one that exits raises ``ChildExited`` with its last log line);
- ``stop`` ends children with SIGTERM, then SIGKILL after a grace period, and
  closes their pipes; ``stop_all`` (also on leaving a ``with`` block) ends
  every child still known;
- ``run`` runs a one-shot command to completion and returns its output;
- ``JsonLines`` collects what a child with ``pipes=True`` reports on its stdout, one JSON
  object a line (a load worker's or an attacker's progress and results).

``src/pbft/tools/`` is the only place of the package that starts processes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..config import ConfigError

SRC = str(Path(__file__).resolve().parents[2])  # the directory holding the pbft package
STOP_GRACE_S = 3.0


class ChildExited(ConfigError):
    """A process a tool started has exited."""


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This process's environment, with the directory holding ``pbft`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def _pdeathsig() -> Optional[Callable[[], None]]:
    """A preexec_fn making the child receive SIGTERM when this process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def fn() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return fn


def log_tail(log: Optional[Path]) -> str:
    """`` (last log line: ...)`` of a child's log, or ``""``."""
    if log is None:
        return ""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return f" (last log line: {lines[-1][:300]})" if lines else ""


def sigterm_as_interrupt(signum, frame) -> None:
    """A SIGTERM handler doing what Ctrl-C does: inside an event loop, asyncio's SIGINT handler
    cancels the main task (so every ``finally`` runs); outside one, KeyboardInterrupt."""
    h = signal.getsignal(signal.SIGINT)
    if callable(h) and h is not sigterm_as_interrupt:
        h(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


class Procs:
    """The children of one tool run; ``logdir`` holds their logs (``None``: stderr is inherited)."""

    def __init__(self, logdir: Optional[Path] = None, env: Optional[Mapping[str, str]] = None):
        self.logdir = Path(logdir) if logdir is not None else None
        self.procs: list[tuple[str, subprocess.Popen, Optional[Path]]] = []
        self.preexec = _pdeathsig()
        self.env = child_env(env)

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ---- start ------------------------------------------------------------------
    def start(self, name: str, argv: list[str], *, python: bool = True, pipes: bool = False,
              env: Optional[Mapping[str, str]] = None, quiet: bool = False) -> subprocess.Popen:
        """Start ``argv`` (after ``sys.executable`` when ``python``) as child ``name``.  ``pipes``:
        stdin and stdout are pipes (``p.stdin``/``p.stdout``), otherwise ``/dev/null``; stderr goes
        to the child's log (``/dev/null`` when ``quiet`` and there is no log directory)."""
        cmd = [sys.executable, *argv] if python else list(argv)
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        log = self.logdir / f"{name}.log" if self.logdir is not None else None
        fh = open(log, "ab") if log is not None else None
        try:
            p = subprocess.Popen(cmd, env=full_env, start_new_session=True, preexec_fn=self.preexec,
                                 stderr=fh if fh is not None else (subprocess.DEVNULL if quiet else None),
                                 stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if pipes else subprocess.DEVNULL)
        finally:
            if fh is not None:
                fh.close()
        self.procs.append((name, p, log))
        return p

    def start_replica(self, cluster_dir, rid: int, service: Optional[str] = None, quiet: bool = False,
                      name: Optional[str] = None, extra: Iterable[str] = (),
                      env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
        """``pbft replica CLUSTER_DIR --id RID [--service S] [--quiet]`` as child ``replica-RID``
        (``--quiet``: no log lines; errors still reach its stderr)."""
        argv = ["-m", "pbft.tools.cli", "replica", str(cluster_dir), "--id", str(rid)]
        if service is not None:
            argv += ["--service", service]
        if quiet:
            argv.append("--quiet")
        return self.start(name or f"replica-{rid}", argv + list(extra), env=env)

    # ---- watch ------------------------------------------------------------------
    def name_of(self, p: subprocess.Popen) -> str:
        return next((n for n, q, _ in self.procs if q is p), f"pid {p.pid}")

    def log_of(self, p: subprocess.Popen) -> Optional[Path]:
        return next((log for _, q, log in self.procs if q is p), None)

    def tail(self, p: subprocess.Popen) -> str:
        return log_tail(self.log_of(p))

    def exited(self, subset: Optional[Iterable[subprocess.Popen]] = None) -> list[tuple[str, subprocess.Popen]]:
        """The children (of ``subset``) that have exited, as (name, process)."""
        want = None if subset is None else list(subset)
        return [(n, p) for n, p, _ in self.procs if (want is None or p in want) and p.poll() is not None]

    def check_alive(self, subset: Optional[Iterable[subprocess.Popen]] = None) -> None:
        """Raise ``ChildExited`` if a child (of ``subset``) has exited."""
        for name, p in self.exited(subset):
            raise ChildExited(f"{name} exited with status {p.returncode}{self.tail(p)}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str,
                   subset: Optional[Iterable[subprocess.Popen]] = None, period: float = 0.05) -> None:
        """Poll ``ready()`` (an OSError or ValueError counts as not ready) until it is true, while
        the children of ``subset`` (default: all) stay alive; ``ConfigError`` ``what`` after
        ``timeout`` seconds."""
        watch = None if subset is None else list(subset)
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(watch)
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                where = f" (logs in {self.logdir})" if self.logdir is not None else ""
                raise ConfigError(f"{what} within {timeout:g}s{where}")
            time.sleep(period)

    # ---- stop -------------------------------------------------------------------
    def stop(self, subset: Iterable[subprocess.Popen], grace: float = STOP_GRACE_S,
             sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (default SIGTERM) to each child of ``subset`` still running, SIGKILL those
        still running ``grace`` seconds later, reap them and close their pipes."""
        subset = list(subset)
        for p in subset:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in subset:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            for s in (p.stdin, p.stdout):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
        self.procs = [x for x in self.procs if x[1] not in subset]

    def kill(self, p: subprocess.Popen) -> None:
        """SIGKILL one child at once (a crash, as the demo's) and reap it."""
        self.stop([p], grace=0.0, sig=signal.SIGKILL)

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        self.stop([p for _, p, _ in self.procs], grace)

    # ---- one-shot commands ------------------------------------------------------
    def run(self, argv: list[str], timeout: Optional[float] = None, *, python: bool = True,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion (its output captured, as text) in this supervisor's
        environment; on timeout the command is killed and ``subprocess.TimeoutExpired`` raised."""
        cmd = [sys.executable, *argv] if python else list(argv)
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                              stdin=subprocess.DEVNULL)


class JsonLines:
    """The JSON objects a child writes on its stdout, one a line, read by a thread into a queue
    (``None`` at EOF); lines that are not JSON objects are skipped.  ``on_progress`` (called in
    the reader thread) takes the ``{"progress": ...}`` messages instead of the queue."""

    def __init__(self, proc: subprocess.Popen, on_progress: Optional[Callable[[dict], None]] = None):
        self.proc = proc
        self.q: queue.Queue = queue.Queue()
        self.on_progress = on_progress
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            assert self.proc.stdout is not None, "start the child with pipes=True"
            for line in self.proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if self.on_progress is not None and "progress" in msg:
                    self.on_progress(msg)
                else:
                    self.q.put(msg)
        except (OSError, ValueError):  # closed under us when the child is stopped
            pass
        finally:
            self.q.put(None)

    def next(self, timeout: float) -> Optional[dict]:
        """The next message; None at EOF; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self.q.get(timeout=timeout)
