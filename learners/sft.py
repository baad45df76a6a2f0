"""Supervised warm start (`loss_type: sft_loss`) on a prompt file's labels: train `response = label + EOS`
for a few steps so that RL starts from a model that sometimes answers right. Used by the quickstart.

    python -m learners.sft --model DIR --data train.jsonl --out DIR_SFT --steps 150
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch

from async_rl.data import load_prompts
from async_rl.types import Group, Trajectory
from learners import losses
from learners.batch import build_batch
from learners.torch_backend import forward_logprobs


def labelled_groups(tokenizer, rows: list[dict]) -> list[Group]:
    groups = []
    for i, row in enumerate(rows):
        prompt = np.asarray(tokenizer(row["input"])["input_ids"], np.int32)
        response = np.asarray(tokenizer(str(row["label"]))["input_ids"] + [tokenizer.eos_token_id], np.int32)
        zeros = np.zeros(len(response), np.float32)
        groups.append(Group("sft", i, i, str(row["label"]), [Trajectory(prompt, response, zeros, zeros.astype(np.int32))]))
    return groups


def warm_start(model_dir: str, data: str, out_dir: str, steps: int, batch_size: int = 32, lr: float = 3e-3,
               seed: int = 0, log_every: int = 25) -> list[float]:
    """Train `steps` SFT steps on random batches of `data`; save to `out_dir`; return the loss curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    groups = labelled_groups(tokenizer, load_prompts(data, "input", "label"))
    curve, t0 = [], time.time()
    for step in range(steps):
        batch = build_batch(rng.sample(groups, batch_size), tokenizer.pad_token_id)
        rows = batch.select(slice(None))
        loss = losses.sft_loss(forward_logprobs(model, rows, 1.0), rows["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"sft step {step + 1}/{steps} loss {curve[-1]:.3f} ({time.time() - t0:.1f}s)", flush=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return curve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    warm_start(args.model, args.data, args.out, args.steps, args.batch_size, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
