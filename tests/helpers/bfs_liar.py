"""A Byzantine BFS replica for tests/services/test_bfs_faults.py: ``pbft replica DIR --id I --service
tests.helpers.bfs_liar:LyingBFS``.  It executes every operation as a correct replica does (so its state,
and its checkpoints, stay right), and lies in its replies: data read is altered, directory
listings lose an entry, every third attribute reply has a wrong size.  Its lookups and the
other attribute replies are true, so clients keep choosing it as designated replier."""

from __future__ import annotations

import sys

import msgpack

from pbft.services.bfs import BFSService
from pbft.services.bfs.protocol import A_SIZE


class LyingBFS(BFSService):
    # built like every BFS service, by ``BFSService.from_cluster``: ``config`` is the [bfs]
    # section of the cluster's cluster.toml
    def __init__(self, config):
        super().__init__(config)
        self.lies = 0
        self.getattrs = 0

    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        out = super().execute(operation, client, nondet, read_only)
        try:
            kind = msgpack.unpackb(operation, raw=False)[0]
            res = msgpack.unpackb(out, raw=False)
        except Exception:  # noqa: BLE001 - garbage operations: the true (error) reply
            return out
        if res[0] != 0:
            return out
        value = res[1]
        if kind == "read" and value:
            value = bytes([value[0] ^ 0xFF]) + value[1:]
        elif kind == "readdir" and value[0]:
            value = [value[0][1:], *value[1:]]
        elif kind == "getattr":
            self.getattrs += 1
            if self.getattrs % 3:  # two true attribute replies, then a lie: the liar is soon
                return out         # designated again, whatever the client's rotation
            value = list(value)
            value[A_SIZE] += 4096
        else:
            return out
        self.lies += 1
        print(f"bfs-liar: lie {self.lies} op={kind} read_only={read_only}", file=sys.stderr, flush=True)
        return msgpack.packb((0, value), use_bin_type=True)
