"""Megatron learner (`train_backend: megatron`): the torch learner's loop and RL math (`TorchLearner`:
SAMPLE -> logp_old -> advantages -> actor loss x TIS -> step -> publish v+1), with a megatron-core GPTModel
sharded over TP ranks, split into PP stages (Megatron's 1F1B schedule over the micro-batches; the last
stage computes the loss and hands results to the others) and replicated over DP ranks, Megatron DDP and
Megatron's optimizer on GPUs.

    torchrun --nproc-per-node N -m learners.megatron.learner --config C --run-dir D --hub H [--keys K]

Invariants: global rank 0 alone talks to the hub, writes the run directory and (update_weight_mode=broadcast)
sends the gathered weights to the engines; it broadcasts each batch
(or the decision to stop) so every rank runs the same steps and collectives in the same order. Every rank
builds the same TrainBatch from the broadcast groups; logprobs are computed on each DP rank's rows and
summed over DP (disjoint rows, so exactly the whole batch's); each mini-batch's rows are split evenly
over DP ranks. The version is the number of publications, as for the torch learner.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from async_rl import config as config_mod
from async_rl import protocol
from async_rl.hub_client import HubTimeout
from async_rl.plugins import PluginError
from learners import checkpoint as common_checkpoint
from learners import losses
from learners.batch import TrainBatch
from learners.megatron import batching, checkpoint, parallel
from learners.megatron.model import build_stage, forward_logits, forward_stage, shape_from_hf, transformer_config
from learners.megatron.optim import Stepper, wrap_ddp
from learners.megatron.weights import HFExport, gather_hf, load_hf, read_hf_checkpoint, unwrap
from learners.objective import actor_loss
from learners import torch_learner
from learners.torch_learner import TorchLearner
from learners.weights import eval_pin, publish


def check_hardware(train, on_gpu: bool) -> None:
    """Options this machine cannot honour, named with their fix (config_rules checks the rest)."""
    if not on_gpu and not getattr(torch.cuda, "_async_rl_cpu_shim", False):
        raise config_mod.ConfigError("train.train_backend='megatron': megatron-core needs CUDA GPUs and this "
                                     "machine has none; use train_backend=torch on CPU")
    if train.bf16 and not on_gpu:
        raise config_mod.ConfigError("train.bf16=True: Megatron's mixed-precision optimizer needs CUDA GPUs; set "
                                     "bf16=false on CPU")


class _NoMetrics:
    def log(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MegatronLearner(TorchLearner):
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None):
        from transformers import AutoConfig

        check_hardware(cfg.train, torch.cuda.is_available())
        self.layout = parallel.init(cfg.train)
        self.hf_config = AutoConfig.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.shape = shape_from_hf(self.hf_config, cfg.train.tensor_model_parallel_size)
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.layout.on_gpu else torch.device("cpu")
        self._stop_requested = False
        super().__init__(cfg, run_dir, hub_endpoint if self.layout.rank == 0 else None, keys_dir)
        if self.layout.rank != 0:
            self.broadcast = None  # update_weight_mode=broadcast: rank 0 holds the gathered HF tensors and sends

    # Ranks stop together: the loop's own check never fires; rank 0 turns a stop request into a broadcast
    # "no batch" in sample(), and every rank leaves the loop there.
    @property
    def stopping(self) -> bool:
        return False

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stop_requested = value

    # ---- model, optimizer, forward ---------------------------------------------------------------
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
    def _refresh_reference(self) -> None:
        for ref_p, p in zip(unwrap(self.ref).parameters(), unwrap(self.model).parameters()):
            ref_p.copy_(p)

    def _logits(self, model, rows: dict) -> torch.Tensor:
        return forward_logits(model, rows["input_ids"], self.shape.vocab)

    @torch.no_grad()
    def _batch_logprobs(self, model, batch: TrainBatch) -> torch.Tensor:
        t, r, lay = self.cfg.train, self.cfg.rollout, self.layout
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
        if model is self.model:
            model.train()
        if lay.dp > 1:  # each rank filled its own rows, the rest are 0: the sum is the whole batch
            from megatron.core import parallel_state as ps
            torch.distributed.all_reduce(out, group=ps.get_data_parallel_group_gloo())
        return out.to(batch.mask.device)

    # ---- one optimizer step over this DP rank's rows of a mini-batch -----------------------------------
    def _policy_step(self, batch: TrainBatch, start: int) -> dict:
        r, a, t, lay = self.cfg.rollout, self.cfg.algo, self.cfg.train, self.layout
        size = r.global_batch_size
        token_denom = float(batch.mask[start:start + size].sum().clamp(min=1.0))
        lengths = batching.row_lengths(batch)
        rows = batching.dp_rows(start, size, lay.dp, lay.dp_rank, lengths, t.balance_data)
        micros = batching.micro_batches(batching.by_length(rows, lengths), lengths, r.micro_batch_size,
                                        t.max_tokens_per_gpu if t.use_dynamic_batch_size else 0)
        self.optimizer.zero_grad()
        on_device = batching.to_device(batch, self.device)
        parts = [batching.take(on_device, micro, self.device, lengths) for micro in micros]
        total, metrics = torch.zeros((), device=self.device), {}

        def micro_loss(part: dict, logits: torch.Tensor) -> tuple[torch.Tensor, None]:
            nonlocal total
            loss, m = actor_loss(logits, part, a, r.rollout_temperature, token_denom, self.plugins.custom_loss)
            share = len(part["input_ids"]) / len(rows)  # per-sample losses are means over the micro-batch's rows
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

    # ---- loop hooks: rank 0 speaks for everyone ---------------------------------------------------------
    def sample(self) -> dict | None:
        reply = None
        if self.layout.rank == 0 and not self._stop_requested:
            try:
                reply = self.hub.request(protocol.Sample(num_groups=self.cfg.rollout.rollout_batch_size,
                                                         version=self.version, ack_lease=self.lease, step=self.step),
                                         timeout=None, should_stop=lambda: self._stop_requested)
                self.lease, self.hub_version = reply["lease"], int(reply.get("version", 0))
                if reply.get("replay"):
                    print(f"learner: step {self.step}: retraining the batch the hub kept since the checkpoint",
                          flush=True)
            except HubTimeout:
                reply = None
        shared = parallel.broadcast_object(None if reply is None else {k: v for k, v in reply.items() if k != "lease"})
        return reply if self.layout.rank == 0 else shared

    def apply_knobs(self, reply: dict) -> None:
        before = self.knob_version
        super().apply_knobs(reply)  # every rank gets the same reply, so every rank applies the same knobs
        if self.knob_version != before:
            self.optimizer.set_lr(self.cfg.optimizer.lr)

    def publish_next(self) -> None:
        """Every rank takes part in the TP/PP gather; rank 0 alone then broadcasts the HF tensors to the
        engines (update_weight_mode=broadcast, update_weight_buffer_size buckets), writes them to disk (evals,
        restarted engines, late joiners) and announces the version."""
        tensor = self.cfg.rollout.update_weight_mode == "tensor"
        state = gather_hf(self.model, self.shape, self.layout, on_device=tensor)  # collective
        version = self.version + 1
        if self.layout.rank == 0 and tensor and version > self.hub_version and \
                self.hand_over(state, version, self.hf_config):
            state = None  # the engines hold it, the hub knows it, the disk copy is being written
        elif self.layout.rank == 0:
            state = {k: v.cpu() for k, v in state.items()}
            # engines first (generation resumes sooner), then disk; not while retraining replayed steps (the
            # engines already hold a newer version; the hub takes this VERSION as a no-op)
            if self.broadcast is not None and version > self.hub_version:
                self.broadcast.send_tensors(state.items(), version, device=self.device)
            export = HFExport(state, self.hf_config, self.cfg.ckpt.hf_checkpoint)
            path = publish(export, self.tokenizer, self.run_dir, version, self.cfg.ckpt.keep_weight_versions,
                           pin=eval_pin(self.cfg, version))
            self.hub.request(protocol.Version(version=version, weights_path=str(path)), timeout=30)
        self.version = version

    def save_checkpoint(self, step: int) -> None:
        self.flush_weights()
        path = checkpoint.save(self, step, self.cfg.ckpt.keep_checkpoints)
        if self.layout.rank == 0:
            print(f"learner: checkpoint {path}", flush=True)
            self.report_checkpoint(step)  # the hub keeps (and replays) the batches after it

    def resume(self) -> int:
        path = common_checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load(self, path)
        if self.layout.rank == 0 and self.lease:  # that batch is in the checkpoint's weights
            self.hub.request(protocol.Ack(lease=self.lease), timeout=60)
        self.lease = None
        if self.layout.rank == 0:
            self.report_checkpoint(int(state["step"]))
            print(f"learner: resumed from {path} (step {state['step']}, version {self.version})", flush=True)
        return int(state["step"])

    def _writer(self):
        return super()._writer() if self.layout.rank == 0 else _NoMetrics()


def main(argv: list[str] | None = None) -> int:
    return torch_learner.main(argv, MegatronLearner, "async-rl megatron learner (one process per GPU, under torchrun)",
                              (PluginError, config_mod.ConfigError, ValueError), on_exit=parallel.shutdown)


if __name__ == "__main__":
    sys.exit(main())
