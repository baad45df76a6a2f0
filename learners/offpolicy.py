"""Off-policy correction between the behavior policy (the engine that generated a token, possibly several
versions old) and the proximal policy the learner trains against (decoupled PPO).

Decoupled PPO (the default): the PPO ratio is pi_theta / pi_prox with `logp_old` = the learner's own
recomputation at the version it trains at, and each token's policy-gradient term is multiplied by an
importance weight built from pi_prox / pi_behavior. With `use_rollout_logprobs`, `logp_old` *is* the
behavior logprob, so every weight is exactly 1.

Levels (`tis_level`) say what ratio a token gets:
  token               its own ratio exp(logp_old - logp_behavior)
  sequence_product    exp(sum over the sample's masked tokens of the log ratio), shared by all its tokens
  sequence_geometric  exp(mean over the sample's masked tokens of the log ratio), shared by all its tokens
Modes (`tis_mode`): `truncate` clamps the ratio into [tis_clip_low, tis_clip] (TIS); `mask` keeps the
ratio inside that band and zeroes tokens (or whole samples, for sequence levels) outside it (MIS/IcePop).
A ratio exactly on a band edge is inside. Weights are 0 off the loss mask, and every log ratio is clamped
to [-20, 20] before exp, so extreme values never produce inf or nan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from async_rl.config import AlgoConfig, field_choices
from learners.kl import LOG_RATIO_BOUND as _LOG_RATIO_BOUND

TIS_LEVELS = field_choices(AlgoConfig, "tis_level")
TIS_MODES = field_choices(AlgoConfig, "tis_mode")


@dataclass
class ImportanceWeights:
    weights: torch.Tensor  # [B, T] multiplies each token's pg term; 0 off-mask
    outside: torch.Tensor  # [B, T] bool, the raw ratio left [clip_low, clip] (counted in tis/clipfrac)


def level_log_ratio(logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor,
                    level: str) -> torch.Tensor:
    """Per-token log ratio at `level`, broadcast back to [B, T] for sequence levels; 0 off-mask."""
    log_ratio = (logp_old - logp_behavior) * mask
    if level == "token":
        return log_ratio
    total = log_ratio.sum(dim=-1, keepdim=True)
    if level == "sequence_product":
        return total.expand_as(log_ratio) * mask
    if level == "sequence_geometric":
        return (total / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)).expand_as(log_ratio) * mask
    raise ValueError(f"algo.tis_level={level!r}: must be one of {list(TIS_LEVELS)}")


def importance_weights(logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor,
                       clip: float, clip_low: float, level: str = "token",
                       mode: str = "truncate") -> ImportanceWeights:
    """TIS / MIS weights of every token (see the module docstring for levels and modes)."""
    log_ratio = level_log_ratio(logp_old, logp_behavior, mask, level)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    outside = ((ratio < clip_low) | (ratio > clip)) & (mask > 0)
    if mode == "truncate":
        weights = ratio.clamp(min=clip_low, max=clip)
    elif mode == "mask":
        weights = torch.where(outside, torch.zeros_like(ratio), ratio)
    else:
        raise ValueError(f"algo.tis_mode={mode!r}: must be one of {list(TIS_MODES)}")
    return ImportanceWeights(weights * mask, outside)


def custom_weights(fn, logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor,
                   algo) -> ImportanceWeights:
    """Call a `custom_tis_function_path` plug-in and check what it returned.

    A token counts as clipped when the plug-in's weight differs from its raw token ratio.
    """
    weights = fn(logp_old, logp_behavior, mask, algo)
    if not isinstance(weights, torch.Tensor) or weights.shape != mask.shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"algo.custom_tis_function_path={algo.custom_tis_function_path!r}: returned {got}; "
                         f"it must return a float tensor shaped like mask {tuple(mask.shape)}")
    weights = weights.detach().float() * mask
    raw = torch.exp((logp_old - logp_behavior).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    outside = ~torch.isclose(weights, raw, rtol=1e-5, atol=1e-7) & (mask > 0)
    return ImportanceWeights(weights, outside)


def tis_stats(iw: ImportanceWeights, mask: torch.Tensor) -> dict:
    """`tis/weight_mean` and `tis/clipfrac` over the masked tokens."""
    on = mask > 0
    n = max(1, int(on.sum()))
    return {"tis/weight_mean": float(iw.weights[on].sum()) / n,
            "tis/clipfrac": float(iw.outside[on].float().sum()) / n}
