"""Advantage estimators against slow per-sample Python references (lists, loops, the statistics module)
and hand values; edge cases: all-equal rewards in a group, a fully masked sample, a group of one."""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import pytest
import torch

from async_rl.config import AlgoConfig
from learners.advantages import compute_advantages, masked_whiten, pass_at_k

N = 4  # samples per group


def make_batch(seed: int, groups: int = 3, width: int = 9, empty: int | None = None):
    """Rewards [groups, N], a mask with one contiguous response span per row at a random offset,
    per-token kl and values that are random everywhere (also off-mask, to catch leaks)."""
    g = torch.Generator().manual_seed(seed)
    b = groups * N
    rewards = torch.randint(0, 2, (groups, N), generator=g).float()
    mask = torch.zeros(b, width)
    spans = []
    for i in range(b):
        length = int(torch.randint(1, 5, (1,), generator=g))
        start = int(torch.randint(0, width - length + 1, (1,), generator=g))
        if i == empty:
            length = 0
        mask[i, start:start + length] = 1.0
        spans.append((start, length))
    kl = torch.randn(b, width, generator=g) * 0.3
    values = torch.randn(b, width, generator=g)
    return rewards, mask, kl, values, spans


def tokens(x: torch.Tensor, spans, i) -> list[float]:
    start, length = spans[i]
    return x[i, start:start + length].tolist()


def scatter(per_sample: list[list[float]], spans, width) -> torch.Tensor:
    out = torch.zeros(len(spans), width)
    for i, (start, length) in enumerate(spans):
        out[i, start:start + length] = torch.tensor(per_sample[i]) if length else 0.0
    return out


def ref_whiten(per_sample: list[list[float]]) -> list[list[float]]:
    flat = [x for s in per_sample for x in s]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in s] for s in per_sample]


def ref_group_norm(rewards, std: bool) -> list[float]:
    out = []
    for row in rewards.tolist():
        mean = statistics.mean(row)
        sd = statistics.stdev(row) if std else None
        out += [(r - mean) / (sd + 1e-6) if std else r - mean for r in row]
    return out


def algo(**kw) -> AlgoConfig:
    return replace(AlgoConfig(), **kw)


@pytest.mark.parametrize("estimator", ["grpo", "gspo"])
@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_and_gspo_match_reference(estimator, std, kl_coef):
    rewards, mask, kl, _, spans = make_batch(1)
    a = algo(advantage_estimator=estimator, disable_grpo_std_normalization=not std, kl_coef=kl_coef)
    got = compute_advantages(a, rewards, mask, kl).advantages
    shaped = ref_group_norm(rewards, std)
    want = [[shaped[i] - kl_coef * k for k in tokens(kl, spans, i)] for i in range(len(spans))]
    assert torch.allclose(got, scatter(want, spans, mask.shape[1]), atol=1e-5)


def test_disable_rewards_normalization_uses_raw_rewards():
    rewards, mask, _, _, spans = make_batch(2)
    got = compute_advantages(algo(disable_rewards_normalization=True), rewards, mask).advantages
    flat = rewards.flatten().tolist()
    want = [[flat[i]] * spans[i][1] for i in range(len(spans))]
    assert torch.equal(got, scatter(want, spans, mask.shape[1]))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_matches_reference(gamma):
    rewards, mask, kl, _, spans = make_batch(3)
    a = algo(advantage_estimator="reinforce_plus_plus", kl_coef=0.05, gamma=gamma)
    got = compute_advantages(a, rewards, mask, kl).advantages
    flat, returns = rewards.flatten().tolist(), []
    for i in range(len(spans)):
        r = [-0.05 * k for k in tokens(kl, spans, i)]
        r[-1] += flat[i]
        g, out = 0.0, []
        for x in reversed(r):
            g = x + gamma * g
            out.insert(0, g)
        returns.append(out)
    assert torch.allclose(got, scatter(ref_whiten(returns), spans, mask.shape[1]), atol=1e-5)


def test_reinforce_plus_plus_baseline_matches_reference():
    rewards, mask, kl, _, spans = make_batch(4)
    a = algo(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.2)
    got = compute_advantages(a, rewards, mask, kl).advantages
    centered = ref_group_norm(rewards, std=False)
    want = [[centered[i] - 0.2 * k for k in tokens(kl, spans, i)] for i in range(len(spans))]
    assert torch.allclose(got, scatter(ref_whiten(want), spans, mask.shape[1]), atol=1e-5)


def ref_gae(rewards: list[float], values: list[float], gamma: float, lambd: float):
    """slime's get_advantages_and_returns, one sample."""
    last, adv = 0.0, []
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t < len(rewards) - 1 else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lambd * last
        adv.insert(0, last)
    return adv, [x + v for x, v in zip(adv, values)]


@pytest.mark.parametrize("gamma, lambd", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_ppo_gae_matches_reference(gamma, lambd):
    rewards, mask, kl, values, spans = make_batch(5)
    a = algo(advantage_estimator="ppo", kl_coef=0.1, gamma=gamma, lambd=lambd)
    out = compute_advantages(a, rewards, mask, kl, values)
    flat, advs, rets = rewards.flatten().tolist(), [], []
    for i in range(len(spans)):
        r = [-0.1 * k for k in tokens(kl, spans, i)]
        r[-1] += flat[i]
        adv, ret = ref_gae(r, tokens(values, spans, i), gamma, lambd)
        advs.append(adv)
        rets.append(ret)
    assert torch.allclose(out.advantages, scatter(advs, spans, mask.shape[1]), atol=1e-5)
    assert torch.allclose(out.returns, scatter(rets, spans, mask.shape[1]), atol=1e-5)


def test_ppo_hand_values():
    # one sample, two tokens, reward 1, gamma = lambd = 1, V = [0.5, 0.25]:
    # delta1 = 1 + 0 - .25 = .75 ; delta0 = 0 + .25 - .5 = -.25 ; A = [-.25 + .75, .75] = [.5, .75]
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.25]])
    out = compute_advantages(algo(advantage_estimator="ppo"), torch.tensor([[1.0]]), mask, values=values)
    assert out.advantages.tolist() == [[0.0, 0.5, 0.75]] and out.returns.tolist() == [[0.0, 1.0, 1.0]]


def test_normalize_advantages_whitens_masked_tokens():
    rewards, mask, _, _, spans = make_batch(6)
    got = compute_advantages(algo(normalize_advantages=True), rewards, mask).advantages
    shaped = ref_group_norm(rewards, std=True)
    want = ref_whiten([[shaped[i]] * spans[i][1] for i in range(len(spans))])
    assert torch.allclose(got, scatter(want, spans, mask.shape[1]), atol=1e-5)
    assert abs(float(got[mask.bool()].mean())) < 1e-5


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                       "ppo"])
def test_fully_masked_sample_gets_zero_and_nothing_is_nan(estimator):
    rewards, mask, kl, values, spans = make_batch(7, empty=5)
    a = algo(advantage_estimator=estimator, kl_coef=0.1, normalize_advantages=True)
    out = compute_advantages(a, rewards, mask, kl, values)
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[5].abs().sum() == 0
    assert (out.advantages[~mask.bool()] == 0).all()


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "reinforce_plus_plus_baseline"])
def test_all_equal_rewards_give_zero_advantages(estimator):
    rewards = torch.ones(2, N)
    mask = torch.ones(2 * N, 3)
    adv = compute_advantages(algo(advantage_estimator=estimator), rewards, mask).advantages
    assert torch.isfinite(adv).all() and adv.abs().max() == 0


def test_group_of_one_is_centered_only():
    adv = compute_advantages(algo(), torch.tensor([[1.0], [0.0]]), torch.ones(2, 2)).advantages
    assert adv.abs().max() == 0


def test_masked_whiten_hand_values():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(values, mask)  # mean 2, unbiased var 1
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)


def ref_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                            [0.0] * 8,
                            [1.0] * 7 + [0.0],
                            [0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # 0.5 is not a pass
    got = pass_at_k(rewards)
    assert sorted(got) == ["pass@1", "pass@2", "pass@4", "pass@8"]
    for k in (1, 2, 4, 8):
        want = statistics.mean(ref_pass_at_k([r >= 1 for r in row], k) for row in rewards.tolist())
        assert got[f"pass@{k}"] == pytest.approx(want)
    assert got["pass@1"] == pytest.approx((2 + 0 + 7 + 1) / 32)
