"""The signer process (runtime.signer): a replica's long-term key kept out of the replica
process. The checks on what it signs and opens, its rate limits, its socket protocol, and a
live cluster whose replica 1 works with its key file moved away, through a recovery reboot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from helpers.netutil import ROOT, SRC, LocalCluster
from pbft import BlockingClient
from pbft.codec import DecodeError
from pbft.config import ConfigError
from pbft.runtime.keys import (Identity, PublicKeys, accept_newkey, check_signature, make_newkey, now_timestamp_us,
                               parse_newkey)
from pbft.runtime.signer import (REQUEST_BYTES_MAX, Signer, SignerError, SignerIdentity, SignerServer,
                                 SIGN_BURST_MIN)
from pbft.services.kv import KVClient

N = 4


@pytest.fixture
def world():
    ids = [Identity.generate(i) for i in range(N + 1)]  # 4 replicas and client 4
    return ids, PublicKeys({i.principal: i.public for i in ids})


def req(op, arg) -> bytes:
    return msgpack.packb([op, arg], use_bin_type=True)


def header(ts, entries) -> bytes:
    return msgpack.packb([ts, [list(e) for e in entries]], use_bin_type=True)


def sealed(pub, j, size=32):
    return pub.seal_to[j].encrypt(os.urandom(size))


def test_signs_only_its_replicas_newkeys(world):
    ids, pub = world
    s = Signer(ids[1], N)
    now = now_timestamp_us()
    good = header(now, [(0, sealed(pub, 0)), (2, sealed(pub, 2))])
    ok, sig = s.handle(req("sign", good))
    assert ok is True
    nk = parse_newkey(msgpack.packb([16, 1, good, b"", sig], use_bin_type=True), 0, N)
    check_signature(nk, pub)  # a NewKey of replica 1: signed with its key
    bad = {
        "sign-bad-receiver": [header(now, [(1, sealed(pub, 1))]),  # to itself
                              header(now, [(N, sealed(pub, N))]),  # to a client
                              header(now, [(0, sealed(pub, 0)), (0, sealed(pub, 0))])],  # twice
        "sign-bad-entry": [header(now, [(0, sealed(pub, 0, 64))]), header(now, [(0, b"x" * 79)])],
        "sign-timestamp-off-clock": [header(now - 60_000_000, [(0, sealed(pub, 0))]),
                                     header(now + 60_000_000, [(0, sealed(pub, 0))])],
        "sign-malformed": [b"\xc1", msgpack.packb([now], use_bin_type=True), header(now, []),
                           msgpack.packb(["x", []], use_bin_type=True),
                           good + b"\x00"],  # trailing bytes: not the one encoding checked
    }
    for reason, headers in bad.items():
        for h in headers:
            assert s.handle(req("sign", h)) == [False, reason], (reason, h)
    for body, reason in ((b"\xc1", "malformed"), (req("sign", "text"), "malformed"),
                         (msgpack.packb(["sign", good, 1], use_bin_type=True), "malformed"),
                         (req("seed", b""), "unknown-op"), (req("public", b"x"), "malformed"),
                         (req("open", b"x" * 10), "open-bad-size"),
                         (req("open", b"x" * 80), "open-undecryptable")):
        assert s.handle(body) == [False, reason], body
    assert s.counts["sign"] == 1 and s.counts["sign-malformed"] == 5 and s.counts["malformed"] == 4
    # what it opens: a box sealed to replica 1, of a replica's or a client's size
    for size in (32, 64):
        k = os.urandom(size)
        assert s.handle(req("open", pub.seal_to[1].encrypt(k))) == [True, k]
    assert s.handle(req("public", b"")) == [True, ids[1].public]


def test_rate_limits(world):
    ids, pub = world
    s = Signer(ids[1], N)
    refused = sum(1 for _ in range(SIGN_BURST_MIN + 20)
                  if s.handle(req("sign", header(now_timestamp_us(), [(0, sealed(pub, 0))])))[0] is False)
    assert s.counts["sign"] >= SIGN_BURST_MIN and refused >= 10 and s.counts["sign-rate-limited"] == refused


class ServerThread:
    def __init__(self, signer, path):
        self.srv = SignerServer(signer, path, 0o600)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.srv.start())
            started.set()
            self.loop.run_forever()

        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        assert started.wait(5)

    def close(self):
        async def shutdown():
            self.srv.close()
            for _ in range(100):  # the connections' tasks see their ends
                if not self.srv.writers:
                    break
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)
        self.loop.close()


def test_socket_protocol_and_reconnection(world, tmp_path):
    ids, pub = world
    path = tmp_path / "s.sock"
    st = ServerThread(Signer(ids[1], N), path)
    try:
        assert (path.stat().st_mode & 0o777) == 0o600
        with pytest.raises(ConfigError, match="another key"):
            SignerIdentity(2, path, ids[2].public)
        me = SignerIdentity(1, path, ids[1].public)
        # a NewKey made through the signer is accepted by replica 0; one to replica 1 is opened by it
        raw = make_newkey(me, pub, {0: b"k" * 32}, now_timestamp_us())
        assert accept_newkey(raw, ids[0], pub, N, N, {}) == (1, b"k" * 32)
        raw = make_newkey(ids[N], pub, {1: b"c" * 64}, now_timestamp_us())
        assert accept_newkey(raw, me, pub, N, N, {}) == (N, b"c" * 64)
        # refusals arrive as DecodeErrors with the signer's reason; a box not for us as without a signer
        with pytest.raises(SignerError, match="signer-sign-bad-receiver"):
            make_newkey(me, pub, {1: b"k" * 32}, now_timestamp_us())
        raw = make_newkey(ids[N], pub, {0: b"c" * 64}, now_timestamp_us())
        nk = parse_newkey(raw, 0, N)
        forged = msgpack.packb([16, N, msgpack.packb([nk.timestamp, [[1, nk.entry]]], use_bin_type=True), b"",
                                ids[N].sign_newkey(msgpack.packb([nk.timestamp, [[1, nk.entry]]],
                                                                 use_bin_type=True))], use_bin_type=True)
        with pytest.raises(DecodeError, match="newkey-undecryptable"):
            accept_newkey(forged, me, pub, N, N, {})
        # a length over the bound: the connection is closed, nothing read
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(struct.pack(">I", REQUEST_BYTES_MAX + 1))
        s.settimeout(5)
        assert s.recv(10) == b""
        s.close()
        # the signer restarts: the replica's next call reconnects
        st.close()
        with pytest.raises(SignerError, match="signer-unavailable"):
            me.sign_newkey(header(now_timestamp_us(), [(0, sealed(pub, 0))]))
        st = ServerThread(Signer(ids[1], N), path)
        assert len(me.sign_newkey(header(now_timestamp_us(), [(0, sealed(pub, 0))]))) == 64
        assert st.srv.signer.counts == {"sign": 1}
    finally:
        st.close()


def _pbft(*args, **kw):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + ROOT
    return subprocess.Popen([sys.executable, "-m", "pbft.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, start_new_session=True, **kw)


@contextlib.contextmanager
def _signer_held_replica_1(tmp_path, lc):
    """Replica 1 with its key in a `pbft signer` (its key file moved away, so that the replica
    cannot read it), the others started from their key files; yields the signer process (stopped
    at the end; its log: tmp_path / "signer.log")."""
    sock = tmp_path / "s1.sock"
    slog = open(tmp_path / "signer.log", "ab")
    signer = _pbft("signer", lc.dir, "--id", 1, "--socket", sock, "--mode", "600", stderr=slog)
    try:
        deadline = time.time() + 15
        while not sock.exists():
            assert signer.poll() is None and time.time() < deadline, (tmp_path / "signer.log").read_text()
            time.sleep(0.05)
        shutil.move(lc.cluster.key_path(1), tmp_path / "elsewhere.key")
        for r in (0, 2, 3):
            lc.start(r)
        lc.logs[1] = lc.dir / "replica-1.log"
        with open(lc.logs[1], "ab") as rlog:
            lc.procs[1] = _pbft("replica", lc.dir, "--id", 1, "--signer", sock, stderr=rlog)
        lc.wait_connected(timeout=30)
        yield signer
    finally:
        signer.terminate()
        signer.wait(5)
        slog.close()


@pytest.mark.slow
def test_live_replica_without_its_key_file(tmp_path):
    """Replica 1 runs with its key in a signer; its key file is moved away before it starts. It
    serves (its NewKeys are signed, others' opened, by the signer), recovers (a reboot by exec)
    and reconnects to the signer."""
    protocol = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
    with LocalCluster(tmp_path / "c", N, protocol=protocol) as lc:
        key = lc.cluster.key_path(1)
        with _signer_held_replica_1(tmp_path, lc):  # (the replica cannot read its key file)
            with BlockingClient(lc.dir) as bc:
                kv = KVClient(bc.invoke, timeout=20.0)
                for i in range(20):
                    kv.put(b"k%d" % i, b"v%d" % i)
                assert kv.get(b"k7") == b"v7"
                lc.wait_for(lambda: lc.status(1)["last_executed"] >= lc.status(0)["last_executed"] > 0,
                            what="replica 1 executing")
                os.kill(lc.procs[1].pid, signal.SIGUSR1)  # a proactive recovery: a reboot by exec
                lc.wait_for(lambda: (s := lc.status(1))["recoveries"] >= 1 and s["recovering"] is None,
                            timeout=40, what="replica 1 recovered")
                for i in range(20, 30):
                    kv.put(b"k%d" % i, b"v%d" % i)
                lc.wait_for(lambda: lc.status(1)["last_executed"] >= lc.status(0)["last_executed"],
                            what="replica 1 executing after its recovery")
            assert not key.exists()
            assert "recovery-reboot" in lc.log_text(1) and '"recovered"' in lc.log_text(1)
            pid1 = lc.procs[1].pid
    events = [json.loads(x) for x in (tmp_path / "signer.log").read_text().splitlines() if x.startswith("{")]
    conns = [e for e in events if e["event"] == "signer-connection"]
    assert len(conns) >= 2, events  # the replica before and after its reboot
    assert all(e["peer_pid"] == pid1 for e in conns)  # (exec: the same pid)
    assert any(e["event"] == "signer-sign" for e in events)
    stopped = [e for e in events if e["event"] == "signer-stopped"]
    assert stopped and stopped[0]["open"] >= 2 * (N - 1) and stopped[0]["sign"] >= 2, events  # (both processes)


def test_signer_socket_from_option_or_cluster_file(tmp_path):
    from pbft.runtime.cluster import init_cluster
    from pbft.tools.guard import signer_spec

    c = init_cluster(tmp_path / "c", N)
    assert signer_spec(c.dir, 2, None) is None  # no signer: the key file
    assert signer_spec(c.dir, 2, "unix:/run/s.sock") == Path("/run/s.sock")
    toml = c.dir / "cluster.toml"
    base = toml.read_text()
    toml.write_text(base + '\n[keys]\nsigner = "unix:run/signer-{id}.sock"\n')
    assert signer_spec(c.dir, 2, None) == c.dir / "run" / "signer-2.sock"
    assert signer_spec(c.dir, 2, "/x.sock") == Path("/x.sock")  # the option wins
    toml.write_text(base + '\n[keys]\nsigner = 3\n')
    with pytest.raises(ConfigError, match=r"\[keys\]"):
        signer_spec(c.dir, 2, None)


def _membership(n: int, epoch: int = 1, opens_at: int = 24):
    from pbft.state.configuration import Membership
    keys = tuple(Identity.generate(i).public for i in range(n))
    return Membership(n, (n - 1) // 3, (1,) * n, keys, opens_at, epoch)


def _ref(epoch: int = 1, opens_at: int = 8, digest: bytes = b""):
    from pbft.runtime.chain import ConfigRef
    return ConfigRef(epoch, opens_at, digest or os.urandom(32))


def test_signs_configuration_link_statements_only(world):
    """``sign-link``: a configuration link statement (the link context, then msgpack [prev,
    membership, [epoch, opens_at, digest]]) is signed as given, verifiable as the replica's link
    signature; anything else is refused with its reason: a membership link of the previous format,
    a NewKey header, each field out of shape; a link statement is refused on the NewKey path. After
    one predecessor, a second statement of the same epoch is refused, one of a later epoch signed
    (the replica's stable checkpoint moved on), and then one of the earlier epoch refused; the same
    statement again is signed (a restarted replica votes again)."""
    import nacl.signing
    from pbft.runtime.chain import CONFIG_LINK_CONTEXT, LINK_CONTEXT, check_signature, statement
    from pbft.runtime.signer import LINK_BURST, LINK_STATEMENT_BYTES_MAX

    ids, pub = world
    s = Signer(ids[1], 7)  # 7 replica slots
    prev, m, ref = os.urandom(32), _membership(5), _ref()
    stmt = statement(prev, m, ref)
    ok, sig = s.handle(req("sign-link", stmt))
    assert ok is True
    nacl.signing.VerifyKey(ids[1].public).verify(stmt, sig)
    before = type(m)(4, 1, (1,) * 4, tuple(i.public for i in ids[:4]), 0, 0)  # the membership signed in
    assert check_signature(before, 1, sig, stmt) == ""  # what chain.verify_link checks
    assert s.handle(req("sign-link", stmt)) == [True, sig]  # the same statement again
    good_header = header(now_timestamp_us(), [(0, sealed(pub, 0))])
    body = stmt[len(CONFIG_LINK_CONTEXT):]
    d = ref.digest
    fields = m.encode_fields()

    def packed(*parts) -> bytes:
        return CONFIG_LINK_CONTEXT + msgpack.packb(list(parts), use_bin_type=True)

    wide = packed(prev, fields, [1, 8, d])
    assert wide.count(b"\x93\x01\x08") == 1
    wide = wide.replace(b"\x93\x01\x08", b"\x93\xcd\x00\x01\x08")  # (epoch 1 as a 16-bit integer)
    bad = {
        "sign-link-not-a-link": [good_header, b"", b"pbft.newkey.v1" + body, CONFIG_LINK_CONTEXT[:-1] + body,
                                 b"x" + stmt],
        "sign-link-old-format": [statement(prev, m), statement(os.urandom(32), m)],  # (no replica signs those now)
        "sign-link-malformed": [CONFIG_LINK_CONTEXT, CONFIG_LINK_CONTEXT + b"\xc1", stmt + b"\x00",  # trailing
                                packed(prev), packed(prev, fields),
                                packed(prev[:31], fields, [1, 8, d]), packed(prev, fields[:5], [1, 8, d]),
                                packed(prev, fields, [1, 8, d], 1), packed(prev, fields, [0, 8, d]),
                                packed(prev, fields, [1, 0, d]), packed(prev, fields, [1, 8, d[:31]]),
                                packed(prev, fields, [1, 8]), packed(prev, fields, [True, 8, d]),
                                packed(prev, fields, [1, 8, d.hex()]), wide],
        "sign-link-bad-membership": [statement(os.urandom(32), _membership(8), _ref())],  # beyond the 7 slots
        "sign-link-oversized": [CONFIG_LINK_CONTEXT + b"\x00" * LINK_STATEMENT_BYTES_MAX],
        # another configuration of epoch 1 after prev: another membership, or another digest
        "sign-link-equivocation": [statement(prev, _membership(6), ref), statement(prev, m, _ref(1, 8))],
    }
    for reason, stmts in bad.items():
        for x in stmts:
            assert s.handle(req("sign-link", x)) == [False, reason], (reason, x[:40])
    # a link statement on the NewKey path: refused (and what that path signs is a NewKey's context)
    assert s.handle(req("sign", stmt)) == [False, "sign-malformed"]
    assert s.counts["sign-link"] == 2 and "sign" not in s.counts
    # a later epoch after the same predecessor (the vote moves on), then the earlier one is stale
    later = statement(prev, m, _ref(2, 16))
    assert s.handle(req("sign-link", later))[0] is True
    assert s.handle(req("sign-link", stmt)) == [False, "sign-link-stale"]
    assert s.handle(req("sign-link", statement(prev, _membership(6), _ref(2, 16)))) == [False, "sign-link-equivocation"]
    assert s.handle(req("sign-link", later))[0] is True  # (again)
    assert s.counts["sign-link"] == 4
    # a burst of distinct links, then rate limited (a replica votes once per configuration)
    got = [s.handle(req("sign-link", statement(os.urandom(32), m, _ref())))[1] for _ in range(int(LINK_BURST) + 4)]
    assert got.count("sign-link-rate-limited") >= 3 and s.counts["sign-link"] >= int(LINK_BURST)
    assert LINK_CONTEXT != CONFIG_LINK_CONTEXT[:len(LINK_CONTEXT)]


def test_a_link_signed_through_the_socket_without_blocking(world, tmp_path):
    """``SignerIdentity.sign_link`` is a coroutine on a connection of its own: the NewKey
    connection stays usable around it, a refusal comes back as ``SignerError`` with the signer's
    reason, and a signer that is gone as ``signer-unavailable``."""
    import nacl.signing
    from pbft.runtime.chain import statement

    ids, pub = world
    path = tmp_path / "s.sock"
    st = ServerThread(Signer(ids[1], N + 1), path)
    try:
        me = SignerIdentity(1, path, ids[1].public)
        prev, m = os.urandom(32), _membership(5)
        stmt = statement(prev, m, _ref())

        async def both():
            task = asyncio.ensure_future(me.sign_link(stmt))
            await asyncio.sleep(0)
            return await task

        sig = asyncio.run(both())
        nacl.signing.VerifyKey(ids[1].public).verify(stmt, sig)
        assert len(me.sign_newkey(header(now_timestamp_us(), [(0, sealed(pub, 0))]))) == 64
        with pytest.raises(SignerError, match="signer-sign-link-equivocation"):
            asyncio.run(me.sign_link(statement(prev, _membership(4), _ref())))
        with pytest.raises(SignerError, match="signer-sign-link-not-a-link"):
            asyncio.run(me.sign_link(b"anything"))
        assert st.srv.signer.counts == {"public": 1, "sign-link": 1, "sign": 1, "sign-link-equivocation": 1,
                                        "sign-link-not-a-link": 1}
    finally:
        st.close()
    with pytest.raises(SignerError, match="signer-unavailable"):
        asyncio.run(me.sign_link(stmt))


@pytest.mark.slow
def test_live_replica_with_a_signer_signs_the_membership_link(tmp_path, capsys):
    """Replica 1's key is in a signer (its key file moved away) and replica 3 is stopped, so the
    link of a growth 4 -> 5 needs replica 1's signature (quorum: 3 of the 4): the change goes
    through, the chain every replica serves verifies and its link is signed by 0, 1 and 2, and
    the live signer refuses a link statement on the NewKey path and a statement that is no link."""
    from pbft.runtime.chain import CONFIG_LINK_CONTEXT, decode_chain, verify_chain
    from pbft.runtime.follow import genesis_keys
    from pbft.tools.cli import main

    protocol = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
    with LocalCluster(tmp_path / "c", N, clients=2, protocol=protocol, replica_slots=N + 1) as lc:
        with _signer_held_replica_1(tmp_path, lc):
            with BlockingClient(lc.dir) as bc:
                kv = KVClient(bc.invoke, timeout=20.0)
                for i in range(10):
                    kv.put(b"k%d" % i, b"v%d" % i)
            lc.kill(3)  # the link now needs 0, 1 and 2
            capsys.readouterr()
            assert main(["reconfig", str(lc.dir), "add-replica", "--json"]) == 0
            grow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert grow["n"] == N + 1
            g = lc.cluster.genesis_cfg or lc.cluster.cfg
            for r in (0, 1, 2):
                links = lc.wait_for(lambda r=r: decode_chain(bytes.fromhex(lc.status(r)["membership_chain"])),
                                    timeout=20, what=f"replica {r}'s chain")
                assert verify_chain(g, genesis_keys(lc.cluster), links).n == N + 1
                assert [i for i, _ in links[0].signatures] == [0, 1, 2], links[0].signatures
            assert "chain-sign-unavailable" not in lc.log_text(1)
            # the live signer: a link statement on the NewKey path, and no link on the link path
            links = decode_chain(bytes.fromhex(lc.status(0)["membership_chain"]))
            stmt = links[0].statement()
            assert stmt.startswith(CONFIG_LINK_CONTEXT)
            me = SignerIdentity(1, tmp_path / "s1.sock", lc.cluster.slot(1).public_key)
            with pytest.raises(SignerError, match="signer-sign-malformed"):
                me.sign_newkey(stmt)
            with pytest.raises(SignerError, match="signer-sign-link-not-a-link"):
                asyncio.run(me.sign_link(header(now_timestamp_us(), [(0, b"x" * 80)])))
            assert asyncio.run(me.sign_link(stmt)) == dict(links[0].signatures)[1]  # (its vote, again)
            me.close()
    events = [json.loads(x) for x in (tmp_path / "signer.log").read_text().splitlines() if x.startswith("{")]
    assert sum(e["event"] == "signer-sign-link" for e in events) >= 2, events  # the replica's, and ours
    stopped = [e for e in events if e["event"] == "signer-stopped"][0]
    assert stopped["sign-malformed"] == 1 and stopped["sign-link-not-a-link"] == 1, stopped


@pytest.mark.slow
def test_live_rotation_of_a_signer_held_key_is_signed_by_the_signer_with_the_old_key(tmp_path, capsys):
    """Replica 1's key is in a signer (its key file moved away) and replica 3 is stopped, so the
    link of ``rotate-key 1`` needs replica 1's vote, signed with its old key: the replica reads
    its new key from ``keys/replica-1.key.next`` at the switch and asks the signer, which still
    holds the old one, for the rotation's link. Every running replica's chain then certifies the
    new key with signers [0, 1, 2], and requests complete with replica 1 on its new key."""
    from pbft.runtime.chain import decode_chain, verify_chain
    from pbft.runtime.cluster import load_cluster
    from pbft.runtime.follow import genesis_keys
    from pbft.tools.cli import main

    protocol = {"checkpoint_interval_seqnos": 8, "log_window_seqnos": 16, "view_change_timeout_ms": 500.0}
    with LocalCluster(tmp_path / "c", N, clients=2, protocol=protocol) as lc:
        with _signer_held_replica_1(tmp_path, lc):
            old_key = lc.cluster.public_key_of(1)
            lc.kill(3)  # the rotation's link now needs 0, 1 and 2
            assert main(["reconfig", str(lc.dir), "rotate-key", "1"]) == 0
            capsys.readouterr()
            new_key = load_cluster(lc.dir).public_key_of(1)
            assert new_key != old_key
            g = lc.cluster.genesis_cfg or lc.cluster.cfg
            for r in (0, 1, 2):
                links = lc.wait_for(lambda r=r: [lk for lk in decode_chain(bytes.fromhex(
                    lc.status(r)["membership_chain"])) if lk.epoch == 1] or None, timeout=20,
                                    what=f"replica {r}'s chain")
                assert links[0].members.keys[1] == new_key
                assert [i for i, _ in links[0].signatures] == [0, 1, 2], links[0].signatures
                assert verify_chain(g, genesis_keys(lc.cluster), links).keys[1] == new_key
            assert "chain-sign-unavailable" not in lc.log_text(1)
            with BlockingClient(lc.dir) as bc:
                kv = KVClient(bc.invoke, timeout=20.0)
                kv.put(b"after", b"rotation")
                assert kv.get(b"after", read_only=False) == b"rotation"
    events = [json.loads(x) for x in (tmp_path / "signer.log").read_text().splitlines() if x.startswith("{")]
    assert sum(e["event"] == "signer-sign-link" for e in events) >= 1, events


def test_the_link_memory_full_refuses_new_predecessors_and_forgets_none(world, monkeypatch):
    """An intruder in the replica process that makes the signer sign links after many made-up
    predecessors must not make it forget the real one (and then sign a second statement of an
    epoch it signed): once it remembers LINKS_REMEMBERED predecessors, a link after another one is
    refused, while the remembered ones keep their rule."""
    from pbft.runtime import signer as signer_mod
    from pbft.runtime.chain import statement

    monkeypatch.setattr(signer_mod, "LINKS_REMEMBERED", 3)
    ids, _ = world
    s = Signer(ids[1], 7)
    m = _membership(5)
    real = os.urandom(32)
    assert s.handle(req("sign-link", statement(real, m, _ref(epoch=2))))[0] is True
    for _ in range(2):
        assert s.handle(req("sign-link", statement(os.urandom(32), m, _ref())))[0] is True
    assert s.handle(req("sign-link", statement(os.urandom(32), m, _ref()))) == [False, "sign-link-memory-full"]
    other = statement(real, _membership(6), _ref(epoch=2))  # a second statement of epoch 2 after the real one
    assert s.handle(req("sign-link", other)) == [False, "sign-link-equivocation"]
    assert s.handle(req("sign-link", statement(real, m, _ref(epoch=3))))[0] is True  # (a later epoch, as before)
