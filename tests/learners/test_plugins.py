"""Plug-in contract of the learner (`algo.custom_loss_function_path`, `algo.custom_tis_function_path`):
a wrong path or signature fails when the learner starts, naming the field; a right one is called with
the documented arguments and its result is used. Also the algo section's validation messages."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest

from async_rl import config as C
from async_rl.plugins import PluginError

PLUGIN = textwrap.dedent('''
    import torch
    from learners.losses import masked_mean

    calls = []

    def my_loss(logp, batch, algo):
        calls.append(("loss", sorted(batch), tuple(logp.shape), algo.loss_type))
        loss = masked_mean(-batch["advantages"] * logp, batch["mask"], algo.calculate_per_token_loss,
                           batch["token_denominator"])
        return loss, {"my_metric": torch.tensor(7.0)}

    def half_weights(logp_old, logp_behavior, mask, algo):
        calls.append(("tis", tuple(mask.shape), algo.tis_clip))
        return torch.full_like(mask, 0.5)

    def two_args(logp, batch):
        return logp.sum(), {}
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "algo_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("algo_plugin", None)
    import algo_plugin
    return algo_plugin


def make_learner(world, *words):
    from learners.torch_learner import make_learner
    cfg = C.load(None, [f"hf_checkpoint={world['model_sft']}", "rollout_batch_size=2", "n_samples_per_prompt=4",
                        *words])
    return make_learner(cfg, world["root"] / "run", None)


@pytest.mark.parametrize("words, needle", [
    (["loss_type=custom_loss", "custom_loss_function_path=no_such_module.fn"],
     "algo.custom_loss_function_path='no_such_module.fn': cannot import 'no_such_module'"),
    (["loss_type=custom_loss", "custom_loss_function_path=algo_plugin.missing"],
     "algo.custom_loss_function_path='algo_plugin.missing': algo_plugin has no function 'missing'"),
    (["loss_type=custom_loss", "custom_loss_function_path=algo_plugin.two_args"],
     "algo.custom_loss_function_path='algo_plugin.two_args': two_args(logp, batch) cannot take 3"),
    (["custom_tis_function_path=algo_plugin.my_loss"],
     "algo.custom_tis_function_path='algo_plugin.my_loss': my_loss(logp, batch, algo) cannot take 4"),
    (["custom_tis_function_path=nodots"], "must be a dotted path"),
])
def test_bad_plugin_fails_at_learner_start_naming_the_field(tiny_world, plugin, words, needle):
    with pytest.raises(PluginError) as err:
        make_learner(tiny_world, *words)
    assert needle in str(err.value)


def test_custom_loss_and_custom_tis_are_called_and_used(tiny_world, plugin):
    from synthetic_groups import groups
    lrn = make_learner(tiny_world, "loss_type=custom_loss", "custom_loss_function_path=algo_plugin.my_loss",
                       "custom_tis_function_path=algo_plugin.half_weights", "micro_batch_size=4")
    m = lrn.train_step(groups(lrn))
    kinds = [c[0] for c in plugin.calls]
    assert kinds == ["tis", "loss", "loss"]  # once per batch, once per micro-batch
    _, keys, shape, loss_type = plugin.calls[1]
    assert {"mask", "logp_old", "advantages", "rollout_logprobs", "tis_weights", "logits",
            "token_denominator", "targets"} <= set(keys)
    assert shape[0] == 4 and loss_type == "custom_loss"
    assert m["my_metric"] == 7.0 and m["tis/weight_mean"] == pytest.approx(0.5)
    assert m["tis/clipfrac"] is not None and math.isfinite(m["loss/pg"])


@pytest.mark.parametrize("words, needle", [
    (["kl_loss_type=k4"], "algo.kl_loss_type='k4': must be one of ['k1', 'k2', 'k3', 'low_var_kl']"),
    (["kl_coef=0.1", "grpo_kl_reward_shaping=true", "use_kl_loss=true", "kl_loss_coef=0.1"],
     "algo.kl_coef=0.1 and algo.kl_loss_coef=0.1"),
    (["kl_loss_coef=0.1"], "algo.kl_loss_coef=0.1: only used with use_kl_loss=true"),
    (["advantage_estimator=a2c"], "algo.advantage_estimator='a2c': must be one of"),
    (["tis_level=tokens"], "algo.tis_level='tokens': must be one of ['token', 'sequence_product'"),
    (["tis_mode=clip"], "algo.tis_mode='clip': must be one of ['truncate', 'mask']"),
    (["eps_clip_c=0.5"], "algo.eps_clip_c=0.5: dual-clip bound must be > 1"),
    (["gamma=1.5"], "algo.gamma=1.5: must be in [0, 1]"),
    (["loss_type=custom_loss"], "algo.loss_type='custom_loss': needs custom_loss_function_path"),
    (["custom_loss_function_path=a.b"], "only used with loss_type=custom_loss"),
    (["use_tis=false", "custom_tis_function_path=a.b"], "only used with use_tis=true"),
    (["disable_compute_advantages_and_returns=true"], "policy_loss and the ppo critic need advantages"),
    (["disable_compute_advantages_and_returns=true", "loss_type=sft_loss", "advantage_estimator=ppo"],
     "not with ppo"),
    (["num_critic_only_steps=2"], "only ppo has a critic"),
    (["ref_update_interval=-1"], "ckpt.ref_update_interval=-1: must be >= 0"),
    (["n_samples_per_prompt=1"], "rollout.n_samples_per_prompt=1: advantage_estimator=grpo subtracts the group's "
                                 "mean reward"),
    (["n_samples_per_prompt=1", "advantage_estimator=gspo"], "set n_samples_per_prompt >= 2"),
    (["n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus_baseline"], "trains on nothing"),
    (["advantage_estimator=reinforce_plus_plus", "kl_coef=0.1", "use_kl_loss=true", "kl_loss_coef=0.1"],
     "algo.kl_coef=0.1 and algo.kl_loss_coef=0.1: use one KL penalty"),
])
def test_algo_config_errors_name_field_value_and_fix(words, needle):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, words)
    assert needle in str(err.value)


def test_every_estimator_loss_and_kl_type_is_accepted():
    for est in ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"):
        C.load(None, [f"advantage_estimator={est}"])
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        C.load(None, [f"kl_loss_type={kind}", "use_kl_loss=true", "kl_loss_coef=0.01"])
    C.load(None, ["loss_type=sft_loss", "disable_compute_advantages_and_returns=true"])


def test_a_group_of_one_is_accepted_where_it_still_trains():
    for words in (["advantage_estimator=reinforce_plus_plus"], ["advantage_estimator=ppo"],
                  ["disable_rewards_normalization=true"], ["loss_type=sft_loss"]):
        C.load(None, ["n_samples_per_prompt=1", *words])


def test_kl_coef_under_grpo_is_inert_as_in_slime_unless_asked():
    from async_rl.config_rules import kl_reward_shaping
    from learners.backend import needs_reference

    # slime's GRPO scripts set kl_coef beside use_kl_loss + kl_loss_coef: accepted, kl_coef inert
    slime_style = C.load(None, ["kl_coef=0.05", "use_kl_loss=true", "kl_loss_coef=0.01"]).algo
    assert not kl_reward_shaping(slime_style) and needs_reference(slime_style)
    inert = C.load(None, ["kl_coef=0.05"]).algo
    assert not kl_reward_shaping(inert) and not needs_reference(inert)  # no reference model for nothing
    ours = C.load(None, ["kl_coef=0.05", "grpo_kl_reward_shaping=true"]).algo
    assert kl_reward_shaping(ours) and needs_reference(ours)
    for est in ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"):
        assert kl_reward_shaping(C.load(None, [f"advantage_estimator={est}", "kl_coef=0.05"]).algo)
