"""pbft: Practical Byzantine Fault Tolerance (Castro & Liskov) in Python.

Public API:

* ``pbft.Service``: what a replicated application implements (``execute`` ...);
* ``pbft.Client`` (asyncio) and ``pbft.BlockingClient``: invoke operations on a cluster;
* ``pbft.NoQuorumError``, ``pbft.NotAdmittedError``, ``pbft.PbftError``, ``pbft.ConfigError``.

The networked pieces are imported lazily so that the pure core and the
simulator do not need the runtime's dependencies.
"""

from . import _native

_native.activate()  # the compiled modules of `make native` if they match the sources (before any of them)

from .config import ConfigError  # noqa: E402
from .service import Service  # noqa: E402

__all__ = ["Service", "Client", "BlockingClient", "ClientPool", "NoQuorumError", "NotAdmittedError", "PbftError",
           "ConfigError"]


def __getattr__(name):
    if name in ("Client", "BlockingClient", "ClientPool", "NoQuorumError", "NotAdmittedError", "PbftError"):
        from .runtime import client
        return getattr(client, name)
    raise AttributeError(f"module 'pbft' has no attribute {name!r}")
