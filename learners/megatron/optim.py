"""Gradient sync, optimizer and learning-rate schedule of the Megatron learner.

Invariant: one `Stepper.step()` applies one update from the gradient of the whole global mini-batch:
micro-batch gradients accumulate in Megatron DDP's fp32 `main_grad` buffers, `finish_grad_sync` reduces
them over data-parallel ranks (mean for per-sample losses, sum for per-token losses whose denominator is
already the global token count), and the clip uses the norm of the *model's* gradient, each parameter
counted once (a TP-replicated norm weight is not counted TP times).
GPU: Megatron's mixed-precision optimizer (bf16 params, fp32 main params; the distributed optimizer
shards those over DP ranks). CPU (tests only): torch AdamW on fp32 params, because Megatron's optimizer
and grad-norm code hard-code CUDA. Both follow Megatron's `OptimizerParamScheduler` (warmup + decay).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def wrap_ddp(model, config, dp: int, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=distributed_optimizer and dp > 1,
                                        bucket_size=None)
    return DistributedDataParallel(config=config, ddp_config=ddp, module=model)


def warmup_steps(o, total: int) -> int:
    return o.lr_warmup_iters or int(o.warmup_ratio * total)


def scheduler(optimizer, o, total: int):
    """Megatron's LR/WD scheduler over `total` optimizer steps (slime's lr_decay_style, warmup, min_lr)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warm = warmup_steps(o, total)
    return OptimizerParamScheduler(optimizer, init_lr=0.0 if warm else o.lr, max_lr=o.lr, min_lr=o.min_lr,
                                   lr_warmup_steps=warm, lr_decay_steps=max(total, warm + 1),
                                   lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
                                   end_wd=o.weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant")


def model_grad_norm(params: list, group) -> float:
    """Global L2 norm of the main grads, each distinct parameter once, over the model-parallel `group`."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    sq = torch.zeros((), dtype=torch.float64)
    for p in params:  # not shared: the last stage's copy of a tied embedding (PP > 1) is counted on the first
        grad = getattr(p, "main_grad", None)
        if grad is not None and param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p):
            sq += grad.detach().double().pow(2).sum().cpu()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return math.sqrt(float(sq))


class Stepper:
    """zero_grad / step over a DDP-wrapped model; `step()` returns the grad norm before clipping."""

    def __init__(self, ddp_model, o, total_steps: int, on_gpu: bool, bf16: bool):
        self.ddp, self.o, self.on_gpu = ddp_model, o, on_gpu
        self.params = [p for p in ddp_model.parameters() if p.requires_grad]
        if on_gpu:
            self.optimizer = self._megatron_optimizer(bf16)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                               eps=o.adam_eps, weight_decay=o.weight_decay)
        self.scheduler = scheduler(self.optimizer, o, total_steps)

    def _megatron_optimizer(self, bf16: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.o
        cfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                              adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                              clip_grad=o.clip_grad if o.clip_grad > 0 else 0.0, bf16=bf16,
                              params_dtype=torch.bfloat16 if bf16 else torch.float32,
                              use_distributed_optimizer=self.ddp.ddp_config.use_distributed_optimizer)
        optimizer = get_megatron_optimizer(cfg, [self.ddp])
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW):  # Megatron's fallback without TE/apex FusedAdam: use torch's
            for group in inner.param_groups:      # fused kernel (one launch per step, not one per tensor)
                group.update(fused=True, foreach=False)
        return optimizer

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        """A new peak LR (live knob `async-rl set lr=...`): the schedule continues from it."""
        self.scheduler.max_lr = lr
        for group in self.optimizer.param_groups:
            if "max_lr" in group:  # Megatron's param groups carry their own peak
                group["max_lr"] = lr
        self.scheduler.step(increment=0)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads

        if ps.get_pipeline_model_parallel_world_size() > 1:
            finalize_model_grads([self.ddp])  # DP reduction, and the sum of a tied embedding's two copies
        else:
            self.ddp.finish_grad_sync()
        if self.on_gpu:
            _, grad_norm, _ = self.optimizer.step()
        else:
            grad_norm = self._cpu_step()
        self.scheduler.step(increment=1)
        return float(grad_norm) if grad_norm is not None else float("nan")

    def _cpu_step(self) -> float:
        from megatron.core import parallel_state as ps

        norm = model_grad_norm(self.params, ps.get_model_parallel_group())
        coeff = self.o.clip_grad / (norm + 1e-6) if self.o.clip_grad > 0 else 1.0
        for p in self.params:
            p.grad = p.main_grad * coeff if coeff < 1.0 else p.main_grad
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        return norm

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if hasattr(self.optimizer, "get_parameter_state_dp_reshardable") and \
                self.ddp.ddp_config.use_distributed_optimizer:  # the distributed optimizer keeps moments apart
            state["param_state"] = self.optimizer.get_parameter_state_dp_reshardable()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "param_state" in state:
            self.optimizer.load_parameter_state_from_dp_reshardable(state["param_state"])
        self.scheduler.load_state_dict(state["scheduler"])
