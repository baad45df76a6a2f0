"""Wire encoding: arrays travel as raw bytes and round-trip exactly; malformed input raises WireError only."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from async_rl import wire
from async_rl.types import Group, Trajectory


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.uint8]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)))
def test_array_roundtrip(arr):
    out = wire.decode(wire.encode({"type": "X", "a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_arrays_are_raw_bytes_not_lists():
    ids = np.arange(100_000, 102_000, dtype=np.int32)
    logprobs = -np.linspace(0.01, 5, 2000, dtype=np.float32)
    raw = wire.encode({"ids": ids, "logprobs": logprobs})
    assert len(raw) < 2000 * 8 + 100
    assert len(msgpack.packb({"ids": ids.tolist(), "logprobs": logprobs.tolist()})) > 1.4 * len(raw)


def test_big_endian_input_is_normalised():
    arr = np.arange(5, dtype=">i4")
    out = wire.decode(wire.encode({"a": arr}))["a"]
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"schema": 99}),
                                     msgpack.packb({"schema": 1, "a": msgpack.ExtType(1, b"\x03<i4\x01")}),
                                     msgpack.packb({"schema": 1, "a": msgpack.ExtType(7, b"")})])
def test_malformed_raises_wire_error(payload):
    with pytest.raises(wire.WireError):
        wire.decode(payload)


def _group(seq=0, versions=(3, 4)):
    traj = Trajectory(np.array([1, 2], np.int32), np.array([5, 6], np.int32), np.array([-0.5, -1.0], np.float32),
                      np.array(versions, np.int32), reward=1.0, finish_reason="stop", response_text="x")
    return Group("g0", seq, 7, "12", [traj, traj], prompt_text="1+11=")


def test_group_roundtrip_and_behavior_version():
    g = _group()
    back = Group.from_wire(wire.decode(wire.encode({"group": g.to_wire()}))["group"])
    assert back.key == ("g0", 0) and back.label == "12" and back.behavior_version == 3
    np.testing.assert_array_equal(back.trajectories[1].rollout_logprobs, g.trajectories[1].rollout_logprobs)


def test_group_with_mismatched_arrays_is_rejected():
    d = _group().to_wire()
    d["trajectories"][0]["token_versions"] = np.array([1], np.int32)
    with pytest.raises(wire.WireError, match="disagree"):
        Group.from_wire(d)
    with pytest.raises(wire.WireError):
        Group.from_wire({"generator_id": "g"})
