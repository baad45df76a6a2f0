"""Losses shared by every learner, as pure functions over padded [batch, tokens] tensors with a loss mask.

Conventions: `mask` is 1.0 on response tokens that carry loss, 0.0 elsewhere (prompt, padding). A sample
whose mask is all zero contributes nothing (its denominator is clamped to 1, never divided by zero).
Reduction (`masked_mean`): per sample then over samples (slime's default), or per token over the whole
global batch (`calculate_per_token_loss`). PPO log ratios are clamped to [-20, 20] before exp (as verl
does), so extreme values give large but finite losses, never inf or nan.
Advantage estimators live in `learners.advantages`, KL estimators in `learners.kl`, importance weights
in `learners.offpolicy`; `grpo_advantages` is re-exported here for existing callers.
"""
from __future__ import annotations

import torch

from learners.advantages import grpo_advantages  # noqa: F401  (re-export)

_LOG_RATIO_BOUND = 20.0


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per position under softmax(logits / temperature); logits [B, T, V], targets [B, T]."""
    return logprobs_and_entropy(logits, targets, temperature, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(target), entropy of pi) per position, pi = softmax(logits / temperature); one log_softmax."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1) if with_entropy else None
    return logp, entropy


def tis_weights(logp_old: torch.Tensor, logp_behavior: torch.Tensor, clip: float, clip_low: float) -> torch.Tensor:
    """Truncated importance sampling per token: clamp(exp(logp_old - logp_behavior), clip_low, clip).

    The token/truncate case of `learners.offpolicy.importance_weights`, which also has sequence levels,
    mask mode (MIS/IcePop) and metrics.
    """
    log_ratio = (logp_old - logp_behavior).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(log_ratio), min=clip_low, max=clip)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, per_token: bool,
                token_denominator: float | None = None) -> torch.Tensor:
    """Per-sample mean over masked tokens, then mean over samples; or (per_token) sum / token count.

    `token_denominator` lets gradient accumulation divide by the whole global batch's token count.
    """
    if per_token:
        denom = token_denominator if token_denominator is not None else mask.sum().clamp(min=1.0)
        return (values * mask).sum() / denom
    per_sample = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_sample.mean()


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_clip: float, eps_clip_high: float = 0.0, weights: torch.Tensor | None = None,
                per_token: bool = False, token_denominator: float | None = None, *, eps_clip_c: float = 0.0,
                ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, each token's term multiplied by its importance weight (if given).

    ratio_level `token`: ratio = pi / pi_old per token (PPO); `sequence`: ratio = exp(mean over the
    sample's masked tokens of log pi - log pi_old), shared by its tokens (GSPO). Clip to
    [1 - eps_clip, 1 + eps_clip_high (or eps_clip)]; with dual clip (eps_clip_c > 1), a negative-advantage
    token's term is also capped at -eps_clip_c * A (slime / Ye et al. 2020).
    Returns the loss and detached metrics: pg_clipfrac (tokens where the clipped term was chosen) and
    ppo_kl (mean -log ratio over masked tokens).
    """
    high = eps_clip_high if eps_clip_high > 0 else eps_clip
    log_ratio = logp - logp_old
    if ratio_level == "sequence":
        seq = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + high)
    per_tok = torch.maximum(unclipped, clipped)
    if eps_clip_c > 0:
        per_tok = torch.where(advantages < 0, torch.minimum(per_tok, -eps_clip_c * advantages), per_tok)
    if weights is not None:
        per_tok = per_tok * weights
    loss = masked_mean(per_tok, mask, per_token, token_denominator)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"pg_clipfrac": float(((clipped > unclipped).float() * mask).sum() / n),
                   "ppo_kl": float((-log_ratio * mask).sum() / n)}
    return loss, metrics


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float, per_token: bool = False,
               token_denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clamp(V - V_old, -c, c) - R)^2) (PPO / OpenRLHF)."""
    clipped_values = values_old + (values - values_old).clamp(-value_clip, value_clip)
    unclipped = (values - returns).square()
    clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask, per_token, token_denominator)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"critic/value_clipfrac": float(((clipped > unclipped).float() * mask).sum() / n)}
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, per_token: bool = False,
             token_denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the response tokens."""
    return masked_mean(-logp, mask, per_token, token_denominator)
