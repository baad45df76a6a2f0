"""Turn groups from the hub into padded training tensors aligned for next-token prediction.

Position t of every [B, T-1] tensor describes the prediction of token t+1 from tokens 0..t; `mask` is 1
exactly on the positions that predict a response token, and the rollout logprobs / token versions sit on
those same positions. The learner fills the per-token fields it computes before the optimizer steps
(logp_old, ref_logp, values, advantages, returns, tis_weights) on the same positions; `select` hands
every field that is set to a mini/micro batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from async_rl.types import Group


@dataclass
class TrainBatch:
    input_ids: torch.Tensor        # [B, T] long, right-padded
    attention_mask: torch.Tensor   # [B, T] long
    targets: torch.Tensor          # [B, T-1] long
    mask: torch.Tensor             # [B, T-1] float
    rollout_logprobs: torch.Tensor  # [B, T-1] float
    token_versions: torch.Tensor   # [B, T-1] long (-1 off-mask)
    rewards: torch.Tensor          # [groups, n] float
    behavior_versions: torch.Tensor  # [B] long
    num_tokens: int
    # filled by the learner, [B, T-1] each, None until computed
    logp_old: torch.Tensor | None = None     # proximal policy (or rollout) logprobs, the PPO ratio's base
    ref_logp: torch.Tensor | None = None     # reference model logprobs (KL)
    values: torch.Tensor | None = None       # critic values before the update (ppo)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None      # critic targets (ppo)
    tis_weights: torch.Tensor | None = None  # importance weights of the pg term

    def to(self, device: torch.device) -> "TrainBatch":
        """This batch with every tensor on `device` (itself when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.to(device, non_blocking=True))
        return self

    def select(self, idx: slice, trim: bool = False) -> dict:
        """Per-sample tensors of rows `idx` (for mini/micro batches), including every computed field.
        `trim`: cut the columns after the longest of these rows (right padding only; the forward pass and
        every loss term are unchanged, the padding's compute is saved). Per-token results then have
        `width(rows) - 1` columns: `pad_columns` restores the batch's width."""
        keys = ["input_ids", "attention_mask", "targets", "mask", "rollout_logprobs"] + \
            [k for k in _COMPUTED if getattr(self, k) is not None]
        rows = {k: getattr(self, k)[idx] for k in keys}
        if trim and len(rows["attention_mask"]):
            width = max(2, int(rows["attention_mask"].sum(-1).max()))
            if width < rows["input_ids"].shape[1]:
                rows = {k: v[:, :width] if k in ("input_ids", "attention_mask") else v[:, :width - 1]
                        for k, v in rows.items()}
        return rows

    def pad_columns(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token [b, t] result of trimmed rows, zero-padded on the right to [b, T-1]."""
        missing = self.mask.shape[1] - x.shape[1]
        return torch.nn.functional.pad(x, (0, missing)) if missing > 0 else x


_COMPUTED = ("logp_old", "ref_logp", "values", "advantages", "returns", "tis_weights")


def build_batch(groups: list[Group], pad_id: int) -> TrainBatch:
    trajs = [t for g in groups for t in g.trajectories]
    n = len(groups[0].trajectories)
    if any(len(g.trajectories) != n for g in groups):
        raise ValueError("every group must carry n_samples_per_prompt trajectories")
    seq_len = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    b = len(trajs)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, seq_len), dtype=torch.long)
    mask = torch.zeros((b, seq_len - 1))
    rollout_lp = torch.zeros((b, seq_len - 1))
    versions = torch.full((b, seq_len - 1), -1, dtype=torch.long)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, :p] = torch.from_numpy(t.prompt_ids.astype("int64"))
        input_ids[i, p:p + r] = torch.from_numpy(t.response_ids.astype("int64"))
        attention[i, :p + r] = 1
        # a trajectory may exclude tokens from the loss (tool output, or tokens of an older policy version
        # under mask_offpolicy_in_partial_rollout): every loss, KL, entropy and TIS statistic uses this mask
        mask[i, p - 1:p - 1 + r] = 1.0 if t.loss_mask is None else torch.from_numpy(t.loss_mask.astype("float32"))
        rollout_lp[i, p - 1:p - 1 + r] = torch.from_numpy(t.rollout_logprobs.astype("float32"))
        versions[i, p - 1:p - 1 + r] = torch.from_numpy(t.token_versions.astype("int64"))
    rewards = torch.tensor([[t.reward for t in g.trajectories] for g in groups], dtype=torch.float32)
    return TrainBatch(input_ids=input_ids, attention_mask=attention, targets=input_ids[:, 1:].clone(),
                      mask=mask, rollout_logprobs=rollout_lp, token_versions=versions, rewards=rewards,
                      behavior_versions=torch.tensor([t.behavior_version for t in trajs]),
                      num_tokens=int(attention.sum()))
