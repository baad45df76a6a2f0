"""custom_generate_function_path: the built-in calculator tool example against a real embedded engine.

Checks the plug-in contract: tool output is in the response but masked out of the loss (loss_mask 0 exactly
on the calculator's tokens), the model's turns are what the engine generates from the context at that point,
and a bad plug-in fails naming the field."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from actors.custom_generate import CustomGenerateError, run_custom_generate
from actors.tools import calculate, calculator_generate, tool_call
from tests.actors import engine_servers as servers

PROMPTS = [f"{a}+{b}" for a in range(0, 12) for b in (3, 7)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    ckpt = servers.build_checkpoint(root / "a", seed=0)
    proc, client = servers.start("embedded", ckpt, root / "engine.log")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    yield {"client": client, "tok": tok}
    servers.stop(proc)


def fake_generator(tok, path="actors.tools.calculator_generate", max_new_tokens=24):
    cfg = SimpleNamespace(rollout=SimpleNamespace(mask_offpolicy_in_partial_rollout=False,
                                                  custom_generate_function_path=path))
    return SimpleNamespace(cfg=cfg, tokenizer=tok,
                           sampling_params=lambda: {"temperature": 0, "max_new_tokens": max_new_tokens})


def test_calculator():
    assert calculate("245*8") == 1960 and calculate("2+3*4") == 14 and calculate("-3+1") == -2
    assert calculate("2**8") is None and calculate("import os") is None and calculate("") is None
    assert tool_call("12*3=") == 36 and tool_call("12*3") is None and tool_call("+=") is None


def test_calculator_tool_output_is_masked_out(world):
    tok, client = world["tok"], world["client"]
    trajs = run_custom_generate(calculator_generate, fake_generator(tok), client, [{"input": p} for p in PROMPTS], 1)
    calls = 0
    for prompt, t in zip(PROMPTS, trajs):
        ids, mask = t.response_ids.tolist(), t.loss_mask.tolist()
        assert len(ids) <= 24 and len(mask) == len(ids) == len(t.rollout_logprobs) == len(t.token_versions)
        assert t.prompt_ids.tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
        assert all(lp == 0.0 for lp, m in zip(t.rollout_logprobs, mask) if not m)
        pos = 0
        while 0 in mask[pos:]:  # every masked span is the calculator's answer to the model text before it
            start = mask.index(0, pos)
            end = mask.index(1, start) if 1 in mask[start:] else len(mask)
            turn = tok.decode(ids[pos:start], skip_special_tokens=True)  # the model turn the tool answered (it starts after the last one)
            assert turn.endswith("=")
            expected = f"{tool_call(turn)} "
            assert tok.decode(ids[start:end]) == expected[:end - start]
            # the model's next turn is the engine's greedy continuation of everything so far
            if end < len(ids):
                nxt = client.generate([t.prompt_ids.tolist() + ids[:end]], {"temperature": 0, "max_new_tokens": 1})
                assert nxt[0].output_ids[0] == ids[end]
            calls, pos = calls + 1, end
    assert calls >= 2, "the fixture model should call the calculator for some of these prompts"


def test_bad_custom_generate_names_the_field(world):
    async def no_mask(ctx, prompt):
        t = await ctx.generate(ctx.encode(prompt["input"]))
        traj = ctx.trajectory(ctx.encode(prompt["input"]), [t])
        traj.loss_mask = None
        return traj
    with pytest.raises(CustomGenerateError, match="custom_generate_function_path.*loss_mask"):
        run_custom_generate(no_mask, fake_generator(world["tok"], "mypkg.no_mask"), world["client"],
                            [{"input": "1+2"}], 1)
    np.testing.assert_equal(calculate("7*6"), 42)
