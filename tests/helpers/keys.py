"""One way to build a test cluster's configuration, keys and codec."""

from __future__ import annotations

from dataclasses import dataclass

from pbft.codec import Codec
from pbft.config import ClusterConfig
from pbft.crypto import KeyRing, keyrings_for

#: the master key every hand-driven test cluster derives its keys from (``tests/helpers/cluster.py`` too)
MASTER_KEY = b"test-master-key-0123456789abcdef"


@dataclass(frozen=True)
class ClusterKeys:
    cfg: ClusterConfig
    rings: dict[int, KeyRing]
    codec: Codec

    @property
    def client_ids(self) -> tuple[int, ...]:
        return tuple(self.cfg.client_ids)


def cluster_keys(n: int = 4, clients: int = 2, master: bytes = MASTER_KEY, **cfg_kw) -> ClusterKeys:
    """A validated configuration of ``n`` replicas and ``clients`` clients (``cfg_kw`` are
    further ``ClusterConfig`` fields), the key ring of every principal, and a codec."""
    cfg = ClusterConfig.create(n, clients_max=clients, **cfg_kw)
    return ClusterKeys(cfg, keyrings_for(master, n, cfg.client_ids), Codec(cfg))
