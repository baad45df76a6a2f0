"""The torch learner process (`train_backend: torch`): the learner loop (learners.loop) over the torch
backend (learners.torch_backend: one process, an HF model), or, when this process is one rank of several
(started by torchrun, as the local launcher does for train.actor_num_gpus_per_node > 1, or as one Ray actor
a rank by `--cluster ray`; `torchrun --nproc-per-node=1` gives FSDP2 at one rank, as
scripts/gpu/bench_megatron.py's `fsdp` variant), over the FSDP2 backend (learners.fsdp_backend).

    python -m learners.torch_learner --config C --run-dir D --hub H [--keys K] [--resume]
"""
from __future__ import annotations

import sys
from pathlib import Path

from async_rl import config as config_mod
from learners import loop
from learners.fsdp import close, under_torchrun
from learners.torch_backend import TorchBackend


def backend_class():
    """FSDP2 over the ranks torchrun started (one or more), else one process (the same checkpoint layout
    either way)."""
    if under_torchrun():
        from learners.fsdp_backend import FsdpBackend
        return FsdpBackend
    return TorchBackend


def make_learner(cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None) -> loop.Learner:
    return loop.Learner(cfg, run_dir, hub_endpoint, keys_dir, backend_class())


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, backend_class(), "async-rl torch learner", on_exit=close)


if __name__ == "__main__":
    sys.exit(main())
