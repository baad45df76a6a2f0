"""Typed, documented run configuration: the `Config` of one dataclass section per component
(async_rl/config_sections.py), and its loader.

A config is loaded from YAML, overridden by `key=value` words (a field's dotted path such as
`rollout.n_samples_per_prompt=8`, or its bare name when that is unique), validated, and written
fully resolved to the run directory. Every validation error names the field, the value and the fix.
Derived values and cross-field rules are `async_rl.config_rules.finalize` (one module per section there).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

# config_rules imports nothing of this module (no import circle); ConfigError is re-exported for callers
from async_rl.config_rules import ConfigError, field_choices, finalize  # noqa: F401
from async_rl.config_sections import (AlgoConfig, BufferConfig, CkptConfig, ClusterConfig, DataConfig, DebugConfig,
                                      EvalConfig, LoggingConfig, OptimizerConfig, RolloutConfig, TrainConfig)


@dataclass
class Config:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in fields(Config)]


def _field_index() -> dict[str, list[str]]:
    """Bare field name -> dotted paths that carry it."""
    index: dict[str, list[str]] = {}
    for sec in fields(Config):
        for f in fields(sec.default_factory()):
            index.setdefault(f.name, []).append(f"{sec.name}.{f.name}")
    return index


def resolve_key(key: str) -> tuple[str, str]:
    """`rollout.lr` or `lr` -> (section, field); unknown or ambiguous keys raise ConfigError with a suggestion."""
    index = _field_index()
    if "." in key:
        sec, _, name = key.partition(".")
        if sec in SECTIONS and f"{sec}.{name}" in index.get(name, []):
            return sec, name
    elif len(index.get(key, [])) == 1:
        return tuple(index[key][0].split("."))  # type: ignore[return-value]
    elif len(index.get(key, [])) > 1:
        raise ConfigError(f"{key}: ambiguous, it is in {index[key]}; write the dotted path")
    from async_rl.slime_flags import explain  # a slime option with no field here says why, and what instead
    if explain(key):
        raise ConfigError(explain(key))
    all_keys = [p for paths in index.values() for p in paths] + list(index)
    close = difflib.get_close_matches(key, all_keys, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `async-rl config --doc`"
    raise ConfigError(f"{key}: unknown config field{hint}")


def _coerce(sec: str, name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    section_cls = type(getattr(Config(), sec))
    typ = get_type_hints(section_cls)[name]
    where = f"{sec}.{name}={value!r}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: must be true or false")
    if typ is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a map such as {{threshold: 0.5}}")
        return dict(value)
    if typ is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if isinstance(value, (int, str)):  # one value where a list is expected: a list of one
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list such as [0, 1]")
        return value
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: must be a number, not a boolean")
        try:
            num = float(value) if typ is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: must be {'an integer' if typ is int else 'a number'}") from None
        if typ is int and (isinstance(num, float) and not num.is_integer()):
            raise ConfigError(f"{where}: must be an integer")
        return typ(num)
    text = "" if value is None else str(value)
    allowed = field_choices(section_cls, name)
    if allowed is not None and text not in allowed:
        raise ConfigError(f"{where}: must be one of {list(allowed)}")
    return text


def parse_override(word: str) -> tuple[str, str, Any]:
    if "=" not in word:
        raise ConfigError(f"{word!r}: overrides are key=value words, e.g. rollout.n_samples_per_prompt=8")
    key, _, raw = word.partition("=")
    sec, name = resolve_key(key.strip())
    value = yaml.safe_load(raw) if raw.strip() else ""
    return sec, name, _coerce(sec, name, value)


def apply(cfg: Config, sec: str, name: str, value: Any) -> None:
    setattr(getattr(cfg, sec), name, _coerce(sec, name, value))


def from_dict(data: dict | None) -> Config:
    cfg = Config()
    for sec, values in (data or {}).items():
        if sec not in SECTIONS:
            close = difflib.get_close_matches(sec, SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; sections are {SECTIONS}"
            raise ConfigError(f"{sec}: unknown config section{hint}")
        if not isinstance(values, dict):
            raise ConfigError(f"{sec}: must be a mapping of field: value")
        for name, value in values.items():
            resolve_key(f"{sec}.{name}")
            apply(cfg, sec, name, value)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load YAML (if given), apply `key=value` overrides, derive and validate; raises ConfigError."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p}: not found")
        data = yaml.safe_load(p.read_text()) or {}
    cfg = from_dict(data)
    for word in overrides:
        apply(cfg, *parse_override(word))
    from async_rl import custom_config  # slime's --custom-config-path, applied last as slime does
    custom_config.apply(cfg)
    finalize(cfg)
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

