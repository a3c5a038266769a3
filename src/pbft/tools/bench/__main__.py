"""``python -m pbft.tools.bench serve-unreplicated DIR`` / ``load-worker SPEC``: the child
processes of ``pbft bench`` (the unreplicated server and the load workers)."""

from __future__ import annotations

import argparse
import sys

from ...config import ConfigError
from .load import load_worker_main
from .run import SERVICE


def _serve_unreplicated(argv: list[str]) -> int:
    from ..net import load_service
    from ...runtime.cluster import load_cluster
    from ...runtime.unreplicated import run_unreplicated

    p = argparse.ArgumentParser(prog="python -m pbft.tools.bench serve-unreplicated",
                                description="the unreplicated baseline server (internal to pbft bench)")
    p.add_argument("dir", help="a cluster directory of one replica (n=1, f=0)")
    p.add_argument("--service", default=SERVICE, help="'kv' or module:Class")
    a = p.parse_args(argv)
    cluster = load_cluster(a.dir)
    if cluster.n != 1:
        raise ConfigError(f"{a.dir} has {cluster.n} replicas; the unreplicated server needs a cluster of one")
    run_unreplicated(cluster, load_service(a.service, cluster))
    return 0


def _internal_main(argv: list[str]) -> int:
    cmds = {"serve-unreplicated": _serve_unreplicated, "load-worker": lambda rest: load_worker_main(rest[0])}
    if not argv or argv[0] not in cmds or (argv[0] == "load-worker" and len(argv) != 2):
        print("usage: python -m pbft.tools.bench serve-unreplicated DIR [--service SPEC] | load-worker SPEC "
              "(internal commands of pbft bench)", file=sys.stderr)
        return 2
    try:
        return cmds[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"pbft bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_internal_main(sys.argv[1:]))
