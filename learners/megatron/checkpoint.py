"""Resumable Megatron learner checkpoints, in the run directory's contract (`learners.checkpoint`):
`run_dir/checkpoints/step_{N}/` with `state.json` (step, version, steps done, hub lease, parallel layout)
and `DONE` written last; the Megatron part is one file per rank, `megatron/rank_{R}.pt`, holding that
rank's parameter shard, optimizer state (main params and moments; the distributed optimizer's shard),
LR-scheduler state, reference-model shard and RNG streams (CPU, CUDA, Megatron's tracker).

Invariant: resuming with the same parallel layout restores every rank bit for bit, so training continues
exactly as if it had not stopped (tests/learners/megatron/test_megatron_learner.py checks this); a
different layout is refused with a message (resharding is not implemented).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from learners import checkpoint as common
from learners.megatron import parallel
from learners.megatron.weights import unwrap


def _layout(learner) -> dict:
    lay = learner.layout
    return {"world": lay.world, "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp}


def _rng_state(on_gpu: bool) -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"host": common._rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if on_gpu:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    common._set_rng_state(state["host"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in unwrap(model).named_parameters()}


def save(learner, step: int, keep: int) -> Path:
    """Collective: every rank writes its file; rank 0 writes state.json, publishes the directory, prunes."""
    root = Path(learner.run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    rank = learner.layout.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "megatron").mkdir(parents=True)
    parallel.barrier()
    blob = {"model": _params(learner.model), "optimizer": learner.optimizer.state_dict(),
            "rng": _rng_state(learner.layout.on_gpu), "ref": _params(learner.ref) if learner.ref is not None else None}
    torch.save(blob, tmp / "megatron" / f"rank_{rank:05d}.pt")
    parallel.barrier()
    if rank == 0:
        state = {"step": step, "version": learner.version, "steps_done": learner.steps_done,
                 "lease": learner.lease, "layout": _layout(learner), "backend": "megatron"}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "DONE").write_text(str(step))  # last: its presence means the checkpoint is whole
        for old in sorted(common.complete(root), key=common._step)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


@torch.no_grad()
def load(learner, path: Path) -> dict:
    """Restore this rank from checkpoint `path` (same layout); returns its state.json."""
    state = json.loads((path / "state.json").read_text())
    if state.get("backend") != "megatron":
        raise ValueError(f"checkpoint {path}: written by another train_backend; resume with the backend that wrote it")
    if state["layout"] != _layout(learner):
        raise ValueError(f"checkpoint {path}: saved with layout {state['layout']}, this run has {_layout(learner)}; "
                         f"resume with the same train.* parallel sizes and actor_num_gpus_per_node")
    blob = torch.load(path / "megatron" / f"rank_{learner.layout.rank:05d}.pt", weights_only=False)
    for model, saved in ((learner.model, blob["model"]), (learner.ref, blob["ref"])):
        if model is not None and saved is not None:
            for name, p in unwrap(model).named_parameters():
                p.copy_(saved[name])
    learner.optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    learner.version, learner.steps_done, learner.lease = state["version"], state["steps_done"], state["lease"]
    return state
