"""The hub's "trained since checkpoint" log with real processes and files: batches a learner acked after its
newest checkpoint survive a SIGKILLed hub (WAL) and a snapshot, and a learner restarted from that checkpoint
gets exactly those batches again, in order, then its un-acked batch, then new ones, while `consumed` counts
every group once and `replayed` counts the redeliveries."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from async_rl import config as C
from async_rl.hub_client import HubClient, HubError
from async_rl.types import Group, Trajectory
from buffer.durable import DurableLog
from buffer.hub import Hub
from tests.buffer.conftest import hub_service

BATCH = 2


def group(seq: int) -> dict:
    t = Trajectory(np.array([1, 2], np.int32), np.array([3, seq], np.int32), np.zeros(2, np.float32),
                   np.zeros(2, np.int32), reward=float(seq))
    return Group("gen", seq, seq, "x", [t, t]).to_wire()


def keys(reply: dict) -> list[tuple[str, int]]:
    return [(g["generator_id"], g["seq"]) for g in reply["groups"]]


def books_balance(s: dict) -> bool:
    return s["accepted"] == s["consumed"] + s["evicted_stale"] + s["evicted_capacity"] + s["size"] + s["in_flight"]


def _config(tmp_path, **over):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"input": "{i}+1=", "label": "{i + 1}"}}\n' for i in range(50)))
    words = {"prompt_data": data, "rollout_batch_size": BATCH, "n_samples_per_prompt": 2, "max_staleness": 1000,
             "selector": "uniform", "snapshot_interval": 1000, "fsync": "batch", "auth": "false", **over}
    return C.load(None, [f"{k}={v}" for k, v in words.items()])


@pytest.fixture
def hub_process(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    C.save(_config(tmp_path), cfg_path)
    with hub_service(tmp_path, cfg_path) as (start, endpoint):
        yield start, endpoint


def sample(client: HubClient, step: int, ack) -> dict:
    return client.request({"type": "SAMPLE", "learner_id": "learner", "num_groups": BATCH, "version": 0,
                           "ack_lease": ack, "step": step}, timeout=30)


def test_replay_after_sigkill_returns_the_acked_batches_since_the_checkpoint(hub_process):
    start, endpoint = hub_process
    hub = start()
    gen = HubClient(endpoint, "gen", None, resend_after=1.0)
    for seq in range(12):
        gen.put([Group.from_wire(group(seq))], {}, timeout=30)
    learner = HubClient(endpoint, "learner", None, resend_after=1.0)
    batches, lease = [], None
    for step in range(4):  # batches of steps 0, 1, 2 acked; step 3's in flight
        reply = sample(learner, step, lease)
        batches.append(keys(reply))
        lease = reply["lease"]
    assert learner.request({"type": "CHECKPOINT", "learner_id": "learner", "step": 1}, timeout=30)["type"] == "OK"
    before = learner.stats(timeout=30)
    assert before["consumed"] == 3 * BATCH and before["replay_log_batches"] == 2 and before["replayed"] == 0

    hub.send_signal(signal.SIGKILL)
    hub.wait()
    start()
    learner = HubClient(endpoint, "learner2", None, resend_after=1.0)  # the restarted learner, at checkpoint 1
    with pytest.raises(HubError, match=r"step=0: the learner already trained steps .* checkpoint at step 1"):
        sample(learner, 0, None)  # dropped by the checkpoint: a clear refusal, never another batch
    first = sample(learner, 1, None)
    second = sample(learner, 2, first["lease"])
    assert first["replay"] and second["replay"]
    assert keys(first) == batches[1] and keys(second) == batches[2]  # same groups, same order
    assert [Group.from_wire(g).trajectories[0].reward for g in first["groups"]] == [k[1] for k in batches[1]]
    in_flight = sample(learner, 3, second["lease"])
    assert not in_flight.get("replay") and keys(in_flight) == batches[3] and in_flight["lease"] == lease
    new = sample(learner, 4, in_flight["lease"])
    assert set(keys(new)).isdisjoint(k for b in batches for k in b)
    s = learner.stats(timeout=30)
    assert s["consumed"] == 4 * BATCH and s["replayed"] == 2 * BATCH and s["in_flight"] == BATCH
    assert s["accepted"] == 12 and books_balance(s)
    # re-published versions at or below the hub's are a no-op
    assert learner.request({"type": "VERSION", "version": 3, "weights_path": "/w/v3"}, timeout=30)["type"] == "OK"
    assert learner.request({"type": "VERSION", "version": 1, "weights_path": "/w/v1"}, timeout=30)["version"] == 3
    assert learner.stats(timeout=30)["version"] == 3
    gen.close()
    learner.close()


def test_the_replay_log_survives_a_snapshot_and_a_checkpoint_empties_it(tmp_path):
    cfg = _config(tmp_path)
    hub = Hub(cfg, [{"input": "x", "label": "y"}] * 50, DurableLog(tmp_path / "hub"))
    for seq in range(6):
        hub.handle(b"g", {"type": "PUT", "groups": [group(seq)]})
    lease, batches = None, []
    for step in range(3):
        (_, reply), = [r for r in hub.handle(b"l", {"type": "SAMPLE", "learner_id": "learner", "num_groups": BATCH,
                                                     "version": 0, "ack_lease": lease, "step": step})]
        batches.append(keys(reply))
        lease = reply["lease"]
    hub.flush()
    hub.log.snapshot(hub.state.to_snapshot())
    hub.log.close()
    again = Hub(cfg, [{"input": "x", "label": "y"}] * 50, DurableLog(tmp_path / "hub"))
    assert again.recovered_records == 0  # all from the snapshot
    (_, replay), = again.handle(b"l", {"type": "SAMPLE", "learner_id": "learner", "num_groups": BATCH,
                                       "version": 0, "step": 0})
    assert replay["replay"] and keys(replay) == batches[0]
    again.handle(b"l", {"type": "CHECKPOINT", "learner_id": "learner", "step": 2})
    assert again.stats()["replay_log_batches"] == 0 and again.state.checkpointed == {"learner": 2}
    (_, flight), = again.handle(b"l", {"type": "SAMPLE", "learner_id": "learner", "num_groups": BATCH,
                                       "version": 0, "step": 2})
    assert keys(flight) == batches[2] and not flight.get("replay")
    s = again.stats()
    assert s["consumed"] == 2 * BATCH and s["replayed"] == BATCH and books_balance(s)
