"""Core attention for the local (no Transformer Engine) layer spec: torch's scaled_dot_product_attention.

Megatron's own local `DotProductAttention` materialises the [b, heads, s, s] score matrix (baddbmm +
softmax + bmm); SDPA picks flash / memory-efficient kernels on a GPU, which is what makes the local spec
fast enough to train with. Invariant: the learner's rows are right-padded, so a causal mask alone keeps
every real token from seeing padding (pads only follow real tokens); the attention mask is not used.
Same interface as `DotProductAttention` (query [sq, b, np, hn], key/value [sk, b, ng, hn] ->
context [sq, b, np * hn]), so it drops into `SelfAttentionSubmodules.core_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"train.context_parallel_size={config.context_parallel_size}: needs Transformer "
                             f"Engine's attention, which is not installed; use 1")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by SDPA core attention")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPA core attention takes padded batches only (no packed sequences, no bias)")
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.heads != self.groups:  # GQA: each key/value head serves heads // groups query heads
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
