"""Selectors: how a table picks the next key to sample, or (used as a remover) the next key to evict.

Invariant every selector keeps: it holds exactly the keys inserted and not yet removed, each once, and
`sample` returns one of them (it never removes it: the table decides what sampling does to an item).
`sample` on an empty selector raises `IndexError`. Inserting a key already held raises `KeyError`, so
a bookkeeping bug in the table surfaces at once instead of as a duplicated sample.

Batches: `take(rng, n)` samples without replacement (n distinct keys, removed from the selector, with the
law of n successive `sample` + `remove` calls); `remove_many(keys)` removes many at once (the staleness
sweep); `restore(key, priority)` puts back a taken key the table keeps (max_times_sampled > 1), for
fifo/lifo at the end it was taken from, so it keeps its place in line.

Costs: Fifo, Lifo, Uniform O(1); Prioritized O(log n) (sum tree; batches vectorised over numpy);
MinPriority O(log n) amortised (heap).
"""
from __future__ import annotations

import collections
import heapq
import math
from typing import Hashable, Protocol

import numpy as np

from async_rl.config import BufferConfig, field_choices
from buffer.sum_tree import SumTree

Key = Hashable


class Selector(Protocol):
    def insert(self, key: Key, priority: float) -> None: ...
    def remove(self, key: Key) -> None: ...
    def update(self, key: Key, priority: float) -> None: ...
    def restore(self, key: Key, priority: float) -> None: ...
    def sample(self, rng: np.random.Generator) -> Key: ...
    def take(self, rng: np.random.Generator, n: int) -> list: ...
    def remove_many(self, keys) -> None: ...
    def __len__(self) -> int: ...


class _Defaults:
    """Batch operations as loops of single ones: exact for any selector; Prioritized vectorises them."""

    def remove_many(self, keys) -> None:
        for key in keys:
            self.remove(key)

    def take(self, rng: np.random.Generator, n: int) -> list:
        if n > len(self):
            raise IndexError(f"take {n} from a selector holding {len(self)}")
        keys = []
        for _ in range(n):
            keys.append(self.sample(rng))
            self.remove(keys[-1])
        return keys


def _check_priority(priority: float) -> float:
    priority = float(priority)
    if not (priority >= 0 and math.isfinite(priority)):
        raise ValueError(f"priority={priority!r}: must be finite and >= 0")
    return priority


class _Ordered(_Defaults):
    """Insertion order in an OrderedDict: O(1) at both ends (a plain dict degrades when popped from the
    front, because deleted slots at its head are skipped one by one on every `next(iter(d))`)."""

    def __init__(self):
        self._keys: collections.OrderedDict = collections.OrderedDict()

    def insert(self, key: Key, priority: float) -> None:
        if key in self._keys:
            raise KeyError(f"key {key!r} already in selector")
        self._keys[key] = None

    def remove(self, key: Key) -> None:
        del self._keys[key]

    def update(self, key: Key, priority: float) -> None:
        if key not in self._keys:
            raise KeyError(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._keys


class Fifo(_Ordered):
    """Oldest inserted first."""

    def sample(self, rng: np.random.Generator | None = None) -> Key:
        if not self._keys:
            raise IndexError("sample from an empty selector")
        return next(iter(self._keys))

    def restore(self, key: Key, priority: float) -> None:
        self.insert(key, priority)
        self._keys.move_to_end(key, last=False)


class Lifo(_Ordered):
    """Newest inserted first."""

    def sample(self, rng: np.random.Generator | None = None) -> Key:
        if not self._keys:
            raise IndexError("sample from an empty selector")
        return next(reversed(self._keys))

    def restore(self, key: Key, priority: float) -> None:
        self.insert(key, priority)


class Uniform(_Defaults):
    """Every held key equally likely: a dense list plus key -> position, removal by swap with the last."""

    def __init__(self):
        self._keys: list = []
        self._pos: dict = {}

    def insert(self, key: Key, priority: float = 0.0) -> None:
        if key in self._pos:
            raise KeyError(f"key {key!r} already in selector")
        self._pos[key] = len(self._keys)
        self._keys.append(key)

    def remove(self, key: Key) -> None:
        i = self._pos.pop(key)
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i

    def update(self, key: Key, priority: float) -> None:
        if key not in self._pos:
            raise KeyError(key)

    restore = insert

    def sample(self, rng: np.random.Generator) -> Key:
        if not self._keys:
            raise IndexError("sample from an empty selector")
        return self._keys[int(rng.integers(len(self._keys)))]

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._pos


class Prioritized(_Defaults):
    """P(key) = priority ** alpha / sum(priority ** alpha); uniform over held keys when that sum is 0.

    Raw priorities are kept so `alpha` can change at run time (one vectorised pass). Each key owns a slot
    (a leaf of the sum tree); freed slots are reused from a free list so the tree stays as small as the
    peak number of held keys. A `Uniform` alongside serves the all-zero case in O(1)."""

    # below this batch size n scalar walks (~10 us each) beat one vectorised walk (~150 us fixed cost)
    vectorize_from = 16

    def __init__(self, alpha: float = 1.0, initial_capacity: int = 1024):
        self.alpha = self._check_alpha(alpha)
        self._tree = SumTree(initial_capacity)
        self._slot: dict = {}
        self._key_at: list = []            # slot -> key (None when free)
        self._raw = np.zeros(self._tree.capacity)  # slot -> raw priority
        self._free: list[int] = []
        self._all = Uniform()

    @staticmethod
    def _check_alpha(alpha: float) -> float:
        alpha = float(alpha)
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha={alpha!r}: must be finite and >= 0 (0 = uniform, 1 = proportional)")
        return alpha

    def _leaf(self, priority: float) -> float:
        try:
            leaf = priority ** self.alpha
        except OverflowError:  # Python floats raise where numpy would return inf
            leaf = math.inf
        if not math.isfinite(leaf):
            raise ValueError(f"priority={priority!r} ** alpha={self.alpha} overflows float64; "
                             f"scale the priority function down or lower alpha")
        return leaf

    def insert(self, key: Key, priority: float) -> None:
        if key in self._slot:
            raise KeyError(f"key {key!r} already in selector")
        priority = _check_priority(priority)
        leaf = self._leaf(priority)
        if self._free:
            slot = self._free.pop()
            self._key_at[slot] = key
        else:
            slot = len(self._key_at)
            self._key_at.append(key)
        self._tree.update(slot, leaf)  # may double the tree
        if slot >= len(self._raw):
            self._raw = np.concatenate([self._raw, np.zeros(self._tree.capacity - len(self._raw))])
        self._raw[slot] = priority
        self._slot[key] = slot
        self._all.insert(key)

    def remove(self, key: Key) -> None:
        slot = self._slot.pop(key)
        self._tree.update(slot, 0.0)
        self._raw[slot] = 0.0
        self._key_at[slot] = None
        self._free.append(slot)
        self._all.remove(key)

    def update(self, key: Key, priority: float) -> None:
        slot = self._slot[key]
        priority = _check_priority(priority)
        self._tree.update(slot, self._leaf(priority))
        self._raw[slot] = priority

    restore = insert

    def priority(self, key: Key) -> float:
        return float(self._raw[self._slot[key]])

    def probability(self, key: Key) -> float:
        """P(sample() == key) right now; for tests and diagnostics."""
        total = self._tree.total()
        if total > 0:
            return self._tree.get(self._slot[key]) / total
        return 1.0 / len(self._slot)

    def set_alpha(self, alpha: float) -> None:
        """Change the exponent for every held key; all-or-nothing if some priority ** alpha overflows."""
        alpha = self._check_alpha(alpha)
        n = len(self._key_at)
        live = np.array([k is not None for k in self._key_at], dtype=bool)
        with np.errstate(over="ignore"):
            leaves = np.where(live, self._raw[:n] ** alpha, 0.0)
        if not np.all(np.isfinite(leaves)):
            raise ValueError(f"alpha={alpha}: some priority ** alpha overflows float64; keep alpha lower")
        self.alpha = alpha
        self._tree.update_many(np.arange(n), leaves)

    def sample(self, rng: np.random.Generator) -> Key:
        if not self._slot:
            raise IndexError("sample from an empty selector")
        if not self._tree.total() > 0:
            return self._all.sample(rng)
        return self._key_at[self._tree.sample(rng)]

    def take(self, rng: np.random.Generator, n: int) -> list:
        """n distinct keys by successive sampling, vectorised: the first n distinct keys of an i.i.d.
        stream of draws have exactly the law of drawing one, removing it, drawing the next. A few
        vectorised rounds get nearly all of them; whatever rejection cannot get cheaply (a handful of
        keys holding most of the mass, or fewer positive keys than n) is finished one by one."""
        if n > len(self._slot):
            raise IndexError(f"take {n} from a selector holding {len(self._slot)}")
        if n < self.vectorize_from:
            return super().take(rng, n)
        keys, seen = [], set()
        for _ in range(3):
            total = self._tree.total()
            if len(keys) == n or not total > 0:
                break
            need = n - len(keys)
            for slot in self._tree.find_many(rng.random(need + need // 4 + 4) * total).tolist():
                key = self._key_at[slot]
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    if len(keys) == n:
                        break
        self.remove_many(keys)
        return keys + super().take(rng, n - len(keys))

    def remove_many(self, keys) -> None:
        """`remove` for many keys with one vectorised tree update (the staleness sweep's path)."""
        slots = [self._slot.pop(k) for k in keys]
        self._tree.update_many(slots, np.zeros(len(slots)))
        self._raw[slots] = 0.0
        for key, slot in zip(keys, slots):
            self._key_at[slot] = None
            self._all.remove(key)
        self._free.extend(slots)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot


class MinPriority(_Defaults):
    """Lowest priority first; ties go to the least recently inserted or updated (a remover: "evict the
    least useful item").

    A heap with lazy deletion: removal and update only drop the key's entry id from `_live`; dead heap
    entries are skipped when they surface and the heap is rebuilt once it is mostly dead."""

    def __init__(self):
        self._heap: list = []
        self._live: dict = {}       # key -> id of its current heap entry
        self._next_id = 0           # a plain int, not itertools.count: selectors must pickle (snapshots)

    def insert(self, key: Key, priority: float) -> None:
        if key in self._live:
            raise KeyError(f"key {key!r} already in selector")
        self._push(key, _check_priority(priority))

    def _push(self, key: Key, priority: float) -> None:
        entry_id = self._next_id
        self._next_id += 1
        self._live[key] = entry_id
        heapq.heappush(self._heap, (priority, entry_id, key))

    def remove(self, key: Key) -> None:
        del self._live[key]
        self._maybe_compact()

    def update(self, key: Key, priority: float) -> None:
        if key not in self._live:
            raise KeyError(key)
        self._push(key, _check_priority(priority))
        self._maybe_compact()

    restore = insert

    def _maybe_compact(self) -> None:
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._live):
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def sample(self, rng: np.random.Generator | None = None) -> Key:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        if not heap:
            raise IndexError("sample from an empty selector")
        return heap[0][2]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Key) -> bool:
        return key in self._live


SELECTORS = {"fifo": Fifo, "lifo": Lifo, "uniform": Uniform, "prioritized": Prioritized}
REMOVERS = {"fifo": Fifo, "lifo": Lifo, "min_priority": MinPriority}
for _name, _impl in (("selector", SELECTORS), ("remover", REMOVERS)):  # the names are declared on the fields
    if set(field_choices(BufferConfig, _name)) != set(_impl):
        raise ImportError(f"buffer.{_name} choices {field_choices(BufferConfig, _name)} and {sorted(_impl)} disagree")


def make_selector(name: str, alpha: float = 1.0, field: str = "buffer.selector") -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"{field}={name!r}: unknown selector; choose one of {sorted(SELECTORS)}")
    return Prioritized(alpha) if name == "prioritized" else SELECTORS[name]()


def make_remover(name: str, field: str = "buffer.remover") -> Selector:
    if name not in REMOVERS:
        raise ValueError(f"{field}={name!r}: unknown remover; choose one of {sorted(REMOVERS)}")
    return REMOVERS[name]()
