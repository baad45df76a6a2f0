"""slime's rollout_max_context_len and eval_function_path against a real embedded engine.

rollout_max_context_len: every request's response budget is cut so prompt + response fits (rollout and evals),
prompts that leave no room are dropped at load, and a prompt limit above it is refused. eval_function_path:
evals generate through the named per-sample function, else through rollout.custom_generate_function_path,
else plainly."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from actors import rollout
from actors.evaluate import score_samples
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from tests.actors import engine_servers as servers

LONG = {"max_new_tokens": 40, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    ckpt = servers.build_checkpoint(root / "a", seed=0)
    proc, client = servers.start("embedded", ckpt, root / "engine.log")
    yield {"client": client, "tok": AutoTokenizer.from_pretrained(str(ckpt)), "ckpt": ckpt, "root": root}
    servers.stop(proc)


def _cfg(world, *words):
    return config_mod.load(None, [f"hf_checkpoint={world['ckpt']}", *words])


def test_context_limit_cuts_each_response_to_what_its_prompt_leaves(world):
    prompts = [[5, 6, 7, 8, 9], [5, 6]]
    cut = rollout.generate_samples(world["client"], prompts, LONG, True, max_context_len=12)
    assert [len(s.output_ids) for s in cut] == [7, 10] and {s.finish_reason for s in cut} == {"length"}
    whole = rollout.generate_samples(world["client"], prompts, LONG, True)  # no limit: max_new_tokens alone
    assert [len(s.output_ids) for s in whole] == [40, 40]
    assert cut[0].output_ids == whole[0].output_ids[:7]  # the same greedy tokens, cut


def test_context_limit_defaults_the_prompt_limit_and_refuses_one_above_it(world):
    cfg = _cfg(world, "rollout_max_context_len=12")
    assert cfg.data.rollout_max_prompt_len == 11  # slime's default: room for one response token
    assert _cfg(world, "rollout_max_context_len=12", "rollout_max_prompt_len=6").data.rollout_max_prompt_len == 6
    with pytest.raises(config_mod.ConfigError, match=r"rollout_max_prompt_len=12: must be at most .* = 11"):
        _cfg(world, "rollout_max_context_len=12", "rollout_max_prompt_len=12")
    assert _cfg(world).data.rollout_max_prompt_len == 0  # off: nothing derived


def test_context_limit_cuts_eval_responses(world, tmp_path, monkeypatch):
    (tmp_path / "length_rm.py").write_text("def score(prompt, response, label):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = [{"input": "12+3=", "label": "15"}, {"input": "1+2=", "label": "3"}]
    ids = [world["tok"](p["input"])["input_ids"] for p in prompts]

    def text_lens(max_context_len):  # the greedy responses, cut by the rollout's rule, as the reward sees them
        samples = rollout.generate_samples(world["client"], ids, LONG, True, max_context_len=max_context_len)
        return [[float(len(world["tok"].decode(s.output_ids, skip_special_tokens=True)))] for s in samples]

    def rewards(*words):
        cfg = _cfg(world, "custom_rm_path=length_rm.score", *words)
        return score_samples(cfg, world["client"], world["tok"], RewardScorer(cfg.rollout), prompts, LONG, 1)
    assert rewards("rollout_max_context_len=16") == text_lens(16) != text_lens(0) == rewards()


def test_prompts_that_leave_no_room_are_dropped_at_load(world, tmp_path):
    from async_rl.data import load_prompt_data
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input": text, "label": "x"}) + "\n" for text in ("1+2=", "11+22+33=")))
    cfg = _cfg(world, "rollout_max_context_len=6")
    assert [p["input"] for p in load_prompt_data(cfg.data, str(world["ckpt"]), str(path))] == ["1+2="]


EVAL_FN = """
import numpy as np
from async_rl.types import Trajectory
CALLS = []

async def answer(ctx, prompt):
    CALLS.append((prompt["input"], ctx.sampling_params["max_new_tokens"]))
    ids = ctx.encode(prompt["label"])
    return Trajectory(np.asarray(ctx.encode(prompt["input"]), np.int32), np.asarray(ids, np.int32),
                      np.zeros(len(ids), np.float32), np.zeros(len(ids), np.int32), finish_reason="stop",
                      response_text=prompt["label"], loss_mask=np.zeros(len(ids), np.uint8))
"""


def test_evals_generate_through_the_eval_function_else_the_rollouts(world, tmp_path, monkeypatch):
    (tmp_path / "oracle.py").write_text(EVAL_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import oracle
    prompts = [{"input": "12+3=", "label": "15"}, {"input": "1+2=", "label": "3"}]
    params = {"temperature": 0.0, "max_new_tokens": 3}

    def rewards(*words):
        cfg = _cfg(world, *words)
        return score_samples(cfg, world["client"], world["tok"], RewardScorer(cfg.rollout), prompts, params, 2)
    assert rewards("eval_function_path=oracle.answer") == [[1.0, 1.0], [1.0, 1.0]]  # it answers with the label
    assert oracle.CALLS == [("12+3=", 3)] * 2 + [("1+2=", 3)] * 2  # n per prompt, with the eval's params
    oracle.CALLS.clear()
    assert rewards("custom_generate_function_path=oracle.answer") == [[1.0, 1.0], [1.0, 1.0]]  # slime's default
    assert len(oracle.CALLS) == 4
    oracle.CALLS.clear()
    assert rewards() != [[1.0, 1.0], [1.0, 1.0]] and not oracle.CALLS  # plain generation: a random model
    with pytest.raises(config_mod.ConfigError, match="eval.eval_function_path='oracle'"):
        _cfg(world, "eval_function_path=oracle")
