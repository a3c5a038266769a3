"""Why a replica dropped an input: the closed set of reasons (``Drop``), and what it counts that
is not a drop (``Count``).

Owns: the names. Every frame, message or request a replica does not take in is counted in
``Replica.drops`` under exactly one ``Drop`` (a ``StrEnum``: its values are the strings metrics
labels, logs and tests have always used, so ``drops["bad-mac"]`` still reads it). A decode failure
is counted under the codec's own reason (``DecodeError.reason``). Successes are never drops: they
are ``Count`` entries in ``Replica.counts`` (or events). Nothing branches on a reason's spelling:
groups of reasons are the sets below.
"""

from __future__ import annotations

from enum import StrEnum


class Drop(StrEnum):
    # frames
    BAD_MAC = "bad-mac"
    FROM_SELF = "from-self"
    UNEXPECTED_TYPE = "unexpected-type"
    SPOOFED_CLIENT = "spoofed-client"
    VOUCH_RELAYED = "vouch-relayed"
    VOUCH_OVER_BUDGET = "vouch-over-budget"
    STATUS_RELAYED = "status-relayed"
    STATUS_OVER_BUDGET = "status-over-budget"
    QUERY_STABLE_RELAYED = "query-stable-relayed"
    QUERY_STABLE_OVER_BUDGET = "query-stable-over-budget"
    # requests and vouches
    KNOWN_REQUESTS_FULL = "known-requests-full"
    REPLY_RESEND_RATE_LIMITED = "reply-resend-rate-limited"
    REQUEST_DUPLICATE = "request-duplicate"
    REQUEST_FUTURE_TIMESTAMP = "request-future-timestamp"
    REQUEST_LATE_COPY = "request-late-copy"
    REQUEST_OLD_TIMESTAMP = "request-old-timestamp"
    REQUEST_RETRANSMITTED = "request-retransmitted"
    REQUEST_SUPERSEDED = "request-superseded"
    REQUEST_TIMESTAMP_REUSED = "request-timestamp-reused"
    REQUEST_TOO_LARGE_FOR_BATCH = "request-too-large-for-batch"
    REQUEST_UNVERIFIED = "request-unverified"
    REQUEST_UNVERIFIED_OLD = "request-unverified-old"
    RO_QUEUE_FULL = "ro-queue-full"
    # a read-only request while our state is not known good (unverified after a reboot or a damaged
    # store, or a state transfer or repair under way): it is refused, never answered from that state
    READ_ONLY_STATE_UNVERIFIED = "read-only-state-unverified"
    VOUCH_DUPLICATE = "vouch-duplicate"
    VOUCH_UNKNOWN_DROPPED = "vouch-unknown-dropped"
    # agreement
    IN_VIEW_CHANGE = "in-view-change"
    WRONG_VIEW = "wrong-view"
    OUT_OF_WINDOW = "out-of-window"
    # beyond the switch point of a membership change our state records (``core.membership``): the
    # old membership orders nothing after it
    BEYOND_SWITCH_POINT = "beyond-switch-point"
    RECOVERING = "recovering"
    BATCH_DIGEST_MISMATCH = "batch-digest-mismatch"
    BATCH_DUPLICATE_CLIENT = "batch-duplicate-client"
    BATCH_MALFORMED = "batch-malformed"
    BATCH_NONDET_REJECTED = "batch-nondet-rejected"
    BATCH_NOT_REQUEST = "batch-not-request"
    BATCH_READ_ONLY_REQUEST = "batch-read-only-request"
    BATCH_REQUEST_FUTURE_TIMESTAMP = "batch-request-future-timestamp"
    BATCH_REQUEST_UNVOUCHED = "batch-request-unvouched"
    COMMIT_DUPLICATE = "commit-duplicate"
    PREPARE_DUPLICATE = "prepare-duplicate"
    PREPARE_FROM_PRIMARY = "prepare-from-primary"
    PREPREPARE_CONFLICT = "preprepare-conflict"
    PREPREPARE_CONFLICTS_EXECUTED = "preprepare-conflicts-executed"
    PREPREPARE_DUPLICATE = "preprepare-duplicate"
    PREPREPARE_HELD_DUPLICATE = "preprepare-held-duplicate"
    PREPREPARE_NOT_FROM_PRIMARY = "preprepare-not-from-primary"
    PREPREPARE_WITHOUT_BATCH = "preprepare-without-batch"
    PREPREPARE_BODIES_MISSING = "preprepare-bodies-missing"  # held until its requests' frames come
    # checkpoints and state transfer
    CHECKPOINT_OFF_INTERVAL = "checkpoint-off-interval"
    CHECKPOINT_OLD = "checkpoint-old"
    DATA_UNREQUESTED = "data-unrequested"
    DATA_DIGEST_MISMATCH = "data-digest-mismatch"
    META_UNREQUESTED = "meta-unrequested"
    META_BAD_SHAPE = "meta-bad-shape"
    META_DIGEST_MISMATCH = "meta-digest-mismatch"
    FETCH_BAD_NODE = "fetch-bad-node"
    FETCH_BAD_OBJECT = "fetch-bad-object"
    FETCH_BATCH_RATE_LIMITED = "fetch-batch-rate-limited"
    FETCH_BATCH_UNKNOWN = "fetch-batch-unknown"
    FETCH_OBJECT_TOO_LARGE = "fetch-object-too-large"
    FETCH_RATE_LIMITED = "fetch-rate-limited"
    FETCH_UNKNOWN_CHECKPOINT = "fetch-unknown-checkpoint"
    # view changes
    BATCH_DATA_DIGEST_MISMATCH = "batch-data-digest-mismatch"
    BATCH_DATA_INCOMPLETE = "batch-data-incomplete"  # by-digest entries whose bodies we lack
    BATCH_DATA_UNREQUESTED = "batch-data-unrequested"
    NEW_VIEW_BAD_BATCH = "new-view-bad-batch"
    NEW_VIEW_FOR_FUTURE_VIEW = "new-view-for-future-view"
    NEW_VIEW_NOT_FROM_PRIMARY = "new-view-not-from-primary"
    NEW_VIEW_OLD = "new-view-old"
    NEW_VIEW_TOO_FEW_VIEW_CHANGES = "new-view-too-few-view-changes"
    NEW_VIEW_WRONG_DECISION = "new-view-wrong-decision"
    VIEW_CHANGE_ACK_DUPLICATE = "view-change-ack-duplicate"
    VIEW_CHANGE_ACK_OUT_OF_RANGE = "view-change-ack-out-of-range"
    VIEW_CHANGE_ACK_SELF = "view-change-ack-self"
    VIEW_CHANGE_ACK_UNMATCHED_DROPPED = "view-change-ack-unmatched-dropped"
    VIEW_CHANGE_CONFLICT = "view-change-conflict"
    VIEW_CHANGE_DUPLICATE = "view-change-duplicate"
    VIEW_CHANGE_FOR_ACTIVE_VIEW = "view-change-for-active-view"
    VIEW_CHANGE_INVALID = "view-change-invalid"
    VIEW_CHANGE_OLD = "view-change-old"
    VIEW_CHANGE_RATE_LIMITED = "view-change-rate-limited"
    VIEW_CHANGE_TOO_FAR = "view-change-too-far"
    STATUS_RATE_LIMITED = "status-rate-limited"
    # proactive recovery
    QUERY_STABLE_RATE_LIMITED = "query-stable-rate-limited"
    RECOVERY_REQUEST_RATE_LIMITED = "recovery-request-rate-limited"
    REPLY_STABLE_UNEXPECTED = "reply-stable-unexpected"
    REPLY_UNEXPECTED = "reply-unexpected"


class Count(StrEnum):
    """What a replica counts that is not a dropped input (``Replica.counts``)."""

    NEW_VIEW_CERTIFIED_BY_STATUS = "new-view-certified-by-status"  # installed on f+1 Status digests
    NEW_VIEW_WAITING_FOR_BATCHES = "new-view-waiting-for-batches"  # a NewView waits for batch bodies
    # a pre-prepare's large requests did not come from their clients within request_body_wait_ms:
    # its batch was asked for (FetchBatch)
    BODIES_FETCHED = "bodies-fetched"
    SERVICE_EXCEPTION = "service-exception"  # the service raised: the client got the error result
    SERVICE_BAD_RESULT = "service-bad-result"  # the service returned something other than bytes
    SERVICE_RESULT_TOO_LARGE = "service-result-too-large"  # over reply_size_bytes_max
    # our checkpoint disagreed with a certified one: the objects that differ were fetched at once
    STATE_REPAIR = "state-repair"
    # messages from a replica whose recovery request executed here, received before it, marked stale
    STALE_MESSAGES = "stale-messages"


# a pre-prepare whose agreed value looks wrong from here (our clock, or an old pre-prepare relayed
# for catch-up): held until replicas of weight f+1 (the primary, the backups that prepared it)
# vouch for it by their own word (``Log._weakly_prepared``), rather than dropped for good
HOLDABLE = frozenset({Drop.BATCH_NONDET_REJECTED, Drop.BATCH_REQUEST_UNVOUCHED, Drop.BATCH_REQUEST_FUTURE_TIMESTAMP})
# a state-transfer answer that proves its replier faulty or outdated: ask the next replier
REPLIER_FAULTS = frozenset({Drop.META_BAD_SHAPE, Drop.META_DIGEST_MISMATCH, Drop.DATA_DIGEST_MISMATCH})
