"""Metrics sinks: `run_dir/metrics.jsonl` always (one JSON object per learner step, flushed at once so
`async-rl status` and the launcher's progress line see it live), W&B and TensorBoard behind switches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from async_rl.config import Config


class MetricsWriter:
    def __init__(self, run_dir: str | Path, cfg: Config):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._wandb = self._tb = None
        if cfg.logging.use_wandb and cfg.logging.wandb_mode != "disabled":
            import wandb  # optional extra: pip install .[wandb]
            self._wandb = wandb.init(**wandb_init_args(cfg, run_dir))
        if cfg.logging.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs: pip install .[tensorboard]
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir(cfg, run_dir)))

    def log(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(metrics.get("step", 0))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def wandb_init_args(cfg: Config, run_dir: str | Path) -> dict:
    """wandb.init's arguments from the logging section (slime's --wandb-* options)."""
    lg = cfg.logging
    config = cfg.to_dict()
    if lg.wandb_key:  # the run's config is uploaded with it: never the key
        config["logging"]["wandb_key"] = "(set)"
    args = {"project": lg.wandb_project, "mode": lg.wandb_mode, "dir": lg.wandb_dir or str(run_dir),
            "config": config, "name": Path(run_dir).resolve().name}
    if lg.wandb_group:
        args["group"] = lg.wandb_group
    if lg.wandb_team:
        args["entity"] = lg.wandb_team
    if lg.wandb_run_id:
        args.update(id=lg.wandb_run_id, resume="allow")
    settings = {**({"base_url": lg.wandb_host} if lg.wandb_host else {}),
                **({"api_key": lg.wandb_key} if lg.wandb_key else {})}
    if settings:  # wandb.init takes its settings as a map too
        args["settings"] = settings
    return args


def tensorboard_dir(cfg: Config, run_dir: str | Path) -> Path:
    """run_dir/tensorboard[/tb_project_name[/tb_experiment_name]]."""
    lg = cfg.logging
    return Path(run_dir, "tensorboard", *[p for p in (lg.tb_project_name, lg.tb_experiment_name) if p])


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All complete lines of metrics.jsonl (a line being written is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def elapsed_before(run_dir: str | Path, step: int) -> float:
    """The `time` of the last logged step before `step`: where a resumed learner's clock continues from, so
    `time` (and the summary's wall time) counts the training of every launch, not only the last one."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", step) < step and r.get("time") is not None]
    return float(rows[-1]["time"]) if rows else 0.0
