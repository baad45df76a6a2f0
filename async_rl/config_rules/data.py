"""Rules of the data section (prompt data). Its data.rollout_max_prompt_len default and bound against
rollout.rollout_max_context_len are in rollout.py (`_context_rules`), where that context length is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    d = cfg.data
    at_least("data", d, "rollout_max_prompt_len", 0)
    if d.apply_chat_template_kwargs:
        import yaml
        try:
            kwargs = yaml.safe_load(d.apply_chat_template_kwargs)
        except yaml.YAMLError as e:
            raise ConfigError(f"data.apply_chat_template_kwargs={d.apply_chat_template_kwargs!r}: not YAML/JSON "
                              f"({e})") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"data.apply_chat_template_kwargs={d.apply_chat_template_kwargs!r}: must be a map, "
                             "e.g. '{enable_thinking: false}'")
