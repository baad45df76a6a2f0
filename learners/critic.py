"""The PPO critic: a separate value model, the policy's HF architecture (its base model, loaded from the
same checkpoint) with a scalar head, trained on the GAE returns with a clipped value loss.

Alignment: `values[:, t]` is V(tokens 0..t), the value of the state in which token t+1 is generated, so
it sits on the same [B, T-1] positions as `TrainBatch.mask`. The head starts at zero, so the first
values are 0 and the first advantages are plain reward-to-go. The critic lives only in the learner; it
is never published to the engines.
"""
from __future__ import annotations

import torch

from learners import losses
from learners.batch import TrainBatch
from learners.optim import accumulate_step, build_optimizer, micro_slices


class ValueModel(torch.nn.Module):
    def __init__(self, checkpoint: str):
        from transformers import AutoModel

        super().__init__()
        self.backbone = AutoModel.from_pretrained(checkpoint, dtype=torch.float32)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, :-1].float()).squeeze(-1)


class Critic:
    """Value model + its optimizer (critic_lr, or optimizer.lr when 0)."""

    def __init__(self, checkpoint: str, algo, optim_cfg):
        self.algo, self.optim_cfg = algo, optim_cfg
        self.model = ValueModel(checkpoint)
        self.model.train()
        self.optimizer = build_optimizer(self.model.parameters(), optim_cfg, algo.critic_lr or None)

    @torch.no_grad()
    def values(self, batch: TrainBatch, micro: int) -> torch.Tensor:
        """V_old of every position, before this step's updates; [B, T-1]."""
        return torch.cat([self.model(batch.input_ids[sl], batch.attention_mask[sl])
                          for sl in micro_slices(0, len(batch.input_ids), micro)])

    def step(self, batch: TrainBatch, start: int, size: int, micro: int) -> dict:
        """One optimizer step on samples [start, start + size) towards batch.returns."""
        a = self.algo
        denom = float(batch.mask[start:start + size].sum().clamp(min=1.0))

        def loss_fn(sl: slice):
            values = self.model(batch.input_ids[sl], batch.attention_mask[sl])
            loss, m = losses.value_loss(values, batch.values[sl], batch.returns[sl], batch.mask[sl],
                                        a.value_clip, a.calculate_per_token_loss,
                                        denom if a.calculate_per_token_loss else None)
            return loss, m

        out = accumulate_step(list(self.model.parameters()), self.optimizer, micro_slices(start, size, micro),
                              loss_fn, a.calculate_per_token_loss, self.optim_cfg.clip_grad)
        return {"critic/value_loss": out.pop("loss"), "critic/grad_norm": out.pop("grad_norm"), **out}
