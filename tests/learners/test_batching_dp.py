"""Micro-batches of long-tailed rows: dealt longest first, every row exactly once, far fewer padded tokens
than rows in arrival order (the megatron learner's micro-batches are cut to their longest row)."""
from __future__ import annotations

import random

from learners import batching


def padded_tokens(micros, lengths):
    return sum(len(m) * max(lengths[i] for i in m) for m in micros)


def test_rows_longest_first_cover_every_row_once_and_pad_less(monkeypatch):
    rng = random.Random(0)
    lengths = [min(1546, 10 + int(rng.expovariate(1 / 300))) for _ in range(128)]  # geometric-like tail
    rows = list(range(128))
    ordered = batching.by_length(rows, lengths)
    assert sorted(ordered) == rows and [lengths[i] for i in ordered] == sorted(lengths, reverse=True)
    for budget in (4096, 16384):
        sorted_micros = batching.micro_batches(ordered, lengths, 8, budget)
        plain_micros = batching.micro_batches(rows, lengths, 8, budget)
        assert sorted(i for m in sorted_micros for i in m) == rows
        assert all(len(m) * max(lengths[i] for i in m) <= budget or len(m) == 1 for m in sorted_micros)
        # arrival order pads most micro-batches to the tail (here 1.9-2.6x the real tokens); longest first
        # pads each to its own first row (1.1-1.4x), and needs fewer micro-batches
        real = sum(lengths)
        assert padded_tokens(sorted_micros, lengths) < 1.5 * real and padded_tokens(plain_micros, lengths) > 1.8 * real
        assert len(sorted_micros) < len(plain_micros)
    monkeypatch.setenv("ASYNC_RL_SORT_MICRO", "0")
    assert batching.by_length(rows, lengths) == rows
