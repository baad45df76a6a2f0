"""Prompt dispenser: the hub hands out prompts so that generators (including ones that join later) never
duplicate or skip a prompt. Order is a per-epoch permutation seeded by `rollout_seed`; the cursor is
(epoch, position) and fully determines what comes next.
"""
from __future__ import annotations

import random


class PromptDispenser:
    def __init__(self, prompts: list[dict], shuffle: bool, seed: int):
        self.prompts = prompts
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def sync_order(self) -> None:
        """Recompute the permutation after the cursor was restored (from a snapshot or log record)."""
        self._order = self._order_for(self.epoch)

    def next(self) -> tuple[int, dict]:
        """(prompt index, prompt) and advance the cursor, wrapping into the next epoch."""
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._order_for(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index, self.prompts[index]
