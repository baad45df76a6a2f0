"""HF <-> Megatron conversion. The reference is the HF model itself: a megatron-core GPTModel loaded with
converted weights must give the HF model's logits (float32, max |diff| <= 1e-4; measured 0 at TP=1 and
PP=2, <= 3e-7 at TP=2, where row-parallel partial sums are added in another order) on right-padded rows, for
tiny Qwen2 (qkv bias, tied embeddings), Llama (untied) and Qwen3 (QK norm, head_dim != hidden/heads)
configs with an odd vocabulary (padded shards), at TP=1, TP=2 and PP=2; gathering the shards back gives
the HF state dict bit for bit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mp_workers  # tests/learners/megatron/mp_workers.py
from learners.megatron.convert import hf_to_mcore, mcore_to_hf, merge_tp, split_tp
from learners.megatron.model import shape_from_hf

TOL = 1e-4
FAMILIES = ("qwen2", "llama", "qwen3")


def hf_model(family: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=37, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    cfg, cls = {
        "qwen2": (lambda: Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM),
        "llama": (lambda: LlamaConfig(**common, tie_word_embeddings=False, rope_theta=5e5), LlamaForCausalLM),
        "qwen3": (lambda: Qwen3Config(**common, head_dim=24, tie_word_embeddings=True), Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = cls(cfg()).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb so a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def train_section(tp=1, pp=1):
    return SimpleNamespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=1,
                           sequence_parallel=False, seed=1, recompute_granularity="", recompute_method="",
                           recompute_num_layers=0, distributed_timeout_minutes=10.0)  # train.* defaults


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_conversion_round_trips_exactly(family, tp):
    hf = hf_model(family)
    sd = hf.state_dict()
    shape = shape_from_hf(hf.config, 2)
    full = hf_to_mcore(sd, shape)
    full = {k: merge_tp(k, split_tp(k, v, tp)) for k, v in full.items()}
    back = mcore_to_hf(full, shape)
    assert set(back) == set(sd) - ({"lm_head.weight"} if shape.tied else set())
    assert all(torch.equal(back[k], sd[k]) for k in back)


def _pipeline_logits(model, ids, shape):
    """Forward through PP stages by hand (send/recv of the hidden states); logits on the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from learners.megatron.model import forward_logits

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return forward_logits(model, ids, shape.vocab)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    if ps.is_pipeline_first_stage():
        hidden = model(input_ids=ids, position_ids=pos, attention_mask=None)
        dist.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    hidden = torch.empty(ids.shape[1], ids.shape[0], shape.hidden)
    dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(hidden)
    return forward_logits(model, ids, shape.vocab)


def _check_families(tp: int, pp: int) -> dict:
    from learners.megatron import model as M
    from learners.megatron import parallel, weights

    layout = parallel.init(train_section(tp, pp))
    out = {}
    for family in FAMILIES:
        hf = hf_model(family)
        shape = M.shape_from_hf(hf.config, tp)
        model = M.build_stage(shape, M.transformer_config(shape, train_section(tp, pp), torch.float32)).eval()
        weights.load_hf(model, hf.state_dict(), shape, layout.tp_rank, tp)
        torch.manual_seed(1)
        ids = torch.randint(0, shape.vocab, (3, 13))
        attention = torch.ones_like(ids)
        attention[1, 9:] = 0  # a right-padded row: real positions must not see the pads
        with torch.no_grad():
            logits = _pipeline_logits(model, ids, shape)
            ref = hf(input_ids=ids, attention_mask=attention).logits[:, :-1]
        valid = attention[:, 1:].bool()
        diff = None if logits is None else float((logits - ref)[valid].abs().max())
        back = weights.gather_hf(model, shape, layout)
        exact = None
        if back is not None:
            sd = {k: v for k, v in hf.state_dict().items() if not (shape.tied and k == "lm_head.weight")}
            exact = set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        out[family] = {"diff": diff, "exact": exact}
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_megatron_logits_equal_hf_logits(tp, pp):
    results = mp_workers.run(tp * pp, _check_families, tp, pp)
    for rank, res in enumerate(results):
        for family, r in res.items():
            if r["diff"] is not None:
                assert r["diff"] <= TOL, (rank, family, r)
            if r["exact"] is not None:
                assert r["exact"], (rank, family, "gathered weights differ from the HF state dict")
    assert all(r["exact"] for r in results[0].values())  # rank 0 gathered every family
    assert all(r["diff"] is not None for r in results[-1].values())  # the last stage computed logits
