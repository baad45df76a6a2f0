"""Rules of the algo section (advantages, policy loss, KL, off-policy correction), and `kl_reward_shaping`,
the one statement of when kl_coef shapes rewards (the learner reads it too). `_group_baseline_rule` is about the
estimator's need for groups of several samples (its error names rollout.n_samples_per_prompt).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least, dotted_path

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    a = cfg.algo
    for name in ("eps_clip", "eps_clip_high", "tis_clip_low", "kl_coef", "kl_loss_coef", "value_clip",
                 "critic_lr", "num_critic_only_steps"):
        at_least("algo", a, name, 0)
    for name in ("gamma", "lambd"):
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"algo.{name}={getattr(a, name)}: must be in [0, 1]")
    if a.eps_clip_c != 0 and a.eps_clip_c <= 1:
        raise ConfigError(f"algo.eps_clip_c={a.eps_clip_c}: dual-clip bound must be > 1 (e.g. 3.0), or 0 to disable")
    if a.tis_clip <= a.tis_clip_low:
        raise ConfigError(f"algo.tis_clip={a.tis_clip}: must be > tis_clip_low={a.tis_clip_low}")
    _algo_kl_rules(a)
    _algo_plugin_rules(a)
    _group_baseline_rule(cfg)


# Estimators whose baseline is the group's mean reward: one sample per prompt leaves nothing to compare.
GROUP_BASELINE_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")


def kl_reward_shaping(a) -> bool:
    """Whether kl_coef shapes rewards: not under grpo/gspo (as in slime) unless grpo_kl_reward_shaping."""
    return a.kl_coef != 0 and (a.advantage_estimator not in ("grpo", "gspo") or a.grpo_kl_reward_shaping)


def _group_baseline_rule(cfg: "Config") -> None:
    a, n = cfg.algo, cfg.rollout.n_samples_per_prompt
    if (n == 1 and a.loss_type == "policy_loss" and a.advantage_estimator in GROUP_BASELINE_ESTIMATORS
            and not a.disable_rewards_normalization):
        raise ConfigError(f"rollout.n_samples_per_prompt=1: advantage_estimator={a.advantage_estimator} subtracts the "
                         f"group's mean reward, so a group of one gets advantage 0 and trains on nothing; set "
                         f"n_samples_per_prompt >= 2 (slime's examples use 8-16), or use reinforce_plus_plus or ppo")


def _algo_kl_rules(a) -> None:
    if kl_reward_shaping(a) and a.kl_loss_coef != 0:
        raise ConfigError(f"algo.kl_coef={a.kl_coef} and algo.kl_loss_coef={a.kl_loss_coef}: use one KL penalty, "
                         f"reward shaping (kl_coef) or the KL loss (use_kl_loss + kl_loss_coef); set the other to 0")
    if a.kl_loss_coef != 0 and not a.use_kl_loss:
        raise ConfigError(f"algo.kl_loss_coef={a.kl_loss_coef}: only used with use_kl_loss=true; set it, or "
                         f"kl_loss_coef=0")


def _algo_plugin_rules(a) -> None:
    dotted_path("algo", a, "rollout_data_postprocess_path")
    if a.loss_type == "custom_loss" and not a.custom_loss_function_path:
        raise ConfigError("algo.loss_type='custom_loss': needs custom_loss_function_path=module.fn "
                         "(fn(logp, batch, algo) -> (loss, metrics))")
    if a.custom_loss_function_path and a.loss_type != "custom_loss":
        raise ConfigError(f"algo.custom_loss_function_path={a.custom_loss_function_path!r}: only used with "
                         f"loss_type=custom_loss; set it, or clear the path")
    if a.custom_tis_function_path and not a.use_tis:
        raise ConfigError(f"algo.custom_tis_function_path={a.custom_tis_function_path!r}: only used with use_tis=true; "
                         f"set it, or clear the path")
    needs_advantages = a.loss_type == "policy_loss" or a.advantage_estimator == "ppo"
    if a.disable_compute_advantages_and_returns and needs_advantages:
        raise ConfigError("algo.disable_compute_advantages_and_returns=True: policy_loss and the ppo critic need "
                         "advantages and returns; use it only with loss_type sft_loss or custom_loss, not with ppo")
    if a.num_critic_only_steps and a.advantage_estimator != "ppo":
        raise ConfigError(f"algo.num_critic_only_steps={a.num_critic_only_steps}: only ppo has a critic; set "
                         f"advantage_estimator=ppo or num_critic_only_steps=0")
