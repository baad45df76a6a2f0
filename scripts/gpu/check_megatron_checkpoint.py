"""Megatron learner checkpoint save/resume on one GPU, with Megatron's mixed-precision optimizer (bf16
params, fp32 main params and Adam moments), a cosine LR schedule with warmup and a KL reference model.

    python scripts/gpu/check_megatron_checkpoint.py        # ~1 min on an H100 (carry wheels/, see docs/BENCHMARKS.md)
    ASYNC_RL_MEGATRON_CPU_SHIM=1 PYTHONPATH=tests/learners/megatron/cpu_site python scripts/gpu/check_megatron_checkpoint.py --size tiny  # CPU smoke

Learner A trains one step, saves a checkpoint, trains two more; learner B (same process, afresh) resumes
from the checkpoint and trains the same two steps. Checked: the optimizer state B restored equals the one A
saved, tensor for tensor (exactly); B's two steps give A's losses, grad norms and LRs; B's final weights
equal A's. Exact where the GPU kernels are deterministic; the largest differences are printed either way.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_megatron as bench  # noqa: E402  (scripts/gpu/bench_megatron.py: checkpoint and batch builders)

from async_rl import config as C  # noqa: E402


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def max_diff(a, b, path: str = "") -> tuple[float, str]:
    """Largest |a - b| over matching tensors (inf, with the path, where structure or a non-tensor differs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), path
        return (float((a.double() - b.double()).abs().max()) if a.numel() else 0.0), path
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf"), path
        return max((max_diff(a[k], b[k], f"{path}/{k}") for k in a), default=(0.0, path))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf"), path
        return max((max_diff(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b))), default=(0.0, path))
    return (0.0 if a == b else float("inf")), path


def main() -> None:
    from learners.megatron.learner import make_learner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=list(bench.SIZES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/check_megatron_checkpoint"))
    a = ap.parse_args()
    shape = argparse.Namespace(groups=4, samples=4, prompt_len=64, response_len=192, size=a.size)
    ckpt = bench.build_checkpoint(a.size, a.out / f"qwen2-{a.size}")
    cfg = C.load(None, [f"hf_checkpoint={ckpt}", "train_backend=megatron", f"bf16={torch.cuda.is_available()}", "rollout_batch_size=4",
                        "n_samples_per_prompt=4", "micro_batch_size=4", "lr=1e-4", "lr_decay_style=cosine",
                        "lr_warmup_iters=1", "min_lr=1e-5", "num_rollout=10", "use_kl_loss=true",
                        "kl_loss_coef=0.1", "progress=false"])
    run_dir = a.out / "run"
    vocab = bench.SIZES[a.size]["vocab_size"]
    batches = [bench.synthetic_groups(shape, vocab, seed=s) for s in range(3)]

    def metrics(m: dict) -> tuple:
        return m["loss/pg"], m["grad_norm"], m["lr"], m.get("loss/kl")

    first = make_learner(cfg, run_dir, None)
    first.train_step(batches[0])
    first.save_checkpoint(1)
    saved = to_cpu(first.backend.optimizer.state_dict())
    after = [metrics(first.train_step(b)) for b in batches[1:]]
    final = to_cpu([p for p in first.backend.model.parameters()])
    del first
    gc.collect()
    torch.cuda.empty_cache()

    second = make_learner(cfg, run_dir, None)
    step = second.resume()
    restored = to_cpu(second.backend.optimizer.state_dict())
    again = [metrics(second.train_step(b)) for b in batches[1:]]
    state_diff, where = max_diff(saved, restored)
    param_diff, _ = max_diff(final, to_cpu([p for p in second.backend.model.parameters()]))
    n_state = sum(t.numel() for t in _tensors(saved))
    print(f"\nresumed at step {step}; optimizer state: {n_state:,} numbers, {type(second.backend.optimizer.optimizer).__name__}")
    print("| check | A (no stop) | B (resumed) | max abs diff |")
    print("|---|---|---|---|")
    print(f"| optimizer state after load | saved | restored | {state_diff:.3g} {where if state_diff else ''} |")
    for i, (x, y) in enumerate(zip(after, again)):
        diffs = [abs(p - q) for p, q in zip(x, y) if p is not None]
        print(f"| step {i + 2} loss/pg, grad norm, lr, kl | {', '.join(f'{v:.6g}' for v in x)} | "
              f"{', '.join(f'{v:.6g}' for v in y)} | {max(diffs):.3g} |")
    print(f"| weights after step 3 | | | {param_diff:.3g} |")
    ok = state_diff == 0 and step == 1 and all(abs(p - q) <= 1e-3 * max(1.0, abs(q))
                                               for x, y in zip(after, again) for p, q in zip(x, y) if p is not None)
    print("CHECK " + ("PASSED" if ok else "FAILED") + (" (bit for bit)" if ok and after == again and param_diff == 0
                                                         else ""))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


if __name__ == "__main__":
    main()
