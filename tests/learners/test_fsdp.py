"""The FSDP2 torch learner over gloo on CPU (learners/fsdp.py), rank processes started by torchrun.

The reference is one unsharded model without a process group training on the same global batches: the
sharded runs at 2 ranks must give the same losses, gradient norms, logprobs and final weights within
1e-5, with per-sample and per-token losses, with rows in order and balanced by tokens. A sharded
checkpoint written at 2 ranks resumes at 1 and at 2 ranks to the same next steps as the run that never
stopped.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from async_rl import tiny

WORKER = Path(__file__).with_name("fsdp_worker.py")
TOL = 1e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, name: str, nproc: int, *args: str, model: str = "model") -> dict:
    out = tmp / f"{name}.json"
    if nproc == 0:  # the unsharded reference
        cmd = [sys.executable, str(WORKER), "--plain"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_port()}", "--master-addr=127.0.0.1", str(WORKER)]
    proc = subprocess.run(cmd + ["--model", str(tmp / model), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=240, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    tiny.build_model(root / "model")
    return root


def _close(a: dict, b: dict, keys=("loss", "grad_norm", "logp_old_sum")) -> None:
    assert len(a["rows"]) == len(b["rows"]) > 0
    for x, y in zip(a["rows"], b["rows"]):
        for key in keys:
            assert abs(x[key] - y[key]) <= TOL * max(1.0, abs(x[key])), (key, x, y)


@pytest.mark.parametrize("per_token", [False, True])
def test_two_ranks_equal_one_unsharded_model(tmp, per_token):
    flag = ["--per-token"] if per_token else []
    plain = _run(tmp, f"plain{per_token}", 0, *flag)
    dp2 = _run(tmp, f"dp2{per_token}", 2, *flag)
    assert dp2["world"] == 2 and plain["world"] == 1
    _close(plain, dp2)
    assert plain["keys"] == dp2["keys"]  # rank 0 gathered every weight
    assert abs(plain["weights_sum"] - dp2["weights_sum"]) <= TOL * plain["weights_sum"]
    assert any(abs(r["loss"]) > 1e-4 for r in plain["rows"])  # the steps did train on something


def test_one_rank_under_torchrun_is_fsdp2_over_a_group_of_one(tmp, monkeypatch):
    """torchrun's agent (its TORCHELASTIC_RUN_ID, also at one rank) selects the FSDP2 backend and forms a process
    group of one rank, which trains as the unsharded model does; without it, the one-process backend (the
    launcher's default), also when WORLD_SIZE is set by someone else (a one-process megatron learner)."""
    from learners import torch_learner
    from learners.fsdp_backend import FsdpBackend
    from learners.torch_backend import TorchBackend

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torch_learner.backend_class() is TorchBackend
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert torch_learner.backend_class() is FsdpBackend
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("WORLD_SIZE")
    dp1 = _run(tmp, "dp1", 1)  # fsdp.shard needs the group: without one it raises
    assert dp1["world"] == 1
    _close(_run(tmp, "plain_dp1", 0), dp1)
    assert any(abs(r["loss"]) > 1e-4 for r in dp1["rows"])


@pytest.mark.parametrize("tied", [True, False])
def test_only_rank_zero_reads_the_checkpoint(tmp, tied):
    """Rank 1 builds the model on the meta device and gets its shards (and the rotary buffers) from rank 0:
    it never reads the checkpoint, and trains exactly as when every rank loads it, and as the unsharded
    model; tied embeddings stay one parameter."""
    name = f"model_tied{tied}"
    tiny.build_model(tmp / name, tie_embeddings=tied)
    plain = _run(tmp, f"plain_{name}", 0, model=name)
    dp2 = _run(tmp, f"dp2_{name}", 2, model=name)
    every = _run(tmp, f"every_{name}", 2, "--every-rank-loads", model=name)
    assert dp2["loads"] == [1, 0] and every["loads"] == [1, 1] and plain["loads"] == [1]
    assert dp2["tied"] is plain["tied"] is tied
    _close(plain, dp2)
    _close(every, dp2, keys=("loss", "grad_norm", "logp_old_sum", "entropy"))
    assert abs(plain["weights_sum"] - dp2["weights_sum"]) <= TOL * plain["weights_sum"]


def test_balanced_rows_change_nothing_but_the_split(tmp):
    _close(_run(tmp, "plain_bal", 0), _run(tmp, "dp2_bal", 2, "--balance"))


def test_token_budget_micro_batches_change_nothing_but_the_split(tmp):
    """use_dynamic_batch_size: micro-batches by rows x longest <= 40 tokens, so the two ranks form different
    numbers of them (the one with fewer runs padding passes); the steps equal fixed 3-row micro-batches."""
    _close(_run(tmp, "plain_fixed", 0), _run(tmp, "dp2_budget", 2, "--max-tokens", "40", "--balance"))


def test_checkpoint_at_two_ranks_resumes_at_one_and_two(tmp):
    ckpt = tmp / "ckpt"
    whole = _run(tmp, "whole", 2, "--steps", "3", "--save-at", "2", "--ckpt", str(ckpt))
    assert (ckpt / ".metadata").exists()
    tail = {"rows": [r for r in whole["rows"] if r["step"] == 2], "weights_sum": whole["weights_sum"]}
    for nproc in (0, 2):  # 0: one unsharded process, the torch learner at one rank
        resumed = _run(tmp, f"resumed{nproc}", nproc, "--steps", "1", "--first-step", "2",
                       "--resume-from", str(ckpt))
        _close(tail, resumed)
        assert abs(resumed["weights_sum"] - whole["weights_sum"]) <= TOL * whole["weights_sum"]


@pytest.mark.parametrize("words, needle", [
    (["actor_num_gpus_per_node=3"], "global_batch_size=64: every one of the learner's 3 data-parallel ranks"),
    (["actor_num_gpus_per_node=2", "advantage_estimator=ppo"], "the PPO critic is not sharded"),
    (["actor_num_gpus_per_node=2", "update_weight_mode=tensor", "engine_device=cuda", "learner_device=cuda"],
     "update_weight_mode='tensor' with train.actor_num_gpus_per_node=2"),
    (["actor_num_gpus_per_node=2", "learner_device=cuda:1"], "each rank takes its own GPU"),
    (["fsdp_cpu_offload=true"], "train.fsdp_cpu_offload=True: offloads the FSDP2 GPU learner's states to the host; "
                                "it needs train_backend=torch and learner_device=cuda (now 'torch', 'cpu')"),
])
def test_config_rules_of_several_ranks(words, needle):
    from async_rl import config as C
    with pytest.raises(C.ConfigError) as err:
        C.load(None, words)
    assert needle in str(err.value)


def test_dry_run_plan_shows_the_ranks():
    from async_rl import config as C
    from async_rl.launch import plan
    cfg = C.load(None, ["actor_num_gpus_per_node=2", "balance_data=true"])
    assert "torch, cpu, FSDP2 over 2 ranks under torchrun" in "\n".join(plan.placement_lines(cfg))
    one = C.load(None, [])
    assert "FSDP2" not in "\n".join(plan.placement_lines(one))


def test_cpu_offload_at_one_gpu_runs_fsdp2_over_one_rank():
    """fsdp_cpu_offload at actor_num_gpus_per_node=1: the launcher starts the learner under torchrun (FSDP2 over
    a group of one, whose CPUOffloadPolicy holds the states on the host), the plan says so, and the estimate
    keeps on the GPU one layer's gathered weights and gradients instead of 16 bytes a parameter."""
    from async_rl import config as C
    from async_rl import placement
    from async_rl.launch import plan
    words = ["learner_device=cuda", "engine_device=cuda", "bf16=true"]
    off, on = C.load(None, words), C.load(None, words + ["fsdp_cpu_offload=true"])
    assert not placement.learner_is_ranked(off) and placement.learner_is_ranked(on)
    text = "\n".join(plan.placement_lines(on))
    assert "torch, cuda, FSDP2 over 1 rank under torchrun, parameters, gradients and AdamW states on the host" in text
    assert "FSDP2" not in "\n".join(plan.placement_lines(off))
    shape = placement.KNOWN["qwen2.5-1.5b"]
    assert plan.learner_bytes(off, shape)["states"] == pytest.approx(shape.params * 16)
    assert plan.learner_bytes(on, shape)["states"] == pytest.approx(shape.params / shape.layers * 8)
    with pytest.raises(C.ConfigError, match=r"needs train_backend=torch and learner_device=cuda \(now 'megatron', 'cpu'\)"):
        C.load(None, ["fsdp_cpu_offload=true", "train_backend=megatron"])
