"""Turn one or more run directories into the pictures people compare runs by.

    python scripts/report.py runs/sync runs/async --out runs/compare      # overlay several runs
    python scripts/report.py runs/quickstart-2026...                      # one run

Writes to --out (default: the single run's dir, or runs/report): `learning.png` (reward versus learner
step, wall time and trained tokens), `system.png` (staleness histogram, learner / generator busy
fractions, train and generation tokens/s over time) and `report.md` (a table of the summaries).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_rl.metrics import read_metrics  # noqa: E402
from async_rl.launch.report import summarize  # noqa: E402


def smooth(values: list, window: int) -> list:
    out, acc = [], []
    for v in values:
        acc.append(v if v is not None else 0.0)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def learning_plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for name, rows in runs.items():
        reward = smooth([r.get("reward/mean") for r in rows], max(1, len(rows) // 20))
        samples, total = [], 0
        for r in rows:
            total += r.get("train_tokens") or 0
            samples.append(total)
        axes[0].plot([r["step"] for r in rows], reward, label=name)
        axes[1].plot([r["time"] for r in rows], reward, label=name)
        axes[2].plot(samples, reward, label=name)
    for ax, xlabel in zip(axes, ("learner step", "wall time (s)", "trained tokens")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward (moving mean)")
    axes[0].legend()
    fig.suptitle("reward versus learner step, wall time and trained tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def system_plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(1, len(runs))
    for i, (name, rows) in enumerate(runs.items()):
        hist = Counter(int(r.get("staleness/max") or 0) for r in rows)
        xs = sorted(hist)
        axes[0].bar([x + i * width for x in xs], [hist[x] / len(rows) for x in xs], width=width, label=name)
        t = [r["time"] for r in rows]
        axes[1].plot(t, smooth([r.get("perf/learner_busy_frac") for r in rows], 10), label=f"{name} learner")
        axes[1].plot(t, smooth([r.get("perf/gen_busy_frac") for r in rows], 10), "--", label=f"{name} generators")
        axes[2].plot(t, smooth([r.get("perf/train_tokens_per_s") for r in rows], 10), label=f"{name} train")
    axes[0].set(xlabel="staleness/max of the step's batch", ylabel="fraction of steps", title="staleness")
    axes[1].set(xlabel="wall time (s)", ylabel="busy fraction", title="utilization", ylim=(0, 1.05))
    axes[2].set(xlabel="wall time (s)", ylabel="tokens/s", title="trained tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | steps | wall s | reward first -> last | staleness mean | train tok/s | learner busy | generator busy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        s = summarize(rows)
        lines.append(f"| {name} | {s['steps']} | {s['wall_time_s']:.1f} | {s['reward_first']:.3f} -> "
                     f"{s['reward_last']:.3f} | {s['staleness_mean']:.2f} | {s['train_tokens_per_s']:.0f} | "
                     f"{s['learner_busy_frac']:.2f} | {s['gen_busy_frac']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = {Path(d).name: read_metrics(d) for d in args.run_dirs}
    empty = [n for n, rows in runs.items() if not rows]
    if empty:
        print(f"no metrics.jsonl rows in: {empty}", file=sys.stderr)
        return 2
    out = Path(args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else "runs/report"))
    out.mkdir(parents=True, exist_ok=True)
    learning_plot(runs, out / "learning.png")
    system_plot(runs, out / "system.png")
    text = table(runs)
    (out / "report.md").write_text(f"# Report\n\n{text}\n\n![learning](learning.png)\n\n![system](system.png)\n")
    print(text)
    print(f"\nwrote {out / 'learning.png'}, {out / 'system.png'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
