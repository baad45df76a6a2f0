"""An embedded engine started as a run starts one reachable from other hosts (--api-key-env, --weight-store),
as a real process: requests without the run's API key are refused (401) before anything runs, our client
sends it, and /update_weights_from_disk loads only from the weight store (no `..`, no symlink out)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from actors.engine_client import EngineClient
from async_rl.keys import ENGINE_KEY_ENV, engine_api_key
from tests.actors.engine_servers import build_checkpoint, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    ckpt = build_checkpoint(root / "model", seed=0)
    store = root / "run" / "weights"
    shutil.copytree(ckpt, store / "v1")
    outside = build_checkpoint(root / "elsewhere", seed=1)
    (store / "v9").symlink_to(outside)  # a link inside the store to a dir outside it
    key = engine_api_key(root / "run" / "keys")
    port = free_port()
    cmd = [sys.executable, "-m", "actors.engine.server", "--model-path", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--num-threads", "1", "--api-key-env", ENGINE_KEY_ENV, "--weight-store", str(store),
           "--weight-store", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, ENGINE_KEY_ENV: key},
                            stdout=open(root / "engine.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    os.environ[ENGINE_KEY_ENV] = key  # what the launcher does for the processes it starts
    try:
        client = EngineClient(url, timeout=60)
        client.wait_ready(60, proc=proc)
    finally:
        del os.environ[ENGINE_KEY_ENV]
    yield {"url": url, "key": key, "client": client, "store": store, "outside": outside, "ckpt": ckpt}
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("method,path", [("POST", "/generate"), ("GET", "/get_model_info"),
                                         ("POST", "/update_weights_from_disk"), ("GET", "/health_generate"),
                                         ("POST", "/pause_generation")])
def test_requests_without_the_key_are_refused(guarded, method, path):
    body = {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 2}, "model_path": str(guarded["outside"])}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": guarded["key"]}):
        r = requests.request(method, guarded["url"] + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers, r.text)
        assert "API key" in r.json()["error"]
    assert requests.get(guarded["url"] + "/health", timeout=30).status_code == 200  # liveness stays open


def test_our_client_sends_the_key(guarded):
    out = guarded["client"].generate([[1, 2, 3]], {"temperature": 0, "max_new_tokens": 3})
    assert len(out[0].output_ids) == 3
    assert guarded["client"].model_info()["weight_version"] == "0"


def test_weights_load_only_from_the_weight_store(guarded):
    client, store = guarded["client"], guarded["store"]
    for path in [guarded["outside"], store / ".." / ".." / "elsewhere", store / "v9", "/etc"]:
        ok, message = client.update_weights_from_disk(str(path), 5)
        assert not ok and "outside this engine's weight store" in message, (path, message)
    assert client.model_info()["weight_version"] == "0"  # nothing was loaded
    ok, message = client.update_weights_from_disk(str(store / "v1"), 1)
    assert ok, message
    assert client.model_info()["weight_version"] == "1"
