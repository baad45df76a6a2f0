"""One optimizer step by gradient accumulation over micro-batches, shared by the actor and the critic.

Scaling keeps the gradient equal to that of one pass over the whole mini-batch: per-sample losses
(a mean over the micro-batch's samples) are scaled by 1 / n_micro; per-token losses are already divided by
the mini-batch's token count and are summed. Metrics named `loss/...` are scaled like the loss (they sum
to the mini-batch value); every other metric is averaged over micro-batches.
"""
from __future__ import annotations

from typing import Callable

import torch


def build_optimizer(params, o, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the optimizer section's betas, eps and weight decay (lr overrides o.lr)."""
    return torch.optim.AdamW(params, lr=o.lr if lr is None else lr, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=o.weight_decay)


def micro_slices(start: int, size: int, micro: int) -> list[slice]:
    return [slice(i, min(i + micro, start + size)) for i in range(start, start + size, micro)]


def accumulate_step(params: list, optimizer: torch.optim.Optimizer, slices: list[slice],
                    loss_fn: Callable[[slice], tuple[torch.Tensor, dict]], per_token: bool,
                    clip_grad: float) -> dict:
    """zero_grad, backward every micro-batch's loss_fn(slice), clip, step; returns loss, grad_norm, metrics."""
    optimizer.zero_grad(set_to_none=True)
    scale = 1.0 if per_token else 1.0 / len(slices)
    total, metrics = 0.0, {}
    for sl in slices:
        loss, m = loss_fn(sl)
        (loss * scale).backward()
        total += loss.item() * scale
        for key, value in m.items():
            weight = scale if key.startswith("loss/") else 1.0 / len(slices)
            metrics[key] = metrics.get(key, 0.0) + value * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
    optimizer.step()
    return {"loss": total, "grad_norm": float(grad_norm), **metrics}
