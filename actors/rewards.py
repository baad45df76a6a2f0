"""Rule-based rewards (the rm hub): each is fn(prompt: str, response: str, label) -> float."""
from __future__ import annotations

from typing import Callable

from async_rl.plugins import load_function


def exact_match(prompt: str, response: str, label) -> float:
    """1.0 when the response, stripped of whitespace, equals the label's text; else 0.0."""
    return float(response.strip() == str(label).strip())


BUILTIN = {"exact_match": exact_match}


def get_reward_fn(rm_type: str, custom_rm_path: str = "") -> Callable[[str, str, object], float]:
    if custom_rm_path:
        return load_function(custom_rm_path, "rollout.custom_rm_path", num_params=3)
    if rm_type not in BUILTIN:
        raise ValueError(f"rollout.rm_type={rm_type!r}: must be one of {sorted(BUILTIN)}")
    return BUILTIN[rm_type]
