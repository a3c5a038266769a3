"""What one step of the core hands to its driver: ``Ready``, and the contract for using it.

Owns: the ``Ready`` record. It touches no protocol state: it only carries what the replica
collected during the step (``Replica.out``, its events, its records to write).

The replica is a pure state machine. A driver feeds it input (``receive``, ``tick``, ``restore``,
``begin_recovery``, ``restart``) and after each such step calls ``Replica.take_ready()`` once; every
effect of the step leaves through that one call, never through a callback or a trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

Send = tuple[tuple[int, ...], bytes]  # (destination principal ids, sealed frame)


@dataclass(frozen=True, slots=True)
class Ready:
    """The effects of one step, to be carried out by the driver IN THIS ORDER:

    1. ``persist``: records to write to stable storage (key -> value; ``None`` deletes the key),
       in one transaction, and (in the durable mode) synced. Empty when persistence is off.
    2. Only then ``sends``: ``(destinations, frame)`` pairs. Nothing of a step may reach the
       network before what it implies is on disk: a replica that crashes after sending must come
       back from its store with everything it said (see ``pbft.core.durability``). A driver
       that writes asynchronously keeps each step's sends behind that step's write.
    3. ``events``: what happened, for observers (oracles, metrics, logs, tests). Events carry
       no protocol effect: a driver may ignore them all.
    4. ``refresh_keys``: another replica's recovery request executed here; a driver that holds
       session keys refreshes its own (at its own pace), so that keys the recovering replica's
       attacker may have learnt are useless. A driver without session keys ignores it.

    A driver that drops a step's Ready (a failed process) must drop all of it.
    """

    persist: dict[bytes, Optional[bytes]] = field(default_factory=dict)
    sends: list[Send] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    refresh_keys: bool = False

    def __init__(self, persist: Optional[dict[bytes, Optional[bytes]]] = None, sends: Optional[list[Send]] = None,
                 events: Optional[list[Any]] = None, refresh_keys: bool = False) -> None:
        # (its own ``__init__``, as the hot messages have (``pbft.messages``): native when compiled)
        object.__setattr__(self, "persist", {} if persist is None else persist)
        object.__setattr__(self, "sends", [] if sends is None else sends)
        object.__setattr__(self, "events", [] if events is None else events)
        object.__setattr__(self, "refresh_keys", refresh_keys)

    def __bool__(self) -> bool:
        return bool(self.persist or self.sends or self.events or self.refresh_keys)

