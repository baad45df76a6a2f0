"""Rate limiters: AReaL's admission credits (the hub's numbers), MinSize, Reverb's SampleToInsertRatio."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from buffer.rate_limiter import MinSize, SampleToInsertRatio, StalenessCredits


def hub_rule(max_staleness, version, gpv, needed, accepted, evicted_stale, running) -> int:
    """`Hub.credits_available` as it stood before the move, verbatim."""
    live = accepted - evicted_stale + running
    cap = (max_staleness + version + 1) * gpv - live
    return max(0, min(cap, needed - live))


def test_staleness_credits_match_the_hub_rule():
    credits = StalenessCredits(groups_per_version=4, groups_needed=40)
    for ms, v, acc, ev, run in itertools.product(range(3), range(4), range(0, 41, 5), range(0, 6, 2), range(4)):
        if ev > acc:
            continue
        got = credits.available(version=v, max_staleness=ms, accepted=acc, evicted_stale=ev, running=run)
        assert got == hub_rule(ms, v, 4, 40, acc, ev, run)


def test_staleness_credits_from_rollout_and_knob_changes():
    rollout = SimpleNamespace(rollout_batch_size=2, update_weights_interval=3, num_rollout=10)
    credits = StalenessCredits.from_rollout(rollout)
    assert (credits.groups_per_version, credits.groups_needed) == (6, 20)
    counters = dict(accepted=6, evicted_stale=0, running=0)
    assert credits.available(version=0, max_staleness=0, **counters) == 0  # on-policy: wait for v1
    assert credits.available(version=0, max_staleness=1, **counters) == 6  # a live knob: no state
    assert credits.available(version=5, max_staleness=9, **counters) == 14  # capped by groups still needed
    # groups thrown away at capacity are regenerated, else the learner starves
    assert credits.available(version=0, max_staleness=0, evicted_capacity=2, **counters) == 2
    with pytest.raises(ValueError, match="groups_per_version=0"):
        StalenessCredits(0, 10)


def test_min_size():
    limiter = MinSize(3)
    assert not limiter.can_sample(1, size=2, inserts=2, samples=0)
    assert limiter.can_sample(3, size=3, inserts=3, samples=0)
    assert not limiter.can_sample(4, size=3, inserts=3, samples=0)
    assert limiter.can_insert(size=10**6, inserts=10**6, samples=0)
    with pytest.raises(ValueError, match="min_size=0"):
        MinSize(0)


def test_sample_to_insert_ratio_keeps_the_ratio_within_the_buffer():
    limiter = SampleToInsertRatio(samples_per_insert=2.0, min_size_to_sample=2, error_buffer=2.0)
    inserts = samples = 0
    for _ in range(200):  # greedy: sample whenever allowed, else insert
        if limiter.can_sample(1, size=inserts, inserts=inserts, samples=samples):
            samples += 1
        else:
            assert limiter.can_insert(size=inserts, inserts=inserts, samples=samples)
            inserts += 1
        if inserts > 2:
            assert abs(inserts * 2.0 - samples - 2 * 2.0) <= 2.0 + 2.0
    assert abs(samples / inserts - 2.0) < 0.1
    assert not limiter.can_insert(size=10, inserts=10, samples=10)  # inserts too far ahead
    with pytest.raises(ValueError, match="error_buffer=1"):
        SampleToInsertRatio(samples_per_insert=2.0, error_buffer=1.0)
