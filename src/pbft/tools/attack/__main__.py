"""``python -m pbft.tools.attack workload SPEC`` / ``worker NAME SPEC``: processes of ``pbft attack``."""

import sys


def main(argv: list[str]) -> int:
    from .workers import ATTACKERS, worker_main, workload_main

    if len(argv) == 2 and argv[0] == "workload":
        return workload_main(argv[1])
    if len(argv) == 3 and argv[0] == "worker" and argv[1] in ATTACKERS:
        return worker_main(argv[1], argv[2])
    print("usage: python -m pbft.tools.attack workload SPEC | worker NAME SPEC (internal commands of pbft attack; "
          f"attacks: {', '.join(ATTACKERS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
