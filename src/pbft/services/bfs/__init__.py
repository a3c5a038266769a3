"""BFS: a Byzantine-fault-tolerant POSIX file system on pbft (``docs/bfs.md``).

* ``BFSService``: the replicated service (``pbft up DIR --service bfs``);
* ``pbft.services.bfs.protocol``: its operations and results, for clients;
* ``pbft.services.bfs.mount``: the FUSE mount (``pbft mount DIR MOUNTPOINT``).
"""

from .config import BFSConfig, ClientPolicy, load_bfs_config, parse_bfs_section
from .protocol import BFSError, creds, decode_result, encode_op
from .service import CHUNK, BFSService

__all__ = ["BFSService", "BFSConfig", "ClientPolicy", "load_bfs_config", "parse_bfs_section", "BFSError", "creds",
           "decode_result", "encode_op", "CHUNK"]
