"""Run a GPU recipe from configs/ for a few steps on a random-init model of its shape, and compare each GPU's
peak memory with the estimate `async-rl launch RECIPE --dry-run` prints.

    # on the GPU machine, from the repo root, with wheels/ carried (pyzmq, megatron-core; docs/BENCHMARKS.md):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 scripts/gpu/check_recipe.py configs/qwen2.5-0.5b-gsm8k-1gpu.yaml --steps 3
    python3 scripts/gpu/check_recipe.py configs/qwen2.5-0.5b-gsm8k-1gpu.yaml engine_gpus=[1] learner_gpus=[0]

Nothing is downloaded: the model is the recipe's shape (async_rl/placement.py KNOWN) with random weights and
the tiny character tokenizer plus a chat template; the data are addition prompts written as GSM8K-style
{"prompt", "label"} rows. A random model never stops early, so every response is rollout_max_response_len
tokens (the estimate's worst case); prompts are short, so the run sets rollout_max_prompt_len=16 and the
estimate is computed for the same config. Prints the dry-run, then a table per GPU: estimate, measured peak
(nvidia-smi, every 0.2 s, less what was in use before the run), measured / estimate, and each process's
peak. Not yet run to the end: its first try (H200, 2026-12-02, the 0.5B recipe, `--steps 2` under a 140 s
limit) was cut off before the table (a step is 256 samples x 1,024 tokens, the launch ~75 s); its second
(`--max-seconds 69`) stopped before the first step and failed on the empty metrics.jsonl (fixed). Give it
about 5 minutes, or `--max-seconds` (120 or more) to stop the run and compare the peak reached so far.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# the tiny tokenizer knows digits and + - * = and space only: a template in those characters
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}= {% endif %}"


def build_model(shape, out: Path, qwen3: bool) -> Path:
    import torch
    import transformers

    from async_rl import tiny
    tok = tiny.build_tokenizer(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    kind = "Qwen3" if qwen3 else "Qwen2"
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        **({"head_dim": shape.head_dim} if qwen3 else {}), max_position_embeddings=8192,
        tie_word_embeddings=shape.tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, f"{kind}ForCausalLM")(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def build_data(out: Path) -> tuple[Path, Path]:
    from async_rl import tiny
    task = tiny.build_task(out / "raw", n_train=2000, n_test=32, seed=0)
    paths = []
    for split in ("train", "test"):
        rows = [json.loads(line) for line in Path(task[split]).read_text().splitlines()]
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["input"], "label": r["label"]}) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


class PeakMemory:
    """Peak memory.used per GPU (MiB) from nvidia-smi while the run lasts, and the first reading (memory in use
    before the run: this script's own CUDA context, which built the model)."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self.before: dict[int, int] = {}
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                      "-lms", "200"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.apps: dict[str, int] = {}  # process (its command line, shortened) -> peak MiB
        self.apps_proc = subprocess.Popen(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                           "--format=csv,noheader,nounits", "-lms", "200"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read_apps, daemon=True).start()

    def _read_apps(self):
        for line in self.apps_proc.stdout:
            try:
                pid, used = (int(x) for x in line.split(","))
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
            except (ValueError, OSError):
                continue
            self.apps[cmd] = max(self.apps.get(cmd, 0), used)

    def _read(self):
        for line in self.proc.stdout:
            index, used = (int(x) for x in line.split(","))
            self.before.setdefault(index, used)
            self.peak[index] = max(self.peak.get(index, 0), used)

    def stop(self) -> dict[int, int]:
        for proc in (self.proc, self.apps_proc):
            proc.terminate()
            proc.wait()
        return self.peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value words for the run and the estimate")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/dev/shm/check_recipe")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop the run (SIGINT, as Ctrl-C) after this "
                    "long and compare the peak so far (the estimate's peak is the first step's); 0 = no limit")
    args = ap.parse_args()

    from async_rl import config as config_mod
    from async_rl.placement import GiB, model_shape
    from async_rl.launch.plan import estimate, plan
    out = Path(args.out)
    base = config_mod.load(args.recipe)
    shape, _ = model_shape(base.ckpt.hf_checkpoint)
    name = Path(base.ckpt.hf_checkpoint).name
    t0 = time.time()
    model = out / name
    if not (model / "config.json").exists():
        build_model(shape, model, qwen3=name.lower().startswith("qwen3"))
    train, test = build_data(out)
    print(f"built {name}-shaped model and data in {time.time() - t0:.0f}s", flush=True)
    words = [f"hf_checkpoint={model}", f"prompt_data={train}", f"eval_prompt_data=[gsm8k, {test}]",
             "eval_max_prompts=16", f"num_rollout={args.steps}", "rollout_max_prompt_len=16", "save_interval=0",
             "progress=false", *args.overrides]
    cfg = config_mod.load(args.recipe, words)
    print(plan(cfg), flush=True)
    run_dir = out / "run"
    subprocess.run(["rm", "-rf", str(run_dir)])
    peak = PeakMemory()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "async_rl.launch.cli", "launch", args.recipe, *words, "--run-dir",
                             str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = False
    try:
        output, _ = proc.communicate(timeout=args.max_seconds or None)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGINT)  # the launcher stops every process it started
        output, _ = proc.communicate(timeout=120)
    measured = peak.stop()
    print(output[-3000:])
    if proc.returncode != 0 and not stopped:
        for log in sorted((run_dir / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + log.read_text()[-2500:])
        return proc.returncode
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if stopped:  # metrics.jsonl may exist and be empty: stopped before the first step
        print(f"stopped after --max-seconds {args.max_seconds:.0f}: {len(rows)} steps done")
    last = rows[-1] if rows else {}
    print(f"\nrun: {len(rows)} steps in {time.time() - t0:.0f}s, response length "
          f"{last.get('response_length/mean')}, reward {last.get('reward/mean')}")
    print("| GPU | processes | estimate GiB | measured peak GiB (in use before the run) | measured / estimate |\n"
          "|---|---|---|---|---|")
    for cmd, mib in sorted(peak.apps.items(), key=lambda kv: -kv[1]):
        print(f"process peak {mib / 1024:.1f} GiB: {cmd}")
    for gpu, users in sorted(estimate(cfg)["gpus"].items()):
        est = sum(b for _, b in users) / GiB
        before = peak.before.get(gpu, 0) / 1024
        got = measured.get(gpu, 0) / 1024 - before
        print(f"| {gpu} | {' + '.join(n for n, _ in users)} | {est:.1f} | {got:.1f} ({before:.1f}) | {got / est:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
