"""Where replica state meets a disk: ``store`` (the interface and its record framing),
``lmdb`` (a real disk), ``wal`` (the durable mode's: a write-ahead log in front of LMDB, one
fdatasync per group commit; ``open_store`` picks a mode's store) and ``memory`` (the simulator's
disk, with faults).  The only I/O of replica state; ``pbft.state`` stays pure."""

from .lmdb import LmdbStore
from .memory import MemStore
from .store import META_KEY, CorruptRecord, Store, StoreError, frame, intact, unframe
from .wal import WalStore, open_store

__all__ = ["META_KEY", "CorruptRecord", "LmdbStore", "MemStore", "Store", "StoreError", "WalStore", "frame", "intact",
           "open_store", "unframe"]
