"""Turn a run directory into a picture and a summary: `reward.png` (reward and staleness versus learner
step), `summary.json` and `summary.md`. Safe to call on a run that failed part-way."""
from __future__ import annotations

import json
from pathlib import Path

from async_rl.metrics import read_metrics


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], evals: dict | None = None) -> dict:
    k = max(1, len(rows) // 20)  # first/last 5% of steps
    rewards = [r.get("reward/mean") for r in rows]
    return {
        "steps": len(rows), "final_version": rows[-1]["version"] if rows else None,
        "wall_time_s": rows[-1]["time"] if rows else None,
        "reward_first": _mean(rewards[:k]), "reward_last": _mean(rewards[-k:]), "reward_window": k,
        "staleness_max": max((r.get("staleness/max") or 0) for r in rows) if rows else None,
        "staleness_mean": _mean([r.get("staleness/mean") for r in rows]),
        "train_tokens_per_s": _mean([r.get("perf/train_tokens_per_s") for r in rows]),
        "gen_tokens_per_s": _mean([r.get("perf/gen_tokens_per_s") for r in rows]),
        "learner_busy_frac": _mean([r.get("perf/learner_busy_frac") for r in rows]),
        "gen_busy_frac": _mean([r.get("perf/gen_busy_frac") for r in rows]),
        "evicted_stale": rows[-1].get("buffer/evicted_stale") if rows else None,
        "eval": {tag: e for tag, e in (evals or {}).items() if e},
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1.2])
    ax1.plot(steps, [r.get("reward/mean") for r in rows], color="tab:blue", alpha=0.35, label="reward/mean")
    w = max(1, len(rows) // 10)
    smooth = [_mean([r.get("reward/mean") for r in rows[max(0, i - w + 1):i + 1]]) for i in range(len(rows))]
    ax1.plot(steps, smooth, color="tab:blue", label=f"moving mean ({w} steps)")
    ax1.set_ylabel("reward")
    ax1.set_title(f"reward vs learner step ({path.parent.name})")
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r.get("staleness/max") for r in rows], label="staleness/max", color="tab:red")
    ax2.plot(steps, [r.get("staleness/mean") for r in rows], label="staleness/mean", color="tab:orange")
    ax2.set_xlabel("learner step")
    ax2.set_ylabel("staleness")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def write_report(run_dir: str | Path, evals: dict | None = None) -> str:
    """Write reward.png, summary.json, summary.md; return the summary text ('' when there are no metrics)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return ""
    s = summarize(rows, evals)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2))
    plot(rows, run_dir / "reward.png")
    lines = [f"# Run summary: {run_dir.name}", "",
             f"- steps: {s['steps']}, final version: {s['final_version']}, wall time: {_fmt(s['wall_time_s'], '.1f')} s",
             f"- reward (mean of first/last {s['reward_window']} steps): {_fmt(s['reward_first'])} -> {_fmt(s['reward_last'])}",
             f"- staleness: max {s['staleness_max']}, mean {_fmt(s['staleness_mean'], '.2f')}; evicted stale groups: {s['evicted_stale']}",
             f"- throughput: train {_fmt(s['train_tokens_per_s'], '.0f')} tok/s, generate {_fmt(s['gen_tokens_per_s'], '.0f')} tok/s; "
             f"busy: learner {_fmt(s['learner_busy_frac'], '.2f')}, generators {_fmt(s['gen_busy_frac'], '.2f')}"]
    for tag, e in s["eval"].items():
        lines.append(f"- eval ({tag}, {e['weights_name']}): greedy accuracy {e['accuracy']:.3f} on {e['num_prompts']} prompts")
    lines += ["", f"plot: {run_dir / 'reward.png'}"]
    text = "\n".join(lines)
    (run_dir / "summary.md").write_text(text + "\n")
    return text
