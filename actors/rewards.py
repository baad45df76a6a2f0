"""Rewards: the generator's scorer, built from `rollout.rm_type`, `custom_rm_path`, `group_rm`, `rm_url`,
`reward_key` and `custom_reward_post_process_path` (slime's names).

Guarantees:
- Every plug-in path is imported and its signature checked when the scorer is built (generator start-up);
  a wrong path or signature raises `PluginError` naming the config field.
- Every reward a trajectory carries is a finite float. A reward fn may return a dict: its scalar is the
  entry `reward_key` (default: "reward", else "score"); the dicts travel in `group.meta["reward_details"]`.
  None, text, nan or a missing key raise `RewardError` naming the field, never a silent 0.
- `group_rm`: `custom_rm_path` scores the n responses of a prompt in one call and must return n rewards.
- Post-processing (`custom_reward_post_process_path`) maps one group's rewards to n new finite rewards;
  the rewards before it are kept in `group.meta["raw_rewards"]`.
"""
from __future__ import annotations

import inspect
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from actors.rm_hub import RewardError
from actors.rm_hub.dapo import dapo_reward
from actors.rm_hub.deepscaler import deepscaler_reward
from actors.rm_hub.f1 import f1_reward
from actors.rm_hub.gpqa import gpqa_reward
from actors.rm_hub.math_utils import math_reward
from actors.rm_hub.remote import RemoteRM
from async_rl.config import RolloutConfig, field_choices
from async_rl.plugins import PluginError, load_function
from async_rl.types import Group

__all__ = ["BUILTIN", "RM_TYPES", "RewardError", "RewardScorer", "get_reward_fn", "to_scalar"]


def exact_match(prompt: str, response: str, label) -> float:
    """1.0 when the response, stripped of whitespace, equals the label's text; else 0.0."""
    return float(response.strip() == str(label).strip())


BUILTIN = {"exact_match": exact_match, "math": math_reward, "dapo": dapo_reward, "deepscaler": deepscaler_reward,
           "f1": f1_reward, "gpqa": gpqa_reward}
RM_TYPES = field_choices(RolloutConfig, "rm_type")  # declared on the field; every one is implemented here:
if set(RM_TYPES) != {*BUILTIN, "remote_rm"}:
    raise ImportError(f"rollout.rm_type choices {RM_TYPES} and actors.rewards.BUILTIN {sorted(BUILTIN)} disagree")
_REMOTE_THREADS = 16  # concurrent requests to a remote RM; it is latency-bound, not CPU-bound


def load_plugin(path: str, field: str, num_params: int) -> Callable:
    """`load_function`, refusing async functions (the generator calls plug-ins synchronously)."""
    fn = load_function(path, field, num_params=num_params)
    if inspect.iscoroutinefunction(fn):
        raise PluginError(f"{field}={path!r}: is an async function; write a plain `def` (it is called "
                          f"synchronously, from worker threads where needed)")
    return fn


def get_raw_reward_fn(rm_type: str, custom_rm_path: str = "", *, rm_url: str = "", rm_timeout: float = 30.0,
                      rm_max_retries: int = 3) -> Callable[[str, str, object], object]:
    """The per-response reward fn(prompt, response, label) -> float | dict: custom_rm_path, else rm_type."""
    if custom_rm_path:
        return load_plugin(custom_rm_path, "rollout.custom_rm_path", 3)
    if rm_type == "remote_rm":
        return RemoteRM(rm_url, rm_timeout, rm_max_retries)
    if rm_type not in BUILTIN:
        raise PluginError(f"rollout.rm_type={rm_type!r}: must be one of {list(RM_TYPES)}")
    return BUILTIN[rm_type]


def get_reward_fn(rm_type: str, custom_rm_path: str = "", *, reward_key: str = "", rm_url: str = "",
                  rm_timeout: float = 30.0, rm_max_retries: int = 3) -> Callable[[str, str, object], float]:
    """Like `get_raw_reward_fn`, with dict rewards reduced to their scalar: fn(prompt, response, label) -> float."""
    raw = get_raw_reward_fn(rm_type, custom_rm_path, rm_url=rm_url, rm_timeout=rm_timeout,
                            rm_max_retries=rm_max_retries)
    source = _source(rm_type, custom_rm_path)
    return lambda prompt, response, label: to_scalar(raw(prompt, response, label), reward_key, source)


def _source(rm_type: str, custom_rm_path: str) -> str:
    return f"rollout.custom_rm_path={custom_rm_path!r}" if custom_rm_path else f"rollout.rm_type={rm_type!r}"


def to_scalar(value, reward_key: str, source: str) -> float:
    """A reward value -> finite float; dicts give their `reward_key` entry (default "reward", else "score")."""
    if isinstance(value, dict):
        key = reward_key or next((k for k in ("reward", "score") if k in value), "")
        if key not in value:
            hint = (f"rollout.reward_key={reward_key!r} is not one of" if reward_key
                    else "set rollout.reward_key to one of")
            raise RewardError(f"{source}: returned a dict with keys {sorted(map(str, value))}; {hint} them")
        value = value[key]
        source = f"{source} (entry {key!r})"
    if hasattr(value, "__float__") and not isinstance(value, str):  # int, float, bool, numpy scalars
        reward = float(value)
        if math.isfinite(reward):
            return reward
    raise RewardError(f"{source}: returned {value!r} ({type(value).__name__}); a reward must be a finite number "
                      f"or a dict of them")


def _wire_safe(detail: dict) -> dict:
    """A reward dict the msgpack wire can carry: plain scalars kept, anything else as its text."""
    safe = (str, int, float, bool, type(None))
    return {str(k): v if isinstance(v, safe) else str(v) for k, v in detail.items()}


class RewardScorer:
    """Scores the responses of one prompt as configured by a `RolloutConfig`; build once per generator."""

    def __init__(self, rollout):
        r = rollout
        self.reward_key = r.reward_key
        self.group_fn = self.sample_fn = self.post_fn = None
        if r.group_rm:
            if not r.custom_rm_path:
                raise PluginError("rollout.group_rm=true: needs rollout.custom_rm_path, a fn(prompt, responses: "
                                  "list[str], label) -> list[float]")
            self.group_fn = load_plugin(r.custom_rm_path, "rollout.custom_rm_path", 3)
        else:
            self.sample_fn = get_raw_reward_fn(r.rm_type, r.custom_rm_path, rm_url=r.rm_url,
                                               rm_timeout=r.rm_timeout, rm_max_retries=r.rm_max_retries)
        self.source = _source(r.rm_type, r.custom_rm_path)
        if r.custom_reward_post_process_path:
            self.post_source = f"rollout.custom_reward_post_process_path={r.custom_reward_post_process_path!r}"
            self.post_fn = load_plugin(r.custom_reward_post_process_path, "rollout.custom_reward_post_process_path", 2)
        remote = isinstance(self.sample_fn, RemoteRM)
        self.pool = ThreadPoolExecutor(_REMOTE_THREADS, thread_name_prefix="remote_rm") if remote else None

    def score(self, prompt: str, responses: list[str], label) -> tuple[list[float], list[dict | None]]:
        """(rewards, details): one finite float per response, and the dict each came from (else None)."""
        if self.group_fn is not None:
            raw = self.group_fn(prompt, list(responses), label)
            _check_length(raw, len(responses), f"{self.source} (group_rm=true)")
        elif self.pool is not None:
            raw = list(self.pool.map(lambda response: self.sample_fn(prompt, response, label), responses))
        else:
            raw = [self.sample_fn(prompt, response, label) for response in responses]
        rewards = [to_scalar(value, self.reward_key, self.source) for value in raw]
        return rewards, [value if isinstance(value, dict) else None for value in raw]

    def score_one(self, prompt: str, response: str, label) -> float:
        """The scalar reward of a single response (evaluation); a group_rm fn sees a group of one."""
        return self.score(prompt, [response], label)[0][0]

    def apply(self, group: Group, label) -> None:
        """Score `group`'s responses against `label`, post-process, and store the rewards on its trajectories."""
        rewards, details = self.score(group.prompt_text, [t.response_text for t in group.trajectories], label)
        if any(d is not None for d in details):
            group.meta["reward_details"] = [_wire_safe(d or {}) for d in details]
        for traj, reward in zip(group.trajectories, rewards):
            traj.reward = reward
        if self.post_fn is None:
            return
        group.meta["raw_rewards"] = list(rewards)
        out = self.post_fn(list(rewards), group)
        _check_length(out, len(rewards), self.post_source)
        for traj, value in zip(group.trajectories, out):
            traj.reward = to_scalar(value, "", self.post_source)


def _check_length(values, n: int, source: str) -> None:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:80]
        raise RewardError(f"{source}: returned {got}; expected a list of {n} rewards, one per response")
