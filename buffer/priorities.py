"""Priority functions: a group's sampling priority, computed once when the hub inserts it.

Contract (built-in and custom alike): `fn(group, version) -> float`, where `group` is an
`async_rl.types.Group` (or its wire dict) and `version` is the hub's policy version at insert time.
The hub keeps groups packed (`PackedGroup`); the built-ins read its precomputed fields, and a custom
function is handed the decoded Group, so it never sees the difference.
`compute` checks the result: a priority is always a finite float >= 0, or the call raises naming the
function and the group, so a bad plug-in fails loudly on its first group instead of poisoning the sum tree.

The learner may later replace a priority by key (e.g. by |advantage| after training on it); these
functions only give the starting value.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from async_rl.plugins import load_function
from async_rl.types import Group, PackedGroup

PriorityFn = Callable[[object, int], float]


def _trajectories(group) -> list:
    return group.trajectories if isinstance(group, Group) else group["trajectories"]


def _get(traj, name: str):
    return traj[name] if isinstance(traj, dict) else getattr(traj, name)


def _behavior_version(group) -> int:
    if isinstance(group, (Group, PackedGroup)):
        return group.behavior_version
    return min(int(np.min(t["token_versions"])) for t in group["trajectories"])


def reward_variance(group, version: int) -> float:
    """Population variance of the rewards within the group. Under GRPO a group whose samples all got the
    same reward has zero advantage everywhere and teaches nothing, so it gets priority 0."""
    rewards = np.array(group.rewards if isinstance(group, PackedGroup) else
                       [float(_get(t, "reward")) for t in _trajectories(group)], dtype=np.float64)
    return float(rewards.var()) if len(rewards) else 0.0


def freshness(group, version: int) -> float:
    """1 / (1 + staleness at insert): a group that arrives already k versions behind gets 1 / (1 + k).

    Evaluated once at insert (priorities are not re-derived as the version advances), so it ranks groups
    by how stale they already were on arrival; the staleness gate still evicts them at the bound."""
    return 1.0 / (1.0 + max(0, int(version) - _behavior_version(group)))


def response_length(group, version: int) -> float:
    """Mean response length in tokens over the group's trajectories."""
    lengths = (group.response_lengths if isinstance(group, PackedGroup) else
               [len(_get(t, "response_ids")) for t in _trajectories(group)])
    return float(np.mean(lengths)) if lengths else 0.0


def constant(group, version: int) -> float:
    """Every group alike (prioritized sampling then equals uniform)."""
    return 1.0


BUILTIN: dict[str, PriorityFn] = {"reward_variance": reward_variance, "freshness": freshness,
                                  "response_length": response_length, "constant": constant}


_PACKED_AWARE = frozenset(BUILTIN.values())


def resolve(name: str, field: str = "buffer.priority_fn") -> PriorityFn:
    """A built-in by name, or a custom `fn(group, version) -> float` by dotted path (`mypkg.prio.fn`)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if "." not in name:
        raise ValueError(f"{field}={name!r}: not a built-in priority ({', '.join(sorted(BUILTIN))}) "
                         f"and not a dotted path like mypkg.priorities.score")
    return load_function(name, field, num_params=2)


def compute(fn: PriorityFn, group, version: int) -> float:
    """`fn(group, version)` checked to be a finite float >= 0."""
    if fn is constant:
        return 1.0
    if isinstance(group, PackedGroup) and fn not in _PACKED_AWARE:
        group = group.to_group()  # a custom function gets the Group its contract promises
    value = fn(group, version)
    try:
        priority = float(value)
    except (TypeError, ValueError):
        priority = math.nan
    if not (priority >= 0 and math.isfinite(priority)):
        key = group.key if isinstance(group, (Group, PackedGroup)) else (group.get("generator_id"), group.get("seq"))
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"priority function {name} returned {value!r} for group {key}; "
                         f"it must return a finite float >= 0")
    return priority
