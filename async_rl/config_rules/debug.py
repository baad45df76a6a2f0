"""Rules of the debug section (slime's debug modes, async_rl/debug.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    d = cfg.debug
    if d.debug_rollout_only and d.debug_train_only:
        raise ConfigError("debug.debug_rollout_only=true and debug.debug_train_only=true: pick one (the first trains "
                         "nothing, the second generates nothing)")
    if d.debug_train_only != bool(d.load_debug_rollout_data):
        raise ConfigError(f"debug.load_debug_rollout_data={d.load_debug_rollout_data!r}: read only by, and required by, "
                         f"debug_train_only (now {d.debug_train_only}); set both or neither")
    for name in ("save_debug_rollout_data", "load_debug_rollout_data"):
        value = getattr(d, name)
        if "{rollout_id}" in value and "{rollout_id}" not in value.rsplit("/", 1)[-1]:
            raise ConfigError(f"debug.{name}={value!r}: {{rollout_id}} must be in the file name, e.g. "
                             f"dbg/rollout_{{rollout_id}}.msgpack (or give a directory)")
