"""Process groups of the Megatron learner: torch.distributed (NCCL on GPUs, gloo on CPUs) + Megatron's
model-parallel state (TP x CP x DP x PP), plus a gloo group over every rank for Python objects (batches,
stop signals) and one over the pipeline stages of the first TP/DP replica (weight gathering).

Invariant: global rank 0 is the only rank that talks to the hub and writes the run directory; every other
rank learns what to do from it through `broadcast_object`, so all ranks take the same steps in the same
order (no collective is ever entered by only some of them).
"""
from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Layout:
    rank: int
    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    on_gpu: bool


_OBJECT_GROUP = None
_STAGE_GROUP = None  # ranks with tp_rank == dp_rank == 0, one per pipeline stage, in stage order
_PIPE_GROUP = None   # gloo: this rank's pipeline (same tp_rank and dp_rank, every stage), and its last stage
_PIPE_LAST = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(train) -> Layout:
    """Join (or, alone, create) the process group and Megatron's model-parallel groups; returns the layout.

    Started by torchrun, or as one Ray actor per rank under `--cluster ray` (async_rl/launch/ray_ranks.py): both set
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*, which env:// reads; or as a single process.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout(train))
    world = dist.get_world_size()
    tp, pp, cp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size, train.context_parallel_size
    if world % (tp * pp * cp):
        raise ValueError(f"train.tensor_model_parallel_size={tp} * pipeline_model_parallel_size={pp} * "
                         f"context_parallel_size={cp} must divide the {world} learner processes "
                         f"(train.actor_num_gpus_per_node)")
    if ps.model_parallel_is_initialized():  # a second learner in this process (tests) starts afresh
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, distributed_timeout_minutes=train.distributed_timeout_minutes)
    tensor_parallel.model_parallel_cuda_manual_seed(train.seed)
    layout = Layout(rank=dist.get_rank(), world=world, tp=tp, pp=pp, cp=cp, dp=ps.get_data_parallel_world_size(),
                    tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                    dp_rank=ps.get_data_parallel_rank(), on_gpu=on_gpu)
    _make_groups(layout, timeout(train))
    return layout


def timeout(train):
    """How long a collective of the learner's groups waits for a rank (train.distributed_timeout_minutes)."""
    from datetime import timedelta
    return timedelta(minutes=train.distributed_timeout_minutes)


def _make_groups(layout: Layout, limit) -> None:
    global _OBJECT_GROUP, _STAGE_GROUP, _PIPE_GROUP, _PIPE_LAST
    _OBJECT_GROUP = dist.new_group(backend="gloo", timeout=limit)
    coords = [None] * layout.world
    dist.all_gather_object(coords, (layout.rank, layout.tp_rank, layout.dp_rank, layout.pp_rank),
                           group=_OBJECT_GROUP)
    stages = sorted((pp, rank) for rank, tp, dp, pp in coords if tp == 0 and dp == 0)
    _STAGE_GROUP = dist.new_group([rank for _, rank in stages], backend="gloo", timeout=limit)
    if layout.pp > 1:  # every rank creates every pipeline's group, in the same order
        for key in sorted({(tp, dp) for _, tp, dp, _ in coords}):
            ranks = [rank for _, rank in sorted((pp, rank) for rank, tp, dp, pp in coords if (tp, dp) == key)]
            group = dist.new_group(ranks, backend="gloo", timeout=limit)
            if key == (layout.tp_rank, layout.dp_rank):
                _PIPE_GROUP, _PIPE_LAST = group, ranks[-1]


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_OBJECT_GROUP)
    return box[0]


def gather_stages(obj, layout: Layout) -> list | None:
    """On the first stage's TP/DP-rank-0 (global rank 0): every stage's `obj`, in stage order. Call only
    on ranks with tp_rank == dp_rank == 0; returns None elsewhere."""
    if layout.pp == 1:
        return [obj]
    out = [None] * layout.pp if layout.pp_rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_STAGE_GROUP)
    return out


def from_last_stage(obj, layout: Layout):
    """The last pipeline stage's `obj` on every stage of this rank's pipeline (losses, logprobs)."""
    if layout.pp == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_PIPE_LAST, group=_PIPE_GROUP)
    return box[0]


def barrier() -> None:
    dist.barrier(group=_OBJECT_GROUP)


def all_reduce_mean(values: dict, group) -> dict:
    """Mean of float metrics over `group` (keys must match on every rank; None stays None)."""
    keys = sorted(k for k, v in values.items() if v is not None)
    if not keys or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return {**values, **{k: float(v) / dist.get_world_size(group) for k, v in zip(keys, t)}}


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    gc.collect()  # the model that holds the groups (learners.loop.main drops it first; see learners.fsdp.close)
    if dist.is_initialized():
        dist.destroy_process_group()
