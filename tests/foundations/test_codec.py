"""Wire codec and MACs: round trips, authentication, range checks, digests, and fuzzing.

The codec is the only place where untrusted bytes become messages; its
contract is that ``Codec.open_frame`` / ``Codec.parse`` / ``Codec.decode_batch``
/ ``Codec.batch_requests`` either succeed or raise ``DecodeError`` (never any
other exception), whatever the input.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbft.codec import (
    NULL_BATCH_DIGEST, SINGLE_MAC, TAG, U63, Codec, DecodeError, batch_digest_from_request_digests,
    checkpoint_digest, encode_batch, frame_digest, header_of, op_digest, packb, result_digest, seal,
    seal_with_digest, state_digest, vouch_key,
)
from pbft.core.client import Client as CoreClient
from pbft.config import ClusterConfig
from pbft.crypto import MAC_SIZE, KeyRing, bulk_digest, digest, digest1, keyrings_for, mac
from pbft.messages import (
    ALL_REPLICAS, NULL_BATCH, RECOVERY_OP, REQUEST_OP_PAYLOAD_MIN, Batch, Checkpoint, Commit, Data, Fetch, MetaData,
    NewView, PrePrepare, Prepare, Reply, Request, Status, ViewChange, ViewChangeAck, FetchBatch, BatchData, Vouch,
    QueryStable, ReplyStable,
)

MASTER = b"k" * 32
CFG = ClusterConfig.create(4)
N = CFG.n
RINGS = keyrings_for(MASTER, N, CFG.client_ids)
CODEC = Codec(CFG)
C0, C1 = N, N + 1  # two client ids
LAST_CLIENT = N + CFG.clients_max - 1

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def d32(label: str) -> bytes:
    return digest1(b"test", label.encode())


def sealed_request(client: int, ts: int, op: bytes, read_only: bool = False, replier: int = 0) -> bytes:
    return seal(Request(client, ts, op, read_only, replier), RINGS[client])


def make_batch(k: int = 3, nondet: bytes = b"\x00\x00\x01\x8b\xcf\xe5h\x00") -> Batch:
    reqs = tuple(sealed_request(C0 + (i % 2), 1_700_000_000_000 + i, f"put key{i} value{i}".encode(), replier=i % N)
                 for i in range(k))
    return Batch(nondet, reqs)


BATCH = make_batch(3)
BATCH2 = make_batch(5, nondet=b"t=42")
BATCH_DIGEST = CODEC.batch_digest(BATCH)
BATCH2_DIGEST = CODEC.batch_digest(BATCH2)
STATE = bytes(range(256)) * 40
STATE_D = state_digest(STATE)
CKPT_D = checkpoint_digest(32, STATE_D)


def all_messages() -> list[tuple[str, object, int | None]]:
    """(id, message, receiver for point-to-point) with realistic values, one or more per type."""
    return [
        ("request", Request(C0, 1_700_000_000_123, b"put x 1", False, 2), None),
        ("request-ro-all", Request(LAST_CLIENT, U63, b"", True, ALL_REPLICAS), None),
        ("request-big-op", Request(C1, 7, bytes(range(256)) * 16, False, 0), None),
        ("reply-full", Reply(3, 1_700_000_000_123, C0, 2, True, False, result_digest(b"ok"), b"ok"), C0),
        ("reply-digest", Reply(3, 1_700_000_000_123, C0, 1, False, True, result_digest(b"ok"), None), C0),
        ("reply-empty-result", Reply(0, 1, LAST_CLIENT, 0, False, False, result_digest(b""), b""), LAST_CLIENT),
        ("preprepare", PrePrepare(1, 17, BATCH_DIGEST, 1, BATCH), None),
        ("preprepare-null", PrePrepare(0, 1, NULL_BATCH_DIGEST, 0, None), None),
        ("preprepare-empty-batch", PrePrepare(4, 2, NULL_BATCH_DIGEST, 0, Batch(b"nd", ())), None),
        ("prepare", Prepare(1, 17, BATCH_DIGEST, 2), None),
        ("prepare-max", Prepare(U63, U63, BATCH_DIGEST, 3), None),
        ("commit", Commit(1, 17, BATCH_DIGEST, 3), None),
        ("checkpoint", Checkpoint(32, CKPT_D, 0), None),
        ("checkpoint-zero", Checkpoint(0, CKPT_D, 3), None),
        ("status", Status(5, True, 32, 40, 2), None),
        ("status-vc", Status(6, False, 0, 0, 1), None),
        ("view-change", ViewChange(
            2, 3, 32,
            ((32, CKPT_D), (48, d32("ck48"))),
            ((33, BATCH_DIGEST, 1), (34, NULL_BATCH_DIGEST, 1), (35, BATCH2_DIGEST, 0)),
            ((33, BATCH_DIGEST, 1), (34, NULL_BATCH_DIGEST, 1), (35, BATCH2_DIGEST, 0), (35, d32("x"), 1)),
        ), None),
        ("view-change-empty", ViewChange(1, 0, 0, (), (), ()), None),
        ("view-change-ack", ViewChangeAck(2, 1, 3, d32("vc3")), None),
        ("new-view", NewView(
            2, 2,
            ((0, d32("vc0")), (1, d32("vc1")), (3, d32("vc3"))),
            32, CKPT_D,
            ((33, BATCH_DIGEST), (34, NULL_BATCH_DIGEST), (35, BATCH2_DIGEST)),
            (BATCH, BATCH2),
        ), None),
        ("new-view-empty", NewView(1, 1, ((0, d32("a")), (2, d32("b")), (3, d32("c"))), 0, CKPT_D, (), ()), None),
        ("fetch", Fetch(32, CKPT_D, 0, 0, (), 1), 2),
        ("fetch-objects", Fetch(32, CKPT_D, 1, 3, (768, 770), 1), 2),
        ("meta-data", MetaData(32, 1, 3, (CKPT_D, BATCH_DIGEST), 2), 1),
        ("data", Data(32, 1, 3, ((768, STATE), (770, b"")), 2), 1),
        ("data-empty", Data(0, 0, 0, (), 0), 3),
        ("fetch-batch", FetchBatch(BATCH_DIGEST, 2), None),
        ("query-stable", QueryStable(3, 99), None),
        ("reply-stable", ReplyStable(128, 140, 1, 99), 3),
        ("batch-data", BatchData(BATCH_DIGEST, 1, BATCH), 2),
        ("vouch", Vouch(3, (BATCH_DIGEST, BATCH2_DIGEST)), None),
        ("vouch-empty", Vouch(0, ()), None),
    ]


MESSAGES = all_messages()


def sender_of(msg) -> int:
    return msg.client if isinstance(msg, Request) else msg.replica


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

def test_every_message_type_is_covered():
    assert {type(m) for _, m, _ in MESSAGES} == set(TAG)


@pytest.mark.parametrize("name,msg,to", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_round_trip(name, msg, to):
    sender = sender_of(msg)
    raw = seal(msg, RINGS[sender], to)
    fr = CODEC.open_frame(raw)
    assert fr.tag == TAG[type(msg)] and fr.sender == sender and fr.raw == raw
    assert fr.multi == (to is None)
    assert fr.digest == frame_digest(fr.tag, fr.sender, fr.header)
    if to is None:
        receivers = [r for r in range(N) if r != sender]
        assert len(fr.auth) == N * MAC_SIZE
    else:
        receivers = [to]
        assert len(fr.auth) == MAC_SIZE
    for r in receivers:
        assert RINGS[r].verify(fr.sender, fr.digest, fr.auth, fr.multi), f"receiver {r}"
    out = CODEC.parse(fr)
    assert out == msg
    assert type(out) is type(msg)
    # seal_with_digest agrees with seal and returns the frame digest
    raw2, d = seal_with_digest(msg, RINGS[sender], to)
    assert raw2 == raw and d == fr.digest


def test_preprepare_batch_requests_round_trip():
    msg = PrePrepare(1, 17, BATCH_DIGEST, 1, BATCH)
    pp = CODEC.parse(CODEC.open_frame(seal(msg, RINGS[1])))
    opened = CODEC.batch_requests(pp.batch)
    assert [req.client for _, req in opened] == [C0, C1, C0]
    assert [req.op for _, req in opened] == [b"put key0 value0", b"put key1 value1", b"put key2 value2"]
    for fr, req in opened:
        # every backup can check the client's MAC itself
        for r in range(N):
            assert RINGS[r].verify(req.client, fr.digest, fr.auth, True)
    assert CODEC.batch_digest(pp.batch) == pp.digest


def test_new_view_batches_decode_to_requests():
    msg = MESSAGES[[m[0] for m in MESSAGES].index("new-view")][1]
    nv = CODEC.parse(CODEC.open_frame(seal(msg, RINGS[2])))
    assert [CODEC.batch_digest(b) for b in nv.batches] == [BATCH_DIGEST, BATCH2_DIGEST]
    assert len(CODEC.batch_requests(nv.batches[1])) == 5


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 7])
def test_authenticator_verifies_at_every_replica(n):
    cfg = ClusterConfig.create(n, clients_max=2)
    rings = keyrings_for(MASTER, n, cfg.client_ids)
    other = keyrings_for(b"K" * 32, n, cfg.client_ids)
    d = d32("frame")
    for sender in list(range(n)) + [n]:
        auth = rings[sender].authenticator(d)
        assert len(auth) == n * MAC_SIZE
        if sender < n:
            assert auth[sender * MAC_SIZE:(sender + 1) * MAC_SIZE] == bytes(MAC_SIZE)
        for r in range(n):
            if r == sender:
                assert not rings[r].verify(sender, d, auth, True)  # no key with oneself
                continue
            assert rings[r].verify(sender, d, auth, True)
            # a different key (another master secret) does not verify
            assert not other[r].verify(sender, d, auth, True)
            # nor does another message digest
            assert not rings[r].verify(sender, d32("other"), auth, True)
            # nor the same authenticator attributed to another sender
            for s2 in range(n + 1):
                if s2 not in (sender, r):
                    assert not rings[r].verify(s2, d, auth, True)
            # a flipped bit in r's entry fails at r and nowhere else
            for bit in (0, 7, 8 * MAC_SIZE - 1):
                pos = r * MAC_SIZE + bit // 8
                bad = bytearray(auth)
                bad[pos] ^= 1 << (bit % 8)
                bad = bytes(bad)
                assert not rings[r].verify(sender, d, bad, True)
                for r2 in range(n):
                    if r2 not in (r, sender):
                        assert rings[r2].verify(sender, d, bad, True)
            # truncated / extended authenticators fail
            assert not rings[r].verify(sender, d, auth[:-1], True)
            assert not rings[r].verify(sender, d, auth + b"\0", True)
        # a single-MAC check on an authenticator fails
        assert not rings[(sender + 1) % n].verify(sender, d, auth, False)


def test_flipped_bit_in_sealed_frame_header_fails_verification():
    msg = Prepare(1, 17, BATCH_DIGEST, 2)
    raw = seal(msg, RINGS[2])
    fr = CODEC.open_frame(raw)
    # the header's digest field is the last 32 bytes of the header; flip one bit inside it
    hdr = bytearray(fr.header)
    hdr[-1] ^= 0x01
    tampered = msgpack.packb([fr.tag, fr.sender, bytes(hdr), fr.payload, fr.auth], use_bin_type=True)
    fr2 = CODEC.open_frame(tampered)
    assert CODEC.parse(fr2).digest != msg.digest
    for r in (0, 1, 3):
        assert RINGS[r].verify(2, fr.digest, fr.auth, True)
        assert not RINGS[r].verify(2, fr2.digest, fr2.auth, True)
    # a forged sender field also breaks every MAC
    forged = msgpack.packb([fr.tag, 1, fr.header, fr.payload, fr.auth], use_bin_type=True)
    fr3 = CODEC.open_frame(forged)
    assert not any(RINGS[r].verify(1, fr3.digest, fr3.auth, True) for r in range(N))


@pytest.mark.parametrize("name,msg,to", [m for m in MESSAGES if m[2] is not None],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_single_mac_verifies_only_at_intended_receiver(name, msg, to):
    sender = sender_of(msg)
    fr = CODEC.open_frame(seal(msg, RINGS[sender], to))
    assert fr.tag in SINGLE_MAC and not fr.multi
    for p in list(range(N)) + [C0, C1, LAST_CLIENT]:
        ok = RINGS[p].verify(sender, fr.digest, fr.auth, False)
        assert ok == (p == to), f"principal {p}"
        # and never as an authenticator
        assert not RINGS[p].verify(sender, fr.digest, fr.auth, True)
    bad = bytearray(fr.auth)
    bad[5] ^= 0x80
    assert not RINGS[to].verify(sender, fr.digest, bytes(bad), False)


def test_point_to_point_seal_requires_receiver():
    with pytest.raises(ValueError):
        seal(Fetch(1, CKPT_D, 0, 0, (), 0), RINGS[0])


def test_mac_is_keyed_blake2b_128():
    import hashlib
    k = b"\x01" * 32
    assert mac(k, b"abc") == hashlib.blake2b(b"abc", key=k, digest_size=16).digest()
    assert len(mac(k, b"")) == MAC_SIZE


# ---------------------------------------------------------------------------
# range checks and malformed frames
# ---------------------------------------------------------------------------

def _frame(tag: int, sender: int, header_obj, payload: bytes = b"", auth: bytes | None = None) -> bytes:
    if auth is None:
        auth = bytes(MAC_SIZE) if tag in SINGLE_MAC else bytes(MAC_SIZE * N)
    return packb([tag, sender, packb(header_obj), payload, auth])


def _reason(raw: bytes, codec: Codec = CODEC) -> str:
    with pytest.raises(DecodeError) as ei:
        codec.parse(codec.open_frame(raw))
    return ei.value.reason


def _sealed(msg, to=None) -> bytes:
    return seal(msg, RINGS[sender_of(msg)], to)


D = BATCH_DIGEST


@pytest.mark.parametrize("msg,to,reason", [
    (Prepare(1, -1, D, 1), None, "bad-seqno"),
    (Prepare(1, 0, D, 1), None, "bad-seqno"),
    (Commit(0, -5, D, 2), None, "bad-seqno"),
    (PrePrepare(0, -1, D, 0, BATCH), None, "bad-seqno"),
    (Checkpoint(-1, D, 0), None, "bad-seqno"),
    (Fetch(-1, D, 0, 0, (), 0), 1, "bad-seqno"),
    (Fetch(1, D, -1, 0, (), 0), 1, "bad-level"),
    (Fetch(1, D, 0, 0, (-3,), 0), 1, "bad-object"),
    (Fetch(1, D, 0, 0, tuple(range(300)), 0), 1, "bad-want"),
    (MetaData(-1, 0, 0, (), 0), 1, "bad-seqno"),
    (MetaData(1, 0, 0, (b"short",), 0), 1, "bad-child"),
    (MetaData(1, 0, 0, (D,) * 257, 0), 1, "bad-children"),
    (Data(-1, 0, 0, ((0, b"s"),), 0), 1, "bad-seqno"),
    (Data(1, 0, -2, ((0, b"s"),), 0), 1, "bad-index"),
    (Status(1, True, -1, 0, 0), None, "bad-seqno"),
    (Status(1, True, 0, -1, 0), None, "bad-seqno"),
    (ViewChange(1, 0, -1, (), (), ()), None, "bad-seqno"),
    (ViewChange(1, 0, 0, ((-1, D),), (), ()), None, "bad-seqno"),
    (ViewChange(1, 0, 0, (), ((0, D, 0),), ()), None, "bad-seqno"),
    (NewView(1, 1, (), -1, D, (), ()), None, "bad-seqno"),
    (Prepare(U63 + 1, 1, D, 1), None, "bad-view"),
    (Prepare(2**64 - 1, 1, D, 1), None, "bad-view"),
    (Commit(-1, 1, D, 1), None, "bad-view"),
    (Status(U63 + 1, True, 0, 0, 0), None, "bad-view"),
    (ViewChange(0, 0, 0, (), (), ()), None, "bad-view"),  # view changes are to views >= 1
    (ViewChange(U63 + 1, 0, 0, (), (), ()), None, "bad-view"),
    (ViewChange(1, 0, 0, (), ((1, D, U63 + 1),), ()), None, "bad-view"),
    (ViewChangeAck(0, 1, 2, D), None, "bad-view"),
    (NewView(0, 0, (), 0, D, (), ()), None, "bad-view"),
    (Reply(U63 + 1, 1, C0, 0, False, False, D, None), C0, "bad-view"),
    (Prepare(U63, U63 + 1, D, 1), None, "bad-seqno"),
    (Request(C0, 0, b"", False, 0), None, "bad-timestamp"),
    (Request(C0, U63 + 1, b"", False, 0), None, "bad-timestamp"),
    (Request(C0, 1, b"", False, N), None, "bad-replier"),
    (Request(C0, 1, b"", False, -2), None, "bad-replier"),
    (Request(C0, 1, b"x" * (CFG.request_size_bytes_max + 1), False, 0), None, "bad-op"),
    (Request(C0, 1, b"x" * 300, False, N), None, "bad-replier"),  # (the payload form too)
    (Request(C0, 0, b"x" * 300, False, 0), None, "bad-timestamp"),
    (Reply(0, 1, -1, 1, False, False, D, None), C0, "bad-client"),
    (Reply(0, 1, LAST_CLIENT + 1, 1, False, False, D, None), C0, "bad-client"),
    (Reply(0, 1, C0, 1, False, False, D, b"r" * (CFG.reply_size_bytes_max + 1)), C0, "bad-result"),
    (ViewChangeAck(1, 0, N, D), None, "bad-replica"),
    (ViewChangeAck(1, 0, -1, D), None, "bad-replica"),
    (NewView(1, 1, ((N, D),), 0, D, (), ()), None, "bad-replica"),
    (Prepare(1, 1, D[:31], 1), None, "bad-digest"),
    (Prepare(1, 1, D + b"\0", 1), None, "bad-digest"),
    (Checkpoint(1, b"", 1), None, "bad-digest"),
    (Reply(0, 1, C0, 1, False, False, b"short", None), C0, "bad-digest"),
    (PrePrepare(0, 1, D, 0, Batch(b"n" * 257, ())), None, "bad-nondet"),
    (PrePrepare(0, 1, D, 0, Batch(b"", (b"r",) * (CFG.batch_requests_max + 1))), None, "bad-batch-size"),
    (ViewChange(1, 0, 0, (), tuple((s, D, 0) for s in range(1, CFG.log_window_seqnos + 2)), ()), None,
     "bad-prepared"),
    (ViewChange(1, 0, 0, tuple((s, D) for s in range(CFG.log_window_seqnos + 3)), (), ()), None,
     "bad-checkpoints"),
    (NewView(1, 1, tuple((i % N, D) for i in range(N + 1)), 0, D, (), ()), None, "bad-view-changes"),
    (NewView(1, 1, (), 0, D, tuple((s, D) for s in range(1, CFG.log_window_seqnos + 2)), ()), None,
     "bad-chosen"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_range_checks(msg, to, reason):
    assert _reason(_sealed(msg, to)) == reason


def test_range_boundaries_accepted():
    for msg in (Prepare(0, 1, D, 1), Prepare(U63, U63, D, 1), Checkpoint(0, D, 0), Checkpoint(U63, D, 0),
                Request(C0, 1, b"", False, ALL_REPLICAS), Request(LAST_CLIENT, U63, b"", False, N - 1),
                ViewChangeAck(U63, 0, N - 1, D), Request(C0, 1, b"o" * CFG.request_size_bytes_max, False, 0)):
        assert CODEC.parse(CODEC.open_frame(_sealed(msg))) == msg


def test_client_sending_replica_message_is_rejected():
    # a client authenticating a Prepare under its own id
    raw = seal(Prepare(1, 1, D, C0), RINGS[C0])
    with pytest.raises(DecodeError) as ei:
        CODEC.open_frame(raw)
    assert ei.value.reason == "bad-sender-role"
    for tag in TAG.values():
        if tag != TAG[Request]:
            with pytest.raises(DecodeError, match="bad-sender-role"):
                CODEC.open_frame(_frame(tag, C1, [1, 1, D]))
    # a replica may send one kind of request only: its recovery request
    fr = CODEC.open_frame(seal(Request(1, 1, b"", False, 0), RINGS[1]))
    with pytest.raises(DecodeError, match="replica-request-not-recovery"):
        CODEC.parse(fr)
    fr = CODEC.open_frame(seal(Request(1, 1, RECOVERY_OP + b"\x05", True, 0), RINGS[1]))
    with pytest.raises(DecodeError, match="replica-request-not-recovery"):
        CODEC.parse(fr)
    ok = Request(1, 7, RECOVERY_OP + b"\x05", False, ALL_REPLICAS)
    assert CODEC.parse(CODEC.open_frame(seal(ok, RINGS[1]))) == ok


def test_sender_in_a_free_replica_slot_is_not_a_member():
    wide = ClusterConfig.create(4, replica_slots=6, clients_max=2)
    codec = Codec(wide)
    rings = keyrings_for(MASTER, 6, [6, 7])  # (keys for ids 4 and 5, as a removed replica may hold)
    for sender in (4, 5):
        for msg in (Prepare(0, 1, D, sender), Request(sender, 1, b"op", False, 0)):
            with pytest.raises(DecodeError) as ei:
                codec.open_frame(seal(msg, rings[sender]))
            assert ei.value.reason == "not-a-member"
    # authenticators carry a MAC per replica slot (their size does not change with the membership)
    assert codec.open_frame(seal(Request(6, 1, b"op", False, 0), rings[6])).sender == 6
    assert codec.open_frame(seal(Prepare(0, 1, D, 3), rings[3])).sender == 3
    with pytest.raises(DecodeError, match="bad-auth-size"):
        codec.open_frame(seal(Prepare(0, 1, D, 3), keyrings_for(MASTER, 4, [6, 7])[3]))


@pytest.mark.parametrize("sender", [-1, LAST_CLIENT + 1, 2**31, 2**63, True, None, b"\x00", 1.0])
def test_sender_out_of_range(sender):
    with pytest.raises(DecodeError) as ei:
        CODEC.open_frame(packb([4, sender, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)]))
    assert ei.value.reason == "bad-sender"


@pytest.mark.parametrize("raw,reason", [
    (packb([0, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)]), "bad-tag"),
    (packb([16, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)]), "bad-tag"),
    (packb([True, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)]), "bad-tag"),
    (packb([4, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE - 1)]), "bad-auth-size"),
    (packb([4, 1, packb([1, 1, D]), b"", bytes(MAC_SIZE)]), "bad-auth-size"),
    (packb([11, 1, packb([1, D]), b"", bytes(N * MAC_SIZE)]), "bad-auth-size"),
    (packb([4, 1, [1, 1, D], b"", bytes(N * MAC_SIZE)]), "bad-frame"),
    (packb([4, 1, packb([1, 1, D]), None, bytes(N * MAC_SIZE)]), "bad-frame"),
    (packb([4, 1, packb([1, 1, D]), b""]), "bad-frame"),
    (packb([4, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE), b""]), "bad-frame"),
    (packb(b"hello"), "bad-frame"),
    (packb([4, 1, "hdr", b"", bytes(N * MAC_SIZE)]), "malformed"),
    (packb({1: 2}), "malformed"),
    (packb([4, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)]) + b"\x00", "malformed"),
    (packb([4, 1, packb([1, 1, D]), b"", bytes(N * MAC_SIZE)])[:-1], "malformed"),
    (b"", "malformed"),
    (b"\xc1", "malformed"),
    (b"\x91" * 5000, "malformed"),
])
def test_malformed_frames(raw, reason):
    with pytest.raises(DecodeError) as ei:
        CODEC.open_frame(raw)
    assert ei.value.reason == reason


@pytest.mark.parametrize("raw,reason", [
    (_frame(4, 1, [1, 1, D], payload=b"x"), "unexpected-payload"),
    (_frame(1, C0, [1, b"op", False, 0], payload=b"x"), "unexpected-payload"),
    (_frame(4, 1, [1, 1, D, 0]), "bad-arity"),
    (_frame(4, 1, [1, 1]), "bad-arity"),
    (_frame(8, 1, [1, 0, [], []]), "bad-arity"),
    (_frame(4, 1, 5), "bad-header"),
    (_frame(4, 1, [True, 1, D]), "bad-view"),
    (_frame(4, 1, [1.0, 1, D]), "bad-view"),
    (_frame(7, 1, [1, 1, 0, 0, b""]), "bad-active"),
    (_frame(7, 1, [1, True, 0, 0, b"short"]), "bad-digest"),
    (_frame(1, C0, [1, b"op", 0, 0]), "bad-read-only"),
    (_frame(1, C0, [1, "", False, 0]), "bad-op"),
    (_frame(2, 1, [0, 1, C0, None, False, D, False]), "bad-tentative"),
    (_frame(2, 1, [0, 1, C0, False, False, D, 5]), "bad-full"),
    (_frame(2, 1, [0, 1, C0, False, False, D, None]), "bad-full"),  # (the result goes in the payload)
    (_frame(2, 1, [0, 1, C0, False, False, D, False], payload=b"r"), "unexpected-payload"),
    # a large operation travels in the payload, its digest and size in the header (five fields)
    (_frame(1, C0, [1, b"x" * 256, False, 0]), "op-not-in-payload"),
    (_frame(1, C0, [1, op_digest(b"x" * 256), False, 0, 256], payload=b"x" * 255), "bad-op-size"),
    (_frame(1, C0, [1, op_digest(b"x" * 255), False, 0, 255], payload=b"x" * 255), "bad-op-size"),
    (_frame(1, C0, [1, op_digest(b"x" * 256), False, 0, True], payload=b"x" * 256), "bad-op-size"),
    (_frame(1, C0, [1, b"short", False, 0, 256], payload=b"x" * 256), "bad-op-digest"),
    (_frame(1, C0, [1, op_digest(b"y" * 256), False, 0, 256], payload=b"x" * 256), "op-digest-mismatch"),
    (_frame(1, C0, [1, op_digest(b"x" * 256), False, 0, 256, 0], payload=b"x" * 256), "bad-arity"),
    (_frame(3, 0, [0, 1, D], payload=b"\x93\x00\x00\x00"), "bad-batch"),
    (_frame(3, 0, [0, 1, D], payload=packb([b"", [5]])), "bad-batch-request"),
    (_frame(3, 0, [0, 1, D], payload=packb([None, []])), "bad-nondet"),
    (_frame(3, 0, [0, 1, D], payload=b"\xc1"), "malformed"),
    (_frame(8, 1, [1, 0, [[1]], [], []]), "bad-checkpoint"),
    (_frame(8, 1, [1, 0, [], [[1, D]], []]), "bad-entry"),
    (_frame(8, 1, [1, 0, [], [], [[1, D, 0, 0]]]), "bad-entry"),
    (_frame(8, 1, [1, 0, [], [], 7]), "bad-preprepared"),
    (_frame(10, 1, [1, [[0]], 0, D, [], []]), "bad-vc-entry"),
    (_frame(10, 1, [1, [], 0, D, [[1]], []]), "bad-chosen-entry"),
    (_frame(10, 1, [1, [], 0, D, [], [5]]), "bad-batch"),
    (_frame(10, 1, [1, [], 0, D, [], [b"\x90"]]), "bad-batch"),
])
def test_malformed_headers(raw, reason):
    assert _reason(raw) == reason


def test_oversized_frame_and_object():
    small = Codec(ClusterConfig.create(4, message_size_bytes_max=128 * 1024, state_size_bytes_max=100,
                                       request_size_bytes_max=1024, reply_size_bytes_max=1024))
    with pytest.raises(DecodeError, match="oversized"):
        small.open_frame(_sealed(Data(1, 0, 0, ((0, b"s" * 200_000),), 0), 1))
    assert _reason(_sealed(Data(1, 0, 0, ((0, b"s" * 101),), 0), 1), small) == "oversized-object"
    assert small.parse(small.open_frame(_sealed(Data(1, 0, 0, ((0, b"s" * 100),), 0), 1))).objs == ((0, b"s" * 100),)


@pytest.mark.parametrize("raw", [bytearray(b"\x90"), memoryview(b"\x90"), "text", None, 5])
def test_open_frame_rejects_non_bytes(raw):
    with pytest.raises(DecodeError, match="not-bytes"):
        CODEC.open_frame(raw)


def test_batch_requests_rejects_non_request_frames():
    prepare = _sealed(Prepare(1, 1, D, 1))
    b = Batch(b"", (BATCH.requests[0], prepare))
    with pytest.raises(DecodeError, match="batch-not-request"):
        CODEC.batch_requests(b)
    with pytest.raises(DecodeError, match="malformed"):
        CODEC.batch_requests(Batch(b"", (b"junk",)))
    with pytest.raises(DecodeError):
        CODEC.batch_digest(Batch(b"", (b"junk",)))
    bad_req = _frame(1, C0, [0, b"", False, 0])
    with pytest.raises(DecodeError, match="bad-timestamp"):
        CODEC.batch_requests(Batch(b"", (bad_req,)))


# ---------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("x", [b"", b"\x00", b"state", STATE])
def test_digests_are_domain_separated(x):
    ds = {
        result_digest(x), state_digest(x), digest1(b"pbft.msg", x), digest1(b"pbft.batch", x),
        digest(b"pbft.result", x), digest(b"pbft.checkpoint", x), op_digest(x), digest1(b"pbft.op", x),
        bulk_digest(b"pbft.state", x),
    }
    assert len(ds) == 9
    assert result_digest(x) != state_digest(x)
    assert all(len(d) == 32 for d in ds)


def test_bulk_digest_is_sha256_after_a_block_naming_the_kind():
    """Large bodies: SHA-256 of one 64-byte block (prefix and kind, NUL-padded), then the body."""
    import hashlib
    for kind in (b"pbft.op", b"pbft.result", b"k" * 16):
        block = (b"pbft.bulk\x00" + kind).ljust(64, b"\x00")
        assert len(block) == 64
        for x in (b"", b"x", STATE):
            assert bulk_digest(kind, x) == hashlib.sha256(block + x).digest()
    assert result_digest(b"r") == bulk_digest(b"pbft.result", b"r") and op_digest(b"o") == bulk_digest(b"pbft.op", b"o")
    for bad in (b"k" * 17, b"pbft\x00op"):
        with pytest.raises(ValueError):
            bulk_digest(bad, b"")


def test_checkpoint_digest_binds_seqno():
    sd = state_digest(b"the state")
    ds = {checkpoint_digest(s, sd) for s in (0, 1, 16, 32, 2**40, U63)}
    assert len(ds) == 6
    assert checkpoint_digest(16, sd) != checkpoint_digest(32, sd)
    assert checkpoint_digest(16, sd) == checkpoint_digest(16, sd)
    assert checkpoint_digest(16, sd) != checkpoint_digest(16, state_digest(b"other"))
    # only the injected bug drops the binding
    assert checkpoint_digest(16, sd, bind_seqno=False) == checkpoint_digest(32, sd, bind_seqno=False)
    assert checkpoint_digest(16, sd, bind_seqno=False) != checkpoint_digest(16, sd)
    assert checkpoint_digest(16, sd) != sd


def test_frame_digest_separates_tag_sender_header():
    h = packb([1, 1, D])
    ds = {frame_digest(4, 1, h), frame_digest(5, 1, h), frame_digest(4, 2, h), frame_digest(4, 1, h + b"\0")}
    assert len(ds) == 4


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 4096])
def test_large_operation_travels_in_the_payload_hashed_once(size):
    """An operation of REQUEST_OP_PAYLOAD_MIN bytes or more is the frame's payload; the header (what
    the MACs cover) has its digest and size. Smaller ones stay in the header, the payload empty."""
    op = bytes(range(256)) * (size // 256) + bytes(size % 256)
    req = Request(C0, 9, op, False, 1)
    fr = CODEC.open_frame(sealed_request(C0, 9, op, replier=1))
    header = msgpack.unpackb(fr.header)
    if size >= REQUEST_OP_PAYLOAD_MIN:
        assert fr.payload == op and header == [9, op_digest(op), False, 1, size]
    else:
        assert fr.payload == b"" and header == [9, op, False, 1]
    assert CODEC.parse(fr) == req
    assert fr.opd == (op_digest(op) if size >= REQUEST_OP_PAYLOAD_MIN else b"")
    # the vouch key is the same whether the digest checked by the codec is given or recomputed, and
    # it ignores the replier (a retransmission asks every replica for the full result)
    assert vouch_key(req, fr.opd) == vouch_key(req) == vouch_key(Request(C0, 9, op, False, ALL_REPLICAS))
    assert vouch_key(req) != vouch_key(Request(C0, 9, op + b"x", False, 1))
    assert vouch_key(req) != vouch_key(Request(C0, 9, op, True, 1))
    assert vouch_key(req) != vouch_key(Request(C0, 10, op, False, 1))


def test_frame_init_takes_every_field():
    """Frame writes its own ``__init__``: it still takes every field the dataclass declares, as
    the generated one did (``dataclasses.replace``, ``fields`` and ``repr`` agree with it)."""
    import dataclasses
    fr = CODEC.open_frame(sealed_request(C0, 9, b"o" * 300))
    CODEC.parse(fr)
    assert fr.opd == op_digest(b"o" * 300)
    assert [f.name for f in dataclasses.fields(fr)][-1] == "opd"
    moved = dataclasses.replace(fr, sender=C0 + 1)
    assert (moved.sender, moved.opd, moved.digest, moved.raw) == (C0 + 1, fr.opd, fr.digest, fr.raw)
    assert dataclasses.replace(fr) == fr
    assert CODEC.open_frame(fr.raw).opd == b""  # (set by ``parse`` only, once it checked it)


def test_large_operation_cannot_be_swapped_or_stripped():
    """The payload is not under the MAC: the header's digest binds it, and the two forms of a
    request never share a header, so a frame whose MAC verifies yields the operation its client sent."""
    op = b"o" * 1000
    raw = sealed_request(C0, 9, op)
    tag, sender, header, payload, auth = msgpack.unpackb(raw)
    swapped = packb([tag, sender, header, b"p" * 1000, auth])
    fr = CODEC.open_frame(swapped)
    assert RINGS[1].verify(fr.sender, fr.digest, fr.auth, fr.multi)  # (the header is intact)
    with pytest.raises(DecodeError, match="op-digest-mismatch"):
        CODEC.parse(fr)
    # without its payload, the header is not that of a small request whose operation is the digest
    stripped = CODEC.open_frame(packb([tag, sender, header, b"", auth]))
    with pytest.raises(DecodeError, match="bad-op-size"):
        CODEC.parse(stripped)
    small = CODEC.open_frame(sealed_request(C0, 9, op_digest(op)))
    assert small.digest != fr.digest


def test_reply_result_travels_in_the_payload():
    """A full reply's result is the payload, the header says it is there and has its digest; a
    digest reply has no payload. A result swapped on the way still parses (the payload is not under
    the MAC) and is refused by the client, which checks it against the digest."""
    res = b"r" * 4096
    full = Reply(0, 5, C0, 1, False, False, result_digest(res), res)
    fr = CODEC.open_frame(seal(full, RINGS[1], C0))
    assert fr.payload == res and msgpack.unpackb(fr.header)[-1] is True and res not in fr.header
    dig = CODEC.open_frame(seal(Reply(0, 5, C0, 1, False, False, result_digest(res), None), RINGS[1], C0))
    assert dig.payload == b"" and msgpack.unpackb(dig.header)[-1] is False
    assert CODEC.parse(dig).result is None
    tag, sender, header, payload, auth = msgpack.unpackb(fr.raw)
    forged = CODEC.parse(CODEC.open_frame(packb([tag, sender, header, b"x" * 4096, auth])))
    assert forged.result == b"x" * 4096 and forged.result_digest == result_digest(res)
    c = CoreClient(CFG, C0, RINGS[C0])
    c.invoke(b"op", False, 0.0)  # (the reply to its outstanding request, with another result)
    forged_now = seal(Reply(0, c.timestamp, C0, 1, False, False, result_digest(res), res), RINGS[1], C0)
    t2, s2, h2, _p2, a2 = msgpack.unpackb(forged_now)
    c.receive(packb([t2, s2, h2, b"x" * 4096, a2]), 0.0)
    assert c.drops.get("reply-result-digest-mismatch") == 1 and not c.replies


def test_batch_digest_matches_request_frame_digests():
    for b in (BATCH, BATCH2, NULL_BATCH, Batch(b"nd", ())):
        expected = batch_digest_from_request_digests(b.nondet, [CODEC.open_frame(r).digest for r in b.requests])
        assert CODEC.batch_digest(b) == expected
    # the request digests are what seal_with_digest returns
    reqs = [Request(C0, 10 + i, b"op%d" % i, False, 0) for i in range(4)]
    sealed = [seal_with_digest(r, RINGS[C0]) for r in reqs]
    b = Batch(b"nondet", tuple(raw for raw, _ in sealed))
    assert CODEC.batch_digest(b) == batch_digest_from_request_digests(b"nondet", [d for _, d in sealed])
    assert CODEC.batch_digest(NULL_BATCH) == NULL_BATCH_DIGEST
    # order, nondet, and membership all matter
    assert CODEC.batch_digest(Batch(b"nondet", tuple(reversed(b.requests)))) != CODEC.batch_digest(b)
    assert CODEC.batch_digest(Batch(b"other", b.requests)) != CODEC.batch_digest(b)
    assert CODEC.batch_digest(Batch(b"nondet", b.requests[:-1])) != CODEC.batch_digest(b)
    # the request digest does not depend on the authenticator
    raw0 = b.requests[0]
    fr = CODEC.open_frame(raw0)
    resealed = packb([fr.tag, fr.sender, fr.header, fr.payload, bytes(len(fr.auth))])
    assert CODEC.open_frame(resealed).digest == fr.digest


# ---------------------------------------------------------------------------
# fuzzing: only DecodeError may escape
# ---------------------------------------------------------------------------

def feed(raw, codec: Codec = CODEC):
    """Decode ``raw`` all the way; returns the message or None. Anything but DecodeError propagates."""
    try:
        fr = codec.open_frame(raw)
    except DecodeError:
        return None
    for ring in (RINGS[0], RINGS[1], RINGS[C0]):
        assert type(ring.verify(fr.sender, fr.digest, fr.auth, fr.multi)) is bool
    if fr.payload:
        try:
            codec.decode_batch(fr.payload)
        except DecodeError:
            pass
    try:
        msg = codec.parse(fr)
    except DecodeError:
        return None
    batches = []
    if isinstance(msg, PrePrepare) and msg.batch is not None:
        batches.append(msg.batch)
    if isinstance(msg, NewView):
        batches.extend(msg.batches)
    for b in batches:
        for call in (codec.batch_requests, codec.batch_digest):
            try:
                call(b)
            except DecodeError:
                pass
    # anything the codec accepts re-encodes to an equal message
    check_reencodes(msg, fr.sender)
    return msg


def check_reencodes(msg, sender: int) -> None:
    to = None
    if TAG[type(msg)] in SINGLE_MAC:
        to = msg.client if isinstance(msg, Reply) else (sender + 1) % N
    raw = seal(msg, RINGS[sender], to)
    assert CODEC.parse(CODEC.open_frame(raw)) == msg


SAMPLE_FRAMES = [seal(m, RINGS[sender_of(m)], to) for _, m, to in MESSAGES if not isinstance(m, Data)] + [
    seal(Data(32, 1, 2, ((512, b"small state"),), 2), RINGS[2], 1),
]


def test_sample_frames_feed_cleanly():
    for raw in SAMPLE_FRAMES:
        assert feed(raw) is not None


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(raw):
    feed(raw)


@FUZZ
@given(st.sampled_from(SAMPLE_FRAMES), st.data())
def test_fuzz_mutated_valid_frames(raw, data):
    buf = bytearray(raw)
    ops = data.draw(st.lists(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]),
                             min_size=1, max_size=4))
    for op in ops:
        if op in ("flip", "set", "delete", "insert") and not buf:
            continue
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCC, 0xCF,
                                                0xD3, 0xDC, 0xDD, 0xDE, 0xC7, 0xD6, 0xCA, 0xCB, 0xFF]))
        elif op == "truncate":
            del buf[i:]
        elif op == "extend":
            buf += data.draw(st.binary(min_size=1, max_size=40))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i:i + data.draw(st.integers(1, 8))]
    feed(bytes(buf))


LEAF = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, N - 1, N, C0, LAST_CLIENT, LAST_CLIENT + 1, U63, U63 + 1, 2**64 - 1, -(2**63)]),
    st.binary(max_size=40),
    st.sampled_from([D, CKPT_D, b"", bytes(MAC_SIZE)]),
    st.sampled_from(["", "x"]),  # msgpack str: only the empty one gets past the unpacker
    st.floats(allow_nan=False),
)
NESTED = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=6), max_leaves=25)


def _auth_for(tag: int) -> bytes:
    return bytes(MAC_SIZE) if tag in SINGLE_MAC else bytes(MAC_SIZE * N)


def _sender_for(tag: int, choice: int) -> int:
    return (C0 + choice % CFG.clients_max) if tag == TAG[Request] else choice % N


@FUZZ
@given(NESTED)
def test_fuzz_msgpack_structures_as_frames(obj):
    feed(packb(obj))
    if isinstance(obj, list):
        # also wrapped in a frame-shaped list of five
        feed(packb((obj + [b""] * 5)[:5]))


@FUZZ
@given(st.sampled_from(sorted(TAG.values())), st.integers(0, 1000), NESTED)
def test_fuzz_msgpack_structures_as_headers(tag, who, obj):
    raw = _frame(tag, _sender_for(tag, who), obj)
    fr = CODEC.open_frame(raw)  # a well-formed frame: open_frame must accept it
    assert fr.tag == tag
    feed(raw)


ARITY = {1: 4, 2: 7, 3: 3, 4: 3, 5: 3, 6: 2, 7: 5, 8: 5, 9: 3, 10: 6, 11: 5, 12: 3, 13: 1, 14: 1, 15: 1, 17: 4, 18: 1,
         19: 3}


@FUZZ
@given(st.sampled_from(sorted(TAG.values())), st.integers(0, 1000), st.data())
def test_fuzz_headers_with_right_arity(tag, who, data):
    """Headers of the right length with random field values."""
    fields = data.draw(st.lists(NESTED, min_size=ARITY[tag], max_size=ARITY[tag]))
    payload = data.draw(st.one_of(st.just(b""), NESTED.map(packb), st.binary(max_size=30)))
    feed(_frame(tag, _sender_for(tag, who), fields, payload))


# (tag, sender, header as a plain msgpack structure, payload) of every valid sample message
VALID_PARTS = []
for _, _m, _to in MESSAGES:
    _tag, _sender, _header, _payload = header_of(_m)
    if isinstance(_m, Data):
        _payload = b"small state"
    VALID_PARTS.append((_tag, _sender, msgpack.unpackb(_header), _payload))


def mutate_structure(data, obj, depth: int = 0):
    """Replace, drop, duplicate or extend nodes of a decoded msgpack structure, recursing into lists."""
    choice = data.draw(st.integers(0, 9), label="op")
    if depth == 0 and isinstance(obj, list) and choice in (0, 2, 3):
        choice = 4  # at the top, mostly keep the header's arity and mutate inside a field
    if choice == 0 or depth > 4:
        return data.draw(LEAF if depth > 4 else NESTED, label="replacement")
    if isinstance(obj, bytes) and obj and choice == 1:  # keep the type, change the length
        return obj[:-1] if data.draw(st.booleans()) else obj + b"\0"
    if isinstance(obj, int) and not isinstance(obj, bool) and choice == 1:
        near = [obj - 1, obj + 1, -obj, 0, U63 + 1, 2**64 - 1]
        return data.draw(st.sampled_from([x for x in near if -(2**63) <= x <= 2**64 - 1]))  # msgpack's range
    if isinstance(obj, list):
        obj = list(obj)
        if choice == 1 and obj:
            del obj[data.draw(st.integers(0, len(obj) - 1))]
        elif choice == 2 and obj:
            obj.append(obj[data.draw(st.integers(0, len(obj) - 1))])
        elif choice == 3:
            obj.append(data.draw(NESTED))
        elif obj:
            i = data.draw(st.integers(0, len(obj) - 1))
            obj[i] = mutate_structure(data, obj[i], depth + 1)
    return obj


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID_PARTS))), st.data())
def test_fuzz_structure_aware_header_and_payload_mutations(i, data):
    """Valid headers (and batch payloads) with a few nested nodes mutated: reaches every field check."""
    tag, sender, header, payload = VALID_PARTS[i]
    for _ in range(data.draw(st.integers(1, 3))):
        header = mutate_structure(data, header)
    if payload and tag == TAG[PrePrepare] and data.draw(st.booleans()):
        payload = packb(mutate_structure(data, msgpack.unpackb(payload)))
    feed(_frame(tag, sender, header, payload))


REQ_FRAMES = list(BATCH.requests) + list(BATCH2.requests)


@FUZZ
@given(st.data())
def test_fuzz_preprepare_payloads(data):
    """Random batch payloads (and random request frames inside them) for PrePrepare."""
    kind = data.draw(st.sampled_from(["nested", "batch-shaped", "mutated-requests"]))
    if kind == "nested":
        payload = packb(data.draw(NESTED))
    else:
        nondet = data.draw(st.one_of(st.binary(max_size=300), NESTED))
        if kind == "batch-shaped":
            reqs = data.draw(st.lists(st.one_of(st.sampled_from(REQ_FRAMES + SAMPLE_FRAMES), NESTED.map(packb),
                                                st.binary(max_size=40), NESTED), max_size=5))
        else:
            reqs = []
            for _ in range(data.draw(st.integers(0, 4))):
                r = bytearray(data.draw(st.sampled_from(REQ_FRAMES)))
                for _ in range(data.draw(st.integers(0, 3))):
                    i = data.draw(st.integers(0, len(r) - 1))
                    r[i] = data.draw(st.integers(0, 255))
                reqs.append(bytes(r))
        payload = packb([nondet, reqs])
    feed(_frame(3, data.draw(st.integers(0, N - 1)), [0, 1, D], payload))
    try:
        b = CODEC.decode_batch(payload)
    except DecodeError:
        return
    for call in (CODEC.batch_requests, CODEC.batch_digest):
        try:
            call(b)
        except DecodeError:
            pass


@FUZZ
@given(st.data())
def test_fuzz_new_view_batches(data):
    batches = data.draw(st.lists(st.one_of(st.sampled_from([encode_batch(BATCH), encode_batch(NULL_BATCH)]),
                                           NESTED.map(packb), NESTED), max_size=3))
    feed(_frame(10, data.draw(st.integers(0, N - 1)), [1, [], 0, D, [], batches]))


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, len(MESSAGES) - 1), st.integers(0, 2**32 - 1))
def test_fuzz_header_fields_resealed(i, seed):
    """Valid messages with one header byte randomised and the frame re-authenticated."""
    _, msg, to = MESSAGES[i]
    tag, sender, header, payload = header_of(msg)
    rnd = random.Random(seed)
    h = bytearray(header)
    h[rnd.randrange(len(h))] = rnd.randrange(256)
    h = bytes(h)
    d = frame_digest(tag, sender, h)
    ring: KeyRing = RINGS[sender]
    auth = ring.mac_for(to, d) if to is not None else ring.authenticator(d)
    raw = packb([tag, sender, h, payload, auth])
    fr = CODEC.open_frame(raw)
    receiver = to if to is not None else (sender + 1) % N
    assert RINGS[receiver].verify(sender, fr.digest, fr.auth, fr.multi)
    feed(raw)
