"""Messages stay within ``message_size_bytes_max`` under the largest valid load.

The load: operations of ~64,000 bytes (under ``request_size_bytes_max``), batches of 16 of them
(``batch_requests_max``), a full log window of such batches, then the primary crashes. A NewView
that carried every chosen batch in full would be ~8 times the message size; it carries batch
bodies up to a budget only, and a backup that lacks the others fetches them (FetchBatch /
BatchData) before it installs the view.
"""

from __future__ import annotations

from pbft.codec import TAG, batch_wire_bytes
from pbft.config import ClusterConfig
from pbft.messages import BatchData, Commit, FetchBatch, NewView
from pbft.services.kv import decode_result, encode_op

from helpers.cluster import Cluster

VALUE_BYTES = 31_950  # a compare-and-set of two such values is an operation of ~64,000 bytes


def value(i: int, gen: int) -> bytes:
    return (b"%d/%d:" % (i, gen)).ljust(VALUE_BYTES, b"v")


def drive(c: Cluster, ops: dict[int, bytes], max_ms: float = 20_000.0) -> dict[int, bytes]:
    """Every client (index -> operation) invokes at once; run until all have their result."""
    for i, op in ops.items():
        c.clients[i].invoke(op, False, c.now)
    c.run()
    waited = 0.0
    while any(c.clients[i].busy for i in ops):
        assert waited < max_ms, f"{sum(c.clients[i].busy for i in ops)} operations did not complete"
        c.advance(10.0)
        waited += 10.0
    out = {}
    for i in ops:
        (oc,) = c.clients[i].take_outcomes()
        out[i] = oc.result
    return out


def test_primary_crash_with_a_window_of_full_batches_of_64k_requests():
    defaults = ClusterConfig.create(4)
    W, B = defaults.log_window_seqnos, defaults.batch_requests_max
    clients = W * B + B  # enough outstanding requests for a window of full batches, and some left
    # one batch in flight at a time: every other client's request waits for the next, so batches
    # are full; a long client retry timeout spares the test some 64 KB retransmissions
    c = Cluster(clients=clients, client_retry_timeout_ms=1_000.0, batches_in_flight_max=1)
    cfg = c.cfg
    keys = [b"key-%d" % i for i in range(clients)]
    # every key gets a first value (and every client becomes known to the replicas)
    results = drive(c, {i: encode_op("put", keys[i], value(i, 0)) for i in range(clients)})
    assert {decode_result(r) for r in results.values()} == {("ok", True)}
    while c.replicas[1].last_exec % cfg.checkpoint_interval_seqnos:  # small writes up to a checkpoint
        c.put(0, b"pad", b"x")
    c.advance(200.0)
    h0 = c.replicas[1].low_water_mark
    assert all(r.low_water_mark == r.last_exec == h0 for r in c.replicas)
    c.down.add(3)  # replica 3 sees nothing of what follows: it will lack every batch of the window
    # commits are lost now: the window (h0, h0 + W] fills up with batches that prepare (and
    # execute tentatively) but never commit, so no checkpoint in it is taken
    sizes: dict[str, list[int]] = {"new-view": [], "batch-data": [], "fetch-batch": [], "all": []}
    hold = [True]

    def watch(src, dst, raw):
        t = raw[1]
        sizes["all"].append(len(raw))
        if t == TAG[NewView]:
            sizes["new-view"].append(len(raw))
        elif t == TAG[BatchData]:
            sizes["batch-data"].append(len(raw))
        elif t == TAG[FetchBatch]:
            sizes["fetch-batch"].append(len(raw))
        return hold[0] and t == TAG[Commit]

    c.drop = watch
    for i in range(clients):
        c.clients[i].invoke(encode_op("cas", keys[i], value(i, 0), value(i, 1)), False, c.now)
    c.run()
    for _ in range(400):
        if c.replicas[1].last_exec >= h0 + W:
            break
        c.advance(10.0)
    backups = c.replicas[1:3]
    assert all(r.last_exec == h0 + W and r.last_committed_exec == r.low_water_mark == h0 for r in backups)
    batches = [backups[0].log.slots[n].batch for n in range(h0 + 1, h0 + W + 1)]
    assert all(b.requests for b in batches), "every slot of the window holds a batch"
    assert sum(len(b.requests) == B for b in batches) >= W - 4, [len(b.requests) for b in batches]
    assert sum(len(r) > 63_900 for b in batches for r in b.requests) >= (W - 4) * B
    carried_in_full = sum(batch_wire_bytes(b) for b in batches)
    assert carried_in_full > 6 * cfg.message_size_bytes_max  # what a NewView with every body would be
    assert not c.replicas[3].log.batches

    # the primary crashes; once the others are changing views, replica 3 comes back (so nobody
    # relays it view 0's pre-prepares); commits flow again
    c.down = {0, 3}
    hold[0] = False
    for _ in range(400):
        if all(r.view == 1 for r in backups):
            break
        c.advance(10.0)
    assert all(r.view == 1 and not r.view_active for r in backups)
    c.down = {0}
    for _ in range(2000):
        if not any(cl.busy for cl in c.clients):
            break
        c.advance(10.0)
    outcomes = [cl.take_outcomes() for cl in c.clients]
    assert all(len(o) == 1 and decode_result(o[0].result) == ("ok", True) for o in outcomes), \
        "every compare-and-set executed"

    live = c.replicas[1:]
    assert {(r.view, r.view_active) for r in live} == {(1, True)}, "the first NewView installed everywhere"
    assert sizes["new-view"] and max(sizes["new-view"]) <= cfg.message_size_bytes_max // 2 + 4096
    assert max(sizes["all"]) <= cfg.message_size_bytes_max
    r3 = c.replicas[3]
    print(f"NewView {max(sizes['new-view'])} bytes (every body: {carried_in_full}); "
          f"{len(sizes['batch-data'])} BatchData, largest {max(sizes['batch-data'])} bytes")
    assert r3.counts.get("new-view-waiting-for-batches", 0) >= 1
    assert len(sizes["batch-data"]) >= W - 2 and max(sizes["batch-data"]) <= cfg.message_size_bytes_max
    # asked of the new primary first (it holds them all), of everybody only for what it did not send
    assert len(sizes["batch-data"]) <= 2 * W
    assert not any(r.drops.get("fetch-batch-unknown") for r in live)
    assert not any(r.drops.get("new-view-missing-batch") for r in live)
    assert len({r.last_committed_exec for r in live}) == 1 and r3.last_committed_exec >= h0 + W
    assert len({r.state_digest() for r in live}) == 1
    for i, k in enumerate(keys):
        assert r3.service.data.get(k)[0] == value(i, 1)
