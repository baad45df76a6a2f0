"""The staleness bound and admission, in one place: `max_staleness`, the stale limit, the credits.

Invariants:
- Bound: at learner version v no group with `behavior_version < limit(v) = v - max_staleness` is trained
  on. The table evicts such groups from what it holds and the hub drops them from an un-acked batch;
  both ask `limit`, the only place the bound becomes a version.
- Admission (AReaL's staleness manager rule): a group started while the learner is at version v is
  trainable up to version v + max_staleness, i.e. among the first `max_staleness + v + 1` batches of
  `batch_groups` groups. So `credits` never lets more than `(max_staleness + v + 1) * batch_groups` groups
  be live at once (accepted and not thrown away, plus running), nor more than `groups_needed` over the run.
- `credits` is a pure function of the bound, `running` and the table's `Flow` at call time: nothing is
  cached, so a live change of `max_staleness` takes effect on the very next decision, and a hub rebuilt
  from its snapshot and WAL decides exactly as before.
- What changes (`max_staleness`, `running`) changes only inside `HubState.apply` (set, grant, put, drop
  and reclaim records) and is saved with the hub's snapshot (`state` / `restore`). `batch_groups` and
  `groups_needed` are the run's config, read again at every hub start, never snapshotted.

The one validator of the bound is `async_rl.config_rules.buffer.max_staleness_problem` (async_rl/ never imports
buffer/, so the config loader can only share a check that lives there).
"""
from __future__ import annotations

from dataclasses import dataclass

from async_rl.config_rules.buffer import max_staleness_problem


def check_max_staleness(value) -> int:
    problem = max_staleness_problem(value)
    if problem:
        raise ValueError(problem)
    return int(value)


@dataclass(frozen=True)
class Flow:
    """The table's side of admission: `accepted` groups ever (each key once), of which `wasted` were thrown
    away untrained (evicted stale, held or in flight, or at capacity). Wasted groups give their credit back,
    or a table that evicts would starve the learner: the budget would be spent on groups nobody trains."""

    accepted: int
    wasted: int


class Staleness:
    """`max_staleness`: the bound (a live knob); `batch_groups`: groups the learner consumes per version
    (rollout_batch_size * update_weights_interval); `groups_needed`: groups the whole run trains
    (num_rollout * rollout_batch_size; None = unbounded); counter `running`: groups granted to generators
    and not yet put, dropped or reclaimed."""

    def __init__(self, max_staleness: int = 2, batch_groups: int = 1, groups_needed: int | None = None):
        self.max_staleness = check_max_staleness(max_staleness)
        if batch_groups < 1:
            raise ValueError(f"batch_groups={batch_groups}: must be >= 1 (rollout_batch_size * update_weights_interval)")
        if groups_needed is not None and groups_needed < 0:
            raise ValueError(f"groups_needed={groups_needed}: must be >= 0 (num_rollout * rollout_batch_size)")
        self.batch_groups, self.groups_needed = int(batch_groups), groups_needed
        self.running = 0

    @classmethod
    def from_config(cls, cfg) -> "Staleness":
        r = cfg.rollout
        return cls(cfg.buffer.max_staleness, r.rollout_batch_size * r.update_weights_interval,
                   r.num_rollout * r.rollout_batch_size)

    def set_max_staleness(self, value: int) -> None:
        """Raising it does not bring back groups already evicted; lowering it is the caller's sweep."""
        self.max_staleness = check_max_staleness(value)

    def limit(self, version: int) -> int:
        """The lowest behavior_version still trainable at `version`."""
        return version - self.max_staleness

    def credits(self, version: int, flow: Flow) -> int:
        """How many more groups a generator may start now (>= 0)."""
        live = flow.accepted - flow.wasted + self.running
        room = (self.max_staleness + version + 1) * self.batch_groups - live
        if self.groups_needed is not None:
            room = min(room, self.groups_needed - live)
        return max(0, room)

    def grant(self, n: int) -> None:
        self.running += n

    def release(self, n: int) -> None:
        """`n` granted groups came back (put, dropped or reclaimed)."""
        self.running -= n

    # ---- snapshots -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"max_staleness": self.max_staleness, "running": self.running}

    def restore(self, state: dict) -> None:
        self.max_staleness = check_max_staleness(state["max_staleness"])
        self.running = int(state["running"])

    def __repr__(self) -> str:
        return (f"Staleness(max_staleness={self.max_staleness}, batch_groups={self.batch_groups}, "
                f"groups_needed={self.groups_needed}, running={self.running})")
