"""algo.rollout_data_postprocess_path (slime's --rollout-data-postprocess-path): called once per learner step
with the filled batch (logp_old, advantages) before the loss, and what it edits in place is what is trained
on; a wrong signature fails at learner start, a change of shape fails naming the field."""
from __future__ import annotations

import sys
import textwrap

import pytest

from async_rl.plugins import PluginError
from synthetic_groups import groups  # tests/learners/synthetic_groups.py

PLUGIN = textwrap.dedent('''
    import torch
    calls = []

    def record(cfg, step, batch):
        calls.append((step, batch.logp_old is not None, batch.advantages is not None, cfg.algo.eps_clip))

    def zero_advantages(cfg, step, batch):
        batch.advantages.zero_()

    def drop_a_column(cfg, step, batch):
        batch.mask = batch.mask[:, :-1]

    def two_args(cfg, batch):
        pass
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "post_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("post_plugin", None)
    import post_plugin
    return post_plugin


def make_learner(world, *words):
    from async_rl import config as C
    from learners.torch_learner import TorchLearner
    cfg = C.load(None, [f"hf_checkpoint={world['model_sft']}", "rollout_batch_size=2", "n_samples_per_prompt=4",
                        "entropy_coef=0", *words])
    return TorchLearner(cfg, world["root"] / "run_post", None)


def test_called_each_step_with_the_filled_batch(tiny_world, plugin):
    lrn = make_learner(tiny_world, "rollout_data_postprocess_path=post_plugin.record")
    lrn.train_step(groups(lrn))
    lrn.train_step(groups(lrn))
    assert plugin.calls == [(0, True, True, 0.2), (1, True, True, 0.2)]


def test_its_edits_are_what_is_trained_on(tiny_world, plugin):
    plain = make_learner(tiny_world).train_step(groups(make_learner(tiny_world)))
    lrn = make_learner(tiny_world, "rollout_data_postprocess_path=post_plugin.zero_advantages")
    edited = lrn.train_step(groups(lrn))
    assert plain["loss/pg"] != 0.0 and edited["loss/pg"] == 0.0
    assert edited["advantages/mean"] == 0.0 and edited["advantages/std"] == 0.0


def test_a_shape_change_fails_naming_the_field(tiny_world, plugin):
    lrn = make_learner(tiny_world, "rollout_data_postprocess_path=post_plugin.drop_a_column")
    with pytest.raises(ValueError, match=r"algo.rollout_data_postprocess_path='post_plugin.drop_a_column': it "
                                         r"changed batch.mask from shape"):
        lrn.train_step(groups(lrn))


def test_a_wrong_signature_fails_at_learner_start(tiny_world, plugin):
    with pytest.raises(PluginError, match=r"two_args\(cfg, batch\) cannot take 3"):
        make_learner(tiny_world, "rollout_data_postprocess_path=post_plugin.two_args")
