"""Checks and derivations that need the filesystem: done at launch (`check_paths`), not when a config is
parsed, so a config can be validated anywhere."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from async_rl.config_rules.algo import kl_reward_shaping
from async_rl.config_rules.base import ConfigError
from async_rl.config_rules.eval import eval_datasets

if TYPE_CHECKING:
    from async_rl.config import Config


def check_paths(cfg: "Config") -> None:
    """Checks that need the filesystem (done at launch, not at parse, so configs can be validated anywhere)."""
    if not cfg.ckpt.hf_checkpoint:
        raise ConfigError("ckpt.hf_checkpoint='': required; set it to an HF checkpoint dir "
                         "(for the quickstart: python scripts/build_tiny.py)")
    if not (Path(cfg.ckpt.hf_checkpoint) / "config.json").exists():
        raise ConfigError(f"ckpt.hf_checkpoint={cfg.ckpt.hf_checkpoint!r}: no config.json there; point it at an HF "
                         f"checkpoint dir (for the quickstart: python scripts/build_tiny.py)")
    paths = [("data", "prompt_data", cfg.data.prompt_data)]
    paths += [("eval", f"eval_prompt_data ({name})", path) for name, path in eval_datasets(cfg.eval)]
    for sec, name, value in paths:
        if not Path(value).is_file():
            raise ConfigError(f"{sec}.{name}={value!r}: file not found; point it at a JSONL prompt file")
    resolve_num_rollout(cfg)
    a = cfg.algo
    if a.kl_coef != 0 and not kl_reward_shaping(a):
        print(f"config: algo.kl_coef={a.kl_coef} is ignored under advantage_estimator={a.advantage_estimator}, as "
              f"in slime; for a KL penalty set use_kl_loss=true kl_loss_coef=..., or grpo_kl_reward_shaping=true "
              f"to shape rewards with it", flush=True)


def resolve_num_rollout(cfg: "Config") -> None:
    """num_rollout=0: num_epoch passes over the prompt data (slime's rule: epochs * prompts // batch)."""
    r = cfg.rollout
    if r.num_rollout:
        return
    from async_rl.data import load_prompt_data
    n = len(load_prompt_data(cfg.data, cfg.ckpt.hf_checkpoint))
    r.num_rollout = r.num_epoch * n // r.rollout_batch_size
    if r.num_rollout == 0:
        raise ConfigError(f"rollout.num_epoch={r.num_epoch}: {r.num_epoch} pass(es) over {n} prompts is less than one "
                         f"learner step of rollout_batch_size={r.rollout_batch_size} prompts; raise num_epoch or set "
                         f"num_rollout")
    print(f"config: num_rollout=0, so the run is num_epoch={r.num_epoch} x {n} prompts // rollout_batch_size="
          f"{r.rollout_batch_size} = {r.num_rollout} learner steps", flush=True)
