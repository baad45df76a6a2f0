"""The evidence behind docs/RESULTS.md: synchronous vs asynchronous training on the same work, and the
off-policy correction ablation, with seeds, on this machine (CPU).

    python scripts/proof.py learning --task quickstart --staleness 0 1 2 4 8 --seeds 0 1 2 --steps 600
    python scripts/proof.py learning --task chain      --staleness 0 1 2 4 8 --seeds 0 1 2 --steps 600
    python scripts/proof.py ablation --task quickstart --staleness 4 8 --seeds 0 1 --steps 600
    python scripts/proof.py figures                   # re-draw every figure and table from runs/proof/

Every run is `async-rl launch CONFIG` with `max_staleness`, `seed` and `rollout_seed` set per run and the
same number of learner steps (so the same number of trained samples). Runs are ordered seed-major and
setting-minor, so that slow phases of this shared machine hit all settings alike. A run dir that already
holds a summary.json is reused, so an interrupted sweep continues where it stopped.
Outputs: runs/proof/<experiment>/<task>/<setting>-seed<k>/ (run dirs), and docs/results/*.png + *.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_rl.metrics import read_metrics  # noqa: E402

TASKS = {  # task -> (config, build_tiny arguments)
    "quickstart": ("configs/quickstart.yaml", ["--out", "runs/tiny"]),
    "chain": ("configs/chain.yaml", ["--out", "runs/tiny_chain", "--task", "chain", "--max-operand", "12", "--sft-steps", "800"]),
}
# the correction ablation: label -> overrides (decoupled PPO stays on in all; only the behaviour correction moves)
CORRECTIONS = {
    "no-tis": ["use_tis=false"],
    "tis-token": ["use_tis=true", "tis_level=token", "tis_mode=truncate"],
    "tis-seq": ["use_tis=true", "tis_level=sequence_geometric", "tis_mode=truncate"],
    "mis-token": ["use_tis=true", "tis_level=token", "tis_mode=mask"],
}
OUT = ROOT / "runs/proof"
DOCS = ROOT / "docs/results"


def build(task: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny.py"), *TASKS[task][1]], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def launch(task: str, run_dir: Path, steps: int, seed: int, overrides: list[str]) -> dict:
    """One run (skipped when `run_dir` already finished); returns its summary.json."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    if run_dir.exists():  # an unfinished earlier attempt: start it again from scratch
        import shutil
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "async_rl.launch.cli", "launch", TASKS[task][0], f"num_rollout={steps}", f"seed={seed}",
           f"rollout_seed={seed}", "progress=false", *overrides, "--run-dir", str(run_dir)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  {run_dir.relative_to(ROOT)}: {time.time() - t0:.0f}s", flush=True)
    return json.loads(summary.read_text())


def sweep(experiment: str, task: str, settings: dict[str, list[str]], seeds: list[int], steps: int) -> None:
    build(task)
    total, done = len(settings) * len(seeds), 0
    for seed in seeds:
        for label, overrides in settings.items():
            done += 1
            print(f"[{done}/{total}] {experiment} {task} {label} seed {seed}", flush=True)
            launch(task, OUT / experiment / task / f"{label}-seed{seed}", steps, seed, overrides)


# ---- analysis -------------------------------------------------------------------------------------------
def load(experiment: str, task: str) -> dict[str, list[dict]]:
    """setting label -> per-seed records {metrics rows, summary, eval}."""
    runs: dict[str, list[dict]] = {}
    for d in sorted((OUT / experiment / task).glob("*-seed*")):
        if not (d / "summary.json").exists():
            continue
        label = d.name.rsplit("-seed", 1)[0]
        runs.setdefault(label, []).append({"rows": read_metrics(d), "summary": json.loads((d / "summary.json").read_text())})
    return runs


def final_reward(rows: list[dict], frac: float = 0.1) -> float:
    tail = rows[-max(1, int(len(rows) * frac)):]
    return statistics.mean(r["reward/mean"] for r in tail)


def trained_tokens_per_s(rows: list[dict]) -> float:
    """Tokens of trained samples / learner wall time, after the first 5 steps (start-up)."""
    rows = rows[min(5, len(rows) // 4):]
    wall = rows[-1]["time"] - rows[0]["time"] + rows[0]["perf/step_time_s"]
    return sum(r["train_tokens"] for r in rows) / wall


def greedy(summary: dict) -> float | None:
    end = (summary.get("eval") or {}).get("end") or {}
    return end.get("accuracy")


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def setting_key(label: str):
    digits = "".join(c for c in label if c.isdigit())
    return (int(digits) if digits else 0, label)


def _save(fig, axes, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(runs: dict[str, list[dict]], path: Path, title: str, samples_per_step: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for label in sorted(runs, key=setting_key):
        seeds = runs[label]
        n = min(len(s["rows"]) for s in seeds)
        window = max(1, n // 15)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve([r["reward/mean"] for r in s["rows"][:n]], kernel, mode="valid") for s in seeds])
        mean, lo, hi = smooth.mean(0), smooth.min(0), smooth.max(0)
        steps = np.arange(window - 1, n)
        samples = (steps + 1) * samples_per_step
        wall = np.mean([[s["rows"][i]["time"] for i in steps] for s in seeds], axis=0)
        for ax, x in ((axes[0], samples), (axes[1], wall)):
            line, = ax.plot(x, mean, label=f"{label} ({len(seeds)} seeds)")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="trained samples", ylabel="sampled reward (moving mean, min-max over seeds)")
    axes[1].set(xlabel="wall time (s, mean over seeds)")
    _save(fig, axes, title, path)


def system_figure(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Staleness histogram, learner / generator busy fractions and weight-update pause per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from collections import Counter

    labels = sorted(runs, key=setting_key)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        hist = Counter()
        for s in runs[label]:
            hist.update(int(r.get("staleness/max") or 0) for r in s["rows"])
        total = sum(hist.values())
        xs = sorted(hist)
        axes[0].bar([x + i * width for x in xs], [hist[x] / total for x in xs], width=width, label=label)
    x = range(len(labels))
    busy_l = [statistics.mean(s["summary"]["learner_busy_frac"] for s in runs[lb]) for lb in labels]
    busy_g = [statistics.mean(s["summary"]["gen_busy_frac"] for s in runs[lb]) for lb in labels]
    axes[1].bar([i - 0.2 for i in x], busy_l, width=0.4, label="learner busy")
    axes[1].bar([i + 0.2 for i in x], busy_g, width=0.4, label="generator busy")
    axes[1].set_xticks(list(x), labels)
    axes[0].set(xlabel="staleness of the step's oldest group (versions)", ylabel="fraction of steps",
                title="staleness histogram")
    axes[1].set(ylabel="busy fraction", ylim=(0, 1.05), title="utilization")
    _save(fig, axes, title, path)


def table(runs: dict[str, list[dict]], base: str | None) -> str:
    lines = ["| setting | seeds | wall s | sampled reward, first 10% | last 10% | greedy accuracy (end) | "
             "trained tok/s | ratio | learner busy | generator busy | mean staleness | evicted stale |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tps = {lb: statistics.mean(trained_tokens_per_s(s["rows"]) for s in seeds) for lb, seeds in runs.items()}
    for label in sorted(runs, key=setting_key):
        seeds = runs[label]
        first = [statistics.mean(r["reward/mean"] for r in s["rows"][:max(1, len(s["rows"]) // 10)]) for s in seeds]
        ratio = f"{tps[label] / tps[base]:.2f}x" if base in tps else "-"
        lines.append(
            f"| {label} | {len(seeds)} | {statistics.mean(s['summary']['wall_time_s'] for s in seeds):.0f} | "
            f"{mean_sd(first)} | {mean_sd([final_reward(s['rows']) for s in seeds])} | "
            f"{mean_sd([greedy(s['summary']) for s in seeds])} | {tps[label]:.0f} | {ratio} | "
            f"{statistics.mean(s['summary']['learner_busy_frac'] for s in seeds):.2f} | "
            f"{statistics.mean(s['summary']['gen_busy_frac'] for s in seeds):.2f} | "
            f"{statistics.mean(s['summary']['staleness_mean'] for s in seeds):.2f} | "
            f"{statistics.mean(s['summary']['evicted_stale'] or 0 for s in seeds):.0f} |")
    return "\n".join(lines)


def samples_per_step(task: str) -> int:
    import yaml
    cfg = yaml.safe_load((ROOT / TASKS[task][0]).read_text())["rollout"]
    return cfg["rollout_batch_size"] * cfg["n_samples_per_prompt"] // cfg.get("num_steps_per_rollout", 1)


def figures() -> int:
    DOCS.mkdir(parents=True, exist_ok=True)
    made = []
    for experiment in ("learning", "ablation"):
        for task in TASKS:
            runs = load(experiment, task)
            if not runs:
                continue
            name = f"{experiment}_{task}"
            title = (f"{task}: max_staleness sweep" if experiment == "learning"
                     else f"{task}: off-policy correction at high staleness")
            if experiment == "ablation":  # one figure per staleness value
                for st in sorted({lb.split("-", 1)[0] for lb in runs}):
                    sub = {lb.split("-", 1)[1]: v for lb, v in runs.items() if lb.startswith(st + "-")}
                    curves(sub, DOCS / f"{name}_{st}.png", f"{title} ({st})", samples_per_step(task))
                    made.append(DOCS / f"{name}_{st}.png")
            else:
                curves(runs, DOCS / f"{name}.png", title, samples_per_step(task))
                system_figure(runs, DOCS / f"{name}_system.png", f"{task}: staleness and utilization")
                made += [DOCS / f"{name}.png", DOCS / f"{name}_system.png"]
            base = "s0" if experiment == "learning" else None
            (DOCS / f"{name}.md").write_text(table(runs, base) + "\n")
            made.append(DOCS / f"{name}.md")
            print(f"\n## {name}\n{table(runs, base)}")
    print("\nwrote " + ", ".join(str(p.relative_to(ROOT)) for p in made))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["learning", "ablation", "figures"])
    ap.add_argument("--task", choices=sorted(TASKS), default="quickstart")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = ap.parse_args()
    if args.what == "figures":
        return figures()
    if args.what == "learning":
        settings = {f"s{s}": [f"max_staleness={s}", *args.overrides] for s in args.staleness}
    else:
        settings = {f"s{s}-{name}": [f"max_staleness={s}", *ov, *args.overrides]
                    for s in args.staleness for name, ov in CORRECTIONS.items()}
    sweep(args.what, args.task, settings, args.seeds, args.steps)
    return figures()


if __name__ == "__main__":
    sys.exit(main())
