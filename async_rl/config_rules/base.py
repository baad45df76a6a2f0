"""What every section's rules share: ConfigError, a field's `Literal` choices, and the small checks
(`at_least`, `one_of`, `dotted_path`, `torch_device_problem`) whose messages name the field, the value and the fix.

Invariant: nothing here imports `async_rl.config` (which imports this package); choices are read off the
`Literal[...]` annotation of the section class a rule is given.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Literal, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from async_rl.config import Config


class ConfigError(ValueError):
    """A config value a user can fix; the message names the field, the value and the fix."""


@functools.lru_cache(maxsize=None)
def _hints(section_cls: type) -> dict:
    return get_type_hints(section_cls)


def field_choices(section_cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` config field (None for a free field): the one list of them."""
    typ = _hints(section_cls)[name]
    return get_args(typ) if get_origin(typ) is Literal else None


def check_choices(cfg: "Config") -> None:
    """Every `Literal[...]` field of every section holds one of its choices."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            allowed = field_choices(type(obj), f.name)
            if allowed is not None:
                one_of(sec.name, obj, f.name, allowed)


def at_least(sec: str, obj, name: str, low: float) -> None:
    value = getattr(obj, name)
    if value < low:
        raise ConfigError(f"{sec}.{name}={value}: must be >= {low}")


def one_of(sec: str, obj, name: str, allowed: tuple) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{sec}.{name}={value!r}: must be one of {list(allowed)}")


def dotted_path(sec: str, obj, name: str) -> None:
    value = getattr(obj, name)
    if value and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
        raise ConfigError(f"{sec}.{name}={value!r}: must be a dotted path `module.function`, e.g. mypkg.rewards.score")


def torch_device_problem(value: str) -> str:
    """'' when `value` names a torch device async-rl can place a model on (cpu, cuda, cuda:N), else why not."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value or ""):
        return "not a device; use cpu, cuda or cuda:N"
    return ""
