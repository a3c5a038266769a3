"""A ``ReplicaNode`` driven by hand, on an event loop of its own (not running): the tests call its
handlers directly. ``with node_on_own_loop(lambda: ReplicaNode(...)) as nd:``; the node's store is
closed and the loop closed at the end, whatever the test did."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def node_on_own_loop(make: Callable) -> Iterator:
    loop = asyncio.new_event_loop()
    nd = None
    try:
        asyncio.set_event_loop(loop)
        nd = make()
        yield nd
    finally:
        if nd is not None and nd.store is not None:
            nd.store.close()
        asyncio.set_event_loop(None)
        loop.close()
