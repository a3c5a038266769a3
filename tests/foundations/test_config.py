"""Quorum arithmetic and configuration checks."""

import pytest

from pbft.config import ClusterConfig, ConfigError


@pytest.mark.parametrize("n,f", [(1, 0), (4, 1), (7, 2), (10, 3), (13, 4), (5, 1)])
def test_unit_weights_give_classic_thresholds(n, f):
    cfg = ClusterConfig.create(n, f)
    assert cfg.byzantine_weight == f
    assert cfg.weak_weight == f + 1
    # the smallest Q with 2Q > n + f: 2f+1 when n = 3f+1
    assert cfg.quorum_weight == (n + f) // 2 + 1
    if n == 3 * f + 1:
        assert cfg.quorum_weight == 2 * f + 1
    # any two quorums intersect in more than f replicas; the correct ones form a quorum
    assert 2 * cfg.quorum_weight - n > f
    assert cfg.quorum_weight <= n - f


def test_default_f_is_largest_tolerable():
    assert ClusterConfig.create(4).f == 1
    assert ClusterConfig.create(7).f == 2
    assert ClusterConfig.create(6).f == 1


@pytest.mark.parametrize("n,f", [(3, 1), (6, 2), (9, 3)])
def test_too_few_replicas_refused_with_clear_message(n, f):
    with pytest.raises(ConfigError, match=r"need n >= 3f\+1"):
        ClusterConfig.create(n, f)


def test_weighted_quorums_accept_safe_weights():
    # one heavy, trusted replica: W=6, W_byz (f=1) = 3 -> need 4.5 < Q <= 3: refused
    with pytest.raises(ConfigError, match="weights"):
        ClusterConfig.create(4, 1, weights=(3, 1, 1, 1))
    # five replicas, weights 2,2,1,1,1: W=7, W_byz=2 -> Q in (4.5, 5] -> Q=5
    cfg = ClusterConfig.create(5, 1, weights=(2, 2, 1, 1, 1))
    assert cfg.quorum_weight == 5 and cfg.weak_weight == 3
    # every set of correct replicas (all but the heaviest f) reaches Q
    assert cfg.total_weight - cfg.byzantine_weight >= cfg.quorum_weight


def test_weighted_quorum_that_cannot_be_live_is_refused():
    with pytest.raises(ConfigError, match="weights"):
        ClusterConfig.create(4, 1, weights=(5, 1, 1, 1))


@pytest.mark.parametrize("kw,msg", [
    (dict(weights=(1, 1, 1)), "one weight per replica"),
    (dict(weights=(1, 0, 1, 1)), "positive integer"),
    (dict(checkpoint_interval_seqnos=10, log_window_seqnos=25), "multiple"),
    (dict(checkpoint_interval_seqnos=16, log_window_seqnos=16), "two checkpoint intervals"),
])
def test_bad_settings_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ClusterConfig.create(4, 1, **kw)


def test_injected_bug_names_checked():
    cfg = ClusterConfig.create(4)
    assert cfg.with_bugs(["quorum-2f"]).quorum_weight == 2
    with pytest.raises(ConfigError, match="unknown injected bug"):
        cfg.with_bugs(["no-such-bug"])


@pytest.mark.parametrize("kw,msg", [
    # 16 requests of 64 KiB no longer all fit, but one must: refused only when one cannot
    (dict(request_size_bytes_max=1 << 20, message_size_bytes_max=1 << 20, state_size_bytes_max=1 << 19),
     "request_size_bytes_max"),
    (dict(reply_size_bytes_max=4 << 20), "reply_size_bytes_max"),
    (dict(log_window_seqnos=16384, checkpoint_interval_seqnos=16, message_size_bytes_max=1 << 20,
          state_size_bytes_max=1 << 19), "NewView"),
    (dict(partition_fanout=4096, message_size_bytes_max=1 << 20, state_size_bytes_max=1 << 19), "MetaData"),
    (dict(partition_fanout=16, message_size_bytes_max=24 << 10, state_size_bytes_max=8 << 10,
          request_size_bytes_max=1024, reply_size_bytes_max=1024), "Vouch"),
])
def test_message_bounds_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ClusterConfig.create(4, 1, **kw)


def test_every_bounded_message_fits_with_the_defaults():
    cfg = ClusterConfig.create(4)
    m = cfg.message_size_bytes_max
    assert cfg.request_frame_bytes_max <= cfg.batch_bytes_max < m
    assert cfg.new_view_batch_bytes_max + cfg.new_view_fixed_bytes_max <= m
    # a batch of 16 full-size requests fits in one PrePrepare with the defaults
    assert cfg.batch_requests_max * (cfg.request_frame_bytes_max + 5) + 512 <= cfg.batch_bytes_max


def test_vouch_bound_matches_the_replica():
    from pbft.config import VOUCH_KEYS_PER_MESSAGE
    from pbft.core.requests import VOUCH_BATCH_MAX

    assert VOUCH_KEYS_PER_MESSAGE == VOUCH_BATCH_MAX


def test_replica_slots_move_the_client_ids():
    cfg = ClusterConfig.create(4)
    assert cfg.replica_slots == 4 and cfg.client_base == 4 and cfg.client_ids == range(4, 68)
    wide = ClusterConfig.create(4, replica_slots=7, clients_max=3)
    assert wide.client_ids == range(7, 10) and wide.max_principal == 9
    assert [wide.is_client(p) for p in range(11)] == [False] * 7 + [True] * 3 + [False]
    assert [wide.is_free_replica_slot(p) for p in range(8)] == [False] * 4 + [True] * 3 + [False]
    assert [wide.is_replica(p) for p in range(5)] == [True] * 4 + [False]
    with pytest.raises(ConfigError, match="replica_slots .3. must be at least the 4 replicas"):
        ClusterConfig.create(4, replica_slots=3)
