"""The embedded engine's sampling distribution, shared by the dynamic-cache path (actors/engine/model.py) and
the static arena (actors/engine/static.py).

Invariant: each token's logprob is that of the distribution it was sampled from: raw log_softmax for greedy
rows (temperature 0), else logits / temperature, then top-k, then top-p, renormalized.
"""
from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, cut_top_k: bool | None = None, cut_top_p: bool | None = None) -> torch.Tensor:
    """Log-probs of the sampling distribution per row: raw log_softmax where temperature == 0, else
    logits/temperature, then top-k (k > 0), then top-p (p < 1), renormalized. `cut_top_k`/`cut_top_p`
    say whether any row needs that cut (None: look, which costs a host sync; the static path knows)."""
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & ~greedy, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()) if cut_top_k is None else cut_top_k:
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    p = torch.where(greedy, torch.ones_like(top_p), top_p)
    if bool((p < 1).any()) if cut_top_p is None else cut_top_p:
        probs, order = scaled.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = (probs.cumsum(-1) - probs) > p[:, None]  # the top token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)
