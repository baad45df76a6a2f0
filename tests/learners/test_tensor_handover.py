"""update_weight_mode=tensor: the learner hands a real embedded engine server (another process) handles to a
staging copy of its weights (shared memory on CPU; CUDA IPC on a GPU, where this same code runs in
scripts/gpu/bench_async.py), the engine copies them and generates exactly what an independent HF forward
pass of those weights generates; a bad body or a payload naming any other global is refused; the disk
copy lands in the background; a short run progresses through versions as a disk run does."""
from __future__ import annotations

import base64
import json
import os
import pickle

import pytest
import torch

from async_rl import config as config_mod
from async_rl import weight_tensor
from learners.handover import TensorPublisher, version_path
from tests.actors import engine_servers as servers
from tests.learners.test_broadcast_publish import launch


def _engine_and_publisher(tmp_path, world):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc, client = servers.start("embedded", world["model"], tmp_path / "engine.log")
    (run_dir / "engines.json").write_text(json.dumps([{"url": client.url}]))
    cfg = config_mod.load(None, [f"hf_checkpoint={world['model']}", "update_weight_mode=tensor",
                                 "cluster.startup_timeout=60", "keep_weight_versions=2"])
    return proc, client, run_dir, cfg


def test_tensor_handover_puts_the_learners_weights_into_the_engine(tmp_path, tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, client, run_dir, cfg = _engine_and_publisher(tmp_path, tiny_world)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_world["model_sft"]), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(tiny_world["model_sft"]))
        pub = TensorPublisher(cfg, run_dir, tok, model.config, log=lambda m: None)
        prompt, params = [5, 6, 7, 8], {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
        before = client.generate([prompt], params)[0].output_ids
        announced = []
        for version in (1, 2):
            if version == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(0.7)
            assert pub.publish(dict(model.state_dict()), version, pin=False,
                               announce=lambda path, v=version: announced.append((v, path)))
            res = client.generate([prompt], params)[0]
            with torch.no_grad():
                want = servers.hf_greedy(model, prompt, 6)
            assert res.output_ids == want and res.token_versions == [version] * 6
            assert res.output_ids != before
        assert announced == [(1, version_path(run_dir, 1)), (2, version_path(run_dir, 2))]
        assert set(pub.timings) >= {"stage_s", "engines_s", "hub_s", "disk_wait_s"}
        pub.flush()  # the background copies are complete, loadable, and equal to what was handed over
        on_disk = AutoModelForCausalLM.from_pretrained(str(version_path(run_dir, 2)), dtype=torch.float32)
        for (name, a), b in zip(model.state_dict().items(), on_disk.state_dict().values()):
            assert torch.equal(a, b), name
        pub.close()
    finally:
        servers.stop(proc)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_tensor_endpoint_refuses_bad_bodies_and_foreign_globals(tmp_path, tiny_world):
    proc, client, _, _ = _engine_and_publisher(tmp_path, tiny_world)
    try:
        evil = base64.b64encode(pickle.dumps([("model.norm.weight", _Boom())])).decode()
        for body, status, needle in (
                ({"serialized_named_tensors": "x"}, 400, "serialized_named_tensors"),
                ({"serialized_named_tensors": ["not base64!"]}, 400, "cannot read it"),
                ({"serialized_named_tensors": [evil]}, 400, "posix.system is not allowed"),
                ({"serialized_named_tensors": [weight_tensor.dumps([("nope", torch.zeros(2))])]}, 400, "unexpected"),
                ({"serialized_named_tensors": [""], "load_format": "flattened_bucket"}, 400, "load_format")):
            resp = client.session.post(client.url + "/update_weights_from_tensor", json=body, timeout=30)
            text = json.dumps(resp.json())
            assert resp.status_code == status and needle in text, (body, text)
        assert str(client.model_info()["weight_version"]) == "0"  # nothing was loaded
        assert client.generate([[5, 6]], {"temperature": 0, "max_new_tokens": 2})[0].output_ids  # still serving
    finally:
        servers.stop(proc)


@pytest.mark.e2e
def test_tensor_run_progresses_like_a_disk_run(tmp_path, tiny_world):
    run_dir = launch(tmp_path, tiny_world, "tensor", "update_weight_mode=tensor")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(12)) and [x["version"] for x in rows] == list(range(12))
    assert all(0.0 <= x["reward/mean"] <= 1.0 and x["staleness/max"] <= 2 for x in rows)
    assert all(x["perf/publish/engines_s"] > 0 for x in rows)
    assert "learner: handed v1" in (run_dir / "logs" / "learner.log").read_text()
    assert "missed the broadcast" not in (run_dir / "logs" / "generator0.log").read_text()
    assert (run_dir / "weights" / "v12" / "model.safetensors").exists()  # written before the learner exited
