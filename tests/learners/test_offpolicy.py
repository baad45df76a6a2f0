"""Importance weights (TIS / MIS) against a per-sample Python reference for every level x mode, plus
edge cases: ratios exactly on the band edges, a fully masked sample, extreme log ratios (+-50)."""
from __future__ import annotations

import math

import pytest
import torch

from learners import losses
from learners.offpolicy import TIS_LEVELS, TIS_MODES, custom_weights, importance_weights, tis_stats


def ref_weights(logp_old, logp_beh, mask, clip, clip_low, level, mode):
    """Per sample: collect the masked tokens' log ratios, aggregate by level, then truncate or mask."""
    out = []
    for i in range(len(mask)):
        idx = [t for t in range(len(mask[i])) if mask[i][t] > 0]
        diffs = [logp_old[i][t] - logp_beh[i][t] for t in idx]
        row = [0.0] * len(mask[i])
        for j, t in enumerate(idx):
            if level == "token":
                lr = diffs[j]
            elif level == "sequence_product":
                lr = sum(diffs)
            else:
                lr = sum(diffs) / len(diffs)
            ratio = math.exp(min(max(lr, -20.0), 20.0))
            if mode == "truncate":
                row[t] = min(max(ratio, clip_low), clip)
            else:
                row[t] = ratio if clip_low <= ratio <= clip else 0.0
        out.append(row)
    return out


def make(seed=0, b=5, t=6):
    g = torch.Generator().manual_seed(seed)
    logp_beh = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp_old = logp_beh + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[3] = 0.0  # a fully masked sample
    return logp_old, logp_beh, mask


@pytest.mark.parametrize("level", TIS_LEVELS)
@pytest.mark.parametrize("mode", TIS_MODES)
def test_every_level_and_mode_matches_reference(level, mode):
    logp_old, logp_beh, mask = make()
    iw = importance_weights(logp_old, logp_beh, mask, 1.5, 0.5, level, mode)
    want = torch.tensor(ref_weights(logp_old.tolist(), logp_beh.tolist(), mask.tolist(), 1.5, 0.5, level, mode),
                        dtype=torch.float64)
    assert torch.allclose(iw.weights, want, atol=1e-9)
    assert iw.weights[3].abs().sum() == 0 and not iw.outside[3].any()
    if level != "token":  # one ratio per sample: every token of a sample is in or out together
        for i in range(len(mask)):
            on = mask[i] > 0
            assert iw.outside[i][on].all() or not iw.outside[i][on].any()


def test_token_truncate_equals_legacy_tis_weights():
    logp_old, logp_beh, mask = make(1)
    iw = importance_weights(logp_old, logp_beh, mask, 2.0, 0.1)
    legacy = losses.tis_weights(logp_old, logp_beh, 2.0, 0.1) * mask
    assert torch.allclose(iw.weights, legacy)


def test_ratio_exactly_on_the_band_edges_is_inside():
    high = float(torch.exp(torch.tensor(0.5)))  # the exact float32 the function computes
    logp_old = torch.tensor([[0.0, 0.5, 0.6]])
    logp_beh = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    for mode in TIS_MODES:
        iw = importance_weights(logp_old, logp_beh, mask, clip=high, clip_low=1.0, mode=mode)
        assert iw.outside.tolist() == [[False, False, True]]
        assert iw.weights[0, :2].tolist() == [1.0, high]
    assert importance_weights(logp_old, logp_beh, mask, high, 1.0, mode="mask").weights[0, 2].item() == 0.0
    assert importance_weights(logp_old, logp_beh, mask, high, 1.0).weights[0, 2].item() == high


@pytest.mark.parametrize("level", TIS_LEVELS)
@pytest.mark.parametrize("mode", TIS_MODES)
def test_extreme_log_ratios_are_finite(level, mode):
    logp_old = torch.tensor([[0.0, -50.0, 0.0], [-50.0, -50.0, 0.0]])
    logp_beh = torch.tensor([[-50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    iw = importance_weights(logp_old, logp_beh, mask, 2.0, 0.0, level, mode)
    assert torch.isfinite(iw.weights).all() and (iw.weights >= 0).all() and (iw.weights <= 2.0).all()


def test_stats_count_weight_mean_and_clipfrac_over_masked_tokens():
    logp_old = torch.tensor([[math.log(4.0), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    iw = importance_weights(logp_old, torch.zeros(1, 3), mask, clip=2.0, clip_low=0.0)
    assert tis_stats(iw, mask) == {"tis/weight_mean": pytest.approx(1.5), "tis/clipfrac": 0.5}


def test_custom_weights_are_checked_and_compared_with_raw_ratio():
    logp_old, logp_beh, mask = make(2)

    def halve(lo, lb, m, algo):
        w = torch.exp(lo - lb)
        w[:, 0] = w[:, 0] / 2  # changes the first column only
        return w

    class Algo:
        custom_tis_function_path = "tests.halve"
    iw = custom_weights(halve, logp_old, logp_beh, mask, Algo())
    assert torch.equal(iw.outside, (mask > 0) & (torch.arange(mask.shape[1]) == 0))
    with pytest.raises(ValueError, match=r"algo.custom_tis_function_path='tests.halve': returned \(5,\)"):
        custom_weights(lambda lo, lb, m, a: torch.ones(5), logp_old, logp_beh, mask, Algo())
