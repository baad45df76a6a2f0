"""Advantage estimators over padded [B, T] token tensors, B = groups * n_samples_per_prompt in group-major
order (sample i belongs to group i // n), with slime's names and formulas.

Conventions: `mask` is 1 on response tokens carrying loss. A response may have gaps: multi-turn and tool
rollouts put mask 0 on tool output inside a response. Such tokens are not the policy's actions, but they
do not end the episode either: returns and GAE pass across them unchanged (no reward, no discount, no
value of their own), so earlier turns get credit for the final reward. Every returned tensor is 0 off
the mask. `kl` is the per-token KL estimate between logp_old and the reference policy (None: no
reference). A fully masked sample gets all-zero advantages.

Group statistics are computed in float64, and a group whose rewards are all equal gets advantages of
exactly 0 (it teaches nothing, so it must not push the policy by rounding error); "equal" allows float32
rounding (a spread within 4 float32 ulps of the group's largest |reward|, at least 1).

  grpo / gspo                  (reward - group mean) / (group std + 1e-6) on every token (the std division
                               is dropped by disable_grpo_std_normalization, the whole group normalisation
                               by disable_rewards_normalization). kl_coef is ignored, as in slime, unless
                               grpo_kl_reward_shaping subtracts kl_coef * kl per token.
  reinforce_plus_plus          token rewards -kl_coef * kl with the reward added on the last response
                               token, discounted returns G_t = r_t + gamma * G_{t+1}, whitened over the batch.
  reinforce_plus_plus_baseline (reward - group mean) - kl_coef * kl per token, whitened over the batch.
  ppo                          the same token rewards as reinforce_plus_plus, GAE(gamma, lambd) against the
                               critic's values; returns = advantages + values (the critic's targets).
`normalize_advantages` whitens the others too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from async_rl.config import AlgoConfig, field_choices

_UNIFORM_RTOL = 4 * torch.finfo(torch.float32).eps
ESTIMATORS = field_choices(AlgoConfig, "advantage_estimator")


@dataclass
class Advantages:
    advantages: torch.Tensor        # [B, T]
    returns: torch.Tensor | None    # [B, T] value targets (ppo), else None


def grpo_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: reward minus its group mean, divided by the group std (unbiased) + eps; rewards [groups, n].

    In float64, and exactly 0 for a group whose rewards are all equal (whatever their float rounding).
    """
    r = rewards.to(torch.float64)
    centered = r - r.mean(dim=-1, keepdim=True)
    spread = r.amax(dim=-1, keepdim=True) - r.amin(dim=-1, keepdim=True)
    # equal up to float32 rounding (e.g. 0.1 + 0.2 vs 0.3 from two reward paths) counts as equal
    uniform = spread <= _UNIFORM_RTOL * r.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    centered = torch.where(uniform, torch.zeros_like(centered), centered)
    if std_normalize and rewards.shape[-1] >= 2:
        centered = centered / (r.std(dim=-1, keepdim=True) + eps)
    return centered.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and unbiased var over masked entries; 0 off-mask."""
    n = mask.sum()
    if n < 1:
        return values * mask
    mean = (values * mask).sum() / n
    centered = (values - mean) * mask
    if n < 2:
        return centered
    var = centered.square().sum() / (n - 1)
    return centered * torch.rsqrt(var + eps)


def token_level_rewards(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                        kl_coef: float) -> torch.Tensor:
    """-kl_coef * kl on every response token plus the sample's reward on its last response token."""
    out = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (mask * positions).argmax(dim=-1)   # index of the last masked token
    has_tokens = mask.sum(dim=-1) > 0          # a fully masked sample gets no reward token
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last] += torch.where(has_tokens, rewards.to(out.dtype), torch.zeros_like(out[rows, last]))
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t'} along each row, t' the next masked token; a masked-out token passes G on
    unchanged (a tool-output gap inside a response neither ends nor discounts the return)."""
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[-1])):
        on = mask[:, t] > 0
        running = torch.where(on, token_rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; V after the last token is 0.

    The TD step of a masked token t bootstraps from the next masked token t' (delta_t = r_t + gamma *
    V_t' - V_t, A_t = delta_t + gamma * lambd * A_t'); masked-out tokens in between carry V_t' and A_t'
    unchanged. Returns (advantages, returns = advantages + values), both 0 off-mask.
    """
    values = values * mask
    adv = torch.zeros_like(token_rewards)
    last_gae = torch.zeros_like(token_rewards[:, 0])
    next_value = torch.zeros_like(last_gae)
    for t in reversed(range(token_rewards.shape[-1])):
        on = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = torch.where(on, delta + gamma * lambd * last_gae, last_gae)
        next_value = torch.where(on, values[:, t], next_value)
        adv[:, t] = last_gae
    adv = adv * mask
    return adv, (adv + values) * mask


def compute_advantages(algo, rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> Advantages:
    """Advantages (and ppo returns) of a batch; rewards [groups, n], mask / kl / values [B, T]."""
    est = algo.advantage_estimator
    kl = torch.zeros_like(mask) if kl is None else kl
    flat = rewards.flatten()
    returns = None
    if est in ("grpo", "gspo"):
        shaped = flat if algo.disable_rewards_normalization else \
            grpo_advantages(rewards, not algo.disable_grpo_std_normalization).flatten()
        kl_coef = algo.kl_coef if algo.grpo_kl_reward_shaping else 0.0  # slime ignores kl_coef here
        adv = (shaped[:, None] - kl_coef * kl) * mask
    elif est == "reinforce_plus_plus_baseline":
        shaped = flat if algo.disable_rewards_normalization else \
            grpo_advantages(rewards, std_normalize=False).flatten()
        adv = masked_whiten((shaped[:, None] - algo.kl_coef * kl) * mask, mask)
    elif est == "reinforce_plus_plus":
        tok = token_level_rewards(flat, kl, mask, algo.kl_coef)
        adv = masked_whiten(discounted_returns(tok, mask, algo.gamma), mask)
    elif est == "ppo":
        if values is None:
            raise ValueError("advantage_estimator='ppo' needs the critic's values")
        tok = token_level_rewards(flat, kl, mask, algo.kl_coef)
        adv, returns = gae(tok, values, mask, algo.gamma, algo.lambd)
    else:
        raise ValueError(f"algo.advantage_estimator={est!r}: must be one of {list(ESTIMATORS)}")
    if algo.normalize_advantages and est not in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        adv = masked_whiten(adv, mask)
    return Advantages(adv, returns)


def pass_at_k(rewards: torch.Tensor) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021) averaged over groups, for k = 1, 2, 4, ... <= n.

    rewards [groups, n]; a sample is correct when its reward is >= 1 (slime counts reward == 1).
    pass@k of a group with c correct of n = 1 - C(n - c, k) / C(n, k).
    """
    n = rewards.shape[-1]
    correct = (rewards >= 1.0).sum(dim=-1).tolist()
    out, k = {}, 1
    while k <= n:
        out[f"pass@{k}"] = sum(1.0 - math.comb(n - c, k) / math.comb(n, k) for c in correct) / len(correct)
        k *= 2
    return out
