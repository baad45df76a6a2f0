"""The torch learner process (`train_backend: torch`): the learner loop (learners.loop) over the torch
backend (learners.torch_backend: one process, an HF model).

    python -m learners.torch_learner --config C --run-dir D --hub H [--keys K] [--resume]
"""
from __future__ import annotations

import sys
from pathlib import Path

from async_rl import config as config_mod
from learners import loop
from learners.torch_backend import TorchBackend


def make_learner(cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None) -> loop.Learner:
    return loop.Learner(cfg, run_dir, hub_endpoint, keys_dir, TorchBackend)


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, TorchBackend, "async-rl torch learner")


if __name__ == "__main__":
    sys.exit(main())
