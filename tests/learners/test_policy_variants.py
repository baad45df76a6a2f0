"""Loss variants against slow per-sample Python references: dual-clip PPO, GSPO's sequence ratio, the
clipped value loss, entropy, and the whole actor objective (pg - entropy + KL loss); extreme log ratios
(+-50) stay finite."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from async_rl.config import AlgoConfig
from learners import losses
from learners.kl import approx_kl
from learners.objective import actor_loss


def ref_policy_loss(logp, logp_old, adv, mask, eps, eps_high, eps_c, weights, per_token, level):
    sample_losses, tok_sum, tok_count = [], 0.0, 0
    for i in range(len(logp)):
        idx = [t for t in range(len(logp[i])) if mask[i][t] > 0]
        seq = sum(logp[i][t] - logp_old[i][t] for t in idx) / max(1, len(idx))
        terms = []
        for t in idx:
            lr = seq if level == "sequence" else logp[i][t] - logp_old[i][t]
            ratio = math.exp(min(max(lr, -20.0), 20.0))
            a = adv[i][t]
            term = max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps_high))
            if eps_c and a < 0:
                term = min(term, -eps_c * a)
            terms.append(term * (weights[i][t] if weights else 1.0))
        tok_sum += sum(terms)
        tok_count += len(terms)
        sample_losses.append(sum(terms) / max(1, len(terms)))
    return tok_sum / max(1, tok_count) if per_token else sum(sample_losses) / len(sample_losses)


def make(seed=0, b=6, t=7, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = logp_old + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[2] = 0.0
    weights = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return logp, logp_old, adv, mask, weights


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_c", [0.0, 1.5])
@pytest.mark.parametrize("per_token", [False, True])
def test_policy_loss_variants_match_reference(level, eps_c, per_token):
    logp, logp_old, adv, mask, weights = make(spread=1.0)
    loss, m = losses.policy_loss(logp, logp_old, adv, mask, 0.2, 0.28, weights, per_token,
                                 eps_clip_c=eps_c, ratio_level=level)
    want = ref_policy_loss(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, eps_c,
                           weights.tolist(), per_token, level)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert 0 <= m["pg_clipfrac"] <= 1


def test_dual_clip_hand_values():
    # A = -1, ratio = e^2 = 7.39: PPO term = max(7.39, 1.2) = 7.39; dual clip caps it at c * |A| = 3
    logp, logp_old = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)
    adv, mask = torch.tensor([[-1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    plain, _ = losses.policy_loss(logp, logp_old, adv, mask, 0.2)
    dual, _ = losses.policy_loss(logp, logp_old, adv, mask, 0.2, eps_clip_c=3.0)
    assert plain.item() == pytest.approx(math.exp(2.0), rel=1e-6) and dual.item() == pytest.approx(3.0)
    # positive advantages are never touched by the dual clip
    pos, _ = losses.policy_loss(logp, logp_old, -adv, mask, 0.2, eps_clip_c=3.0)
    assert pos.item() == pytest.approx(-1.2)


def test_gspo_shares_one_ratio_per_sample():
    # log ratios 0.3 and -0.1: sequence ratio exp(0.1) for both tokens; A = 1 -> loss -exp(0.1)
    logp, logp_old = torch.tensor([[0.3, -0.1]]), torch.zeros(1, 2)
    loss, m = losses.policy_loss(logp, logp_old, torch.ones(1, 2), torch.ones(1, 2), 0.2, ratio_level="sequence")
    assert loss.item() == pytest.approx(-math.exp(0.1), rel=1e-6)
    assert m["ppo_kl"] == pytest.approx(-0.1, rel=1e-5) and m["pg_clipfrac"] == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_c", [0.0, 3.0])
def test_extreme_log_ratios_give_finite_loss_and_grad(level, eps_c):
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[50.0, -50.0, 0.0], [-50.0, 50.0, 50.0]], requires_grad=True)
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, 3)
    loss, m = losses.policy_loss(logp, logp_old, adv, torch.ones(2, 3), 0.2, eps_clip_c=eps_c, ratio_level=level)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and math.isfinite(m["ppo_kl"])


def test_value_loss_matches_reference():
    g = torch.Generator().manual_seed(3)
    values, old, returns = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).double()
    loss, m = losses.value_loss(values, old, returns, mask, value_clip=0.2)
    per_sample = []
    for i in range(4):
        terms = []
        for t in range(5):
            if mask[i, t]:
                v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
                vc = o + min(max(v - o, -0.2), 0.2)
                terms.append(max((v - r) ** 2, (vc - r) ** 2))  # slime: no 0.5
        per_sample.append(sum(terms) / max(1, len(terms)))
    assert loss.item() == pytest.approx(sum(per_sample) / 4, rel=1e-9)
    assert 0 < m["critic/value_clipfrac"] < 1


def test_entropy_matches_definition():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    _, ent = losses.logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.5)
    for i in range(2):
        for t in range(3):
            z = [x / 0.5 for x in logits[i, t].tolist()]
            total = sum(math.exp(x) for x in z)
            p = [math.exp(x) / total for x in z]
            assert ent[i, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-9)


@pytest.mark.parametrize("per_token", [False, True])
def test_actor_objective_is_pg_minus_entropy_plus_kl_loss(per_token):
    g = torch.Generator().manual_seed(5)
    b, t, v = 4, 5, 7
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    lp_all = torch.log_softmax(logits, -1)
    logp = lp_all.gather(-1, targets[..., None])[..., 0]
    rows = {"targets": targets, "mask": mask, "logp_old": logp + 0.1 * torch.randn(b, t, generator=g),
            "advantages": torch.randn(b, t, generator=g, dtype=torch.float64),
            "ref_logp": logp + 0.3 * torch.randn(b, t, generator=g), "tis_weights": torch.rand(b, t, generator=g)}
    a = replace(AlgoConfig(), entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="k3",
                eps_clip_c=3.0, calculate_per_token_loss=per_token)
    loss, m = actor_loss(logits, rows, a, temperature=1.0)
    pg = ref_policy_loss(logp.tolist(), rows["logp_old"].tolist(), rows["advantages"].tolist(), mask.tolist(),
                         0.2, 0.2, 3.0, rows["tis_weights"].tolist(), per_token, "token")
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    kl = approx_kl(logp, rows["ref_logp"], "k3")
    want = (pg - 0.01 * losses.masked_mean(entropy, mask, per_token)
            + 0.05 * losses.masked_mean(kl, mask, per_token))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert m["loss/pg"] == pytest.approx(pg, rel=1e-6)
    assert m["entropy"] == pytest.approx(float((entropy * mask).sum() / mask.sum()), rel=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mode", ["mask", "truncate"])
def test_rejected_tokens_leave_entropy_and_kl_numerators_in_mask_mode(per_token, mode):
    """MIS/IcePop (tis_mode mask): a token whose weight is 0 is dropped from the pg, entropy and KL-loss
    numerators (slime); the denominators stay the loss mask's. Reference: per-sample Python loops."""
    g = torch.Generator().manual_seed(6)
    b, t, v = 4, 6, 5
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).double()
    lp_all = torch.log_softmax(logits, -1)
    logp = lp_all.gather(-1, targets[..., None])[..., 0]
    weights = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5
    weights[torch.rand(b, t, generator=g) < 0.4] = 0.0  # rejected by the mask-mode band
    rows = {"targets": targets, "mask": mask, "logp_old": logp.detach(), "advantages": torch.randn(b, t, generator=g,
            dtype=torch.float64), "ref_logp": logp + 0.3 * torch.randn(b, t, generator=g), "tis_weights": weights}
    a = replace(AlgoConfig(), entropy_coef=0.02, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3",
                tis_mode=mode, calculate_per_token_loss=per_token)
    loss, _ = actor_loss(logits, rows, a, temperature=1.0)
    entropy = (-(lp_all.exp() * lp_all).sum(-1)).tolist()
    kl = approx_kl(logp, rows["ref_logp"], "k3").tolist()
    adv, w, m = rows["advantages"].tolist(), weights.tolist(), mask.tolist()
    sums, counts = [], []
    for i in range(b):
        total, n = 0.0, 0
        for j in range(t):
            if not m[i][j]:
                continue
            n += 1
            keep = 1.0 if (mode == "truncate" or w[i][j] != 0) else 0.0
            total += -adv[i][j] * w[i][j] - 0.02 * entropy[i][j] * keep + 0.1 * kl[i][j] * keep  # ratio 1
        sums.append(total)
        counts.append(n)
    want = sum(sums) / max(1, sum(counts)) if per_token else sum(s / max(1, n) for s, n in zip(sums, counts)) / b
    assert loss.item() == pytest.approx(want, rel=1e-9)
