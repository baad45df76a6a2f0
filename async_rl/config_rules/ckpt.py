"""Rules of the ckpt section (checkpoints in and out). That ckpt.hf_checkpoint exists is checked at launch
(paths.py), so a config can be validated on a machine without the model."""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import at_least

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    at_least("ckpt", cfg.ckpt, "ref_update_interval", 0)
    at_least("ckpt", cfg.ckpt, "keep_weight_versions", 1)
    at_least("ckpt", cfg.ckpt, "save_interval", 0)
    at_least("ckpt", cfg.ckpt, "keep_checkpoints", 1)
