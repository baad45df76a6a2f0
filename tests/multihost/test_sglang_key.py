"""A real SGLang server (the CPU test harness, scripts/sglang_cpu/) started as an attached engine is: by the
launcher's own command (Launcher._engine_command) on a generator host, bound to that host's address, with
the run's engine API key (`--api-key`). From the head, requests without the key (or with a wrong one) are
refused for generation, weight updates and model info, while our clients send it: EngineClient (what
generators and the engine fleet use: generate, update_weights_from_disk, model info) and the tensor
handover's TensorUpdater (its pause and continue around a copy). Health probes stay open, as SGLang keeps them."""
from __future__ import annotations

import json
import sys

import pytest

from async_rl import config as config_mod
from async_rl.keys import ENGINE_KEY_ENV, engine_api_key
from async_rl.launch.launcher import Launcher
from tests.actors.engine_servers import SGLANG_PYTHON, build_checkpoint, sglang_missing
from tests.multihost.hosts import wait_for

pytestmark = pytest.mark.timeout(600)
PORT = 30123

CLIENT = """import json, os, sys, requests
url, key, v1 = sys.argv[1:4]
body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
refused = {}
for method, path, payload in [("POST", "/generate", body), ("POST", "/update_weights_from_disk", {"model_path": v1}),
                              ("GET", "/get_model_info", None), ("POST", "/flush_cache", None),
                              ("POST", "/pause_generation", {"mode": "abort"})]:
    refused[path] = [requests.request(method, url + path, json=payload, headers=h, timeout=60).status_code
                     for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key})]
health = requests.get(url + "/health", timeout=60).status_code
os.environ[sys.argv[4]] = key  # what the launcher and attach set for the processes they start
from actors.engine_client import EngineClient
from async_rl.weight_tensor import TensorUpdater
client = EngineClient(url, timeout=300)
before = client.generate([[5, 6, 7]], {"temperature": 0, "max_new_tokens": 4})[0].output_ids
ok, message = client.update_weights_from_disk(v1, 1)
after = client.generate([[5, 6, 7]], {"temperature": 0, "max_new_tokens": 4})[0].output_ids
updater = TensorUpdater([url], timeout=60)  # its pause around a copy; each raises unless the engine said 200
updater._post_all("/pause_generation", {"mode": "in_place"})
updater._post_all("/continue_generation", {})
print(json.dumps({"refused": refused, "health": health, "before": before, "after": after, "ok": ok,
                  "message": message, "version": client.model_info()["weight_version"]}))
"""


@pytest.mark.skipif(bool(sglang_missing()), reason=sglang_missing() or "sglang harness present")
def test_an_attached_sglang_engine_refuses_requests_without_the_run_key(network, tmp_path, monkeypatch):
    net = network({"head": [], "gen1": []})
    head, gen1 = net["head"], net["gen1"]
    model = build_checkpoint(gen1.workdir / "model", seed=0)
    v1 = build_checkpoint(gen1.workdir / "weights" / "v1", seed=1)  # what a puller would have put there
    key = engine_api_key(tmp_path / "keys")
    monkeypatch.setenv(ENGINE_KEY_ENV, key)  # as Launcher.prepare does for a host that is not loopback
    cfg = config_mod.load(None, [f"hf_checkpoint={model}", "rollout_engine=sglang", f"sglang_python={SGLANG_PYTHON}",
                                 "sglang_server_args=--device cpu --max-total-tokens 32768 --disable-cuda-graph",
                                 f"cluster.host={gen1.addr}"])
    cmd = Launcher(cfg, tmp_path / "run")._engine_command(0, PORT)
    assert cmd[cmd.index("--api-key") + 1] == key and cmd[cmd.index("--host") + 1] == gen1.addr
    engine = gen1.start(cmd, "sglang.log", env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://{gen1.addr}:{PORT}"
    probe = [sys.executable, "-c", f"import requests; requests.get('{url}/health', timeout=5).raise_for_status()"]
    wait_for("SGLang on gen1", lambda: head.run(probe, timeout=30).returncode == 0, 400, [engine],
             [("sglang", lambda: gen1.log("sglang.log"))])
    out = head.run([sys.executable, "-c", CLIENT, url, key, str(v1), ENGINE_KEY_ENV], timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + gen1.log("sglang.log")[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for path, (none, wrong, no_scheme) in got["refused"].items():
        assert none == wrong == no_scheme == 401, (path, got["refused"])
    assert got["health"] == 200  # liveness probes stay open (SGLang's rule)
    assert got["ok"], got["message"]
    assert got["version"] == "1" and len(got["after"]) == 4
    assert got["after"] != got["before"]  # v1 (other weights) was really loaded, through the key
