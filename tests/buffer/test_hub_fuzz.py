"""Fuzz the real hub service over its real socket: random bytes and random, type-confused messages of
every kind get a reply (or, for HEARTBEAT, none) and never crash or stall the hub."""
from __future__ import annotations

import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl import config as C
from async_rl import wire
from async_rl.protocol import HUB_REQUESTS

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)
FIELDS = ["generator_id", "max_groups", "acquire_seq", "groups", "stats", "seq", "prompt_index", "num_groups",
          "version", "learner_id", "ack_lease", "step", "lease", "weights_path", "updates", "knobs", "learner",
          "generator", "rid"]
messages = st.fixed_dictionaries({"type": st.sampled_from(tuple(HUB_REQUESTS) + ("BOGUS",))},
                                 optional={f: values for f in FIELDS})


@pytest.fixture(scope="module")
def hub_socket(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    data = tmp / "p.jsonl"
    data.write_text('{"input": "1+1=", "label": "2"}\n')
    cfg_path = tmp / "c.yaml"
    C.save(C.load(None, [f"prompt_data={data}", "rollout_batch_size=1", "n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus"]), cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind",
                             "tcp://127.0.0.1:0", "--endpoint-file", str(tmp / "ep"), "--state-dir", str(tmp / "hub")])
    deadline = time.time() + 30
    while not (tmp / "ep").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect((tmp / "ep").read_text())
    yield sock, proc
    sock.close()
    proc.terminate()
    assert proc.wait(10) == 0, "hub did not exit cleanly after the fuzzing"


def roundtrip(sock, frames: list[bytes]) -> None:
    sock.send_multipart(frames)
    sock.send(wire.encode({"type": "STATS", "rid": "probe"}))  # the hub must still answer after any input
    deadline = time.time() + 10
    while time.time() < deadline:
        if sock.poll(1000):
            reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False,
                                    ext_hook=lambda c, d: msgpack.ExtType(c, d))
            if reply.get("rid") == "probe":
                return
    raise AssertionError(f"hub stopped answering after {frames!r:.200}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=messages)
def test_random_messages_never_crash_the_hub(hub_socket, msg):
    sock, proc = hub_socket
    try:
        payload = wire.encode(msg)
    except (TypeError, ValueError, OverflowError):
        payload = msgpack.packb(str(msg))  # not encodable as given: send something malformed instead
    roundtrip(sock, [payload])
    assert proc.poll() is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_never_crash_the_hub(hub_socket, frames):
    sock, proc = hub_socket
    roundtrip(sock, frames)
    assert proc.poll() is None


def test_a_hostile_array_header_is_refused(hub_socket):
    sock, proc = hub_socket
    # an ndarray header claiming 2**40 elements with 8 bytes of data
    evil = msgpack.packb({"type": "PUT", "schema": wire.SCHEMA_VERSION,
                          "groups": [msgpack.ExtType(1, b"\x03<i4\x01" + np.array([2**40], "<i8").tobytes() + b"x" * 8)]})
    roundtrip(sock, [evil])
    assert proc.poll() is None
