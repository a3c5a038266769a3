"""The service interface: what a replicated application implements.

A service is a deterministic state machine.  The library calls:

* ``execute(operation, client, nondet, read_only) -> result``: run one
  operation.  ``client`` is the authenticated client id (use it for access
  control); ``nondet`` is the value all replicas agreed on for this batch
  (e.g. the time); with ``read_only=True`` the service must not change its
  state and should refuse operations that would.
* ``propose_nondet(now_ms) -> bytes`` at the primary and
  ``check_nondet(value, now_ms) -> bool`` at the backups: agreement on
  non-deterministic inputs.  A backup that rejects the primary's value does
  not accept its pre-prepare.
The state comes in one of two forms (``docs/state.md``):

* **object form** (``n_objects > 0``): the state is an array of ``n_objects``
  objects; ``get_obj(i) -> bytes`` returns object ``i`` canonically (two replicas
  with the same logical state produce the same bytes), ``put_objs({i: bytes})``
  replaces objects (raise ``ValueError`` on bytes ``get_obj`` could not have
  produced), and the service calls ``self.modify(i)`` *before* changing object
  ``i``.  Checkpoints then cost work in proportion to what changed, and state
  transfer moves only the objects that differ.  ``ObjectService`` with the helpers
  of ``pbft.state.objects`` (``ObjectDict``, ``Pages``, ``Cell``) does the
  bookkeeping.
* **whole-state form** (``n_objects == 0``): ``get_state() -> bytes`` /
  ``set_state(bytes)``, a canonical serialisation of the whole state, which is
  then one object, serialised and hashed again at every checkpoint in which it
  may have changed.  Simple, and fine for small states.

Services are driven by one thread; they never see the network.

**Per-client policy** (``docs/client.md``): a service that needs configuration, typically what
each client id may do, defines the classmethod ``from_cluster(cluster)``; ``pbft replica``
(``pbft.tools.net.load_service``) builds it with ``cls.from_cluster(ServiceCluster)`` instead of
``cls()``.  The ``ServiceCluster`` gives the client ids and the service's own section of
``cluster.toml`` (``[service.NAME]``), the same file on every replica, so every replica builds
the same service.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Optional

from .state.objects import ObjectSpace


class ServiceCluster:
    """What a service may read of the validated cluster configuration (``Service.from_cluster``).

    * ``n``, ``f``: replicas and tolerated faults; ``client_ids``: the client identities of the
      ``[[client]]`` entries, ascending (the ids ``execute`` receives as ``client``);
    * ``section(name)``: the service's table ``[service.NAME]`` of ``cluster.toml`` (a fresh
      copy of plain dicts, lists, numbers and strings), or ``None`` if there is none;
    * ``cfg``: the protocol configuration (``pbft.config.ClusterConfig``), ``None`` when the
      service is built without a cluster (``ServiceCluster()``: no clients, no sections);
    * ``where(name)``: how to name the section in an error message.

    The sections come from ``cluster.toml`` alone (not the environment or the command line):
    with the same file on every machine, every replica builds the same service.
    """

    def __init__(self, n: int = 0, f: int = 0, client_ids=(), sections: Optional[Mapping[str, dict]] = None,
                 cfg: Any = None, path: str = "cluster.toml"):
        self.n = n
        self.f = f
        self.client_ids: tuple[int, ...] = tuple(sorted(client_ids))
        self.cfg = cfg
        self.path = path
        self._sections = dict(sections or {})

    def section(self, name: str) -> Optional[dict]:
        """The table ``[service.NAME]`` (a copy), or ``None``."""
        t = self._sections.get(name)
        return copy.deepcopy(t) if t is not None else None

    def where(self, name: str) -> str:
        """``"<path> [service.NAME]"``, for one-line error messages."""
        return f"{self.path} [service.{name}]"

    @classmethod
    def of(cls, cluster) -> "ServiceCluster":
        """The view of a loaded cluster directory (``pbft.runtime.cluster.Cluster``)."""
        return cls(cluster.n, cluster.cfg.f, cluster.client_ids, cluster.service_sections, cluster.cfg,
                   str(cluster.dir / "cluster.toml"))


class Service(ABC):
    #: number of objects in the object form; 0 selects the whole-state form
    n_objects: int = 0

    @classmethod
    def from_cluster(cls, cluster: ServiceCluster) -> "Service":
        """Build the service for a cluster (what ``pbft replica --service module:Class`` calls).

        Override to read configuration, e.g. a per-client policy, from
        ``cluster.section(NAME)`` and ``cluster.client_ids``; raise ``pbft.ConfigError`` (one
        line) on a bad section.  The result must depend only on ``cluster``, so that every
        replica builds the same service.  The default: ``cls()``.
        """
        return cls()

    @abstractmethod
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        """Apply ``operation`` and return its result (bytes)."""

    def propose_nondet(self, now_ms: float) -> bytes:
        """Value proposed by the primary for the next batch (default: none)."""
        return b""

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        """Whether a backup accepts the primary's proposed value."""
        return value == b""

    # -- whole-state form ----------------------------------------------------------
    def get_state(self) -> bytes:
        """Canonical bytes of the whole state."""
        raise NotImplementedError(f"{type(self).__name__} has neither get_state nor n_objects")

    def set_state(self, data: bytes) -> None:
        """Replace the state with one produced by ``get_state`` (possibly on another replica).

        Raise ``ValueError`` if the bytes are not a valid state.
        """
        raise NotImplementedError(f"{type(self).__name__} has neither set_state nor n_objects")

    # -- object form ---------------------------------------------------------------
    def get_obj(self, i: int) -> bytes:
        """Canonical bytes of object ``i`` (object form)."""
        raise NotImplementedError

    def put_objs(self, objs: dict[int, bytes]) -> None:
        """Replace these objects (object form); raise ``ValueError`` if any is invalid,
        leaving the state unchanged."""
        raise NotImplementedError

    def modify(self, i: int) -> None:
        """Call before changing object ``i``; the library replaces this (``bind_state``)."""

    def bind_state(self, modify: Callable[[int], None]) -> None:
        """Called once by the library with the function ``modify`` must forward to."""
        self.modify = modify  # type: ignore[method-assign,assignment]


class ObjectService(Service):
    """A service in the object form whose state is an ``ObjectSpace`` of helpers.

    Set ``self.space = ObjectSpace(part, ...)`` in ``__init__`` (``ObjectDict``,
    ``Pages``, ``Cell`` from ``pbft.state.objects``, laid out from object 0); the
    parts call ``modify`` themselves when they change.  ``from_cluster`` is ``Service``'s.
    """

    space: ObjectSpace

    @property
    def n_objects(self) -> int:  # type: ignore[override]
        return self.space.n_objects

    def get_obj(self, i: int) -> bytes:
        return self.space.get_obj(i)

    def put_objs(self, objs: dict[int, bytes]) -> None:
        self.space.put_objs(objs)

    def bind_state(self, modify: Callable[[int], None]) -> None:
        self.modify = modify  # type: ignore[method-assign,assignment]
        self.space.bind(modify)
