"""The CPU scheduling policy of a server process (``[runtime] scheduling``).

``batch`` puts the process under Linux's ``SCHED_BATCH``: the scheduler never lets a task of
this policy preempt the running task when it wakes up. A replica sends each protocol message to
every other replica, one write per connection; when the receivers run on the same CPU as the
sender (several replicas on one machine, as in a local cluster), each write used to wake a
receiver that preempted the sender in the middle of its multicast, so the last copies left only
after the first receivers had done their work. Under ``SCHED_BATCH`` the sender finishes its turn,
and the woken replicas run when it waits for input, on the other CPUs meanwhile. A replica alone
on its machine sees no difference. ``normal`` keeps the system's default policy.

Applied once at the start of the process, before its threads start (they inherit it). Where the
policy does not exist (not Linux) or cannot be set, the process keeps its policy and says so.
"""

from __future__ import annotations

import os


def apply_scheduling(policy: str) -> str:
    """Put the calling process under ``policy``; returns what it runs under afterwards
    (``"batch"``, ``"normal"``, or ``"normal (...why...)"`` when ``batch`` could not be set)."""
    if policy != "batch":
        return "normal"
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return "normal (SCHED_BATCH is not available here)"
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as e:
        return f"normal (SCHED_BATCH refused: {e.strerror})"
    return "batch"


def current_scheduling() -> str:
    """The policy the calling thread runs under, as ``apply_scheduling`` names it."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is not None and os.sched_getscheduler(0) == batch:
        return "batch"
    return "normal"
