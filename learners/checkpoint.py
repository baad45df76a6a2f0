"""Resumable learner checkpoints: `run_dir/checkpoints/step_{N}/` holds what the backend writes (the policy,
the optimizer state, the critic and reference if any, the RNG streams: learners.backend.Backend.save) and
`state.json` (steps done, version, the hub lease of the batch last trained on, the backend's own record).
`DONE` is written last: a directory without it is ignored, so a learner killed mid-save resumes from the
previous checkpoint.

Resume is exact on the learner side: the same weights, optimizer moments, step counter, version and RNG
streams. The lease lets a resumed learner tell the hub that its last batch was already trained on (ACK),
so that batch is neither lost nor trained twice. The learner reports each complete checkpoint to the hub
(CHECKPOINT), which keeps the batches of later steps; a learner resumed from step k gets the batches of
steps k, k+1, ... replayed in their order, then its un-acked one, and retrains them as the first time.

Ranks: every rank writes its part into one temporary directory; rank 0 alone writes state.json, renames
the directory into place, writes DONE and prunes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(learner, step: int, keep: int) -> Path:
    """Write a complete checkpoint of `learner` (learners.loop.Learner) after `step` learner steps; prune
    to the newest `keep`. Collective."""
    backend, first = learner.backend, learner.rank == 0
    root = Path(learner.run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{backend.broadcast_object(os.getpid())}"  # rank 0's pid on every rank
    if first:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save(tmp)
    backend.barrier()
    if first:
        state = {"step": step, "version": learner.version, "steps_done": learner.steps_done, "lease": learner.lease,
                 **backend.checkpoint_info()}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "DONE").write_text(str(step))  # last: its presence means the checkpoint is whole
        for old in sorted(complete(root), key=_step)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def complete(root: Path) -> list[Path]:
    return [p for p in root.glob("step_*") if (p / "DONE").exists()]


def latest(run_dir: str | Path) -> Path | None:
    found = complete(Path(run_dir) / "checkpoints")
    return max(found, key=_step) if found else None


def load(learner, path: Path) -> dict:
    """Restore `learner` from checkpoint `path`; returns its state.json. Collective."""
    state = json.loads((path / "state.json").read_text())
    learner.backend.load(path, state)
    learner.version, learner.steps_done = state["version"], state["steps_done"]
    learner.lease = state["lease"] if learner.rank == 0 else None  # rank 0 holds the lease
    return state
