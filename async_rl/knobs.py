"""Live knobs: config fields that `async-rl set` may change on a running job, who applies each, and the
check that a change is valid for the run's config (the same rules as at launch).

The hub is the rendezvous: `set` sends the hub its own knobs plus the learner's and the generators'; the
hub logs them (durable) and hands them out with every BATCH / GRANT until each side has applied them.
"""
from __future__ import annotations

import copy

from async_rl import config as config_mod
from async_rl.config_rules import finalize

HUB = {"buffer.max_staleness", "buffer.alpha", "buffer.capacity"}
LEARNER = {"algo.tis_clip", "algo.tis_clip_low", "algo.use_tis", "algo.eps_clip", "algo.eps_clip_high",
           "algo.entropy_coef", "algo.kl_coef", "algo.kl_loss_coef", "optimizer.lr", "optimizer.clip_grad"}
GENERATOR = {"rollout.rollout_temperature", "rollout.rollout_top_p", "rollout.rollout_top_k",
             "rollout.rollout_max_response_len"}


def plan(cfg: config_mod.Config, words: list[str]) -> tuple[config_mod.Config, dict, dict, dict]:
    """Validate `key=value` words against `cfg`; returns (new config, hub knobs, learner, generator knobs)."""
    new = copy.deepcopy(cfg)
    hub, learner, generator = {}, {}, {}
    for word in words:
        sec, name, value = config_mod.parse_override(word)
        dotted = f"{sec}.{name}"
        if dotted not in HUB | LEARNER | GENERATOR:
            raise config_mod.ConfigError(f"{dotted}: not a live knob; live ones are {sorted(HUB | LEARNER | GENERATOR)}"
                                         f" (others: `async-rl stop`, then `launch --resume` with the new value)")
        config_mod.apply(new, sec, name, value)
        target = hub if dotted in HUB else learner if dotted in LEARNER else generator
        target[name if target is hub else dotted] = getattr(getattr(new, sec), name)
    finalize(new)  # the same cross-field rules as at launch (e.g. tis_clip > tis_clip_low)
    return new, hub, learner, generator


def apply(cfg: config_mod.Config, knobs: dict) -> dict:
    """Set dotted-path knobs on `cfg` in place; returns those that changed."""
    changed = {}
    for dotted, value in knobs.items():
        sec, _, name = dotted.partition(".")
        section = getattr(cfg, sec)
        if getattr(section, name) != value:
            setattr(section, name, value)
            changed[dotted] = value
    return changed
