"""This rank's part of a Megatron learner checkpoint, in the run directory's contract (`learners.checkpoint`:
`run_dir/checkpoints/step_{N}/`, `state.json` written by rank 0, `DONE` last). The Megatron part is one
file per rank, `megatron/rank_{R}.pt`, holding that rank's parameter shard, optimizer state (main params
and moments; the distributed optimizer's shard), LR-scheduler state, reference-model shard and RNG streams
(CPU, CUDA, Megatron's tracker); state.json records the parallel layout and `backend: megatron`.

Invariant: resuming with the same parallel layout restores every rank bit for bit, so training continues
exactly as if it had not stopped (tests/learners/megatron/test_megatron_learner.py checks this); a
different layout is refused with a message (resharding is not implemented).
"""
from __future__ import annotations

from pathlib import Path

import torch

from learners import checkpoint as common
from learners.megatron.weights import unwrap


def info(layout) -> dict:
    """What state.json records (and `load` checks)."""
    return {"layout": {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp},
            "backend": "megatron"}


def _rng_state(on_gpu: bool) -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"host": common.rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if on_gpu:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    common.set_rng_state(state["host"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in unwrap(model).named_parameters()}


def _file(path: Path, rank: int) -> Path:
    return path / "megatron" / f"rank_{rank:05d}.pt"


def save(backend, path: Path) -> None:
    """Write this rank's file into the checkpoint directory `path`."""
    _file(path, 0).parent.mkdir(exist_ok=True)
    blob = {"model": _params(backend.model), "optimizer": backend.optimizer.state_dict(),
            "rng": _rng_state(backend.layout.on_gpu),
            "ref": _params(backend.ref) if backend.ref is not None else None}
    torch.save(blob, _file(path, backend.layout.rank))


@torch.no_grad()
def load(backend, path: Path, state: dict) -> None:
    """Restore this rank from checkpoint `path` (same layout; `state`: its state.json)."""
    if state.get("backend") != "megatron":
        raise ValueError(f"checkpoint {path}: written by another train_backend; resume with the backend that wrote it")
    here = info(backend.layout)["layout"]
    if state["layout"] != here:
        raise ValueError(f"checkpoint {path}: saved with layout {state['layout']}, this run has {here}; "
                         f"resume with the same train.* parallel sizes and actor_num_gpus_per_node")
    blob = torch.load(_file(path, backend.layout.rank), weights_only=False)
    for model, saved in ((backend.model, blob["model"]), (backend.ref, blob["ref"])):
        if model is not None and saved is not None:
            for name, p in unwrap(model).named_parameters():
                p.copy_(saved[name])
    backend.optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
