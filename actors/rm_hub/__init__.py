"""The rm hub: built-in reward functions, one module per family (slime's `rm_hub`).

Every built-in has the signature fn(prompt: str, response: str, label) -> float | dict and is pure (the
same inputs give the same reward), except `remote_rm`, which asks an HTTP server. `actors.rewards` picks one
by `rollout.rm_type` and turns dicts into scalars with `rollout.reward_key`.
"""


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a reward; the message names the field."""
