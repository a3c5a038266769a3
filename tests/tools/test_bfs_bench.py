"""``pbft bench-fs`` (pbft.services.bfs.bench) on a tiny scale, against BFS and a local
directory: the report's shape, and that every workload's files came back right.  Speed is
not asserted (that is the benchmark's output, not a test)."""

from __future__ import annotations

import io

import pytest

from helpers.bfsutil import why_not as why_not_fuse
from pbft.services.bfs import bench

REASON = why_not_fuse() or bench.why_not(["bfs", "local"])


def test_andrew_checks_catch_a_wrong_tree(tmp_path):
    # the contents checks can fail: a tree whose expected digests and output differ
    src = tmp_path / "src"
    files, answer = bench.write_source(src, per_module=1)
    root = tmp_path / "root"
    root.mkdir()
    wrong = dict(files)
    wrong["main.c"] = files["main.c"] + b"/* not what was copied */\n"
    phases, problems = bench.andrew(root, src, 1, (wrong, answer + 1))
    assert set(phases) == set(bench.ANDREW_PHASES)
    assert any("read back wrong" in p for p in problems)
    assert any("printed" in p for p in problems)


@pytest.mark.skipif(REASON is not None, reason=f"bench-fs needs FUSE and gcc: {REASON}")
def test_bench_fs_tiny_against_bfs_and_local(tmp_path):
    out = io.StringIO()
    rep = bench.run_bench(["bfs", "local"], [1], 1, 12, 12, 3, None, out=out, storage="memory", per_module=1,
                          hold_open=True)
    assert rep["targets"] == ["bfs", "local"]
    assert set(rep["results"]) == {"andrew-1", "postmark"}
    assert list(rep["results"]["andrew-1"]) == [*bench.ANDREW_PHASES, "total"]
    assert list(rep["results"]["postmark"]) == [*bench.POSTMARK_PHASES, "total"]
    for wl, phases in rep["results"].items():
        for phase, per in phases.items():
            assert set(per) == {"bfs", "local"}, (wl, phase)
            for _t, s in per.items():
                assert len(s["runs"]) == 1 and s["min"] == s["median"] == s["runs"][0] >= 0
            assert set(rep["ratios"][wl][phase]) == {"bfs/local"}
    # every workload's contents checked on both targets (copy, read, the compiled program's
    # output, PostMark's files against its model) and found right
    assert rep["problems"] == {"bfs": [], "local": []}
    # the mount reported the requests it sent, the file creations among them
    assert rep["mount_calls"]["bfs"]["create"][0] >= 12
    # a file held open meanwhile: the unlinks name it, so none is followed by a release
    assert rep["hold_open"] and rep["mount_calls"]["bfs"]["unlink"][0] >= 12
    assert "release" not in rep["mount_calls"]["bfs"], rep["mount_calls"]["bfs"]
    # and the FUSE requests it handled (each create of the workloads one)
    assert rep["fuse_requests"]["bfs"]["create"][0] == rep["mount_calls"]["bfs"]["create"][0]
    table = bench.format_table(rep)
    lines = table.splitlines()
    assert "BFS" in lines[1] and "local" in lines[1] and "bfs/local" in lines[1]
    assert sum(1 for ln in lines if ln.startswith(("andrew-1", "postmark"))) == len(bench.ANDREW_PHASES) + len(
        bench.POSTMARK_PHASES) + 2
    assert lines[-1] == "contents checked: all correct"


def test_write_behind_extents_match_a_file_model():
    # the mount's write-behind (gathered writes merged into extents, reads laid over the
    # replicas' bytes) against a plain bytearray, for random small writes and reads
    import random

    mount = pytest.importorskip("pbft.services.bfs.mount", reason="pyfuse3 is not installed")
    rng = random.Random(5)
    for trial in range(200):
        base = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))  # what the replicas hold
        model = bytearray(base)
        ext: list = []
        for _ in range(rng.randrange(1, 12)):
            off = rng.randrange(0, 400)
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
            ext = mount._merge(ext, off, data, ("cred",))
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
        # extents stay sorted, disjoint and not touching
        for (o1, b1, _), (o2, _, _) in zip(ext, ext[1:]):
            assert o1 + len(b1) < o2
        ops = mount.BFSOperations.__new__(mount.BFSOperations)
        ops.dirty = {7: ext}
        ops.pattrs = {}
        for _ in range(5):
            off, size = rng.randrange(0, 500), rng.randrange(1, 200)
            got = ops._overlay(7, off, size, base[off:off + size])
            assert got == bytes(model[off:off + size]), trial
        assert ops._with_dirty((7, 0, 1, 0, 0, 0, len(base), 0, 0, 0, 0))[6] == len(model)


def test_gathered_writes_and_attribute_changes_go_as_one_update_or_one_by_one():
    # what a close sends for a file's gathered writes and the mode and times set after them
    import asyncio
    import errno

    mount = pytest.importorskip("pbft.services.bfs.mount", reason="pyfuse3 is not installed")
    from pbft.services.bfs.protocol import UPDATE_SETATTR, UPDATE_WRITE, BFSError

    def make(refuse_update: bool):
        ops = mount.BFSOperations.__new__(mount.BFSOperations)
        ops.max_io, ops.cattr, ops.pread, ops.known, ops.pages = 48 * 1024, {}, set(), {}, {}
        ops.enable_writeback_cache, ops.mcache, ops.mgen, ops.minflight, ops.ve = False, False, 0, 0, 0
        sent: list = []

        async def call(op, *args, cred, **kw):
            sent.append((op, *args))
            if op == "update" and refuse_update:
                raise BFSError(errno.EPERM, "refused")
            return (7, 0o100644, 1, 0, 0, 0, 12, 0, 0, len(sent), len(sent))
        ops.call = call
        return ops, sent

    c = (0, 0, ())
    mode = [(0o600, (None, None))]
    ops, sent = make(False)
    asyncio.run(ops._send_writes(7, [(0, b"ab", c), (10, b"cd", c)], None, mode))
    assert sent == [("update", 7, ((UPDATE_WRITE, 0, b"ab"), (UPDATE_WRITE, 10, b"cd"),
                                   (UPDATE_SETATTR, 0o600, None, None, None, (None, None))))]
    # refused (nothing happened): the writes, then the change, each on its own
    ops, sent = make(True)
    asyncio.run(ops._send_writes(7, [(0, b"ab", c), (10, b"cd", c)], None, mode))
    assert [s[0] for s in sent] == ["update", "write", "write", "setattr"]
    assert sent[-1] == ("setattr", 7, 0o600, None, None, None, (None, None))
    # one write alone is a write; more data than one request: its pieces, then the change
    ops, sent = make(False)
    asyncio.run(ops._send_writes(7, [(0, b"ab", c)], None, ()))
    assert sent == [("write", 7, 0, b"ab")]
    ops, sent = make(False)
    asyncio.run(ops._send_writes(7, [(0, bytes(100_000), c)], None, mode))
    assert [s[0] for s in sent] == ["write", "write", "write", "setattr"]
    assert sorted(s[2] for s in sent[:3]) == [0, 48 * 1024, 96 * 1024]


def test_bfs_ops_service_mode_runs_every_operation(capsys):
    # benchmarks/bfs_ops.py: one replica's share per operation kind; every operation must
    # succeed (the script decodes each result and raises on an errno)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bfs_ops.py"
    spec = importlib.util.spec_from_file_location("bfs_ops", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["service", "--ops", "20"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "us per operation" in ln]
    assert [ln.split()[0] for ln in lines] == ["fsync", "create", "write", "getattr", "unlink"]
    assert all(float(ln.split("us per")[0].split()[-1]) > 0 for ln in lines)
