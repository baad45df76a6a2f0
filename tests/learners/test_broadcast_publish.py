"""update_weight_mode=broadcast: the learner's publication path sends each version straight into the run's
engines (a real embedded engine server, gloo), recovers from an engine that lost its group, and a short run
with it progresses through versions exactly as a disk run does. Also num_epoch: num_rollout=0 makes the run
num_epoch passes over the prompt data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from async_rl import config as config_mod
from async_rl.config_rules.paths import check_paths
from learners.weights import BroadcastPublisher, engine_urls
from tests.actors import engine_servers as servers


def test_broadcast_publisher_puts_the_learners_weights_into_the_engine(tmp_path, tiny_world):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc, client = servers.start("embedded", tiny_world["model"], tmp_path / "engine.log")
    try:
        (run_dir / "engines.json").write_text(json.dumps([{"url": client.url}]))
        cfg = config_mod.load(None, [f"hf_checkpoint={tiny_world['model']}", "update_weight_mode=broadcast",
                                     "update_weight_buffer_size=20000", "cluster.startup_timeout=60"])
        assert engine_urls(cfg, run_dir) == [client.url.rstrip("/")]
        learner_model = AutoModelForCausalLM.from_pretrained(str(tiny_world["model_sft"]), dtype=torch.float32).eval()
        pub = BroadcastPublisher(cfg, run_dir, log=lambda m: None, timeout=10)
        prompt = [5, 6, 7, 8]
        params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
        before = client.generate([prompt], params)[0].output_ids
        assert pub.send(learner_model, 1)
        res = client.generate([prompt], params)[0]
        with torch.no_grad():
            want = servers.hf_greedy(learner_model, prompt, 6)
        assert res.output_ids == want != before and res.token_versions == [1] * 6
        assert str(client.model_info()["weight_version"]) == "1"
        # the engine loses the group (as a restarted engine would): that version fails (it still reaches disk
        # in the learner), and the next one forms a new group
        first_group = pub.broadcaster.group_name
        ok, _ = client._weights_call("/destroy_weights_update_group", {"group_name": first_group})
        assert ok
        with torch.no_grad():
            for p in learner_model.parameters():
                p.mul_(0.5)
        assert not pub.send(learner_model, 2) and pub.failures == 1 and pub.broadcaster is None
        assert pub.send(learner_model, 3) and pub.broadcaster.group_name != first_group
        with torch.no_grad():
            want = servers.hf_greedy(learner_model, prompt, 6)
        res = client.generate([prompt], params)[0]
        assert res.output_ids == want and res.token_versions == [3] * 6
        pub.close()
    finally:
        servers.stop(proc)


def test_num_epoch_sets_the_run_length_from_the_prompt_count(tmp_path, tiny_world):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(10)))
    base = [f"hf_checkpoint={tiny_world['model']}", f"prompt_data={data}", "rollout_batch_size=4", "num_rollout=0"]
    cfg = config_mod.load(None, base + ["num_epoch=3"])
    check_paths(cfg)
    assert cfg.rollout.num_rollout == 3 * 10 // 4
    cfg = config_mod.load(None, base + ["num_rollout=5", "num_epoch=3"])
    check_paths(cfg)
    assert cfg.rollout.num_rollout == 5  # an explicit num_rollout wins
    cfg = config_mod.load(None, base + ["rollout_batch_size=16", "num_epoch=1"])
    with pytest.raises(config_mod.ConfigError, match="num_epoch=1: 1 pass.*10 prompts.*rollout_batch_size=16"):
        check_paths(cfg)


def launch(tmp_path: Path, world: dict, name: str, *overrides: str) -> Path:
    data = tmp_path / "train24.jsonl"  # 24 prompts: 2 epochs of 4-prompt steps = 12 learner steps
    data.write_text("".join(Path(world["train"]).read_text().splitlines(keepends=True)[:24]))
    cfg = {"ckpt": {"hf_checkpoint": str(world["model_sft"])}, "data": {"prompt_data": str(data)},
           "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 4, "num_rollout": 0, "num_epoch": 2,
                       "rollout_max_response_len": 4, "groups_per_engine_call": 4},
           "logging": {"progress": False}, "cluster": {"startup_timeout": 60}, "buffer": {"auth": False}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(tmp_path / f"{name}.yaml"), *overrides,
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


@pytest.mark.e2e
def test_broadcast_run_progresses_like_a_disk_run_over_num_epoch_passes(tmp_path, tiny_world):
    runs = {mode: launch(tmp_path, tiny_world, mode, f"update_weight_mode={mode}") for mode in ("disk", "broadcast")}
    rows = {mode: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for mode, d in runs.items()}
    for mode, r in rows.items():
        assert [x["step"] for x in r] == list(range(12)), mode  # num_epoch=2 x 24 prompts // 4
        assert [x["version"] for x in r] == list(range(12)), mode
        assert all(0.0 <= x["reward/mean"] <= 1.0 and x["staleness/max"] <= 2 for x in r), mode
    learner_log = (runs["broadcast"] / "logs" / "learner.log").read_text()
    assert "learner: broadcast v1 to 1 engine(s)" in learner_log and "broadcast of v" not in learner_log, learner_log
    # every version reached the engine by broadcast: the generator never had to load one from disk
    assert "missed the broadcast" not in (runs["broadcast"] / "logs" / "generator0.log").read_text()
    assert "learner: broadcast" not in (runs["disk"] / "logs" / "learner.log").read_text()
    assert (runs["broadcast"] / "weights" / "v12" / "config.json").exists()  # disk copy for evals and restarts


@pytest.mark.e2e
def test_launch_on_sglang_cpu_with_broadcast_weights(tmp_path, tiny_world):
    """rollout_engine=sglang against the SGLang CPU test harness (scripts/sglang_cpu/): the launcher starts a
    real SGLang server, the generator drives it, and the learner broadcasts every version into it."""
    if servers.sglang_missing():
        pytest.skip(servers.sglang_missing())
    # a fresh tiny checkpoint with 2048 positions: SGLang's start-up warm-up fails at the tiny task's 64
    model = servers.build_checkpoint(tmp_path / "model", seed=0, max_positions=2048)
    run_dir = launch(tmp_path, tiny_world, "sglang", f"hf_checkpoint={model}", "rollout_engine=sglang",
                     "update_weight_mode=broadcast",
                     f"sglang_python={servers.SGLANG_PYTHON}", "num_epoch=1", "cluster.startup_timeout=240",
                     'sglang_server_args=["--device cpu", "--max-total-tokens 32768", "--disable-cuda-graph"]')
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == list(range(6))  # 24 prompts // 4
    assert all(0.0 <= r["reward/mean"] <= 1.0 and r["staleness/max"] <= 2 for r in rows)
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "learner: broadcast v1 to 1 engine(s)" in learner_log and "broadcast of v" not in learner_log, learner_log
    assert "missed the broadcast" not in (run_dir / "logs" / "generator0.log").read_text()
    assert "sglang" in (run_dir / "logs" / "engine0.log").read_text().lower()


_RANK = """
import os, sys, torch
from async_rl.weight_broadcast import init_custom_process_group
r, port = int(sys.argv[1]), int(sys.argv[2])
group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, r, "weights_test", timeout=20)
t = torch.tensor([float(r + 1)])
torch.distributed.all_reduce(t, group=group)
assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # left as it was, for torchrun's own use
print("sum", float(t))
"""


def test_weight_group_rendezvous_is_hosted_by_rank_0_even_under_torchrun():
    """A learner rank started by torchrun has TORCHELASTIC_USE_AGENT_STORE=True, which turns every tcp://
    rendezvous into a client of torchrun's store: the learner (rank 0 of the weight group) must still host
    the group's own store, or the engines wait on a port nobody listens on (a 2-rank FSDP learner with
    update_weight_mode=broadcast timed out that way). Two processes form a real gloo group with the variable set."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TORCHELASTIC_USE_AGENT_STORE": "True",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(port)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("sum 3.0" in out for out in outs), outs
