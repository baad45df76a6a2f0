"""Learner throughput on one GPU: the Megatron learner vs the torch learner, same synthetic RL batches.

    python scripts/gpu/bench_megatron.py                          # Qwen2-shaped 0.5B and 1.5B, ~4 min on an H100
    python scripts/gpu/bench_megatron.py --sizes 1.5b --variants torch:4 megatron:4 megatron:8
    python scripts/gpu/bench_megatron.py --sizes 1.5b --check-kernels --variants \
        megatron:4:use_dynamic_batch_size=true:max_tokens_per_gpu=16384:BENCH_PROFILE=1

The GPU machine has neither megatron-core nor pyzmq: carry `wheels/` (git-ignored; see docs/BENCHMARKS.md)
and put them on PYTHONPATH first.

A step is each learner's own `train_step` on one batch (rollout_batch_size x n_samples_per_prompt
samples of prompt_len + response_len tokens, random ids, random rollout logprobs and 0/1 rewards):
build the batch, recompute logp_old (a forward pass), GRPO advantages, TIS weights, then one optimizer
step by gradient accumulation over micro-batches with the PPO-clip x TIS loss. Weights are random
(Qwen2 shapes, random init, written once as an HF checkpoint both learners load).
- torch learner: the learner loop over `learners.torch_backend.TorchBackend` with its HF model in bf16 on
  the GPU (sdpa attention, fused AdamW on bf16 params) and its batch tensors on the GPU.
- megatron learner: the loop over `learners.megatron.backend.MegatronBackend`, unchanged: train.bf16 (bf16 params,
  fp32 main params and grads, Megatron's optimizer), local layer spec with SDPA attention.
- fsdp learner: the torch learner process's own backend choice (`learners.torch_learner.backend_class`) under
  `torchrun --standalone --nproc-per-node=1`: `learners.fsdp_backend.FsdpBackend`, FSDP2 at one rank (NCCL),
  train.bf16 (bf16 params in forward/backward, fp32 gradient reduction, fp32 sharded AdamW), batches on the GPU.
MFU = FLOPs / step time / 989 TFLOP/s (H100/H200 dense bf16 peak), FLOPs per token = 8N + 16*L*H*Q*S
(2N + 4LHQS for the logp_old forward, 6N + 12LHQS for forward + backward; N all parameters with the
tied embedding once, L layers, H*Q the attention width, S the sequence length; PaLM's count).
Each variant runs in its own process (an out-of-memory variant is reported, the others still run). A
variant's UPPERCASE=value words are environment variables of its process (ASYNC_RL_COMPILE_LOGPROBS=0: eager
logprob blocks; BENCH_PROFILE=1: a torch.profiler table of one extra step). --check-kernels first checks the
blockwise logprob/entropy against float64 and times it against the whole-vocabulary float32 computation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PEAK = 989e12
SIZES = {  # Qwen2-0.5B / Qwen2-1.5B shapes
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8192),  # scripts/gpu/check_megatron_checkpoint.py
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),  # a CPU smoke test of this script
}


def build_checkpoint(size: str, out: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from async_rl.tiny import build_tokenizer

    if (out / "config.json").exists():
        return out
    cfg = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True, **SIZES[size])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out)  # only its pad id is used; token ids are random
    del model
    torch.cuda.empty_cache()  # this process stays alive while the variants run
    return out


class PhaseTimer:
    """Wall time (device-synchronised) spent in a few learner methods during the timed steps."""

    def __init__(self, lrn, on_gpu: bool):
        self.totals, self.on = {}, False
        for name, obj, attr in (("score", lrn, "_score"), ("update", lrn.backend, "train_step"),
                                ("optimizer", lrn.backend.optimizer, "step")):
            setattr(obj, attr, self._wrap(name, getattr(obj, attr), on_gpu))

    def _wrap(self, name, fn, on_gpu):
        def timed(*args, **kwargs):
            _sync(on_gpu)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(on_gpu)
            if self.on:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed


def synthetic_groups(a, vocab: int, seed: int) -> list:
    import numpy as np

    from async_rl.types import Group, Trajectory

    rng = np.random.default_rng(seed)
    out = []
    for g in range(a.groups):
        prompt = rng.integers(3, vocab, a.prompt_len).astype(np.int32)
        trajs = [Trajectory(prompt, rng.integers(3, vocab, a.response_len).astype(np.int32),
                            (-rng.random(a.response_len) * 2).astype(np.float32),
                            np.zeros(a.response_len, np.int32), reward=float(rng.integers(0, 2)))
                 for _ in range(a.samples)]
        out.append(Group("bench", g, g, "x", trajs))
    return out


def flops_per_token(size: str, seq: int, n_params: int) -> float:
    s = SIZES[size]
    return 8 * n_params + 16 * s["num_hidden_layers"] * s["hidden_size"] * seq


def _torch_learner(cfg, run_dir):
    import torch

    import learners.loop as loop
    from learners.batch import TrainBatch
    from learners.torch_backend import TorchBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script

    class GPUTorchBackend(TorchBackend):
        def build_policy(self):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(self.cfg.ckpt.hf_checkpoint, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa").to(device).train()
            o = self.cfg.optimizer
            return model, torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                            eps=o.adam_eps, weight_decay=o.weight_decay, fused=device == "cuda")

    build = loop.build_batch

    def on_gpu(groups, pad_id) -> TrainBatch:
        b = build(groups, pad_id)
        return dataclasses.replace(b, **{f.name: getattr(b, f.name).to(device) for f in dataclasses.fields(b)
                                         if isinstance(getattr(b, f.name), torch.Tensor)})
    loop.build_batch = on_gpu
    return loop.Learner(cfg, run_dir, None, None, GPUTorchBackend)


def run_variant(a, variant: str) -> dict:
    """One learner, timed over a.steps steps after a.warmup; runs in its own process."""
    import torch

    from async_rl import config as C

    import os

    kind, micro, *extra = variant.split(":")
    for word in [w for w in extra if w.split("=")[0].isupper()]:  # NAME=value: an environment variable
        os.environ[word.split("=")[0]] = word.split("=", 1)[1]
        extra.remove(word)
    on_gpu = torch.cuda.is_available()
    words = [f"hf_checkpoint={a.ckpt}", f"rollout_batch_size={a.groups}", f"n_samples_per_prompt={a.samples}",
             f"micro_batch_size={micro}", "lr=1e-6", "num_rollout=1000", "progress=false"]
    if kind == "megatron":
        words += ["train_backend=megatron", f"bf16={on_gpu}"] + extra
    elif kind == "fsdp":
        words += [f"learner_device={'cuda' if on_gpu else 'cpu'}", f"bf16={on_gpu}"] + extra
    elif on_gpu:
        words += ["learner_device=cuda"]  # its batches on the GPU (the model is built there in bf16 below)
    cfg = C.load(None, words)
    build = {"torch": _torch_learner, "megatron": _megatron_learner, "fsdp": _fsdp_learner}[kind]
    lrn = build(cfg, a.out / "run")
    n_params = sum(p.numel() for p in lrn.backend.model.parameters())
    phases = PhaseTimer(lrn, on_gpu)
    times, first = [], None
    for step in range(a.warmup + a.steps):
        groups = synthetic_groups(a, SIZES[a.size]["vocab_size"], seed=step)
        phases.on = step >= a.warmup
        _sync(on_gpu)
        t0 = time.perf_counter()
        m = lrn.train_step(groups)
        _sync(on_gpu)
        first = first or m
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    phases.on = False
    if a.profile or os.environ.get("BENCH_PROFILE"):
        profile_step(lrn, synthetic_groups(a, SIZES[a.size]["vocab_size"], seed=99), on_gpu)
    step_s = sorted(times)[len(times) // 2]
    seq = a.prompt_len + a.response_len
    tokens = a.groups * a.samples * seq
    return {"variant": variant, "size": a.size, "params": n_params, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "mfu": tokens * flops_per_token(a.size, seq, n_params) / step_s / PEAK,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
            "loss_pg0": first["loss/pg"], "entropy0": first["entropy"], "grad_norm0": first["grad_norm"],
            **{f"{k}_s": v / a.steps for k, v in phases.totals.items()}}


def profile_step(lrn, groups, on_gpu: bool) -> None:
    """One more step under torch.profiler: device time by kernel, and device busy time vs wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _sync(on_gpu)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        lrn.train_step(groups)
        _sync(on_gpu)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6 if on_gpu else 0.0
    print(f"PROFILE wall {wall:.2f} s (profiled), device busy {busy:.2f} s", flush=True)
    print(events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=22,
                       max_name_column_width=60), flush=True)


def whole_vocab(logits, targets):
    """The logprob/entropy computation before the blockwise one: float32 log_softmax over [B, T, V]."""
    import torch

    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def check_logprob_kernels(vocab: int, rows: int = 4, seq: int = 2048) -> list[str]:
    """The blockwise logprob/entropy on the GPU (torch.compile'd blocks) against a float64 reference, and
    its forward+backward time and peak memory against `whole_vocab`, on bf16 logits[:, :-1] views."""
    import torch

    from learners import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(rows, seq, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows, seq - 1), device="cuda", generator=g)
    c1, c2 = torch.randn(2, rows, seq - 1, device="cuda", generator=g)
    lines = []
    for name, fn in (("blockwise", losses.logprobs_and_entropy), ("whole-vocab fp32", whole_vocab)):
        times = []
        for it in range(6):
            x = base.detach().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            logp, ent = fn(x[:, :-1], targets)
            ((logp * c1).sum() + (ent * c2).sum()).backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
        ref_x = base[:1, :257].detach().double().requires_grad_(True)  # float64 reference on a slice
        ref_logp_all = torch.log_softmax(ref_x[:, :-1], dim=-1)
        ref_logp = ref_logp_all.gather(-1, targets[:1, :256].unsqueeze(-1)).squeeze(-1)
        ref_ent = -(ref_logp_all.exp() * ref_logp_all).sum(-1)
        ((ref_logp * c1[:1, :256]).sum() + (ref_ent * c2[:1, :256]).sum()).backward()

        def rel(a, b):
            return float((a.double() - b).norm() / b.norm())
        errs = (rel(logp[:1, :256], ref_logp), rel(ent[:1, :256], ref_ent), rel(x.grad[:1, :256], ref_x.grad[:, :-1]))
        lines.append(f"| {name} | {sorted(times[1:])[2] * 1e3:.1f} | {extra:.1f} | "
                     + " / ".join(f"{e:.1e}" for e in errs) + " |")
        del x, logp, ent
    return [f"logprob+entropy fwd+bwd, bf16 logits [{rows}, {seq - 1}, {vocab}] (view), median of 5:",
            "| computation | ms | extra peak GiB | rel. err logp / entropy / grad vs float64 |", "|---|---|---|---|"] + lines


def _fsdp_learner(cfg, run_dir):
    from learners.torch_learner import make_learner
    lrn = make_learner(cfg, run_dir, None)  # FSDP2 because torchrun started this process (see main)
    if type(lrn.backend).__name__ != "FsdpBackend":
        raise RuntimeError(f"fsdp variant got {type(lrn.backend).__name__}; run it under torchrun")
    return lrn


def _megatron_learner(cfg, run_dir):
    from learners.megatron.learner import make_learner
    return make_learner(cfg, run_dir, None)


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        import torch
        torch.cuda.synchronize()


def child(a) -> None:
    try:
        result = run_variant(a, a.child)
    except Exception as exc:  # noqa: BLE001 (reported in the table; e.g. out of memory)
        traceback.print_exc()
        result = {"variant": a.child, "size": a.size, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b"], choices=list(SIZES))
    ap.add_argument("--variants", nargs="+", default=["torch:4", "megatron:4"],
                    help="learner:micro_batch_size[:extra key=value ...], learner torch, megatron or fsdp")
    ap.add_argument("--groups", type=int, default=4, help="rollout_batch_size (prompts per step)")
    ap.add_argument("--samples", type=int, default=8, help="n_samples_per_prompt")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--response-len", type=int, default=1536)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_megatron"))
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one extra step")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-kernels", action="store_true", help="check and time the blockwise logprob first")
    a = ap.parse_args()
    if a.child:
        return child(a)
    kernel_lines = []
    if a.check_kernels:
        kernel_lines = check_logprob_kernels(SIZES[a.sizes[-1]]["vocab_size"])
        print("\n".join(kernel_lines), flush=True)
        import torch
        torch.cuda.empty_cache()  # this process stays alive while the variants run
    rows = []
    for size in a.sizes:
        ckpt = build_checkpoint(size, a.out / f"qwen2-{size}")
        for variant in a.variants:
            torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]  # FSDP2 at one rank
            cmd = [sys.executable, *(torchrun if variant.startswith("fsdp:") else []), __file__, "--child", variant,
                   "--size", size, "--ckpt", str(ckpt), "--groups", str(a.groups), "--samples", str(a.samples),
                   "--prompt-len", str(a.prompt_len),
                   "--response-len", str(a.response_len), "--warmup", str(a.warmup), "--steps", str(a.steps),
                   "--out", str(a.out)] + (["--profile"] if a.profile else [])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else {"variant": variant, "size": size,
                                                             "error": (proc.stderr or proc.stdout)[-300:]}
            if "error" in row:
                print(proc.stderr[-3000:], file=sys.stderr)
            if "PROFILE wall" in proc.stdout:
                print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
            row["wall_s"] = time.time() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n".join(kernel_lines))
    print_table(rows, a)


def print_table(rows: list[dict], a) -> None:
    print(f"\nbatch: {a.groups} x {a.samples} samples of {a.prompt_len}+{a.response_len} tokens per step; "
          f"median of {a.steps} steps after {a.warmup} warm-up")
    print("| size | learner:micro | step s | score / update / optimizer s | tokens/s | MFU | peak GiB | "
          "loss/pg, entropy step 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['variant']} | failed: {r['error'][:90]} | | | | | |")
            continue
        parts = " / ".join(f"{r.get(k + '_s', float('nan')):.2f}" for k in ("score", "update", "optimizer"))
        print(f"| {r['size']} | {r['variant']} | {r['step_s']:.2f} | {parts} | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['peak_mem_gb']:.1f} | {r['loss_pg0']:.2e}, {r['entropy0']:.4f} |")


if __name__ == "__main__":
    main()
