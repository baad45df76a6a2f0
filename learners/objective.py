"""The actor's training objective on one micro-batch, shared by every learner backend.

    loss = pg_loss(policy_loss | custom_loss | sft_loss)
           - entropy_coef * entropy           (policy_loss only)
           + kl_loss_coef * KL(pi || pi_ref)  (policy_loss with use_kl_loss)

Every term is reduced the same way (`losses.masked_mean`: per sample, or per token over the global
batch with `calculate_per_token_loss`), so the learner can scale and accumulate micro-batches without
knowing which terms are on. A custom loss plug-in receives everything the built-in one does and owns
its whole loss (no entropy or KL term is added to it).

A token rejected by the importance weights (`tis_mode: mask`, MIS/IcePop, or a custom_tis_function_path
weight of exactly 0) is dropped from the numerators of the pg, entropy and KL-loss terms alike, as in
slime; the denominators stay the loss mask's token counts, so the loss scale does not depend on how many
tokens were rejected.
"""
from __future__ import annotations

import torch

from learners import losses
from learners.kl import approx_kl

# Expected by algo.custom_loss_function_path: fn(logp, batch, algo) -> (loss, metrics).
CUSTOM_LOSS_PARAMS = 3


def actor_loss(logits: torch.Tensor, rows: dict, algo, temperature: float,
               token_denominator: float | None = None, custom_loss=None) -> tuple[torch.Tensor, dict]:
    """Loss and float metrics of one micro-batch; `rows` is `TrainBatch.select(...)` of it.

    logits [B, T, V] of the positions that predict targets; `token_denominator` is the global batch's
    masked-token count (used only with calculate_per_token_loss).
    """
    a, mask = algo, rows["mask"]
    per_token = a.calculate_per_token_loss
    denom = token_denominator if per_token else None
    logp, entropy = losses.logprobs_and_entropy(logits, rows["targets"], temperature)
    if not (a.loss_type == "policy_loss" and a.entropy_coef != 0):
        entropy = entropy.detach()  # a metric only: no gradient through it
    n_tok = mask.sum().clamp(min=1.0)
    metrics = {"entropy": float((entropy.detach() * mask).sum() / n_tok)}
    if a.loss_type == "sft_loss":
        return losses.sft_loss(logp, mask, per_token, denom), metrics
    if a.loss_type == "custom_loss":
        return _custom(custom_loss, logp, logits, rows, a, denom, metrics)
    level = "sequence" if a.advantage_estimator == "gspo" else "token"
    pg, pg_metrics = losses.policy_loss(logp, rows["logp_old"], rows["advantages"], mask, a.eps_clip,
                                        a.eps_clip_high, rows.get("tis_weights"), per_token, denom,
                                        eps_clip_c=a.eps_clip_c, ratio_level=level)
    metrics.update(pg_metrics, **{"loss/pg": pg.item()})
    loss = pg
    kept = _kept(rows, a)
    if a.entropy_coef != 0:
        loss = loss - a.entropy_coef * losses.masked_mean(entropy * kept, mask, per_token, denom)
    if a.use_kl_loss:
        kl = approx_kl(logp, rows["ref_logp"], a.kl_loss_type) * kept
        kl_loss = losses.masked_mean(kl, mask, per_token, denom)
        loss = loss + a.kl_loss_coef * kl_loss
        metrics["loss/kl"] = kl_loss.item()
    return loss, metrics


def _kept(rows: dict, algo) -> torch.Tensor | float:
    """1 where a token counts in the entropy and KL numerators, 0 where the importance weights rejected it."""
    weights = rows.get("tis_weights")
    rejects = algo.use_tis and (algo.tis_mode == "mask" or bool(algo.custom_tis_function_path))
    if weights is None or not rejects:
        return 1.0
    return (weights != 0).to(rows["mask"].dtype)


def _custom(fn, logp, logits, rows, algo, denom, metrics) -> tuple[torch.Tensor, dict]:
    if fn is None:
        raise ValueError("algo.loss_type='custom_loss' but no custom_loss_function_path plug-in was loaded")
    loss, extra = fn(logp, {**rows, "logits": logits, "token_denominator": denom}, algo)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"algo.custom_loss_function_path={algo.custom_loss_function_path!r}: must return "
                         f"(scalar loss tensor, dict of metrics); got loss {type(loss).__name__}")
    metrics.update({k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                    for k, v in dict(extra or {}).items()})
    metrics.setdefault("loss/pg", loss.item())
    return loss, metrics
