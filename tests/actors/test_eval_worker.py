"""Periodic evaluation: unbiased pass@k (against a brute-force count over all k-subsets and the learner's
estimator), the pin protocol between weight pruning and the eval worker, and a real short run in which the
eval worker evaluates every eval_interval-th version while training goes on."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
import yaml

from actors.eval_worker import due_versions
from actors.evaluate import pass_at_k, pass_at_ks
from learners.advantages import pass_at_k as learner_pass_at_k
from learners.weights import pin_path, prune


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 5, 4) == 1.0  # 5 correct of 8: any 4 hold one
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(4, 5, 1)


def test_pass_at_ks_agrees_with_the_learners_estimator():
    rng = random.Random(0)
    rewards = torch.tensor([[float(rng.random() < p) for _ in range(8)] for p in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3)])
    ours = pass_at_ks([int(row.sum()) for row in rewards], 8)
    assert list(ours) == ["pass@1", "pass@2", "pass@4", "pass@8"]
    assert ours == pytest.approx(learner_pass_at_k(rewards))
    assert ours["pass@1"] == pytest.approx(float(rewards.mean()))  # pass@1 is the mean accuracy


def test_pinned_versions_survive_pruning_until_unpinned(tmp_path):
    root = tmp_path / "weights"
    for v in range(1, 7):
        (root / f"v{v}").mkdir(parents=True)
        if v in (2, 4):
            pin_path(root, v).parent.mkdir(exist_ok=True)
            pin_path(root, v).write_text("{}")
        prune(root, keep=2)
    assert sorted(p.name for p in root.glob("v*")) == ["v2", "v4", "v5", "v6"]
    assert due_versions(root, 2, done={0}) == [2, 4, 6]
    pin_path(root, 2).unlink()  # what the eval worker does once v2's row is written
    (root / "v7").mkdir()
    prune(root, keep=2)
    assert sorted(p.name for p in root.glob("v*")) == ["v4", "v6", "v7"]
    assert due_versions(root, 2, done={0, 2, 4}) == [6]


@pytest.mark.e2e
def test_eval_worker_logs_pass_at_k_per_dataset_at_pinned_versions_while_training(tmp_path, tiny_world):
    cfg = {
        "ckpt": {"hf_checkpoint": str(tiny_world["model_sft"]), "keep_weight_versions": 1},
        "data": {"prompt_data": str(tiny_world["train"])},
        "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 4, "num_rollout": 16,
                    "rollout_max_response_len": 4, "groups_per_engine_call": 4},
        "eval": {"eval_prompt_data": ["add", str(tiny_world["test"]), "again", str(tiny_world["test"])],
                 "eval_interval": 4, "n_samples_per_eval_prompt": 4, "eval_temperature": 1.0, "eval_max_prompts": 12},
        "logging": {"progress": False},
        "cluster": {"startup_timeout": 60},
        "buffer": {"auth": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(tmp_path / "run.yaml"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(16))  # training ran to the end, one row per learner step
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    log = (run_dir / "logs" / "eval_worker.log").read_text()
    assert [r["version"] for r in rows] == [0, 4, 8, 12, 16], log
    for r in rows:
        assert r["step"] == r["version"] and r["eval/n_samples_per_prompt"] == 4
        for name in ("add", "again"):
            p = [r[f"eval/{name}/pass@{k}"] for k in (1, 2, 4)]
            assert 0.0 <= p[0] <= p[1] <= p[2] <= 1.0, r
            assert r[f"eval/{name}/num_prompts"] == 12
            assert r[f"eval/{name}/pass@1"] == pytest.approx(r[f"eval/{name}/reward"])  # 0/1 exact-match rewards
    # keep_weight_versions=1 would have deleted v4..v12 long before: their pins kept them; none is left pinned
    assert not list((run_dir / "weights" / "pins").iterdir())
    # the start and end greedy evals still run, on the fleet's engine
    for tag in ("start", "end"):
        e = json.loads((run_dir / f"eval_{tag}.json").read_text())
        assert e["dataset"] == "add" and e["num_prompts"] == 12 and 0.0 <= e["accuracy"] <= 1.0
