"""``Service.from_cluster``: how a service given as ``--service module:Class`` learns its section
of cluster.toml (``[service.NAME]``) and the client ids, e.g. a per-client policy."""

import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from pbft import ConfigError, Service
from pbft.cli_net import load_service
from pbft.runtime.cluster import init_cluster, load_cluster
from pbft.service import ServiceCluster

HERE = Path(__file__).resolve().parent
SPEC = f"{__name__}:QuotaCounter"


class QuotaCounter(Service):
    """Counts each client's increments up to its quota: ``[service.quota]`` gives a default and
    per-client quotas (``[service.quota.client.<id>]``); a client id not in the cluster is an
    error of the section."""

    def __init__(self, quotas=None, default=0, client_ids=()):
        self.quotas = dict(quotas or {})
        self.default = default
        self.client_ids = tuple(client_ids)
        self.counts: dict[int, int] = {}

    @classmethod
    def from_cluster(cls, cluster):
        t = cluster.section("quota") or {}
        default = t.get("default", 0)
        if type(default) is not int or default < 0:
            raise ConfigError(f"{cluster.where('quota')}: default must be a non-negative integer, got {default!r}")
        quotas = {}
        for name, ct in (t.get("client") or {}).items():
            cid = int(name)  # a ValueError here: load_service makes it a one-line ConfigError
            if cid not in cluster.client_ids:
                raise ConfigError(f"{cluster.where('quota')}: no client {cid} in the cluster")
            quotas[cid] = ct["max"]  # a KeyError: the same
        return cls(quotas, default, cluster.client_ids)

    def execute(self, operation, client, nondet, read_only):
        if read_only:
            return msgpack.packb(self.counts.get(client, 0))
        if self.counts.get(client, 0) >= self.quotas.get(client, self.default):
            return msgpack.packb("quota")
        self.counts[client] = self.counts.get(client, 0) + 1
        return msgpack.packb(self.counts[client])

    def get_state(self):
        return msgpack.packb(sorted(self.counts.items()))

    def set_state(self, data):
        self.counts = dict(msgpack.unpackb(data))


class Plain(Service):
    """No hook: built with ``Plain()``."""

    def __init__(self):
        self.built = True

    def execute(self, operation, client, nondet, read_only):
        return b""

    def get_state(self):
        return b""

    def set_state(self, data):
        pass


def make_plain():
    return Plain()


def cluster_dir(tmp_path, extra: str = "", clients: int = 3, top: str = ""):
    """A cluster of 4 replicas; ``extra`` appended to its cluster.toml, ``top`` put before it."""
    c = init_cluster(tmp_path / "c", 4, None, None, 7000, clients)
    path = c.dir / "cluster.toml"
    path.write_text(top + path.read_text() + extra)
    return c.dir


def test_a_service_gets_its_section_and_the_client_ids(tmp_path):
    d = cluster_dir(tmp_path, "\n[service.quota]\ndefault = 1\n\n[service.quota.client.5]\nmax = 3\n")
    cluster = load_cluster(d)
    svc = load_service(SPEC, cluster)
    assert isinstance(svc, QuotaCounter)
    assert svc.client_ids == (4, 5, 6) == tuple(cluster.client_ids)
    assert svc.quotas == {5: 3} and svc.default == 1
    # the policy is the service's: client 5 may count to 3, the others to 1
    results = {c: [msgpack.unpackb(svc.execute(b"", c, b"", False)) for _ in range(4)] for c in (4, 5)}
    assert results == {4: [1, "quota", "quota", "quota"], 5: [1, 2, 3, "quota"]}
    # every replica loading the same file builds the same service
    again = load_service(SPEC, load_cluster(d))
    assert (again.quotas, again.default, again.client_ids) == (svc.quotas, svc.default, svc.client_ids)


def test_sections_are_copies_and_absent_sections_are_none(tmp_path):
    d = cluster_dir(tmp_path, "\n[service.quota]\ndefault = 2\n")
    view = ServiceCluster.of(load_cluster(d))
    view.section("quota")["default"] = 99
    assert view.section("quota") == {"default": 2}
    assert view.section("other") is None
    assert view.n == 4 and view.f == 1 and view.cfg.n == 4
    assert load_service(SPEC, load_cluster(cluster_dir(tmp_path / "b"))).default == 0


def test_without_a_cluster_a_service_gets_an_empty_view():
    svc = load_service(SPEC)
    assert svc.client_ids == () and svc.quotas == {} and svc.default == 0


def test_a_class_without_the_hook_loads_with_no_arguments(tmp_path):
    cluster = load_cluster(cluster_dir(tmp_path, "\n[service.quota]\ndefault = 1\n"))
    for spec in (f"{__name__}:Plain", f"{__name__}:make_plain"):
        svc = load_service(spec, cluster)
        assert isinstance(svc, Plain) and svc.built
    assert isinstance(load_service(f"{__name__}:Plain"), Plain)


@pytest.mark.parametrize("section, message", [
    ("default = -1", "[service.quota]: default must be a non-negative integer, got -1"),
    ("[service.quota.client.99]\nmax = 1", "[service.quota]: no client 99 in the cluster"),
    ("[service.quota.client.five]\nmax = 1", "ValueError"),
    ("[service.quota.client.4]\nlimit = 1", "KeyError"),
])
def test_a_bad_section_is_a_one_line_config_error(tmp_path, section, message):
    cluster = load_cluster(cluster_dir(tmp_path, f"\n[service.quota]\n{section}\n"))
    with pytest.raises(ConfigError) as e:
        load_service(SPEC, cluster)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("top, extra, message", [
    ('service = "kv"\n', "", "[service] must hold tables"),
    ("", "\n[service]\nquota = 3\n", "[service.quota] must be a table"),
    ("", "\n[bfs]\ninodes_max = 10\n\n[service.bfs]\ninodes_max = 10\n", "both [bfs] and [service.bfs]"),
])
def test_a_malformed_service_table_is_refused_when_the_cluster_loads(tmp_path, top, extra, message):
    d = cluster_dir(tmp_path, extra, top=top)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_cluster(d)


def test_pbft_up_reports_a_bad_section_in_one_line_before_starting_anything(tmp_path):
    d = cluster_dir(tmp_path, "\n[service.quota]\ndefault = -1\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "pbft.cli", "up", str(d), "--service", "test_service_hook:QuotaCounter"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "default must be a non-negative integer" in p.stderr
    assert "Traceback" not in p.stderr and "replicas running" not in p.stderr


BFS_SECTION = """
[{name}]
inodes_max = 777

[{name}.client.default]
uids = [1000]

[{name}.client.5]
uids = "*"
root = true
"""


@pytest.mark.parametrize("name", ["bfs", "service.bfs"])
@pytest.mark.parametrize("spec", ["bfs", "pbft.services.bfs:BFSService", "helpers.bfs_liar:LyingBFS"])
def test_bfs_and_its_subclasses_get_their_policy_through_the_hook(tmp_path, monkeypatch, name, spec):
    monkeypatch.syspath_prepend(str(HERE))
    svc = load_service(spec, load_cluster(cluster_dir(tmp_path, BFS_SECTION.format(name=name))))
    assert svc.cfg.inodes_max == 777
    assert svc.cfg.policy(5).root and svc.cfg.policy(5).uids is None
    assert not svc.cfg.policy(4).root and svc.cfg.policy(4).uids == frozenset({1000})
    if spec.endswith("LyingBFS"):
        assert type(svc).__name__ == "LyingBFS" and svc.lies == 0


def test_a_bad_bfs_section_is_still_a_one_line_error(tmp_path):
    cluster = load_cluster(cluster_dir(tmp_path, "\n[bfs]\ninodes_max = -3\n"))
    with pytest.raises(ConfigError, match=r"\[bfs\] inodes_max must be an integer"):
        load_service("pbft.services.bfs:BFSService", cluster)
