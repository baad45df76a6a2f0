"""Engine benchmarks on this machine (CPU): embedded engine vs plain HF `generate`, and generator throughput
with and without interruptible weight updates.

    .venv/bin/python scripts/bench_engines.py [--model runs/tiny/model_sft] [--batches 1,8,32,64,128]
        [--new-tokens 32] [--steps 150] [--skip-launch]

Part 1: the embedded engine as a real server (1 torch thread), one /generate of B prompts x N new tokens
(sampling at temperature 1, ignore_eos), against `model.generate` of the same model in this process (1 thread,
do_sample, the same B x N). Part 2: `async-rl launch configs/quickstart.yaml num_rollout=STEPS` once per
interrupt_mode (none, in_place, abort) and the run's generated tokens/s and staleness from its summary.json.
Prints one table per part.

    .venv/bin/python scripts/bench_engines.py --weight-update [--model runs/tiny/model_sft]

Weight-update latency into a real embedded engine for --model and a Qwen2-shaped ~100M model (random fp32):
disk (the learner's publish() + /update_weights_from_disk) vs broadcast (WeightBroadcaster over gloo), against
the floors bytes / measured memcpy bandwidth and bytes / measured loopback TCP bandwidth.

    python3 scripts/bench_engines.py --device cuda [--batches 1,8,32,64,128] [--new-tokens 256] [--prompt-len 128]

GPU mode (the GPU machine; no server, no launches): builds a Qwen2-shaped ~0.5B model with random weights
(bf16), checks the static path there (CUDA-graph greedy tokens == eager static ones; sampled logprobs against
a full forward pass), then per batch size times one request of B random prompts x N new tokens at temperature
1 through the engine's scheduler thread (static KV cache + CUDA graphs; at batch 64 also eager static and the
dynamic HF-cache path) against HF `generate` (bf16, sdpa, do_sample, the same B x N), and prints a table.
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


def build_qwen2_05b(out: Path, dev: str, smoke: bool = False) -> Path:
    """Qwen2.5-0.5B's shape (494M parameters) with random weights, saved bf16 with the tiny tokenizer
    (`smoke`: a 2-layer toy of the same kind, for checking this script on CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from async_rl import tiny

    tok = tiny.build_tokenizer(out)
    size = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2)
    if smoke:
        size.update(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = Qwen2Config(**size, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=1e6, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def engine_generate(scheduler, prompts: list[list[int]], new_tokens: int, temperature: float = 1.0):
    """One request of `prompts` through the running scheduler thread; returns its sequences."""
    from actors.engine.protocol import Request, SamplingParams, Sequence

    request = Request(return_logprob=True, is_batch=True)
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, ignore_eos=True)
    request.sequences = [Sequence(list(p), params, f"b{i}", request) for i, p in enumerate(prompts)]
    scheduler.submit(request)
    request.done.wait()
    if request.error:
        raise RuntimeError(request.error)
    return request.sequences


def gpu_checks(engine, scheduler, model, prompts: list[list[int]]) -> str:
    import torch

    static, dev = engine.static, engine.device
    static.cuda_graph = False
    eager = [s.output_ids for s in engine_generate(scheduler, prompts, 32, temperature=0.0)]
    static.cuda_graph = dev.type == "cuda"
    graphed = [s.output_ids for s in engine_generate(scheduler, prompts, 32, temperature=0.0)]
    same = sum(a == b for a, b in zip(eager, graphed))
    sampled = engine_generate(scheduler, prompts, 64)
    diffs = []
    with torch.no_grad():
        for s in sampled:
            ids = torch.tensor([s.prompt_ids + s.output_ids], device=dev)
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].float()
            ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(s.prompt_ids):, None]).squeeze(1)
            diffs.append((ref - torch.tensor(s.output_logprobs, device=dev)).abs())
    d = torch.cat(diffs)
    return (f"greedy, CUDA graphs vs eager static: {same}/{len(prompts)} sequences identical (32 tokens); "
            f"sampled logprobs vs bf16 full forward: mean |diff| {d.mean():.4f}, max {d.max():.4f}")


def gpu_main(args) -> int:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from actors.engine.model import Engine
    from actors.engine.scheduler import Scheduler

    batches, n = [int(b) for b in args.batches.split(",")], args.new_tokens
    dev = "cpu" if args.smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke)"
    t0 = time.perf_counter()
    path = build_qwen2_05b(Path(tempfile.mkdtemp()) / "qwen2_05b", dev, args.smoke)
    engine = Engine(str(path), 0, device=dev, dtype="bfloat16", kv_cache="static", max_batch_size=max(batches))
    scheduler = Scheduler(engine, max(batches))
    scheduler.start()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(dev).eval()
    print(f"built and loaded in {time.perf_counter() - t0:.0f}s; {device_name}, torch {torch.__version__}",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    vocab = hf.config.vocab_size
    prompts = lambda b: torch.randint(100, vocab - 100, (b, args.prompt_len), generator=gen).tolist()  # noqa: E731
    static, modes = engine.static, ["graphs", "eager", "dynamic"]
    try:
        print(gpu_checks(engine, scheduler, hf, prompts(8)), flush=True)
    except Exception:  # still measure the other paths, and show why
        import traceback
        traceback.print_exc()
        modes = ["eager", "dynamic"]

    def time_engine(b: int, mode: str) -> float:
        engine.static = None if mode == "dynamic" else static
        static.cuda_graph = mode == "graphs" and dev == "cuda"
        ps = prompts(b)
        engine_generate(scheduler, ps, n)  # warm-up: captures this size's graphs
        sync()
        start = time.perf_counter()
        seqs = engine_generate(scheduler, ps, n)
        assert all(len(s.output_ids) == n for s in seqs)
        return b * n / (time.perf_counter() - start)

    def time_hf(b: int) -> float:
        ids = torch.tensor(prompts(b), device=dev)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
            sync()
            start = time.perf_counter()
            hf.generate(ids, **kw)
            sync()
        return b * n / (time.perf_counter() - start)

    rows = []
    for b in batches:
        row = {"batch": b, modes[0]: time_engine(b, modes[0]), "hf": time_hf(b)}
        if b == 64:
            row.update({m: time_engine(b, m) for m in modes[1:]})
        rows.append(row)
        print(row, flush=True)
    scheduler.stopping.set()
    print(f"\nembedded engine vs HF generate on {device_name} (Qwen2 0.5B shape, random bf16 "
          f"weights, {args.prompt_len} prompt + {n} new tokens, temperature 1); tokens/s")
    print("| batch | engine: static + CUDA graphs | static, eager | dynamic HF cache | HF generate | ratio |")
    print("|---|---|---|---|---|---|")
    fmt = lambda r, k: f"{r[k]:,.0f}" if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['batch']} | {fmt(r, 'graphs')} | {fmt(r, 'eager')} | {fmt(r, 'dynamic')} | {fmt(r, 'hf')} "
              f"| {r[modes[0]] / r['hf']:.1f}x |")
    return 0


def build_qwen2_100m(out: Path) -> Path:
    """A Qwen2-shaped ~100M-parameter model with random weights (fp32) and the tiny tokenizer, for weight updates."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ROOT / "runs/tiny/model_sft")).save_pretrained(str(out))
    return out


def measured_bandwidths(nbytes: int) -> tuple[float, float]:
    """(memcpy GB/s, loopback TCP GB/s) for a payload of `nbytes`, each the best of 3."""
    import socket
    import threading

    import torch
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(nbytes / (time.perf_counter() - t0) / 1e9)
    payload, tcp = memoryview(src.numpy()), []
    for _ in range(3):
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def sink():
            conn, _ = server.accept()
            buf, got = bytearray(4 << 20), 0
            while got < nbytes:
                got += conn.recv_into(buf)
            conn.sendall(b"k")
            conn.close()
        t = threading.Thread(target=sink)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as c:
            t0 = time.perf_counter()
            c.sendall(payload)
            c.recv(1)
            tcp.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t.join()
        server.close()
    return max(copy), max(tcp)


def weight_update_bench(model_path: Path, repeats: int = 3) -> dict:
    """Median seconds of one weight update into a real embedded engine, by disk (the learner's publish():
    save_pretrained to run_dir/weights/vN, then /update_weights_from_disk) and by broadcast (gloo over
    loopback, WeightBroadcaster.update with 512 MiB buckets), and the floors bytes / bandwidth."""
    import statistics
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from async_rl.weight_broadcast import WeightBroadcaster
    from learners.weights import publish
    from tests.actors import engine_servers as servers

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    copy_bw, tcp_bw = measured_bandwidths(nbytes)
    proc, client = servers.start("embedded", model_path, Path("/tmp/bench_weights_engine.log"))
    save, load, bcast = [], [], []
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            for v in range(1, repeats + 1):
                t0 = time.perf_counter()
                path = publish(model, None, run_dir, v, keep=1)
                t1 = time.perf_counter()
                ok, message = client.update_weights_from_disk(str(path), v)
                assert ok, message
                save.append(t1 - t0)
                load.append(time.perf_counter() - t1)
        sender = WeightBroadcaster([client.url], "127.0.0.1", servers.free_port(), backend="gloo", timeout=300)
        sender.connect()
        try:
            for v in range(repeats + 1, 2 * repeats + 1):
                t0 = time.perf_counter()
                sender.update(state.items(), weight_version=v, bucket_bytes=512 * 2**20)
                bcast.append(time.perf_counter() - t0)
        finally:
            sender.close()
        assert str(client.model_info()["weight_version"]) == str(2 * repeats)
    finally:
        servers.stop(proc)
    med = statistics.median
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": nbytes, "copy_GBps": copy_bw,
            "tcp_GBps": tcp_bw, "save_s": med(save), "load_s": med(load), "disk_s": med(save) + med(load),
            "broadcast_s": med(bcast), "copy_floor_s": nbytes / copy_bw / 1e9, "tcp_floor_s": nbytes / tcp_bw / 1e9}


def weight_update_main(args) -> int:
    models = [Path(args.model), build_qwen2_100m(Path("/tmp/bench_qwen2_100m"))]
    rows = [(m, weight_update_bench(m)) for m in models]
    print("\nweight update into one embedded engine (CPU, 1 thread each side; median of 3)")
    print("| model | params | MB | disk: save + load s | broadcast s | floor: memcpy s | floor: loopback TCP s |")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows:
        print(f"| {m.name} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} | {r['save_s']:.3f} + {r['load_s']:.3f}"
              f" = {r['disk_s']:.3f} | {r['broadcast_s']:.3f} | {r['copy_floor_s']:.4f} ({r['copy_GBps']:.1f} GB/s) |"
              f" {r['tcp_floor_s']:.4f} ({r['tcp_GBps']:.1f} GB/s) |")
    return 0


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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompt-len", type=int, default=128, help="--device cuda: prompt tokens")
    ap.add_argument("--smoke", action="store_true", help="--device cuda: run its code on CPU with a toy model")
    ap.add_argument("--weight-update", action="store_true", help="only the weight-update latency table (disk vs "
                    "broadcast, --model and a ~100M Qwen2-shaped model)")
    args = ap.parse_args()
    if args.device == "cuda":
        return gpu_main(args)
    if args.weight_update:
        return weight_update_main(args)
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
