"""A signer process: a replica's long-term private key kept out of the replica process.

``pbft signer DIR --id I`` reads ``keys/replica-I.key`` once, then answers a replica over a UNIX
socket; ``pbft replica DIR --id I --signer PATH`` (or ``[keys] signer = "unix:PATH"`` in
``cluster.toml``) then never reads the key file. The replica's ``SignerIdentity`` has the two
operations ``keys.Identity`` performs with the private key, and nothing else is offered:

* ``sign``: the signature of one of the replica's *own NewKey headers*. The signer rebuilds
  what is signed itself (``keys.newkey_message`` with its principal), so it signs nothing but
  NewKeys of this replica, and it checks the header: session keys sealed to other replicas of
  the cluster only (a box of the size of one key each, every receiver at most once), and a
  timestamp close to the signer's clock, which is the replica's (same host): at most
  ``FUTURE_SLACK_US`` (0.1 s) ahead, ``PAST_SLACK_US`` behind. A NewKey signed while an intruder
  held the replica therefore cannot be kept for later: the NewKeys the replica signs after its
  reboot (which takes longer than 0.1 s) have larger timestamps and supersede it everywhere
  (receivers keep only the newest).
* ``sign-link``: the signature of a *configuration link* statement (``runtime.chain``: the
  link context ``chain.CONFIG_LINK_CONTEXT``, then msgpack ``[prev digest, membership fields,
  [epoch, opens_at, configuration digest]]``), for the replica's vote on the configuration
  certificate chain. The signer signs the statement as given (a link signature covers exactly
  what ``chain.check_signature`` checks), and only such a statement: anything else (another
  prefix, a membership link of the previous format, which no replica signs any more, a NewKey
  header, trailing or non-canonical bytes, a membership that does not decode or has more
  replicas than the cluster's slots, an epoch or checkpoint below 1, a digest that is not 32
  bytes) is refused, and a NewKey is never signed on this path nor a link on the ``sign`` path
  (there the signer prefixes the NewKey context itself, and the header check refuses it). While
  it runs, it signs for each predecessor digest statements of increasing configuration epochs
  only: the same statement again (the replica restarted, or resent) or one of a later epoch (the
  replica's stable checkpoint moved on before the link was complete), never a second statement
  of an epoch it signed or of an earlier one, so an intruder in the replica process cannot have
  it sign two configurations of one epoch after the same link (``sign-link-equivocation``,
  ``sign-link-stale``); what it cannot tell is whether the configuration is the one the
  replica's certified state records: that, as for NewKeys, is what the others' signatures of
  quorum weight are for.
* ``open``: a sealed box addressed to the replica (the session keys in a NewKey to it), of one
  of the two sizes a NewKey carries (a replica's key, a client's pair).
* ``public``: the public key, so that the replica checks it talks to the right signer.

The replica's ``SignerIdentity`` makes the NewKey and open calls blocking (short, local); a link
is signed asynchronously (``sign_link``, on a connection of its own), so that the replica's event
loop does not wait for it.

Wire: each message is a 4-byte big-endian length and that many bytes of msgpack. A request is
``[op, arg]`` (``op`` a short string, ``arg`` bytes) of at most ``REQUEST_BYTES_MAX``; an answer
``[True, bytes]`` or ``[False, reason]``. A request that is not exactly that is refused and
counted under its reason; a length over the bound closes the connection. Requests are rate
limited (token buckets for signing and for opening, all connections together) and logged: every
connection (with the peer's pid and uid), every signature, refusals (at most
``REFUSALS_LOGGED_PER_S`` a second) and every ``SUMMARY_S`` seconds the counts.

What it buys and what it does not: ``docs/recovery.md``, *What a root intruder can still do*.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Optional

import msgpack
import nacl.exceptions

from ..codec import DecodeError
from ..config import ConfigError
from ..crypto import KEY_SIZE
from ..state.configuration import Membership
from .chain import CONFIG_LINK_CONTEXT, DIGEST_BYTES, LINK_CONTEXT, ChainError, decode_config_ref, statement
from .keys import NEWKEY_MAX_BYTES, SEALED_OVERHEAD, SIGNATURE_SIZE, Identity
from .transport import TokenBucket

REQUEST_BYTES_MAX = NEWKEY_MAX_BYTES + 64  # a NewKey header and the framing
ANSWER_BYTES_MAX = 256
OPS = ("public", "sign", "open", "sign-link")
LINK_STATEMENT_BYTES_MAX = NEWKEY_MAX_BYTES  # a link of 1024 replicas is about 40 KB
LINK_RATE_PER_S = 1.0  # a vote per membership change (again after a restart); resends reuse it
LINK_BURST = 16.0
# predecessor digests whose latest signed statement is remembered; when full, a link after another
# predecessor is refused (forgetting one would let a second statement of its epoch be signed)
LINKS_REMEMBERED = 256
SEALED_SIZES = (KEY_SIZE + SEALED_OVERHEAD, 2 * KEY_SIZE + SEALED_OVERHEAD)
# a replica's NewKey timestamps are its clock (+1 us per NewKey in a burst), read before the round trip
FUTURE_SLACK_US = 100_000
PAST_SLACK_US = 10_000_000
SIGN_RATE_PER_S = 20.0  # a replica signs a NewKey per refresh and per peer (re)connection
SIGN_BURST_MIN = 64
OPEN_RATE_PER_S = 2000.0  # as many NewKeys as the replica's admission checks (runtime.admission)
OPEN_BURST = 2000.0
CLIENT_TIMEOUT_S = 2.0
REFUSALS_LOGGED_PER_S = 5
SUMMARY_S = 10.0


class SignerError(DecodeError):
    """The signer refused a request, or could not be reached (``reason``: a short label)."""


def _log(principal: int, event: str, **fields) -> None:
    rec = {"ts": round(time.time(), 3), "signer": principal, "event": event}
    rec.update(fields)
    print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


def _pack(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _unpack(body: bytes):
    return msgpack.unpackb(body, use_list=False, raw=False, max_str_len=16, max_map_len=0, max_ext_len=0,
                           max_bin_len=REQUEST_BYTES_MAX, max_array_len=1024)


def socket_path(spec: str, directory: Path, replica_id: int) -> Path:
    """``unix:PATH`` or ``PATH`` (``{id}`` replaced by the replica id; relative to the cluster
    directory) as a socket path."""
    if spec.startswith("unix:"):
        spec = spec[5:]
    if not spec:
        raise ConfigError("an empty signer socket path")
    p = Path(spec.replace("{id}", str(replica_id)))
    return p if p.is_absolute() else Path(directory) / p


def default_socket(directory: Path, replica_id: int) -> Path:
    return Path(directory) / f"signer-{replica_id}.sock"


class Signer:
    """The checks and the key: ``handle(request bytes) -> answer object``; no I/O (tested
    directly), counts in ``counts`` (answered operations and refusal reasons)."""

    def __init__(self, ident: Identity, n_replicas: int, clock=time.time_ns):
        self.ident = ident
        self.n = n_replicas
        self.clock = clock
        self.last_ts = 0  # of the latest NewKey signed
        self._ts = 0
        self.last_op = ""  # of the latest request answered
        self.sign_bucket = TokenBucket(rate=SIGN_RATE_PER_S, burst=float(max(SIGN_BURST_MIN, 4 * n_replicas)))
        self.open_bucket = TokenBucket(rate=OPEN_RATE_PER_S, burst=OPEN_BURST)
        self.link_bucket = TokenBucket(rate=LINK_RATE_PER_S, burst=LINK_BURST)
        self.links_signed: dict[bytes, tuple[int, bytes]] = {}  # predecessor digest -> (epoch, statement) signed last
        self.counts: dict[str, int] = {}
        self.last_refusal = ""

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _refuse(self, reason: str):
        self._count(reason)
        self.last_refusal = reason
        return [False, reason]

    def handle(self, body: bytes) -> list:
        try:
            req = _unpack(body)
        except (ValueError, msgpack.UnpackException):
            return self._refuse("malformed")
        if type(req) is not tuple or len(req) != 2 or type(req[0]) is not str or type(req[1]) is not bytes:
            return self._refuse("malformed")
        op, arg = req
        if op not in OPS:
            return self._refuse("unknown-op")
        self.last_op = op
        now = time.monotonic()
        if op == "public":
            if arg:
                return self._refuse("malformed")
            self._count("public")
            return [True, self.ident.public]
        if op == "open":
            if len(arg) not in SEALED_SIZES:
                return self._refuse("open-bad-size")
            if not self.open_bucket.take(now):
                return self._refuse("open-rate-limited")
            try:
                k = self.ident.open_sealed(arg)
            except nacl.exceptions.CryptoError:
                return self._refuse("open-undecryptable")
            self._count("open")
            return [True, k]
        if op == "sign-link":
            return self._sign_link(arg, now)
        why = self._check_header(arg)
        if why:
            return self._refuse(why)
        if not self.sign_bucket.take(now):
            return self._refuse("sign-rate-limited")
        self.last_ts = self._ts
        self._count("sign")
        return [True, self.ident.sign_newkey(arg)]

    def _sign_link(self, stmt: bytes, now: float) -> list:
        why, prev, epoch = self._check_link(stmt)
        if why:
            return self._refuse(why)
        signed = self.links_signed.get(prev)
        again = signed is not None and signed[1] == stmt
        if signed is not None and not again and epoch <= signed[0]:
            return self._refuse("sign-link-equivocation" if epoch == signed[0] else "sign-link-stale")
        if signed is None and len(self.links_signed) >= LINKS_REMEMBERED:
            return self._refuse("sign-link-memory-full")  # (restart the signer: a new process signs again)
        if not again and not self.link_bucket.take(now):
            return self._refuse("sign-link-rate-limited")
        if not again:
            self.links_signed[prev] = (epoch, stmt)
        self._count("sign-link")
        return [True, self.ident.signing_key.sign(stmt).signature]

    def _check_link(self, stmt: bytes) -> tuple[str, bytes, int]:
        """(why ``stmt`` is not a configuration link statement the signer may sign, "" if it is;
        its predecessor digest; its configuration epoch)."""
        if len(stmt) > LINK_STATEMENT_BYTES_MAX:
            return "sign-link-oversized", b"", 0
        if stmt.startswith(LINK_CONTEXT):
            return "sign-link-old-format", b"", 0  # (membership links: read from old chains, never signed now)
        if not stmt.startswith(CONFIG_LINK_CONTEXT):
            return "sign-link-not-a-link", b"", 0
        try:
            t = _unpack(stmt[len(CONFIG_LINK_CONTEXT):])
        except (ValueError, msgpack.UnpackException):
            return "sign-link-malformed", b"", 0
        if type(t) is not tuple or len(t) != 3 or type(t[0]) is not bytes or len(t[0]) != DIGEST_BYTES:
            return "sign-link-malformed", b"", 0
        try:
            m = Membership.decode_fields(t[1])
            ref = decode_config_ref(t[2])
        except (ValueError, ChainError):
            return "sign-link-malformed", b"", 0
        if m.n > self.n:
            return "sign-link-bad-membership", b"", 0
        if statement(t[0], m, ref) != stmt:
            return "sign-link-malformed", b"", 0  # (one encoding only: what is signed is what was checked)
        return "", t[0], ref.epoch

    def _check_header(self, header: bytes) -> str:
        """Why ``header`` is not a NewKey header this replica may sign now ("" if it is)."""
        try:
            h = _unpack(header)
        except (ValueError, msgpack.UnpackException):
            return "sign-malformed"
        if type(h) is not tuple or len(h) != 2 or type(h[0]) is not int or type(h[1]) is not tuple:
            return "sign-malformed"
        ts, entries = h
        now_us = self.clock() // 1000
        if not now_us - PAST_SLACK_US <= ts <= now_us + FUTURE_SLACK_US:
            return "sign-timestamp-off-clock"
        if not entries:
            return "sign-malformed"
        seen = set()
        for e in entries:
            if type(e) is not tuple or len(e) != 2 or type(e[0]) is not int or type(e[1]) is not bytes:
                return "sign-malformed"
            j, box = e
            if not 0 <= j < self.n or j == self.ident.principal or j in seen:
                return "sign-bad-receiver"
            if len(box) != KEY_SIZE + SEALED_OVERHEAD:
                return "sign-bad-entry"
            seen.add(j)
        if msgpack.packb([ts, [list(e) for e in entries]], use_bin_type=True) != header:
            return "sign-malformed"  # (one encoding only: what is signed is what was checked)
        self._ts = ts
        return ""


class SignerServer:
    """``Signer`` on a UNIX socket (asyncio), with the logging of the module notes."""

    def __init__(self, signer: Signer, path: Path, mode: int = 0o660, allow_uids: Optional[set[int]] = None):
        self.signer = signer
        self.path = Path(path)
        self.mode = mode
        self.allow_uids = allow_uids
        self.server: Optional[asyncio.base_events.Server] = None
        self.connections = 0
        self.logged_refusals = 0
        self.logged_at = 0.0
        self.summary_counts: dict[str, int] = {}
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def principal(self) -> int:
        return self.signer.ident.principal

    async def start(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o777 & ~self.mode)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        _log(self.principal, "signer-started", socket=str(self.path), mode=oct(self.mode))
        asyncio.get_running_loop().call_later(SUMMARY_S, self._summary)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def _summary(self) -> None:
        c = dict(self.signer.counts)
        if c != self.summary_counts:
            _log(self.principal, "signer-counts", **c)
            self.summary_counts = c
        asyncio.get_running_loop().call_later(SUMMARY_S, self._summary)

    def _refusal_logged(self, reason: str, peer: dict) -> None:
        now = time.monotonic()
        if now - self.logged_at >= 1.0:
            self.logged_at, self.logged_refusals = now, 0
        if self.logged_refusals < REFUSALS_LOGGED_PER_S:
            self.logged_refusals += 1
            _log(self.principal, "signer-refused", reason=reason, **peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = _peer(writer)
        if self.allow_uids is not None and peer.get("uid") not in self.allow_uids:
            _log(self.principal, "signer-refused", reason="uid-not-allowed", **peer)
            writer.close()
            return
        _log(self.principal, "signer-connection", **peer)
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readexactly(4)
                size = struct.unpack(">I", head)[0]
                if size > REQUEST_BYTES_MAX:
                    self.signer._count("oversized")
                    self._refusal_logged("oversized", peer)
                    break
                body = await reader.readexactly(size)
                ans = self.signer.handle(body)
                if ans[0] is False:
                    self._refusal_logged(ans[1], peer)
                elif self.signer.last_op == "sign":
                    _log(self.principal, "signer-sign", timestamp=self.signer.last_ts, **peer)
                elif self.signer.last_op == "sign-link":
                    _log(self.principal, "signer-sign-link", **peer)
                writer.write(_pack(ans))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            _log(self.principal, "signer-disconnected", **peer)


def _peer(writer: asyncio.StreamWriter) -> dict:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        return {"peer_pid": pid, "peer_uid": uid}
    except (OSError, AttributeError):
        return {}


def run_signer(cluster, replica_id: int, path: Path, mode: int = 0o660,
               allow_uids: Optional[set[int]] = None) -> None:
    """Run a signer for ``replica_id`` in the foreground until SIGINT/SIGTERM."""
    import signal

    ident = cluster.identity(replica_id)  # the only process that reads the key file
    signer = Signer(ident, cluster.cfg.client_base)  # (every replica slot: members change)

    async def main():
        srv = SignerServer(signer, path, mode, allow_uids)
        await srv.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        srv.close()
        _log(replica_id, "signer-stopped", **signer.counts)

    asyncio.run(main())


class SignerIdentity:
    """What a replica holds instead of ``keys.Identity`` when a signer has its key: the same
    ``principal``, ``public``, ``sign_newkey`` and ``open_sealed``, each one round trip to the
    signer (blocking, bounded by ``CLIENT_TIMEOUT_S``; a lost connection is reopened once), and
    ``sign_link`` (asynchronous, for ``chain_keeper``).
    Failures raise ``SignerError``, a ``DecodeError``: a NewKey we cannot open is dropped and
    counted like any other (``signer-unavailable``, ``signer-<reason>``)."""

    def __init__(self, principal: int, path: Path, expected_public: bytes, timeout: float = CLIENT_TIMEOUT_S):
        self.principal = principal
        self.path = Path(path)
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self.requests = 0
        try:
            pub = self._call("public", b"")
        except SignerError as e:
            raise ConfigError(f"replica {principal}: no signer at {self.path} ({e.reason})") from None
        if pub != expected_public:
            raise ConfigError(f"replica {principal}: the signer at {self.path} holds another key than "
                              f"the public key of replica {principal} in cluster.toml")
        self.public = pub

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # (not inherited: closed at a reboot's exec)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except OSError:
            s.close()
            raise
        return s

    def _round_trip(self, data: bytes) -> list:
        if self.sock is None:
            self.sock = self._connect()
        self.sock.sendall(data)
        head = _recv_exactly(self.sock, 4)
        size = struct.unpack(">I", head)[0]
        if size > ANSWER_BYTES_MAX:
            raise OSError("oversized answer")
        return msgpack.unpackb(_recv_exactly(self.sock, size), raw=False)

    def _call(self, op: str, arg: bytes) -> bytes:
        data = _pack([op, arg])
        self.requests += 1
        ans = None
        for _attempt in range(2):
            try:
                ans = self._round_trip(data)
                break
            except (OSError, ValueError, msgpack.UnpackException):
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
        if ans is None:
            raise SignerError("signer-unavailable")
        return _answer(ans)

    def sign_newkey(self, header: bytes) -> bytes:
        sig = self._call("sign", header)
        if len(sig) != SIGNATURE_SIZE:
            raise SignerError("signer-bad-answer")
        return sig

    async def sign_link(self, stmt: bytes) -> bytes:
        """The signature of a configuration link statement (``runtime.chain.statement``), asked on a
        connection of its own (the blocking one may be in use by the loop's thread, and this
        call must not block the loop), within ``timeout``. Raises ``SignerError``."""
        self.requests += 1
        try:
            ans = await asyncio.wait_for(self._ask_once(_pack(["sign-link", stmt])), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, msgpack.UnpackException):
            raise SignerError("signer-unavailable") from None
        sig = _answer(ans)
        if len(sig) != SIGNATURE_SIZE:
            raise SignerError("signer-bad-answer")
        return sig

    async def _ask_once(self, data: bytes):
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            writer.write(data)
            await writer.drain()
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            if size > ANSWER_BYTES_MAX:
                raise OSError("oversized answer")
            return msgpack.unpackb(await reader.readexactly(size), raw=False)
        finally:
            writer.close()

    def open_sealed(self, sealed: bytes) -> bytes:
        try:
            return self._call("open", sealed)
        except SignerError as e:
            if e.reason == "signer-open-undecryptable":  # counted as without a signer
                raise nacl.exceptions.CryptoError("undecryptable") from None
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _answer(ans) -> bytes:
    """The bytes of a signer's answer ``[True, bytes]``; its refusal as a ``SignerError``."""
    if not isinstance(ans, list) or len(ans) != 2:
        raise SignerError("signer-bad-answer")
    ok, val = ans
    if ok is not True:
        raise SignerError(f"signer-{val}" if isinstance(val, str) and len(val) <= 32 else "signer-refused")
    if not isinstance(val, bytes):
        raise SignerError("signer-bad-answer")
    return val


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise OSError("signer closed the connection")
        out += chunk
    return bytes(out)
