"""Where replica state meets a disk: ``store`` (the interface and its record framing),
``lmdb`` (a real disk) and ``memory`` (the simulator's disk, with faults).  The only I/O of
replica state; ``pbft.state`` stays pure."""

from .lmdb import LmdbStore
from .memory import MemStore
from .store import META_KEY, CorruptRecord, Store, StoreError, frame, intact, unframe

__all__ = ["META_KEY", "CorruptRecord", "LmdbStore", "MemStore", "Store", "StoreError", "frame", "intact", "unframe"]
