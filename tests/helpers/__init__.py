"""Helpers shared by the tests: the one place new helpers go.

Modules (import them as ``from helpers.keys import ...``; ``tests/`` is on ``sys.path``):

* ``keys``: the test master key and ``cluster_keys(n, clients)``: a validated configuration,
  every principal's key ring and a codec, built the same way everywhere;
* ``metrics``: reading a live replica's ``/metrics`` text and summing one metric;
* ``impls``: the registries of every ``Store`` and every shipped ``Service`` implementation,
  which the conformance suites (``tests/conformance/``) and the ``store`` fixture parametrize over;
* ``transcript``: the interpreter of the transcript tests of the core
  (``tests/core/transcripts/*.txt``), on top of the hand driver ``tests/helpers/cluster.py``.

* ``cluster``: the hand-driven cluster of pure replicas (``from helpers.cluster import Cluster``);
* ``netutil``: real replica processes on loopback (``LocalCluster``, free ports);
* ``bfsutil``: FUSE mounts of BFS on such a cluster;
* ``bfs_liar``: a Byzantine BFS service that replica processes load by its module path
  (``tests.helpers.bfs_liar:LyingBFS``).
The fixtures built on all of them live in ``tests/conftest.py``.
"""
