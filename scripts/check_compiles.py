"""torch.compile graphs the Megatron learner compiles per step on batches shaped like the GPU loop's (CPU).

    PYTHONPATH=$PWD .venv/bin/python scripts/check_compiles.py --steps 6            # 16 x 8, tails to 1,536
    TORCH_LOGS=recompiles PYTHONPATH=$PWD .venv/bin/python scripts/check_compiles.py # and why each recompiled

The learner of `bench_async.py --backend megatron` on a tiny Qwen2 (the tests' CPU shim for megatron-core),
fed groups whose response lengths are geometric with mean --mean-len capped at --max-len, as random stop
ids make them under random weights; the logprob kernels are compiled on the CPU too (on a GPU they always
are), with their block size scaled so that a row of --max-len positions splits into blocks as it does at
the Qwen2.5 vocabulary (151,936). Prints the graphs compiled in each step: after the first steps the count
should stay flat (every new shape a recompile would show as a step > 0 there).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests/learners/megatron"))

QWEN_VOCAB = 151936


def groups(vocab: int, batch: int, n: int, mean_len: int, max_len: int, seed: int):
    import numpy as np

    from async_rl.types import Group, Trajectory

    rng = np.random.default_rng(seed)
    out = []
    for g in range(batch):
        prompt = rng.integers(4, vocab, size=int(rng.integers(8, 20)), dtype=np.int32)
        trajs = []
        for _ in range(n):
            r = int(min(max_len, rng.geometric(1.0 / mean_len)))
            trajs.append(Trajectory(prompt, rng.integers(4, vocab, size=r, dtype=np.int32),
                                    (-rng.random(r) * 3).astype(np.float32), np.zeros(r, np.int32),
                                    reward=float(rng.integers(0, 2))))
        out.append(Group("g", g, g, "x", trajs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--mean-len", type=int, default=320)
    ap.add_argument("--max-len", type=int, default=1536)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--no-compile", action="store_true", help="leave the logprob kernels eager (as on CPU)")
    args = ap.parse_args()

    import os
    import socket

    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import cpu_shim  # tests/learners/megatron: megatron-core on the CPU (gloo)

    cpu_shim.install()
    from async_rl import config as C
    from async_rl import tiny
    from learners import losses
    from learners.megatron import parallel
    from learners.megatron.learner import MegatronLearner
    from learners.perf import compiled_graphs

    if not args.no_compile:
        losses._compile_on = lambda device: True  # noqa: SLF001 (what a CUDA device gets)
    vocab = len(tiny.CHARS) + len(tiny.SPECIAL)
    losses._CHUNK_ELEMENTS = losses._CHUNK_ELEMENTS // QWEN_VOCAB * vocab  # noqa: SLF001 (same rows per block)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.build_model(Path(tmp) / "model", max_positions=args.max_len + 64)
        cfg = C.load(None, [f"hf_checkpoint={model}", "train_backend=megatron", "use_dynamic_batch_size=true",
                            f"max_tokens_per_gpu={args.max_tokens}", f"log_probs_max_tokens_per_gpu={args.max_tokens}",
                            f"rollout_batch_size={args.batch}", f"n_samples_per_prompt={args.n}",
                            "micro_batch_size=8", "num_rollout=100", "lr=1e-6"])
        lrn = MegatronLearner(cfg, Path(tmp) / "run", None)
        rows = []
        try:
            for step in range(args.steps):
                before = compiled_graphs()
                m = lrn.train_step(groups(vocab, args.batch, args.n, args.mean_len, args.max_len, seed=step))
                rows.append((step, compiled_graphs() - before, compiled_graphs(), m["train_tokens"]))
                print(f"step {step}: compiled {rows[-1][1]} graphs (total {rows[-1][2]}), "
                      f"{m['train_tokens']} tokens", flush=True)
        finally:
            parallel.shutdown()
    steady = sum(r[1] for r in rows[2:])
    print(f"graphs compiled after step 1: {steady} (first two steps: {rows[0][1]} + {rows[1][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
