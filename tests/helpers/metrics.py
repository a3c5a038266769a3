"""Reading the Prometheus text of a live replica (``netutil.LocalCluster``)."""

from __future__ import annotations

import urllib.request


def metrics_text(lc, rid: int, timeout: float = 2.0) -> str:
    """The ``/metrics`` page of replica ``rid`` of a running ``LocalCluster``."""
    r = lc.cluster.replicas[rid]
    with urllib.request.urlopen(f"http://{r.metrics_addr}:{r.metrics_port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of metric ``name`` whose labels include ``labels``; fails the
    test if there is none."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, val = line.rpartition(" ")
        if not (head == name or head.startswith(name + "{")):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(val)
            found = True
    assert found, f"metric {name} {labels} not exported"
    return total
