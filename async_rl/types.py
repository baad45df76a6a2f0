"""Shared trajectory types and their wire form.

A `Group` is the unit the buffer stores: the `n_samples_per_prompt` trajectories of one prompt, keyed by
(`generator_id`, `seq`) so an insert can be made idempotent. Its `behavior_version` is the min over all
its tokens' versions, so staleness is never under-counted.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from async_rl.wire import WireError

_TRAJ_ARRAYS = {"prompt_ids": np.int32, "response_ids": np.int32, "rollout_logprobs": np.float32,
                "token_versions": np.int32}


@dataclass
class Trajectory:
    prompt_ids: np.ndarray          # int32 [P]
    response_ids: np.ndarray        # int32 [R], includes the stop token when one ended it
    rollout_logprobs: np.ndarray    # float32 [R], engine logprobs under the sampling distribution
    token_versions: np.ndarray      # int32 [R], weight version that produced each response token
    reward: float = 0.0
    finish_reason: str = "stop"
    response_text: str = ""
    # optional uint8 [R]: 1 = train on this response token, 0 = exclude it from the loss (tool / environment
    # output in a multi-turn sample, or an older version's tokens with mask_offpolicy_in_partial_rollout).
    # None = every response token counts. Absent on the wire when None.
    loss_mask: np.ndarray | None = None

    @functools.cached_property
    def behavior_version(self) -> int:  # cached: the hub asks on every staleness check
        return int(self.token_versions.min()) if len(self.token_versions) else -1

    def to_wire(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "response_ids": self.response_ids,
                "rollout_logprobs": self.rollout_logprobs, "token_versions": self.token_versions,
                "reward": float(self.reward), "finish_reason": self.finish_reason,
                "response_text": self.response_text,
                **({} if self.loss_mask is None else {"loss_mask": np.asarray(self.loss_mask, np.uint8)})}

    @classmethod
    def from_wire(cls, d: dict) -> "Trajectory":
        try:
            arrays = {k: np.asarray(d[k], dtype=t) for k, t in _TRAJ_ARRAYS.items()}
            mask = d.get("loss_mask")
            traj = cls(**arrays, reward=float(d["reward"]), finish_reason=str(d.get("finish_reason", "")),
                       response_text=str(d.get("response_text", "")),
                       loss_mask=None if mask is None else np.asarray(mask, dtype=np.uint8))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed trajectory: {exc!r}") from None
        r = len(traj.response_ids)
        if r == 0 or len(traj.rollout_logprobs) != r or len(traj.token_versions) != r:
            raise WireError(f"trajectory arrays disagree: response_ids {r}, rollout_logprobs "
                            f"{len(traj.rollout_logprobs)}, token_versions {len(traj.token_versions)} (need equal, > 0)")
        if traj.loss_mask is not None and len(traj.loss_mask) != r:
            raise WireError(f"trajectory loss_mask has {len(traj.loss_mask)} entries for {r} response tokens")
        return traj


@dataclass
class Group:
    generator_id: str
    seq: int
    prompt_index: int
    label: str
    trajectories: list[Trajectory]
    prompt_text: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.generator_id, self.seq)

    @functools.cached_property
    def behavior_version(self) -> int:
        return min(t.behavior_version for t in self.trajectories)

    @property
    def num_tokens(self) -> int:
        return sum(len(t.prompt_ids) + len(t.response_ids) for t in self.trajectories)

    def to_wire(self) -> dict:
        return {"generator_id": self.generator_id, "seq": self.seq, "prompt_index": self.prompt_index,
                "label": self.label, "prompt_text": self.prompt_text, "meta": self.meta,
                "trajectories": [t.to_wire() for t in self.trajectories]}

    @classmethod
    def from_wire(cls, d: dict) -> "Group":
        if not isinstance(d, dict):
            raise WireError(f"group must be a map, got {type(d).__name__}")
        try:
            trajs = [Trajectory.from_wire(t) for t in d["trajectories"]]
            group = cls(generator_id=str(d["generator_id"]), seq=int(d["seq"]),
                        prompt_index=int(d["prompt_index"]), label=str(d["label"]), trajectories=trajs,
                        prompt_text=str(d.get("prompt_text", "")), meta=dict(d.get("meta") or {}))
        except WireError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed group: missing or bad field {exc!r}") from None
        if not trajs:
            raise WireError("group has no trajectories")
        return group
