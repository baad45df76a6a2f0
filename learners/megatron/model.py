"""A megatron-core `GPTModel` built from an HF config (Llama, Qwen2, Qwen3 families), and its forward pass.

Invariant: the model built here computes the same function as the HF model it was built from, once
`learners.megatron.weights` has loaded the HF weights into it (checked by logits equality in
tests/learners/megatron). Everything that would change that function (rope scaling, sliding windows,
unusual activations or biases) is refused here with a message naming the HF config field.
Layer spec: megatron's local spec (no Transformer Engine), RMSNorm, SwiGLU, with torch SDPA as the
core attention (`learners.megatron.attention`). The vocabulary is padded to a multiple of 128 * TP for
the embedding shards; `forward_logits` drops the padding again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILIES = ("qwen2", "llama", "qwen3")


@dataclass(frozen=True)
class Shape:
    """What conversion and model building need to know about an HF decoder."""
    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    eps: float
    rope_theta: float
    max_positions: int


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(hf, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ValueError(f"HF config rope_type={rope_type!r}: the megatron learner converts only default RoPE; "
                         f"use train_backend=torch for this checkpoint")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(hf, "rope_theta", 10000.0))


def shape_from_hf(hf, tp: int = 1) -> Shape:
    """Shape of an HF config; raises ValueError naming the field when megatron cannot reproduce it."""
    mt = hf.model_type
    if mt not in FAMILIES:
        raise ValueError(f"HF config model_type={mt!r}: train_backend=megatron supports {list(FAMILIES)}; "
                         f"use train_backend=torch")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"HF config hidden_act={hf.hidden_act!r}: only silu (SwiGLU) is converted")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("HF config use_sliding_window=True: sliding-window attention is not converted")
    if mt == "llama" and (getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False)):
        raise ValueError("HF config attention_bias/mlp_bias=True: biased Llama projections are not converted")
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    if heads % tp or kv % tp:
        raise ValueError(f"train.tensor_model_parallel_size={tp}: must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={kv} of the HF config")
    multiple = 128 * tp
    return Shape(model_type=mt, num_layers=hf.num_hidden_layers, hidden=hf.hidden_size, heads=heads, kv_heads=kv,
                 head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, ffn=hf.intermediate_size,
                 vocab=hf.vocab_size, padded_vocab=-(-hf.vocab_size // multiple) * multiple,
                 tied=bool(hf.tie_word_embeddings), qkv_bias=mt == "qwen2" or bool(getattr(hf, "attention_bias", False)),
                 qk_norm=mt == "qwen3", eps=hf.rms_norm_eps, rope_theta=_rope_theta(hf),
                 max_positions=hf.max_position_embeddings)


def transformer_config(shape: Shape, train, dtype: torch.dtype):
    """megatron TransformerConfig for `shape` with the train section's parallelism and recompute knobs."""
    from megatron.core.transformer import TransformerConfig

    recompute = train.recompute_granularity or None
    config = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, num_query_groups=shape.kv_heads, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=shape.eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=shape.qkv_bias, qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=train.tensor_model_parallel_size,
        pipeline_model_parallel_size=train.pipeline_model_parallel_size,
        context_parallel_size=train.context_parallel_size, sequence_parallel=train.sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        # every weight is then overwritten from an HF model, but Megatron's init is also what marks TP-split
        # weights (`tensor_model_parallel`), which grad-norm and optimizer code rely on: keep it on
        perform_initialization=True,
        use_cpu_initialization=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_activation_fusion=True,
        bias_dropout_fusion=True,
        recompute_granularity=recompute,
        recompute_method=(train.recompute_method or None) if recompute == "full" else None,
        recompute_num_layers=(train.recompute_num_layers or None) if recompute == "full" else None,
        batch_p2p_comm=torch.cuda.is_available(),  # gloo (CPU) has no batched point-to-point operations
    )
    # PP > 1: micro-batches differ in length and rows, so stages send shapes before activations (set after
    # construction: its check against the MoE token dispatcher concerns MoE models only)
    config.variable_seq_lengths = train.pipeline_model_parallel_size > 1
    return config


def layer_spec(shape: Shape):
    """Megatron's local GPT layer spec (RMSNorm, optional QK norm) with SDPA as the core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from learners.megatron.attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_model(shape: Shape, config, pre_process: bool = True, post_process: bool = True):
    """An uninitialised GPTModel stage on the current device (load weights before use)."""
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(config=config, transformer_layer_spec=layer_spec(shape), vocab_size=shape.padded_vocab,
                     max_sequence_length=shape.max_positions, pre_process=pre_process, post_process=post_process,
                     parallel_output=True, share_embeddings_and_output_weights=shape.tied,
                     position_embedding_type="rope", rotary_base=shape.rope_theta, rotary_percent=1.0)
    # the local spec's torch norms are built on the CPU in float32 (Megatron-LM moves and casts the model
    # after building it); parameters only, so that RoPE frequencies stay float32
    device = torch.cuda.current_device()
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=config.params_dtype)
    return model


def build_stage(shape: Shape, config):
    """This rank's pipeline stage (embedding on the first, output layer on the last)."""
    from megatron.core import parallel_state as ps

    return build_model(shape, config, pre_process=ps.is_pipeline_first_stage(),
                       post_process=ps.is_pipeline_last_stage())


def forward_logits(model, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits [B, T-1, V] of the positions that predict tokens 1..T (one pipeline stage).

    Rows are right-padded; causal attention keeps pads out of every real position. TP shards of the
    vocabulary are gathered (with a gradient that splits again), so the shared RL losses see whole rows.
    """
    b, t = input_ids.shape
    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                   runtime_gather_output=True)
    return logits[:, :-1, :vocab]


def forward_stage(model, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """One pipeline stage's forward inside Megatron's schedule: `forward_logits` on the last stage, the
    hidden states [T, B, H] for the next stage elsewhere (a later stage reads its input from the schedule's
    `set_input_tensor`, not from `input_ids`)."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage():
        return forward_logits(model, input_ids, vocab)
    b, t = input_ids.shape
    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
