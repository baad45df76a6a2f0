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
import os
import re
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


def warmup_steps(args, staleness: int) -> int:
    """Steps left out: --skip, and at least max_staleness + 3. Admission lets the generators fill
    (max_staleness + 1) versions' worth of groups while the learner starts (and the run never needs more
    than num_rollout x rollout_batch_size groups), so the first ~max_staleness steps train on a buffer filled
    at start-up and would measure the learner alone, not the loop. For the same reason (every group the run
    needs granted) the last max_staleness steps drain the buffer: with --timed they run but are not timed."""
    return max(args.skip, staleness + 3) if args.timed else args.skip


def stop_ids(model: Path, k: int) -> list[str]:
    """`rollout_stop_token_ids` of k ids spread over the vocabulary: under random weights each generated token
    is one of them with probability ~k/vocab, so response lengths are ~geometric with mean vocab/k (capped at
    rollout_max_response_len) — the long tail of real reasoning rollouts that a synchronous step waits for."""
    if k <= 0:
        return []
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = [100 + i * (vocab - 100) // k for i in range(k)]
    return [f"rollout_stop_token_ids=[{','.join(map(str, ids))}]"]


def run(out: Path, model: Path, data: Path, staleness: int, args, variant: str = "") -> dict:
    name, words = (variant.split(":")[0], variant.split(":")[1:]) if variant else ("", [])
    env_words = [w for w in words if w.split("=")[0].isupper()]  # NAME=value: an environment variable
    words = [w for w in words if w not in env_words]
    run_dir = out / f"s{staleness}{'-' + name if name else ''}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    gpu = not args.smoke
    skip = warmup_steps(args, staleness)
    # and the last max_staleness steps too: once every group the run needs is granted, they drain the buffer
    steps = skip + args.timed + staleness if args.timed else args.steps
    overrides = [
        f"hf_checkpoint={model}", f"prompt_data={data}", "eval_prompt_data=", f"max_staleness={staleness}",
        f"num_rollout={steps}", f"rollout_batch_size={args.batch}", f"n_samples_per_prompt={args.n}",
        f"rollout_max_response_len={args.response_len}", f"micro_batch_size={args.micro}",
        f"sglang_server_concurrency={args.concurrency}", f"engine_max_batch_size={args.concurrency}",
        f"groups_per_engine_call={args.groups_per_call}", "engine_cpus=[]", "learner_cpus=[]",
        "engine_num_threads=4", "learner_num_threads=4", "progress=false", "keep_weight_versions=2",
        "startup_timeout=900", "lr=1e-6",
        *([f"engine_device=cuda", "bf16=true"] if gpu else []),
        *(["learner_device=cuda"] if gpu and args.backend == "torch" else []),
        *(["train_backend=megatron", "use_dynamic_batch_size=true", f"max_tokens_per_gpu={args.max_tokens}",
           f"log_probs_max_tokens_per_gpu={args.max_tokens}"] if args.backend == "megatron" else []),
        *stop_ids(model, args.stop_ids), *args.overrides, *words,
        f"save_debug_rollout_data={run_dir / 'rollouts'}",  # the batches, for the standalone learner replay
    ]
    cmd = [sys.executable, "-m", "async_rl.launch.cli", "launch", str(ROOT / "configs/quickstart.yaml"), *overrides,
           "--run-dir", str(run_dir)]
    t0 = time.time()
    env = {**os.environ, **dict(w.split("=", 1) for w in env_words)}
    if args.profile:  # one steady-state step (the last warm-up step) under torch.profiler, in the learner's log
        env["ASYNC_RL_PROFILE_STEP"] = str(max(0, skip - 1))
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        for log in sorted((run_dir / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + log.read_text()[-2000:])
        raise SystemExit(f"max_staleness={staleness}: launch failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[skip:skip + args.timed] if args.timed else rows[skip:]
    wall = timed[-1]["time"] - timed[0]["time"] + timed[0]["perf/step_time_s"]
    phases = {k[len("perf/phase/"):-2]: statistics.mean(r.get(k, 0.0) for r in timed)
              for k in sorted({k for r in timed for k in r if k.startswith("perf/phase/")})}
    publish = {k[len("perf/publish/"):]: statistics.mean(r.get(k, 0.0) for r in timed)
               for k in sorted({k for r in timed for k in r if k.startswith("perf/publish/")})}
    t_first, t_last = timed[0]["time"] - timed[0]["perf/step_time_s"], timed[-1]["time"]
    return {
        "variant": name, "run_dir": str(run_dir), "timed_steps": [r["step"] for r in timed],
        "steps_timeline": [(r["step"], r["version"], round(r["perf/unix_time"] - timed[0]["perf/unix_time"], 2),
                            r["train_tokens"]) for r in rows],
        "window": [t_first, t_last], "phases": phases, "publish": publish,
        "compiles": timed[-1].get("perf/compiles", 0) - rows[skip - 1].get("perf/compiles", 0) if skip else 0,
        "engine": engine_log_stats(run_dir, rows[:skip + len(timed)], skip), "skip": skip,
        "staleness": staleness, "run_s": time.time() - t0, "steps": len(timed),
        "trained_tok_s": sum(r["train_tokens"] for r in timed) / wall,
        "step_s": wall / len(timed),
        "gen_tok_s": statistics.mean(r["perf/gen_tokens_per_s"] for r in timed),
        "learner_busy": statistics.mean(r["perf/learner_busy_frac"] for r in timed),
        "gen_busy": statistics.mean(r["perf/gen_busy_frac"] for r in timed),
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in timed),
        "response_len": statistics.mean(r["response_length/mean"] for r in timed),
        "sample_len": statistics.mean(r["train_tokens"] for r in timed) / (args.batch * args.n),
        "publish_s": statistics.mean(r.get("perf/publish_s") or 0.0 for r in timed),
    }


_ENGINE_LINE = re.compile(r"\[engine\] forwards=(\d+) new_seqs=(\d+) new_tokens=(\d+) seconds=([\d.]+) "
                          r"prefill_s=([\d.]+) decodes=(\d+) .*?paused_s=([\d.]+)(?: graphs=(\d+) captures=(\d+) "
                          r"capture_s=([\d.]+))? weight_version=(\d+) t=([\d.]+)")


def engine_log_stats(run_dir: Path, rows: list[dict], skip: int) -> dict:
    """The engine's own account of the timed window, from its once-a-second log lines: busy fraction
    (forward passes / wall), prefill share, mean decode batch, seconds paused for weight updates, CUDA
    graphs captured (each capture stalls decoding)."""
    t0 = rows[skip]["perf/unix_time"] - rows[skip]["perf/step_time_s"] if skip < len(rows) else 0.0
    t1 = rows[-1]["perf/unix_time"]
    lines = []
    for log in sorted((run_dir / "logs").glob("engine*.log")):
        lines += [m for m in map(_ENGINE_LINE.search, log.read_text().splitlines()) if m]
    inside = [m for m in lines if t0 <= float(m.group(12)) <= t1]
    before = [m for m in lines if float(m.group(12)) < t0]
    timeline = [(round(float(m.group(12)) - t0, 2), int(m.group(3)), int(m.group(6)), int(m.group(11))) for m in lines]
    if not inside:
        return {"lines": len(lines), "window": [t0, t1], "timeline": timeline,
                "t_range": [float(lines[0].group(12)), float(lines[-1].group(12))] if lines else []}
    col = lambda i: sum(float(m.group(i)) for m in inside)  # noqa: E731
    last = lambda ms, i: float(ms[-1].group(i)) if ms and ms[-1].group(i) else 0.0  # noqa: E731
    decodes = col(6)
    return {"busy": col(4) / (t1 - t0), "prefill_s_per_s": col(5) / (t1 - t0),
            "mean_decode_batch": (col(3) - col(2)) / max(decodes, 1), "decode_steps_per_s": decodes / (t1 - t0),
            "paused_s_per_s": (last(inside, 7) - last(before, 7)) / (t1 - t0),
            "captures": last(inside, 9) - last(before, 9), "capture_s": last(inside, 10) - last(before, 10),
            "timeline": timeline}  # (seconds from the window's start, new tokens, decode steps, weight version)


def replay_learner(run_dir: Path, warmup: int) -> dict:
    """The run's learner alone (no hub, engine or publication) on the batches the run trained on, in order:
    its own step time on the same batches (standalone train rate)."""
    import torch

    from async_rl import config as C
    from async_rl import debug, wire
    from async_rl.types import Group
    from learners.perf import compiled_graphs

    cfg = C.load(str(run_dir / "config.yaml"), ["update_weight_mode=disk", "save_debug_rollout_data="])
    if cfg.train.train_backend == "megatron":
        from learners.megatron.learner import make_learner
    else:
        from learners.torch_learner import make_learner
    torch.set_num_threads(cfg.cluster.learner_num_threads)  # as the run's learner process (learners.loop.main)
    lrn = make_learner(cfg, run_dir / "replay", None)
    times, tokens, compiles = [], 0, []
    for i, (_, path) in enumerate(debug.find_rollouts(str(run_dir / "rollouts"))):
        groups = [Group.from_wire(g) for g in wire.decode(path.read_bytes())["groups"]]
        _sync()
        t0 = time.perf_counter()
        m = lrn.train_step(groups)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += m["train_tokens"]
            compiles.append(compiled_graphs())
    return {"steps": len(times), "step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
            "train_tok_s": tokens / sum(times), "compiles": compiles[-1] - compiles[0], "times": times}


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_alone(model: Path, concurrency: int, args, seconds: float = 12.0, warmup: float = 8.0) -> dict:
    """The engine alone (in process, no HTTP, nothing else on the GPU) kept at `concurrency` sequences with
    the loop's sampling: generated tokens/s (standalone generation rate at that concurrency)."""
    import random

    import torch

    from actors.engine import protocol as proto
    from actors.engine.model import Engine
    from actors.engine.scheduler import Scheduler

    engine = Engine(str(model), 0, "cuda" if torch.cuda.is_available() else "cpu", max_batch_size=max(concurrency, 1))
    sched = Scheduler(engine, max(concurrency, 1))
    sched.start()
    stops = [int(x) for w in stop_ids(model, args.stop_ids) for x in w.split("=", 1)[1].strip("[]").split(",")]
    params = {"temperature": 1.0, "max_new_tokens": args.response_len, "stop_token_ids": stops}
    rng = random.Random(0)
    live, done_tokens = [], 0

    def submit():
        prompt = [rng.randrange(100, engine.vocab_size) for _ in range(12)]
        live.append(sched.submit(proto.parse_generate_body({"input_ids": prompt, "sampling_params": params,
                                                            "return_logprob": True}, engine.vocab_size,
                                                           engine.max_positions, engine.device)))

    def produced():
        return done_tokens + sum(len(s.output_ids) for r in live for s in r.sequences)
    start = time.perf_counter()
    marks = {}
    while time.perf_counter() - start < seconds + warmup:
        for r in [r for r in live if r.done.is_set()]:
            live.remove(r)
            done_tokens += sum(len(s.output_ids) for s in r.sequences)
        while len(live) < concurrency:
            submit()
        elapsed = time.perf_counter() - start
        if elapsed >= warmup and "t0" not in marks:  # the warm-up captures the CUDA graphs
            marks["t0"], marks["n0"] = time.perf_counter(), produced()
        time.sleep(0.002)
    rate = (produced() - marks["n0"]) / (time.perf_counter() - marks["t0"])
    sched.stopping.set()
    _sync()
    return {"concurrency": concurrency, "gen_tok_s": rate}


def child_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not found:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
        return {"error": (proc.stderr or proc.stdout)[-300:]}
    return json.loads(found[-1][7:])


def efficiency(r: dict, train: dict, gen: dict) -> dict:
    """Loop trained tokens/s over the one-shared-GPU ideal 1 / (1/gen_rate + 1/train_rate), per sample: a
    sample of P + R tokens costs R / gen_rate to generate and (P + R) / train_rate to train."""
    if "gen_tok_s" not in gen or "train_tok_s" not in train:
        return {}
    resp, total = r["response_len"], r["sample_len"]
    ideal = total / (resp / gen["gen_tok_s"] + total / train["train_tok_s"])
    return {"ideal_tok_s": ideal, "efficiency": r["trained_tok_s"] / ideal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the throughput")
    ap.add_argument("--timed", type=int, default=0, help="timed steps after the warm-up (then the warm-up is at "
                    "least max_staleness + 3 steps and --steps is ignored); 0 = --steps in all")
    ap.add_argument("--batch", type=int, default=16, help="rollout_batch_size (prompts per learner step)")
    ap.add_argument("--n", type=int, default=8, help="n_samples_per_prompt")
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8, help="learner micro_batch_size")
    ap.add_argument("--concurrency", type=int, default=1024, help="samples in flight per engine (and its max batch)")
    ap.add_argument("--groups-per-call", type=int, default=1)
    ap.add_argument("--backend", choices=["torch", "megatron"], default="torch", help="train_backend of the learner")
    ap.add_argument("--max-tokens", type=int, default=16384, help="megatron: max_tokens_per_gpu (dynamic batches)")
    ap.add_argument("--stop-ids", type=int, default=0, help="random stop ids: mean response length ~ vocab / this "
                    "(0 = every response runs to --response-len)")
    ap.add_argument("--variants", nargs="+", default=[""], help="NAME[@S,..][!][:key=value|ENV=value ...]: each "
                    "staleness (or only those after @) runs once per variant; ! = no standalone runs for it (e.g. "
                    "before@8!:update_weight_mode=disk:groups_per_engine_call=4:ASYNC_RL_SORT_MICRO=0)")
    ap.add_argument("--standalone", action="store_true", help="for each async run: the learner alone on its "
                    "batches and the engine alone at its mean decode batch -> loop efficiency")
    ap.add_argument("--profile", action="store_true", help="profile the last warm-up step of each run's learner "
                    "(table in its logs/learner.log)")
    ap.add_argument("--out", default="/dev/shm/bench_async")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer toy on CPU (checks the script, not the claim)")
    ap.add_argument("--replay", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine-alone", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    if args.replay:
        print("RESULT " + json.dumps(replay_learner(Path(args.replay), warmup=2)), flush=True)
        return 0
    if args.engine_alone:
        print("RESULT " + json.dumps(engine_alone(Path(args.engine_alone), args.concurrency, args)), flush=True)
        return 0
    if args.smoke:
        args.response_len, args.steps, args.skip, args.concurrency = 32, 6, 2, 64
        args.stop_ids = min(args.stop_ids, 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = build(out, args.smoke)
    results = []
    for variant in args.variants:
        head, *words = variant.split(":")
        name, _, only = head.partition("@")  # NAME@8,4: this variant at those staleness values only
        alone = args.standalone and not name.endswith("!")  # NAME!: no standalone runs for it
        for s in [int(x) for x in only.split(",")] if only else args.staleness:
            r = run(out, model, data, s, args, ":".join([name.rstrip("!"), *words]))
            if alone and s > 0:
                r["alone_train"] = child_json(["--replay", r["run_dir"]])
                conc = max(1, round(r["engine"].get("mean_decode_batch", 1)))
                r["alone_gen"] = child_json(["--engine-alone", str(model), "--concurrency", str(conc),
                                             "--response-len", str(args.response_len), "--stop-ids", str(args.stop_ids)])
                r.update(efficiency(r, r["alone_train"], r["alone_gen"]))
            results.append(r)
            print(f"RUN {json.dumps(r)}", flush=True)
    table = "\n".join(tables(results, args))
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


def tables(results: list[dict], args) -> list[str]:
    lines = [f"{args.backend} learner; batch {args.batch} x {args.n} samples x <= {args.response_len} new tokens "
             f"(stop ids: {args.stop_ids}); " + (f"{args.timed} timed steps after max(--skip, max_staleness + 3) "
                                                 f"warm-up steps" if args.timed else
                                                 f"{args.steps} steps ({args.skip} warm-up left out)"), "",
             "| variant | max_staleness | trained tok/s | ratio | s/step | generated tok/s | learner busy | generator busy "
             "| mean staleness | mean response len | publish s/version | loop efficiency |", "|---" * 12 + "|"]
    base = {}
    for r in results:
        base.setdefault(r["variant"], r["trained_tok_s"])
        eff = f"{r['efficiency']:.2f} (ideal {r['ideal_tok_s']:.0f})" if "efficiency" in r else ""
        lines.append(f"| {r['variant']} | {r['staleness']} | {r['trained_tok_s']:.0f} | "
                     f"{r['trained_tok_s'] / base[r['variant']]:.2f}x | {r['step_s']:.2f} | {r['gen_tok_s']:.0f} | "
                     f"{r['learner_busy']:.2f} | {r['gen_busy']:.2f} | {r['staleness_mean']:.2f} | "
                     f"{r['response_len']:.0f} | {r['publish_s']:.3f} | {eff} |")
    lines += ["", "Learner step in the loop (s per step, device-synchronised phases) and the engine over the same window:",
              "", "| variant | s | sample wait | build | score | update | publish | compiles | alone step s | "
              "in loop / alone | engine busy | mean decode batch | paused s/s | graph captures (s) | loop decode tok/s | "
              "alone gen tok/s (same batch) | loop / alone |", "|---" * 17 + "|"]
    for r in results:
        p, e, a, g = r["phases"], r["engine"], r.get("alone_train", {}), r.get("alone_gen", {})
        train = sum(p.get(k, 0.0) for k in ("build", "score", "update"))
        alone = f"{a['step_s']:.3f} | {train / a['step_s']:.2f}x" if "step_s" in a else " | "
        loop_gen = e.get("mean_decode_batch", 0) * e.get("decode_steps_per_s", 0)
        gen_ratio = f"{loop_gen / g['gen_tok_s']:.2f}" if g.get("gen_tok_s") else ""
        lines.append(f"| {r['variant']} | {r['staleness']} | {p.get('sample_wait', 0):.3f} | {p.get('build', 0):.3f} | "
                     f"{p.get('score', 0):.3f} | {p.get('update', 0):.3f} | {p.get('publish', 0):.3f} | {r['compiles']} | "
                     f"{alone} | {e.get('busy', 0):.2f} | {e.get('mean_decode_batch', 0):.0f} | "
                     f"{e.get('paused_s_per_s', 0):.3f} | {e.get('captures', 0):.0f} ({e.get('capture_s', 0):.1f}) | "
                     f"{loop_gen:.0f} | {g.get('gen_tok_s', 0):.0f} | {gen_ratio} |")
    pubs = [r for r in results if r["publish"]]
    if pubs:
        keys = sorted({k for r in pubs for k in r["publish"]})
        lines += ["", "Publication parts (s per version): | variant | staleness | " + " | ".join(keys) + " |"]
        lines += [f"| {r['variant']} | {r['staleness']} | " + " | ".join(f"{r['publish'].get(k, 0):.4f}" for k in keys)
                  + " |" for r in pubs]
    return lines


if __name__ == "__main__":
    sys.exit(main())
