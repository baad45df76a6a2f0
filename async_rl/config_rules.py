"""Derived values and cross-field validation of a Config; each error names the field, the value and the fix.

This module does not import `async_rl.config` at run time (config imports it): it reads a field's allowed
values off the `Literal[...]` annotation of the section object it is given (`field_choices`).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import re
from typing import TYPE_CHECKING, Literal, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from async_rl.config import Config


class ConfigError(ValueError):
    """A config value a user can fix; the message names the field, the value and the fix."""


def _err(msg: str):
    return ConfigError(msg)


@functools.lru_cache(maxsize=None)
def _hints(section_cls: type) -> dict:
    return get_type_hints(section_cls)


def field_choices(section_cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` config field (None for a free field): the one list of them."""
    typ = _hints(section_cls)[name]
    return get_args(typ) if get_origin(typ) is Literal else None


def _choice_rules(cfg: "Config") -> None:
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            allowed = field_choices(type(obj), f.name)
            if allowed is not None:
                _one_of(sec.name, obj, f.name, allowed)


def _at_least(sec: str, obj, name: str, low: float) -> None:
    value = getattr(obj, name)
    if value < low:
        raise _err(f"{sec}.{name}={value}: must be >= {low}")


def _one_of(sec: str, obj, name: str, allowed: tuple) -> None:
    value = getattr(obj, name)
    if value not in allowed:
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
    _choice_rules(cfg)
    _rollout_rules(cfg)
    _reward_rules(cfg)
    _cluster_rules(cfg)
    _algo_rules(cfg)
    _optimizer_rules(cfg)
    _buffer_rules(cfg)
    _misc_rules(cfg)
    _train_rules(cfg)
    _supervisor_and_debug_rules(cfg)
    return cfg


def _rollout_rules(cfg: "Config") -> None:
    r = cfg.rollout
    for name in ("rollout_batch_size", "n_samples_per_prompt", "num_steps_per_rollout",
                 "rollout_max_response_len", "update_weights_interval", "groups_per_engine_call"):
        _at_least("rollout", r, name, 1)
    for name in ("num_rollout", "num_epoch"):
        _at_least("rollout", r, name, 0)
    if r.num_rollout == 0 and r.num_epoch == 0:
        raise _err("rollout.num_rollout=0 and rollout.num_epoch=0: the run has no length; set num_rollout "
                   "(learner steps) or num_epoch (passes over the prompt data)")
    for name in ("global_batch_size", "micro_batch_size"):
        _at_least("rollout", r, name, 0)
    _at_least("rollout", r, "rollout_temperature", 0)
    if not 0 < r.rollout_top_p <= 1:
        raise _err(f"rollout.rollout_top_p={r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_top_k == 0 or r.rollout_top_k < -1:
        raise _err(f"rollout.rollout_top_k={r.rollout_top_k}: must be -1 (off) or >= 1")
    _batch_sizes(r)
    _engine_rules(r)
    _data_rules(cfg.data)
    _context_rules(r, cfg.data)


def _context_rules(r, d) -> None:
    """rollout_max_context_len bounds prompt + response: prompts must leave room for one response token."""
    _at_least("rollout", r, "rollout_max_context_len", 0)
    if not r.rollout_max_context_len:
        return
    if r.rollout_max_context_len < 2:
        raise _err(f"rollout.rollout_max_context_len={r.rollout_max_context_len}: must be >= 2 (a prompt token and "
                   f"a response token), or 0 for no limit")
    if not d.rollout_max_prompt_len:  # slime's default: the longest prompt that leaves one token to generate
        d.rollout_max_prompt_len = r.rollout_max_context_len - 1
    elif d.rollout_max_prompt_len > r.rollout_max_context_len - 1:
        raise _err(f"data.rollout_max_prompt_len={d.rollout_max_prompt_len}: must be at most rollout_max_context_len"
                   f" - 1 = {r.rollout_max_context_len - 1} (room for a response token); lower it, or set it to 0 to "
                   f"take that default")


def _engine_rules(r) -> None:
    _at_least("rollout", r, "engine_max_batch_size", 1)
    if torch_device_problem(r.engine_device):
        raise _err(f"rollout.engine_device={r.engine_device!r}: {torch_device_problem(r.engine_device)}")
    for name in ("rollout_num_gpus", "rollout_health_check_first_wait"):
        _at_least("rollout", r, name, 0)
    for name in ("rollout_num_gpus_per_engine", "sglang_server_concurrency", "update_weight_buffer_size"):
        _at_least("rollout", r, name, 1)
    for name in ("weight_poll_interval", "rollout_health_check_interval", "rollout_health_check_timeout"):
        if getattr(r, name) <= 0:
            raise _err(f"rollout.{name}={getattr(r, name)}: must be > 0 seconds")
    if r.rollout_num_gpus % r.rollout_num_gpus_per_engine:
        raise _err(f"rollout.rollout_num_gpus={r.rollout_num_gpus}: must be a multiple of "
                   f"rollout_num_gpus_per_engine={r.rollout_num_gpus_per_engine} (GPUs per SGLang server)")
    if r.sglang_server_args and r.rollout_engine != "sglang":
        raise _err(f"rollout.sglang_server_args={r.sglang_server_args}: only used with rollout_engine=sglang; "
                   f"set it, or clear the list")
    _sglang_args(r)
    if not all(isinstance(s, str) and s for s in r.rollout_stop):
        raise _err(f"rollout.rollout_stop={r.rollout_stop}: must be non-empty strings, e.g. [\"</answer>\"]")
    for addr in r.rollout_external_engine_addrs:
        if not re.fullmatch(r"(https?://)?[\w.\-\[\]:]+:\d+/?", str(addr)):
            raise _err(f"rollout.rollout_external_engine_addrs: {addr!r} is not host:port (or http://host:port)")
    for name in ("custom_generate_function_path", "rollout_function_path"):
        _dotted_path("rollout", r, name)
    if r.custom_generate_function_path and r.rollout_function_path:
        raise _err("rollout.custom_generate_function_path and rollout.rollout_function_path: set one; the rollout "
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
                raise _err(f"rollout.sglang_server_args sets {word.split('=', 1)[0]}: the launcher sets it (model "
                           f"path from ckpt.hf_checkpoint, host from cluster.host, tp size from "
                           f"rollout_num_gpus_per_engine); remove it from sglang_server_args")


def _data_rules(d) -> None:
    _at_least("data", d, "rollout_max_prompt_len", 0)
    if d.apply_chat_template_kwargs:
        import yaml
        try:
            kwargs = yaml.safe_load(d.apply_chat_template_kwargs)
        except yaml.YAMLError as e:
            raise _err(f"data.apply_chat_template_kwargs={d.apply_chat_template_kwargs!r}: not YAML/JSON ({e})") from None
        if not isinstance(kwargs, dict):
            raise _err(f"data.apply_chat_template_kwargs={d.apply_chat_template_kwargs!r}: must be a map, "
                       "e.g. '{enable_thinking: false}'")


_REWARD_PLUGIN_FIELDS = ("custom_rm_path", "custom_reward_post_process_path", "dynamic_sampling_filter_path")


def _reward_rules(cfg: "Config") -> None:
    """Rewards and sampling filters; plug-ins are imported (and their signatures checked) by the generator."""
    r = cfg.rollout
    for name in _REWARD_PLUGIN_FIELDS:
        _dotted_path("rollout", r, name)
    if r.rm_type == "remote_rm" and not r.custom_rm_path and not r.rm_url.startswith(("http://", "https://")):
        raise _err(f"rollout.rm_url={r.rm_url!r}: rm_type=remote_rm needs the reward server's URL, "
                   f"e.g. rm_url=http://127.0.0.1:8000/score")
    if r.rm_timeout <= 0:
        raise _err(f"rollout.rm_timeout={r.rm_timeout}: must be > 0 seconds")
    _at_least("rollout", r, "rm_max_retries", 0)
    _at_least("rollout", r, "over_sampling_batch_size", 0)
    if r.group_rm and not r.custom_rm_path:
        raise _err("rollout.group_rm=true: needs rollout.custom_rm_path, a fn(prompt, responses: list[str], "
                   "label) -> list[float]; the built-in rm_types score one response at a time")
    if r.dynamic_sampling_filter_path == "actors.filters.reward_std_positive" and r.n_samples_per_prompt < 2:
        raise _err(f"rollout.dynamic_sampling_filter_path={r.dynamic_sampling_filter_path!r}: with "
                   f"n_samples_per_prompt={r.n_samples_per_prompt} every group has zero reward std and would be "
                   f"dropped; set n_samples_per_prompt >= 2")


def _dotted_path(sec: str, obj, name: str) -> None:
    import re
    value = getattr(obj, name)
    if value and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
        raise _err(f"{sec}.{name}={value!r}: must be a dotted path `module.function`, e.g. mypkg.rewards.score")


def _cluster_rules(cfg: "Config") -> None:
    c = cfg.cluster
    for name in ("num_engines", "num_generators", "engine_num_threads", "learner_num_threads"):
        _at_least("cluster", c, name, 1)
    if not 0 <= c.hub_port < 65536:
        raise _err(f"cluster.hub_port={c.hub_port}: must be a TCP port in [0, 65535] (0 = pick a free one)")
    if not 0 <= c.weights_port < 65536:
        raise _err(f"cluster.weights_port={c.weights_port}: must be a TCP port in [0, 65535] (0 = pick a free one)")
    # YAML reads a bare on/off as a bool
    c.serve_weights = {"true": "on", "false": "off"}.get(str(c.serve_weights).lower(), str(c.serve_weights))
    if c.serve_weights not in ("auto", "on", "off"):
        raise _err(f"cluster.serve_weights={c.serve_weights!r}: must be auto, on or off")
    if c.host in ("0.0.0.0", "::", "") and not c.advertise_host:
        raise _err(f"cluster.host={c.host!r} binds every interface; set cluster.advertise_host to the address "
                   f"other hosts reach this one by (e.g. cluster.advertise_host=10.0.0.5)")
    _placement_rules(cfg)


def _placement_rules(cfg: "Config") -> None:
    """The slime placement options that `--cluster ray` honours, and a clear no for those it cannot."""
    from async_rl import placement
    placement.check(cfg)  # cluster.engine_gpus / learner_gpus (the local launcher's GPU assignment)
    c = cfg.cluster
    _at_least("cluster", c, "num_gpus_per_node", 0)
    if c.actor_num_nodes != 1:
        raise _err(f"cluster.actor_num_nodes={c.actor_num_nodes}: a learner spanning nodes is not built (it runs "
                   f"under one torchrun --standalone); set 1 and use train.actor_num_gpus_per_node GPUs on one node")
    if c.offload:
        raise _err("cluster.offload=true: not supported: in a fully asynchronous run engines and learner work at "
                   "the same time, so there is no idle phase to offload in; set offload=false")
    if c.colocate and c.num_gpus_per_node > 0:
        raise _err(f"cluster.colocate=true with num_gpus_per_node={c.num_gpus_per_node}: engines sharing the "
                   f"learner's GPUs need offload, which is not built; set colocate=false (engines get GPUs of their "
                   f"own: rollout.rollout_num_gpus)")
    for sec, obj, name in (("train", cfg.train, "actor_num_gpus_per_node"),
                           ("rollout", cfg.rollout, "rollout_num_gpus_per_engine")):
        if c.num_gpus_per_node and getattr(obj, name) > c.num_gpus_per_node:
            raise _err(f"{sec}.{name}={getattr(obj, name)}: more than cluster.num_gpus_per_node="
                       f"{c.num_gpus_per_node}; one bundle sits on one node: lower it or raise num_gpus_per_node")


def _supervisor_and_debug_rules(cfg: "Config") -> None:
    c, d = cfg.cluster, cfg.debug
    if c.max_restarts < -1:
        raise _err(f"cluster.max_restarts={c.max_restarts}: must be >= 0, or -1 for no limit")
    _at_least("cluster", c, "restart_backoff", 0)
    if d.debug_rollout_only and d.debug_train_only:
        raise _err("debug.debug_rollout_only=true and debug.debug_train_only=true: pick one (the first trains "
                   "nothing, the second generates nothing)")
    if d.debug_train_only != bool(d.load_debug_rollout_data):
        raise _err(f"debug.load_debug_rollout_data={d.load_debug_rollout_data!r}: read only by, and required by, "
                   f"debug_train_only (now {d.debug_train_only}); set both or neither")
    for name in ("save_debug_rollout_data", "load_debug_rollout_data"):
        value = getattr(d, name)
        if "{rollout_id}" in value and "{rollout_id}" not in value.rsplit("/", 1)[-1]:
            raise _err(f"debug.{name}={value!r}: {{rollout_id}} must be in the file name, e.g. "
                       f"dbg/rollout_{{rollout_id}}.msgpack (or give a directory)")

def _algo_rules(cfg: "Config") -> None:
    a = cfg.algo
    for name in ("eps_clip", "eps_clip_high", "tis_clip_low", "kl_coef", "kl_loss_coef", "value_clip",
                 "critic_lr", "num_critic_only_steps"):
        _at_least("algo", a, name, 0)
    _at_least("ckpt", cfg.ckpt, "ref_update_interval", 0)
    for name in ("gamma", "lambd"):
        if not 0 <= getattr(a, name) <= 1:
            raise _err(f"algo.{name}={getattr(a, name)}: must be in [0, 1]")
    if a.eps_clip_c != 0 and a.eps_clip_c <= 1:
        raise _err(f"algo.eps_clip_c={a.eps_clip_c}: dual-clip bound must be > 1 (e.g. 3.0), or 0 to disable")
    if a.tis_clip <= a.tis_clip_low:
        raise _err(f"algo.tis_clip={a.tis_clip}: must be > tis_clip_low={a.tis_clip_low}")
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
        raise _err(f"rollout.n_samples_per_prompt=1: advantage_estimator={a.advantage_estimator} subtracts the "
                   f"group's mean reward, so a group of one gets advantage 0 and trains on nothing; set "
                   f"n_samples_per_prompt >= 2 (slime's examples use 8-16), or use reinforce_plus_plus or ppo")


def _algo_kl_rules(a) -> None:
    if kl_reward_shaping(a) and a.kl_loss_coef != 0:
        raise _err(f"algo.kl_coef={a.kl_coef} and algo.kl_loss_coef={a.kl_loss_coef}: use one KL penalty, "
                   f"reward shaping (kl_coef) or the KL loss (use_kl_loss + kl_loss_coef); set the other to 0")
    if a.kl_loss_coef != 0 and not a.use_kl_loss:
        raise _err(f"algo.kl_loss_coef={a.kl_loss_coef}: only used with use_kl_loss=true; set it, or "
                   f"kl_loss_coef=0")


def _algo_plugin_rules(a) -> None:
    _dotted_path("algo", a, "rollout_data_postprocess_path")
    if a.loss_type == "custom_loss" and not a.custom_loss_function_path:
        raise _err("algo.loss_type='custom_loss': needs custom_loss_function_path=module.fn "
                   "(fn(logp, batch, algo) -> (loss, metrics))")
    if a.custom_loss_function_path and a.loss_type != "custom_loss":
        raise _err(f"algo.custom_loss_function_path={a.custom_loss_function_path!r}: only used with "
                   f"loss_type=custom_loss; set it, or clear the path")
    if a.custom_tis_function_path and not a.use_tis:
        raise _err(f"algo.custom_tis_function_path={a.custom_tis_function_path!r}: only used with use_tis=true; "
                   f"set it, or clear the path")
    needs_advantages = a.loss_type == "policy_loss" or a.advantage_estimator == "ppo"
    if a.disable_compute_advantages_and_returns and needs_advantages:
        raise _err("algo.disable_compute_advantages_and_returns=True: policy_loss and the ppo critic need "
                   "advantages and returns; use it only with loss_type sft_loss or custom_loss, not with ppo")
    if a.num_critic_only_steps and a.advantage_estimator != "ppo":
        raise _err(f"algo.num_critic_only_steps={a.num_critic_only_steps}: only ppo has a critic; set "
                   f"advantage_estimator=ppo or num_critic_only_steps=0")


def _optimizer_rules(cfg: "Config") -> None:
    o = cfg.optimizer
    if o.lr <= 0:
        raise _err(f"optimizer.lr={o.lr}: must be > 0")
    _at_least("optimizer", o, "clip_grad", 0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise _err(f"optimizer.{name}={getattr(o, name)}: must be in [0, 1)")
    _at_least("optimizer", o, "lr_warmup_iters", 0)
    if not 0 <= o.warmup_ratio < 1:
        raise _err(f"optimizer.warmup_ratio={o.warmup_ratio}: must be in [0, 1)")
    if o.lr_warmup_iters and o.warmup_ratio:
        raise _err(f"optimizer.lr_warmup_iters={o.lr_warmup_iters} and warmup_ratio={o.warmup_ratio}: set one "
                   f"of them, the other to 0")
    if not 0 <= o.min_lr <= o.lr:
        raise _err(f"optimizer.min_lr={o.min_lr}: must be in [0, lr={o.lr}]")
    steps = cfg.rollout.num_rollout * cfg.rollout.num_steps_per_rollout
    if steps and o.lr_warmup_iters >= steps:  # steps = 0: num_epoch decides the length at launch
        raise _err(f"optimizer.lr_warmup_iters={o.lr_warmup_iters}: must be < the run's {steps} optimizer steps "
                   f"(num_rollout * num_steps_per_rollout)")


def _buffer_rules(cfg: "Config") -> None:
    b = cfg.buffer
    if max_staleness_problem(b.max_staleness):
        raise _err(max_staleness_problem(b.max_staleness))
    for name in ("put_timeout", "generator_timeout", "heartbeat_interval"):
        if getattr(b, name) <= 0:
            raise _err(f"buffer.{name}={getattr(b, name)}: must be > 0 seconds")
    for name in ("snapshot_interval", "keep_snapshots"):
        _at_least("buffer", b, name, 1)
    _at_least("buffer", b, "max_message_bytes", 2**16)
    if b.priority_fn not in ("constant", "reward_variance", "freshness", "response_length") and "." not in b.priority_fn:
        raise _err(f"buffer.priority_fn={b.priority_fn!r}: must be constant, reward_variance, freshness, "
                   f"response_length, or a dotted path like mypkg.priorities.score")
    _at_least("buffer", b, "alpha", 0)
    _at_least("buffer", b, "capacity", 0)
    _at_least("buffer", b, "max_times_sampled", 1)
    if b.priority_update not in ("none", "abs_advantage"):
        if "." not in b.priority_update:
            raise _err(f"buffer.priority_update={b.priority_update!r}: must be none, abs_advantage, or a dotted "
                       f"path like mypkg.priorities.update")
        _dotted_path("buffer", b, "priority_update")
    if b.priority_update != "none" and b.max_times_sampled == 1:
        raise _err(f"buffer.priority_update={b.priority_update!r} with buffer.max_times_sampled=1: every group is "
                   f"retired after its one step, so there is nothing to re-prioritize; set max_times_sampled > 1 "
                   f"or priority_update=none")


def _misc_rules(cfg: "Config") -> None:
    _at_least("ckpt", cfg.ckpt, "keep_weight_versions", 1)
    _at_least("ckpt", cfg.ckpt, "save_interval", 0)
    _at_least("ckpt", cfg.ckpt, "keep_checkpoints", 1)
    _at_least("eval", cfg.eval, "eval_max_prompts", 1)
    _at_least("eval", cfg.eval, "eval_max_response_len", 0)
    _eval_rules(cfg.eval)


def eval_datasets(e) -> list[tuple[str, str]]:
    """eval.eval_prompt_data as (name, path) pairs: [path] names the set by its file stem."""
    from pathlib import Path
    data = [str(x) for x in e.eval_prompt_data]
    if len(data) == 1:
        return [(Path(data[0]).stem, data[0])]
    if len(data) % 2:
        raise _err(f"eval.eval_prompt_data={data}: must be name/path pairs such as [add, data/test.jsonl, hard, "
                   f"data/hard.jsonl] (or one path); it has {len(data)} entries")
    pairs = list(zip(data[0::2], data[1::2]))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise _err(f"eval.eval_prompt_data={data}: names {names} repeat; give each eval set its own name")
    for name, _ in pairs:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise _err(f"eval.eval_prompt_data: name {name!r} must be letters, digits, '_', '-' or '.' (it becomes "
                       f"the metric key eval/<name>/pass@k); put the name before its path")
    return pairs


def _eval_rules(e) -> None:
    eval_datasets(e)
    for name in ("eval_interval",):
        _at_least("eval", e, name, 0)
    _at_least("eval", e, "n_samples_per_eval_prompt", 1)
    _dotted_path("eval", e, "eval_function_path")
    _at_least("eval", e, "eval_temperature", 0)
    if not 0 < e.eval_top_p <= 1:
        raise _err(f"eval.eval_top_p={e.eval_top_p}: must be in (0, 1]")
    if e.eval_top_k == 0 or e.eval_top_k < -1:
        raise _err(f"eval.eval_top_k={e.eval_top_k}: must be -1 (off) or >= 1")
    if e.n_samples_per_eval_prompt > 1 and e.eval_temperature == 0:
        raise _err(f"eval.n_samples_per_eval_prompt={e.n_samples_per_eval_prompt} with eval_temperature=0: greedy "
                   f"samples are all the same, so pass@k would equal pass@1; set eval_temperature (e.g. 1.0)")
    if e.eval_interval and not e.eval_prompt_data:
        raise _err(f"eval.eval_interval={e.eval_interval}: needs eval.eval_prompt_data (name/path pairs); set it, "
                   f"or eval_interval=0")


def _train_rules(cfg: "Config") -> None:
    t = cfg.train
    if t.distributed_timeout_minutes <= 0:
        raise _err(f"train.distributed_timeout_minutes={t.distributed_timeout_minutes}: must be > 0 minutes")
    for name in ("actor_num_gpus_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size"):
        _at_least("train", t, name, 1)
    for name in ("max_tokens_per_gpu", "log_probs_max_tokens_per_gpu", "recompute_num_layers"):
        _at_least("train", t, name, 0)
    if t.train_backend == "torch":
        _torch_backend_rules(cfg)
    else:
        _megatron_rules(cfg)


_MEGATRON_ONLY = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size", "sequence_parallel", "use_dynamic_batch_size", "max_tokens_per_gpu",
                  "log_probs_max_tokens_per_gpu", "recompute_granularity", "recompute_method",
                  "recompute_num_layers")


def max_staleness_problem(value) -> str:
    """'' when `value` is a valid `buffer.max_staleness`, else the error naming field, value and fix. The one
    check of the bound: the config loader, buffer/staleness.py (table and live SET) all call it; it lives
    here because async_rl/ never imports buffer/."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        return (f"buffer.max_staleness={value!r}: must be >= 0 and an integer: the versions generators may run "
                f"ahead of the learner (0 = synchronous on-policy), e.g. max_staleness=2")
    return ""


def torch_device_problem(value: str) -> str:
    """'' when `value` names a torch device async-rl can place a model on (cpu, cuda, cuda:N), else why not."""
    import re
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value or ""):
        return "not a device; use cpu, cuda or cuda:N"
    return ""


def _torch_backend_rules(cfg: "Config") -> None:
    from async_rl.config import OptimizerConfig, TrainConfig
    default_t, default_o = TrainConfig(), OptimizerConfig()
    t = cfg.train
    problem = torch_device_problem(t.learner_device)
    if problem:
        raise _err(f"train.learner_device={t.learner_device!r}: {problem}")
    if t.bf16 and not t.learner_device.startswith("cuda"):
        raise _err(f"train.bf16=True: bf16 autocast is for a GPU learner (learner_device={t.learner_device!r}); "
                   f"set learner_device=cuda, or bf16=false")
    for name in _MEGATRON_ONLY:
        if getattr(cfg.train, name) != getattr(default_t, name):
            raise _err(f"train.{name}={getattr(cfg.train, name)!r}: only train_backend=megatron uses it; set "
                       f"train_backend=megatron, or {name}={getattr(default_t, name)!r}")
    _fsdp_rules(cfg)
    for name in ("lr_decay_style", "lr_warmup_iters", "warmup_ratio"):
        if getattr(cfg.optimizer, name) != getattr(default_o, name):
            raise _err(f"optimizer.{name}={getattr(cfg.optimizer, name)!r}: learning-rate schedules are applied "
                       f"by train_backend=megatron only; set train_backend=megatron, or "
                       f"{name}={getattr(default_o, name)!r}")


def _fsdp_rules(cfg: "Config") -> None:
    """The torch learner at several ranks (learners/fsdp.py)."""
    t, r = cfg.train, cfg.rollout
    dp = t.actor_num_gpus_per_node
    if t.fsdp_cpu_offload and (dp == 1 or not t.learner_device.startswith("cuda")):
        raise _err(f"train.fsdp_cpu_offload=True: offloads a sharded GPU learner's states to the host; it needs "
                   f"learner_device=cuda and actor_num_gpus_per_node > 1 (now {t.learner_device!r}, {dp}); set "
                   f"fsdp_cpu_offload=false")
    if dp == 1:
        return
    per_step = r.rollout_batch_size * r.n_samples_per_prompt
    for name, size in (("rollout.global_batch_size", r.global_batch_size), ("rollout_batch_size x n_samples_per_prompt", per_step)):
        if size % dp:
            raise _err(f"{name}={size}: every one of the learner's {dp} data-parallel ranks "
                       f"(train.actor_num_gpus_per_node) trains an equal share; make it a multiple of {dp}")
    if cfg.algo.advantage_estimator == "ppo":
        raise _err(f"algo.advantage_estimator='ppo' with train.actor_num_gpus_per_node={dp}: the PPO critic is not "
                   f"sharded; train it at one rank (actor_num_gpus_per_node=1) or use grpo, gspo or reinforce_plus_plus")
    if r.update_weight_mode == "tensor":
        raise _err(f"rollout.update_weight_mode='tensor' with train.actor_num_gpus_per_node={dp}: CUDA IPC handover "
                   f"is built for one learner rank; use update_weight_mode=broadcast or disk")
    if t.learner_device not in ("cpu", "cuda"):
        raise _err(f"train.learner_device={t.learner_device!r} with actor_num_gpus_per_node={dp}: each rank takes "
                   f"its own GPU (cuda:LOCAL_RANK); set learner_device=cuda (or cpu for gloo ranks)")


def _megatron_rules(cfg: "Config") -> None:
    t = cfg.train
    if t.learner_device != "cpu":
        raise _err(f"train.learner_device={t.learner_device!r}: train_backend=megatron places each rank on its own "
                   f"GPU (or on CPU over gloo without GPUs); leave learner_device=cpu")
    model_parallel = t.tensor_model_parallel_size * t.pipeline_model_parallel_size * t.context_parallel_size
    if t.actor_num_gpus_per_node % model_parallel:
        raise _err(f"train.actor_num_gpus_per_node={t.actor_num_gpus_per_node}: must be a multiple of "
                   f"tensor * pipeline * context parallel sizes = {model_parallel}")
    unsupported = {
        "context_parallel_size": (t.context_parallel_size > 1, "needs Transformer Engine attention, which the "
                                  "local layer spec does not use; set 1"),
        "sequence_parallel": (t.sequence_parallel, "needs Transformer Engine or apex layer norms, which the local "
                              "layer spec does not use; set false"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise _err(f"train.{name}={getattr(t, name)}: {why}")
    if cfg.algo.advantage_estimator == "ppo":
        raise _err("algo.advantage_estimator='ppo' with train_backend=megatron: the PPO critic runs on the torch "
                   "backend only; use train_backend=torch or another estimator (grpo, gspo, reinforce_plus_plus)")
    _megatron_batch_rules(cfg, t.actor_num_gpus_per_node // model_parallel)


def _megatron_batch_rules(cfg: "Config", dp: int) -> None:
    t, r = cfg.train, cfg.rollout
    if r.global_batch_size % dp:
        raise _err(f"rollout.global_batch_size={r.global_batch_size}: must split evenly over the {dp} data-parallel "
                   f"ranks (actor_num_gpus_per_node / model-parallel size)")
    if t.use_dynamic_batch_size and t.max_tokens_per_gpu == 0:
        raise _err("train.use_dynamic_batch_size=True: needs max_tokens_per_gpu > 0 (e.g. 16384)")
    if not t.use_dynamic_batch_size and (t.max_tokens_per_gpu or t.log_probs_max_tokens_per_gpu):
        raise _err(f"train.max_tokens_per_gpu={t.max_tokens_per_gpu}, log_probs_max_tokens_per_gpu="
                   f"{t.log_probs_max_tokens_per_gpu}: only used with use_dynamic_batch_size=true; set it, or 0")
    full = t.recompute_granularity == "full"
    if full and not (t.recompute_method and t.recompute_num_layers):
        raise _err("train.recompute_granularity='full': needs recompute_method (uniform or block) and "
                   "recompute_num_layers >= 1")
    if not full and (t.recompute_method or t.recompute_num_layers):
        raise _err(f"train.recompute_method={t.recompute_method!r}, recompute_num_layers={t.recompute_num_layers}: "
                   f"only used with recompute_granularity=full; set it, or clear them")


def check_paths(cfg: "Config") -> None:
    """Checks that need the filesystem (done at launch, not at parse, so configs can be validated anywhere)."""
    from pathlib import Path
    if not cfg.ckpt.hf_checkpoint:
        raise _err("ckpt.hf_checkpoint='': required; set it to an HF checkpoint dir "
                   "(for the quickstart: python scripts/build_tiny.py)")
    if not (Path(cfg.ckpt.hf_checkpoint) / "config.json").exists():
        raise _err(f"ckpt.hf_checkpoint={cfg.ckpt.hf_checkpoint!r}: no config.json there; point it at an HF "
                   f"checkpoint dir (for the quickstart: python scripts/build_tiny.py)")
    paths = [("data", "prompt_data", cfg.data.prompt_data)]
    paths += [("eval", f"eval_prompt_data ({name})", path) for name, path in eval_datasets(cfg.eval)]
    for sec, name, value in paths:
        if not Path(value).is_file():
            raise _err(f"{sec}.{name}={value!r}: file not found; point it at a JSONL prompt file")
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
        raise _err(f"rollout.num_epoch={r.num_epoch}: {r.num_epoch} pass(es) over {n} prompts is less than one "
                   f"learner step of rollout_batch_size={r.rollout_batch_size} prompts; raise num_epoch or set "
                   f"num_rollout")
    print(f"config: num_rollout=0, so the run is num_epoch={r.num_epoch} x {n} prompts // rollout_batch_size="
          f"{r.rollout_batch_size} = {r.num_rollout} learner steps", flush=True)
