"""Kept for ``pbft.attack`` until it moves under ``pbft.tools``: ``pbft bench`` is
``pbft.tools.bench`` and the child-process supervisor ``pbft.tools.procs``."""

from .tools.bench.stats import percentile
from .tools.procs import ChildExited, Procs
from .tools.procs import log_tail as _log_tail
from .tools.procs import sigterm_as_interrupt as _on_sigterm


class Children(Procs):
    """``Procs`` under its old name and method (``spawn``)."""

    def spawn(self, name, args, pipes=False):
        return self.start(name, args, pipes=pipes)


__all__ = ["ChildExited", "Children", "_log_tail", "_on_sigterm", "percentile"]
