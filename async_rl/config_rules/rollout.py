"""Rules of the rollout section (generation, engines, batch arithmetic, rewards); `validate` runs first in
`finalize` because it fills derived fields other sections read: rollout.global_batch_size,
rollout.micro_batch_size and data.rollout_max_prompt_len (from rollout_max_context_len).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least, dotted_path, torch_device_problem

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    """rollout: sizes, sampling, batch arithmetic (derives global_batch_size, micro_batch_size), engines,
    context length (derives data.rollout_max_prompt_len), rewards and sampling filters."""
    r = cfg.rollout
    for name in ("rollout_batch_size", "n_samples_per_prompt", "num_steps_per_rollout",
                 "rollout_max_response_len", "update_weights_interval", "groups_per_engine_call"):
        at_least("rollout", r, name, 1)
    for name in ("num_rollout", "num_epoch"):
        at_least("rollout", r, name, 0)
    if r.num_rollout == 0 and r.num_epoch == 0:
        raise ConfigError("rollout.num_rollout=0 and rollout.num_epoch=0: the run has no length; set num_rollout "
                         "(learner steps) or num_epoch (passes over the prompt data)")
    for name in ("global_batch_size", "micro_batch_size"):
        at_least("rollout", r, name, 0)
    at_least("rollout", r, "rollout_temperature", 0)
    if not 0 < r.rollout_top_p <= 1:
        raise ConfigError(f"rollout.rollout_top_p={r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_top_k == 0 or r.rollout_top_k < -1:
        raise ConfigError(f"rollout.rollout_top_k={r.rollout_top_k}: must be -1 (off) or >= 1")
    _batch_sizes(r)
    _engine_rules(r)
    _context_rules(r, cfg.data)
    _reward_rules(cfg)


def _batch_sizes(r) -> None:
    samples = r.rollout_batch_size * r.n_samples_per_prompt
    if r.global_batch_size == 0:
        if samples % r.num_steps_per_rollout:
            raise ConfigError(
                f"rollout.num_steps_per_rollout={r.num_steps_per_rollout}: must divide rollout_batch_size * "
                f"n_samples_per_prompt = {samples}; pick a divisor or set global_batch_size")
        r.global_batch_size = samples // r.num_steps_per_rollout
    if r.rollout_batch_size * r.n_samples_per_prompt != r.global_batch_size * r.num_steps_per_rollout:
        raise ConfigError(
            f"rollout.global_batch_size={r.global_batch_size}: rollout_batch_size * n_samples_per_prompt "
            f"({r.rollout_batch_size} * {r.n_samples_per_prompt} = {samples}) must equal global_batch_size * "
            f"num_steps_per_rollout ({r.global_batch_size} * {r.num_steps_per_rollout}); set "
            f"global_batch_size={samples // r.num_steps_per_rollout if samples % r.num_steps_per_rollout == 0 else '?'} "
            f"or leave it 0 to derive it")
    if r.micro_batch_size == 0:
        r.micro_batch_size = r.global_batch_size
    if r.global_batch_size % r.micro_batch_size:
        raise ConfigError(f"rollout.micro_batch_size={r.micro_batch_size}: must divide global_batch_size="
                         f"{r.global_batch_size}")


def _context_rules(r, d) -> None:
    """rollout_max_context_len bounds prompt + response: prompts must leave room for one response token."""
    at_least("rollout", r, "rollout_max_context_len", 0)
    if not r.rollout_max_context_len:
        return
    if r.rollout_max_context_len < 2:
        raise ConfigError(f"rollout.rollout_max_context_len={r.rollout_max_context_len}: must be >= 2 (a prompt token and "
                         f"a response token), or 0 for no limit")
    if not d.rollout_max_prompt_len:  # slime's default: the longest prompt that leaves one token to generate
        d.rollout_max_prompt_len = r.rollout_max_context_len - 1
    elif d.rollout_max_prompt_len > r.rollout_max_context_len - 1:
        raise ConfigError(f"data.rollout_max_prompt_len={d.rollout_max_prompt_len}: must be at most rollout_max_context_len"
                         f" - 1 = {r.rollout_max_context_len - 1} (room for a response token); lower it, or set it to 0 to "
                         f"take that default")


def _engine_rules(r) -> None:
    at_least("rollout", r, "engine_max_batch_size", 1)
    if torch_device_problem(r.engine_device):
        raise ConfigError(f"rollout.engine_device={r.engine_device!r}: {torch_device_problem(r.engine_device)}")
    for name in ("rollout_num_gpus", "rollout_health_check_first_wait"):
        at_least("rollout", r, name, 0)
    for name in ("rollout_num_gpus_per_engine", "sglang_server_concurrency", "update_weight_buffer_size"):
        at_least("rollout", r, name, 1)
    for name in ("weight_poll_interval", "rollout_health_check_interval", "rollout_health_check_timeout"):
        if getattr(r, name) <= 0:
            raise ConfigError(f"rollout.{name}={getattr(r, name)}: must be > 0 seconds")
    if r.rollout_num_gpus % r.rollout_num_gpus_per_engine:
        raise ConfigError(f"rollout.rollout_num_gpus={r.rollout_num_gpus}: must be a multiple of "
                         f"rollout_num_gpus_per_engine={r.rollout_num_gpus_per_engine} (GPUs per SGLang server)")
    if r.sglang_server_args and r.rollout_engine != "sglang":
        raise ConfigError(f"rollout.sglang_server_args={r.sglang_server_args}: only used with rollout_engine=sglang; "
                         f"set it, or clear the list")
    _sglang_args(r)
    if not all(isinstance(s, str) and s for s in r.rollout_stop):
        raise ConfigError(f"rollout.rollout_stop={r.rollout_stop}: must be non-empty strings, e.g. [\"</answer>\"]")
    for addr in r.rollout_external_engine_addrs:
        if not re.fullmatch(r"(https?://)?[\w.\-\[\]:]+:\d+/?", str(addr)):
            raise ConfigError(f"rollout.rollout_external_engine_addrs: {addr!r} is not host:port (or http://host:port)")
    for name in ("custom_generate_function_path", "rollout_function_path"):
        dotted_path("rollout", r, name)
    if r.custom_generate_function_path and r.rollout_function_path:
        raise ConfigError("rollout.custom_generate_function_path and rollout.rollout_function_path: set one; the rollout "
                         "function replaces the whole rollout, including per-sample generation")


# SGLang options the launcher sets itself, and the field each comes from (actors/engine/sglang.py uses it too)
SGLANG_OWNED_OPTIONS = {"--model-path": "ckpt.hf_checkpoint", "--host": "cluster.host", "--port": "(picked free)",
                        "--tp-size": "rollout.rollout_num_gpus_per_engine",
                        "--tp": "rollout.rollout_num_gpus_per_engine",
                        "--weight-version": "(the version of ckpt.hf_checkpoint: 0)"}


def _sglang_args(r) -> None:
    import shlex
    for entry in r.sglang_server_args:
        for word in shlex.split(str(entry)):
            if word.split("=", 1)[0] in SGLANG_OWNED_OPTIONS:
                raise ConfigError(f"rollout.sglang_server_args sets {word.split('=', 1)[0]}: the launcher sets it (model "
                                 f"path from ckpt.hf_checkpoint, host from cluster.host, tp size from "
                                 f"rollout_num_gpus_per_engine); remove it from sglang_server_args")


_REWARD_PLUGIN_FIELDS = ("custom_rm_path", "custom_reward_post_process_path", "dynamic_sampling_filter_path")


def _reward_rules(cfg: "Config") -> None:
    """Rewards and sampling filters; plug-ins are imported (and their signatures checked) by the generator."""
    r = cfg.rollout
    for name in _REWARD_PLUGIN_FIELDS:
        dotted_path("rollout", r, name)
    if r.rm_type == "remote_rm" and not r.custom_rm_path and not r.rm_url.startswith(("http://", "https://")):
        raise ConfigError(f"rollout.rm_url={r.rm_url!r}: rm_type=remote_rm needs the reward server's URL, "
                         f"e.g. rm_url=http://127.0.0.1:8000/score")
    if r.rm_timeout <= 0:
        raise ConfigError(f"rollout.rm_timeout={r.rm_timeout}: must be > 0 seconds")
    at_least("rollout", r, "rm_max_retries", 0)
    at_least("rollout", r, "over_sampling_batch_size", 0)
    if r.group_rm and not r.custom_rm_path:
        raise ConfigError("rollout.group_rm=true: needs rollout.custom_rm_path, a fn(prompt, responses: list[str], "
                         "label) -> list[float]; the built-in rm_types score one response at a time")
    if r.dynamic_sampling_filter_path == "actors.filters.reward_std_positive" and r.n_samples_per_prompt < 2:
        raise ConfigError(f"rollout.dynamic_sampling_filter_path={r.dynamic_sampling_filter_path!r}: with "
                         f"n_samples_per_prompt={r.n_samples_per_prompt} every group has zero reward std and would be "
                         f"dropped; set n_samples_per_prompt >= 2")
