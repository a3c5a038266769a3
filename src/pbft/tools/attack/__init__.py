"""``pbft attack``: an attack suite against a live local cluster (see docs/attacks.md).

``run`` is the supervisor (cluster, measurements, report); ``workers`` holds the
correct workload and the attackers, each run as a process of its own
(``python -m pbft.tools.attack workload|worker ...``) so that what is measured is the
replicas, not a shared event loop.
"""

from .run import ATTACKS, FLOORS, RSS_LIMIT_MIB, add_attack_command, cmd_attack, parse_attacks

__all__ = ["ATTACKS", "FLOORS", "RSS_LIMIT_MIB", "add_attack_command", "cmd_attack", "parse_attacks"]
