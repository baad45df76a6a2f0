"""Derived values and cross-field validation of a Config; each error names the field, the value and the fix."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_rl.config import Config


def _err(msg: str):
    from async_rl.config import ConfigError
    return ConfigError(msg)


def _at_least(sec: str, obj, name: str, low: float) -> None:
    value = getattr(obj, name)
    if value < low:
        raise _err(f"{sec}.{name}={value}: must be >= {low}")


def _one_of(sec: str, obj, name: str, allowed: tuple, later: dict | None = None) -> None:
    value = getattr(obj, name)
    if value in allowed:
        return
    if later and value in later:
        raise _err(f"{sec}.{name}={value!r}: not available yet ({later[value]}); use one of {list(allowed)}")
    raise _err(f"{sec}.{name}={value!r}: must be one of {list(allowed)}")


def _batch_sizes(r) -> None:
    samples = r.rollout_batch_size * r.n_samples_per_prompt
    if r.global_batch_size == 0:
        if samples % r.num_steps_per_rollout:
            raise _err(
                f"rollout.num_steps_per_rollout={r.num_steps_per_rollout}: must divide rollout_batch_size * "
                f"n_samples_per_prompt = {samples}; pick a divisor or set global_batch_size")
        r.global_batch_size = samples // r.num_steps_per_rollout
    if r.rollout_batch_size * r.n_samples_per_prompt != r.global_batch_size * r.num_steps_per_rollout:
        raise _err(
            f"rollout.global_batch_size={r.global_batch_size}: rollout_batch_size * n_samples_per_prompt "
            f"({r.rollout_batch_size} * {r.n_samples_per_prompt} = {samples}) must equal global_batch_size * "
            f"num_steps_per_rollout ({r.global_batch_size} * {r.num_steps_per_rollout}); set "
            f"global_batch_size={samples // r.num_steps_per_rollout if samples % r.num_steps_per_rollout == 0 else '?'} "
            f"or leave it 0 to derive it")
    if r.micro_batch_size == 0:
        r.micro_batch_size = r.global_batch_size
    if r.global_batch_size % r.micro_batch_size:
        raise _err(f"rollout.micro_batch_size={r.micro_batch_size}: must divide global_batch_size="
                   f"{r.global_batch_size}")


def finalize(cfg: "Config") -> "Config":
    """Fill derived fields (global_batch_size, micro_batch_size) and validate every rule; returns cfg."""
    _rollout_rules(cfg)
    _reward_rules(cfg)
    _cluster_rules(cfg)
    _algo_rules(cfg)
    _optimizer_rules(cfg)
    _buffer_rules(cfg)
    _misc_rules(cfg)
    return cfg


def _rollout_rules(cfg: "Config") -> None:
    r = cfg.rollout
    for name in ("rollout_batch_size", "n_samples_per_prompt", "num_steps_per_rollout", "num_rollout",
                 "rollout_max_response_len", "update_weights_interval", "groups_per_engine_call"):
        _at_least("rollout", r, name, 1)
    for name in ("global_batch_size", "micro_batch_size"):
        _at_least("rollout", r, name, 0)
    _at_least("rollout", r, "rollout_temperature", 0)
    if not 0 < r.rollout_top_p <= 1:
        raise _err(f"rollout.rollout_top_p={r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_top_k == 0 or r.rollout_top_k < -1:
        raise _err(f"rollout.rollout_top_k={r.rollout_top_k}: must be -1 (off) or >= 1")
    _batch_sizes(r)
    _one_of("rollout", r, "rollout_engine", ("embedded",), {"sglang": "arrives with the [engines] issue"})


def _reward_rules(cfg: "Config") -> None:
    _one_of("rollout", cfg.rollout, "rm_type", ("exact_match",))


def _cluster_rules(cfg: "Config") -> None:
    c = cfg.cluster
    for name in ("num_engines", "num_generators", "engine_num_threads", "learner_num_threads"):
        _at_least("cluster", c, name, 1)
    if not 0 <= c.hub_port < 65536:
        raise _err(f"cluster.hub_port={c.hub_port}: must be a TCP port in [0, 65535] (0 = pick a free one)")


def _algo_rules(cfg: "Config") -> None:
    a = cfg.algo
    _one_of("algo", a, "advantage_estimator", ("grpo",),
            {k: "arrives with the [algos] issue" for k in ("gspo", "reinforce_plus_plus",
                                                          "reinforce_plus_plus_baseline", "ppo")})
    _one_of("algo", a, "loss_type", ("policy_loss", "sft_loss"), {"custom_loss": "arrives with [algos]"})
    _at_least("algo", a, "eps_clip", 0)
    _at_least("algo", a, "eps_clip_high", 0)
    _at_least("algo", a, "tis_clip_low", 0)
    if a.tis_clip <= a.tis_clip_low:
        raise _err(f"algo.tis_clip={a.tis_clip}: must be > tis_clip_low={a.tis_clip_low}")


def _optimizer_rules(cfg: "Config") -> None:
    o = cfg.optimizer
    _one_of("optimizer", o, "optimizer", ("adam",))
    if o.lr <= 0:
        raise _err(f"optimizer.lr={o.lr}: must be > 0")
    _at_least("optimizer", o, "clip_grad", 0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise _err(f"optimizer.{name}={getattr(o, name)}: must be in [0, 1)")


def _buffer_rules(cfg: "Config") -> None:
    b = cfg.buffer
    _at_least("buffer", b, "max_staleness", 0)
    if b.put_timeout <= 0:
        raise _err(f"buffer.put_timeout={b.put_timeout}: must be > 0 seconds")


def _misc_rules(cfg: "Config") -> None:
    _one_of("logging", cfg.logging, "wandb_mode", ("offline", "disabled", "online"))
    _one_of("train", cfg.train, "train_backend", ("torch",), {"megatron": "arrives with the [megatron] issue"})
    _at_least("ckpt", cfg.ckpt, "keep_weight_versions", 1)
    _at_least("eval", cfg.eval, "eval_max_prompts", 1)
    _at_least("eval", cfg.eval, "eval_max_response_len", 0)


def check_paths(cfg: "Config") -> None:
    """Checks that need the filesystem (done at launch, not at parse, so configs can be validated anywhere)."""
    from pathlib import Path
    if not cfg.ckpt.hf_checkpoint:
        raise _err("ckpt.hf_checkpoint='': required; set it to an HF checkpoint dir "
                   "(for the quickstart: python scripts/build_tiny.py)")
    if not (Path(cfg.ckpt.hf_checkpoint) / "config.json").exists():
        raise _err(f"ckpt.hf_checkpoint={cfg.ckpt.hf_checkpoint!r}: no config.json there; point it at an HF "
                   f"checkpoint dir (for the quickstart: python scripts/build_tiny.py)")
    for sec, name, value in (("data", "prompt_data", cfg.data.prompt_data),
                             ("eval", "eval_prompt_data", cfg.eval.eval_prompt_data)):
        if (name == "prompt_data" or value) and not Path(value).is_file():
            raise _err(f"{sec}.{name}={value!r}: file not found; point it at a JSONL prompt file")
