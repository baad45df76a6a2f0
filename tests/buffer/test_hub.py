"""Hub logic: staleness gate, admission credits, idempotent insert, accounting, malformed messages; and the
real ROUTER service surviving garbage on a real socket."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from async_rl import config as C
from async_rl import wire
from async_rl.types import Group, Trajectory
from buffer.hub import Hub
from buffer.prompts import PromptDispenser

PROMPTS = [{"input": f"{i}+0=", "label": str(i)} for i in range(10)]


def make_hub(**over) -> Hub:
    words = [f"{k}={v}" for k, v in {"rollout_batch_size": 2, "n_samples_per_prompt": 2, "num_rollout": 100,
                                     "max_staleness": 1, **over}.items()]
    return Hub(C.load(None, words), PROMPTS)


def group(gid="g0", seq=0, version=0) -> dict:
    t = Trajectory(np.array([1], np.int32), np.array([2, 3], np.int32), np.zeros(2, np.float32),
                   np.array([version, version], np.int32), reward=1.0)
    return Group(gid, seq, 0, "0", [t, t]).to_wire()


def one(replies):
    assert len(replies) == 1
    return replies[0][1]


def test_admission_follows_areal_rule_and_parks_until_version_moves():
    hub = make_hub()  # (max_staleness 1 + v 0 + 1) * 2 groups per version = 4 credits
    assert hub.credits_available() == 4
    grant = one(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "max_groups": 10}))
    assert grant["type"] == "GRANT" and len(grant["prompts"]) == 4
    assert hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "max_groups": 1}) == []  # parked
    replies = hub.handle(b"l", {"type": "VERSION", "version": 1, "weights_path": "/w/v1"})
    kinds = {r[1]["type"]: r for r in replies}
    assert set(kinds) == {"OK", "GRANT"} and kinds["GRANT"][0] == b"g"  # the parked generator is served
    assert kinds["GRANT"][1]["version"] == 1 and kinds["GRANT"][1]["weights_path"] == "/w/v1"


def test_admission_never_exceeds_what_the_run_needs():
    hub = make_hub(num_rollout=1, max_staleness=8)
    grant = one(hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "max_groups": 100}))
    assert len(grant["prompts"]) == 2


def test_put_is_idempotent_by_key():
    hub = make_hub()
    hub.handle(b"g", {"type": "ACQUIRE", "generator_id": "g0", "max_groups": 1})
    first = one(hub.handle(b"g", {"type": "PUT", "groups": [group(seq=5)]}))
    again = one(hub.handle(b"g", {"type": "PUT", "groups": [group(seq=5)]}))
    assert first["duplicates"] == [False] and again["duplicates"] == [True] and again["keys"] == [["g0", 5]]
    st_ = hub.stats()
    assert st_["accepted"] == 1 and st_["size"] == 1 and st_["duplicates"] == 1 and st_["running"] == 0


def test_put_acks_before_inserting_and_every_later_message_sees_the_insert(tmp_path):
    """The loop's early path (`handle_early`): the ACK comes before the insert, the record is already in the
    WAL, no snapshot is taken over the deferred record, and the next message (any kind) sees it applied."""
    from buffer.durable import DurableLog
    words = [f"{k}={v}" for k, v in {"rollout_batch_size": 2, "n_samples_per_prompt": 2, "num_rollout": 100,
                                     "max_staleness": 1, "snapshot_interval": 1}.items()]
    log = DurableLog(str(tmp_path / "wal"), "never", 2)
    hub = Hub(C.load(None, words), PROMPTS, log)
    assert hub.handle_early(b"l", {"type": "SAMPLE", "num_groups": 2, "version": 0}) == []
    ack = one(hub.handle_early(b"g", {"type": "PUT", "groups": [group(seq=0), group(seq=0)]}))
    assert ack["type"] == "ACK" and ack["duplicates"] == [False, True]  # a key twice in one PUT counts once
    assert len(hub.state.table) == 0 and log.lsn == 2  # logged, acked, not inserted yet
    hub.flush()  # a snapshot is due (interval 1) but would miss the deferred records
    assert not list((tmp_path / "wal").glob("snapshot-*"))
    replies = hub.handle_early(b"g", {"type": "PUT", "groups": [group(seq=1)]})  # settles the first PUT first
    assert [r[1]["type"] for r in replies] == ["ACK"] and len(hub.state.table) == 1
    batch = one(hub.settle())  # the second insert unblocks the parked SAMPLE
    assert batch["type"] == "BATCH" and [g["seq"] for g in batch["groups"]] == [0, 1]
    st_ = hub.stats()
    assert st_["accepted"] == 2 and st_["duplicates"] == 1 and st_["in_flight"] == 2
    hub.flush()
    assert list((tmp_path / "wal").glob("snapshot-*"))
    log.close()
    recovered = Hub(C.load(None, words), PROMPTS, DurableLog(str(tmp_path / "wal"), "never", 2))
    assert recovered.stats()["in_flight"] == 2 and recovered.stats()["accepted"] == 2


def test_a_stored_group_owns_its_bytes_and_the_message_is_not_kept(tmp_path):
    """A PUT off the wire (wire.decode with packed groups) carries views into its message; the table stores
    copies, made when the deferred insert runs, so no stored group pins a whole message, in memory or replayed."""
    import sys
    from buffer.durable import DurableLog
    from buffer.service import PACKED
    words = [f"{k}={v}" for k, v in {"rollout_batch_size": 2, "n_samples_per_prompt": 2, "num_rollout": 100,
                                     "max_staleness": 1}.items()]
    hub = Hub(C.load(None, words), PROMPTS, DurableLog(str(tmp_path / "wal"), "never", 2))
    payload = wire.encode({"type": "PUT", "groups": [group(seq=0), group(seq=1)], "stats": {}, "rid": "r"})
    refs = sys.getrefcount(payload)
    msg = wire.decode(payload, packed=PACKED)
    assert one(hub.handle_early(b"g", msg))["type"] == "ACK"
    assert all(type(g.data) is memoryview for _, g in hub.pending)  # nothing copied before the ACK
    hub.settle()
    del msg
    stored = [hub.state.table._items[("g0", s)].group for s in (0, 1)]
    assert all(type(g.data) is bytes for g in stored)
    assert sys.getrefcount(payload) == refs  # no view into the message is left anywhere
    hub.flush()
    hub.log.close()
    replayed = Hub(C.load(None, words), PROMPTS, DurableLog(str(tmp_path / "wal"), "never", 2))
    batch = one(replayed.handle(b"l", {"type": "SAMPLE", "num_groups": 2, "version": 0}))
    assert [g["seq"] for g in batch["groups"]] == [0, 1]


def test_sample_parks_until_enough_then_serves_fifo():
    hub = make_hub()
    assert hub.handle(b"l", {"type": "SAMPLE", "num_groups": 2, "version": 0}) == []
    hub.handle(b"g", {"type": "PUT", "groups": [group(seq=0)]})
    replies = hub.handle(b"g", {"type": "PUT", "groups": [group(seq=1)]})
    batch = [r for r in replies if r[1]["type"] == "BATCH"][0]
    assert batch[0] == b"l" and [g["seq"] for g in batch[1]["groups"]] == [0, 1]


def test_stale_groups_are_evicted_not_returned():
    hub = make_hub(max_staleness=1)
    hub.handle(b"l", {"type": "VERSION", "version": 2, "weights_path": "p"})
    for seq, v in enumerate([0, 1, 2, 2]):
        hub.handle(b"g", {"type": "PUT", "groups": [group(seq=seq, version=v)]})
    batch = one(hub.handle(b"l", {"type": "SAMPLE", "num_groups": 2, "version": 2}))
    assert [g["seq"] for g in batch["groups"]] == [1, 2]
    assert hub.stats()["evicted_stale"] == 1


@settings(max_examples=80, deadline=None)
@given(max_staleness=st.integers(0, 3),
       ops=st.lists(st.tuples(st.sampled_from(["put", "version", "sample", "set"]), st.integers(0, 4)), max_size=60))
def test_staleness_invariant_and_accounting_under_any_interleaving(max_staleness, ops):
    hub = make_hub(max_staleness=max_staleness)
    seq, learner_version, lease = 0, 0, None
    for op, arg in ops:
        if op == "put":  # a generator at any version at most the hub's, possibly far behind
            replies = hub.handle(b"g", {"type": "PUT", "groups": [group(seq=seq, version=max(0, hub.state.version - arg))]})
            seq += 1
        elif op == "version":
            learner_version += 1
            replies = hub.handle(b"l", {"type": "VERSION", "version": learner_version, "weights_path": "p"})
        elif op == "set":  # the live knob moves under the invariant's feet
            replies = hub.handle(b"x", {"type": "SET", "knobs": {"max_staleness": arg % 3}})
        else:
            replies = hub.handle(b"l", {"type": "SAMPLE", "num_groups": 1 + arg % 2, "version": learner_version,
                                        "ack_lease": lease})
        for _, reply in replies:
            if reply.get("type") == "BATCH":
                lease = reply["lease"]
                for g in reply["groups"]:
                    assert learner_version - Group.from_wire(g).behavior_version <= hub.state.max_staleness
        c = hub.stats()
        assert c["accepted"] == c["consumed"] + c["evicted_stale"] + c["size"] + c["in_flight"]


@pytest.mark.parametrize("msg, needle", [
    ({"type": "NOPE"}, "unknown message type"),
    ({"type": 3}, "unknown message type"),
    ({"type": "PUT"}, "PUT groups=None: must be a non-empty list"),
    ({"type": "PUT", "group": group()}, "PUT groups=None"),  # one shape: a list under `groups`
    ({"type": "PUT", "groups": [{"generator_id": "g"}]}, "PUT groups[0]: malformed group"),
    ({"type": "SAMPLE", "num_groups": "x"}, "SAMPLE num_groups='x': must be an integer >= 1"),
    ({"type": "SAMPLE"}, "SAMPLE: field 'num_groups' is missing"),
    ({"type": "VERSION", "version": -1, "weights_path": "p"}, "versions only grow"),
])
def test_malformed_messages_get_error_replies(msg, needle):
    hub = make_hub()
    reply = one(hub.handle(b"x", msg))
    assert reply["type"] == "ERROR" and needle in reply["error"]
    assert hub.stats()["accepted"] == 0 and hub.parked_sample is None


def test_prompt_dispenser_covers_each_prompt_once_per_epoch_deterministically():
    a, b = PromptDispenser(PROMPTS, True, 7), PromptDispenser(PROMPTS, True, 7)
    first = [a.next()[0] for _ in range(10)]
    assert sorted(first) == list(range(10)) and first == [b.next()[0] for _ in range(10)]
    second = [a.next()[0] for _ in range(10)]
    assert sorted(second) == list(range(10)) and a.epoch == 1


def test_real_hub_survives_garbage_on_its_socket(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"input": "{i}+1=", "label": "{i + 1}"}}\n' for i in range(5)))
    cfg_path = tmp_path / "c.yaml"
    C.save(C.load(None, [f"prompt_data={data}", "rollout_batch_size=1", "n_samples_per_prompt=2"]), cfg_path)
    ep_file = tmp_path / "ep"
    proc = subprocess.Popen([sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind",
                             "tcp://127.0.0.1:0", "--endpoint-file", str(ep_file)])
    try:
        deadline = time.time() + 30
        while not ep_file.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep_file.read_text())
        for junk in ([b"not msgpack"], [b"\x81\xa4type\xa3PUT"], [b"a", b"b", b"c"], [wire.encode({"type": "PUT"})]):
            sock.send_multipart(junk)
        sock.send(wire.encode({"type": "STATS", "rid": "ok"}))
        replies = []
        while sock.poll(5000):
            replies.append(wire.decode(sock.recv()))
            if replies[-1].get("rid") == "ok":
                break
        assert replies[-1]["type"] == "STATS" and proc.poll() is None
        assert sum(r["type"] == "ERROR" for r in replies) == 3  # the 3-frame message gets no reply
        sock.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
