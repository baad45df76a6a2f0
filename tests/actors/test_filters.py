"""Sampling filters: the built-in "reward std > 0" filter on hand-made groups, the plug-in contract of
dynamic_sampling_filter_path, and a generator against a real hub process and a real engine process: groups
the filter drops are never sent, each one is reported by DROP, and the hub gets their credits back."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from actors.filters import FilterError, GroupFilter, reward_std_positive
from async_rl import config as config_mod
from async_rl import tiny
from async_rl.config import ConfigError
from async_rl.plugins import PluginError
from async_rl.types import Group, Trajectory

ROOT = Path(__file__).resolve().parents[2]
STD_FILTER = "actors.filters.reward_std_positive"


def group_with(rewards: list[float]) -> Group:
    one = np.zeros(1, np.int32)
    trajs = [Trajectory(one, one, one.astype(np.float32), one, reward=r) for r in rewards]
    return Group("g0", 0, 0, "", trajs)


@pytest.mark.parametrize("rewards,keep", [
    ([1.0, 1.0, 1.0, 1.0], False), ([0.0, 0.0], False), ([-1.0, -1.0, -1.0], False),
    ([0.0, 1.0], True), ([1.0, 1.0, 1.0, 0.0], True), ([-1.0, 1.0], True), ([0.0, 0.0, 0.0, 1e-3], True),
    ([0.3, 0.1 + 0.2], False),        # float noise is not signal
    ([1.0, 1.0 + 1e-9], False), ([1.0], False),
])
def test_reward_std_positive(rewards, keep):
    assert reward_std_positive(group_with(rewards)) is keep


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"filt_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name
    return write


def test_no_filter_keeps_everything():
    assert GroupFilter("").keep(group_with([1.0, 1.0]))


def test_builtin_filter_by_path():
    f = GroupFilter(STD_FILTER)
    assert not f.keep(group_with([1.0, 1.0])) and f.keep(group_with([0.0, 1.0]))


def test_custom_filter_sees_the_group(plugin):
    mod = plugin("""
        import numpy as np
        def long_enough(group):
            return np.bool_(all(len(t.response_ids) >= 1 for t in group.trajectories) and group.label != "skip")
    """)
    f = GroupFilter(f"{mod}.long_enough")
    assert f.keep(group_with([1.0]))
    skip = group_with([1.0])
    skip.label = "skip"
    assert not f.keep(skip)


@pytest.mark.parametrize("path,match", [
    ("{mod}.two", "cannot take 1 positional arguments"), ("{mod}.nope", "has no function 'nope'"),
    ("missing_mod_xyz.keep", "cannot import"),
])
def test_bad_filter_path_fails_at_build(plugin, path, match):
    mod = plugin("def two(group, extra):\n    return True\n")
    with pytest.raises(PluginError, match=r"rollout\.dynamic_sampling_filter_path=.*" + match):
        GroupFilter(path.format(mod=mod))


@pytest.mark.parametrize("value", ["None", "1", "{'keep': False}", "'yes'"])
def test_filter_must_answer_a_bool(plugin, value):
    mod = plugin(f"def f(group):\n    return {value}\n")
    with pytest.raises(FilterError, match=r"dynamic_sampling_filter_path=.*must return True .* or False"):
        GroupFilter(f"{mod}.f").keep(group_with([1.0]))


def test_config_rules_for_filters():
    with pytest.raises(ConfigError, match="n_samples_per_prompt=1 every group has zero reward std"):
        config_mod.load(overrides=[f"dynamic_sampling_filter_path={STD_FILTER}", "n_samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="over_sampling_batch_size=-1: must be >= 0"):
        config_mod.load(overrides=["over_sampling_batch_size=-1"])


# ---- a generator between a real hub and a real engine --------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        assert proc.poll() is None, f"hub exited early with code {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError(f"no {path} after {timeout}s")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A tiny model, 8 prompts labelled 0..7, and a group rm that gives even labels a flat group."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "parity_rm.py").write_text(
        "def score(prompt, responses, label):\n"
        "    return [1.0] * len(responses) if int(label) % 2 == 0 else [float(i) for i in range(len(responses))]\n")
    tiny.build_model(tmp_path / "model", seed=0)
    tiny.write_jsonl([{"input": f"{i}+0=", "label": str(i)} for i in range(8)], tmp_path / "prompts.jsonl")
    cfg = config_mod.load(overrides=[
        f"hf_checkpoint={tmp_path / 'model'}", f"prompt_data={tmp_path / 'prompts.jsonl'}", "rollout_shuffle=false",
        "rollout_batch_size=4", "n_samples_per_prompt=3", "num_rollout=2", "rollout_max_response_len=2",
        "groups_per_engine_call=2", "over_sampling_batch_size=4", "custom_rm_path=parity_rm.score", "group_rm=true",
        f"dynamic_sampling_filter_path={STD_FILTER}"])
    config_mod.save(cfg, tmp_path / "config.yaml")
    procs = []
    port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "actors.engine.server", "--model-path", str(tmp_path / "model"), "--host",
         "127.0.0.1", "--port", str(port), "--num-threads", "1"], cwd=ROOT,
        stdout=open(tmp_path / "engine.log", "w"), stderr=subprocess.STDOUT))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "buffer.service", "--config", str(tmp_path / "config.yaml"), "--endpoint-file",
         str(tmp_path / "hub.endpoint")], cwd=ROOT, stdout=open(tmp_path / "hub.log", "w"), stderr=subprocess.STDOUT))
    yield {"cfg": cfg, "engine_url": f"http://127.0.0.1:{port}",
           "hub": wait_for(tmp_path / "hub.endpoint", procs[1]), "procs": procs}
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_generator_drops_flat_groups_and_the_hub_gets_their_credits_back(world):
    from actors.engine_client import EngineClient
    from actors.generator import Generator

    EngineClient(world["engine_url"]).wait_ready(60, proc=world["procs"][0])
    gen = Generator(world["cfg"], "g0", world["hub"], world["engine_url"])
    assert gen.acquire_max_groups == 4  # over_sampling_batch_size, not groups_per_engine_call
    assert gen.generator_id.startswith("g0-")  # an incarnation id: a restart never reuses old keys
    grant = gen.hub.request({"type": "ACQUIRE", "generator_id": gen.generator_id, "acquire_seq": 0,
                             "max_groups": gen.acquire_max_groups}, timeout=30)
    assert [p["label"] for p in grant["prompts"]] == ["0", "1", "2", "3"]
    credits_before = gen.hub.stats()["credits_available"]

    kept, busy, tokens = gen.generate_groups(grant["prompts"])

    assert [g.label for g in kept] == ["1", "3"]  # even labels scored flat and were dropped
    assert all([t.reward for t in g.trajectories] == [0.0, 1.0, 2.0] for g in kept)
    assert tokens == sum(len(t.response_ids) for g in kept for t in g.trajectories) and busy >= 0
    assert gen.dropped_groups == 2
    stats = gen.hub.stats()
    assert stats["dropped_filtered"] == 2
    assert stats["credits_available"] == credits_before + 2
    for group in kept:
        gen.hub.put([group], {"gen_tokens": 0, "busy_s": 0.0}, timeout=30)
    assert gen.hub.stats()["accepted"] == 2
