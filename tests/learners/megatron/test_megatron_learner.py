"""The Megatron learner's steps on CPU (gloo, test shim), offline (no hub), on the tiny SFT'd Qwen2.

References: the torch learner (HF model, same RL math, same AdamW) on the same batches gives the same
losses and grad norms (float32, |diff| <= 1e-5 over 3 steps, micro-batched); TP=2 (two processes),
DP=2 (balanced rows, token-budget micro-batches) and PP=2 (Megatron's 1F1B schedule over micro-batches of
different lengths and row counts, tied embedding on both stages) give TP=1's; published weights load into HF and give
the trained Megatron model's logits; a checkpoint resumes bit for bit (TP=2 and PP=2, cosine LR with
warmup, KL to a reference model refreshed every step)."""
from __future__ import annotations

import pytest
import torch

import mp_workers  # tests/learners/megatron/mp_workers.py
from async_rl import config as C
from synthetic_groups import N, N_GROUPS, groups  # tests/learners/synthetic_groups.py

STEPS = 3
TOL = 1e-5
BASE = [f"rollout_batch_size={N_GROUPS}", f"n_samples_per_prompt={N}", "micro_batch_size=4", "lr=3e-3",
        "entropy_coef=0.01", "num_rollout=10"]


def _config(world: dict, words: list[str], backend: str = "megatron") -> C.Config:
    return C.load(None, [f"hf_checkpoint={world['model_sft']}", f"train_backend={backend}", *BASE, *words])


def _megatron(world: dict, words: list[str], run_dir: str):
    from learners.megatron.learner import make_learner
    return make_learner(_config(world, words), run_dir, None)


def _train(world: dict, words: list[str], run_dir: str) -> dict:
    lrn = _megatron(world, words, run_dir)
    steps = [lrn.train_step(groups(lrn, seed=s)) for s in range(STEPS)]
    return {"loss": [m["loss/pg"] for m in steps], "grad_norm": [m["grad_norm"] for m in steps]}


@pytest.fixture(scope="module")
def torch_reference(tiny_world) -> dict:
    from learners.torch_learner import make_learner
    lrn = make_learner(_config(tiny_world, [], backend="torch"), tiny_world["root"] / "run_torch", None)
    steps = [lrn.train_step(groups(lrn, seed=s)) for s in range(STEPS)]
    return {"loss": [m["loss/pg"] for m in steps], "grad_norm": [m["grad_norm"] for m in steps]}


def _close(a: list, b: list) -> bool:
    return all(abs(x - y) <= TOL * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("words, world_size", [
    ([], 1),
    (["tensor_model_parallel_size=2", "actor_num_gpus_per_node=2"], 2),
    (["actor_num_gpus_per_node=2", "balance_data=true", "use_dynamic_batch_size=true", "max_tokens_per_gpu=24"], 2),
    (["pipeline_model_parallel_size=2", "actor_num_gpus_per_node=2", "use_dynamic_batch_size=true",
      "max_tokens_per_gpu=40"], 2),
], ids=["tp1", "tp2", "dp2-dynamic", "pp2-dynamic"])
def test_megatron_steps_match_the_torch_learner(tiny_world, torch_reference, tmp_path, words, world_size):
    results = mp_workers.run(world_size, _train, tiny_world, words, str(tmp_path))
    for res in results:  # every rank reports the same (reduced) numbers
        assert _close(res["loss"], torch_reference["loss"]), (res, torch_reference)
        assert _close(res["grad_norm"], torch_reference["grad_norm"]), (res, torch_reference)


def _publish_and_probe(world: dict, run_dir: str) -> dict:
    from learners.megatron.model import forward_logits
    from learners.megatron.weights import gather_hf
    from learners.weights import HFExport, publish

    lrn = _megatron(world, ["tensor_model_parallel_size=2", "actor_num_gpus_per_node=2"], run_dir)
    b = lrn.backend
    lrn.train_step(groups(lrn, seed=0))
    lrn.apply_knobs({"knob_version": 1, "knobs": {"optimizer.lr": 5e-4}})  # live `async-rl set lr=5e-4`
    lr_after_knob = b.optimizer.lr
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        logits = forward_logits(b.model.eval(), ids, b.shape.vocab)
    state = gather_hf(b.model, b.shape, b.layout)
    path = None
    if state is not None:
        path = str(publish(HFExport(state, b.hf_config, world["model_sft"]), lrn.tokenizer, run_dir, 1, 2))
    return {"logits": logits, "ids": ids, "path": path, "lr": lr_after_knob}


def test_published_weights_load_into_hf_with_the_same_logits_and_live_lr(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    results = mp_workers.run(2, _publish_and_probe, tiny_world, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(results[0]["path"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=results[0]["ids"]).logits[:, :-1]
    for res in results:
        assert (res["logits"] - ref).abs().max() <= 1e-4
        assert res["lr"] == 5e-4


def _resume(world: dict, run_dir: str, parallel: list[str]) -> dict:
    words = [*parallel, "actor_num_gpus_per_node=2", "lr_decay_style=cosine", "lr_warmup_iters=1", "min_lr=1e-4",
             "use_kl_loss=true", "kl_loss_coef=0.1", "ref_update_interval=1"]
    first = _megatron(world, words, run_dir)
    first.train_step(groups(first, seed=0))
    first.save_checkpoint(1)
    after = [first.train_step(groups(first, seed=s)) for s in (1, 2)]
    second = _megatron(world, words, run_dir)
    step = second.resume()
    again = [second.train_step(groups(second, seed=s)) for s in (1, 2)]
    same_params = all(torch.equal(p, q) for p, q in zip(first.backend.model.parameters(),
                                                          second.backend.model.parameters()))
    return {"step": step, "version": second.version, "same_params": same_params,
            "metrics": [(m["loss/pg"], m["grad_norm"], m["lr"], m["kl"]) for m in after],
            "metrics_again": [(m["loss/pg"], m["grad_norm"], m["lr"], m["kl"]) for m in again]}


@pytest.mark.parametrize("parallel", [["tensor_model_parallel_size=2"], ["pipeline_model_parallel_size=2"]],
                         ids=["tp2", "pp2"])
def test_checkpoint_resumes_bit_for_bit(tiny_world, tmp_path, parallel):
    for res in mp_workers.run(2, _resume, tiny_world, str(tmp_path), parallel):
        assert res["step"] == 1
        assert res["metrics_again"] == res["metrics"]  # exactly, not approximately
        assert res["same_params"]
        assert res["metrics"][0][2] != res["metrics"][1][2]  # the LR schedule moved and was restored
