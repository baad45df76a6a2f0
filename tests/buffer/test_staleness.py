"""The staleness gate (buffer/staleness.py): credits against an independent count, the staleness promise they
exist for, the one validator used by config, table and hub, and its state across snapshots (also old ones)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_rl import config as C
from async_rl.types import Group, Trajectory
from buffer.durable import DurableLog
from buffer.hub import Hub
from buffer.staleness import Flow, Staleness
from buffer.table import Table

LEGACY = Path(__file__).parent / "data" / "hub-snapshot-v1"
PROMPTS = [{"input": f"{i}+0=", "label": str(i)} for i in range(10)]


def cfg(**over):  # the run tests/buffer/test_hub_protocol.py uses, which also wrote the LEGACY fixture
    words = {"rollout_batch_size": 2, "n_samples_per_prompt": 2, "num_rollout": 100, "max_staleness": 1,
             "snapshot_interval": 1000, **over}
    return C.load(None, [f"{k}={v}" for k, v in words.items()])


def group(gid="g0", seq=0, version=0) -> dict:
    t = Trajectory(np.array([1], np.int32), np.array([2, 3], np.int32), np.zeros(2, np.float32),
                   np.array([version, version], np.int32), reward=float(seq % 2))
    return Group(gid, seq, seq, "0", [t, t]).to_wire()


def reply_of(replies, kind):
    found = [r for _, r in replies if r.get("type") == kind]
    assert len(found) == 1, replies
    return found[0]


def reference_credits(max_staleness, version, batch_groups, needed, accepted, wasted, running) -> int:
    """Count, one group at a time, how many more may start: each one must keep the groups in flight (accepted
    and not wasted, plus running) within (max_staleness + version + 1) * batch_groups and within the run."""
    in_flight, started = accepted - wasted + running, 0
    while in_flight + 1 <= (max_staleness + version + 1) * batch_groups and in_flight + 1 <= needed:
        in_flight, started = in_flight + 1, started + 1
    return started


@settings(max_examples=400, deadline=None)
@given(ms=st.integers(0, 6), v=st.integers(0, 12), bg=st.integers(1, 8), needed=st.integers(0, 120),
       accepted=st.integers(0, 100), wasted_frac=st.floats(0, 1), running=st.integers(0, 40))
def test_credits_match_an_independent_count(ms, v, bg, needed, accepted, wasted_frac, running):
    wasted = int(accepted * wasted_frac)
    gate = Staleness(ms, batch_groups=bg, groups_needed=needed)
    gate.grant(running)
    got = gate.credits(v, Flow(accepted, wasted))
    assert got == reference_credits(ms, v, bg, needed, accepted, wasted, running)
    unbounded = Staleness(ms, batch_groups=bg)  # groups_needed None: only the staleness term binds
    unbounded.grant(running)
    assert unbounded.credits(v, Flow(accepted, wasted)) == reference_credits(ms, v, bg, 10**9, accepted, wasted, running)


@settings(max_examples=200, deadline=None)
@given(ms=st.integers(0, 4), bg=st.integers(1, 5), versions=st.integers(1, 12), asks=st.lists(st.integers(1, 7), min_size=1, max_size=60))
def test_credits_keep_every_group_within_the_bound_of_an_in_order_learner(ms, bg, versions, asks):
    """Why the formula: generators start groups whenever they hold credits; groups finish in order and the
    learner trains them `bg` per version. Then a group started at version v is trained at version <= v + ms."""
    gate = Staleness(ms, batch_groups=bg, groups_needed=versions * bg)
    started_at, trained = [], 0  # started_at[i]: the learner version when group i was started
    for ask in asks:
        version = trained // bg
        n = min(ask, gate.credits(version, Flow(accepted=len(started_at), wasted=0)))
        gate.grant(n)
        started_at += [version] * n
        gate.release(gate.running)  # they finish (in order) and are accepted
        take = min(bg, len(started_at) - trained)
        if take == bg:  # the learner trains one full batch at this version, then publishes
            for i in range(trained, trained + bg):
                assert version - started_at[i] <= ms
            trained += bg
    assert len(started_at) <= versions * bg


def test_credits_from_config_and_live_knob_changes():
    c = C.load(None, ["rollout_batch_size=2", "n_samples_per_prompt=2", "update_weights_interval=3",
                      "num_rollout=10", "max_staleness=0"])
    gate = Staleness.from_config(c)
    assert (gate.max_staleness, gate.batch_groups, gate.groups_needed) == (0, 6, 20)
    flow = Flow(accepted=6, wasted=0)
    assert gate.credits(0, flow) == 0  # on-policy: wait for version 1
    gate.set_max_staleness(1)
    assert gate.credits(0, flow) == 6  # a live knob: nothing cached
    gate.set_max_staleness(9)
    assert gate.credits(5, flow) == 14  # capped by the groups the run still needs
    gate.set_max_staleness(0)
    assert gate.credits(0, Flow(accepted=6, wasted=2)) == 2  # wasted groups are regenerated
    assert gate.limit(7) == 7 and Staleness(3).limit(7) == 4
    with pytest.raises(ValueError, match="batch_groups=0"):
        Staleness(1, batch_groups=0)


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, True, "2", None])
def test_one_validator_one_message_in_config_table_and_hub(bad):
    with pytest.raises(ValueError) as from_gate:
        Staleness(bad)
    message = str(from_gate.value)
    assert message.startswith(f"buffer.max_staleness={bad!r}: must be >= 0 and an integer")
    with pytest.raises(ValueError, match="buffer.max_staleness") as from_table:
        Table("fifo").set_max_staleness(bad)
    assert str(from_table.value) == message
    hub = Hub(cfg(), PROMPTS)
    assert reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"max_staleness": bad}}), "ERROR")["error"] == message
    assert hub.state.max_staleness == 1
    if isinstance(bad, int) and not isinstance(bad, bool):  # the loader coerces the others before the rules
        with pytest.raises(C.ConfigError) as from_config:
            cfg(max_staleness=bad)
        assert str(from_config.value) == message


def test_numpy_integers_are_integers():
    assert Table("fifo", max_staleness=np.int64(3)).max_staleness == 3


def test_the_table_and_the_hub_share_one_gate_also_after_a_snapshot(tmp_path):
    hub = Hub(cfg(snapshot_interval=1), PROMPTS, DurableLog(tmp_path))
    assert hub.state.table.staleness is hub.state.staleness
    reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 0, "max_groups": 3}), "GRANT")
    hub.handle(b"g", {"type": "PUT", "groups": [group(seq=0)]})
    hub.handle(b"l", {"type": "VERSION", "version": 1, "weights_path": "/w/v1"})
    hub.flush()  # snapshot_interval 1: the newest state is a snapshot
    reborn = Hub(cfg(snapshot_interval=1), PROMPTS, DurableLog(tmp_path))
    assert reborn.state.table.staleness is reborn.state.staleness
    assert reborn.state.staleness.running == 2 and reborn.credits_available() == hub.credits_available() == 3
    reply_of(reborn.handle(b"x", {"type": "SET", "knobs": {"max_staleness": 0}}), "OK")
    assert len(reborn.state.table) == 0  # the table follows the hub's knob: the version-0 group is now stale
    assert reborn.credits_available() == 2  # (0 + 1 + 1) * 2 - (1 accepted - 1 evicted + 2 running)


def test_a_snapshot_written_before_the_staleness_gate_still_loads(tmp_path):
    """The fixture was written by commit 28cf41a (a Table pickled with `max_staleness` and a MinSize limiter,
    `running` among the hub's counters), with what that hub reported in expected.json."""
    shutil.copytree(LEGACY, tmp_path / "hub")
    expected = json.loads((LEGACY / "expected.json").read_text())
    hub = Hub(cfg(max_staleness=1), PROMPTS, DurableLog(tmp_path / "hub"))
    s = hub.stats()
    assert {k: s[k] for k in expected if k in s} == {k: v for k, v in expected.items() if k in s}
    assert sorted(list(k) for k, *_ in hub.state.table.entries()) == expected["table"]
    assert {g: v["running"] for g, v in hub.state.generators.items()} == expected["generators_running"]
    assert hub.state.table.staleness is hub.state.staleness and not hasattr(hub.state.table, "limiter")
    hub.flush()
    hub.log.snapshot(hub.state.to_snapshot())  # rewritten in today's format, it loads to the same hub
    again = Hub(cfg(max_staleness=1), PROMPTS, DurableLog(tmp_path / "hub")).stats()
    assert {k: again[k] for k in expected if k in again} == {k: s[k] for k in expected if k in s}
