"""Placing the torch learner and the engines on a device: config validation, and every batch tensor moving
with the batch (the CUDA run itself is measured on the GPU machine: scripts/gpu/bench_async.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from async_rl import config as C
from async_rl.types import Group, Trajectory
from learners.batch import build_batch


@pytest.mark.parametrize("words, needle", [
    (["learner_device=gpu0"], "train.learner_device='gpu0': not a device; use cpu, cuda or cuda:N"),
    (["bf16=true"], "train.bf16=True: bf16 autocast is for a GPU learner (learner_device='cpu')"),
    (["train_backend=megatron", "learner_device=cuda"], "train.learner_device='cuda': train_backend=megatron"),
    (["engine_device=tpu"], "rollout.engine_device='tpu': not a device"),
])
def test_bad_devices_name_field_value_and_fix(words, needle):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, words)
    assert needle in str(err.value)


def test_good_devices_load():
    cfg = C.load(None, ["learner_device=cuda:1", "bf16=true", "engine_device=cuda"])
    assert cfg.train.learner_device == "cuda:1" and cfg.train.bf16 and cfg.rollout.engine_device == "cuda"


def _groups() -> list[Group]:
    rng = np.random.default_rng(0)
    out = []
    for g in range(2):
        trajs = []
        for n in (3, 5):
            resp = rng.integers(4, 19, n).astype(np.int32)
            trajs.append(Trajectory(np.array([5, 6, 7], np.int32), resp, rng.normal(size=n).astype(np.float32),
                                    np.zeros(n, np.int32), reward=float(n == 3)))
        out.append(Group("g", g, g, "x", trajs))
    return out


def test_batch_moves_every_tensor_and_keeps_values():
    batch = build_batch(_groups(), pad_id=0)
    reference = {k: v.clone() for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    batch.advantages = torch.ones_like(batch.mask)  # a field the learner fills in later moves too
    moved = batch.to("meta")  # a real device change (no data) that runs on any machine
    tensors = {k: v for k, v in vars(moved).items() if isinstance(v, torch.Tensor)}
    assert set(reference) | {"advantages"} == set(tensors)
    assert all(v.device.type == "meta" for v in tensors.values())
    same = build_batch(_groups(), pad_id=0)
    assert same.to("cpu") is same  # already there: no copies
    for k, v in reference.items():
        assert torch.equal(getattr(same, k), v)


def test_trimmed_micro_batches_give_the_same_logprobs_loss_and_gradients(tiny_world):
    """Rows of very different lengths: cutting each micro-batch after its longest row must not change the
    logprobs (padded back to the batch's width), the actor loss or any gradient."""
    from transformers import AutoModelForCausalLM

    from async_rl import config as C
    from learners.objective import actor_loss
    from learners.torch_backend import forward_logits, forward_logprobs

    rng = np.random.default_rng(1)
    groups = []
    for g, lengths in enumerate([(1, 2), (12, 3)]):  # micro-batch 0 is short, micro-batch 1 is long
        trajs = [Trajectory(np.array([5, 6, 7], np.int32), rng.integers(4, 19, n).astype(np.int32),
                            rng.normal(size=n).astype(np.float32), np.zeros(n, np.int32), reward=float(i))
                 for i, n in enumerate(lengths)]
        groups.append(Group("g", g, g, "x", trajs))
    batch = build_batch(groups, pad_id=0)
    batch.logp_old = batch.rollout_logprobs + 0.1
    batch.advantages = torch.tensor(rng.normal(size=batch.mask.shape), dtype=torch.float32) * batch.mask
    model = AutoModelForCausalLM.from_pretrained(tiny_world["model_sft"], dtype=torch.float32)
    algo = C.load(None, []).algo
    results = {}
    for trim in (False, True):
        model.zero_grad()
        logps, total = [], 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            rows = batch.select(sl, trim=trim)
            logps.append(batch.pad_columns(forward_logprobs(model, rows, 1.0)))
            loss, _ = actor_loss(forward_logits(model, rows), rows, algo, 1.0, None, None)
            loss.backward()
            total += float(loss.detach())
        results[trim] = (torch.cat(logps), total, [p.grad.clone() for p in model.parameters()])
    short = batch.select(slice(0, 2), trim=True)
    assert short["input_ids"].shape[1] == 5 and short["mask"].shape[1] == 4  # 3 prompt + 2 response tokens
    full, cut = results[False], results[True]
    torch.testing.assert_close(cut[0] * batch.mask, full[0] * batch.mask, atol=1e-5, rtol=1e-5)
    assert abs(cut[1] - full[1]) < 1e-5
    for a, b in zip(cut[2], full[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
