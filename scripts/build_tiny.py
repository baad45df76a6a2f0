"""Build the quickstart's tiny world locally (no hub downloads): a random-init Qwen2 model with a
character-level tokenizer, an addition prompt set, and a short SFT warm start of the model.

    python scripts/build_tiny.py --out runs/tiny            # ~20 s on 2 cores
    python scripts/build_tiny.py --out runs/tiny --sft-steps 0   # random init only
    python scripts/build_tiny.py --out runs/tiny_chain --task chain --max-operand 12 --sft-steps 800  # harder task

Writes OUT/model (random init), OUT/model_sft (warm-started), OUT/data/{train,test}.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_rl import tiny  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tiny")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT warm-start steps (0 = skip)")
    ap.add_argument("--task", default="addition", choices=sorted(tiny.TASKS),
                    help="addition (quickstart) or chain (three operands, + and -)")
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT/model_sft exists")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "model_sft" / "config.json").exists() and not args.force:
        print(f"{out} already built (use --force to rebuild)")
        return 0
    tiny.build_model(out / "model", seed=args.seed)
    paths = tiny.build_task(out / "data", max_operand=args.max_operand, seed=args.seed, task=args.task)
    print(f"model: {out / 'model'}  data: {paths['train']} {paths['test']}")
    if args.sft_steps > 0:
        import torch
        torch.set_num_threads(2)
        from learners.sft import warm_start
        warm_start(str(out / "model"), str(paths["train"]), str(out / "model_sft"), args.sft_steps, seed=args.seed)
    else:
        import shutil
        shutil.copytree(out / "model", out / "model_sft", dirs_exist_ok=True)
    print(f"warm-started model: {out / 'model_sft'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
