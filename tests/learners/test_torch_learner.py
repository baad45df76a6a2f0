"""The torch learner's step with the real tiny model, offline (no hub): every estimator trains and logs
finite metrics; micro-batching does not change the update; decoupled PPO takes the TIS weight from the
learner's recomputation vs the engine's logprobs; critic-only steps, reference refresh, rollout logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from async_rl import config as C
from learners.loop import Learner
from learners.torch_learner import make_learner
from synthetic_groups import N, N_GROUPS, groups  # tests/learners/synthetic_groups.py

KEYS = ["version", "reward/mean", "reward/std", "loss/pg", "pg_clipfrac", "ppo_kl", "entropy", "tis/weight_mean",
        "tis/clipfrac", "advantages/mean", "advantages/std", "response_length/mean", "grad_norm"]


def learner(world, *words) -> Learner:
    cfg = C.load(None, [f"hf_checkpoint={world['model_sft']}", f"rollout_batch_size={N_GROUPS}",
                        f"n_samples_per_prompt={N}", *words])
    torch.manual_seed(0)
    return make_learner(cfg, world["root"] / "run", None)


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("words", [
    [], ["advantage_estimator=gspo", "eps_clip=0.01"], ["advantage_estimator=reinforce_plus_plus", "kl_coef=0.05"],
    ["advantage_estimator=reinforce_plus_plus_baseline", "tis_level=sequence_geometric", "tis_mode=mask"],
    ["advantage_estimator=ppo", "gamma=0.99", "lambd=0.95"],
    ["use_kl_loss=true", "kl_loss_coef=0.1", "kl_loss_type=low_var_kl", "entropy_coef=0.01", "eps_clip_c=3",
     "log_passrate=true"],
])
def test_every_estimator_trains_with_finite_metrics(tiny_world, words):
    lrn = learner(tiny_world, *words)
    before = params(lrn.backend.model)
    m = lrn.train_step(groups(lrn))
    assert all(k in m for k in KEYS), set(KEYS) - set(m)
    for k, v in m.items():
        assert v is None or not isinstance(v, float) or math.isfinite(v), (k, v)
    assert not torch.equal(before, params(lrn.backend.model))
    if "advantage_estimator=ppo" in words:
        assert m["critic/value_loss"] > 0 and "returns/mean" in m
    if any(w.startswith("use_kl_loss") or w.startswith("kl_coef") for w in words):
        assert m["kl"] is not None
    if "log_passrate=true" in words:
        assert {"pass@1", "pass@2", "pass@4"} <= set(m)


@pytest.mark.parametrize("per_token", [False, True])
def test_micro_batching_does_not_change_the_update(tiny_world, per_token):
    words = [f"calculate_per_token_loss={per_token}", "entropy_coef=0.01", "clip_grad=0"]
    whole, split = learner(tiny_world, *words), learner(tiny_world, *words, "micro_batch_size=2")
    for lrn in (whole, split):  # plain SGD: the update is the gradient itself (Adam would hide a scale error)
        lrn.backend.optimizer = torch.optim.SGD(lrn.backend.model.parameters(), lr=1.0)
    data = groups(whole, seed=3)
    whole.train_step(data)
    split.train_step(data)
    assert torch.allclose(params(whole.backend.model), params(split.backend.model), atol=1e-6)


def test_decoupled_ppo_weight_is_prox_over_behavior(tiny_world):
    lrn = learner(tiny_world, "tis_clip=2.0")
    m = lrn.train_step(groups(lrn, behavior_shift=math.log(1.5)))
    assert m["tis/weight_mean"] == pytest.approx(1.5, rel=1e-4) and m["tis/clipfrac"] == 0.0
    assert m["ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # the ratio is against the recomputation, not the engine
    capped = learner(tiny_world, "tis_clip=1.2")
    m = capped.train_step(groups(capped, behavior_shift=math.log(1.5)))
    assert m["tis/weight_mean"] == pytest.approx(1.2, rel=1e-4) and m["tis/clipfrac"] == 1.0
    masked = learner(tiny_world, "tis_clip=1.2", "tis_mode=mask")
    assert masked.train_step(groups(masked, behavior_shift=math.log(1.5)))["tis/weight_mean"] == 0.0


def test_use_rollout_logprobs_gives_unit_weights(tiny_world):
    lrn = learner(tiny_world, "use_rollout_logprobs=true")
    m = lrn.train_step(groups(lrn, behavior_shift=math.log(1.5)))
    assert m["tis/weight_mean"] == 1.0 and m["rollout_logprob_diff/mean_abs"] is None
    assert m["ppo_kl"] == pytest.approx(-math.log(1.5), rel=1e-4)  # now the ratio is against the engine


def test_critic_only_steps_leave_the_policy_alone(tiny_world):
    lrn = learner(tiny_world, "advantage_estimator=ppo", "num_critic_only_steps=1")
    policy, critic = params(lrn.backend.model), params(lrn.backend.critic.model)
    m = lrn.train_step(groups(lrn))
    assert torch.equal(policy, params(lrn.backend.model)) and not torch.equal(critic, params(lrn.backend.critic.model))
    assert m["loss/pg"] is None and m["critic/value_loss"] is not None
    lrn.train_step(groups(lrn, seed=1))
    assert not torch.equal(policy, params(lrn.backend.model))


def test_reference_model_is_refreshed_every_interval(tiny_world):
    frozen = learner(tiny_world, "use_kl_loss=true", "kl_loss_coef=0.1")
    start = params(frozen.backend.ref)
    frozen.train_step(groups(frozen))
    assert torch.equal(start, params(frozen.backend.ref))
    refreshed = learner(tiny_world, "use_kl_loss=true", "kl_loss_coef=0.1", "ref_update_interval=1")
    refreshed.train_step(groups(refreshed))
    assert torch.equal(params(refreshed.backend.ref), params(refreshed.backend.model))
    assert refreshed.train_step(groups(refreshed, seed=1))["kl"] == pytest.approx(0.0, abs=1e-6)


def _one_sgd_step(lrn, data) -> dict:
    """One train_step under plain SGD (lr 1: the update is the gradient itself, which Adam would rescale)."""
    lrn.backend.optimizer = torch.optim.SGD(lrn.backend.model.parameters(), lr=1.0)
    return lrn.train_step(data)


def test_gradient_checkpointing_recomputes_and_changes_no_update(tiny_world):
    """train.gradient_checkpointing: the layers recompute their activations in backward (HF's flag is on),
    and the step's update is the one without it."""
    plain, ckpt = learner(tiny_world, "clip_grad=0"), learner(tiny_world, "clip_grad=0", "gradient_checkpointing=true")
    assert ckpt.backend.model.is_gradient_checkpointing and not plain.backend.model.is_gradient_checkpointing
    data = groups(plain, seed=5)
    _one_sgd_step(plain, data), _one_sgd_step(ckpt, data)
    assert torch.allclose(params(plain.backend.model), params(ckpt.backend.model), atol=1e-6)


def test_token_budget_micro_batches_change_no_update(tiny_world):
    """use_dynamic_batch_size on one process: micro-batches by a token budget give the update of
    micro_batch_size ones (learners.fsdp.policy_step at one rank)."""
    words = ["clip_grad=0", "micro_batch_size=2"]
    fixed = learner(tiny_world, *words)
    budget = learner(tiny_world, *words, "use_dynamic_batch_size=true", "max_tokens_per_gpu=48")
    data = groups(fixed, seed=7)
    a, b = _one_sgd_step(fixed, data), _one_sgd_step(budget, data)
    assert abs(a["loss/total"] - b["loss/total"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert torch.allclose(params(fixed.backend.model), params(budget.backend.model), atol=1e-6)
