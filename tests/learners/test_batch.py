"""Batch alignment: the learner's recomputed logprobs on masked positions are exactly the logprobs of the
response tokens under a direct forward pass, and rollout logprobs sit on the same positions."""
from __future__ import annotations

import numpy as np
import torch

from async_rl.types import Group, Trajectory
from learners.batch import build_batch
from learners.torch_backend import forward_logprobs


def _traj(prompt, response, lp_offset=0.0, version=0):
    return Trajectory(np.array(prompt, np.int32), np.array(response, np.int32),
                      np.arange(len(response), dtype=np.float32) + lp_offset, np.full(len(response), version, np.int32))


def test_mask_and_rollout_logprobs_positions():
    g = Group("g", 0, 0, "x", [_traj([4, 5, 6], [7, 8], 10.0, 3), _traj([4], [9, 10, 11], 20.0, 2)])
    b = build_batch([g], pad_id=0)
    assert b.input_ids.tolist() == [[4, 5, 6, 7, 8], [4, 9, 10, 11, 0]]
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert b.rollout_logprobs.tolist() == [[0, 0, 10, 11], [20, 21, 22, 0]]
    assert (b.targets[b.mask.bool()]).tolist() == [7, 8, 9, 10, 11]
    assert b.behavior_versions.tolist() == [3, 2] and b.num_tokens == 9


def test_recomputed_logprobs_equal_direct_forward(tiny_world):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"], dtype=torch.float32).eval()
    prompts, responses = [[5, 6, 14], [7, 14]], [[8, 9, 2], [10, 2]]
    g = Group("g", 0, 0, "x", [_traj(p, r) for p, r in zip(prompts, responses)])
    b = build_batch([g], pad_id=0)
    with torch.no_grad():
        got = forward_logprobs(model, b.select(slice(None)), temperature=1.0)[b.mask.bool()]
        want = []
        for p, r in zip(prompts, responses):  # one unpadded sequence at a time
            logits = model(torch.tensor([p + r])).logits[0]
            lp = torch.log_softmax(logits, -1)
            want += [lp[len(p) - 1 + j, tok].item() for j, tok in enumerate(r)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_trajectory_loss_mask_removes_tokens_from_the_loss():
    t = _traj([4, 5], [7, 8, 9])
    t.loss_mask = np.array([1, 0, 1], np.uint8)  # e.g. the middle token came from a tool
    b = build_batch([Group("g", 0, 0, "x", [t])], pad_id=0)
    assert b.mask.tolist() == [[0, 1, 0, 1]]
