"""Rules of the buffer section (the hub), and `max_staleness_problem`, the one validator of
buffer.max_staleness (buffer/staleness.py and the hub's live SET call it too; it lives in async_rl/ because
async_rl/ never imports buffer/).
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least, dotted_path

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    b = cfg.buffer
    if max_staleness_problem(b.max_staleness):
        raise ConfigError(max_staleness_problem(b.max_staleness))
    for name in ("put_timeout", "generator_timeout", "heartbeat_interval"):
        if getattr(b, name) <= 0:
            raise ConfigError(f"buffer.{name}={getattr(b, name)}: must be > 0 seconds")
    for name in ("snapshot_interval", "keep_snapshots"):
        at_least("buffer", b, name, 1)
    at_least("buffer", b, "max_message_bytes", 2**16)
    if b.priority_fn not in ("constant", "reward_variance", "freshness", "response_length") and "." not in b.priority_fn:
        raise ConfigError(f"buffer.priority_fn={b.priority_fn!r}: must be constant, reward_variance, freshness, "
                         f"response_length, or a dotted path like mypkg.priorities.score")
    at_least("buffer", b, "alpha", 0)
    at_least("buffer", b, "capacity", 0)
    at_least("buffer", b, "max_times_sampled", 1)
    if b.priority_update not in ("none", "abs_advantage"):
        if "." not in b.priority_update:
            raise ConfigError(f"buffer.priority_update={b.priority_update!r}: must be none, abs_advantage, or a dotted "
                             f"path like mypkg.priorities.update")
        dotted_path("buffer", b, "priority_update")
    if b.priority_update != "none" and b.max_times_sampled == 1:
        raise ConfigError(f"buffer.priority_update={b.priority_update!r} with buffer.max_times_sampled=1: every group is "
                         f"retired after its one step, so there is nothing to re-prioritize; set max_times_sampled > 1 "
                         f"or priority_update=none")


def max_staleness_problem(value) -> str:
    """'' when `value` is a valid `buffer.max_staleness`, else the error naming field, value and fix. The one
    check of the bound: the config loader, buffer/staleness.py (table and live SET) all call it; it lives
    here because async_rl/ never imports buffer/."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        return (f"buffer.max_staleness={value!r}: must be >= 0 and an integer: the versions generators may run "
                f"ahead of the learner (0 = synchronous on-policy), e.g. max_staleness=2")
    return ""
