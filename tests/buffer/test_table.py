"""Table: staleness gate, accounting identity, idempotent insert, max_times_sampled, capacity removers,
priority updates by key, live knobs; a hypothesis state machine per selector for the invariants."""
from __future__ import annotations

import collections
import pickle
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from async_rl.types import Group, Trajectory
from buffer.table import Table


def group(seq: int, version: int = 0, gid: str = "g0", rewards=(1.0, 0.0)) -> Group:
    trajs = [Trajectory(np.array([1], np.int32), np.array([2, 3], np.int32), np.zeros(2, np.float32),
                        np.array([version, version], np.int32), reward=r) for r in rewards]
    return Group(gid, seq, 0, "0", trajs)


def put(table: Table, seq: int, version: int = 0, priority: float = 1.0) -> bool:
    g = group(seq, version)
    return table.insert(g.key, g, priority)


def accounting_holds(table: Table) -> bool:
    c = table.counters
    return c["accepted"] == c["consumed"] + c["evicted_stale"] + c["evicted_capacity"] + len(table)


def keys(batch) -> list:
    return [k for k, _ in batch]


# ---- basics ----------------------------------------------------------------------------------------
def test_fifo_sample_consumes_and_is_all_or_nothing():
    table = Table("fifo", max_staleness=1)
    for s in range(3):
        assert put(table, s)
    assert table.sample(4) == [] and len(table) == 3  # never a partial batch
    batch = table.sample(2)
    assert keys(batch) == [("g0", 0), ("g0", 1)] and batch[0][1].seq == 0
    assert table.stats() == {**table.counters, "size": 1, "version": 0, "max_staleness": 1,
                             "capacity": None, "alpha": None}
    assert table.counters["sampled"] == table.counters["consumed"] == 2 and accounting_holds(table)
    with pytest.raises(ValueError, match="num_groups=0"):
        table.sample(0)


def test_insert_is_idempotent_by_key():
    table = Table("prioritized", max_staleness=2)
    assert put(table, 0, priority=1.0) and put(table, 1, priority=1.0)
    replacement = group(0, version=0, rewards=(5.0, 5.0))
    assert not table.insert(replacement.key, replacement, 3.0)  # held: replaced in place
    assert table.get(("g0", 0)) is replacement and table.selector.priority(("g0", 0)) == 3.0
    assert len(table) == 2 and table.counters["accepted"] == 2 and table.counters["duplicates"] == 1
    table.sample(2)
    assert not put(table, 0) and len(table) == 0  # consumed: a late resend must not resurrect it
    assert table.counters["duplicates"] == 2 and table.seen(("g0", 0)) and accounting_holds(table)


def test_resend_with_older_behavior_version_is_reindexed():
    table = Table("fifo", max_staleness=1)
    table.advance(3)
    put(table, 0, version=3)
    assert not put(table, 0, version=1)  # replaced by a copy that is already too stale: evicted now
    assert len(table) == 0 and table.counters["evicted_stale"] == 1 and accounting_holds(table)


# ---- staleness -------------------------------------------------------------------------------------
def test_staleness_gate_on_insert_advance_and_sample():
    table = Table("lifo", max_staleness=1)
    for s, v in enumerate([0, 1, 2, 2]):
        put(table, s, version=v)
    assert table.advance(2) == 1 and table.staleness_hist() == {1: 1, 0: 2}
    assert put(table, 9, version=0)  # arrives already stale: acked (accepted) and evicted, never stored
    assert table.counters["evicted_stale"] == 2 and len(table) == 3
    batch = table.sample(3, version=3)  # version 3 makes behavior_version 1 stale too
    assert batch == [] and len(table) == 2 and table.counters["evicted_stale"] == 3
    assert [g.behavior_version for _, g in table.sample(2, version=1)] == [2, 2]  # versions never go back
    assert table.version == 3 and accounting_holds(table)


def test_max_staleness_zero_is_on_policy_and_knob_changes_take_effect_at_once():
    table = Table("uniform", max_staleness=0)
    put(table, 0, version=0)
    table.advance(1)
    assert len(table) == 0 and table.counters["evicted_stale"] == 1
    table.set_max_staleness(3)
    for s, v in enumerate([0, 1, 1, 1]):
        put(table, 10 + s, version=v)  # version 0 is fine again under max_staleness 3
    assert len(table) == 4
    assert table.set_max_staleness(0) == 1 and len(table) == 3
    with pytest.raises(ValueError, match=r"buffer.max_staleness=-1"):
        table.set_max_staleness(-1)
    assert all(table.version - g.behavior_version <= 0 for _, g in table.sample(3))


def test_sweep_touches_only_stale_items_at_100k():
    table = Table("prioritized", max_staleness=5)
    for i in range(100_000):
        table.insert(i, None, 1.0, behavior_version=i // 1000)  # 1000 items per version 0..99
    table.advance(99)
    assert table.counters["evicted_stale"] == 94_000 and len(table) == 6000 and accounting_holds(table)
    table = Table("prioritized", max_staleness=10**6)
    for i in range(100_000):
        table.insert(i, None, 1.0, behavior_version=0)
    start = time.perf_counter()
    for i in range(2000):  # a table scan per call would take ~10 ms each, i.e. ~20 s here
        table.advance(i)
        table.sample(1)
        table.insert(10**6 + i, None, 1.0, behavior_version=i)
    assert time.perf_counter() - start < 2.0


# ---- sampling policy -------------------------------------------------------------------------------
def test_max_times_sampled_keeps_place_and_never_repeats_within_a_batch():
    table = Table("fifo", max_times_sampled=2, max_staleness=5)
    for s in range(4):
        put(table, s)
    first, second = keys(table.sample(3)), keys(table.sample(3))
    assert first == second == [("g0", 0), ("g0", 1), ("g0", 2)]  # fifo: a kept item keeps its place
    assert table.counters["consumed"] == 3 and table.counters["sampled"] == 6 and accounting_holds(table)
    table = Table("uniform", max_times_sampled=3, seed=1)
    for s in range(10):
        put(table, s)
    seen = collections.Counter()
    while len(table) >= 4:
        batch = keys(table.sample(4))
        assert len(set(batch)) == 4
        seen.update(batch)
    assert max(seen.values()) <= 3 and table.counters["consumed"] == sum(v == 3 for v in seen.values())
    with pytest.raises(ValueError, match="max_times_sampled=0"):
        Table(max_times_sampled=0)


def test_prioritized_table_frequencies_and_priority_updates_by_key(chi2):
    table = Table("prioritized", alpha=0.5, max_times_sampled=10**9, seed=2)
    prios = [0.5, 1.0, 2.0, 4.0, 8.0]
    for s, p in enumerate(prios):
        put(table, s, priority=p)
    counts = collections.Counter(k[1] for _ in range(20_000) for k in keys(table.sample(1)))
    assert chi2([counts[s] for s in range(5)], np.array(prios) ** 0.5)
    assert table.update_priority(("g0", 0), 0.0) and table.update_priority(("g0", 4), 0.0)
    assert not table.update_priority(("g0", 77), 1.0)
    counts = collections.Counter(k[1] for _ in range(20_000) for k in keys(table.sample(1)))
    assert chi2([counts[s] for s in range(5)], [0, 1.0, 2 ** 0.5, 2.0, 0])
    assert table.counters["priority_updates"] == 2 and table.counters["priority_updates_unknown"] == 1
    with pytest.raises(ValueError, match="priority"):
        table.update_priority(("g0", 1), float("nan"))
    table.set_alpha(0.0)
    assert table.alpha == 0.0 and table.selector.probability(("g0", 0)) == 0.2


def test_set_alpha_needs_the_prioritized_selector():
    with pytest.raises(ValueError, match=r"buffer.alpha=0.5: only the prioritized selector"):
        Table("fifo").set_alpha(0.5)


def test_sample_keys_replays_a_logged_sample_and_a_pickled_table_resumes_identically():
    live = Table("prioritized", "min_priority", max_times_sampled=2, capacity=50, seed=3)
    replay = Table("prioritized", "min_priority", max_times_sampled=2, capacity=50, seed=99)
    rng = np.random.default_rng(0)
    for s in range(60):
        p = float(rng.exponential())
        put(live, s, priority=p)
        put(replay, s, priority=p)
        if s % 7 == 6:
            batch = live.sample(5)
            assert keys(replay.sample_keys(keys(batch))) == keys(batch)
    assert replay.counters == live.counters
    held = [sorted((k, p, t) for k, _, p, t in table.entries()) for table in (live, replay)]
    assert held[0] == held[1]
    with pytest.raises(KeyError, match="not held"):
        replay.sample_keys([("g0", 999)])
    copy = pickle.loads(pickle.dumps(live))  # a snapshot: items, selector, remover, counters, RNG
    assert [keys(copy.sample(4)) for _ in range(5)] == [keys(live.sample(4)) for _ in range(5)]


# ---- capacity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("remover, evicted", [("fifo", [0, 1]), ("lifo", [2, 3]), ("min_priority", [3, 1])])
def test_capacity_removers(remover, evicted):
    table = Table("uniform", remover, capacity=3, max_staleness=5)
    for s, p in enumerate([5.0, 2.0, 9.0, 1.0, 7.0]):
        put(table, s, priority=p)
    gone = sorted({0, 1, 2, 3, 4} - {k[1] for k, *_ in table.entries()})
    assert gone == sorted(evicted) and len(table) == 3
    assert table.counters["evicted_capacity"] == 2 and accounting_holds(table)


def test_capacity_evicts_stale_items_first_and_shrinks_at_runtime():
    table = Table("fifo", "min_priority", capacity=3, max_staleness=1)
    put(table, 0, version=0, priority=9.0)
    put(table, 1, version=1, priority=1.0)
    put(table, 2, version=1, priority=2.0)
    table.version = 2  # as if told without a sweep: the capacity path must sweep before it evicts
    put(table, 3, version=2, priority=5.0)
    assert table.counters["evicted_stale"] == 1 and table.counters["evicted_capacity"] == 0
    assert table.set_capacity(1) == 2 and [k[1] for k, *_ in table.entries()] == [3]
    with pytest.raises(ValueError, match=r"buffer.capacity=0"):
        table.set_capacity(0)
    assert table.set_capacity(None) == 0 and accounting_holds(table)


# ---- invariants under random interleavings ---------------------------------------------------------
class TableMachine(RuleBasedStateMachine):
    SELECTOR = "fifo"

    @initialize(remover=st.sampled_from(["fifo", "lifo", "min_priority"]), max_times=st.integers(1, 3),
                capacity=st.none() | st.integers(1, 12), max_staleness=st.integers(0, 3),
                seed=st.integers(0, 3))
    def setup(self, remover, max_times, capacity, max_staleness, seed):
        self.table = Table(self.SELECTOR, remover, max_staleness=max_staleness, max_times_sampled=max_times,
                           capacity=capacity, alpha=0.8, seed=seed)
        if self.SELECTOR == "prioritized":
            self.table.selector.vectorize_from = 1 + seed % 2 * 15  # both batch paths: vectorised, scalar
        self.times = collections.Counter()
        self.seq = 0

    @rule(lag=st.integers(0, 4), priority=st.sampled_from([0.0, 0.5, 1.0, 4.0]), resend=st.booleans())
    def insert(self, lag, priority, resend):
        seq = self.seq - 1 if resend and self.seq else self.seq
        self.seq += seq == self.seq
        g = group(seq, version=max(0, self.table.version - lag))
        self.table.insert(g.key, g, priority)

    @rule(n=st.integers(1, 4), ahead=st.integers(0, 2))
    def sample(self, n, ahead):
        version = self.table.version + ahead
        batch = self.table.sample(n, version=version)
        assert len(batch) in (0, n) and len({k for k, _ in batch}) == len(batch)
        for key, g in batch:
            assert version - g.behavior_version <= self.table.max_staleness  # the invariant of DESIGN.md
            self.times[key] += 1
            assert self.times[key] <= self.table.max_times_sampled

    @rule(step=st.integers(1, 2))
    def bump_version(self, step):
        self.table.advance(self.table.version + step)

    @rule(max_staleness=st.integers(0, 4))
    def change_max_staleness(self, max_staleness):
        self.table.set_max_staleness(max_staleness)

    @rule(capacity=st.none() | st.integers(1, 12))
    def change_capacity(self, capacity):
        self.table.set_capacity(capacity)

    @rule(seq=st.integers(0, 30), priority=st.sampled_from([0.0, 2.0, 9.0]))
    def update_priority(self, seq, priority):
        self.table.update_priority(("g0", seq), priority)

    @rule(alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    def change_alpha(self, alpha):
        if self.SELECTOR == "prioritized":
            self.table.set_alpha(alpha)

    @invariant()
    def consistent(self):
        t = self.table
        assert accounting_holds(t)
        assert len(t.selector) == len(t.remover) == len(t) == sum(map(len, t._by_version.values()))
        assert all(g.behavior_version >= t.version - t.max_staleness for _, g, *_ in t.entries())
        assert t.capacity is None or len(t) <= t.capacity
        consumed_keys = sum(v == t.max_times_sampled for v in self.times.values())
        assert t.counters["consumed"] == consumed_keys and t.counters["sampled"] == sum(self.times.values())


@pytest.mark.parametrize("selector", ["fifo", "lifo", "uniform", "prioritized"])
def test_invariants_under_random_interleavings(selector):
    machine = type(f"TableMachine_{selector}", (TableMachine,), {"SELECTOR": selector})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=40,
                                                         deadline=None))
