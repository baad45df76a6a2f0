"""Rules of the optimizer section (AdamW and the learning-rate schedule). That the schedule fields are
megatron-only is a rule of the torch backend, in train.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    o = cfg.optimizer
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr={o.lr}: must be > 0")
    at_least("optimizer", o, "clip_grad", 0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optimizer.{name}={getattr(o, name)}: must be in [0, 1)")
    at_least("optimizer", o, "lr_warmup_iters", 0)
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optimizer.warmup_ratio={o.warmup_ratio}: must be in [0, 1)")
    if o.lr_warmup_iters and o.warmup_ratio:
        raise ConfigError(f"optimizer.lr_warmup_iters={o.lr_warmup_iters} and warmup_ratio={o.warmup_ratio}: set one "
                         f"of them, the other to 0")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr}: must be in [0, lr={o.lr}]")
    steps = cfg.rollout.num_rollout * cfg.rollout.num_steps_per_rollout
    if steps and o.lr_warmup_iters >= steps:  # steps = 0: num_epoch decides the length at launch
        raise ConfigError(f"optimizer.lr_warmup_iters={o.lr_warmup_iters}: must be < the run's {steps} optimizer steps "
                         f"(num_rollout * num_steps_per_rollout)")
