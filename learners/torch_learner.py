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
import contextlib
import signal
import sys
import time
from pathlib import Path

import torch

from async_rl import config as config_mod
from async_rl import knobs as knobs_mod
from async_rl import protocol
from async_rl.config_rules import kl_reward_shaping
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.metrics import MetricsWriter, elapsed_before
from async_rl.types import Group
from async_rl.plugins import PluginError
from learners import checkpoint, losses, offpolicy
from learners.advantages import compute_advantages, pass_at_k
from learners.batch import TrainBatch, build_batch
from learners.critic import Critic
from learners.kl import approx_kl
from learners.objective import actor_loss
from learners.optim import accumulate_step, build_optimizer as _build_optimizer, micro_slices
from learners.perf import Phases, profile_step
from learners.plugins import load_algo_plugins, postprocess
from learners.priorities import group_priorities
from learners.weights import BroadcastPublisher, eval_pin, publish


def build_optimizer(model: torch.nn.Module, o: config_mod.OptimizerConfig) -> torch.optim.Optimizer:
    return _build_optimizer(model.parameters(), o)


def forward_logits(model, rows: dict) -> torch.Tensor:
    """Logits of the positions that predict `rows["targets"]`; [B, T-1, V]."""
    return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]


def forward_logprobs(model, rows: dict, temperature: float) -> torch.Tensor:
    return losses.token_logprobs(forward_logits(model, rows), rows["targets"], temperature)


def needs_reference(algo) -> bool:
    return kl_reward_shaping(algo) or algo.use_kl_loss


def _mean(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if key in s]
    return sum(values) / len(values) if values else None


# the hub's counters logged every step: accepted == consumed + evicted_stale + evicted_capacity + size + in_flight
BUFFER_KEYS = ("size", "in_flight", "accepted", "consumed", "evicted_stale", "evicted_capacity", "duplicates",
               "running", "dropped_filtered", "reclaimed", "malformed", "credits_available", "max_staleness", "replayed",
               "reissued", "late_duplicates", "reissue_pending")


class TorchLearner:
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.plugins = load_algo_plugins(cfg.algo)  # first, so a bad plug-in fails before any model loads
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if not hasattr(self, "device"):  # the megatron backend sets its own (its rank's GPU)
            self.device = torch.device(cfg.train.learner_device)
        self.model, self.optimizer = self._build_policy()
        self.ref = self._load_reference() if needs_reference(cfg.algo) else None
        self.critic = (Critic(cfg.ckpt.hf_checkpoint, cfg.algo, cfg.optimizer)
                       if cfg.algo.advantage_estimator == "ppo" else None)
        if self.critic is not None:
            self.critic.model.to(self.device)
        self.hub = (HubClient(hub_endpoint, identity=protocol.LEARNER_ID, keys_dir=keys_dir,
                              resend_after=cfg.buffer.put_timeout) if hub_endpoint else None)
        self.lease = None  # the batch being trained on; acked with the next SAMPLE, redelivered if we die
        self.step = 0  # the learner step the next SAMPLE is for: the hub replays steps trained before a restart
        self.hub_version = 0  # the hub's version with the last batch: at or above ours while replaying
        self.knob_version = 0
        self.version = 0
        self.steps_done = 0  # learner steps trained (num_critic_only_steps, ref_update_interval)
        self.stopping = False
        self.broadcast = (BroadcastPublisher(cfg, self.run_dir)
                          if cfg.rollout.update_weight_mode == "broadcast" else None)
        self.tensor = None  # update_weight_mode=tensor: learners.handover.TensorPublisher, made at first use
        self.phases = Phases(self.device)

    # ---- what a backend provides (learners.megatron overrides these) ------------------------------
    def _build_policy(self):
        """(policy model in train mode, its optimizer)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.hf_checkpoint, dtype=torch.float32)
        model.to(self.device).train()
        return model, build_optimizer(model, self.cfg.optimizer)

    def _batch_logprobs(self, model, batch: TrainBatch) -> torch.Tensor:
        """Logprobs of every target of the batch under `model` (no grad), micro-batch by micro-batch."""
        r = self.cfg.rollout
        return torch.cat([batch.pad_columns(forward_logprobs(model, batch.select(sl, trim=True),
                                                             r.rollout_temperature))
                          for sl in micro_slices(0, len(batch.input_ids), r.micro_batch_size)])

    def _refresh_reference(self) -> None:
        self.ref.load_state_dict(self.model.state_dict())

    def _writer(self) -> MetricsWriter:
        return MetricsWriter(self.run_dir, self.cfg)

    def _load_reference(self):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.ref_load or self.cfg.ckpt.hf_checkpoint,
                                                   dtype=torch.float32)
        return ref.to(self.device).eval().requires_grad_(False)

    # ---- one learner step ------------------------------------------------------------------------
    def train_step(self, groups: list[Group]) -> dict:
        with self.phases.time("build"):
            batch = build_batch(groups, self.pad_id).to(self.device)
        with self._autocast():
            return self._train_batch(groups, batch)

    def _autocast(self):
        """bf16 autocast for the torch learner on a GPU (train.bf16); fp32 master weights and optimizer."""
        t = self.cfg.train
        on = t.bf16 and t.train_backend == "torch" and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on) if on else contextlib.nullcontext()

    def _train_batch(self, groups: list[Group], batch: TrainBatch) -> dict:
        r, a = self.cfg.rollout, self.cfg.algo
        with self.phases.time("score"):
            self._score(batch)
        kl = approx_kl(batch.logp_old, batch.ref_logp, a.kl_loss_type) * batch.mask \
            if batch.ref_logp is not None else None
        if a.disable_compute_advantages_and_returns:
            batch.advantages = torch.zeros_like(batch.mask)
        else:
            adv = compute_advantages(a, batch.rewards, batch.mask, kl, batch.values)
            batch.advantages, batch.returns = adv.advantages, adv.returns
        postprocess(self.plugins, self.cfg, self.steps_done, batch)  # algo.rollout_data_postprocess_path
        iw = self._importance_weights(batch)
        train_policy = self.steps_done >= a.num_critic_only_steps
        steps = []
        with self.phases.time("update"):
            for k in range(r.num_steps_per_rollout):
                start = k * r.global_batch_size
                m = self.critic.step(batch, start, r.global_batch_size, r.micro_batch_size) if self.critic else {}
                if train_policy:
                    m.update(self._policy_step(batch, start))
                steps.append(m)
        if self.cfg.debug.save_debug_rollout_data or self.cfg.debug.dump_details:  # slime's debug outputs
            from async_rl.debug import record_step
            record_step(self.cfg, self.steps_done, self.version, groups, batch)
        self.steps_done += 1
        interval = self.cfg.ckpt.ref_update_interval
        if self.ref is not None and interval and self.steps_done % interval == 0:
            self._refresh_reference()
        if self.hub is not None and self.cfg.buffer.priority_update != "none":  # re-prioritize them by key
            self.hub.update_priorities(group_priorities(self.cfg.buffer.priority_update, groups,
                                                        batch.advantages, batch.mask))
        return self._metrics(batch, kl, iw, steps)

    @torch.no_grad()
    def _score(self, batch: TrainBatch) -> None:
        """logp_old (proximal policy), reference logprobs and critic values, before any update."""
        r = self.cfg.rollout
        batch.logp_old = (batch.rollout_logprobs.clone() if self.cfg.algo.use_rollout_logprobs
                          else self._batch_logprobs(self.model, batch))
        if self.ref is not None:
            batch.ref_logp = self._batch_logprobs(self.ref, batch)
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
            rows = batch.select(sl, trim=True)
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
        """Publish weights v+1. While retraining replayed steps the hub already has v+1 (and the engines a
        newer one): the disk copy is rewritten, the engines are not rolled back, the hub takes VERSION as a no-op."""
        if self.cfg.rollout.update_weight_mode == "tensor" and self.version + 1 > self.hub_version and \
                self.hand_over(self.model.state_dict(), self.version + 1, self.model.config):
            self.version += 1
            return
        if self.broadcast is not None and self.version + 1 > self.hub_version:  # engines first, then disk
            self.broadcast.send(self.model, self.version + 1)
        path = publish(self.model, self.tokenizer, self.run_dir, self.version + 1, self.cfg.ckpt.keep_weight_versions,
                       pin=eval_pin(self.cfg, self.version + 1))
        self.version += 1
        self.hub.request(protocol.Version(version=self.version, weights_path=str(path)), timeout=30)

    def hand_over(self, named: dict, version: int, hf_config) -> bool:
        """update_weight_mode=tensor: True when the engines hold `version` and the hub was told; False when
        it must go through disk instead (learners.handover)."""
        from learners.handover import hand_over
        return hand_over(self, named, version, hf_config, eval_pin(self.cfg, version))

    def flush_weights(self) -> None:
        """Every published version on disk (checkpoints and the end of the run wait for this)."""
        if self.tensor is not None:
            self.tensor.flush()

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the learner step to continue from."""
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load(self, path)
        if self.lease:  # that batch is in the checkpoint's weights: the hub may count it consumed
            self.hub.request(protocol.Ack(lease=self.lease), timeout=60)
            self.lease = None
        self.report_checkpoint(int(state["step"]))  # the hub keeps (and replays) the batches after it
        print(f"learner: resumed from {path} (step {state['step']}, version {self.version})", flush=True)
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        self.flush_weights()
        path = checkpoint.save(self, step, self.cfg.ckpt.keep_checkpoints)
        print(f"learner: checkpoint {path}", flush=True)
        self.report_checkpoint(step)

    def report_checkpoint(self, step: int) -> None:
        """Tell the hub a complete checkpoint holds steps < `step`: it stops keeping their batches for replay."""
        if self.hub is not None:
            self.hub.request(protocol.Checkpoint(step=step), timeout=60)

    def apply_knobs(self, reply: dict) -> None:
        """Live knobs (`async-rl set`) arrive with batches; apply each new set once."""
        if int(reply.get("knob_version", 0)) <= self.knob_version:
            return
        changed = knobs_mod.apply(self.cfg, reply.get("knobs") or {})
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optimizer.lr
        self.knob_version = int(reply["knob_version"])
        print(f"learner: live knobs v{self.knob_version} applied: {changed}", flush=True)

    def sample(self) -> dict | None:
        """The next batch (acking the previous one), or None when asked to stop while waiting."""
        try:
            ask = protocol.Sample(num_groups=self.cfg.rollout.rollout_batch_size, version=self.version,
                                  ack_lease=self.lease, step=self.step)
            reply = self.hub.request(ask, timeout=None, should_stop=lambda: self.stopping)
        except HubTimeout:
            return None
        self.lease, self.hub_version = reply["lease"], int(reply.get("version", 0))
        if reply.get("replay"):
            print(f"learner: step {self.step}: retraining the batch the hub kept since the checkpoint", flush=True)
        return reply

    def run(self, start_step: int = 0) -> None:
        """Train from `start_step` to num_rollout (or until stopped), then checkpoint and ack the last batch."""
        r, interval = self.cfg.rollout, self.cfg.ckpt.save_interval
        writer = self._writer()
        last = time.time()
        t_start = last - (elapsed_before(self.run_dir, start_step) if start_step else 0.0)  # resumed: time continues
        prev_stats = {"gen_tokens": 0, "gen_busy_s": 0.0}
        step = start_step
        try:
            while step < r.num_rollout and not self.stopping:
                self.step = step
                with self.phases.time("sample_wait"):
                    reply = self.sample()
                if reply is None:
                    break
                self.apply_knobs(reply)
                t0 = time.time()
                with profile_step(step):
                    metrics = self.train_step([Group.from_wire(g) for g in reply["groups"]])
                metrics["knob_version"] = self.knob_version
                t_publish = time.time()
                if (step + 1) % r.update_weights_interval == 0:
                    with self.phases.time("publish"):
                        self.publish_next()
                now = time.time()
                metrics["perf/publish_s"] = now - t_publish  # weight publication: disk (+ broadcast) + VERSION
                metrics.update(self.phases.take())
                if self.tensor is not None:
                    metrics.update({f"perf/publish/{k}": v for k, v in self.tensor.timings.items()})
                metrics.update(self._perf(step, now, t_start, now - last, now - t0, reply["stats"], prev_stats,
                                          metrics["train_tokens"]))
                writer.log(metrics)
                last, prev_stats, step = now, reply["stats"], step + 1
                if interval and step % interval == 0:
                    self.save_checkpoint(step)
            if step > start_step and not (interval and step % interval == 0):
                self.save_checkpoint(step)  # the final (or stopped) state is always resumable
            if self.lease:  # the last batch is in the weights now: let the hub count it consumed
                self.hub.request(protocol.Ack(lease=self.lease), timeout=30)
        finally:
            if self.tensor is not None:
                self.tensor.close()  # every version on disk before the learner exits
            writer.close()

    def _perf(self, step, now, t_start, wall, busy, stats, prev, tokens) -> dict:
        gens = max(1, stats.get("num_generators", 1))
        return {
            "step": step, "time": now - t_start, "perf/unix_time": now,
            "perf/step_time_s": wall, "perf/learner_busy_frac": min(1.0, busy / max(wall, 1e-9)),
            "perf/train_tokens_per_s": tokens / max(wall, 1e-9),
            "perf/gen_tokens_per_s": (stats["gen_tokens"] - prev["gen_tokens"]) / max(wall, 1e-9),
            "perf/gen_busy_frac": min(1.0, (stats["gen_busy_s"] - prev["gen_busy_s"]) / max(wall, 1e-9) / gens),
            **{f"buffer/{k}": stats.get(k) for k in BUFFER_KEYS},
        }


def main(argv: list[str] | None = None, learner_cls=None, description: str = "async-rl torch learner",
         errors: tuple = (PluginError,), on_exit=None) -> int:
    """The learner process (shared by every backend: `learner_cls` and `errors` differ)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--hub", required=True, help="hub endpoint")
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run (none = no auth)")
    ap.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints (newest complete)")
    args = ap.parse_args(argv)
    # SIGTERM (`async-rl stop`) may come while the model is still loading: remember it, stop at the first step
    stop_asked: list[int] = []
    learner = None

    def stop(*_):
        stop_asked.append(1)
        if learner is not None:
            learner.stopping = True
    signal.signal(signal.SIGTERM, stop)
    cfg = config_mod.load(args.config)
    torch.set_num_threads(cfg.cluster.learner_num_threads)
    try:
        learner = (learner_cls or TorchLearner)(cfg, args.run_dir, args.hub, args.keys)
    except errors as exc:
        print(f"learner: {exc}", file=sys.stderr, flush=True)
        return 2
    learner.stopping = bool(stop_asked)
    try:
        learner.run(learner.resume() if args.resume else 0)
    finally:
        if on_exit is not None:
            on_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
