"""The torch backend at N ranks (`train_backend: torch`, `train.actor_num_gpus_per_node: N`, started by
torchrun, or one Ray actor a rank under `--cluster ray`): the same HF model as learners.torch_backend, sharded with FSDP2 over every rank (learners/fsdp.py);
gloo on CPU, NCCL on GPU (one GPU a rank, bf16 parameters with fp32 reduction and fp32 sharded AdamW under
train.bf16).

What each rank does: builds the model on the meta device and keeps 1/N of each parameter on its device,
received from rank 0, the only rank that reads the HF checkpoint into host memory (learners.fsdp
.sharded_from_pretrained; with fsdp_cpu_offload every rank reads it), trains on its share of each mini-batch's rows (learners.fsdp.policy_step), and takes part in every
gather. Rank 0 alone receives the full weights at publication, on its host.

Checkpoint part: `dcp/` (model, optimizer and reference, sharded; torch.distributed.checkpoint) and
`rng_{rank}.pt` per rank. The one-rank torch backend writes and reads the same layout, so a checkpoint
resumes at any number of ranks.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from async_rl import config as config_mod
from learners import checkpoint, fsdp
from learners.backend import LossFn, needs_reference
from learners.batch import TrainBatch
from learners.optim import build_optimizer
from learners.weights import HFExport


def logprob_token_budget(t) -> int:
    """Rows x longest row of one logprob micro-batch with use_dynamic_batch_size (0: micro_batch_size rows)."""
    return (t.log_probs_max_tokens_per_gpu or t.max_tokens_per_gpu) if t.use_dynamic_batch_size else 0


class FsdpBackend:
    """learners.backend.Backend over the ranks torchrun (or the Ray launcher) started."""
    critic = None  # config_rules refuses the PPO critic at several ranks

    def __init__(self, cfg: config_mod.Config):
        t = cfg.train
        self.cfg = cfg
        self.device = fsdp.rank_device(torch.device(t.learner_device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = fsdp.init(self.device, t.distributed_timeout_minutes)
        print(f"learner: rank {self.rank} of {self.world} joined (FSDP2, {dist.get_backend()} on {self.device})",
              flush=True)
        self.model = self._sharded(cfg.ckpt.hf_checkpoint)
        self.model.train()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.ref = None
        if needs_reference(cfg.algo):
            self.ref = self._sharded(cfg.ckpt.ref_load or cfg.ckpt.hf_checkpoint).eval().requires_grad_(False)

    def _sharded(self, checkpoint_dir: str):
        t = self.cfg.train
        return fsdp.sharded_from_pretrained(checkpoint_dir, self.device, bf16=t.bf16 and self.device.type == "cuda",
                                            cpu_offload=t.fsdp_cpu_offload, gradient_checkpointing=t.gradient_checkpointing)

    @property
    def hf_config(self):
        return self.model.config

    def autocast(self):
        return contextlib.nullcontext()  # FSDP's mixed-precision policy casts (train.bf16)

    # ---- forward and update --------------------------------------------------------------------------
    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        r = self.cfg.rollout
        return fsdp.batch_logprobs(self.ref if reference else self.model, batch, r.micro_batch_size,
                                   r.rollout_temperature, self.device, logprob_token_budget(self.cfg.train))

    def train_step(self, batch: TrainBatch, rows: slice, loss_fn: LossFn) -> dict:
        r, t = self.cfg.rollout, self.cfg.train

        def micro_loss(model, part, _token_denominator):  # the loop's loss_fn knows the mini-batch's tokens
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1]
            return loss_fn(logits, part)
        return fsdp.policy_step(self.model, self.optimizer, batch, rows.start, rows.stop - rows.start, micro_loss,
                                r.micro_batch_size, self.cfg.algo.calculate_per_token_loss,
                                self.cfg.optimizer.clip_grad, t.balance_data, self.device,
                                t.max_tokens_per_gpu if t.use_dynamic_batch_size else 0)

    @torch.no_grad()
    def refresh_reference(self) -> None:
        for ref_p, p in zip(self.ref.parameters(), self.model.parameters()):  # the same shards on each rank
            ref_p.copy_(p)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- weights out: gathered to rank 0's host --------------------------------------------------------
    def hf_weights(self, on_device: bool) -> dict[str, torch.Tensor] | None:
        full = fsdp.full_state_dict(self.model)  # collective
        return full if self.rank == 0 else None

    def export_hf(self, weights: dict) -> HFExport:
        return HFExport(weights, self.hf_config, self.cfg.ckpt.hf_checkpoint)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    # ---- checkpoint part ------------------------------------------------------------------------------
    def checkpoint_info(self) -> dict:
        return {"torch_ranks": self.world}

    def save(self, path: Path) -> None:
        fsdp.save_sharded(path / "dcp", self.model, self.optimizer, self.ref)
        torch.save(checkpoint.rng_state(), path / f"rng_{self.rank}.pt")

    def load(self, path: Path, state: dict) -> None:
        if not (path / "dcp").exists():
            raise RuntimeError(f"checkpoint {path}: not a torch-backend checkpoint (no dcp/; written by "
                               f"train_backend={state.get('backend', 'megatron')!r}?); resume with the backend "
                               f"that wrote it")
        fsdp.load_sharded(path / "dcp", self.model, self.optimizer, self.ref)
        fsdp.load_rng(path, self.rank)
