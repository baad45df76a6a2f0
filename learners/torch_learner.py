"""Torch learner: SAMPLE a staleness-bounded batch from the hub, recompute logprobs, GRPO advantages,
PPO-clipped policy loss with TIS, AdamW with grad clipping; every `update_weights_interval` steps publish
weights v+1 and tell the hub. One JSON line of metrics per learner step.

The version the learner trains at is the number of publications so far; staleness of a trajectory is
that version minus its behavior version, and the hub guarantees it never exceeds `max_staleness`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from async_rl import config as config_mod
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.metrics import MetricsWriter
from async_rl.types import Group
from learners import losses
from learners.batch import TrainBatch, build_batch
from learners.weights import publish


def build_optimizer(model: torch.nn.Module, o: config_mod.OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                             weight_decay=o.weight_decay)


def forward_logprobs(model, rows: dict, temperature: float) -> torch.Tensor:
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]
    return losses.token_logprobs(logits, rows["targets"], temperature)


class TorchLearner:
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        torch.manual_seed(cfg.train.seed)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.ckpt.hf_checkpoint, dtype=torch.float32)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.hub = HubClient(hub_endpoint, identity="learner") if hub_endpoint else None
        self.version = 0
        self.stopping = False

    # ---- one learner step ------------------------------------------------------------------------
    def train_step(self, groups: list[Group]) -> dict:
        cfg, r, a = self.cfg, self.cfg.rollout, self.cfg.algo
        batch = build_batch(groups, self.pad_id)
        with torch.no_grad():
            logp_old = torch.cat([forward_logprobs(self.model, batch.select(slice(i, i + r.micro_batch_size)),
                                                   r.rollout_temperature)
                                  for i in range(0, len(batch.input_ids), r.micro_batch_size)])
        adv = losses.grpo_advantages(batch.rewards, not a.disable_grpo_std_normalization).flatten()
        advantages = adv[:, None] * batch.mask
        weights = (losses.tis_weights(logp_old, batch.rollout_logprobs, a.tis_clip, a.tis_clip_low)
                   if a.use_tis and a.loss_type == "policy_loss" else None)
        step_metrics = [self._optimizer_step(batch, logp_old, advantages, weights, k)
                        for k in range(r.num_steps_per_rollout)]
        return self._metrics(batch, logp_old, weights, step_metrics)

    def _optimizer_step(self, batch: TrainBatch, logp_old, advantages, weights, k: int) -> dict:
        r, a = self.cfg.rollout, self.cfg.algo
        start, mbs = k * r.global_batch_size, r.micro_batch_size
        token_denom = float(batch.mask[start:start + r.global_batch_size].sum().clamp(min=1.0))
        self.optimizer.zero_grad(set_to_none=True)
        total, metrics = 0.0, {"pg_clipfrac": 0.0, "ppo_kl": 0.0}
        n_micro = r.global_batch_size // mbs
        for i in range(start, start + r.global_batch_size, mbs):
            rows, sl = batch.select(slice(i, i + mbs)), slice(i, i + mbs)
            logp = forward_logprobs(self.model, rows, r.rollout_temperature)
            denom = token_denom if a.calculate_per_token_loss else None
            if a.loss_type == "sft_loss":
                loss, m = losses.sft_loss(logp, rows["mask"], a.calculate_per_token_loss, denom), {}
            else:
                loss, m = losses.policy_loss(logp, logp_old[sl], advantages[sl], rows["mask"], a.eps_clip,
                                             a.eps_clip_high, None if weights is None else weights[sl],
                                             a.calculate_per_token_loss, denom)
            scale = 1.0 if a.calculate_per_token_loss else 1.0 / n_micro
            (loss * scale).backward()
            total += float(loss) * scale
            for key, value in m.items():
                metrics[key] += value / n_micro
        clip = self.cfg.optimizer.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        return {"loss": total, "grad_norm": float(grad_norm), **metrics}

    def _metrics(self, batch: TrainBatch, logp_old, weights, steps: list[dict]) -> dict:
        mask = batch.mask.bool()
        staleness = (self.version - batch.behavior_versions).float()
        out = {
            "version": self.version,
            "reward/mean": float(batch.rewards.mean()), "reward/std": float(batch.rewards.std()),
            "staleness/max": float(staleness.max()), "staleness/mean": float(staleness.mean()),
            "loss/pg": sum(s["loss"] for s in steps) / len(steps),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "pg_clipfrac": sum(s["pg_clipfrac"] for s in steps) / len(steps),
            "ppo_kl": sum(s["ppo_kl"] for s in steps) / len(steps),
            "response_length/mean": float(batch.mask.sum(-1).mean()),
            "rollout_logprob_diff/mean_abs": float((logp_old - batch.rollout_logprobs)[mask].abs().mean()),
            "train_tokens": batch.num_tokens,
        }
        if weights is not None:
            w = weights[mask]
            clamped = (w <= self.cfg.algo.tis_clip_low) | (w >= self.cfg.algo.tis_clip)
            out.update({"tis/weight_mean": float(w.mean()), "tis/clipfrac": float(clamped.float().mean())})
        else:
            out.update({"tis/weight_mean": None, "tis/clipfrac": None})
        return out

    # ---- the loop --------------------------------------------------------------------------------
    def publish_next(self) -> None:
        path = publish(self.model, self.tokenizer, self.run_dir, self.version + 1, self.cfg.ckpt.keep_weight_versions)
        self.version += 1
        self.hub.request({"type": "VERSION", "version": self.version, "weights_path": str(path)}, timeout=30)

    def run(self) -> None:
        r = self.cfg.rollout
        writer = MetricsWriter(self.run_dir, self.cfg)
        t_start = last = time.time()
        prev_stats = {"gen_tokens": 0, "gen_busy_s": 0.0}
        try:
            for step in range(r.num_rollout):
                reply = self.hub.request({"type": "SAMPLE", "num_groups": r.rollout_batch_size,
                                          "version": self.version}, timeout=None, should_stop=lambda: self.stopping)
                groups = [Group.from_wire(g) for g in reply["groups"]]
                t0 = time.time()
                metrics = self.train_step(groups)
                if (step + 1) % r.update_weights_interval == 0:
                    self.publish_next()
                now = time.time()
                wall, stats = now - last, reply["stats"]
                metrics.update(self._perf(step, now, t_start, wall, now - t0, stats, prev_stats,
                                           metrics["train_tokens"]))
                writer.log(metrics)
                last, prev_stats = now, stats
        except HubTimeout:
            print("learner: stopped while waiting for a batch", flush=True)
        finally:
            writer.close()

    def _perf(self, step, now, t_start, wall, busy, stats, prev, tokens) -> dict:
        gens = max(1, stats.get("num_generators", 1))
        return {
            "step": step, "time": now - t_start,
            "perf/step_time_s": wall, "perf/learner_busy_frac": min(1.0, busy / max(wall, 1e-9)),
            "perf/train_tokens_per_s": tokens / max(wall, 1e-9),
            "perf/gen_tokens_per_s": (stats["gen_tokens"] - prev["gen_tokens"]) / max(wall, 1e-9),
            "perf/gen_busy_frac": min(1.0, (stats["gen_busy_s"] - prev["gen_busy_s"]) / max(wall, 1e-9) / gens),
            **{f"buffer/{k}": stats[k] for k in ("size", "accepted", "consumed", "evicted_stale", "duplicates",
                                                 "running")},
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl torch learner")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--hub", required=True, help="hub endpoint")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    torch.set_num_threads(cfg.cluster.learner_num_threads)
    learner = TorchLearner(cfg, args.run_dir, args.hub)

    def stop(*_):
        learner.stopping = True
    signal.signal(signal.SIGTERM, stop)
    learner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
