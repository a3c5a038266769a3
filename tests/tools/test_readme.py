"""The README's service example works as written."""

import pathlib
import re

from helpers.cluster import Cluster

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def readme_service_class():
    code = next(b for b in python_blocks() if "class Counter" in b)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns["Counter"]


def test_readme_counter_service_replicates():
    Counter = readme_service_class()
    c = Cluster(service=Counter)
    for expected in (b"1", b"2", b"3"):
        cl = c.clients[0]
        cl.invoke(b"inc", False, c.now)
        c.run()
        c.advance(20)
        (out,) = cl.take_outcomes()
        assert out.result == expected
    cl = c.clients[1]
    cl.invoke(b"get", True, c.now)
    c.run()
    (out,) = cl.take_outcomes()
    assert out.result == b"3"
    assert {r.service.value for r in c.replicas} == {3}
    # a mutating call sent as read-only is refused by the service, not executed
    cl.invoke(b"inc", True, c.now)
    c.run()
    (out,) = cl.take_outcomes()
    assert out.result.startswith(b"error")


def test_readme_object_form_service_replicates_and_checkpoints_incrementally():
    import msgpack
    code = next(b for b in python_blocks() if "class Inventory" in b)
    ns: dict = {"msgpack": msgpack}
    exec(compile(code, "README.md", "exec"), ns)
    c = Cluster(service=ns["Inventory"], checkpoint_interval_seqnos=4, log_window_seqnos=8)
    for i, (name, count) in enumerate([("nuts", 3), ("bolts", 5), ("nuts", 4), ("gears", 1), ("bolts", 2)]):
        cl = c.clients[i % 2]
        cl.invoke(msgpack.packb([name, count]), False, c.now)
        c.run()
        c.advance(20)
        (out,) = cl.take_outcomes()
        assert msgpack.unpackb(out.result) == count
    assert {r.service.total.value for r in c.replicas} == {15}
    assert len({r.state_digest() for r in c.replicas}) == 1
    r = c.replicas[0]
    assert r.state.n == r.rs.R + 257 and r.low_water_mark >= 4
    # a checkpoint hashed only the objects written since the one before, not all 321
    assert r.state.stats["leaves_hashed"] < 3 * r.state.n


def test_readme_client_snippet_runs_against_a_real_cluster(tmp_path):
    """The README's client example, run as written against a real 4-replica cluster."""
    from helpers.netutil import LocalCluster

    code = next(b for b in python_blocks() if "BlockingClient" in b)
    lc = LocalCluster(tmp_path / "mycluster")
    try:
        lc.start_all()
        exec(compile(code.replace('"mycluster"', repr(str(lc.dir))), "README.md", "exec"), {})
        assert lc.status(0)["executed_requests"] >= 1
    finally:
        lc.stop()
