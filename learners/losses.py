"""RL math shared by every learner, as pure functions over padded [batch, tokens] tensors with a loss mask.

Conventions: `mask` is 1.0 on response tokens that carry loss, 0.0 elsewhere (prompt, padding). A sample
whose mask is all zero contributes nothing (its denominator is clamped to 1, never divided by zero).
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per position under softmax(logits / temperature); logits [B, T, V], targets [B, T]."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def grpo_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: reward minus its group mean, divided by the group std (unbiased) + eps; rewards [groups, n]."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not std_normalize or rewards.shape[-1] < 2:
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True) + eps)


def tis_weights(logp_old: torch.Tensor, logp_behavior: torch.Tensor, clip: float, clip_low: float) -> torch.Tensor:
    """Truncated importance sampling per token: clamp(exp(logp_old - logp_behavior), clip_low, clip)."""
    return torch.clamp(torch.exp(logp_old - logp_behavior), min=clip_low, max=clip)


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
                per_token: bool = False, token_denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, each token's term multiplied by its TIS weight (if given).

    Returns the loss and detached metrics: pg_clipfrac (tokens where the clipped term was chosen) and
    ppo_kl (mean logp_old - logp over masked tokens).
    """
    high = eps_clip_high if eps_clip_high > 0 else eps_clip
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + high)
    per_tok = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_tok = per_tok * weights
    loss = masked_mean(per_tok, mask, per_token, token_denominator)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"pg_clipfrac": float(((clipped > unclipped).float() * mask).sum() / n),
                   "ppo_kl": float(((logp_old - logp) * mask).sum() / n)}
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, per_token: bool = False,
             token_denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the response tokens."""
    return masked_mean(-logp, mask, per_token, token_denominator)
