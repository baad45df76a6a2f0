"""train.distributed_timeout_minutes (slime's --distributed-timeout-minutes) reaches every process group the
Megatron learner creates: a collective that a rank never joins fails after it, instead of waiting for the
default (torch: 30 minutes). Two gloo ranks on CPU (tests/learners/megatron/mp_workers.py)."""
from __future__ import annotations

import time

import pytest

import mp_workers  # tests/learners/megatron/mp_workers.py
from async_rl import config as C

LIMIT_MIN = 0.03  # 1.8 s
ABSENT_S = 12.0  # rank 1 stays away this long, then leaves (which would end rank 0's wait anyway)


def _wait_for_an_absent_rank(group_name: str):
    import torch
    import torch.distributed as dist

    from learners.megatron import parallel
    layout = parallel.init(C.load(None, [f"distributed_timeout_minutes={LIMIT_MIN}"]).train)
    if layout.rank == 1:
        time.sleep(ABSENT_S)
        return None
    group = {"default": None, "objects": parallel._OBJECT_GROUP}[group_name]
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as exc:
        return time.monotonic() - t0, str(exc)
    return time.monotonic() - t0, "no error"


@pytest.mark.parametrize("group", ["default", "objects"])
def test_a_collective_with_an_absent_rank_fails_after_the_timeout(group):
    waited, message = mp_workers.run(2, _wait_for_an_absent_rank, group, timeout=120)[0]
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert LIMIT_MIN * 60 * 0.9 <= waited < ABSENT_S - 4, (waited, message)  # the limit, not rank 1 leaving


def test_the_timeout_must_be_positive():
    with pytest.raises(C.ConfigError, match="train.distributed_timeout_minutes=0.0: must be > 0"):
        C.load(None, ["distributed_timeout_minutes=0"])
