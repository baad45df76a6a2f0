"""Rules of the eval section, and `eval_datasets`, the one reading of eval.eval_prompt_data as (name, path)
pairs (the eval worker, evaluate and preflight use it). That the files exist is checked at launch (paths.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least, dotted_path

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    e = cfg.eval
    at_least("eval", e, "eval_max_prompts", 1)
    at_least("eval", e, "eval_max_response_len", 0)
    eval_datasets(e)
    for name in ("eval_interval",):
        at_least("eval", e, name, 0)
    at_least("eval", e, "n_samples_per_eval_prompt", 1)
    dotted_path("eval", e, "eval_function_path")
    at_least("eval", e, "eval_temperature", 0)
    if not 0 < e.eval_top_p <= 1:
        raise ConfigError(f"eval.eval_top_p={e.eval_top_p}: must be in (0, 1]")
    if e.eval_top_k == 0 or e.eval_top_k < -1:
        raise ConfigError(f"eval.eval_top_k={e.eval_top_k}: must be -1 (off) or >= 1")
    if e.n_samples_per_eval_prompt > 1 and e.eval_temperature == 0:
        raise ConfigError(f"eval.n_samples_per_eval_prompt={e.n_samples_per_eval_prompt} with eval_temperature=0: greedy "
                         f"samples are all the same, so pass@k would equal pass@1; set eval_temperature (e.g. 1.0)")
    if e.eval_interval and not e.eval_prompt_data:
        raise ConfigError(f"eval.eval_interval={e.eval_interval}: needs eval.eval_prompt_data (name/path pairs); set it, "
                         f"or eval_interval=0")


def eval_datasets(e) -> list[tuple[str, str]]:
    """eval.eval_prompt_data as (name, path) pairs: [path] names the set by its file stem."""
    data = [str(x) for x in e.eval_prompt_data]
    if len(data) == 1:
        return [(Path(data[0]).stem, data[0])]
    if len(data) % 2:
        raise ConfigError(f"eval.eval_prompt_data={data}: must be name/path pairs such as [add, data/test.jsonl, hard, "
                         f"data/hard.jsonl] (or one path); it has {len(data)} entries")
    pairs = list(zip(data[0::2], data[1::2]))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.eval_prompt_data={data}: names {names} repeat; give each eval set its own name")
    for name, _ in pairs:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ConfigError(f"eval.eval_prompt_data: name {name!r} must be letters, digits, '_', '-' or '.' (it becomes "
                             f"the metric key eval/<name>/pass@k); put the name before its path")
    return pairs
