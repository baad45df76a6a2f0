"""A lost generator's prompts are dispensed again (buffer/prompts.py PromptLeases): every prompt the hub hands
out yields exactly one stored group (or one DROP), also when its generator goes silent and is reclaimed,
comes back late from a partition, or the hub restarts from its log in between."""
from __future__ import annotations

import collections
import random
import time

import numpy as np
import pytest

from async_rl import config as C
from async_rl.types import Group, Trajectory
from buffer.durable import DurableLog
from buffer.hub import Hub
from buffer.prompts import PromptDispenser

PROMPTS = [{"input": f"{i}+0=", "label": str(i)} for i in range(7)]


def cfg(**over):
    words = {"rollout_batch_size": 4, "n_samples_per_prompt": 2, "num_rollout": 1000, "max_staleness": 100,
             "generator_timeout": 5, "snapshot_interval": 1000, **over}
    return C.load(None, [f"{k}={v}" for k, v in words.items()])


def group(gid: str, seq: int, prompt_index: int) -> dict:
    t = Trajectory(np.array([1], np.int32), np.array([2, 3], np.int32), np.zeros(2, np.float32),
                   np.zeros(2, np.int32), reward=1.0)
    return Group(gid, seq, prompt_index, "0", [t, t]).to_wire()


def replies(out, kind):
    found = [r for _, r in out if r.get("type") == kind]
    assert len(found) == 1, out
    return found[0]


class Gen:
    """A generator's side of the protocol, driven by hand: its grants and the groups it still owes."""

    def __init__(self, hub: Hub, gid: str):
        self.hub, self.gid, self.acq, self.seq, self.owed = hub, gid, 0, 0, []

    def acquire(self, n: int) -> list[int]:
        out = self.hub.handle(self.gid.encode(), {"type": "ACQUIRE", "generator_id": self.gid,
                                                  "acquire_seq": self.acq, "max_groups": n})
        self.acq += 1
        got = [p["prompt_index"] for p in replies(out, "GRANT")["prompts"]]
        self.owed += got
        return got

    def put(self, prompt_index: int) -> bool:
        """PUT a group for `prompt_index`; whether the hub acked it as a duplicate (not stored)."""
        self.owed.remove(prompt_index)
        self.seq += 1
        accepted = self.hub.stats()["accepted"]
        ack = replies(self.hub.handle(self.gid.encode(), {"type": "PUT", "groups": [group(self.gid, self.seq, prompt_index)]}), "ACK")
        dup = ack["duplicates"][0]
        assert dup == (self.hub.stats()["accepted"] == accepted)  # the ACK tells what was stored
        return dup

    def drop(self, prompt_index: int) -> None:
        self.owed.remove(prompt_index)
        self.seq += 1
        replies(self.hub.handle(self.gid.encode(), {"type": "DROP", "generator_id": self.gid, "seq": self.seq,
                                                    "prompt_index": prompt_index}), "OK")


def lose(hub: Hub, *gids: str) -> None:
    """`gids` fall silent past the timeout while every other generator keeps beating."""
    now = max([time.time(), *(g["last_seen"] for g in hub.state.generators.values())]) + 6
    for gid, g in hub.state.generators.items():
        if gid not in gids:
            g["last_seen"] = now
    hub.reclaim_silent_generators(now)


def stored(hub: Hub) -> collections.Counter:
    return collections.Counter(e[1].to_group().prompt_index for e in hub.state.table.entries())


def test_a_lost_generators_prompts_go_to_the_next_grant_and_each_yields_one_group():
    hub = Hub(cfg(), PROMPTS)
    a, b = Gen(hub, "a"), Gen(hub, "b")
    lost = a.acquire(3)
    first = b.acquire(1)
    lose(hub, "a")
    s = hub.stats()
    assert s["reclaimed"] == 3 and s["reissue_pending"] == 3 and s["running"] == 1
    again = b.acquire(4)
    assert again[:3] == lost and again[3] not in lost + first  # then the cursor moves on
    for p in list(b.owed):
        assert b.put(p) is False
    s = hub.stats()
    assert stored(hub) == collections.Counter(lost + first + again[3:])
    assert s["reissued"] == 3 and s["reissue_pending"] == 0 and s["running"] == 0


def test_a_late_put_from_a_healed_partition_counts_once():
    hub = Hub(cfg(), PROMPTS)
    a, b = Gen(hub, "a"), Gen(hub, "b")
    p0, p1, p2 = a.acquire(3)
    lose(hub, "a")
    assert a.put(p0) is False  # back before anyone got p0 again: it takes p0 off the reissue queue
    assert b.acquire(2) == [p1, p2]
    assert a.put(p1) is False  # back after b got p1: the first group for p1 is a's
    assert b.put(p1) is True   # so b's is not stored
    assert b.put(p2) is False
    assert a.put(p2) is True
    s = hub.stats()
    assert stored(hub) == collections.Counter([p0, p1, p2])
    assert s["late_duplicates"] == 2 and s["running"] == 0 and s["reissue_pending"] == 0
    assert s["accepted"] == s["size"] == 3


def test_one_put_with_a_prompts_late_and_regranted_groups_stores_one():
    hub = Hub(cfg(), PROMPTS)
    a = Gen(hub, "a")
    (p,) = a.acquire(1)
    lose(hub, "a")
    assert a.acquire(1) == [p]  # back from the partition, it is granted its own lost prompt again
    ack = replies(hub.handle(b"a", {"type": "PUT", "groups": [group("a", 1, p), group("a", 2, p)]}), "ACK")
    assert ack["duplicates"] == [False, True] and stored(hub) == {p: 1} and hub.stats()["running"] == 0


def test_a_dropped_prompt_is_resolved_and_not_reissued():
    hub = Hub(cfg(), PROMPTS)
    a, b = Gen(hub, "a"), Gen(hub, "b")
    p0, p1 = a.acquire(2)
    a.drop(p0)
    lose(hub, "a")
    assert b.acquire(2)[0] == p1 and hub.stats()["reissued"] == 1


@pytest.mark.parametrize("snapshot_interval", [1000, 2])
def test_a_restarted_hub_keeps_owed_prompts_and_the_reissue_queue(tmp_path, snapshot_interval):
    hub = Hub(cfg(snapshot_interval=snapshot_interval), PROMPTS, DurableLog(tmp_path))
    a, b = Gen(hub, "a"), Gen(hub, "b")
    a.acquire(3)
    b.acquire(2)
    b.put(b.owed[0])
    lose(hub, "a")
    b.acquire(1)
    hub.flush()
    before = hub.state.leases.state()
    reborn = Hub(cfg(snapshot_interval=snapshot_interval), PROMPTS, DurableLog(tmp_path))  # as after SIGKILL
    assert reborn.state.leases.state() == before and before["reissue"]
    b.hub = reborn
    rest = b.acquire(5)
    assert rest[:2] == [p for _, p in before["reissue"]]


def _fuzz(seed: int, tmp_path=None) -> None:
    """Random grants, puts, drops, losses and late puts among four generators (and a hub restart from its
    log), then the survivors finish everything owed: every prompt dispensed from the cursor has exactly one
    group or DROP, counted against an independent replay of the dispenser's order."""
    rng = random.Random(seed)
    log = (lambda: DurableLog(tmp_path / f"s{seed}")) if tmp_path else (lambda: None)
    c = cfg(snapshot_interval=rng.choice([3, 1000]))
    hub = Hub(c, PROMPTS, log())
    gens = {g: Gen(hub, g) for g in "abcd"}
    dead: set[str] = set()
    dropped = collections.Counter()
    for _ in range(60):
        alive = [g for g in gens if g not in dead]
        g = gens[rng.choice(alive)]
        op = rng.random()
        if op < 0.35:
            g.acquire(rng.randint(1, 3))
        elif op < 0.7 and g.owed:
            p = rng.choice(g.owed)
            if rng.random() < 0.15:
                late = hub.stats()["late_duplicates"]
                g.drop(p)
                dropped[p] += hub.stats()["late_duplicates"] == late  # (a DROP for a prompt with its group counts not)
            else:
                g.put(p)
        elif op < 0.8 and len(alive) > 1:
            dead.add(g.gid)  # partitioned, maybe for good
            lose(hub, *dead)
        elif op < 0.9 and dead:
            late = gens[rng.choice(sorted(dead))]  # a partitioned one comes back and delivers something
            if late.owed:
                late.put(rng.choice(late.owed))
        elif tmp_path:
            hub.flush()
            hub = Hub(c, PROMPTS, log())
            for x in gens.values():
                x.hub = hub
    lose(hub, *dead)
    finisher = gens[next(g for g in gens if g not in dead)]
    for _ in range(50):
        for p in list(finisher.owed):
            finisher.put(p)
        if not hub.state.leases.reissue:
            break
        finisher.acquire(3)
    for p in list(finisher.owed):
        finisher.put(p)
    d = hub.state.dispenser
    ref = PromptDispenser(PROMPTS, c.data.rollout_shuffle, c.data.rollout_seed)
    dispensed = collections.Counter(ref.next()[0] for _ in range(d.epoch * len(PROMPTS) + d.position))
    s = hub.stats()
    assert stored(hub) + dropped == dispensed, (seed, s)
    assert s["running"] == 0 and s["reissue_pending"] == 0
    assert s["accepted"] == s["consumed"] + s["evicted_stale"] + s["evicted_capacity"] + s["size"] + s["in_flight"]


def test_random_losses_and_late_puts_yield_one_group_per_dispensed_prompt():
    for seed in range(40):
        _fuzz(seed)


def test_the_same_with_hub_restarts_from_its_log(tmp_path):
    for seed in range(12):
        _fuzz(seed, tmp_path)
