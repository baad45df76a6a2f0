"""buffer.priority_update: after its step the learner sends each trained group's new priority by key, and
the real hub's table holds exactly the reference value (mean |GRPO advantage| over the group's response
tokens, computed here independently from the rewards); the prioritized selector then follows it."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from async_rl import config as C
from async_rl.hub_client import HubClient
from learners.priorities import group_priorities
from async_rl.types import Group, Trajectory

REWARDS = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # the last group teaches nothing: priority 0
LENGTHS = [[2, 3, 4], [5, 1, 2], [3, 3, 3]]


def reference_priority(rewards, lengths) -> float:
    """GRPO advantage (r - mean) / (unbiased std + 1e-6), one per trajectory on all its response tokens;
    the priority is its mean absolute value over the group's tokens."""
    r = np.asarray(rewards, np.float64)
    adv = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    return float((np.abs(adv) * np.asarray(lengths)).sum() / np.sum(lengths))


def make_groups(tokenizer) -> list[Group]:
    prompt = np.asarray(tokenizer("3+4=")["input_ids"], np.int32)
    digit = tokenizer("7")["input_ids"][0]
    out = []
    for seq, (rewards, lengths) in enumerate(zip(REWARDS, LENGTHS)):
        trajs = [Trajectory(prompt, np.full(n, digit, np.int32), np.full(n, -1.0, np.float32), np.zeros(n, np.int32),
                            reward=r) for r, n in zip(rewards, lengths)]
        out.append(Group("gen", seq, seq, "7", trajs))
    return out


@pytest.fixture
def hub(tiny_world, tmp_path):
    words = [f"hf_checkpoint={tiny_world['model_sft']}", f"prompt_data={tiny_world['train']}",
             "rollout_batch_size=3", "n_samples_per_prompt=3", "max_times_sampled=2", "selector=prioritized",
             "priority_update=abs_advantage", "max_staleness=100", "auth=false"]
    cfg = C.load(None, words)
    cfg_path = tmp_path / "config.yaml"
    C.save(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind",
                             "tcp://127.0.0.1:0", "--endpoint-file", str(tmp_path / "ep"),
                             "--state-dir", str(tmp_path / "hub")], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "ep").exists():
        assert proc.poll() is None and time.time() < deadline, "hub did not start"
        time.sleep(0.05)
    yield cfg, (tmp_path / "ep").read_text(), tmp_path / "hub", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_learner_sends_mean_abs_advantage_and_the_hub_table_holds_it(tiny_world, hub, tmp_path):
    from buffer.durable import DurableLog
    from buffer.hub import Hub
    from learners.torch_learner import TorchLearner

    cfg, endpoint, state_dir, proc = hub
    learner = TorchLearner(cfg, tmp_path / "run", endpoint)
    generator = HubClient(endpoint, "gen")
    for group in make_groups(learner.tokenizer):
        generator.put([group], {}, timeout=30)

    reply = learner.sample()
    groups = [Group.from_wire(g) for g in reply["groups"]]
    assert sorted(g.seq for g in groups) == [0, 1, 2]
    learner.train_step(groups)  # trains, then sends PRIORITY for the three groups
    stats = generator.stats(timeout=10)
    assert stats["priority_updates"] == 3 and stats["priority_updates_unknown"] == 0

    proc.kill()  # SIGKILL: the table comes back from the write-ahead log, priority records included
    proc.wait()
    restored = Hub(cfg, [{"input": "x", "label": "y"}], DurableLog(state_dir))
    held = {key: priority for key, _, priority, _ in restored.state.table.entries()}
    assert set(held) == {("gen", 0), ("gen", 1), ("gen", 2)}  # max_times_sampled=2: still held
    for seq, (rewards, lengths) in enumerate(zip(REWARDS, LENGTHS)):
        assert held[("gen", seq)] == pytest.approx(reference_priority(rewards, lengths), rel=1e-5, abs=1e-6)
    assert len(set(held.values())) == 3 and held[("gen", 2)] == 0.0  # distinct: keys cannot have been mixed up

    # the prioritized selector follows them: the zero-priority group is never drawn
    for probe in range(5):
        replies = restored.handle(b"p", {"type": "SAMPLE", "learner_id": f"probe{probe}", "num_groups": 2, "version": 0})
        batch = [r for _, r in replies if r.get("type") == "BATCH"]
        if not batch:
            break
        assert sorted(g["seq"] for g in batch[0]["groups"]) == [0, 1]


def test_group_priorities_by_dotted_path_and_bad_values_refused():
    groups = [Group("g", s, s, "x", [Trajectory(np.zeros(1, np.int32), np.zeros(2, np.int32), np.zeros(2, np.float32),
                                                np.zeros(2, np.int32))] * 2) for s in range(2)]
    adv = np.array([[1.0, -3.0, 9.0], [2.0, 2.0, 9.0], [0.5, 0.5, 9.0], [-1.0, 1.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert group_priorities("abs_advantage", groups, adv, mask) == [["g", 0, 2.0], ["g", 1, 0.75]]
    got = group_priorities("test_priority_update.max_token", groups, adv, mask)
    assert got == [["g", 0, 2.0], ["g", 1, 1.0]]
    assert group_priorities("none", groups, adv, mask) == []
    with pytest.raises(ValueError, match="finite float >= 0"):
        group_priorities("test_priority_update.negative", groups, adv, mask)
    with pytest.raises(ValueError, match="one row per trajectory"):
        group_priorities("abs_advantage", groups, adv[:3], mask[:3])


def max_token(group, advantages):  # a custom priority_update: max advantage over the group's trained tokens
    return max(float(a.max()) for a in advantages)


def negative(group, advantages):
    return -1.0


@pytest.mark.parametrize("words, needle", [
    (["priority_update=abs_advantage"], "max_times_sampled > 1"),
    (["priority_update=bogus", "max_times_sampled=2"], "buffer.priority_update='bogus'"),
    (["priority_update=a.b-c", "max_times_sampled=2"], "dotted path"),
])
def test_bad_priority_update_config_is_refused_naming_the_fix(words, needle):
    with pytest.raises(C.ConfigError, match=re.escape(needle)):
        C.load(None, words)
    assert C.load(None, ["priority_update=abs_advantage", "max_times_sampled=2"]).buffer.priority_update == "abs_advantage"
