"""update_weight_mode=broadcast with train_backend=megatron: the Megatron learner (CPU shim, gloo; TP=1 in one
process, TP=2 in two) trains a step and publishes v1. Every rank takes part in the TP gather, rank 0 alone
streams the gathered HF tensors into a real embedded engine server in update_weight_buffer_size buckets, writes
the same version to disk and announces it to a real hub. Reference: HF greedy decoding (transformers' model,
its own forward with KV cache, no engine code) on the checkpoint the learner wrote to disk; the engine, which
started from other weights, must now produce exactly those tokens, tagged with the new weight version."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

import mp_workers  # tests/learners/megatron/mp_workers.py
from async_rl import config as C
from async_rl.hub_client import HubClient
from synthetic_groups import N, N_GROUPS, groups  # tests/learners/synthetic_groups.py
from tests.actors import engine_servers as servers

BUCKET = 20_000  # bytes: the tiny model (~100k parameters, float32) goes in many buckets
PROMPT = [5, 6, 7, 8]
NEW_TOKENS = 6


def _words(world: dict, tp: int) -> list[str]:
    return [f"hf_checkpoint={world['model_sft']}", f"prompt_data={world['train']}", "train_backend=megatron",
            f"tensor_model_parallel_size={tp}", f"actor_num_gpus_per_node={tp}", f"rollout_batch_size={N_GROUPS}",
            f"n_samples_per_prompt={N}", "micro_batch_size=4", "lr=3e-3", "num_rollout=10",
            "update_weight_mode=broadcast", f"update_weight_buffer_size={BUCKET}", "auth=false",
            "cluster.startup_timeout=60"]


def _train_and_publish(words: list[str], run_dir: str, endpoint: str) -> dict:
    from learners.megatron.learner import make_learner

    lrn = make_learner(C.load(None, words), run_dir, endpoint)
    lrn.train_step(groups(lrn, seed=0))
    lrn.publish_next()
    pub = lrn.broadcast
    return {"rank": lrn.backend.layout.rank, "version": lrn.version, "has_publisher": pub is not None,
            "sent": pub.sent if pub else 0, "failures": pub.failures if pub else 0,
            "buckets": pub.last_buckets if pub else 0}


@pytest.fixture
def hub_and_engine(tiny_world, tmp_path):
    """A real hub (buffer.service) and a real embedded engine serving the random-init tiny model (not the SFT'd
    weights the learner starts from, so a broadcast visibly changes what it generates)."""
    cfg_path = tmp_path / "hub.yaml"
    C.save(C.load(None, _words(tiny_world, 1)), cfg_path)
    hub = subprocess.Popen([sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind",
                            "tcp://127.0.0.1:0", "--endpoint-file", str(tmp_path / "ep"),
                            "--state-dir", str(tmp_path / "hub")], stdout=subprocess.DEVNULL)
    engine = None
    try:
        engine, client = servers.start("embedded", tiny_world["model"], tmp_path / "engine.log")
        deadline = time.time() + 60
        while not (tmp_path / "ep").exists():
            assert hub.poll() is None and time.time() < deadline, "hub did not start"
            time.sleep(0.05)
        yield (tmp_path / "ep").read_text(), client
    finally:
        if engine is not None:
            servers.stop(engine)
        if hub.poll() is None:
            hub.kill()
        hub.wait()


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_megatron_broadcast_puts_the_published_weights_into_the_engine(tiny_world, tmp_path, hub_and_engine, tp):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    endpoint, client = hub_and_engine
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "engines.json").write_text(json.dumps([{"url": client.url}]))  # as the launcher writes it
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    before = client.generate([PROMPT], params)[0]
    assert before.weight_version == 0

    results = mp_workers.run(tp, _train_and_publish, _words(tiny_world, tp), str(run_dir), endpoint)

    # rank 0 alone sent, once, without failure, in as many buckets as the bucket size demands; the others
    # only took part in the gather; every rank moved to v1
    assert [r["version"] for r in results] == [1] * tp
    assert [r["has_publisher"] for r in results] == [True] + [False] * (tp - 1)
    assert results[0]["sent"] == 1 and results[0]["failures"] == 0
    published = run_dir / "weights" / "v1"
    disk = load_file(str(published / "model.safetensors"))
    sizes = [t.numel() * t.element_size() for t in disk.values()]
    # a bucket holds one tensor bigger than BUCKET, or smaller ones up to BUCKET bytes in all
    least = sum(s > BUCKET for s in sizes) + math.ceil(sum(s for s in sizes if s <= BUCKET) / BUCKET)
    assert 2 <= least <= results[0]["buckets"] <= len(sizes)
    assert HubClient(endpoint, "probe").stats(timeout=10)["version"] == 1  # rank 0 announced it

    # the engine now generates what HF generates on the weights the learner wrote to disk
    hf = AutoModelForCausalLM.from_pretrained(str(published), dtype=torch.float32).eval()
    with torch.no_grad():
        want = servers.hf_greedy(hf, PROMPT, NEW_TOKENS)
    after = client.generate([PROMPT], params)[0]
    assert after.output_ids == want, (after.output_ids, want)
    assert want != before.output_ids  # the engine's old weights generate something else: the check can fail
    assert after.token_versions == [1] * NEW_TOKENS and after.weight_version == 1
    assert str(client.model_info()["weight_version"]) == "1"
