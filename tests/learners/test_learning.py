"""Short CPU learning runs through the real launcher (`python -m async_rl.launch.cli launch`: hub, engine,
generator, learner as processes): async GRPO + TIS and PPO with its critic both raise the sampled reward
on the addition task; a bad learner plug-in fails the launch at start-up with the field in the message.

Settings were chosen for robustness on 2 cores (measured: the mean reward of the last 50 of 250 steps
beats the first 50 by 0.05-0.10 over 7 seeded runs, each ~20 s): a stronger warm start than the shared
fixture's (so that a group often holds a right answer), lr 3e-4, 4 prompts x 8 samples per step.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
STEPS, WINDOW = 250, 50


@pytest.fixture(scope="module")
def warm_model(tiny_world) -> Path:
    from learners.sft import warm_start
    out = tiny_world["root"] / "model_sft_learning"
    if not out.exists():
        warm_start(str(tiny_world["model_sft"]), str(tiny_world["train"]), str(out), steps=200, log_every=1000)
    return out


def launch(tmp_path: Path, world: dict, model: Path, *overrides: str) -> tuple[int, str, Path]:
    cfg = {"ckpt": {"hf_checkpoint": str(model)}, "data": {"prompt_data": str(world["train"]), "rollout_seed": 1},
           "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 8, "num_rollout": STEPS,
                       "rollout_max_response_len": 4, "groups_per_engine_call": 4},
           "optimizer": {"lr": 3e-4}, "train": {"seed": 1},
           "logging": {"progress": False}, "cluster": {"startup_timeout": 60}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(path), *overrides,
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr, run_dir


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def window_mean(rows: list[dict], key: str, part: slice) -> float:
    values = [r[key] for r in rows[part]]
    return sum(values) / len(values)


def assert_reward_improves(rows: list[dict]) -> None:
    assert len(rows) == STEPS
    first = window_mean(rows, "reward/mean", slice(0, WINDOW))
    last = window_mean(rows, "reward/mean", slice(-WINDOW, None))
    assert last > first + 0.02, f"reward did not improve: first {WINDOW} steps {first:.3f}, last {last:.3f}"


def test_async_grpo_with_tis_learns(tmp_path, tiny_world, warm_model):
    code, out, run_dir = launch(tmp_path, tiny_world, warm_model, "advantage_estimator=grpo", "use_tis=true",
                                "max_staleness=2")
    assert code == 0, out[-3000:]
    rows = rows_of(run_dir)
    assert_reward_improves(rows)
    assert max(r["staleness/max"] for r in rows) >= 1  # it really trained off-policy, with TIS weights
    assert all(r["tis/weight_mean"] is not None and r["entropy"] > 0 for r in rows)


def test_ppo_with_critic_learns(tmp_path, tiny_world, warm_model):
    code, out, run_dir = launch(tmp_path, tiny_world, warm_model, "advantage_estimator=ppo", "critic_lr=1e-3",
                                "num_critic_only_steps=5", "normalize_advantages=true", "log_passrate=true")
    assert code == 0, out[-3000:]
    rows = rows_of(run_dir)
    assert_reward_improves(rows)
    assert all(r["loss/pg"] is None for r in rows[:5]) and rows[5]["loss/pg"] is not None
    # the critic learned the mean reward (its head starts at 0)
    gap = abs(window_mean(rows, "critic/values_mean", slice(-WINDOW, None)) -
              window_mean(rows, "reward/mean", slice(-WINDOW, None)))
    assert rows[0]["critic/values_mean"] == 0.0 and gap < 0.1
    assert {"pass@1", "pass@2", "pass@4", "pass@8"} <= set(rows[-1])


def test_bad_plugin_fails_the_launch_at_start(tmp_path, tiny_world):
    code, out, _ = launch(tmp_path, tiny_world, tiny_world["model_sft"], "loss_type=custom_loss",
                          "custom_loss_function_path=no_such_module.loss")
    assert code == 1
    assert "algo.custom_loss_function_path='no_such_module.loss': cannot import 'no_such_module'" in out
