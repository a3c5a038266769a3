"""``ClientPool``'s timers, driven in one process without replicas: replies are sealed here with
the keys the pool's identity would have sent the replicas, and fed to the pool as frames."""

from __future__ import annotations

import asyncio

import pytest

from pbft import NoQuorumError
from pbft.codec import result_digest, seal
from pbft.crypto import KeyRing
from pbft.messages import Reply
from pbft.core.reconfig import NOT_ADMITTED_RESULT
from pbft.runtime import client as client_mod
from pbft.runtime.client import ClientPool, NotAdmittedError
from pbft.runtime.cluster import free_port_range, init_cluster


class CountingLoop:
    """The pool's loop, counting the timers it is asked for."""

    def __init__(self, loop):
        self._loop = loop
        self.timers = 0

    def call_later(self, *a, **kw):
        self.timers += 1
        return self._loop.call_later(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._loop, name)


def make_pool(tmp_path, retry_timeout_ms: float = 500.0):
    """A pool of one identity, not connected, with session keys set by hand."""
    cluster = init_cluster(tmp_path / "c", 4, None, ["127.0.0.1"], free_port_range(20), 2,
                           protocol={"client_retry_timeout_ms": retry_timeout_ms})
    pool = ClientPool(cluster, [cluster.identity(cluster.client_ids[0])])
    pool.loop = CountingLoop(asyncio.get_running_loop())  # type: ignore[assignment]
    (cid, p), = pool.p.items()
    for j in range(4):
        p.ring.out_keys[j], p.ring.in_keys[j] = bytes([j + 1]) * 32, bytes([j + 101]) * 32
    return pool, cid, p


def answer(pool, cid, p, result=b"ok", replicas=(0, 1, 2)) -> None:
    """Replies to the outstanding request from ``replicas`` (tentative, matching: a quorum), sealed
    with the session keys the identity gave them last (a retransmission refreshes them)."""
    req = p.core.req
    assert req is not None
    for j in replicas:
        ring = KeyRing(j, 4, {cid: p.ring.in_keys[j]}, {cid: p.ring.out_keys[j]})
        rep = Reply(0, req.timestamp, cid, j, True, False, result_digest(result), result)
        pool._on_frame(None, seal(rep, ring, to=cid))  # type: ignore[arg-type]


async def invoke_answered(pool, cid, p, result: bytes, timeout=5.0) -> bytes:
    task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=timeout))
    await asyncio.sleep(0)  # the request is issued
    answer(pool, cid, p, result)
    return await task


def test_requests_answered_in_time_share_one_timer(tmp_path):
    async def main():
        pool, cid, p = make_pool(tmp_path)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(200):
            assert await invoke_answered(pool, cid, p, b"r%d" % i) == b"r%d" % i
        # a timer per request and per timeout (asyncio.wait_for) would be 400 timers; the one
        # armed for the first request's retransmission deadline serves all of them (it arms
        # itself again when it finds nothing due: once per retry timeout, 0.5 s)
        assert pool.loop.timers <= 2 + (loop.time() - t0) / 0.5
        assert p.core.retransmissions == 0
        await pool.close()

    asyncio.run(main())


def test_unanswered_request_is_retransmitted_then_times_out_after_answered_ones(tmp_path):
    async def main():
        pool, cid, p = make_pool(tmp_path, retry_timeout_ms=50.0)
        for _ in range(20):  # a timer is armed, for deadlines of requests that completed
            await invoke_answered(pool, cid, p, b"x")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NoQuorumError, match="no certified result within 0.4s"):
            await pool.invoke(cid, b"lost", timeout=0.4)
        took = loop.time() - t0
        assert 0.39 <= took < 1.5
        # retransmitted at its deadlines meanwhile (50 ms, then doubling): 50, 150, 350 ms
        assert p.core.retransmissions >= 2
        assert p.core.req is None  # the given-up request is cancelled in the core client
        # the pool goes on: the next request completes
        assert await invoke_answered(pool, cid, p, b"after") == b"after"
        await pool.close()

    asyncio.run(main())


def test_late_quorum_completes_a_retransmitted_request_without_timeout(tmp_path):
    async def main():
        pool, cid, p = make_pool(tmp_path, retry_timeout_ms=50.0)
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=None))
        await asyncio.sleep(0.2)
        assert p.core.retransmissions >= 1 and not task.done()
        answer(pool, cid, p, b"late")
        assert await task == b"late"
        await pool.close()

    asyncio.run(main())


def test_late_reply_is_dropped_as_stale_before_its_mac_is_checked(tmp_path):
    async def main():
        pool, cid, p = make_pool(tmp_path)
        await invoke_answered(pool, cid, p, b"done")
        ts = p.core.timestamp
        ring = KeyRing(3, 4, {cid: p.ring.in_keys[3]}, {cid: p.ring.out_keys[3]})
        late = Reply(0, ts, cid, 3, True, False, result_digest(b"done"), None)
        macs = p.ring.mac_ops
        pool._on_frame(None, seal(late, ring, to=cid))  # type: ignore[arg-type]
        assert p.core.drops.get("reply-stale") == 1 and p.ring.mac_ops == macs
        # a reply to the outstanding request is still checked: a bad MAC is dropped as such
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=5.0))
        await asyncio.sleep(0)
        forged = Reply(0, p.core.timestamp, cid, 3, True, False, result_digest(b"x"), b"x")
        pool._on_frame(None, seal(forged, KeyRing(3, 4, {}, {cid: bytes(32)}), to=cid))  # type: ignore[arg-type]
        assert p.core.drops.get("bad-mac") == 1 and not p.core.replies
        answer(pool, cid, p, b"real")
        assert await task == b"real"
        await pool.close()

    asyncio.run(main())


def test_replies_of_a_later_membership_are_not_counted_and_older_memberships_are_ignored(tmp_path):
    from pbft.runtime.cluster import with_membership

    async def main():
        pool, cid, p = make_pool(tmp_path)
        pool.follow_chain = False  # (no replicas to ask here)
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=0.3))
        await asyncio.sleep(0)
        req = p.core.req
        assert req is not None
        for j in (0, 1, 2):  # matching replies, but in a view of membership epoch 1 (1 << 32 ...)
            ring = KeyRing(j, 4, {cid: p.ring.in_keys[j]}, {cid: p.ring.out_keys[j]})
            rep = Reply((1 << 32) + 4, req.timestamp, cid, j, True, False, result_digest(b"x"), b"x")
            pool._on_frame(None, seal(rep, ring, to=cid))  # type: ignore[arg-type]
        with pytest.raises(NoQuorumError):
            await task
        assert pool.counters.drops["reply-from-later-membership"] == 3
        # memberships only move forward: an older one (e.g. a stale epoch.json) is ignored
        c = pool.cluster
        grown = with_membership(c, 4, 1, (1, 1, 1, 1), 40, 1)
        pool.set_membership(grown)
        assert pool.cluster is grown
        pool.set_membership(c)
        assert pool.cluster is grown and pool.counters.drops["membership-older-ignored"] == 1
        # once it follows epoch 1, replies of views of the membership before are not counted
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=0.3))
        await asyncio.sleep(0)
        req = p.core.req
        assert req is not None
        for j in (0, 1, 2):
            ring = KeyRing(j, 4, {cid: p.ring.in_keys[j]}, {cid: p.ring.out_keys[j]})
            rep = Reply(0, req.timestamp, cid, j, True, False, result_digest(b"x"), b"x")
            pool._on_frame(None, seal(rep, ring, to=cid))  # type: ignore[arg-type]
        with pytest.raises(NoQuorumError):
            await task
        assert pool.counters.drops["reply-from-earlier-membership"] == 3
        await pool.close()

    asyncio.run(main())


def test_the_not_admitted_result_of_a_quorum_is_a_not_admitted_error(tmp_path):
    async def main():
        pool, cid, p = make_pool(tmp_path)
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=5.0))
        await asyncio.sleep(0)
        answer(pool, cid, p, NOT_ADMITTED_RESULT)
        with pytest.raises(NotAdmittedError, match=f"client {cid} is not admitted by the cluster "
                                                   r"\(revoked or never added\): the replicas refused"):
            await task
        # one replica's not-admitted reply is no result: the quorum's real one is returned
        task = asyncio.ensure_future(pool.invoke(cid, b"op", timeout=5.0))
        await asyncio.sleep(0)
        answer(pool, cid, p, NOT_ADMITTED_RESULT, replicas=(3,))
        answer(pool, cid, p, b"real", replicas=(0, 1, 2))
        assert await task == b"real"
        await pool.close()

    asyncio.run(main())


def test_an_unanswered_client_that_the_certified_configuration_revoked_fails_fast(tmp_path, monkeypatch):
    from dataclasses import replace

    async def main():
        pool, cid, p = make_pool(tmp_path, retry_timeout_ms=50.0)
        c = pool.cluster
        served = [replace(c, epoch=1)]  # what ``follow`` returns: a newer configuration that admits it
        asked = []

        def fake_follow(cluster, timeout):
            asked.append(cluster.epoch)
            return served[0]

        monkeypatch.setattr(client_mod, "follow", fake_follow)
        with pytest.raises(client_mod.NoQuorumError):  # still admitted: the call waits out its timeout
            await pool.invoke(cid, b"op", timeout=0.3)
        assert asked and not p.revoked
        served[0] = replace(c, epoch=2, client_keys={k: v for k, v in c.client_keys.items() if k != cid})
        pool.followed_at = -client_mod.FOLLOW_INTERVAL_S  # (the next retransmission looks again)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NotAdmittedError, match=f"client {cid} is not admitted .* revoked in configuration "
                                                   "epoch 2"):
            await pool.invoke(cid, b"op", timeout=10.0)
        assert loop.time() - t0 < 2.0 and p.core.req is None
        assert pool.counters.drops["client-not-admitted"] == 1
        t0 = loop.time()
        with pytest.raises(NotAdmittedError):  # final: the next call fails at once, nothing sent
            await pool.invoke(cid, b"op", timeout=10.0)
        assert loop.time() - t0 < 0.1 and p.core.req is None
        await pool.close()

    asyncio.run(main())


def test_a_configuration_set_from_the_directory_without_the_client_fails_it_when_unanswered(tmp_path, monkeypatch):
    from dataclasses import replace

    async def main():
        pool, cid, p = make_pool(tmp_path, retry_timeout_ms=50.0)
        monkeypatch.setattr(client_mod, "follow", lambda cluster, timeout: None)  # (the chain: nothing newer)
        c = pool.cluster
        # e.g. epoch.json written by `pbft reconfig DIR revoke-client` and loaded (checked against its chain)
        pool.set_membership(replace(c, epoch=1, client_keys={k: v for k, v in c.client_keys.items() if k != cid}))
        with pytest.raises(NotAdmittedError, match="revoked in configuration epoch 1"):
            await pool.invoke(cid, b"op", timeout=10.0)
        await pool.close()

    asyncio.run(main())
