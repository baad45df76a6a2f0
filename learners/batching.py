"""Which rows of a TrainBatch each data-parallel rank trains on, in which micro-batches, cut to what length
(both multi-rank backends: learners.megatron.backend and learners.fsdp_backend).

Invariants: every row of a mini-batch goes to exactly one DP rank, and every DP rank gets the same number
of rows (so averaging per-sample losses over ranks is the global mean); within a rank every row is in
exactly one micro-batch; a micro-batch is cut to its longest row, which drops only padding
columns (mask 0 there), so losses and logprobs are those of the uncut rows. Rows are dealt into
micro-batches longest first (`by_length`), so rows of similar length share a micro-batch and little
padding is computed: with long-tailed response lengths, rows in arrival order pad most micro-batches to
the longest response of the batch. Losses are sums over micro-batches, so the order changes no result
beyond float rounding.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from learners.batch import TrainBatch

_PER_SAMPLE = ("input_ids", "attention_mask")  # [B, T]; every other field is [B, T-1]


def row_lengths(batch: TrainBatch) -> list[int]:
    return batch.attention_mask.sum(-1).tolist()


def dp_rows(start: int, size: int, dp: int, dp_rank: int, lengths: list[int], balance: bool) -> list[int]:
    """This DP rank's rows of the mini-batch [start, start + size): a contiguous share, or (balance) a
    snake deal of the rows sorted by length, which evens out token counts and keeps row counts equal."""
    rows = list(range(start, start + size))
    per = size // dp
    if not balance or dp == 1:
        return rows[dp_rank * per:(dp_rank + 1) * per]
    order = sorted(rows, key=lambda i: -lengths[i])
    return sorted(i for k, i in enumerate(order) if _snake(k, dp) == dp_rank)


def _snake(k: int, dp: int) -> int:
    """Rank of the k-th longest row: 0, 1, .., dp-1, dp-1, .., 0, 0, 1, .."""
    r = k % (2 * dp)
    return r if r < dp else 2 * dp - 1 - r


def by_length(rows: list[int], lengths: list[int]) -> list[int]:
    """`rows` longest first (ties in row order); ASYNC_RL_SORT_MICRO=0 keeps them in order (for A/B runs)."""
    if os.environ.get("ASYNC_RL_SORT_MICRO", "1") == "0":
        return list(rows)
    return sorted(rows, key=lambda i: -lengths[i])


def micro_batches(rows: list[int], lengths: list[int], micro_size: int, max_tokens: int = 0) -> list[list[int]]:
    """`rows` in order, `micro_size` at a time; or (max_tokens > 0) as many as fit rows x longest <= max_tokens
    (at least one row each)."""
    if max_tokens <= 0:
        return [rows[i:i + micro_size] for i in range(0, len(rows), micro_size)]
    out, cur, longest = [], [], 0
    for i in rows:
        grown = max(longest, lengths[i])
        if cur and grown * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, grown = [], lengths[i]
        cur.append(i)
        longest = grown
    return out + ([cur] if cur else [])


def to_device(batch: TrainBatch, device) -> TrainBatch:
    """The batch's tensors on `device`, copied without waiting for the device's queued work (a blocking
    copy would idle the device while the host then issues the next forward pass)."""
    if torch.device(device).type == "cpu":
        return batch
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def take(batch: TrainBatch, rows: list[int], device, lengths: list[int] | None = None) -> dict:
    """`batch.select` of `rows`, cut to the longest of them and moved to `device`. With `lengths`
    (`row_lengths` of the batch) and a batch already on `device` (`to_device`), nothing waits for the device."""
    idx = torch.tensor(rows, dtype=torch.long).to(batch.input_ids.device, non_blocking=True)
    picked = batch.select(idx)
    length = max(lengths[i] for i in rows) if lengths is not None else int(picked["attention_mask"].sum(-1).max())
    return {k: (v[:, :length] if k in _PER_SAMPLE else v[:, :length - 1]).to(device, non_blocking=True)
            for k, v in picked.items()}
