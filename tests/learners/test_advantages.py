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
@pytest.mark.parametrize("kl_coef, shaping", [(0.0, False), (0.1, False), (0.1, True)])
def test_grpo_and_gspo_match_reference(estimator, std, kl_coef, shaping):
    rewards, mask, kl, _, spans = make_batch(1)
    a = algo(advantage_estimator=estimator, disable_grpo_std_normalization=not std, kl_coef=kl_coef,
             grpo_kl_reward_shaping=shaping)
    got = compute_advantages(a, rewards, mask, kl).advantages
    shaped = ref_group_norm(rewards, std)
    coef = kl_coef if shaping else 0.0  # slime ignores kl_coef under grpo/gspo unless asked
    want = [[shaped[i] - coef * k for k in tokens(kl, spans, i)] for i in range(len(spans))]
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


# ---- responses with gaps (tool output inside a response carries loss mask 0) ---------------------------

def make_gapped_batch(seed: int, rows: int = 8, width: int = 14):
    """Each row: a response span with 1-2 gaps of masked-out tokens inside; random kl and values
    everywhere (also in the gaps, to catch leaks). Returns the span bounds too."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width)
    bounds = []
    for i in range(rows):
        start = int(torch.randint(0, 3, (1,), generator=g))
        end = int(torch.randint(start + 5, width + 1, (1,), generator=g))
        mask[i, start:end] = 1.0
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            a = int(torch.randint(start + 1, end - 2, (1,), generator=g))
            mask[i, a:a + int(torch.randint(1, 3, (1,), generator=g))] = 0.0
        mask[i, end - 1] = 1.0
        bounds.append((start, end))
    rewards = torch.randint(0, 2, (rows // N, N), generator=g).float()
    return rewards, mask, torch.randn(rows, width, generator=g) * 0.3, torch.randn(rows, width, generator=g), bounds


def on_positions(mask, i) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[i, t] > 0]


def test_gae_issue_example_carries_credit_across_the_gap():
    # rewards [1], mask [1,1,0,0,1,1], V = 0, gamma = lambd = 1: slime gives 1 on every token of the response
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    out = compute_advantages(algo(advantage_estimator="ppo"), torch.tensor([[1.0]]), mask,
                             values=torch.zeros(1, 6))
    assert out.advantages.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    assert out.returns.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


@pytest.mark.parametrize("gamma, lambd", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_ppo_gae_over_gaps_is_gae_over_the_policy_tokens(gamma, lambd):
    """Reference: slime's per-sample GAE run on the sequence of masked tokens alone (gaps removed)."""
    rewards, mask, kl, values, _ = make_gapped_batch(11)
    out = compute_advantages(algo(advantage_estimator="ppo", kl_coef=0.1, gamma=gamma, lambd=lambd),
                             rewards, mask, kl, values)
    flat = rewards.flatten().tolist()
    want_adv, want_ret = torch.zeros_like(mask), torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        pos = on_positions(mask, i)
        r = [-0.1 * float(kl[i, t]) for t in pos]
        r[-1] += flat[i]
        adv, ret = ref_gae(r, [float(values[i, t]) for t in pos], gamma, lambd)
        want_adv[i, pos], want_ret[i, pos] = torch.tensor(adv), torch.tensor(ret)
    assert torch.allclose(out.advantages, want_adv, atol=1e-5)
    assert torch.allclose(out.returns, want_ret, atol=1e-5)


def test_ppo_gae_over_gaps_equals_slime_at_gamma_lambda_one():
    """slime runs GAE over every response token, tool tokens included (their own values, zero reward);
    at gamma = lambd = 1 the values telescope, so on trained tokens both must agree exactly."""
    rewards, mask, kl, values, bounds = make_gapped_batch(12)
    out = compute_advantages(algo(advantage_estimator="ppo", kl_coef=0.1), rewards, mask, kl, values)
    flat = rewards.flatten().tolist()
    for i, (start, end) in enumerate(bounds):
        r = [-0.1 * float(kl[i, t]) * float(mask[i, t]) for t in range(start, end)]
        r[-1] += flat[i]
        adv, _ = ref_gae(r, [float(values[i, t]) for t in range(start, end)], 1.0, 1.0)
        for t in on_positions(mask, i):
            assert out.advantages[i, t].item() == pytest.approx(adv[t - start], abs=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_returns_cross_gaps(gamma):
    rewards, mask, kl, _, _ = make_gapped_batch(13)
    got = compute_advantages(algo(advantage_estimator="reinforce_plus_plus", kl_coef=0.05, gamma=gamma),
                             rewards, mask, kl).advantages
    flat, per_sample = rewards.flatten().tolist(), []
    for i in range(mask.shape[0]):
        r = [-0.05 * float(kl[i, t]) for t in on_positions(mask, i)]
        r[-1] += flat[i]
        g, out = 0.0, []
        for x in reversed(r):
            g = x + gamma * g
            out.insert(0, g)
        per_sample.append(out)
    want = torch.zeros_like(mask)
    for i, w in enumerate(ref_whiten(per_sample)):
        want[i, on_positions(mask, i)] = torch.tensor(w)
    assert torch.allclose(got, want, atol=1e-5)


# ---- groups whose rewards are all equal teach nothing: exactly zero -----------------------------------

UNIFORM_VALUES = [0.7, 0.1, 1 / 3, 2 / 3, 0.9, 1e-3, 12.345, -0.3, 0.55, 1e6 + 0.1, 0.0, 1.0]


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "reinforce_plus_plus_baseline"])
@pytest.mark.parametrize("n", [2, 3, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_groups_are_exactly_zero(estimator, n, dtype):
    # float32 group statistics gave |A| up to 0.056 for 16 rewards of 0.7; a uniform group must give 0
    rewards = torch.tensor([[v] * n for v in UNIFORM_VALUES], dtype=dtype)
    mask = torch.ones(rewards.numel(), 3)
    adv = compute_advantages(algo(advantage_estimator=estimator), rewards, mask).advantages
    assert (adv == 0).all(), (adv.abs().max().item())


def test_rewards_equal_up_to_rounding_count_as_uniform_but_real_differences_do_not():
    rewards = torch.tensor([[0.1 + 0.2, 0.3, 0.3, 0.1 + 0.2],       # float64 rounding: uniform
                            [0.3, 0.3, 0.3, 0.3 + 1e-4]], dtype=torch.float64)  # a real difference
    adv = compute_advantages(algo(), rewards, torch.ones(8, 2)).advantages
    assert (adv[:4] == 0).all()
    want = ref_group_norm(rewards, std=True)[4:]
    assert torch.allclose(adv[4:, 0], torch.tensor(want, dtype=adv.dtype), atol=1e-4)
    assert adv[7, 0] > 1.0
