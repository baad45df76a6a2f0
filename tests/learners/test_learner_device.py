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
