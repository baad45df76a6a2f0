"""RL math against independent references: plain-Python loops over samples and tokens, and hand values."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from learners import losses


def test_grpo_matches_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = losses.grpo_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # unbiased, like slime
        for i, r in enumerate(row):
            assert adv[g, i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-6)
    # hand value: group 0 has mean 0.5, stdev 0.57735 -> +-0.866
    assert adv[0, 0].item() == pytest.approx(0.8660240, rel=1e-5)


def test_grpo_all_equal_rewards_give_zero_advantage():
    adv = losses.grpo_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))


def test_grpo_without_std_normalization_only_centers():
    adv = losses.grpo_advantages(torch.tensor([[3.0, 1.0]]), std_normalize=False)
    assert adv.tolist() == [[1.0, -1.0]]


def test_tis_weights_clamp_hand_values():
    old = torch.tensor([0.0, 0.0, 0.0, -1.0])
    behavior = torch.tensor([math.log(0.5), 0.0, 2.0, -1.0])
    w = losses.tis_weights(old, behavior, clip=1.5, clip_low=0.2)
    # exp(0 - log .5) = 2 -> clamped 1.5; exp(0) = 1; exp(-2) = .135 -> clamped .2; 1
    assert w.tolist() == pytest.approx([1.5, 1.0, 0.2, 1.0])


def _reference_policy_loss(logp, logp_old, adv, mask, eps, eps_high, weights, per_token):
    """Slow, obviously-correct PPO-clip + TIS: loop over samples and tokens."""
    sample_losses, tok_sum, tok_count = [], 0.0, 0
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[i])):
            if mask[i][t] == 0:
                continue
            ratio = math.exp(logp[i][t] - logp_old[i][t])
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps_high)
            term = max(-adv[i][t] * ratio, -adv[i][t] * clipped_ratio)
            if weights is not None:
                term *= weights[i][t]
            terms.append(term)
        tok_sum += sum(terms)
        tok_count += len(terms)
        sample_losses.append(sum(terms) / max(1, len(terms)))
    return tok_sum / max(1, tok_count) if per_token else sum(sample_losses) / len(sample_losses)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("eps_high", [0.0, 0.28])
def test_policy_loss_matches_reference_loop(per_token, use_weights, eps_high):
    g = torch.Generator().manual_seed(0)
    b, t = 5, 7
    logp_old = -torch.rand(b, t, generator=g) * 3
    logp = logp_old + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[2] = 0.0  # a fully masked sample contributes nothing and does not divide by zero
    weights = torch.rand(b, t, generator=g) * 2 if use_weights else None
    loss, metrics = losses.policy_loss(logp, logp_old, adv, mask, 0.2, eps_high, weights, per_token)
    ref = _reference_policy_loss(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(), 0.2,
                                 eps_high or 0.2, None if weights is None else weights.tolist(), per_token)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert 0.0 <= metrics["pg_clipfrac"] <= 1.0


def test_ratio_exactly_at_clip_boundary_is_not_counted_clipped():
    logp_old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.2, 0.8]], dtype=torch.float64)).float()
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    loss, metrics = losses.policy_loss(logp, logp_old, adv, mask, eps_clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.8) / 2, rel=1e-5)
    assert metrics["pg_clipfrac"] == 0.0


def test_policy_gradient_is_zero_where_clipped():
    logp_old = torch.zeros(1, 1)
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio 1.65 > 1.2 with positive advantage: clipped
    loss, m = losses.policy_loss(logp, logp_old, torch.ones(1, 1), torch.ones(1, 1), eps_clip=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0 and m["pg_clipfrac"] == 1.0


def test_token_logprobs_match_log_softmax_with_temperature():
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    out = losses.token_logprobs(logits, targets, temperature=0.7)
    for i in range(2):
        for t in range(3):
            row = [x / 0.7 for x in logits[i, t].tolist()]
            lse = math.log(sum(math.exp(x) for x in row))
            assert out[i, t].item() == pytest.approx(row[targets[i, t]] - lse, abs=1e-5)


def test_sft_loss_is_mean_nll_of_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert losses.sft_loss(logp, mask).item() == pytest.approx(((1 + 2) / 2 + 6) / 2)
    assert losses.sft_loss(logp, mask, per_token=True).item() == pytest.approx((1 + 2 + 6) / 3)
