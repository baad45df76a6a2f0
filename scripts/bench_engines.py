"""Engine benchmarks on this machine (CPU): embedded engine vs plain HF `generate`, and generator throughput
with and without interruptible weight updates.

    .venv/bin/python scripts/bench_engines.py [--model runs/tiny/model_sft] [--batches 1,8,32,64,128]
        [--new-tokens 32] [--steps 150] [--skip-launch]

Part 1: the embedded engine as a real server (1 torch thread), one /generate of B prompts x N new tokens
(sampling at temperature 1, ignore_eos), against `model.generate` of the same model in this process (1 thread,
do_sample, the same B x N). Part 2: `async-rl launch configs/quickstart.yaml num_rollout=STEPS` once per
interrupt_mode (none, in_place, abort) and the run's generated tokens/s and staleness from its summary.json.
Prints one table per part.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def engine_sweep(model: str, batches: list[int], new_tokens: int) -> list[tuple]:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.actors import engine_servers as servers

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    proc, client = servers.start("embedded", Path(model), Path("/tmp/bench_engine.log"),
                                 "--max-batch-size", str(max(batches)))
    rows = []
    try:
        prompt = [5, 6, 7, 8, 9]
        params = {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True}
        client.generate([prompt] * 4, params)  # warm-up
        for b in batches:
            t0 = time.perf_counter()
            client.generate([prompt] * b, params)
            engine_s = time.perf_counter() - t0
            ids = torch.tensor([prompt] * b)
            with torch.no_grad():
                t0 = time.perf_counter()
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=0)
                hf_s = time.perf_counter() - t0
            rows.append((b, b * new_tokens / engine_s, b * new_tokens / hf_s))
    finally:
        servers.stop(proc)
    return rows


def launch_runs(steps: int, modes: list[str]) -> list[tuple]:
    rows = []
    for mode in modes:
        run_dir = Path(f"/tmp/bench_engines_{mode}")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        cmd = [str(ROOT / ".venv/bin/async-rl"), "launch", "configs/quickstart.yaml", f"num_rollout={steps}",
               f"interrupt_mode={mode}", "eval_prompt_data=", "logging.progress=false", "--run-dir", str(run_dir)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append((mode, s["gen_tokens_per_s"], s["staleness_mean"], s["reward_last"], s["wall_time_s"], wall))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs/tiny/model_sft"))
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip-launch", action="store_true")
    args = ap.parse_args()
    rows = engine_sweep(args.model, [int(b) for b in args.batches.split(",")], args.new_tokens)
    print(f"\nembedded engine vs HF generate ({args.model}, {args.new_tokens} new tokens, 1 thread)")
    print("| batch | engine tok/s | HF generate tok/s | ratio |\n|---|---|---|---|")
    for b, e, h in rows:
        print(f"| {b} | {e:,.0f} | {h:,.0f} | {e / h:.2f}x |")
    if not args.skip_launch:
        runs = launch_runs(args.steps, ["none", "in_place", "abort"])
        print(f"\nquickstart, {args.steps} learner steps per interrupt_mode")
        print("| interrupt_mode | gen tok/s | staleness mean | reward (last steps) | RL wall s | launch wall s |")
        print("|---|---|---|---|---|---|")
        for mode, tps, stale, reward, rl_wall, wall in runs:
            print(f"| {mode} | {tps:,.0f} | {stale:.2f} | {reward:.3f} | {rl_wall:.1f} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
