"""HF <-> Megatron (local layer spec) weight conversion, as pure functions over state dicts.

Invariant: `mcore_to_hf(hf_to_mcore(sd)) == sd` and `merge_tp(split_tp(t)) == t`, exactly, for every
tensor; the Megatron side is laid out so that a GPTModel built by `learners.megatron.model` computes the
HF model's function (checked by logits equality in tests/learners/megatron/test_convert.py).

Layout of a full (unsharded) Megatron tensor, layers by global index:
- `linear_qkv`: per KV group g: the group's query heads, then k_g, then v_g (GQA interleave), so a TP shard
  is a contiguous run of whole groups. Naive cat(q, k, v) is wrong (logits off by ~24).
- `linear_fc1`: cat(gate, up) *per TP shard*: shard r is cat(gate_r, up_r).
- vocabulary rows (embedding, output layer) padded with zeros to `Shape.padded_vocab`.
Column-parallel tensors split on dim 0, row-parallel (`linear_proj`, `linear_fc2`) on dim 1, norms are
replicated.
"""
from __future__ import annotations

import re

import torch

from learners.megatron.model import Shape

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# per-layer name pairs (megatron suffix, HF suffix) that map one to one
_SIMPLE = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
]
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
                    "embedding.word_embeddings.weight", "output_layer.weight")


def _pad_vocab(t: torch.Tensor, s: Shape) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(s.padded_vocab - t.shape[0], *t.shape[1:])]) if s.padded_vocab > t.shape[0] else t


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> megatron's per-group [q.., k, v] rows."""
    per_group = s.heads // s.kv_heads
    tail = q.shape[1:]
    q = q.reshape(s.kv_heads, per_group * s.head_dim, *tail)
    k = k.reshape(s.kv_heads, s.head_dim, *tail)
    v = v.reshape(s.kv_heads, s.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = s.heads // s.kv_heads
    tail = qkv.shape[1:]
    grouped = qkv.reshape(s.kv_heads, (per_group + 2) * s.head_dim, *tail)
    q, k, v = grouped.split([per_group * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_mcore(hf: dict[str, torch.Tensor], s: Shape) -> dict[str, torch.Tensor]:
    """Full Megatron state dict (global layer indices, fc1 as cat(gate, up) unsharded) from an HF one."""
    out = {"embedding.word_embeddings.weight": _pad_vocab(hf["model.embed_tokens.weight"], s),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not s.tied:
        out["output_layer.weight"] = _pad_vocab(hf["lm_head.weight"], s)
    for i in range(s.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for m_name, h_name in _SIMPLE:
            if src + h_name in hf:
                out[dst + m_name] = hf[src + h_name]
        out[dst + "self_attention.linear_qkv.weight"] = interleave_qkv(
            *(hf[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"), s)
        if s.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = interleave_qkv(
                *(hf[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"), s)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                        hf[src + "mlp.up_proj.weight"]])
    return out


def mcore_to_hf(m: dict[str, torch.Tensor], s: Shape) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_mcore` (vocabulary padding dropped; lm_head left out when tied)."""
    out = {"model.embed_tokens.weight": m["embedding.word_embeddings.weight"][:s.vocab],
           "model.norm.weight": m["decoder.final_layernorm.weight"]}
    if not s.tied:
        out["lm_head.weight"] = m["output_layer.weight"][:s.vocab]
    for i in range(s.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m_name, h_name in _SIMPLE:
            if src + m_name in m:
                out[dst + h_name] = m[src + m_name]
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            q, k, v = split_qkv(m[f"{src}self_attention.linear_qkv.{kind}"], s)
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                        f"{dst}self_attn.v_proj.{kind}": v})
        gate, up = m[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return out


def _suffix(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(2) if match else name


def is_tp_split(name: str) -> bool:
    return _suffix(name) in _COLUMN_PARALLEL + _ROW_PARALLEL


def split_tp(name: str, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The `tp` shards of a full Megatron tensor, in TP rank order (views; replicated ones repeated)."""
    suffix = _suffix(name)
    if suffix == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    if suffix in _COLUMN_PARALLEL:
        return list(full.chunk(tp, dim=0))
    if suffix in _ROW_PARALLEL:
        return list(full.chunk(tp, dim=1))
    return [full] * tp


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_tp`."""
    suffix = _suffix(name)
    if suffix == "mlp.linear_fc1.weight":
        halves = [sh.chunk(2) for sh in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if suffix in _COLUMN_PARALLEL:
        return torch.cat(shards, dim=0)
    if suffix in _ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    return shards[0]
