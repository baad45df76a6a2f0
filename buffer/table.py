"""The item table: a selector (what to sample) + a remover (what to evict when full) + the staleness gate
(`buffer/staleness.py`: the bound and its limit), over items (groups) held by key.

Invariants, after every public call:
- Staleness: every held item has `behavior_version >= version - max_staleness`, so `sample` never returns
  an item whose staleness (`version - behavior_version`) exceeds `max_staleness`. Items that would are
  evicted and counted in `evicted_stale`. `version` only grows (the max of every version passed in).
- Accounting: `accepted == consumed + evicted_stale + evicted_capacity + size`, where
  - `accepted`: distinct keys ever inserted (a resent key is counted in `duplicates` instead);
  - `consumed`: items retired because they were sampled `max_times_sampled` times (with the default 1,
    consumed == sampled; an item sampled fewer times and then evicted counts as evicted, not consumed);
  - `sampled`: (key, group) pairs returned by `sample`, counting every time an item is returned.
- Idempotence: inserting a key already held replaces its group and priority; inserting a key that was
  held before and is gone (consumed or evicted) does nothing. Either way it counts as a duplicate, and
  no key is ever stored, sampled or retired twice because of a resend.
- A batch never holds the same key twice (sampling is without replacement within one call).
- Sampling waits only for `n` fresh items: there is no sample-side rate limiter. Inserts are paced by
  admission credits (buffer/staleness.py) and reuse by `max_times_sampled`; slime and AReaL expose no
  samples-per-insert knob either (each group is trained once), so Reverb's limiters were removed.

Cost: the staleness sweep is O(items evicted + distinct versions passed), never a scan of the table:
items are indexed by behavior_version (version -> set of keys, plus a min-heap of those versions).
"""
from __future__ import annotations

import heapq
import io
import math
import pickle
from typing import Hashable, Iterator

import numpy as np

from buffer.selectors import Selector, make_remover, make_selector
from buffer.staleness import Staleness

Key = Hashable


class _Item:
    __slots__ = ("group", "behavior_version", "priority", "times_sampled")

    def __init__(self, group, behavior_version: int, priority: float):
        self.group, self.behavior_version, self.priority = group, behavior_version, priority
        self.times_sampled = 0


def _check_priority(priority: float) -> float:
    priority = float(priority)
    if not (priority >= 0 and math.isfinite(priority)):
        raise ValueError(f"priority={priority!r}: must be finite and >= 0")
    return priority


class Table:
    """`selector`: fifo | lifo | uniform | prioritized (or a Selector); `remover`: fifo | lifo |
    min_priority (or a Selector); `alpha`: priority exponent of the prioritized selector; `capacity`:
    max items held (None = unbounded); `seed`: the sampling RNG's seed. The bound: `max_staleness`, or
    `staleness`, a gate shared with its owner (the hub's, whose live knob the table then follows)."""

    def __init__(self, selector: str | Selector = "fifo", remover: str | Selector = "fifo", *,
                 max_staleness: int | None = None, max_times_sampled: int = 1, capacity: int | None = None,
                 alpha: float = 1.0, staleness: Staleness | None = None, seed: int = 0):
        self.selector = make_selector(selector, alpha) if isinstance(selector, str) else selector
        self.remover = make_remover(remover) if isinstance(remover, str) else remover
        if max_times_sampled < 1:
            raise ValueError(f"buffer.max_times_sampled={max_times_sampled}: must be >= 1 (1 = train once)")
        self.max_times_sampled = int(max_times_sampled)
        if staleness is not None and max_staleness is not None:
            raise ValueError("Table: pass max_staleness or a staleness gate, not both")
        self.staleness = staleness if staleness is not None else Staleness(2 if max_staleness is None else max_staleness)
        self.capacity = self._check_capacity(capacity)
        self.rng = np.random.default_rng(seed)
        self.version = 0
        self._items: dict[Key, _Item] = {}
        self._seen: set[Key] = set()                   # every key ever accepted: makes resends idempotent
        self._by_version: dict[int, set[Key]] = {}     # behavior_version -> held keys
        self._version_heap: list[int] = []             # versions in _by_version (lazily cleaned)
        self._in_heap: set[int] = set()
        self.counters = dict(accepted=0, duplicates=0, sampled=0, consumed=0, evicted_stale=0,
                             evicted_capacity=0, priority_updates=0, priority_updates_unknown=0)

    @property
    def max_staleness(self) -> int:
        return self.staleness.max_staleness

    # ---- snapshots -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """The pickle keeps the bound as a plain int, as tables pickled before buffer/staleness.py did; a hub
        restores its own gate (with its admission counters) and hands it back (`HubState.load_snapshot`)."""
        state = dict(self.__dict__)
        state["max_staleness"] = state.pop("staleness").max_staleness
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state.pop("limiter", None)  # pickled before the (always MinSize(1)) limiter was removed
        state["staleness"] = Staleness(state.pop("max_staleness"))
        self.__dict__.update(state)

    # ---- validation ------------------------------------------------------------------------------
    @staticmethod
    def _check_capacity(capacity: int | None) -> int | None:
        if capacity is not None and (int(capacity) != capacity or capacity < 1):
            raise ValueError(f"buffer.capacity={capacity}: must be an integer >= 1, or None for unbounded")
        return None if capacity is None else int(capacity)

    # ---- insert ----------------------------------------------------------------------------------
    def insert(self, key: Key, group, priority: float = 1.0, behavior_version: int | None = None) -> bool:
        """Store `group` under `key`; True if the key is new. `behavior_version` defaults to the group's."""
        priority = _check_priority(priority)
        bv = int(group.behavior_version if behavior_version is None else behavior_version)
        if key in self._items:
            self._replace(key, group, priority, bv)
            return False
        if key in self._seen:
            self.counters["duplicates"] += 1
            return False
        if bv < self._limit():  # acked but already too stale to train on: accounted, never stored
            self._seen.add(key)
            self.counters["accepted"] += 1
            self.counters["evicted_stale"] += 1
            return True
        if self.capacity is not None and len(self._items) >= self.capacity:
            self._make_room(self.capacity - 1)
        self._add(key, _Item(group, bv, priority))  # raises (recording nothing) if priority ** alpha overflows
        self._seen.add(key)
        self.counters["accepted"] += 1
        return True

    def _replace(self, key: Key, group, priority: float, bv: int) -> None:
        item = self._items[key]
        if priority != item.priority:
            self._set_priority(key, item, priority)  # first: it is the step that can raise
        self.counters["duplicates"] += 1
        item.group = group
        if bv != item.behavior_version:
            self._unindex(key, item.behavior_version)
            item.behavior_version = bv
            self._index(key, bv)
            self._sweep()

    def _add(self, key: Key, item: _Item) -> None:
        self.selector.insert(key, item.priority)
        self.remover.insert(key, item.priority)
        self._items[key] = item
        self._index(key, item.behavior_version)

    def _index(self, key: Key, bv: int) -> None:
        keys = self._by_version.get(bv)
        if keys is None:
            keys = self._by_version[bv] = set()
            if bv not in self._in_heap:
                heapq.heappush(self._version_heap, bv)
                self._in_heap.add(bv)
        keys.add(key)

    def _unindex(self, key: Key, bv: int) -> None:
        keys = self._by_version[bv]
        keys.discard(key)
        if not keys:
            del self._by_version[bv]  # its heap entry is dropped when it reaches the top

    # ---- removal ---------------------------------------------------------------------------------
    def _drop(self, key: Key, counter: str, in_selector: bool = True, unindex: bool = True) -> _Item:
        item = self._items.pop(key)
        if in_selector:
            self.selector.remove(key)
        self.remover.remove(key)
        if unindex:
            self._unindex(key, item.behavior_version)
        self.counters[counter] += 1
        return item

    def _limit(self) -> int:
        return self.staleness.limit(self.version)

    def _sweep(self) -> int:
        """Evict every held item below the staleness limit; O(evicted + versions popped)."""
        limit, heap, evicted = self._limit(), self._version_heap, 0
        while heap and heap[0] < limit:
            bv = heapq.heappop(heap)
            self._in_heap.discard(bv)
            keys = self._by_version.pop(bv, ())
            self.selector.remove_many(keys)  # one vectorised pass for the prioritized selector
            for key in keys:
                self._drop(key, "evicted_stale", in_selector=False, unindex=False)
            evicted += len(keys)
        return evicted

    def _make_room(self, target: int) -> None:
        """Shrink to `target` items: stale items go first (they are lost anyway), then the remover's pick."""
        self._sweep()
        while len(self._items) > target:
            self._drop(self.remover.sample(self.rng), "evicted_capacity")

    # ---- sample ----------------------------------------------------------------------------------
    def advance(self, version: int) -> int:
        """Tell the table the learner reached `version` (versions never go back); returns items evicted."""
        self.version = max(self.version, int(version))
        return self._sweep()

    def can_sample(self, n: int) -> bool:
        return len(self._items) >= n

    def sample(self, n: int, version: int | None = None) -> list[tuple[Key, object]]:
        """`n` distinct (key, group) pairs, all within the staleness bound at `version`, or [] when the
        table cannot serve `n` yet (too few fresh items): never a partial
        batch. An item sampled `max_times_sampled` times is retired (consumed); others stay in place."""
        if n < 1:
            raise ValueError(f"num_groups={n}: must be >= 1")
        if version is not None:
            self.advance(version)
        if not self.can_sample(n):
            return []
        keys = self.selector.take(self.rng, n)  # without replacement: a batch never repeats a key
        return self._hand_out(keys)

    def sample_keys(self, keys) -> list[tuple[Key, object]]:
        """Sample exactly these held keys, as `sample` would have (no RNG): the replay
        of a SAMPLE recorded in a write-ahead log, so replay does not depend on the RNG's state."""
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError(f"sample_keys: repeated keys in {keys}")
        missing = [k for k in keys if k not in self._items]
        if missing:
            raise KeyError(f"sample_keys: not held: {missing}")
        self.selector.remove_many(keys)
        return self._hand_out(keys)

    def _hand_out(self, keys: list) -> list[tuple[Key, object]]:
        """Count a sample of `keys` (already out of the selector): retire the ones sampled
        `max_times_sampled` times, put the others back in place."""
        batch, kept = [], []
        for key in keys:
            item = self._items[key]
            item.times_sampled += 1
            batch.append((key, item.group))
            if item.times_sampled >= self.max_times_sampled:
                self._drop(key, "consumed", in_selector=False)
            else:
                kept.append((key, item))
        for key, item in reversed(kept):  # reversed: fifo/lifo get them back in their old order
            self.selector.restore(key, item.priority)
        self.counters["sampled"] += len(keys)
        return batch

    # ---- priorities and knobs --------------------------------------------------------------------
    def update_priority(self, key: Key, priority: float) -> bool:
        """Set a held item's priority (e.g. by |advantage| after training); unknown keys are counted."""
        priority = _check_priority(priority)
        item = self._items.get(key)
        if item is None:
            self.counters["priority_updates_unknown"] += 1
            return False
        self._set_priority(key, item, priority)
        self.counters["priority_updates"] += 1
        return True

    def _set_priority(self, key: Key, item: _Item, priority: float) -> None:
        self.selector.update(key, priority)
        self.remover.update(key, priority)
        item.priority = priority

    def set_max_staleness(self, max_staleness: int) -> int:
        """Takes effect at once: a lower bound evicts now; returns items evicted. Raising it does not
        bring back items already evicted."""
        self.staleness.set_max_staleness(max_staleness)
        return self._sweep()

    def set_alpha(self, alpha: float) -> None:
        if not hasattr(self.selector, "set_alpha"):
            raise ValueError(f"buffer.alpha={alpha}: only the prioritized selector has a priority exponent; "
                             f"this table samples with {type(self.selector).__name__}")
        self.selector.set_alpha(alpha)

    @property
    def alpha(self) -> float | None:
        return getattr(self.selector, "alpha", None)

    def set_capacity(self, capacity: int | None) -> int:
        """Takes effect at once: shrinking below the size evicts (stale first, then the remover's picks)."""
        self.capacity = self._check_capacity(capacity)
        before = self.counters["evicted_capacity"] + self.counters["evicted_stale"]
        if self.capacity is not None:
            self._make_room(self.capacity)
        return self.counters["evicted_capacity"] + self.counters["evicted_stale"] - before

    # ---- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def seen(self, key: Key) -> bool:
        """True if `key` was ever accepted (held now or gone): a resend of it is a duplicate."""
        return key in self._seen

    def get(self, key: Key):
        item = self._items.get(key)
        return None if item is None else item.group

    def entries(self) -> Iterator[tuple[Key, object, float, int]]:
        """(key, group, priority, times_sampled) of every held item, for snapshots."""
        for key, item in self._items.items():
            yield key, item.group, item.priority, item.times_sampled

    def map_groups(self, fn) -> None:
        """Replace every held group by `fn(group)` (a snapshot loader upgrading an older group format)."""
        for item in self._items.values():
            item.group = fn(item.group)

    def staleness_hist(self) -> dict[int, int]:
        """{staleness at the current version: items}; O(distinct versions held)."""
        return {self.version - bv: len(keys) for bv, keys in self._by_version.items()}

    def stats(self) -> dict:
        """Counters plus `size`, `version`, `max_staleness`, `capacity`, `alpha`."""
        return {**self.counters, "size": len(self._items), "version": self.version,
                "max_staleness": self.max_staleness, "capacity": self.capacity, "alpha": self.alpha}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "buffer.rate_limiter":  # snapshots from before buffer/staleness.py hold a MinSize(1)
            return _RemovedLimiter
        return super().find_class(module, name)


class _RemovedLimiter:
    """Stands in for a pickled limiter class that no longer exists; `Table.__setstate__` drops it."""


def loads(blob: bytes) -> Table:
    """A pickled table, also one pickled by an older version of this module (snapshots)."""
    return _Unpickler(io.BytesIO(blob)).load()
