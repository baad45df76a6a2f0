"""Hub protocol semantics that make resending safe, and durability across a hub that dies without warning."""
from __future__ import annotations

import numpy as np

from async_rl import config as C
from async_rl.types import Group, Trajectory
from buffer.durable import DurableLog
from buffer.hub import Hub

PROMPTS = [{"input": f"{i}+0=", "label": str(i)} for i in range(10)]


def cfg(**over):
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


def test_resent_acquire_gets_the_same_grant_and_no_extra_credit():
    hub = Hub(cfg(), PROMPTS)
    first = reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 0, "max_groups": 2}), "GRANT")
    again = reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 0, "max_groups": 2}), "GRANT")
    assert first["prompts"] == again["prompts"] and hub.stats()["running"] == 2
    nxt = reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 1, "max_groups": 2}), "GRANT")
    assert {p["prompt_index"] for p in nxt["prompts"]}.isdisjoint({p["prompt_index"] for p in first["prompts"]})


def test_unacked_batch_is_redelivered_to_a_restarted_learner_and_ack_consumes_it():
    hub = Hub(cfg(), PROMPTS)
    for seq in range(4):
        hub.handle(b"g", {"type": "PUT", "groups": [group(seq=seq)]})
    b1 = reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0}), "BATCH")
    # the learner died before acking; its restart asks again without an ack
    b2 = reply_of(hub.handle(b"l2", {"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0}), "BATCH")
    assert [g["seq"] for g in b1["groups"]] == [g["seq"] for g in b2["groups"]] == [0, 1]
    assert b1["lease"] == b2["lease"] and hub.stats()["in_flight"] == 2 and hub.stats()["consumed"] == 0
    b3 = reply_of(hub.handle(b"l2", {"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0,
                                     "ack_lease": b2["lease"]}), "BATCH")
    assert [g["seq"] for g in b3["groups"]] == [2, 3] and hub.stats()["consumed"] == 2


def test_redelivery_never_returns_what_went_stale_meanwhile():
    hub = Hub(cfg(max_staleness=0), PROMPTS)
    hub.handle(b"g", {"type": "PUT", "groups": [group(seq=0)]})
    reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0}), "BATCH")
    hub.handle(b"l", {"type": "VERSION", "version": 1, "weights_path": "p"})
    hub.handle(b"g", {"type": "PUT", "groups": [group(seq=1, version=1)]})
    again = reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 1}), "BATCH")
    assert [g["seq"] for g in again["groups"]] == [1]
    s = hub.stats()
    assert s["evicted_stale"] == 1 and s["accepted"] == s["consumed"] + s["evicted_stale"] + s["size"] + s["in_flight"]


def test_silent_generator_gets_its_credits_reclaimed_and_others_are_served():
    hub = Hub(cfg(generator_timeout=5), PROMPTS)
    reply_of(hub.handle(b"a", {"type": "ACQUIRE", "generator_id": "a", "acquire_seq": 0, "max_groups": 99}), "GRANT")
    assert hub.handle(b"b", {"type": "ACQUIRE", "generator_id": "b", "acquire_seq": 0, "max_groups": 1}) == []
    now = hub.state.generators["a"]["last_seen"] + 6
    hub.state.generators["b"]["last_seen"] = now
    grant = reply_of(hub.reclaim_silent_generators(now), "GRANT")
    assert len(grant["prompts"]) == 1 and hub.stats()["reclaimed"] == 4


def test_drop_returns_the_credit_once():
    hub = Hub(cfg(), PROMPTS)
    reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 0, "max_groups": 1}), "GRANT")
    for _ in range(2):  # a resent DROP counts once
        reply_of(hub.handle(b"g", {"type": "DROP", "generator_id": "g0", "seq": 0}), "OK")
    s = hub.stats()
    assert s["running"] == 0 and s["dropped_filtered"] == 1 and s["credits_available"] == 4


def test_set_max_staleness_validates_and_applies():
    hub = Hub(cfg(), PROMPTS)
    assert reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"max_staleness": -2}}), "ERROR")
    reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"max_staleness": 3}}), "OK")
    assert hub.state.max_staleness == 3 and hub.credits_available() == 8


def _drive(hub: Hub) -> None:
    reply_of(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "acquire_seq": 0, "max_groups": 3}), "GRANT")
    for seq in range(3):
        hub.handle(b"g", {"type": "PUT", "groups": [group(seq=seq)]})
    hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0})
    hub.handle(b"l", {"type": "VERSION", "version": 1, "weights_path": "/w/v1"})
    hub.flush()


def _view(hub: Hub) -> dict:
    s = hub.stats()
    return {k: s[k] for k in ("version", "size", "in_flight", "accepted", "consumed", "running", "evicted_stale")} | {
        "cursor": (hub.state.dispenser.epoch, hub.state.dispenser.position), "table": [e[0] for e in hub.state.table.entries()],
        "lease": hub.state.in_flight["L"]["lease"], "weights": hub.state.weights_path}


def test_a_hub_that_dies_without_closing_recovers_everything_from_its_log(tmp_path):
    for snapshot_interval in (1000, 3):  # log only; and snapshots plus log
        d = tmp_path / f"s{snapshot_interval}"
        hub = Hub(cfg(snapshot_interval=snapshot_interval), PROMPTS, DurableLog(d))
        _drive(hub)
        before = _view(hub)  # no close(), no final snapshot: as after SIGKILL
        reborn = Hub(cfg(snapshot_interval=snapshot_interval), PROMPTS, DurableLog(d))
        assert _view(reborn) == before
        assert all(reborn.state.seen(("g0", s)) for s in range(3))
        dup = reply_of(reborn.handle(b"g", {"type": "PUT", "groups": [group(seq=1)]}), "ACK")
        assert dup["duplicates"] == [True]


def test_torn_log_tail_is_cut_off(tmp_path):
    hub = Hub(cfg(), PROMPTS, DurableLog(tmp_path))
    _drive(hub)
    before = _view(hub)
    seg = sorted(tmp_path.glob("wal-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x50\x00\x00\x00\x01\x02")  # a record header whose body never made it to disk
    reborn = Hub(cfg(), PROMPTS, DurableLog(tmp_path))
    assert _view(reborn) == before
    reborn.handle(b"g", {"type": "PUT", "groups": [group(seq=9)]})
    reborn.flush()
    assert Hub(cfg(), PROMPTS, DurableLog(tmp_path)).stats()["accepted"] == 4


def varied_group(seq: int, rewards: tuple) -> dict:
    trajs = [Trajectory(np.array([1], np.int32), np.array([2], np.int32), np.zeros(1, np.float32),
                        np.zeros(1, np.int32), reward=r) for r in rewards]
    return Group("g0", seq, seq, "0", trajs).to_wire()


def test_prioritized_hub_skips_groups_that_teach_nothing_and_takes_priority_updates(tmp_path):
    c = cfg(selector="prioritized", priority_fn="reward_variance", alpha=1.0)
    hub = Hub(c, PROMPTS, DurableLog(tmp_path))
    for seq in range(6):  # even seqs: all rewards equal (variance 0), odd: mixed
        hub.handle(b"g", {"type": "PUT", "groups": [varied_group(seq, (1.0, 1.0) if seq % 2 == 0 else (0.0, 1.0))]})
    batch = reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 3, "version": 0}), "BATCH")
    assert sorted(g["seq"] for g in batch["groups"]) == [1, 3, 5]
    reply_of(hub.handle(b"l", {"type": "PRIORITY", "updates": [["g0", 2, 5.0]]}), "OK")
    assert reply_of(hub.handle(b"l", {"type": "PRIORITY", "updates": [["g0", 2, -1]]}), "ERROR")
    nxt = reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0,
                                     "ack_lease": batch["lease"]}), "BATCH")
    assert [g["seq"] for g in nxt["groups"]] == [2]
    hub.flush()
    reborn = Hub(c, PROMPTS, DurableLog(tmp_path))  # replay takes the logged keys, whatever its RNG says
    assert reborn.state.in_flight["L"]["keys"] == [("g0", 2)]
    assert sorted(k for k, *_ in reborn.state.table.entries()) == [("g0", 0), ("g0", 4)]
    assert reborn.stats()["consumed"] == 3


def test_set_knobs_are_validated_before_they_are_logged(tmp_path):
    hub = Hub(cfg(), PROMPTS, DurableLog(tmp_path))
    assert "only the prioritized selector" in reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"alpha": 0.5}}), "ERROR")["error"]
    assert reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"bogus": 1}}), "ERROR")
    reply_of(hub.handle(b"x", {"type": "SET", "knobs": {"max_staleness": 4, "capacity": 10}}), "OK")
    hub.flush()
    reborn = Hub(cfg(), PROMPTS, DurableLog(tmp_path))
    assert reborn.state.max_staleness == 4 and reborn.state.table.capacity == 10


def test_multi_group_put_is_all_or_nothing():
    hub = Hub(cfg(), PROMPTS)
    bad = group(seq=2)
    bad["trajectories"] = bad["trajectories"][:1]  # n_samples_per_prompt is 2
    err = reply_of(hub.handle(b"g", {"type": "PUT", "groups": [group(seq=1), bad]}), "ERROR")
    assert "n_samples_per_prompt" in err["error"] and hub.stats()["accepted"] == 0
    ack = reply_of(hub.handle(b"g", {"type": "PUT", "groups": [group(seq=1), group(seq=2)],
                                     "stats": {"gen_tokens": 10, "busy_s": 1.0}}), "ACK")
    assert ack["keys"] == [["g0", 1], ["g0", 2]] and ack["duplicates"] == [False, False]
    again = reply_of(hub.handle(b"g", {"type": "PUT", "groups": [group(seq=2), group(seq=3)]}), "ACK")
    assert again["duplicates"] == [True, False]
    s = hub.stats()
    assert s["accepted"] == 3 and s["duplicates"] == 1 and s["gen_tokens"] == 10


def test_batch_stats_carry_what_the_learner_logs_and_leave_the_rest_to_status():
    from learners.torch_learner import BUFFER_KEYS  # what the learner writes as buffer/* from each BATCH
    hub = Hub(cfg(), PROMPTS)
    for gid in ("g0", "g1", "g2"):
        hub.handle(b"g", {"type": "PUT", "groups": [group(gid=gid, seq=0)]})
    batch = reply_of(hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0}), "BATCH")
    assert "generators" not in batch["stats"] and batch["stats"]["num_generators"] == 3
    assert batch["stats"]["accepted"] == 3 and batch["stats"]["in_flight"] == 2
    status = reply_of(hub.handle(b"x", {"type": "STATS"}), "STATS")["stats"]
    assert sorted(status["generators"]) == ["g0", "g1", "g2"] and status["generators"]["g1"]["groups"] == 1
    assert set(BUFFER_KEYS) | {"gen_tokens", "gen_busy_s", "num_generators", "version"} <= set(batch["stats"])
    assert {k: status[k] for k in batch["stats"]} == batch["stats"]  # nothing happened in between: same values
    assert {"staleness_hist", "uptime_s", "wal_lsn"} <= set(status) - set(batch["stats"])
