"""The torch backend (`train_backend: torch`): one process, an HF transformers model on
`train.learner_device` (fp32 weights and AdamW; bf16 autocast on a GPU with train.bf16), the PPO critic
when the run has one, micro-batches by gradient accumulation (learners.optim).

Checkpoint part: `dcp/` (policy, optimizer and reference as a torch.distributed.checkpoint, the layout the
FSDP backend writes at N ranks, so either resumes the other), `rng_0.pt`, and `trainer_state.pt` with the
critic when the run has one. Checkpoints of the earlier layout (`model/` as an HF checkpoint and
`trainer_state.pt` with the optimizer) still load.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from async_rl import config as config_mod
from learners import checkpoint, losses
from learners.backend import LossFn, needs_reference
from learners.batch import TrainBatch
from learners.critic import Critic
from learners.optim import accumulate_step, build_optimizer as _build_optimizer, micro_slices


def build_optimizer(model: torch.nn.Module, o: config_mod.OptimizerConfig) -> torch.optim.Optimizer:
    return _build_optimizer(model.parameters(), o)


def forward_logits(model, rows: dict) -> torch.Tensor:
    """Logits of the positions that predict `rows["targets"]`; [B, T-1, V]."""
    return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]


def forward_logprobs(model, rows: dict, temperature: float) -> torch.Tensor:
    return losses.token_logprobs(forward_logits(model, rows), rows["targets"], temperature)


class TorchBackend:
    """learners.backend.Backend on one process."""
    rank = 0

    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.device = torch.device(cfg.train.learner_device)
        self.model, self.optimizer = self.build_policy()
        self.ref = self._load_reference() if needs_reference(cfg.algo) else None
        self.critic = (Critic(cfg.ckpt.hf_checkpoint, cfg.algo, cfg.optimizer)
                       if cfg.algo.advantage_estimator == "ppo" else None)
        if self.critic is not None:
            self.critic.model.to(self.device)

    def build_policy(self):
        """(policy model in train mode, its optimizer)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.hf_checkpoint, dtype=torch.float32)
        if self.cfg.train.gradient_checkpointing:  # recompute each layer's activations in backward
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device).train()
        return model, build_optimizer(model, self.cfg.optimizer)

    def _load_reference(self):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.ref_load or self.cfg.ckpt.hf_checkpoint,
                                                   dtype=torch.float32)
        return ref.to(self.device).eval().requires_grad_(False)

    @property
    def hf_config(self):
        return self.model.config

    def autocast(self):
        """bf16 autocast on a GPU (train.bf16); fp32 master weights and optimizer."""
        t = self.cfg.train
        on = t.bf16 and t.train_backend == "torch" and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on) if on else contextlib.nullcontext()

    # ---- forward and update --------------------------------------------------------------------------
    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        r = self.cfg.rollout
        model = self.ref if reference else self.model
        if self.cfg.train.use_dynamic_batch_size:  # micro-batches by a token budget, as one FSDP rank forms them
            from learners.fsdp import batch_logprobs
            from learners.fsdp_backend import logprob_token_budget
            return batch_logprobs(model, batch, r.micro_batch_size, r.rollout_temperature, self.device,
                                  logprob_token_budget(self.cfg.train))
        return torch.cat([batch.pad_columns(forward_logprobs(model, batch.select(sl, trim=True),
                                                             r.rollout_temperature))
                          for sl in micro_slices(0, len(batch.input_ids), r.micro_batch_size)])

    def train_step(self, batch: TrainBatch, rows: slice, loss_fn: LossFn) -> dict:
        t = self.cfg.train
        if t.use_dynamic_batch_size:  # micro-batches by a token budget, as one FSDP rank forms them
            from learners.fsdp import policy_step
            return policy_step(self.model, self.optimizer, batch, rows.start, rows.stop - rows.start,
                               lambda model, part, _: loss_fn(forward_logits(model, part), part),
                               self.cfg.rollout.micro_batch_size, self.cfg.algo.calculate_per_token_loss,
                               self.cfg.optimizer.clip_grad, False, self.device, t.max_tokens_per_gpu)

        def micro(sl: slice):
            part = batch.select(sl, trim=True)
            return loss_fn(forward_logits(self.model, part), part)
        return accumulate_step(list(self.model.parameters()), self.optimizer,
                               micro_slices(rows.start, rows.stop - rows.start, self.cfg.rollout.micro_batch_size),
                               micro, self.cfg.algo.calculate_per_token_loss, self.cfg.optimizer.clip_grad)

    def refresh_reference(self) -> None:
        self.ref.load_state_dict(self.model.state_dict())

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- weights out: the HF model writes itself (tied weights, generation config as transformers does) ----
    def hf_weights(self, on_device: bool) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def export_hf(self, weights: dict) -> torch.nn.Module:
        return self.model

    # ---- one process: nothing to share --------------------------------------------------------------------
    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    # ---- checkpoint part ------------------------------------------------------------------------------
    def checkpoint_info(self) -> dict:
        return {}

    def save(self, path: Path) -> None:
        from learners import fsdp
        fsdp.save_sharded(path / "dcp", self.model, self.optimizer, self.ref)
        torch.save(checkpoint.rng_state(), path / "rng_0.pt")
        if self.critic is not None:
            torch.save({"critic": {"model": self.critic.model.state_dict(),
                                   "optimizer": self.critic.optimizer.state_dict()}}, path / "trainer_state.pt")

    def load(self, path: Path, state: dict) -> None:
        from learners import fsdp
        if not (path / "dcp").exists():
            return self._load_hf_layout(path)
        fsdp.load_sharded(path / "dcp", self.model, self.optimizer, self.ref)
        fsdp.load_rng(path, 0)
        if self.critic is not None and (path / "trainer_state.pt").exists():
            extra = torch.load(path / "trainer_state.pt", weights_only=False)  # our own file, written by save()
            self.critic.model.load_state_dict(extra["critic"]["model"])
            self.critic.optimizer.load_state_dict(extra["critic"]["optimizer"])

    def _load_hf_layout(self, path: Path) -> None:
        """A checkpoint written before the dcp/ layout: model/ (HF) + trainer_state.pt."""
        from safetensors.torch import load_file

        if not (path / "model" / "model.safetensors").exists():
            raise RuntimeError(f"checkpoint {path}: not a torch-backend checkpoint (neither dcp/ nor "
                               f"model/model.safetensors); resume with the backend that wrote it")
        weights = load_file(str(path / "model" / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # tied embeddings are not saved
            raise RuntimeError(f"checkpoint {path}: weights do not fit the model (missing {missing}, "
                               f"unexpected {unexpected})")
        extra = torch.load(path / "trainer_state.pt", weights_only=False)  # our own file, written by save()
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.critic is not None and "critic" in extra:
            self.critic.model.load_state_dict(extra["critic"]["model"])
            self.critic.optimizer.load_state_dict(extra["critic"]["optimizer"])
        if self.ref is not None and "ref" in extra:
            self.ref.load_state_dict(extra["ref"])
        checkpoint.set_rng_state(extra["rng"])
