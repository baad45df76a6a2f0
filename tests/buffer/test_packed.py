"""Groups kept packed in the hub (async_rl.types.PackedGroup) accept and reject exactly what
Group.from_wire does, and what they store decodes to the Group that Group.from_wire builds (the reference);
`wire.encode` splices packed values into byte-identical messages."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_rl import wire
from async_rl.types import Group, PackedGroup, Trajectory


def reference(data: bytes):
    """What the hub built before groups were kept packed: a full decode and Group.from_wire."""
    try:
        return Group.from_wire(wire.decode_value(data))
    except (wire.WireError, KeyError, TypeError, ValueError) as exc:
        return exc


def assert_same_group(a: Group, b: Group) -> None:
    assert (a.generator_id, a.seq, a.prompt_index, a.label, a.prompt_text) == \
           (b.generator_id, b.seq, b.prompt_index, b.label, b.prompt_text)
    assert wire.pack_value(a.meta) == wire.pack_value(b.meta)  # (may hold arrays)
    assert a.behavior_version == b.behavior_version and len(a.trajectories) == len(b.trajectories)
    for x, y in zip(a.trajectories, b.trajectories):
        for name in ("prompt_ids", "response_ids", "rollout_logprobs", "token_versions"):
            assert getattr(x, name).dtype == getattr(y, name).dtype
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert (x.reward, x.finish_reason, x.response_text) == (y.reward, y.finish_reason, y.response_text)
        assert (x.loss_mask is None) == (y.loss_mask is None)
        if x.loss_mask is not None:
            np.testing.assert_array_equal(x.loss_mask, y.loss_mask)


def traj(r: int, version: int = 3, mask: bool = False) -> Trajectory:
    rng = np.random.default_rng(r)
    return Trajectory(np.arange(5, dtype=np.int32), rng.integers(0, 100, r).astype(np.int32),
                      -rng.random(r).astype(np.float32), (version + rng.integers(0, 3, r)).astype(np.int32),
                      reward=float(r % 2), loss_mask=(np.arange(r) % 2).astype(np.uint8) if mask else None)


def test_canonical_group_takes_the_fast_path_and_keeps_its_bytes():
    g = Group("gen", 7, 3, "lab", [traj(4), traj(6, version=1, mask=True)], prompt_text="p", meta={"a": 1})
    data = wire.pack_value(g.to_wire())
    packed = PackedGroup.from_wire(wire.Packed(data))
    assert packed.data is data  # stored as it came, not re-encoded
    assert packed.key == ("gen", 7) and packed.behavior_version == g.behavior_version == 1
    assert packed.rewards == (0.0, 0.0) and packed.response_lengths == (4, 6)
    assert_same_group(packed.to_group(), reference(data))


# every way a field can deviate from canonical form: other dtypes, lists, 2-D, bools, missing or extra keys,
# arrays where metadata goes, bad lengths, empty responses, hostile values
ARRAY_FIELDS = ("prompt_ids", "response_ids", "rollout_logprobs", "token_versions", "loss_mask")
ARRAY_VARIANTS = ("i4", "i8", "f4", "f8", "u1", "list", "2d", "empty", "short", "long", "str", "absent")
SCALAR_FIELDS = ("generator_id", "seq", "prompt_index", "label", "prompt_text", "meta", "reward", "finish_reason",
                 "response_text")
SCALAR_VARIANTS = ("bool", "int", "float", "str", "none", "absent", "array", "map", "map_with_array", "list")
MUTATIONS = st.one_of(st.tuples(st.sampled_from(ARRAY_FIELDS), st.sampled_from(ARRAY_VARIANTS)),
                      st.tuples(st.sampled_from(SCALAR_FIELDS), st.sampled_from(SCALAR_VARIANTS)),
                      st.tuples(st.sampled_from(["group_extra", "traj_extra", "no_trajectories", "traj_not_map"]),
                                st.just("")))


def array_variant(kind: str, n: int):
    base = np.arange(n) % 5
    return {"i4": base.astype(np.int32), "i8": base.astype(np.int64), "f4": base.astype(np.float32),
            "f8": base.astype(np.float64), "u1": base.astype(np.uint8), "list": base.tolist(),
            "2d": np.stack([base, base]).astype(np.int32), "empty": np.zeros(0, np.int32),
            "short": base[:-1].astype(np.int32), "long": np.arange(n + 1, dtype=np.int32), "str": "abc"}[kind]


def scalar_variant(kind: str):
    return {"bool": True, "int": 3, "float": 1.5, "str": "7", "none": None, "array": np.arange(2, dtype=np.int32),
            "map": {"k": 1}, "map_with_array": {"k": np.arange(3)}, "list": [1, "a"]}[kind]


@settings(max_examples=500, deadline=None)
@given(n=st.integers(1, 4), ntraj=st.integers(1, 2), mask=st.booleans(),
       mutations=st.lists(MUTATIONS, max_size=2))
def test_packed_accepts_and_rejects_exactly_as_group_from_wire(n, ntraj, mask, mutations):
    trajs = [traj(n, mask=mask).to_wire() for _ in range(ntraj)]
    g = {**Group("g", 4, 2, "l", [], prompt_text="p", meta={"m": 1}).to_wire(), "trajectories": trajs}
    t = trajs[-1]
    for field, kind in mutations:
        where = t if field in ARRAY_FIELDS or field in ("reward", "finish_reason", "response_text") else g
        if kind == "absent":
            where.pop(field, None)
        elif field in ARRAY_FIELDS:
            where[field] = array_variant(kind, n)
        elif field in SCALAR_FIELDS:
            where[field] = scalar_variant(kind)
        elif field == "group_extra":
            g["unknown"] = 1
        elif field == "traj_extra":
            t["unknown"] = [1]
        elif field == "no_trajectories":
            g["trajectories"] = []
        else:
            g["trajectories"] = [*trajs[:-1], "not a map"]
    data = wire.pack_value(g)
    want = reference(data)
    try:
        got = PackedGroup.from_wire(wire.Packed(data))
    except (wire.WireError, KeyError, TypeError, ValueError) as exc:
        assert isinstance(want, Exception), f"packed refused what Group.from_wire accepts: {exc!r}"
        return
    assert not isinstance(want, Exception), f"packed accepted what Group.from_wire refuses: {want!r}"
    assert got.behavior_version == want.behavior_version and got.key == want.key
    assert got.rewards == tuple(float(t.reward) for t in want.trajectories)
    assert got.response_lengths == tuple(len(t.response_ids) for t in want.trajectories)
    assert_same_group(got.to_group(), want)  # what the learner decodes is what the hub used to hand out


def test_encode_splices_packed_values_byte_for_byte():
    groups = [Group("g", i, i, "l", [traj(3 + i)]).to_wire() for i in range(3)]
    plain = wire.encode({"type": "BATCH", "rid": "r", "groups": groups, "stats": {"a": 1}})
    spliced = wire.encode({"type": "BATCH", "rid": "r", "groups": [wire.Packed(wire.pack_value(g)) for g in groups],
                           "stats": {"a": 1}})
    assert spliced == plain
    nested = wire.encode({"type": "X", "inner": {"g": wire.Packed(wire.pack_value(groups[0]))}})
    assert wire.decode(nested)["inner"]["g"]["seq"] == 0  # deeper than top level: encoded again, same value


def test_decode_cuts_packed_values_out_and_refuses_trailing_bytes():
    msg = {"type": "PUT", "groups": [{"seq": 1}, {"seq": 2}], "group": {"seq": 3}, "rid": "r"}
    data = wire.encode(msg)
    out = wire.decode(data, packed=("group", "groups"))
    assert [type(g) for g in out["groups"]] == [wire.Packed, wire.Packed] and isinstance(out["group"], wire.Packed)
    assert [g["seq"] for g in out["groups"]] == [1, 2] and out["group"]["seq"] == 3
    assert wire.encode(out) == data
    with pytest.raises(wire.WireError, match="extra data"):
        wire.decode(data + b"\x00", packed=("group",))
    with pytest.raises(wire.WireError):
        wire.decode(data[:-3], packed=("group",))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([0, 1, 7, 256, 65536, -1, 2**31 - 1, -2**31]), min_size=1, max_size=12),
       uniform=st.booleans())
def test_behavior_version_is_the_min_token_version(values, uniform):
    versions = np.array([values[0]] * len(values) if uniform else values, np.int32)
    t = Trajectory(np.zeros(1, np.int32), np.zeros(len(versions), np.int32), np.zeros(len(versions), np.float32),
                   versions)
    packed = PackedGroup.from_wire(wire.Packed(wire.pack_value(Group("g", 0, 0, "x", [t]).to_wire())))
    assert packed.behavior_version == int(versions.min())  # the reference: numpy's min


def test_a_log_written_before_groups_were_packed_still_replays(tmp_path):
    """WAL records of older hubs carry the decoded group map ("group") instead of its bytes ("blob")."""
    from async_rl import config as C
    from buffer.durable import DurableLog
    from buffer.hub import Hub

    cfg = C.load(None, ["rollout_batch_size=1", "n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus", "max_staleness=5"])
    old = Group("g", 0, 0, "x", [traj(3, version=0)])
    log = DurableLog(tmp_path)
    log.recover()
    log.append({"op": "put", "group": old.to_wire(), "stats": {}, "priority": 1.0})
    log.close()
    hub = Hub(cfg, [{"input": "1+1=", "label": "2"}], DurableLog(tmp_path))
    replies = hub.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0})
    batch = [r for _, r in replies if r["type"] == "BATCH"][0]
    got = Group.from_wire(wire.decode(wire.encode(batch))["groups"][0])  # as the learner receives it
    assert_same_group(got, old)


def test_a_snapshot_whose_table_holds_unpacked_groups_loads_them_packed(tmp_path):
    """Tables pickled before the hub kept groups packed hold Group objects; the snapshot loader packs them, so
    nothing after it (BATCH replies, in-flight snapshots) needs to know the difference."""
    from async_rl import config as C
    from buffer.durable import DurableLog
    from buffer.hub import Hub

    cfg = C.load(None, ["rollout_batch_size=1", "n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus",
                        "max_staleness=5", "snapshot_interval=1"])
    prompts = [{"input": "1+1=", "label": "2"}]
    old = [Group("g", seq, seq, "x", [traj(3 + seq, version=0)]) for seq in range(2)]
    hub = Hub(cfg, prompts, DurableLog(tmp_path))
    hub.handle(b"g", {"type": "PUT", "groups": [g.to_wire() for g in old]})
    hub.state.table.map_groups(PackedGroup.to_group)  # as an older hub held them
    hub.log.snapshot(hub.state.to_snapshot())
    reborn = Hub(cfg, prompts, DurableLog(tmp_path))
    assert all(type(e[1]) is PackedGroup for e in reborn.state.table.entries())
    for want in old:
        replies = reborn.handle(b"l", {"type": "SAMPLE", "learner_id": "L", "num_groups": 1})
        batch = [r for _, r in replies if r["type"] == "BATCH"][0]
        assert_same_group(Group.from_wire(wire.decode(wire.encode(batch))["groups"][0]), want)
        reborn.state.to_snapshot()  # the in-flight batch snapshots as bytes
        reborn.handle(b"l", {"type": "ACK", "learner_id": "L", "lease": batch["lease"]})


def test_decoded_groups_are_views_into_the_message_until_stored():
    g = Group("gen", 1, 0, "lab", [traj(8)])
    data = wire.encode({"type": "PUT", "group": g.to_wire(), "rid": "r"})
    packed = wire.decode(data, packed=("group",))["group"]
    assert type(packed.data) is memoryview and packed.data.readonly and packed.data.obj is data  # no copy on receipt
    group = PackedGroup.from_wire(packed)
    assert group.data.obj is data
    assert group.own() is group and type(group.data) is bytes and group.data == bytes(packed.data)
    assert_same_group(group.to_group(), g)
    # a writable buffer may change under the hub: it is copied on receipt
    buf = bytearray(wire.pack_value(g.to_wire()))
    for source in (buf, memoryview(buf)):
        kept = PackedGroup.from_wire(source)
        assert type(kept.data) is bytes
    buf[:] = b"\x00" * len(buf)
    assert_same_group(kept.to_group(), g)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["ok", "truncated", "extra", "garbage", "big"]),
                                st.integers(0, 1000)), min_size=1, max_size=12))
def test_the_reused_unpacker_decodes_every_message_as_a_fresh_decode_would(steps):
    """wire.decode(..., packed=...) reuses one Unpacker per thread; whatever came before (a truncated message,
    trailing bytes, garbage, one larger than its buffer), each message decodes as msgpack.unpackb says."""
    import msgpack
    for kind, n in steps:
        msg = {"type": "PUT", "group": {"seq": n, "x": "y" * (n % 50)}, "rid": str(n),
               "groups": [{"seq": i} for i in range(n % 3)]}
        if kind == "big":
            msg["pad"] = b"p" * (wire._UNPACKER_BUFFER + n)
        data = wire.encode(msg)
        data = {"truncated": data[:max(1, n % len(data))], "extra": data + b"\xc0",
                "garbage": bytes([0x80 + n % 16]) + data[1:n % 40]}.get(kind, data)
        try:
            reference = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            reference = None
        try:
            out = wire.decode(data, packed=("group", "groups"))
        except wire.WireError:
            out = None
        if reference is None or not isinstance(reference, dict) or reference.get("schema") != wire.SCHEMA_VERSION:
            assert out is None
            continue
        assert out is not None
        assert {k: (v.value if isinstance(v, wire.Packed) else [x.value for x in v] if k == "groups" else v)
                for k, v in out.items()} == reference
