"""A sum tree over non-negative float64 priorities: O(log n) update and prefix-sum search.

Invariant: every internal node equals `fl(left child + right child)` of its two children, so the tree is a
deterministic function of its leaves and `total()` is the (pairwise) sum of the leaves.

Why no drift by construction: an update writes the leaf and then *recomputes* each ancestor from its two
children instead of adding a delta to it. Delta propagation (the textbook form) accumulates one rounding
error per update in every ancestor: after millions of updates the root drifts from the leaves' sum, and a
subtree whose leaves are all zero can hold a tiny positive residue, so a search can land on a zero-priority
leaf. Recomputing costs one extra read per level and makes both impossible.

The drift check is kept as a cheap safety net (amortised O(1) per update): every `check_every` updates the
root is compared with `leaves.sum()` and the internal sums are rebuilt if they differ by more than `rtol`
relative. With the recompute rule this never fires unless memory is corrupted; `rebuilds` counts it.

Layout: a 1-based implicit binary tree in one array of `2 * capacity`; node 1 is the root, leaves live at
`[capacity, 2 * capacity)`. Capacity is a power of two and doubles on demand.
"""
from __future__ import annotations

import math

import numpy as np


class SumTree:
    def __init__(self, capacity: int = 16, check_every: int = 1 << 16, rtol: float = 1e-9):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        if check_every < 1:
            raise ValueError(f"check_every={check_every}: must be >= 1")
        if not rtol > 0:
            raise ValueError(f"rtol={rtol}: must be > 0")
        self._cap = 1 << (capacity - 1).bit_length()
        self._tree = np.zeros(2 * self._cap, dtype=np.float64)
        self.check_every = check_every
        self.rtol = rtol
        self.updates = 0      # scalar or batch leaf writes since construction
        self.checks = 0       # drift checks run
        self.rebuilds = 0     # rebuilds forced by a failed drift check
        self._since_check = 0

    @property
    def capacity(self) -> int:
        return self._cap

    def total(self) -> float:
        return float(self._tree[1])

    def get(self, index: int) -> float:
        return float(self._tree[self._cap + index]) if 0 <= index < self._cap else 0.0

    def leaves(self) -> np.ndarray:
        """A read-only view of the leaf priorities (length `capacity`)."""
        view = self._tree[self._cap:]
        view.flags.writeable = False
        return view

    # ---- writes ----------------------------------------------------------------------------------
    def update(self, index: int, value: float) -> None:
        """Set leaf `index` to `value` (finite, >= 0), growing the tree if `index` is past capacity."""
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"priority={value!r}: must be finite and >= 0")
        if index < 0:
            raise IndexError(f"index={index}: must be >= 0")
        if index >= self._cap:
            self._grow(index + 1)
        t = self._tree
        i = index + self._cap
        t[i] = value
        while i > 1:
            i >>= 1
            t[i] = t[2 * i] + t[2 * i + 1]
        self._count_updates(1)

    def update_many(self, indices, values) -> None:
        """Vectorised `update`: for a repeated index the last value wins, as if applied in order."""
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if indices.shape != values.shape or indices.ndim != 1:
            raise ValueError(f"indices {indices.shape} and values {values.shape} must be equal 1-d shapes")
        if len(indices) == 0:
            return
        if not (np.all(values >= 0) and np.all(np.isfinite(values))):
            raise ValueError("priorities must be finite and >= 0")
        if indices.min() < 0:
            raise IndexError(f"index={int(indices.min())}: must be >= 0")
        if indices.max() >= self._cap:
            self._grow(int(indices.max()) + 1)
        # keep the last write of each index (np.unique on the reversed array returns first occurrences)
        rev_unique, rev_pos = np.unique(indices[::-1], return_index=True)
        nodes = rev_unique + self._cap
        self._tree[nodes] = values[::-1][rev_pos]
        t = self._tree
        while nodes[0] > 1:  # all nodes share a depth, so they reach the root together
            # repeated parents are harmless here: each copy writes the same recomputed sum
            nodes >>= 1
            t[nodes] = t[2 * nodes] + t[2 * nodes + 1]
        self._count_updates(len(indices))

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves, bottom up (same pairing as `update`)."""
        t, n = self._tree, self._cap
        while n > 1:
            h = n // 2
            t[h:n] = t[n:2 * n:2] + t[n + 1:2 * n:2]
            n = h

    def check_drift(self) -> bool:
        """Rebuild if the root disagrees with the leaves' sum by more than `rtol`; True if it rebuilt."""
        self.checks += 1
        self._since_check = 0
        exact = float(self._tree[self._cap:].sum())
        if abs(self.total() - exact) <= self.rtol * max(exact, 1e-300) and (exact > 0) == (self.total() > 0):
            return False
        self.rebuild()
        self.rebuilds += 1
        return True

    def _count_updates(self, n: int) -> None:
        self.updates += n
        self._since_check += n
        if self._since_check >= self.check_every:
            self.check_drift()

    def _grow(self, needed: int) -> None:
        cap = self._cap
        while cap < needed:
            cap *= 2
        tree = np.zeros(2 * cap, dtype=np.float64)
        tree[cap:cap + self._cap] = self._tree[self._cap:]
        self._tree, self._cap = tree, cap
        self.rebuild()

    # ---- search ----------------------------------------------------------------------------------
    def find(self, u: float) -> int:
        """The leaf where the prefix sum crosses `u` (0 <= u < total); only ever a positive leaf.

        Rounding can leave `u` a hair above a right subtree's sum; the walk then still never enters a
        zero-sum subtree, which (all leaves >= 0) holds no positive leaf."""
        t, cap = self._tree, self._cap
        if not t[1] > 0:
            raise ValueError("find on a sum tree whose total is 0")
        i = 1
        while i < cap:
            left = t[2 * i]
            if left > 0 and (u < left or not t[2 * i + 1] > 0):
                i = 2 * i
            else:
                u -= left
                i = 2 * i + 1
        return i - cap

    def find_many(self, us: np.ndarray) -> np.ndarray:
        """Vectorised `find`: the same walk, one level at a time for all of `us` at once."""
        t, cap = self._tree, self._cap
        if not t[1] > 0:
            raise ValueError("find on a sum tree whose total is 0")
        u = np.array(us, dtype=np.float64)
        i = np.ones(len(u), dtype=np.int64)
        while len(i) and i[0] < cap:  # every walk is at the same depth
            left = 2 * i
            lsum = t[left]
            go_right = ~(lsum > 0) | ((u >= lsum) & (t[left + 1] > 0))  # negation of find's rule
            u -= lsum * go_right
            i = left + go_right
        return i - cap

    def sample(self, rng: np.random.Generator) -> int:
        """A leaf drawn with probability leaf / total."""
        return self.find(rng.random() * self.total())
