"""The Megatron learner process (`train_backend: megatron`): the learner loop (learners.loop) over the
Megatron backend (learners.megatron.backend), one process per GPU under torchrun.

    torchrun --nproc-per-node N -m learners.megatron.learner --config C --run-dir D --hub H [--keys K]

Global rank 0 alone talks to the hub, writes the run directory and (update_weight_mode=broadcast) sends the
gathered weights to the engines; it broadcasts each batch (or the decision to stop) so every rank runs the
same steps and collectives in the same order. The version is the number of publications, as for the torch
learner.
"""
from __future__ import annotations

import sys
from pathlib import Path

from async_rl import config as config_mod
from async_rl.plugins import PluginError
from learners import loop
from learners.megatron import parallel
from learners.megatron.backend import MegatronBackend


def make_learner(cfg: config_mod.Config, run_dir: str | Path, hub_endpoint: str | None,
                 keys_dir: str | None = None) -> loop.Learner:
    return loop.Learner(cfg, run_dir, hub_endpoint, keys_dir, MegatronBackend)


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, MegatronBackend, "async-rl megatron learner (one process per GPU, under torchrun)",
                     (PluginError, config_mod.ConfigError, ValueError), on_exit=parallel.shutdown)


if __name__ == "__main__":
    sys.exit(main())
