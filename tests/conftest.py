"""Shared fixtures: a tiny world (model, tokenizer, prompts) built locally once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Random-init tiny Qwen2 + char tokenizer + addition prompts, with a 60-step SFT warm start."""
    import torch

    from async_rl import tiny
    from learners.sft import warm_start

    root = tmp_path_factory.mktemp("tiny")
    tiny.build_model(root / "model", seed=0)
    data = tiny.build_task(root / "data", n_train=500, n_test=50, seed=0)
    torch.set_num_threads(2)
    warm_start(str(root / "model"), str(data["train"]), str(root / "model_sft"), steps=60, log_every=1000)
    return {"root": root, "model": root / "model", "model_sft": root / "model_sft",
            "train": data["train"], "test": data["test"]}
