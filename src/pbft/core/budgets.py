"""Per-sender budgets, checked before parsing: what one replica may make us parse and handle per
status interval, of each kind of message that a correct replica sends only a few of per interval.

Owns: each (replica, message tag)'s use of its budget in the current interval. May not touch
anything else: ``Replica.receive`` asks it about a frame whose MAC verified, before parsing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..codec import Frame
from ..messages import Tag
from .drops import Drop
from .requests import VOUCH_BATCH_MAX

if TYPE_CHECKING:
    from .replica import Replica


# what one replica may make us parse and handle per status interval, per kind of message that a
# correct replica sends a few of per interval (checked before parsing; ``SenderBudgets.within``):
# tag -> (name, unit, limit, drop when relayed, drop when over budget). Vouch: 8 x 34 bytes per key
# of max(VOUCH_BATCH_MAX, 16 clients_max) keys, far above what a correct replica vouches for in an
# interval (one key per request it receives); Status: one per interval from a correct replica;
# QueryStable: one per two intervals
SENDER_BUDGETS: dict[int, tuple[str, str, int, Drop, Drop]] = {
    Tag.VOUCH: ("vouch", "bytes", 8 * 34, Drop.VOUCH_RELAYED, Drop.VOUCH_OVER_BUDGET),
    Tag.STATUS: ("status", "count", 8, Drop.STATUS_RELAYED, Drop.STATUS_OVER_BUDGET),
    Tag.QUERY_STABLE: ("query-stable", "count", 4, Drop.QUERY_STABLE_RELAYED, Drop.QUERY_STABLE_OVER_BUDGET),
}


class SenderBudgets:
    """Each replica's use of its budgets (see the module docstring)."""

    __slots__ = ("r", "used")

    def __init__(self, replica: "Replica"):
        self.r = replica
        self.used: dict[tuple[int, int], tuple[float, int]] = {}  # (replica, tag) -> (interval start, used)

    def within(self, fr: Frame, relayed: bool) -> bool:
        """Before parsing: whether replica ``fr.sender`` (its MAC verified) is within its budget
        for this kind of message this status interval (``SENDER_BUDGETS``); if not, the frame is
        dropped at the cost of its MAC check. Vouch, Status and QueryStable are never relayed by
        correct replicas, so a relayed one is dropped too (another replica cannot spend the
        author's budget by replaying its frames)."""
        r = self.r
        _, unit, limit, relayed_drop, over_drop = SENDER_BUDGETS[fr.tag]
        if relayed:
            r._drop(relayed_drop)
            return False
        if unit == "bytes":
            cost, limit = len(fr.raw), limit * max(VOUCH_BATCH_MAX, 16 * r.cfg.clients_max)
        else:
            cost = 1
        k = (fr.sender, fr.tag)
        start, used = self.used.get(k, (r.now, 0))
        if r.now - start >= r.cfg.status_interval_ms:
            start, used = r.now, 0
        if used > 0 and used + cost > limit:
            r._drop(over_drop)
            return False
        self.used[k] = (start, used + cost)
        return True
