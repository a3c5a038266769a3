"""The cyclic garbage collector of a long-running server or client process.

CPython runs a young-generation collection every 700 allocations of container objects (net of
frees) by default. A replica allocates several per frame (the decoded message, its tuples and
lists, the event loop's handles), so at a few thousand operations a second it collected young
objects hundreds of times a second, each collection also walking what survived the last ones:
a live profile of a backup at 32 clients showed about a tenth of its CPU in the collector.
Almost all of it is reclaimed by reference counting anyway; the collector only finds cycles.

``tune()``, called once a process has loaded its modules, configuration and keys:

* ``gc.freeze()``: what exists at that point (modules, classes, the configuration) is moved to
  a generation the collector never walks again;
* raises the young generation's threshold to ``GEN0_THRESHOLD``: collections 30 times rarer,
  each a little longer; cycles are still collected, a few milliseconds of allocations later.

``PBFT_GC=default`` leaves the interpreter's settings alone (to compare).
"""

from __future__ import annotations

import gc
import os

GEN0_THRESHOLD = 20_000


def tune() -> bool:
    """Freeze the objects alive now and raise the young generation's threshold; False (and
    nothing changed) with ``PBFT_GC=default``."""
    if os.environ.get("PBFT_GC", "").strip().lower() == "default":
        return False
    gc.collect()
    gc.freeze()
    g0, g1, g2 = gc.get_threshold()
    if g0 and g0 < GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, g1, g2)
    return True
