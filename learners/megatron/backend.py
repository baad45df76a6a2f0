"""The Megatron backend (`train_backend: megatron`): a megatron-core GPTModel sharded over TP ranks, split
into PP stages (Megatron's 1F1B schedule over the micro-batches; the last stage computes the loss and hands
results to the others) and replicated over DP ranks, Megatron DDP and Megatron's optimizer on GPUs.

Invariants: every rank builds the same TrainBatch from the broadcast groups (learners.loop); logprobs are
computed on each DP rank's rows and summed over DP (disjoint rows, so exactly the whole batch's); each
mini-batch's rows are split evenly over DP ranks; the numbers a step returns are reduced over DP and the
same on every rank. Weights leave as one HF state dict gathered on global rank 0.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from async_rl import config as config_mod
from learners import losses
from learners.backend import LossFn, needs_reference
from learners.batch import TrainBatch
from learners import batching
from learners.megatron import checkpoint, parallel
from learners.megatron.model import build_stage, forward_logits, forward_stage, shape_from_hf, transformer_config
from learners.megatron.optim import Stepper, wrap_ddp
from learners.megatron.weights import gather_hf, load_hf, read_hf_checkpoint, unwrap
from learners.weights import HFExport


def check_hardware(train, on_gpu: bool) -> None:
    """Options this machine cannot honour, named with their fix (config_rules checks the rest)."""
    if not on_gpu and not getattr(torch.cuda, "_async_rl_cpu_shim", False):
        raise config_mod.ConfigError("train.train_backend='megatron': megatron-core needs CUDA GPUs and this "
                                     "machine has none; use train_backend=torch on CPU")
    if train.bf16 and not on_gpu:
        raise config_mod.ConfigError("train.bf16=True: Megatron's mixed-precision optimizer needs CUDA GPUs; set "
                                     "bf16=false on CPU")


class MegatronBackend:
    critic = None  # config_rules refuses advantage_estimator=ppo with this backend

    def __init__(self, cfg: config_mod.Config):
        from transformers import AutoConfig

        check_hardware(cfg.train, torch.cuda.is_available())
        self.cfg = cfg
        self.layout = parallel.init(cfg.train)
        self.rank = self.layout.rank
        self.hf_config = AutoConfig.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.shape = shape_from_hf(self.hf_config, cfg.train.tensor_model_parallel_size)
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.layout.on_gpu else torch.device("cpu")
        self.model, self.optimizer = self._build_policy()
        self.ref = self._load_reference() if needs_reference(cfg.algo) else None

    # ---- model, optimizer ------------------------------------------------------------------------------
    def _stage(self, checkpoint_dir: str):
        config = transformer_config(self.shape, self.cfg.train, self.dtype)
        config.calculate_per_token_loss = self.cfg.algo.calculate_per_token_loss  # DDP sums instead of averaging
        model = build_stage(self.shape, config)
        load_hf(model, read_hf_checkpoint(checkpoint_dir), self.shape, self.layout.tp_rank, self.layout.tp)
        return model, config

    def _build_policy(self):
        model, config = self._stage(self.cfg.ckpt.hf_checkpoint)
        ddp = wrap_ddp(model, config, self.layout.dp, distributed_optimizer=self.layout.on_gpu)
        ddp.train()
        r = self.cfg.rollout
        stepper = Stepper(ddp, self.cfg.optimizer, r.num_rollout * r.num_steps_per_rollout, self.layout.on_gpu,
                          self.cfg.train.bf16)
        return ddp, stepper

    def _load_reference(self):
        model, _ = self._stage(self.cfg.ckpt.ref_load or self.cfg.ckpt.hf_checkpoint)
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def refresh_reference(self) -> None:
        for ref_p, p in zip(unwrap(self.ref).parameters(), unwrap(self.model).parameters()):
            ref_p.copy_(p)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.set_lr(lr)

    def autocast(self):
        return contextlib.nullcontext()  # the model's own dtype (train.bf16) and Megatron's optimizer

    # ---- forward -----------------------------------------------------------------------------------------
    def _logits(self, model, rows: dict) -> torch.Tensor:
        return forward_logits(model, rows["input_ids"], self.shape.vocab)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        t, r, lay = self.cfg.train, self.cfg.rollout, self.layout
        model = self.ref if reference else self.model
        lengths = batching.row_lengths(batch)
        rows = batching.dp_rows(0, len(lengths), lay.dp, lay.dp_rank, lengths, balance=False)
        budget = (t.log_probs_max_tokens_per_gpu or t.max_tokens_per_gpu) if t.use_dynamic_batch_size else 0
        out = torch.zeros(batch.mask.shape, dtype=batch.mask.dtype)  # on the host: gloo sums it over DP
        model.eval()
        on_device = batching.to_device(batch, self.device)
        micros = batching.micro_batches(batching.by_length(rows, lengths), lengths, r.micro_batch_size, budget)
        parts = [batching.take(on_device, micro, self.device, lengths) for micro in micros]
        if lay.pp > 1:
            done = self._pipelined(model, parts, lambda part, logits: (
                torch.zeros((), device=logits.device),
                losses.token_logprobs(logits, part["targets"], r.rollout_temperature).float()), forward_only=True)
            done = parallel.from_last_stage([logp.cpu() for logp in done], lay)
        else:  # results stay on the device until the end: no sync per micro-batch, so the host queues the
            done = [losses.token_logprobs(self._logits(model, part), part["targets"],  # next one meanwhile
                                          r.rollout_temperature).float() for part in parts]
        for micro, logp in zip(micros, done):
            out[micro, :logp.shape[1]] = logp.cpu()
        if not reference:
            model.train()
        if lay.dp > 1:  # each rank filled its own rows, the rest are 0: the sum is the whole batch
            from megatron.core import parallel_state as ps
            torch.distributed.all_reduce(out, group=ps.get_data_parallel_group_gloo())
        return out.to(batch.mask.device)

    # ---- one optimizer step over this DP rank's rows of a mini-batch -----------------------------------
    def train_step(self, batch: TrainBatch, rows: slice, loss_fn: LossFn) -> dict:
        r, a, t, lay = self.cfg.rollout, self.cfg.algo, self.cfg.train, self.layout
        lengths = batching.row_lengths(batch)
        mine = batching.dp_rows(rows.start, rows.stop - rows.start, lay.dp, lay.dp_rank, lengths, t.balance_data)
        micros = batching.micro_batches(batching.by_length(mine, lengths), lengths, r.micro_batch_size,
                                        t.max_tokens_per_gpu if t.use_dynamic_batch_size else 0)
        self.optimizer.zero_grad()
        on_device = batching.to_device(batch, self.device)
        parts = [batching.take(on_device, micro, self.device, lengths) for micro in micros]
        total, metrics = torch.zeros((), device=self.device), {}

        def micro_loss(part: dict, logits: torch.Tensor) -> tuple[torch.Tensor, None]:
            nonlocal total
            loss, m = loss_fn(logits, part)
            share = len(part["input_ids"]) / len(mine)  # per-sample losses are means over the micro-batch's rows
            scale = 1.0 if a.calculate_per_token_loss else share
            total = total + loss.detach() * scale  # read once per step: no sync per micro-batch
            for key, value in m.items():
                metrics[key] = metrics.get(key, 0.0) + value * (scale if key.startswith("loss/") else share)
            return loss * scale, None

        if lay.pp > 1:
            self._pipelined(self.model, parts, micro_loss, forward_only=False)
        else:
            for part in parts:  # the host queues the next micro-batch's forward while the device still runs
                micro_loss(part, self._logits(self.model, part))[0].backward()  # this backward
        out = parallel.from_last_stage({"loss": float(total), **metrics}, lay)
        if lay.dp > 1:
            out = self._reduce_over_dp(out)
        return {**out, "grad_norm": self.optimizer.step(), "lr": self.optimizer.lr}

    def _pipelined(self, model, parts: list[dict], loss_fn, forward_only: bool) -> list:
        """Megatron's 1F1B pipeline schedule over micro-batches `parts` (PP > 1); `loss_fn(part, logits)` ->
        (loss to backpropagate, result) runs on the last stage, which gets the results in order (others: [])."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results = []

        def forward_step(data_iterator, stage):
            part = next(data_iterator)
            output = forward_stage(stage, part["input_ids"], self.shape.vocab)

            def on_last_stage(logits):
                loss, result = loss_fn(part, logits)
                results.append(result)
                return loss * len(parts), {}  # the schedule divides by the number of micro-batches
            return output, on_last_stage

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(parts), model=[model],
                                    num_microbatches=len(parts), forward_only=forward_only,
                                    seq_length=max(p["input_ids"].shape[1] for p in parts),
                                    micro_batch_size=max(p["input_ids"].shape[0] for p in parts))
        return results

    def _reduce_over_dp(self, values: dict) -> dict:
        """Per-token losses are partial sums (summed over DP); everything else is averaged."""
        from megatron.core import parallel_state as ps
        group = ps.get_data_parallel_group_gloo()
        mean = parallel.all_reduce_mean(values, group)
        if self.cfg.algo.calculate_per_token_loss:
            dp = self.layout.dp
            mean.update({k: v * dp for k, v in mean.items() if k == "loss" or k.startswith("loss/")})
        return mean

    # ---- weights out, ranks, checkpoint part ----------------------------------------------------------------
    def hf_weights(self, on_device: bool) -> dict[str, torch.Tensor] | None:
        """The TP/PP gather (every rank takes part); on the device only with PP = 1."""
        return gather_hf(self.model, self.shape, self.layout, on_device=on_device)

    def export_hf(self, weights: dict) -> HFExport:
        return HFExport({k: v.cpu() for k, v in weights.items()}, self.hf_config, self.cfg.ckpt.hf_checkpoint)

    def broadcast_object(self, obj):
        return parallel.broadcast_object(obj)

    def barrier(self) -> None:
        parallel.barrier()

    def checkpoint_info(self) -> dict:
        return checkpoint.info(self.layout)

    def save(self, path: Path) -> None:
        checkpoint.save(self, path)

    def load(self, path: Path, state: dict) -> None:
        checkpoint.load(self, path, state)
