"""The hub protocol (async_rl/protocol.py): every verb survives the wire unchanged, every malformed field is
refused with an error naming the verb, the field and the value, and nothing but ProtocolError escapes a parser."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_rl import protocol as P
from async_rl import wire
from async_rl.types import Group, Trajectory


def group(gid="g0", seq=0, n=2) -> Group:
    t = Trajectory(np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32), np.zeros(3, np.float32),
                   np.array([2, 2, 3], np.int32), reward=1.0)
    return Group(gid, seq, seq, "7", [t] * n)


def over_the_wire(req: P.Request, verbs=P.HUB_REQUESTS) -> P.Request:
    """As the hub reads it: encoded (with the rid a client adds), decoded with PUT's groups left packed."""
    data = wire.encode({**req.to_msg(), "rid": "r1"})
    return P.parse(wire.decode(data, packed=("groups",)), verbs)


REQUESTS = [
    P.Heartbeat(generator_id="gen-0"),
    P.Acquire(generator_id="gen-0"),
    P.Acquire(generator_id="gen-0", acquire_seq=12, max_groups=8),
    P.Drop(generator_id="gen-0", seq=3),
    P.Drop(generator_id="gen-0", seq=3, prompt_index=41, stats={"gen_tokens": 120, "busy_s": 0.5}),
    P.Sample(num_groups=4),
    P.Sample(num_groups=4, version=9, learner_id="L", ack_lease="abc-1", step=17),
    P.Ack(lease="abc-1"),
    P.Ack(lease="abc-1", learner_id="L"),
    P.Checkpoint(step=0),
    P.Checkpoint(step=20, learner_id="L"),
    P.Priority(updates=[["g0", 1, 0.25], ["g1", 0, 0.0]]),
    P.Version(version=3, weights_path="/run/weights/v3"),
    P.Set(knobs={"max_staleness": 2}),
    P.Set(learner={"optimizer.lr": 1e-6}, generator={"rollout.rollout_temperature": 0.7}),
    P.Stats(), P.Info(), P.Start(), P.Stop(),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.TYPE)
def test_every_hub_verb_round_trips_over_the_wire(req):
    back = over_the_wire(req)
    assert type(back) is type(req) and back.rid == "r1"
    assert back == type(req)(**{**req.__dict__, "rid": "r1"})


@pytest.mark.parametrize("req", [P.Versions(), P.Manifest(version=0), P.Chunk(version=3, name="model.safetensors", index=5)],
                         ids=lambda r: r.TYPE)
def test_every_weight_server_verb_round_trips(req):
    back = over_the_wire(req, P.WEIGHT_REQUESTS)
    assert back == type(req)(**{**req.__dict__, "rid": "r1"})
    with pytest.raises(P.ProtocolError, match="unknown message type"):
        P.parse(req.to_msg())  # not a hub verb


def test_every_verb_is_served_by_exactly_one_dataclass():
    assert len(P.HUB_REQUESTS) == 14 and set(P.HUB_REQUESTS).isdisjoint(P.WEIGHT_REQUESTS)
    assert all(cls.TYPE == kind for kind, cls in {**P.HUB_REQUESTS, **P.WEIGHT_REQUESTS}.items())


def test_put_round_trips_its_groups_as_the_bytes_the_generator_packed():
    groups = [group(seq=0), group(seq=1, n=3)]
    req = P.Put.of(groups, {"gen_tokens": 18, "busy_s": 1.5})
    back = over_the_wire(req)
    assert isinstance(back, P.Put) and back.stats == {"gen_tokens": 18, "busy_s": 1.5}
    assert [bytes(g.data) for g in back.groups] == [bytes(g.data) for g in req.groups]
    assert [(g.key, g.num_trajectories, g.behavior_version) for g in back.groups] == [(("g0", 0), 2, 2), (("g0", 1), 3, 2)]
    for got, sent in zip(back.groups, groups):
        assert got.to_group().to_wire().keys() == sent.to_wire().keys()
        np.testing.assert_array_equal(got.to_group().trajectories[0].token_versions, sent.trajectories[0].token_versions)
    # the bytes on the wire are those of the map a generator built before the protocol module existed
    old = wire.encode({"type": "PUT", "groups": [g.to_wire() for g in groups], "stats": req.stats, "rid": "r"})
    assert wire.encode({**req.to_msg(), "rid": "r"}) == old


def test_put_accepts_decoded_group_maps_as_an_in_process_caller_sends_them():
    back = P.parse({"type": "PUT", "groups": [group(seq=4).to_wire()]})
    assert back.groups[0].key == ("g0", 4) and back.stats == {}


def test_a_field_sent_as_none_takes_its_default_and_unknown_fields_are_ignored():
    req = P.parse({"type": "SAMPLE", "num_groups": 2, "learner_id": None, "version": None, "step": None,
                   "schema": 1, "future_field": [1, 2]})
    assert req == P.Sample(num_groups=2)
    assert req.learner_id == P.LEARNER_ID and req.version == 0 and req.step is None
    assert "step" not in P.Sample(num_groups=2).to_msg()  # None is not sent


def test_numpy_integers_count_as_integers():
    assert P.parse({"type": "SAMPLE", "num_groups": np.int64(3), "version": np.int32(1)}) == P.Sample(num_groups=3, version=1)


MALFORMED = [  # (message, what the error must say)
    ({"type": "NOPE"}, "type='NOPE': unknown message type; expected one of"),
    ({"type": 3}, "type=3: unknown message type"),
    ({}, "type=None: unknown message type"),
    ({"type": "HEARTBEAT"}, "HEARTBEAT: field 'generator_id' is missing"),
    ({"type": "HEARTBEAT", "generator_id": ""}, "HEARTBEAT generator_id='': must be a non-empty string"),
    ({"type": "ACQUIRE", "generator_id": 7}, "ACQUIRE generator_id=7: must be a non-empty string"),
    ({"type": "ACQUIRE", "generator_id": "g", "acquire_seq": -2}, "ACQUIRE acquire_seq=-2: must be an integer >= -1"),
    ({"type": "ACQUIRE", "generator_id": "g", "max_groups": 0}, "ACQUIRE max_groups=0: must be an integer >= 1"),
    ({"type": "ACQUIRE", "generator_id": "g", "max_groups": 2.5}, "ACQUIRE max_groups=2.5: must be an integer"),
    ({"type": "ACQUIRE", "generator_id": "g", "max_groups": True}, "ACQUIRE max_groups=True: must be an integer"),
    ({"type": "PUT"}, "PUT groups=None: must be a non-empty list of groups"),
    ({"type": "PUT", "groups": []}, "PUT groups=[]: must be a non-empty list"),
    ({"type": "PUT", "group": {"seq": 1}}, "PUT groups=None"),  # the one shape: a list under `groups`
    ({"type": "PUT", "groups": [{"generator_id": "g"}]}, "PUT groups[0]: malformed group"),
    ({"type": "PUT", "groups": ["text"]}, "PUT groups[0]:"),
    ({"type": "PUT", "groups": [group().to_wire()], "stats": [1]}, "PUT stats=[1]: must be a map with string keys"),
    ({"type": "PUT", "groups": [group().to_wire()], "stats": {"busy_s": "1"}}, "PUT stats.busy_s='1': must be a number"),
    ({"type": "DROP", "generator_id": "g"}, "DROP: field 'seq' is missing"),
    ({"type": "DROP", "generator_id": "g", "seq": "3"}, "DROP seq='3': must be an integer"),
    ({"type": "DROP", "generator_id": "g", "seq": 3, "prompt_index": 1.0}, "DROP prompt_index=1.0: must be an integer"),
    ({"type": "DROP", "generator_id": "g", "seq": 3, "stats": {"gen_tokens": None}}, "DROP stats.gen_tokens=None"),
    ({"type": "SAMPLE"}, "SAMPLE: field 'num_groups' is missing"),
    ({"type": "SAMPLE", "num_groups": "x"}, "SAMPLE num_groups='x': must be an integer >= 1"),
    ({"type": "SAMPLE", "num_groups": 0}, "SAMPLE num_groups=0: must be an integer >= 1"),
    ({"type": "SAMPLE", "num_groups": 1, "version": -1}, "SAMPLE version=-1: must be an integer >= 0"),
    ({"type": "SAMPLE", "num_groups": 1, "learner_id": 5}, "SAMPLE learner_id=5: must be a non-empty string"),
    ({"type": "SAMPLE", "num_groups": 1, "ack_lease": 5}, "SAMPLE ack_lease=5: must be a string"),
    ({"type": "SAMPLE", "num_groups": 1, "step": -3}, "SAMPLE step=-3: must be an integer >= 0"),
    ({"type": "ACK"}, "ACK: field 'lease' is missing"),
    ({"type": "ACK", "lease": ["a"]}, "ACK lease=['a']: must be a string"),
    ({"type": "ACK", "lease": "a", "learner_id": ""}, "ACK learner_id='': must be a non-empty string"),
    ({"type": "CHECKPOINT", "step": -1}, "CHECKPOINT step=-1: must be an integer >= 0"),
    ({"type": "CHECKPOINT", "step": 1, "learner_id": 2}, "CHECKPOINT learner_id=2"),
    ({"type": "PRIORITY"}, "PRIORITY: field 'updates' is missing"),
    ({"type": "PRIORITY", "updates": {"g": 1}}, "PRIORITY updates={'g': 1}: must be a list"),
    ({"type": "PRIORITY", "updates": [["g", 1]]}, "PRIORITY updates[0]=['g', 1]: must be [generator_id, seq, priority]"),
    ({"type": "PRIORITY", "updates": [[1, 1, 1.0]]}, "PRIORITY updates[0]=[1, 1, 1.0]"),
    ({"type": "PRIORITY", "updates": [["g", "1", 1.0]]}, "PRIORITY updates[0].seq='1': must be an integer"),
    ({"type": "PRIORITY", "updates": [["g", 1, "high"]]}, "PRIORITY updates[0].priority='high': must be a number"),
    ({"type": "PRIORITY", "updates": [["g", 1, -1.0]]}, "updates[0].priority=-1.0: priorities must be finite and >= 0"),
    ({"type": "PRIORITY", "updates": [["g", 1, float("inf")]]}, "priorities must be finite"),
    ({"type": "VERSION", "version": -1, "weights_path": "p"}, "VERSION version=-1: must be an integer >= 0 (versions only grow"),
    ({"type": "VERSION", "version": 1}, "VERSION: field 'weights_path' is missing"),
    ({"type": "VERSION", "version": 1, "weights_path": 9}, "VERSION weights_path=9: must be a string"),
    ({"type": "SET"}, "SET: no knobs given"),
    ({"type": "SET", "knobs": [1]}, "SET knobs=[1]: must be a map with string keys"),
    ({"type": "SET", "learner": {1: 2}}, "SET learner={1: 2}: must be a map"),
]


@pytest.mark.parametrize("msg, says", MALFORMED, ids=lambda x: x if isinstance(x, str) else None)
def test_each_malformed_field_is_refused_naming_it(msg, says):
    with pytest.raises(P.ProtocolError) as err:
        P.parse(msg)
    assert says in str(err.value)
    assert isinstance(err.value, wire.WireError)  # what every service already answers with an ERROR reply


@pytest.mark.parametrize("msg, says", [
    ({"type": "MANIFEST"}, "MANIFEST: field 'version' is missing"),
    ({"type": "MANIFEST", "version": "3"}, "MANIFEST version='3': must be an integer >= 0"),
    ({"type": "CHUNK", "version": 3, "name": "a", "index": "0"}, "CHUNK index='0': must be an integer >= 0"),
    ({"type": "CHUNK", "version": 3, "index": 0}, "CHUNK: field 'name' is missing"),
])
def test_malformed_weight_server_requests_are_refused(msg, says):
    with pytest.raises(P.ProtocolError) as err:
        P.parse(msg, P.WEIGHT_REQUESTS)
    assert says in str(err.value)


def test_an_absurd_value_is_shown_shortened():
    with pytest.raises(P.ProtocolError) as err:
        P.parse({"type": "SAMPLE", "num_groups": "x" * 10_000})
    assert len(str(err.value)) < 200 and "..." in str(err.value)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=6), st.binary(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=10)
FIELDS = sorted({f for cls in P.HUB_REQUESTS.values() for f in cls.__dataclass_fields__} | {"stats", "groups"})


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(P.HUB_REQUESTS)), msg=st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
def test_parsers_raise_nothing_but_protocol_error(kind, msg):
    try:
        req = P.parse({**msg, "type": kind})
    except P.ProtocolError:
        return
    assert isinstance(req, P.HUB_REQUESTS[kind])
    assert P.parse(req.to_msg()) == req  # whatever a parser accepts, it reads back the same


def test_error_reply_shape():
    assert P.error_reply("r", "SAMPLE num_groups=0: must be ...") == {"type": "ERROR", "rid": "r",
                                                                     "error": "SAMPLE num_groups=0: must be ..."}
