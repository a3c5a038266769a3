"""``pbft mount DIR MOUNTPOINT`` and ``pbft umount MOUNTPOINT`` (docs/bfs.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ...config import ConfigError


def cli_module() -> str:
    """The module of the ``pbft`` command (``python -m MODULE``)."""
    import importlib.util

    for m in ("pbft.tools.cli", "pbft.cli"):
        try:
            if importlib.util.find_spec(m) is not None:
                return m
        except ImportError:
            pass
    return "pbft.cli"


def is_mounted(mountpoint) -> bool:
    mp = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                f = line.split()
                if len(f) > 4 and f[4].encode().decode("unicode_escape") == mp:
                    return True
    except OSError:
        pass
    return False


def _identities(cluster, first, count: int) -> list[int]:
    ids = cluster.client_ids
    if not ids:
        raise ConfigError("the cluster file has no [[client]] entries")
    if first is None:
        first = ids[0]
    usable = set(ids)  # (client_ids leaves out the administrators: their requests are configuration changes)
    if first not in usable:
        raise ConfigError(f"--client-id {first} is not a client of this cluster (clients are {ids[0]}..{ids[-1]})")
    if count < 1:
        raise ConfigError("--identities must be at least 1")
    return [i for i in range(first, first + count) if i in usable]


def cmd_mount(args) -> int:
    from ...runtime.cluster import load_cluster

    cluster = load_cluster(args.dir)
    ids = _identities(cluster, args.client_id, args.identities)
    mp = Path(args.mountpoint)
    if not mp.is_dir():
        raise ConfigError(f"mount point {mp} is not a directory")
    if is_mounted(mp):
        raise ConfigError(f"{mp} is already a mount point")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: FUSE is not available here")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"pyfuse3 is not installed ({e}): pip install pyfuse3 (needs libfuse3-dev)") from None
    if args.foreground:
        import logging
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        from ...runtime.client import PbftError
        from .mount import mount_main
        try:
            mount_main(cluster, ids, str(mp), strict=args.strict, timeout_s=args.timeout, cache_s=args.cache,
                       debug=args.debug, writeback=args.writeback_cache, keep_cache=not args.no_keep_cache,
                       negative_cache=not args.no_negative_cache, write_behind=not args.no_write_behind,
                       mount_cache=not args.no_mount_cache, prefetch=not args.no_open_prefetch,
                       gather_attrs=not args.no_gather_attrs, exact_holds=not args.no_exact_holds,
                       fsync_fold=not args.no_fsync_fold)
        except PbftError as e:
            print(f"pbft mount: the cluster does not answer: {e}", file=sys.stderr)
            return 1
        except RuntimeError as e:  # pyfuse3.init: e.g. the mount point is busy or FUSE refused
            print(f"pbft mount: {e}", file=sys.stderr)
            return 1
        return 0
    # background: the same command in the foreground in a new session, logging to a file
    log = Path(args.log) if args.log else Path(args.dir) / f"mount-{ids[0]}.log"
    cmd = [sys.executable, "-m", cli_module(), "mount", str(args.dir), str(mp), "--foreground",
           "--client-id", str(ids[0]), "--identities", str(len(ids)), "--timeout", str(args.timeout),
           "--cache", str(args.cache)]
    for flag in ("strict", "writeback_cache", "no_write_behind", "no_keep_cache", "no_negative_cache",
                 "no_mount_cache", "no_open_prefetch", "no_gather_attrs", "no_exact_holds",
                 "no_fsync_fold"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.verbose:
        cmd.append("--verbose")
    with open(log, "ab") as fh:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True)
    deadline = time.time() + args.wait
    while time.time() < deadline:
        if is_mounted(mp):
            print(f"mounted BFS of {args.dir} on {mp} (pid {p.pid}, client ids {ids[0]}..{ids[-1]}"
                  f"{', strict' if args.strict else ''}; log {log}); `pbft umount {mp}` unmounts")
            return 0
        if p.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ConfigError(f"the mount process exited with status {p.returncode}: " + " | ".join(tail))
        time.sleep(0.05)
    p.terminate()
    raise ConfigError(f"{mp} was not mounted within {args.wait:g}s (log {log})")


def cmd_umount(args) -> int:
    mp = os.path.realpath(args.mountpoint)
    if not is_mounted(mp):
        raise ConfigError(f"{mp} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = ([tool, "-u"] + (["-z"] if args.lazy else []) + [mp] if tool
           else ["umount"] + (["-l"] if args.lazy else []) + [mp])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    deadline = time.time() + 10
    while is_mounted(mp) and time.time() < deadline:
        time.sleep(0.05)
    print(f"unmounted {mp}")
    return 0


def add_bfs_commands(sub) -> None:
    m = sub.add_parser("mount", help="mount the BFS file system of a cluster (pbft up DIR --service bfs)")
    m.add_argument("dir", help="the cluster directory")
    m.add_argument("mountpoint")
    m.add_argument("--client-id", type=int, default=None, help="the first client identity (default: the first)")
    m.add_argument("--identities", type=int, default=4,
                   help="client identities from --client-id on, for concurrent requests (default 4)")
    m.add_argument("--strict", action="store_true", help="no kernel caching; reads ordered (docs/bfs.md)")
    m.add_argument("--cache", type=float, default=1.0, help="attribute and entry cache seconds (default 1)")
    m.add_argument("--no-write-behind", action="store_true",
                   help="send every application write and wait for its agreement (default: writes gather "
                        "in the mount and are agreed at the latest when the file is closed or fsynced)")
    m.add_argument("--writeback-cache", action="store_true",
                   help="the kernel's writeback cache instead of write-behind: only for a file system "
                        "no other client writes (the kernel then keeps its own file sizes)")
    m.add_argument("--no-keep-cache", action="store_true",
                   help="drop a file's cached pages at every open, even when it did not change")
    m.add_argument("--no-negative-cache", action="store_true", help="do not cache absent names in the kernel")
    m.add_argument("--no-mount-cache", action="store_true",
                   help="do not answer the kernel from what the mount fetched before, even while the "
                        "replicas say that no other client changed anything since (one check per --cache)")
    m.add_argument("--no-open-prefetch", action="store_true",
                   help="fetch only the attributes at an open, not also the bytes of a small file")
    m.add_argument("--no-gather-attrs", action="store_true",
                   help="send a change of mode or times at once, not with the file's gathered writes")
    m.add_argument("--no-exact-holds", action="store_true",
                   help="an unlink or rename while any file is open here asks the replicas to hold what it "
                        "removes, whatever it is (a `release` follows if it was not open), instead of naming "
                        "the open files")
    m.add_argument("--no-fsync-fold", action="store_true",
                   help="an fsync sends its ordered no-op also after the file's gathered writes it sent")
    m.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a certified reply before an operation fails with ETIMEDOUT")
    m.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    m.add_argument("--log", default=None, help="the background mount's log (default DIR/mount-ID.log)")
    m.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the mount to appear")
    m.add_argument("--verbose", action="store_true")
    m.add_argument("--debug", action="store_true", help="libfuse debug output (with --foreground)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount a BFS mount")
    u.add_argument("mountpoint")
    u.add_argument("--lazy", action="store_true", help="detach now, clean up when no longer busy")
    u.set_defaults(func=cmd_umount)
