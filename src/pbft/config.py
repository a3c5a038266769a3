"""Cluster configuration: membership, weights, quorum thresholds, protocol bounds.

Every number that bounds memory or time is named with its unit last
(``log_window_seqnos``, ``view_change_timeout_ms``).  ``ClusterConfig.validate``
refuses configurations that would break safety or liveness, with a one-line
message naming the problem (``ConfigError``).

Weighted quorums (Castro's weighted-voting extension of PBFT): replica ``i`` has weight ``w_i``; with
``W`` the total weight and ``W_byz`` the largest total weight any ``f``
replicas can have, a quorum threshold ``Q`` is safe iff
``(W + W_byz) / 2 < Q`` and live iff ``Q <= W - W_byz``.  A *weak*
certificate (the classical ``f+1``) needs weight ``> W_byz``: it contains
at least one correct replica.  With unit weights ``Q = 2f+1`` and the weak
threshold is ``f+1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

KNOWN_BUGS = frozenset(
    {
        "quorum-2f",
        "skip-digest-check",
        "drop-prepared-in-view-change",
        "no-timestamp-check",
        "checkpoint-digest-without-seqno",
        "order-beyond-switch-point",
    }
)


# an outer frame's bytes besides header, payload and MACs: array, tag, sender and three bin
# length prefixes, each in msgpack's widest form (a peer may encode non-minimally)
FRAME_OVERHEAD_BYTES = 5 + 9 + 9 + 3 * 5
VOUCH_KEYS_PER_MESSAGE = 1024  # the keys a replica puts in one Vouch (``core.requests.VOUCH_BATCH_MAX``)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    n: int
    f: int
    weights: tuple[int, ...] = ()
    # Principals: replica ids are 0..replica_slots-1, of which 0..n-1 are the members (the ids
    # n..replica_slots-1 are free for a membership change); clients are replica_slots ..
    # replica_slots+clients_max-1. 0 means n (``create`` writes n).
    clients_max: int = 64
    replica_slots: int = 0
    checkpoint_interval_seqnos: int = 16
    log_window_seqnos: int = 32
    batch_requests_max: int = 16
    batches_in_flight_max: int = 4
    request_size_bytes_max: int = 64 * 1024
    reply_size_bytes_max: int = 64 * 1024
    message_size_bytes_max: int = 4 * 1024 * 1024
    state_size_bytes_max: int = 3 * 1024 * 1024  # one object (a whole state in the whole-state form)
    partition_fanout: int = 256  # children per node of the partition tree of digests
    view_change_timeout_ms: float = 400.0
    view_change_timeout_max_ms: float = 20_000.0
    status_interval_ms: float = 80.0
    state_fetch_timeout_ms: float = 150.0
    client_retry_timeout_ms: float = 60.0
    client_retry_timeout_max_ms: float = 2_000.0
    nondet_skew_ms_max: float = 1_000.0
    # how far ahead of a replica's wall clock a request's or a NewKey's timestamp may be (clients
    # use microseconds of their wall clock): one from further ahead is refused, so that nobody can
    # push an identity's timestamps out of its own client's reach
    timestamp_skew_ms_max: float = 600_000.0
    tentative_execution: bool = True
    status_resend_seqnos_max: int = 16
    vouch_delay_ms: float = 2.0  # how long a vouch may wait for company (another message to the replicas)
    pending_requests_max: int = 1024
    # a request whose operation is longer than this is ordered by digest: the primary's PrePrepare
    # carries its frame digest, and each backup uses the copy it got from the client (docs/protocol.md)
    request_inline_op_bytes_max: int = 255
    # how long a backup waits for the client's copy of such a request before asking for the batch
    request_body_wait_ms: float = 10.0
    # Testing only: names from KNOWN_BUGS deliberately break the protocol so the
    # simulator's oracles can prove they would notice.  Never set in production.
    bugs: frozenset[str] = field(default_factory=frozenset)

    # ---- construction -------------------------------------------------------
    @classmethod
    def create(cls, n: int, f: int | None = None, **kw) -> "ClusterConfig":
        """A validated configuration; ``f`` defaults to the largest ``(n-1)//3``."""
        if f is None:
            f = (n - 1) // 3
        cfg = cls(n=n, f=f, **kw)
        if not cfg.replica_slots:
            cfg = replace(cfg, replica_slots=n)
        if not cfg.weights:
            cfg = replace(cfg, weights=(1,) * n)
        cfg.validate()
        return cfg

    def with_bugs(self, bugs: Iterable[str]) -> "ClusterConfig":
        bugs = frozenset(bugs)
        unknown = bugs - KNOWN_BUGS
        if unknown:
            raise ConfigError(f"unknown injected bug(s): {', '.join(sorted(unknown))}")
        return replace(self, bugs=bugs)

    # ---- validation ---------------------------------------------------------
    def validate(self) -> None:
        n, f = self.n, self.f
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"replicas must be a positive integer, got {n!r}")
        if not isinstance(f, int) or f < 0:
            raise ConfigError(f"faults must be a non-negative integer, got {f!r}")
        if len(self.weights) != n:
            raise ConfigError(f"need one weight per replica: {n} replicas, {len(self.weights)} weights")
        if any((not isinstance(w, int)) or w < 1 for w in self.weights):
            raise ConfigError("every replica weight must be a positive integer")
        if all(w == 1 for w in self.weights) and n < 3 * f + 1:
            raise ConfigError(f"{n} replicas cannot tolerate {f} Byzantine faults: need n >= 3f+1 = {3 * f + 1}")
        W, Wb = self.total_weight, self.byzantine_weight
        q = self.quorum_weight
        if not (2 * q > W + Wb):
            raise ConfigError(
                f"weights {list(self.weights)} are unsafe for f={f}: no quorum threshold Q with "
                f"(W+W_byz)/2 < Q <= W-W_byz (W={W}, W_byz={Wb})"
            )
        if q > W - Wb:
            raise ConfigError(
                f"weights {list(self.weights)} cannot be live for f={f}: the {n - f} lightest-after-faults "
                f"replicas weigh {W - Wb}, less than the safe quorum threshold {q} (W={W}, W_byz={Wb})"
            )
        if self.checkpoint_interval_seqnos < 1:
            raise ConfigError("checkpoint interval must be at least 1")
        if self.log_window_seqnos % self.checkpoint_interval_seqnos != 0:
            raise ConfigError(
                f"log window ({self.log_window_seqnos}) must be a multiple of the checkpoint interval "
                f"({self.checkpoint_interval_seqnos})"
            )
        if self.log_window_seqnos < 2 * self.checkpoint_interval_seqnos:
            raise ConfigError("log window must hold at least two checkpoint intervals")
        if self.message_size_bytes_max < self.state_size_bytes_max + 512:
            raise ConfigError(
                f"state_size_bytes_max ({self.state_size_bytes_max}) must be at least 512 bytes below "
                f"message_size_bytes_max ({self.message_size_bytes_max}): an object travels in one message")
        if not 2 <= self.partition_fanout <= 4096:
            raise ConfigError(f"partition_fanout ({self.partition_fanout}) must be between 2 and 4096")
        self._validate_message_bounds()
        if self.batch_requests_max < 1 or self.batches_in_flight_max < 1:
            raise ConfigError("batch size and batches in flight must be at least 1")
        if self.clients_max < 0:
            raise ConfigError("clients_max must be >= 0")
        if not isinstance(self.replica_slots, int) or self.replica_slots < 0:
            raise ConfigError(f"replica_slots must be a non-negative integer, got {self.replica_slots!r}")
        if self.replica_slots and self.replica_slots < n:
            raise ConfigError(f"replica_slots ({self.replica_slots}) must be at least the {n} replicas")
        if self.view_change_timeout_ms <= 0 or self.client_retry_timeout_ms <= 0:
            raise ConfigError("timeouts must be positive")
        if self.request_inline_op_bytes_max < 0 or not self.request_body_wait_ms >= 0:
            raise ConfigError("request_inline_op_bytes_max and request_body_wait_ms must not be negative")
        if not self.timestamp_skew_ms_max > 0:
            raise ConfigError("timestamp_skew_ms_max must be positive")
        unknown = self.bugs - KNOWN_BUGS
        if unknown:
            raise ConfigError(f"unknown injected bug(s): {', '.join(sorted(unknown))}")

    def _validate_message_bounds(self) -> None:
        """Every message a correct replica builds fits in ``message_size_bytes_max``, whatever the
        load: a single request in a batch (PrePrepare, BatchData), a reply, the fixed part of a
        NewView (its batch bodies are capped by ``new_view_batch_bytes_max``), a ViewChange with a
        full window, a partition-tree node's children (MetaData)."""
        m = self.message_size_bytes_max
        if self.request_size_bytes_max < 1 or self.reply_size_bytes_max < 1:
            raise ConfigError("request and reply size limits must be positive")
        if self.request_frame_bytes_max > self.batch_bytes_max:
            raise ConfigError(
                f"request_size_bytes_max ({self.request_size_bytes_max}) is too large for "
                f"message_size_bytes_max ({m}): a request, its authenticator and the batch around it "
                f"need {self.request_frame_bytes_max + (m - self.batch_bytes_max)} bytes")
        if self.reply_size_bytes_max + FRAME_OVERHEAD_BYTES + 128 > m:
            raise ConfigError(f"reply_size_bytes_max ({self.reply_size_bytes_max}) must be at least "
                              f"{FRAME_OVERHEAD_BYTES + 128} bytes below message_size_bytes_max ({m})")
        if self.new_view_fixed_bytes_max > m - self.new_view_batch_bytes_max:
            raise ConfigError(
                f"message_size_bytes_max ({m}) is too small for a NewView of {self.n} replicas and a "
                f"log window of {self.log_window_seqnos}: it needs {2 * self.new_view_fixed_bytes_max}")
        W = self.log_window_seqnos
        view_change = FRAME_OVERHEAD_BYTES + 16 * self.client_base + 64 + (W + 2) * 48 + 5 * W * 56
        meta_data = FRAME_OVERHEAD_BYTES + 16 + 64 + self.partition_fanout * 264
        vouch = FRAME_OVERHEAD_BYTES + 16 * self.client_base + 16 + VOUCH_KEYS_PER_MESSAGE * 35
        if max(view_change, meta_data, vouch) > m:
            raise ConfigError(
                f"message_size_bytes_max ({m}) is too small: a ViewChange of a full log window needs "
                f"{view_change} bytes, a partition-tree node (MetaData) {meta_data}, a full Vouch {vouch}")

    # ---- derived quantities -------------------------------------------------
    @property
    def request_frame_bytes_max(self) -> int:
        """Largest request frame: the operation, its header and an authenticator (one MAC per
        replica slot), with msgpack's widest encodings."""
        return self.request_size_bytes_max + FRAME_OVERHEAD_BYTES + 64 + 16 * self.client_base

    @property
    def batch_bytes_max(self) -> int:
        """Largest encoded batch (``Batch``: requests + agreed value) a primary proposes, so that
        its PrePrepare (and a BatchData carrying it) fits in one message."""
        return self.message_size_bytes_max - FRAME_OVERHEAD_BYTES - 128 - 16 * self.client_base - 512

    @property
    def new_view_batch_bytes_max(self) -> int:
        """Budget for the batch bodies a NewView carries (the rest travel by FetchBatch/BatchData)."""
        return self.message_size_bytes_max // 2

    @property
    def new_view_fixed_bytes_max(self) -> int:
        """A NewView without batch bodies: view changes (n entries), chosen (a window), MACs."""
        return FRAME_OVERHEAD_BYTES + 128 + self.n * (48 + 16) + self.log_window_seqnos * 48

    @property
    def total_weight(self) -> int:
        return sum(self.weights)

    @property
    def byzantine_weight(self) -> int:
        """The largest weight that any f replicas together can have."""
        return sum(sorted(self.weights, reverse=True)[: self.f])

    @property
    def quorum_weight(self) -> int:
        """Smallest Q with 2Q > W + W_byz (the 2f+1 rule for unit weights)."""
        q = (self.total_weight + self.byzantine_weight) // 2 + 1
        if "quorum-2f" in self.bugs:
            q -= 1  # injected bug: certificates of 2f
        return q

    @property
    def weak_weight(self) -> int:
        """Smallest weight that surely includes a correct replica (f+1 for unit weights)."""
        return self.byzantine_weight + 1

    def weight_of(self, replicas: Iterable[int]) -> int:
        w = self.weights
        return sum(w[r] for r in replicas)

    def primary(self, view: int) -> int:
        return view % self.n

    def is_replica(self, pid: int) -> bool:
        return 0 <= pid < self.n

    @property
    def client_base(self) -> int:
        """The first client id: ``replica_slots`` (n if unset). It does not move when n changes."""
        return self.replica_slots or self.n

    @property
    def max_principal(self) -> int:
        """The highest principal id (the last client id)."""
        return self.client_base + self.clients_max - 1

    def is_free_replica_slot(self, pid: int) -> bool:
        """A replica id that is not a member now (n <= pid < replica_slots): its frames are dropped."""
        return self.n <= pid < self.client_base

    def is_client(self, pid: int) -> bool:
        return self.client_base <= pid <= self.max_principal

    @property
    def client_ids(self) -> range:
        return range(self.client_base, self.max_principal + 1)
