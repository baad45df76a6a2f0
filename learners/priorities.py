"""What the learner tells the hub about the groups it just trained: their new priorities (buffer.priority_update).

The hub only stores the numbers (by group key, `PRIORITY`); what a priority means for learning lives here.
Invariant: every value sent is a finite float >= 0, one per trained group, in the order of the batch.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from async_rl.plugins import load_function


def abs_advantage(group, advantages: list) -> float:
    """Mean |advantage| over every trained response token of the group (token-weighted across its
    trajectories); 0 when none was trained. Under GRPO a group whose rewards all agree gets 0."""
    tokens = np.concatenate(advantages) if advantages else np.zeros(0)
    return float(np.abs(tokens).mean()) if tokens.size else 0.0


@functools.lru_cache(maxsize=8)
def priority_update_fn(name: str) -> Callable | None:
    """buffer.priority_update: None for `none`, the built-in `abs_advantage`, or fn(group, advantages) by
    dotted path."""
    if name == "none":
        return None
    if name == "abs_advantage":
        return abs_advantage
    return load_function(name, "buffer.priority_update", num_params=2)


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def group_priorities(name: str, groups: list, advantages, mask) -> list[list]:
    """[[generator_id, seq, priority], ...] for the groups just trained, by buffer.priority_update `name`.
    `advantages` and `mask` ([rows, T], tensors or arrays) hold the groups' trajectories as rows, group by
    group in order (learners.batch.build_batch's layout); each trajectory's advantages are taken where its
    mask is set (its trained response tokens) and handed to `fn(group, advantages)` as a list of arrays."""
    fn = priority_update_fn(name)
    if fn is None:
        return []
    adv, trained = _numpy(advantages), _numpy(mask) > 0
    rows = sum(len(g.trajectories) for g in groups)
    if rows != len(adv) or adv.shape != trained.shape:
        raise ValueError(f"group_priorities: {rows} trajectories in the groups, advantages {tuple(adv.shape)}, "
                         f"mask {tuple(trained.shape)}; need one row per trajectory")
    out, row = [], 0
    for group in groups:
        n = len(group.trajectories)
        value = fn(group, [adv[row + i][trained[row + i]] for i in range(n)])
        row += n
        try:
            priority = float(value)
        except (TypeError, ValueError):
            priority = math.nan
        if not (priority >= 0 and math.isfinite(priority)):
            raise ValueError(f"buffer.priority_update={name!r} returned {value!r} for group "
                             f"{(group.generator_id, group.seq)}; it must return a finite float >= 0")
        out.append([group.generator_id, int(group.seq), priority])
    return out
