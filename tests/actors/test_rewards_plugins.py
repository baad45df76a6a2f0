"""Contract tests of the reward plug-in points (custom_rm_path, group_rm, reward_key,
custom_reward_post_process_path): the documented signature works, a wrong path or signature fails when
the scorer is built (generator start-up) with an error naming the field, and a plug-in that returns
something other than rewards fails loudly instead of training on a silent 0."""
from __future__ import annotations

import textwrap
import uuid
from dataclasses import replace

import numpy as np
import pytest

from actors.rewards import RewardError, RewardScorer, get_reward_fn, to_scalar
from async_rl import config as config_mod
from async_rl.config import ConfigError
from async_rl.plugins import PluginError
from async_rl.types import Group, Trajectory


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(source) -> name of a fresh importable module holding `source`."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"plug_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name
    return write


def rollout(**fields):
    return replace(config_mod.RolloutConfig(), **fields)


def group_of(texts: list[str], prompt: str = "1+1=") -> Group:
    trajs = [Trajectory(np.zeros(0, np.int32), np.arange(len(t), dtype=np.int32), np.zeros(len(t), np.float32),
                        np.zeros(len(t), np.int32), response_text=t) for t in texts]
    return Group("g0", 0, 0, "2", trajs, prompt_text=prompt)


# ---- custom_rm_path ------------------------------------------------------------------------------
def test_custom_rm_overrides_rm_type(plugin):
    mod = plugin("def score(prompt, response, label):\n    return len(prompt) + len(response) + label\n")
    scorer = RewardScorer(rollout(rm_type="math", custom_rm_path=f"{mod}.score"))
    assert scorer.score("ab", ["x", "yyy"], 10) == ([13.0, 15.0], [None, None])


@pytest.mark.parametrize("path,match", [
    ("nodots", "must be a dotted path"),
    ("no_such_module_xyz.score", "cannot import 'no_such_module_xyz'"),
    ("{mod}.missing", "has no function 'missing'"),
    ("{mod}.two_args", "cannot take 3 positional arguments"),
    ("{mod}.coro", "is an async function"),
])
def test_custom_rm_bad_path_or_signature_fails_at_build(plugin, path, match):
    mod = plugin("""
        def two_args(prompt, response):
            return 0.0
        async def coro(prompt, response, label):
            return 0.0
    """)
    with pytest.raises(PluginError, match=r"rollout\.custom_rm_path=.*" + match):
        RewardScorer(rollout(custom_rm_path=path.format(mod=mod)))


@pytest.mark.parametrize("value,match", [
    ("None", "returned None"), ("'1.0'", "returned '1.0'"), ("float('nan')", "returned nan"),
    ("float('inf')", "returned inf"), ("[1.0]", r"returned \[1.0\]"),
])
def test_custom_rm_returning_a_non_reward_fails_loudly(plugin, value, match):
    mod = plugin(f"def score(prompt, response, label):\n    return {value}\n")
    with pytest.raises(RewardError, match=rf"rollout\.custom_rm_path='{mod}.score': {match}"):
        RewardScorer(rollout(custom_rm_path=f"{mod}.score")).score_one("p", "r", "l")


def test_numeric_kinds_are_rewards(plugin):
    mod = plugin("import numpy as np\ndef score(prompt, response, label):\n"
                 "    return {'i': 2, 'b': True, 'f': np.float32(0.5), 'n': np.int64(3)}[response]\n")
    scorer = RewardScorer(rollout(custom_rm_path=f"{mod}.score"))
    assert scorer.score("p", ["i", "b", "f", "n"], None)[0] == [2.0, 1.0, 0.5, 3.0]


# ---- reward_key ----------------------------------------------------------------------------------
def test_reward_key_picks_the_scalar_and_details_travel_in_meta(plugin):
    mod = plugin("def score(prompt, response, label):\n"
                 "    return {'acc': float(response == label), 'fmt': 0.5, 'pred': response, 'obj': object}\n")
    group = group_of(["2", "3"])
    RewardScorer(rollout(custom_rm_path=f"{mod}.score", reward_key="acc")).apply(group, "2")
    assert [t.reward for t in group.trajectories] == [1.0, 0.0]
    details = group.meta["reward_details"]
    assert [d["pred"] for d in details] == ["2", "3"] and details[0]["fmt"] == 0.5
    assert details[0]["obj"] == str(object)  # made wire-safe
    Group.from_wire(group.to_wire())  # and it still crosses the wire as a plain group


@pytest.mark.parametrize("value,key,expected", [
    ({"reward": 0.3, "score": 0.9}, "", 0.3), ({"score": 0.9}, "", 0.9), ({"acc": 1, "score": 0.9}, "acc", 1.0),
    (0.25, "acc", 0.25),  # a plain number ignores reward_key
])
def test_to_scalar_key_order(value, key, expected):
    assert to_scalar(value, key, "test") == expected


@pytest.mark.parametrize("value,key,match", [
    ({"acc": 1}, "", r"keys \['acc'\]; set rollout.reward_key"),
    ({"acc": 1}, "score", r"rollout.reward_key='score' is not one of"),
    ({"score": None}, "", r"\(entry 'score'\): returned None"),
])
def test_to_scalar_errors_name_reward_key(value, key, match):
    with pytest.raises(RewardError, match=match):
        to_scalar(value, key, "test")


def test_get_reward_fn_keeps_its_scalar_contract():
    """evaluate.py calls get_reward_fn(rm_type, custom_rm_path) and averages floats."""
    assert get_reward_fn("dapo", "")("", "Answer: 3", "3") == 1.0
    with pytest.raises(PluginError, match=r"rollout.rm_type='nope': must be one of"):
        get_reward_fn("nope")


# ---- group_rm ------------------------------------------------------------------------------------
def test_group_rm_scores_all_responses_in_one_call(plugin):
    mod = plugin("""
        calls = []
        def rank(prompt, responses, label):
            calls.append(len(responses))
            order = sorted(responses, key=len)
            return [order.index(r) / (len(responses) - 1) for r in responses]
    """)
    scorer = RewardScorer(rollout(custom_rm_path=f"{mod}.rank", group_rm=True))
    group = group_of(["ccc", "a", "bb"])
    scorer.apply(group, None)
    assert [t.reward for t in group.trajectories] == [1.0, 0.0, 0.5]
    assert __import__(mod).calls == [3]


@pytest.mark.parametrize("body,match", [
    ("return [1.0]", "returned 1 values; expected a list of 3 rewards"),
    ("return 1.0", "returned 1.0; expected a list of 3 rewards"),
    ("return [1.0, None, 2.0]", "returned None"),
])
def test_group_rm_wrong_result_fails_loudly(plugin, body, match):
    mod = plugin(f"def rank(prompt, responses, label):\n    {body}\n")
    with pytest.raises(RewardError, match=match):
        RewardScorer(rollout(custom_rm_path=f"{mod}.rank", group_rm=True)).apply(group_of(["a", "b", "c"]), None)


def test_group_rm_needs_custom_rm_path():
    with pytest.raises(PluginError, match="rollout.group_rm=true: needs rollout.custom_rm_path"):
        RewardScorer(rollout(group_rm=True))
    with pytest.raises(ConfigError, match="rollout.group_rm=true: needs rollout.custom_rm_path"):
        config_mod.load(overrides=["group_rm=true"])


# ---- custom_reward_post_process_path ---------------------------------------------------------------
def test_post_process_sees_rewards_and_group_and_raw_rewards_are_kept(plugin):
    mod = plugin("""
        def length_penalty(rewards, group):
            return [r - 0.1 * len(t.response_ids) for r, t in zip(rewards, group.trajectories)]
    """)
    scorer = RewardScorer(rollout(rm_type="exact_match", custom_reward_post_process_path=f"{mod}.length_penalty"))
    group = group_of(["2", "22", "3"])
    scorer.apply(group, "2")
    assert [t.reward for t in group.trajectories] == pytest.approx([0.9, -0.2, -0.1])
    assert group.meta["raw_rewards"] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("source,match", [
    ("def post(rewards):\n    return rewards\n", "cannot take 2 positional arguments"),
    ("x = 1\n", "has no function 'post'"),
])
def test_post_process_bad_signature_fails_at_build(plugin, source, match):
    mod = plugin(source)
    with pytest.raises(PluginError, match=rf"rollout\.custom_reward_post_process_path=.{mod}.post.: .*{match}"):
        RewardScorer(rollout(custom_reward_post_process_path=f"{mod}.post"))


def test_post_process_wrong_length_fails_loudly(plugin):
    mod = plugin("def post(rewards, group):\n    return rewards[:1]\n")
    scorer = RewardScorer(rollout(custom_reward_post_process_path=f"{mod}.post"))
    with pytest.raises(RewardError, match="custom_reward_post_process_path=.*returned 1 values; expected .* 2"):
        scorer.apply(group_of(["a", "b"]), "a")


@pytest.mark.parametrize("field", ["custom_rm_path", "custom_reward_post_process_path",
                                   "dynamic_sampling_filter_path"])
def test_config_rejects_a_path_that_is_not_dotted(field):
    with pytest.raises(ConfigError, match=rf"rollout.{field}='my rewards.py': must be a dotted path"):
        config_mod.load(overrides=[f"{field}=my rewards.py"])
