"""Fault tests with real processes and sockets: SIGKILL the hub mid-stream and restart it; CURVE auth."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from async_rl import config as C
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.keys import create_keys
from async_rl.types import Group, Trajectory
from tests.buffer.conftest import hub_service


@pytest.fixture
def hub_setup(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"input": "{i}+1=", "label": "{i + 1}"}}\n' for i in range(50)))
    cfg_path = tmp_path / "c.yaml"
    C.save(C.load(None, [f"prompt_data={data}", "rollout_batch_size=2", "n_samples_per_prompt=2",
                         "max_staleness=1000", "snapshot_interval=40", "fsync=batch"]), cfg_path)
    keys = create_keys(tmp_path / "keys")
    with hub_service(tmp_path, cfg_path, keys) as (start, endpoint):
        yield {"start": start, "endpoint": endpoint, "keys": str(keys), "tmp": tmp_path}


def group(seq: int) -> Group:
    t = Trajectory(np.array([1, 2, 3], np.int32), np.arange(64, dtype=np.int32), np.zeros(64, np.float32),
                   np.zeros(64, np.int32), reward=1.0)
    return Group("gen", seq, seq, "x", [t, t])


def test_sigkill_mid_stream_loses_and_duplicates_nothing(hub_setup):
    hub = hub_setup["start"]()
    n_groups = 240
    acked: list[int] = []
    delivered: dict[str, list[int]] = {}
    stop = threading.Event()

    def produce():
        client = HubClient(hub_setup["endpoint"], "gen", hub_setup["keys"], resend_after=0.5)
        for seq in range(n_groups):
            client.put([group(seq)], {}, timeout=60)
            acked.append(seq)
        client.close()

    def consume():
        client = HubClient(hub_setup["endpoint"], "learner", hub_setup["keys"], resend_after=0.5)
        lease = None
        while sum(len(v) for v in delivered.values()) < n_groups and not stop.is_set():
            try:
                reply = client.request({"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0,
                                        "ack_lease": lease}, timeout=1.0)
            except HubTimeout:
                continue  # the hub is down or nothing to sample yet: ask again
            lease = reply["lease"]
            delivered[lease] = [g["seq"] for g in reply["groups"]]  # a redelivered lease overwrites itself
        client.request({"type": "ACK", "learner_id": "L", "lease": lease}, timeout=30)
        client.close()

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for kill_at in (60, 150):  # two crashes at random points of the stream
        while len(acked) < kill_at:
            time.sleep(0.01)
        os.kill(hub.pid, signal.SIGKILL)
        hub.wait()
        hub = hub_setup["start"]()
    threads[0].join(90)
    threads[1].join(90)
    stop.set()
    assert len(acked) == n_groups
    seqs = [s for batch in delivered.values() for s in batch]
    assert len(seqs) == len(set(seqs)), "a group was delivered twice"
    assert set(seqs) == set(acked), f"lost: {sorted(set(acked) - set(seqs))[:10]}"
    stats = HubClient(hub_setup["endpoint"], "probe", hub_setup["keys"]).stats(timeout=10)
    assert stats["accepted"] == n_groups and stats["consumed"] == n_groups and stats["size"] == 0
    hub.send_signal(signal.SIGTERM)
    assert hub.wait(10) == 0


def test_curve_auth_refuses_wrong_or_missing_keys(hub_setup):
    hub_setup["start"]()
    other = create_keys(hub_setup["tmp"] / "other-keys")  # its own client key, but the real server's public key
    shutil.copy(os.path.join(hub_setup["keys"], "server.key"), other / "server.key")
    wrong = HubClient(hub_setup["endpoint"], "intruder", str(other), resend_after=0.5)
    with pytest.raises(HubTimeout):
        wrong.stats(timeout=2.0)
    plain = HubClient(hub_setup["endpoint"], "plain", None, resend_after=0.5)
    with pytest.raises(HubTimeout):
        plain.stats(timeout=2.0)
    good = HubClient(hub_setup["endpoint"], "friend", hub_setup["keys"])
    assert good.stats(timeout=10)["accepted"] == 0


LEARNER = """
import json, sys
from async_rl.hub_client import HubClient
client = HubClient(sys.argv[1], "learner", sys.argv[2])
reply = client.request({"type": "SAMPLE", "learner_id": "L", "num_groups": 2, "version": 0}, timeout=30)
print(json.dumps({"lease": reply["lease"], "seqs": [g["seq"] for g in reply["groups"]]}), flush=True)
import time; time.sleep(600)  # 'training' until killed
"""


def test_a_learner_killed_mid_batch_gets_the_same_batch_back(hub_setup):
    hub_setup["start"]()
    producer = HubClient(hub_setup["endpoint"], "gen", hub_setup["keys"])
    for seq in range(4):
        producer.put([group(seq)], {}, timeout=30)
    outs = []
    for _ in range(2):  # the first learner dies mid-batch; its replacement asks again
        proc = subprocess.Popen([sys.executable, "-c", LEARNER, hub_setup["endpoint"], hub_setup["keys"]],
                                stdout=subprocess.PIPE, text=True)
        outs.append(proc.stdout.readline())
        proc.kill()
        proc.wait()
    import json
    first, second = (json.loads(o) for o in outs)
    assert first == second and first["seqs"] == [0, 1]
    stats = producer.stats(timeout=10)
    assert stats["in_flight"] == 2 and stats["consumed"] == 0 and stats["size"] == 2
