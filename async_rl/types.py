"""Shared trajectory types and their wire form.

A `Group` is the unit the buffer stores: the `n_samples_per_prompt` trajectories of one prompt, keyed by
(`generator_id`, `seq`) so an insert can be made idempotent. Its `behavior_version` is the min over all
its tokens' versions, so staleness is never under-counted.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import numpy as np

from async_rl import wire
from async_rl.wire import Packed, WireError

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
        if isinstance(d, Packed):
            d = d.value
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


_GROUP_KEYS = frozenset({"generator_id", "seq", "prompt_index", "label", "prompt_text", "meta", "trajectories"})
_TRAJ_KEYS = frozenset(_TRAJ_ARRAYS) | {"reward", "finish_reason", "response_text", "loss_mask"}
# canonical 1-D arrays: (ext payload prefix, its length + 8 (the int64 length), itemsize)
_CANON = {k: (wire.array_header(t), len(wire.array_header(t)) + 8, np.dtype(t).itemsize) for k, t in _TRAJ_ARRAYS.items()}
_MASK = (wire.array_header(np.uint8), len(wire.array_header(np.uint8)) + 8, 1)
_LEN = struct.Struct("<q")
_LEN_I4 = struct.Struct("<i")


class PackedGroup:
    """A group as the hub keeps it: its wire bytes (`data`, what a learner's BATCH carries, spliced in
    unchanged) plus the few fields the hub reads (key, behavior_version, rewards, response lengths).

    `from_wire` accepts exactly what `Group.from_wire` accepts: a group already in canonical form (the
    fields and dtypes `Group.to_wire` writes, 1-D arrays) is checked on its array headers without building
    arrays; anything else goes through `Group.from_wire` (same conversions, same errors) and is stored in
    canonical form, so every stored `data` decodes to the Group that `Group.from_wire` would have built."""
    __slots__ = ("generator_id", "seq", "behavior_version", "rewards", "response_lengths", "data", "prompt_index")

    def __init__(self, generator_id: str, seq: int, behavior_version: int, rewards: tuple,
                 response_lengths: tuple, data: bytes, prompt_index: int = -1):
        self.generator_id, self.seq, self.behavior_version = generator_id, seq, behavior_version
        self.rewards, self.response_lengths, self.data = rewards, response_lengths, data
        self.prompt_index = prompt_index

    @property
    def key(self) -> tuple[str, int]:
        return (self.generator_id, self.seq)

    @property
    def num_trajectories(self) -> int:
        return len(self.rewards)

    def packed(self) -> Packed:
        return Packed(self.data)

    def own(self) -> "PackedGroup":
        """Make `data` bytes of its own. A group from `wire.decode` holds a view into its whole message;
        the hub copies it out where the group is stored (after the PUT's ACK has gone out), not on receipt."""
        if type(self.data) is not bytes:
            self.data = bytes(self.data)
        return self

    def to_group(self) -> Group:
        return Group.from_wire(wire.decode_value(self.data))

    @classmethod
    def from_group(cls, group: Group) -> "PackedGroup":
        return cls(group.generator_id, group.seq, group.behavior_version,
                   tuple(float(t.reward) for t in group.trajectories),
                   tuple(len(t.response_ids) for t in group.trajectories), wire.pack_value(group.to_wire()),
                   group.prompt_index)

    @classmethod
    def from_wire(cls, w) -> "PackedGroup":
        """From a Packed group (as `wire.decode(..., packed=...)` gives), its bytes, or a decoded map."""
        if isinstance(w, Packed):
            w = w.data
        if isinstance(w, memoryview) and not w.readonly or isinstance(w, bytearray):
            w = bytes(w)  # a view into bytes is kept as it is (see `own`); a mutable buffer is copied
        if isinstance(w, (bytes, memoryview)):
            fast = _scan(wire.peek_value(w), w)
            if fast is not None:
                return fast
            w = wire.decode_value(w)  # not canonical: decoded in full, exactly as before
        return cls.from_group(Group.from_wire(w))


def _length(ext, canon) -> int:
    """Length of a canonical 1-D array given as slice(ext_code, ext_bytes), or -1 if it is anything else
    (another type, dtype or rank, or a payload whose length disagrees with its header)."""
    if type(ext) is not slice or ext.start != wire._ARRAY_EXT:
        return -1
    data = ext.stop
    prefix, head, itemsize = canon
    if not data.startswith(prefix) or len(data) < head:
        return -1
    n = _LEN.unpack_from(data, head - 8)[0]
    return n if n >= 0 and len(data) - head == n * itemsize else -1


def _min_version(data: bytes, head: int, r: int) -> int:
    """Min of the r int32 token versions at data[head:]. Usually a whole trajectory has one version: when
    the 4r bytes equal the first 4 repeated r times, every value is the first (one memcmp, no array built;
    a byte search for them costs ~10x more, one hit per token); mixed versions take numpy's min."""
    first = data[head:head + 4]
    if data[head:head + 4 * r] == first * r:
        return _LEN_I4.unpack(first)[0]
    return int(np.frombuffer(data, np.int32, r, head).min())


def _has_ext(value, depth: int = 0) -> bool:
    if type(value) is slice or depth > 32:
        return True
    if type(value) is dict:
        return any(_has_ext(k, depth + 1) or _has_ext(v, depth + 1) for k, v in value.items())
    if type(value) is list:
        return any(_has_ext(v, depth + 1) for v in value)
    return False


def _scan(d, data: bytes) -> PackedGroup | None:
    """The PackedGroup of a group map (as `wire.peek_value` gives it) in canonical form, or None (then the
    caller takes the slow path, which accepts or rejects exactly as Group.from_wire does)."""
    if type(d) is not dict or not d.keys() <= _GROUP_KEYS:
        return None
    gid, seq, trajs, meta = d.get("generator_id"), d.get("seq"), d.get("trajectories"), d.get("meta")
    if (type(gid) is not str or type(seq) is not int or type(d.get("prompt_index")) is not int
            or type(d.get("label")) is not str or type(d.get("prompt_text", "")) is not str
            or not (meta is None or (type(meta) is dict and not (meta and _has_ext(meta))))
            or type(trajs) is not list or not trajs):
        return None
    rewards, lengths, bv = [], [], None
    ids_c, resp_c, lp_c, tv_c = _CANON.values()
    for t in trajs:
        if type(t) is not dict or not t.keys() <= _TRAJ_KEYS:
            return None
        r = _length(t.get("response_ids"), resp_c)
        tv, mask, reward = t.get("token_versions"), t.get("loss_mask"), t.get("reward")
        if (r <= 0 or _length(t.get("prompt_ids"), ids_c) < 0 or _length(t.get("rollout_logprobs"), lp_c) != r
                or _length(tv, tv_c) != r or type(reward) not in (float, int)
                or type(t.get("finish_reason", "")) is not str or type(t.get("response_text", "")) is not str
                or not (mask is None or _length(mask, _MASK) == r)):
            return None
        v = _min_version(tv.stop, tv_c[1], r)
        bv = v if bv is None or v < bv else bv
        rewards.append(float(reward))
        lengths.append(r)
    return PackedGroup(gid, seq, bv, tuple(rewards), tuple(lengths), data, d["prompt_index"])
