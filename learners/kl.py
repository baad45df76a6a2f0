"""KL estimators between the policy and a reference policy, per token (Schulman's k1/k2/k3).

Convention (slime's `compute_approx_kl`): `log_ratio = logp - logp_ref`, where `logp` is the policy being
penalised and samples come from it, so every estimator estimates KL(pi || pi_ref):
  k1 = log_ratio                          unbiased, can be negative
  k2 = log_ratio**2 / 2                   biased, non-negative
  k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, non-negative (r - 1 - log r with r = pi_ref / pi)
  low_var_kl = k3 on a log ratio clamped to [-20, 20], then clamped to [-10, 10] (verl / slime), so an
               extreme token cannot blow up the loss.
"""
from __future__ import annotations

import torch

from async_rl.config import AlgoConfig, field_choices

KL_TYPES = field_choices(AlgoConfig, "kl_loss_type")

# Every log ratio (PPO, TIS/MIS, KL) is clamped to +-LOG_RATIO_BOUND before exp: exp(20) ~ 4.9e8 stays finite
# in float32 (verl's bound for low_var_kl, slime's MIS safety bound).
LOG_RATIO_BOUND = 20.0


def approx_kl(logp: torch.Tensor, logp_ref: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate of type `kl_type` (one of KL_TYPES); same shape as `logp`."""
    dtype = torch.promote_types(logp.dtype, torch.float32)  # at least fp32, keeps fp64
    log_ratio = logp.to(dtype) - logp_ref.to(dtype)
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return log_ratio.square() / 2.0
    if kl_type == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    if kl_type == "low_var_kl":
        log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-10.0, 10.0)
    raise ValueError(f"algo.kl_loss_type={kl_type!r}: must be one of {list(KL_TYPES)}")
