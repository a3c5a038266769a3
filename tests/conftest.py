"""Fixtures shared by the tests, and the ``--rewrite`` option of the transcript tests.

* ``local_cluster(name="c", start=True, **kw)``: real replica processes on loopback
  (``netutil.LocalCluster``) in the test's temporary directory, always stopped at the end, even
  when starting them failed;
* ``store``: one empty store of every ``Store`` implementation in turn (``helpers.impls.STORES``),
  closed at the end; ``store_impl`` is its entry, to reopen it;
* ``rewrite``: whether ``--rewrite`` was given (regenerate transcript files instead of
  comparing them).

Helpers go in ``tests/helpers/``; ``tests/`` is on ``sys.path`` (pytest's rootdir-relative
imports), so ``from helpers.keys import cluster_keys`` (a configuration, every key ring and a
codec, built the same way everywhere) works in every test file, and ``from helpers.cluster import
Cluster`` gives the hand-driven cluster.
"""

from __future__ import annotations

import os

# The compiled modules of `make install` / `make native` whenever the build matches the sources
# (replica processes included), else the pure ones; `PBFT_NATIVE=0 pytest ...` runs the pure
# modules, `PBFT_NATIVE=require pytest ...` makes a missing or stale build an error.
os.environ.setdefault("PBFT_NATIVE", "1")

import pytest  # noqa: E402

from helpers.impls import STORES  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--rewrite", action="store_true", default=False,
                     help="transcript tests: write the actual output into the transcript files "
                          "instead of comparing (review the diff with git diff)")


@pytest.fixture
def rewrite(request) -> bool:
    return bool(request.config.getoption("--rewrite"))


@pytest.fixture
def local_cluster(tmp_path):
    """A factory of real clusters on loopback: ``local_cluster(name="c", start=True,
    **LocalCluster kwargs)``; every cluster made is stopped when the test ends."""
    from helpers.netutil import LocalCluster
    made = []

    def make(name: str = "c", start: bool = True, **kw):
        lc = LocalCluster(tmp_path / name, **kw)
        made.append(lc)
        if start:
            lc.start_all()
        return lc
    yield make
    for lc in reversed(made):
        lc.stop()


@pytest.fixture(params=STORES, ids=[s.name for s in STORES])
def store_impl(request):
    return request.param


@pytest.fixture
def store(store_impl, tmp_path):
    s = store_impl.open(tmp_path)
    yield s
    s.close()
