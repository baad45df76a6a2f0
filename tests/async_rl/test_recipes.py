"""The recipes in configs/ and `launch --dry-run`: every recipe validates and dry-runs (placement, batch
arithmetic, memory estimate) without starting a process or writing a file; the GPU recipes fit the GPUs
their names promise (80 GB each); the parameter count the estimate rests on matches transformers' own
models; the GPUs the dry-run shows are the ones a real child process gets."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from async_rl.launch import cli
from async_rl import config as config_mod
from async_rl.placement import GiB, Shape, assignment, model_shape
from async_rl.launch.plan import estimate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
GPU_GIB = 80  # the smallest GPU the recipes are written for (H100 80 GB)


def _children() -> set[int]:
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


@pytest.mark.parametrize("recipe", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_dry_runs_and_starts_nothing(recipe, tmp_path, capsys):
    before = _children()
    code = cli.main(["launch", str(recipe), "--dry-run", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    for part in ("the config is valid", "placement", "learner", "batch:", "memory estimate", "on this machine"):
        assert part in out.out, (part, out.out)
    assert not (tmp_path / "run").exists() and _children() <= before


@pytest.mark.parametrize("recipe", [p for p in CONFIGS if re.search(r"-(\d+)gpu$", p.stem)],
                         ids=lambda p: p.stem)
def test_gpu_recipes_fit_their_gpus(recipe):
    cfg = config_mod.load(recipe)
    n_gpus = int(re.search(r"-(\d+)gpu$", recipe.stem).group(1))
    est = estimate(cfg)
    assert est["shape"] is not None, est["source"]  # a known shape: the estimate is there without the model
    used = {g for ids in assignment(cfg).values() for g in ids}
    assert used == set(range(n_gpus)), f"{recipe.name} uses GPUs {sorted(used)} of {n_gpus}"
    for gpu, users in est["gpus"].items():
        assert sum(b for _, b in users) < GPU_GIB * GiB, (gpu, [(n, b / GiB) for n, b in users])


def test_dry_run_with_no_yaml_and_a_bad_value_exits_2(tmp_path, capsys):
    assert cli.main(["launch", "--rollout-batch-size", "0", "--dry-run"]) == 2
    assert "rollout.rollout_batch_size=0" in capsys.readouterr().err


@pytest.mark.parametrize("cls,kw", [
    ("Qwen2ForCausalLM", dict(model_type="qwen2", tie_word_embeddings=True)),
    ("Qwen2ForCausalLM", dict(model_type="qwen2", tie_word_embeddings=False)),
    ("Qwen3ForCausalLM", dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False)),
])
def test_parameter_count_matches_transformers(tmp_path, cls, kw):
    import transformers
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    hf = config_cls(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=300, **{k: v for k, v in kw.items() if k != "model_type"})
    model = getattr(transformers, cls)(hf)
    hf.save_pretrained(tmp_path)
    shape, source = model_shape(str(tmp_path))
    assert source.endswith("config.json")
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_known_shapes_match_the_published_sizes():
    # the sizes the model cards give (Qwen2.5-0.5B: 0.49B, 1.5B: 1.54B, Qwen3-4B: 4.0B, Qwen3-8B: 8.2B)
    for name, billions in (("Qwen2.5-0.5B-Instruct", 0.49), ("Qwen2.5-1.5B", 1.54), ("Qwen3-4B", 4.02),
                           ("Qwen3-8B", 8.19)):
        shape, _ = model_shape(f"/nonexistent/{name}")
        assert abs(shape.params / 1e9 - billions) < 0.01, (name, shape.params)
    assert model_shape("/nonexistent/llama-70b")[0] is None


def test_engine_and_learner_gpu_lists_are_checked():
    with pytest.raises(config_mod.ConfigError, match=r"cluster.engine_gpus=\[4, 5\]: 4 engine\(s\) x 1 GPU"):
        config_mod.load(None, ["num_engines=4", "engine_device=cuda", "engine_gpus=[4, 5]"])
    with pytest.raises(config_mod.ConfigError, match=r"engine_device='cpu'"):
        config_mod.load(None, ["engine_gpus=[1]"])
    with pytest.raises(config_mod.ConfigError, match=r"learner takes 1 GPU"):
        config_mod.load(None, ["learner_device=cuda", "learner_gpus=[0, 1]"])
    with pytest.raises(config_mod.ConfigError, match="distinct GPU ids"):
        config_mod.load(None, ["engine_device=cuda", "num_engines=2", "engine_gpus=[3, 3]"])


def test_a_child_sees_the_gpus_the_dry_run_shows(tmp_path):
    """The launcher's ProcessGroup gives engine i and the learner exactly their ids as CUDA_VISIBLE_DEVICES
    (a real child process prints what it got)."""
    from async_rl.launch.launcher import Launcher
    cfg = config_mod.load(next(p for p in CONFIGS if "8gpu" in p.stem))
    launcher = Launcher(cfg, tmp_path)
    (tmp_path / "logs").mkdir()
    for name in ("engine1", "learner"):
        child = launcher.procs.start_command(name, [sys.executable, "-c",
                                                    "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"])
        child.proc.wait(timeout=60)
        assert child.log.read_text().split() == [",".join(map(str, assignment(cfg)[name]))]
    generator = launcher.procs.start_command("generator0", [sys.executable, "-c",
                                             "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"])
    generator.proc.wait(timeout=60)
    assert generator.log.read_text().split() == [os.environ.get("CUDA_VISIBLE_DEVICES", "None")]
