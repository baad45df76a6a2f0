"""Derived values and cross-field validation of a Config: one module per config section, each with a
`validate(cfg)` that checks that section's rules; every error names the field, the value and the fix.

Where a rule is: in the module of the section it is about (`config_rules/<section>.py`), also when it reads
other sections (train.py holds the limits a learner backend puts on rollout batch sizes; cluster.py the
placement of train and rollout GPUs on nodes). base.py has what they share (ConfigError, field_choices);
paths.py the checks that need the filesystem, done at launch.

Invariants: `finalize` checks every `Literal` choice first, then the sections in a fixed order: rollout first
(it derives rollout.global_batch_size, micro_batch_size and data.rollout_max_prompt_len, which later sections
read), train after rollout, algo and optimizer (its backend rules read them). This package imports nothing of
`async_rl.config` (config imports it; a section's defaults come from `type(section)()`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules import algo, buffer, ckpt, cluster, data, debug, optimizer, rollout, train
from async_rl.config_rules import eval as eval_rules  # (as: `eval` would shadow the builtin here)
from async_rl.config_rules.base import ConfigError, check_choices, field_choices  # noqa: F401  (the package's API)

if TYPE_CHECKING:
    from async_rl.config import Config


def finalize(cfg: "Config") -> "Config":
    """Fill derived fields (global_batch_size, micro_batch_size) and validate every rule; returns cfg."""
    check_choices(cfg)
    rollout.validate(cfg)
    data.validate(cfg)
    cluster.validate(cfg)
    algo.validate(cfg)
    optimizer.validate(cfg)
    buffer.validate(cfg)
    ckpt.validate(cfg)
    eval_rules.validate(cfg)
    train.validate(cfg)
    debug.validate(cfg)
    return cfg
