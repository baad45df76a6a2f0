"""Torch learner: SAMPLE a staleness-bounded batch from the hub, recompute logprobs (and reference
logprobs, critic values when asked), advantages, the actor loss with off-policy correction, AdamW with
grad clipping; every `update_weights_interval` steps publish weights v+1 and tell the hub. One JSON line
of metrics per learner step.

The version the learner trains at is the number of publications so far; staleness of a trajectory is
that version minus its behavior version, and the hub guarantees it never exceeds `max_staleness`.
Decoupled PPO: `logp_old` is this learner's recomputation at the version it trains at (the proximal
policy), and each token's importance weight is built from pi_prox / pi_behavior (`learners.offpolicy`);
`use_rollout_logprobs` skips the recomputation and uses the engine's logprobs (every weight is then 1).
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
from async_rl.plugins import PluginError
from learners import losses, offpolicy
from learners.advantages import compute_advantages, pass_at_k
from learners.batch import TrainBatch, build_batch
from learners.critic import Critic
from learners.kl import approx_kl
from learners.objective import actor_loss
from learners.optim import accumulate_step, build_optimizer as _build_optimizer, micro_slices
from learners.plugins import load_algo_plugins
from learners.weights import publish


def build_optimizer(model: torch.nn.Module, o: config_mod.OptimizerConfig) -> torch.optim.Optimizer:
    return _build_optimizer(model.parameters(), o)


def forward_logits(model, rows: dict) -> torch.Tensor:
    """Logits of the positions that predict `rows["targets"]`; [B, T-1, V]."""
    return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]


def forward_logprobs(model, rows: dict, temperature: float) -> torch.Tensor:
    return losses.token_logprobs(forward_logits(model, rows), rows["targets"], temperature)


def needs_reference(algo) -> bool:
    return algo.kl_coef != 0 or algo.use_kl_loss


def _mean(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if key in s]
    return sum(values) / len(values) if values else None


class TorchLearner:
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.plugins = load_algo_plugins(cfg.algo)  # first, so a bad plug-in fails before any model loads
        torch.manual_seed(cfg.train.seed)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.ckpt.hf_checkpoint, dtype=torch.float32)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.ref = self._load_reference() if needs_reference(cfg.algo) else None
        self.critic = (Critic(cfg.ckpt.hf_checkpoint, cfg.algo, cfg.optimizer)
                       if cfg.algo.advantage_estimator == "ppo" else None)
        self.hub = (HubClient(hub_endpoint, identity="learner", keys_dir=keys_dir,
                              resend_after=cfg.buffer.put_timeout) if hub_endpoint else None)
        self.lease = None  # the batch being trained on; acked with the next SAMPLE, redelivered if we die
        self.version = 0
        self.steps_done = 0  # learner steps trained (num_critic_only_steps, ref_update_interval)
        self.stopping = False

    def _load_reference(self):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.ref_load or self.cfg.ckpt.hf_checkpoint,
                                                   dtype=torch.float32)
        return ref.eval().requires_grad_(False)

    # ---- one learner step ------------------------------------------------------------------------
    def train_step(self, groups: list[Group]) -> dict:
        r, a = self.cfg.rollout, self.cfg.algo
        batch = build_batch(groups, self.pad_id)
        self._score(batch)
        kl = approx_kl(batch.logp_old, batch.ref_logp, a.kl_loss_type) * batch.mask \
            if batch.ref_logp is not None else None
        if a.disable_compute_advantages_and_returns:
            batch.advantages = torch.zeros_like(batch.mask)
        else:
            adv = compute_advantages(a, batch.rewards, batch.mask, kl, batch.values)
            batch.advantages, batch.returns = adv.advantages, adv.returns
        iw = self._importance_weights(batch)
        train_policy = self.steps_done >= a.num_critic_only_steps
        steps = []
        for k in range(r.num_steps_per_rollout):
            start = k * r.global_batch_size
            m = self.critic.step(batch, start, r.global_batch_size, r.micro_batch_size) if self.critic else {}
            if train_policy:
                m.update(self._policy_step(batch, start))
            steps.append(m)
        self.steps_done += 1
        interval = self.cfg.ckpt.ref_update_interval
        if self.ref is not None and interval and self.steps_done % interval == 0:
            self.ref.load_state_dict(self.model.state_dict())
        return self._metrics(batch, kl, iw, steps)

    @torch.no_grad()
    def _score(self, batch: TrainBatch) -> None:
        """logp_old (proximal policy), reference logprobs and critic values, before any update."""
        r = self.cfg.rollout

        def logprobs(model) -> torch.Tensor:
            return torch.cat([forward_logprobs(model, batch.select(sl), r.rollout_temperature)
                              for sl in micro_slices(0, len(batch.input_ids), r.micro_batch_size)])
        batch.logp_old = (batch.rollout_logprobs.clone() if self.cfg.algo.use_rollout_logprobs
                          else logprobs(self.model))
        if self.ref is not None:
            batch.ref_logp = logprobs(self.ref)
        if self.critic is not None:
            batch.values = self.critic.values(batch, r.micro_batch_size)

    def _importance_weights(self, batch: TrainBatch) -> offpolicy.ImportanceWeights | None:
        a = self.cfg.algo
        if not a.use_tis or a.loss_type == "sft_loss":
            return None
        if self.plugins.custom_tis is not None:
            iw = offpolicy.custom_weights(self.plugins.custom_tis, batch.logp_old, batch.rollout_logprobs,
                                          batch.mask, a)
        else:
            iw = offpolicy.importance_weights(batch.logp_old, batch.rollout_logprobs, batch.mask, a.tis_clip,
                                              a.tis_clip_low, a.tis_level, a.tis_mode)
        batch.tis_weights = iw.weights
        return iw

    def _policy_step(self, batch: TrainBatch, start: int) -> dict:
        r, a = self.cfg.rollout, self.cfg.algo
        token_denom = float(batch.mask[start:start + r.global_batch_size].sum().clamp(min=1.0))

        def loss_fn(sl: slice):
            rows = batch.select(sl)
            return actor_loss(forward_logits(self.model, rows), rows, a, r.rollout_temperature, token_denom,
                              self.plugins.custom_loss)
        return accumulate_step(list(self.model.parameters()), self.optimizer,
                               micro_slices(start, r.global_batch_size, r.micro_batch_size), loss_fn,
                               a.calculate_per_token_loss, self.cfg.optimizer.clip_grad)

    def _metrics(self, batch: TrainBatch, kl, iw, steps: list[dict]) -> dict:
        a, mask = self.cfg.algo, batch.mask.bool()
        staleness = (self.version - batch.behavior_versions).float()
        adv = batch.advantages[mask]
        out = {
            "version": self.version,
            "reward/mean": float(batch.rewards.mean()), "reward/std": float(batch.rewards.std()),
            "staleness/max": float(staleness.max()), "staleness/mean": float(staleness.mean()),
            "loss/pg": _mean([{"pg": s.get("loss/pg", s["loss"])} for s in steps if "loss" in s], "pg"),
            "loss/total": _mean(steps, "loss"), "grad_norm": _mean(steps, "grad_norm"),
            "pg_clipfrac": _mean(steps, "pg_clipfrac"), "ppo_kl": _mean(steps, "ppo_kl"),
            "entropy": _mean(steps, "entropy"),
            "advantages/mean": float(adv.mean()) if adv.numel() else 0.0,
            "advantages/std": float(adv.std()) if adv.numel() > 1 else 0.0,
            "response_length/mean": float(batch.mask.sum(-1).mean()),
            "rollout_logprob_diff/mean_abs": None if a.use_rollout_logprobs else
            float((batch.logp_old - batch.rollout_logprobs)[mask].abs().mean()),
            "train_tokens": batch.num_tokens,
        }
        out.update(offpolicy.tis_stats(iw, batch.mask) if iw is not None else
                   {"tis/weight_mean": None, "tis/clipfrac": None})
        if kl is not None:
            out["kl"] = float(kl[mask].mean())
        for key in sorted({k for s in steps for k in s} - set(out) - {"loss"}):  # loss/kl, critic/*, plug-ins'
            out[key] = _mean(steps, key)
        if batch.values is not None:
            out["critic/values_mean"] = float(batch.values[mask].mean())
            out["returns/mean"] = float(batch.returns[mask].mean()) if batch.returns is not None else None
        if a.log_passrate:
            out.update(pass_at_k(batch.rewards))
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
                reply = self.hub.request({"type": "SAMPLE", "learner_id": "learner", "num_groups": r.rollout_batch_size,
                                          "version": self.version, "ack_lease": self.lease},
                                         timeout=None, should_stop=lambda: self.stopping)
                self.lease = reply["lease"]
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
            if self.lease:  # the last batch is trained on: let the hub count it consumed
                self.hub.request({"type": "ACK", "learner_id": "learner", "lease": self.lease}, timeout=30)
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
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run (none = no auth)")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    torch.set_num_threads(cfg.cluster.learner_num_threads)
    try:
        learner = TorchLearner(cfg, args.run_dir, args.hub, args.keys)
    except PluginError as exc:
        print(f"learner: plug-in error: {exc}", file=sys.stderr, flush=True)
        return 2

    def stop(*_):
        learner.stopping = True
    signal.signal(signal.SIGTERM, stop)
    learner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
