"""Benchmark the whole loop: the quickstart-sized run at several `max_staleness` values, side by side in one
invocation, reporting trained tokens/s, generator and learner busy fractions, and the ratio to staleness 0.

    python scripts/bench_loop.py                       # staleness 0 2 4, 80 steps each, ~3 min
    python scripts/bench_loop.py --staleness 0 1 2 4 8 --steps 120 --repeats 2

The engine + generator + hub are pinned to core 0 and the learner to core 1 (configs/quickstart.yaml).
Runs alternate between settings within each repeat so that machine noise hits all settings alike.
Trained tokens/s = tokens (prompt + response) of every trained sample / learner wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(staleness: int, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"s{staleness}-{len(list(out.glob(f's{staleness}-*')))}"
    cmd = [sys.executable, "-m", "async_rl.launch.cli", "launch", str(ROOT / "configs/quickstart.yaml"),
           f"max_staleness={staleness}", f"num_rollout={steps}", "progress=false", "eval_prompt_data=",
           *extra, "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = rows[min(5, len(rows) // 4):]  # skip warm-up steps
    wall = rows[-1]["time"] - rows[0]["time"] + rows[0]["perf/step_time_s"]
    return {
        "tokens_per_s": sum(r["train_tokens"] for r in rows) / wall,
        "learner_busy": statistics.mean(r["perf/learner_busy_frac"] for r in rows),
        "gen_busy": statistics.mean(r["perf/gen_busy_frac"] for r in rows),
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in rows),
        "reward_last": statistics.mean(r["reward/mean"] for r in rows[-10:]),
        "evicted": rows[-1]["buffer/evicted_stale"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_loop")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny.py"), "--out", "runs/tiny"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    results: dict[int, list[dict]] = {s: [] for s in args.staleness}
    for rep in range(args.repeats):
        for s in args.staleness:
            results[s].append(run_once(s, args.steps, out, args.overrides))
            print(f"repeat {rep + 1}/{args.repeats} max_staleness={s}: {results[s][-1]}", flush=True)
    mean = {s: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    base = mean[args.staleness[0]]["tokens_per_s"]
    lines = ["| max_staleness | trained tok/s | ratio vs first | learner busy | generator busy | mean staleness "
             "| reward (last 10) | evicted |", "|---|---|---|---|---|---|---|---|"]
    for s, m in mean.items():
        lines.append(f"| {s} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base:.2f}x | {m['learner_busy']:.2f} | "
                     f"{m['gen_busy']:.2f} | {m['staleness_mean']:.2f} | {m['reward_last']:.3f} | {m['evicted']:.0f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
