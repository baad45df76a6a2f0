"""Synthetic batches for learner tests: groups of addition prompts with random digit answers, built with
the tiny model's tokenizer (imported by the test modules of this folder)."""
from __future__ import annotations

import numpy as np
import torch

from async_rl.types import Group, Trajectory

N_GROUPS, N = 2, 4


def groups(lrn, seed: int = 0, behavior_shift: float | None = None) -> list[Group]:
    """Addition prompts with random digit responses; rollout logprobs random, or (behavior_shift) the
    learner's own logprobs minus that shift, so that pi_prox / pi_behavior = exp(shift) on every token."""
    rng = np.random.default_rng(seed)
    tok = lrn.tokenizer
    out = []
    for g in range(N_GROUPS):
        prompt = np.asarray(tok(f"{rng.integers(0, 20)}+{rng.integers(0, 20)}=")["input_ids"], np.int32)
        trajs = []
        for _ in range(N):
            resp = tok(str(rng.integers(0, 40)))["input_ids"] + [tok.eos_token_id]
            resp = np.asarray(resp, np.int32)
            lp = (-rng.random(len(resp)) * 3).astype(np.float32)
            trajs.append(Trajectory(prompt, resp, lp, np.zeros(len(resp), np.int32),
                                    reward=float(rng.integers(0, 2))))
        out.append(Group("g", g, g, "x", trajs))
    if behavior_shift is not None:
        from learners.batch import build_batch
        from learners.torch_backend import forward_logprobs
        batch = build_batch(out, lrn.pad_id)
        with torch.no_grad():
            logp = forward_logprobs(lrn.backend.model, batch.select(slice(None)), 1.0)
        for i, t in enumerate(t for g in out for t in g.trajectories):
            t.rollout_logprobs = (logp[i][batch.mask[i].bool()] - behavior_shift).numpy().astype(np.float32)
    return out
