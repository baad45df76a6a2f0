"""Resumable learner checkpoints: `run_dir/checkpoints/step_{N}/` holds the policy (HF safetensors), the
optimizer state, the critic (if any), the RNG states, and `state.json` (steps done, version, the hub
lease of the batch last trained on). `DONE` is written last: a directory without it is ignored, so a
learner killed mid-save resumes from the previous checkpoint.

Resume is exact on the learner side: the same weights, optimizer moments, step counter, version and RNG
streams. The lease lets a resumed learner tell the hub that its last batch was already trained on (ACK),
so that batch is neither lost nor trained twice. The learner reports each complete checkpoint to the hub
(CHECKPOINT), which keeps the batches of later steps; a learner resumed from step k gets the batches of
steps k, k+1, ... replayed in their order, then its un-acked one, and retrains them as the first time.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(learner, step: int, keep: int) -> Path:
    """Write a complete checkpoint of `learner` after `step` learner steps; prune to the newest `keep`."""
    root = Path(learner.run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    extra = {"optimizer": learner.optimizer.state_dict(), "rng": _rng_state()}
    if learner.critic is not None:
        extra["critic"] = {"model": learner.critic.model.state_dict(),
                           "optimizer": learner.critic.optimizer.state_dict()}
    if learner.ref is not None:
        extra["ref"] = learner.ref.state_dict()
    torch.save(extra, tmp / "trainer_state.pt")
    state = {"step": step, "version": learner.version, "steps_done": learner.steps_done, "lease": learner.lease}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (final / "DONE").write_text(str(step))  # last: its presence means the checkpoint is whole
    for old in sorted(complete(root), key=_step)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def complete(root: Path) -> list[Path]:
    return [p for p in root.glob("step_*") if (p / "DONE").exists()]


def latest(run_dir: str | Path) -> Path | None:
    found = complete(Path(run_dir) / "checkpoints")
    return max(found, key=_step) if found else None


def load(learner, path: Path) -> dict:
    """Restore `learner` from checkpoint `path`; returns its state.json."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model" / "model.safetensors"))
    missing, unexpected = learner.model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # tied embeddings are not saved
        raise RuntimeError(f"checkpoint {path}: weights do not fit the model (missing {missing}, "
                           f"unexpected {unexpected})")
    extra = torch.load(path / "trainer_state.pt", weights_only=False)  # our own file, written by save()
    learner.optimizer.load_state_dict(extra["optimizer"])
    if learner.critic is not None and "critic" in extra:
        learner.critic.model.load_state_dict(extra["critic"]["model"])
        learner.critic.optimizer.load_state_dict(extra["critic"]["optimizer"])
    if learner.ref is not None and "ref" in extra:
        learner.ref.load_state_dict(extra["ref"])
    _set_rng_state(extra["rng"])
    state = json.loads((path / "state.json").read_text())
    learner.version, learner.steps_done, learner.lease = state["version"], state["steps_done"], state["lease"]
    return state
