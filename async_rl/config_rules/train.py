"""Rules of the train section (the learner): the torch backend (one process, or FSDP2 ranks:
learners/fsdp.py) and the megatron backend. A backend's rules read other sections where the backend limits
them (rollout batch sizes over data-parallel ranks, the PPO critic, megatron-only optimizer schedules);
they run after rollout's `validate` has derived rollout.global_batch_size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least, torch_device_problem

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    t = cfg.train
    if t.distributed_timeout_minutes <= 0:
        raise ConfigError(f"train.distributed_timeout_minutes={t.distributed_timeout_minutes}: must be > 0 minutes")
    for name in ("actor_num_gpus_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size"):
        at_least("train", t, name, 1)
    for name in ("max_tokens_per_gpu", "log_probs_max_tokens_per_gpu", "recompute_num_layers"):
        at_least("train", t, name, 0)
    if t.fsdp_cpu_offload and (t.train_backend != "torch" or not t.learner_device.startswith("cuda")):
        raise ConfigError(f"train.fsdp_cpu_offload=True: offloads the FSDP2 GPU learner's states to the host; it needs "
                         f"train_backend=torch and learner_device=cuda (now {t.train_backend!r}, {t.learner_device!r}); "
                         f"set fsdp_cpu_offload=false")
    if t.train_backend == "torch":
        _torch_backend_rules(cfg)
    else:
        _megatron_rules(cfg)


_MEGATRON_ONLY = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size", "sequence_parallel", "recompute_granularity", "recompute_method",
                  "recompute_num_layers")


def _torch_backend_rules(cfg: "Config") -> None:
    default_t, default_o = type(cfg.train)(), type(cfg.optimizer)()  # the sections' defaults
    t = cfg.train
    problem = torch_device_problem(t.learner_device)
    if problem:
        raise ConfigError(f"train.learner_device={t.learner_device!r}: {problem}")
    if t.bf16 and not t.learner_device.startswith("cuda"):
        raise ConfigError(f"train.bf16=True: bf16 autocast is for a GPU learner (learner_device={t.learner_device!r}); "
                         f"set learner_device=cuda, or bf16=false")
    for name in _MEGATRON_ONLY:
        if getattr(cfg.train, name) != getattr(default_t, name):
            raise ConfigError(f"train.{name}={getattr(cfg.train, name)!r}: only train_backend=megatron uses it; set "
                             f"train_backend=megatron, or {name}={getattr(default_t, name)!r}")
    _fsdp_rules(cfg)
    _token_budget_rules(t)
    for name in ("lr_decay_style", "lr_warmup_iters", "warmup_ratio"):
        if getattr(cfg.optimizer, name) != getattr(default_o, name):
            raise ConfigError(f"optimizer.{name}={getattr(cfg.optimizer, name)!r}: learning-rate schedules are applied "
                             f"by train_backend=megatron only; set train_backend=megatron, or "
                             f"{name}={getattr(default_o, name)!r}")


def _fsdp_rules(cfg: "Config") -> None:
    """The torch learner at several ranks (learners/fsdp.py)."""
    from async_rl.placement import learner_ranks
    t, r = cfg.train, cfg.rollout
    dp = learner_ranks(cfg)  # actor_num_gpus_per_node on each of cluster.actor_num_nodes nodes
    if dp == 1:
        return
    per_step = r.rollout_batch_size * r.n_samples_per_prompt
    for name, size in (("rollout.global_batch_size", r.global_batch_size), ("rollout_batch_size x n_samples_per_prompt", per_step)):
        if size % dp:
            raise ConfigError(f"{name}={size}: every one of the learner's {dp} data-parallel ranks "
                             f"(train.actor_num_gpus_per_node x cluster.actor_num_nodes) trains an equal share; make "
                             f"it a multiple of {dp}")
    if cfg.algo.advantage_estimator == "ppo":
        raise ConfigError(f"algo.advantage_estimator='ppo' with train.actor_num_gpus_per_node={dp}: the PPO critic is not "
                         f"sharded; train it at one rank (actor_num_gpus_per_node=1) or use grpo, gspo or reinforce_plus_plus")
    if r.update_weight_mode == "tensor":
        raise ConfigError(f"rollout.update_weight_mode='tensor' with train.actor_num_gpus_per_node={dp}: CUDA IPC handover "
                         f"is built for one learner rank; use update_weight_mode=broadcast or disk")
    if t.learner_device not in ("cpu", "cuda"):
        raise ConfigError(f"train.learner_device={t.learner_device!r} with actor_num_gpus_per_node={dp}: each rank takes "
                         f"its own GPU (cuda:LOCAL_RANK); set learner_device=cuda (or cpu for gloo ranks)")


def _megatron_rules(cfg: "Config") -> None:
    t = cfg.train
    if t.learner_device != "cpu":
        raise ConfigError(f"train.learner_device={t.learner_device!r}: train_backend=megatron places each rank on its own "
                         f"GPU (or on CPU over gloo without GPUs); leave learner_device=cpu")
    model_parallel = t.tensor_model_parallel_size * t.pipeline_model_parallel_size * t.context_parallel_size
    if t.actor_num_gpus_per_node % model_parallel:
        raise ConfigError(f"train.actor_num_gpus_per_node={t.actor_num_gpus_per_node}: must be a multiple of "
                         f"tensor * pipeline * context parallel sizes = {model_parallel}")
    unsupported = {
        "context_parallel_size": (t.context_parallel_size > 1, "needs Transformer Engine attention, which the "
                                  "local layer spec does not use; set 1"),
        "sequence_parallel": (t.sequence_parallel, "needs Transformer Engine or apex layer norms, which the local "
                              "layer spec does not use; set false"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise ConfigError(f"train.{name}={getattr(t, name)}: {why}")
    if cfg.algo.advantage_estimator == "ppo":
        raise ConfigError("algo.advantage_estimator='ppo' with train_backend=megatron: the PPO critic runs on the torch "
                         "backend only; use train_backend=torch or another estimator (grpo, gspo, reinforce_plus_plus)")
    from async_rl.placement import learner_ranks
    _megatron_batch_rules(cfg, learner_ranks(cfg) // model_parallel)


def _token_budget_rules(t) -> None:
    """use_dynamic_batch_size and its budgets (both backends)."""
    if t.use_dynamic_batch_size and t.max_tokens_per_gpu == 0:
        raise ConfigError("train.use_dynamic_batch_size=True: needs max_tokens_per_gpu > 0 (e.g. 16384)")
    if not t.use_dynamic_batch_size and (t.max_tokens_per_gpu or t.log_probs_max_tokens_per_gpu):
        raise ConfigError(f"train.max_tokens_per_gpu={t.max_tokens_per_gpu}, log_probs_max_tokens_per_gpu="
                         f"{t.log_probs_max_tokens_per_gpu}: only used with use_dynamic_batch_size=true; set it, or 0")


def _megatron_batch_rules(cfg: "Config", dp: int) -> None:
    t, r = cfg.train, cfg.rollout
    if r.global_batch_size % dp:
        raise ConfigError(f"rollout.global_batch_size={r.global_batch_size}: must split evenly over the {dp} data-parallel "
                         f"ranks (actor_num_gpus_per_node x cluster.actor_num_nodes / model-parallel size)")
    _token_budget_rules(t)
    full = t.recompute_granularity == "full"
    if full and not (t.recompute_method and t.recompute_num_layers):
        raise ConfigError("train.recompute_granularity='full': needs recompute_method (uniform or block) and "
                         "recompute_num_layers >= 1")
    if not full and (t.recompute_method or t.recompute_num_layers):
        raise ConfigError(f"train.recompute_method={t.recompute_method!r}, recompute_num_layers={t.recompute_num_layers}: "
                         f"only used with recompute_granularity=full; set it, or clear them")
