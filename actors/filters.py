"""Sampling filters (slime's dynamic sampling): decide, per scored group, whether it is sent to the hub.

Guarantees: a filter is fn(group: async_rl.types.Group) -> bool (True = keep), loaded from
`rollout.dynamic_sampling_filter_path` at generator start-up (a wrong path or signature fails there, naming
the field); its answer must be a bool (numpy bools count), anything else raises `FilterError`, because a
truthy dict or None silently keeping or dropping every group would corrupt a run unnoticed. A dropped group
is never sent; the generator returns its admission credit to the hub (DROP) so no work stalls.
"""
from __future__ import annotations

import math
from typing import Callable

from async_rl.plugins import load_function
from async_rl.types import Group

FIELD = "rollout.dynamic_sampling_filter_path"
# rewards closer than this are "the same" (float noise from post-processing must not keep a flat group)
STD_EPS = 1e-6


class FilterError(RuntimeError):
    """A filter returned something other than a bool."""


def reward_std_positive(group: Group) -> bool:
    """Keep a group only if its rewards differ (std > 1e-6): a flat group has zero GRPO advantage everywhere,
    so it adds cost and no gradient (DAPO's dynamic sampling; slime's check_reward_nonzero_std)."""
    rewards = [t.reward for t in group.trajectories]
    mean = sum(rewards) / len(rewards)
    return math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) > STD_EPS


class GroupFilter:
    """The configured filter; with no path every group is kept."""

    def __init__(self, path: str = ""):
        self.path = path
        self.fn: Callable[[Group], object] | None = load_function(path, FIELD, num_params=1) if path else None

    def keep(self, group: Group) -> bool:
        if self.fn is None:
            return True
        verdict = self.fn(group)
        if type(verdict).__name__ not in ("bool", "bool_"):
            raise FilterError(f"{FIELD}={self.path!r}: returned {verdict!r} ({type(verdict).__name__}); "
                              f"a filter must return True (keep the group) or False (drop it)")
        return bool(verdict)
