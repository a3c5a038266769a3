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
* ``get_state() -> bytes`` / ``set_state(bytes)``: a canonical serialisation
  of the whole state, used for checkpoints, rollback of tentative execution
  and state transfer.  Two replicas with the same logical state must produce
  the same bytes.

Services are driven by one thread; they never see the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Service(ABC):
    @abstractmethod
    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        """Apply ``operation`` and return its result (bytes)."""

    def propose_nondet(self, now_ms: float) -> bytes:
        """Value proposed by the primary for the next batch (default: none)."""
        return b""

    def check_nondet(self, value: bytes, now_ms: float) -> bool:
        """Whether a backup accepts the primary's proposed value."""
        return value == b""

    @abstractmethod
    def get_state(self) -> bytes:
        """Canonical bytes of the whole state."""

    @abstractmethod
    def set_state(self, data: bytes) -> None:
        """Replace the state with one produced by ``get_state`` (possibly on another replica).

        Raise ``ValueError`` if the bytes are not a valid state.
        """
