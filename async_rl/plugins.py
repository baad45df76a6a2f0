"""Load user functions by dotted path (`package.module.fn`), failing at start-up with a clear error."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable


class PluginError(ValueError):
    pass


_CUSTOM_CONFIG: dict = {}


def custom_config() -> dict:
    """The settings of rollout.custom_config_path (slime's --custom-config-path) of the config this process
    loaded last: what a reward, filter or loss plug-in reads its own parameters from, e.g.
    `custom_config().get("min_len", 10)`."""
    return dict(_CUSTOM_CONFIG)


def set_custom_config(settings: dict) -> None:
    global _CUSTOM_CONFIG
    _CUSTOM_CONFIG = dict(settings)


def load_function(path: str, field: str, num_params: int | None = None) -> Callable:
    """Import `module.attr` named by config field `field`; check it is callable with `num_params` args."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise PluginError(f"{field}={path!r}: must be a dotted path like mypkg.rewards.score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{field}={path!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PluginError(f"{field}={path!r}: {module_name} has no function {attr!r}")
    if num_params is not None:
        try:
            inspect.signature(fn).bind(*range(num_params))
        except TypeError:
            raise PluginError(f"{field}={path!r}: {attr}{inspect.signature(fn)} cannot take {num_params} "
                              f"positional arguments; see the field's doc for the signature") from None
    return fn
