"""One rank of the FSDP learner tests (tests/learners/test_fsdp.py): train a tiny model for a few optimizer
steps on a fixed, seeded global batch, through learners/fsdp.py, and write each step's loss and gradient
norm (rank 0) to a JSON file. `--plain` runs the same steps on one unsharded model without a process group:
the reference the sharded runs must equal.

python tests/learners/fsdp_worker.py --model DIR --out FILE [--plain] [--per-token] [--steps N]
    [--save-at K --ckpt DIR] [--resume-from DIR --first-step K] [--balance] [--max-tokens N] [--every-rank-loads]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from async_rl.config import AlgoConfig  # noqa: E402
from async_rl.types import Group, Trajectory  # noqa: E402
from learners import fsdp  # noqa: E402
from learners.advantages import compute_advantages  # noqa: E402
from learners.batch import build_batch  # noqa: E402
from learners.objective import actor_loss  # noqa: E402


def groups(step: int, n_groups: int = 4, n: int = 4, vocab: int = 19) -> list[Group]:
    """A seeded batch of `n_groups` x `n` trajectories of uneven prompt and response lengths."""
    rng = np.random.default_rng(1000 + step)
    out = []
    for g in range(n_groups):
        p_len = int(rng.integers(3, 8))
        prompt = rng.integers(3, vocab, p_len).astype(np.int32)
        trajs = []
        for _ in range(n):
            r_len = int(rng.integers(2, 14))
            trajs.append(Trajectory(prompt, rng.integers(3, vocab, r_len).astype(np.int32),
                                    rng.normal(-2.0, 0.5, r_len).astype(np.float32),
                                    np.zeros(r_len, np.int32), reward=float(rng.integers(0, 2))))
        out.append(Group("g", step * 100 + g, g, "", trajs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--per-token", action="store_true")
    ap.add_argument("--balance", action="store_true")
    ap.add_argument("--every-rank-loads", action="store_true", help="each rank reads the whole checkpoint")
    ap.add_argument("--max-tokens", type=int, default=0, help="use_dynamic_batch_size's token budget")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume-from", default="")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    device = torch.device("cpu")
    rank, world = (0, 1) if args.plain else fsdp.init(device)
    loads = [0]  # how often this process read the checkpoint (a counting wrapper around the real loader)
    real_load = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *a, **kw):
        loads[0] += 1
        return real_load(cls, *a, **kw)
    AutoModelForCausalLM.from_pretrained = classmethod(counted)
    if args.plain:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    else:  # rank 0 reads the checkpoint, the others build on the meta device (--every-rank-loads: all read it)
        model = fsdp.sharded_from_pretrained(args.model, device, bf16=False, rank0_load=not args.every_rank_loads)
        model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.resume_from:
        fsdp.load_sharded(args.resume_from, model, optimizer)
    algo = AlgoConfig(calculate_per_token_loss=args.per_token, kl_coef=0.0)

    def loss_fn(m, part, denom):
        logits = m(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1]
        return actor_loss(logits, part, algo, 1.0, denom)

    rows = []
    for step in range(args.first_step, args.first_step + args.steps):
        batch = build_batch(groups(step), pad_id=0)
        batch.logp_old = fsdp.batch_logprobs(model, batch, 3, 1.0, device, args.max_tokens)
        adv = compute_advantages(algo, batch.rewards, batch.mask, None, None)
        batch.advantages = adv.advantages
        size = len(batch.input_ids) // 2  # two optimizer steps per batch
        for k in range(2):
            m = fsdp.policy_step(model, optimizer, batch, k * size, size, loss_fn, 3, args.per_token, 1.0,
                                 args.balance, device, args.max_tokens)
            rows.append({"step": step, "k": k, "loss": m["loss"], "grad_norm": m["grad_norm"],
                         "logp_old_sum": float((batch.logp_old * batch.mask).sum()), "entropy": m["entropy"]})
        if step + 1 == args.save_at:
            fsdp.save_sharded(args.ckpt, model, optimizer)
    full = fsdp.full_state_dict(model) if not args.plain else model.state_dict()
    every = torch.zeros(world, dtype=torch.int64)  # each rank's count, summed into every rank's copy
    every[rank] = loads[0]
    if not args.plain:
        torch.distributed.all_reduce(every)
    every = every.tolist()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "rows": rows,
                                              "weights_sum": float(sum(v.double().abs().sum() for v in full.values())),
                                              "keys": len(full), "loads": every,
                                              "tied": model.lm_head.weight is model.model.embed_tokens.weight}))
    del model, optimizer, full  # nothing may hold the group when it is destroyed (fsdp.close)
    if not args.plain:
        fsdp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
