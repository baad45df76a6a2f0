"""The torch learner across ranks: FSDP2 data parallelism (`torch.distributed.fsdp.fully_shard`), as slime's
and verl's FSDP backends. One process per rank (started by torchrun, or by one Ray actor per rank under
`--cluster ray`, with RANK / WORLD_SIZE / MASTER_ADDR set); gloo on CPU, NCCL on GPU.

Invariants:
- Every rank holds 1/world of each parameter, gradient and AdamW moment (FSDP2 shards dim 0 of every
  parameter); a decoder layer's full weights exist only while that layer computes.
- One optimizer step on the global mini-batch gives the same loss, gradient norm and update as one rank
  training on the whole mini-batch (equal within float rounding): each rank trains on its share of the
  rows (`learners.batching.dp_rows`: equal counts, optionally balanced by tokens), per-token losses are
  divided by the mini-batch's token count, per-sample losses by its row count, and the gradients, which
  FSDP averages over ranks, are those of the loss times the world size (a sum over ranks; gloo has no
  pre-multiplied reduce-scatter, so the factor goes on the loss).
- Publication gathers the full weights to rank 0 only, on the host, layer by layer
  (`full_state_dict`): no rank ever holds a second full copy on its device.
- Checkpoints are sharded (`torch.distributed.checkpoint`): each rank writes its shards, and a checkpoint
  written at one world size loads at any other (DCP reshards on load).
"""
from __future__ import annotations

import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int]:
    """(rank, world size) of this process as its launcher set them; (0, 1) when started as one process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Whether this process is one rank of a multi-rank learner (also at one rank): started by torchrun's agent
    (the local launcher), or as a Ray actor of its own by `--cluster ray` (async_rl/launch/ray_ranks.py, which
    sets LEARNER_RANKS_ENV beside RANK / WORLD_SIZE / MASTER_*). Those markers, not WORLD_SIZE: a
    single-process megatron learner sets WORLD_SIZE=1 for itself (learners/megatron/parallel.py), which must
    not make a torch learner built later in the same process shard itself."""
    from async_rl.placement import LEARNER_RANKS_ENV
    return "TORCHELASTIC_RUN_ID" in os.environ or LEARNER_RANKS_ENV in os.environ


def init(device: torch.device, timeout_minutes: int = 30) -> tuple[int, int]:
    """Join the process group (gloo on CPU, NCCL on GPU; env:// from RANK / WORLD_SIZE / MASTER_*) once,
    whenever this process is a rank (`under_torchrun`; a group of one rank too: FSDP2 shards over it);
    returns (rank, world size)."""
    rank, world = world_from_env()
    if under_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world


def close() -> None:
    """Leave the process group while the interpreter is still whole: the last step of a rank's process, once
    nothing references a sharded module any more (each FSDP module holds the group). Otherwise gloo's group
    outlives `destroy_process_group` and is torn down during interpreter finalization, where its worker
    threads abort the process now and then (SIGABRT, "terminate called without an active exception"), and
    a rank that did all its work would exit -6."""
    gc.collect()  # the modules, optimizer states and DTensors that hold the group
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """A rank's device: `cuda` becomes `cuda:LOCAL_RANK` (one GPU per rank); others are unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (HF causal LMs keep them at `model.model.layers`)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no `model.layers` to shard; the FSDP backend shards HF "
                         f"decoder-only models (Llama, Qwen2, Qwen3, ...)")
    return list(layers)


def shard(model: torch.nn.Module, device: torch.device, bf16: bool, reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> torch.nn.Module:
    """Shard `model` in place over every rank of the default group: each decoder layer, then the root
    (embeddings, final norm, head). bf16 (GPU): bf16 parameters in forward/backward, fp32 gradient reduction
    and fp32 sharded master weights for AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def sharded_from_pretrained(checkpoint_dir: str | Path, device: torch.device, bf16: bool, cpu_offload: bool = False,
                            gradient_checkpointing: bool = False, rank0_load: bool = True) -> torch.nn.Module:
    """The HF causal LM at `checkpoint_dir`, sharded over the default group (`shard`). With `rank0_load` (and
    more than one rank, no CPU offload) only rank 0 reads the checkpoint into host memory; every other rank
    builds the model on the meta device (no memory), shards it, allocates just its shards, and receives them
    from rank 0 (`set_model_state_dict(broadcast_from_rank0=True)`), then rank 0's buffers (rotary
    frequencies, which no state dict holds). Else every rank loads the whole checkpoint, then shards it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = rank0_load and world > 1 and not cpu_offload
    full: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if not meta or dist.get_rank() == 0:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
        if meta:  # rank 0 keeps the full weights on its host only until they are broadcast
            full, buffers = model.state_dict(), dict(model.named_buffers())
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint_dir), dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard(model, device, bf16=bf16, cpu_offload=cpu_offload)
    if meta:
        model.to_empty(device=device)
        load_full_state_dict(model, full)
        _broadcast_buffers(model, buffers)
        del full, buffers
    return model


@torch.no_grad()
def _broadcast_buffers(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Rank 0's buffers (from `source`, its loaded model) into every rank's `model`, by name."""
    for name, buf in model.named_buffers():
        if dist.get_rank() == 0:
            buf.copy_(source[name])
        dist.broadcast(buf, src=0)


def grad_norm_and_clip(params: list, clip: float) -> float:
    """The global gradient norm (over every rank's shards), clipping to `clip` when > 0."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's host (every other rank gets {}), gathered one parameter at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Set a sharded model from full weights present on rank 0 (broadcast to the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def save_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ref: torch.nn.Module | None = None) -> None:
    """Write this rank's shards of model, optimizer (and the frozen reference) into `path`, a DCP checkpoint.
    Every rank calls it; a plain (unsharded) model without a process group writes the same layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ref: torch.nn.Module | None = None) -> None:
    """Load a DCP checkpoint written at any number of ranks into this rank's shards (or a plain model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ref is not None:
        set_model_state_dict(ref, state["ref"])


def load_rng(path: Path, rank: int) -> None:
    """This rank's RNG streams from checkpoint `path` (rank 0's when it was written at fewer ranks)."""
    from learners import checkpoint

    own = path / f"rng_{rank}.pt"
    checkpoint.set_rng_state(torch.load(own if own.exists() else path / "rng_0.pt", weights_only=False))


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each float metric (one collective for all of them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# ---- one optimizer step over this rank's rows of a mini-batch ----------------------------------------
def rank_rows(start: int, size: int, lengths: list[int], balance: bool) -> list[int]:
    """This rank's rows of mini-batch [start, start + size) (all of them at world size 1)."""
    from learners.batching import dp_rows

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if size % world:
        raise ValueError(f"rollout.global_batch_size={size}: must be a multiple of the learner's data-parallel "
                         f"ranks ({world}); set global_batch_size to a multiple of {world}")
    return dp_rows(start, size, world, rank, lengths, balance)


def rank_micro_batches(rows: list[int], lengths: list[int], micro_size: int, max_tokens: int) -> list[list[int] | None]:
    """This rank's micro-batches of `rows`, longest rows first: `micro_size` rows each, or (max_tokens > 0) as
    many as fit rows x longest <= max_tokens. FSDP needs every rank in every forward and backward, so with a
    token budget (counts differ between ranks) the list is padded with None up to the most any rank has: a
    None runs one row whose result is dropped (logprobs) or whose loss counts 0 (training)."""
    from learners.batching import by_length, micro_batches

    micros: list = micro_batches(by_length(rows, lengths), lengths, micro_size, max_tokens)
    if max_tokens > 0 and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor([len(micros)], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        micros += [None] * (int(most) - len(micros))
    return micros


@torch.no_grad()
def batch_logprobs(model, batch, micro_size: int, temperature: float, device: torch.device,
                   max_tokens: int = 0) -> torch.Tensor:
    """Logprobs of every target of `batch` under `model`: each rank computes its rows (`rank_micro_batches`),
    an all-reduce (sum of disjoint rows) gives every rank the whole batch."""
    from learners import losses
    from learners.batching import row_lengths, take

    lengths = row_lengths(batch)
    rows = rank_rows(0, len(lengths), lengths, balance=False)
    out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=device)
    for micro in rank_micro_batches(rows, lengths, micro_size, max_tokens):
        part = take(batch, micro or rows[:1], device, lengths)
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1]
        logp = losses.token_logprobs(logits, part["targets"], temperature).float()
        if micro is not None:
            out[micro, :logp.shape[1]] = logp
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out.to(batch.mask.dtype).to(batch.mask.device)


def policy_step(model, optimizer, batch, start: int, size: int, loss_fn, micro_size: int, per_token: bool,
                clip_grad: float, balance: bool, device: torch.device, max_tokens: int = 0) -> dict:
    """zero_grad, forward/backward this rank's micro-batches of mini-batch [start, start + size), clip by
    the global norm, step. `loss_fn(model, part, token_denominator) -> (loss, metrics)` is the micro-batch's
    loss: a per-token sum over the mini-batch's tokens, or (per_token False) a mean over the part's rows,
    weighted here by rows / size. Returns loss, grad_norm and the metrics as the whole mini-batch's."""
    from learners.batching import row_lengths, take

    lengths = row_lengths(batch)
    rows = rank_rows(start, size, lengths, balance)
    token_denom = float(batch.mask[start:start + size].sum().clamp(min=1.0))
    world = dist.get_world_size() if dist.is_initialized() else 1
    optimizer.zero_grad(set_to_none=True)
    total, metrics = 0.0, {}
    for micro in rank_micro_batches(rows, lengths, micro_size, max_tokens):
        part = take(batch, micro or rows[:1], device, lengths)
        loss, m = loss_fn(model, part, token_denom)
        if micro is None:  # padding: this rank has no rows left; its forward/backward only join the others'
            (loss * 0.0).backward()
            continue
        share = len(micro) / size  # of the mini-batch's rows
        scale = 1.0 if per_token else share
        (loss * (scale * world)).backward()  # FSDP averages over ranks: times world = the sum
        total += float(loss.detach()) * scale
        for key, value in m.items():  # loss/* sum to the mini-batch's value; the rest: row-weighted means
            metrics[key] = metrics.get(key, 0.0) + float(value) * (scale if key.startswith("loss/") else share)
    grad_norm = grad_norm_and_clip(list(model.parameters()), clip_grad)
    optimizer.step()
    summed = all_reduce_mean({"loss": total, **metrics}, device)
    return {**{k: v * world for k, v in summed.items()}, "grad_norm": grad_norm}
