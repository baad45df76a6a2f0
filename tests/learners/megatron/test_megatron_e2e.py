"""End to end with `train_backend: megatron`: `async-rl launch` starts the hub, an engine, a generator and
the Megatron learner as two TP ranks under torchrun (gloo on CPU; the test-only shim is installed in the
learner processes through `cpu_site/sitecustomize.py`). We check the run-dir contract (a metrics row per
step, published HF weights the engine reloads, a resumable checkpoint), the staleness bound, and that
no process is left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
STEPS = 4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("cluster", ["local", "ray"])
def test_launch_with_megatron_tp2(tmp_path, tiny_world, cluster):
    """Under the local launcher the two ranks run under torchrun; under `--cluster ray` (a Ray the launcher
    starts, whose workers inherit the shim's environment) each rank is a Ray actor of its own."""
    if cluster == "ray":
        pytest.importorskip("ray")
    cfg = {
        "ckpt": {"hf_checkpoint": str(tiny_world["model_sft"]), "save_interval": 2},
        "data": {"prompt_data": str(tiny_world["train"])},
        "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 4, "num_rollout": STEPS,
                    "rollout_max_response_len": 4, "groups_per_engine_call": 4, "micro_batch_size": 8},
        "train": {"train_backend": "megatron", "tensor_model_parallel_size": 2, "actor_num_gpus_per_node": 2},
        "buffer": {"max_staleness": 1},
        "logging": {"progress": False},
        "cluster": {"startup_timeout": 90},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {**os.environ, "ASYNC_RL_MEGATRON_CPU_SHIM": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE / "cpu_site"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(tmp_path / "run.yaml"),
                           "--run-dir", str(run_dir), "--cluster", cluster], capture_output=True, text=True, timeout=240,
                          env=env)
    learner_log = (run_dir / "logs" / "learner.log")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (learner_log.read_text() if learner_log.exists() else "")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["staleness/max"] <= 1 and r["loss/pg"] is not None for r in rows)
    assert rows[-1]["version"] == STEPS - 1  # logged before the step's own publication
    assert (run_dir / "weights" / f"v{STEPS}" / "model.safetensors").exists()
    state = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "state.json").read_text())
    assert state["backend"] == "megatron" and state["version"] == STEPS and state["layout"]["tp"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints" / f"step_{STEPS}" / "megatron").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert not [n for n, p in manifest["processes"].items() if _alive(p["pid"])]
    if cluster == "ray":  # one actor per rank, each the learner module itself (no torchrun)
        ranks = manifest["placement"]["learner_ranks"]
        assert [ranks[r]["actor"] for r in sorted(ranks)] == ["learner", "learner.rank1"]
        assert not _alive(manifest["cluster"]["actors"]["learner.rank1"]["pid"])
        assert "Ray actor" in (run_dir / "logs" / "learner.rank1.log").read_text().splitlines()[0]
