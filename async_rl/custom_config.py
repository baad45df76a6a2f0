"""slime's --custom-config-path: a YAML file of settings for the run's plug-ins, applied on top of the config.

Invariants:
- rollout.custom_config holds the file's content (read once, when the config is first loaded; the resolved
  config in run_dir/config.yaml carries it, so every process of the run, also on a host without the file, sees
  the same settings and no later load reads the file again). It may also be written as a map in the YAML.
- A key of it that names a config field (`lr`, `rollout.rollout_top_p`, or a section map such as
  `algo: {eps_clip: 0.1}`) sets that field at every load, after the YAML file and the key=value words (slime
  applies its file last too); every other key is a setting for the run's plug-ins. A slime option with no
  meaning here, or an ambiguous bare name, is refused as it is anywhere else.
- Plug-ins read the settings with `async_rl.plugins.custom_config()` (those of the config this process loaded
  last), or from cfg.rollout.custom_config where they get the config.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from async_rl.config_rules import ConfigError

FIELD = "rollout.custom_config_path"


def read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{FIELD}={path!r}: no such file; point it at a YAML file of `key: value` settings")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{FIELD}={path!r}: not YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{FIELD}={path!r}: must be a map of `key: value` settings, e.g. `my_threshold: 0.5`")
    return data


def apply(cfg) -> None:
    """Read rollout.custom_config_path into rollout.custom_config unless it holds the content already, set the
    fields it names, and publish it to async_rl.plugins.custom_config()."""
    from async_rl import config as config_mod
    from async_rl import plugins
    r = cfg.rollout
    if r.custom_config_path and not r.custom_config:
        r.custom_config = read(r.custom_config_path)
    where = f"{FIELD}={r.custom_config_path!r}" if r.custom_config_path else "rollout.custom_config"
    for key, value in r.custom_config.items():
        try:
            if key in config_mod.SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    config_mod.apply(cfg, *config_mod.resolve_key(f"{key}.{name}"), v)
            else:
                config_mod.apply(cfg, *config_mod.resolve_key(key), value)
        except ConfigError as exc:
            if "unknown config field" not in str(exc):  # slime's options without a meaning, ambiguous names, bad values
                raise ConfigError(f"{where}: {exc}") from None
            # a plug-in's own setting
    plugins.set_custom_config(r.custom_config)
