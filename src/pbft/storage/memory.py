"""``MemStore``: the simulated disk of the deterministic simulator, a
:class:`~pbft.storage.store.Store` with no real I/O, no clock, and fault injection (power loss
with torn writes, bit flips, truncation, forged records) driven by the rngs passed in."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from .store import Store, frame, framed_puts


class MemStore(Store):
    """A simulated disk: no real I/O, no clock, randomness only from passed-in rngs.

    ``synced`` holds framed values as on disk; ``unsynced`` holds pending
    (fast-mode) transactions of framed puts, which reach ``synced`` on
    :meth:`flush` or automatically every ``fast_sync_every`` writes. Reads see
    synced + unsynced, like a page cache. A process crash keeps the unsynced
    writes (the OS page cache survives: the simulator just keeps using this
    object, and :meth:`close` is a no-op); :meth:`power_loss` drops them.
    """

    def __init__(self, durable: bool = True, fast_sync_every: int = 64) -> None:
        self.durable = durable
        self.fast_sync_every = fast_sync_every
        self.synced: dict[bytes, bytes] = {}
        self.unsynced: list[dict[bytes, Optional[bytes]]] = []
        self._view: dict[bytes, bytes] = {}
        self.stats = {"writes": 0, "bytes_written": 0, "sync_seconds": 0.0}

    def write(self, puts: Mapping[bytes, Optional[bytes]]) -> None:
        txn = framed_puts(puts)
        _apply(self._view, txn)
        if self.durable:
            _apply(self.synced, txn)
        else:
            self.unsynced.append(txn)
            if len(self.unsynced) >= self.fast_sync_every:
                self.flush()
        self.stats["writes"] += 1
        self.stats["bytes_written"] += sum(len(k) + len(v or b"") for k, v in txn.items())

    def _raw_get(self, key: bytes) -> Optional[bytes]:
        return self._view.get(key)

    def _raw_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(k for k in self._view if k.startswith(prefix))
        return iter([(k, self._view[k]) for k in keys])

    def flush(self) -> None:
        for txn in self.unsynced:
            _apply(self.synced, txn)
        self.unsynced.clear()

    def close(self) -> None:
        pass

    # -- fault injection ------------------------------------------------------

    def power_loss(self, rng: random.Random, torn: bool = False) -> int:
        """Drops unsynced txns (returns how many were pending). If ``torn``, a
        prefix of the first one's puts may reach the disk, the last of them cut
        to a random prefix of its framed bytes."""
        pending = len(self.unsynced)
        if torn and self.unsynced:
            items = list(self.unsynced[0].items())
            n = rng.randint(0, len(items))
            for i, (key, value) in enumerate(items[:n]):
                if value is None:
                    self.synced.pop(key, None)
                else:
                    self.synced[key] = value[:rng.randint(0, len(value))] if i == n - 1 else value
        self.unsynced.clear()
        self._view = dict(self.synced)
        return pending

    def _source(self, key: bytes) -> dict[bytes, Any]:
        """Where the visible copy of key lives: the newest unsynced txn writing it, or synced."""
        for txn in reversed(self.unsynced):
            if key in txn:
                if txn[key] is None:
                    break
                return txn
        else:
            if key in self.synced:
                return self.synced
        raise KeyError(key)

    def _mutate(self, key: bytes, framed: bytes) -> None:
        self._source(key)[key] = framed
        self._view[key] = framed

    def corrupt(self, key: bytes, rng: random.Random) -> None:
        """Flips one random bit of the stored framed value (KeyError if absent)."""
        framed = bytearray(self._source(key)[key])
        if framed:
            bit = rng.randrange(len(framed) * 8)
            framed[bit // 8] ^= 1 << (bit % 8)
            self._mutate(key, bytes(framed))

    def forge(self, key: bytes, value: bytes) -> None:
        """Replace a stored record by ``value`` *with a valid checksum* (an attacker who
        can write the disk): only the checkpoint digest can tell."""
        framed = frame(key, value)
        self._view[key] = framed
        self.synced[key] = framed

    def truncate(self, key: bytes, nbytes: int) -> None:
        """Cuts the stored framed value to its first nbytes (KeyError if absent)."""
        self._mutate(key, self._source(key)[key][:nbytes])

    def corrupt_random(self, rng: random.Random, count: int) -> list[bytes]:
        """Corrupts ``count`` random distinct records; returns their keys (sorted)."""
        keys = rng.sample(sorted(self._view), min(count, len(self._view)))
        for key in keys:
            self.corrupt(key, rng)
        return sorted(keys)


def _apply(target: dict[bytes, Any], txn: Mapping[bytes, Optional[bytes]]) -> None:
    for key, value in txn.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
