"""The static-KV-cache engine path (actors/engine/static.py) against the dynamic HF-cache path and
independent references, on CPU.

CUDA graphs cannot run here (no GPU): these tests run the same static-path code eagerly; the graph replay
is exercised by `scripts/bench_engines.py --device cuda` on the GPU machine, which also checks its greedy
tokens against this eager path. Tolerance: logprobs within 1e-4 (fp32; the two paths differ only in
attention arithmetic order, ~1e-6 observed).
"""
from __future__ import annotations

import math

import pytest
import torch

from actors.engine import static as engine_static
from actors.engine.model import Engine
from actors.engine.protocol import Request, SamplingParams, Sequence
from tests.actors.engine_servers import build_checkpoint, reference_logprobs

ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    return {"a": build_checkpoint(root / "a", seed=0), "b": build_checkpoint(root / "b", seed=1),
            "root": root}


@pytest.fixture(scope="module")
def engines(ckpts):
    torch.set_num_threads(1)
    return {kind: Engine(str(ckpts["a"]), 0, kv_cache=kind, max_batch_size=8) for kind in ("dynamic", "static")}


def make_seqs(prompts, news, temperature=0.0, top_k=-1, top_p=1.0, seed=None) -> list[Sequence]:
    request = Request()
    for i, (prompt, new) in enumerate(zip(prompts, news)):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=new,
                                ignore_eos=True)
        gen = None if seed is None else torch.Generator().manual_seed(seed + i)
        request.sequences.append(Sequence(list(prompt), params, f"r{i}", request, generator=gen))
    return request.sequences


def drive(engine: Engine, arrivals: dict[int, list[Sequence]], swap_at: int | None = None, swap_path=None,
          max_batch: int = 8) -> None:
    """The scheduler's loop in miniature: admit (prefill + merge) the sequences arriving at each step, swap
    weights at `swap_at` (between steps), then one decode step; until every sequence finished."""
    batch, waiting, step = None, [], 0
    pending = sum(len(v) for v in arrivals.values())
    while step <= max(arrivals) or waiting or batch is not None:
        waiting += arrivals.get(step, [])
        if step == swap_at:
            ok, message = engine.load_weights(str(swap_path), "1")
            assert ok, message
        room = max_batch - (len(batch) if batch else 0)
        if waiting and room > 0:
            admitted, waiting = waiting[:room], waiting[room:]
            new, _ = engine.prefill(admitted)
            if new is not None:
                if batch is None:
                    batch = new
                else:
                    batch.merge(new)
        if batch is not None:
            batch, _ = engine.step(batch)
        step += 1
        assert step < 500
    assert pending == sum(len(v) for v in arrivals.values())


PROMPTS = [[5, 6, 7], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 4, 5, 6], [8, 8], [3, 12, 13, 14, 5],
           [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 4], [18], [4, 17, 6, 15]]
NEWS = [6, 14, 3, 20, 9, 5, 11, 4]


def scenario(swap: bool):
    """Rows of different lengths finishing at different steps (select), later arrivals both shorter and
    longer than the running batch's width (merge both ways), an optional weight swap mid-generation."""
    def run(engine, ckpts):
        seqs = make_seqs(PROMPTS, NEWS)
        drive(engine, {0: seqs[:3], 2: seqs[3:5], 4: seqs[5:7], 9: seqs[7:]}, swap_at=6 if swap else None,
              swap_path=ckpts["b"])
        engine.load_weights(str(ckpts["a"]), "0")
        return seqs
    return run


@pytest.mark.parametrize("column_block", [128, 4])
@pytest.mark.parametrize("swap", [False, True])
def test_static_matches_dynamic_greedy(engines, ckpts, monkeypatch, swap, column_block):
    """column_block=4 makes the arena start small, so it trims and regrows mid-generation."""
    monkeypatch.setattr(engine_static, "COLUMN_BLOCK", column_block)
    engines["static"].static.arena, engines["static"].static.graphs = None, {}
    dynamic = scenario(swap)(engines["dynamic"], ckpts)
    static = scenario(swap)(engines["static"], ckpts)
    for d, s in zip(dynamic, static):
        assert len(s.output_ids) == s.params.max_new_tokens
        assert s.output_ids == d.output_ids
        assert s.token_versions == d.token_versions
        torch.testing.assert_close(torch.tensor(s.output_logprobs), torch.tensor(d.output_logprobs),
                                   atol=ATOL, rtol=0)
    if swap:  # the swap landed mid-generation: some sequence carries both versions
        assert any(0 in s.token_versions and 1 in s.token_versions for s in static)
    if column_block == 4:
        assert engines["static"].static.arena.cols > 4 * math.ceil((len(PROMPTS[0]) + NEWS[0] + 1) / 4)


def test_static_batched_matches_one_at_a_time(engines, ckpts):
    """Batching is invisible: each sequence alone on the dynamic path gives the same tokens and logprobs."""
    static = scenario(False)(engines["static"], ckpts)
    for prompt, new, s in zip(PROMPTS, NEWS, static):
        alone = make_seqs([prompt], [new])
        drive(engines["dynamic"], {0: alone})
        assert s.output_ids == alone[0].output_ids
        torch.testing.assert_close(torch.tensor(s.output_logprobs), torch.tensor(alone[0].output_logprobs),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8), (1.0, 3, 0.9)])
def test_static_sampled_logprobs_match_recomputation(engines, temperature, top_k, top_p):
    engine = engines["static"]
    seqs = make_seqs(PROMPTS[:5], [12] * 5, temperature, top_k, top_p)
    drive(engine, {0: seqs[:3], 3: seqs[3:]})
    for s in seqs:
        expected = reference_logprobs(engine.model, s.prompt_ids, s.output_ids, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(s.output_logprobs), expected, atol=ATOL, rtol=0)
        if top_k > 0:  # a sampled token outside the top-k would have logprob -inf
            assert all(math.isfinite(lp) for lp in s.output_logprobs)


def test_seeded_sampling_matches_dynamic_path(engines):
    """sampling_seed rows draw from their own generator on both paths: the same tokens."""
    runs = {}
    for kind, engine in engines.items():
        seqs = make_seqs(PROMPTS[:4], [10] * 4, temperature=1.0, seed=11)
        drive(engine, {0: seqs[:2], 2: seqs[2:]})
        runs[kind] = seqs
    for d, s in zip(runs["dynamic"], runs["static"]):
        assert s.output_ids == d.output_ids
        torch.testing.assert_close(torch.tensor(s.output_logprobs), torch.tensor(d.output_logprobs),
                                   atol=ATOL, rtol=0)


def test_exponential_race_samples_the_distribution():
    """`sample` draws token i with probability p_i (chi-square against the expected counts)."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 40_000
    logprobs = probs.log().expand(n, -1).contiguous()
    tokens, chosen = engine_static.sample(logprobs, torch.ones(n))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[4] == 0
    expected = probs[:4].double() * n
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom
    torch.testing.assert_close(chosen, logprobs.gather(1, tokens[:, None]).squeeze(1))
    greedy, _ = engine_static.sample(logprobs[:3], torch.zeros(3))
    assert greedy.tolist() == [0, 0, 0]


def test_bad_engine_options_name_the_value(ckpts):
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        Engine(str(ckpts["a"]), 0, kv_cache="paged")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        Engine(str(ckpts["a"]), 0, dtype="fp8")


def test_auto_keeps_the_dynamic_path_on_cpu(ckpts):
    engine = Engine(str(ckpts["a"]), 0)
    assert engine.static is None and next(engine.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("word, needle", [("engine_kv_cache=paged", "rollout.engine_kv_cache='paged': must be one of"),
                                          ("engine_dtype=fp8", "rollout.engine_dtype='fp8': must be one of")])
def test_engine_knobs_are_validated(word, needle):
    from async_rl import config as C

    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        C.load(None, [word])


def test_server_with_static_cache_matches_hf_greedy(ckpts):
    """The real server process on the static path (`--kv-cache static`): a batch of prompts of different
    lengths gives HF `generate`'s greedy tokens for each, with the logprobs of a full forward pass."""
    from transformers import AutoModelForCausalLM

    from tests.actors import engine_servers as servers

    model = AutoModelForCausalLM.from_pretrained(str(ckpts["a"]), dtype=torch.float32).eval()
    proc, client = servers.start("embedded", ckpts["a"], ckpts["root"] / "static_server.log",
                                 "--kv-cache", "static", "--max-batch-size", "4")
    try:
        prompts = PROMPTS[:5]
        results = client.generate(prompts, {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    finally:
        servers.stop(proc)
    for prompt, res in zip(prompts, results):
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert res.output_ids == expected
        torch.testing.assert_close(torch.tensor(res.output_logprobs),
                                   reference_logprobs(model, prompt, expected, 1.0, -1, 1.0), atol=ATOL, rtol=0)


def test_weight_loads_copy_into_the_same_storage(engines, ckpts):
    """Captured CUDA graphs read parameters by address: a weight load must change values, never storage."""
    engine = engines["static"]
    before = {k: (v.data_ptr(), v.clone()) for k, v in engine.model.state_dict().items()}
    ok, message = engine.load_weights(str(ckpts["b"]), "5")
    assert ok, message
    after = engine.model.state_dict()
    assert all(after[k].data_ptr() == ptr for k, (ptr, _) in before.items())
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"][1])
    name = "model.layers.0.mlp.up_proj.weight"
    ok, message = engine.load_named_tensors({name: torch.zeros_like(after[name])}, "6")
    assert ok and after[name].data_ptr() == before[name][0] and not after[name].any()
    assert engine.load_weights(str(ckpts["a"]), "0")[0]
    assert all(torch.equal(after[k], v) for k, (_, v) in before.items())


def test_a_displaced_batch_cannot_be_used(engines):
    """After a retract drops the running batch, a new batch takes the arena; the old one refuses to step."""
    engine = engines["static"]
    old, _ = engine.prefill(make_seqs(PROMPTS[:2], [10, 10]))
    old, _ = engine.step(old)
    new, _ = engine.prefill(make_seqs(PROMPTS[2:4], [10, 10]))
    engine.step(new)
    with pytest.raises(RuntimeError, match="no longer owns the arena"):
        engine.step(old)
