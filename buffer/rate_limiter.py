"""Rate limiting: when a generator may start a group (admission), when a learner may sample.

Invariant: every decision is a pure function of counters and knobs passed in at call time; nothing is
cached. So a knob changed on a running hub (`max_staleness`) takes effect on the very next decision, and
a hub restored from its WAL (which restores counters) decides exactly as before the crash.

- `StalenessCredits`: AReaL's admission rule. Groups started for version v can be trained on up to version
  v + max_staleness, so at most `(max_staleness + v + 1) * groups_per_version` groups may ever be live
  (accepted and not wasted, plus running); never more than the run still needs.
- `MinSize`: the learner may sample only once the table holds at least `min_size` items.
- `SampleToInsertRatio`: Reverb's limiter; keeps `inserts * samples_per_insert - samples` within
  `min_size_to_sample * samples_per_insert +- error_buffer` once past the warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessCredits:
    """Admission credits. `groups_per_version` = rollout_batch_size * update_weights_interval (groups the
    learner consumes per version); `groups_needed` = num_rollout * rollout_batch_size (the whole run)."""

    groups_per_version: int
    groups_needed: int

    def __post_init__(self):
        if self.groups_per_version < 1:
            raise ValueError(f"groups_per_version={self.groups_per_version}: must be >= 1 "
                             f"(rollout_batch_size * update_weights_interval)")
        if self.groups_needed < 0:
            raise ValueError(f"groups_needed={self.groups_needed}: must be >= 0")

    @classmethod
    def from_rollout(cls, rollout) -> "StalenessCredits":
        """From a `RolloutConfig` (`cfg.rollout`)."""
        r = rollout
        return cls(r.rollout_batch_size * r.update_weights_interval, r.num_rollout * r.rollout_batch_size)

    def live(self, accepted: int, evicted_stale: int, running: int, evicted_capacity: int = 0) -> int:
        """Groups that count against the budget: accepted or running, minus those thrown away.

        Groups evicted at capacity are thrown away like stale ones; pass `evicted_capacity` so they are
        regenerated, or a table that evicts at capacity starves the learner (the budget would be spent on
        groups nobody can train on and the version would never advance to refill it)."""
        return accepted - evicted_stale - evicted_capacity + running

    def available(self, version: int, max_staleness: int, accepted: int, evicted_stale: int, running: int,
                  evicted_capacity: int = 0) -> int:
        """How many more groups a generator may start now (>= 0)."""
        live = self.live(accepted, evicted_stale, running, evicted_capacity)
        cap = (max_staleness + version + 1) * self.groups_per_version - live
        return max(0, min(cap, self.groups_needed - live))


@dataclass
class MinSize:
    """Sampling waits until the table holds `min_size` items; inserts are never limited."""

    min_size: int = 1

    def __post_init__(self):
        if self.min_size < 1:
            raise ValueError(f"min_size={self.min_size}: must be >= 1")

    def can_sample(self, n: int, size: int, inserts: int, samples: int) -> bool:
        return size >= max(self.min_size, n)

    def can_insert(self, size: int, inserts: int, samples: int) -> bool:
        return True


@dataclass
class SampleToInsertRatio:
    """Reverb's rate limiter: on average `samples_per_insert` samples per insert, within `error_buffer`.

    Until `min_size_to_sample` items were inserted, inserts are free and samples wait. After that a sample
    of n is allowed while `inserts * spi - (samples + n) >= min_size_to_sample * spi - error_buffer`, and
    an insert while `(inserts + 1) * spi - samples <= min_size_to_sample * spi + error_buffer`."""

    samples_per_insert: float
    min_size_to_sample: int = 1
    error_buffer: float = 1.0

    def __post_init__(self):
        if not self.samples_per_insert > 0:
            raise ValueError(f"samples_per_insert={self.samples_per_insert}: must be > 0")
        if self.min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample={self.min_size_to_sample}: must be >= 1")
        # smaller than one insert's worth of samples would deadlock: neither side could ever move
        if self.error_buffer < max(1.0, self.samples_per_insert):
            raise ValueError(f"error_buffer={self.error_buffer}: must be >= max(1, samples_per_insert="
                             f"{self.samples_per_insert}) or inserts and samples block each other forever")

    def _bounds(self) -> tuple[float, float]:
        mid = self.min_size_to_sample * self.samples_per_insert
        return mid - self.error_buffer, mid + self.error_buffer

    def can_sample(self, n: int, size: int, inserts: int, samples: int) -> bool:
        if size < max(self.min_size_to_sample, n):
            return False
        return inserts * self.samples_per_insert - (samples + n) >= self._bounds()[0]

    def can_insert(self, size: int, inserts: int, samples: int) -> bool:
        if inserts + 1 <= self.min_size_to_sample:
            return True
        return (inserts + 1) * self.samples_per_insert - samples <= self._bounds()[1]
