"""Async vs synchronous effective training throughput on one GPU, where generation dominates ([proof]).

    # on the GPU machine (carry wheels/ for pyzmq; see docs/RESULTS.md for the full command):
    python scripts/gpu/bench_async.py --staleness 0 4 --steps 12
    python scripts/gpu/bench_async.py --smoke                 # a 2-layer toy on CPU, to check the script

The whole loop of `async-rl launch` (hub, embedded engine, generator, torch learner) on one GPU shared by the
engine (bf16, static KV cache, CUDA graphs) and the learner (fp32 weights, bf16 autocast, AdamW): a
Qwen2.5-0.5B-shaped model with random weights (so every response runs to rollout_max_response_len: generation
dominates), GRPO on the addition prompts, weights published to disk every step (run dirs on /dev/shm).
The same run at each `max_staleness`; effective throughput = tokens of trained samples / learner wall time
after `--skip` warm-up steps (nothing is generated and left unused at staleness 0; at staleness > 0 the
groups still in flight when the run ends are not counted). Prints a table and writes it to --out/table.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def build(out: Path, smoke: bool) -> tuple[Path, Path]:
    from bench_engines import build_qwen2_05b

    from async_rl import tiny

    model = out / "model"
    if not (model / "config.json").exists():
        build_qwen2_05b(model, "cpu", smoke=smoke)
    data = tiny.build_task(out / "data", n_train=4000, n_test=10)["train"]
    return model, data


def stop_ids(model: Path, k: int) -> list[str]:
    """`rollout_stop_token_ids` of k ids spread over the vocabulary: under random weights each generated token
    is one of them with probability ~k/vocab, so response lengths are ~geometric with mean vocab/k (capped at
    rollout_max_response_len) — the long tail of real reasoning rollouts that a synchronous step waits for."""
    if k <= 0:
        return []
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = [100 + i * (vocab - 100) // k for i in range(k)]
    return [f"rollout_stop_token_ids=[{','.join(map(str, ids))}]"]


def run(out: Path, model: Path, data: Path, staleness: int, args) -> dict:
    run_dir = out / f"s{staleness}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    gpu = not args.smoke
    overrides = [
        f"hf_checkpoint={model}", f"prompt_data={data}", "eval_prompt_data=", f"max_staleness={staleness}",
        f"num_rollout={args.steps}", f"rollout_batch_size={args.batch}", f"n_samples_per_prompt={args.n}",
        f"rollout_max_response_len={args.response_len}", f"micro_batch_size={args.micro}",
        f"sglang_server_concurrency={args.concurrency}", f"engine_max_batch_size={args.concurrency}",
        f"groups_per_engine_call={args.groups_per_call}", "engine_cpus=[]", "learner_cpus=[]",
        "engine_num_threads=4", "learner_num_threads=4", "progress=false", "keep_weight_versions=2",
        "startup_timeout=900", "lr=1e-6",
        *([f"engine_device=cuda", "bf16=true"] if gpu else []),
        *(["learner_device=cuda"] if gpu and args.backend == "torch" else []),
        *(["train_backend=megatron", "use_dynamic_batch_size=true", f"max_tokens_per_gpu={args.max_tokens}",
           f"log_probs_max_tokens_per_gpu={args.max_tokens}"] if args.backend == "megatron" else []),
        *stop_ids(model, args.stop_ids), *args.overrides,
    ]
    cmd = [sys.executable, "-m", "async_rl.cli", "launch", str(ROOT / "configs/quickstart.yaml"), *overrides,
           "--run-dir", str(run_dir)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        for log in sorted((run_dir / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + log.read_text()[-2000:])
        raise SystemExit(f"max_staleness={staleness}: launch failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.skip:]
    wall = timed[-1]["time"] - timed[0]["time"] + timed[0]["perf/step_time_s"]
    return {
        "staleness": staleness, "run_s": time.time() - t0, "steps": len(timed),
        "trained_tok_s": sum(r["train_tokens"] for r in timed) / wall,
        "step_s": wall / len(timed),
        "gen_tok_s": statistics.mean(r["perf/gen_tokens_per_s"] for r in timed),
        "learner_busy": statistics.mean(r["perf/learner_busy_frac"] for r in timed),
        "gen_busy": statistics.mean(r["perf/gen_busy_frac"] for r in timed),
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in timed),
        "response_len": statistics.mean(r["response_length/mean"] for r in timed),
        "publish_s": statistics.mean(r.get("perf/publish_s") or 0.0 for r in timed),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the throughput")
    ap.add_argument("--batch", type=int, default=16, help="rollout_batch_size (prompts per learner step)")
    ap.add_argument("--n", type=int, default=8, help="n_samples_per_prompt")
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8, help="learner micro_batch_size")
    ap.add_argument("--concurrency", type=int, default=1024, help="samples in flight per engine (and its max batch)")
    ap.add_argument("--groups-per-call", type=int, default=4)
    ap.add_argument("--backend", choices=["torch", "megatron"], default="torch", help="train_backend of the learner")
    ap.add_argument("--max-tokens", type=int, default=16384, help="megatron: max_tokens_per_gpu (dynamic batches)")
    ap.add_argument("--stop-ids", type=int, default=0, help="random stop ids: mean response length ~ vocab / this "
                    "(0 = every response runs to --response-len)")
    ap.add_argument("--out", default="/dev/shm/bench_async")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer toy on CPU (checks the script, not the claim)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    if args.smoke:
        args.response_len, args.steps, args.skip, args.concurrency = 32, 6, 2, 64
        args.stop_ids = min(args.stop_ids, 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = build(out, args.smoke)
    results = []
    for s in args.staleness:
        results.append(run(out, model, data, s, args))
        print(f"max_staleness={s}: {results[-1]}", flush=True)
    base = results[0]["trained_tok_s"]
    lines = [f"{args.backend} learner; batch {args.batch} x {args.n} samples x <= {args.response_len} new tokens (stop ids: {args.stop_ids}), "
             f"{args.steps} steps "
             f"({args.skip} warm-up left out)", "",
             "| max_staleness | trained tok/s | ratio | s/step | generated tok/s | learner busy | generator busy "
             "| mean staleness | mean response len | publish s/version |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['staleness']} | {r['trained_tok_s']:.0f} | {r['trained_tok_s'] / base:.2f}x | "
                     f"{r['step_s']:.2f} | {r['gen_tok_s']:.0f} | {r['learner_busy']:.2f} | {r['gen_busy']:.2f} | "
                     f"{r['staleness_mean']:.2f} | {r['response_len']:.0f} | {r['publish_s']:.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
