"""The learner, one loop for every training backend (learners.backend): SAMPLE a staleness-bounded batch
from the hub, score it (logp_old, reference logprobs, critic values), advantages, the actor loss with
off-policy correction, one optimizer step per mini-batch; every `update_weights_interval` steps publish
weights v+1 and tell the hub. One JSON line of metrics per learner step; a checkpoint every
`save_interval` steps and at the end; resume, with the hub replaying the steps after the checkpoint.

The version the learner trains at is the number of publications so far; staleness of a trajectory is
that version minus its behavior version, and the hub guarantees it never exceeds `max_staleness`.
Decoupled PPO: `logp_old` is this learner's recomputation at the version it trains at (the proximal
policy), and each token's importance weight is built from pi_prox / pi_behavior (`learners.offpolicy`);
`use_rollout_logprobs` skips the recomputation and uses the engine's logprobs (every weight is then 1).

Ranks: the backend may span N processes. Global rank 0 alone talks to the hub, writes the run directory
and sends weights to the engines; it broadcasts each batch, or the decision to stop (`stopping` is read
on rank 0 only), so every rank runs the same steps and collectives in the same order.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from async_rl import config as config_mod
from async_rl import knobs as knobs_mod
from async_rl import protocol
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.metrics import MetricsWriter, elapsed_before
from async_rl.plugins import PluginError
from async_rl.types import Group
from learners import checkpoint, offpolicy
from learners.advantages import compute_advantages
from learners.batch import TrainBatch, build_batch
from learners.kl import approx_kl
from learners.objective import actor_loss
from learners.perf import Phases, profile_step
from learners.plugins import load_algo_plugins, postprocess
from learners.priorities import group_priorities
from learners.step_metrics import loop_metrics, rl_metrics
from learners.weights import BroadcastPublisher, eval_pin, publish


class _NoMetrics:
    def log(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Learner:
    """The loop over `backend_cls(cfg)` (learners.backend.Backend); `run()` trains, `train_step()` is one step."""

    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None, backend_cls):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.plugins = load_algo_plugins(cfg.algo)  # first, so a bad plug-in fails before any model loads
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.backend = backend_cls(cfg)
        self.rank, self.device = self.backend.rank, self.backend.device
        speaks = self.rank == 0
        self.hub = (HubClient(hub_endpoint, identity=protocol.LEARNER_ID, keys_dir=keys_dir,
                              resend_after=cfg.buffer.put_timeout) if hub_endpoint and speaks else None)
        self.lease = None  # the batch being trained on; acked with the next SAMPLE, redelivered if we die
        self.step = 0  # the learner step the next SAMPLE is for: the hub replays steps trained before a restart
        self.hub_version = 0  # the hub's version with the last batch: at or above ours while replaying
        self.knob_version = 0
        self.version = 0
        self.steps_done = 0  # learner steps trained (num_critic_only_steps, ref_update_interval)
        self.stopping = False  # set by SIGTERM; rank 0's turns into "no batch" for every rank
        self.broadcast = (BroadcastPublisher(cfg, self.run_dir)
                          if cfg.rollout.update_weight_mode == "broadcast" and speaks else None)
        self.tensor = None  # update_weight_mode=tensor: learners.handover.TensorPublisher, made at first use
        self.phases = Phases(self.device)

    # ---- one RL step ---------------------------------------------------------------------------------
    def train_step(self, groups: list[Group]) -> dict:
        """Score the groups, compute advantages and importance weights, take one optimizer step per
        mini-batch (critic first, when there is one); returns the step's metrics."""
        r, a, b = self.cfg.rollout, self.cfg.algo, self.backend
        with self.phases.time("build"):
            batch = build_batch(groups, self.pad_id).to(self.device)
        with b.autocast():
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
                for k in range(r.num_steps_per_rollout):  # one optimizer step per mini-batch
                    rows = slice(k * r.global_batch_size, (k + 1) * r.global_batch_size)
                    m = b.critic.step(batch, rows.start, r.global_batch_size, r.micro_batch_size) if b.critic else {}
                    if train_policy:
                        m.update(b.train_step(batch, rows, self._actor_loss(batch, rows)))
                    steps.append(m)
        if self.rank == 0 and (self.cfg.debug.save_debug_rollout_data or self.cfg.debug.dump_details):
            from async_rl.debug import record_step  # slime's debug outputs
            record_step(self.cfg, self.steps_done, self.version, groups, batch)
        self.steps_done += 1
        interval = self.cfg.ckpt.ref_update_interval
        if b.ref is not None and interval and self.steps_done % interval == 0:
            b.refresh_reference()
        if self.hub is not None and self.cfg.buffer.priority_update != "none":  # re-prioritize them by key
            self.hub.update_priorities(group_priorities(self.cfg.buffer.priority_update, groups,
                                                        batch.advantages, batch.mask))
        return rl_metrics(a, self.version, batch, kl, iw, steps)

    @torch.no_grad()
    def _score(self, batch: TrainBatch) -> None:
        """logp_old (proximal policy), reference logprobs and critic values, before any update."""
        b = self.backend
        batch.logp_old = (batch.rollout_logprobs.clone() if self.cfg.algo.use_rollout_logprobs
                          else b.logprobs(batch))
        if b.ref is not None:
            batch.ref_logp = b.logprobs(batch, reference=True)
        if b.critic is not None:
            batch.values = b.critic.values(batch, self.cfg.rollout.micro_batch_size)

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

    def _actor_loss(self, batch: TrainBatch, rows: slice):
        """The loss of one micro-batch of mini-batch `rows` (per-token losses over the mini-batch's tokens)."""
        r, a = self.cfg.rollout, self.cfg.algo
        token_denom = float(batch.mask[rows].sum().clamp(min=1.0))
        return lambda logits, part: actor_loss(logits, part, a, r.rollout_temperature, token_denom,
                                               self.plugins.custom_loss)

    # ---- weights out -----------------------------------------------------------------------------------
    def publish_next(self) -> None:
        """Publish weights v+1: every rank takes part in gathering them; rank 0 then hands them to the engines
        (tensor, broadcast), writes them to disk (evals, restarted engines, late joiners) and announces the
        version. While retraining replayed steps the hub already has v+1 (and the engines a newer one): the
        disk copy is rewritten, the engines are not rolled back, the hub takes VERSION as a no-op."""
        version, mode = self.version + 1, self.cfg.rollout.update_weight_mode
        fresh = version > self.hub_version
        weights = self.backend.hf_weights(on_device=mode == "tensor")  # collective
        if self.rank == 0 and not (mode == "tensor" and fresh and self.hand_over(weights, version)):
            if self.broadcast is not None and fresh:  # engines first (generation resumes sooner), then disk
                self.broadcast.send_tensors(weights.items(), version, device=self.device)
            path = publish(self.backend.export_hf(weights), self.tokenizer, self.run_dir, version,
                           self.cfg.ckpt.keep_weight_versions, pin=eval_pin(self.cfg, version))
            self.hub.request(protocol.Version(version=version, weights_path=str(path)), timeout=30)
        self.version = version

    def hand_over(self, named: dict, version: int) -> bool:
        """update_weight_mode=tensor: True when the engines hold `version` and the hub was told; False when
        it must go through disk instead (learners.handover)."""
        from learners.handover import hand_over
        return hand_over(self, named, version, self.backend.hf_config, eval_pin(self.cfg, version))

    def flush_weights(self) -> None:
        """Every published version on disk (checkpoints and the end of the run wait for this)."""
        if self.tensor is not None:
            self.tensor.flush()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the learner step to continue from."""
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load(self, path)
        self.ack(timeout=60)  # that batch is in the checkpoint's weights: the hub may count it consumed
        self.report_checkpoint(int(state["step"]))  # the hub keeps (and replays) the batches after it
        if self.rank == 0:
            print(f"learner: resumed from {path} (step {state['step']}, version {self.version})", flush=True)
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        self.flush_weights()
        path = checkpoint.save(self, step, self.cfg.ckpt.keep_checkpoints)
        if self.rank == 0:
            print(f"learner: checkpoint {path}", flush=True)
        self.report_checkpoint(step)

    def report_checkpoint(self, step: int) -> None:
        """Tell the hub a complete checkpoint holds steps < `step`: it stops keeping their batches for replay."""
        if self.hub is not None:
            self.hub.request(protocol.Checkpoint(step=step), timeout=60)

    # ---- the hub session -------------------------------------------------------------------------------
    def ack(self, timeout: float) -> None:
        """The batch last trained on is in the weights now: the hub counts it consumed (rank 0's lease)."""
        if self.lease:
            self.hub.request(protocol.Ack(lease=self.lease), timeout=timeout)
            self.lease = None

    def apply_knobs(self, reply: dict) -> None:
        """Live knobs (`async-rl set`) arrive with batches; apply each new set once (every rank gets the
        same reply, so every rank applies the same knobs)."""
        if int(reply.get("knob_version", 0)) <= self.knob_version:
            return
        changed = knobs_mod.apply(self.cfg, reply.get("knobs") or {})
        self.backend.set_lr(self.cfg.optimizer.lr)
        self.knob_version = int(reply["knob_version"])
        print(f"learner: live knobs v{self.knob_version} applied: {changed}", flush=True)

    def sample(self) -> dict | None:
        """The next batch (acking the previous one), the same on every rank; None when asked to stop."""
        reply = None
        if self.rank == 0 and not self.stopping:
            try:
                ask = protocol.Sample(num_groups=self.cfg.rollout.rollout_batch_size, version=self.version,
                                      ack_lease=self.lease, step=self.step)
                reply = self.hub.request(ask, timeout=None, should_stop=lambda: self.stopping)
            except HubTimeout:
                reply = None
            else:
                self.lease, self.hub_version = reply["lease"], int(reply.get("version", 0))
                if reply.get("replay"):
                    print(f"learner: step {self.step}: retraining the batch the hub kept since the checkpoint",
                          flush=True)
        shared = self.backend.broadcast_object(None if reply is None else
                                               {k: v for k, v in reply.items() if k != "lease"})
        return reply if self.rank == 0 else shared

    def run(self, start_step: int = 0) -> None:
        """Train from `start_step` to num_rollout (or until stopped), then checkpoint and ack the last batch."""
        r, interval = self.cfg.rollout, self.cfg.ckpt.save_interval
        writer = MetricsWriter(self.run_dir, self.cfg) if self.rank == 0 else _NoMetrics()
        last = time.time()
        t_start = last - (elapsed_before(self.run_dir, start_step) if start_step else 0.0)  # resumed: time continues
        prev_stats = {"gen_tokens": 0, "gen_busy_s": 0.0}
        step = start_step
        try:
            while step < r.num_rollout:
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
                metrics.update(loop_metrics(step, now, t_start, now - last, now - t0, reply["stats"], prev_stats,
                                            metrics["train_tokens"]))
                writer.log(metrics)
                last, prev_stats, step = now, reply["stats"], step + 1
                if interval and step % interval == 0:
                    self.save_checkpoint(step)
            if step > start_step and not (interval and step % interval == 0):
                self.save_checkpoint(step)  # the final (or stopped) state is always resumable
            self.ack(timeout=30)  # the last batch is in the weights now: let the hub count it consumed
        finally:
            if self.tensor is not None:
                self.tensor.close()  # every version on disk before the learner exits
            writer.close()


def main(argv: list[str] | None, backend_cls, description: str, errors: tuple = (PluginError,),
         on_exit=None) -> int:
    """The learner process (shared by every backend: `backend_cls` and `errors` differ)."""
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
        learner = Learner(cfg, args.run_dir, args.hub, args.keys, backend_cls)
    except errors as exc:
        print(f"learner: {exc}", file=sys.stderr, flush=True)
        return 2
    learner.stopping = bool(stop_asked)
    try:
        learner.run(learner.resume() if args.resume else 0)
    finally:
        learner = None  # the backend's model and process groups go now, not at interpreter exit
        if on_exit is not None:
            on_exit()
    return 0
