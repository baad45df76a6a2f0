"""Generator scaling on one machine: the quickstart job on a local Ray cluster with 1, 2 and 4 generators (each
with its own embedded engine), generated and trained tokens/s side by side, in one invocation.

    .venv/bin/python scripts/bench_generators.py [--generators 1,2,4] [--steps 300] [--model runs/tiny/model_sft]
        [--data runs/tiny/data/train.jsonl] [--ray-cpus 8]

Starts a Ray head of its own (`ray start --head --block`, files under a short /tmp/arl-bg-* dir, its logical CPU
count --ray-cpus so that 4 engines + the learner can be placed; the machine's cores are what they share), runs
`async-rl launch configs/quickstart.yaml --cluster ray --address HEAD cluster.num_engines=N
cluster.num_generators=N` for each N with no core pinning (engine_cpus=[], learner_cpus=[]: the OS spreads them
over the cores), and stops the head by its process group (never `ray stop`). Per N, over the learner steps after
the first --warmup fraction (time-weighted, from metrics.jsonl): generated tokens/s (what the hub received),
trained tokens/s, the learner's busy fraction, the generators' busy fraction, mean staleness. Then the same N
once more with `debug_rollout_only=true` (no learner: a sink takes batches at version 0), whose generated
tokens/s is what the generators can do on this machine without the learner's core. Prints one table;
`--json PATH` also writes the rows. Needs the tiny world: `python scripts/build_tiny.py --out runs/tiny`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def start_head(cpus: int) -> tuple[subprocess.Popen, str, dict]:
    root = Path(tempfile.mkdtemp(prefix="arl-bg-"))  # short: Ray's unix socket paths stay under 107 bytes
    env = {**os.environ, "HOME": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                             "--object-store-memory=100000000", f"--temp-dir={root}/t"],
                            stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.time() + 60
    while "Ray runtime started" not in (root / "head.log").read_text():
        if head.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the Ray head did not start:\n{(root / 'head.log').read_text()[-2000:]}")
        time.sleep(0.3)
    return head, f"127.0.0.1:{port}", env


def stop_head(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass


def summarize(rows: list[dict], warmup: float) -> dict:
    timed = rows[int(len(rows) * warmup):]
    wall = sum(r["perf/step_time_s"] for r in timed)
    return {"steps": len(timed), "wall_s": wall,
            "gen_tok_s": sum(r["perf/gen_tokens_per_s"] * r["perf/step_time_s"] for r in timed) / wall,
            "train_tok_s": sum(r["train_tokens"] for r in timed) / wall,
            "learner_busy": sum(r["perf/learner_busy_frac"] * r["perf/step_time_s"] for r in timed) / wall,
            "gen_busy": sum(r["perf/gen_busy_frac"] * r["perf/step_time_s"] for r in timed) / wall,
            "staleness_mean": sum(r["staleness/mean"] for r in timed) / len(timed)}


def rollout_only_gen_tok_s(rows: list[dict], warmup: float) -> float:
    first, last = rows[int(len(rows) * warmup)], rows[-1]
    return (last["perf/gen_tokens"] - first["perf/gen_tokens"]) / (last["time"] - first["time"])


def run(n: int, args, address: str, env: dict, rollout_only: bool = False) -> dict:
    run_dir = Path(f"/tmp/bench_generators_{n}{'_rollout_only' if rollout_only else ''}")
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [str(ROOT / ".venv/bin/async-rl"), "launch", "configs/quickstart.yaml", f"num_rollout={args.steps}",
           f"cluster.num_engines={n}", f"cluster.num_generators={n}", "engine_cpus=[]", "learner_cpus=[]",
           "eval_prompt_data=", "logging.progress=false", f"hf_checkpoint={args.model}", f"prompt_data={args.data}",
           *(["debug_rollout_only=true"] if rollout_only else []),
           "--cluster", "ray", "--address", address, "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{n} generators: launch exited {out.returncode}:\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if rollout_only:
        return {"rollout_only_gen_tok_s": rollout_only_gen_tok_s(rows, args.warmup)}
    return {"generators": n, "launch_wall_s": time.perf_counter() - t0, **summarize(rows, args.warmup)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generators", default="1,2,4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the learner steps left out")
    ap.add_argument("--model", default=str(ROOT / "runs/tiny/model_sft"))
    ap.add_argument("--data", default=str(ROOT / "runs/tiny/data/train.jsonl"))
    ap.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the Ray head (placement only)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: not found; build it with `python scripts/build_tiny.py --out runs/tiny`")
    head, address, env = start_head(args.ray_cpus)
    try:
        results = [{**run(int(n), args, address, env), **run(int(n), args, address, env, rollout_only=True)}
                   for n in args.generators.split(",")]
    finally:
        stop_head(head)
    base = results[0]
    print(f"\ngenerator scaling, quickstart job on a local Ray cluster ({os.cpu_count()} cores, {args.steps} steps, "
          f"first {args.warmup:.0%} left out)")
    print("| generators (+engines) | generated tok/s | trained tok/s | gen x | train x | learner busy | "
          "generators busy | staleness mean | launch wall s | generated tok/s, no learner |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['generators']} | {r['gen_tok_s']:.0f} | {r['train_tok_s']:.0f} | "
              f"{r['gen_tok_s'] / base['gen_tok_s']:.2f} | {r['train_tok_s'] / base['train_tok_s']:.2f} | "
              f"{r['learner_busy']:.2f} | {r['gen_busy']:.2f} | {r['staleness_mean']:.2f} | {r['launch_wall_s']:.0f} | "
              f"{r['rollout_only_gen_tok_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
