"""What one learner step logs (one JSON line of metrics.jsonl): the RL numbers of the batch and its
updates (`rl_metrics`), and the loop's throughput and the hub's counters (`loop_metrics`).

Invariant: a value is None where it does not apply this step (no policy step yet, no TIS, rollout
logprobs used), never a made-up 0; `buffer/*` are the hub's counters as of the batch's SAMPLE, where
accepted == consumed + evicted_stale + evicted_capacity + size + in_flight.
"""
from __future__ import annotations

from learners import offpolicy
from learners.advantages import pass_at_k
from learners.batch import TrainBatch

# the hub's counters logged every step: accepted == consumed + evicted_stale + evicted_capacity + size + in_flight
BUFFER_KEYS = ("size", "in_flight", "accepted", "consumed", "evicted_stale", "evicted_capacity", "duplicates",
               "running", "dropped_filtered", "reclaimed", "malformed", "credits_available", "max_staleness", "replayed",
               "reissued", "late_duplicates", "reissue_pending")


def _mean(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if key in s]
    return sum(values) / len(values) if values else None


def rl_metrics(algo, version: int, batch: TrainBatch, kl, iw, steps: list[dict]) -> dict:
    """The batch (rewards, staleness against `version`, advantages, lengths), and the mean over its
    mini-batch `steps` of what each optimizer step returned (losses, grad norm, critic/*, plug-ins')."""
    a, mask = algo, batch.mask.bool()
    staleness = (version - batch.behavior_versions).float()
    adv = batch.advantages[mask]
    out = {
        "version": version,
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


def loop_metrics(step: int, now: float, t_start: float, wall: float, busy: float, stats: dict, prev: dict,
                 tokens: int) -> dict:
    """Step `step` took `wall` seconds, `busy` of them training; `stats` (and `prev`, the step before's) are
    the hub's counters that came with the batch."""
    gens = max(1, stats.get("num_generators", 1))
    return {
        "step": step, "time": now - t_start, "perf/unix_time": now,
        "perf/step_time_s": wall, "perf/learner_busy_frac": min(1.0, busy / max(wall, 1e-9)),
        "perf/train_tokens_per_s": tokens / max(wall, 1e-9),
        "perf/gen_tokens_per_s": (stats["gen_tokens"] - prev["gen_tokens"]) / max(wall, 1e-9),
        "perf/gen_busy_frac": min(1.0, (stats["gen_busy_s"] - prev["gen_busy_s"]) / max(wall, 1e-9) / gens),
        **{f"buffer/{k}": stats.get(k) for k in BUFFER_KEYS},
    }
