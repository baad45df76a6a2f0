"""Priority functions: built-ins on Groups and their wire dicts, custom ones by dotted path, and the
finite-and-non-negative check on whatever a function returns."""
from __future__ import annotations

import math

import numpy as np
import pytest

from async_rl.plugins import PluginError
from async_rl.types import Group, Trajectory
from buffer import priorities as P


def group(rewards=(1.0, 0.0), versions=(3, 4), lengths=(2, 4)) -> Group:
    trajs = [Trajectory(np.array([1], np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.float32),
                        np.full(n, v, np.int32), reward=r) for r, v, n in zip(rewards, versions, lengths)]
    return Group("g0", 7, 0, "0", trajs)


@pytest.mark.parametrize("as_wire", [False, True])
def test_builtins(as_wire):
    def g(**kw):
        return group(**kw).to_wire() if as_wire else group(**kw)
    assert P.reward_variance(g(rewards=(1.0, 1.0)), 0) == 0.0  # GRPO learns nothing from a flat group
    assert P.reward_variance(g(rewards=(1.0, 0.0)), 0) == 0.25
    assert P.freshness(g(versions=(3, 4)), 3) == 1.0  # behavior_version 3 at version 3
    assert P.freshness(g(versions=(3, 4)), 5) == 1 / 3
    assert P.response_length(g(lengths=(2, 4)), 0) == 3.0
    assert P.constant(g(), 0) == 1.0


def test_resolve_builtins_and_dotted_paths():
    assert P.resolve("reward_variance") is P.reward_variance
    assert P.resolve("buffer.priorities.response_length") is P.response_length
    with pytest.raises(ValueError, match=r"buffer.priority_fn='variance': not a built-in"):
        P.resolve("variance")
    with pytest.raises(PluginError, match="cannot import"):
        P.resolve("no_such_module.fn")
    with pytest.raises(PluginError, match="cannot take 2"):
        P.resolve("math.sqrt")  # the contract is fn(group, version)


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf, "high", None])
def test_compute_rejects_bad_values_naming_the_function_and_group(bad):
    def bad_priority(group, version):
        return bad
    with pytest.raises(ValueError, match=r"bad_priority returned .* for group \('g0', 7\)"):
        P.compute(bad_priority, group(), 0)
    assert P.compute(P.reward_variance, group(), 0) == 0.25
