"""Helpers shared by the tests: the one place new helpers go.

Modules (import them as ``from helpers.keys import ...``; ``tests/`` is on ``sys.path``):

* ``keys``: the test master key and ``cluster_keys(n, clients)``: a validated configuration,
  every principal's key ring and a codec, built the same way everywhere;
* ``metrics``: reading a live replica's ``/metrics`` text and summing one metric;
* ``impls``: the registries of every ``Store`` and every shipped ``Service`` implementation,
  which the conformance suites (``tests/conformance/``) and the ``store`` fixture parametrize over;
* ``transcript``: the interpreter of the transcript tests of the core
  (``tests/transcripts/*.txt``), on top of the hand driver ``tests/cluster.py``.

The older helper modules stay importable where they are: ``cluster`` (the hand-driven
cluster), ``netutil`` (real replica processes on loopback), ``bfsutil`` (FUSE mounts of BFS) and
``bfs_liar`` (a Byzantine BFS service loaded by replica processes by its module path).
The fixtures built on all of them live in ``tests/conftest.py``.
"""
