"""Weights in and out of a (TP/PP-sharded) Megatron model: load an HF checkpoint into this rank's shard;
gather every shard back into one HF state dict on global rank 0 (published through
`learners.weights.HFExport`).

Invariant: `gather_hf(load_hf(sd)) == sd` (up to dtype) for any TP/PP layout; every parameter of the
stage is written by `load_hf` (a name the converter does not produce is an error, never left
uninitialised) and every HF tensor the stage needs is read.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from learners.megatron import parallel
from learners.megatron.convert import hf_to_mcore, is_tp_split, mcore_to_hf, merge_tp, split_tp
from learners.megatron.model import Shape

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(model):
    """The GPTModel inside Megatron's DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def global_names(model) -> dict[str, str]:
    """This stage's parameter names -> names with global layer indices (`decoder.layers.{global}.`)."""
    model = unwrap(model)
    out = {}
    for name, _ in model.named_parameters():
        m = _LOCAL_LAYER.match(name)
        if m:
            layer = model.decoder.layers[int(m.group(1))].layer_number - 1  # layer_number is global, 1-based
            name_g = f"decoder.layers.{layer}." + name[m.end():]
        else:
            name_g = name
        out[name] = name_g
    return out


def read_hf_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"ckpt.hf_checkpoint={str(path)!r}: no *.safetensors files there")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


@torch.no_grad()
def load_hf(model, hf_sd: dict[str, torch.Tensor], shape: Shape, tp_rank: int, tp: int) -> None:
    """Copy this rank's shard of the HF weights into `model` (a stage, possibly DDP-wrapped)."""
    full = hf_to_mcore(hf_sd, shape)
    params = dict(unwrap(model).named_parameters())
    for local, name in global_names(model).items():
        key = name
        if name == "output_layer.weight" and shape.tied:  # last stage's copy of the tied embedding (PP > 1)
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"megatron parameter {name} has no HF source (model_type={shape.model_type})")
        src = split_tp(key, full[key], tp)[tp_rank]
        dst = params[local]
        if src.shape != dst.shape:
            raise ValueError(f"{name}: HF shard {tuple(src.shape)} != megatron {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))


@torch.no_grad()
def gather_hf(model, shape: Shape, layout: parallel.Layout, on_device: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model as an HF state dict (CPU tensors; with `on_device` and PP = 1, tensors on the
    model's device, some of them views of its parameters) on global rank 0; None on other ranks.

    Collective over the TP group of each stage of the first DP replica (other DP replicas hold the same
    weights and return at once), then one gather over the pipeline stages.
    """
    from megatron.core import parallel_state as ps

    if layout.dp_rank != 0:
        return None
    params = dict(unwrap(model).named_parameters())
    stage = {}
    for local, name in global_names(model).items():
        p = params[local].detach()
        if layout.tp > 1 and is_tp_split(name):
            shards = [torch.empty_like(p) for _ in range(layout.tp)]
            dist.all_gather(shards, p.contiguous(), group=ps.get_tensor_model_parallel_group())
            p = merge_tp(name, shards) if layout.tp_rank == 0 else None
        if layout.tp_rank == 0:
            stage[name] = p if on_device and layout.pp == 1 else p.cpu()
    if layout.tp_rank != 0:
        return None
    stages = parallel.gather_stages(stage, layout)
    if stages is None:
        return None
    merged = {}
    for part in stages:
        merged.update(part)
    if shape.tied:
        merged.pop("output_layer.weight", None)  # the last stage's copy of the embedding
    return mcore_to_hf(merged, shape)
