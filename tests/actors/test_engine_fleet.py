"""A generator's engines, for real: weight updates that interrupt in-flight generation in each interrupt_mode
(per-token versions, partial rollouts, off-policy loss masks), and fault tolerance (a killed engine is
restarted from its launch spec, re-synced to the newest weights, and a call re-issued on it completes)."""
from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from actors import rollout
from actors.engine_fleet import EngineFleet, EngineSpec
from tests.actors import engine_servers as servers


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    return {"a": servers.build_checkpoint(root / "a", seed=0, max_positions=2048),
            "b": servers.build_checkpoint(root / "b", seed=1, max_positions=2048), "root": root}


@pytest.fixture(scope="module")
def engine(ckpts):
    proc, client = servers.start("embedded", ckpts["a"], ckpts["root"] / "engine.log")
    yield proc, client
    servers.stop(proc)


def rollout_cfg(**kw):
    base = dict(interrupt_mode="none", sglang_server_concurrency=64, use_fault_tolerance=False,
                rollout_health_check_interval=0.5, rollout_health_check_timeout=5.0,
                rollout_health_check_first_wait=0.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("mode,partial", [("in_place", True), ("retract", True), ("abort", True), ("abort", False),
                                          ("none", True)])
def test_weights_published_mid_generation(engine, ckpts, mode, partial):
    _, client = engine
    client.update_weights_from_disk(str(ckpts["a"]), 0)
    fleet = EngineFleet([client.url], rollout_cfg(interrupt_mode=mode), samples_per_call=4)
    handle = fleet.acquire()
    n, out = 1200, {}
    worker = threading.Thread(target=lambda: out.update(samples=rollout.generate_samples(
        handle.client, [[5, 6, 7]] * 4, {"temperature": 1.0, "max_new_tokens": n, "ignore_eos": True}, partial)))
    worker.start()
    time.sleep(0.4)
    fleet.sync(1, str(ckpts["b"]))
    worker.join(120)
    fleet.release(handle)
    assert handle.version == 1 and str(client.model_info()["weight_version"]) == "1"
    for s in out["samples"]:
        assert len(s.output_ids) == len(s.logprobs) == len(s.versions) == n and s.finish_reason == "length"
        k = s.versions.count(0)
        assert s.versions == [0] * k + [1] * (n - k)
        if mode == "none":  # the update waited for the request to finish: one version throughout
            assert k == n
        elif mode == "abort" and not partial:  # restarted from scratch under the new weights
            assert k == 0 and s.resubmits >= 1
        else:  # kept its tokens so far and continued under the new weights
            assert 0 < k < n
            traj = rollout.to_trajectory(s, "", mask_offpolicy=True)
            np.testing.assert_array_equal(traj.loss_mask, [0] * k + [1] * (n - k))
            assert traj.behavior_version == 0
    assert fleet.interrupted_updates == (0 if mode == "none" else 1)


def test_killed_engine_is_restarted_resynced_and_the_call_reissued(ckpts):
    port = servers.free_port()
    cmd = servers.embedded_command(ckpts["a"], port)
    log = ckpts["root"] / "ft.log"
    import subprocess
    first = subprocess.Popen(cmd, cwd=servers.ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    from actors.engine_client import EngineClient, EngineError
    EngineClient(url).wait_ready(60, proc=first)
    spec = EngineSpec(url=url, cmd=cmd, log=str(log), pid=first.pid)
    fleet = EngineFleet([url], rollout_cfg(use_fault_tolerance=True), samples_per_call=2, specs={url: spec})
    fleet.sync(3, str(ckpts["b"]))
    fleet.start_monitor()
    try:
        handle = fleet.acquire()
        failed = []

        def call():
            try:
                rollout.generate_samples(handle.client, [[5, 6]] * 2, {"max_new_tokens": 1500, "ignore_eos": True}, True)
            except EngineError as e:
                failed.append(e)
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        os.killpg(first.pid, signal.SIGKILL)  # the engine dies mid-call
        t.join(30)
        assert failed, "the call on the killed engine must fail (the generator then re-issues it)"
        handle.healthy.clear()
        fleet.release(handle)
        deadline = time.monotonic() + 120
        while not (handle.healthy.is_set() and handle.restarts == 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert handle.restarts == 1 and handle.healthy.is_set()
        assert handle.version == 3 and str(handle.client.model_info()["weight_version"]) == "3"
        again = fleet.acquire()
        samples = rollout.generate_samples(again.client, [[5, 6]] * 2, {"max_new_tokens": 8, "ignore_eos": True}, True)
        fleet.release(again)
        assert all(s.versions == [3] * 8 for s in samples)
    finally:
        fleet.stop()
        for e in fleet.engines:
            if e.proc is not None:
                e.proc.wait(timeout=20)
        first.wait(timeout=10)
