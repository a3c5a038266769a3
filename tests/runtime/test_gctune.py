"""``runtime.gctune``: the collector's settings of a long-running process, and PBFT_GC=default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import gc, json; from pbft.runtime import gctune; before = gc.get_threshold(); "
         "changed = gctune.tune(); print(json.dumps([changed, before, gc.get_threshold(), gc.get_freeze_count()]))")


def probe(**env):
    e = dict(os.environ)
    e.pop("PBFT_GC", None)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_tune_freezes_the_start_and_raises_the_young_threshold():
    changed, before, after, frozen = probe()
    assert changed is True
    assert after[0] == 20_000 and after[1:] == before[1:]
    assert frozen > 1000  # the modules and classes loaded so far


def test_pbft_gc_default_changes_nothing():
    changed, before, after, frozen = probe(PBFT_GC="default")
    assert changed is False and after == before and frozen == 0
