"""The README's service example works as written."""

import pathlib
import re

from cluster import Cluster

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_service_class():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
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
