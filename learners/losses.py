"""Losses shared by every learner, as pure functions over padded [batch, tokens] tensors with a loss mask.

Conventions: `mask` is 1.0 on response tokens that carry loss, 0.0 elsewhere (prompt, padding). A sample
whose mask is all zero contributes nothing (its denominator is clamped to 1, never divided by zero).
Reduction (`masked_mean`): per sample then over samples (slime's default), or per token over the whole
global batch (`calculate_per_token_loss`). PPO log ratios are clamped to [-20, 20] before exp (as verl
does), so extreme values give large but finite losses, never inf or nan.
Advantage estimators live in `learners.advantages`, KL estimators in `learners.kl`, importance weights
in `learners.offpolicy`; `grpo_advantages` is re-exported here for existing callers.
"""
from __future__ import annotations

import torch

from learners.advantages import grpo_advantages  # noqa: F401  (re-export)
from learners.kl import LOG_RATIO_BOUND as _LOG_RATIO_BOUND


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per position under softmax(logits / temperature); logits [B, T, V], targets [B, T]."""
    return logprobs_and_entropy(logits, targets, temperature, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(target), entropy of pi) per position, pi = softmax(logits / temperature).

    Computed in blocks of positions (`_VocabLogprobs`): no [B, T, V] float32 copy of the logits is ever
    made, in the forward or the backward; a block's float32 work is ~`_CHUNK_ELEMENTS` elements (on a GPU
    one fused kernel per block). Results are float32 (float64 for float64 logits), as a float32
    log_softmax over the whole vocabulary would give.
    """
    inv_temp = 1.0 / temperature if temperature > 0 and temperature != 1.0 else 1.0
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, entropy = _VocabLogprobs.apply(logits, targets, inv_temp)
        return logp, entropy if with_entropy else None
    logp, _, entropy = _blockwise_forward(logits, targets, inv_temp, with_entropy)
    return logp, entropy


# One block of positions: ~2**27 elements (eager: 512 MiB per float32 temporary; 880 positions at V=152k).
_CHUNK_ELEMENTS = 1 << 27
_COMPILE_ENV = "ASYNC_RL_COMPILE_LOGPROBS"  # "0": eager blocks on the GPU too (debugging, A/B timing)
_compiled: dict = {}


def _block_forward(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
    """z [n, V] -> (logp [n], log-normaliser [n], entropy [n] or None), all in float32 or wider."""
    x = z.to(torch.promote_types(z.dtype, torch.float32)) * inv_temp
    m = x.amax(dim=-1, keepdim=True)
    xs = x - m
    lse = torch.logsumexp(xs, dim=-1)
    logp = xs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:  # H = -sum p log p = lse - sum p * xs, with p = exp(xs - lse)
        entropy = lse - (torch.exp(xs - lse.unsqueeze(-1)) * xs).sum(dim=-1)
    return logp, lse + m.squeeze(-1), entropy


def _block_backward(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                    g_logp: torch.Tensor, g_entropy: torch.Tensor, inv_temp: float, with_logp: bool,
                    with_entropy: bool) -> torch.Tensor:
    """Gradient w.r.t. z [n, V] (in z's dtype): d logp_t / dx_j = [j = t] - p_j, dH / dx_j = -p_j (log p_j + H)."""
    x = z.to(lse.dtype) * inv_temp
    log_p = x - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    grad = torch.zeros_like(x)
    if with_logp:
        hit = torch.arange(z.shape[-1], device=z.device).unsqueeze(0) == targets.unsqueeze(-1)
        grad = g_logp.unsqueeze(-1) * (hit.to(x.dtype) - p)
    if with_entropy:
        grad = grad - g_entropy.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))
    return (grad * inv_temp).to(z.dtype)


def _compile_on(device: torch.device) -> bool:
    import os

    return device.type == "cuda" and os.environ.get(_COMPILE_ENV, "1") != "0"


def _kernel(name: str, fn, device: torch.device):
    """`fn` compiled by torch.compile (one fused kernel per block) on CUDA; `fn` itself elsewhere or if that
    fails (the failure is printed once).

    One graph per kernel for every block shape (two: blocks at storage offset 0, and the rest), compiled in
    the first step: a block is handed over as a tensor of its own (`detach`, no `_base`), so the compiled
    code guards on the block's [n, V] alone, not on the [B, T, V] logits it was cut from (whose 1-row
    micro-batches and new lengths would each compile a graph); sizes that happen to be equal are not
    assumed equal (no duck shapes); blocks of one position run eager (no 0/1 specialisation). Without
    this the 16 x 8 loop recompiled ~10 times in its timed steps and dynamo's recompile limit (8 per
    function) sent later shapes to its eager fallback.
    """
    if not _compile_on(device) or _compiled.get("failed"):
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    compiled = _compiled[name]

    def run(*args):
        if _compiled.get("failed") or args[0].shape[0] < 2:
            return fn(*args)
        try:
            from torch.fx.experimental import _config as fx_config

            with fx_config.patch(use_duck_shape=False):
                return compiled(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        except Exception as exc:  # noqa: BLE001 (no compiler or Triton there: eager blocks are still right)
            _compiled["failed"] = True
            print(f"learners.losses: torch.compile of the logprob kernels failed ({type(exc).__name__}: "
                  f"{str(exc)[:200]}); using eager blocks (set {_COMPILE_ENV}=0 to skip compiling)", flush=True)
            return fn(*args)
    return run


def _as_3d(t: torch.Tensor, lead: int) -> torch.Tensor:
    """A tensor with `lead` position dims as [B, T, ...]: itself (no copy, views too) when lead == 2."""
    return t if lead == 2 else t.reshape((1, -1) + t.shape[lead:])


def _blocks(shape3: torch.Size):
    """(b, positions) index pairs over [B, T, V], ~_CHUNK_ELEMENTS elements each, every position once."""
    b, t, v = shape3
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for i in range(b):
        for start in range(0, t, rows):
            yield i, slice(start, min(t, start + rows))


def _blockwise_forward(logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
    lead = logits.dim() - 1
    x3, t3 = _as_3d(logits, lead), _as_3d(targets, lead)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.empty(x3.shape[:-1], dtype=dtype, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    fwd = _kernel("fwd_h" if with_entropy else "fwd", _block_forward, logits.device)
    for i, pos in _blocks(x3.shape):
        lp, norm, ent = fwd(x3[i, pos], t3[i, pos], inv_temp, with_entropy)
        logp[i, pos], lse[i, pos] = lp, norm
        if with_entropy:
            entropy[i, pos] = ent
    shape = logits.shape[:-1]
    return logp.reshape(shape), lse.reshape(shape), entropy.reshape(shape) if with_entropy else None


class _VocabLogprobs(torch.autograd.Function):
    """(logp, entropy) of softmax(logits * inv_temp), blockwise; saves the logits (their own dtype) and two
    floats per position, and rebuilds each block's softmax in the backward."""

    @staticmethod
    def forward(ctx, logits, targets, inv_temp):
        logp, lse, entropy = _blockwise_forward(logits, targets, inv_temp, True)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None
        lead = logits.dim() - 1
        x3, t3 = _as_3d(logits, lead), _as_3d(targets, lead)
        lse3, ent3 = _as_3d(lse, lead), _as_3d(entropy, lead)
        zeros = torch.zeros_like(lse3)
        g_lp3 = _as_3d(g_logp, lead) if g_logp is not None else zeros
        g_ent3 = _as_3d(g_entropy, lead) if g_entropy is not None else zeros
        grad = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device)
        bwd = _kernel(f"bwd{int(g_logp is not None)}{int(g_entropy is not None)}", _block_backward, logits.device)
        for i, pos in _blocks(x3.shape):
            grad[i, pos] = bwd(x3[i, pos], t3[i, pos], lse3[i, pos], ent3[i, pos], g_lp3[i, pos], g_ent3[i, pos],
                               ctx.inv_temp, g_logp is not None, g_entropy is not None)
        return grad.reshape(logits.shape), None, None


def tis_weights(logp_old: torch.Tensor, logp_behavior: torch.Tensor, clip: float, clip_low: float) -> torch.Tensor:
    """Truncated importance sampling per token: clamp(exp(logp_old - logp_behavior), clip_low, clip).

    The token/truncate case of `learners.offpolicy.importance_weights`, which also has sequence levels,
    mask mode (MIS/IcePop) and metrics.
    """
    log_ratio = (logp_old - logp_behavior).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(log_ratio), min=clip_low, max=clip)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, per_token: bool,
                token_denominator: float | None = None) -> torch.Tensor:
    """Per-sample mean over masked tokens, then mean over samples; or (per_token) sum / token count.

    `token_denominator` lets gradient accumulation divide by the whole global batch's token count.
    """
    if per_token:
        denom = token_denominator if token_denominator is not None else mask.sum().clamp(min=1.0)
        return (values * mask).sum() / denom
    per_sample = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_sample.mean()


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_clip: float, eps_clip_high: float = 0.0, weights: torch.Tensor | None = None,
                per_token: bool = False, token_denominator: float | None = None, *, eps_clip_c: float = 0.0,
                ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, each token's term multiplied by its importance weight (if given).

    ratio_level `token`: ratio = pi / pi_old per token (PPO); `sequence`: ratio = exp(mean over the
    sample's masked tokens of log pi - log pi_old), shared by its tokens (GSPO). Clip to
    [1 - eps_clip, 1 + eps_clip_high (or eps_clip)]; with dual clip (eps_clip_c > 1), a negative-advantage
    token's term is also capped at -eps_clip_c * A (slime / Ye et al. 2020).
    Returns the loss and detached metrics: pg_clipfrac (tokens where the clipped term was chosen) and
    ppo_kl (mean -log ratio over masked tokens).
    """
    high = eps_clip_high if eps_clip_high > 0 else eps_clip
    log_ratio = logp - logp_old
    if ratio_level == "sequence":
        seq = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + high)
    per_tok = torch.maximum(unclipped, clipped)
    if eps_clip_c > 0:
        per_tok = torch.where(advantages < 0, torch.minimum(per_tok, -eps_clip_c * advantages), per_tok)
    if weights is not None:
        per_tok = per_tok * weights
    loss = masked_mean(per_tok, mask, per_token, token_denominator)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"pg_clipfrac": float(((clipped > unclipped).float() * mask).sum() / n),
                   "ppo_kl": float((-log_ratio * mask).sum() / n)}
    return loss, metrics


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float, per_token: bool = False,
               token_denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss max((V - R)^2, (V_old + clamp(V - V_old, -c, c) - R)^2), as slime's (no 0.5 factor,
    so a critic_lr tuned for slime means the same here)."""
    clipped_values = values_old + (values - values_old).clamp(-value_clip, value_clip)
    unclipped = (values - returns).square()
    clipped = (clipped_values - returns).square()
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, per_token, token_denominator)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        metrics = {"critic/value_clipfrac": float(((clipped > unclipped).float() * mask).sum() / n)}
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, per_token: bool = False,
             token_denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the response tokens."""
    return masked_mean(-logp, mask, per_token, token_denominator)
