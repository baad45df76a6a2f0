"""What a training backend gives the learner loop (learners.loop.Learner): the models, their forward and
optimizer step, weights out as HF tensors, and this process's part of a checkpoint. The RL math (scores,
advantages, importance weights, the loss itself) and everything said to the hub stay in the loop.

Backends: learners.torch_backend (one process, an HF model), learners.megatron.backend (megatron-core,
TP x PP x DP ranks under torchrun). A backend over N ranks (data parallel, say FSDP2) fits as long as:

- every rank constructs it from the config alone, and `rank` is its global rank; rank 0 alone talks to
  the hub and writes the run directory, the others learn each step's batch through `broadcast_object`;
- every method below is called by every rank in the same order (collectives inside are safe), with the
  same whole-batch `TrainBatch` on each rank; a backend splits the rows over its ranks itself;
- results are whole-job results on every rank: `logprobs` covers every row, `train_step`'s numbers are
  already reduced over ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch

from async_rl.config_rules import kl_reward_shaping
from learners.batch import TrainBatch

# (logits [rows, T-1, V] of a micro-batch, that micro-batch's rows: TrainBatch.select's dict) -> (loss, metrics)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def needs_reference(algo) -> bool:
    """Does the run need a frozen reference policy (KL in the reward or in the loss)?"""
    return kl_reward_shaping(algo) or algo.use_kl_loss


class Backend(Protocol):
    rank: int             # global rank; 0 speaks for the job
    device: torch.device  # where the loop puts each TrainBatch (and the perf phases synchronise)
    hf_config: Any        # the policy's transformers config (what publications write as config.json)
    model: Any            # the policy, in train mode
    optimizer: Any
    ref: Any              # the reference policy (frozen), built when needs_reference(algo); else None
    critic: Any           # learners.critic.Critic-like (values(), step()) when the run trains one; else None

    def autocast(self) -> ContextManager:
        """The context one whole RL step runs in (mixed precision, where the backend does it that way)."""

    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """Logprobs of every target of the batch under the policy (or the reference), no grad; [B, T-1]."""

    def train_step(self, batch: TrainBatch, rows: slice, loss_fn: LossFn) -> dict:
        """One optimizer step on the mini-batch `rows`: micro-batches, `loss_fn` on each, gradients
        equal to one pass over the mini-batch (learners.optim's scaling); returns {"loss", "grad_norm",
        loss_fn's metrics, ...} reduced over ranks."""

    def refresh_reference(self) -> None:
        """Reference := the current policy (ckpt.ref_update_interval)."""

    def set_lr(self, lr: float) -> None:
        """A new peak learning rate (live knob)."""

    def hf_weights(self, on_device: bool) -> dict[str, torch.Tensor] | None:
        """The policy as HF-named tensors on rank 0 (on its device when `on_device` and the backend can),
        None on the others. Collective."""

    def export_hf(self, weights: dict[str, torch.Tensor]) -> Any:
        """Something whose save_pretrained(dir) writes `weights` (hf_weights' result) as an HF checkpoint."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (identity on one process)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def checkpoint_info(self) -> dict:
        """What state.json records about this backend (checked again by `load`)."""

    def save(self, path: Path) -> None:
        """Write this rank's part of a checkpoint into the directory `path` (model, optimizer, reference,
        critic, RNG streams). Collective."""

    def load(self, path: Path, state: dict) -> None:
        """Restore this rank from checkpoint `path` (`state`: its state.json); refuse, with the reason, a
        checkpoint written by another backend or layout. Collective."""
